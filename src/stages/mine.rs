//! `mine`: (reference, target, distractor, condition) triplets from the
//! `relations` table, with the law of GeneCIS's CCConditionalDistractor +
//! DeterministicDatasetWithConcreteness (ARCHITECTURE.md, "Semantics kept from the original").
//!
//! Tables:
//! - `triplets(sample_id, ref_image_id, ref_relation_idx, target_image_id, target_relation_idx,
//!   distractor_image_id, distractor_relation_idx, subject, relation, object, condition,
//!   concreteness Float64?, attempts)`
//! - `exhausted(sample_id, attempts)`: samples with no accepted attempt within `max_attempts`
//! - `subjects(subject, n_images, n_objects, n_rows, probability, viable)`: the candidate subjects
//! - `concreteness(word, score)`: the ratings with plural forms added
//!
//! The relational work (row ids, candidate subjects, row lists per subject,
//! per (subject, object) and per object, the join back) is SQL in
//! `sql/mine/`; the proposal loop runs in Rust over the Arrow arrays those
//! queries return. Attempt `k` of sample `s` uses uniform draws hashed from
//! `(seed, s, k, ...)` and the first accepted attempt wins, so a sample is
//! the same whatever the sharding, chunking or thread count.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use arrow::array::{
    ArrayRef, AsArray, BooleanArray, Float64Array, Float64Builder, StringArray, UInt32Array,
    UInt64Array,
};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use rayon::prelude::*;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::framework::stage::{
    ChunkTables, Chunks, Finding, InputTable, Stage, StageContext, TableDef,
};
use crate::rng::{below, mix, GOLDEN};
use crate::tables::triplets::TRIPLETS_SCHEMA;

pub(crate) static EXHAUSTED_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("sample_id", DataType::UInt64, false),
        Field::new("attempts", DataType::UInt32, false),
    ]))
});

pub(crate) static SUBJECTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("subject", DataType::Utf8, false),
        Field::new("n_images", DataType::Int64, false),
        Field::new("n_objects", DataType::Int64, false),
        Field::new("n_rows", DataType::Int64, false),
        Field::new("probability", DataType::Float64, false),
        Field::new("viable", DataType::Boolean, false),
    ]))
});

pub(crate) static CONCRETENESS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("word", DataType::Utf8, false),
        Field::new("score", DataType::Float64, false),
    ]))
});

const SQL_ROWS: &str = include_str!("../../sql/mine/rows.sql");
const SQL_CANDIDATES: &str = include_str!("../../sql/mine/candidates.sql");
const SQL_SUBJECT_OBJECTS: &str = include_str!("../../sql/mine/subject_objects.sql");
const SQL_OBJECT_ROWS: &str = include_str!("../../sql/mine/object_rows.sql");

/// A concreteness threshold, or `"none"` to switch the filter off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Threshold(pub Option<f64>);

impl Serialize for Threshold {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0 {
            Some(v) => s.serialize_f64(v),
            None => s.serialize_str("none"),
        }
    }
}

