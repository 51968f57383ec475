//! Which CLIP a checkpoint is. Three sources of a configuration:
//! OpenAI's (inferred from the tensors, as `clip/model.py`'s `build_model`
//! does), open_clip's (a model name from the table below, or a model-config
//! JSON in the format of open_clip's `model_configs/*.json`), and Hugging
//! Face's (`config.json` of a `CLIPModel`). Every source yields one
//! [`ClipConfig`]; the forward passes read nothing else, and the
//! checkpoint must hold exactly the tensors [`ClipConfig::expected`] lists.
//!
//! The named table was written from open_clip 3.3.0's configs and
//! `model.py`/`transformer.py` (CLIPVisionCfg, CLIPTextCfg defaults); a test
//! compares every entry with `open_clip.get_model_config(name)`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::preprocess::{Preprocess, CLIP_MEAN, CLIP_STD};
use super::{ModelError, StateDict};

/// The MLP's activation. OpenAI trained with QuickGELU; open_clip builds
/// `nn.GELU` unless the config says `quick_gelu` (LAION, DataComp weights).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Act {
    QuickGelu,
    Gelu,
}

/// One transformer tower's blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct Blocks {
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    /// `int(width * mlp_ratio)`.
    pub mlp_width: i64,
    /// open_clip's LayerScale (`ls_1.gamma`, `ls_2.gamma`) when
    /// `ls_init_value` is set.
    pub layer_scale: bool,
    pub act: Act,
    /// LayerNorm's eps (`norm_kwargs.eps`; HF's `layer_norm_eps`).
    pub ln_eps: f64,
}

/// How the ViT turns its tokens into one feature (open_clip `pool_type`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VisionPool {
    /// The class token (`tok`, OpenAI's).
    Tok,
    /// The mean of the patch tokens (`avg`).
    Avg,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Vision {
    Vit {
        blocks: Blocks,
        patch: i64,
        /// `ln_pre` before the transformer (open_clip `no_ln_pre` = false).
        ln_pre: bool,
        pool: VisionPool,
        /// LayerNorm after pooling instead of before (open_clip
        /// `final_ln_after_pool`).
        final_ln_after_pool: bool,
    },
    ResNet {
        width: i64,
        layers: [i64; 4],
        heads: i64,
    },
}

/// Which token's feature the text tower returns (open_clip
/// `text_global_pool`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TextPool {
    /// The highest token id (the end-of-text token in CLIP's vocabulary).
    Argmax,
    First,
    Last,
    /// The first occurrence of this id.
    Eos(i64),
}

/// The text projection: a `[width, embed]` matrix (OpenAI), an
/// `nn.Linear` with bias (open_clip `proj_bias`), or none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TextProj {
    Matrix,
    Linear,
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub embed_dim: i64,
    pub image_resolution: i64,
    pub vision: Vision,
    pub context_length: i64,
    pub vocab_size: i64,
    pub text: Blocks,
    /// The causal attention mask (open_clip `no_causal_mask` = false).
    pub causal: bool,
    pub text_pool: TextPool,
    pub text_proj: TextProj,
    /// How images are prepared for this model.
    pub preprocess: Preprocess,
    /// Where the configuration came from, for notes and errors.
    pub source: String,
    /// True when nothing said which CLIP this is and OpenAI's was assumed.
    pub assumed: bool,
    /// Whose names the fields had, for errors that name them.
    pub fields: Fields,
}

/// The naming scheme of the source a configuration came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fields {
    /// open_clip's model-config JSON (`vision_cfg`, `text_cfg`) or its table.
    OpenClip,
    /// A Hugging Face `config.json` (`vision_config`, `text_config`).
    HuggingFace,
    /// Inferred from an OpenAI state dict's tensors, as `build_model` does.
    Inferred,
}

/// What a configuration sets, per tower where there are two.
#[derive(Debug, Clone, Copy)]
enum Field {
    Embed,
    Image,
    Patch,
    Width(bool),
    Layers(bool),
    Heads(bool),
    Mlp(bool),
    Eps(bool),
    Context,
    Vocab,
    Eos,
}

/// Bounds far beyond every released CLIP (ViT-bigG: width 1664, 48
/// layers; EVA's 64) that keep a lying config from building a model no
/// machine holds.
const MAX_WIDTH: i64 = 1 << 14;
const MAX_LAYERS: i64 = 256;
const MAX_IMAGE: i64 = 4096;
const MAX_VOCAB: i64 = 1 << 22;

