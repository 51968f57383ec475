//! Image preprocessing: the VAW attribute crop (datasets/vaw_dataset.py,
//! dilation 0.7, centred black pad to a square) and CLIP's transform
//! (bicubic resize of the shorter side, centre crop, normalise).

use std::path::Path;

use image::{imageops, DynamicImage, ImageBuffer, Rgb, RgbImage};
use rayon::prelude::*;
use tch::Tensor;

pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];
pub const DILATION: f64 = 0.7;

/// Python's `round` (half to even), which PIL's `crop` applies to a float box.
fn round_half_even(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        (r - x.signum()) as i64
    } else {
        r as i64
    }
}

/// The crop box (left, top, right, bottom) of a VAW `instance_bbox`
/// (x, y, w, h) in an image of `width` x `height`. It grows left and up by
/// 0.7 of the box and keeps 1.7 box sizes from there (so an unclipped box
/// grows only left and up), as the original does.
pub fn vaw_crop_box(bbox: [f64; 4], width: u32, height: u32) -> (i64, i64, i64, i64) {
    let [x, y, w, h] = bbox;
    let left = (x - DILATION * w).max(0.0);
    let top = (y - DILATION * h).max(0.0);
    let right = (left + (1.0 + DILATION) * w).min(width as f64);
    let bottom = (top + (1.0 + DILATION) * h).min(height as f64);
    (
        round_half_even(left),
        round_half_even(top),
        round_half_even(right),
        round_half_even(bottom),
    )
}

/// Crops (pixels outside the image are black, like PIL) and pads the crop to
/// a centred square with black.
pub fn crop_pad_square(img: &RgbImage, bx: (i64, i64, i64, i64)) -> RgbImage {
    let (l, t, r, b) = bx;
    let (cw, ch) = ((r - l).max(1) as u32, (b - t).max(1) as u32);
    let mut crop: RgbImage = ImageBuffer::from_pixel(cw, ch, Rgb([0, 0, 0]));
    for yy in 0..ch {
        for xx in 0..cw {
            let (sx, sy) = (l + xx as i64, t + yy as i64);
            if sx >= 0 && sy >= 0 && (sx as u32) < img.width() && (sy as u32) < img.height() {
                crop.put_pixel(xx, yy, *img.get_pixel(sx as u32, sy as u32));
            }
        }
    }
    if cw == ch {
        return crop;
    }
    let side = cw.max(ch);
    let mut sq: RgbImage = ImageBuffer::from_pixel(side, side, Rgb([0, 0, 0]));
    let (ox, oy) = if cw > ch {
        (0, (cw - ch) / 2)
    } else {
        ((ch - cw) / 2, 0)
    };
    imageops::replace(&mut sq, &crop, ox as i64, oy as i64);
    sq
}

/// Pillow's bicubic filter (a = -0.5).
fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point coefficients of one axis, as Pillow's `precompute_coeffs`
/// and `normalize_coeffs_8bpc` make them: (first input index, weights).
fn coeffs(in_size: u32, out_size: u32) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = (((center + support + 0.5) as i64).min(in_size as i64) as usize)
                .saturating_sub(xmin);
            let mut k: Vec<f64> = (0..xmax)
                .map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) / filterscale))
                .collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|v| *v /= ww);
            }
            let one = (1u64 << PRECISION_BITS) as f64;
            let kk = k
                .iter()
                .map(|&v| {
                    if v < 0.0 {
                        (-0.5 + v * one) as i32
                    } else {
                        (0.5 + v * one) as i32
                    }
                })
                .collect();
            (xmin, kk)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One output row of the horizontal pass (interleaved RGB).
fn h_row(row_in: &[u8], cx: &[(usize, Vec<i32>)], row_out: &mut [u8]) {
    let half = 1i32 << (PRECISION_BITS - 1);
    for ((xmin, kk), out) in cx.iter().zip(row_out.chunks_exact_mut(3)) {
        let px = &row_in[xmin * 3..(xmin + kk.len()) * 3];
        let (mut r, mut g, mut b) = (half, half, half);
        for (p, &k) in px.chunks_exact(3).zip(kk) {
            r += p[0] as i32 * k;
            g += p[1] as i32 * k;
            b += p[2] as i32 * k;
        }
        out[0] = clip8(r as i64);
        out[1] = clip8(g as i64);
        out[2] = clip8(b as i64);
    }
}

/// One output row of the vertical pass: `rows` holds the kk.len() input rows.
fn v_row(rows: &[u8], kk: &[i32], stride: usize, acc: &mut [i32], row_out: &mut [u8]) {
    acc.iter_mut().for_each(|a| *a = 1 << (PRECISION_BITS - 1));
    for (row, &k) in rows.chunks_exact(stride).zip(kk) {
        for (a, &p) in acc.iter_mut().zip(row) {
            *a += p as i32 * k;
        }
    }
    for (o, &a) in row_out.iter_mut().zip(acc.iter()) {
        *o = clip8(a as i64);
    }
}

