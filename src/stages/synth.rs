//! `synth`: a seeded world of shapes, written in the formats real data
//! comes in, so every downstream stage runs the code it runs on real data.
//!
//! Scenes hold 1 to 4 objects (shape, colour, size, pattern) on a
//! background (the analogue of places), rendered antialiased with a little
//! noise into JPEG files. Training scenes become a CC3M-style captions TSV
//! (captions written from the scene graph with varied templates, synonyms,
//! plurals and conjunctions) plus images named by row. Held-out scenes
//! become the four GeneCIS template files: attribute tasks in VAW style
//! (`image_id` + `instance_bbox`), object tasks in COCO style
//! (`val_image_id`, `{id:012}.jpg`), each template with its target and 14
//! distractors built by rules over the scene graphs: half fool image-only
//! retrieval (the reference's look, wrong in the conditioned way), half
//! fool text-only retrieval (the condition, wrong otherwise).
//!
//! Tables:
//! - `sources(role, path)`: where the files are, relative to the stage
//!   folder (`ingest` and `templates` read them from here);
//! - `scenes(split, image_id, background, n_objects, caption?, closeup)`;
//! - `objects(split, image_id, object_idx, shape, color, size, pattern, x, y, r)`.

use std::path::Path;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, RecordBatch, StringBuilder, UInt32Builder,
    UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use image::{Rgb, RgbImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::framework::stage::{
    ChunkTables, Chunks, Finding, InputTable, Stage, StageContext, TableDef,
};
use crate::rng::Rng;
use crate::tables::sources::SOURCES_SCHEMA;

pub static SCENES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("split", DataType::Utf8, false),
        Field::new("image_id", DataType::UInt64, false),
        Field::new("background", DataType::Utf8, false),
        Field::new("n_objects", DataType::UInt32, false),
        Field::new("caption", DataType::Utf8, true),
        Field::new("closeup", DataType::Boolean, false),
    ]))
});

pub static OBJECTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("split", DataType::Utf8, false),
        Field::new("image_id", DataType::UInt64, false),
        Field::new("object_idx", DataType::UInt32, false),
        Field::new("shape", DataType::Utf8, false),
        Field::new("color", DataType::Utf8, false),
        Field::new("size", DataType::Utf8, false),
        Field::new("pattern", DataType::Utf8, false),
        Field::new("x", DataType::Float64, false),
        Field::new("y", DataType::Float64, false),
        Field::new("r", DataType::Float64, false),
    ]))
});

