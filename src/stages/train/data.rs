//! What training reads: the mined triplets as rows of distinct images and
//! conditions, the original's train/val split, the decoded-once image
//! cache, and the original's training augmentation.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::preprocess::{
    load_rgb, open, resize_window_with, round_half_even, to_rgb_image, Filter, ImageKey, Mode,
    Raster,
};
use crate::rng::Rng;

/// `split_to_train_val`: `int(val_fraction * n)` samples from
/// `val_start_idx` are held out; the rest, in order, train.
pub(crate) fn split(
    n: usize,
    val_fraction: f64,
    val_start_idx: usize,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let n_val = (val_fraction * n as f64) as usize;
    if val_start_idx + n_val > n {
        return Err(Error::Data(format!(
            "val_start_idx {val_start_idx} + {n_val} validation samples exceeds the {n} mined samples; lower val_start_idx"
        )));
    }
    let val: Vec<usize> = (val_start_idx..val_start_idx + n_val).collect();
    let train: Vec<usize> = (0..val_start_idx).chain(val_start_idx + n_val..n).collect();
    if train.is_empty() {
        return Err(Error::Data(format!(
            "all {n} samples are validation samples (val_fraction {val_fraction}); lower val_fraction"
        )));
    }
    Ok((train, val))
}

pub(crate) fn train_resize(img: &Raster, size: u32) -> Raster {
    let s = (size as f64 / 0.875) as u64;
    let (w, h) = (img.width as u64, img.height as u64);
    let (nw, nh) = if w <= h {
        (s, s * h / w)
    } else {
        (s * w / h, s)
    };
    let (nw, nh) = (nw.max(1) as u32, nh.max(1) as u32);
    if (nw, nh) == (img.width, img.height) {
        return img.clone();
    }
    resize_window_with(img, nw, nh, (0, 0, nw, nh), Filter::Bilinear)
}

/// `RandomResizedCrop.get_params(img, scale=(0.9, 1), ratio=(3/4, 4/3))`:
/// (top, left, height, width).
pub(crate) fn crop_params(width: u32, height: u32, rng: &mut Rng) -> (u32, u32, u32, u32) {
    let (w0, h0) = (width as f64, height as f64);
    let area = w0 * h0;
    let (r0, r1) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.uniform(0.9, 1.0);
        let aspect = rng.uniform(r0, r1).exp();
        let w = round_half_even((target * aspect).sqrt());
        let h = round_half_even((target / aspect).sqrt());
        if 0 < w && w <= width as i64 && 0 < h && h <= height as i64 {
            let i = rng.below((height as i64 - h + 1) as u64) as u32;
            let j = rng.below((width as i64 - w + 1) as u64) as u32;
            return (i, j, h as u32, w as u32);
        }
    }
    // Central crop fallback.
    let in_ratio = w0 / h0;
    let (w, h) = if in_ratio < 3.0 / 4.0 {
        (width as i64, round_half_even(w0 / (3.0 / 4.0)))
    } else if in_ratio > 4.0 / 3.0 {
        (round_half_even(h0 * (4.0 / 3.0)), height as i64)
    } else {
        (width as i64, height as i64)
    };
    let i = (height as i64 - h) / 2;
    let j = (width as i64 - w) / 2;
    (i as u32, j as u32, h as u32, w as u32)
}

/// The per-epoch part: crop, bilinear resize to `size` x `size` in the
/// image's mode, then RGB (`_to_rgb` comes after the crop).
pub(crate) fn random_resized_crop(img: &Raster, size: u32, rng: &mut Rng) -> image::RgbImage {
    let (i, j, h, w) = crop_params(img.width, img.height, rng);
    let c = img.mode.channels();
    let mut data = Vec::with_capacity((w * h) as usize * c);
    for y in i..i + h {
        let row = (y * img.width + j) as usize * c;
        data.extend_from_slice(&img.data[row..row + w as usize * c]);
    }
    let crop = Raster {
        width: w,
        height: h,
        mode: img.mode,
        data,
    };
    to_rgb_image(resize_window_with(
        &crop,
        size,
        size,
        (0, 0, size, size),
        Filter::Bilinear,
    ))
}

