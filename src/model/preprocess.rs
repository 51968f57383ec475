//! Image preprocessing as the original does it: `Image.open` (no EXIF
//! rotation; JPEGs through libjpeg-turbo with Pillow's settings), the VAW
//! attribute crop (datasets/vaw_dataset.py: dilation 0.7, a centred black
//! pad to a square, in the image's own mode), then CLIP's transform:
//! bicubic resize of the shorter side (nearest for palette images, alpha
//! premultiplied for RGBA, as Pillow does), centre crop, conversion to RGB,
//! normalisation. Each step is Pillow 10.4's arithmetic, so the pixels are
//! Pillow's, bit for bit.

use std::path::Path;

use image::{DynamicImage, ImageBuffer, RgbImage};

pub(crate) use super::decode::open;
use rayon::prelude::*;
use tch::Tensor;

pub(crate) const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub(crate) const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];
pub(crate) const DILATION: f64 = 0.7;

/// How a model family prepares an image: the crop size and the
/// normalisation, and whose arithmetic does each step.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// The side of the square the model sees.
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub family: Family,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Family {
    /// OpenAI's and open_clip's torchvision transform: resize, centre crop
    /// at `round((n - size) / 2)`, RGB, `v / 255` in float32, Normalize.
    Torchvision,
    /// transformers' CLIPImageProcessor: RGB first, resize, centre crop at
    /// `(n - size) // 2`, `v * rescale` in float64 cast to float32, then
    /// `(x - mean) / std` in float32.
    HuggingFace { rescale: f64 },
}

impl Preprocess {
    pub fn openai(size: u32) -> Preprocess {
        Preprocess {
            size,
            mean: CLIP_MEAN,
            std: CLIP_STD,
            family: Family::Torchvision,
        }
    }

    pub fn huggingface(size: u32, mean: [f32; 3], std: [f32; 3], rescale: f64) -> Preprocess {
        Preprocess {
            size,
            mean,
            std,
            family: Family::HuggingFace { rescale },
        }
    }

    /// The normalised value of each byte, per channel.
    fn table(&self) -> [[f32; 256]; 3] {
        let mut t = [[0f32; 256]; 3];
        for (c, row) in t.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                let unit = match self.family {
                    Family::Torchvision => v as f32 / 255.0,
                    Family::HuggingFace { rescale } => (v as f64 * rescale) as f32,
                };
                *x = (unit - self.mean[c]) / self.std[c];
            }
        }
        t
    }
}

/// The mode Pillow opens a file in (the ones the benchmarks meet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    L,
    Rgb,
    /// Adobe-inverted CMYK as Pillow reads a CMYK JPEG.
    Cmyk,
    Rgba,
    /// A palette image, kept as its colours; Pillow resizes it with nearest.
    P,
}

impl Mode {
    pub(crate) fn channels(self) -> usize {
        match self {
            Mode::L => 1,
            Mode::Rgb | Mode::P => 3,
            Mode::Cmyk | Mode::Rgba => 4,
        }
    }
}

/// Interleaved 8-bit pixels of one mode.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Raster {
    pub width: u32,
    pub height: u32,
    pub mode: Mode,
    pub data: Vec<u8>,
}

impl From<RgbImage> for Raster {
    fn from(img: RgbImage) -> Raster {
        Raster {
            width: img.width(),
            height: img.height(),
            mode: Mode::Rgb,
            data: img.into_raw(),
        }
    }
}

