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

use super::{ObjectCondition, ScoreParams};
use crate::error::{Error, Result};
use crate::eval::{Method, TaskRows};
use crate::framework::stage::{resolve_path, Finding, StageContext};
use crate::model::arch::arch_spec;
use crate::model::clip::Clip;
use crate::model::mapper::{Mapper, MapperKind};
use crate::model::tokenizer::ClipTokenizer;
use crate::tables::embeddings::{tensor_rows, Embeddings};

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

/// A method's query features per (task, template id).
type Queries = HashMap<(String, u32), Vec<f32>>;

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

/// The query features of each textual-inversion method in `methods`, per
/// (task, template id).
pub(super) fn queries(
    p: &ScoreParams,
    ctx: &StageContext,
    tasks: &[TaskRows],
    img: &Embeddings,
    txt: &Embeddings,
    methods: &[Method],
    device: Device,
) -> Result<Vec<(&'static str, Queries)>> {
    let wanted: Vec<_> = networks(p)
        .into_iter()
        .filter(|(m, ..)| methods.contains(m))
        .collect();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let clip_path =
        p.clip.as_ref().map(|c| ctx.resolve(c)).ok_or_else(|| {
            Error::Data("set params.clip for the textual-inversion methods".into())
        })?;
    let arch = arch_spec(p.arch.as_deref(), ctx.base_dir).map_err(Error::Data)?;
    let clip = Clip::load(&clip_path, arch.as_ref(), device)?;
    check_same_model(&clip, txt, device)?;
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
            rows.push((t.task.clone(), tid, t.reference[i], toks));
        }
    }
    let width = clip.token_width()?;
    let mut out = Vec::new();
    for (method, field, kind, path) in wanted {
        let path = ctx.resolve(
            path.ok_or_else(|| Error::Data(format!("method '{field}' needs params.{field}")))?,
        );
        let net = Mapper::load(&path, kind, device)?;
        if net.in_dim != img.dim as i64 || net.out_dim != width {
            return Err(Error::Data(format!(
                "params.{field}: its {} maps {}-d image features to {}-d tokens, but the embeddings are {}-d and the CLIP's tokens {}-d: use the network trained for this backbone",
                kind.name(),
                net.in_dim,
                net.out_dim,
                img.dim,
                width
            )));
        }
        let mut q = HashMap::with_capacity(rows.len());
        for block in rows.chunks(BATCH) {
            let feats: Vec<f32> = block
                .iter()
                .flat_map(|r| img.row(r.2).iter().copied())
                .collect();
            let feats = Tensor::f_from_slice(&feats)?
                .f_view([block.len() as i64, img.dim as i64])?
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
            "{field}: {} ({}), prompt \"{}\"{}",
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
    Ok(out)
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