impl Fields {
    /// The field's name in this scheme (`true` is the vision tower).
    fn name(self, f: Field) -> &'static str {
        use Field::*;
        match (self, f) {
            (Fields::OpenClip, Embed) => "embed_dim",
            (Fields::OpenClip, Image) => "vision_cfg.image_size",
            (Fields::OpenClip, Patch) => "vision_cfg.patch_size",
            (Fields::OpenClip, Width(true)) => "vision_cfg.width",
            (Fields::OpenClip, Width(false)) => "text_cfg.width",
            (Fields::OpenClip, Layers(true)) => "vision_cfg.layers",
            (Fields::OpenClip, Layers(false)) => "text_cfg.layers",
            (Fields::OpenClip, Heads(true)) => "vision_cfg.head_width",
            (Fields::OpenClip, Heads(false)) => "text_cfg.heads",
            (Fields::OpenClip, Mlp(true)) => "vision_cfg.mlp_ratio",
            (Fields::OpenClip, Mlp(false)) => "text_cfg.mlp_ratio",
            (Fields::OpenClip, Eps(true)) => "vision_cfg.norm_kwargs.eps",
            (Fields::OpenClip, Eps(false)) => "text_cfg.norm_kwargs.eps",
            (Fields::OpenClip, Context) => "text_cfg.context_length",
            (Fields::OpenClip, Vocab) => "text_cfg.vocab_size",
            (Fields::OpenClip, Eos) => "text_cfg.eos_id",
            (Fields::HuggingFace, Embed) => "projection_dim",
            (Fields::HuggingFace, Image) => "vision_config.image_size",
            (Fields::HuggingFace, Patch) => "vision_config.patch_size",
            (Fields::HuggingFace, Width(true)) => "vision_config.hidden_size",
            (Fields::HuggingFace, Width(false)) => "text_config.hidden_size",
            (Fields::HuggingFace, Layers(true)) => "vision_config.num_hidden_layers",
            (Fields::HuggingFace, Layers(false)) => "text_config.num_hidden_layers",
            (Fields::HuggingFace, Heads(true)) => "vision_config.num_attention_heads",
            (Fields::HuggingFace, Heads(false)) => "text_config.num_attention_heads",
            (Fields::HuggingFace, Mlp(true)) => "vision_config.intermediate_size",
            (Fields::HuggingFace, Mlp(false)) => "text_config.intermediate_size",
            (Fields::HuggingFace, Eps(true)) => "vision_config.layer_norm_eps",
            (Fields::HuggingFace, Eps(false)) => "text_config.layer_norm_eps",
            (Fields::HuggingFace, Context) => "text_config.max_position_embeddings",
            (Fields::HuggingFace, Vocab) => "text_config.vocab_size",
            (Fields::HuggingFace, Eos) => "text_config.eos_token_id",
            (Fields::Inferred, Embed) => "text_projection's columns",
            (Fields::Inferred, Image) => {
                "the image size (patch x grid of visual.positional_embedding)"
            }
            (Fields::Inferred, Patch) => "visual.conv1.weight's kernel",
            (Fields::Inferred, Width(true)) => "visual.conv1.weight's rows",
            (Fields::Inferred, Width(false)) => "ln_final.weight's size",
            (Fields::Inferred, Layers(true)) => "the visual resblocks",
            (Fields::Inferred, Layers(false)) => "the transformer resblocks",
            (Fields::Inferred, Heads(_)) => {
                "the heads (width // 64, as OpenAI's build_model infers them)"
            }
            (Fields::Inferred, Mlp(_)) => "the MLP width (4 x width)",
            (Fields::Inferred, Eps(_)) => "the LayerNorm eps",
            (Fields::Inferred, Context) => "positional_embedding's rows",
            (Fields::Inferred, Vocab) => "token_embedding.weight's rows",
            (Fields::Inferred, Eos) => "the end-of-text id",
        }
    }
}

impl ClipConfig {
    /// Every field checked against its meaning before a tensor is built:
    /// sizes positive and bounded, heads dividing widths, the patch inside
    /// the image. The error names the field as the source spells it.
    pub fn validate(&self) -> Result<(), String> {
        let name = |f: Field| self.fields.name(f);
        let range = |f: Field, v: i64, lo: i64, hi: i64| -> Result<(), String> {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{} is {v}; it must be {lo} to {hi}", name(f)))
            }
        };
        let blocks = |b: &Blocks, vision: bool| -> Result<(), String> {
            range(Field::Width(vision), b.width, 1, MAX_WIDTH)?;
            range(Field::Layers(vision), b.layers, 1, MAX_LAYERS)?;
            range(Field::Mlp(vision), b.mlp_width, 1, 16 * MAX_WIDTH)?;
            if b.heads < 1 || b.width % b.heads != 0 {
                return Err(format!(
                    "{} gives {} attention heads for width {}: heads must be at least 1 and divide the width",
                    name(Field::Heads(vision)),
                    b.heads,
                    b.width
                ));
            }
            if !(b.ln_eps.is_finite() && b.ln_eps > 0.0) {
                return Err(format!(
                    "{} is {}; it must be a positive number",
                    name(Field::Eps(vision)),
                    b.ln_eps
                ));
            }
            Ok(())
        };
        range(Field::Embed, self.embed_dim, 1, MAX_WIDTH)?;
        range(Field::Image, self.image_resolution, 1, MAX_IMAGE)?;
        match &self.vision {
            Vision::Vit {
                blocks: b, patch, ..
            } => {
                blocks(b, true)?;
                range(Field::Patch, *patch, 1, self.image_resolution)?;
            }
            Vision::ResNet {
                width,
                layers,
                heads,
            } => {
                range(Field::Width(true), *width, 1, MAX_WIDTH)?;
                for l in layers {
                    range(Field::Layers(true), *l, 1, MAX_LAYERS)?;
                }
                // The attention pool runs over the last stage's 32 x width
                // channels on a grid of image / 32.
                if *heads < 1 || (width * 32) % heads != 0 {
                    return Err(format!(
                        "{} gives {heads} attention-pool heads for {} channels: heads must be at least 1 and divide them",
                        name(Field::Heads(true)),
                        width * 32
                    ));
                }
                if self.image_resolution % 32 != 0 {
                    return Err(format!(
                        "{} is {}; a ModifiedResNet needs a multiple of 32",
                        name(Field::Image),
                        self.image_resolution
                    ));
                }
            }
        }
        blocks(&self.text, false)?;
        range(Field::Context, self.context_length, 1, 1 << 14)?;
        range(Field::Vocab, self.vocab_size, 1, MAX_VOCAB)?;
        if let TextPool::Eos(id) = self.text_pool {
            range(Field::Eos, id, 0, self.vocab_size - 1)?;
        }
        Ok(())
    }
}

