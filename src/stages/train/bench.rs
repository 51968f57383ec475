//! `genecis bench train` and `genecis bench augment`: what a training step
//! and the image path cost, timed on the code the stage runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::data::{self, ImageCache};
use super::{peak_rss_mib, train_step, Finetune, Optimizer, StepConfig};
use crate::error::{Error, Result};
use crate::model::clip::Clip;
use crate::model::combiner::{Combiner, Dropout};
use crate::model::dist::ProcessGroup;
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
    /// A rank of a data-parallel bench: `batch` is the global batch, this
    /// rank steps on its share.
    pub group: Option<ProcessGroup>,
}

/// What one bench run measured (rank 0's view), printed as a `RESULT`
/// line for a parent that compares world sizes.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct TrainBenchResult {
    pub world: usize,
    pub seconds_per_step: f64,
    pub samples_per_s: f64,
    /// Share of the step time in collectives (gathers, gradient all-reduce).
    pub comm_share: f64,
}

/// `train_step` on random inputs: cached mode (features gathered from a
/// feature table, as the stage gathers them) or, with a checkpoint,
/// fine-tuning all of that CLIP on random images and tokens.
pub(crate) fn bench_train(b: &mut TrainBench) -> Result<()> {
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
        device,
        amp,
    };
    let (rank, world) = b.group.as_ref().map_or((0, 1), |g| (g.rank, g.world));
    if !b.batch.is_multiple_of(world) {
        return Err(Error::Usage {
            arg: "--batch".into(),
            message: format!("{} does not split over {world} ranks", b.batch),
        });
    }
    // This rank's share of the global batch.
    let bs = (b.batch / world) as i64;
    // Cached mode gathers rows of a feature table, as the stage does.
    let rows = 200_000i64;
    let table = Tensor::randn([rows, dim], (Kind::Float, device));
    let n_params: i64 = opt.params.iter().map(|(_, t)| t.numel() as i64).sum();
    println!(
        "{} mode, batch {bs} per rank x {world}, {n_params} trainable parameters, device {device:?}{}",
        if clip.is_some() {
            "fine-tune (image_plus_text_whole)"
        } else {
            "cached (finetune = none)"
        },
        if amp { ", AMP" } else { "" }
    );
    let mut times = Vec::new();
    let mut comm = Duration::ZERO;
    for s in 0..b.steps.max(2) {
        let idx = Tensor::randint(rows, [3 * bs], (Kind::Int64, device));
        let t0 = Instant::now();
        // Per-sample dropout masks, as the stage draws them.
        let keys: Vec<[u64; 3]> = (0..bs as u64).map(|i| [s as u64, rank as u64, i]).collect();
        let masks = comb.sample_masks(&keys, device)?;
        let m = train_step(
            &cfg,
            &mut opt,
            &comb,
            1e-6,
            Dropout::Masks(&masks),
            b.group.as_mut(),
            || match &clip {
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
                    let tok = Tensor::randint(
                        49405,
                        [bs, c.config.context_length],
                        (Kind::Int64, device),
                    ) + 1;
                    let _ = tok.narrow(1, 10, 1).fill_(49407);
                    let f = c.encode_image(&x)?;
                    let p = f.chunk(3, 0);
                    Ok((
                        p[0].shallow_clone(),
                        p[1].shallow_clone(),
                        c.encode_text(&tok)?,
                    ))
                }
            },
        )?;
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        let dt = t0.elapsed().as_secs_f64();
        if rank == 0 {
            println!("step {s}: {dt:.3} s, loss {:.4}", m.metrics[0].1);
        }
        if s > 0 {
            comm += m.comm;
        }
        times.push(dt);
    }
    let steady: f64 = times[1..].iter().sum::<f64>() / (times.len() - 1) as f64;
    let per_epoch = b.samples.div_ceil(b.batch as u64) as f64 * steady;
    let result = TrainBenchResult {
        world,
        seconds_per_step: steady,
        samples_per_s: b.batch as f64 / steady,
        comm_share: comm.as_secs_f64() / times[1..].iter().sum::<f64>().max(1e-12),
    };
    if rank > 0 {
        return Ok(());
    }
    println!(
        "{:.3} s/step after the first ({:.3} s): {:.2} steps/s, {:.0} samples/s on {world} rank(s), collectives {:.1}% of the step",
        steady,
        times[0],
        1.0 / steady,
        result.samples_per_s,
        100.0 * result.comm_share
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
    println!(
        "RESULT {}",
        serde_json::to_string(&result).map_err(|e| Error::Internal(e.to_string()))?
    );
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