const SHAPES: [&str; 8] = [
    "circle", "square", "triangle", "star", "diamond", "cross", "ring", "hexagon",
];
/// A second name the captions sometimes use.
const SYNONYMS: [&str; 8] = [
    "disc", "box", "pyramid", "star", "rhombus", "plus", "hoop", "hexagon",
];
const COLORS: [(&str, [u8; 3]); 8] = [
    ("red", [215, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 70, 210]),
    ("yellow", [235, 210, 40]),
    ("purple", [140, 50, 170]),
    ("orange", [240, 130, 30]),
    ("pink", [240, 120, 180]),
    ("black", [25, 25, 25]),
];
const SIZES: [&str; 2] = ["small", "large"];
const PATTERNS: [&str; 3] = ["solid", "striped", "dotted"];
const BACKGROUNDS: [(&str, &[&str]); 5] = [
    ("sand", &["on sand", "on the beach"]),
    ("snow", &["in the snow", "on snow"]),
    ("grass", &["on grass", "on the lawn"]),
    ("water", &["in water", "on the water"]),
    ("brick", &["against a brick wall", "by a brick wall"]),
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthParams {
    #[serde(default)]
    pub seed: u64,
    /// Training scenes (captioned).
    #[serde(default = "d_train")]
    pub train_scenes: usize,
    /// Held-out base scenes; each template takes one as its reference.
    #[serde(default = "d_heldout")]
    pub heldout_scenes: usize,
    /// Templates per GeneCIS task (four tasks).
    #[serde(default = "d_templates")]
    pub templates_per_task: usize,
    /// Image side in pixels.
    #[serde(default = "d_size")]
    pub image_size: u32,
    #[serde(default = "one")]
    pub min_objects: usize,
    #[serde(default = "three")]
    pub max_objects: usize,
    #[serde(default = "d_quality")]
    pub jpeg_quality: u8,
    /// Share of training images that are close-ups of one object (its
    /// VAW-style crop, captioned with that object alone): the view the
    /// attribute tasks' crops give.
    #[serde(default = "d_closeups")]
    pub closeups: f64,
}

fn d_closeups() -> f64 {
    0.25
}

fn d_train() -> usize {
    3000
}
fn d_heldout() -> usize {
    400
}
fn d_templates() -> usize {
    100
}
fn d_size() -> u32 {
    64
}
fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn d_quality() -> u8 {
    90
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    pub shape: usize,
    pub color: usize,
    pub size: usize,
    pub pattern: usize,
    /// Centre and radius, as fractions of the image side.
    pub x: f64,
    pub y: f64,
}

impl Object {
    pub fn r(&self) -> f64 {
        [0.14, 0.2][self.size]
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub background: usize,
    pub objects: Vec<Object>,
}

/// Cell centres of the 3 x 3 layout grid.
fn cell(c: usize) -> (f64, f64) {
    ((c % 3) as f64 * 0.32 + 0.18, (c / 3) as f64 * 0.32 + 0.18)
}

fn pick(rng: &mut Rng, n: usize) -> usize {
    rng.below(n as u64) as usize
}

/// A random object in a free cell of `used`.
fn place(rng: &mut Rng, used: &mut Vec<usize>, mut o: Object) -> Object {
    let free: Vec<usize> = (0..9).filter(|c| !used.contains(c)).collect();
    let c = free[pick(rng, free.len())];
    used.push(c);
    let (x, y) = cell(c);
    o.x = x + rng.uniform(-0.03, 0.03);
    o.y = y + rng.uniform(-0.03, 0.03);
    o
}

fn random_object(rng: &mut Rng) -> Object {
    Object {
        shape: pick(rng, SHAPES.len()),
        color: pick(rng, COLORS.len()),
        size: pick(rng, SIZES.len()),
        pattern: pick(rng, PATTERNS.len()),
        x: 0.0,
        y: 0.0,
    }
}

/// A scene of `n` objects with distinct shapes (a shape may repeat once as
/// an identical pair, for plural captions).
fn random_scene(rng: &mut Rng, n: usize) -> Scene {
    let mut used = Vec::new();
    let mut objects: Vec<Object> = Vec::new();
    while objects.len() < n {
        let o = random_object(rng);
        if objects.iter().any(|p| p.shape == o.shape) {
            continue;
        }
        objects.push(place(rng, &mut used, o));
        if objects.len() < n && rng.uniform(0.0, 1.0) < 0.12 {
            let twin = objects[objects.len() - 1];
            objects.push(place(rng, &mut used, twin));
        }
    }
    Scene {
        background: pick(rng, BACKGROUNDS.len()),
        objects,
    }
}

fn inside(shape: usize, u: f64, v: f64) -> bool {
    let r2 = u * u + v * v;
    match SHAPES[shape] {
        "circle" => r2 <= 1.0,
        "ring" => (0.3..=1.0).contains(&r2),
        "square" => u.abs() <= 0.82 && v.abs() <= 0.82,
        "diamond" => u.abs() + v.abs() <= 1.0,
        "triangle" => (-0.9..=0.8).contains(&v) && u.abs() <= (v + 0.9) / 1.7 * 0.98,
        "star" => {
            let th = v.atan2(u) + std::f64::consts::FRAC_PI_2;
            r2.sqrt() <= 0.42 + 0.58 * (0.5 + 0.5 * (5.0 * th).cos()).powi(2)
        }
        "cross" => (u.abs() <= 0.32 && v.abs() <= 0.95) || (v.abs() <= 0.32 && u.abs() <= 0.95),
        _ => (v.abs() * 0.866 + u.abs() * 0.5).max(u.abs()) <= 0.9,
    }
}

fn paint(o: &Object, u: f64, v: f64) -> [f64; 3] {
    let c = COLORS[o.color].1.map(|x| x as f64);
    let light = c.map(|x| x + (255.0 - x) * 0.6);
    match PATTERNS[o.pattern] {
        "striped" => {
            if ((u + v) * 2.6).floor() as i64 % 2 == 0 {
                c
            } else {
                light
            }
        }
        "dotted" => {
            let (fu, fv) = (
                (u * 2.5 + 10.0).fract() - 0.5,
                (v * 2.5 + 10.0).fract() - 0.5,
            );
            if fu * fu + fv * fv < 0.07 {
                [245.0, 245.0, 245.0]
            } else {
                c
            }
        }
        _ => c,
    }
}

fn background(kind: usize, x: u32, y: u32, n: f64) -> [f64; 3] {
    let (xf, yf) = (x as f64, y as f64);
    match BACKGROUNDS[kind].0 {
        "sand" => [212.0 + n * 14.0, 188.0 + n * 14.0, 140.0 + n * 10.0],
        "snow" => [236.0 + n * 5.0, 239.0 + n * 5.0, 247.0],
        "grass" => {
            let blade = if (x + (y / 3) % 2) % 4 == 0 {
                -25.0
            } else {
                0.0
            };
            [70.0 + blade, 145.0 + blade + n * 12.0, 60.0 + blade]
        }
        "water" => {
            let w = (yf * 0.7 + (xf * 0.25).sin() * 2.0).sin() * 18.0;
            [55.0 + w * 0.3, 105.0 + w * 0.6, 195.0 + w]
        }
        _ => {
            let row = y / 6;
            let off = if row % 2 == 0 { 0 } else { 5 };
            if y % 6 == 0 || (x + off) % 10 == 0 {
                [205.0, 200.0, 190.0]
            } else {
                [155.0 + n * 10.0, 70.0, 50.0]
            }
        }
    }
}

/// A close-up of `s`'s first object: its VAW crop of the rendered scene,
/// padded and resized back to `size`, as `embed` prepares a VAW key.
fn closeup(s: &Scene, size: u32, seed: u64) -> RgbImage {
    use crate::model::preprocess::{crop_pad_square, resize_center_crop_raster, vaw_crop_box};
    let full = render(s, size, seed);
    let raster = crate::model::preprocess::Raster {
        width: size,
        height: size,
        mode: crate::model::preprocess::Mode::Rgb,
        data: full.into_raw(),
    };
    let bx = vaw_crop_box(bbox(&s.objects[0], size), size, size);
    let out = resize_center_crop_raster(&crop_pad_square(&raster, bx), size);
    RgbImage::from_raw(out.width, out.height, out.data).expect("an RGB raster of size x size")
}

/// Renders a scene: 3 x 3 supersampling at object edges, noise per pixel.
pub fn render(s: &Scene, size: u32, seed: u64) -> RgbImage {
    let mut rng = Rng::new(&[seed, 0x7e57]);
    let sz = size as f64;
    RgbImage::from_fn(size, size, |x, y| {
        let n = rng.uniform(-1.0, 1.0);
        let bg = background(s.background, x, y, n);
        let mut acc = [0.0f64; 3];
        for sy in 0..3 {
            for sx in 0..3 {
                let (px, py) = (
                    (x as f64 + (sx as f64 + 0.5) / 3.0) / sz,
                    (y as f64 + (sy as f64 + 0.5) / 3.0) / sz,
                );
                let mut c = bg;
                for o in &s.objects {
                    let (u, v) = ((px - o.x) / o.r(), (py - o.y) / o.r());
                    if inside(o.shape, u, v) {
                        c = paint(o, u, v);
                    }
                }
                for k in 0..3 {
                    acc[k] += c[k] / 9.0;
                }
            }
        }
        let e = rng.uniform(-5.0, 5.0);
        Rgb(acc.map(|v| (v + e).round().clamp(0.0, 255.0) as u8))
    })
}

/// An object's noun phrase. Colour and pattern are sometimes said after
/// the noun ("a circle in red", "a box with stripes"), which the parser
/// reads as relations, so mining also yields attribute conditions, as
/// CC3M's "a woman in red" does.
fn describe(o: &Object, rng: &mut Rng, plural: bool) -> String {
    let style = rng.uniform(0.0, 1.0);
    let colour_after = style < 0.3;
    let pattern_after = !colour_after && o.pattern != 0 && style < 0.55;
    let mut words: Vec<&str> = Vec::new();
    if rng.uniform(0.0, 1.0) < 0.5 {
        words.push(SIZES[o.size]);
    }
    if o.pattern != 0 && !pattern_after && rng.uniform(0.0, 1.0) < 0.7 {
        words.push(PATTERNS[o.pattern]);
    }
    // Captions leave the colour out now and then, as people do; the
    // shape then has to carry the match in contrastive pretraining.
    if !colour_after && rng.uniform(0.0, 1.0) < 0.65 {
        words.push(COLORS[o.color].0);
    }
    let noun = if rng.uniform(0.0, 1.0) < 0.2 {
        SYNONYMS[o.shape]
    } else {
        SHAPES[o.shape]
    };
    let noun = if plural {
        if noun.ends_with('x') || noun.ends_with('s') {
            format!("{noun}es")
        } else {
            format!("{noun}s")
        }
    } else {
        noun.to_string()
    };
    words.push(&noun);
    let mut body = words.join(" ");
    if colour_after {
        body = format!("{body} in {}", COLORS[o.color].0);
    } else if pattern_after {
        body = format!("{body} with {}", ["stripes", "dots"][o.pattern - 1]);
    }
    if plural {
        format!("two {body}")
    } else if body.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {body}")
    } else {
        format!("a {body}")
    }
}

fn relation(a: &Object, b: &Object, rng: &mut Rng) -> &'static str {
    let (dx, dy) = (b.x - a.x, b.y - a.y);
    if rng.uniform(0.0, 1.0) < 0.2 {
        "with"
    } else if dx.abs() >= dy.abs() {
        ["next to", "beside", "near"][pick(rng, 3)]
    } else if dy > 0.0 {
        "above"
    } else {
        "below"
    }
}

