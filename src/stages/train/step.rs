//! One optimisation step of the original's `train_one_epoch` body: the
//! contrastive loss, backward, clipping, the scaler, AdamW.

use std::time::{Duration, Instant};

use tch::{Device, Kind, Reduction, Tensor};

use crate::error::{Error, Result};
use crate::model::clip::Clip;
use crate::model::combiner::{l2_normalize, Combiner, Dropout};
use crate::model::dist::ProcessGroup;
use crate::model::optim::{clip_grad_norm, AdamW, GradScaler};
use crate::model::with_precision;

use super::*;

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

    pub(super) fn empty() -> Optimizer {
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
    pub device: Device,
    pub amp: bool,
}

/// What one step reports.
pub struct StepOut {
    /// The batch's meters (loss, accuracy, combiner-feature distances), of
    /// the global batch.
    pub metrics: Vec<(String, f64)>,
    /// Time spent in collectives (gathers and the gradient all-reduce).
    pub comm: Duration,
}

/// The original's `train_one_epoch` body for one batch: `features` gives
/// (reference, target, condition) features (CLIP runs inside it), then the
/// contrastive loss, backward, clipping, loss scaling and AdamW.
///
/// With a process group, this rank's features are this rank's share of
/// the global batch: the combined, target, reference and condition
/// features are gathered (the first two with this rank's rows on the
/// graph, as `all_gather_batch_with_grad` does), every rank computes the
/// global loss, and the gradients are summed over the ranks, which gives
/// one process's gradient of the global batch; every rank then takes the
/// same AdamW step.
pub fn train_step(
    cfg: &StepConfig,
    opt: &mut Optimizer,
    combiner: &Combiner,
    lr: f64,
    dropout: Dropout,
    mut group: Option<&mut ProcessGroup>,
    features: impl FnOnce() -> Result<(Tensor, Tensor, Tensor)>,
) -> Result<StepOut> {
    let mut comm = Duration::ZERO;
    let (loss, metrics) = with_precision(
        cfg.device,
        cfg.amp,
        || -> Result<(Tensor, Vec<(String, f64)>)> {
            let (r, t, c) = features()?;
            let combined = l2_normalize(&combiner.forward_t(&r, &c, dropout)?);
            let target = l2_normalize(&t);
            let (combined, target, r, c) = match group.as_deref_mut() {
                None => (combined, target, r, c),
                Some(g) => {
                    let t0 = Instant::now();
                    let out = (
                        g.all_gather_with_grad(&combined)?,
                        g.all_gather_with_grad(&target)?,
                        g.all_gather_cat(&r.detach().contiguous())?,
                        g.all_gather_cat(&c.detach().contiguous())?,
                    );
                    comm += t0.elapsed();
                    out
                }
            };
            let b = combined.size()[0];
            let logits = combined.matmul(&target.tr()) * cfg.lamda;
            let labels = Tensor::arange(b, (Kind::Int64, logits.device()));
            let loss =
                logits.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, -100, 0.0);
            let m = tch::no_grad(|| -> Result<Vec<(String, f64)>> {
                let acc = in_batch_accuracy(&logits, &labels);
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
    if let Some(g) = group {
        let t0 = Instant::now();
        sum_over_ranks(g, &mut grads)?;
        comm += t0.elapsed();
    }
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
    Ok(StepOut { metrics, comm })
}

/// Every defined gradient summed over the ranks, in one all-reduce of
/// their concatenation (the same parameters have gradients on every rank:
/// the graphs are the same).
fn sum_over_ranks(g: &mut ProcessGroup, grads: &mut [Option<Tensor>]) -> Result<()> {
    let flat: Vec<Tensor> = grads.iter().flatten().map(|t| t.reshape([-1])).collect();
    if flat.is_empty() {
        return Ok(());
    }
    let mut all = Tensor::cat(&flat, 0);
    g.all_reduce_sum(&mut all)?;
    let mut at = 0i64;
    for t in grads.iter_mut().flatten() {
        let n = t.numel() as i64;
        t.copy_(&all.narrow(0, at, n).view_as(t));
        at += n;
    }
    Ok(())
}

/// Share of rows whose largest logit is their label: the original's
/// `base_acc`.
pub(super) fn in_batch_accuracy(logits: &Tensor, labels: &Tensor) -> f64 {
    logits
        .argmax(-1, false)
        .eq_tensor(labels)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[])
}
