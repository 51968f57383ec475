//! `pretrain`: a tiny CLIP, trained here, contrastively, on a captions
//! table's images and captions (the demo's stand-in for OpenAI's weights,
//! which cannot be downloaded). A ViT or ModifiedResNet image tower and a
//! Transformer text tower over CLIP's BPE tokens, initialised as OpenAI's
//! `initialize_parameters` does and written in OpenAI's state-dict layout
//! (`clip.pt`), so `embed` and `train` load it as they load a real
//! checkpoint: a `weights` table (role `backbone`) points at it.
//!
//! Tables:
//! - `pretrain_metrics(epoch, step, split, metric, value, lr)`: the
//!   symmetric contrastive loss and in-batch image->text and text->image
//!   accuracy, per epoch, on the training pairs and a held-out tenth;
//! - `weights(role, file, format, bytes, epoch, select_by, value)`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};

use crate::error::{Error, Result};
use crate::framework::stage::{
    ChunkTables, Chunks, Finding, InputTable, Stage, StageContext, TableDef,
};
use crate::model::clip::Clip;
use crate::model::init::{init_weights, ClipInit};
use crate::model::optim::AdamW;
use crate::model::preprocess::{load_batch, ImageKey};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::{select_device, StateDict};
use crate::tables::captions::read_captions;
use crate::tables::metrics::MetricRow;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct PretrainParams {
    pub seed: u64,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Share of the steps over which lr rises linearly from 0 (then cosine
    /// decay): without it a tiny ViT at lr 1e-3 often stalls at chance.
    pub warmup: f64,
    /// Input side; the images are resized and centre-cropped to it.
    pub image_resolution: i64,
    /// The image tower: "vit" (patch_size, width, vision_layers) or
    /// "resnet" (OpenAI's ModifiedResNet, one bottleneck per stage, of
    /// resnet_width): convolutions pick up shape from little data.
    pub vision: String,
    pub resnet_width: i64,
    pub patch_size: i64,
    /// Width of both towers (heads = width / 64, as build_model infers).
    pub width: i64,
    pub vision_layers: i64,
    pub text_layers: i64,
    pub embed_dim: i64,
    pub context_length: i64,
    /// Share of the training pairs drawn into hard-negative groups each
    /// epoch: `hard_group` nearest neighbours in the current model's
    /// `hard_space` embedding ("image" or "text") sit in one batch, so the
    /// towers must separate look-alikes that random batches almost never
    /// pit against each other (in the demo world: shape, once colour and
    /// background are learned). 0 keeps plain random batches.
    pub hard_batches: f64,
    pub hard_group: usize,
    pub hard_space: String,
    pub device: String,
}

impl Default for PretrainParams {
    /// The defaults of every param, in one place.
    fn default() -> Self {
        PretrainParams {
            seed: Default::default(),
            epochs: 12,
            batch_size: 128,
            lr: 1e-3,
            warmup: 0.1,
            image_resolution: 64,
            vision: "vit".into(),
            resnet_width: 16,
            patch_size: 8,
            width: 64,
            vision_layers: 3,
            text_layers: 3,
            embed_dim: 64,
            context_length: 32,
            hard_batches: Default::default(),
            hard_group: 8,
            hard_space: "image".into(),
            device: "auto".into(),
        }
    }
}

impl PretrainParams {
    fn clip_init(&self) -> ClipInit {
        ClipInit {
            resnet: self.vision == "resnet",
            resnet_width: self.resnet_width,
            patch_size: self.patch_size,
            vision_layers: self.vision_layers,
            width: self.width,
            text_layers: self.text_layers,
            embed_dim: self.embed_dim,
            image_resolution: self.image_resolution,
            context_length: self.context_length,
        }
    }
}

/// Symmetric InfoNCE over a batch: (loss, image->text acc, text->image acc).
/// Pairs whose captions tokenise identically are not negatives of each
/// other: their logits are masked out.
fn clip_loss(
    img: &Tensor,
    txt: &Tensor,
    tokens: &Tensor,
    logit_scale: &Tensor,
) -> (Tensor, f64, f64) {
    let i = crate::model::combiner::l2_normalize(img);
    let t = crate::model::combiner::l2_normalize(txt);
    let n = tokens.size()[0];
    let same = tokens
        .unsqueeze(1)
        .eq_tensor(&tokens.unsqueeze(0))
        .all_dims(&[-1i64][..], false)
        .logical_and(&Tensor::eye(n, (Kind::Bool, tokens.device())).logical_not());
    let logits = (i.matmul(&t.tr()) * logit_scale.exp().clamp_max(100.0))
        .masked_fill(&same, f64::NEG_INFINITY);
    let labels = Tensor::arange(logits.size()[0], (Kind::Int64, logits.device()));
    let ce = |l: &Tensor| l.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, -100, 0.0);
    let loss = (ce(&logits) + ce(&logits.tr())) / 2.0;
    let acc = |l: &Tensor| {
        l.argmax(-1, false)
            .eq_tensor(&labels)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[])
    };
    let (a1, a2) = tch::no_grad(|| (acc(&logits), acc(&logits.tr())));
    (loss, a1, a2)
}

