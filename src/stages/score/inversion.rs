//! The textual-inversion methods on GeneCIS, as LinCIR's `eval_genecis`
//! branch (navervision/lincir @e6727d9, `genecis/evaluate.py`,
//! `genecis/eval_functions.py`) scores Pic2Word, SEARLE and LinCIR: the
//! reference's raw CLIP image feature goes through the method's network
//! to a pseudo word, which replaces the placeholder's token embedding in
//! "a photo of $ that {condition}"; CLIP's text tower encodes the prompt
//! and its feature is the query, ranked against the normalised gallery.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::{InversionPreprocess, ObjectCondition, ScoreParams};
use crate::error::{Error, Result};
use crate::eval::{Given, Method, TaskRows};
use crate::framework::stage::{resolve_path, Finding, StageContext};
use crate::model::arch::arch_spec;
use crate::model::clip::Clip;
use crate::model::mapper::{Mapper, MapperKind};
use crate::model::preprocess::{
    load_batch_with, Family, ImageKey, Preprocess, CLIP_MEAN, CLIP_STD,
};
use crate::model::tokenizer::ClipTokenizer;
use crate::tables::embeddings::{finite_rows, tensor_rows, Embeddings};
use crate::tables::image_keys::read_image_keys;

/// Each textual-inversion method: its param, its network.
fn networks(p: &ScoreParams) -> [(Method, &'static str, MapperKind, Option<&PathBuf>); 3] {
    [
        (
            Method::Pic2word,
            "pic2word",
            MapperKind::Im2Text,
            p.pic2word.as_ref(),
        ),
        (Method::Searle, "searle", MapperKind::Phi, p.searle.as_ref()),
        (Method::Lincir, "lincir", MapperKind::Phi, p.lincir.as_ref()),
    ]
}

/// The tasks whose condition LinCIR's published code loses (its COCO
/// dataset returns no caption string).
const OBJECT_TASKS: [&str; 2] = ["focus_object", "change_object"];

/// Templates per forward pass.
const BATCH: usize = 256;

pub(super) fn validate(p: &ScoreParams, methods: &[Method], base: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut any = false;
    for (m, field, _, path) in networks(p) {
        if methods.contains(&m) {
            any = true;
            if path.is_none() {
                out.push(Finding::error(
                    field,
                    format!("method '{field}' needs its network's weights: set params.{field}"),
                ));
            }
        }
    }
    if any && p.clip.is_none() {
        out.push(Finding::error(
            "clip",
            "the textual-inversion methods encode prompts with CLIP's text tower: set params.clip to the checkpoint the embed stage used",
        ));
    }
    if let Err(m) = arch_spec(p.arch.as_deref(), base) {
        out.push(Finding::error("arch", m));
    }
    if let Err(m) = placeholder_id(p).and_then(|id| prompt_tokens(p, "x", id).map(|_| ())) {
        out.push(Finding::error("inversion_prompt", m));
    }
    out
}

pub(super) fn files(p: &ScoreParams, base: &Path) -> Vec<(&'static str, PathBuf)> {
    let mut v: Vec<(&'static str, PathBuf)> = networks(p)
        .into_iter()
        .filter_map(|(_, f, _, path)| path.map(|x| (f, resolve_path(base, x))))
        .collect();
    v.extend(p.clip.iter().map(|c| ("clip", resolve_path(base, c))));
    v
}

/// The placeholder's one BPE token.
fn placeholder_id(p: &ScoreParams) -> std::result::Result<i64, String> {
    let ids = ClipTokenizer::default().encode(&p.inversion_placeholder);
    match ids.iter().filter(|&&t| t != 0).count() {
        3 => Ok(ids[1]),
        _ => Err(format!(
            "inversion_placeholder '{}' is not one token of CLIP's vocabulary",
            p.inversion_placeholder
        )),
    }
}

/// The prompt of one condition, tokenised without truncation (a prompt
/// too long is an error, as `clip.tokenize` raises); it must hold the
/// placeholder.
fn prompt_tokens(
    p: &ScoreParams,
    condition: &str,
    id: i64,
) -> std::result::Result<Vec<i64>, String> {
    if !p.inversion_prompt.contains("{}") {
        return Err("the prompt needs {} where the condition goes".into());
    }
    let text = p.inversion_prompt.replace("{}", condition);
    let ids = ClipTokenizer::default()
        .encode_exact(&text)
        .map_err(|n| format!("the prompt \"{text}\" is {n} tokens, more than CLIP's 77"))?;
    if !ids.contains(&id) {
        return Err(format!(
            "the prompt \"{text}\" has no standalone placeholder '{}' (write it between spaces)",
            p.inversion_placeholder
        ));
    }
    Ok(ids)
}

/// LinCIR's GeneCIS preprocessing (`genecis/evaluate.py`): a
/// `CLIPImageProcessor` built by hand with OpenAI's statistics, at the
/// model's resolution: RGB first, bicubic resize of the shorter side, a
/// centre crop at `(n - size) // 2` (torchvision rounds it: one column
/// apart whenever `n - size` is 3 mod 4, as for COCO's 640x427 images).
pub(crate) fn lincir_preprocess(size: u32) -> Preprocess {
    Preprocess::huggingface(size, CLIP_MEAN, CLIP_STD, 1.0 / 255.0)
}

/// A preprocessing by whose arithmetic it is done, for `results`.
pub(super) fn family_name(pre: &Preprocess) -> &'static str {
    match pre.family {
        Family::Torchvision => "torchvision",
        Family::HuggingFace { .. } => "CLIPImageProcessor",
    }
}

/// What the textual-inversion methods were scored with.
pub(super) struct Inversion {
    /// Per method: its queries, against the CLIP's gallery or its own.
    pub methods: Vec<(&'static str, Given)>,
    /// How the inversion methods' images were prepared (`results`).
    pub preprocess: String,
    /// How the embed stage's images were prepared, as the CLIP says.
    pub embed_preprocess: &'static str,
}

/// The query features of each textual-inversion method in `methods`, per
/// (task, template id), and the features they rank: LinCIR's preprocessing
/// by default (the images re-encoded when the embed stage prepared them
/// otherwise), or the embed stage's own.
#[allow(clippy::too_many_arguments)]
pub(super) fn queries(
    p: &ScoreParams,
    ctx: &StageContext,
    tasks: &[TaskRows],
    img: &Embeddings,
    txt: &Embeddings,
    methods: &[Method],
    device: Device,
) -> Result<Option<Inversion>> {
    let wanted: Vec<_> = networks(p)
        .into_iter()
        .filter(|(m, ..)| methods.contains(m))
        .collect();
    if wanted.is_empty() {
        return Ok(None);
    }
    let clip_path =
        p.clip.as_ref().map(|c| ctx.resolve(c)).ok_or_else(|| {
            Error::Data("set params.clip for the textual-inversion methods".into())
        })?;
    let arch = arch_spec(p.arch.as_deref(), ctx.base_dir).map_err(Error::Data)?;
    let clip = Clip::load(&clip_path, arch.as_ref(), device)?;
    check_same_model(&clip, txt, device)?;
    let embed_preprocess = family_name(&clip.config.preprocess);
    let lincir = lincir_preprocess(clip.config.image_resolution as u32);
    let (own, preprocess) = match p.inversion_preprocess {
        InversionPreprocess::Embed => (None, format!("embed: {embed_preprocess}")),
        InversionPreprocess::Lincir if clip.config.preprocess == lincir => (
            None,
            "LinCIR: CLIPImageProcessor (the embed stage's own)".to_string(),
        ),
        InversionPreprocess::Lincir => (
            Some(reencode(ctx, tasks, img, &clip, &lincir, device)?),
            "LinCIR: CLIPImageProcessor".to_string(),
        ),
    };
    // The features the networks read and the candidates are ranked by.
    let feats_of = own.as_ref().unwrap_or(img);
    let img_keys = row_keys(img);
    let id = placeholder_id(p).map_err(Error::Data)?;
    // Prompts, once per template.
    let mut rows: Vec<(String, u32, usize, Vec<i64>)> = Vec::new();
    for t in tasks {
        for (i, &tid) in t.template_ids.iter().enumerate() {
            let cond = match p.inversion_object_condition {
                ObjectCondition::Published if OBJECT_TASKS.contains(&t.task.as_str()) => "0",
                _ => t.conditions[i].as_str(),
            };
            let toks = prompt_tokens(p, cond, id)
                .map_err(|m| Error::Data(format!("{} template {tid}: {m}", t.task)))?;
            let r = match &own {
                Some(e) => *e
                    .index
                    .get(img_keys[t.reference[i]])
                    .ok_or_else(|| Error::Internal("a reference not re-encoded".into()))?,
                None => t.reference[i],
            };
            rows.push((t.task.clone(), tid, r, toks));
        }
    }
    let width = clip.token_width()?;
    let mut out = Vec::new();
    for (method, field, kind, path) in wanted {
        let path = ctx.resolve(
            path.ok_or_else(|| Error::Data(format!("method '{field}' needs params.{field}")))?,
        );
        let net = Mapper::load(&path, kind, device)?;
        if net.in_dim != feats_of.dim as i64 || net.out_dim != width {
            return Err(Error::Data(format!(
                "params.{field}: its {} maps {}-d image features to {}-d tokens, but the embeddings are {}-d and the CLIP's tokens {}-d: use the network trained for this backbone",
                kind.name(),
                net.in_dim,
                net.out_dim,
                feats_of.dim,
                width
            )));
        }
        let mut q = HashMap::with_capacity(rows.len());
        for block in rows.chunks(BATCH) {
            let feats: Vec<f32> = block
                .iter()
                .flat_map(|r| feats_of.row(r.2).iter().copied())
                .collect();
            let feats = Tensor::f_from_slice(&feats)?
                .f_view([block.len() as i64, feats_of.dim as i64])?
                .f_to_device(device)?;
            let toks: Vec<i64> = block.iter().flat_map(|r| r.3.iter().copied()).collect();
            let toks = Tensor::f_from_slice(&toks)?
                .f_view([block.len() as i64, -1])?
                .f_to_device(device)?;
            let y = tch::no_grad(|| -> Result<Tensor> {
                let pseudo = net.forward(&feats)?;
                Ok(clip.encode_text_with_pseudo(&toks, &pseudo, id)?)
            })?;
            let y = tensor_rows(&y.to_kind(Kind::Float))?;
            if y.iter().any(|x| !x.is_finite()) {
                return Err(Error::Data(format!(
                    "{field} gives NaN or infinite queries: its weights or the CLIP's are broken"
                )));
            }
            let d = y.len() / block.len();
            for (r, v) in block.iter().zip(y.chunks(d)) {
                q.insert((r.0.clone(), r.1), v.to_vec());
            }
        }
        ctx.note(format!(
            "{field}: {} ({}), images by {preprocess}, prompt \"{}\"{}",
            path.display(),
            kind.name(),
            p.inversion_prompt,
            match p.inversion_object_condition {
                ObjectCondition::Published => "; object tasks with \"0\" for the condition, as LinCIR's published GeneCIS code does (inversion_object_condition = \"condition\" fixes it)",
                ObjectCondition::Condition => "",
            }
        ));
        out.push((method.name(), q));
    }
    let methods = out
        .into_iter()
        .map(|(name, queries)| {
            let given = match &own {
                Some(gallery) => Given::Embeddings {
                    queries,
                    gallery: gallery.clone(),
                },
                None => Given::Queries(queries),
            };
            (name, given)
        })
        .collect();
    Ok(Some(Inversion {
        methods,
        preprocess,
        embed_preprocess,
    }))
}

/// Each embedding row's key.
fn row_keys(e: &Embeddings) -> Vec<&str> {
    let mut keys = vec![""; e.index.len()];
    for (k, &r) in &e.index {
        keys[r] = k.as_str();
    }
    keys
}

/// Images per forward pass when re-encoding.
const ENCODE_BATCH: usize = 32;

/// The images the tasks use (references, candidates, global galleries),
/// encoded again by `clip` under `pre`, as the embed stage would.
fn reencode(
    ctx: &StageContext,
    tasks: &[TaskRows],
    img: &Embeddings,
    clip: &Clip,
    pre: &Preprocess,
    device: Device,
) -> Result<Embeddings> {
    let started = std::time::Instant::now();
    let dir = ctx.optional_input("image_keys").ok_or_else(|| {
        Error::Data(
            "the textual-inversion methods use LinCIR's preprocessing, which encodes the images again: list the templates stage (its image_keys table) in inputs, or set inversion_preprocess = \"embed\"".into(),
        )
    })?;
    let rows: HashMap<String, _> = read_image_keys(dir)?
        .into_iter()
        .map(|r| (r.key.clone(), r))
        .collect();
    let keys = row_keys(img);
    let mut used = std::collections::BTreeSet::new();
    for t in tasks {
        used.extend(t.reference.iter().copied());
        used.extend(t.candidates.iter().flatten().copied());
        if let Some(g) = &t.global {
            used.extend(g.gallery.iter().copied());
        }
    }
    let used: Vec<&str> = used.into_iter().map(|r| keys[r]).collect();
    let mut values = Vec::with_capacity(used.len() * img.dim);
    for batch in used.chunks(ENCODE_BATCH) {
        let ik = batch
            .iter()
            .map(|k| {
                let r = rows.get(*k).ok_or_else(|| {
                    Error::Data(format!(
                        "image {k} has an embedding but no row in image_keys: give score the templates stage the embed stage read"
                    ))
                })?;
                Ok(ImageKey {
                    path: &r.path,
                    bbox: r.bbox,
                    rgb_first: r.rgb_first,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let tensors = load_batch_with(&ik, pre)
            .into_iter()
            .zip(batch)
            .map(|(t, k)| {
                t.map_err(|m| {
                    Error::Data(format!(
                        "image {k}, encoded again for LinCIR's preprocessing: {m}"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let x = Tensor::stack(&tensors, 0).to_device(device);
        let f = tch::no_grad(|| clip.encode_image(&x))?;
        values.extend(finite_rows(&f, "image")?);
    }
    let owned: Vec<String> = used.iter().map(|k| k.to_string()).collect();
    ctx.note(format!(
        "textual inversion: {} images encoded again with LinCIR's CLIPImageProcessor (the embed stage's are {}) in {:.1} s; inversion_preprocess = \"embed\" uses the embed stage's",
        owned.len(),
        family_name(&clip.config.preprocess),
        started.elapsed().as_secs_f64()
    ));
    Ok(Embeddings::new(&owned, values, img.dim))
}

/// The CLIP given must be the model whose embeddings are scored: its text
/// features of a few conditions must be the stored ones.
fn check_same_model(clip: &Clip, txt: &Embeddings, device: Device) -> Result<()> {
    let mut texts: Vec<&str> = txt.index.keys().map(String::as_str).collect();
    texts.sort_unstable();
    texts.truncate(8);
    if texts.is_empty() {
        return Ok(());
    }
    let toks = ClipTokenizer::default().batch(&texts).to_device(device);
    let ours = tensor_rows(&tch::no_grad(|| clip.encode_text(&toks))?)?;
    let d = ours.len() / texts.len();
    if d != txt.dim {
        return Err(Error::Data(format!(
            "params.clip gives {d}-d text features, the embeddings are {}-d: give the checkpoint the embed stage used",
            txt.dim
        )));
    }
    for (t, v) in texts.iter().zip(ours.chunks(d)) {
        let stored = txt.get(t).unwrap_or_default();
        let scale = stored
            .iter()
            .fold(0f32, |m, x| m.max(x.abs()))
            .max(f32::MIN_POSITIVE);
        let off = v
            .iter()
            .zip(stored)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        // The same model on the same kind of device agrees to rounding;
        // another model differs in every digit.
        if off > 1e-3 {
            return Err(Error::Data(format!(
                "params.clip is not the model whose embeddings are scored: its text feature of \"{t}\" differs from the stored one by {off:.2e} of its scale; give the checkpoint (and arch) the embed stage used"
            )));
        }
    }
    Ok(())
}