/// Python's `round` (half to even), which PIL's `crop` applies to a float box.
pub(crate) fn round_half_even(x: f64) -> i64 {
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
pub(crate) fn vaw_crop_box(bbox: [f64; 4], width: u32, height: u32) -> (i64, i64, i64, i64) {
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

/// Pillow's bilinear (triangle) filter.
fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Pillow's resampling filters for 8-bit modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Filter {
    /// CLIP's evaluation transform.
    Bicubic,
    /// torchvision's default (`Resize`, `RandomResizedCrop`).
    Bilinear,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bicubic => 2.0,
            Filter::Bilinear => 1.0,
        }
    }
    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bicubic => bicubic(x),
            Filter::Bilinear => bilinear(x),
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point coefficients of one axis, as Pillow's `precompute_coeffs`
/// and `normalize_coeffs_8bpc` make them: (first input index, weights).
fn coeffs(in_size: u32, out_size: u32, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = (((center + support + 0.5) as i64).min(in_size as i64) as usize)
                .saturating_sub(xmin);
            let mut k: Vec<f64> = (0..xmax)
                .map(|x| filter.weight((x as f64 + xmin as f64 - center + 0.5) / filterscale))
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

/// One output row of the horizontal pass over `C` interleaved channels.
fn h_row<const C: usize>(row_in: &[u8], cx: &[(usize, Vec<i32>)], row_out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if (C == 3 || C == 4) && std::is_x86_feature_detected!("sse4.1") {
        // SAFETY: the CPU has SSE4.1, checked just above.
        unsafe { h_row_sse41::<C>(row_in, cx, row_out) };
        return;
    }
    h_row_scalar::<C>(row_in, cx, row_out)
}

/// [`h_row`] of two rows that share the coefficients.
fn h_rows2<const C: usize>(
    a: &[u8],
    b: &[u8],
    cx: &[(usize, Vec<i32>)],
    out_a: &mut [u8],
    out_b: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if (C == 3 || C == 4) && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        unsafe { h_rows2_avx2::<C>(a, b, cx, out_a, out_b) };
        return;
    }
    h_row::<C>(a, cx, out_a);
    h_row::<C>(b, cx, out_b);
}

/// Four bytes of `row` from `at` as a little-endian word; past the row's
/// end, zeros (the lane they fill is dropped).
#[inline(always)]
fn word_at(row: &[u8], at: usize) -> i32 {
    if at + 4 <= row.len() {
        // SAFETY: bytes at..at + 4 are inside row.
        unsafe { std::ptr::read_unaligned(row.as_ptr().add(at) as *const i32) }
    } else {
        let mut four = [0u8; 4];
        four[..row.len() - at].copy_from_slice(&row[at..]);
        i32::from_le_bytes(four)
    }
}

/// [`h_rows2`] with a pixel of row `a` in lanes 0-3 and of row `b` in
/// lanes 4-7. Integer sums: the same bytes as the scalar pass.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn h_rows2_avx2<const C: usize>(
    a: &[u8],
    b: &[u8],
    cx: &[(usize, Vec<i32>)],
    out_a: &mut [u8],
    out_b: &mut [u8],
) {
    use std::arch::x86_64::*;
    let half = _mm256_set1_epi32(1 << (PRECISION_BITS - 1));
    for (((xmin, kk), oa), ob) in cx
        .iter()
        .zip(out_a.chunks_exact_mut(C))
        .zip(out_b.chunks_exact_mut(C))
    {
        let mut acc = half;
        for (j, &k) in kk.iter().enumerate() {
            let at = (xmin + j) * C;
            let pair = _mm_set_epi32(0, 0, word_at(b, at), word_at(a, at));
            let v = _mm256_cvtepu8_epi32(pair);
            acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(v, _mm256_set1_epi32(k)));
        }
        let shifted = _mm256_srai_epi32::<{ PRECISION_BITS as i32 }>(acc);
        let lo = _mm256_castsi256_si128(shifted);
        let hi = _mm256_extracti128_si256::<1>(shifted);
        let bytes = _mm_packus_epi16(_mm_packs_epi32(lo, hi), _mm_setzero_si128());
        let packed = (_mm_cvtsi128_si64(bytes) as u64).to_le_bytes();
        oa.copy_from_slice(&packed[..C]);
        ob.copy_from_slice(&packed[4..4 + C]);
    }
}

fn h_row_scalar<const C: usize>(row_in: &[u8], cx: &[(usize, Vec<i32>)], row_out: &mut [u8]) {
    let half = 1i32 << (PRECISION_BITS - 1);
    for ((xmin, kk), out) in cx.iter().zip(row_out.chunks_exact_mut(C)) {
        let px = &row_in[xmin * C..(xmin + kk.len()) * C];
        let mut acc = [half; C];
        for (p, &k) in px.chunks_exact(C).zip(kk) {
            for c in 0..C {
                acc[c] += p[c] as i32 * k;
            }
        }
        for c in 0..C {
            out[c] = clip8(acc[c] as i64);
        }
    }
}

