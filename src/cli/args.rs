//! The `genecis` command's arguments (clap), resolved into one validated
//! [`Command`] before any work starts (ripgrep's low and high arguments).

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::cli::compare::{CompareFormat, CompareRequest};
use crate::cli::contamination::ContaminationRequest;
use crate::cli::devtools::{BenchCmd, ParseEvalArgs};
use crate::cli::encode::EncodeRequest;
use crate::cli::launch::Launch;
use crate::error::{Error, Result};
use crate::framework::commit::RunStore;
use crate::framework::manifest::{Plan, SetOverride};
use crate::framework::runner::RunRequest;
use crate::framework::sql::{Engine, OutputFormat};
use crate::framework::stage::Shard;
use crate::model::arch::ArchSpec;
use crate::model::select_device;

#[derive(Parser)]
#[command(
    name = "genecis",
    version,
    about = "GeneCIS pipelines on Arrow: run, inspect and query them"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run a manifest's stages, skipping those that are up to date.
    Run(RunArgs),
    /// Show each stage as done, stale (and why) or missing.
    Status(ManifestArgs),
    /// Validate the data a manifest reads (template files, image folders,
    /// checkpoints) and say what to fix; `run` does the same first.
    Check(ManifestArgs),
    /// Query a run's tables with SQL (interactive without QUERY).
    Sql(SqlArgs),
    /// List the stage kinds and their tables.
    Kinds,
    /// Check the installation: libtorch loads and computes, CUDA visibility.
    Doctor,
    /// Score the caption parser against reference SceneGraphParser output.
    ParseEval(ParseEvalArgs),
    /// Benchmarks (build with --release first).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Suspect templates: GeneCIS template files (the checks that need no
    /// model), or a run's score stages (all checks).
    Audit {
        /// Template .json files, or a manifest / workdir.
        targets: Vec<PathBuf>,
    },
    /// Compare two runs' scores on the same templates: R@1 of each, the
    /// paired difference with its interval, McNemar's p, templates won and lost.
    Compare(CompareArgs),
    /// Evaluation images a model may have seen in training: exact duplicates
    /// (decoded pixels) and near duplicates (embedding cosine) between a
    /// training run's and an evaluation run's embed stages.
    Contamination(ContaminationArgs),
    /// CLIP features of image files and texts, without a manifest, in the
    /// tables `embed` writes (raw features, not normalised).
    Encode(EncodeArgs),
}

