//! `genecis bench train` and `genecis bench augment`: what a training step
//! and the image path cost, timed on the code the stage runs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::data::{self, ImageCache};
use super::{peak_rss_mib, train_step, Finetune, Optimizer, StepConfig};
use crate::error::{Error, Result};
use crate::model::clip::Clip;
use crate::model::combiner::Combiner;
use crate::model::optim::{AdamW, GradScaler};
use crate::model::preprocess::{open, to_tensor};
use crate::model::select_device;
use crate::rng::Rng;

pub(crate) struct TrainBench<'a> {
    pub samples: u64,
    pub batch: usize,
    pub dim: i64,
    pub steps: usize,
    pub checkpoint: Option<&'a Path>,
    pub projection_dim: i64,
    pub hidden_dim: i64,
    pub device: &'a str,
    pub amp: bool,
}

/// `train_step` on random inputs: cached mode (features gathered from a
/// feature table, as the stage gathers them) or, with a checkpoint,
/// fine-tuning all of that CLIP on random images and tokens.
pub(crate) fn bench_train(b: &TrainBench) -> Result<()> {
    let device = select_device(b.device).map_err(|m| Error::Usage {
        arg: "--device".into(),
        message: m,
    })?;
    let amp = b.amp && device.is_cuda();
    tch::manual_seed(0);
    let mut clip = match b.checkpoint {
        // Any checkpoint `embed` reads: a file or a Hugging Face folder.
        Some(c) => Some(Clip::load(c, None, device)?),
        None => None,
    };
    let dim = clip.as_ref().map(|c| c.config.embed_dim).unwrap_or(b.dim);
    let comb = Combiner::new(super::to_device(
        Combiner::init(dim, b.projection_dim, b.hidden_dim, Device::Cpu)?.weights(),
        device,
    ))?;
    if let Some(c) = &mut clip {
        c.set_training(true);
    }
    let finetune = if clip.is_some() {
        Finetune::ImagePlusTextWhole
    } else {
        Finetune::None
    };
    let mut opt = Optimizer::new(
        &comb,
        clip.as_ref(),
        finetune,
        AdamW::new((0.9, 0.999), 1e-8, 0.0),
        GradScaler::new(amp),
    );
    let cfg = StepConfig {
        lamda: 100.0,
        clip_grad_norm: 1.0,
        clip_before_unscale: true,
        dropout: true,
        device,
        amp,
    };
    let bs = b.batch as i64;
    // Cached mode gathers rows of a feature table, as the stage does.
    let rows = 200_000i64;
    let table = Tensor::randn([rows, dim], (Kind::Float, device));
    let n_params: i64 = opt.params.iter().map(|(_, t)| t.numel() as i64).sum();
    println!(
        "{} mode, batch {bs}, {n_params} trainable parameters, device {device:?}{}",
        if clip.is_some() {
            "fine-tune (image_plus_text_whole)"
        } else {
            "cached (finetune = none)"
        },
        if amp { ", AMP" } else { "" }
    );
    let mut times = Vec::new();
    for s in 0..b.steps.max(2) {
        let idx = Tensor::randint(rows, [3 * bs], (Kind::Int64, device));
        let t0 = Instant::now();
        let m = train_step(&cfg, &mut opt, &comb, 1e-6, || match &clip {
            None => {
                let f = table.index_select(0, &idx);
                let p = f.chunk(3, 0);
                Ok((
                    p[0].shallow_clone(),
                    p[1].shallow_clone(),
                    p[2].shallow_clone(),
                ))
            }
            Some(c) => {
                let n = c.config.image_resolution;
                let x = Tensor::randn([3 * bs, 3, n, n], (Kind::Float, device));
                let tok =
                    Tensor::randint(49405, [bs, c.config.context_length], (Kind::Int64, device))
                        + 1;
                let _ = tok.narrow(1, 10, 1).fill_(49407);
                let f = c.encode_image(&x)?;
                let p = f.chunk(3, 0);
                Ok((
                    p[0].shallow_clone(),
                    p[1].shallow_clone(),
                    c.encode_text(&tok)?,
                ))
            }
        })?;
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        let dt = t0.elapsed().as_secs_f64();
        println!("step {s}: {dt:.3} s, loss {:.4}", m[0].1);
        times.push(dt);
    }
    let steady: f64 = times[1..].iter().sum::<f64>() / (times.len() - 1) as f64;
    let per_epoch = b.samples.div_ceil(b.batch as u64) as f64 * steady;
    println!(
        "{:.3} s/step after the first ({:.3} s): {:.2} steps/s, {:.0} samples/s",
        steady,
        times[0],
        1.0 / steady,
        bs as f64 / steady
    );
    println!(
        "extrapolated: one epoch of {} samples {:.1} h; 6 epochs {:.1} h",
        b.samples,
        per_epoch / 3600.0,
        6.0 * per_epoch / 3600.0
    );
    if let Some(r) = peak_rss_mib() {
        println!("peak RSS {r:.0} MiB");
    }
    if device.is_cuda() {
        println!("(GPU memory: see nvidia-smi; libtorch's allocator stats are not exposed by tch)");
    }
    Ok(())
}

/// Per core: the original's per-image work each epoch (decode the JPEG,
/// `Resize(int(n / 0.875))`, `RandomResizedCrop`, to tensor) against ours
/// (crop the cached resize, to tensor); plus the one-time cache build.
pub(crate) fn bench_augment(dir: &Path, n_px: u32, repeat: usize) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(Error::io("cannot read", dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Usage {
            arg: "DIR".into(),
            message: format!("no images in {}", dir.display()),
        });
    }
    let n = files.len();
    let one = |f: &Path, k: u64| -> Result<Tensor> {
        let r = data::open_train_resized(f, n_px).map_err(Error::Data)?;
        Ok(to_tensor(&data::random_resized_crop(
            &r,
            n_px,
            &mut Rng::new(&[k]),
        )))
    };
    let _ = open(&files[0]).map_err(Error::Data)?;
    let t0 = Instant::now();
    for k in 0..repeat {
        for f in &files {
            let _ = one(f, k as u64)?;
        }
    }
    let decode_rate = (n * repeat) as f64 / t0.elapsed().as_secs_f64();
    let tmp = std::env::temp_dir().join(format!("genecis-bench-augment-{}", std::process::id()));
    let t1 = Instant::now();
    let cache = ImageCache::build(&tmp, "train", n, &|i| {
        data::open_train_resized(&files[i], n_px)
    })?;
    let build = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    for k in 0..repeat {
        for i in 0..n {
            let r = cache.get(i)?;
            let _ = to_tensor(&data::random_resized_crop(
                &r,
                n_px,
                &mut Rng::new(&[k as u64, i as u64]),
            ));
        }
    }
    let cached_rate = (n * repeat) as f64 / t2.elapsed().as_secs_f64();
    let cache_mib = cache.bytes as f64 / (1 << 20) as f64;
    let _ = std::fs::remove_dir_all(&tmp);
    println!("{n} images x {repeat}, n_px {n_px}, one thread for the per-epoch paths");
    println!("  decode + resize + crop + to tensor (the original's per-epoch work): {decode_rate:.1} images/s = {:.1} samples/s (3 images each)", decode_rate / 3.0);
    println!("  cached resize -> crop + to tensor (ours, per epoch): {cached_rate:.1} images/s = {:.1} samples/s, {:.1}x", cached_rate / 3.0, cached_rate / decode_rate);
    println!(
        "  cache build (once, all cores): {build:.2} s, {cache_mib:.1} MiB = {:.0} KiB/image",
        cache_mib * 1024.0 / n as f64
    );
    Ok(())
}