/// [`h_row_scalar`] with one pixel's channels in the lanes of an SSE
/// register. Integer sums are exact in any order, so the bytes are the same.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.1")]
unsafe fn h_row_sse41<const C: usize>(row_in: &[u8], cx: &[(usize, Vec<i32>)], row_out: &mut [u8]) {
    use std::arch::x86_64::*;
    let half = _mm_set1_epi32(1 << (PRECISION_BITS - 1));
    for ((xmin, kk), out) in cx.iter().zip(row_out.chunks_exact_mut(C)) {
        let mut acc = half;
        for (j, &k) in kk.iter().enumerate() {
            let at = (xmin + j) * C;
            // Four bytes from `at`: with C = 3 the fourth is the next
            // pixel's (its lane is dropped); the row's last pixel reads
            // through a copy instead of past the end.
            let v = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(word_at(row_in, at)));
            acc = _mm_add_epi32(acc, _mm_mullo_epi32(v, _mm_set1_epi32(k)));
        }
        let shifted = _mm_srai_epi32::<{ PRECISION_BITS as i32 }>(acc);
        let bytes = _mm_packus_epi16(_mm_packs_epi32(shifted, shifted), _mm_setzero_si128());
        let packed = (_mm_cvtsi128_si32(bytes) as u32).to_le_bytes();
        out.copy_from_slice(&packed[..C]);
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

/// The window `(x, y, w, h)` of `img` resized to `out_w` x `out_h`, as
/// Pillow's `resize` would make it for the image's mode; only the window is
/// computed (each output pixel depends only on its own coefficients).
pub(crate) fn resize_window(
    img: &Raster,
    out_w: u32,
    out_h: u32,
    window: (u32, u32, u32, u32),
) -> Raster {
    resize_window_with(img, out_w, out_h, window, Filter::Bicubic)
}

/// [`resize_window`] with another of Pillow's filters.
pub(crate) fn resize_window_with(
    img: &Raster,
    out_w: u32,
    out_h: u32,
    window: (u32, u32, u32, u32),
    filter: Filter,
) -> Raster {
    let data = match img.mode {
        Mode::P => nearest_window(img, out_w, out_h, window),
        Mode::L => filtered_window::<1>(img, out_w, out_h, window, filter),
        Mode::Rgb => filtered_window::<3>(img, out_w, out_h, window, filter),
        Mode::Cmyk => filtered_window::<4>(img, out_w, out_h, window, filter),
        Mode::Rgba => {
            // Pillow resizes RGBA as premultiplied RGBa and converts back.
            let pre = Raster {
                data: premultiply(&img.data),
                ..img.clone()
            };
            unpremultiply(&filtered_window::<4>(&pre, out_w, out_h, window, filter))
        }
    };
    Raster {
        width: window.2,
        height: window.3,
        mode: img.mode,
        data,
    }
}

fn filtered_window<const C: usize>(
    img: &Raster,
    out_w: u32,
    out_h: u32,
    window: (u32, u32, u32, u32),
    filter: Filter,
) -> Vec<u8> {
    let src = &img.data;
    let (w, h, ow, oh) = (
        img.width as usize,
        img.height as usize,
        out_w as usize,
        out_h as usize,
    );
    let (wx, wy, ww, wh) = (
        window.0 as usize,
        window.1 as usize,
        window.2 as usize,
        window.3 as usize,
    );
    // Input rows the vertical pass reads for the window's rows.
    let cy = (oh != h).then(|| coeffs(h as u32, out_h, filter));
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
    let stride = ww * C;
    // Horizontal pass over rows r0..r1, window columns only.
    let horiz: Vec<u8> = if ow != w {
        let cx = coeffs(w as u32, out_w, filter);
        let cx = &cx[wx..wx + ww];
        let mut tmp = vec![0u8; (r1 - r0) * stride];
        // Rows in pairs: one AVX2 register holds a pixel of each.
        for (rows_in, rows_out) in src[r0 * w * C..r1 * w * C]
            .chunks(2 * w * C)
            .zip(tmp.chunks_mut(2 * stride))
        {
            if rows_in.len() == 2 * w * C {
                let (a, b) = rows_in.split_at(w * C);
                let (oa, ob) = rows_out.split_at_mut(stride);
                h_rows2::<C>(a, b, cx, oa, ob);
            } else {
                h_row::<C>(rows_in, cx, rows_out);
            }
        }
        tmp
    } else {
        let mut tmp = Vec::with_capacity((r1 - r0) * stride);
        for y in r0..r1 {
            tmp.extend_from_slice(&src[(y * w + wx) * C..(y * w + wx + ww) * C]);
        }
        tmp
    };
    let Some(cy) = cy else {
        return horiz;
    };
    let mut out = vec![0u8; stride * wh];
    let mut acc = vec![0i32; stride];
    for ((ymin, kk), row_out) in cy[wy..wy + wh].iter().zip(out.chunks_exact_mut(stride)) {
        let rows = &horiz[(ymin - r0) * stride..(ymin - r0 + kk.len()) * stride];
        v_row(rows, kk, stride, &mut acc, row_out);
    }
    out
}

/// Pillow's nearest resize (an affine transform sampling pixel centres in
/// 16.16 fixed point), for palette images.
fn nearest_window(img: &Raster, out_w: u32, out_h: u32, window: (u32, u32, u32, u32)) -> Vec<u8> {
    let c = img.mode.channels();
    let axis = |in_size: u32, out_size: u32, from: u32, n: u32| -> Vec<usize> {
        let scale = in_size as f64 / out_size as f64;
        let fix = |v: f64| (v * 65536.0) as i64;
        let start = fix(scale * 0.5) + fix(scale) * from as i64;
        let step = fix(scale);
        (0..n as i64)
            .map(|i| (((start + step * i) >> 16).max(0) as usize).min(in_size as usize - 1))
            .collect()
    };
    let xs = axis(img.width, out_w, window.0, window.2);
    let ys = axis(img.height, out_h, window.1, window.3);
    let mut out = Vec::with_capacity(xs.len() * ys.len() * c);
    for &y in &ys {
        let row = &img.data[y * img.width as usize * c..(y + 1) * img.width as usize * c];
        for &x in &xs {
            out.extend_from_slice(&row[x * c..(x + 1) * c]);
        }
    }
    out
}

/// `(a * b + 128) / 255`, rounded, as Pillow's MULDIV255.
fn muldiv255(a: u32, b: u32) -> u32 {
    let t = a * b + 128;
    ((t >> 8) + t) >> 8
}

/// RGBA -> RGBa (Pillow's rgbA2rgba).
fn premultiply(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    for p in out.chunks_exact_mut(4) {
        let a = p[3] as u32;
        for v in &mut p[..3] {
            *v = muldiv255(*v as u32, a) as u8;
        }
    }
    out
}

/// RGBa -> RGBA (Pillow's rgba2rgbA).
fn unpremultiply(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    for p in out.chunks_exact_mut(4) {
        let a = p[3] as u32;
        if a != 0 && a != 255 {
            for v in &mut p[..3] {
                *v = ((255 * *v as u32) / a).min(255) as u8;
            }
        }
    }
    out
}

/// `Image.convert("RGB")` of the image's mode.
pub(crate) fn to_rgb(img: &Raster) -> Vec<u8> {
    match img.mode {
        Mode::Rgb | Mode::P => img.data.clone(),
        Mode::L => img.data.iter().flat_map(|&v| [v, v, v]).collect(),
        Mode::Rgba => img
            .data
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        // Pillow's cmyk2rgb.
        Mode::Cmyk => img
            .data
            .chunks_exact(4)
            .flat_map(|p| {
                let nk = 255 - p[3] as u32;
                let f = |c: u8| (nk - muldiv255(c as u32, nk).min(nk)) as u8;
                [f(p[0]), f(p[1]), f(p[2])]
            })
            .collect(),
    }
}

pub(crate) fn to_rgb_image(img: Raster) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let data = to_rgb(&img);
    ImageBuffer::from_raw(w, h, data).unwrap_or_else(|| RgbImage::new(w, h))
}

