//! CLIP over a state dict in OpenAI's layout: the forward passes follow
//! OpenAI's clip/model.py and open_clip's transformer.py module by module,
//! configured by a [`ClipConfig`] (see `arch.rs` for where one comes from).

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::arch::{from_hf_config, from_open_clip_json, Layout};
pub use super::arch::{Act, ArchSpec, Blocks, ClipConfig, TextPool, TextProj, Vision, VisionPool};
use super::{linear, ModelError, Result, StateDict};

pub struct Clip {
    pub config: ClipConfig,
    w: StateDict,
    /// BatchNorm uses batch statistics and updates its running ones
    /// (`model.train()`); the transformers have no dropout, so only the
    /// ResNet tower changes.
    training: bool,
}

fn layer_norm(x: &Tensor, w: &StateDict, p: &str, eps: f64) -> Result<Tensor> {
    let g = w.get(&format!("{p}.weight"))?;
    let b = w.get(&format!("{p}.bias"))?;
    let d = g.size()[0];
    Ok(x.to_kind(Kind::Float)
        .layer_norm([d].as_slice(), Some(&g), Some(&b), eps, false))
}

fn lin(x: &Tensor, w: &StateDict, p: &str) -> Result<Tensor> {
    let b = w.get(&format!("{p}.bias"))?;
    Ok(linear(x, &w.get(&format!("{p}.weight"))?, Some(&b)))
}

/// nn.MultiheadAttention over [L, N, D] with packed in_proj.
fn mha(x: &Tensor, w: &StateDict, p: &str, heads: i64, mask: Option<&Tensor>) -> Result<Tensor> {
    let (l, n, d) = x.size3()?;
    let qkv = linear(
        x,
        &w.get(&format!("{p}.in_proj_weight"))?,
        Some(&w.get(&format!("{p}.in_proj_bias"))?),
    );
    let parts = qkv.chunk(3, -1);
    attention(
        &parts[0],
        &parts[1],
        &parts[2],
        l,
        l,
        n,
        d,
        heads,
        mask,
        |o| lin(o, w, &format!("{p}.out_proj")),
    )
}

#[allow(clippy::too_many_arguments)]
fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lq: i64,
    lk: i64,
    n: i64,
    d: i64,
    heads: i64,
    mask: Option<&Tensor>,
    out: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let hd = d / heads;
    let split = |t: &Tensor, len: i64| t.contiguous().view([len, n * heads, hd]).transpose(0, 1);
    let (q, k, v) = (
        split(q, lq) * (hd as f64).powf(-0.5),
        split(k, lk),
        split(v, lk),
    );
    let mut scores = q.matmul(&k.transpose(1, 2));
    if let Some(m) = mask {
        scores += m;
    }
    let a = scores.softmax(-1, Kind::Float).matmul(&v);
    let a = a.transpose(0, 1).contiguous().view([lq, n, d]);
    out(&a)
}

fn activation(x: &Tensor, act: Act) -> Tensor {
    match act {
        // QuickGELU: x * sigmoid(1.702 x).
        Act::QuickGelu => x * (x * 1.702).sigmoid(),
        // nn.GELU(): the exact (erf) form.
        Act::Gelu => x.gelu("none"),
    }
}

/// Transformer over [L, N, D]: pre-norm residual blocks, with open_clip's
/// LayerScale when the config has it.
fn transformer(
    x: &Tensor,
    w: &StateDict,
    p: &str,
    b: &Blocks,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let mut x = x.shallow_clone();
    let scale = |h: Tensor, key: String| -> Result<Tensor> {
        Ok(if b.layer_scale { h * w.get(&key)? } else { h })
    };
    for i in 0..b.layers {
        let r = format!("{p}.resblocks.{i}");
        let h = layer_norm(&x, w, &format!("{r}.ln_1"), b.ln_eps)?;
        let h = mha(&h, w, &format!("{r}.attn"), b.heads, mask)?;
        x = &x + scale(h, format!("{r}.ls_1.gamma"))?;
        let h = layer_norm(&x, w, &format!("{r}.ln_2"), b.ln_eps)?;
        let h = activation(&lin(&h, w, &format!("{r}.mlp.c_fc"))?, b.act);
        let h = lin(&h, w, &format!("{r}.mlp.c_proj"))?;
        x = &x + scale(h, format!("{r}.ls_2.gamma"))?;
    }
    Ok(x)
}

