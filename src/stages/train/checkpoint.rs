//! Exact resume: `last/` holds every tensor and counter a step depends on
//! (weights, AdamW moments, the scaler, the epoch's meters), swapped in
//! atomically after each checkpoint.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::combiner::Combiner;
use crate::model::optim::{GradScaler, Moments};
use crate::model::torch_save;
use crate::tables::metrics::MetricRow;

use super::*;

/// The resumable state besides tensors (`last/state.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Progress {
    /// The epoch being trained (== epochs when done).
    pub(super) epoch: usize,
    /// Steps of `epoch` done.
    pub(super) step: u64,
    pub(super) scaler: Option<GradScaler>,
    /// AdamW's step count per parameter.
    pub(super) steps: BTreeMap<String, u64>,
    /// This epoch's meter sums so far.
    pub(super) meters: BTreeMap<String, (f64, f64)>,
    /// (value, epoch) of the best epoch so far.
    pub(super) best: Option<(f64, usize)>,
    /// Every metric row so far.
    pub(super) metrics: Vec<MetricRow>,
}

impl Trainer {
    /// Restores `last/` (or `last.old/`, when a swap was interrupted);
    /// false when there is nothing to resume.
    pub(super) fn resume(&mut self) -> Result<bool> {
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
                .map_err(|e| bad(e.to_string()))?
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
    pub(super) fn checkpoint(&mut self) -> Result<()> {
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

    pub(super) fn combiner_state(&self) -> Vec<(String, Tensor)> {
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
    pub(super) fn backbone_state(&self) -> Vec<(String, Tensor)> {
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
}
