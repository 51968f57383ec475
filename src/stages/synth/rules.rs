//! The four GeneCIS tasks' templates by rules over held-out scenes: a
//! target and 14 distractors, half fooling image-only retrieval, half
//! fooling text-only retrieval.

use crate::rng::Rng;

use super::world::*;

use super::{Synth, SynthParams};

/// One rendered image of the held-out set.
pub(super) struct Held {
    pub(super) id: u64,
    pub(super) scene: Scene,
    /// The object a VAW-style key crops (attribute tasks).
    pub(super) focus: Option<usize>,
}

/// A scene of `o` (placed, object 0) plus a number of random companions
/// in the range `extras`.
pub(super) fn scene_with(
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
pub(super) fn vary(rng: &mut Rng, o: &Object, a: usize) -> Object {
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

pub(super) fn attr(o: &Object, a: usize) -> usize {
    [o.color, o.pattern, o.size][a]
}

pub(super) const ATTR_TYPES: [&str; 3] = ["color", "pattern", "size"];

/// One template: (condition, reference, target, gallery), held-out images.
pub(super) type Tpl = (String, Held, Held, Vec<Held>);

pub(super) fn object_other_shape(rng: &mut Rng, avoid: &[usize]) -> Object {
    loop {
        let o = random_object(rng);
        if !avoid.contains(&o.shape) {
            return o;
        }
    }
}

impl Synth {
    pub(super) fn templates(
        p: &SynthParams,
        task: usize,
        base: &[Scene],
        next_id: &mut u64,
    ) -> Vec<Tpl> {
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

pub(super) fn image_json(h: &Held, vaw: bool, size: u32) -> serde_json::Value {
    match (vaw, h.focus) {
        (true, Some(f)) => serde_json::json!({
            "image_id": h.id.to_string(),
            "instance_bbox": bbox(&h.scene.objects[f], size),
        }),
        _ => serde_json::json!({ "val_image_id": h.id }),
    }
}
