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

pub mod bench;
pub mod data;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};

use crate::error::{Error, Result};
use crate::eval::combiner_recalls;
use crate::framework::stage::{
    resolve_path, ChunkTables, Chunks, Finding, InputTable, Stage, StageContext, TableDef,
};
use crate::model::clip::{Clip, Vision};
use crate::model::combiner::{l2_normalize, Combiner, HIDDEN_DIM, PROJECTION_DIM};
use crate::model::optim::{clip_grad_norm, cosine_lrs, AdamW, GradScaler, Moments};
use crate::model::preprocess::{load_rgb, to_tensor, ImageKey, Mode, Raster};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::torch_save;
use crate::model::{select_device, with_precision, StateDict};
use crate::rng::Rng;
use crate::tables::embeddings::{read_embeddings, Embeddings};
use crate::tables::image_keys::{read_image_keys, read_texts, KeyRow};
use crate::tables::metrics::{metrics_batch, MetricRow, TRAIN_METRICS_SCHEMA};
use crate::tables::triplets::{Sample, Triplets};
use crate::tables::weights::{weights_batch, WEIGHTS_SCHEMA};
use data::{ImageCache, Meters};

/// Which CLIP weights train (`set_requires_grad_clip`). In every mode but
/// `none` CLIP runs in train mode, so a ResNet's BatchNorm uses batch
/// statistics even where its weights are frozen, as in the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finetune {
    /// Frozen backbone; features from an `embed` stage (cached mode).
    None,
    ImagePlusTextWhole,
    ImageOnlyWhole,
    TextOnlyWhole,
    /// The ResNet's attention pool and text block 11.
    ImagePlusText,
    /// The ResNet's attention pool.
    ImageOnly,
    /// The text transformer.
    TextOnly,
}

fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}

impl Finetune {
    fn trains(self, name: &str) -> bool {
        if is_buffer(name) {
            return false;
        }
        match self {
            Finetune::None => false,
            Finetune::ImagePlusTextWhole => true,
            Finetune::ImageOnlyWhole => name.starts_with("visual."),
            Finetune::TextOnlyWhole | Finetune::TextOnly => name.starts_with("transformer."),
            Finetune::ImageOnly => name.starts_with("visual.attnpool."),
            Finetune::ImagePlusText => {
                name.starts_with("visual.attnpool.")
                    || name.starts_with("transformer.resblocks.11.")
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    #[serde(default = "whole")]
    pub finetune: Finetune,
    /// The CLIP to start from (needed when fine-tuning).
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    /// A Combiner to start from instead of a fresh one.
    #[serde(default)]
    pub combiner: Option<PathBuf>,
    #[serde(default = "six")]
    pub epochs: usize,
    #[serde(default = "b256")]
    pub batch_size: usize,
    #[serde(default = "lr")]
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "betas")]
    pub betas: [f64; 2],
    #[serde(default = "eps")]
    pub eps: f64,
    /// 1 / temperature of the contrastive softmax.
    #[serde(default = "lamda")]
    pub lamda: f64,
    /// Seeds the Combiner's initialisation, dropout and crops.
    #[serde(default)]
    pub seed: u64,
    /// The shuffle's seed: the original's DistributedSampler uses its
    /// default 0 (plus the epoch), whatever `--seed` says.
    #[serde(default)]
    pub sampler_seed: u64,
    #[serde(default = "tenth")]
    pub val_fraction: f64,
    #[serde(default)]
    pub val_start_idx: usize,
    /// The val loader drops its last partial batch, as the original's.
    #[serde(default = "yes")]
    pub val_drop_last: bool,
    /// Max L2 norm of the CLIP gradients (0 turns clipping off).
    #[serde(default = "one")]
    pub clip_grad_norm: f64,
    /// The original clips the scaled gradients (before the GradScaler
    /// unscales them), so under AMP the effective bound is max_norm/scale.
    /// `false` unscales first, as PyTorch's AMP recipe says.
    #[serde(default = "yes")]
    pub clip_before_unscale: bool,
    /// Encode the distractor images (not in the loss; with a ResNet they
    /// shape BatchNorm's batch statistics).
    #[serde(default = "yes")]
    pub encode_distractors: bool,
    #[serde(default = "proj")]
    pub projection_dim: i64,
    #[serde(default = "hidden")]
    pub hidden_dim: i64,
    #[serde(default = "auto")]
    pub device: String,
    /// fp16 autocast with a GradScaler on a GPU (ignored on CPU).
    #[serde(default = "yes")]
    pub mixed_precision: bool,
    /// Also checkpoint every N steps inside an epoch (0: epoch ends only).
    #[serde(default)]
    pub checkpoint_every_steps: u64,
    /// `split/metric` that picks the best epoch: `templates/cirr_val/recall_at_1`
    /// (the original's), `templates/change_attribute/recall_at_1`,
    /// `val/recall_at_1`; `auto` takes the first of those available.
    #[serde(default = "auto")]
    pub select_by: String,
    /// Which model's embeddings (cached mode), when they hold several.
    #[serde(default)]
    pub model: Option<String>,
}

fn whole() -> Finetune {
    Finetune::ImagePlusTextWhole
}
fn six() -> usize {
    6
}
fn b256() -> usize {
    256
}
fn lr() -> f64 {
    1e-6
}
fn betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn eps() -> f64 {
    1e-8
}
fn lamda() -> f64 {
    100.0
}
fn tenth() -> f64 {
    0.1
}
fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}
fn proj() -> i64 {
    PROJECTION_DIM
}
fn hidden() -> i64 {
    HIDDEN_DIM
}
fn auto() -> String {
    "auto".into()
}