/// Crops `bx` (pixels outside the image are zero, as PIL's `crop` gives)
/// and pads the crop to a centred square, as `expand2square` does with
/// `(0, 0, 0)`: PIL fills the fourth band of a new RGBA or CMYK image with
/// 255 (opaque; full black ink).
pub(crate) fn crop_pad_square(img: &Raster, bx: (i64, i64, i64, i64)) -> Raster {
    let c = img.mode.channels();
    let (l, t, r, b) = bx;
    let (cw, ch) = ((r - l).max(1) as usize, (b - t).max(1) as usize);
    let side = cw.max(ch);
    let (ox, oy) = if cw > ch {
        (0, (cw - ch) / 2)
    } else {
        ((ch - cw) / 2, 0)
    };
    let mut bg = vec![0u8; c];
    if c == 4 {
        bg[3] = 255;
    }
    let mut out: Vec<u8> = bg.iter().copied().cycle().take(side * side * c).collect();
    // The crop itself: zeros where it leaves the image.
    for yy in 0..ch {
        let row = &mut out[((oy + yy) * side + ox) * c..((oy + yy) * side + ox + cw) * c];
        row.fill(0);
        let sy = t + yy as i64;
        if sy < 0 || sy >= img.height as i64 {
            continue;
        }
        for xx in 0..cw {
            let sx = l + xx as i64;
            if sx >= 0 && sx < img.width as i64 {
                let s = (sy as usize * img.width as usize + sx as usize) * c;
                row[xx * c..(xx + 1) * c].copy_from_slice(&img.data[s..s + c]);
            }
        }
    }
    Raster {
        width: side as u32,
        height: side as u32,
        mode: img.mode,
        data: out,
    }
}

