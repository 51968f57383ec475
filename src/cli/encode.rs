//! `genecis encode`: CLIP features of a folder of images and a file of
//! texts, without a manifest, in the tables the `embed` stage writes
//! (`image_embeddings(image_key, model, embedding)`,
//! `text_embeddings(text, model, embedding)`; raw features, not
//! normalised), so they load with pandas or duckdb and feed `score`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, StringArray};
use tch::{Device, Tensor};

use crate::error::{Error, Result};
use crate::framework::progress::{thousands, Progress};
use crate::framework::sql::{OutputFormat, ResultWriter};
use crate::model::arch::{ArchSpec, ASSUMED_NOTE};
use crate::model::clip::Clip;
use crate::model::preprocess::{load_batch_with, ImageKey};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::with_precision;
use crate::tables::embeddings::{
    embeddings_batch, finite_rows, image_embeddings_schema, text_embeddings_schema,
};

/// Extensions taken from a folder (lower case); Pillow opens them all.
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff"];

/// A validated `genecis encode`.
pub struct EncodeRequest {
    pub checkpoint: PathBuf,
    pub arch: Option<ArchSpec>,
    pub images: Option<PathBuf>,
    pub texts: Option<PathBuf>,
    /// Where the image table goes (or the text table, when only texts).
    pub out: PathBuf,
    pub device: Device,
    pub batch_size: usize,
    pub mixed_precision: bool,
    pub model: Option<String>,
    pub progress: bool,
}

/// Where each table goes: `out` itself when one kind is encoded; with
/// both, `<stem>.images.parquet` and `<stem>.texts.parquet` beside it.
pub fn out_paths(out: &Path, images: bool, texts: bool) -> (PathBuf, PathBuf) {
    if images && texts {
        let stem = out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "embeddings".into());
        let dir = out.parent().unwrap_or(Path::new(""));
        (
            dir.join(format!("{stem}.images.parquet")),
            dir.join(format!("{stem}.texts.parquet")),
        )
    } else {
        (out.to_path_buf(), out.to_path_buf())
    }
}

/// The images to encode: every image file under a folder (keys relative to
/// it, `/`-separated, sorted), or the lines of a list file (each a path,
/// relative to the list's folder; the key is the line as written).
fn image_list(src: &Path) -> Result<Vec<(String, PathBuf)>> {
    if src.is_dir() {
        let mut out = Vec::new();
        let mut stack = vec![src.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).map_err(Error::io("cannot list", &d))? {
                let e = e.map_err(Error::io("cannot list", &d))?;
                let p = e.path();
                let ft = e.file_type().map_err(Error::io("cannot stat", &p))?;
                if ft.is_dir() {
                    stack.push(p);
                } else if p
                    .extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()))
                {
                    let rel = p.strip_prefix(src).unwrap_or(&p);
                    let key: Vec<String> = rel
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect();
                    out.push((key.join("/"), p));
                }
            }
        }
        out.sort();
        if out.is_empty() {
            return Err(Error::Data(format!(
                "{}: no image files ({}) under this folder",
                src.display(),
                IMAGE_EXTENSIONS.join(", ")
            )));
        }
        return Ok(out);
    }
    let text = std::fs::read_to_string(src).map_err(Error::io("cannot read", src))?;
    let base = src.parent().unwrap_or(Path::new(""));
    let mut out: Vec<(String, PathBuf)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| (l.to_string(), base.join(l)))
        .collect();
    out.sort();
    out.dedup();
    let missing: Vec<&str> = out
        .iter()
        .filter(|(_, p)| !p.is_file())
        .map(|(k, _)| k.as_str())
        .take(5)
        .collect();
    if !missing.is_empty() {
        return Err(Error::Data(format!(
            "{}: listed images that do not exist, e.g. {}",
            src.display(),
            missing.join(", ")
        )));
    }
    Ok(out)
}

/// The distinct non-empty lines of a text file, sorted (as `embed` keys texts).
fn text_list(src: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(src).map_err(Error::io("cannot read", src))?;
    let mut v: Vec<String> = text
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .filter(|l| !l.trim().is_empty())
        .collect();
    v.sort();
    v.dedup();
    if v.is_empty() {
        return Err(Error::Data(format!(
            "{}: no texts (one per line)",
            src.display()
        )));
    }
    Ok(v)
}

