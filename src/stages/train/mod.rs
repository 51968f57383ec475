//! `train`: the GeneCIS recipe (train/train_cc3m.py,
//! train/epoch_train_functions.py) on mined triplets. A Combiner head on
//! CLIP features, trained with the original's contrastive loss, AdamW,
//! cosine schedule, gradient clipping and loss scaling; CLIP frozen
//! (`finetune = "none"`, features from an `embed` stage) or fine-tuned
//! (images decoded once into a cache, augmented per epoch).
//!
//! Tables:
//! - `train_metrics(epoch, step, split, metric, value, lr)`: long format.
//!   Splits: `train_step` (each step's loss and accuracy), `train` and
//!   `val` (epoch averages, as the original's meters), `templates`
//!   (`<task>/recall_at_K` of the current weights on the templates input).
//! - `weights(role, file, format, bytes, epoch, select_by, value)`: the
//!   files in the stage folder that downstream stages load: `combiner`
//!   (`combiner_head.pt`), `backbone` (`backbone.pt`, fine-tune modes),
//!   `combiner_safetensors`.
//!
//! Chunk k < epochs is epoch k; the last chunk lists the weights. `last/`
//! in the stage's work folder holds everything a rerun resumes from
//! (weights, AdamW moments, scaler, epoch and step, metrics so far).

pub(crate) mod bench;
mod checkpoint;
pub(crate) mod data;
mod params;
mod select;
mod step;

use checkpoint::Progress;
pub use params::{Finetune, TrainParams};
use select::{Selection, SelectionFeatures};
pub use step::{train_step, Optimizer, StepConfig, StepOut};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tch::{Device, Kind, Reduction, Tensor};

use crate::error::{Error, Result};
use crate::framework::ranks::Ranks;
use crate::framework::stage::{
    resolve_path, ChunkTables, Chunks, Finding, InputTable, Stage, StageContext, TableDef,
};
use crate::model::arch::{arch_spec, ArchSpec, ASSUMED_NOTE};
use crate::model::clip::{Clip, Vision};
use crate::model::combiner::{l2_normalize, Combiner, Dropout, HIDDEN_DIM, PROJECTION_DIM};
use crate::model::dist::ProcessGroup;
use crate::model::optim::{cosine_lrs, AdamW, GradScaler};
use crate::model::preprocess::Preprocess;
use crate::model::preprocess::{load_rgb, to_tensor, ImageKey, Raster};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::{select_device, with_precision, StateDict};
use crate::rng::Rng;
use crate::tables::embeddings::{read_embeddings, Embeddings};
use crate::tables::metrics::{metrics_batch, MetricRow, TRAIN_METRICS_SCHEMA};
use crate::tables::triplets::{Sample, Triplets};
use crate::tables::weights::{weights_batch, WEIGHTS_SCHEMA};
use data::{ImageCache, Meters};

enum Source {
    /// Cached mode: features of every distinct image and condition.
    Cached { images: Tensor, texts: Tensor },
    /// Fine-tune mode: images from files, conditions tokenised.
    Images {
        paths: Vec<PathBuf>,
        tokens: Tensor,
        train_cache: Option<ImageCache>,
        val_cache: Option<ImageCache>,
    },
}

/// This process's place in a data-parallel run.
struct Place {
    group: Arc<Mutex<ProcessGroup>>,
    rank: usize,
    world: usize,
}

pub(crate) struct Trainer {
    place: Option<Place>,
    device: Device,
    amp: bool,
    clip: Option<Clip>,
    combiner: Combiner,
    opt: Optimizer,
    lrs: Vec<f64>,
    data: Triplets,
    train_idx: Vec<usize>,
    val_idx: Vec<usize>,
    source: Source,
    selection: Option<Selection>,
    select_by: String,
    progress: Progress,
    dim: i64,
    n_px: u32,
    last_dir: PathBuf,
    cache_dir: PathBuf,
    timing: Timing,
}

#[derive(Default)]
struct Timing {
    steps: u64,
    samples: u64,
    train: Duration,
    /// Of `train`: in collectives.
    comm: Duration,
    /// Counted while features are read through `&self` (the optimiser
    /// holds the rest): images augmented and nanoseconds spent on them.
    images: AtomicU64,
    augment_ns: AtomicU64,
}

pub(crate) struct Train;

impl Stage for Train {
    const KIND: &'static str = "train";
    /// 2: the selected weights are listed in the last epoch's part (no extra
    /// empty chunk), so a run of version 1 reruns instead of resuming.
    /// 3: dropout masks drawn per sample (the same on any number of ranks).
    const VERSION: &'static str = "3";
    /// Data-parallel: each rank trains on its share of every global batch.
    const DISTRIBUTED: bool = true;
    const ABOUT: &'static str = "triplets (+ captions or embeddings, + templates) -> a trained Combiner (and CLIP): train_metrics, weights";
    type Params = TrainParams;
    /// One epoch per chunk, in sequence, on the trainer's own state.
    type Work = Trainer;

