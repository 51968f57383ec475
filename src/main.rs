//! The `genecis` command. Raw arguments (clap) are resolved into a validated
//! plan before any work starts; usage and manifest errors exit with 2.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use genecis::manifest::{Plan, SetOverride};
use genecis::runner::{self, RunOptions, StageState};
use genecis::sql::{self, OutputFormat};
use genecis::stage::{Severity, Shard, KINDS};

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
    /// Train the parser's PP-attachment model on reference parses (JSONL),
    /// print a cross-validated score, and write the weights.
    ParseTrain(ParseTrainArgs),
    /// Benchmarks (build with --release first).
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Decode + CLIP-preprocess every image in a folder (rayon), images/s.
    Preprocess {
        dir: PathBuf,
        #[arg(long, default_value_t = 224)]
        n_px: u32,
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
    /// Parse captions from a CC3M TSV, repeated to at least --min-captions,
    /// with rayon over chunks; prints captions/s and peak memory.
    Parse {
        /// A CC3M-style TSV (caption<TAB>url).
        captions: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        min_captions: usize,
        #[arg(long, default_value_t = 4096)]
        chunk: usize,
        /// "spacy" (the reference pipeline, ported) or "rules" (the fast engine).
        #[arg(long, default_value = "spacy")]
        engine: genecis::parse::Engine,
    },
}

#[derive(Args)]
struct ParseEvalArgs {
    /// "spacy" (the reference pipeline, ported) or "rules" (the fast engine).
    #[arg(long, default_value = "spacy")]
    engine: genecis::parse::Engine,
    /// Hand-picked captions with reference output (JSON list; sg_gold.dev.json).
    #[arg(long)]
    gold: Option<PathBuf>,
    /// Real captions with reference output (JSONL; reference_parses.dev.jsonl).
    #[arg(long)]
    dev: Option<PathBuf>,
    /// Score the post-0.1.0 behaviour (strict_v010 = false).
    #[arg(long)]
    loose: bool,
    /// With --engine rules: score the hand-written rules alone (no learned
    /// chunk roles or PP attachment).
    #[arg(long)]
    rules_only: bool,
    /// Print the gold captions that do not match.
    #[arg(long)]
    misses: bool,
    /// Print the first N dev captions whose relations (or, with --entities, heads) differ.
    #[arg(long, value_name = "N")]
    dev_misses: Option<usize>,
    #[arg(long)]
    entities: bool,
    /// Compare the spacy engine with spaCy itself on a parity file written by
    /// scripts/make_spacy_parity_fixture.py (token by token, and the graphs).
    #[arg(long, value_name = "FILE")]
    parity: Option<PathBuf>,
    /// Captions to parse and show (tags, entities, relations).
    #[arg(long = "show", value_name = "CAPTION")]
    captions: Vec<String>,
}

#[derive(Args)]
struct ParseTrainArgs {
    /// Real captions with reference output (JSONL; reference_parses.dev.jsonl).
    #[arg(long)]
    dev: PathBuf,
    /// Where to write the attachment weights (gzip; the parser ships src/parse/lexicon/attach_weights.tsv.gz).
    #[arg(long)]
    out: PathBuf,
    /// Where to write the chunk-role weights (gzip; the parser ships src/parse/lexicon/chunk_weights.tsv.gz).
    #[arg(long)]
    chunks_out: PathBuf,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Added to the rule choice's score: the model overrides the rules only
    /// when it is at least this much surer.
    #[arg(long, default_value_t = 0.0)]
    rule_bonus: f32,
    /// The same for the verb-subject choice.
    #[arg(long, default_value_t = 0.0)]
    verb_rule_bonus: f32,
    /// Print how the rules' choices compare with the reference, by option kind.
    #[arg(long)]
    breakdown: bool,
    /// Print up to N held-out captions per fold that the trained parser gets wrong.
    #[arg(long, value_name = "N", default_value_t = 0)]
    heldout_misses: usize,
    /// With --heldout-misses: compare entity heads instead of relations.
    #[arg(long)]
    entities: bool,
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
    shard: Option<String>,
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

impl From<FormatArg> for OutputFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Table => OutputFormat::Table,
            FormatArg::Csv => OutputFormat::Csv,
            FormatArg::Json => OutputFormat::Json,
            FormatArg::Parquet => OutputFormat::Parquet,
        }
    }
}