fn mode_code(m: Mode) -> u8 {
    match m {
        Mode::L => 0,
        Mode::Rgb => 1,
        Mode::Cmyk => 2,
        Mode::Rgba => 3,
        Mode::P => 4,
    }
}

fn mode_of(c: u8) -> Option<Mode> {
    Some(match c {
        0 => Mode::L,
        1 => Mode::Rgb,
        2 => Mode::Cmyk,
        3 => Mode::Rgba,
        4 => Mode::P,
        _ => return None,
    })
}

/// Rasters stored once, uint8, in one file plus an index; the index is
/// written last, so a cache without it is rebuilt.
pub(crate) struct ImageCache {
    file: File,
    /// (offset, width, height, mode) per image.
    index: Vec<(u64, u32, u32, Mode)>,
    pub bytes: u64,
}

impl ImageCache {
    /// Opens `dir/name.{bin,idx}` when complete for `n` images.
    fn open_existing(dir: &Path, name: &str, n: usize) -> Option<ImageCache> {
        let idx = std::fs::read(dir.join(format!("{name}.idx"))).ok()?;
        if idx.len() != n * 17 {
            return None;
        }
        let index: Vec<_> = idx
            .chunks_exact(17)
            .map(|e| {
                Some((
                    u64::from_le_bytes(e[0..8].try_into().ok()?),
                    u32::from_le_bytes(e[8..12].try_into().ok()?),
                    u32::from_le_bytes(e[12..16].try_into().ok()?),
                    mode_of(e[16])?,
                ))
            })
            .collect::<Option<_>>()?;
        let file = File::open(dir.join(format!("{name}.bin"))).ok()?;
        let bytes = file.metadata().ok()?.len();
        Some(ImageCache { file, index, bytes })
    }

    /// The cache of images `0..n` made by `transform`, built in parallel
    /// batches unless a complete one is there. Unreadable images fail the
    /// build, naming the first few.
    pub(crate) fn build(
        dir: &Path,
        name: &str,
        n: usize,
        transform: &(dyn Fn(usize) -> std::result::Result<Raster, String> + Sync),
    ) -> Result<ImageCache> {
        if let Some(c) = Self::open_existing(dir, name, n) {
            return Ok(c);
        }
        std::fs::create_dir_all(dir).map_err(Error::io("cannot create", dir))?;
        let bin = dir.join(format!("{name}.bin"));
        let mut out = BufWriter::new(File::create(&bin).map_err(Error::io("cannot create", &bin))?);
        let mut index = Vec::with_capacity(n);
        let mut failed: Vec<String> = Vec::new();
        let mut n_failed = 0usize;
        let mut offset = 0u64;
        for lo in (0..n).step_by(512) {
            let done: Vec<_> = (lo..(lo + 512).min(n))
                .into_par_iter()
                .map(transform)
                .collect();
            for r in done {
                match r {
                    Ok(img) => {
                        out.write_all(&img.data)
                            .map_err(Error::io("cannot write", &bin))?;
                        index.push((offset, img.width, img.height, img.mode));
                        offset += img.data.len() as u64;
                    }
                    Err(m) => {
                        n_failed += 1;
                        if failed.len() < 5 {
                            failed.push(m);
                        }
                        index.push((offset, 0, 0, Mode::Rgb));
                    }
                }
            }
        }
        if n_failed > 0 {
            return Err(Error::Data(format!(
                "{n_failed} training image(s) are missing or unreadable: {}. Fix or remove them (the captions table's image_path) and rerun",
                failed.join("; ")
            )));
        }
        out.flush().map_err(Error::io("cannot write", &bin))?;
        drop(out);
        let mut idx = Vec::with_capacity(index.len() * 17);
        for (o, w, h, m) in &index {
            idx.extend_from_slice(&o.to_le_bytes());
            idx.extend_from_slice(&w.to_le_bytes());
            idx.extend_from_slice(&h.to_le_bytes());
            idx.push(mode_code(*m));
        }
        crate::framework::store::write_atomic(&dir.join(format!("{name}.idx")), &idx)?;
        Self::open_existing(dir, name, n).ok_or_else(|| {
            Error::Internal(format!("image cache {name} unreadable right after writing"))
        })
    }