    fn input_tables() -> &'static [InputTable] {
        const INPUTS: &[InputTable] = &[
            InputTable::required("triplets"),
            InputTable::optional("captions"),
            InputTable::optional("image_embeddings"),
            InputTable::optional("text_embeddings"),
            InputTable::optional("templates"),
            InputTable::optional("galleries"),
            InputTable::optional("image_keys"),
            InputTable::optional("texts"),
        ];
        INPUTS
    }

    fn output_tables() -> Vec<TableDef> {
        vec![
            TableDef::new("train_metrics", TRAIN_METRICS_SCHEMA.clone()),
            TableDef::new("weights", WEIGHTS_SCHEMA.clone()),
        ]
    }

    fn validate(p: &TrainParams, base: &Path) -> Vec<Finding> {
        let mut out = Vec::new();
        if let Err(m) =
            arch_spec(p.arch.as_deref(), base).and_then(|a| a.map(|a| a.config()).transpose())
        {
            out.push(Finding::error("arch", m));
        }
        let mut need = |ok: bool, f: &str, m: &str| {
            if !ok {
                out.push(Finding::error(f.to_string(), m.to_string()));
            }
        };
        need(
            (1..=100_000).contains(&p.epochs),
            "epochs",
            "use 1 to 100,000",
        );
        need(p.batch_size <= 1 << 20, "batch_size", "at most 1,048,576");
        need(
            p.batch_size >= 2,
            "batch_size",
            "must be at least 2 (the loss contrasts a batch)",
        );
        need(p.lr > 0.0, "lr", "must be positive");
        need(
            p.weight_decay >= 0.0,
            "weight_decay",
            "must not be negative",
        );
        need(
            (0.0..1.0).contains(&p.val_fraction),
            "val_fraction",
            "must be in [0, 1)",
        );
        need(
            p.clip_grad_norm >= 0.0,
            "clip_grad_norm",
            "must not be negative (0 turns clipping off)",
        );
        need(
            (1..=65_536).contains(&p.projection_dim) && (1..=65_536).contains(&p.hidden_dim),
            "projection_dim",
            "layer sizes must be 1 to 65,536",
        );
        need(
            p.betas.iter().all(|b| (0.0..1.0).contains(b)),
            "betas",
            "each in [0, 1)",
        );
        need(p.eps > 0.0, "eps", "must be positive");
        need(
            p.finetune == Finetune::None || p.checkpoint.is_some(),
            "checkpoint",
            "fine-tuning needs the CLIP to start from: set params.checkpoint (or finetune = \"none\" with an embed stage's features)",
        );
        if let Err(m) = select_device(&p.device) {
            out.push(Finding::error("device", m));
        }
        if p.select_by != "auto"
            && !(p.select_by.starts_with("val/") || p.select_by.starts_with("templates/"))
        {
            out.push(Finding::error(
                "select_by",
                "use auto, val/<metric> or templates/<task>/recall_at_<K>",
            ));
        }
        out
    }

    fn validate_world(p: &TrainParams, world: usize) -> Vec<Finding> {
        match p.batch_size % world {
            0 => Vec::new(),
            _ => vec![Finding::error(
                "batch_size",
                format!(
                    "{} is the global batch, split evenly over the ranks, so it must be a multiple of the world size {world} (the original's batch_size_per_gpu x GPUs)",
                    p.batch_size
                ),
            )],
        }
    }

    /// Trains the epochs rank 0 trains, from the same checkpoint.
    fn follow(p: &TrainParams, ctx: &StageContext) -> Result<()> {
        let mut t = Trainer::new(p, ctx)?;
        while t.progress.epoch < p.epochs {
            t.train_epoch(p, ctx)?;
        }
        Ok(())
    }

    fn validate_inputs(p: &TrainParams, tables: &[String]) -> Vec<Finding> {
        let has = |t: &str| tables.iter().any(|x| x == t);
        let mut out = Vec::new();
        if p.finetune == Finetune::None && !(has("image_embeddings") && has("text_embeddings")) {
            out.push(Finding::error(
                "finetune",
                "finetune = \"none\" trains on cached features: list an embed stage (fed by the mine and ingest stages) in inputs",
            ));
        }
        if p.finetune != Finetune::None && !has("captions") {
            out.push(Finding::error(
                "finetune",
                "fine-tuning reads the images: list the ingest stage (its captions table, with image_path) in inputs",
            ));
        }
        out
    }

    fn files(p: &TrainParams, base: &Path) -> Vec<(&'static str, PathBuf)> {
        let mut f = Vec::new();
        if let Ok(Some(ArchSpec::Json(j))) = arch_spec(p.arch.as_deref(), base) {
            f.push(("arch", j));
        }
        if let Some(c) = &p.checkpoint {
            f.push(("checkpoint", resolve_path(base, c)));
        }
        if let Some(c) = &p.combiner {
            f.push(("combiner", resolve_path(base, c)));
        }
        f
    }

    fn check(p: &TrainParams, base: &Path) -> Vec<Finding> {
        let mut out = Vec::new();
        if let (Some(c), Ok(arch)) = (&p.checkpoint, arch_spec(p.arch.as_deref(), base)) {
            if let Err(e) = Clip::load(&resolve_path(base, c), arch.as_ref(), Device::Cpu) {
                out.push(Finding::error("checkpoint", e.to_string()));
            }
        }
        if let Some(c) = &p.combiner {
            if let Err(e) =
                StateDict::load(&resolve_path(base, c), Device::Cpu).and_then(Combiner::new)
            {
                out.push(Finding::error("combiner", e.to_string()));
            }
        }
        out
    }

    fn plan(p: &TrainParams, ctx: &StageContext) -> Result<Chunks<Trainer>> {
        let t = Trainer::new(p, ctx)?;
        let n_train = t.train_idx.len() as u64;
        Ok(Chunks {
            sizes: vec![n_train; p.epochs],
            work: t,
            unit: "samples",
            parallel: None,
            width: None,
        })
    }

    fn run_chunk(
        p: &TrainParams,
        t: &mut Trainer,
        k: usize,
        ctx: &StageContext,
    ) -> Result<Option<ChunkTables>> {
        if t.progress.epoch < k {
            return Err(Error::Internal(format!(
                "epoch {k} before epoch {} finished",
                t.progress.epoch
            )));
        }
        if t.progress.epoch == k {
            t.train_epoch(p, ctx)?;
        }
        let rows: Vec<MetricRow> = t
            .progress
            .metrics
            .iter()
            .filter(|r| r.0 as usize == k)
            .cloned()
            .collect();
        // The last epoch's chunk lists the selected epoch's files.
        let weights = if k + 1 == p.epochs {
            t.weights_rows(p, ctx)?
        } else {
            weights_batch(&[])?
        };
        Ok(Some(vec![
            ("train_metrics", metrics_batch(&rows)?),
            ("weights", weights),
        ]))
    }

    fn finish(_p: &TrainParams, t: Trainer, ctx: &StageContext) -> Result<()> {
        let tm = &t.timing;
        if tm.steps > 0 {
            let secs = tm.train.as_secs_f64().max(1e-9);
            let ranks = match &t.place {
                Some(pl) => format!(
                    " x {} ranks; collectives {:.1}% of the step time",
                    pl.world,
                    100.0 * tm.comm.as_secs_f64() / secs
                ),
                None => String::new(),
            };
            ctx.note(format!(
                "{} steps, {} samples in {secs:.2} s: {:.2} steps/s, {:.1} samples/s on {:?}{ranks}",
                tm.steps,
                tm.samples,
                tm.steps as f64 / secs,
                tm.samples as f64 / secs,
                t.device
            ));
        }
        let images = tm.images.load(Ordering::Relaxed);
        let augment = tm.augment_ns.load(Ordering::Relaxed) as f64 * 1e-9;
        if images > 0 {
            ctx.note(format!(
                "crop + resize + normalise of cached images: {images} in {augment:.2} s = {:.0} images/s",
                images as f64 / augment.max(1e-9)
            ));
        }
        if let Some(rss) = peak_rss_mib() {
            ctx.note(format!("peak RSS {rss:.0} MiB"));
        }
        if let Some((v, e)) = t.progress.best {
            ctx.note(format!("best epoch {e} by {} = {v:.4}", t.select_by));
        }
        Ok(())
    }
}