/// The resumable state besides tensors (`last/state.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Progress {
    /// The epoch being trained (== epochs when done).
    epoch: usize,
    /// Steps of `epoch` done.
    step: u64,
    scaler: Option<GradScaler>,
    /// AdamW's step count per parameter.
    steps: BTreeMap<String, u64>,
    /// This epoch's meter sums so far.
    meters: BTreeMap<String, (f64, f64)>,
    /// (value, epoch) of the best epoch so far.
    best: Option<(f64, usize)>,
    /// Every metric row so far.
    metrics: Vec<MetricRow>,
}

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

enum SelectionFeatures {
    Cached(Embeddings, Embeddings),
    Encode {
        keys: Vec<KeyRow>,
        texts: Vec<String>,
        cache: Option<ImageCache>,
    },
}

struct Selection {
    templates: PathBuf,
    galleries: Option<PathBuf>,
    features: SelectionFeatures,
}

struct Trainer {
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
    /// Counted while features are read through `&self`.
    images: std::cell::Cell<u64>,
    augment: std::cell::Cell<Duration>,
}

pub struct TrainWork(Mutex<Trainer>);

pub struct Train;

impl Stage for Train {
    const KIND: &'static str = "train";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str = "triplets (+ captions or embeddings, + templates) -> a trained Combiner (and CLIP): train_metrics, weights";
    type Params = TrainParams;
    type Work = TrainWork;

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