impl<'de> Deserialize<'de> for Threshold {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum T {
            F(f64),
            I(i64),
            S(String),
        }
        match T::deserialize(d)? {
            T::F(v) => Ok(Threshold(Some(v))),
            T::I(v) => Ok(Threshold(Some(v as f64))),
            T::S(s) if s == "none" => Ok(Threshold(None)),
            T::S(s) => Err(serde::de::Error::custom(format!(
                "expected a number or \"none\", got \"{s}\""
            ))),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MineParams {
    pub num_samples: u64,
    pub seed: u64,
    pub min_images_with_subject: u64,
    pub min_objects_per_subject: u64,
    pub concreteness_threshold: Threshold,
    /// The Brysbaert ratings file (tab-separated: Word, Bigram, Conc.M, ...).
    pub concreteness_path: Option<PathBuf>,
    /// Proposals per sample before it is given up (and listed in `exhausted`).
    pub max_attempts: u32,
    /// Target redraws per proposal while the target repeats the reference's
    /// object or image (the original's cap is 100).
    pub max_target_redraws: u32,
    /// Samples per part file (the unit of resume and sharding).
    pub chunk_samples: u64,
}

/// The most triplets one stage mines: a billion rows, far beyond CC3M's
/// recipe (1.6 M), still an allocation that fits.
const MAX_SAMPLES: u64 = 1_000_000_000;

impl Default for MineParams {
    /// The defaults of every param, in one place.
    fn default() -> Self {
        MineParams {
            num_samples: 1_600_000,
            seed: Default::default(),
            min_images_with_subject: 5,
            min_objects_per_subject: 2,
            concreteness_threshold: Threshold(Some(4.8)),
            concreteness_path: Default::default(),
            max_attempts: 1000,
            max_target_redraws: 100,
            chunk_samples: 250_000,
        }
    }
}

pub(crate) struct Mine;

impl Stage for Mine {
    const KIND: &'static str = "mine";
    const VERSION: &'static str = "1";
    const SHARDABLE: bool = true;
    const ABOUT: &'static str =
        "relations + concreteness ratings -> triplets (GeneCIS CC3M mining)";
    type Params = MineParams;

    type Work = Sampler;

    fn input_tables() -> &'static [InputTable] {
        const INPUTS: &[InputTable] = &[InputTable::required("relations")];
        INPUTS
    }

    fn output_tables() -> Vec<TableDef> {
        vec![
            TableDef::new("triplets", TRIPLETS_SCHEMA.clone()),
            TableDef::new("exhausted", EXHAUSTED_SCHEMA.clone()),
            TableDef::new("subjects", SUBJECTS_SCHEMA.clone()),
            TableDef::new("concreteness", CONCRETENESS_SCHEMA.clone()),
        ]
    }

    fn code() -> &'static [&'static str] {
        &[
            SQL_ROWS,
            SQL_CANDIDATES,
            SQL_SUBJECT_OBJECTS,
            SQL_OBJECT_ROWS,
        ]
    }

    fn validate(p: &MineParams, _base: &Path) -> Vec<Finding> {
        let mut out = Vec::new();
        if p.num_samples == 0 || p.num_samples > MAX_SAMPLES {
            out.push(Finding::error(
                "num_samples",
                format!("{}: use 1 to {MAX_SAMPLES}", p.num_samples),
            ));
        }
        if !(1..=100_000_000).contains(&p.chunk_samples) {
            out.push(Finding::error("chunk_samples", "use 1 to 100,000,000"));
        }
        if p.max_attempts == 0 || p.max_target_redraws == 0 {
            out.push(Finding::error(
                "max_attempts",
                "max_attempts and max_target_redraws must be at least 1",
            ));
        }
        if p.min_objects_per_subject < 2 {
            out.push(Finding::error(
                "min_objects_per_subject",
                "must be at least 2 (the target's object must differ from the reference's)",
            ));
        }
        if p.concreteness_threshold.0.is_some() && p.concreteness_path.is_none() {
            out.push(Finding::error(
                "concreteness_path",
                "the concreteness filter is on: give the ratings file, or set concreteness_threshold = \"none\"",
            ));
        }
        out
    }

    fn files(p: &MineParams, base: &Path) -> Vec<(&'static str, PathBuf)> {
        p.concreteness_path
            .iter()
            .map(|c| {
                (
                    "concreteness_path",
                    crate::framework::stage::resolve_path(base, c),
                )
            })
            .collect()
    }