/// VmHWM of this process.
pub(crate) fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Rows of `keys` in an embedding table, as a [n, d] tensor; missing keys
/// are an error that names a few and the stage to rerun.
fn gather(e: &Embeddings, keys: &[String], what: &str, dir: &Path) -> Result<Tensor> {
    let mut flat = Vec::with_capacity(keys.len() * e.dim);
    let mut missing = Vec::new();
    for k in keys {
        match e.get(k) {
            Some(r) => flat.extend_from_slice(r),
            None => missing.push(k.as_str()),
        }
    }
    if !missing.is_empty() {
        return Err(Error::Data(format!(
            "{} of the triplets' {what} have no embedding in {}, e.g. {}. Rerun the embed stage '{}' with the mine and ingest stages in its inputs",
            missing.len(),
            dir.display(),
            missing.iter().take(5).map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", "),
            crate::framework::store::stage_of(dir)
        )));
    }
    Ok(Tensor::from_slice(&flat).view([keys.len() as i64, e.dim as i64]))
}

fn seed_of(parts: &[u64]) -> i64 {
    let mut r = Rng::new(parts);
    (r.below(1 << 62)) as i64
}

impl Trainer {
    fn new(p: &TrainParams, ctx: &StageContext) -> Result<Trainer> {
        let place = match ctx.ranks.filter(|r| r.world() > 1) {
            Some(r) => Some(Place {
                group: r
                    .group()
                    .downcast_ref::<Arc<Mutex<ProcessGroup>>>()
                    .ok_or_else(|| Error::Internal("the ranks hold no process group".into()))?
                    .clone(),
                rank: r.rank(),
                world: r.world(),
            }),
            None => None,
        };
        if let Some(f) = Train::validate_world(p, place.as_ref().map_or(1, |pl| pl.world)).first() {
            return Err(Error::Data(format!("{}: {}", f.field, f.message)));
        }
        let mut device = select_device(&p.device).map_err(Error::Data)?;
        // One GPU per rank: the rank's place on its machine.
        if let (Device::Cuda(_), Some(r)) = (device, ctx.ranks) {
            let gpus = tch::Cuda::device_count().max(0) as usize;
            if r.local_rank() >= gpus {
                return Err(Error::Data(format!(
                    "local rank {} has no GPU of its own: this machine shows {gpus}; start at most {gpus} ranks per machine (--nproc, --nproc-per-node, --ntasks-per-node)",
                    r.local_rank()
                )));
            }
            device = Device::Cuda(r.local_rank());
        }
        let amp = p.mixed_precision && device.is_cuda();
        let data = crate::tables::triplets::read_triplets(ctx.input("triplets")?)?;
        let (train_idx, val_idx) =
            data::split(data.samples.len(), p.val_fraction, p.val_start_idx)?;
        tch::manual_seed(p.seed as i64);
        let mut clip = match (&p.checkpoint, p.finetune) {
            (Some(c), f) if f != Finetune::None => {
                let arch = arch_spec(p.arch.as_deref(), ctx.base_dir).map_err(Error::Data)?;
                let clip = Clip::load(&ctx.resolve(c), arch.as_ref(), device)?;
                ctx.note(format!("CLIP: {}", clip.config.describe()));
                if clip.config.assumed {
                    ctx.note(ASSUMED_NOTE);
                }
                // The original's train transform normalises with CLIP's
                // mean and std; another family's would be a different model.
                let pre = &clip.config.preprocess;
                if *pre != Preprocess::openai(pre.size) {
                    return Err(Error::Data(format!(
                        "{} prepares images its own way ({pre:?}); fine-tuning uses the original's transform (torchvision's, CLIP's mean and std), so it is not implemented for this model. Cached mode works: embed, then train with finetune = \"none\"",
                        clip.config.source
                    )));
                }
                Some(clip)
            }
            _ => None,
        };
        if let Some(c) = &clip {
            let resnet = matches!(c.config.vision, Vision::ResNet { .. });
            if matches!(p.finetune, Finetune::ImageOnly | Finetune::ImagePlusText) && !resnet {
                return Err(Error::Data(format!(
                    "finetune = {:?} trains the ResNet's attention pool, which a ViT has not; use image_only_whole or image_plus_text_whole",
                    p.finetune
                )));
            }
            if p.finetune == Finetune::ImagePlusText && c.config.text.layers < 12 {
                return Err(Error::Data(format!(
                    "finetune = image_plus_text trains text block 11, but the text transformer has {} blocks",
                    c.config.text.layers
                )));
            }
        }
        // Cached mode reads the embeddings once: for training and selection.
        let mut cached: Option<(Embeddings, Embeddings)> = None;
        let (source, dim) = match (p.finetune, &mut clip) {
            (Finetune::None, _) => {
                let (idir, tdir) = (
                    ctx.input("image_embeddings")?,
                    ctx.input("text_embeddings")?,
                );
                let (model, img) = read_embeddings(idir, "image_key", p.model.as_deref())
                    .map_err(|m| Error::Data(format!("image_embeddings: {m}")))?;
                let (_, txt) = read_embeddings(tdir, "text", Some(&model))
                    .map_err(|m| Error::Data(format!("text_embeddings: {m}")))?;
                let keys: Vec<String> = data.images.iter().map(|i| i.to_string()).collect();
                let images = gather(&img, &keys, "images", idir)?.to_device(device);
                let texts = gather(&txt, &data.texts, "conditions", tdir)?.to_device(device);
                let dim = img.dim as i64;
                cached = Some((img, txt));
                (Source::Cached { images, texts }, dim)
            }
            (_, Some(c)) => {
                let paths = crate::tables::captions::read_image_paths(
                    ctx.input("captions")?,
                    ctx.base_dir,
                )?;
                if let Some(m) = crate::tables::captions::missing_paths(&data.images, &paths) {
                    return Err(Error::Data(m));
                }
                let paths: Vec<PathBuf> = data.images.iter().map(|i| paths[i].clone()).collect();
                let tok = ClipTokenizer::new(c.config.context_length as usize);
                let refs: Vec<&str> = data.texts.iter().map(String::as_str).collect();
                let tokens = tok.batch(&refs).to_device(device);
                c.set_training(false);
                (
                    Source::Images {
                        paths,
                        tokens,
                        train_cache: None,
                        val_cache: None,
                    },
                    c.config.embed_dim,
                )
            }
            (_, None) => {
                return Err(Error::Internal("fine-tuning without a CLIP".into()));
            }
        };
        let combiner = match &p.combiner {
            Some(c) => Combiner::new(StateDict::load(&ctx.resolve(c), device)?)?,
            None => Combiner::init(dim, p.projection_dim, p.hidden_dim, Device::Cpu)
                .and_then(|c| Combiner::new(to_device(c.weights(), device)))?,
        };
        if combiner.dim != dim {
            return Err(Error::Data(format!(
                "the Combiner takes {}-d features but the backbone gives {dim}-d: start from a head of this backbone, or leave params.combiner out",
                combiner.dim
            )));
        }
        let n_px = clip
            .as_ref()
            .map(|c| c.config.image_resolution as u32)
            .unwrap_or(224);
        let selection = Self::selection(ctx, cached)?;
        let select_by = Self::resolve_select_by(p, selection.as_ref())?;
        let opt = Optimizer::new(
            &combiner,
            clip.as_ref(),
            p.finetune,
            AdamW::new((p.betas[0], p.betas[1]), p.eps, p.weight_decay),
            GradScaler::new(amp),
        );
        let mut t = Trainer {
            place,
            device,
            amp,
            clip,
            combiner,
            opt,
            lrs: cosine_lrs(p.lr, p.lr * 1e-3, p.epochs, p.epochs),
            data,
            train_idx,
            val_idx,
            source,
            selection,
            select_by,
            progress: Progress::default(),
            dim,
            n_px,
            last_dir: ctx.work_dir.join("last"),
            cache_dir: ctx.work_dir.join("cache"),
            timing: Timing::default(),
        };
        if t.resume()? {
            ctx.note(format!(
                "resumed from {}: epoch {}, step {}",
                t.last_dir.display(),
                t.progress.epoch,
                t.progress.step
            ));
        }
        Ok(t)
    }

