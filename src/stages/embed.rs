//! `embed`: CLIP embeddings of every distinct image key and text, once per
//! model. Reads `image_keys` (and `texts`, when an input has it), e.g. from
//! a `templates` stage.
//!
//! Tables:
//! - `image_embeddings(image_key, model, embedding fixed_size_list<f32>[d])`: raw
//!   `encode_image` output (not normalised; `score` normalises).
//! - `text_embeddings(text, model, embedding fixed_size_list<f32>[d])`
//! - `rejects(image_key, path, reason)`: images that could not be read.
//!
//! Keys are sorted and cut into chunks of `chunk_size`; chunk k holds the
//! k-th slice of images and of texts, so a run resumes (and shards) by chunk.
//! A missing or corrupt image that a template needs (`required`) fails the
//! stage, naming the first few; the other chunks are kept for the rerun.

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::error::{Error, Result};
use crate::framework::stage::{
    resolve_path, ChunkTables, Chunks, Finding, InputTable, Stage, StageContext, TableDef,
};
use crate::model::arch::{arch_spec, ArchSpec, ASSUMED_NOTE};
use crate::model::clip::Clip;
use crate::model::decode::{set_max_pixels, PILLOW_MAX_IMAGE_PIXELS};
use crate::model::preprocess::{load_batch_with, ImageKey};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::{select_device, with_precision};
use crate::tables::embeddings::{
    embeddings_batch, finite_rows, image_embeddings_schema, text_embeddings_schema,
};
use crate::tables::image_keys::{read_image_keys, read_texts, KeyRow};

pub(crate) static EMBED_REJECTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("image_key", DataType::Utf8, false),
        Field::new("path", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
    ]))
});

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct EmbedParams {
    /// CLIP weights: OpenAI's TorchScript .pt, a torch.save state dict, or
    /// .safetensors. Not needed when a train stage in inputs gives a
    /// fine-tuned backbone.
    pub checkpoint: Option<PathBuf>,
    /// Which CLIP the checkpoint is: an open_clip model name (`ViT-H-14`,
    /// `ViT-B-32-quickgelu`, ...) or an open_clip model-config .json. Left
    /// out, an OpenAI archive or state dict is taken as OpenAI's config
    /// (and the summary says so); a Hugging Face folder reads its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Name stored in the `model` column (default: the checkpoint's file stem).
    pub model: Option<String>,
    /// `auto` (GPU when libtorch sees one), `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// fp16 autocast on a GPU (ignored on CPU).
    pub mixed_precision: bool,
    pub batch_size: usize,
    /// Images (and texts) per part file: the unit of resume and sharding.
    pub chunk_size: usize,
    /// Images over this many pixels are refused before decoding (a few
    /// bytes of header can claim gigabytes): Pillow's
    /// DecompressionBombError threshold, 2 x 89,478,485, by default.
    /// Left out of the fingerprint at its default.
    #[serde(skip_serializing_if = "is_pillow_limit")]
    pub max_image_pixels: u64,
}

fn is_pillow_limit(n: &u64) -> bool {
    *n == 2 * PILLOW_MAX_IMAGE_PIXELS
}

impl Default for EmbedParams {
    /// The defaults of every param, in one place.
    fn default() -> Self {
        EmbedParams {
            checkpoint: Default::default(),
            arch: Default::default(),
            model: Default::default(),
            device: "auto".into(),
            mixed_precision: Default::default(),
            batch_size: 64,
            chunk_size: 2048,
            max_image_pixels: 2 * PILLOW_MAX_IMAGE_PIXELS,
        }
    }
}

impl EmbedParams {
    /// The `model` column: params.model, else the weights file's stem (a
    /// trained backbone is named after its train stage).
    pub(crate) fn model_name(&self, weights: &Path, trained_by: Option<&str>) -> String {
        self.model.clone().unwrap_or_else(|| match trained_by {
            Some(stage) => stage.to_string(),
            None => weights
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "clip".into()),
        })
    }
}

/// The images (by image id, path from `captions`) and conditions of a
/// `triplets` table: what a cached-mode `train` stage reads.
fn triplet_keys(dir: &Path, ctx: &StageContext) -> Result<(Vec<KeyRow>, Vec<String>)> {
    let t = crate::tables::triplets::read_triplets(dir)?;
    let paths = crate::tables::captions::read_image_paths(ctx.input("captions")?, ctx.base_dir)?;
    if let Some(m) = crate::tables::captions::missing_paths(&t.images, &paths) {
        return Err(Error::Data(m));
    }
    let keys = t
        .images
        .iter()
        .map(|i| KeyRow {
            key: i.to_string(),
            path: paths[i].clone(),
            bbox: None,
            required: true,
            rgb_first: false,
        })
        .collect();
    Ok((keys, t.texts))
}