fn batch_norm(x: &Tensor, w: &StateDict, p: &str, train: bool) -> Result<Tensor> {
    if train {
        if let Some(n) = w.tensors.get(&format!("{p}.num_batches_tracked")) {
            let mut n = n.shallow_clone();
            tch::no_grad(|| {
                let _ = n.f_add_scalar_(1)?;
                Ok::<_, tch::TchError>(())
            })?;
        }
    }
    Ok(x.batch_norm(
        Some(&w.get(&format!("{p}.weight"))?),
        Some(&w.get(&format!("{p}.bias"))?),
        Some(&w.get(&format!("{p}.running_mean"))?),
        Some(&w.get(&format!("{p}.running_var"))?),
        train,
        0.1,
        1e-5,
        false,
    ))
}

fn conv(x: &Tensor, w: &StateDict, p: &str, stride: i64, padding: i64) -> Result<Tensor> {
    Ok(x.conv2d(
        &w.get(&format!("{p}.weight"))?,
        None::<Tensor>,
        [stride, stride],
        [padding, padding],
        [1, 1],
        1,
    ))
}

impl Clip {
    /// OpenAI's CLIP, configured from the tensors as `build_model` does.
    pub fn new(w: StateDict) -> Result<Clip> {
        let config = ClipConfig::openai(&w)?;
        Clip::with_config(w, config)
    }

