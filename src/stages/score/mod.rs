//! `score`: Recall@K per task and method, from the `templates` table and
//! the embeddings of one model (ARCHITECTURE.md, "Semantics kept from the
//! original"): GeneCIS tasks rank their 15 candidates (R@1/2/3 in the
//! paper), global tasks (CIRR val, MIT-States) the whole gallery (R@1/5/10).
//!
//! Tables:
//! - `scores(task, template_id, method, target_rank, similarities list<f32>,
//!   top_keys list<utf8>?)`: GeneCIS tasks: the cosine similarity of the
//!   query to each candidate (candidate 0 is the target), `top_keys` null;
//!   global tasks: the 10 most similar gallery images (the reference left
//!   out) and their similarities. `target_rank` is the 1-based rank of the
//!   target (the best-ranked hit for global tasks; 0 where labels are
//!   hidden). A task with subsets (CIRR) adds `<task>_subset` rows: the
//!   target ranked within the query's subset (Recall_subset).
//! - `results(task, method, recall_at_1, recall_at_2, recall_at_3,
//!   recall_at_5, recall_at_10, recall_at_50, n_templates, ..., preprocess)`:
//!   `preprocess` says how the method's images were prepared; task `average`
//!   is the mean over the GeneCIS tasks scored (the paper's average R@1).
//!
//! A task whose labels are hidden (CIRR test1) gets no recall but the CIRR
//! server's two submission files per method.
//!
//! Also `report.md` and `results.png` in the stage folder.
//!
//! Ranking follows the original's `get_recall`: candidates sorted by
//! similarity, descending; ties keep candidate order (a stable sort), so a
//! candidate scoring exactly the target's similarity ranks after it.

mod browse;
mod html;
mod inversion;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, Float32Builder, Float64Array, Float64Builder, ListBuilder, StringArray,
    StringBuilder, UInt32Builder, UInt64Array, UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::error::{Error, Result};
use crate::eval::audit;
use crate::eval::{
    evaluate, paired_rows, read_galleries, read_templates, subset_recalls, with_intervals,
    FeatureInput, Method, PairedRow, QueryConfig, RankTable, Recall,
};
use crate::framework::stage::{
    resolve_path, ChunkTables, Chunks, Finding, InputTable, Stage, StageContext, TableDef,
};
use crate::model::combiner::Combiner;
use crate::model::{select_device, StateDict};
use crate::tables::embeddings::read_embeddings;
use crate::tables::imported::read_given;

pub(crate) static SCORES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
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
pub(crate) static RESULTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("task", DataType::Utf8, false),
        Field::new("method", DataType::Utf8, false),
        Field::new("recall_at_1", DataType::Float64, false),
        Field::new("recall_at_2", DataType::Float64, false),
        Field::new("recall_at_3", DataType::Float64, false),
        Field::new("recall_at_5", DataType::Float64, false),
        Field::new("recall_at_10", DataType::Float64, false),
        Field::new("recall_at_50", DataType::Float64, false),
        Field::new("n_templates", DataType::UInt64, false),
        Field::new("recall_at_1_lo", DataType::Float64, true),
        Field::new("recall_at_1_hi", DataType::Float64, true),
        Field::new("recall_at_2_lo", DataType::Float64, true),
        Field::new("recall_at_2_hi", DataType::Float64, true),
        Field::new("recall_at_3_lo", DataType::Float64, true),
        Field::new("recall_at_3_hi", DataType::Float64, true),
        Field::new("subset", DataType::Utf8, false),
        // How the method's images were prepared: `embed: torchvision`,
        // `LinCIR: CLIPImageProcessor`, `imported`, ...
        Field::new("preprocess", DataType::Utf8, false),
    ]))
});