    fn validate(p: &TrainParams, _base: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut need = |ok: bool, f: &str, m: &str| {
            if !ok {
                out.push((f.to_string(), m.to_string()));
            }
        };
        need(p.epochs >= 1, "epochs", "must be at least 1");
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
            p.projection_dim >= 1 && p.hidden_dim >= 1,
            "projection_dim",
            "layer sizes must be positive",
        );
        need(
            p.finetune == Finetune::None || p.checkpoint.is_some(),
            "checkpoint",
            "fine-tuning needs the CLIP to start from: set params.checkpoint (or finetune = \"none\" with an embed stage's features)",
        );
        if let Err(m) = select_device(&p.device) {
            out.push(("device".into(), m));
        }
        if p.select_by != "auto"
            && !(p.select_by.starts_with("val/") || p.select_by.starts_with("templates/"))
        {
            out.push((
                "select_by".into(),
                "use auto, val/<metric> or templates/<task>/recall_at_<K>".into(),
            ));
        }
        out
    }

    fn validate_inputs(p: &TrainParams, tables: &[String]) -> Vec<(String, String)> {
        let has = |t: &str| tables.iter().any(|x| x == t);
        let mut out = Vec::new();
        if p.finetune == Finetune::None && !(has("image_embeddings") && has("text_embeddings")) {
            out.push((
                "finetune".into(),
                "finetune = \"none\" trains on cached features: list an embed stage (fed by the mine and ingest stages) in inputs".into(),
            ));
        }
        if p.finetune != Finetune::None && !has("captions") {
            out.push((
                "finetune".into(),
                "fine-tuning reads the images: list the ingest stage (its captions table, with image_path) in inputs".into(),
            ));
        }
        out
    }

    fn files(p: &TrainParams, base: &Path) -> Vec<(&'static str, PathBuf)> {
        let mut f = Vec::new();
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
        if let Some(c) = &p.checkpoint {
            if let Err(e) = StateDict::load(&resolve_path(base, c), Device::Cpu).and_then(Clip::new)
            {
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

    fn plan(p: &TrainParams, ctx: &StageContext) -> Result<Chunks<TrainWork>> {
        let t = Trainer::new(p, ctx)?;
        let n_train = t.train_idx.len() as u64;
        let mut sizes = vec![n_train; p.epochs];
        sizes.push(0);
        Ok(Chunks {
            work: TrainWork(Mutex::new(t)),
            sizes,
            unit: "samples",
            parallel: false,
            width: None,
        })
    }

    fn run_chunk(
        p: &TrainParams,
        w: &TrainWork,
        k: usize,
        ctx: &StageContext,
    ) -> Result<Option<ChunkTables>> {
        let mut t = w.0.lock().unwrap_or_else(|e| e.into_inner());
        if k == p.epochs {
            let weights = t.weights_rows(p, ctx)?;
            return Ok(Some(vec![
                ("train_metrics", metrics_batch(&[])?),
                ("weights", weights),
            ]));
        }
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
        Ok(Some(vec![
            ("train_metrics", metrics_batch(&rows)?),
            ("weights", weights_batch(&[])?),
        ]))
    }

    fn finish(_p: &TrainParams, w: TrainWork, ctx: &StageContext) -> Result<()> {
        let t = w.0.into_inner().unwrap_or_else(|e| e.into_inner());
        let tm = &t.timing;
        if tm.steps > 0 {
            let secs = tm.train.as_secs_f64().max(1e-9);
            ctx.note(format!(
                "{} steps, {} samples in {secs:.2} s: {:.2} steps/s, {:.1} samples/s on {:?}",
                tm.steps,
                tm.samples,
                tm.steps as f64 / secs,
                tm.samples as f64 / secs,
                t.device
            ));
        }
        let (images, augment) = (tm.images.get(), tm.augment.get().as_secs_f64());
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
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The stage that made an input table (its folder's parent).
fn stage_of(dir: &Path) -> String {
    dir.parent()
        .and_then(|p| p.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "embed".into())
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
            stage_of(dir)
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
        let device = select_device(&p.device).map_err(Error::Data)?;
        let amp = p.mixed_precision && device.is_cuda();
        let data = crate::tables::triplets::read_triplets(ctx.input("triplets")?)?;
        let (train_idx, val_idx) =
            data::split(data.samples.len(), p.val_fraction, p.val_start_idx)?;
        tch::manual_seed(p.seed as i64);
        let mut clip = match (&p.checkpoint, p.finetune) {
            (Some(c), f) if f != Finetune::None => {
                Some(Clip::new(StateDict::load(&ctx.resolve(c), device)?)?)
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
            if p.finetune == Finetune::ImagePlusText && c.config.transformer_layers < 12 {
                return Err(Error::Data(format!(
                    "finetune = image_plus_text trains text block 11, but the text transformer has {} blocks",
                    c.config.transformer_layers
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

    /// What selection scores: the cached embeddings, or in fine-tune modes
    /// the templates' images and texts, encoded each epoch.
    fn selection(
        ctx: &StageContext,
        cached: Option<(Embeddings, Embeddings)>,
    ) -> Result<Option<Selection>> {
        let Some(templates) = ctx.optional_input("templates") else {
            return Ok(None);
        };
        let features = match cached {
            Some((img, txt)) => SelectionFeatures::Cached(img, txt),
            None => {
                let Some(keys) = ctx.optional_input("image_keys") else {
                    return Err(Error::Data(
                        "selecting on templates while fine-tuning encodes their images: the templates stage's image_keys must be an input too".into(),
                    ));
                };
                let texts = match ctx.optional_input("texts") {
                    Some(d) => read_texts(d, "text")?,
                    None => Vec::new(),
                };
                SelectionFeatures::Encode {
                    keys: read_image_keys(keys)?,
                    texts,
                    cache: None,
                }
            }
        };
        Ok(Some(Selection {
            templates: templates.to_path_buf(),
            galleries: ctx.optional_input("galleries").map(Path::to_path_buf),
            features,
        }))
    }

    fn resolve_select_by(p: &TrainParams, sel: Option<&Selection>) -> Result<String> {
        let tasks: Vec<String> = match sel {
            Some(s) => read_texts(&s.templates, "task")?,
            None => Vec::new(),
        };
        let local = tasks
            .iter()
            .filter(|t| !t.starts_with("cirr") && !t.starts_with("mit_states"))
            .count();
        if p.select_by == "auto" {
            return Ok(if tasks.iter().any(|t| t == "cirr_val") {
                "templates/cirr_val/recall_at_1".into()
            } else if local > 1 {
                "templates/average/recall_at_1".into()
            } else if let Some(t) = tasks.first() {
                format!("templates/{t}/recall_at_1")
            } else {
                "val/recall_at_1".into()
            });
        }
        if let Some(rest) = p.select_by.strip_prefix("templates/") {
            let task = rest.split('/').next().unwrap_or("");
            if !(tasks.iter().any(|t| t == task) || (task == "average" && local > 1)) {
                return Err(Error::Data(format!(
                    "select_by = {}: the templates input has no task '{task}' (it has: {})",
                    p.select_by,
                    if tasks.is_empty() {
                        "no templates input".to_string()
                    } else {
                        tasks.join(", ")
                    }
                )));
            }
        }
        Ok(p.select_by.clone())
    }

    /// Restores `last/` (or `last.old/`, when a swap was interrupted);
    /// false when there is nothing to resume.
    fn resume(&mut self) -> Result<bool> {
        let dir = if self.last_dir.join("state.json").is_file() {
            self.last_dir.clone()
        } else {
            let old = self.last_dir.with_file_name("last.old");
            if old.join("state.json").is_file() {
                old
            } else {
                return Ok(false);
            }
        };
        let bad = |m: String| {
            Error::Data(format!(
                "cannot resume from {}: {m}. Delete that folder to restart the stage",
                dir.display()
            ))
        };
        let text =
            std::fs::read_to_string(dir.join("state.json")).map_err(|e| bad(e.to_string()))?;
        let progress: Progress = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let load = |f: &str| -> Result<HashMap<String, Tensor>> {
            Ok(crate::model::torch_pickle::read_state_dict(&dir.join(f))
                .map_err(bad)?
                .into_iter()
                .collect())
        };
        let copy_into = |dst: &Tensor, src: &Tensor| -> Result<()> {
            let mut d = dst.shallow_clone();
            tch::no_grad(|| d.f_copy_(&src.to_kind(d.kind())))?;
            Ok(())
        };
        let comb = load("combiner.pt")?;
        for (n, t) in &self.combiner.weights().tensors {
            copy_into(
                t,
                comb.get(n)
                    .ok_or_else(|| bad(format!("combiner.pt lacks {n}")))?,
            )?;
        }
        if let Some(c) = &self.clip {
            let bb = load("backbone.pt")?;
            for (n, t) in &c.weights().tensors {
                copy_into(
                    t,
                    bb.get(n)
                        .ok_or_else(|| bad(format!("backbone.pt lacks {n}")))?,
                )?;
            }
        }
        let opt = if progress.steps.is_empty() {
            HashMap::new()
        } else {
            load("optimizer.pt")?
        };
        self.opt.adamw.state.clear();
        for (name, &step) in &progress.steps {
            let get = |k: String| -> Result<Tensor> {
                Ok(opt
                    .get(&k)
                    .ok_or_else(|| bad(format!("optimizer.pt lacks {k}")))?
                    .to_device(self.device))
            };
            self.opt.adamw.state.insert(
                name.clone(),
                Moments {
                    step,
                    exp_avg: get(format!("exp_avg.{name}"))?,
                    exp_avg_sq: get(format!("exp_avg_sq.{name}"))?,
                },
            );
        }
        if let Some(s) = &progress.scaler {
            self.opt.scaler = s.clone();
        }
        self.progress = progress;
        Ok(true)
    }

    /// Writes `last/` atomically: a new folder swapped in.
    fn checkpoint(&mut self) -> Result<()> {
        let new = self.last_dir.with_file_name("last.new");
        let old = self.last_dir.with_file_name("last.old");
        let _ = std::fs::remove_dir_all(&new);
        std::fs::create_dir_all(&new).map_err(Error::io("cannot create", &new))?;
        let save = |name: &str, sd: &[(String, Tensor)]| -> Result<()> {
            torch_save::save_state_dict(&new.join(name), sd)
                .map_err(|m| Error::Data(format!("cannot write {}: {m}", new.join(name).display())))
        };
        save("combiner.pt", &self.combiner_state())?;
        if self.clip.is_some() {
            save("backbone.pt", &self.backbone_state())?;
        }
        let mut opt = Vec::new();
        for (n, m) in &self.opt.adamw.state {
            opt.push((format!("exp_avg.{n}"), m.exp_avg.shallow_clone()));
            opt.push((format!("exp_avg_sq.{n}"), m.exp_avg_sq.shallow_clone()));
        }
        if !opt.is_empty() {
            save("optimizer.pt", &opt)?;
        }
        self.progress.scaler = Some(self.opt.scaler.clone());
        self.progress.steps = self
            .opt
            .adamw
            .state
            .iter()
            .map(|(n, m)| (n.clone(), m.step))
            .collect();
        let json = serde_json::to_vec(&self.progress)
            .map_err(|e| Error::Internal(format!("train state: {e}")))?;
        crate::framework::store::write_atomic(&new.join("state.json"), &json)?;
        let _ = std::fs::remove_dir_all(&old);
        if self.last_dir.exists() {
            std::fs::rename(&self.last_dir, &old)
                .map_err(Error::io("cannot move", &self.last_dir))?;
        }
        std::fs::rename(&new, &self.last_dir).map_err(Error::io("cannot move", &new))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    fn combiner_state(&self) -> Vec<(String, Tensor)> {
        Combiner::names()
            .into_iter()
            .filter_map(|n| {
                let t = self.combiner.weights().tensors.get(&n)?.detach();
                Some((n, t))
            })
            .collect()
    }

    /// CLIP's state dict as `build_model` loads it (BatchNorm counters as
    /// int64).
    fn backbone_state(&self) -> Vec<(String, Tensor)> {
        let Some(c) = &self.clip else {
            return Vec::new();
        };
        let mut v: Vec<(String, Tensor)> = c
            .weights()
            .tensors
            .iter()
            .map(|(k, t)| {
                let t = if k.ends_with("num_batches_tracked") {
                    t.to_kind(Kind::Int64)
                } else {
                    t.detach()
                };
                (k.clone(), t)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn ensure_caches(&mut self, p: &TrainParams) -> Result<()> {
        let n_px = self.n_px;
        let dir = self.cache_dir.clone();
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
            if val_cache.is_none() && !self.val_idx.is_empty() {
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
            if cache.is_none() {
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
                    Ok(Raster {
                        width: img.width(),
                        height: img.height(),
                        mode: Mode::Rgb,
                        data: img.into_raw(),
                    })
                })?);
            }
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
            t.images.set(t.images.get() + rows.len() as u64);
            t.augment.set(t.augment.get() + t0.elapsed());
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
        self.ensure_caches(p)?;
        let epoch = self.progress.epoch;
        let lr = self.lrs[epoch];
        let n = self.train_idx.len();
        let steps = n.div_ceil(p.batch_size) as u64;
        // DistributedSampler(shuffle=True) on one replica:
        // randperm(n, generator seeded with seed + epoch).
        tch::manual_seed((p.sampler_seed + epoch as u64) as i64);
        let perm = Vec::<i64>::try_from(Tensor::randperm(n as i64, (Kind::Int64, Device::Cpu)))?;
        let mut meters = Meters(std::mem::take(&mut self.progress.meters));
        self.set_training(p.finetune != Finetune::None);
        for step in self.progress.step..steps {
            let lo = step as usize * p.batch_size;
            let idx: Vec<usize> = perm[lo..(lo + p.batch_size).min(n)]
                .iter()
                .map(|&j| self.train_idx[j as usize])
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
            self.timing.steps += 1;
            self.timing.samples += idx.len() as u64;
            let b = idx.len() as f64;
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
            if p.checkpoint_every_steps > 0
                && (step + 1) % p.checkpoint_every_steps == 0
                && step + 1 < steps
            {
                self.progress.meters = meters.0.clone();
                self.checkpoint()?;
            }
        }
        let global = (epoch as u64 + 1) * steps;
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
    ) -> Result<Vec<(String, f64)>> {
        let cfg = StepConfig {
            lamda: p.lamda,
            clip_grad_norm: p.clip_grad_norm,
            clip_before_unscale: p.clip_before_unscale,
            dropout: true,
            device: self.device,
            amp: self.amp,
        };
        // The optimiser steps while the features read the rest of self.
        let mut opt = std::mem::replace(&mut self.opt, Optimizer::empty());
        let out = train_step(&cfg, &mut opt, &self.combiner, lr, || {
            self.features(p, idx, true, epoch)
        });
        self.opt = opt;
        out
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
                    let combined = l2_normalize(&self.combiner.forward_t(&r, &c, false)?);
                    let logits =
                        (combined.matmul(&l2_normalize(&t).tr()) * p.lamda).to_kind(Kind::Float);
                    let labels = Tensor::arange(b, (Kind::Int64, logits.device()));
                    let loss = logits
                        .cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, -100, 0.0)
                        .double_value(&[]);
                    let acc = logits
                        .argmax(-1, false)
                        .eq_tensor(&labels)
                        .to_kind(Kind::Float)
                        .mean(Kind::Float)
                        .double_value(&[]);
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

    /// Recalls of the current weights on the templates input.
    fn score_templates(&mut self, ctx: &StageContext) -> Result<Vec<(String, f64)>> {
        let Some(sel) = &self.selection else {
            return Ok(Vec::new());
        };
        let device = self.device;
        let recalls = match &sel.features {
            SelectionFeatures::Cached(img, txt) => combiner_recalls(
                &sel.templates,
                sel.galleries.as_deref(),
                img,
                txt,
                &self.combiner,
                device,
                ctx.stage,
            )?,
            SelectionFeatures::Encode { keys, texts, cache } => {
                let clip = self
                    .clip
                    .as_ref()
                    .ok_or_else(|| Error::Internal("encoding templates without a CLIP".into()))?;
                let cache = cache
                    .as_ref()
                    .ok_or_else(|| Error::Internal("template cache not built".into()))?;
                let d = self.dim as usize;
                let mut ivals = Vec::with_capacity(keys.len() * d);
                let key_names: Vec<String> = keys.iter().map(|k| k.key.clone()).collect();
                for lo in (0..keys.len()).step_by(256) {
                    let hi = (lo + 256).min(keys.len());
                    let imgs: Vec<Tensor> = (lo..hi)
                        .map(|i| {
                            let r = cache.get(i)?;
                            let rgb = image::RgbImage::from_raw(r.width, r.height, r.data)
                                .ok_or_else(|| Error::Internal("cached image size".into()))?;
                            Ok(to_tensor(&rgb))
                        })
                        .collect::<Result<_>>()?;
                    let x = Tensor::stack(&imgs, 0).to_device(device);
                    let f = tch::no_grad(|| {
                        with_precision(device, self.amp, || clip.encode_image(&x))
                    })?;
                    ivals.extend(crate::tables::embeddings::tensor_rows(&f)?);
                }
                let tok = ClipTokenizer::new(clip.config.context_length as usize);
                let mut tvals = Vec::with_capacity(texts.len() * d);
                for chunk in texts.chunks(256) {
                    let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                    let toks = tok.batch(&refs).to_device(device);
                    let f = tch::no_grad(|| {
                        with_precision(device, self.amp, || clip.encode_text(&toks))
                    })?;
                    tvals.extend(crate::tables::embeddings::tensor_rows(&f)?);
                }
                let img = Embeddings::new(&key_names, ivals, d);
                let txt = Embeddings::new(texts, tvals, d);
                combiner_recalls(
                    &sel.templates,
                    sel.galleries.as_deref(),
                    &img,
                    &txt,
                    &self.combiner,
                    device,
                    ctx.stage,
                )?
            }
        };
        let mut out = Vec::new();
        for r in recalls {
            for (k, v) in crate::eval::KS.iter().zip(r.at) {
                out.push((format!("{}/recall_at_{k}", r.task), v));
            }
        }
        Ok(out)
    }

    fn save_best(&self, ctx: &StageContext) -> Result<()> {
        let w = |name: &str, sd: &[(String, Tensor)]| -> Result<()> {
            let path = ctx.work_dir.join(name);
            torch_save::save_state_dict(&path, sd)
                .map_err(|m| Error::Data(format!("cannot write {}: {m}", path.display())))
        };
        let comb = self.combiner_state();
        w("combiner_head.pt", &comb)?;
        let refs: Vec<(&str, &Tensor)> = comb.iter().map(|(k, t)| (k.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, ctx.work_dir.join("combiner_head.safetensors"))?;
        if self.clip.is_some() {
            w("backbone.pt", &self.backbone_state())?;
        }
        Ok(())
    }

    fn weights_rows(&self, _p: &TrainParams, ctx: &StageContext) -> Result<RecordBatch> {
        let Some((value, epoch)) = self.progress.best else {
            return Err(Error::Internal(
                "training finished without a best epoch".into(),
            ));
        };
        let mut rows = Vec::new();
        let mut files = vec![
            ("combiner", "combiner_head.pt", "torch"),
            (
                "combiner_safetensors",
                "combiner_head.safetensors",
                "safetensors",
            ),
        ];
        if self.clip.is_some() {
            files.push(("backbone", "backbone.pt", "torch"));
        }
        for (role, file, format) in files {
            let path = ctx.work_dir.join(file);
            let bytes = std::fs::metadata(&path)
                .map_err(Error::io("cannot read", &path))?
                .len();
            rows.push((
                role.to_string(),
                file.to_string(),
                format.to_string(),
                bytes,
                epoch as u32,
                self.select_by.clone(),
                value,
            ));
        }
        weights_batch(&rows)
    }
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

/// The trainable tensors and the optimiser's state.
pub struct Optimizer {
    /// The Combiner's (`combiner.*`) first, then CLIP's (`clip.*`).
    pub params: Vec<(String, Tensor)>,
    pub n_combiner: usize,
    pub adamw: AdamW,
    pub scaler: GradScaler,
}

impl Optimizer {
    /// One AdamW group over the Combiner and the CLIP weights `finetune`
    /// trains (which get `requires_grad`).
    pub fn new(
        combiner: &Combiner,
        clip: Option<&Clip>,
        finetune: Finetune,
        adamw: AdamW,
        scaler: GradScaler,
    ) -> Optimizer {
        let mut params: Vec<(String, Tensor)> = Vec::new();
        for n in Combiner::names() {
            if let Some(t) = combiner.weights().tensors.get(&n) {
                params.push((format!("combiner.{n}"), t.shallow_clone()));
            }
        }
        let n_combiner = params.len();
        if let Some(c) = clip {
            let mut names: Vec<&String> = c.weights().tensors.keys().collect();
            names.sort();
            for n in names {
                if finetune.trains(n) {
                    params.push((format!("clip.{n}"), c.weights().tensors[n].shallow_clone()));
                }
            }
        }
        for (_, t) in &mut params {
            let _ = t.set_requires_grad(true);
        }
        Optimizer {
            params,
            n_combiner,
            adamw,
            scaler,
        }
    }

    fn empty() -> Optimizer {
        Optimizer {
            params: Vec::new(),
            n_combiner: 0,
            adamw: AdamW::new((0.9, 0.999), 1e-8, 0.0),
            scaler: GradScaler::new(false),
        }
    }
}

/// What one step needs besides the weights.
pub struct StepConfig {
    pub lamda: f64,
    pub clip_grad_norm: f64,
    pub clip_before_unscale: bool,
    /// The Combiner's dropout (training); off for parity checks.
    pub dropout: bool,
    pub device: Device,
    pub amp: bool,
}

/// The original's `train_one_epoch` body for one batch: `features` gives
/// (reference, target, condition) features (CLIP runs inside it), then the
/// contrastive loss, backward, clipping, loss scaling and AdamW. Returns
/// the batch's meters (loss, accuracy, combiner-feature distances).
pub fn train_step(
    cfg: &StepConfig,
    opt: &mut Optimizer,
    combiner: &Combiner,
    lr: f64,
    features: impl FnOnce() -> Result<(Tensor, Tensor, Tensor)>,
) -> Result<Vec<(String, f64)>> {
    let (loss, metrics) = with_precision(
        cfg.device,
        cfg.amp,
        || -> Result<(Tensor, Vec<(String, f64)>)> {
            let (r, t, c) = features()?;
            let b = r.size()[0];
            let combined = l2_normalize(&combiner.forward_t(&r, &c, cfg.dropout)?);
            let target = l2_normalize(&t);
            let logits = combined.matmul(&target.tr()) * cfg.lamda;
            let labels = Tensor::arange(b, (Kind::Int64, logits.device()));
            let loss =
                logits.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, -100, 0.0);
            let m = tch::no_grad(|| -> Result<Vec<(String, f64)>> {
                let acc = logits
                    .argmax(-1, false)
                    .eq_tensor(&labels)
                    .to_kind(Kind::Float)
                    .mean(Kind::Float)
                    .double_value(&[]);
                let img_d = l2_normalize(&r)
                    .matmul(&combined.tr())
                    .mean(Kind::Float)
                    .double_value(&[]);
                let txt_d = l2_normalize(&c)
                    .matmul(&combined.tr())
                    .mean(Kind::Float)
                    .double_value(&[]);
                Ok(vec![
                    ("base_loss".into(), loss.double_value(&[])),
                    ("base_acc".into(), acc),
                    ("combiner_text_feat_dist".into(), txt_d),
                    ("combiner_image_feat_dist".into(), img_d),
                ])
            })?;
            Ok((loss, m))
        },
    )?;
    let lv = metrics[0].1;
    if !opt.scaler.enabled && !lv.is_finite() {
        return Err(Error::Data(format!(
            "the loss is {lv} without mixed precision; lower lr, or check the embeddings for NaN"
        )));
    }
    let scaled = loss.to_kind(Kind::Float) * opt.scaler.factor();
    let inputs: Vec<&Tensor> = opt.params.iter().map(|(_, t)| t).collect();
    let grads = Tensor::f_run_backward(&[&scaled], &inputs, false, false)?;
    let mut grads: Vec<Option<Tensor>> = grads
        .into_iter()
        .map(|g| g.defined().then_some(g))
        .collect();
    let nc = opt.n_combiner;
    let clip = |g: &mut [Option<Tensor>]| -> Result<()> {
        if cfg.clip_grad_norm > 0.0 {
            clip_grad_norm(g, cfg.clip_grad_norm)?;
        }
        Ok(())
    };
    let found_inf = if cfg.clip_before_unscale {
        clip(&mut grads[nc..])?;
        opt.scaler.unscale(&mut grads)?
    } else {
        let f = opt.scaler.unscale(&mut grads)?;
        clip(&mut grads[nc..])?;
        f
    };
    if !found_inf {
        opt.adamw.step(lr, &opt.params, &grads)?;
    }
    opt.scaler.update(found_inf);
    Ok(metrics)
}

#[cfg(test)]
mod tests {
    use super::Finetune;

    #[test]
    fn finetune_modes_train_what_set_requires_grad_clip_sets() {
        let names = [
            "visual.conv1.weight",
            "visual.attnpool.q_proj.weight",
            "visual.layer1.0.bn1.running_mean",
            "transformer.resblocks.0.attn.in_proj_weight",
            "transformer.resblocks.11.mlp.c_fc.weight",
            "token_embedding.weight",
        ];
        let trains = |m: Finetune| -> Vec<bool> { names.iter().map(|n| m.trains(n)).collect() };
        assert_eq!(trains(Finetune::None), [false; 6]);
        assert_eq!(
            trains(Finetune::ImagePlusTextWhole),
            [true, true, false, true, true, true]
        );
        assert_eq!(
            trains(Finetune::ImageOnlyWhole),
            [true, true, false, false, false, false]
        );
        assert_eq!(
            trains(Finetune::TextOnlyWhole),
            [false, false, false, true, true, false]
        );
        assert_eq!(
            trains(Finetune::TextOnly),
            [false, false, false, true, true, false]
        );
        assert_eq!(
            trains(Finetune::ImageOnly),
            [false, true, false, false, false, false]
        );
        assert_eq!(
            trains(Finetune::ImagePlusText),
            [false, true, false, false, true, false]
        );
    }
}
