//! `genecis contamination TRAIN EVAL`: evaluation images a model may have
//! seen in training. TRAIN is an `embed` stage run on triplets (its keys are
//! image ids; the paths come from the captions its inputs name), EVAL an
//! `embed` stage run on templates (its keys are image keys). Exact
//! duplicates: the same decoded pixels (blake3 of size, mode and bytes).
//! Near duplicates: cosine of the two stages' image embeddings at or above
//! a threshold, computed blockwise (the evaluation images against a block
//! of training images per matrix product).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rayon::prelude::*;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::framework::sql::{OutputFormat, ResultWriter};
use crate::framework::store::{column, read_table, StageRecord};
use crate::model::decode::open;
use crate::tables::captions::read_image_paths;
use crate::tables::embeddings::{read_embeddings, Embeddings};
use crate::tables::image_keys::read_image_keys;

/// What to check, validated.
pub struct ContaminationRequest {
    /// The training run's embed stage folder.
    pub train: PathBuf,
    /// The evaluation run's embed stage folder.
    pub eval: PathBuf,
    /// Cosine from which an image pair counts as a near duplicate.
    pub threshold: f64,
    /// Training images per matrix product.
    pub block: usize,
    pub out: Option<PathBuf>,
    pub format: OutputFormat,
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("eval_key", DataType::Utf8, false),
        Field::new("train_image_id", DataType::Int64, false),
        Field::new("cosine", DataType::Float64, true),
        Field::new("kind", DataType::Utf8, false),
    ]))
}

/// One flagged pair.
#[derive(Debug, Clone, PartialEq)]
struct Hit {
    eval_key: String,
    train_id: i64,
    cosine: Option<f64>,
    kind: &'static str,
}

/// An embed stage's record, its committed folder and the committed folders
/// of the stages it read.
fn stage(dir: &Path, role: &str) -> Result<(StageRecord, PathBuf, Vec<PathBuf>)> {
    let workdir = dir.parent().unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let abs = std::path::absolute(workdir).map_err(Error::io("cannot resolve", workdir))?;
    let run = crate::framework::commit::RunStore::local(&abs)?;
    let rec = StageRecord::head(&run, &name)?.ok_or_else(|| Error::Usage {
        arg: role.into(),
        message: format!(
            "{} is not a committed stage folder (no _log/): pass <workdir>/<embed stage>",
            dir.display()
        ),
    })?;
    if rec.kind != "embed" {
        return Err(Error::Usage {
            arg: role.into(),
            message: format!(
                "{} is a {} stage; pass an embed stage",
                dir.display(),
                rec.kind
            ),
        });
    }
    let inputs = rec
        .inputs
        .iter()
        .map(|i| crate::framework::store::version_dir(workdir, &i.stage, &i.fingerprint))
        .collect();
    let own = rec.dir(workdir);
    Ok((rec, own, inputs))
}

/// blake3 of an image's decoded pixels (size, mode, bytes), or why not.
fn pixel_hash(path: &Path) -> std::result::Result<[u8; 32], String> {
    let r = open(path)?;
    let mut h = blake3::Hasher::new();
    h.update(&r.width.to_le_bytes());
    h.update(&r.height.to_le_bytes());
    h.update(format!("{:?}", r.mode).as_bytes());
    h.update(&r.data);
    Ok(*h.finalize().as_bytes())
}

/// Unit rows of `keys` in `e`, as a [n, d] tensor.
fn unit_rows(e: &Embeddings, keys: &[String]) -> Result<Tensor> {
    let mut flat = Vec::with_capacity(keys.len() * e.dim);
    for k in keys {
        let row = e
            .get(k)
            .ok_or_else(|| Error::Internal(format!("no embedding of '{k}'")))?;
        flat.extend_from_slice(row);
    }
    let t = Tensor::f_from_slice(&flat)?.f_reshape([keys.len() as i64, e.dim as i64])?;
    let n = t
        .f_norm_scalaropt_dim(2, [1].as_slice(), true)?
        .f_clamp_min(1e-12)?;
    Ok(t.f_div(&n)?)
}