/// The note a stage writes when it assumed OpenAI's configuration.
pub const ASSUMED_NOTE: &str =
    "assumed OpenAI CLIP config (QuickGELU, head width 64): set arch for open_clip weights";

/// What the `arch` param (or `--arch`) names.
#[derive(Debug, Clone, PartialEq)]
pub enum ArchSpec {
    /// An open_clip model name from [`NAMED`].
    Named(&'static str),
    /// An open_clip model-config JSON.
    Json(PathBuf),
}

impl ArchSpec {
    /// A name from the table, or a path ending in `.json` (relative to
    /// `base`); anything else is an error listing the known names.
    pub fn parse(s: &str, base: &Path) -> Result<ArchSpec, String> {
        if let Some((name, _)) = NAMED.iter().find(|(n, _)| *n == s) {
            return Ok(ArchSpec::Named(name));
        }
        if s.ends_with(".json") {
            let p = Path::new(s);
            return Ok(ArchSpec::Json(if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }));
        }
        Err(format!(
            "unknown arch '{s}': use one of {}, or the path of an open_clip model-config .json",
            known_names().join(", ")
        ))
    }

    /// The configuration it names.
    pub fn config(&self) -> Result<ClipConfig, String> {
        match self {
            ArchSpec::Named(n) => named(n).ok_or_else(|| format!("unknown arch '{n}'")),
            ArchSpec::Json(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read arch file {}: {e}", p.display()))?;
                let v: Value = serde_json::from_str(&text)
                    .map_err(|e| format!("arch file {} is not JSON: {e}", p.display()))?;
                // open_clip's hub folders wrap it: {"model_cfg": ..., "preprocess_cfg": ...}.
                let (model, pre) = match v.get("model_cfg") {
                    Some(m) => (m, v.get("preprocess_cfg")),
                    None => (&v, v.get("preprocess_cfg")),
                };
                from_open_clip_json(model, pre, &format!("open_clip config {}", p.display()))
                    .map_err(|e| format!("arch file {}: {e}", p.display()))
            }
        }
    }
}

/// A stage's `arch` param resolved (a name from the table or a config
/// file); `None` when it is left out.
pub fn arch_spec(arch: Option<&str>, base: &Path) -> Result<Option<ArchSpec>, String> {
    arch.map(|a| ArchSpec::parse(a, base)).transpose()
}

/// The open_clip model names this build knows, sorted.
pub fn known_names() -> Vec<&'static str> {
    let mut v: Vec<&str> = NAMED.iter().map(|(n, _)| *n).collect();
    v.sort();
    v
}

/// One open_clip config, in the few numbers that differ between the
/// common ones. Vision: `layers` (ViT) or `rn` (ModifiedResNet stages).
struct Named {
    embed: i64,
    image: i64,
    v_layers: i64,
    rn: Option<[i64; 4]>,
    v_width: i64,
    v_head_width: i64,
    v_mlp_ratio: f64,
    patch: i64,
    t_width: i64,
    t_heads: i64,
    t_layers: i64,
    quick_gelu: bool,
}

const fn vit(
    embed: i64,
    image: i64,
    v: (i64, i64, i64, f64, i64),
    t: (i64, i64, i64),
    quick_gelu: bool,
) -> Named {
    Named {
        embed,
        image,
        v_layers: v.0,
        rn: None,
        v_width: v.1,
        v_head_width: v.2,
        v_mlp_ratio: v.3,
        patch: v.4,
        t_width: t.0,
        t_heads: t.1,
        t_layers: t.2,
        quick_gelu,
    }
}

const fn rn(
    embed: i64,
    image: i64,
    layers: [i64; 4],
    width: i64,
    t: (i64, i64, i64),
    q: bool,
) -> Named {
    Named {
        embed,
        image,
        v_layers: 0,
        rn: Some(layers),
        v_width: width,
        v_head_width: 64,
        v_mlp_ratio: 4.0,
        patch: 0,
        t_width: t.0,
        t_heads: t.1,
        t_layers: t.2,
        quick_gelu: q,
    }
}