/// Bicubic resize with Pillow's exact arithmetic (horizontal pass, then
/// vertical, 8-bit intermediate), so outputs match `Image.resize` of Pillow
/// 10 bit for bit (Pillow 11+ may run the vertical pass first, which moves
/// some pixels by one level). Accumulates in i32 like Pillow.
pub fn pil_resize_bicubic(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    pil_resize_bicubic_window(img, out_w, out_h, (0, 0, out_w, out_h))
}

/// [`pil_resize_bicubic`] computing only the window `(x, y, w, h)` of the
/// resized image: each output pixel depends only on its own coefficients,
/// so a crop of the full resize is the same bytes, for less work.
pub fn pil_resize_bicubic_window(
    img: &RgbImage,
    out_w: u32,
    out_h: u32,
    window: (u32, u32, u32, u32),
) -> RgbImage {
    let (w, h) = img.dimensions();
    let src = img.as_raw();
    let (w, h, ow, oh) = (w as usize, h as usize, out_w as usize, out_h as usize);
    let (wx, wy, ww, wh) = (
        window.0 as usize,
        window.1 as usize,
        window.2 as usize,
        window.3 as usize,
    );
    // Input rows the vertical pass reads for the window's rows.
    let cy = (oh != h).then(|| coeffs(h as u32, out_h));
    let (r0, r1) = match &cy {
        Some(cy) => {
            let rows = &cy[wy..wy + wh];
            (
                rows.iter().map(|(m, _)| *m).min().unwrap_or(0),
                rows.iter().map(|(m, k)| m + k.len()).max().unwrap_or(0),
            )
        }
        None => (wy, wy + wh),
    };
    let stride = ww * 3;
    // Horizontal pass over rows r0..r1, window columns only.
    let horiz: Vec<u8> = if ow != w {
        let cx = coeffs(w as u32, out_w);
        let cx = &cx[wx..wx + ww];
        let mut tmp = vec![0u8; (r1 - r0) * stride];
        for (row_in, row_out) in src[r0 * w * 3..r1 * w * 3]
            .chunks_exact(w * 3)
            .zip(tmp.chunks_exact_mut(stride))
        {
            h_row(row_in, cx, row_out);
        }
        tmp
    } else {
        let mut tmp = Vec::with_capacity((r1 - r0) * stride);
        for y in r0..r1 {
            tmp.extend_from_slice(&src[(y * w + wx) * 3..(y * w + wx + ww) * 3]);
        }
        tmp
    };
    let Some(cy) = cy else {
        return ImageBuffer::from_raw(ww as u32, wh as u32, horiz).expect("sized buffer");
    };
    let mut out = vec![0u8; stride * wh];
    let mut acc = vec![0i32; stride];
    for ((ymin, kk), row_out) in cy[wy..wy + wh].iter().zip(out.chunks_exact_mut(stride)) {
        let rows = &horiz[(ymin - r0) * stride..(ymin - r0 + kk.len()) * stride];
        v_row(rows, kk, stride, &mut acc, row_out);
    }
    ImageBuffer::from_raw(ww as u32, wh as u32, out).expect("sized buffer")
}

/// Resize (shorter side to `n_px`, bicubic) and centre crop, as RGB bytes.
pub fn resize_center_crop(img: &DynamicImage, n_px: u32) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(rgb) => resize_center_crop_rgb(rgb, n_px),
        other => resize_center_crop_rgb(&other.to_rgb8(), n_px),
    }
}

/// [`resize_center_crop`] of an RGB image: only the crop window is resized.
pub fn resize_center_crop_rgb(rgb: &RgbImage, n_px: u32) -> RgbImage {
    let (w, h) = rgb.dimensions();
    let (nw, nh) = if w <= h {
        (n_px, ((n_px as u64 * h as u64) / w as u64) as u32)
    } else {
        (((n_px as u64 * w as u64) / h as u64) as u32, n_px)
    };
    let (nw, nh) = (nw.max(1), nh.max(1));
    // torchvision's CenterCrop: int(round((size - n) / 2)), Python rounding.
    let left = round_half_even((nw as f64 - n_px as f64) / 2.0).max(0) as u32;
    let top = round_half_even((nh as f64 - n_px as f64) / 2.0).max(0) as u32;
    pil_resize_bicubic_window(rgb, nw, nh, (left, top, n_px.min(nw), n_px.min(nh)))
}

/// CLIP's normalised [3, n, n] float tensor.
pub fn to_tensor(img: &RgbImage) -> Tensor {
    let (w, h) = img.dimensions();
    let mut data = vec![0f32; (3 * w * h) as usize];
    let plane = (w * h) as usize;
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * plane + i] = (p[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    Tensor::from_slice(&data).view([3, h as i64, w as i64])
}

/// An image key: a file plus, for attribute tasks, a VAW bbox.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageKey<'a> {
    pub path: &'a Path,
    pub bbox: Option<[f64; 4]>,
}