    fn plan(p: &MineParams, ctx: &StageContext) -> Result<Chunks<Sampler>> {
        let ratings = match &p.concreteness_path {
            Some(c) => read_concreteness(&ctx.resolve(c))?,
            None => Vec::new(),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(rayon::current_num_threads().max(1))
            .enable_all()
            .build()
            .map_err(Error::io("cannot start the query runtime", ctx.stage))?;
        let sampler = rt.block_on(index(p, ctx, ratings))?;
        Ok(Chunks::even(
            sampler,
            p.num_samples,
            p.chunk_samples,
            "samples",
        ))
    }

    fn run_shared(
        p: &MineParams,
        w: &Sampler,
        k: usize,
        _ctx: &StageContext,
    ) -> Result<Option<ChunkTables>> {
        let lo = k as u64 * p.chunk_samples;
        let hi = ((k as u64 + 1) * p.chunk_samples).min(p.num_samples);
        let t0 = Instant::now();
        let draws: Vec<Draw> = (lo..hi)
            .into_par_iter()
            .map(|s| draw_sample(&w.index, p, s))
            .collect();
        let t_draw = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let (ok, bad): (Vec<&Draw>, Vec<&Draw>) = draws.iter().partition(|d| d.rows.is_some());
        let trip = gather(&w.rows, &ok, w.with_score)?;
        let exh = RecordBatch::try_new(
            EXHAUSTED_SCHEMA.clone(),
            vec![
                Arc::new(UInt64Array::from_iter_values(bad.iter().map(|d| d.sample))) as ArrayRef,
                Arc::new(UInt32Array::from_iter_values(
                    bad.iter().map(|d| d.attempts),
                )),
            ],
        )?;
        // The small tables ride with chunk 0; other chunks carry empty parts.
        let (subj, cn) = if k == 0 {
            (w.subjects.clone(), w.conc.clone())
        } else {
            (
                RecordBatch::new_empty(SUBJECTS_SCHEMA.clone()),
                RecordBatch::new_empty(CONCRETENESS_SCHEMA.clone()),
            )
        };
        let mut st = w.stats.lock().unwrap_or_else(|e| e.into_inner());
        st.attempts += draws.iter().map(|d| d.attempts as u64).sum::<u64>();
        st.accepted += ok.len() as u64;
        st.exhausted += bad.len() as u64;
        st.draw += t_draw;
        st.gather += t0.elapsed().as_secs_f64();
        Ok(Some(vec![
            ("triplets", trip),
            ("exhausted", exh),
            ("subjects", subj),
            ("concreteness", cn),
        ]))
    }

    fn finish(p: &MineParams, w: Sampler, ctx: &StageContext) -> Result<()> {
        let st = w.stats.into_inner().unwrap_or_else(|e| e.into_inner());
        ctx.note(format!(
            "{} candidate subjects, {} can pass the concreteness threshold; {} relation rows",
            w.subjects.num_rows(),
            w.index.subj_groups.len(),
            w.rows.num_rows()
        ));
        if st.accepted + st.exhausted > 0 {
            ctx.note(format!(
                "this run: {} accepted, {} exhausted after {} attempts (table exhausted), {:.1} proposals per sample",
                st.accepted,
                st.exhausted,
                p.max_attempts,
                st.attempts as f64 / (st.accepted + st.exhausted) as f64
            ));
        }
        let mut phases = w.phases;
        phases.push(("sampling", st.draw));
        phases.push(("gather", st.gather));
        ctx.note(format!(
            "time: {}",
            phases
                .iter()
                .map(|(n, s)| format!("{n} {s:.2} s"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        Ok(())
    }
}

/// The indexed relation rows the chunks draw from, and this run's counters.
pub(crate) struct Sampler {
    index: Index,
    /// `mine_rows`, gathered by row id into triplets.
    rows: RecordBatch,
    /// Candidate subjects and the ratings table: written with chunk 0.
    subjects: RecordBatch,
    conc: RecordBatch,
    /// Whether triplets carry a concreteness score.
    with_score: bool,
    /// Seconds of each indexing step.
    phases: Vec<(&'static str, f64)>,
    stats: std::sync::Mutex<Stats>,
}

#[derive(Default)]
struct Stats {
    attempts: u64,
    accepted: u64,
    exhausted: u64,
    draw: f64,
    gather: f64,
}

/// Reads the Brysbaert file into (word, score), lower-cased, and adds the
/// plural of every word that is not itself in the file.
pub(crate) fn read_concreteness(path: &Path) -> Result<Vec<(String, f64)>> {
    let text = std::fs::read_to_string(path)
        .map_err(Error::io("cannot read concreteness ratings", path))?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or("");
    let cols: Vec<&str> = header.split('\t').collect();
    let (Some(wi), Some(ci)) = (
        cols.iter().position(|c| *c == "Word"),
        cols.iter().position(|c| *c == "Conc.M"),
    ) else {
        return Err(Error::BadInputFile {
            what: "concreteness ratings file",
            path: path.to_path_buf(),
            message: "its header needs the columns Word and Conc.M (tab-separated)".into(),
            advice: "Give Brysbaert et al.'s Concreteness_ratings_Brysbaert_et_al_BRM.txt as concreteness_path",
        });
    };
    let mut scores: Vec<(String, f64)> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (n, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let parsed = f.get(ci).and_then(|s| s.trim().parse::<f64>().ok());
        let (Some(word), Some(score)) = (f.get(wi), parsed) else {
            return Err(Error::BadInputFile {
                what: "concreteness ratings file",
                path: path.to_path_buf(),
                message: format!("line {}: cannot read word and Conc.M", n + 2),
                advice: "Give Brysbaert et al.'s Concreteness_ratings_Brysbaert_et_al_BRM.txt as concreteness_path",
            });
        };
        let word = word.trim().to_lowercase();
        if let Some(&i) = seen.get(&word) {
            scores[i].1 = score; // the file's later entry wins, as in a dict
        } else {
            seen.insert(word.clone(), scores.len());
            scores.push((word, score));
        }
    }
    let singles = scores.len();
    let plurals: Vec<(String, f64)> = scores[..singles]
        .par_iter()
        .map(|(w, s)| (pluralizer::pluralize(w, 2, false), *s))
        .collect();
    for (pl, s) in plurals {
        if !seen.contains_key(&pl) {
            seen.insert(pl.clone(), scores.len());
            scores.push((pl, s));
        }
    }
    Ok(scores)
}

async fn collect(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
    Ok(ctx.sql(sql).await?.collect().await?)
}

fn concat(batches: &[RecordBatch], schema: SchemaRef) -> Result<RecordBatch> {
    Ok(arrow::compute::concat_batches(&schema, batches)?)
}

/// The sampler's view of the data: row arrays and CSR row lists.
struct Index {
    image: Vec<i64>,
    object: Vec<u32>,
    subj_score: Vec<f64>,
    obj_score: Vec<f64>,
    /// Per viable candidate: cumulative image weight.
    cum_weight: Vec<u64>,
    /// Per viable candidate: range into `groups`.
    subj_groups: Vec<(u32, u32)>,
    /// Per (subject, object) group: range into `group_rows`.
    groups: Vec<(u32, u32)>,
    group_rows: Vec<u32>,
    /// Per object: range into `object_rows`.
    obj_ranges: Vec<(u32, u32)>,
    object_rows: Vec<u32>,
}

/// Runs the mining SQL and indexes its results for the sampler.
async fn index(
    p: &MineParams,
    ctx: &StageContext<'_>,
    ratings: Vec<(String, f64)>,
) -> Result<Sampler> {
    let df = SessionContext::new_with_config(
        SessionConfig::new().with_target_partitions(rayon::current_num_threads().max(1)),
    );
    let rel_dir = ctx.input("relations")?;
    df.register_parquet(
        "relations",
        format!("{}/", rel_dir.display()),
        ParquetReadOptions::default(),
    )
    .await?;

    let conc = RecordBatch::try_new(
        CONCRETENESS_SCHEMA.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(
                ratings.iter().map(|(w, _)| w.as_str()),
            )) as ArrayRef,
            Arc::new(Float64Array::from_iter_values(
                ratings.iter().map(|(_, s)| *s),
            )),
        ],
    )?;
    df.register_table(
        "concreteness",
        Arc::new(MemTable::try_new(
            CONCRETENESS_SCHEMA.clone(),
            vec![vec![conc.clone()]],
        )?),
    )?;

    let mut phases: Vec<(&'static str, f64)> = Vec::new();
    let mut clock = Instant::now();
    let mut lap = |name: &'static str, phases: &mut Vec<(&'static str, f64)>| {
        phases.push((name, clock.elapsed().as_secs_f64()));
        clock = Instant::now();
    };
    // Row table, materialised once.
    let rows = collect(&df, SQL_ROWS).await?;
    let rows_schema = rows.first().map(|b| b.schema()).ok_or_else(no_rows)?;
    let rows = concat(&rows, rows_schema.clone())?;
    if rows.num_rows() == 0 {
        return Err(no_rows());
    }
    df.register_table(
        "mine_rows",
        Arc::new(MemTable::try_new(
            rows_schema.clone(),
            vec![vec![rows.clone()]],
        )?),
    )?;
    lap("rows.sql", &mut phases);

    let cand_sql = SQL_CANDIDATES
        .replace(
            "{{min_images_with_subject}}",
            &p.min_images_with_subject.to_string(),
        )
        .replace(
            "{{min_objects_per_subject}}",
            &p.min_objects_per_subject.to_string(),
        );
    let cands = collect(&df, &cand_sql).await?;
    let cand_schema = cands
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(|| rows_schema.clone());
    let cands = if cands.is_empty() {
        RecordBatch::new_empty(SUBJECTS_SCHEMA.clone())
    } else {
        concat(&cands, cand_schema.clone())?
    };
    if cands.num_rows() == 0 {
        return Err(Error::Data(format!(
            "no subject appears in >= {} images with >= {} objects; lower min_images_with_subject or give more relations",
            p.min_images_with_subject, p.min_objects_per_subject
        )));
    }
    df.register_table(
        "mine_candidates",
        Arc::new(MemTable::try_new(
            cands.schema(),
            vec![vec![cands.clone()]],
        )?),
    )?;
    lap("candidates.sql", &mut phases);
    let groups = collect(&df, SQL_SUBJECT_OBJECTS).await?;
    lap("subject_objects.sql", &mut phases);
    let objects = collect(&df, SQL_OBJECT_ROWS).await?;
    lap("object_rows.sql", &mut phases);

    // The sampler indexes rows by position: row_id must be 0..n in order.
    let row_ids = i64s(rows.column_by_name("row_id"), "row_id")?;
    if row_ids.iter().enumerate().any(|(i, &r)| r != i as i64) {
        return Err(internal(
            "sql/mine/rows.sql must return row_id 0..n in order".into(),
        ));
    }
    let image = i64s(rows.column_by_name("image_id"), "image_id")?;
    let object: Vec<u32> = i64s(rows.column_by_name("object_id"), "object_id")?
        .iter()
        .map(|&v| v as u32)
        .collect();
    let subj_score = f64s(rows.column_by_name("subject_score"), "subject_score")?;
    let obj_score = f64s(rows.column_by_name("object_score"), "object_score")?;
    let cand_subject_arr = utf8(cands.column(0))?;
    let cand_subject = cand_subject_arr.as_string::<i32>();
    let cand_images = i64s(Some(cands.column(1)), "n_images")?;

    // A subject that cannot reach the threshold even with every other head
    // at the maximum rating has acceptance 0: leaving it out of the draw
    // does not change the law of accepted triplets, only the work.
    let max_rating = ratings.iter().map(|r| r.1).fold(f64::MIN, f64::max);
    let subj_rating: HashMap<&str, f64> = ratings.iter().map(|(w, s)| (w.as_str(), *s)).collect();
    let viable: Vec<bool> = (0..cands.num_rows())
        .map(|i| match p.concreteness_threshold.0 {
            None => true,
            Some(t) => {
                let c = subj_rating
                    .get(cand_subject.value(i))
                    .copied()
                    .unwrap_or(-1.0);
                (2.0 * c + 4.0 * max_rating) / 6.0 > t
            }
        })
        .collect();

    // Groups per candidate subject, in candidate order.
    let mut subj_pos: HashMap<&str, usize> = HashMap::new();
    for i in 0..cands.num_rows() {
        subj_pos.insert(cand_subject.value(i), i);
    }
    // Cut the sorted (subject, object_id, row_id) list into groups.
    let mut per_cand: Vec<(u32, u32)> = vec![(0, 0); cands.num_rows()];
    let mut group_ranges: Vec<(u32, u32)> = Vec::new();
    let mut group_rows: Vec<u32> = Vec::new();
    let mut last: Option<(usize, i64)> = None;
    for b in &groups {
        let subj_arr = utf8(b.column(0))?;
        let subj = subj_arr.as_string::<i32>();
        let obj = i64s(Some(b.column(1)), "object_id")?;
        let row = i64s(Some(b.column(2)), "row_id")?;
        for r in 0..b.num_rows() {
            let c = subj_pos[subj.value(r)];
            if last != Some((c, obj[r])) {
                if let Some(g) = group_ranges.last_mut() {
                    g.1 = group_rows.len() as u32;
                }
                let g = group_ranges.len() as u32;
                if per_cand[c].1 == 0 {
                    per_cand[c] = (g, g + 1);
                } else {
                    per_cand[c].1 = g + 1;
                }
                group_ranges.push((group_rows.len() as u32, 0));
                last = Some((c, obj[r]));
            }
            group_rows.push(row[r] as u32);
        }
    }
    if let Some(g) = group_ranges.last_mut() {
        g.1 = group_rows.len() as u32;
    }
    // Cut the sorted (object_id, row_id) list; object ids are dense from 0.
    let mut obj_ranges: Vec<(u32, u32)> = Vec::new();
    let mut object_rows: Vec<u32> = Vec::new();
    for b in &objects {
        let obj = i64s(Some(b.column(0)), "object_id")?;
        let row = i64s(Some(b.column(1)), "row_id")?;
        for r in 0..b.num_rows() {
            let o = obj[r] as usize;
            if o != obj_ranges.len().wrapping_sub(1) {
                if o != obj_ranges.len() {
                    return Err(internal(
                        "sql/mine/object_rows.sql must return dense object ids in order".into(),
                    ));
                }
                if let Some(g) = obj_ranges.last_mut() {
                    g.1 = object_rows.len() as u32;
                }
                obj_ranges.push((object_rows.len() as u32, 0));
            }
            object_rows.push(row[r] as u32);
        }
    }
    if let Some(g) = obj_ranges.last_mut() {
        g.1 = object_rows.len() as u32;
    }
    let mut cum_weight = Vec::new();
    let mut subj_groups = Vec::new();
    let mut acc = 0u64;
    for i in 0..cands.num_rows() {
        if viable[i] {
            acc += cand_images[i] as u64;
            cum_weight.push(acc);
            subj_groups.push(per_cand[i]);
        }
    }
    lap("index arrays", &mut phases);
    let index = Index {
        image,
        object,
        subj_score,
        obj_score,
        cum_weight,
        subj_groups,
        groups: group_ranges,
        group_rows,
        obj_ranges,
        object_rows,
    };

    let subjects = RecordBatch::try_new(
        SUBJECTS_SCHEMA.clone(),
        vec![
            cand_subject_arr.clone(),
            arrow::compute::cast(cands.column(1), &DataType::Int64)?,
            arrow::compute::cast(cands.column(2), &DataType::Int64)?,
            arrow::compute::cast(cands.column(3), &DataType::Int64)?,
            arrow::compute::cast(cands.column(4), &DataType::Float64)?,
            Arc::new(BooleanArray::from(viable.clone())) as ArrayRef,
        ],
    )?;

    Ok(Sampler {
        index,
        subjects,
        conc,
        with_score: p.concreteness_threshold.0.is_some() || !ratings.is_empty(),
        rows,
        phases,
        stats: Default::default(),
    })
}

/// A string column as plain Utf8 (Parquet scans give Utf8View).
fn utf8(col: &ArrayRef) -> Result<ArrayRef> {
    Ok(arrow::compute::cast(col, &DataType::Utf8)?)
}

/// A numeric column as i64 values, whatever integer type SQL gave it.
fn i64s(col: Option<&ArrayRef>, name: &str) -> Result<Vec<i64>> {
    let col = col.ok_or_else(|| internal(format!("mining SQL lost column {name}")))?;
    let c = arrow::compute::cast(col, &DataType::Int64)?;
    Ok(c.as_primitive::<Int64Type>().values().to_vec())
}

fn f64s(col: Option<&ArrayRef>, name: &str) -> Result<Vec<f64>> {
    let col = col.ok_or_else(|| internal(format!("mining SQL lost column {name}")))?;
    let c = arrow::compute::cast(col, &DataType::Float64)?;
    Ok(c.as_primitive::<Float64Type>().values().to_vec())
}

fn internal(message: String) -> Error {
    Error::Internal(message)
}

fn no_rows() -> Error {
    Error::Data("the relations table is empty: nothing to mine".into())
}

struct Draw {
    sample: u64,
    /// (ref, target, distractor) rows of the accepted attempt.
    rows: Option<[u32; 3]>,
    concreteness: f64,
    attempts: u32,
}

/// The triplets of the accepted draws: the reference, target and
/// distractor rows of `mine_rows` gathered by row id (row_id == position).
fn gather(rows: &RecordBatch, ok: &[&Draw], with_score: bool) -> Result<RecordBatch> {
    let idx =
        |i: usize| UInt32Array::from_iter_values(ok.iter().map(|d| d.rows.expect("accepted")[i]));
    let (r, t, x) = (idx(0), idx(1), idx(2));
    let col = |name: &str, ix: &UInt32Array| -> Result<ArrayRef> {
        let c = rows
            .column_by_name(name)
            .ok_or_else(|| internal(format!("mining SQL lost column {name}")))?;
        Ok(arrow::compute::take(c, ix, None)?)
    };
    let relation = utf8(&col("relation", &t)?)?;
    let object = utf8(&col("object", &t)?)?;
    let condition: StringArray = relation
        .as_string::<i32>()
        .iter()
        .zip(object.as_string::<i32>().iter())
        .map(|(r, o)| Some(format!("{} {}", r.unwrap_or(""), o.unwrap_or(""))))
        .collect();
    let mut score = Float64Builder::with_capacity(ok.len());
    for d in ok {
        score.append_option(with_score.then_some(d.concreteness));
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(ok.iter().map(|d| d.sample))),
        col("image_id", &r)?,
        col("relation_idx", &r)?,
        col("image_id", &t)?,
        col("relation_idx", &t)?,
        col("image_id", &x)?,
        col("relation_idx", &x)?,
        col("subject", &t)?,
        relation,
        object,
        Arc::new(condition),
        Arc::new(score.finish()),
        Arc::new(UInt32Array::from_iter_values(ok.iter().map(|d| d.attempts))),
    ];
    let cols = TRIPLETS_SCHEMA
        .fields()
        .iter()
        .zip(cols)
        .map(|(f, c)| arrow::compute::cast(&c, f.data_type()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(TRIPLETS_SCHEMA.clone(), cols)?)
}

/// The uniform draw `slot` of (seed, sample, attempt, redraw), as 64 bits.
fn draw64(seed: u64, sample: u64, attempt: u32, redraw: u32, slot: u32) -> u64 {
    let mut h = mix(seed ^ GOLDEN);
    h = mix(h ^ sample);
    h = mix(h ^ ((attempt as u64) << 32 | redraw as u64));
    mix(h ^ slot as u64)
}

/// One sample: attempts in order until one is accepted.
fn draw_sample(ix: &Index, p: &MineParams, sample: u64) -> Draw {
    let total = *ix.cum_weight.last().unwrap_or(&0);
    for attempt in 0..p.max_attempts {
        if total == 0 {
            return Draw {
                sample,
                rows: None,
                concreteness: f64::NAN,
                attempts: p.max_attempts,
            };
        }
        let d = |redraw: u32, slot: u32| draw64(p.seed, sample, attempt, redraw, slot);
        // Subject with p ∝ distinct images.
        let x = below(d(0, 0), total);
        let s = ix.cum_weight.partition_point(|&c| c <= x);
        let (g0, g1) = ix.subj_groups[s];
        // Reference row uniform among the subject's rows (its groups, concatenated).
        let (r0, _) = ix.groups[g0 as usize];
        let (_, r1) = ix.groups[g1 as usize - 1];
        let ref_row = ix.group_rows[(r0 as u64 + below(d(0, 1), (r1 - r0) as u64)) as usize];
        // Target: object uniform among the subject's objects, row uniform in (subject, object).
        let mut target = None;
        for redraw in 0..p.max_target_redraws {
            let g = g0 + below(d(redraw, 2), (g1 - g0) as u64) as u32;
            let (a, b) = ix.groups[g as usize];
            let row = ix.group_rows[(a as u64 + below(d(redraw, 3), (b - a) as u64)) as usize];
            if ix.object[row as usize] != ix.object[ref_row as usize]
                && ix.image[row as usize] != ix.image[ref_row as usize]
            {
                target = Some(row);
                break;
            }
        }
        let Some(target_row) = target else { continue };
        // Distractor: uniform among all rows with the target's object.
        let (a, b) = ix.obj_ranges[ix.object[target_row as usize] as usize];
        let distractor_row = ix.object_rows[(a as u64 + below(d(0, 4), (b - a) as u64)) as usize];
        let rows = [ref_row, target_row, distractor_row];
        let score = rows
            .iter()
            .map(|&r| ix.subj_score[r as usize] + ix.obj_score[r as usize])
            .sum::<f64>()
            / 6.0;
        if p.concreteness_threshold.0.is_none_or(|t| score > t) {
            return Draw {
                sample,
                rows: Some(rows),
                concreteness: score,
                attempts: attempt + 1,
            };
        }
    }
    Draw {
        sample,
        rows: None,
        concreteness: f64::NAN,
        attempts: p.max_attempts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut counts = [0u32; 7];
        for i in 0..70_000u64 {
            let v = below(mix(i), 7);
            counts[v as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn threshold_accepts_number_or_none() {
        #[derive(Deserialize)]
        struct W {
            t: Threshold,
        }
        assert_eq!(
            toml::from_str::<W>("t = 4.8").unwrap().t,
            Threshold(Some(4.8))
        );
        assert_eq!(
            toml::from_str::<W>("t = 4").unwrap().t,
            Threshold(Some(4.0))
        );
        assert_eq!(
            toml::from_str::<W>("t = \"none\"").unwrap().t,
            Threshold(None)
        );
        assert!(toml::from_str::<W>("t = \"off\"").is_err());
    }
}
