//! The stage contract: one Rust type per stage kind behind [`Stage`], and the
//! registry that maps manifest `kind = "..."` strings to them.
//!
//! A stage declares its work as chunks ([`Stage::plan`]) and computes one
//! chunk at a time ([`Stage::run_chunk`]); the framework ([`drive`]) decides
//! which chunks this shard owns, skips those an interrupted run finished,
//! writes each chunk's tables, and keeps the progress bar and the timing.
//! A stage that is not chunked declares one chunk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use arrow::record_batch::RecordBatch;
use rayon::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::framework::progress::Progress;
use crate::framework::ranks::{self, Ranks, Signal};
use crate::framework::store::StageWriter;
pub(crate) use crate::framework::tabledef::{InputTable, Shard, TableDef};

/// What a stage may use while running.
pub struct StageContext<'a> {
    /// The stage's name in the manifest.
    pub stage: &'a str,
    /// Folder that relative paths in params are resolved against.
    pub base_dir: &'a Path,
    /// Input tables by table name -> folder of part files.
    pub inputs: &'a BTreeMap<String, PathBuf>,
    /// File inputs listed in `inputs` (already resolved and checked to exist).
    pub input_files: &'a [PathBuf],
    /// The manifest the run was planned from (reports cite it).
    pub manifest: &'a Path,
    pub(crate) work_dir: PathBuf,
    pub(crate) committed_dir: PathBuf,
    /// The records of the input stages, by stage name (provenance).
    pub(crate) input_records: Vec<crate::framework::store::StageRecord>,
    pub(crate) notes: Mutex<Vec<String>>,
    /// The ranks of a data-parallel run (none: one process).
    pub(crate) ranks: Option<&'a dyn Ranks>,
}

impl StageContext<'_> {
    pub(crate) fn resolve(&self, p: &Path) -> PathBuf {
        resolve_path(self.base_dir, p)
    }

    /// The folder of a required input table (the manifest guarantees it).
    pub(crate) fn input(&self, table: &str) -> Result<&Path> {
        self.inputs.get(table).map(PathBuf::as_path).ok_or_else(|| {
            Error::Internal(format!(
                "stage '{}' has no input table '{table}' although the manifest was validated",
                self.stage
            ))
        })
    }

    /// The folder of an optional input table, when an input provides it.
    pub(crate) fn optional_input(&self, table: &str) -> Option<&Path> {
        self.inputs.get(table).map(PathBuf::as_path)
    }

    /// A line for the run summary.
    pub(crate) fn note(&self, line: impl Into<String>) {
        self.notes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line.into());
    }

    /// Writes a side file (a report, a chart) that is committed with the
    /// tables; returns where it will be seen, `<workdir>/<stage>/<name>`.
    pub(crate) fn write_file(&self, name: &str, bytes: &[u8]) -> Result<PathBuf> {
        crate::framework::store::write_atomic(&self.work_dir.join(name), bytes)?;
        Ok(self.committed_dir.join(name))
    }
}