/// Decodes and preprocesses a batch in parallel; per image an error
/// message instead of a panic.
pub fn load_batch(keys: &[ImageKey], n_px: u32) -> Vec<Result<Tensor, String>> {
    let prepared: Vec<Result<RgbImage, String>> = keys
        .par_iter()
        .map(|k| {
            let img = image::open(k.path).map_err(|e| format!("{}: {e}", k.path.display()))?;
            let img = match k.bbox {
                Some(b) => {
                    let rgb = img.into_rgb8();
                    let bx = vaw_crop_box(b, rgb.width(), rgb.height());
                    if bx.2 <= bx.0 || bx.3 <= bx.1 {
                        return Err(format!(
                            "{}: instance_bbox {b:?} lies outside the {}x{} image",
                            k.path.display(),
                            rgb.width(),
                            rgb.height()
                        ));
                    }
                    DynamicImage::ImageRgb8(crop_pad_square(&rgb, bx))
                }
                None => img,
            };
            Ok(resize_center_crop(&img, n_px))
        })
        .collect();
    prepared
        .into_iter()
        .map(|r| r.map(|img| to_tensor(&img)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vaw_box_grows_left_and_up_and_clips() {
        // Unclipped: left/top move by 0.7 w/h, right/bottom = left/top + 1.7 w/h.
        assert_eq!(
            vaw_crop_box([100.0, 100.0, 50.0, 20.0], 1000, 1000),
            (65, 86, 150, 120)
        );
        // Clipped at the origin: the box then extends 1.7 sizes from 0.
        assert_eq!(
            vaw_crop_box([10.0, 5.0, 40.0, 40.0], 1000, 1000),
            (0, 0, 68, 68)
        );
        // Clipped at the far edges.
        assert_eq!(
            vaw_crop_box([480.0, 300.0, 40.0, 100.0], 500, 350),
            (452, 230, 500, 350)
        );
        // PIL rounds half to even.
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(3.5), 4);
        assert_eq!(round_half_even(-0.5), 0);
    }

    #[test]
    fn a_box_outside_the_image_is_an_error() {
        let dir = std::env::temp_dir().join(format!("genecis-pre-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.png");
        RgbImage::from_pixel(100, 80, Rgb([9, 9, 9]))
            .save(&p)
            .unwrap();
        let keys = [
            ImageKey {
                path: &p,
                bbox: Some([2000.0, 10.0, 10.0, 10.0]),
            },
            ImageKey {
                path: &p,
                bbox: Some([10.0, 10.0, 10.0, 10.0]),
            },
        ];
        let out = load_batch(&keys, 16);
        assert!(out[0]
            .as_ref()
            .unwrap_err()
            .contains("outside the 100x80 image"));
        assert!(out[1].is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pad_is_centred_black() {
        let img: RgbImage = ImageBuffer::from_pixel(10, 4, Rgb([255, 255, 255]));
        let sq = crop_pad_square(&img, (0, 0, 10, 4));
        assert_eq!(sq.dimensions(), (10, 10));
        assert_eq!(sq.get_pixel(5, 2), &Rgb([0, 0, 0]));
        assert_eq!(sq.get_pixel(5, 3), &Rgb([255, 255, 255]));
        assert_eq!(sq.get_pixel(5, 6), &Rgb([255, 255, 255]));
        assert_eq!(sq.get_pixel(5, 7), &Rgb([0, 0, 0]));
    }

    #[test]
    fn window_resize_is_the_crop_of_the_full_resize() {
        let img: RgbImage = ImageBuffer::from_fn(97, 61, |x, y| {
            Rgb([
                (x * 7 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x * y) % 251) as u8,
            ])
        });
        for (ow, oh, win) in [
            (40, 25, (7, 3, 20, 19)),
            (200, 130, (0, 50, 200, 1)),
            (97, 30, (5, 0, 90, 30)),
        ] {
            let full = pil_resize_bicubic(&img, ow, oh);
            let crop = imageops::crop_imm(&full, win.0, win.1, win.2, win.3).to_image();
            assert_eq!(
                pil_resize_bicubic_window(&img, ow, oh, win),
                crop,
                "{ow}x{oh} {win:?}"
            );
        }
    }

    #[test]
    fn resize_short_side_then_centre_crop() {
        let img = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(64, 32, Rgb([10, 20, 30])));
        let out = resize_center_crop(&img, 16);
        assert_eq!(out.dimensions(), (16, 16));
        let t = to_tensor(&out);
        assert_eq!(t.size(), vec![3, 16, 16]);
        let v = t.double_value(&[0, 8, 8]);
        assert!((v - (10.0 / 255.0 - CLIP_MEAN[0] as f64) / CLIP_STD[0] as f64).abs() < 1e-5);
    }
}