/// Every pair of methods on every task: the paired bootstrap interval of
/// the difference in R@1 and the exact McNemar test.
pub(crate) static PAIRED_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("task", DataType::Utf8, false),
        Field::new("method_a", DataType::Utf8, false),
        Field::new("method_b", DataType::Utf8, false),
        Field::new("n", DataType::UInt64, false),
        Field::new("delta_recall_at_1", DataType::Float64, false),
        Field::new("lo", DataType::Float64, true),
        Field::new("hi", DataType::Float64, true),
        Field::new("p_value", DataType::Float64, false),
        Field::new("test", DataType::Utf8, false),
    ]))
});

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ScoreParams {
    /// Default: image_only, text_only, image_plus_text, and combiner when a
    /// combiner checkpoint is given.
    pub methods: Option<Vec<Method>>,
    /// Weight of the text in image_plus_text: normalize((1-w) img + w txt).
    pub text_weight: f64,
    /// The features image_plus_text averages. `raw` is the original's
    /// FeatureComb (CLIP's image and text features have different norms,
    /// so the text weighs more than `text_weight` says); `normalized`
    /// averages unit vectors, the weight meaning what it says.
    pub image_plus_text_input: FeatureInput,
    /// A Combiner head (`*_combiner_head.pt` state dict, or safetensors).
    pub combiner: Option<PathBuf>,
    pub combiner_input: FeatureInput,
    /// Which model's embeddings (the `model` column); needed only when the
    /// embeddings hold several.
    pub model: Option<String>,
    /// Where the Combiner runs: `auto`, `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// The audit's near-duplicate threshold: image cosine at or above it.
    pub near_duplicate: f64,
    /// Bootstrap resamples of each interval (0: no intervals).
    pub bootstrap: usize,
    /// Seed of the resamples: the same run gives the same intervals.
    pub seed: u64,
    /// Audit checks whose flagged templates are left out of a second set
    /// of `results` rows, `subset = "audited"` (e.g.
    /// `["target_among_distractors", "duplicate_in_gallery"]`).
    pub exclude: Vec<String>,
    /// A `genecis contamination --out` table: templates that touch one of
    /// its evaluation images get the audit finding `contaminated` (leave
    /// them out with `exclude = ["contaminated"]`).
    pub contamination: Option<PathBuf>,
    /// The CLIP whose text tower encodes the textual-inversion methods'
    /// prompts (pic2word, searle, lincir): the checkpoint the embed stage
    /// used; checked against its text embeddings.
    pub clip: Option<PathBuf>,
    /// `clip`'s architecture, as `embed`'s `arch`.
    pub arch: Option<String>,
    /// Pic2Word's checkpoint (`pic2word_model.pt`: `state_dict_img2text`).
    pub pic2word: Option<PathBuf>,
    /// SEARLE's Phi (`SEARLE_ViT-L14.pt`: `{"epoch", "Phi"}`).
    pub searle: Option<PathBuf>,
    /// LinCIR's Phi (`lincir_large.pt`: `{"Phi"}`).
    pub lincir: Option<PathBuf>,
    /// The textual-inversion prompt: `{}` is the condition, the placeholder
    /// the pseudo word (LinCIR's eval_genecis for all three methods).
    pub inversion_prompt: String,
    /// The pseudo word's token in the prompt (`$`; Pic2Word's own prompts
    /// use `*`).
    pub inversion_placeholder: String,
    /// LinCIR's GeneCIS code formats the object tasks' target rank (a 0
    /// tensor) where the condition should be: `published` reproduces that
    /// ("a photo of $ that 0"), `condition` uses the condition.
    pub inversion_object_condition: ObjectCondition,
    /// The images the textual-inversion methods see: `lincir` prepares
    /// them as LinCIR's GeneCIS code does (CLIPImageProcessor, whatever
    /// the checkpoint; re-encoded here when the embed stage prepared them
    /// otherwise), `embed` uses the embed stage's features.
    pub inversion_preprocess: InversionPreprocess,
}

/// Whose preprocessing the textual-inversion methods' images get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum InversionPreprocess {
    Lincir,
    Embed,
}

/// What the textual-inversion prompt of an object task holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ObjectCondition {
    Published,
    Condition,
}

impl Default for ScoreParams {
    /// The defaults of every param, in one place.
    fn default() -> Self {
        ScoreParams {
            methods: Default::default(),
            text_weight: 0.5,
            image_plus_text_input: FeatureInput::Raw,
            combiner: Default::default(),
            combiner_input: FeatureInput::Raw,
            model: Default::default(),
            device: "auto".into(),
            near_duplicate: 0.99,
            bootstrap: 10_000,
            seed: 0,
            exclude: Vec::new(),
            contamination: None,
            clip: None,
            arch: None,
            pic2word: None,
            searle: None,
            lincir: None,
            inversion_prompt: "a photo of $ that {}".into(),
            inversion_placeholder: "$".into(),
            inversion_object_condition: ObjectCondition::Published,
            inversion_preprocess: InversionPreprocess::Lincir,
        }
    }
}