/// Runs the request; returns the summary.
pub fn encode(req: &EncodeRequest) -> Result<String> {
    let images = req.images.as_deref().map(image_list).transpose()?;
    let texts = req.texts.as_deref().map(text_list).transpose()?;
    let clip = Clip::load(&req.checkpoint, req.arch.as_ref(), req.device)?;
    let dim = clip.config.embed_dim as i32;
    let model = req.model.clone().unwrap_or_else(|| {
        req.checkpoint
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "clip".into())
    });
    let mut summary = vec![format!("CLIP: {}", clip.config.describe())];
    if clip.config.assumed {
        summary.push(ASSUMED_NOTE.to_string());
    }
    let (image_out, text_out) = out_paths(&req.out, images.is_some(), texts.is_some());
    let progress = Progress::new(req.progress);
    if let Some(list) = &images {
        let tmp = image_out.with_extension("parquet.tmp");
        let mut w = ResultWriter::new(
            OutputFormat::Parquet,
            Some(&tmp),
            image_embeddings_schema(dim),
        )?;
        let bar = progress.bar("encode images", list.len() as u64, "images");
        let started = Instant::now();
        let mut rejects: Vec<(String, String)> = Vec::new();
        for batch in list.chunks(req.batch_size) {
            let keys: Vec<ImageKey> = batch
                .iter()
                .map(|(_, p)| ImageKey {
                    path: p,
                    bbox: None,
                    rgb_first: false,
                })
                .collect();
            let mut ok_keys = Vec::new();
            let mut tensors = Vec::new();
            for ((key, _), t) in batch
                .iter()
                .zip(load_batch_with(&keys, &clip.config.preprocess))
            {
                match t {
                    Ok(t) => {
                        ok_keys.push(key.as_str());
                        tensors.push(t);
                    }
                    Err(reason) => rejects.push((key.clone(), reason)),
                }
            }
            if !tensors.is_empty() {
                let x = Tensor::stack(&tensors, 0).to_device(req.device);
                let f = tch::no_grad(|| {
                    with_precision(req.device, req.mixed_precision, || clip.encode_image(&x))
                })?;
                let keys: ArrayRef = Arc::new(StringArray::from(ok_keys));
                w.write(&embeddings_batch(
                    true,
                    keys,
                    &model,
                    finite_rows(&f, "image")?,
                    dim,
                )?)?;
            }
            bar.inc(batch.len() as u64);
        }
        bar.finish_and_clear();
        w.finish()?;
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        if !rejects.is_empty() {
            let _ = std::fs::remove_file(&tmp);
            let first: Vec<String> = rejects
                .iter()
                .take(5)
                .map(|(k, r)| format!("{k} ({r})"))
                .collect();
            return Err(Error::Data(format!(
                "{} of {} image(s) could not be read, so nothing was written: {}. Remove or replace them and rerun",
                rejects.len(),
                list.len(),
                first.join("; ")
            )));
        }
        std::fs::rename(&tmp, &image_out).map_err(Error::io("cannot write", &image_out))?;
        summary.push(format!(
            "{} images in {secs:.2} s = {:.1} images/s on {:?} -> {}",
            thousands(list.len() as u64),
            list.len() as f64 / secs,
            req.device,
            image_out.display()
        ));
    }
    if let Some(list) = &texts {
        let tok = ClipTokenizer::new(clip.config.context_length as usize);
        let tmp = text_out.with_extension("parquet.tmp");
        let mut w = ResultWriter::new(
            OutputFormat::Parquet,
            Some(&tmp),
            text_embeddings_schema(dim),
        )?;
        let bar = progress.bar("encode texts", list.len() as u64, "texts");
        let started = Instant::now();
        for batch in list.chunks(req.batch_size) {
            let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
            let t = tok.batch(&refs).to_device(req.device);
            let f = tch::no_grad(|| {
                with_precision(req.device, req.mixed_precision, || clip.encode_text(&t))
            })?;
            let keys: ArrayRef = Arc::new(StringArray::from(refs));
            w.write(&embeddings_batch(
                false,
                keys,
                &model,
                finite_rows(&f, "text")?,
                dim,
            )?)?;
            bar.inc(batch.len() as u64);
        }
        bar.finish_and_clear();
        w.finish()?;
        std::fs::rename(&tmp, &text_out).map_err(Error::io("cannot write", &text_out))?;
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        summary.push(format!(
            "{} texts in {secs:.2} s = {:.1} texts/s -> {}",
            thousands(list.len() as u64),
            list.len() as f64 / secs,
            text_out.display()
        ));
    }
    Ok(summary.join("\n") + "\n")
}
