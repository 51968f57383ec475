//! `score`: Recall@K per task and method, from the `templates` table and
//! the embeddings of one model (ARCHITECTURE.md, "Semantics kept from the
//! original"): GeneCIS tasks rank their 15 candidates (R@1/2/3 in the
//! paper), global tasks (CIRR val, MIT-States) the whole gallery (R@1/5/10).
//!
//! Tables:
//! - `scores(task, template_id, method, target_rank, similarities list<f32>,
//!   top_keys list<utf8>?)`: GeneCIS tasks: the cosine similarity of the
//!   query to each candidate (candidate 0 is the target), `top_keys` null;
//!   global tasks: the 10 most similar gallery images and their
//!   similarities. `target_rank` is the 1-based rank of the target (the
//!   best-ranked hit for global tasks).
//! - `results(task, method, recall_at_1, recall_at_2, recall_at_3,
//!   recall_at_5, recall_at_10, n_templates)`: task `average` is the mean
//!   over the GeneCIS tasks scored (the paper's average R@1).
//!
//! Also `report.md` and `results.png` in the stage folder.
//!
//! Ranking follows the original's `get_recall`: candidates sorted by
//! similarity, descending; ties keep candidate order (a stable sort), so a
//! candidate scoring exactly the target's similarity ranks after it.

pub mod audit;
mod browse;
mod html;
mod rank;
mod report;

pub use rank::{rank_global, Ranked};

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
use crate::framework::stage::{
    resolve_path, ChunkTables, Chunks, Finding, InputTable, Stage, StageContext, TableDef,
};
use crate::stages::templates::TASKS;

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
        Field::new(
            "top_keys",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        ),
    ]))
});

/// The K of `results`' recall_at_K columns.
pub const KS: [usize; 5] = [1, 2, 3, 5, 10];

pub static RESULTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("task", DataType::Utf8, false),
        Field::new("method", DataType::Utf8, false),
        Field::new("recall_at_1", DataType::Float64, false),
        Field::new("recall_at_2", DataType::Float64, false),
        Field::new("recall_at_3", DataType::Float64, false),
        Field::new("recall_at_5", DataType::Float64, false),
        Field::new("recall_at_10", DataType::Float64, false),
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
    /// The audit's near-duplicate threshold: image cosine at or above it.
    #[serde(default = "near")]
    pub near_duplicate: f64,
}