/// open_clip's common CLIP configs (text: 77 tokens, CLIP's 49,408-token
/// vocabulary). ViT: (layers, width, head width, MLP ratio, patch).
static NAMED: &[(&str, Named)] = &[
    ("RN50", rn(1024, 224, [3, 4, 6, 3], 64, (512, 8, 12), false)),
    (
        "RN50-quickgelu",
        rn(1024, 224, [3, 4, 6, 3], 64, (512, 8, 12), true),
    ),
    (
        "RN101",
        rn(512, 224, [3, 4, 23, 3], 64, (512, 8, 12), false),
    ),
    (
        "RN101-quickgelu",
        rn(512, 224, [3, 4, 23, 3], 64, (512, 8, 12), true),
    ),
    (
        "RN50x4",
        rn(640, 288, [4, 6, 10, 6], 80, (640, 10, 12), false),
    ),
    (
        "RN50x4-quickgelu",
        rn(640, 288, [4, 6, 10, 6], 80, (640, 10, 12), true),
    ),
    (
        "RN50x16",
        rn(768, 384, [6, 8, 18, 8], 96, (768, 12, 12), false),
    ),
    (
        "RN50x16-quickgelu",
        rn(768, 384, [6, 8, 18, 8], 96, (768, 12, 12), true),
    ),
    (
        "RN50x64",
        rn(1024, 448, [3, 15, 36, 10], 128, (1024, 16, 12), false),
    ),
    (
        "RN50x64-quickgelu",
        rn(1024, 448, [3, 15, 36, 10], 128, (1024, 16, 12), true),
    ),
    (
        "ViT-B-32",
        vit(512, 224, (12, 768, 64, 4.0, 32), (512, 8, 12), false),
    ),
    (
        "ViT-B-32-quickgelu",
        vit(512, 224, (12, 768, 64, 4.0, 32), (512, 8, 12), true),
    ),
    (
        "ViT-B-32-256",
        vit(512, 256, (12, 768, 64, 4.0, 32), (512, 8, 12), false),
    ),
    (
        "ViT-B-16",
        vit(512, 224, (12, 768, 64, 4.0, 16), (512, 8, 12), false),
    ),
    (
        "ViT-B-16-quickgelu",
        vit(512, 224, (12, 768, 64, 4.0, 16), (512, 8, 12), true),
    ),
    (
        "ViT-B-16-plus-240",
        vit(640, 240, (12, 896, 64, 4.0, 16), (640, 10, 12), false),
    ),
    (
        "ViT-L-14",
        vit(768, 224, (24, 1024, 64, 4.0, 14), (768, 12, 12), false),
    ),
    (
        "ViT-L-14-quickgelu",
        vit(768, 224, (24, 1024, 64, 4.0, 14), (768, 12, 12), true),
    ),
    (
        "ViT-L-14-336",
        vit(768, 336, (24, 1024, 64, 4.0, 14), (768, 12, 12), false),
    ),
    (
        "ViT-L-14-336-quickgelu",
        vit(768, 336, (24, 1024, 64, 4.0, 14), (768, 12, 12), true),
    ),
    (
        "ViT-H-14",
        vit(1024, 224, (32, 1280, 80, 4.0, 14), (1024, 16, 24), false),
    ),
    (
        "ViT-H-14-quickgelu",
        vit(1024, 224, (32, 1280, 80, 4.0, 14), (1024, 16, 24), true),
    ),
    (
        "ViT-H-14-378",
        vit(1024, 378, (32, 1280, 80, 4.0, 14), (1024, 16, 24), false),
    ),
    (
        "ViT-H-14-378-quickgelu",
        vit(1024, 378, (32, 1280, 80, 4.0, 14), (1024, 16, 24), true),
    ),
    (
        "ViT-g-14",
        vit(1024, 224, (40, 1408, 88, 4.3637, 14), (1024, 16, 24), false),
    ),
    (
        "ViT-bigG-14",
        vit(
            1280,
            224,
            (48, 1664, 104, 4.9231, 14),
            (1280, 20, 32),
            false,
        ),
    ),
    (
        "ViT-bigG-14-quickgelu",
        vit(1280, 224, (48, 1664, 104, 4.9231, 14), (1280, 20, 32), true),
    ),
];

/// The configuration of an open_clip model name in the table.
pub fn named(name: &str) -> Option<ClipConfig> {
    let (n, c) = NAMED.iter().find(|(n, _)| *n == name)?;
    let act = if c.quick_gelu {
        Act::QuickGelu
    } else {
        Act::Gelu
    };
    let vision = match c.rn {
        Some(layers) => Vision::ResNet {
            width: c.v_width,
            layers,
            heads: c.v_width * 32 / c.v_head_width,
        },
        None => Vision::Vit {
            blocks: Blocks {
                width: c.v_width,
                layers: c.v_layers,
                heads: c.v_width / c.v_head_width,
                mlp_width: (c.v_width as f64 * c.v_mlp_ratio) as i64,
                layer_scale: false,
                act,
                ln_eps: 1e-5,
            },
            patch: c.patch,
            ln_pre: true,
            pool: VisionPool::Tok,
            final_ln_after_pool: false,
        },
    };
    Some(ClipConfig {
        embed_dim: c.embed,
        image_resolution: c.image,
        vision,
        context_length: 77,
        vocab_size: 49408,
        text: Blocks {
            width: c.t_width,
            layers: c.t_layers,
            heads: c.t_heads,
            mlp_width: c.t_width * 4,
            layer_scale: false,
            act,
            ln_eps: 1e-5,
        },
        causal: true,
        text_pool: TextPool::Argmax,
        text_proj: TextProj::Matrix,
        preprocess: Preprocess::openai(c.image as u32),
        source: format!("open_clip {n}"),
        assumed: false,
        fields: Fields::OpenClip,
    })
}

fn int(v: &Value, key: &str, default: i64) -> Result<i64, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_i64()
            .ok_or_else(|| format!("{key} must be an integer, got {x}")),
    }
}

fn float(v: &Value, key: &str, default: f64) -> Result<f64, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_f64()
            .ok_or_else(|| format!("{key} must be a number, got {x}")),
    }
}

fn boolean(v: &Value, key: &str) -> Result<bool, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(x) => x
            .as_bool()
            .ok_or_else(|| format!("{key} must be true or false, got {x}")),
    }
}

/// `norm_kwargs.eps` (nn.LayerNorm's default 1e-5).
fn ln_eps(v: &Value) -> Result<f64, String> {
    match v.get("norm_kwargs") {
        None | Some(Value::Null) => Ok(1e-5),
        Some(k) => {
            if let Some(o) = k.as_object() {
                if let Some(bad) = o.keys().find(|k| *k != "eps") {
                    return Err(format!("norm_kwargs.{bad} is not supported (only eps)"));
                }
            }
            float(k, "eps", 1e-5)
        }
    }
}

/// Options open_clip has that this model layer does not implement: an
/// error naming them, never a silent different model.
fn refuse(cfg: &Value, tower: &str, keys: &[(&str, &str)]) -> Result<(), String> {
    for (k, why) in keys {
        let set = match cfg.get(*k) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::String(s)) => !(s.is_empty() || s == "default" || s == "learnable"),
            Some(_) => true,
        };
        if set {
            return Err(format!("{tower}.{k} = {} is not supported: {why}", cfg[*k]));
        }
    }
    Ok(())
}