/// `clip_loss` over the pairs at `idx`.
fn pairs_loss(
    clip: &Clip,
    images: &Tensor,
    tokens: &Tensor,
    idx: &Tensor,
    scale: &Tensor,
) -> Result<(Tensor, f64, f64)> {
    let tok = tokens.index_select(0, idx);
    Ok(clip_loss(
        &clip.encode_image(&images.index_select(0, idx))?,
        &clip.encode_text(&tok)?,
        &tok,
        scale,
    ))
}

/// An epoch's order of the training pairs: a `share` of them, taken in
/// random anchor order, each with its `group - 1` nearest unassigned
/// neighbours in `emb` (rows L2-normalised), kept together as groups; the
/// rest as single pairs; groups and singles then shuffled as units, so a
/// batch holds a few neighbourhoods and random pairs around them.
fn hard_order(emb: &Tensor, share: f64, group: usize) -> Result<Tensor> {
    let n = emb.size()[0];
    let device = emb.device();
    let anchors = Vec::<i64>::try_from(Tensor::randperm(n, (Kind::Int64, device)))?;
    let mut taken = vec![false; n as usize];
    let mut free = Tensor::zeros([n], (Kind::Float, device));
    let mut units: Vec<Vec<i64>> = Vec::new();
    let mut grouped = 0usize;
    let target = (share * n as f64).round() as usize;
    for &a in &anchors {
        if grouped >= target {
            break;
        }
        if taken[a as usize] {
            continue;
        }
        let left = n as usize - grouped;
        let k = group.min(left).min(target - grouped).max(1) as i64;
        let sims = emb.mv(&emb.get(a)) + &free;
        let (_, top) = sims.topk(k, 0, true, true);
        let mut members = vec![a];
        for i in Vec::<i64>::try_from(top)? {
            if i != a && members.len() < k as usize && !taken[i as usize] {
                members.push(i);
            }
        }
        for &i in &members {
            taken[i as usize] = true;
        }
        let idx = Tensor::from_slice(&members).to_device(device);
        free = free.index_fill(0, &idx, f64::NEG_INFINITY);
        grouped += members.len();
        units.push(members);
    }
    units.extend(
        anchors
            .iter()
            .filter(|&&i| !taken[i as usize])
            .map(|&i| vec![i]),
    );
    let order = Vec::<i64>::try_from(Tensor::randperm(
        units.len() as i64,
        (Kind::Int64, Device::Cpu),
    ))?;
    let flat: Vec<i64> = order
        .iter()
        .flat_map(|&u| units[u as usize].iter().copied())
        .collect();
    Ok(Tensor::from_slice(&flat).to_device(device))
}

pub(crate) struct Pretrain;

impl Stage for Pretrain {
    const KIND: &'static str = "pretrain";
    const VERSION: &'static str = "3";
    const ABOUT: &'static str =
        "captions (with images) -> a tiny CLIP trained contrastively (clip.pt, OpenAI's layout): pretrain_metrics, weights";
    type Params = PretrainParams;
    type Work = ();