#[derive(Args)]
pub struct EncodeArgs {
    /// CLIP weights: an OpenAI .pt, an open_clip state dict or training
    /// checkpoint (.pt, .bin, .safetensors), a Hugging Face CLIPModel
    /// folder, or an open_clip hub folder.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Which CLIP it is: an open_clip model name (ViT-B-32, ViT-H-14,
    /// RN50-quickgelu, ...) or an open_clip model-config .json. Left out,
    /// OpenAI's config is assumed (and said).
    #[arg(long)]
    arch: Option<String>,
    /// A folder (every image file under it; keys are paths relative to it)
    /// or a list file (one image path per line, relative to the list).
    #[arg(long, value_name = "DIR_OR_LIST")]
    images: Option<PathBuf>,
    /// A text file, one text per line.
    #[arg(long)]
    texts: Option<PathBuf>,
    /// The Parquet file; with both --images and --texts, STEM.images.parquet
    /// and STEM.texts.parquet beside it.
    #[arg(long, default_value = "embeddings.parquet")]
    out: PathBuf,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// fp16 autocast on a GPU (ignored on the CPU).
    #[arg(long)]
    mixed_precision: bool,
    /// The `model` column (default: the checkpoint's file name without extension).
    #[arg(long)]
    model: Option<String>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
pub struct ContaminationArgs {
    /// The training run's embed stage folder (<workdir>/<stage>, run on triplets).
    train: PathBuf,
    /// The evaluation run's embed stage folder (run on templates).
    eval: PathBuf,
    /// Cosine from which two images count as near duplicates.
    #[arg(long, default_value_t = 0.95)]
    threshold: f64,
    /// Training images per matrix product.
    #[arg(long, default_value_t = 65_536)]
    block: usize,
    /// Write the table (eval_key, train_image_id, cosine, kind) to FILE.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = TableFileArg::Parquet)]
    format: TableFileArg,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum TableFileArg {
    Parquet,
    Csv,
    Json,
}

#[derive(Args)]
pub struct CompareArgs {
    /// A manifest, a workdir, or a score stage's folder.
    a: PathBuf,
    /// The other run.
    b: PathBuf,
    /// Only this method (default: every method both runs scored).
    #[arg(long)]
    method: Option<String>,
    /// Only this task.
    #[arg(long)]
    task: Option<String>,
    /// When the runs scored different templates, compare those both scored.
    #[arg(long)]
    common: bool,
    #[arg(long, value_enum, default_value_t = CompareFormatArg::Table)]
    format: CompareFormatArg,
    /// Bootstrap resamples of each interval.
    #[arg(long, default_value_t = 10_000)]
    bootstrap: usize,
    /// Seed of the resamples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum CompareFormatArg {
    Table,
    Csv,
    Json,
}

#[derive(Args)]
pub struct ManifestArgs {
    /// The pipeline manifest (TOML).
    manifest: PathBuf,
    /// Override a stage param: STAGE.PARAM=VALUE (a TOML value, else a string).
    #[arg(long = "set", value_name = "STAGE.PARAM=VALUE")]
    set: Vec<String>,
    /// Use this workdir instead of the manifest's.
    #[arg(long)]
    workdir: Option<PathBuf>,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    manifest: ManifestArgs,
    /// Run only this stage; its inputs must be done.
    #[arg(long, value_name = "STAGE")]
    only: Option<String>,
    /// Rerun this stage and every stage downstream of it.
    #[arg(long, value_name = "STAGE")]
    from: Option<String>,
    /// Rerun even up-to-date stages (all, or the --only one).
    #[arg(long)]
    force: bool,
    /// Run one shard I/N (0-based) of the shardable stages; `auto` takes
    /// it from a SLURM job array (SLURM_ARRAY_TASK_ID, _COUNT, _MIN, _STEP).
    #[arg(long, value_name = "I/N|auto")]
    shard: Option<ShardArg>,
    /// No progress bars.
    #[arg(long, short)]
    quiet: bool,
    /// Do not validate the data (templates, images, checkpoints) first.
    #[arg(long)]
    skip_check: bool,
    /// Run in a non-empty folder that holds no genecis run (genecis still
    /// writes only its stage folders and .work/ there).
    #[arg(long)]
    adopt_workdir: bool,
    /// Data-parallel training on N local ranks (Gloo on 127.0.0.1; one GPU
    /// per rank): spawns them and stops all when one fails. Under torchrun
    /// or srun leave it out: RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS
    /// are read. `--nproc 1` runs one process whatever the variables say.
    #[arg(long, value_name = "N")]
    nproc: Option<usize>,
    /// Seconds a rank waits for the others in a collective or the
    /// rendezvous before it fails (PyTorch's default: 1800).
    #[arg(long, value_name = "SECONDS", default_value_t = crate::cli::launch::DEFAULT_TIMEOUT_S)]
    dist_timeout: u64,
}

#[derive(Args)]
pub struct SqlArgs {
    /// A manifest (.toml) or a run's workdir.
    target: PathBuf,
    /// The query; without it (and without --file) an interactive prompt opens.
    query: Option<String>,
    /// Read the query from a .sql file.
    #[arg(long, short, conflicts_with = "query")]
    file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = FormatArg::Table)]
    format: FormatArg,
    /// Write the result to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// With a manifest: use this workdir instead of the manifest's.
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Run the query on an Apache Ballista cluster: `df://HOST:PORT` (its
    /// scheduler; the executors must see the workdir at the same path), or
    /// `standalone` (a scheduler and executor in this process). Needs a
    /// build with `--features ballista`.
    #[arg(long, value_name = "df://HOST:PORT|standalone")]
    cluster: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum FormatArg {
    Table,
    Csv,
    Json,
    Parquet,
}

/// What the arguments ask for, validated: every path, stage name, shard
/// and override checked once, before any work.
pub enum Command {
    Run(Plan, RunRequest, Launch),
    Status(Plan),
    Check(Plan),
    Sql {
        workdir: PathBuf,
        store: RunStore,
        query: Option<String>,
        format: OutputFormat,
        out: Option<PathBuf>,
        engine: Engine,
    },
    Kinds,
    Doctor,
    ParseEval(ParseEvalArgs),
    Bench(BenchCmd),
    Audit(Vec<PathBuf>),
    Compare(CompareRequest),
    Contamination(ContaminationRequest),
    Encode(EncodeRequest),
}

impl ManifestArgs {
    fn plan(&self) -> Result<Plan> {
        let sets = self
            .set
            .iter()
            .map(|s| SetOverride::parse(s))
            .collect::<Result<Vec<_>>>()?;
        Plan::load(
            &self.manifest,
            &sets,
            self.workdir.as_deref(),
            &crate::stages::KINDS,
        )
    }
}

/// `--shard`: a fixed I/N, or `auto` from a SLURM job array.
#[derive(Debug, Clone)]
pub enum ShardArg {
    Fixed(Shard),
    Auto,
}

impl std::str::FromStr for ShardArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<ShardArg, String> {
        match s {
            "auto" => Ok(ShardArg::Auto),
            _ => s
                .parse()
                .map(ShardArg::Fixed)
                .map_err(|e| format!("{e}, or auto (a SLURM job array)")),
        }
    }
}

impl ShardArg {
    /// The shard: for `auto`, this array task's place among the array's
    /// tasks, `(ID - MIN) / STEP` of COUNT (`sbatch --array=0-15` or
    /// `--array=1-31:2` alike).
    fn resolve(self) -> Result<Shard> {
        self.resolve_with(|k| std::env::var(k).ok())
    }