/// A configuration from open_clip's model-config JSON (`embed_dim`,
/// `quick_gelu`, `vision_cfg`, `text_cfg`, `custom_text`) and, when given,
/// its `preprocess_cfg` (`mean`, `std`; bicubic `shortest` resizing only).
pub fn from_open_clip_json(
    v: &Value,
    preprocess: Option<&Value>,
    source: &str,
) -> Result<ClipConfig, String> {
    let obj = v
        .as_object()
        .ok_or("the model config must be a JSON object")?;
    for k in obj.keys() {
        if !matches!(
            k.as_str(),
            "embed_dim"
                | "quick_gelu"
                | "vision_cfg"
                | "text_cfg"
                | "custom_text"
                | "preprocess_cfg"
        ) {
            return Err(format!(
                "{k} is not supported (CoCa, SigLIP and other non-CLIP heads are not implemented)"
            ));
        }
    }
    let embed_dim = int(v, "embed_dim", 0)?;
    if embed_dim <= 0 {
        return Err("embed_dim must be a positive integer".into());
    }
    let act = if boolean(v, "quick_gelu")? {
        Act::QuickGelu
    } else {
        Act::Gelu
    };
    let vc = v.get("vision_cfg").ok_or("vision_cfg is missing")?;
    let tc = v.get("text_cfg").ok_or("text_cfg is missing")?;
    refuse(
        vc,
        "vision_cfg",
        &[
            ("timm_model_name", "timm image towers are not implemented"),
            (
                "attentional_pool",
                "the attentional pooler (CoCa) is not implemented",
            ),
            ("block_type", "custom attention blocks are not implemented"),
            ("qk_norm", "custom attention blocks are not implemented"),
            (
                "scaled_cosine_attn",
                "custom attention blocks are not implemented",
            ),
            ("scale_heads", "custom attention blocks are not implemented"),
            (
                "scale_attn_inner",
                "custom attention blocks are not implemented",
            ),
            ("scale_attn", "custom attention blocks are not implemented"),
            ("scale_fc", "custom attention blocks are not implemented"),
            ("act_kwargs", "activation options are not implemented"),
            (
                "pos_embed_type",
                "only learnable position embeddings are implemented",
            ),
        ],
    )?;
    refuse(
        tc,
        "text_cfg",
        &[
            (
                "hf_model_name",
                "Hugging Face text towers are not implemented",
            ),
            (
                "hf_tokenizer_name",
                "only CLIP's BPE tokenizer is implemented",
            ),
            ("tokenizer_mode", "only CLIP's BPE tokenizer is implemented"),
            (
                "embed_cls",
                "the appended class token (CoCa) is not implemented",
            ),
            ("block_type", "custom attention blocks are not implemented"),
            ("qk_norm", "custom attention blocks are not implemented"),
            (
                "scaled_cosine_attn",
                "custom attention blocks are not implemented",
            ),
            ("scale_heads", "custom attention blocks are not implemented"),
            (
                "scale_attn_inner",
                "custom attention blocks are not implemented",
            ),
            ("scale_attn", "custom attention blocks are not implemented"),
            ("scale_fc", "custom attention blocks are not implemented"),
            ("act_kwargs", "activation options are not implemented"),
        ],
    )?;
    let image_resolution = match vc.get("image_size") {
        Some(Value::Array(a)) if a.len() == 2 && a[0] == a[1] => a[0].as_i64().unwrap_or(0),
        Some(Value::Array(_)) => {
            return Err("vision_cfg.image_size: only square images are supported".into())
        }
        _ => int(vc, "image_size", 224)?,
    };
    let head_width = int(vc, "head_width", 64)?;
    let v_width = int(vc, "width", 768)?;
    if head_width <= 0 || v_width <= 0 {
        return Err("vision_cfg.width and head_width must be positive".into());
    }
    let vision = match vc.get("layers") {
        Some(Value::Array(a)) => {
            let l: Vec<i64> = a.iter().filter_map(Value::as_i64).collect();
            let layers: [i64; 4] = l
                .try_into()
                .map_err(|_| "vision_cfg.layers: a ModifiedResNet has four stages".to_string())?;
            Vision::ResNet {
                width: v_width,
                layers,
                heads: v_width * 32 / head_width,
            }
        }
        _ => {
            let pool = match vc.get("pool_type").and_then(Value::as_str).unwrap_or("tok") {
                "tok" => VisionPool::Tok,
                "avg" => VisionPool::Avg,
                p => {
                    return Err(format!(
                        "vision_cfg.pool_type '{p}' is not supported (tok, avg)"
                    ))
                }
            };
            let width = v_width;
            Vision::Vit {
                blocks: Blocks {
                    width,
                    layers: int(vc, "layers", 12)?,
                    heads: width / head_width,
                    mlp_width: (width as f64 * float(vc, "mlp_ratio", 4.0)?) as i64,
                    layer_scale: vc.get("ls_init_value").is_some_and(|x| !x.is_null()),
                    act,
                    ln_eps: ln_eps(vc)?,
                },
                patch: int(vc, "patch_size", 16)?,
                ln_pre: !boolean(vc, "no_ln_pre")?,
                pool,
                final_ln_after_pool: boolean(vc, "final_ln_after_pool")?,
            }
        }
    };
    let t_width = int(tc, "width", 512)?;
    let text_pool = match tc
        .get("pool_type")
        .and_then(Value::as_str)
        .unwrap_or("argmax")
    {
        "argmax" => TextPool::Argmax,
        "first" => TextPool::First,
        "last" => TextPool::Last,
        "eos" => TextPool::Eos(int(tc, "eos_id", 2)?),
        p => {
            return Err(format!(
                "text_cfg.pool_type '{p}' is not supported (argmax, first, last, eos)"
            ))
        }
    };
    let text_proj = if tc.get("proj_type").and_then(Value::as_str) == Some("none") {
        TextProj::None
    } else if boolean(tc, "proj_bias")? {
        TextProj::Linear
    } else {
        TextProj::Matrix
    };
    let pre = match preprocess {
        Some(p) => preprocess_cfg(p, image_resolution as u32)?,
        None => Preprocess::openai(image_resolution as u32),
    };
    Ok(ClipConfig {
        embed_dim,
        image_resolution,
        vision,
        context_length: int(tc, "context_length", 77)?,
        vocab_size: int(tc, "vocab_size", 49408)?,
        text: Blocks {
            width: t_width,
            layers: int(tc, "layers", 12)?,
            heads: int(tc, "heads", 8)?,
            mlp_width: (t_width as f64 * float(tc, "mlp_ratio", 4.0)?) as i64,
            layer_scale: tc.get("ls_init_value").is_some_and(|x| !x.is_null()),
            act,
            ln_eps: ln_eps(tc)?,
        },
        causal: !boolean(tc, "no_causal_mask")?,
        text_pool,
        text_proj,
        preprocess: pre,
        source: source.to_string(),
        assumed: false,
        fields: Fields::OpenClip,
    })
}

