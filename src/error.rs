//! The library's error type. Every message says what went wrong and what to
//! do; causes stay reachable through `source()`, so a message never repeats
//! its cause's text (print the chain with [`report`]).

use std::fmt;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One problem found while validating a manifest (plus `--set` overrides and
/// command-line stage names). All problems are collected and shown together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestIssue {
    /// 1-based line in the manifest, when the problem has one.
    pub line: Option<usize>,
    pub stage: Option<String>,
    /// Dotted field path, e.g. `params.num_samples` or `inputs[1]`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ManifestIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if let Some(stage) = &self.stage {
            write!(f, "stage '{stage}', ")?;
        }
        write!(f, "field '{}': {}", self.field, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read manifest {}; check the path you passed", .path.display())]
    ManifestRead {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("manifest {path} is not valid TOML: {message}")]
    ManifestSyntax { path: PathBuf, message: String },

    #[error("manifest {} has {} problem(s); nothing was run or written:\n{}",
        .path.display(), .issues.len(),
        .issues.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
    ManifestInvalid {
        path: PathBuf,
        issues: Vec<ManifestIssue>,
    },

    #[error("{} problem(s) with the data this run would read; nothing was run or written:\n{}\nFix them (`genecis check MANIFEST` shows the full report), or pass --skip-check to run anyway.",
        .problems.len(), .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    CheckFailed { problems: Vec<String> },

    #[error("invalid argument {arg}: {message}")]
    Usage { arg: String, message: String },

    #[error("workdir {} is in use by another genecis run ({holder}). Wait for it to finish; the lock is released as soon as that process exits, even if it is killed.", .workdir.display())]
    Locked { workdir: PathBuf, holder: String },

    /// A folder genecis would replace or delete but did not make.
    #[error("{} {why}; genecis deletes only what its own records say it wrote, so nothing was run or written. Move it away, or use another --workdir.", .path.display())]
    NotOurs { path: PathBuf, why: String },

    /// A call to the run's store (local folder or object store) failed.
    #[error("{op} {key} in the run's store; check that the workdir is reachable and writable (for s3:// workdirs: the AWS_* credentials and endpoint)")]
    Store {
        op: &'static str,
        key: String,
        source: Box<object_store::Error>,
    },

    /// Two different plans wrote one stage at the same time.
    #[error("stage '{stage}' was committed by a different plan (fingerprint {theirs}) while this run worked on fingerprint {ours}: two runs with different manifests or --set values are writing the same workdir. Nothing of this run was committed; run them one after the other, or give each its own --workdir.")]
    Conflict {
        stage: String,
        ours: String,
        theirs: String,
    },

    /// A workdir URL genecis cannot open.
    #[error("workdir {url}: {why}")]
    WorkdirUrl { url: String, why: String },

    #[error("stage '{stage}' cannot run now: {reason}")]
    NotReady { stage: String, reason: String },

    /// A stage's work failed; the cause says why.
    #[error("stage '{stage}' ({kind}) failed")]
    StageFailed {
        /// As the manifest names it.
        stage: String,
        kind: String,
        source: Box<Error>,
    },

    /// The data a stage reads is unusable (empty, inconsistent, missing
    /// files); the message says what to change.
    #[error("{0}")]
    Data(String),

    /// A file the user handed in (templates, gold, dev or parity files) does
    /// not have the expected content.
    #[error("{what} {} is not usable: {message}. {advice}", .path.display())]
    BadInputFile {
        what: &'static str,
        path: PathBuf,
        message: String,
        advice: &'static str,
    },

    /// A committed part file that no longer reads as Parquet.
    #[error("part file {} of stage '{stage}' is damaged (truncated or overwritten). Rebuild the stage: genecis run MANIFEST --only {stage} --force", .path.display())]
    DamagedPart {
        path: PathBuf,
        stage: String,
        source: parquet::errors::ParquetError,
    },

    #[error("{action} {}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot write Parquet file {}", .path.display())]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },

    #[error("corrupt run record {} of stage '{stage}': {message}. The record cannot be trusted: delete the stage's folder in the run's store (`.genecis/{stage}/` in a local workdir, the folder above `_log/`), then rebuild it with `genecis run MANIFEST --from {stage}`.", .path.display())]
    CorruptRecord {
        path: PathBuf,
        stage: String,
        message: String,
    },

    #[error("no genecis run at {}: pass a manifest (.toml) or a workdir that holds <stage>/_log/ records (run the pipeline first)", .0.display())]
    NoRun(PathBuf),

    #[error("the embedded spaCy model (.spacy/en_core_web_sm.bin.gz) is unreadable: {0}. Delete .spacy/ and run `make setup` (scripts/setup.sh converts it again), then rebuild.")]
    ParserModel(String),

    #[error(transparent)]
    Model(#[from] crate::model::ModelError),

    #[error(transparent)]
    Dist(#[from] crate::model::dist::DistError),

    #[error("libtorch")]
    Torch(#[from] tch::TchError),

    #[error("SQL error")]
    Sql(#[from] datafusion::error::DataFusionError),

    #[error("Arrow error")]
    Arrow(#[from] arrow::error::ArrowError),

    /// A broken invariant: not the user's input, but our code.
    #[error(
        "internal error: {0}. This is a bug in genecis; please report it with the command you ran."
    )]
    Internal(String),
}

impl Error {
    /// Errors caused by what the user asked for (manifest, arguments), as
    /// opposed to failures while working. The binary exits 2 for these.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::ManifestRead { .. }
                | Error::ManifestSyntax { .. }
                | Error::ManifestInvalid { .. }
                | Error::Usage { .. }
                | Error::CheckFailed { .. }
                | Error::NotOurs { .. }
                | Error::WorkdirUrl { .. }
                | Error::Model(crate::model::ModelError::Config { .. })
        )
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }
}

/// An error and its causes on one line, `a: b: c`. A cause whose text its
/// parent already shows (as DataFusion's wrappers do) is left out.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !last.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        cur = c.source();
    }
    out
}
