//! The world: shapes, colours, sizes, patterns and backgrounds, and
//! scenes of 1 to 4 objects placed on a 3 x 3 grid.

use crate::rng::Rng;

pub(super) const SHAPES: [&str; 8] = [
    "circle", "square", "triangle", "star", "diamond", "cross", "ring", "hexagon",
];
/// A second name the captions sometimes use.
pub(super) const SYNONYMS: [&str; 8] = [
    "disc", "box", "pyramid", "star", "rhombus", "plus", "hoop", "hexagon",
];
pub(super) const COLORS: [(&str, [u8; 3]); 8] = [
    ("red", [215, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 70, 210]),
    ("yellow", [235, 210, 40]),
    ("purple", [140, 50, 170]),
    ("orange", [240, 130, 30]),
    ("pink", [240, 120, 180]),
    ("black", [25, 25, 25]),
];
pub(super) const SIZES: [&str; 2] = ["small", "large"];
pub(super) const PATTERNS: [&str; 3] = ["solid", "striped", "dotted"];
pub(super) const BACKGROUNDS: [(&str, &[&str]); 5] = [
    ("sand", &["on sand", "on the beach"]),
    ("snow", &["in the snow", "on snow"]),
    ("grass", &["on grass", "on the lawn"]),
    ("water", &["in water", "on the water"]),
    ("brick", &["against a brick wall", "by a brick wall"]),
];

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Object {
    pub shape: usize,
    pub color: usize,
    pub size: usize,
    pub pattern: usize,
    /// Centre and radius, as fractions of the image side.
    pub x: f64,
    pub y: f64,
}

impl Object {
    pub(crate) fn r(&self) -> f64 {
        [0.14, 0.2][self.size]
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Scene {
    pub background: usize,
    pub objects: Vec<Object>,
}

/// Cell centres of the 3 x 3 layout grid.
pub(super) fn cell(c: usize) -> (f64, f64) {
    ((c % 3) as f64 * 0.32 + 0.18, (c / 3) as f64 * 0.32 + 0.18)
}

pub(super) fn pick(rng: &mut Rng, n: usize) -> usize {
    rng.below(n as u64) as usize
}

/// A random object in a free cell of `used`.
pub(super) fn place(rng: &mut Rng, used: &mut Vec<usize>, mut o: Object) -> Object {
    let free: Vec<usize> = (0..9).filter(|c| !used.contains(c)).collect();
    let c = free[pick(rng, free.len())];
    used.push(c);
    let (x, y) = cell(c);
    o.x = x + rng.uniform(-0.03, 0.03);
    o.y = y + rng.uniform(-0.03, 0.03);
    o
}

pub(super) fn random_object(rng: &mut Rng) -> Object {
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
pub(super) fn random_scene(rng: &mut Rng, n: usize) -> Scene {
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

pub(super) fn bbox(o: &Object, size: u32) -> [f64; 4] {
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