pub(crate) fn resolve_path(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// One batch per output table, by table name.
pub(crate) type ChunkTables = Vec<(&'static str, RecordBatch)>;

/// Runs chunks `todo` side by side, each through `one`.
pub(crate) type ParallelRun<W> =
    fn(&W, &[usize], &(dyn Fn(&W, usize) -> Result<()> + Sync)) -> Result<()>;

/// A stage's work, cut into chunks.
pub(crate) struct Chunks<W> {
    /// Whatever every chunk reads (input rows, a loaded model, counters).
    pub work: W,
    /// Work units per chunk (lines, captions, samples, images): the chunk
    /// count, the progress bar's steps and the summary's rows/s.
    pub sizes: Vec<u64>,
    pub unit: &'static str,
    /// Set by [`Chunks::in_parallel`]: chunks computed side by side on the
    /// thread pool (each on one thread), sharing the work. `None`: one
    /// after another, each using the pool inside and updating the work.
    pub parallel: Option<ParallelRun<W>>,
    /// The embedding width of the tables that have one.
    pub width: Option<i32>,
}

impl<W: Sync> Chunks<W> {
    /// Chunks that may run side by side: only work every thread may read
    /// at once qualifies.
    pub(crate) fn in_parallel(mut self) -> Chunks<W> {
        self.parallel = Some(|work, todo, one| todo.par_iter().try_for_each(|&k| one(work, k)));
        self
    }
}

impl<W> Chunks<W> {
    /// A stage that is not chunked: one chunk of `units`.
    pub(crate) fn single(work: W, units: u64, unit: &'static str) -> Chunks<W> {
        Chunks {
            work,
            sizes: vec![units],
            unit,
            parallel: None,
            width: None,
        }
    }

    /// `total` units cut into chunks of `per_chunk` (at least one chunk).
    pub(crate) fn even(work: W, total: u64, per_chunk: u64, unit: &'static str) -> Chunks<W> {
        let n = total.div_ceil(per_chunk.max(1)).max(1);
        let sizes = (0..n)
            .map(|k| (total - (k * per_chunk).min(total)).min(per_chunk))
            .collect();
        Chunks {
            work,
            sizes,
            unit,
            parallel: None,
            width: None,
        }
    }
}

/// One stage kind. Adding a kind means one file implementing this, plus one
/// line in the registry (`crate::stages::KINDS`).
pub(crate) trait Stage: 'static {
    const KIND: &'static str;
    /// Bump when the code's output changes for the same params and inputs:
    /// it is part of the fingerprint, so finished runs become stale.
    const VERSION: &'static str;
    /// Whether `--shard i/N` may split this stage's chunks over processes.
    const SHARDABLE: bool = false;
    /// Whether every rank of a data-parallel run takes part: rank 0 runs
    /// the chunks and writes; the others run [`Stage::follow`].
    const DISTRIBUTED: bool = false;
    const ABOUT: &'static str;

    /// Parsed with `deny_unknown_fields`; defaults filled in, so the
    /// canonical (re-serialised) form is what the fingerprint hashes.
    type Params: Serialize + DeserializeOwned + Send + Sync;
    /// What [`Stage::plan`] prepares for the chunks; it must be `Sync` only
    /// for chunks that run in parallel ([`Chunks::in_parallel`]).
    type Work;

    /// Tables this kind reads from its inputs.
    fn input_tables() -> &'static [InputTable];
    fn output_tables() -> Vec<TableDef>;

    /// Code and data the stage embeds besides its Rust (sql/*.sql texts, a
    /// model file): hashed into the fingerprint, so editing one makes
    /// finished runs stale.
    fn code() -> &'static [&'static str] {
        &[]
    }

    /// Checks beyond typing, each a manifest error naming its param (the
    /// field without `params.`). Validation, input validation and data
    /// checks all speak [`Finding`].
    fn validate(_params: &Self::Params, _base_dir: &Path) -> Vec<Finding> {
        Vec::new()
    }

    /// Checks of params against the tables the manifest binds to the
    /// stage's inputs (a param needed only when an input is missing).
    fn validate_inputs(_params: &Self::Params, _tables: &[String]) -> Vec<Finding> {
        Vec::new()
    }

    /// Files (or folders) read by the stage, resolved, with the param field
    /// that names each: they must exist before the run starts and are part
    /// of the fingerprint.
    fn files(_params: &Self::Params, _base_dir: &Path) -> Vec<(&'static str, PathBuf)> {
        Vec::new()
    }

    /// Deeper checks of the data the stage will read (file contents, folder
    /// completeness, loadable checkpoints), run by `genecis check` and
    /// before a run starts, so a long run does not fail late.
    fn check(_params: &Self::Params, _base_dir: &Path) -> Vec<Finding> {
        Vec::new()
    }

    /// Params that do not fit a run on `world` ranks (checked before
    /// anything runs, on every rank).
    fn validate_world(_params: &Self::Params, _world: usize) -> Vec<Finding> {
        Vec::new()
    }

    /// A rank other than 0 of a [`Stage::DISTRIBUTED`] kind: its share of
    /// the work, after rank 0 planned the stage; it writes nothing.
    fn follow(_params: &Self::Params, _ctx: &StageContext) -> Result<()> {
        Err(Error::Internal(format!(
            "stage kind {} is not distributed",
            Self::KIND
        )))
    }

    /// Reads what every chunk needs and cuts the work into chunks. Runs in
    /// every process of a sharded run, so it must give the same chunks.
    fn plan(params: &Self::Params, ctx: &StageContext) -> Result<Chunks<Self::Work>>;

    /// Computes chunk `k` when the plan's chunks run one after another
    /// (`parallel` unset): `work` is the stage's to update as it goes (a
    /// trainer's state, counters). One batch per output table; `None`
    /// leaves the chunk unwritten (a rerun redoes it), and
    /// [`Stage::finish`] must then say why. By default, [`Stage::run_shared`].
    fn run_chunk(
        params: &Self::Params,
        work: &mut Self::Work,
        k: usize,
        ctx: &StageContext,
    ) -> Result<Option<ChunkTables>> {
        Self::run_shared(params, work, k, ctx)
    }

    /// Computes chunk `k` from shared work: chunks of a `parallel` plan run
    /// side by side on the thread pool.
    fn run_shared(
        _params: &Self::Params,
        _work: &Self::Work,
        _k: usize,
        _ctx: &StageContext,
    ) -> Result<Option<ChunkTables>> {
        Err(Error::Internal(format!(
            "stage kind {} planned parallel chunks but computes them only in sequence",
            Self::KIND
        )))
    }

    /// After this process's chunks: notes for the summary, or the error
    /// that explains unwritten chunks.
    fn finish(_params: &Self::Params, _work: Self::Work, _ctx: &StageContext) -> Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One result of [`Stage::check`]: what is wrong (or suspicious) and how
/// to fix it.
#[derive(Debug, Clone)]
pub struct Finding {
    pub severity: Severity,
    /// The param the finding is about, e.g. `coco_dir`.
    pub field: String,
    pub message: String,
}

impl Finding {
    pub(crate) fn error(field: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding {
            severity: Severity::Error,
            field: field.into(),
            message: message.into(),
        }
    }
    pub(crate) fn warning(field: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding {
            severity: Severity::Warning,
            field: field.into(),
            message: message.into(),
        }
    }
}

/// How the framework runs a stage's chunks in this process.
pub struct Driver<'a> {
    pub shard: Option<Shard>,
    pub progress: &'a Progress,
    pub writer: &'a mut StageWriter,
}

