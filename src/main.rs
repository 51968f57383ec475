//! The `genecis` command: raw arguments (clap) are resolved into one
//! validated [`Command`] before any work starts, then dispatched to the
//! library. Usage and manifest errors exit with 2.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use genecis::cli::devtools::{self, BenchCmd, ParseEvalArgs};
use genecis::framework::manifest::{Plan, SetOverride};
use genecis::framework::runner::{self, RunRequest};
use genecis::framework::sql::{self, OutputFormat};
use genecis::framework::stage::Shard;

#[derive(Parser)]
#[command(
    name = "genecis",
    version,
    about = "GeneCIS pipelines on Arrow: run, inspect and query them"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
}

#[derive(Args)]
struct ManifestArgs {
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
struct RunArgs {
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
    /// Run one shard I/N (0-based) of the shardable stages.
    #[arg(long, value_name = "I/N")]
    shard: Option<Shard>,
    /// No progress bars.
    #[arg(long, short)]
    quiet: bool,
    /// Do not validate the data (templates, images, checkpoints) first.
    #[arg(long)]
    skip_check: bool,
}

#[derive(Args)]
struct SqlArgs {
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
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Table,
    Csv,
    Json,
    Parquet,
}

/// What the arguments ask for, validated: every path, stage name, shard
/// and override checked once, before any work.
enum Command {
    Run(Plan, RunRequest),
    Status(Plan),
    Check(Plan),
    Sql {
        workdir: PathBuf,
        query: Option<String>,
        format: OutputFormat,
        out: Option<PathBuf>,
    },
    Kinds,
    Doctor,
    ParseEval(ParseEvalArgs),
    Bench(BenchCmd),
    Audit(Vec<PathBuf>),
}

impl ManifestArgs {
    fn plan(&self) -> genecis::Result<Plan> {
        let sets = self
            .set
            .iter()
            .map(|s| SetOverride::parse(s))
            .collect::<genecis::Result<Vec<_>>>()?;
        Plan::load(
            &self.manifest,
            &sets,
            self.workdir.as_deref(),
            &genecis::stages::KINDS,
        )
    }
}

impl Cmd {
    fn resolve(self) -> Result<Command> {
        Ok(match self {
            Cmd::Run(a) => {
                let plan = a.manifest.plan()?;
                let mut req = RunRequest::new(
                    &plan,
                    a.only.as_deref(),
                    a.from.as_deref(),
                    a.force,
                    a.shard,
                )?;
                req.progress = !a.quiet;
                req.skip_check = a.skip_check;
                Command::Run(plan, req)
            }
            Cmd::Status(a) => Command::Status(a.plan()?),
            Cmd::Check(a) => Command::Check(a.plan()?),
            Cmd::Sql(a) => {
                let workdir = match (a.target.is_file(), a.workdir) {
                    (true, Some(w)) => w,
                    (true, None) => genecis::framework::manifest::workdir_of(&a.target)?,
                    (false, _) => a.target,
                };
                let query = match (a.query, &a.file) {
                    (Some(q), _) => Some(q),
                    (None, Some(f)) => Some(
                        std::fs::read_to_string(f)
                            .with_context(|| format!("cannot read {}", f.display()))?,
                    ),
                    (None, None) => None,
                };
                let format = match a.format {
                    FormatArg::Table => OutputFormat::Table,
                    FormatArg::Csv => OutputFormat::Csv,
                    FormatArg::Json => OutputFormat::Json,
                    FormatArg::Parquet => OutputFormat::Parquet,
                };
                Command::Sql {
                    workdir,
                    query,
                    format,
                    out: a.out,
                }
            }
            Cmd::Kinds => Command::Kinds,
            Cmd::Doctor => Command::Doctor,
            Cmd::ParseEval(a) => Command::ParseEval(a),
            Cmd::Bench(b) => Command::Bench(b),
            Cmd::Audit { targets } => Command::Audit(targets),
        })
    }
}

fn main() -> ExitCode {
    // `genecis sql ... | head` should end quietly when the reader goes, as
    // other command-line tools do, not panic in println!.
    #[cfg(unix)]
    // SAFETY: restoring the default action of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match cli.cmd.resolve().and_then(dispatch) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let g = e.downcast_ref::<genecis::Error>();
            let text = match g {
                Some(g) => genecis::error::report(g),
                None => format!("{e:#}"),
            };
            eprintln!("error: {text}");
            ExitCode::from(if g.is_some_and(|g| g.is_usage()) {
                2
            } else {
                1
            })
        }
    }
}

fn dispatch(cmd: Command) -> Result<()> {
    match cmd {
        Command::Run(plan, req) => {
            println!("pipeline {} -> {}", plan.name, plan.workdir.display());
            let started = std::time::Instant::now();
            let outcomes = runner::run(&plan, &req)?;
            let count = |a: runner::Action| outcomes.iter().filter(|o| o.action == a).count();
            println!(
                "done: {} ran, {} up to date, {:.2} s",
                count(runner::Action::Ran),
                count(runner::Action::Skipped),
                started.elapsed().as_secs_f64()
            );
        }
        Command::Status(plan) => print!("{}", runner::status_text(&plan)?),
        Command::Check(plan) => {
            let (text, errors) = runner::check_text(&plan);
            print!("{text}");
            if errors > 0 {
                anyhow::bail!("{errors} problem(s) to fix before running");
            }
        }
        Command::Sql {
            workdir,
            query,
            format,
            out,
        } => sql::run_cli(&workdir, query.as_deref(), format, out.as_deref())?,
        Command::Kinds => print!("{}", genecis::stages::KINDS.describe()),
        Command::Doctor => devtools::doctor()?,
        Command::ParseEval(a) => devtools::parse_eval(&a)?,
        Command::Bench(b) => devtools::bench(&b)?,
        Command::Audit(t) => print!("{}", genecis::cli::audit::audit_cli(&t)?),
    }
    Ok(())
}