fn near() -> f64 {
    0.99
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
pub(crate) struct Embeddings {
    pub(crate) index: HashMap<String, usize>,
    pub(crate) values: Vec<f32>,
    pub(crate) dim: usize,
}

impl Embeddings {
    pub(crate) fn new(keys: &[String], values: Vec<f32>, dim: usize) -> Embeddings {
        Embeddings {
            index: keys
                .iter()
                .enumerate()
                .map(|(i, k)| (k.clone(), i))
                .collect(),
            values,
            dim,
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&[f32]> {
        self.index.get(key).map(|&i| self.row(i))
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }
}

/// Reads `(key_column, model, embedding)` rows of `model` (or of the only
/// model present).
pub(crate) fn read_embeddings(
    dir: &Path,
    key_col: &str,
    model: Option<&str>,
) -> Result<(String, Embeddings), String> {
    let batches = crate::framework::store::read_table(dir).map_err(|e| e.to_string())?;
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
    conditions: Vec<String>,
    reference: Vec<usize>,
    text: Vec<usize>,
    /// GeneCIS tasks: target first.
    candidates: Vec<Vec<usize>>,
    global: Option<GlobalRows>,
}

/// A global task: its gallery and, per query, where the reference and the
/// hits stand in it.
struct GlobalRows {
    /// Embedding rows, in gallery order.
    gallery: Vec<usize>,
    keys: Vec<String>,
    mask: Vec<Option<usize>>,
    relevant: Vec<Vec<usize>>,
}

/// `galleries`: set -> image keys in order.
fn read_galleries(dir: Option<&Path>) -> Result<HashMap<String, Vec<String>>, String> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let Some(dir) = dir else {
        return Ok(out);
    };
    for b in crate::framework::store::read_table(dir).map_err(|e| crate::error::report(&e))? {
        let set = b
            .column_by_name("gallery_set")
            .ok_or("galleries has no gallery_set")?;
        let key = b
            .column_by_name("image_key")
            .ok_or("galleries has no image_key")?;
        let (set, key) = (set.as_string::<i32>(), key.as_string::<i32>());
        for i in 0..b.num_rows() {
            out.entry(set.value(i).to_string())
                .or_default()
                .push(key.value(i).to_string());
        }
    }
    Ok(out)
}

fn read_templates(
    dir: &Path,
    galleries: &HashMap<String, Vec<String>>,
    img: &Embeddings,
    txt: &Embeddings,
    stage: &str,
) -> Result<Vec<TaskRows>, String> {
    let mut by_task: Vec<TaskRows> = Vec::new();
    // Gallery positions of each set's keys.
    let positions: HashMap<&str, HashMap<&str, usize>> = galleries
        .iter()
        .map(|(set, keys)| {
            (
                set.as_str(),
                keys.iter()
                    .enumerate()
                    .map(|(i, k)| (k.as_str(), i))
                    .collect(),
            )
        })
        .collect();
    let missing = |what: &str, k: &str, task: &str, id: u32| {
        format!(
            "{task} template {id} needs the {what} '{k}', which has no embedding: list the stage that makes this task's templates in the inputs of the embed stage feeding '{stage}'"
        )
    };
    for b in crate::framework::store::read_table(dir).map_err(|e| e.to_string())? {
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
        let gs = col("gallery_set")?;
        let gs = gs.as_string::<i32>();
        let tk = col("target_keys")?;
        let tk = tk.as_list::<i32>();
        for i in 0..b.num_rows() {
            let name = task.value(i);
            let tid = id.value(i);
            let pos = match by_task.iter().position(|x| x.task == name) {
                Some(p) => p,
                None => {
                    let global = match gs.is_valid(i) {
                        false => None,
                        true => {
                            let set = gs.value(i);
                            let keys = galleries.get(set).ok_or_else(|| {
                                format!("{name} ranks the gallery '{set}', which the galleries table does not hold: list the templates stage (not just its templates table) in the inputs of '{stage}'")
                            })?;
                            let gallery = keys
                                .iter()
                                .map(|k| {
                                    img.index
                                        .get(k.as_str())
                                        .copied()
                                        .ok_or_else(|| missing("gallery image", k, name, tid))
                                })
                                .collect::<Result<Vec<_>, String>>()?;
                            Some(GlobalRows {
                                gallery,
                                keys: keys.clone(),
                                mask: Vec::new(),
                                relevant: Vec::new(),
                            })
                        }
                    };
                    by_task.push(TaskRows {
                        task: name.to_string(),
                        template_ids: Vec::new(),
                        conditions: Vec::new(),
                        reference: Vec::new(),
                        text: Vec::new(),
                        candidates: Vec::new(),
                        global,
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
            tr.conditions.push(cond.value(i).to_string());
            tr.reference.push(get(r.value(i), "reference image")?);
            tr.text.push(
                txt.index
                    .get(cond.value(i))
                    .copied()
                    .ok_or_else(|| missing("condition text", cond.value(i), name, tid))?,
            );
            if let Some(g) = &mut tr.global {
                let pos = &positions[gs.value(i)];
                g.mask.push(pos.get(r.value(i)).copied());
                let hits = tk.value(i);
                let hits = hits.as_string::<i32>();
                g.relevant.push(
                    (0..hits.len())
                        .map(|j| {
                            pos.get(hits.value(j)).copied().ok_or_else(|| {
                                format!(
                                    "{name} template {tid}: target '{}' is not in its gallery",
                                    hits.value(j)
                                )
                            })
                        })
                        .collect::<Result<Vec<_>, String>>()?,
                );
                continue;
            }
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
    /// Recall at each of [`KS`].
    pub at: [f64; 5],
    pub n: u64,
    /// A global task (reported at K = 1, 5, 10).
    pub global: bool,
}

impl Recall {
    fn from_ranks(task: &str, method: &'static str, ranks: &[u32], global: bool) -> Recall {
        let n = ranks.len() as u64;
        Recall {
            task: task.to_string(),
            method,
            at: KS.map(|k| {
                ranks.iter().filter(|&&r| r as usize <= k).count() as f64 / n.max(1) as f64
            }),
            n,
            global,
        }
    }

    /// The (K, recall) pairs a report shows: 1/2/3, or 1/5/10 for global tasks.
    pub fn shown(&self) -> [(usize, f64); 3] {
        let pick = if self.global { [0, 3, 4] } else { [0, 1, 2] };
        pick.map(|i| (KS[i], self.at[i]))
    }
}

pub struct Score;

impl Stage for Score {
    const KIND: &'static str = "score";
    const VERSION: &'static str = "2";
    const ABOUT: &'static str =
        "templates + embeddings (+ Combiner) -> scores, results (R@1/2/3), report.md, results.png";
    type Params = ScoreParams;

    type Work = ();

    fn input_tables() -> &'static [InputTable] {
        const INPUTS: &[InputTable] = &[
            InputTable::required("templates"),
            InputTable::optional("galleries"),
            InputTable::optional("weights"),
            InputTable::optional("image_keys"),
            InputTable::required("image_embeddings"),
            InputTable::required("text_embeddings"),
        ];
        INPUTS
    }

    fn output_tables() -> Vec<TableDef> {
        vec![
            TableDef::new("scores", SCORES_SCHEMA.clone()),
            TableDef::new("results", RESULTS_SCHEMA.clone()),
            TableDef::new("recall_by_condition", browse::BY_CONDITION_SCHEMA.clone()),
            TableDef::new("audit", audit::AUDIT_SCHEMA.clone()),
        ]
    }

    fn validate(p: &ScoreParams, _base: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let methods = p.methods();
        if methods.is_empty() {
            out.push(("methods".into(), "name at least one method".into()));
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

    fn validate_inputs(p: &ScoreParams, tables: &[String]) -> Vec<(String, String)> {
        let needs = p
            .methods
            .as_ref()
            .is_some_and(|m| m.contains(&Method::Combiner));
        if needs && p.combiner.is_none() && !tables.iter().any(|t| t == "weights") {
            return vec![(
                "combiner".into(),
                "method 'combiner' needs a Combiner: set params.combiner, or list a train stage in inputs".into(),
            )];
        }
        Vec::new()
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
        for part in crate::framework::store::part_files(ctx.input("templates")?)? {
            n += crate::framework::store::part_rows(&part)?;
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
        let galleries = read_galleries(ctx.optional_input("galleries")).map_err(fail)?;
        let tasks = read_templates(ctx.input("templates")?, &galleries, &img, &txt, ctx.stage)
            .map_err(fail)?;
        if tasks.is_empty() {
            return Err(fail(
                "the templates table is empty: nothing to score".into(),
            ));
        }
        let device = select_device(&p.device).map_err(&fail)?;
        let trained = match ctx.optional_input("weights") {
            Some(d) => crate::stages::train::weights_file(d, "combiner")?,
            None => None,
        };
        if p.combiner.is_some() && trained.is_some() {
            return Err(Error::Data(
                "params.combiner and a train stage in inputs both give a Combiner: keep one".into(),
            ));
        }
        let comb_path = p.combiner.as_ref().map(|c| ctx.resolve(c)).or(trained);
        let methods = p.methods.clone().unwrap_or_else(|| {
            let mut m = vec![Method::ImageOnly, Method::TextOnly, Method::ImagePlusText];
            if comb_path.is_some() {
                m.push(Method::Combiner);
            }
            m
        });
        let combiner = match (&comb_path, methods.contains(&Method::Combiner)) {
            (None, true) => {
                return Err(Error::Data(
                    "method 'combiner' needs a Combiner: set params.combiner, or list a train stage in inputs".into(),
                ))
            }
            (Some(c), true) => {
                let comb = Combiner::new(StateDict::load(c, device)?)?;
                if comb.dim as usize != img.dim {
                    return Err(fail(format!(
                        "the Combiner takes {}-d features but model {model} gives {}-d: use the head trained for this backbone",
                        comb.dim, img.dim
                    )));
                }
                Some(comb)
            }
            _ => None,
        };

        let (rows, recalls) = evaluate(&tasks, &img, &txt, p, &methods, combiner.as_ref(), device)?;
        let scores = rows.finish()?;
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
        let browse = browse::Browse::new(&tasks, &img, &scores, &methods)?;
        let by_condition = browse.by_condition();
        let audit_rows = browse.audit(p.near_duplicate as f32);
        for (check, n) in audit::counts(&audit_rows) {
            if n > 0 {
                ctx.note(format!("audit: {check}: {n} finding(s)"));
            }
        }
        let html = browse.write_html(
            ctx,
            &title,
            &recalls,
            &by_condition,
            &audit_rows,
            &comb_path,
        )?;
        ctx.note(format!(
            "report: {} and {}",
            report.display(),
            html.display()
        ));
        Ok(Some(vec![
            ("scores", scores),
            ("results", results),
            (
                "recall_by_condition",
                browse::by_condition_batch(&by_condition)?,
            ),
            ("audit", audit::batch(&audit_rows)?),
        ]))
    }
}

/// Queries of each method against each task's candidates (or gallery):
/// the `scores` rows and one Recall per (task, method), plus the GeneCIS
/// average when several GeneCIS tasks were scored.
fn evaluate(
    tasks: &[TaskRows],
    img: &Embeddings,
    txt: &Embeddings,
    p: &ScoreParams,
    methods: &[Method],
    combiner: Option<&Combiner>,
    device: Device,
) -> Result<(ScoreRows, Vec<Recall>)> {
    let img_n: Vec<Vec<f32>> = (0..img.index.len())
        .map(|i| normalized(img.row(i)))
        .collect();
    let txt_n: Vec<Vec<f32>> = (0..txt.index.len())
        .map(|i| normalized(txt.row(i)))
        .collect();
    let mut rows = ScoreRows::default();
    let mut recalls: Vec<Recall> = Vec::new();
    for t in tasks {
        // A global gallery goes to the device once per task.
        let gallery = match &t.global {
            Some(g) => {
                let flat: Vec<f32> = g
                    .gallery
                    .iter()
                    .flat_map(|&r| img_n[r].iter().copied())
                    .collect();
                Some(
                    Tensor::f_from_slice(&flat)?
                        .f_view([g.gallery.len() as i64, img.dim as i64])?
                        .f_to_device(device)?,
                )
            }
            None => None,
        };
        for &method in methods {
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
                        let mix: Vec<f32> = a
                            .iter()
                            .zip(b)
                            .map(|(a, b)| (1.0 - w) * a + w * b)
                            .collect();
                        normalized(&mix)
                    })
                    .collect(),
                Method::Combiner => {
                    let comb = combiner.ok_or_else(|| {
                        Error::Internal("combiner method without a combiner".into())
                    })?;
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
                            .to_device(device)
                    };
                    let mut out = Vec::with_capacity(t.reference.len());
                    // Blocks keep a large global task's activations small.
                    for (refs, texts) in t.reference.chunks(4096).zip(t.text.chunks(4096)) {
                        let qi = pick(refs, &img, &img_n);
                        let qt = pick(texts, &txt, &txt_n);
                        let y = tch::no_grad(|| comb.forward(&qi, &qt))?;
                        let flat =
                            Vec::<f32>::try_from(y.to_device(Device::Cpu).contiguous().view([-1]))?;
                        out.extend(flat.chunks(img.dim).map(normalized));
                    }
                    out
                }
            };
            let ranks = match (&t.global, &gallery) {
                (Some(g), Some(gallery)) => {
                    let flat: Vec<f32> = queries.iter().flatten().copied().collect();
                    let ranked =
                        rank_global(&flat, img.dim, gallery, &g.mask, &g.relevant, 10, device)?;
                    for (i, r) in ranked.iter().enumerate() {
                        let sims: Vec<f32> = r.top.iter().map(|x| x.1).collect();
                        let keys: Vec<&str> = r
                            .top
                            .iter()
                            .map(|x| g.keys[x.0 as usize].as_str())
                            .collect();
                        rows.push(
                            &t.task,
                            t.template_ids[i],
                            method,
                            r.rank,
                            &sims,
                            Some(&keys),
                        );
                    }
                    ranked.iter().map(|r| r.rank).collect::<Vec<_>>()
                }
                _ => {
                    let mut ranks = Vec::with_capacity(queries.len());
                    for (i, q) in queries.iter().enumerate() {
                        let sims: Vec<f32> =
                            t.candidates[i].iter().map(|&c| dot(q, &img_n[c])).collect();
                        let rank = target_rank(&sims);
                        rows.push(&t.task, t.template_ids[i], method, rank, &sims, None);
                        ranks.push(rank);
                    }
                    ranks
                }
            };
            recalls.push(Recall::from_ranks(
                &t.task,
                method.name(),
                &ranks,
                t.global.is_some(),
            ));
        }
    }
    let local: Vec<&TaskRows> = tasks.iter().filter(|t| t.global.is_none()).collect();
    if local.len() > 1 {
        for &method in methods {
            let rs: Vec<&Recall> = recalls
                .iter()
                .filter(|r| r.method == method.name() && !r.global)
                .collect();
            let mut at = [0.0; 5];
            for r in &rs {
                for (a, v) in at.iter_mut().zip(r.at) {
                    *a += v / rs.len() as f64;
                }
            }
            recalls.push(Recall {
                task: "average".into(),
                method: method.name(),
                at,
                n: rs.iter().map(|r| r.n).sum(),
                global: false,
            });
        }
    }
    Ok((rows, recalls))
}

/// A Combiner's recalls on the templates (what `train` selects by).
pub(crate) fn combiner_recalls(
    templates: &Path,
    galleries: Option<&Path>,
    img: &Embeddings,
    txt: &Embeddings,
    combiner: &Combiner,
    device: Device,
    stage: &str,
) -> Result<Vec<Recall>> {
    let galleries = read_galleries(galleries).map_err(Error::Data)?;
    let tasks = read_templates(templates, &galleries, img, txt, stage).map_err(Error::Data)?;
    let p: ScoreParams = serde_json::from_str("{}")
        .map_err(|e| Error::Internal(format!("default score params: {e}")))?;
    let (_, recalls) = evaluate(
        &tasks,
        img,
        txt,
        &p,
        &[Method::Combiner],
        Some(combiner),
        device,
    )?;
    Ok(recalls)
}

fn results_batch(recalls: &[Recall]) -> Result<RecordBatch> {
    let mut task = StringBuilder::new();
    let mut method = StringBuilder::new();
    let mut at: [Float64Builder; 5] = Default::default();
    let mut n = UInt64Builder::new();
    for r in recalls {
        task.append_value(&r.task);
        method.append_value(r.method);
        for (b, v) in at.iter_mut().zip(r.at) {
            b.append_value(v);
        }
        n.append_value(r.n);
    }
    let mut cols: Vec<ArrayRef> = vec![Arc::new(task.finish()), Arc::new(method.finish())];
    cols.extend(at.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    cols.push(Arc::new(n.finish()));
    Ok(RecordBatch::try_new(RESULTS_SCHEMA.clone(), cols)?)
}

/// Builders of the `scores` table.
#[derive(Default)]
struct ScoreRows {
    task: StringBuilder,
    id: UInt32Builder,
    method: StringBuilder,
    rank: UInt32Builder,
    sims: ListBuilder<Float32Builder>,
    top: ListBuilder<StringBuilder>,
}

impl ScoreRows {
    fn push(
        &mut self,
        task: &str,
        id: u32,
        method: Method,
        rank: u32,
        sims: &[f32],
        top: Option<&[&str]>,
    ) {
        self.task.append_value(task);
        self.id.append_value(id);
        self.method.append_value(method.name());
        self.rank.append_value(rank);
        for &s in sims {
            self.sims.values().append_value(s);
        }
        self.sims.append(true);
        match top {
            Some(keys) => {
                for k in keys {
                    self.top.values().append_value(k);
                }
                self.top.append(true);
            }
            None => self.top.append(false),
        }
    }

    fn finish(mut self) -> Result<RecordBatch> {
        Ok(RecordBatch::try_new(
            SCORES_SCHEMA.clone(),
            vec![
                Arc::new(self.task.finish()) as ArrayRef,
                Arc::new(self.id.finish()),
                Arc::new(self.method.finish()),
                Arc::new(self.rank.finish()),
                Arc::new(self.sims.finish()),
                Arc::new(self.top.finish()),
            ],
        )?)
    }
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