    /// A checkpoint in any layout this build reads, under `arch` when given:
    /// a file (OpenAI TorchScript, torch.save state dict or training
    /// checkpoint, safetensors), a Hugging Face `CLIPModel` folder
    /// (`config.json` beside the weights), or an open_clip hub folder
    /// (`open_clip_config.json`). With neither `arch` nor a config beside
    /// the weights, OpenAI's configuration is assumed and
    /// `config.assumed` says so.
    pub fn load(path: &Path, arch: Option<&ArchSpec>, device: Device) -> Result<Clip> {
        let cfg_err = |m: String| ModelError::Config {
            path: path.to_path_buf(),
            message: m,
        };
        let (file, dir) = checkpoint_file(path)?;
        let mut sd = StateDict::load(&file, device)?;
        sd.path = path.to_path_buf();
        let read_json = |name: &str| -> Result<Option<serde_json::Value>> {
            let Some(d) = &dir else { return Ok(None) };
            let p = d.join(name);
            match std::fs::read_to_string(&p) {
                Ok(t) => serde_json::from_str(&t)
                    .map(Some)
                    .map_err(|e| cfg_err(format!("{} is not JSON: {e}", p.display()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(cfg_err(format!("cannot read {}: {e}", p.display()))),
            }
        };
        let config = match Layout::of(sd.tensors.keys()) {
            Layout::HuggingFace => {
                if let Some(a) = arch {
                    return Err(cfg_err(format!(
                        "arch {a:?} does not apply: a Hugging Face CLIPModel checkpoint is configured by its config.json; leave arch out"
                    )));
                }
                let Some(config) = read_json("config.json")? else {
                    return Err(cfg_err(
                        "its keys are a Hugging Face CLIPModel's, but no config.json is beside it: give the model's folder (config.json and the weights)".into(),
                    ));
                };
                let pre = read_json("preprocessor_config.json")?;
                sd = super::hf::to_openai_layout(sd)?;
                from_hf_config(&config, pre.as_ref(), "Hugging Face CLIPModel config.json")
                    .map_err(|m| cfg_err(format!("config.json: {m}")))?
            }
            layout => {
                if layout == Layout::CustomText {
                    sd = sd.renamed(|k| k.strip_prefix("text.").map(str::to_string));
                }
                match (arch, read_json("open_clip_config.json")?) {
                    (Some(a), _) => a.config().map_err(cfg_err)?,
                    (None, Some(v)) => {
                        let model = v.get("model_cfg").unwrap_or(&v);
                        from_open_clip_json(model, v.get("preprocess_cfg"), "open_clip_config.json")
                            .map_err(|m| cfg_err(format!("open_clip_config.json: {m}")))?
                    }
                    (None, None) => ClipConfig::openai(&sd)?,
                }
            }
        };
        Clip::with_config(sd, config)
    }

    /// The weights under a known configuration: every tensor it reads
    /// present with its shape, nothing else, all finite.
    pub fn with_config(w: StateDict, config: ClipConfig) -> Result<Clip> {
        config.validate().map_err(|m| ModelError::Config {
            path: w.path.clone(),
            message: format!("{}: {m}", config.source),
        })?;
        let another = |e| {
            match e {
            ModelError::Missing { path, key, hint } => ModelError::Missing {
                path,
                key,
                hint: format!(
                    "{hint}, which {} has: the checkpoint is another model; set arch to its configuration",
                    config.source
                ),
            },
            e => e,
        }
        };
        check_projections(&w, &config).map_err(another)?;
        let expected = config.expected();
        for (key, shape) in &expected {
            let t = w.get(key).map_err(another)?;
            if t.size() != *shape {
                return Err(ModelError::Shape {
                    path: w.path.clone(),
                    key: key.clone(),
                    got: t.size(),
                    expected: format!("{shape:?} under {}", config.source),
                });
            }
        }
        let known: std::collections::HashSet<&str> =
            expected.iter().map(|(k, _)| k.as_str()).collect();
        let mut extra: Vec<&String> = w
            .tensors
            .keys()
            .filter(|k| !known.contains(k.as_str()) && !ClipConfig::tolerated(k))
            .collect();
        extra.sort();
        if let Some(k) = extra.first() {
            return Err(ModelError::Unexpected {
                path: w.path.clone(),
                key: (*k).clone(),
                count: extra.len(),
                model: config.source.clone(),
            });
        }
        w.ensure_finite()?;
        Ok(Clip {
            config,
            w,
            training: false,
        })
    }

    /// `model.train()` / `model.eval()`.
    pub fn set_training(&mut self, on: bool) {
        self.training = on;
    }

    /// The weights the forward passes read: setting `requires_grad` on
    /// them makes the passes differentiable, and in-place updates train.
    pub fn weights(&self) -> &StateDict {
        &self.w
    }

    pub fn encode_image(&self, images: &Tensor) -> Result<Tensor> {
        let train = self.training;
        let v = self.w.sub("visual");
        match &self.config.vision {
            Vision::Vit {
                blocks: b,
                patch,
                ln_pre,
                pool,
                final_ln_after_pool,
            } => {
                let (width, patch) = (b.width, *patch);
                let x = images.conv2d(
                    &v.get("conv1.weight")?,
                    None::<Tensor>,
                    [patch, patch],
                    [0, 0],
                    [1, 1],
                    1,
                );
                let n = x.size()[0];
                let x = x.flatten(2, 3).permute([0, 2, 1]);
                let cls = v
                    .get("class_embedding")?
                    .view([1, 1, width])
                    .expand([n, 1, width], true);
                let mut x = Tensor::cat(&[&cls, &x], 1) + v.get("positional_embedding")?;
                if *ln_pre {
                    x = layer_norm(&x, &v, "ln_pre", b.ln_eps)?;
                }
                let x = transformer(&x.permute([1, 0, 2]), &v, "transformer", b, None)?
                    .permute([1, 0, 2]);
                let pooled = |x: &Tensor| match pool {
                    VisionPool::Tok => x.select(1, 0),
                    VisionPool::Avg => x.narrow(1, 1, x.size()[1] - 1).mean_dim(
                        [1i64].as_slice(),
                        false,
                        Kind::Float,
                    ),
                };
                let x = if *final_ln_after_pool {
                    layer_norm(&pooled(&x), &v, "ln_post", b.ln_eps)?
                } else {
                    pooled(&layer_norm(&x, &v, "ln_post", b.ln_eps)?)
                };
                Ok(x.matmul(&v.get("proj")?))
            }
            Vision::ResNet { layers, heads, .. } => {
                let mut x = images.shallow_clone();
                for (i, (c, b)) in [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
                    .iter()
                    .enumerate()
                {
                    x = batch_norm(
                        &conv(&x, &v, c, if i == 0 { 2 } else { 1 }, 1)?,
                        &v,
                        b,
                        train,
                    )?
                    .relu();
                }
                x = avg_pool(&x, 2);
                for (li, &blocks) in layers.iter().enumerate() {
                    for bi in 0..blocks {
                        let stride = if li > 0 && bi == 0 { 2 } else { 1 };
                        x = bottleneck(&x, &v, &format!("layer{}.{bi}", li + 1), stride, train)?;
                    }
                }
                attn_pool(&x, &v.sub("attnpool"), *heads)
            }
        }
    }

    pub fn encode_text(&self, tokens: &Tensor) -> Result<Tensor> {
        self.encode_text_from(tokens, self.token_embeddings(tokens)?)
    }

    fn token_embeddings(&self, tokens: &Tensor) -> Result<Tensor> {
        let (n, ctx) = tokens.size2()?;
        Ok(self
            .w
            .get("token_embedding.weight")?
            .index_select(0, &tokens.view([-1]))
            .view([n, ctx, -1]))
    }

    /// The text width: what a pseudo token must measure.
    pub fn token_width(&self) -> Result<i64> {
        Ok(self
            .w
            .get_shaped("token_embedding.weight", &[-1, -1])?
            .size()[1])
    }

    /// `encode_text` with every `placeholder` token's embedding replaced by
    /// its row's `pseudo` [N, width] before the positional embedding is
    /// added, as LinCIR's `encode_with_pseudo_tokens_HF` does (SEARLE's
    /// replaces the first occurrence; the same for one placeholder).
    pub fn encode_text_with_pseudo(
        &self,
        tokens: &Tensor,
        pseudo: &Tensor,
        placeholder: i64,
    ) -> Result<Tensor> {
        let x = self.token_embeddings(tokens)?;
        let at = tokens.eq(placeholder).unsqueeze(-1);
        let x = x.where_self(&at.logical_not(), &pseudo.unsqueeze(1).to_kind(x.kind()));
        self.encode_text_from(tokens, x)
    }

    fn encode_text_from(&self, tokens: &Tensor, x: Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (n, ctx) = tokens.size2()?;
        let x = x + self.w.get("positional_embedding")?.narrow(0, 0, ctx);
        let mask = c.causal.then(|| {
            Tensor::full([ctx, ctx], f64::NEG_INFINITY, (Kind::Float, x.device())).triu(1)
        });
        let x = transformer(
            &x.permute([1, 0, 2]),
            &self.w,
            "transformer",
            &c.text,
            mask.as_ref(),
        )?;
        let x = layer_norm(&x.permute([1, 0, 2]), &self.w, "ln_final", c.text.ln_eps)?;
        let at = match c.text_pool {
            TextPool::Argmax => tokens.argmax(-1, false),
            TextPool::First => Tensor::zeros([n], (Kind::Int64, x.device())),
            TextPool::Last => Tensor::full([n], ctx - 1, (Kind::Int64, x.device())),
            // The first position holding the id (0 when none does, as
            // torch's argmax of an all-zero row gives).
            TextPool::Eos(id) => tokens.eq(id).to_kind(Kind::Int).argmax(-1, false),
        };
        let rows = Tensor::arange(n, (Kind::Int64, x.device()));
        let x = x.index(&[Some(rows), Some(at.to_device(x.device()))]);
        match c.text_proj {
            TextProj::Matrix => Ok(x.matmul(&self.w.get("text_projection")?)),
            TextProj::Linear => lin(&x, &self.w, "text_projection"),
            TextProj::None => Ok(x),
        }
    }
}

/// The towers' output widths must agree; when they do not, either
/// projection may be the wrong one, so the error names both.
fn check_projections(w: &StateDict, c: &ClipConfig) -> Result<()> {
    let (image_key, image_out) = match &c.vision {
        Vision::Vit { blocks, .. } => (
            "visual.proj",
            w.get_shaped("visual.proj", &[blocks.width, -1])?.size()[1],
        ),
        Vision::ResNet { .. } => (
            "visual.attnpool.c_proj.weight",
            w.get_shaped("visual.attnpool.c_proj.weight", &[-1, -1])?
                .size()[0],
        ),
    };
    if c.text_proj == TextProj::Matrix && image_out != c.embed_dim {
        return Err(ModelError::Shape {
            path: w.path.clone(),
            key: "text_projection".into(),
            got: w.get("text_projection")?.size(),
            expected: format!(
                "[{}, {image_out}]: the image tower's {image_key} projects to {image_out}, the text tower to {}; one of the two does not belong to this model",
                c.text.width, c.embed_dim
            ),
        });
    }
    Ok(())
}

/// The weights file of a checkpoint path and the folder whose config files
/// describe it: a folder is a Hugging Face or open_clip hub download (its
/// weights file found by the names those libraries write); a file's own
/// folder holds its configs.
fn checkpoint_file(path: &Path) -> Result<(std::path::PathBuf, Option<std::path::PathBuf>)> {
    if !path.is_dir() {
        return Ok((path.to_path_buf(), path.parent().map(Path::to_path_buf)));
    }
    const NAMES: &[&str] = &[
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
    ];
    match NAMES.iter().map(|n| path.join(n)).find(|p| p.is_file()) {
        Some(f) => Ok((f, Some(path.to_path_buf()))),
        None => Err(ModelError::Load {
            path: path.to_path_buf(),
            message: format!("a folder without a weights file ({})", NAMES.join(", ")),
        }),
    }
}

/// nn.AvgPool2d(k) (stride k, no padding).
fn avg_pool(x: &Tensor, k: i64) -> Tensor {
    x.avg_pool2d([k, k], [k, k], [0, 0], false, true, None::<i64>)
}

fn bottleneck(x: &Tensor, w: &StateDict, p: &str, stride: i64, train: bool) -> Result<Tensor> {
    let out = batch_norm(
        &conv(x, w, &format!("{p}.conv1"), 1, 0)?,
        w,
        &format!("{p}.bn1"),
        train,
    )?
    .relu();
    let mut out = batch_norm(
        &conv(&out, w, &format!("{p}.conv2"), 1, 1)?,
        w,
        &format!("{p}.bn2"),
        train,
    )?
    .relu();
    if stride > 1 {
        out = avg_pool(&out, stride);
    }
    let out = batch_norm(
        &conv(&out, w, &format!("{p}.conv3"), 1, 0)?,
        w,
        &format!("{p}.bn3"),
        train,
    )?;
    let identity = if w.has(&format!("{p}.downsample.0.weight")) {
        let d = if stride > 1 {
            avg_pool(x, stride)
        } else {
            x.shallow_clone()
        };
        batch_norm(
            &conv(&d, w, &format!("{p}.downsample.0"), 1, 0)?,
            w,
            &format!("{p}.downsample.1"),
            train,
        )?
    } else {
        x.shallow_clone()
    };
    Ok((out + identity).relu())
}

fn attn_pool(x: &Tensor, w: &StateDict, heads: i64) -> Result<Tensor> {
    let (n, c, _, _) = x.size4()?;
    let x = x.flatten(2, 3).permute([2, 0, 1]);
    let x = Tensor::cat(&[&x.mean_dim([0i64].as_slice(), true, Kind::Float), &x], 0);
    let x = &x + w.get("positional_embedding")?.unsqueeze(1);
    let l = x.size()[0];
    let q = lin(&x.narrow(0, 0, 1), w, "q_proj")?;
    let k = lin(&x, w, "k_proj")?;
    let v = lin(&x, w, "v_proj")?;
    let out = attention(&q, &k, &v, 1, l, n, c, heads, None, |o| lin(o, w, "c_proj"))?;
    Ok(out.squeeze_dim(0))
}