fn triple(v: &Value, key: &str, default: [f32; 3]) -> Result<[f32; 3], String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Array(a)) if a.len() == 3 => {
            let mut out = [0f32; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x
                    .as_f64()
                    .ok_or_else(|| format!("{key} must hold numbers"))? as f32;
            }
            Ok(out)
        }
        Some(x) => match x.as_f64() {
            Some(f) => Ok([f as f32; 3]),
            None => Err(format!("{key} must be three numbers")),
        },
    }
}

/// open_clip's `preprocess_cfg`: mean and std; other settings only at the
/// values this build reproduces.
fn preprocess_cfg(p: &Value, size: u32) -> Result<Preprocess, String> {
    if let Some(i) = p.get("interpolation").and_then(Value::as_str) {
        if i != "bicubic" {
            return Err(format!(
                "preprocess_cfg.interpolation '{i}' is not supported (bicubic)"
            ));
        }
    }
    if let Some(r) = p.get("resize_mode").and_then(Value::as_str) {
        if r != "shortest" {
            return Err(format!(
                "preprocess_cfg.resize_mode '{r}' is not supported (shortest)"
            ));
        }
    }
    let mut pre = Preprocess::openai(size);
    pre.mean = triple(p, "mean", CLIP_MEAN)?;
    pre.std = triple(p, "std", CLIP_STD)?;
    Ok(pre)
}

fn hf_act(v: &Value) -> Result<Act, String> {
    match v
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("quick_gelu")
    {
        "quick_gelu" => Ok(Act::QuickGelu),
        "gelu" => Ok(Act::Gelu),
        a => Err(format!(
            "hidden_act '{a}' is not supported (quick_gelu, gelu)"
        )),
    }
}

/// A Hugging Face `CLIPModel` `config.json` (defaults as CLIPTextConfig and
/// CLIPVisionConfig of transformers 4.57 give them), and its
/// `preprocessor_config.json` when there is one.
pub fn from_hf_config(
    config: &Value,
    preprocessor: Option<&Value>,
    source: &str,
) -> Result<ClipConfig, String> {
    if let Some(t) = config.get("model_type").and_then(Value::as_str) {
        if t != "clip" {
            return Err(format!(
                "model_type '{t}': only CLIPModel checkpoints are supported"
            ));
        }
    }
    let null = Value::Null;
    let tc = config.get("text_config").unwrap_or(&null);
    let vc = config.get("vision_config").unwrap_or(&null);
    let t_width = int(tc, "hidden_size", 512)?;
    let v_width = int(vc, "hidden_size", 768)?;
    let image = int(vc, "image_size", 224)?;
    let eos = int(tc, "eos_token_id", 49407)?;
    let preprocess = match preprocessor {
        Some(p) => hf_preprocessor(p, image as u32)?,
        None => Preprocess::huggingface(image as u32, CLIP_MEAN, CLIP_STD, 1.0 / 255.0),
    };
    Ok(ClipConfig {
        embed_dim: int(config, "projection_dim", 512)?,
        image_resolution: image,
        vision: Vision::Vit {
            blocks: Blocks {
                width: v_width,
                layers: int(vc, "num_hidden_layers", 12)?,
                heads: int(vc, "num_attention_heads", 12)?,
                mlp_width: int(vc, "intermediate_size", 3072)?,
                layer_scale: false,
                act: hf_act(vc)?,
                ln_eps: float(vc, "layer_norm_eps", 1e-5)?,
            },
            patch: int(vc, "patch_size", 32)?,
            ln_pre: true,
            pool: VisionPool::Tok,
            final_ln_after_pool: false,
        },
        context_length: int(tc, "max_position_embeddings", 77)?,
        vocab_size: int(tc, "vocab_size", 49408)?,
        text: Blocks {
            width: t_width,
            layers: int(tc, "num_hidden_layers", 12)?,
            heads: int(tc, "num_attention_heads", 8)?,
            mlp_width: int(tc, "intermediate_size", 2048)?,
            layer_scale: false,
            act: hf_act(tc)?,
            ln_eps: float(tc, "layer_norm_eps", 1e-5)?,
        },
        causal: true,
        // CLIPTextTransformer: configs from before transformers PR #24773
        // say eos 2 and pool at the highest id; later ones at the first eos.
        text_pool: if eos == 2 {
            TextPool::Argmax
        } else {
            TextPool::Eos(eos)
        },
        text_proj: TextProj::Matrix,
        preprocess,
        source: source.to_string(),
        assumed: false,
        fields: Fields::HuggingFace,
    })
}