/// torchvision's `Resize(n)` (shorter side to `n`, the other
/// `int(n * long / short)`) then `CenterCrop(n)`, in the image's mode.
pub(crate) fn resize_center_crop_raster(img: &Raster, n_px: u32) -> Raster {
    resize_center_crop_family(img, n_px, Family::Torchvision)
}

/// [`resize_center_crop_raster`] with the crop offset of `family`.
fn resize_center_crop_family(img: &Raster, n_px: u32, family: Family) -> Raster {
    let (w, h) = (img.width, img.height);
    let (nw, nh) = if w <= h {
        (n_px, ((n_px as u64 * h as u64) / w as u64) as u32)
    } else {
        (((n_px as u64 * w as u64) / h as u64) as u32, n_px)
    };
    let (nw, nh) = (nw.max(1), nh.max(1));
    let offset = |side: u32| -> u32 {
        match family {
            // torchvision's CenterCrop: int(round((size - n) / 2)), Python rounding.
            Family::Torchvision => round_half_even((side as f64 - n_px as f64) / 2.0).max(0) as u32,
            // transformers' center_crop: (size - n) // 2.
            Family::HuggingFace { .. } => side.saturating_sub(n_px) / 2,
        }
    };
    let (left, top) = (offset(nw), offset(nh));
    resize_window(img, nw, nh, (left, top, n_px.min(nw), n_px.min(nh)))
}

/// Resize (shorter side to `n_px`, bicubic) and centre crop, as RGB bytes.
pub(crate) fn resize_center_crop(img: &DynamicImage, n_px: u32) -> RgbImage {
    resize_center_crop_rgb(&img.to_rgb8(), n_px)
}

/// [`resize_center_crop`] of an RGB image: only the crop window is resized.
pub(crate) fn resize_center_crop_rgb(rgb: &RgbImage, n_px: u32) -> RgbImage {
    let r = Raster {
        width: rgb.width(),
        height: rgb.height(),
        mode: Mode::Rgb,
        data: rgb.as_raw().clone(),
    };
    to_rgb_image(resize_center_crop_raster(&r, n_px))
}

/// CLIP's normalised [3, n, n] float tensor: `(v / 255 - mean) / std` in
/// f32, as ToTensor + Normalize compute it, looked up per byte value.
pub(crate) fn to_tensor(img: &RgbImage) -> Tensor {
    static LUT: std::sync::LazyLock<[[f32; 256]; 3]> =
        std::sync::LazyLock::new(|| Preprocess::openai(0).table());
    to_tensor_lut(img, &LUT)
}

/// [`to_tensor`] with a family's normalisation.
pub fn to_tensor_with(img: &RgbImage, pre: &Preprocess) -> Tensor {
    to_tensor_lut(img, &pre.table())
}

fn to_tensor_lut(img: &RgbImage, lut: &[[f32; 256]; 3]) -> Tensor {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut data = vec![0f32; 3 * plane];
    let (r, rest) = data.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, p) in img.as_raw().chunks_exact(3).enumerate() {
        r[i] = lut[0][p[0] as usize];
        g[i] = lut[1][p[1] as usize];
        b[i] = lut[2][p[2] as usize];
    }
    Tensor::from_slice(&data).view([3, h as i64, w as i64])
}

