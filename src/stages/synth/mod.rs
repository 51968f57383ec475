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
use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::framework::stage::{
    ChunkTables, Chunks, Finding, InputTable, Stage, StageContext, TableDef,
};
use crate::rng::Rng;
use crate::tables::sources::SOURCES_SCHEMA;

mod captions;
mod render;
mod rules;
mod world;

pub(crate) use captions::caption;
use captions::closeup_caption;
use render::closeup;
pub(crate) use render::render;
use rules::{image_json, Held};
pub(crate) use world::Scene;
use world::*;

pub(crate) static SCENES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("split", DataType::Utf8, false),
        Field::new("image_id", DataType::UInt64, false),
        Field::new("background", DataType::Utf8, false),
        Field::new("n_objects", DataType::UInt32, false),
        Field::new("caption", DataType::Utf8, true),
        Field::new("closeup", DataType::Boolean, false),
    ]))
});

pub(crate) static OBJECTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct SynthParams {
    pub seed: u64,
    /// Training scenes (captioned).
    pub train_scenes: usize,
    /// Held-out base scenes; each template takes one as its reference.
    pub heldout_scenes: usize,
    /// Templates per GeneCIS task (four tasks).
    pub templates_per_task: usize,
    /// Image side in pixels.
    pub image_size: u32,
    pub min_objects: usize,
    pub max_objects: usize,
    pub jpeg_quality: u8,
    /// Share of training images that are close-ups of one object (its
    /// VAW-style crop, captioned with that object alone): the view the
    /// attribute tasks' crops give.
    pub closeups: f64,
}

/// The largest world image side: enough for any CLIP input, small enough
/// that a scene's pixels fit in memory many times over.
const MAX_IMAGE_SIZE: u32 = 4096;
/// The most scenes of one kind: ten million image files.
const MAX_SCENES: usize = 10_000_000;

impl Default for SynthParams {
    /// The defaults of every param, in one place.
    fn default() -> Self {
        SynthParams {
            seed: Default::default(),
            train_scenes: 3000,
            heldout_scenes: 400,
            templates_per_task: 100,
            image_size: 64,
            min_objects: 1,
            max_objects: 3,
            jpeg_quality: 90,
            closeups: 0.25,
        }
    }
}

pub(crate) struct Synth;

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

pub(crate) const TASK_FILES: [&str; 4] = [
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
        if !(32..=MAX_IMAGE_SIZE).contains(&p.image_size) {
            out.push(Finding::error(
                "image_size",
                format!(
                    "{} px: use 32 (the least to draw on) to {MAX_IMAGE_SIZE}",
                    p.image_size
                ),
            ));
        }
        for (field, n) in [
            ("train_scenes", p.train_scenes),
            ("heldout_scenes", p.heldout_scenes),
            ("templates_per_task", p.templates_per_task),
        ] {
            if n > MAX_SCENES {
                out.push(Finding::error(
                    field,
                    format!("{n}: at most {MAX_SCENES} (each scene is an image file)"),
                ));
            }
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