/// CLIPImageProcessor's settings, at the values this build reproduces:
/// bicubic resize of the shorter side and a square centre crop of the same
/// size, the model's own.
fn hf_preprocessor(p: &Value, image: u32) -> Result<Preprocess, String> {
    let size = |key: &str, inner: &[&str]| -> Result<Option<i64>, String> {
        match p.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_i64()),
            Some(o) => {
                let vals: Vec<i64> = inner.iter().filter_map(|k| o.get(*k)?.as_i64()).collect();
                if vals.is_empty() || vals.iter().any(|v| *v != vals[0]) {
                    return Err(format!("{key} {o}: only a square size is supported"));
                }
                Ok(Some(vals[0]))
            }
        }
    };
    for (flag, what) in [
        ("do_resize", "resizing"),
        ("do_center_crop", "centre cropping"),
        ("do_normalize", "normalising"),
        ("do_rescale", "rescaling"),
        ("do_convert_rgb", "RGB conversion"),
    ] {
        if p.get(flag).and_then(Value::as_bool) == Some(false) {
            return Err(format!(
                "{flag} = false is not supported (this build always does {what})"
            ));
        }
    }
    if let Some(r) = p.get("resample").and_then(Value::as_i64) {
        if r != 3 {
            return Err(format!("resample {r} is not supported (3, bicubic)"));
        }
    }
    let short = size("size", &["shortest_edge"])?.unwrap_or(224);
    let crop = size("crop_size", &["height", "width"])?.unwrap_or(224);
    if short != crop || crop != image as i64 {
        return Err(format!(
            "size {short} and crop_size {crop} must both be the model's image_size {image}"
        ));
    }
    Ok(Preprocess::huggingface(
        image,
        triple(p, "image_mean", CLIP_MEAN)?,
        triple(p, "image_std", CLIP_STD)?,
        float(p, "rescale_factor", 1.0 / 255.0)?,
    ))
}

impl ClipConfig {
    /// Every tensor the forward passes read, with its shape, in the order
    /// the passes read them; `-1` is any size (a scalar's `[]` holds as is).
    pub fn expected(&self) -> Vec<(String, Vec<i64>)> {
        let mut out: Vec<(String, Vec<i64>)> = Vec::new();
        let mut put = |k: String, s: &[i64]| out.push((k, s.to_vec()));
        let blocks = |p: &str, b: &Blocks, put: &mut dyn FnMut(String, &[i64])| {
            let (w, m) = (b.width, b.mlp_width);
            for i in 0..b.layers {
                let r = format!("{p}.resblocks.{i}");
                put(format!("{r}.ln_1.weight"), &[w]);
                put(format!("{r}.ln_1.bias"), &[w]);
                put(format!("{r}.attn.in_proj_weight"), &[3 * w, w]);
                put(format!("{r}.attn.in_proj_bias"), &[3 * w]);
                put(format!("{r}.attn.out_proj.weight"), &[w, w]);
                put(format!("{r}.attn.out_proj.bias"), &[w]);
                if b.layer_scale {
                    put(format!("{r}.ls_1.gamma"), &[w]);
                }
                put(format!("{r}.ln_2.weight"), &[w]);
                put(format!("{r}.ln_2.bias"), &[w]);
                put(format!("{r}.mlp.c_fc.weight"), &[m, w]);
                put(format!("{r}.mlp.c_fc.bias"), &[m]);
                put(format!("{r}.mlp.c_proj.weight"), &[w, m]);
                put(format!("{r}.mlp.c_proj.bias"), &[w]);
                if b.layer_scale {
                    put(format!("{r}.ls_2.gamma"), &[w]);
                }
            }
        };
        let ln = |p: &str, w: i64, put: &mut dyn FnMut(String, &[i64])| {
            put(format!("{p}.weight"), &[w]);
            put(format!("{p}.bias"), &[w]);
        };
        let bn = |p: &str, c: i64, put: &mut dyn FnMut(String, &[i64])| {
            for s in ["weight", "bias", "running_mean", "running_var"] {
                put(format!("{p}.{s}"), &[c]);
            }
        };
        let d = self.embed_dim;
        match &self.vision {
            Vision::Vit {
                blocks: b,
                patch,
                ln_pre,
                ..
            } => {
                let (w, g) = (b.width, self.image_resolution / patch);
                put("visual.conv1.weight".into(), &[w, 3, *patch, *patch]);
                put("visual.class_embedding".into(), &[w]);
                put("visual.positional_embedding".into(), &[g * g + 1, w]);
                if *ln_pre {
                    ln("visual.ln_pre", w, &mut put);
                }
                blocks("visual.transformer", b, &mut put);
                ln("visual.ln_post", w, &mut put);
                put("visual.proj".into(), &[w, d]);
            }
            Vision::ResNet { width, layers, .. } => {
                let w = *width;
                put("visual.conv1.weight".into(), &[w / 2, 3, 3, 3]);
                bn("visual.bn1", w / 2, &mut put);
                put("visual.conv2.weight".into(), &[w / 2, w / 2, 3, 3]);
                bn("visual.bn2", w / 2, &mut put);
                put("visual.conv3.weight".into(), &[w, w / 2, 3, 3]);
                bn("visual.bn3", w, &mut put);
                let mut inplanes = w;
                for (li, &n) in layers.iter().enumerate() {
                    let planes = w << li;
                    for bi in 0..n {
                        let p = format!("visual.layer{}.{bi}", li + 1);
                        let stride = if li > 0 && bi == 0 { 2 } else { 1 };
                        put(format!("{p}.conv1.weight"), &[planes, inplanes, 1, 1]);
                        bn(&format!("{p}.bn1"), planes, &mut put);
                        put(format!("{p}.conv2.weight"), &[planes, planes, 3, 3]);
                        bn(&format!("{p}.bn2"), planes, &mut put);
                        put(format!("{p}.conv3.weight"), &[planes * 4, planes, 1, 1]);
                        bn(&format!("{p}.bn3"), planes * 4, &mut put);
                        if stride > 1 || inplanes != planes * 4 {
                            put(
                                format!("{p}.downsample.0.weight"),
                                &[planes * 4, inplanes, 1, 1],
                            );
                            bn(&format!("{p}.downsample.1"), planes * 4, &mut put);
                        }
                        inplanes = planes * 4;
                    }
                }
                let e = w * 32;
                let g = self.image_resolution / 32;
                put(
                    "visual.attnpool.positional_embedding".into(),
                    &[g * g + 1, e],
                );
                for p in ["q_proj", "k_proj", "v_proj"] {
                    put(format!("visual.attnpool.{p}.weight"), &[e, e]);
                    put(format!("visual.attnpool.{p}.bias"), &[e]);
                }
                put("visual.attnpool.c_proj.weight".into(), &[d, e]);
                put("visual.attnpool.c_proj.bias".into(), &[d]);
            }
        }
        let t = &self.text;
        put("token_embedding.weight".into(), &[self.vocab_size, t.width]);
        put(
            "positional_embedding".into(),
            &[self.context_length, t.width],
        );
        blocks("transformer", t, &mut put);
        ln("ln_final", t.width, &mut put);
        match self.text_proj {
            TextProj::Matrix => put("text_projection".into(), &[t.width, d]),
            TextProj::Linear => {
                put("text_projection.weight".into(), &[d, t.width]);
                put("text_projection.bias".into(), &[d]);
            }
            TextProj::None => {}
        }
        out
    }

