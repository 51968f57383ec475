//! A fresh CLIP in OpenAI's layout, drawn as OpenAI's
//! `initialize_parameters` draws it (ViT or ModifiedResNet image tower,
//! text Transformer), on libtorch's generator: for training from scratch.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

/// The sizes of the CLIP to draw.
pub(crate) struct ClipInit {
    /// ModifiedResNet (one bottleneck per stage, of `resnet_width`)
    /// instead of a ViT (`patch_size`, `vision_layers`).
    pub resnet: bool,
    pub resnet_width: i64,
    pub patch_size: i64,
    pub vision_layers: i64,
    /// Width of both towers (heads = width / 64, as build_model infers).
    pub width: i64,
    pub text_layers: i64,
    pub embed_dim: i64,
    pub image_resolution: i64,
    pub context_length: i64,
}

const VOCAB: i64 = 49408;

/// OpenAI's CLIP layout and initialisation for a ViT + text Transformer.
pub(crate) fn init_weights(p: &ClipInit, device: Device) -> HashMap<String, Tensor> {
    let mut w = HashMap::new();
    let opts = (Kind::Float, device);
    let normal = |shape: &[i64], std: f64| Tensor::randn(shape, opts) * std;
    let (width, d) = (p.width, p.embed_dim);
    let blocks = |prefix: &str, layers: i64, w: &mut HashMap<String, Tensor>| {
        let attn_std = (width as f64).powf(-0.5);
        let proj_std = attn_std * ((2 * layers) as f64).powf(-0.5);
        let fc_std = ((2 * width) as f64).powf(-0.5);
        for i in 0..layers {
            let b = format!("{prefix}.resblocks.{i}");
            w.insert(
                format!("{b}.attn.in_proj_weight"),
                normal(&[3 * width, width], attn_std),
            );
            w.insert(
                format!("{b}.attn.in_proj_bias"),
                Tensor::zeros([3 * width], opts),
            );
            w.insert(
                format!("{b}.attn.out_proj.weight"),
                normal(&[width, width], proj_std),
            );
            w.insert(
                format!("{b}.attn.out_proj.bias"),
                Tensor::zeros([width], opts),
            );
            for ln in ["ln_1", "ln_2"] {
                w.insert(format!("{b}.{ln}.weight"), Tensor::ones([width], opts));
                w.insert(format!("{b}.{ln}.bias"), Tensor::zeros([width], opts));
            }
            w.insert(
                format!("{b}.mlp.c_fc.weight"),
                normal(&[4 * width, width], fc_std),
            );
            w.insert(
                format!("{b}.mlp.c_fc.bias"),
                Tensor::zeros([4 * width], opts),
            );
            w.insert(
                format!("{b}.mlp.c_proj.weight"),
                normal(&[width, 4 * width], proj_std),
            );
            w.insert(format!("{b}.mlp.c_proj.bias"), Tensor::zeros([width], opts));
        }
    };
    blocks("transformer", p.text_layers, &mut w);
    let scale = (width as f64).powf(-0.5);
    if p.resnet {
        init_resnet(p, device, &mut w);
    } else {
        blocks("visual.transformer", p.vision_layers, &mut w);
        let grid = p.image_resolution / p.patch_size;
        w.insert(
            "visual.conv1.weight".into(),
            kaiming(&[width, 3, p.patch_size, p.patch_size], device),
        );
        w.insert("visual.class_embedding".into(), normal(&[width], scale));
        w.insert(
            "visual.positional_embedding".into(),
            normal(&[grid * grid + 1, width], scale),
        );
        w.insert("visual.proj".into(), normal(&[width, d], scale));
        for ln in ["visual.ln_pre", "visual.ln_post"] {
            w.insert(format!("{ln}.weight"), Tensor::ones([width], opts));
            w.insert(format!("{ln}.bias"), Tensor::zeros([width], opts));
        }
    }
    {
        let ln = "ln_final";
        w.insert(format!("{ln}.weight"), Tensor::ones([width], opts));
        w.insert(format!("{ln}.bias"), Tensor::zeros([width], opts));
    }
    w.insert(
        "token_embedding.weight".into(),
        normal(&[VOCAB, width], 0.02),
    );
    w.insert(
        "positional_embedding".into(),
        normal(&[p.context_length, width], 0.01),
    );
    w.insert("text_projection".into(), normal(&[width, d], scale));
    w.insert(
        "logit_scale".into(),
        Tensor::from((1.0f64 / 0.07).ln() as f32).to_device(device),
    );
    w
}