/// The place, said in 60% of captions (" on sand"), else "".
fn place_phrase(background: usize, rng: &mut Rng) -> String {
    let places = BACKGROUNDS[background].1;
    let said = places[pick(rng, places.len())];
    if rng.uniform(0.0, 1.0) < 0.6 {
        format!(" {said}")
    } else {
        String::new()
    }
}

/// A close-up's caption: its object, sometimes its place.
fn closeup_caption(s: &Scene, rng: &mut Rng) -> String {
    let d = describe(&s.objects[0], rng, false);
    format!("{d}{}", place_phrase(s.background, rng))
}

/// A caption from the scene graph, in one of several phrasings.
pub fn caption(s: &Scene, rng: &mut Rng) -> String {
    // Identical pairs are said once, in the plural.
    let mut groups: Vec<(Object, bool)> = Vec::new();
    for o in &s.objects {
        match groups.iter_mut().find(|(g, _)| g.shape == o.shape) {
            Some(g) => g.1 = true,
            None => groups.push((*o, false)),
        }
    }
    let descs: Vec<String> = groups.iter().map(|(o, p)| describe(o, rng, *p)).collect();
    let place = place_phrase(s.background, rng);
    let text = match descs.len() {
        1 => format!("{}{place}", descs[0]),
        2 if rng.uniform(0.0, 1.0) < 0.3 => format!("{} and {}{place}", descs[0], descs[1]),
        2 => format!(
            "{} {} {}{place}",
            descs[0],
            relation(&groups[0].0, &groups[1].0, rng),
            descs[1]
        ),
        _ => {
            let rel = relation(&groups[0].0, &groups[1].0, rng);
            let rest: Vec<&str> = descs[2..].iter().map(String::as_str).collect();
            format!(
                "{} {rel} {} and {}{place}",
                descs[0],
                descs[1],
                rest.join(" and ")
            )
        }
    };
    text
}

