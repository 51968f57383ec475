//! The original's optimisation pieces over plain tensors, so that every bit
//! of their state can be checkpointed: AdamW (torch.optim.AdamW's
//! single-tensor path), a GradScaler (torch.cuda.amp.GradScaler),
//! `clip_grad_norm_` and CosineAnnealingLR's recursive form.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Moments of one parameter.
pub struct Moments {
    /// `state["step"]`: updates applied so far.
    pub step: u64,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

pub struct AdamW {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// By parameter name; a parameter gets moments on its first gradient.
    pub state: BTreeMap<String, Moments>,
}

impl AdamW {
    pub fn new(betas: (f64, f64), eps: f64, weight_decay: f64) -> AdamW {
        AdamW {
            betas,
            eps,
            weight_decay,
            state: BTreeMap::new(),
        }
    }

    /// One step at `lr` over the parameters that have a gradient (as
    /// PyTorch skips those whose `.grad` is None).
    pub fn step(
        &mut self,
        lr: f64,
        params: &[(String, Tensor)],
        grads: &[Option<Tensor>],
    ) -> Result<(), tch::TchError> {
        let (beta1, beta2) = self.betas;
        tch::no_grad(|| {
            for ((name, p), g) in params.iter().zip(grads) {
                let Some(g) = g else { continue };
                let mut p = p.shallow_clone();
                let m = match self.state.entry(name.clone()) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => e.insert(Moments {
                        step: 0,
                        exp_avg: p.f_zeros_like()?,
                        exp_avg_sq: p.f_zeros_like()?,
                    }),
                };
                m.step += 1;
                if self.weight_decay != 0.0 {
                    let _ = p.f_mul_scalar_(1.0 - lr * self.weight_decay)?;
                }
                let _ = m.exp_avg.f_lerp_(g, 1.0 - beta1)?;
                let _ = m.exp_avg_sq.f_mul_scalar_(beta2)?;
                let _ = m.exp_avg_sq.f_addcmul_(&g.f_mul_scalar(1.0 - beta2)?, g)?;
                let step = m.step as f64;
                let bias_correction1 = 1.0 - beta1.powf(step);
                let bias_correction2 = 1.0 - beta2.powf(step);
                let step_size = lr / bias_correction1;
                let denom = m
                    .exp_avg_sq
                    .f_sqrt()?
                    .f_div_scalar(bias_correction2.powf(0.5))?
                    .f_add_scalar(self.eps)?;
                let _ = p.f_addcdiv_(&m.exp_avg.f_mul_scalar(-step_size)?, &denom)?;
            }
            Ok(())
        })
    }
}

/// Dynamic loss scaling with PyTorch's defaults (2^16, x2 every 2000 clean
/// steps, x0.5 on an overflow). Disabled, it is the identity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GradScaler {
    pub enabled: bool,
    pub scale: f64,
    pub growth_tracker: u64,
}

impl GradScaler {
    const GROWTH: f64 = 2.0;
    const BACKOFF: f64 = 0.5;
    const INTERVAL: u64 = 2000;

    pub fn new(enabled: bool) -> GradScaler {
        GradScaler {
            enabled,
            scale: 65536.0,
            growth_tracker: 0,
        }
    }

    /// The factor the loss is multiplied by before backward.
    pub(crate) fn factor(&self) -> f64 {
        if self.enabled {
            self.scale
        } else {
            1.0
        }
    }

    /// `unscale_`: multiplies the gradients by the float32 reciprocal of
    /// the scale; true when one of them is inf or NaN.
    pub(crate) fn unscale(&self, grads: &mut [Option<Tensor>]) -> Result<bool, tch::TchError> {
        if !self.enabled {
            return Ok(false);
        }
        let inv = (1.0f32 / self.scale as f32) as f64;
        let mut found = false;
        tch::no_grad(|| {
            for g in grads.iter_mut().flatten() {
                let _ = g.f_mul_scalar_(inv)?;
                if !found {
                    found = !bool::try_from(g.f_isfinite()?.f_all()?)?;
                }
            }
            Ok::<_, tch::TchError>(())
        })?;
        Ok(found)
    }