    fn input_tables() -> &'static [InputTable] {
        const INPUTS: &[InputTable] = &[InputTable::required("captions")];
        INPUTS
    }

    fn output_tables() -> Vec<TableDef> {
        vec![
            TableDef::new(
                "pretrain_metrics",
                crate::tables::metrics::TRAIN_METRICS_SCHEMA.clone(),
            ),
            TableDef::new("weights", crate::tables::weights::WEIGHTS_SCHEMA.clone()),
        ]
    }

    fn validate(p: &PretrainParams, _base: &Path) -> Vec<Finding> {
        let mut out = Vec::new();
        // Sizes a tensor is drawn with: positive, and small enough to be a
        // model rather than an allocation failure.
        for (field, v, max) in [
            ("width", p.width, 4096),
            ("embed_dim", p.embed_dim, 4096),
            ("resnet_width", p.resnet_width, 1024),
            ("vision_layers", p.vision_layers, 64),
            ("text_layers", p.text_layers, 64),
            ("image_resolution", p.image_resolution, 1024),
            ("patch_size", p.patch_size, 1024),
            ("context_length", p.context_length, 77),
        ] {
            if !(1..=max).contains(&v) {
                out.push(Finding::error(field, format!("{v}: use 1 to {max}")));
            }
        }
        if p.batch_size > 1 << 20 || p.epochs > 100_000 {
            out.push(Finding::error(
                "batch_size",
                "batch_size at most 1,048,576 and epochs at most 100,000",
            ));
        }
        if p.width % 64 != 0 || p.width == 0 {
            out.push(Finding::error(
                "width",
                "must be a multiple of 64 (heads = width / 64)",
            ));
        }
        if p.vision != "vit" && p.vision != "resnet" {
            out.push(Finding::error(
                "vision",
                format!("{:?}: use \"vit\" or \"resnet\"", p.vision),
            ));
        }
        if p.vision == "resnet"
            && (p.resnet_width < 2 || p.resnet_width % 2 != 0 || p.image_resolution % 32 != 0)
        {
            out.push(Finding::error(
                "resnet_width",
                "an even width of 2 or more, and image_resolution a multiple of 32",
            ));
        }
        if p.patch_size <= 0 || p.image_resolution % p.patch_size != 0 {
            out.push(Finding::error("patch_size", "must divide image_resolution"));
        }
        if p.epochs == 0 || p.batch_size < 2 {
            out.push(Finding::error(
                "batch_size",
                "epochs >= 1 and batch_size >= 2",
            ));
        }
        if !(0.0..1.0).contains(&p.warmup) {
            out.push(Finding::error(
                "warmup",
                "must be a share of the steps in [0, 1)",
            ));
        }
        if !(0.0..=1.0).contains(&p.hard_batches) || p.hard_group < 2 {
            out.push(Finding::error(
                "hard_batches",
                "a share in [0, 1], with hard_group >= 2",
            ));
        }
        if p.hard_batches > 0.0 && p.hard_group > p.batch_size {
            out.push(Finding::error(
                "hard_group",
                format!(
                    "{} > batch_size {}: a group must fit in one batch",
                    p.hard_group, p.batch_size
                ),
            ));
        }
        if p.hard_space != "image" && p.hard_space != "text" {
            out.push(Finding::error(
                "hard_space",
                format!("{:?}: use \"image\" or \"text\"", p.hard_space),
            ));
        }
        if p.context_length < 3 || p.context_length > 77 {
            out.push(Finding::error("context_length", "must be 3 to 77"));
        }
        if let Err(m) = select_device(&p.device) {
            out.push(Finding::error("device", m));
        }
        out
    }

    fn plan(p: &PretrainParams, _ctx: &StageContext) -> Result<Chunks<()>> {
        Ok(Chunks::single((), p.epochs as u64, "epochs"))
    }

    fn run_shared(
        p: &PretrainParams,
        _w: &(),
        _k: usize,
        ctx: &StageContext,
    ) -> Result<Option<ChunkTables>> {
        let device = select_device(&p.device).map_err(Error::Data)?;
        // Pairs with a readable image.
        let mut pairs: Vec<(i64, String, PathBuf)> = Vec::new();
        for c in read_captions(ctx.input("captions")?)? {
            if let Some(path) = &c.image_path {
                pairs.push((c.image_id, c.caption, ctx.resolve(Path::new(path))));
            }
        }
        pairs.sort_by_key(|r| r.0);
        if pairs.len() < 2 * p.batch_size {
            return Err(Error::Data(format!(
                "{} captioned images: pretraining needs at least 2 x batch_size; ingest images with their captions",
                pairs.len()
            )));
        }
        let keys: Vec<ImageKey> = pairs
            .iter()
            .map(|(_, _, path)| ImageKey {
                path,
                bbox: None,
                rgb_first: false,
            })
            .collect();
        let loaded = load_batch(&keys, p.image_resolution as u32);
        let mut imgs = Vec::with_capacity(loaded.len());
        for (r, (_, _, path)) in loaded.into_iter().zip(&pairs) {
            imgs.push(r.map_err(|m| Error::Data(format!("{}: {m}", path.display())))?);
        }
        let images = Tensor::stack(&imgs, 0).to_device(device);
        let tok = ClipTokenizer::new(p.context_length as usize);
        let texts: Vec<&str> = pairs.iter().map(|(_, c, _)| c.as_str()).collect();
        let tokens = tok.batch(&texts).to_device(device);
        // The last tenth is held out, to report generalisation.
        let n = pairs.len();
        let n_val = n / 10;
        let n_train = n - n_val;

        tch::manual_seed(p.seed as i64);
        let weights = init_weights(&p.clip_init(), device);
        let mut clip = Clip::new(StateDict {
            path: PathBuf::from("<pretraining>"),
            tensors: weights,
        })?;
        let mut names: Vec<String> = clip.weights().tensors.keys().cloned().collect();
        names.sort();
        // BatchNorm's running statistics are state, not parameters.
        let params: Vec<(String, Tensor)> = names
            .iter()
            .filter(|k| !k.contains("running_") && !k.ends_with("num_batches_tracked"))
            .map(|k| {
                let t = clip.weights().tensors[k].shallow_clone();
                let _ = t.set_requires_grad(true);
                (k.clone(), t)
            })
            .collect();
        let mut opt = AdamW::new((0.9, 0.98), 1e-6, 0.0);
        let scale = clip.weights().tensors["logit_scale"].shallow_clone();
        let steps = n_train.div_ceil(p.batch_size);
        let mut rows: Vec<MetricRow> = Vec::new();
        let total = (p.epochs * steps) as f64;
        for epoch in 0..p.epochs {
            tch::manual_seed((p.seed + 1 + epoch as u64) as i64);
            let perm = if p.hard_batches > 0.0 {
                clip.set_training(false);
                let emb = tch::no_grad(|| -> Result<Tensor> {
                    let mut parts = Vec::new();
                    for lo in (0..n_train).step_by(256) {
                        let len = 256.min(n_train - lo) as i64;
                        parts.push(if p.hard_space == "text" {
                            clip.encode_text(&tokens.narrow(0, lo as i64, len))?
                        } else {
                            clip.encode_image(&images.narrow(0, lo as i64, len))?
                        });
                    }
                    Ok(crate::model::combiner::l2_normalize(&Tensor::cat(
                        &parts, 0,
                    )))
                })?;
                hard_order(&emb, p.hard_batches, p.hard_group)?
            } else {
                Tensor::randperm(n_train as i64, (Kind::Int64, device))
            };
            clip.set_training(true);
            let (mut sum, mut a_i, mut a_t, mut seen) = (0.0, 0.0, 0.0, 0.0);
            let mut lr = p.lr;
            for s in 0..steps {
                let lo = (s * p.batch_size) as i64;
                let len = (p.batch_size as i64).min(n_train as i64 - lo);
                if len < 2 {
                    continue;
                }
                let idx = perm.narrow(0, lo, len);
                let (loss, ai, at) = pairs_loss(&clip, &images, &tokens, &idx, &scale)?;
                let lv = loss.double_value(&[]);
                if !lv.is_finite() {
                    return Err(Error::Data(format!(
                        "pretraining loss is {lv} at epoch {epoch}, step {s}: lower lr"
                    )));
                }
                let inputs: Vec<&Tensor> = params.iter().map(|(_, t)| t).collect();
                let grads = Tensor::f_run_backward(&[&loss], &inputs, false, false)?;
                let grads: Vec<Option<Tensor>> = grads
                    .into_iter()
                    .map(|g| g.defined().then_some(g))
                    .collect();
                // Linear warm-up, then cosine decay to 0.
                let t = (epoch * steps + s) as f64 / total;
                lr = if t < p.warmup {
                    p.lr * (t + 1.0 / total) / p.warmup
                } else {
                    let d = (t - p.warmup) / (1.0 - p.warmup);
                    p.lr * 0.5 * (1.0 + (std::f64::consts::PI * d).cos())
                };
                opt.step(lr, &params, &grads)?;
                let b = len as f64;
                sum += lv * b;
                a_i += ai * b;
                a_t += at * b;
                seen += b;
            }
            let step = ((epoch + 1) * steps) as u64;
            for (m, v) in [
                ("loss", sum / seen),
                ("acc_image_to_text", a_i / seen),
                ("acc_text_to_image", a_t / seen),
            ] {
                rows.push((epoch as u32, step, "train".into(), m.into(), v, lr));
            }
            clip.set_training(false);
            // Held-out pairs in batches of batch_size, in order.
            let (mut vs, mut vi, mut vt, mut vn) = (0.0, 0.0, 0.0, 0.0);
            tch::no_grad(|| -> Result<()> {
                let mut lo = n_train;
                while lo + 1 < n {
                    let len = p.batch_size.min(n - lo);
                    let idx =
                        Tensor::arange_start(lo as i64, (lo + len) as i64, (Kind::Int64, device));
                    let (loss, ai, at) = pairs_loss(&clip, &images, &tokens, &idx, &scale)?;
                    let b = len as f64;
                    vs += loss.double_value(&[]) * b;
                    vi += ai * b;
                    vt += at * b;
                    vn += b;
                    lo += len;
                }
                Ok(())
            })?;
            if vn > 0.0 {
                for (m, v) in [
                    ("loss", vs / vn),
                    ("acc_image_to_text", vi / vn),
                    ("acc_text_to_image", vt / vn),
                ] {
                    rows.push((epoch as u32, step, "val".into(), m.into(), v, lr));
                }
            }
        }
        let last: Vec<String> = rows
            .iter()
            .rev()
            .take(6)
            .map(|r| format!("{} {} {:.3}", r.2, r.3, r.4))
            .collect();
        ctx.note(format!("after {} epochs: {}", p.epochs, last.join(", ")));
        // OpenAI's layout, as torch.save writes it.
        let sd: Vec<(String, Tensor)> = names
            .iter()
            .map(|k| (k.clone(), clip.weights().tensors[k].detach()))
            .collect();
        let path = ctx.work_dir.join("clip.pt");
        crate::model::torch_save::save_state_dict(&path, &sd)
            .map_err(|m| Error::Data(format!("cannot write {}: {m}", path.display())))?;
        let bytes = std::fs::metadata(&path)
            .map_err(Error::io("cannot read", &path))?
            .len();
        let val_acc = rows
            .iter()
            .rev()
            .find(|r| r.2 == "val" && r.3 == "acc_image_to_text")
            .map(|r| r.4)
            .unwrap_or(f64::NAN);
        let weights = crate::tables::weights::weights_batch(&[(
            "backbone".into(),
            "clip.pt".into(),
            "torch".into(),
            bytes,
            (p.epochs - 1) as u32,
            "val/acc_image_to_text".into(),
            val_acc,
        )])?;
        Ok(Some(vec![
            (
                "pretrain_metrics",
                crate::tables::metrics::metrics_batch(&rows)?,
            ),
            ("weights", weights),
        ]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four tight clusters of four points: with share 1 and groups of 4,
    /// every group is one cluster, and the order is a permutation.
    #[test]
    fn hard_order_groups_nearest_neighbours() {
        tch::manual_seed(3);
        let centres = Tensor::eye(4, (Kind::Float, Device::Cpu));
        let emb = centres.repeat_interleave_self_int(4, 0, None)
            + Tensor::randn([16, 4], (Kind::Float, Device::Cpu)) * 0.01;
        let emb = crate::model::combiner::l2_normalize(&emb);
        let order = Vec::<i64>::try_from(hard_order(&emb, 1.0, 4).unwrap()).unwrap();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..16).collect::<Vec<_>>());
        for g in order.chunks(4) {
            assert!(
                g.iter().all(|&i| i / 4 == g[0] / 4),
                "group {g:?} mixes clusters"
            );
        }
        // Share 0: single pairs only, still a permutation.
        let mut plain = Vec::<i64>::try_from(hard_order(&emb, 0.0, 4).unwrap()).unwrap();
        plain.sort();
        assert_eq!(plain, (0..16).collect::<Vec<_>>());
    }

    /// Pairs 1 and 2 share a caption: their cross logits are masked, the
    /// rest of the batch is the plain symmetric InfoNCE.
    #[test]
    fn identical_captions_are_not_negatives() {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        let img = Tensor::randn([3, 8], opts);
        let txt = Tensor::randn([3, 8], opts);
        let scale = Tensor::from(1.0f32);
        let tokens = Tensor::from_slice(&[1i64, 2, 2]).unsqueeze(1);
        let (loss, _, _) = clip_loss(&img, &txt, &tokens, &scale);
        let l2 = crate::model::combiner::l2_normalize;
        let mask =
            Tensor::from_slice(&[false, false, false, false, false, true, false, true, false])
                .view([3, 3]);
        let logits =
            (l2(&img).matmul(&l2(&txt).tr()) * 1f64.exp()).masked_fill(&mask, f64::NEG_INFINITY);
        let labels = Tensor::from_slice(&[0i64, 1, 2]);
        let ce =
            |l: &Tensor| l.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, -100, 0.0);
        let want = ((ce(&logits) + ce(&logits.tr())) / 2.0).double_value(&[]);
        let unmasked = {
            let l = l2(&img).matmul(&l2(&txt).tr()) * 1f64.exp();
            ((ce(&l) + ce(&l.tr())) / 2.0).double_value(&[])
        };
        assert!((loss.double_value(&[]) - want).abs() < 1e-6);
        assert!(
            (want - unmasked).abs() > 1e-4,
            "the mask must change the loss"
        );
    }
}
