//! The textual-inversion networks that map a CLIP image feature to a
//! pseudo-word token embedding, loaded from the files their projects
//! publish:
//!
//! - `Phi` (SEARLE `src/phi.py` @a9c314b, copied by LinCIR `models.py`
//!   @1dec42d): Linear, GELU (erf), Dropout, Linear, GELU, Dropout, Linear;
//!   keys `layers.{0,3,6}.{weight,bias}`; files `{"Phi": state_dict}`
//!   (LinCIR) or `{"epoch", "Phi": state_dict}` (SEARLE).
//! - `IM2TEXT` (Pic2Word `model/model.py` @8c05329): `n_layer` blocks of
//!   Linear, Dropout, ReLU, then `fc_out`; keys `layers.{i}.0.*`,
//!   `fc_out.*`; file `{"epoch", "name", "state_dict",
//!   "state_dict_img2text", "optimizer"}` with DDP's `module.` prefix.
//!
//! Dropout is the identity: every published evaluation calls `.eval()`.

use std::path::Path;

use tch::{Device, Tensor};

use super::{linear, read_named, ModelError, Result, StateDict};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapperKind {
    /// SEARLE's and LinCIR's Phi.
    Phi,
    /// Pic2Word's IM2TEXT.
    Im2Text,
}

pub struct Mapper {
    pub kind: MapperKind,
    w: StateDict,
    /// Pic2Word's blocks (Phi has two hidden layers).
    blocks: usize,
    /// The image feature width it takes and the token width it gives.
    pub in_dim: i64,
    pub out_dim: i64,
}

impl Mapper {
    /// The network in `path`, in its project's file format; a key that is
    /// missing, unexpected or of the wrong shape is an error naming it.
    pub fn load(path: &Path, kind: MapperKind, device: Device) -> Result<Mapper> {
        let named = read_named(path, device)?;
        // The network's own dict inside the checkpoint, `module.` stripped.
        let inner = match kind {
            MapperKind::Phi => "Phi.",
            MapperKind::Im2Text => "state_dict_img2text.",
        };
        let nested = named.iter().any(|(k, _)| k.starts_with(inner));
        let tensors = named
            .into_iter()
            .filter_map(|(k, v)| match nested {
                true => k.strip_prefix(inner).map(|s| (s.to_string(), v)),
                false => Some((k, v)),
            })
            .map(|(k, v)| {
                let k = k.strip_prefix("module.").map(str::to_string).unwrap_or(k);
                (k, v.to_kind(tch::Kind::Float))
            })
            .collect();
        let w = StateDict {
            path: path.to_path_buf(),
            tensors,
        };
        let shape = |key: &str, s: &[i64]| w.get_shaped(key, s).map(|t| t.size());
        let (blocks, expected, in_dim, out_dim) = match kind {
            MapperKind::Phi => {
                let l0 = shape("layers.0.weight", &[-1, -1])?;
                let (h, i) = (l0[0], l0[1]);
                shape("layers.0.bias", &[h])?;
                shape("layers.3.weight", &[h, h])?;
                shape("layers.3.bias", &[h])?;
                let o = shape("layers.6.weight", &[-1, h])?[0];
                shape("layers.6.bias", &[o])?;
                let keys = ["layers.0", "layers.3", "layers.6"]
                    .iter()
                    .flat_map(|l| [format!("{l}.weight"), format!("{l}.bias")])
                    .collect::<Vec<_>>();
                (2, keys, i, o)
            }
            MapperKind::Im2Text => {
                let l0 = shape("layers.0.0.weight", &[-1, -1])?;
                let (m, i) = (l0[0], l0[1]);
                let mut n = 1;
                while w.has(&format!("layers.{n}.0.weight")) {
                    shape(&format!("layers.{n}.0.weight"), &[m, m])?;
                    n += 1;
                }
                let mut keys = Vec::new();
                for b in 0..n {
                    shape(&format!("layers.{b}.0.bias"), &[m])?;
                    keys.push(format!("layers.{b}.0.weight"));
                    keys.push(format!("layers.{b}.0.bias"));
                }
                let o = shape("fc_out.weight", &[-1, m])?[0];
                shape("fc_out.bias", &[o])?;
                keys.extend(["fc_out.weight".to_string(), "fc_out.bias".to_string()]);
                (n, keys, i, o)
            }
        };
        if let Some(extra) = w.tensors.keys().filter(|k| !expected.contains(k)).min() {
            return Err(ModelError::Load {
                path: path.to_path_buf(),
                message: format!(
                    "unexpected key '{extra}' for a {} network (its keys: {}); is this the right method's file?",
                    kind.name(),
                    expected.join(", ")
                ),
            });
        }
        w.ensure_finite()?;
        Ok(Mapper {
            kind,
            w,
            blocks,
            in_dim,
            out_dim,
        })
    }

    fn lin(&self, x: &Tensor, p: &str) -> Result<Tensor> {
        let b = self.w.get(&format!("{p}.bias"))?;
        Ok(linear(x, &self.w.get(&format!("{p}.weight"))?, Some(&b)))
    }

    /// Pseudo-token embeddings [N, out_dim] of image features [N, in_dim]
    /// (raw, as every published pipeline feeds them).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.kind {
            MapperKind::Phi => {
                let x = self.lin(x, "layers.0")?.gelu("none");
                let x = self.lin(&x, "layers.3")?.gelu("none");
                self.lin(&x, "layers.6")
            }
            MapperKind::Im2Text => {
                let mut x = x.shallow_clone();
                for b in 0..self.blocks {
                    x = self.lin(&x, &format!("layers.{b}.0"))?.relu();
                }
                self.lin(&x, "fc_out")
            }
        }
    }
}

impl MapperKind {
    pub fn name(self) -> &'static str {
        match self {
            MapperKind::Phi => "Phi",
            MapperKind::Im2Text => "IM2TEXT",
        }
    }
}