    /// `update()` after a step (or a skipped one).
    pub(crate) fn update(&mut self, found_inf: bool) {
        if !self.enabled {
            return;
        }
        if found_inf {
            self.scale *= Self::BACKOFF;
            self.growth_tracker = 0;
        } else {
            self.growth_tracker += 1;
            if self.growth_tracker == Self::INTERVAL {
                self.scale *= Self::GROWTH;
                self.growth_tracker = 0;
            }
        }
    }
}

/// `torch.nn.utils.clip_grad_norm_(grads, max_norm)` on the gradients that
/// exist; returns the total norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64, tch::TchError> {
    let present: Vec<&mut Tensor> = grads.iter_mut().flatten().collect();
    if present.is_empty() {
        return Ok(0.0);
    }
    tch::no_grad(|| {
        let norms: Vec<Tensor> = present
            .iter()
            .map(|g| g.f_norm())
            .collect::<Result<_, _>>()?;
        let total = Tensor::f_stack(&norms, 0)?.f_norm()?;
        let coef = (total.f_add_scalar(1e-6)?.f_reciprocal()? * max_norm).f_clamp_max(1.0)?;
        for g in present {
            let _ = g.f_mul_(&coef)?;
        }
        total.f_double_value(&[])
    })
}

/// CosineAnnealingLR(T_max = epochs, eta_min) stepped once per epoch: the
/// learning rate of each epoch, by the scheduler's recursive formula (its
/// floats, not the closed form's).
pub(crate) fn cosine_lrs(base: f64, eta_min: f64, t_max: usize, epochs: usize) -> Vec<f64> {
    use std::f64::consts::PI;
    let t = t_max as f64;
    let mut lrs = vec![base];
    for e in 1..epochs {
        let prev = lrs[e - 1];
        let ef = e as f64;
        let lr = if (e as i64 - 1 - t_max as i64).rem_euclid(2 * t_max as i64) == 0 {
            prev + (base - eta_min) * (1.0 - (PI / t).cos()) / 2.0
        } else {
            (1.0 + (PI * ef / t).cos()) / (1.0 + (PI * (ef - 1.0) / t).cos()) * (prev - eta_min)
                + eta_min
        };
        lrs.push(lr);
    }
    lrs.truncate(epochs);
    lrs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_matches_closed_form_closely_and_ends_above_eta_min() {
        let lrs = cosine_lrs(1e-6, 1e-9, 6, 6);
        assert_eq!(lrs.len(), 6);
        assert_eq!(lrs[0], 1e-6);
        for (e, lr) in lrs.iter().enumerate() {
            let closed =
                1e-9 + (1e-6 - 1e-9) * (1.0 + (std::f64::consts::PI * e as f64 / 6.0).cos()) / 2.0;
            assert!((lr - closed).abs() < 1e-15, "epoch {e}: {lr} vs {closed}");
        }
        assert!(lrs.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn scaler_backs_off_and_grows() {
        let mut s = GradScaler::new(true);
        s.update(true);
        assert_eq!(s.scale, 32768.0);
        for _ in 0..2000 {
            s.update(false);
        }
        assert_eq!(s.scale, 65536.0);
        assert_eq!(s.growth_tracker, 0);
        let mut off = GradScaler::new(false);
        off.update(true);
        assert_eq!(off.factor(), 1.0);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![
            Some(Tensor::from_slice(&[3.0f32, 0.0])),
            None,
            Some(Tensor::from_slice(&[4.0f32])),
        ];
        let total = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((total - 5.0).abs() < 1e-6);
        let a = g[0].as_ref().unwrap().double_value(&[0]);
        assert!((a - 0.6).abs() < 1e-5, "{a}");
    }
}