pub struct Synth;

/// One rendered image of the held-out set.
struct Held {
    id: u64,
    scene: Scene,
    /// The object a VAW-style key crops (attribute tasks).
    focus: Option<usize>,
}

fn bbox(o: &Object, size: u32) -> [f64; 4] {
    let s = size as f64;
    let r = o.r() * s;
    let x = (o.x * s - r).max(0.0).floor();
    let y = (o.y * s - r).max(0.0).floor();
    [
        x,
        y,
        (2.0 * r).ceil().min(s - x),
        (2.0 * r).ceil().min(s - y),
    ]
}

/// A scene of `o` (placed, object 0) plus a number of random companions
/// in the range `extras`.
fn scene_with(
    rng: &mut Rng,
    o: Object,
    extras: (usize, usize),
    background: Option<usize>,
) -> Scene {
    let extra = extras.0 + pick(rng, extras.1 - extras.0 + 1);
    let mut used = Vec::new();
    let mut objects = vec![place(rng, &mut used, o)];
    while objects.len() < 1 + extra {
        let c = random_object(rng);
        if objects.iter().any(|p| p.shape == c.shape) {
            continue;
        }
        objects.push(place(rng, &mut used, c));
    }
    let background = background.unwrap_or_else(|| pick(rng, BACKGROUNDS.len()));
    Scene {
        background,
        objects,
    }
}

/// An object differing from `o` in attribute `a` (0 colour, 1 pattern,
/// 2 size), the rest kept.
fn vary(rng: &mut Rng, o: &Object, a: usize) -> Object {
    let mut v = *o;
    loop {
        match a {
            0 => v.color = pick(rng, COLORS.len()),
            1 => v.pattern = pick(rng, PATTERNS.len()),
            _ => v.size = pick(rng, SIZES.len()),
        }
        if v != *o {
            return v;
        }
    }
}