impl ScoreParams {
    pub(crate) fn queries(&self) -> QueryConfig {
        QueryConfig {
            text_weight: self.text_weight,
            image_plus_text_input: self.image_plus_text_input,
            combiner_input: self.combiner_input,
        }
    }

    pub(crate) fn methods(&self) -> Vec<Method> {
        self.methods.clone().unwrap_or_else(|| {
            let mut m = vec![Method::ImageOnly, Method::TextOnly, Method::ImagePlusText];
            if self.combiner.is_some() {
                m.push(Method::Combiner);
            }
            m
        })
    }
}

pub(crate) struct Score;

impl Stage for Score {
    const KIND: &'static str = "score";
    /// 3: the audit's `reference_in_gallery` check. 4: 95% intervals in
    /// `results`, the `paired` table. 5: `recall_at_50`, CIRR's subsets,
    /// the reference out of global top lists, imported methods. 6: the
    /// inversion methods under LinCIR's preprocessing, `preprocess`.
    const VERSION: &'static str = "6";
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
            InputTable::optional("imported_scores"),
            InputTable::optional("imported_queries"),
            InputTable::optional("imported_gallery"),
        ];
        INPUTS
    }

    fn output_tables() -> Vec<TableDef> {
        vec![
            TableDef::new("scores", SCORES_SCHEMA.clone()),
            TableDef::new("results", RESULTS_SCHEMA.clone()),
            TableDef::new("recall_by_condition", browse::BY_CONDITION_SCHEMA.clone()),
            TableDef::new("audit", audit::AUDIT_SCHEMA.clone()),
            TableDef::new("paired", PAIRED_SCHEMA.clone()),
        ]
    }

    fn validate(p: &ScoreParams, base: &Path) -> Vec<Finding> {
        let mut out = Vec::new();
        let methods = p.methods();
        let mut seen = methods.clone();
        seen.sort_by_key(|m| m.name());
        seen.dedup();
        if seen.len() != methods.len() {
            out.push(Finding::error("methods", "a method is listed twice"));
        }
        for c in &p.exclude {
            if !audit::CHECKS.contains(&c.as_str()) {
                out.push(Finding::error(
                    "exclude",
                    format!(
                        "'{c}' is not an audit check; the checks: {}",
                        audit::CHECKS.join(", ")
                    ),
                ));
            }
        }
        if p.bootstrap > 1_000_000 {
            out.push(Finding::error(
                "bootstrap",
                "at most 1,000,000 resamples (0 turns the intervals off)",
            ));
        }
        if !(-1.0..=1.0).contains(&p.near_duplicate) {
            out.push(Finding::error(
                "near_duplicate",
                "a cosine: between -1 and 1",
            ));
        }
        if !(0.0..=1.0).contains(&p.text_weight) {
            out.push(Finding::error("text_weight", "must be between 0 and 1"));
        }
        if let Err(m) = select_device(&p.device) {
            out.push(Finding::error("device", m));
        }
        out.extend(inversion::validate(p, &methods, base));
        out
    }

    fn validate_inputs(p: &ScoreParams, tables: &[String]) -> Vec<Finding> {
        let imports = tables.iter().any(|t| t.starts_with("imported_"));
        if p.methods().is_empty() && !imports {
            return vec![Finding::error(
                "methods",
                "name at least one method (an empty list scores only imported methods: list an import-scores stage in inputs)",
            )];
        }
        let needs = p
            .methods
            .as_ref()
            .is_some_and(|m| m.contains(&Method::Combiner));
        if needs && p.combiner.is_none() && !tables.iter().any(|t| t == "weights") {
            return vec![Finding::error(
                "combiner",
                "method 'combiner' needs a Combiner: set params.combiner, or list a train stage in inputs",
            )];
        }
        Vec::new()
    }

    fn files(p: &ScoreParams, base: &Path) -> Vec<(&'static str, PathBuf)> {
        let mut v: Vec<(&'static str, PathBuf)> = p
            .combiner
            .iter()
            .map(|c| ("combiner", resolve_path(base, c)))
            .collect();
        v.extend(inversion::files(p, base));
        v.extend(
            p.contamination
                .iter()
                .map(|c| ("contamination", resolve_path(base, c))),
        );
        v
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

    fn run_shared(
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
        let device = select_device(&p.device).map_err(fail)?;
        let trained = match ctx.optional_input("weights") {
            Some(d) => crate::tables::weights::weights_file(d, "combiner")?,
            None => None,
        };
        if p.combiner.is_some() && trained.is_some() {
            return Err(Error::Data(
                "params.combiner and a train stage in inputs both give a Combiner: keep one".into(),
            ));
        }
        let comb_path = p.combiner.as_ref().map(|c| ctx.resolve(c)).or(trained);
        let mut methods = p.methods.clone().unwrap_or_else(|| {
            let mut m = vec![Method::ImageOnly, Method::TextOnly, Method::ImagePlusText];
            if comb_path.is_some() {
                m.push(Method::Combiner);
            }
            m
        });
        // Imported methods come after the built-in ones, by name.
        let mut given = read_given(
            ctx.optional_input("imported_scores"),
            ctx.optional_input("imported_queries"),
            ctx.optional_input("imported_gallery"),
        )?;
        let mut imported: Vec<&'static str> = given.keys().copied().collect();
        let mut preprocess: BTreeMap<&'static str, String> = imported
            .iter()
            .map(|&n| (n, "imported".to_string()))
            .collect();
        let mut embed_preprocess = "embed".to_string();
        if let Some(inv) = inversion::queries(p, ctx, &tasks, &img, &txt, &methods, device)? {
            embed_preprocess = format!("embed: {}", inv.embed_preprocess);
            for (name, g) in inv.methods {
                preprocess.insert(name, inv.preprocess.clone());
                given.insert(name, g);
            }
        }
        let preprocess_of = |m: &str| -> String {
            preprocess
                .get(m)
                .cloned()
                .unwrap_or_else(|| embed_preprocess.clone())
        };
        imported.sort_unstable();
        methods.extend(
            imported
                .into_iter()
                .map(|n| Method::Imported(crate::eval::Name(n))),
        );
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

        let mut rows = ScoreRows::default();
        let mut ranks = RankTable::new();
        let mut ids = RankTable::new();
        // Tasks whose labels are hidden (CIRR test1) and their subsets:
        // each method's ranked image names per template, for the server.
        let hidden: Vec<String> = tasks
            .iter()
            .filter(|t| t.global.as_ref().is_some_and(|g| g.hidden()))
            .flat_map(|t| [t.task.clone(), crate::eval::subset_task(&t.task)])
            .collect();
        let mut submissions: Submissions = BTreeMap::new();
        let mut recalls = evaluate(
            &tasks,
            &img,
            &txt,
            &p.queries(),
            &methods,
            combiner.as_ref(),
            &given,
            device,
            &mut |task, id, method, rank, sims, top| {
                if let (true, Some(keys)) = (hidden.iter().any(|h| h == task), top) {
                    submissions
                        .entry((task.to_string(), method.name()))
                        .or_default()
                        .insert(id, keys.iter().map(|k| cirr_name(k)).collect());
                }
                ranks
                    .entry((task.to_string(), method.name()))
                    .or_default()
                    .push(rank);
                ids.entry((task.to_string(), method.name()))
                    .or_default()
                    .push(id);
                rows.push(task, id, method, rank, sims, top)
            },
        )?;
        let scores = rows.finish()?;
        for t in tasks
            .iter()
            .filter(|t| t.global.as_ref().is_some_and(|g| g.hidden()))
        {
            for m in &methods {
                let files = write_submission(ctx, &t.task, m.name(), &submissions)?;
                ctx.note(format!(
                    "{}: labels hidden; {} for the CIRR server",
                    t.task, files
                ));
            }
        }
        with_intervals(&mut recalls, &ranks, p.bootstrap, p.seed);
        let paired = paired_rows(&recalls, &ranks, p.bootstrap, p.seed);
        // The audit flags templates from the scores; the audited subset
        // leaves out those the excluded checks flag.
        let browse = browse::Browse::new(&tasks, &img, &scores, &methods)?;
        let mut audit_rows = browse.audit(p.near_duplicate as f32);
        if let Some(c) = &p.contamination {
            audit_rows.extend(contaminated(&ctx.resolve(c), ctx.input("templates")?)?);
        }
        let audited = (!p.exclude.is_empty()).then(|| {
            let flagged: std::collections::HashSet<(&str, u32)> = audit_rows
                .iter()
                .filter(|r| p.exclude.iter().any(|c| c == r.check))
                .map(|r| (r.task.as_str(), r.template_id))
                .collect();
            let (mut sub, kept) =
                subset_recalls(&recalls, &ranks, &ids, |t, i| !flagged.contains(&(t, i)));
            with_intervals(&mut sub, &kept, p.bootstrap, p.seed);
            sub
        });
        let mut results = results_batch(&recalls, "all", &preprocess_of)?;
        if let Some(sub) = &audited {
            results = arrow::compute::concat_batches(
                &RESULTS_SCHEMA,
                &[results, results_batch(sub, "audited", &preprocess_of)?],
            )?;
            // Templates of one method (every method scores the same ones).
            let n = |rs: &[Recall]| -> u64 {
                let first = rs.first().map(|r| r.method);
                rs.iter()
                    .filter(|r| r.task != "average" && Some(r.method) == first)
                    .map(|r| r.n)
                    .sum()
            };
            ctx.note(format!(
                "audited subset without {}: {} of {} templates",
                p.exclude.join(", "),
                n(sub),
                n(&recalls)
            ));
        }
        let title = format!(
            "GeneCIS, model {model}; image_plus_text on {} features, w_text = {}",
            p.image_plus_text_input.name(),
            p.text_weight
        );
        let mut md = report::markdown(&title, &recalls, &paired);
        if let Some(sub) = &audited {
            md.push_str(&report::markdown(
                &format!(
                    "Audited subset: without the templates {} flag",
                    p.exclude.join(", ")
                ),
                sub,
                &[],
            ));
        }
        let report = ctx.write_file("report.md", md.as_bytes())?;
        ctx.write_file(
            "results.png",
            &report::chart_png(&title, &recalls).map_err(fail)?,
        )?;
        for line in report::text_table(&recalls).lines() {
            ctx.note(line);
        }
        let by_condition = browse.by_condition();
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
            &paired,
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
            ("paired", paired_batch(&paired)?),
        ]))
    }
}

