//! The model layer on tch (libtorch): OpenAI CLIP (VisionTransformer and
//! ModifiedResNet image towers, text Transformer), the CLIP tokenizer, the
//! GeneCIS Combiner, and checkpoint loading.
//!
//! Models are functional over a name -> tensor map in OpenAI's state-dict
//! layout, so a checkpoint is used as saved, whatever produced it.

pub mod clip;
pub mod combiner;
pub(crate) mod decode;
pub(crate) mod init;
pub(crate) mod jpeg;
pub mod optim;
pub mod preprocess;
pub mod tokenizer;
pub mod torch_pickle;
pub mod torch_save;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

/// Errors of the model layer; each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot load checkpoint {}: {message}. Expected a TorchScript archive (OpenAI's .pt), a torch.save state dict, or .safetensors", .path.display())]
    Load { path: PathBuf, message: String },
    #[error("checkpoint {}: missing tensor '{key}'{hint}", .path.display())]
    Missing {
        path: PathBuf,
        key: String,
        hint: String,
    },
    #[error("checkpoint {}: tensor '{key}' has shape {got:?}, expected {expected}", .path.display())]
    Shape {
        path: PathBuf,
        key: String,
        got: Vec<i64>,
        expected: String,
    },
    #[error("checkpoint {}: tensor '{key}' holds {count} NaN or infinite value(s); every score made with it would be meaningless. Use a checkpoint saved before training diverged", .path.display())]
    NonFinite {
        path: PathBuf,
        key: String,
        count: i64,
    },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub(crate) type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Named tensors of a checkpoint, `module.` prefixes removed.
pub struct StateDict {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
}

impl StateDict {
    /// Refuses NaN and infinite weights (one pass over the floats), so a
    /// diverged checkpoint is an error, never a run of meaningless scores.
    pub(crate) fn ensure_finite(&self) -> Result<()> {
        let mut keys: Vec<&String> = self.tensors.keys().collect();
        keys.sort();
        for k in keys {
            let t = &self.tensors[k];
            if !t.is_floating_point() {
                continue;
            }
            let bad = t.f_isfinite()?.f_logical_not()?.f_sum(tch::Kind::Int64)?;
            let count = bad.f_int64_value(&[])?;
            if count > 0 {
                return Err(ModelError::NonFinite {
                    path: self.path.clone(),
                    key: k.clone(),
                    count,
                });
            }
        }
        Ok(())
    }

    /// Loads `path` in whichever format it is: safetensors (by its header),
    /// a torch.save'd state dict, or a TorchScript archive (parameters and
    /// buffers, read from its pickled module tree; libtorch's module loader
    /// is the fallback).
    pub fn load(path: &Path, device: Device) -> Result<StateDict> {
        let err = |m: String| ModelError::Load {
            path: path.to_path_buf(),
            message: m,
        };
        let head = std::fs::read(path)
            .map(|b| b[..b.len().min(16)].to_vec())
            .map_err(|e| err(e.to_string()))?;
        let named: Vec<(String, Tensor)> = if is_safetensors(path, &head) {
            Tensor::read_safetensors(path).map_err(|e| err(e.to_string()))?
        } else if head.starts_with(b"PK") {
            match torch_pickle::read_state_dict(path) {
                Ok(v) => v,
                Err(sd_err) => {
                    let m = tch::CModule::load_on_device(path, device).map_err(|e| {
                        err(format!(
                            "neither a state dict ({sd_err}) nor TorchScript ({})",
                            first_line(&e.to_string())
                        ))
                    })?;
                    m.named_parameters()
                        .map_err(|e| err(first_line(&e.to_string())))?
                }
            }
        } else {
            return Err(err("not a zip archive or safetensors file".into()));
        };
        let tensors = named
            .into_iter()
            .map(|(k, v)| {
                let k = k.strip_prefix("module.").map(str::to_string).unwrap_or(k);
                (k, v.to_device(device).to_kind(Kind::Float))
            })
            .collect();
        Ok(StateDict {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// A view of the keys under `prefix.` (prefix removed).
    pub(crate) fn sub(&self, prefix: &str) -> StateDict {
        let p = format!("{prefix}.");
        StateDict {
            path: self.path.clone(),
            tensors: self
                .tensors
                .iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix(&p)
                        .map(|s| (s.to_string(), v.shallow_clone()))
                })
                .collect(),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub(crate) fn get(&self, key: &str) -> Result<Tensor> {
        self.tensors
            .get(key)
            .map(|t| t.shallow_clone())
            .ok_or_else(|| {
                let near: Vec<&str> = self
                    .tensors
                    .keys()
                    .filter(|k| k.rsplit('.').next() == key.rsplit('.').next())
                    .map(String::as_str)
                    .take(3)
                    .collect();
                ModelError::Missing {
                    path: self.path.clone(),
                    key: key.to_string(),
                    hint: if near.is_empty() {
                        String::new()
                    } else {
                        format!(" (keys with that ending: {})", near.join(", "))
                    },
                }
            })
    }

    /// `get` with a shape check; -1 matches any size.
    pub(crate) fn get_shaped(&self, key: &str, shape: &[i64]) -> Result<Tensor> {
        let t = self.get(key)?;
        let got = t.size();
        if got.len() != shape.len() || got.iter().zip(shape).any(|(g, s)| *s != -1 && g != s) {
            return Err(ModelError::Shape {
                path: self.path.clone(),
                key: key.to_string(),
                got,
                expected: format!("{shape:?}"),
            });
        }
        Ok(t)
    }

    pub fn write_safetensors(&self, path: &Path) -> Result<()> {
        let mut v: Vec<(&str, &Tensor)> =
            self.tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        v.sort_by_key(|(k, _)| *k);
        Ok(Tensor::write_safetensors(&v, path)?)
    }
}

/// libtorch errors carry a C++ backtrace; users need the first line.
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

fn is_safetensors(path: &Path, head: &[u8]) -> bool {
    path.extension().is_some_and(|e| e == "safetensors") || (head.len() > 8 && head[8] == b'{')
}

/// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when libtorch sees a GPU).
pub(crate) fn select_device(spec: &str) -> std::result::Result<Device, String> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available()),
        "cuda" if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        s if s.starts_with("cuda:") => {
            let i: usize = s[5..]
                .parse()
                .map_err(|_| format!("bad device '{s}': expected cuda:N"))?;
            if i < tch::Cuda::device_count() as usize {
                Ok(Device::Cuda(i))
            } else {
                Err(format!(
                    "device '{s}' is not available: libtorch sees {} CUDA device(s)",
                    tch::Cuda::device_count()
                ))
            }
        }
        "cuda" => Err("no CUDA device is visible to libtorch; use --device cpu or auto".into()),
        s => Err(format!(
            "unknown device '{s}': use cpu, cuda, cuda:N or auto"
        )),
    }
}

/// Runs `f` under bf16/fp16 autocast when `mixed` is set and the device is
/// a GPU (CPU runs stay in fp32).
pub(crate) fn with_precision<T>(device: Device, mixed: bool, f: impl FnOnce() -> T) -> T {
    if mixed && device.is_cuda() {
        tch::autocast(true, f)
    } else {
        f()
    }
}

/// `x @ w.T + b` (nn.Linear).
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    x.linear(w, b)
}