    fn resolve_with(self, var: impl Fn(&str) -> Option<String>) -> Result<Shard> {
        if let ShardArg::Fixed(s) = self {
            return Ok(s);
        }
        let usage = |m: String| Error::Usage {
            arg: "--shard auto".into(),
            message: m,
        };
        let num = |k: &str, default: Option<usize>| -> Result<usize> {
            match (var(k), default) {
                (Some(v), _) => v
                    .trim()
                    .parse()
                    .map_err(|_| usage(format!("{k}={v} is not a whole number"))),
                (None, Some(d)) => Ok(d),
                (None, None) => Err(usage(format!(
                    "{k} is not set: run it as a task of a SLURM job array (sbatch --array=0-N), or give --shard I/N"
                ))),
            }
        };
        let id = num("SLURM_ARRAY_TASK_ID", None)?;
        let count = num("SLURM_ARRAY_TASK_COUNT", None)?;
        let min = num("SLURM_ARRAY_TASK_MIN", Some(0))?;
        let step = num("SLURM_ARRAY_TASK_STEP", Some(1))?.max(1);
        let index = id.checked_sub(min).map(|d| d / step).filter(|&i| i < count);
        match index {
            Some(index) if count > 0 => Ok(Shard { index, count }),
            _ => Err(usage(format!(
                "SLURM_ARRAY_TASK_ID={id} is not one of {count} tasks from {min} in steps of {step}"
            ))),
        }
    }
}

impl Cmd {
    /// Checks every path, stage name, shard and override, and loads the
    /// plan, before any work.
    pub fn resolve(self) -> Result<Command> {
        Ok(match self {
            Cmd::Run(a) => {
                let plan = a.manifest.plan()?;
                let mut req = RunRequest::new(
                    &plan,
                    a.only.as_deref(),
                    a.from.as_deref(),
                    a.force,
                    a.shard.map(ShardArg::resolve).transpose()?,
                )?;
                req.progress = !a.quiet;
                req.skip_check = a.skip_check;
                req.adopt_workdir = a.adopt_workdir;
                let launch = Launch::resolve(
                    a.nproc,
                    std::time::Duration::from_secs(a.dist_timeout.max(1)),
                    |k| std::env::var(k).ok(),
                )?;
                if req.shard.is_some() && launch != Launch::Single {
                    return Err(Error::Usage {
                        arg: "--shard".into(),
                        message: "shards are separate processes; data-parallel ranks (--nproc, torchrun, srun) are one run: use one or the other".into(),
                    });
                }
                Command::Run(plan, req, launch)
            }
            Cmd::Status(a) => Command::Status(a.plan()?),
            Cmd::Check(a) => Command::Check(a.plan()?),
            Cmd::Sql(a) => {
                let (workdir, store) = match (a.target.is_file(), a.workdir) {
                    (true, Some(w)) => crate::framework::store::open_target(&w)?,
                    _ => crate::framework::store::open_target(&a.target)?,
                };
                let query = match (a.query, &a.file) {
                    (Some(q), _) => Some(q),
                    (None, Some(f)) => {
                        Some(std::fs::read_to_string(f).map_err(Error::io("cannot read", f))?)
                    }
                    (None, None) => None,
                };
                let format = match a.format {
                    FormatArg::Table => OutputFormat::Table,
                    FormatArg::Csv => OutputFormat::Csv,
                    FormatArg::Json => OutputFormat::Json,
                    FormatArg::Parquet => OutputFormat::Parquet,
                };
                let engine = match &a.cluster {
                    Some(c) => Engine::parse(c)?,
                    None => Engine::Local,
                };
                Command::Sql {
                    workdir,
                    store,
                    query,
                    format,
                    out: a.out,
                    engine,
                }
            }
            Cmd::Kinds => Command::Kinds,
            Cmd::Doctor => Command::Doctor,
            Cmd::ParseEval(a) => Command::ParseEval(a),
            Cmd::Bench(b) => Command::Bench(b),
            Cmd::Audit { targets } => Command::Audit(targets),
            Cmd::Encode(a) => {
                let usage = |arg: &str, message: String| Error::Usage {
                    arg: arg.into(),
                    message,
                };
                if a.images.is_none() && a.texts.is_none() {
                    return Err(usage("--images", "give --images, --texts or both".into()));
                }
                if a.batch_size == 0 || a.batch_size > 65_536 {
                    return Err(usage("--batch-size", "between 1 and 65,536".into()));
                }
                for (arg, p) in [("--images", &a.images), ("--texts", &a.texts)] {
                    if let Some(p) = p {
                        if !p.exists() {
                            return Err(usage(arg, format!("{} does not exist", p.display())));
                        }
                    }
                }
                if !a.checkpoint.exists() {
                    return Err(usage(
                        "--checkpoint",
                        format!("{} does not exist", a.checkpoint.display()),
                    ));
                }
                let arch = match &a.arch {
                    Some(s) => {
                        let spec =
                            ArchSpec::parse(s, Path::new("")).map_err(|m| usage("--arch", m))?;
                        spec.config().map_err(|m| usage("--arch", m))?;
                        Some(spec)
                    }
                    None => None,
                };
                let device = select_device(&a.device).map_err(|m| usage("--device", m))?;
                if a.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
                    return Err(usage("--model", "must not be empty".into()));
                }
                Command::Encode(EncodeRequest {
                    checkpoint: a.checkpoint,
                    arch,
                    images: a.images,
                    texts: a.texts,
                    out: a.out,
                    device,
                    batch_size: a.batch_size,
                    mixed_precision: a.mixed_precision,
                    model: a.model,
                    progress: !a.quiet,
                })
            }
            Cmd::Contamination(a) => {
                if !(-1.0..=1.0).contains(&a.threshold) || a.block == 0 {
                    return Err(Error::Usage {
                        arg: "--threshold".into(),
                        message: "a cosine between -1 and 1, and --block at least 1".into(),
                    });
                }
                Command::Contamination(ContaminationRequest {
                    train: a.train,
                    eval: a.eval,
                    threshold: a.threshold,
                    block: a.block,
                    out: a.out,
                    format: match a.format {
                        TableFileArg::Parquet => OutputFormat::Parquet,
                        TableFileArg::Csv => OutputFormat::Csv,
                        TableFileArg::Json => OutputFormat::Json,
                    },
                })
            }
            Cmd::Compare(a) => {
                if a.bootstrap > 1_000_000 {
                    return Err(Error::Usage {
                        arg: "--bootstrap".into(),
                        message: "at most 1,000,000 resamples".into(),
                    });
                }
                Command::Compare(CompareRequest {
                    a: a.a,
                    b: a.b,
                    method: a.method,
                    task: a.task,
                    common: a.common,
                    format: match a.format {
                        CompareFormatArg::Table => CompareFormat::Table,
                        CompareFormatArg::Csv => CompareFormat::Csv,
                        CompareFormatArg::Json => CompareFormat::Json,
                    },
                    bootstrap: a.bootstrap,
                    seed: a.seed,
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(vars: &[(&str, &str)]) -> std::result::Result<String, String> {
        ShardArg::Auto
            .resolve_with(|k| vars.iter().find(|v| v.0 == k).map(|v| v.1.to_string()))
            .map(|s| s.to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn auto_shard_follows_the_slurm_array() {
        let base = [("SLURM_ARRAY_TASK_COUNT", "4")];
        let with = |id: &'static str, more: &[(&'static str, &'static str)]| {
            let mut v: Vec<(&str, &str)> = base.to_vec();
            v.push(("SLURM_ARRAY_TASK_ID", id));
            v.extend_from_slice(more);
            v
        };
        assert_eq!(auto(&with("2", &[])).unwrap(), "2/4");
        // --array=1-4: MIN 1.
        assert_eq!(
            auto(&with("1", &[("SLURM_ARRAY_TASK_MIN", "1")])).unwrap(),
            "0/4"
        );
        // --array=10-16:2 (10, 12, 14, 16).
        let stepped = [
            ("SLURM_ARRAY_TASK_MIN", "10"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ];
        assert_eq!(auto(&with("14", &stepped)).unwrap(), "2/4");
        assert!(auto(&with("18", &stepped))
            .unwrap_err()
            .contains("not one of 4 tasks"));
        assert!(auto(&base)
            .unwrap_err()
            .contains("SLURM_ARRAY_TASK_ID is not set"));
        assert!(auto(&with("x", &[]))
            .unwrap_err()
            .contains("not a whole number"));
    }
}