fn attr(o: &Object, a: usize) -> usize {
    [o.color, o.pattern, o.size][a]
}

const ATTR_TYPES: [&str; 3] = ["color", "pattern", "size"];

/// One template: (condition, reference, target, gallery), held-out images.
type Tpl = (String, Held, Held, Vec<Held>);

fn object_other_shape(rng: &mut Rng, avoid: &[usize]) -> Object {
    loop {
        let o = random_object(rng);
        if !avoid.contains(&o.shape) {
            return o;
        }
    }
}

impl Synth {
    fn templates(p: &SynthParams, task: usize, base: &[Scene], next_id: &mut u64) -> Vec<Tpl> {
        let mut out = Vec::new();
        let mut id = || {
            *next_id += 1;
            *next_id
        };
        for (k, r_scene) in base.iter().enumerate() {
            let mut rng = Rng::new(&[p.seed, 0x7a5c, task as u64, k as u64]);
            let ro = r_scene.objects[0];
            let held = |scene: Scene, focus: Option<usize>, id: u64| Held { id, scene, focus };
            let reference = held(r_scene.clone(), Some(0), id());
            let mut gallery = Vec::new();
            let (cond, target) = match task {
                // focus_attribute: the same value of the named attribute type.
                // Colour or pattern: a crop is resized to the input side,
                // so size is not visible in it.
                0 => {
                    let a = pick(&mut rng, 2);
                    let mut t = random_object(&mut rng);
                    while attr(&t, a) != attr(&ro, a) || t.shape == ro.shape {
                        t = random_object(&mut rng);
                        match a {
                            0 => t.color = ro.color,
                            1 => t.pattern = ro.pattern,
                            _ => t.size = ro.size,
                        }
                    }
                    let s = scene_with(&mut rng, t, (0, 1), None);
                    for j in 0..14 {
                        // Image-only confusers: the reference's object, the attribute changed.
                        let d = if j < 7 {
                            vary(&mut rng, &ro, a)
                        } else {
                            let mut d = random_object(&mut rng);
                            while attr(&d, a) == attr(&ro, a) {
                                d = random_object(&mut rng);
                            }
                            d
                        };
                        let ds = scene_with(
                            &mut rng,
                            d,
                            (0, 1),
                            if j < 7 {
                                Some(r_scene.background)
                            } else {
                                None
                            },
                        );
                        gallery.push(held(ds, Some(0), id()));
                    }
                    (ATTR_TYPES[a].to_string(), held(s, Some(0), id()))
                }
                // change_attribute: the reference's object with the named colour.
                1 => {
                    let mut new = ro;
                    while new.color == ro.color {
                        new.color = pick(&mut rng, COLORS.len());
                    }
                    let s = scene_with(&mut rng, new, (0, 1), Some(r_scene.background));
                    for j in 0..14 {
                        let d = if j < 7 {
                            // The reference's object in another colour.
                            let mut d = ro;
                            while d.color == new.color {
                                d.color = pick(&mut rng, COLORS.len());
                            }
                            d
                        } else {
                            // The named colour on another shape (text-only confusers).
                            let mut d = object_other_shape(&mut rng, &[ro.shape]);
                            d.color = new.color;
                            d
                        };
                        let ds = scene_with(&mut rng, d, (0, 1), None);
                        gallery.push(held(ds, Some(0), id()));
                    }
                    (COLORS[new.color].0.to_string(), held(s, Some(0), id()))
                }
                // focus_object: another scene with that object, as it looks here.
                2 => {
                    let shapes: Vec<usize> = r_scene.objects.iter().map(|o| o.shape).collect();
                    let s = scene_with(&mut rng, ro, (0, 2), None);
                    for j in 0..14 {
                        let ds = if j < 7 {
                            // The reference's scene with its named object swapped.
                            let mut ds = r_scene.clone();
                            let swap = object_other_shape(&mut rng, &shapes);
                            ds.objects[0] = Object {
                                x: ro.x,
                                y: ro.y,
                                ..swap
                            };
                            ds
                        } else {
                            // The named shape, another colour and pattern.
                            let mut d = ro;
                            while d.color == ro.color {
                                d.color = pick(&mut rng, COLORS.len());
                            }
                            d.pattern = pick(&mut rng, PATTERNS.len());
                            scene_with(&mut rng, d, (0, 2), None)
                        };
                        gallery.push(held(ds, None, id()));
                    }
                    (SHAPES[ro.shape].to_string(), held(s, None, id()))
                }
                // change_object: the reference's scene with the named object added.
                _ => {
                    let shapes: Vec<usize> = r_scene.objects.iter().map(|o| o.shape).collect();
                    let add = object_other_shape(&mut rng, &shapes);
                    let with = |rng: &mut Rng, o: Object| {
                        let mut used: Vec<usize> = Vec::new();
                        let mut s = r_scene.clone();
                        for q in &s.objects {
                            let c = ((q.y - 0.18) / 0.32).round() as usize * 3
                                + ((q.x - 0.18) / 0.32).round() as usize;
                            used.push(c.min(8));
                        }
                        s.objects.push(place(rng, &mut used, o));
                        s
                    };
                    let target = with(&mut rng, add);
                    for j in 0..14 {
                        let ds = if j < 7 {
                            let mut avoid = shapes.clone();
                            avoid.push(add.shape);
                            let other = object_other_shape(&mut rng, &avoid);
                            with(&mut rng, other)
                        } else {
                            scene_with(&mut rng, add, (1, 2), None)
                        };
                        gallery.push(held(ds, None, id()));
                    }
                    (SHAPES[add.shape].to_string(), held(target, None, id()))
                }
            };
            out.push((cond, reference, target, gallery));
        }
        out
    }
}