/// (task, method) -> template id -> ranked image keys' names.
type Submissions = BTreeMap<(String, &'static str), BTreeMap<u32, Vec<String>>>;

/// A gallery key's image name as CIRR writes it: the file name without
/// its extension.
fn cirr_name(key: &str) -> String {
    let file = key.rsplit('/').next().unwrap_or(key);
    file.rsplit_once('.')
        .map_or(file, |(stem, _)| stem)
        .to_string()
}

/// The CIRR server's two files for one method: `recall` (the top 50 of
/// each pair id, the reference left out) and `recall_subset` (the best 3
/// of its subset); `{"version": "rc2", "metric": ..., "<pairid>": [...]}`.
fn write_submission(
    ctx: &StageContext,
    task: &str,
    method: &'static str,
    all: &Submissions,
) -> Result<String> {
    let safe: String = method
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut names = Vec::new();
    for (metric, of) in [
        ("recall", task.to_string()),
        ("recall_subset", crate::eval::subset_task(task)),
    ] {
        let mut obj = serde_json::Map::new();
        obj.insert("version".into(), "rc2".into());
        obj.insert("metric".into(), metric.into());
        for (id, keys) in all.get(&(of, method)).into_iter().flatten() {
            obj.insert(id.to_string(), keys.clone().into());
        }
        let name = format!("{task}.{safe}.{metric}.json");
        let bytes = serde_json::to_vec(&serde_json::Value::Object(obj))
            .map_err(|e| Error::Internal(format!("cannot write {name}: {e}")))?;
        ctx.write_file(&name, &bytes)?;
        names.push(name);
    }
    Ok(names.join(" and "))
}

fn results_batch(
    recalls: &[Recall],
    subset: &str,
    preprocess: &dyn Fn(&str) -> String,
) -> Result<RecordBatch> {
    let mut task = StringBuilder::new();
    let mut method = StringBuilder::new();
    let mut at: [Float64Builder; 6] = Default::default();
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
    for i in 0..3 {
        let interval = |hi: bool| -> ArrayRef {
            Arc::new(Float64Array::from_iter(recalls.iter().map(|r| {
                let v = if hi { r.ci[i].1 } else { r.ci[i].0 };
                v.is_finite().then_some(v)
            })))
        };
        cols.push(interval(false));
        cols.push(interval(true));
    }
    cols.push(Arc::new(StringArray::from_iter_values(
        recalls.iter().map(|_| subset),
    )));
    cols.push(Arc::new(StringArray::from_iter_values(
        recalls.iter().map(|r| preprocess(r.method)),
    )));
    Ok(RecordBatch::try_new(RESULTS_SCHEMA.clone(), cols)?)
}

fn paired_batch(rows: &[PairedRow]) -> Result<RecordBatch> {
    let opt = |v: f64| v.is_finite().then_some(v);
    Ok(RecordBatch::try_new(
        PAIRED_SCHEMA.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.task.as_str()),
            )) as ArrayRef,
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.a))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.b))),
            Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.p.n))),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.p.delta),
            )),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| opt(r.p.lo)))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| opt(r.p.hi)))),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.p.p_value),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|_| "mcnemar_exact"),
            )),
        ],
    )?)
}