    fn leader(&self) -> bool {
        self.place.as_ref().is_none_or(|pl| pl.rank == 0)
    }

    /// The image caches. Rank 0 builds them; the other ranks open them when
    /// it says they are complete (no timeout: a build may take hours).
    fn ensure_caches(&mut self, p: &TrainParams, ranks: Option<&dyn Ranks>) -> Result<()> {
        let n_px = self.n_px;
        let dir = self.cache_dir.clone();
        let leader = self.leader();
        let key = format!("genecis/cache/{}", dir.display());
        if let (
            false,
            Some(r),
            Source::Images {
                train_cache: None, ..
            },
        ) = (leader, ranks, &self.source)
        {
            r.wait(&key, None)?;
        }
        if let Source::Images {
            paths,
            train_cache,
            val_cache,
            ..
        } = &mut self.source
        {
            if train_cache.is_none() {
                let ps = paths.clone();
                *train_cache = Some(ImageCache::build(&dir, "train", ps.len(), &|i| {
                    data::open_train_resized(&ps[i], n_px)
                })?);
            }
            if leader && val_cache.is_none() && !self.val_idx.is_empty() {
                let ps = paths.clone();
                *val_cache = Some(ImageCache::build(&dir, "val", ps.len(), &|i| {
                    data::open_eval(&ps[i], n_px)
                })?);
            }
        }
        if let Some(Selection {
            features: SelectionFeatures::Encode { keys, cache, .. },
            ..
        }) = &mut self.selection
        {
            if leader && cache.is_none() {
                let ks = keys.clone();
                *cache = Some(ImageCache::build(&dir, "templates", ks.len(), &|i| {
                    let r = &ks[i];
                    let img = load_rgb(
                        &ImageKey {
                            path: &r.path,
                            bbox: r.bbox,
                            rgb_first: r.rgb_first,
                        },
                        n_px,
                    )?;
                    Ok(Raster::from(img))
                })?);
            }
        }
        if let (true, Some(r)) = (leader && self.place.is_some(), ranks) {
            r.set(&key, "ready")?;
        }
        let _ = p;
        Ok(())
    }