/// PyTorch's default conv/linear weight draw: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
fn kaiming(shape: &[i64], device: Device) -> Tensor {
    let fan_in: i64 = shape[1..].iter().product();
    let b = 1.0 / (fan_in as f64).sqrt();
    Tensor::rand(shape, (Kind::Float, device)) * (2.0 * b) - b
}

/// OpenAI's ModifiedResNet, layers (1, 1, 1, 1), as `initialize_parameters`
/// draws it: default conv draws, BatchNorm at (1, 0) with the last one of
/// each bottleneck zeroed, attention-pool projections N(0, in^-1/2).
fn init_resnet(p: &ClipInit, device: Device, w: &mut HashMap<String, Tensor>) {
    let opts = (Kind::Float, device);
    let rw = p.resnet_width;
    let conv = |w: &mut HashMap<String, Tensor>, name: &str, out: i64, inp: i64, k: i64| {
        w.insert(
            format!("visual.{name}.weight"),
            kaiming(&[out, inp, k, k], device),
        );
    };
    let bn = |w: &mut HashMap<String, Tensor>, name: &str, c: i64, zero: bool| {
        let g = if zero {
            Tensor::zeros([c], opts)
        } else {
            Tensor::ones([c], opts)
        };
        w.insert(format!("visual.{name}.weight"), g);
        w.insert(format!("visual.{name}.bias"), Tensor::zeros([c], opts));
        w.insert(
            format!("visual.{name}.running_mean"),
            Tensor::zeros([c], opts),
        );
        w.insert(
            format!("visual.{name}.running_var"),
            Tensor::ones([c], opts),
        );
        w.insert(
            format!("visual.{name}.num_batches_tracked"),
            Tensor::zeros([], (Kind::Int64, device)),
        );
    };
    for (i, (inp, out)) in [(3, rw / 2), (rw / 2, rw / 2), (rw / 2, rw)]
        .iter()
        .enumerate()
    {
        conv(w, &format!("conv{}", i + 1), *out, *inp, 3);
        bn(w, &format!("bn{}", i + 1), *out, false);
    }
    let mut inplanes = rw;
    for l in 0..4 {
        let planes = rw << l;
        let b = format!("layer{}.0", l + 1);
        conv(w, &format!("{b}.conv1"), planes, inplanes, 1);
        bn(w, &format!("{b}.bn1"), planes, false);
        conv(w, &format!("{b}.conv2"), planes, planes, 3);
        bn(w, &format!("{b}.bn2"), planes, false);
        conv(w, &format!("{b}.conv3"), planes * 4, planes, 1);
        bn(w, &format!("{b}.bn3"), planes * 4, true);
        // Every first block changes width (and stride past layer1).
        conv(w, &format!("{b}.downsample.0"), planes * 4, inplanes, 1);
        bn(w, &format!("{b}.downsample.1"), planes * 4, false);
        inplanes = planes * 4;
    }
    let e = rw * 32;
    let grid = p.image_resolution / 32;
    w.insert(
        "visual.attnpool.positional_embedding".into(),
        Tensor::randn([grid * grid + 1, e], opts) / (e as f64).sqrt(),
    );
    for (name, out) in [
        ("q_proj", e),
        ("k_proj", e),
        ("v_proj", e),
        ("c_proj", p.embed_dim),
    ] {
        w.insert(
            format!("visual.attnpool.{name}.weight"),
            Tensor::randn([out, e], opts) * (e as f64).powf(-0.5),
        );
        let b = 1.0 / (e as f64).sqrt();
        w.insert(
            format!("visual.attnpool.{name}.bias"),
            Tensor::rand([out], opts) * (2.0 * b) - b,
        );
    }
}
