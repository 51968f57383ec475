//! Rendering a scene: antialiased shapes with their pattern on a noisy
//! background, or a close-up of one object.

use image::{Rgb, RgbImage};

use crate::rng::Rng;

use super::world::*;

pub(super) fn inside(shape: usize, u: f64, v: f64) -> bool {
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

pub(super) fn paint(o: &Object, u: f64, v: f64) -> [f64; 3] {
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

pub(super) fn background(kind: usize, x: u32, y: u32, n: f64) -> [f64; 3] {
    let (xf, yf) = (x as f64, y as f64);
    match BACKGROUNDS[kind].0 {
        "sand" => [212.0 + n * 14.0, 188.0 + n * 14.0, 140.0 + n * 10.0],
        "snow" => [236.0 + n * 5.0, 239.0 + n * 5.0, 247.0],
        "grass" => {
            let blade = if (x + (y / 3) % 2).is_multiple_of(4) {
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
            let off = if row.is_multiple_of(2) { 0 } else { 5 };
            if y.is_multiple_of(6) || (x + off).is_multiple_of(10) {
                [205.0, 200.0, 190.0]
            } else {
                [155.0 + n * 10.0, 70.0, 50.0]
            }
        }
    }
}

/// A close-up of `s`'s first object: its VAW crop of the rendered scene,
/// padded and resized back to `size`, as `embed` prepares a VAW key.
pub(super) fn closeup(s: &Scene, size: u32, seed: u64) -> RgbImage {
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
pub(crate) fn render(s: &Scene, size: u32, seed: u64) -> RgbImage {
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
