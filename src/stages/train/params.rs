//! `train`'s params: the original's command-line flags, their defaults,
//! and `set_requires_grad_clip`'s fine-tune modes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::*;

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

pub(super) fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}

impl Finetune {
    pub(super) fn trains(self, name: &str) -> bool {
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

pub(super) fn whole() -> Finetune {
    Finetune::ImagePlusTextWhole
}
pub(super) fn six() -> usize {
    6
}
pub(super) fn b256() -> usize {
    256
}
pub(super) fn lr() -> f64 {
    1e-6
}
pub(super) fn betas() -> [f64; 2] {
    [0.9, 0.999]
}
pub(super) fn eps() -> f64 {
    1e-8
}
pub(super) fn lamda() -> f64 {
    100.0
}
pub(super) fn tenth() -> f64 {
    0.1
}
pub(super) fn yes() -> bool {
    true
}
pub(super) fn one() -> f64 {
    1.0
}
pub(super) fn proj() -> i64 {
    PROJECTION_DIM
}
pub(super) fn hidden() -> i64 {
    HIDDEN_DIM
}
pub(super) fn auto() -> String {
    "auto".into()
}

#[cfg(test)]
mod tests {
    use super::Finetune;

    #[test]
    pub(super) fn finetune_modes_train_what_set_requires_grad_clip_sets() {
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