/// What [`drive`] did.
#[derive(Debug, Default, Clone)]
pub struct Driven {
    /// Units of every chunk of the stage (kept chunks included), for rows/s.
    pub units: u64,
    pub chunks: usize,
    /// Chunks an interrupted run had finished.
    pub chunks_resumed: usize,
    /// Chunks still unwritten after this process (other shards' or failed).
    pub chunks_missing: usize,
    pub notes: Vec<String>,
}

/// The chunk loop every stage shares: plan, pick this shard's unfinished
/// chunks, compute and write them, finish.
pub(crate) fn drive<S: Stage>(params: &S::Params, ctx: &StageContext, d: Driver) -> Result<Driven> {
    let chunks = S::plan(params, ctx)?;
    if let Some(r) = ctx.ranks.filter(|r| S::DISTRIBUTED && r.rank() == 0) {
        ranks::post(r, ctx.stage, Signal::Go)?;
    }
    let tables = S::output_tables()
        .into_iter()
        .map(|t| Ok((t.name, t.schema(chunks.width)?)))
        .collect::<Result<Vec<_>>>()?;
    d.writer.declare(tables)?;
    let writer = &*d.writer;
    let n = chunks.sizes.len();
    let done: Vec<bool> = (0..n).map(|k| writer.chunk_done(k)).collect();
    let todo: Vec<usize> = (0..n)
        .filter(|&k| !done[k] && d.shard.is_none_or(|s| s.owns(k)))
        .collect();
    let resumed = done.iter().filter(|&&x| x).count();
    let units: u64 = chunks.sizes.iter().sum();
    let bar = d.progress.bar(ctx.stage, units, chunks.unit);
    bar.set_position((0..n).filter(|&k| done[k]).map(|k| chunks.sizes[k]).sum());
    let written = AtomicU64::new(0);
    let record = |k: usize, tables: Option<ChunkTables>| -> Result<()> {
        if let Some(tables) = tables {
            writer.write_chunk(k, &tables)?;
            written.fetch_add(1, Ordering::Relaxed);
        }
        bar.inc(chunks.sizes[k]);
        Ok(())
    };
    let mut work = chunks.work;
    match chunks.parallel {
        Some(run) => run(&work, &todo, &|w, k| {
            record(k, S::run_shared(params, w, k, ctx)?)
        })?,
        None => {
            for &k in &todo {
                record(k, S::run_chunk(params, &mut work, k, ctx)?)?;
            }
        }
    }
    bar.finish_and_clear();
    S::finish(params, work, ctx)?;
    let missing = (0..n).filter(|&k| !writer.chunk_done(k)).count();
    if let Some(s) = d.shard {
        ctx.note(format!(
            "shard {s} wrote {} of {n} chunks",
            written.load(Ordering::Relaxed)
        ));
    }
    Ok(Driven {
        units,
        chunks: n,
        chunks_resumed: resumed,
        chunks_missing: missing,
        notes: std::mem::take(&mut *ctx.notes.lock().unwrap_or_else(|e| e.into_inner())),
    })
}