fn parse_shard(s: &str) -> genecis::Result<Shard> {
    let bad = || genecis::Error::Usage {
        arg: format!("--shard {s}"),
        message: "expected I/N with 0 <= I < N, e.g. 3/16".into(),
    };
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (index, count) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if count == 0 || index >= count {
        return Err(bad());
    }
    Ok(Shard { index, count })
}

impl ManifestArgs {
    fn plan(&self) -> genecis::Result<Plan> {
        let sets = self
            .set
            .iter()
            .map(|s| SetOverride::parse(s))
            .collect::<genecis::Result<Vec<_>>>()?;
        Plan::load(&self.manifest, &sets, self.workdir.as_deref())
    }
}

/// Everything `run` needs, validated.
struct ResolvedRun {
    plan: Plan,
    opts: RunOptions,
}

impl RunArgs {
    fn resolve(&self) -> genecis::Result<ResolvedRun> {
        let shard = self.shard.as_deref().map(parse_shard).transpose()?;
        let plan = self.manifest.plan()?;
        let opts = RunOptions {
            only: self.only.clone(),
            from: self.from.clone(),
            force: self.force,
            shard,
            progress: !self.quiet,
            skip_check: self.skip_check,
        };
        runner::check_stage_names(&plan, &opts)?;
        Ok(ResolvedRun { plan, opts })
    }
}