fn image_json(h: &Held, vaw: bool, size: u32) -> serde_json::Value {
    match (vaw, h.focus) {
        (true, Some(f)) => serde_json::json!({
            "image_id": h.id.to_string(),
            "instance_bbox": bbox(&h.scene.objects[f], size),
        }),
        _ => serde_json::json!({ "val_image_id": h.id }),
    }
}

fn jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(img)
        .map_err(|e| Error::Internal(format!("JPEG encoding: {e}")))?;
    Ok(out)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(Error::io("cannot create", d))?;
    }
    std::fs::write(path, bytes).map_err(Error::io("cannot write", path))
}

pub const TASK_FILES: [&str; 4] = [
    "focus_attribute",
    "change_attribute",
    "focus_object",
    "change_object",
];

impl Stage for Synth {
    const KIND: &'static str = "synth";
    const VERSION: &'static str = "2";
    const ABOUT: &'static str =
        "a seeded world of shapes -> a CC3M-style captions TSV + images, the four GeneCIS template files + images, sources";
    type Params = SynthParams;
    type Work = ();

    fn input_tables() -> &'static [InputTable] {
        &[]
    }

    fn output_tables() -> Vec<TableDef> {
        vec![
            TableDef::new("sources", SOURCES_SCHEMA.clone()),
            TableDef::new("scenes", SCENES_SCHEMA.clone()),
            TableDef::new("objects", OBJECTS_SCHEMA.clone()),
        ]
    }

    fn validate(p: &SynthParams, _base: &Path) -> Vec<Finding> {
        let mut out = Vec::new();
        if p.min_objects == 0 {
            out.push(Finding::error(
                "min_objects",
                "a scene needs at least one object",
            ));
        }
        if p.max_objects < p.min_objects || p.max_objects > 4 {
            out.push(Finding::error(
                "max_objects",
                format!("must be between min_objects ({}) and 4", p.min_objects),
            ));
        }
        if p.image_size < 32 {
            out.push(Finding::error(
                "image_size",
                format!(
                    "{} px is too small to draw on: use 32 or more",
                    p.image_size
                ),
            ));
        }
        if p.train_scenes == 0 {
            out.push(Finding::error("train_scenes", "must be at least 1"));
        }
        if p.templates_per_task == 0 {
            out.push(Finding::error("templates_per_task", "must be at least 1"));
        }
        if 4 * p.templates_per_task > p.heldout_scenes {
            out.push(Finding::error(
                "templates_per_task",
                format!(
                    "4 tasks x {} templates need as many held-out reference scenes, but heldout_scenes is {}: raise heldout_scenes or lower templates_per_task",
                    p.templates_per_task, p.heldout_scenes
                ),
            ));
        }
        if !(0.0..=1.0).contains(&p.closeups) {
            out.push(Finding::error(
                "closeups",
                "must be a share between 0 and 1",
            ));
        }
        if !(1..=100).contains(&p.jpeg_quality) {
            out.push(Finding::error("jpeg_quality", "must be 1 to 100"));
        }
        out
    }

    fn plan(p: &SynthParams, _ctx: &StageContext) -> Result<Chunks<()>> {
        Ok(Chunks::single(
            (),
            (p.train_scenes + p.heldout_scenes) as u64,
            "scenes",
        ))
    }

    fn run_shared(
        p: &SynthParams,
        _w: &(),
        _k: usize,
        ctx: &StageContext,
    ) -> Result<Option<ChunkTables>> {
        let root = ctx.work_dir.clone();
        let mut scenes = SceneRows::default();
        // Training scenes, captioned.
        let train: Vec<(Scene, String, bool)> = (0..p.train_scenes)
            .map(|i| {
                let mut rng = Rng::new(&[p.seed, 0x7a1, i as u64]);
                let n = p.min_objects + pick(&mut rng, p.max_objects - p.min_objects + 1);
                let s = random_scene(&mut rng, n);
                let close = rng.uniform(0.0, 1.0) < p.closeups;
                let c = if close {
                    closeup_caption(&s, &mut rng)
                } else {
                    caption(&s, &mut rng)
                };
                (s, c, close)
            })
            .collect();
        let images: Vec<Result<Vec<u8>>> = train
            .par_iter()
            .enumerate()
            .map(|(i, (s, _, close))| {
                let seed = p.seed ^ (i as u64) << 20;
                let img = if *close {
                    closeup(s, p.image_size, seed)
                } else {
                    render(s, p.image_size, seed)
                };
                jpeg(&img, p.jpeg_quality)
            })
            .collect();
        let mut tsv = String::new();
        for (i, ((s, c, close), img)) in train.iter().zip(images).enumerate() {
            write(&root.join(format!("train/images/{i}")), &img?)?;
            tsv.push_str(&format!("{c}\thttp://synth.invalid/train/{i}.jpg\n"));
            scenes.push("train", i as u64, s, Some(c), *close);
        }
        write(&root.join("train/captions.tsv"), tsv.as_bytes())?;
        // Held-out base scenes: 1-3 objects (2-3 for the object tasks).
        let base: Vec<Scene> = (0..p.heldout_scenes)
            .map(|i| {
                let mut rng = Rng::new(&[p.seed, 0x4e1d, i as u64]);
                let lo = p.min_objects.max(1);
                let n = lo
                    + pick(
                        &mut rng,
                        p.max_objects.min(3) - lo.min(p.max_objects.min(3)) + 1,
                    );
                random_scene(&mut rng, n.max(1))
            })
            .collect();
        let mut next_id = 0u64;
        for (task, name) in TASK_FILES.iter().enumerate() {
            let refs = &base[task * p.templates_per_task..(task + 1) * p.templates_per_task];
            let tpls = Synth::templates(p, task, refs, &mut next_id);
            let vaw = task < 2;
            let mut json = Vec::new();
            let mut all: Vec<&Held> = Vec::new();
            for (cond, r, t, g) in &tpls {
                json.push(serde_json::json!({
                    "condition": cond,
                    "reference": image_json(r, vaw, p.image_size),
                    "target": image_json(t, vaw, p.image_size),
                    "gallery": g.iter().map(|h| image_json(h, vaw, p.image_size)).collect::<Vec<_>>(),
                }));
                all.push(r);
                all.push(t);
                all.extend(g.iter());
            }
            let rendered: Vec<Result<Vec<u8>>> = all
                .par_iter()
                .map(|h| {
                    jpeg(
                        &render(&h.scene, p.image_size, p.seed ^ h.id << 24 ^ 0x5eed),
                        p.jpeg_quality,
                    )
                })
                .collect();
            for (h, img) in all.iter().zip(rendered) {
                let rel = if vaw {
                    format!("vg/images/{}.jpg", h.id)
                } else {
                    format!("coco/val2017/{:012}.jpg", h.id)
                };
                write(&root.join(rel), &img?)?;
                scenes.push(name, h.id, &h.scene, None, false);
            }
            let text =
                serde_json::to_string_pretty(&json).map_err(|e| Error::Internal(e.to_string()))?;
            write(&root.join(format!("genecis/{name}.json")), text.as_bytes())?;
        }
        let mut role = StringBuilder::new();
        let mut path = StringBuilder::new();
        let mut add = |r: &str, p: &str| {
            role.append_value(r);
            path.append_value(p);
        };
        add("captions", "train/captions.tsv");
        add("images_dir", "train/images");
        for t in TASK_FILES {
            add(t, &format!("genecis/{t}.json"));
        }
        add("coco_dir", "coco/val2017");
        add("vg_dir", "vg/images");
        let sources = RecordBatch::try_new(
            SOURCES_SCHEMA.clone(),
            vec![Arc::new(role.finish()) as ArrayRef, Arc::new(path.finish())],
        )?;
        let (scenes, objects) = scenes.finish()?;
        ctx.note(format!(
            "{} training scenes, {} templates x 4 tasks, {} held-out images",
            p.train_scenes, p.templates_per_task, next_id
        ));
        Ok(Some(vec![
            ("sources", sources),
            ("scenes", scenes),
            ("objects", objects),
        ]))
    }
}