/// Object-safe view of a [`Stage`], for the registry.
pub trait StageKind: Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> &'static str;
    /// Kind version plus a digest of [`Stage::code`].
    fn code_version(&self) -> String;
    fn shardable(&self) -> bool;
    fn distributed(&self) -> bool;
    fn about(&self) -> &'static str;
    fn input_tables(&self) -> &'static [InputTable];
    fn output_tables(&self) -> Vec<TableDef>;
    /// Types the raw params; the problems name their field (`params.x`).
    fn bind(&self, raw: toml::Table, base_dir: &Path) -> Result<Box<dyn BoundStage>, Vec<Finding>>;
    /// [`Stage::validate_inputs`] of raw params (nothing when they do not
    /// parse: `bind` reports that).
    fn validate_inputs(&self, raw: &toml::Table, tables: &[String]) -> Vec<Finding>;
}

/// A stage kind with typed, validated params.
pub trait BoundStage: Send + Sync {
    fn canonical_params(&self) -> serde_json::Value;
    fn files(&self, base_dir: &Path) -> Vec<(&'static str, PathBuf)>;
    fn check(&self, base_dir: &Path) -> Vec<Finding>;
    fn run(&self, ctx: &StageContext, d: Driver) -> Result<Driven>;
    fn validate_world(&self, world: usize) -> Vec<Finding>;
    fn follow(&self, ctx: &StageContext) -> Result<()>;
}

pub(crate) struct Kind<S>(std::marker::PhantomData<S>);

impl<S> Kind<S> {
    pub(crate) const fn new() -> Self {
        Kind(std::marker::PhantomData)
    }
}

impl<S> Default for Kind<S> {
    fn default() -> Self {
        Self::new()
    }
}

struct Bound<S: Stage>(S::Params);

impl<S: Stage> BoundStage for Bound<S> {
    fn canonical_params(&self) -> serde_json::Value {
        serde_json::to_value(&self.0).expect("params serialise to JSON")
    }
    fn files(&self, base_dir: &Path) -> Vec<(&'static str, PathBuf)> {
        S::files(&self.0, base_dir)
    }
    fn check(&self, base_dir: &Path) -> Vec<Finding> {
        S::check(&self.0, base_dir)
    }
    fn run(&self, ctx: &StageContext, d: Driver) -> Result<Driven> {
        drive::<S>(&self.0, ctx, d)
    }
    fn validate_world(&self, world: usize) -> Vec<Finding> {
        S::validate_world(&self.0, world)
    }
    fn follow(&self, ctx: &StageContext) -> Result<()> {
        S::follow(&self.0, ctx)
    }
}

impl<S: Stage> StageKind for Kind<S>
where
    Kind<S>: Sync,
{
    fn kind(&self) -> &'static str {
        S::KIND
    }
    fn version(&self) -> &'static str {
        S::VERSION
    }
    fn code_version(&self) -> String {
        let code = S::code();
        if code.is_empty() {
            return S::VERSION.to_string();
        }
        let mut h = blake3::Hasher::new();
        for c in code {
            h.update(c.as_bytes());
            h.update(&[0]);
        }
        format!("{}+{}", S::VERSION, &h.finalize().to_hex()[..12])
    }
    fn shardable(&self) -> bool {
        S::SHARDABLE
    }
    fn distributed(&self) -> bool {
        S::DISTRIBUTED
    }
    fn about(&self) -> &'static str {
        S::ABOUT
    }
    fn input_tables(&self) -> &'static [InputTable] {
        S::input_tables()
    }
    fn output_tables(&self) -> Vec<TableDef> {
        S::output_tables()
    }
    fn validate_inputs(&self, raw: &toml::Table, tables: &[String]) -> Vec<Finding> {
        match toml::Value::Table(raw.clone()).try_into::<S::Params>() {
            Ok(p) => S::validate_inputs(&p, tables),
            Err(_) => Vec::new(),
        }
    }

    fn bind(&self, raw: toml::Table, base_dir: &Path) -> Result<Box<dyn BoundStage>, Vec<Finding>> {
        let non_finite = non_finite_floats("params", &toml::Value::Table(raw.clone()));
        if !non_finite.is_empty() {
            return Err(non_finite);
        }
        let params: S::Params =
            serde_path_to_error::deserialize(toml::Value::Table(raw)).map_err(|e| {
                let path = e.path().to_string();
                let field = if path == "." {
                    "params".to_string()
                } else {
                    format!("params.{path}")
                };
                vec![Finding::error(field, e.into_inner().to_string())]
            })?;
        let problems = S::validate(&params, base_dir);
        if !problems.is_empty() {
            return Err(problems
                .into_iter()
                .map(|f| Finding {
                    field: format!("params.{}", f.field),
                    ..f
                })
                .collect());
        }
        Ok(Box::new(Bound::<S>(params)))
    }
}

