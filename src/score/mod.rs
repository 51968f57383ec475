//! `score`: GeneCIS Recall@1/2/3 per task and method, from the `templates`
//! table and the embeddings of one model (ARCHITECTURE.md, "Semantics kept from the original").
//!
//! Tables:
//! - `scores(task, template_id, method, target_rank, similarities list<f32>)`: per template,
//!   the cosine similarity of the query to each candidate (candidate 0 is the target) and
//!   the target's 1-based rank.
//! - `results(task, method, recall_at_1, recall_at_2, recall_at_3, n_templates)`: task
//!   `average` is the mean over the tasks scored (the paper's average R@1).
//!
//! Also `report.md` and `results.png` in the stage folder.
//!
//! Ranking follows the original's `get_recall`: candidates sorted by
//! similarity, descending; ties keep candidate order (a stable sort), so a
//! candidate scoring exactly the target's similarity ranks after it.

mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, ArrayRef, AsArray, Float32Builder, Float64Builder, ListBuilder, StringBuilder,
    UInt32Builder, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::combiner::Combiner;
use crate::model::{select_device, StateDict};
use crate::stage::{
    resolve_path, ChunkTables, Chunks, Finding, InputTable, Stage, StageContext, TableDef,
};
use crate::templates::TASKS;

pub static SCORES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("task", DataType::Utf8, false),
        Field::new("template_id", DataType::UInt32, false),
        Field::new("method", DataType::Utf8, false),
        Field::new("target_rank", DataType::UInt32, false),
        Field::new(
            "similarities",
            DataType::List(Arc::new(Field::new("item", DataType::Float32, true))),
            false,
        ),
    ]))
});

pub static RESULTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("task", DataType::Utf8, false),
        Field::new("method", DataType::Utf8, false),
        Field::new("recall_at_1", DataType::Float64, false),
        Field::new("recall_at_2", DataType::Float64, false),
        Field::new("recall_at_3", DataType::Float64, false),
        Field::new("n_templates", DataType::UInt64, false),
    ]))
});

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    ImageOnly,
    TextOnly,
    ImagePlusText,
    Combiner,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::ImageOnly => "image_only",
            Method::TextOnly => "text_only",
            Method::ImagePlusText => "image_plus_text",
            Method::Combiner => "combiner",
        }
    }
}

/// Which CLIP features a query is built from: raw ones (as the original
/// evaluation does) or L2-normalised ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureInput {
    Raw,
    Normalized,
}