    pub(crate) fn get(&self, i: usize) -> Result<Raster> {
        let (off, w, h, mode) = self.index[i];
        let mut data = vec![0u8; (w * h) as usize * mode.channels()];
        self.file.read_exact_at(&mut data, off).map_err(|e| {
            Error::Data(format!(
                "image cache read failed: {e}; delete the stage's work folder to rebuild it"
            ))
        })?;
        Ok(Raster {
            width: w,
            height: h,
            mode,
            data,
        })
    }
}

/// The training transform's deterministic part for a file.
pub(crate) fn open_train_resized(path: &Path, size: u32) -> std::result::Result<Raster, String> {
    Ok(train_resize(&open(path)?, size))
}

/// CLIP's evaluation transform (the val split's), as RGB.
pub(crate) fn open_eval(path: &Path, size: u32) -> std::result::Result<Raster, String> {
    let img = load_rgb(
        &ImageKey {
            path,
            bbox: None,
            rgb_first: false,
        },
        size,
    )?;
    Ok(Raster::from(img))
}

/// Sums for epoch averages weighted by batch size, as AverageMeter.
#[derive(Default)]
pub(crate) struct Meters(pub BTreeMap<String, (f64, f64)>);

impl Meters {
    pub(crate) fn add(&mut self, name: &str, v: f64, n: f64) {
        let e = self.0.entry(name.to_string()).or_insert((0.0, 0.0));
        e.0 += v * n;
        e.1 += n;
    }
    pub(crate) fn averages(&self) -> Vec<(String, f64)> {
        self.0
            .iter()
            .map(|(k, (s, n))| (k.clone(), if *n > 0.0 { s / n } else { f64::NAN }))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_holds_out_the_first_tenth_by_default() {
        let (train, val) = split(25, 0.1, 0).unwrap();
        assert_eq!(val, vec![0, 1]);
        assert_eq!(train.len(), 23);
        let (train, val) = split(25, 0.1, 5).unwrap();
        assert_eq!(val, vec![5, 6]);
        assert_eq!(&train[..6], &[0, 1, 2, 3, 4, 7]);
        assert!(split(25, 0.1, 24).is_err());
    }

    #[test]
    fn crops_stay_inside_and_cover_most_of_the_image() {
        for k in 0..200u64 {
            let mut rng = Rng::new(&[1, k]);
            let (i, j, h, w) = crop_params(300, 200, &mut rng);
            assert!(i + h <= 200 && j + w <= 300, "{k}: {i} {j} {h} {w}");
            let frac = (h * w) as f64 / 60000.0;
            assert!((0.88..=1.0).contains(&frac), "{k}: area fraction {frac}");
        }
        let (a, b) = (
            Rng::new(&[3, 4]).uniform(0.0, 1.0),
            Rng::new(&[3, 4]).uniform(0.0, 1.0),
        );
        assert_eq!(a, b);
    }

    #[test]
    fn train_resize_sets_the_shorter_side() {
        let img = Raster {
            width: 64,
            height: 48,
            mode: Mode::Rgb,
            data: vec![7; 64 * 48 * 3],
        };
        let r = train_resize(&img, 32);
        assert_eq!((r.width, r.height), (48, 36));
        assert!(r.data.iter().all(|&v| v == 7));
    }
}