fn sql_workdir(args: &SqlArgs) -> genecis::Result<PathBuf> {
    let t = &args.target;
    if t.is_file() {
        match &args.workdir {
            Some(w) => Ok(w.clone()),
            None => genecis::manifest::workdir_of(t),
        }
    } else {
        Ok(t.clone())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            let usage = e
                .downcast_ref::<genecis::Error>()
                .is_some_and(|g| g.is_usage());
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

fn real_main(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Run(args) => {
            let r = args.resolve()?;
            println!("pipeline {} -> {}", r.plan.name, r.plan.workdir.display());
            let started = std::time::Instant::now();
            let outcomes = runner::run(&r.plan, &r.opts)?;
            let ran = outcomes
                .iter()
                .filter(|o| o.action == runner::Action::Ran)
                .count();
            let skipped = outcomes
                .iter()
                .filter(|o| o.action == runner::Action::Skipped)
                .count();
            println!(
                "done: {ran} ran, {skipped} up to date, {:.2} s",
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status(args) => {
            let plan = args.plan()?;
            println!("pipeline {} ({})", plan.name, plan.workdir.display());
            for (name, state) in runner::status_lines(&plan)? {
                match state {
                    StageState::Done => println!("  {name:<20} done"),
                    StageState::Missing {
                        resumable_chunks: 0,
                    } => println!("  {name:<20} missing"),
                    StageState::Missing {
                        resumable_chunks: k,
                    } => {
                        println!("  {name:<20} missing ({k} chunk(s) of an interrupted run will be kept)")
                    }
                    StageState::Stale(why) => {
                        println!("  {name:<20} stale");
                        for w in why {
                            println!("  {:<20}   - {w}", "");
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check(args) => {
            let plan = args.plan()?;
            println!(
                "checking pipeline {} ({} stages)",
                plan.name,
                plan.stages.len()
            );
            let findings = runner::check_plan(&plan, None);
            let mut errors = 0;
            for s in &plan.stages {
                let mine: Vec<_> = findings.iter().filter(|(n, _)| *n == s.name).collect();
                if mine.is_empty() {
                    println!("  ok    {} ({})", s.name, s.kind.kind());
                }
                for (_, f) in mine {
                    let tag = match f.severity {
                        Severity::Error => {
                            errors += 1;
                            "ERROR"
                        }
                        Severity::Warning => "warn ",
                    };
                    println!(
                        "  {tag} {} ({}) {}: {}",
                        s.name,
                        s.kind.kind(),
                        f.field,
                        f.message
                    );
                }
            }
            if errors > 0 {
                anyhow::bail!("{errors} problem(s) to fix before running");
            }
            println!("all checks passed");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Sql(args) => {
            let workdir = sql_workdir(&args)?;
            let query = match (&args.query, &args.file) {
                (Some(q), _) => Some(q.clone()),
                (None, Some(f)) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("cannot read {}", f.display()))?,
                ),
                (None, None) => None,
            };
            let format: OutputFormat = args.format.into();
            if format == OutputFormat::Parquet && args.out.is_none() {
                return Err(genecis::Error::Usage {
                    arg: "--format parquet".into(),
                    message: "needs --out FILE".into(),
                }
                .into());
            }
            let entries = sql::discover(&workdir)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                let ctx = sql::session(&entries).await?;
                match query {
                    Some(q) => {
                        let batches = sql::query(&ctx, &q).await?;
                        sql::write_results(&batches, format, args.out.as_deref())?;
                    }
                    None => sql::repl(&ctx, &entries, &history_path(&workdir)).await?,
                }
                Ok::<_, genecis::Error>(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Doctor => {
            println!("genecis {}", env!("CARGO_PKG_VERSION"));
            let t = tch::Tensor::from_slice(&[1f32, 2.0, 3.0]);
            let sum = (&t * &t).sum(tch::Kind::Float).double_value(&[]);
            println!("libtorch: loaded, CPU check 1+4+9 = {sum}");
            println!(
                "cuda: available = {}, devices = {}",
                tch::Cuda::is_available(),
                tch::Cuda::device_count()
            );
            if sum != 14.0 {
                anyhow::bail!("libtorch computed {sum} instead of 14");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::ParseTrain(a) => {
            let o = genecis::parse::eval::train_parser(
                &a.dev,
                true,
                a.epochs,
                (a.rule_bonus, a.verb_rule_bonus),
                genecis::parse::eval::MissReport {
                    per_fold: a.heldout_misses,
                    entities: a.entities,
                },
            )?;
            println!(
                "{} chunk-role tokens with a label ({} captions left out: their reference spans do not line up with the tokens)",
                o.chunk_examples, o.chunk_unaligned
            );
            println!(
                "{} attachment decisions with a label; the rules choose a reference attachment in {}",
                o.examples, o.rule_right
            );
            if a.breakdown {
                for (k, n) in o.breakdown.iter().take(30) {
                    println!("{n:7} {k}");
                }
            }
            for (i, f) in o.folds.iter().enumerate() {
                for m in &f.misses {
                    println!("{m}");
                }
                println!("fold {i} ({} held-out captions):", f.captions);
                for (name, s) in [
                    ("rules", f.rules),
                    ("+ chunk roles", f.chunks),
                    ("+ chunk roles + attachment", f.both),
                ] {
                    println!(
                        "  {name:28} relation F1 {:.4} (P {:.4} R {:.4})  entity F1 {:.4}",
                        s.relations.f1(),
                        s.relations.precision(),
                        s.relations.recall(),
                        s.entities.f1()
                    );
                }
            }
            let dev_name = a
                .dev
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            let header = format!(
                "PP-attachment and verb-subject weights for the parse stage (src/parse/attach.rs).\nTrained by: genecis parse-train --dev {dev_name} --epochs {} --rule-bonus {} --verb-rule-bonus {}\n{} decisions; features with |weight| < 0.001 dropped.",
                a.epochs, a.rule_bonus, a.verb_rule_bonus, o.examples
            );
            let write = |path: &PathBuf, tsv: String, n: usize, what: &str| {
                std::fs::write(path, genecis::parse::attach::gzip(&tsv))
                    .with_context(|| format!("cannot write {}", path.display()))?;
                println!("{n} {what} weights -> {}", path.display());
                anyhow::Ok(())
            };
            write(
                &a.out,
                o.attach.to_tsv(&header),
                o.attach.len(),
                "attachment",
            )?;
            let header = format!(
                "Chunk-role weights for the parse stage (src/parse/chunks.rs): feature, then O, M, H.\nTrained by: genecis parse-train --dev {dev_name} --epochs {}\n{} tokens; features whose weights are all under 0.05 dropped.",
                a.epochs, o.chunk_examples
            );
            write(
                &a.chunks_out,
                o.chunks.to_tsv(&header),
                o.chunks.len(),
                "chunk-role",
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::ParseEval(a) => {
            if let Some(f) = &a.parity {
                let p = genecis::parse::eval::spacy_parity(f, 20)?;
                for e in &p.examples {
                    println!("DIFF {e}");
                }
                println!(
                    "parity {} ({} captions): token lists differ {}, norms/tags/POS/arcs/lemmas differ {}, scene graphs differ {}",
                    f.display(), p.captions, p.tokens_differ, p.analysis_differs, p.graphs_differ
                );
                if a.gold.is_none() && a.dev.is_none() && a.captions.is_empty() {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            if a.gold.is_none() && a.dev.is_none() && a.captions.is_empty() {
                return Err(genecis::Error::Usage {
                    arg: "parse-eval".into(),
                    message: "give --gold FILE, --dev FILE, --parity FILE or --show CAPTION".into(),
                }
                .into());
            }
            let strict = !a.loose;
            let engine = a.engine;
            if engine == genecis::parse::Engine::Spacy && a.rules_only {
                return Err(genecis::Error::Usage {
                    arg: "--rules-only".into(),
                    message: "applies to --engine rules only (the spacy engine has no learned parts to switch off)".into(),
                }
                .into());
            }
            if let Some(g) = &a.gold {
                let s = genecis::parse::eval::score_gold(g, strict, engine)?;
                if a.misses {
                    for m in &s.misses {
                        println!("MISS {m}");
                    }
                }
                println!(
                    "gold {}: relations exact {}/{}, exact or listed alternative {}/{}, entity heads exact {}/{}",
                    g.display(), s.exact, s.n, s.exact_or_alternative, s.n, s.entities_exact, s.n
                );
            }
            if engine == genecis::parse::Engine::Spacy && !a.captions.is_empty() {
                let caps: Vec<&str> = a.captions.iter().map(String::as_str).collect();
                let docs = genecis::parse::spacy::analyse(&caps)?;
                let graphs = genecis::parse::spacy::scene_graphs(&docs, strict)?;
                for ((c, d), g) in caps.iter().zip(docs).zip(graphs) {
                    let toks: Vec<String> = d
                        .tokens
                        .iter()
                        .enumerate()
                        .map(|(i, t)| {
                            format!("{i}:{}/{}/{} {}<-{}", t.text, t.tag, t.pos, t.dep, t.head)
                        })
                        .collect();
                    println!("{c}\n  tokens: {}\n{}", toks.join("  "), graph_text(&g));
                }
            }
            for c in a
                .captions
                .iter()
                .filter(|_| engine == genecis::parse::Engine::Rules)
            {
                let learned = if a.rules_only {
                    genecis::parse::Learned::none()
                } else {
                    genecis::parse::Learned::shipped()
                };
                // The tags the chunker sees: fix-ups and chunk roles applied.
                let mut toks = genecis::parse::rule_tokens(c);
                if let Some(m) = learned.chunks {
                    m.apply(&mut toks, strict);
                }
                let tags: Vec<String> = toks
                    .iter()
                    .map(|t| {
                        if t.lemma == t.word {
                            format!("{}/{}", t.word, t.tag)
                        } else {
                            format!("{}/{}({})", t.word, t.tag, t.lemma)
                        }
                    })
                    .collect();
                let g = genecis::parse::parse_caption_with(c, strict, learned);
                println!("{c}\n  tags: {}\n{}", tags.join(" "), graph_text(&g));
            }
            if let (Some(d), Some(n)) = (&a.dev, a.dev_misses) {
                for m in genecis::parse::eval::dev_misses(d, strict, engine, a.entities, n)? {
                    println!("DIFF {m}");
                }
            }
            if let Some(d) = &a.dev {
                let learned = if a.rules_only {
                    genecis::parse::Learned::none()
                } else {
                    genecis::parse::Learned::shipped()
                };
                let s = genecis::parse::eval::score_dev_with(d, strict, engine, learned)?;
                if engine == genecis::parse::Engine::Rules && !a.rules_only {
                    println!("note: the shipped chunk-role and PP-attachment models were trained on reference_parses.dev.jsonl, so their dev score is in-sample; `genecis parse-train` prints the cross-validated score (and --rules-only scores the rules alone)");
                }
                println!(
                    "dev {} ({} captions): relation triples P {:.4} R {:.4} F1 {:.4}; entity heads P {:.4} R {:.4} F1 {:.4}; captions with identical relations {}",
                    d.display(), s.captions,
                    s.relations.precision(), s.relations.recall(), s.relations.f1(),
                    s.entities.precision(), s.entities.recall(), s.entities.f1(), s.exact_captions
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::Preprocess { dir, n_px, repeat }) => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .with_context(|| format!("cannot list {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|x| matches!(x.to_str(), Some("jpg" | "jpeg" | "png")))
                })
                .collect();
            files.sort();
            anyhow::ensure!(!files.is_empty(), "no .jpg/.png files in {}", dir.display());
            let keys: Vec<genecis::model::preprocess::ImageKey> = files
                .iter()
                .map(|p| genecis::model::preprocess::ImageKey {
                    path: p,
                    bbox: None,
                })
                .collect();
            let t0 = std::time::Instant::now();
            let mut ok = 0usize;
            for _ in 0..repeat.max(1) {
                ok += genecis::model::preprocess::load_batch(&keys, n_px)
                    .iter()
                    .filter(|r| r.is_ok())
                    .count();
            }
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "preprocessed {ok} images ({} files x {repeat}) to {n_px}px in {secs:.2} s on {} threads: {:.1} images/s",
                files.len(),
                rayon::current_num_threads(),
                ok as f64 / secs
            );
            // Where the time goes, one thread: decode alone, then the rest.
            let t1 = std::time::Instant::now();
            let decoded: Vec<image::RgbImage> = files
                .iter()
                .filter_map(|f| image::open(f).ok().map(|i| i.into_rgb8()))
                .collect();
            let dec = t1.elapsed().as_secs_f64();
            let t2 = std::time::Instant::now();
            for d in &decoded {
                let _ = genecis::model::preprocess::to_tensor(
                    &genecis::model::preprocess::resize_center_crop_rgb(d, n_px),
                );
            }
            let rest = t2.elapsed().as_secs_f64();
            let t3 = std::time::Instant::now();
            for d in &decoded {
                let _ = genecis::model::preprocess::resize_center_crop_rgb(d, n_px);
            }
            let resize = t3.elapsed().as_secs_f64();
            let n = decoded.len().max(1) as f64;
            println!(
                "one thread: decode {:.2} ms/image, resize + crop {:.2} ms/image, + normalise to a tensor {:.2} ms/image",
                1000.0 * dec / n,
                1000.0 * resize / n,
                1000.0 * rest / n
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(BenchCmd::Parse {
            captions,
            min_captions,
            chunk,
            engine,
        }) => {
            use rayon::prelude::*;
            let text = std::fs::read_to_string(&captions)
                .with_context(|| format!("cannot read {}", captions.display()))?;
            let base: Vec<&str> = text
                .lines()
                .map(|l| l.rsplit_once('\t').map_or(l, |(c, _)| c))
                .collect();
            anyhow::ensure!(!base.is_empty(), "{} has no captions", captions.display());
            let copies = min_captions.div_ceil(base.len()).max(1);
            let all: Vec<&str> = (0..copies).flat_map(|_| base.iter().copied()).collect();
            // Warm up: load the tagger lexicon or unpack the model.
            genecis::parse::parse_captions(
                &["warm up the parser"],
                engine,
                true,
                genecis::parse::Learned::shipped(),
            )?;
            let t0 = std::time::Instant::now();
            let (ents, rels) = all
                .par_chunks(chunk.max(1))
                .map(|c| {
                    // One chunk per task, parsed on this thread (the engine's
                    // own batching stays inside the chunk).
                    let gs = match engine {
                        genecis::parse::Engine::Spacy => c
                            .chunks(genecis::parse::spacy::BATCH)
                            .map(genecis::parse::spacy::parse_batch)
                            .collect::<genecis::Result<Vec<_>>>()
                            .map(|v| v.into_iter().flatten().collect::<Vec<_>>()),
                        genecis::parse::Engine::Rules => Ok(c
                            .iter()
                            .map(|cap| genecis::parse::parse_caption(cap, true))
                            .collect()),
                    };
                    gs.map(|gs| {
                        gs.iter().fold((0usize, 0usize), |(e, r), g| {
                            (e + g.entities.len(), r + g.relations.len())
                        })
                    })
                })
                .try_reduce(|| (0, 0), |a, b| Ok((a.0 + b.0, a.1 + b.1)))?;
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "parsed {} captions ({} x {}) with the {engine:?} engine in {secs:.2} s on {} threads: {:.0} captions/s; {} entities, {} relations; peak RSS {}",
                all.len(), copies, base.len(), rayon::current_num_threads(), all.len() as f64 / secs, ents, rels, peak_rss()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Kinds => {
            for k in KINDS {
                println!(
                    "{} (version {}{}): {}",
                    k.kind(),
                    k.version(),
                    if k.shardable() { ", shardable" } else { "" },
                    k.about()
                );
                if !k.input_tables().is_empty() {
                    println!("  reads: {}", k.input_tables().join(", "));
                }
                for t in k.output_tables() {
                    let cols: Vec<String> = t
                        .schema
                        .fields()
                        .iter()
                        .map(|f| {
                            // A width-0 fixed-size list stands for "the model's width".
                            let ty = match f.data_type() {
                                arrow::datatypes::DataType::FixedSizeList(item, 0) => {
                                    format!("FixedSizeList(d x {})", item.data_type())
                                }
                                other => other.to_string(),
                            };
                            format!(
                                "{} {ty}{}",
                                f.name(),
                                if f.is_nullable() { "?" } else { "" }
                            )
                        })
                        .collect();
                    println!("  writes {}({})", t.name, cols.join(", "));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A scene graph for `parse-eval --show`: entity heads, then relations.
fn graph_text(g: &genecis::parse::SceneGraph) -> String {
    let heads: Vec<&str> = g.entities.iter().map(|e| e.head.as_str()).collect();
    let rels: Vec<String> = g
        .relations
        .iter()
        .map(|r| {
            format!(
                "({} | {} | {})",
                heads[r.subject], r.relation, heads[r.object]
            )
        })
        .collect();
    format!("  entities: {heads:?}\n  relations: {}", rels.join(" "))
}

/// Peak resident memory of this process (Linux), for benchmark reports.
fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l["VmHWM:".len()..].trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn history_path(workdir: &Path) -> PathBuf {
    workdir.join(".sql_history")
}