    /// Keys a checkpoint may hold beside [`Self::expected`]: the logit
    /// scale and bias, BatchNorm's counters, TorchScript's attributes.
    pub fn tolerated(key: &str) -> bool {
        matches!(
            key,
            "logit_scale"
                | "logit_bias"
                | "input_resolution"
                | "context_length"
                | "vocab_size"
                | "attn_mask"
        ) || key.ends_with(".num_batches_tracked")
            || key.ends_with(".attn_mask")
    }

    /// One line for notes: the source and the settings that tell configs
    /// apart.
    pub fn describe(&self) -> String {
        let act = |a: Act| match a {
            Act::QuickGelu => "QuickGELU",
            Act::Gelu => "GELU",
        };
        let vision = match &self.vision {
            Vision::Vit {
                blocks: b, patch, ..
            } => format!(
                "ViT {}x{} patch {patch}, {} heads of {}",
                b.layers,
                b.width,
                b.heads,
                b.width / b.heads.max(1)
            ),
            Vision::ResNet {
                width,
                layers,
                heads,
            } => {
                format!("ModifiedResNet {layers:?} width {width}, {heads} pool heads")
            }
        };
        format!(
            "{}: {vision}, text {}x{} ({} heads), {}, embed {}, {} px",
            self.source,
            self.text.layers,
            self.text.width,
            self.text.heads,
            act(self.text.act),
            self.embed_dim,
            self.image_resolution
        )
    }
}

/// The checkpoint's key layout, told by the keys it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Layout {
    /// OpenAI's and open_clip's `CLIP` (the text tower at the top level).
    OpenAi,
    /// open_clip's `CustomTextCLIP` (the text tower under `text.`).
    CustomText,
    /// transformers' `CLIPModel`.
    HuggingFace,
}

impl Layout {
    pub fn of<'a>(mut keys: impl Iterator<Item = &'a String>) -> Layout {
        let mut layout = Layout::OpenAi;
        for k in keys.by_ref() {
            if k.starts_with("text_model.") || k.starts_with("vision_model.") {
                return Layout::HuggingFace;
            }
            if k.starts_with("text.") {
                layout = Layout::CustomText;
            }
        }
        layout
    }
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
    /// OpenAI's configuration, inferred from the tensors as `build_model`
    /// infers it (heads = width / 64, QuickGELU, MLP 4 x width).
    pub(crate) fn openai(sd: &StateDict) -> Result<ClipConfig, ModelError> {
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
                    blocks: Blocks {
                        width,
                        layers,
                        heads: width / 64,
                        mlp_width: 4 * width,
                        layer_scale: false,
                        act: Act::QuickGelu,
                        ln_eps: 1e-5,
                    },
                    patch,
                    ln_pre: true,
                    pool: VisionPool::Tok,
                    final_ln_after_pool: false,
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
        let width = sd.get_shaped("ln_final.weight", &[-1])?.size()[0];
        let layers = count_blocks(sd, "transformer.resblocks.", 2);
        Ok(ClipConfig {
            embed_dim,
            image_resolution,
            vision,
            context_length,
            vocab_size,
            text: Blocks {
                width,
                layers,
                heads: width / 64,
                mlp_width: 4 * width,
                layer_scale: false,
                act: Act::QuickGelu,
                ln_eps: 1e-5,
            },
            causal: true,
            text_pool: TextPool::Argmax,
            text_proj: TextProj::Matrix,
            preprocess: Preprocess::openai(image_resolution as u32),
            source: "OpenAI CLIP (configuration inferred from the tensors)".into(),
            assumed: true,
            fields: Fields::Inferred,
        })
    }
}