/// An image key: a file plus, for attribute tasks, a VAW bbox.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageKey<'a> {
    pub path: &'a Path,
    pub bbox: Option<[f64; 4]>,
    /// Convert to RGB right after opening, as the original's MIT-States
    /// loader does (the others convert after the resize).
    pub rgb_first: bool,
}

/// The RGB pixels the original feeds CLIP for one key, before
/// normalisation: open, VAW crop and pad, resize, centre crop, to RGB.
pub fn load_rgb(k: &ImageKey, n_px: u32) -> Result<RgbImage, String> {
    load_rgb_with(k, &Preprocess::openai(n_px))
}

/// [`load_rgb`] as `pre`'s family prepares the pixels.
pub fn load_rgb_with(k: &ImageKey, pre: &Preprocess) -> Result<RgbImage, String> {
    let n_px = pre.size;
    let mut img = open(k.path)?;
    let rgb_first = k.rgb_first || matches!(pre.family, Family::HuggingFace { .. });
    if rgb_first && img.mode != Mode::Rgb {
        img = Raster {
            data: to_rgb(&img),
            mode: Mode::Rgb,
            ..img
        };
    }
    if let Some(b) = k.bbox {
        let bx = vaw_crop_box(b, img.width, img.height);
        if bx.2 <= bx.0 || bx.3 <= bx.1 {
            let [x, y, w, h] = b;
            let (iw, ih) = (img.width as f64, img.height as f64);
            let overlaps = x < iw && y < ih && x + w > 0.0 && y + h > 0.0;
            return Err(if overlaps {
                format!(
                    "{}: instance_bbox {b:?} rounds to the empty crop {bx:?} of the {}x{} image (the dilated box is under a pixel wide or tall): the template's box is the problem, not the image",
                    k.path.display(),
                    img.width,
                    img.height
                )
            } else {
                format!(
                    "{}: instance_bbox {b:?} lies outside the {}x{} image: the template names another image, or this file is not the one it was made on",
                    k.path.display(),
                    img.width,
                    img.height
                )
            });
        }
        if img.mode == Mode::P {
            // PIL would paste palette indices into a new palette image;
            // the colours are what the crop means.
            img.mode = Mode::Rgb;
        }
        img = crop_pad_square(&img, bx);
    }
    Ok(to_rgb_image(resize_center_crop_family(
        &img, n_px, pre.family,
    )))
}

/// Decodes and preprocesses a batch in parallel; per image an error
/// message instead of a panic.
pub(crate) fn load_batch(keys: &[ImageKey], n_px: u32) -> Vec<Result<Tensor, String>> {
    load_batch_with(keys, &Preprocess::openai(n_px))
}