    /// [3, n, n] inputs of images `rows` (train: crop per (epoch, sample,
    /// slot); val: the eval transform's pixels).
    fn image_batch(&self, rows: &[(u32, [u64; 4])], train: bool) -> Result<Tensor> {
        let Source::Images {
            train_cache,
            val_cache,
            ..
        } = &self.source
        else {
            return Err(Error::Internal("image batch in cached mode".into()));
        };
        let cache = if train { train_cache } else { val_cache };
        let cache = cache
            .as_ref()
            .ok_or_else(|| Error::Internal("image cache not built".into()))?;
        let n_px = self.n_px;
        let t0 = Instant::now();
        let imgs: Vec<Result<Tensor>> = rows
            .par_iter()
            .map(|(row, rng_parts)| {
                let r = cache.get(*row as usize)?;
                let rgb = if train {
                    data::random_resized_crop(&r, n_px, &mut Rng::new(rng_parts))
                } else {
                    image::RgbImage::from_raw(r.width, r.height, r.data)
                        .ok_or_else(|| Error::Internal("cached image size".into()))?
                };
                Ok(to_tensor(&rgb))
            })
            .collect();
        let imgs: Vec<Tensor> = imgs.into_iter().collect::<Result<_>>()?;
        if train {
            let t = &self.timing;
            t.images.fetch_add(rows.len() as u64, Ordering::Relaxed);
            t.augment_ns
                .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        Ok(Tensor::stack(&imgs, 0).to_device(self.device))
    }

    /// (reference, target, condition) features of samples `idx`.
    fn features(
        &self,
        p: &TrainParams,
        idx: &[usize],
        train: bool,
        epoch: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let samples: Vec<Sample> = idx.iter().map(|&i| self.data.samples[i]).collect();
        let rows = |f: fn(&Sample) -> u32| -> Tensor {
            let v: Vec<i64> = samples.iter().map(|s| f(s) as i64).collect();
            Tensor::from_slice(&v)
        };
        if let Source::Cached { images, texts } = &self.source {
            let d = images.device();
            return Ok((
                images.index_select(0, &rows(|s| s.reference).to_device(d)),
                images.index_select(0, &rows(|s| s.target).to_device(d)),
                texts.index_select(0, &rows(|s| s.text).to_device(d)),
            ));
        }
        let slots: &[fn(&Sample) -> u32] = if train && p.encode_distractors {
            &[|s| s.reference, |s| s.target, |s| s.distractor]
        } else {
            &[|s| s.reference, |s| s.target]
        };
        let mut want = Vec::with_capacity(slots.len() * idx.len());
        for (slot, f) in slots.iter().enumerate() {
            for (s, &i) in samples.iter().zip(idx) {
                want.push((f(s), [p.seed, epoch as u64, i as u64, slot as u64]));
            }
        }
        let x = self.image_batch(&want, train)?;
        let Source::Images { tokens, .. } = &self.source else {
            return Err(Error::Internal("tokens in cached mode".into()));
        };
        let toks = tokens.index_select(0, &rows(|s| s.text).to_device(tokens.device()));
        let clip = self
            .clip
            .as_ref()
            .ok_or_else(|| Error::Internal("fine-tuning without a CLIP".into()))?;
        let feats = clip.encode_image(&x)?;
        let parts = feats.chunk(slots.len() as i64, 0);
        let text = clip.encode_text(&toks)?;
        Ok((parts[0].shallow_clone(), parts[1].shallow_clone(), text))
    }

    fn set_training(&mut self, on: bool) {
        if let Some(c) = &mut self.clip {
            c.set_training(on);
        }
    }

    /// One epoch: the remaining steps, validation, selection, checkpoint.
    fn train_epoch(&mut self, p: &TrainParams, ctx: &StageContext) -> Result<()> {
        self.ensure_caches(p, ctx.ranks)?;
        self.check_in_step()?;
        let epoch = self.progress.epoch;
        let lr = self.lrs[epoch];
        let (rank, world) = self.place.as_ref().map_or((0, 1), |pl| (pl.rank, pl.world));
        let mine = epoch_share(
            self.train_idx.len(),
            p.sampler_seed + epoch as u64,
            rank,
            world,
        )?;
        let per_rank = p.batch_size / world;
        let steps = mine.len().div_ceil(per_rank) as u64;
        let mut meters = Meters(std::mem::take(&mut self.progress.meters));
        self.set_training(p.finetune != Finetune::None);
        for step in self.progress.step..steps {
            let lo = step as usize * per_rank;
            let idx: Vec<usize> = mine[lo..(lo + per_rank).min(mine.len())]
                .iter()
                .map(|&j| self.train_idx[j])
                .collect();
            let global = epoch as u64 * steps + step + 1;
            let t0 = Instant::now();
            tch::manual_seed(seed_of(&[p.seed, epoch as u64, step, 0xd20]));
            let out = self.train_step(p, &idx, epoch, lr).map_err(|e| match e {
                Error::Data(m) => Error::Data(format!(
                    "epoch {epoch}, step {step} (global step {global}): {m}"
                )),
                e => e,
            })?;
            self.timing.train += t0.elapsed();
            self.timing.comm += out.comm;
            self.timing.steps += 1;
            self.timing.samples += (idx.len() * world) as u64;
            let out = out.metrics;
            let b = (idx.len() * world) as f64;
            for (name, v) in &out {
                meters.add(name, *v, b);
            }
            for name in ["base_loss", "base_acc"] {
                if let Some((_, v)) = out.iter().find(|(n, _)| n == name) {
                    self.progress.metrics.push((
                        epoch as u32,
                        global,
                        "train_step".into(),
                        name.into(),
                        *v,
                        lr,
                    ));
                }
            }
            self.progress.step = step + 1;
            if self.leader()
                && p.checkpoint_every_steps > 0
                && (step + 1) % p.checkpoint_every_steps == 0
                && step + 1 < steps
            {
                self.progress.meters = meters.0.clone();
                self.checkpoint()?;
            }
        }
        let global = (epoch as u64 + 1) * steps;
        if !self.leader() {
            // Validation, selection and checkpoints are rank 0's.
            self.progress.epoch = epoch + 1;
            self.progress.step = 0;
            return Ok(());
        }
        for (m, v) in meters.averages() {
            self.progress
                .metrics
                .push((epoch as u32, global, "train".into(), m, v, lr));
        }
        self.set_training(false);
        let mut epoch_rows: Vec<(String, String, f64)> = Vec::new();
        for (m, v) in self.validate(p)? {
            epoch_rows.push(("val".into(), m, v));
        }
        for (m, v) in self.score_templates(ctx)? {
            epoch_rows.push(("templates".into(), m, v));
        }
        for (split, m, v) in &epoch_rows {
            self.progress
                .metrics
                .push((epoch as u32, global, split.clone(), m.clone(), *v, lr));
        }
        let chosen = epoch_rows
            .iter()
            .find(|(s, m, _)| format!("{s}/{m}") == self.select_by)
            .map(|r| r.2);
        let value = chosen.ok_or_else(|| {
            Error::Data(format!(
                "select_by = {} was not measured in epoch {epoch} (is the validation split empty? val_drop_last drops a split smaller than batch_size)",
                self.select_by
            ))
        })?;
        let lower_better = self.select_by.ends_with("loss");
        let better = match self.progress.best {
            None => true,
            Some((b, _)) => {
                if lower_better {
                    value < b
                } else {
                    value > b
                }
            }
        };
        if better {
            self.progress.best = Some((value, epoch));
            self.save_best(ctx)?;
        }
        self.progress.epoch = epoch + 1;
        self.progress.step = 0;
        self.progress.meters.clear();
        self.checkpoint()?;
        Ok(())
    }

    fn train_step(
        &mut self,
        p: &TrainParams,
        idx: &[usize],
        epoch: usize,
        lr: f64,
    ) -> Result<StepOut> {
        let cfg = StepConfig {
            lamda: p.lamda,
            clip_grad_norm: p.clip_grad_norm,
            clip_before_unscale: p.clip_before_unscale,
            device: self.device,
            amp: self.amp,
        };
        let keys: Vec<[u64; 3]> = idx
            .iter()
            .map(|&i| [p.seed, epoch as u64, i as u64])
            .collect();
        let masks = self.combiner.sample_masks(&keys, self.device)?;
        let group = self.place.as_ref().map(|pl| pl.group.clone());
        let mut guard = match &group {
            Some(g) => Some(
                g.lock()
                    .map_err(|_| Error::Internal("process group lock".into()))?,
            ),
            None => None,
        };
        // The optimiser steps while the features read the rest of self.
        let mut opt = std::mem::replace(&mut self.opt, Optimizer::empty());
        let out = train_step(
            &cfg,
            &mut opt,
            &self.combiner,
            lr,
            Dropout::Masks(&masks),
            guard.as_deref_mut(),
            || self.features(p, idx, true, epoch),
        );
        self.opt = opt;
        out
    }

    /// Every rank resumed from the same point (rank 0's `last/`): a rank
    /// that read another checkpoint would train different batches.
    fn check_in_step(&mut self) -> Result<()> {
        let Some(pl) = &self.place else {
            return Ok(());
        };
        let here = [self.progress.epoch as i64, self.progress.step as i64];
        let mut t = Tensor::from_slice(&here);
        pl.group
            .lock()
            .map_err(|_| Error::Internal("process group lock".into()))?
            .broadcast(&mut t, 0)?;
        let root = Vec::<i64>::try_from(&t)?;
        if root != here {
            return Err(Error::Data(format!(
                "rank {} resumed at epoch {}, step {} but rank 0 at epoch {}, step {}: the ranks must share the workdir (rerun all ranks together)",
                pl.rank, here[0], here[1], root[0], root[1]
            )));
        }
        Ok(())
    }

    /// `val_one_epoch`: loss, accuracy and in-batch R@1/5/10 over the held
    /// out samples, in order, in eval mode.
    fn validate(&mut self, p: &TrainParams) -> Result<Vec<(String, f64)>> {
        let mut meters = Meters::default();
        let idx = self.val_idx.clone();
        let (device, amp) = (self.device, self.amp);
        for batch in idx.chunks(p.batch_size) {
            if p.val_drop_last && batch.len() < p.batch_size {
                break;
            }
            let b = batch.len() as i64;
            let m = tch::no_grad(|| {
                with_precision(device, amp, || -> Result<Vec<(String, f64)>> {
                    let (r, t, c) = self.features(p, batch, false, 0)?;
                    let combined = l2_normalize(&self.combiner.forward_t(&r, &c, Dropout::Off)?);
                    let logits =
                        (combined.matmul(&l2_normalize(&t).tr()) * p.lamda).to_kind(Kind::Float);
                    let labels = Tensor::arange(b, (Kind::Int64, logits.device()));
                    let loss = logits
                        .cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, -100, 0.0)
                        .double_value(&[]);
                    let acc = step::in_batch_accuracy(&logits, &labels);
                    // Rank of the diagonal: 1 + candidates scoring strictly more.
                    let diag = logits.diagonal(0, 0, 1).unsqueeze(1);
                    let ranks = Vec::<i64>::try_from(
                        logits.gt_tensor(&diag).sum_dim_intlist(
                            [1i64].as_slice(),
                            false,
                            Kind::Int64,
                        ) + 1,
                    )?;
                    let mut out = vec![("base_loss".to_string(), loss), ("base_acc".into(), acc)];
                    for k in [1i64, 5, 10] {
                        let hit = ranks.iter().filter(|&&r| r <= k).count() as f64;
                        out.push((format!("recall_at_{k}"), hit / b as f64));
                    }
                    Ok(out)
                })
            })?;
            for (name, v) in m {
                meters.add(&name, v, b as f64);
            }
        }
        Ok(meters.averages())
    }
}