/// Gallery images a global query's `scores` row keeps.
const TABLE_TOP: usize = 10;

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
        // Global tasks keep their 10 best in the table.
        let sims = match top {
            Some(_) => &sims[..sims.len().min(TABLE_TOP)],
            None => sims,
        };
        for &s in sims {
            self.sims.values().append_value(s);
        }
        self.sims.append(true);
        match top {
            Some(keys) => {
                for k in &keys[..keys.len().min(TABLE_TOP)] {
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

/// `contaminated` audit rows: templates whose reference, target or
/// distractors include an evaluation image of a contamination table.
fn contaminated(table: &Path, templates: &Path) -> Result<Vec<audit::AuditRow>> {
    use arrow::array::{Array, AsArray};
    let bad = |m: String| Error::BadInputFile {
        what: "contamination table",
        path: table.to_path_buf(),
        message: m,
        advice: "give the Parquet file that `genecis contamination --out` wrote",
    };
    let file = std::fs::File::open(table).map_err(|e| bad(e.to_string()))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| bad(e.to_string()))?;
    let mut flagged = std::collections::BTreeSet::new();
    for b in reader {
        let b = b.map_err(|e| bad(e.to_string()))?;
        let k = b
            .column_by_name("eval_key")
            .ok_or_else(|| bad("no eval_key column".into()))?
            .as_string_opt::<i32>()
            .ok_or_else(|| bad("eval_key is not text".into()))?
            .clone();
        flagged.extend(k.iter().flatten().map(str::to_string));
    }
    let mut out = Vec::new();
    for b in crate::framework::store::read_table(templates)? {
        let col = |n: &str| crate::framework::store::column(&b, n).cloned();
        let (task, id, r, t, g) = (
            col("task")?,
            col("template_id")?,
            col("reference_key")?,
            col("target_key")?,
            col("gallery_keys")?,
        );
        let (task, id) = (
            task.as_string::<i32>(),
            id.as_primitive::<arrow::datatypes::UInt32Type>(),
        );
        let (r, t, g) = (
            r.as_string::<i32>(),
            t.as_string::<i32>(),
            g.as_list::<i32>(),
        );
        for i in 0..b.num_rows() {
            let gl = g.value(i);
            let gl = gl.as_string::<i32>();
            let hit = std::iter::once(r.value(i))
                .chain(t.is_valid(i).then(|| t.value(i)))
                .chain((0..gl.len()).map(|j| gl.value(j)))
                .find(|k| flagged.contains(*k));
            if let Some(k) = hit {
                out.push(audit::AuditRow {
                    task: task.value(i).to_string(),
                    template_id: id.value(i),
                    check: "contaminated",
                    detail: format!("{k} is in the contamination table"),
                });
            }
        }
    }
    Ok(out)
}