impl FeatureInput {
    pub fn name(self) -> &'static str {
        match self {
            FeatureInput::Raw => "raw",
            FeatureInput::Normalized => "normalized",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreParams {
    /// Default: image_only, text_only, image_plus_text, and combiner when a
    /// combiner checkpoint is given.
    #[serde(default)]
    pub methods: Option<Vec<Method>>,
    /// Weight of the text in image_plus_text: normalize((1-w) img + w txt).
    #[serde(default = "half")]
    pub text_weight: f64,
    /// The features image_plus_text averages. `raw` is the original's
    /// FeatureComb (CLIP's image and text features have different norms,
    /// so the text weighs more than `text_weight` says); `normalized`
    /// averages unit vectors, the weight meaning what it says.
    #[serde(default = "raw")]
    pub image_plus_text_input: FeatureInput,
    /// A Combiner head (`*_combiner_head.pt` state dict, or safetensors).
    #[serde(default)]
    pub combiner: Option<PathBuf>,
    #[serde(default = "raw")]
    pub combiner_input: FeatureInput,
    /// Which model's embeddings (the `model` column); needed only when the
    /// embeddings hold several.
    #[serde(default)]
    pub model: Option<String>,
    /// Where the Combiner runs: `auto`, `cpu`, `cuda`, `cuda:N`.
    #[serde(default = "auto")]
    pub device: String,
}

fn half() -> f64 {
    0.5
}
fn raw() -> FeatureInput {
    FeatureInput::Raw
}
fn auto() -> String {
    "auto".into()
}

impl ScoreParams {
    pub fn methods(&self) -> Vec<Method> {
        self.methods.clone().unwrap_or_else(|| {
            let mut m = vec![Method::ImageOnly, Method::TextOnly, Method::ImagePlusText];
            if self.combiner.is_some() {
                m.push(Method::Combiner);
            }
            m
        })
    }
}

/// Embeddings of one model: key -> row of a row-major matrix.
struct Embeddings {
    index: HashMap<String, usize>,
    values: Vec<f32>,
    dim: usize,
}

impl Embeddings {
    fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }
}

/// Reads `(key_column, model, embedding)` rows of `model` (or of the only
/// model present).
fn read_embeddings(
    dir: &Path,
    key_col: &str,
    model: Option<&str>,
) -> Result<(String, Embeddings), String> {
    let batches = crate::store::read_table(dir).map_err(|e| e.to_string())?;
    let mut models = std::collections::BTreeSet::new();
    for b in &batches {
        let m = b.column_by_name("model").ok_or("no model column")?;
        models.extend(m.as_string::<i32>().iter().flatten().map(str::to_string));
    }
    let chosen = match model {
        // An empty table (no conditions to encode) holds no model at all.
        Some(m) if models.contains(m) || models.is_empty() => m.to_string(),
        Some(m) => {
            return Err(format!(
                "no embeddings of model '{m}' in {}; it holds: {}",
                dir.display(),
                models.into_iter().collect::<Vec<_>>().join(", ")
            ))
        }
        None if models.len() <= 1 => models.into_iter().next().unwrap_or_default(),
        None => {
            return Err(format!(
                "{} holds embeddings of several models ({}): set params.model",
                dir.display(),
                models.into_iter().collect::<Vec<_>>().join(", ")
            ))
        }
    };
    let mut index = HashMap::new();
    let mut values = Vec::new();
    let mut dim = 0usize;
    for b in &batches {
        let keys = b
            .column_by_name(key_col)
            .ok_or("no key column")?
            .as_string::<i32>()
            .clone();
        let m = b
            .column_by_name("model")
            .ok_or("no model column")?
            .as_string::<i32>()
            .clone();
        let emb = b
            .column_by_name("embedding")
            .ok_or("no embedding column")?
            .as_fixed_size_list()
            .clone();
        let d = emb.value_length() as usize;
        if dim != 0 && d != dim && emb.len() > 0 {
            return Err(format!("embedding widths differ ({dim} and {d})"));
        }
        if emb.len() > 0 {
            dim = d;
        }
        let vals = emb.values().as_primitive::<Float32Type>();
        for i in 0..b.num_rows() {
            if m.value(i) != chosen {
                continue;
            }
            let row = index.len();
            if index.insert(keys.value(i).to_string(), row).is_some() {
                return Err(format!("'{}' has two embeddings", keys.value(i)));
            }
            values.extend_from_slice(&vals.values()[i * d..(i + 1) * d]);
        }
    }
    Ok((chosen, Embeddings { index, values, dim }))
}

fn normalized(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter().map(|x| x / n).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// 1-based rank of candidate 0 under a stable descending sort.
pub fn target_rank(sims: &[f32]) -> u32 {
    1 + sims[1..].iter().filter(|&&s| s > sims[0]).count() as u32
}

/// One task's templates, resolved to embedding rows.
struct TaskRows {
    task: String,
    template_ids: Vec<u32>,
    reference: Vec<usize>,
    text: Vec<usize>,
    /// Target first.
    candidates: Vec<Vec<usize>>,
}

fn read_templates(
    dir: &Path,
    img: &Embeddings,
    txt: &Embeddings,
    stage: &str,
) -> Result<Vec<TaskRows>, String> {
    let mut by_task: Vec<TaskRows> = Vec::new();
    let missing = |what: &str, k: &str, task: &str, id: u32| {
        format!(
            "{task} template {id} needs the {what} '{k}', which has no embedding: list the stage that makes this task's templates in the inputs of the embed stage feeding '{stage}'"
        )
    };
    for b in crate::store::read_table(dir).map_err(|e| e.to_string())? {
        let col = |n: &str| {
            b.column_by_name(n)
                .cloned()
                .ok_or(format!("templates has no column {n}"))
        };
        let task = col("task")?;
        let task = task.as_string::<i32>();
        let id = col("template_id")?;
        let id = id.as_primitive::<arrow::datatypes::UInt32Type>();
        let cond = col("condition")?;
        let cond = cond.as_string::<i32>();
        let r = col("reference_key")?;
        let r = r.as_string::<i32>();
        let t = col("target_key")?;
        let t = t.as_string::<i32>();
        let g = col("gallery_keys")?;
        let g = g.as_list::<i32>();
        for i in 0..b.num_rows() {
            let name = task.value(i);
            let tid = id.value(i);
            let pos = match by_task.iter().position(|x| x.task == name) {
                Some(p) => p,
                None => {
                    by_task.push(TaskRows {
                        task: name.to_string(),
                        template_ids: Vec::new(),
                        reference: Vec::new(),
                        text: Vec::new(),
                        candidates: Vec::new(),
                    });
                    by_task.len() - 1
                }
            };
            let get = |k: &str, what: &str| {
                img.index
                    .get(k)
                    .copied()
                    .ok_or_else(|| missing(what, k, name, tid))
            };
            let tr = &mut by_task[pos];
            tr.template_ids.push(tid);
            tr.reference.push(get(r.value(i), "reference image")?);
            tr.text.push(
                txt.index
                    .get(cond.value(i))
                    .copied()
                    .ok_or_else(|| missing("condition text", cond.value(i), name, tid))?,
            );
            let mut c = vec![get(t.value(i), "target image")?];
            let gl = g.value(i);
            let gl = gl.as_string::<i32>();
            for j in 0..gl.len() {
                c.push(get(gl.value(j), "gallery image")?);
            }
            tr.candidates.push(c);
        }
    }
    // The paper's task order, then any others by name.
    by_task.sort_by_key(|t| {
        (
            TASKS
                .iter()
                .position(|x| *x == t.task)
                .unwrap_or(TASKS.len()),
            t.task.clone(),
        )
    });
    Ok(by_task)
}

/// One result row.
#[derive(Debug, Clone, PartialEq)]
pub struct Recall {
    pub task: String,
    pub method: &'static str,
    pub at: [f64; 3],
    pub n: u64,
}

pub struct Score;

impl Stage for Score {
    const KIND: &'static str = "score";
    const VERSION: &'static str = "1";
    const ABOUT: &'static str =
        "templates + embeddings (+ Combiner) -> scores, results (R@1/2/3), report.md, results.png";
    type Params = ScoreParams;

    type Work = ();

    fn input_tables() -> &'static [InputTable] {
        const INPUTS: &[InputTable] = &[
            InputTable::required("templates"),
            InputTable::required("image_embeddings"),
            InputTable::required("text_embeddings"),
        ];
        INPUTS
    }

    fn output_tables() -> Vec<TableDef> {
        vec![
            TableDef::new("scores", SCORES_SCHEMA.clone()),
            TableDef::new("results", RESULTS_SCHEMA.clone()),
        ]
    }

    fn validate(p: &ScoreParams, _base: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let methods = p.methods();
        if methods.is_empty() {
            out.push(("methods".into(), "name at least one method".into()));
        }
        if methods.contains(&Method::Combiner) && p.combiner.is_none() {
            out.push((
                "combiner".into(),
                "method 'combiner' needs a Combiner checkpoint: set params.combiner".into(),
            ));
        }
        let mut seen = methods.clone();
        seen.sort_by_key(|m| m.name());
        seen.dedup();
        if seen.len() != methods.len() {
            out.push(("methods".into(), "a method is listed twice".into()));
        }
        if !(0.0..=1.0).contains(&p.text_weight) {
            out.push(("text_weight".into(), "must be between 0 and 1".into()));
        }
        if let Err(m) = select_device(&p.device) {
            out.push(("device".into(), m));
        }
        out
    }

    fn files(p: &ScoreParams, base: &Path) -> Vec<(&'static str, PathBuf)> {
        p.combiner
            .iter()
            .map(|c| ("combiner", resolve_path(base, c)))
            .collect()
    }

    fn check(p: &ScoreParams, base: &Path) -> Vec<Finding> {
        match &p.combiner {
            Some(c) => {
                match StateDict::load(&resolve_path(base, c), Device::Cpu).and_then(Combiner::new) {
                    Ok(_) => Vec::new(),
                    Err(e) => vec![Finding::error("combiner", e.to_string())],
                }
            }
            None => Vec::new(),
        }
    }

    fn plan(_p: &ScoreParams, ctx: &StageContext) -> Result<Chunks<()>> {
        let mut n = 0;
        for part in crate::store::part_files(ctx.input("templates")?)? {
            n += crate::store::part_rows(&part)?;
        }
        Ok(Chunks::single((), n, "templates"))
    }

    fn run_chunk(
        p: &ScoreParams,
        _w: &(),
        _k: usize,
        ctx: &StageContext,
    ) -> Result<Option<ChunkTables>> {
        let fail = Error::Data;
        let (model, img) = read_embeddings(
            ctx.input("image_embeddings")?,
            "image_key",
            p.model.as_deref(),
        )
        .map_err(|m| fail(format!("image_embeddings: {m}")))?;
        let (_, mut txt) = read_embeddings(ctx.input("text_embeddings")?, "text", Some(&model))
            .map_err(|m| fail(format!("text_embeddings: {m}")))?;
        if txt.index.is_empty() {
            txt.dim = img.dim;
        }
        if img.dim != txt.dim {
            return Err(fail(format!(
                "image embeddings have width {} but text embeddings {}: they come from different models",
                img.dim, txt.dim
            )));
        }
        let tasks =
            read_templates(ctx.input("templates")?, &img, &txt, ctx.stage).map_err(fail)?;
        if tasks.is_empty() {
            return Err(fail(
                "the templates table is empty: nothing to score".into(),
            ));
        }
        let combiner = match (&p.combiner, p.methods().contains(&Method::Combiner)) {
            (Some(c), true) => {
                let device = select_device(&p.device).map_err(&fail)?;
                let comb = Combiner::new(StateDict::load(&ctx.resolve(c), device)?)?;
                if comb.dim as usize != img.dim {
                    return Err(fail(format!(
                        "the Combiner takes {}-d features but model {model} gives {}-d: use the head trained for this backbone",
                        comb.dim, img.dim
                    )));
                }
                Some((comb, device))
            }
            _ => None,
        };

        let img_n: Vec<Vec<f32>> = (0..img.index.len())
            .map(|i| normalized(img.row(i)))
            .collect();
        let txt_n: Vec<Vec<f32>> = (0..txt.index.len())
            .map(|i| normalized(txt.row(i)))
            .collect();
        let mut s_task = StringBuilder::new();
        let mut s_id = UInt32Builder::new();
        let mut s_method = StringBuilder::new();
        let mut s_rank = UInt32Builder::new();
        let mut s_sims = ListBuilder::new(Float32Builder::new());
        let mut recalls: Vec<Recall> = Vec::new();
        for t in &tasks {
            for method in p.methods() {
                let queries: Vec<Vec<f32>> = match method {
                    Method::ImageOnly => t.reference.iter().map(|&r| img_n[r].clone()).collect(),
                    Method::TextOnly => t.text.iter().map(|&x| txt_n[x].clone()).collect(),
                    Method::ImagePlusText => t
                        .reference
                        .iter()
                        .zip(&t.text)
                        .map(|(&r, &x)| {
                            let w = p.text_weight as f32;
                            let (a, b) = match p.image_plus_text_input {
                                FeatureInput::Raw => (img.row(r), txt.row(x)),
                                FeatureInput::Normalized => (&img_n[r][..], &txt_n[x][..]),
                            };
                            let mix: Vec<f32> =
                                a.iter().zip(b).map(|(a, b)| (1.0 - w) * a + w * b).collect();
                            normalized(&mix)
                        })
                        .collect(),
                    Method::Combiner => {
                        let (comb, device) = combiner.as_ref().expect("validated: combiner set");
                        let pick = |rows: &[usize], e: &Embeddings, n: &[Vec<f32>]| -> Tensor {
                            let flat: Vec<f32> = rows
                                .iter()
                                .flat_map(|&r| match p.combiner_input {
                                    FeatureInput::Raw => e.row(r).to_vec(),
                                    FeatureInput::Normalized => n[r].clone(),
                                })
                                .collect();
                            Tensor::from_slice(&flat)
                                .view([rows.len() as i64, e.dim as i64])
                                .to_device(*device)
                        };
                        let qi = pick(&t.reference, &img, &img_n);
                        let qt = pick(&t.text, &txt, &txt_n);
                        let out = tch::no_grad(|| comb.forward(&qi, &qt))?;
                        let flat = Vec::<f32>::try_from(
                            out.to_device(Device::Cpu).contiguous().view([-1]),
                        )?;
                        flat.chunks(img.dim).map(normalized).collect()
                    }
                };
                let mut hits = [0u64; 3];
                for (i, q) in queries.iter().enumerate() {
                    let sims: Vec<f32> =
                        t.candidates[i].iter().map(|&c| dot(q, &img_n[c])).collect();
                    let rank = target_rank(&sims);
                    for (k, h) in hits.iter_mut().enumerate() {
                        if rank as usize <= k + 1 {
                            *h += 1;
                        }
                    }
                    s_task.append_value(&t.task);
                    s_id.append_value(t.template_ids[i]);
                    s_method.append_value(method.name());
                    s_rank.append_value(rank);
                    for s in sims {
                        s_sims.values().append_value(s);
                    }
                    s_sims.append(true);
                }
                let n = queries.len() as u64;
                recalls.push(Recall {
                    task: t.task.clone(),
                    method: method.name(),
                    at: hits.map(|h| h as f64 / n.max(1) as f64),
                    n,
                });
            }
        }
        if tasks.len() > 1 {
            for method in p.methods() {
                let rows: Vec<&Recall> = recalls
                    .iter()
                    .filter(|r| r.method == method.name())
                    .collect();
                let mut at = [0.0; 3];
                for r in &rows {
                    for (a, v) in at.iter_mut().zip(r.at) {
                        *a += v / rows.len() as f64;
                    }
                }
                recalls.push(Recall {
                    task: "average".into(),
                    method: method.name(),
                    at,
                    n: rows.iter().map(|r| r.n).sum(),
                });
            }
        }
        let scores = RecordBatch::try_new(
            SCORES_SCHEMA.clone(),
            vec![
                Arc::new(s_task.finish()) as ArrayRef,
                Arc::new(s_id.finish()),
                Arc::new(s_method.finish()),
                Arc::new(s_rank.finish()),
                Arc::new(s_sims.finish()),
            ],
        )?;
        let results = results_batch(&recalls)?;
        let title = format!(
            "GeneCIS, model {model}; image_plus_text on {} features, w_text = {}",
            p.image_plus_text_input.name(),
            p.text_weight
        );
        let report = ctx.write_file("report.md", report::markdown(&title, &recalls).as_bytes())?;
        ctx.write_file(
            "results.png",
            &report::chart_png(&title, &recalls).map_err(fail)?,
        )?;
        for line in report::text_table(&recalls).lines() {
            ctx.note(line);
        }
        ctx.note(format!("report: {}", report.display()));
        Ok(Some(vec![("scores", scores), ("results", results)]))
    }
}

fn results_batch(recalls: &[Recall]) -> Result<RecordBatch> {
    let mut task = StringBuilder::new();
    let mut method = StringBuilder::new();
    let mut at: [Float64Builder; 3] = Default::default();
    let mut n = UInt64Builder::new();
    for r in recalls {
        task.append_value(&r.task);
        method.append_value(r.method);
        for (b, v) in at.iter_mut().zip(r.at) {
            b.append_value(v);
        }
        n.append_value(r.n);
    }
    let [mut a1, mut a2, mut a3] = at;
    Ok(RecordBatch::try_new(
        RESULTS_SCHEMA.clone(),
        vec![
            Arc::new(task.finish()) as ArrayRef,
            Arc::new(method.finish()),
            Arc::new(a1.finish()),
            Arc::new(a2.finish()),
            Arc::new(a3.finish()),
            Arc::new(n.finish()),
        ],
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_counts_strictly_better_candidates() {
        assert_eq!(target_rank(&[0.9, 0.1, 0.2]), 1);
        assert_eq!(target_rank(&[0.5, 0.6, 0.4, 0.7]), 3);
        // A tie keeps candidate order: the target (index 0) stays ahead.
        assert_eq!(target_rank(&[0.5, 0.5, 0.1]), 1);
    }
}