#[derive(Default)]
struct SceneRows {
    split: StringBuilder,
    id: UInt64Builder,
    bg: StringBuilder,
    n: UInt32Builder,
    caption: StringBuilder,
    closeup: BooleanBuilder,
    o_split: StringBuilder,
    o_id: UInt64Builder,
    o_idx: UInt32Builder,
    shape: StringBuilder,
    color: StringBuilder,
    size: StringBuilder,
    pattern: StringBuilder,
    x: Float64Builder,
    y: Float64Builder,
    r: Float64Builder,
}

impl SceneRows {
    fn push(&mut self, split: &str, id: u64, s: &Scene, caption: Option<&String>, closeup: bool) {
        self.split.append_value(split);
        self.id.append_value(id);
        self.bg.append_value(BACKGROUNDS[s.background].0);
        self.n.append_value(s.objects.len() as u32);
        self.caption.append_option(caption);
        self.closeup.append_value(closeup);
        for (i, o) in s.objects.iter().enumerate() {
            self.o_split.append_value(split);
            self.o_id.append_value(id);
            self.o_idx.append_value(i as u32);
            self.shape.append_value(SHAPES[o.shape]);
            self.color.append_value(COLORS[o.color].0);
            self.size.append_value(SIZES[o.size]);
            self.pattern.append_value(PATTERNS[o.pattern]);
            self.x.append_value(o.x);
            self.y.append_value(o.y);
            self.r.append_value(o.r());
        }
    }