/// This rank's positions in the epoch's shuffle, as PyTorch's
/// `DistributedSampler(shuffle=True)` gives them: `randperm(n)` from a
/// generator seeded with `seed` (the sampler's seed + epoch), padded with
/// its own start to a multiple of `world`, then every `world`-th from
/// `rank`. Rank r's batch s is then its share of the one-rank batch s.
fn epoch_share(n: usize, seed: u64, rank: usize, world: usize) -> Result<Vec<usize>> {
    tch::manual_seed(seed as i64);
    let perm = Vec::<i64>::try_from(Tensor::randperm(n as i64, (Kind::Int64, Device::Cpu)))?;
    let total = n.div_ceil(world) * world;
    Ok(perm
        .iter()
        .cycle()
        .take(total)
        .skip(rank)
        .step_by(world)
        .map(|&j| j as usize)
        .collect())
}

fn to_device(sd: &StateDict, device: Device) -> StateDict {
    StateDict {
        path: sd.path.clone(),
        tensors: sd
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.to_device(device)))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::epoch_share;

    /// Step s of W ranks (each taking batch / W of its share) covers the
    /// one-rank batch s; the shares pad to equal length as
    /// DistributedSampler pads (with the shuffle's own start).
    #[test]
    fn rank_shares_make_up_the_one_rank_batches() {
        let (n, batch) = (22usize, 8usize);
        let one = epoch_share(n, 5, 0, 1).unwrap();
        let mut sorted = one.clone();
        sorted.sort();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        let world = 2;
        let shares: Vec<Vec<usize>> = (0..world)
            .map(|r| epoch_share(n, 5, r, world).unwrap())
            .collect();
        for s in 0..n.div_ceil(batch) {
            let mut want = one[s * batch..((s + 1) * batch).min(n)].to_vec();
            let per = batch / world;
            let mut got: Vec<usize> = shares
                .iter()
                .flat_map(|sh| sh[s * per..((s + 1) * per).min(sh.len())].to_vec())
                .collect();
            want.sort();
            got.sort();
            assert_eq!(got, want, "step {s}");
        }
        // 22 over 3 ranks: 24 slots, the first two of the shuffle again.
        let three: Vec<Vec<usize>> = (0..3).map(|r| epoch_share(n, 5, r, 3).unwrap()).collect();
        assert!(three.iter().all(|s| s.len() == 8));
        assert_eq!(three[1][7], one[0]);
        assert_eq!(three[2][7], one[1]);
    }
}
