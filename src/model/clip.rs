//! OpenAI CLIP (clip/model.py) over a state dict: the configuration is
//! inferred from the tensors the way `build_model` does, and the forward
//! passes follow the reference module by module.

use tch::{Kind, Tensor};

use super::{linear, ModelError, Result, StateDict};

#[derive(Debug, Clone, PartialEq)]
pub enum Vision {
    Vit {
        width: i64,
        layers: i64,
        patch: i64,
        heads: i64,
    },
    ResNet {
        width: i64,
        layers: [i64; 4],
        heads: i64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub embed_dim: i64,
    pub image_resolution: i64,
    pub vision: Vision,
    pub context_length: i64,
    pub vocab_size: i64,
    pub transformer_width: i64,
    pub transformer_heads: i64,
    pub transformer_layers: i64,
}

fn count_blocks(sd: &StateDict, prefix: &str, depth: usize) -> i64 {
    let mut ids: Vec<&str> = sd
        .tensors
        .keys()
        .filter(|k| k.starts_with(prefix))
        .filter_map(|k| k.split('.').nth(depth))
        .collect();
    ids.sort();
    ids.dedup();
    ids.len() as i64
}

impl ClipConfig {
    /// What `build_model` infers from the state dict.
    pub(crate) fn infer(sd: &StateDict) -> Result<ClipConfig> {
        let vit = sd.has("visual.proj");
        let (vision, image_resolution) = if vit {
            let conv = sd.get_shaped("visual.conv1.weight", &[-1, 3, -1, -1])?;
            let width = conv.size()[0];
            let patch = conv.size()[3];
            let layers = sd
                .tensors
                .keys()
                .filter(|k| k.starts_with("visual.") && k.ends_with(".attn.in_proj_weight"))
                .count() as i64;
            let pos = sd.get_shaped("visual.positional_embedding", &[-1, width])?;
            let grid = (((pos.size()[0] - 1) as f64).sqrt()).round() as i64;
            (
                Vision::Vit {
                    width,
                    layers,
                    patch,
                    heads: width / 64,
                },
                patch * grid,
            )
        } else {
            let mut layers = [0i64; 4];
            for (b, l) in layers.iter_mut().enumerate() {
                *l = count_blocks(sd, &format!("visual.layer{}.", b + 1), 2);
            }
            if layers.contains(&0) {
                return Err(ModelError::Missing {
                    path: sd.path.clone(),
                    key: "visual.proj or visual.layer1..4".into(),
                    hint: " (not a CLIP checkpoint: no ViT projection and no ResNet layers)".into(),
                });
            }
            let width = sd
                .get_shaped("visual.layer1.0.conv1.weight", &[-1, -1, 1, 1])?
                .size()[0];
            let pos = sd.get_shaped("visual.attnpool.positional_embedding", &[-1, width * 32])?;
            let out = (((pos.size()[0] - 1) as f64).sqrt()).round() as i64;
            (
                Vision::ResNet {
                    width,
                    layers,
                    heads: width * 32 / 64,
                },
                out * 32,
            )
        };
        let embed_dim = sd.get_shaped("text_projection", &[-1, -1])?.size()[1];
        let context_length = sd.get_shaped("positional_embedding", &[-1, -1])?.size()[0];
        let vocab_size = sd.get_shaped("token_embedding.weight", &[-1, -1])?.size()[0];
        let transformer_width = sd.get_shaped("ln_final.weight", &[-1])?.size()[0];
        let transformer_layers = count_blocks(sd, "transformer.resblocks.", 2);
        Ok(ClipConfig {
            embed_dim,
            image_resolution,
            vision,
            context_length,
            vocab_size,
            transformer_width,
            transformer_heads: transformer_width / 64,
            transformer_layers,
        })
    }
}

pub struct Clip {
    pub config: ClipConfig,
    w: StateDict,
    /// BatchNorm uses batch statistics and updates its running ones
    /// (`model.train()`); the transformers have no dropout, so only the
    /// ResNet tower changes.
    training: bool,
}

fn layer_norm(x: &Tensor, w: &StateDict, p: &str) -> Result<Tensor> {
    let g = w.get(&format!("{p}.weight"))?;
    let b = w.get(&format!("{p}.bias"))?;
    let d = g.size()[0];
    Ok(x.to_kind(Kind::Float)
        .layer_norm([d].as_slice(), Some(&g), Some(&b), 1e-5, false))
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

fn quick_gelu(x: &Tensor) -> Tensor {
    x * (x * 1.702).sigmoid()
}

/// Transformer over [L, N, D].
fn transformer(
    x: &Tensor,
    w: &StateDict,
    p: &str,
    layers: i64,
    heads: i64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let mut x = x.shallow_clone();
    for i in 0..layers {
        let b = format!("{p}.resblocks.{i}");
        let h = layer_norm(&x, w, &format!("{b}.ln_1"))?;
        x = &x + mha(&h, w, &format!("{b}.attn"), heads, mask)?;
        let h = layer_norm(&x, w, &format!("{b}.ln_2"))?;
        let h = quick_gelu(&lin(&h, w, &format!("{b}.mlp.c_fc"))?);
        x = &x + lin(&h, w, &format!("{b}.mlp.c_proj"))?;
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
    pub fn new(w: StateDict) -> Result<Clip> {
        let config = ClipConfig::infer(&w)?;
        w.ensure_finite()?;
        let c = Clip {
            config,
            w,
            training: false,
        };
        c.check()?;
        Ok(c)
    }

    /// Every tensor the forward passes use is present with the right shape.
    fn check(&self) -> Result<()> {
        let c = &self.config;
        let w = &self.w;
        let tw = c.transformer_width;
        // The towers' output widths must agree; when they do not, either
        // projection may be the wrong one, so the error names both.
        let (image_key, image_out) = match &c.vision {
            Vision::Vit { width, .. } => (
                "visual.proj",
                w.get_shaped("visual.proj", &[*width, -1])?.size()[1],
            ),
            Vision::ResNet { width, .. } => (
                "visual.attnpool.c_proj.weight",
                w.get_shaped("visual.attnpool.c_proj.weight", &[-1, width * 32])?
                    .size()[0],
            ),
        };
        if image_out != c.embed_dim {
            return Err(ModelError::Shape {
                path: w.path.clone(),
                key: "text_projection".into(),
                got: w.get("text_projection")?.size(),
                expected: format!(
                    "[{tw}, {image_out}]: the image tower's {image_key} projects to {image_out}, the text tower to {}; one of the two does not belong to this model",
                    c.embed_dim
                ),
            });
        }
        let _ = w.get_shaped("token_embedding.weight", &[c.vocab_size, tw])?;
        let _ = w.get_shaped("text_projection", &[tw, c.embed_dim])?;
        for i in 0..c.transformer_layers {
            let b = format!("transformer.resblocks.{i}");
            let _ = w.get_shaped(&format!("{b}.attn.in_proj_weight"), &[3 * tw, tw])?;
            let _ = w.get_shaped(&format!("{b}.attn.out_proj.weight"), &[tw, tw])?;
            let _ = w.get_shaped(&format!("{b}.mlp.c_fc.weight"), &[4 * tw, tw])?;
            let _ = w.get_shaped(&format!("{b}.mlp.c_proj.weight"), &[tw, 4 * tw])?;
            let _ = w.get_shaped(&format!("{b}.ln_1.weight"), &[tw])?;
            let _ = w.get_shaped(&format!("{b}.ln_2.weight"), &[tw])?;
        }
        match &c.vision {
            Vision::Vit { width, layers, .. } => {
                let _ = w.get_shaped("visual.class_embedding", &[*width])?;
                let _ = w.get_shaped("visual.proj", &[*width, c.embed_dim])?;
                let _ = w.get_shaped("visual.ln_pre.weight", &[*width])?;
                let _ = w.get_shaped("visual.ln_post.weight", &[*width])?;
                for i in 0..*layers {
                    let _ = w.get_shaped(
                        &format!("visual.transformer.resblocks.{i}.attn.in_proj_weight"),
                        &[3 * width, *width],
                    )?;
                }
            }
            Vision::ResNet { width, .. } => {
                let e = width * 32;
                for p in ["q_proj", "k_proj", "v_proj"] {
                    let _ = w.get_shaped(&format!("visual.attnpool.{p}.weight"), &[e, e])?;
                }
                let _ = w.get_shaped("visual.attnpool.c_proj.weight", &[c.embed_dim, e])?;
                for p in ["bn1", "bn2", "bn3"] {
                    let _ = w.get(&format!("visual.{p}.running_mean"))?;
                }
            }
        }
        Ok(())
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
        match self.config.vision {
            Vision::Vit {
                width,
                layers,
                heads,
                patch,
            } => {
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
                let x = Tensor::cat(&[&cls, &x], 1) + v.get("positional_embedding")?;
                let x = layer_norm(&x, &v, "ln_pre")?.permute([1, 0, 2]);
                let x = transformer(&x, &v, "transformer", layers, heads, None)?.permute([1, 0, 2]);
                let x = layer_norm(&x.select(1, 0), &v, "ln_post")?;
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
                attn_pool(&x, &v.sub("attnpool"), heads)
            }
        }
    }

    pub fn encode_text(&self, tokens: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let ctx = tokens.size()[1];
        let x = self
            .w
            .get("token_embedding.weight")?
            .index_select(0, &tokens.view([-1]))
            .view([tokens.size()[0], ctx, -1]);
        let x = x + self.w.get("positional_embedding")?.narrow(0, 0, ctx);
        let mask = Tensor::full([ctx, ctx], f64::NEG_INFINITY, (Kind::Float, x.device())).triu(1);
        let x = transformer(
            &x.permute([1, 0, 2]),
            &self.w,
            "transformer",
            c.transformer_layers,
            c.transformer_heads,
            Some(&mask),
        )?;
        let x = layer_norm(&x.permute([1, 0, 2]), &self.w, "ln_final")?;
        let eot = tokens.argmax(-1, false);
        let rows = Tensor::arange(x.size()[0], (Kind::Int64, x.device()));
        let x = x.index(&[Some(rows), Some(eot)]);
        Ok(x.matmul(&self.w.get("text_projection")?))
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