/// [`load_batch`] as `pre`'s family prepares the pixels.
pub(crate) fn load_batch_with(keys: &[ImageKey], pre: &Preprocess) -> Vec<Result<Tensor, String>> {
    let lut = pre.table();
    let prepared: Vec<Result<RgbImage, String>> =
        keys.par_iter().map(|k| load_rgb_with(k, pre)).collect();
    prepared
        .into_iter()
        .map(|r| r.map(|img| to_tensor_lut(&img, &lut)))
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
        RgbImage::from_pixel(100, 80, image::Rgb([9, 9, 9]))
            .save(&p)
            .unwrap();
        let keys = [
            ImageKey {
                path: &p,
                bbox: Some([2000.0, 10.0, 10.0, 10.0]),
                rgb_first: false,
            },
            ImageKey {
                path: &p,
                bbox: Some([10.0, 10.0, 10.0, 10.0]),
                rgb_first: false,
            },
            // Inside the image, but the dilated box rounds to no pixel.
            ImageKey {
                path: &p,
                bbox: Some([50.2, 40.2, 0.1, 0.1]),
                rgb_first: false,
            },
        ];
        let out = load_batch(&keys, 16);
        let empty = out[2].as_ref().unwrap_err();
        assert!(
            empty.contains("rounds to the empty crop") && empty.contains("not the image"),
            "{empty}"
        );
        assert!(out[0]
            .as_ref()
            .unwrap_err()
            .contains("outside the 100x80 image"));
        assert!(out[1].is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn rgb(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Raster {
        let mut out = Vec::new();
        for y in 0..h {
            for x in 0..w {
                out.extend_from_slice(&f(x, y));
            }
        }
        Raster {
            width: w,
            height: h,
            mode: Mode::Rgb,
            data: out,
        }
    }

    #[test]
    fn pad_is_centred_black() {
        let img = rgb(10, 4, |_, _| [255, 255, 255]);
        let sq = crop_pad_square(&img, (0, 0, 10, 4));
        assert_eq!((sq.width, sq.height), (10, 10));
        let px = |x: usize, y: usize| &sq.data[(y * 10 + x) * 3..(y * 10 + x + 1) * 3];
        assert_eq!(px(5, 2), [0, 0, 0]);
        assert_eq!(px(5, 3), [255, 255, 255]);
        assert_eq!(px(5, 6), [255, 255, 255]);
        assert_eq!(px(5, 7), [0, 0, 0]);
    }

    #[test]
    fn window_resize_is_the_crop_of_the_full_resize() {
        let img = rgb(97, 61, |x, y| {
            [
                (x * 7 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x * y) % 251) as u8,
            ]
        });
        for mode in [Mode::Rgb, Mode::P] {
            let img = Raster {
                mode,
                ..img.clone()
            };
            for (ow, oh, win) in [
                (40, 25, (7, 3, 20, 19)),
                (200, 130, (0, 50, 200, 1)),
                (97, 30, (5, 0, 90, 30)),
            ] {
                let full = resize_window(&img, ow, oh, (0, 0, ow, oh));
                let mut crop = Vec::new();
                for y in win.1..win.1 + win.3 {
                    let s = ((y * ow + win.0) * 3) as usize;
                    crop.extend_from_slice(&full.data[s..s + win.2 as usize * 3]);
                }
                assert_eq!(
                    resize_window(&img, ow, oh, win).data,
                    crop,
                    "{mode:?} {ow}x{oh} {win:?}"
                );
            }
        }
    }

    #[test]
    fn simd_horizontal_pass_matches_the_scalar_one() {
        let mut x = 0x2545F4914F6CDD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for (w, ow) in [(97usize, 40u32), (640, 298), (33, 100), (5, 3)] {
            let row: Vec<u8> = (0..w * 4).map(|_| next() as u8).collect();
            let cx = coeffs(w as u32, ow, Filter::Bicubic);
            for c in [3usize, 4] {
                let row = &row[..w * c];
                let (mut a, mut b) = (vec![0u8; ow as usize * c], vec![0u8; ow as usize * c]);
                let n = ow as usize * c;
                let (mut p, mut q) = (vec![0u8; n], vec![0u8; n]);
                let rev: Vec<u8> = row.iter().rev().copied().collect();
                let mut r = vec![0u8; n];
                if c == 3 {
                    h_row::<3>(row, &cx, &mut a);
                    h_row_scalar::<3>(row, &cx, &mut b);
                    h_rows2::<3>(row, &rev, &cx, &mut p, &mut q);
                    h_row_scalar::<3>(&rev, &cx, &mut r);
                } else {
                    h_row::<4>(row, &cx, &mut a);
                    h_row_scalar::<4>(row, &cx, &mut b);
                    h_rows2::<4>(row, &rev, &cx, &mut p, &mut q);
                    h_row_scalar::<4>(&rev, &cx, &mut r);
                }
                assert_eq!(a, b, "{w} -> {ow}, {c} channels");
                assert_eq!((p, q), (b, r), "pairs: {w} -> {ow}, {c} channels");
            }
        }
    }

    #[test]
    fn resize_short_side_then_centre_crop() {
        let img =
            DynamicImage::ImageRgb8(ImageBuffer::from_pixel(64, 32, image::Rgb([10, 20, 30])));
        let out = resize_center_crop(&img, 16);
        assert_eq!(out.dimensions(), (16, 16));
        let t = to_tensor(&out);
        assert_eq!(t.size(), vec![3, 16, 16]);
        let v = t.double_value(&[0, 8, 8]);
        assert!((v - (10.0 / 255.0 - CLIP_MEAN[0] as f64) / CLIP_STD[0] as f64).abs() < 1e-5);
    }
}
