//! The model layer on tch (libtorch): OpenAI CLIP (VisionTransformer and
//! ModifiedResNet image towers, text Transformer), the CLIP tokenizer, the
//! GeneCIS Combiner, and checkpoint loading.
//!
//! Models are functional over a name -> tensor map in OpenAI's state-dict
//! layout, so a checkpoint is used as saved, whatever produced it.

pub mod arch;
pub mod clip;
pub mod combiner;
pub(crate) mod decode;
pub mod dist;
pub(crate) mod hf;
pub(crate) mod init;
pub(crate) mod jpeg;
pub mod mapper;
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
    #[error("checkpoint {}: tensor '{key}' is not part of {model}{}. The checkpoint is another model: set arch to its configuration (an open_clip name or model-config .json)", .path.display(), if *.count > 1 { format!(" (nor are {} other keys)", .count - 1) } else { String::new() })]
    Unexpected {
        path: PathBuf,
        key: String,
        count: usize,
        model: String,
    },
    #[error("checkpoint {}: {message}", .path.display())]
    Config { path: PathBuf, message: String },
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
        let named = read_named(path, device)?;
        // A training checkpoint ({"epoch", "state_dict", "optimizer"}, as
        // open_clip saves one) holds the weights under `state_dict`.
        let wrapped = named.iter().any(|(k, _)| k.starts_with("state_dict."));
        let tensors = named
            .into_iter()
            .filter_map(|(k, v)| {
                if wrapped {
                    k.strip_prefix("state_dict.").map(|s| (s.to_string(), v))
                } else {
                    Some((k, v))
                }
            })
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

    /// The tensors renamed by `f` (a key it maps to `None` keeps its name).
    pub(crate) fn renamed(self, f: impl Fn(&str) -> Option<String>) -> StateDict {
        StateDict {
            path: self.path,
            tensors: self
                .tensors
                .into_iter()
                .map(|(k, v)| (f(&k).unwrap_or(k), v))
                .collect(),
        }
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
                // `_` for a size that may be anything.
                expected: format!(
                    "[{}]",
                    shape
                        .iter()
                        .map(|s| if *s == -1 {
                            "_".to_string()
                        } else {
                            s.to_string()
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
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

/// The tensors of a sharded safetensors checkpoint: the shards its
/// `model.safetensors.index.json` names in `weight_map`.
fn sharded(index: &Path) -> std::result::Result<Vec<(String, Tensor)>, String> {
    let text = std::fs::read_to_string(index).map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("index: {e}"))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or("the index has no weight_map")?;
    let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
    files.sort();
    files.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for f in files {
        if f.contains('/') || f.contains("..") {
            return Err(format!("shard name '{f}' is not a file beside the index"));
        }
        out.extend(Tensor::read_safetensors(dir.join(f)).map_err(|e| format!("shard {f}: {e}"))?);
    }
    Ok(out)
}

/// libtorch errors carry a C++ backtrace; users need the first line.
fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

fn is_safetensors(path: &Path, head: &[u8]) -> bool {
    path.extension().is_some_and(|e| e == "safetensors") || (head.len() > 8 && head[8] == b'{')
}

/// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when libtorch sees a GPU).
/// Every tensor of a weights file, named as stored (nested dicts joined
/// with dots), whatever its format: safetensors, a torch.save pickle, a
/// TorchScript archive, a sharded index.
pub(crate) fn read_named(path: &Path, device: Device) -> Result<Vec<(String, Tensor)>> {
    let err = |m: String| ModelError::Load {
        path: path.to_path_buf(),
        message: m,
    };
    // The first bytes tell the format; the file itself may be gigabytes.
    let head = {
        use std::io::Read;
        let mut b = Vec::with_capacity(16);
        std::fs::File::open(path)
            .and_then(|f| f.take(16).read_to_end(&mut b))
            .map_err(|e| err(e.to_string()))?;
        b
    };
    let named: Vec<(String, Tensor)> = if path.to_string_lossy().ends_with(".index.json") {
        sharded(path).map_err(err)?
    } else if is_safetensors(path, &head) {
        Tensor::read_safetensors(path).map_err(|e| err(e.to_string()))?
    } else if head.starts_with(b"PK") {
        match torch_pickle::read_state_dict(path) {
            Ok(v) => v,
            Err(torch_pickle::PickleError::Refused(m)) => return Err(err(m)),
            Err(torch_pickle::PickleError::NotStateDict(sd_err)) => {
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
    Ok(named)
}

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
