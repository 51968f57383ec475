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
#[serde(deny_unknown_fields, default)]
pub struct TrainParams {
    pub finetune: Finetune,
    /// The CLIP to start from (needed when fine-tuning).
    pub checkpoint: Option<PathBuf>,
    /// Which CLIP the checkpoint is (as `embed`'s `arch`): an open_clip
    /// model name or model-config .json; left out, OpenAI's is assumed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// A Combiner to start from instead of a fresh one.
    pub combiner: Option<PathBuf>,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// 1 / temperature of the contrastive softmax.
    pub lamda: f64,
    /// Seeds the Combiner's initialisation, dropout and crops.
    pub seed: u64,
    /// The shuffle's seed: the original's DistributedSampler uses its
    /// default 0 (plus the epoch), whatever `--seed` says.
    pub sampler_seed: u64,
    pub val_fraction: f64,
    pub val_start_idx: usize,
    /// The val loader drops its last partial batch, as the original's.
    pub val_drop_last: bool,
    /// Max L2 norm of the CLIP gradients (0 turns clipping off).
    pub clip_grad_norm: f64,
    /// The original clips the scaled gradients (before the GradScaler
    /// unscales them), so under AMP the effective bound is max_norm/scale.
    /// `false` unscales first, as PyTorch's AMP recipe says.
    pub clip_before_unscale: bool,
    /// Encode the distractor images (not in the loss; with a ResNet they
    /// shape BatchNorm's batch statistics).
    pub encode_distractors: bool,
    pub projection_dim: i64,
    pub hidden_dim: i64,
    pub device: String,
    /// fp16 autocast with a GradScaler on a GPU (ignored on CPU).
    pub mixed_precision: bool,
    /// Also checkpoint every N steps inside an epoch (0: epoch ends only).
    pub checkpoint_every_steps: u64,
    /// `split/metric` that picks the best epoch: `templates/cirr_val/recall_at_1`
    /// (the original's), `templates/change_attribute/recall_at_1`,
    /// `val/recall_at_1`; `auto` takes the first of those available.
    pub select_by: String,
    /// Which model's embeddings (cached mode), when they hold several.
    pub model: Option<String>,
}

impl Default for TrainParams {
    /// The defaults of every param, in one place.
    fn default() -> Self {
        TrainParams {
            finetune: Finetune::ImagePlusTextWhole,
            checkpoint: Default::default(),
            arch: Default::default(),
            combiner: Default::default(),
            epochs: 6,
            batch_size: 256,
            lr: 1e-6,
            weight_decay: Default::default(),
            betas: [0.9, 0.999],
            eps: 1e-8,
            lamda: 100.0,
            seed: Default::default(),
            sampler_seed: Default::default(),
            val_fraction: 0.1,
            val_start_idx: Default::default(),
            val_drop_last: true,
            clip_grad_norm: 1.0,
            clip_before_unscale: true,
            encode_distractors: true,
            projection_dim: PROJECTION_DIM,
            hidden_dim: HIDDEN_DIM,
            device: "auto".into(),
            mixed_precision: true,
            checkpoint_every_steps: Default::default(),
            select_by: "auto".into(),
            model: Default::default(),
        }
    }
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