/// NaN and infinite floats anywhere in a param value: no param means them,
/// and serialised they would hash as null.
fn non_finite_floats(field: &str, v: &toml::Value) -> Vec<Finding> {
    match v {
        toml::Value::Float(x) if !x.is_finite() => {
            vec![Finding::error(field, format!("{x} is not a finite number"))]
        }
        toml::Value::Table(t) => t
            .iter()
            .flat_map(|(k, v)| non_finite_floats(&format!("{field}.{k}"), v))
            .collect(),
        toml::Value::Array(a) => a
            .iter()
            .enumerate()
            .flat_map(|(i, v)| non_finite_floats(&format!("{field}[{i}]"), v))
            .collect(),
        _ => Vec::new(),
    }
}

/// The stage kinds a plan can use, by manifest name. The framework is
/// handed one (`crate::stages::KINDS`) and knows no kind by itself.
pub struct Registry(pub &'static [&'static dyn StageKind]);

impl Registry {
    pub(crate) fn lookup(&self, kind: &str) -> Option<&'static dyn StageKind> {
        self.0.iter().copied().find(|k| k.kind() == kind)
    }

    pub(crate) fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|k| k.kind()).collect()
    }

    /// `genecis kinds`: each kind, what it reads (`?` = optional) and writes.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for k in self.0 {
            out.push_str(&format!(
                "{} (version {}{}): {}\n",
                k.kind(),
                k.version(),
                if k.shardable() { ", shardable" } else { "" },
                k.about()
            ));
            if !k.input_tables().is_empty() {
                let reads: Vec<String> = k
                    .input_tables()
                    .iter()
                    .map(|t| match t.group {
                        Some(g) => format!("{}? (one of: {g})", t.name),
                        None => format!("{}{}", t.name, if t.optional { "?" } else { "" }),
                    })
                    .collect();
                out.push_str(&format!("  reads: {}\n", reads.join(", ")));
            }
            for t in k.output_tables() {
                out.push_str(&format!("  writes {}\n", t.describe()));
            }
        }
        out
    }
}