    fn finish(mut self) -> Result<(RecordBatch, RecordBatch)> {
        let scenes = RecordBatch::try_new(
            SCENES_SCHEMA.clone(),
            vec![
                Arc::new(self.split.finish()) as ArrayRef,
                Arc::new(self.id.finish()),
                Arc::new(self.bg.finish()),
                Arc::new(self.n.finish()),
                Arc::new(self.caption.finish()),
                Arc::new(self.closeup.finish()),
            ],
        )?;
        let objects = RecordBatch::try_new(
            OBJECTS_SCHEMA.clone(),
            vec![
                Arc::new(self.o_split.finish()) as ArrayRef,
                Arc::new(self.o_id.finish()),
                Arc::new(self.o_idx.finish()),
                Arc::new(self.shape.finish()),
                Arc::new(self.color.finish()),
                Arc::new(self.size.finish()),
                Arc::new(self.pattern.finish()),
                Arc::new(self.x.finish()),
                Arc::new(self.y.finish()),
                Arc::new(self.r.finish()),
            ],
        )?;
        Ok((scenes, objects))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_vary_and_name_every_object() {
        let mut rng = Rng::new(&[1]);
        let s = random_scene(&mut rng, 3);
        let mut seen = std::collections::BTreeSet::new();
        for k in 0..20 {
            let c = caption(&s, &mut Rng::new(&[k]));
            for o in &s.objects {
                assert!(
                    c.contains(SHAPES[o.shape]) || c.contains(SYNONYMS[o.shape]),
                    "{c}: {:?}",
                    SHAPES[o.shape]
                );
            }
            seen.insert(c);
        }
        assert!(seen.len() > 5, "{seen:?}");
    }

    #[test]
    fn rendering_is_deterministic_and_draws_the_object() {
        let s = Scene {
            background: 1,
            objects: vec![Object {
                shape: 0,
                color: 0,
                size: 1,
                pattern: 0,
                x: 0.5,
                y: 0.5,
            }],
        };
        let a = render(&s, 64, 3);
        assert_eq!(a, render(&s, 64, 3));
        let centre = a.get_pixel(32, 32);
        assert!(centre[0] > 180 && centre[1] < 80, "{centre:?}");
        let corner = a.get_pixel(1, 1);
        assert!(corner[2] > 220, "snow: {corner:?}");
    }
}