/// Runs the check; returns the summary text (the table goes to `out`).
pub fn contamination(req: &ContaminationRequest) -> Result<String> {
    let (_, train_dir, train_inputs) = stage(&req.train, "TRAIN")?;
    let (_, eval_dir, eval_inputs) = stage(&req.eval, "EVAL")?;
    let (model, train_emb) =
        read_embeddings(&train_dir.join("image_embeddings"), "image_key", None)
            .map_err(|m| Error::Data(format!("TRAIN image_embeddings: {m}")))?;
    let (eval_model, eval_emb) =
        read_embeddings(&eval_dir.join("image_embeddings"), "image_key", None)
            .map_err(|m| Error::Data(format!("EVAL image_embeddings: {m}")))?;
    if model != eval_model || train_emb.dim != eval_emb.dim {
        return Err(Error::Usage {
            arg: "TRAIN EVAL".into(),
            message: format!(
                "the two stages embed with different models ({model}, {}-d; {eval_model}, {}-d): cosines across models mean nothing; embed both with one checkpoint",
                train_emb.dim, eval_emb.dim
            ),
        });
    }
    // Training images: id -> path, from the captions the train stage read.
    let workdir = req.train.parent().unwrap_or(Path::new("."));
    let captions = train_inputs
        .iter()
        .map(|d| d.join("captions"))
        .find(|d| d.is_dir())
        .ok_or_else(|| {
            Error::Data(format!(
                "{} read no captions table: pass an embed stage run on triplets and captions",
                req.train.display()
            ))
        })?;
    let paths = read_image_paths(&captions, workdir)?;
    let mut train_ids: Vec<i64> = train_emb
        .index
        .keys()
        .filter_map(|k| k.parse().ok())
        .collect();
    train_ids.sort_unstable();
    // Evaluation images: key -> path, from the templates stage's image_keys.
    let templates_dir = eval_inputs
        .iter()
        .find(|d| d.join("image_keys").is_dir())
        .ok_or_else(|| {
            Error::Data(format!(
                "{} read no image_keys table: pass an embed stage run on a templates stage",
                req.eval.display()
            ))
        })?
        .clone();
    let keys = read_image_keys(&templates_dir.join("image_keys"))?;
    let eval_keys: Vec<String> = keys
        .iter()
        .map(|k| k.key.clone())
        .filter(|k| eval_emb.get(k).is_some())
        .collect();

    // Exact duplicates by decoded pixels; each file decoded once.
    let eval_files: BTreeMap<&Path, Vec<&str>> = keys.iter().fold(BTreeMap::new(), |mut m, k| {
        m.entry(k.path.as_path())
            .or_insert_with(Vec::new)
            .push(k.key.as_str());
        m
    });
    let hashed = |files: Vec<&Path>| -> (Vec<Option<[u8; 32]>>, usize) {
        let h: Vec<Option<[u8; 32]>> = files.par_iter().map(|p| pixel_hash(p).ok()).collect();
        let bad = h.iter().filter(|x| x.is_none()).count();
        (h, bad)
    };
    let ef: Vec<&Path> = eval_files.keys().copied().collect();
    let (eh, eval_unreadable) = hashed(ef.clone());
    let mut by_hash: HashMap<[u8; 32], Vec<&str>> = HashMap::new();
    for (p, h) in ef.iter().zip(&eh) {
        if let Some(h) = h {
            by_hash
                .entry(*h)
                .or_default()
                .extend(eval_files[p].iter().copied());
        }
    }
    let train_files: Vec<(i64, &Path)> = train_ids
        .iter()
        .filter_map(|id| paths.get(id).map(|p| (*id, p.as_path())))
        .collect();
    let (th, train_unreadable) = hashed(train_files.iter().map(|x| x.1).collect());
    let cos = |e: &str, t: i64| -> Option<f64> {
        let (a, b) = (eval_emb.get(e)?, train_emb.get(&t.to_string())?);
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        Some(dot / (na * nb).max(1e-12))
    };
    let mut hits: Vec<Hit> = Vec::new();
    let mut exact: BTreeSet<(String, i64)> = BTreeSet::new();
    for ((id, _), h) in train_files.iter().zip(&th) {
        let Some(h) = h else { continue };
        for e in by_hash.get(h).into_iter().flatten() {
            exact.insert((e.to_string(), *id));
            hits.push(Hit {
                eval_key: e.to_string(),
                train_id: *id,
                cosine: cos(e, *id),
                kind: "exact",
            });
        }
    }

    // Near duplicates, blockwise.
    let ids_s: Vec<String> = train_ids.iter().map(|i| i.to_string()).collect();
    let e = unit_rows(&eval_emb, &eval_keys)?;
    for (b, chunk) in ids_s.chunks(req.block.max(1)).enumerate() {
        let t = unit_rows(&train_emb, chunk)?;
        let sims = tch::no_grad(|| e.f_matmul(&t.f_tr()?))?;
        let found = sims.f_ge(req.threshold)?.f_nonzero()?;
        if found.size()[0] == 0 {
            continue;
        }
        let ix = Vec::<i64>::try_from(found.f_contiguous()?.f_reshape([-1])?)?;
        let vals = Vec::<f32>::try_from(
            sims.f_to_kind(Kind::Float)?
                .f_contiguous()?
                .f_reshape([-1])?,
        )?;
        let width = chunk.len();
        for pair in ix.chunks(2) {
            let (i, j) = (pair[0] as usize, pair[1] as usize);
            let id = train_ids[b * req.block.max(1) + j];
            if exact.contains(&(eval_keys[i].clone(), id)) {
                continue;
            }
            hits.push(Hit {
                eval_key: eval_keys[i].clone(),
                train_id: id,
                cosine: Some(vals[i * width + j] as f64),
                kind: "near",
            });
        }
    }
    hits.sort_by(|a, b| (&a.eval_key, a.train_id, a.kind).cmp(&(&b.eval_key, b.train_id, b.kind)));

    if let Some(out) = &req.out {
        let batch = RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    hits.iter().map(|h| h.eval_key.as_str()),
                )) as ArrayRef,
                Arc::new(Int64Array::from_iter_values(
                    hits.iter().map(|h| h.train_id),
                )),
                Arc::new(Float64Array::from_iter(hits.iter().map(|h| h.cosine))),
                Arc::new(StringArray::from_iter_values(hits.iter().map(|h| h.kind))),
            ],
        )?;
        let mut w = ResultWriter::new(req.format, Some(out), schema())?;
        w.write(&batch)?;
        w.finish()?;
    }

    // Templates that touch a flagged image, per task.
    let flagged: BTreeSet<&str> = hits.iter().map(|h| h.eval_key.as_str()).collect();
    let mut per_task: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    if templates_dir.join("templates").is_dir() {
        for b in read_table(&templates_dir.join("templates"))? {
            let task = column(&b, "task")?.as_string::<i32>().clone();
            let r = column(&b, "reference_key")?.as_string::<i32>().clone();
            let t = column(&b, "target_key")?.as_string::<i32>().clone();
            let g = column(&b, "gallery_keys")?.as_list::<i32>().clone();
            for i in 0..b.num_rows() {
                let gl = g.value(i);
                let gl = gl.as_string::<i32>();
                let touched = flagged.contains(r.value(i))
                    || (t.is_valid(i) && flagged.contains(t.value(i)))
                    || (0..gl.len()).any(|j| flagged.contains(gl.value(j)));
                let e = per_task.entry(task.value(i).to_string()).or_default();
                e.0 += touched as u64;
                e.1 += 1;
            }
        }
    }
    let count = |k: &str| hits.iter().filter(|h| h.kind == k).count();
    let mut s = format!(
        "{} training images against {} evaluation images (model {model}): {} exact duplicate pair(s), {} near duplicate pair(s) at cosine >= {}\n",
        train_ids.len(),
        eval_keys.len(),
        count("exact"),
        count("near"),
        req.threshold
    );
    if train_unreadable + eval_unreadable > 0 {
        s.push_str(&format!(
            "not hashed (unreadable or missing files): {train_unreadable} training, {eval_unreadable} evaluation\n"
        ));
    }
    for (task, (touched, n)) in &per_task {
        s.push_str(&format!(
            "  {task:<18} {touched} of {n} templates touch a training image\n"
        ));
    }
    Ok(s)
}
