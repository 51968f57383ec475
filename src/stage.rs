//! The stage contract: one Rust type per stage kind behind [`Stage`], and the
//! registry that maps manifest `kind = "..."` strings to them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::Result;
use crate::progress::Progress;
use crate::store::StageWriter;

/// An output (or expected input) table of a stage kind.
#[derive(Debug, Clone)]
pub struct TableDef {
    pub name: &'static str,
    pub schema: SchemaRef,
}

/// Run one shard `index` of `count` (0-based): a shardable stage processes
/// the chunks `k` with `k % count == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn owns(&self, chunk: usize) -> bool {
        chunk % self.count == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// What a stage may use while running.
pub struct StageContext<'a> {
    pub stage: &'a str,
    /// Folder that relative paths in params are resolved against.
    pub base_dir: &'a Path,
    /// Input tables by table name -> folder of part files.
    pub inputs: &'a BTreeMap<String, PathBuf>,
    /// File inputs listed in `inputs` (already resolved and checked to exist).
    pub input_files: &'a [PathBuf],
    pub shard: Option<Shard>,
    pub writer: &'a StageWriter,
    pub progress: &'a Progress,
}

impl StageContext<'_> {
    pub fn resolve(&self, p: &Path) -> PathBuf {
        resolve_path(self.base_dir, p)
    }
}

pub fn resolve_path(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// What a finished `run` reports for the summary line.
#[derive(Debug, Default, Clone)]
pub struct StageReport {
    /// Input rows processed (for rows/s); chunks kept from an earlier run
    /// count too, so the rate is per row of the table.
    pub rows_in: u64,
    /// Total chunks the stage's tables consist of.
    pub chunks: usize,
    /// Chunks taken over from an interrupted run.
    pub chunks_resumed: usize,
    /// Extra facts for the summary (e.g. "12 captions contained tabs").
    pub notes: Vec<String>,
    pub elapsed: Duration,
}

/// One stage kind. Adding a kind means one file implementing this, plus one
/// line in [`KINDS`].
pub trait Stage: 'static {
    const KIND: &'static str;
    /// Bump when the code's output changes for the same params and inputs:
    /// it is part of the fingerprint, so finished runs become stale.
    const VERSION: &'static str;
    /// Whether `--shard i/N` may split this stage's chunks over processes.
    const SHARDABLE: bool = false;
    const ABOUT: &'static str;

    /// Parsed with `deny_unknown_fields`; defaults filled in, so the
    /// canonical (re-serialised) form is what the fingerprint hashes.
    type Params: Serialize + DeserializeOwned + Send + Sync;

    /// Tables this kind needs among its inputs, by table name.
    fn input_tables() -> &'static [&'static str];
    fn output_tables() -> Vec<TableDef>;

    /// Code and data the stage embeds besides its Rust (sql/*.sql texts,
    /// lexicons): hashed into the fingerprint, so editing one makes finished
    /// runs stale.
    fn code() -> &'static [&'static str] {
        &[]
    }

    /// Checks beyond typing: (field, message) pairs.
    fn validate(_params: &Self::Params, _base_dir: &Path) -> Vec<(String, String)> {
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

    fn run(params: &Self::Params, ctx: &StageContext) -> Result<StageReport>;
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
    pub fn error(field: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding {
            severity: Severity::Error,
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn warning(field: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding {
            severity: Severity::Warning,
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Object-safe view of a [`Stage`], for the registry.
pub trait StageKind: Sync {
    fn kind(&self) -> &'static str;
    fn version(&self) -> &'static str;
    /// Kind version plus a digest of [`Stage::code`].
    fn code_version(&self) -> String;
    fn shardable(&self) -> bool;
    fn about(&self) -> &'static str;
    fn input_tables(&self) -> &'static [&'static str];
    fn output_tables(&self) -> Vec<TableDef>;
    /// Types the raw params; errors are (field, message) pairs.
    fn bind(
        &self,
        raw: toml::Table,
        base_dir: &Path,
    ) -> Result<Box<dyn BoundStage>, Vec<(String, String)>>;
}

/// A stage kind with typed, validated params.
pub trait BoundStage: Send + Sync {
    fn canonical_params(&self) -> serde_json::Value;
    fn files(&self, base_dir: &Path) -> Vec<(&'static str, PathBuf)>;
    fn check(&self, base_dir: &Path) -> Vec<Finding>;
    fn run(&self, ctx: &StageContext) -> Result<StageReport>;
}

pub struct Kind<S>(std::marker::PhantomData<S>);

impl<S> Kind<S> {
    pub const fn new() -> Self {
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
    fn run(&self, ctx: &StageContext) -> Result<StageReport> {
        S::run(&self.0, ctx)
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
    fn about(&self) -> &'static str {
        S::ABOUT
    }
    fn input_tables(&self) -> &'static [&'static str] {
        S::input_tables()
    }
    fn output_tables(&self) -> Vec<TableDef> {
        S::output_tables()
    }
    fn bind(
        &self,
        raw: toml::Table,
        base_dir: &Path,
    ) -> Result<Box<dyn BoundStage>, Vec<(String, String)>> {
        let params: S::Params =
            serde_path_to_error::deserialize(toml::Value::Table(raw)).map_err(|e| {
                let path = e.path().to_string();
                let field = if path == "." {
                    "params".to_string()
                } else {
                    format!("params.{path}")
                };
                vec![(field, e.into_inner().to_string())]
            })?;
        let problems = S::validate(&params, base_dir);
        if !problems.is_empty() {
            return Err(problems
                .into_iter()
                .map(|(f, m)| (format!("params.{f}"), m))
                .collect());
        }
        Ok(Box::new(Bound::<S>(params)))
    }
}

/// Every stage kind, by its manifest name.
pub static KINDS: &[&dyn StageKind] = &[
    &Kind::<crate::ingest::Ingest>::new(),
    &Kind::<crate::parse::Parse>::new(),
    &Kind::<crate::import_parses::ImportParses>::new(),
    &Kind::<crate::mine::Mine>::new(),
    &Kind::<crate::templates::Templates>::new(),
    &Kind::<crate::embed::Embed>::new(),
    &Kind::<crate::score::Score>::new(),
];

pub fn lookup(kind: &str) -> Option<&'static dyn StageKind> {
    KINDS.iter().copied().find(|k| k.kind() == kind)
}