pub(crate) struct Embed;

impl Stage for Embed {
    const KIND: &'static str = "embed";
    const VERSION: &'static str = "1";
    const SHARDABLE: bool = true;
    const ABOUT: &'static str =
        "image_keys (+ texts) -> CLIP image_embeddings, text_embeddings, rejects";
    type Params = EmbedParams;

    type Work = Encoding;

    fn input_tables() -> &'static [InputTable] {
        const INPUTS: &[InputTable] = &[
            InputTable::one_of("image_keys", "image sources"),
            InputTable::optional("texts"),
            InputTable::one_of("triplets", "image sources"),
            InputTable::optional("captions"),
            InputTable::optional("weights"),
        ];
        INPUTS
    }

    fn output_tables() -> Vec<TableDef> {
        vec![
            TableDef::embedding("image_embeddings", image_embeddings_schema, "embedding"),
            TableDef::embedding("text_embeddings", text_embeddings_schema, "embedding"),
            TableDef::new("rejects", EMBED_REJECTS_SCHEMA.clone()),
        ]
    }

    fn validate(p: &EmbedParams, base: &Path) -> Vec<Finding> {
        let mut out = Vec::new();
        if let Err(m) =
            arch_spec(p.arch.as_deref(), base).and_then(|a| a.map(|a| a.config()).transpose())
        {
            out.push(Finding::error("arch", m));
        }
        if p.batch_size == 0 {
            out.push(Finding::error("batch_size", "must be at least 1"));
        }
        if p.chunk_size == 0 {
            out.push(Finding::error("chunk_size", "must be at least 1"));
        }
        if p.batch_size > 65_536 || p.chunk_size > 10_000_000 {
            out.push(Finding::error(
                "batch_size",
                "batch_size at most 65,536 and chunk_size at most 10,000,000",
            ));
        }
        if p.max_image_pixels == 0 {
            out.push(Finding::error("max_image_pixels", "must be at least 1"));
        }
        if let Err(m) = select_device(&p.device) {
            out.push(Finding::error("device", m));
        }
        if p.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
            out.push(Finding::error("model", "must not be empty"));
        }
        out
    }

    fn validate_inputs(p: &EmbedParams, tables: &[String]) -> Vec<Finding> {
        let has = |t: &str| tables.iter().any(|x| x == t);
        let mut out = Vec::new();
        if p.checkpoint.is_none() && !has("weights") {
            out.push(Finding::error(
                "checkpoint",
                "no CLIP weights: set params.checkpoint, or list a fine-tuning train stage in inputs",
            ));
        }
        if has("triplets") && !has("captions") {
            out.push(Finding::error(
                "inputs",
                "embedding triplets needs their image paths: list the ingest stage (captions) in inputs too",
            ));
        }
        out
    }

    fn files(p: &EmbedParams, base: &Path) -> Vec<(&'static str, PathBuf)> {
        let mut out: Vec<(&'static str, PathBuf)> = p
            .checkpoint
            .iter()
            .map(|c| ("checkpoint", resolve_path(base, c)))
            .collect();
        if let Ok(Some(ArchSpec::Json(j))) = arch_spec(p.arch.as_deref(), base) {
            out.push(("arch", j));
        }
        out
    }

    fn check(p: &EmbedParams, base: &Path) -> Vec<Finding> {
        let Some(c) = &p.checkpoint else {
            return Vec::new();
        };
        let Ok(arch) = arch_spec(p.arch.as_deref(), base) else {
            return Vec::new();
        };
        match Clip::load(&resolve_path(base, c), arch.as_ref(), Device::Cpu) {
            Ok(_) => Vec::new(),
            Err(e) => vec![Finding::error("checkpoint", e.to_string())],
        }
    }

    fn plan(p: &EmbedParams, ctx: &StageContext) -> Result<Chunks<Encoding>> {
        set_max_pixels(p.max_image_pixels);
        let mut keys = match ctx.optional_input("image_keys") {
            Some(d) => read_image_keys(d)?,
            None => Vec::new(),
        };
        let mut texts = match ctx.optional_input("texts") {
            Some(d) => read_texts(d, "text")?,
            None => Vec::new(),
        };
        if let Some(t) = ctx.optional_input("triplets") {
            let (k, x) = triplet_keys(t, ctx)?;
            keys.extend(k);
            keys.sort_by(|a, b| a.key.cmp(&b.key));
            keys.dedup_by(|a, b| a.key == b.key);
            texts.extend(x);
            texts.sort();
            texts.dedup();
        }
        let trained = match ctx.optional_input("weights") {
            Some(d) => crate::tables::weights::weights_file(d, "backbone")?.map(|f| (f, d)),
            None => None,
        };
        // A fine-tuned backbone from a train input wins over params.checkpoint
        // (the CLIP it started from), so one manifest serves both modes.
        let (weights, trained_by) = match (&p.checkpoint, trained) {
            (_, Some((f, d))) => {
                if p.checkpoint.is_some() {
                    ctx.note(format!(
                        "CLIP weights: the fine-tuned {} (params.checkpoint is what training started from)",
                        f.display()
                    ));
                }
                (f, Some(crate::framework::store::stage_of(d)))
            }
            (Some(c), None) => (ctx.resolve(c), None),
            (None, None) => {
                return Err(Error::Data(
                    "no CLIP weights: set params.checkpoint, or list a fine-tuning train stage in inputs".into(),
                ))
            }
        };
        // Missing files a template needs: fail before any encoding.
        let missing: Vec<&KeyRow> = keys
            .par_iter()
            .filter(|k| k.required && !k.path.is_file())
            .collect();
        if !missing.is_empty() {
            let first: Vec<String> = missing
                .iter()
                .take(5)
                .map(|k| k.path.display().to_string())
                .collect();
            return Err(Error::Data(format!(
                "{} image(s) that templates need do not exist, e.g. {}. Run `genecis check` on the manifest to see what to fix",
                missing.len(),
                first.join(", ")
            )));
        }
        let device = select_device(&p.device).map_err(Error::Data)?;
        let arch = arch_spec(p.arch.as_deref(), ctx.base_dir).map_err(Error::Data)?;
        let clip = Clip::load(&weights, arch.as_ref(), device)?;
        ctx.note(format!("CLIP: {}", clip.config.describe()));
        if clip.config.assumed {
            ctx.note(ASSUMED_NOTE);
        }
        let dim = clip.config.embed_dim as i32;
        let tokenizer = ClipTokenizer::new(clip.config.context_length as usize);
        let cs = p.chunk_size;
        let n_chunks = keys.len().div_ceil(cs).max(texts.len().div_ceil(cs)).max(1);
        let sizes = (0..n_chunks)
            .map(|k| slice(keys.len(), cs, k).len() as u64)
            .collect();
        Ok(Chunks {
            work: Encoding {
                keys,
                texts,
                device,
                dim,
                model: p.model_name(&weights, trained_by.as_deref()),
                state: EncodeState {
                    clip,
                    tokenizer,
                    failed: Vec::new(),
                    t_decode: Duration::ZERO,
                    t_model: Duration::ZERO,
                    n_images: 0,
                    n_rejected: 0,
                    started: Instant::now(),
                },
            },
            sizes,
            unit: "images",
            parallel: None,
            width: Some(dim),
        })
    }

    fn run_chunk(
        p: &EmbedParams,
        w: &mut Encoding,
        k: usize,
        _ctx: &StageContext,
    ) -> Result<Option<ChunkTables>> {
        let st = &mut w.state;
        let (device, dim) = (w.device, w.dim);
        let pre = &st.clip.config.preprocess;
        // Images.
        let chunk = &w.keys[slice(w.keys.len(), p.chunk_size, k)];
        let mut e_key = StringBuilder::new();
        let mut e_vals: Vec<f32> = Vec::with_capacity(chunk.len() * dim as usize);
        let mut r_key = StringBuilder::new();
        let mut r_path = StringBuilder::new();
        let mut r_reason = StringBuilder::new();
        let mut chunk_ok = true;
        // Decoding the next batch (rayon) overlaps the model on this one.
        std::thread::scope(|scope| -> Result<()> {
            let (tx, rx) = std::sync::mpsc::sync_channel(2);
            let bs = p.batch_size;
            scope.spawn(move || {
                for batch in chunk.chunks(bs) {
                    let t0 = Instant::now();
                    let ik: Vec<ImageKey> = batch
                        .iter()
                        .map(|r| ImageKey {
                            path: &r.path,
                            bbox: r.bbox,
                            rgb_first: r.rgb_first,
                        })
                        .collect();
                    let loaded = load_batch_with(&ik, pre);
                    if tx.send((batch, loaded, t0.elapsed())).is_err() {
                        break;
                    }
                }
            });
            for (batch, loaded, dt) in rx {
                st.t_decode += dt;
                let mut ok_rows = Vec::new();
                let mut tensors = Vec::new();
                for (r, t) in batch.iter().zip(loaded) {
                    match t {
                        Ok(t) => {
                            ok_rows.push(r);
                            tensors.push(t);
                        }
                        Err(reason) => {
                            r_key.append_value(&r.key);
                            r_path.append_value(r.path.to_string_lossy());
                            r_reason.append_value(&reason);
                            st.n_rejected += 1;
                            if r.required {
                                chunk_ok = false;
                                st.failed.push((r.key.clone(), reason));
                            }
                        }
                    }
                }
                if !tensors.is_empty() {
                    let t1 = Instant::now();
                    let x = Tensor::stack(&tensors, 0).to_device(device);
                    let feats = tch::no_grad(|| {
                        with_precision(device, p.mixed_precision, || st.clip.encode_image(&x))
                    })?;
                    e_vals.extend(finite_rows(&feats, "image")?);
                    st.t_model += t1.elapsed();
                    for r in ok_rows {
                        e_key.append_value(&r.key);
                    }
                }
                st.n_images += batch.len();
            }
            Ok(())
        })?;
        if !chunk_ok {
            // Not written: a rerun after the fix redoes just this chunk.
            return Ok(None);
        }
        // Texts.
        let tchunk = &w.texts[slice(w.texts.len(), p.chunk_size, k)];
        let mut tt_key = StringBuilder::new();
        let mut t_vals: Vec<f32> = Vec::with_capacity(tchunk.len() * dim as usize);
        for batch in tchunk.chunks(p.batch_size.max(64)) {
            let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
            let toks = st.tokenizer.batch(&refs).to_device(device);
            let feats = tch::no_grad(|| {
                with_precision(device, p.mixed_precision, || st.clip.encode_text(&toks))
            })?;
            t_vals.extend(finite_rows(&feats, "text")?);
            for t in batch {
                tt_key.append_value(t);
            }
        }
        let img = embeddings_batch(true, Arc::new(e_key.finish()), &w.model, e_vals, dim)?;
        let txt = embeddings_batch(false, Arc::new(tt_key.finish()), &w.model, t_vals, dim)?;
        let rej = RecordBatch::try_new(
            EMBED_REJECTS_SCHEMA.clone(),
            vec![
                Arc::new(r_key.finish()) as ArrayRef,
                Arc::new(r_path.finish()),
                Arc::new(r_reason.finish()),
            ],
        )?;
        Ok(Some(vec![
            ("image_embeddings", img),
            ("text_embeddings", txt),
            ("rejects", rej),
        ]))
    }

    fn finish(_p: &EmbedParams, w: Encoding, ctx: &StageContext) -> Result<()> {
        let st = w.state;
        if !st.failed.is_empty() {
            let first: Vec<String> = st
                .failed
                .iter()
                .take(5)
                .map(|(k, r)| format!("{k} ({r})"))
                .collect();
            return Err(Error::Data(format!(
                "{} image(s) that templates need could not be read: {}. Replace the files and rerun; finished chunks are kept",
                st.failed.len(),
                first.join("; ")
            )));
        }
        let secs = st.started.elapsed().as_secs_f64().max(1e-9);
        ctx.note(format!(
            "model {} on {:?}: {} images in {secs:.2} s = {:.1} images/s (decode+preprocess {:.2} s, overlapping the model {:.2} s); {} texts",
            w.model,
            w.device,
            st.n_images,
            st.n_images as f64 / secs,
            st.t_decode.as_secs_f64(),
            st.t_model.as_secs_f64(),
            w.texts.len()
        ));
        if st.n_rejected > 0 {
            ctx.note(format!(
                "{} image(s) could not be read (see the rejects table)",
                st.n_rejected
            ));
        }
        Ok(())
    }
}

/// Chunk `k`'s range of a list of `len` items cut into chunks of `cs`.
fn slice(len: usize, cs: usize, k: usize) -> std::ops::Range<usize> {
    (k * cs).min(len)..((k + 1) * cs).min(len)
}

/// The distinct keys and texts, and the model that encodes them.
pub(crate) struct Encoding {
    keys: Vec<KeyRow>,
    texts: Vec<String>,
    device: Device,
    dim: i32,
    model: String,
    /// libtorch tensors are not `Sync`: chunks take the model in turn.
    state: EncodeState,
}

struct EncodeState {
    clip: Clip,
    tokenizer: ClipTokenizer,
    /// Required images that could not be read: (key, reason).
    failed: Vec<(String, String)>,
    t_decode: Duration,
    t_model: Duration,
    n_images: usize,
    n_rejected: usize,
    started: Instant,
}
