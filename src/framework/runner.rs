//! Running a plan: deciding what is up to date, running and committing
//! stages, and explaining staleness for `status`.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::framework::commit::{self, Outcome};
use crate::framework::manifest::{Plan, PlannedStage};
use crate::framework::progress::{thousands, Progress};
use crate::framework::ranks::{self, RankHandle, Ranks, Signal};
use crate::framework::stage::{Driver, Finding, Severity, Shard, StageContext};
use crate::framework::store::{self, StageRecord, StageWriter, WorkdirLock};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StageState {
    Done,
    /// Why: one line per changed thing.
    Stale(Vec<String>),
    /// Chunks finished by an interrupted run that a rerun will keep.
    Missing {
        resumable_chunks: usize,
    },
}

impl StageState {
    pub(crate) fn label(&self) -> &'static str {
        match self {
            StageState::Done => "done",
            StageState::Stale(_) => "stale",
            StageState::Missing { .. } => "missing",
        }
    }
}

/// Compares what the manifest asks for with what the workdir holds.
pub(crate) fn stage_state(plan: &Plan, s: &PlannedStage) -> Result<StageState> {
    assess(plan, s).map(|(state, _)| state)
}

/// The stage's state and its head record (read once: on an object store
/// each read is a request).
fn assess(plan: &Plan, s: &PlannedStage) -> Result<(StageState, Option<StageRecord>)> {
    let head = StageRecord::head(&plan.store, &s.name)?;
    let state = state_of(plan, s, head.as_ref())?;
    Ok((state, head))
}

fn state_of(plan: &Plan, s: &PlannedStage, record: Option<&StageRecord>) -> Result<StageState> {
    let resumable = || {
        store::resumable_chunks(
            &plan.store,
            &s.name,
            &s.fingerprint,
            &s.kind.output_tables(),
        )
    };
    let Some(rec) = record else {
        if store::old_layout(&plan.workdir, &s.name) {
            return Ok(StageState::Stale(vec![format!(
                "committed in the old layout ({}/_stage.json): the next run moves it into the store, recomputing nothing that is current",
                s.name
            )]));
        }
        return Ok(StageState::Missing {
            resumable_chunks: resumable()?,
        });
    };
    if rec.fingerprint == s.fingerprint {
        let damaged = match plan.store.local {
            Some(_) => rec.damaged_parts(&rec.dir(&plan.workdir), true),
            None => rec.damaged_in_store(&plan.store)?,
        };
        if damaged.is_empty() {
            return Ok(StageState::Done);
        }
        let mut why = damaged;
        why.push(format!(
            "the stage will be rebuilt by the next run (or now: genecis run {} --only {} --force)",
            plan.manifest_path.display(),
            s.name
        ));
        return Ok(StageState::Stale(why));
    }
    Ok(StageState::Stale(explain(plan, s, rec)))
}

fn explain(plan: &Plan, s: &PlannedStage, rec: &StageRecord) -> Vec<String> {
    let mut why = Vec::new();
    if rec.kind != s.kind.kind() {
        why.push(format!("kind changed: {} -> {}", rec.kind, s.kind.kind()));
    } else if rec.kind_version != s.kind.code_version() {
        why.push(format!(
            "stage code changed: version {} -> {}",
            rec.kind_version,
            s.kind.code_version()
        ));
    }
    let empty = serde_json::Map::new();
    let old = rec.params.as_object().unwrap_or(&empty);
    let new = s.params.as_object().unwrap_or(&empty);
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        let (a, b) = (old.get(k), new.get(k));
        if a != b {
            let show = |v: Option<&serde_json::Value>| {
                v.map(|v| v.to_string())
                    .unwrap_or_else(|| "(absent)".into())
            };
            why.push(format!("param {k} changed: {} -> {}", show(a), show(b)));
        }
    }
    let now = s.input_stamps(plan);
    for inp in &now {
        match rec.inputs.iter().find(|r| r.name == inp.name) {
            None => why.push(format!("input '{}' was added", inp.name)),
            Some(r) if r.fingerprint != inp.fingerprint => why.push(format!(
                "input '{}' changed (stage '{}' has new content or settings)",
                inp.name, inp.stage
            )),
            _ => {}
        }
    }
    for r in &rec.inputs {
        if !now.iter().any(|i| i.name == r.name) {
            why.push(format!("input '{}' was removed", r.name));
        }
    }
    for f in &s.files {
        match rec.files.iter().find(|r| r.path == f.path) {
            None => why.push(format!("now reads file {}", f.path.display())),
            Some(r) if r != f => why.push(format!(
                "file {} changed (size {} -> {}, modified time differs: {})",
                f.path.display(),
                r.size,
                f.size,
                r.mtime_ns != f.mtime_ns
            )),
            _ => {}
        }
    }
    for r in &rec.files {
        if !s.files.iter().any(|f| f.path == r.path) {
            why.push(format!("no longer reads file {}", r.path.display()));
        }
    }
    if why.is_empty() {
        why.push("fingerprint differs (tool changes)".into());
    }
    why
}

/// What happened to one stage in a run.
#[derive(Debug, Clone)]
pub struct StageOutcome {
    pub stage: String,
    pub action: Action,
    pub record: Option<StageRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Skipped,
    Ran,
    /// A shard finished its chunks; other shards still have work.
    ShardDone,
    /// A rank other than 0 did its share of a distributed stage.
    Followed,
}

/// Which stages a run touches, validated against the plan once.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// Stages to consider, in plan order.
    selected: Vec<String>,
    /// Stages to rerun even when up to date.
    forced: Vec<String>,
    pub shard: Option<Shard>,
    pub progress: bool,
    /// Skip the data checks ([`check_plan`]) before running.
    pub skip_check: bool,
    /// Run in a non-empty folder that holds no genecis run.
    pub adopt_workdir: bool,
    /// This process's place in a data-parallel run.
    pub ranks: Option<RankHandle>,
}

impl RunRequest {
    /// `only`: run just this stage (its inputs must be done); `from`: rerun
    /// this stage and everything downstream; `force`: rerun the selected
    /// stages even when up to date.
    pub(crate) fn new(
        plan: &Plan,
        only: Option<&str>,
        from: Option<&str>,
        force: bool,
        shard: Option<Shard>,
    ) -> Result<RunRequest> {
        for (flag, v) in [("--only", only), ("--from", from)] {
            if let Some(name) = v {
                if plan.stage(name).is_none() {
                    let names: Vec<_> = plan.stages.iter().map(|s| s.name.as_str()).collect();
                    return Err(Error::Usage {
                        arg: format!("{flag} {name}"),
                        message: format!("no such stage; stages are: {}", names.join(", ")),
                    });
                }
            }
        }
        if only.is_some() && from.is_some() {
            return Err(Error::Usage {
                arg: "--only/--from".into(),
                message: "use one of them, not both".into(),
            });
        }
        let selected: Vec<String> = match only {
            Some(o) => vec![o.to_string()],
            None => plan.stages.iter().map(|s| s.name.clone()).collect(),
        };
        let forced = match (from, force) {
            (_, true) => selected.clone(),
            (Some(f), false) => plan.downstream_of(f),
            (None, false) => Vec::new(),
        };
        Ok(RunRequest {
            selected,
            forced,
            shard,
            progress: true,
            skip_check: false,
            adopt_workdir: false,
            ranks: None,
        })
    }
}

/// Before anything is written: the workdir is not a file system root, not
/// someone else's non-empty folder (unless adopted), and every folder the
/// selected stages would replace is genecis's.
fn check_workdir(plan: &Plan, req: &RunRequest) -> Result<()> {
    let w = &plan.workdir;
    if w.parent().is_none() {
        return Err(Error::NotOurs {
            path: w.clone(),
            why: "is a file system root, which genecis never uses as a workdir".into(),
        });
    }
    if w.exists() && !w.is_dir() {
        return Err(Error::NotOurs {
            path: w.clone(),
            why: "is a file, not a folder".into(),
        });
    }
    let non_empty = std::fs::read_dir(w).is_ok_and(|mut rd| rd.next().is_some());
    if non_empty && !store::holds_run(w) && !req.adopt_workdir {
        return Err(Error::NotOurs {
            path: w.clone(),
            why: "is a non-empty folder that holds no genecis run (pass --adopt-workdir to run in it anyway; genecis then writes only its stage folders and .work/)".into(),
        });
    }
    for name in &req.selected {
        store::ensure_ours(&store::stage_dir(w, name), &format!("stage '{name}'"))?;
        store::ensure_ours(
            &store::store_stage_dir(w, name),
            &format!("stage '{name}''s store"),
        )?;
    }
    Ok(())
}

pub fn run(plan: &Plan, req: &RunRequest) -> Result<Vec<StageOutcome>> {
    let (selected, forced) = (&req.selected, &req.forced);
    let ranks = req.ranks.as_ref().map(|h| h.0.as_ref());
    if let Some(r) = ranks {
        check_world(plan, req, r.world())?;
        if r.rank() > 0 {
            return follow(plan, req, r);
        }
    }
    // Data checks of the stages that will run, before anything is written.
    if !req.skip_check {
        let mut to_run = Vec::new();
        for s in &plan.stages {
            if selected.contains(&s.name)
                && (forced.contains(&s.name) || stage_state(plan, s)? != StageState::Done)
            {
                to_run.push(s.name.clone());
            }
        }
        let findings = check_plan(plan, Some(&to_run));
        let mut problems = Vec::new();
        for (stage, f) in &findings {
            let line = format!("stage '{stage}', field '{}': {}", f.field, f.message);
            match f.severity {
                Severity::Error => problems.push(line),
                Severity::Warning => eprintln!("warning: {line}"),
            }
        }
        if !problems.is_empty() {
            return Err(Error::CheckFailed { problems });
        }
    }

    check_workdir(plan, req)?;
    let _lock = WorkdirLock::acquire(&plan.workdir, req.shard)?;
    for name in selected {
        store::migrate_old_layout(&plan.store, &plan.workdir, name)?;
    }
    let progress = Progress::new(req.progress);
    let mut outcomes = Vec::new();
    for s in &plan.stages {
        if !selected.contains(&s.name) {
            continue;
        }
        let (state, head) = assess(plan, s)?;
        if state == StageState::Done && !forced.contains(&s.name) {
            if let Some(r) = ranks.filter(|_| s.kind.distributed()) {
                ranks::post(r, &s.name, Signal::Skip)?;
            }
            // A run killed between its commit and its view left the view behind.
            if let Some(rec) = head.as_ref().filter(|_| plan.store.local.is_some()) {
                store::point_view(&plan.workdir, rec);
            }
            println!("= {} ({}): up to date", s.name, s.kind.kind());
            outcomes.push(StageOutcome {
                stage: s.name.clone(),
                action: Action::Skipped,
                record: None,
            });
            continue;
        }
        // Inputs must be committed and current.
        for b in &s.inputs {
            let up = plan.stage(&b.stage).ok_or_else(|| {
                Error::Internal(format!("input stage '{}' is not in the plan", b.stage))
            })?;
            let up_state = stage_state(plan, up)?;
            if up_state != StageState::Done {
                return Err(Error::NotReady {
                    stage: s.name.clone(),
                    reason: format!(
                        "its input stage '{}' is {}; run it first (drop --only, or run --only {})",
                        up.name,
                        up_state.label(),
                        up.name
                    ),
                });
            }
        }
        if req.shard.is_some() && !s.kind.shardable() {
            return Err(Error::NotReady {
                stage: s.name.clone(),
                reason: format!(
                    "kind '{}' is not shardable and the stage is not done; run it without --shard first",
                    s.kind.kind()
                ),
            });
        }
        // A forced run, or a rebuild of damaged parts, starts from scratch:
        // the fingerprint's folder holds the committed parts themselves.
        let damaged = matches!(state, StageState::Stale(_))
            && head.is_some_and(|h| h.fingerprint == s.fingerprint);
        if damaged && req.shard.is_some() {
            return Err(Error::NotReady {
                stage: s.name.clone(),
                reason: format!(
                    "its committed parts are damaged (genecis status says which); rebuild it without --shard: genecis run {} --only {} --force",
                    plan.manifest_path.display(),
                    s.name
                ),
            });
        }
        let fresh = (forced.contains(&s.name) || damaged) && req.shard.is_none();
        let outcome =
            run_stage(plan, s, req.shard, fresh, &progress, ranks).map_err(|e| match e {
                e @ Error::StageFailed { .. } => e,
                other => Error::StageFailed {
                    stage: s.name.clone(),
                    kind: s.kind.kind().into(),
                    source: Box::new(other),
                },
            })?;
        outcomes.push(outcome);
    }
    if let Some(r) = ranks {
        ranks::await_all(r)?;
    }
    Ok(outcomes)
}

/// The params of the selected distributed stages fit `world` ranks.
pub fn check_world(plan: &Plan, req: &RunRequest, world: usize) -> Result<()> {
    let problems: Vec<String> = plan
        .stages
        .iter()
        .filter(|s| req.selected.contains(&s.name) && s.kind.distributed())
        .flat_map(|s| {
            s.bound.validate_world(world).into_iter().map(move |f| {
                format!(
                    "stage '{}', field 'params.{}': {}",
                    s.name, f.field, f.message
                )
            })
        })
        .collect();
    match problems.is_empty() {
        true => Ok(()),
        false => Err(Error::CheckFailed { problems }),
    }
}

/// A rank other than 0: joins each selected distributed stage when rank 0
/// has planned it; writes nothing.
fn follow(plan: &Plan, req: &RunRequest, r: &dyn Ranks) -> Result<Vec<StageOutcome>> {
    let mut outcomes = Vec::new();
    for s in &plan.stages {
        if !req.selected.contains(&s.name) || !s.kind.distributed() {
            continue;
        }
        let action = match ranks::await_signal(r, &s.name)? {
            Signal::Skip => Action::Skipped,
            Signal::Go => {
                let started = Instant::now();
                let inputs = s.input_dirs(plan);
                let work = store::version_dir(&plan.workdir, &s.name, &s.fingerprint);
                let ctx = context(plan, s, &inputs, work, Some(r));
                s.bound.follow(&ctx).map_err(|e| Error::StageFailed {
                    stage: s.name.clone(),
                    kind: s.kind.kind().into(),
                    source: Box::new(e),
                })?;
                println!(
                    "+ {} ({}): rank {} of {} did its share in {:.2} s",
                    s.name,
                    s.kind.kind(),
                    r.rank(),
                    r.world(),
                    started.elapsed().as_secs_f64()
                );
                Action::Followed
            }
        };
        outcomes.push(StageOutcome {
            stage: s.name.clone(),
            action,
            record: None,
        });
    }
    ranks::leave(r)?;
    Ok(outcomes)
}

/// What stage `s` may use, working in `work_dir`.
fn context<'a>(
    plan: &'a Plan,
    s: &'a PlannedStage,
    inputs: &'a std::collections::BTreeMap<String, std::path::PathBuf>,
    work_dir: std::path::PathBuf,
    ranks: Option<&'a dyn Ranks>,
) -> StageContext<'a> {
    StageContext {
        stage: &s.name,
        base_dir: &plan.base_dir,
        inputs,
        input_files: &s.input_files,
        manifest: &plan.manifest_path,
        committed_dir: store::stage_dir(&plan.workdir, &s.name),
        work_dir,
        input_records: {
            let mut names: Vec<&str> = s.inputs.iter().map(|b| b.stage.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names
                .into_iter()
                .filter_map(|n| StageRecord::head(&plan.store, n).ok().flatten())
                .collect()
        },
        notes: Default::default(),
        ranks,
    }
}

fn run_stage(
    plan: &Plan,
    s: &PlannedStage,
    shard: Option<Shard>,
    fresh: bool,
    progress: &Progress,
    ranks: Option<&dyn Ranks>,
) -> Result<StageOutcome> {
    let started = Instant::now();
    let run = &plan.store;
    // The log as this run found it: a newer version of another plan at
    // commit time means two plans wrote the stage at once.
    let base = commit::block_on(run.versions(&s.name))?
        .last()
        .copied()
        .unwrap_or(0);
    let mut writer = StageWriter::open(
        run,
        &plan.workdir,
        &s.name,
        &s.fingerprint,
        fresh,
        shard.is_none(),
    )?;
    let inputs = s.input_dirs(plan);
    if run.local.is_none() {
        for b in &s.inputs {
            let fp = plan
                .stage(&b.stage)
                .map(|u| u.fingerprint.as_str())
                .unwrap_or_default();
            run.sync_down(
                &commit::version_key(&b.stage, fp),
                &store::version_dir(&plan.workdir, &b.stage, fp),
            )?;
        }
    }
    let ctx = context(plan, s, &inputs, writer.dir().to_path_buf(), ranks);
    let driven = s.bound.run(
        &ctx,
        Driver {
            shard,
            progress,
            writer: &mut writer,
        },
    )?;
    let elapsed = started.elapsed();
    if shard.is_none() && driven.chunks_missing > 0 {
        return Err(Error::Internal(format!(
            "{} of {} chunks are unwritten, yet the stage reported no error",
            driven.chunks_missing, driven.chunks
        )));
    }
    let mine = shard.unwrap_or(Shard { index: 0, count: 1 });
    writer.push_side_files()?;
    commit::block_on(run.record_shard(&s.name, &writer.shard_record(mine, driven.chunks)?))?;

    let record = StageRecord {
        stage: s.name.clone(),
        version: 0,
        kind: s.kind.kind().into(),
        kind_version: s.kind.code_version(),
        fingerprint: s.fingerprint.clone(),
        params: s.params.clone(),
        inputs: s.input_stamps(plan),
        files: s.files.clone(),
        tables: Default::default(),
        chunks: driven.chunks,
        chunks_resumed: driven.chunks_resumed,
        rows_in: driven.units,
        seconds: elapsed.as_secs_f64(),
        finished_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        tool_version: format!("genecis {}", env!("CARGO_PKG_VERSION")),
        notes: driven.notes,
    };
    let shard_done = |line: String| {
        println!("{line}");
        Ok(StageOutcome {
            stage: s.name.clone(),
            action: Action::ShardDone,
            record: None,
        })
    };
    let label = format!("{} ({})", s.name, s.kind.kind());
    match commit::block_on(run.commit(&s.name, mine.count, base, record))? {
        Outcome::Waiting { missing } => shard_done(format!(
            "~ {label}: shard {mine} done in {:.2} s; shard(s) {} of {} have not finished",
            elapsed.as_secs_f64(),
            missing
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            mine.count
        )),
        Outcome::ByAnother(rec) => {
            store::point_view(&plan.workdir, &rec);
            shard_done(format!(
                "= {label}: shard {mine} done; the stage was committed by another shard (version {})",
                rec.version
            ))
        }
        Outcome::Committed(rec) => {
            store::point_view(&plan.workdir, &rec);
            if let Err(e) = commit::block_on(run.drop_superseded(&s.name, &rec)) {
                eprintln!(
                    "note: could not remove stage '{}''s older versions: {}",
                    s.name,
                    crate::error::report(&e)
                );
            }
            print_summary(s, &rec);
            Ok(StageOutcome {
                stage: s.name.clone(),
                action: Action::Ran,
                record: Some(rec),
            })
        }
    }
}

fn print_summary(s: &PlannedStage, r: &StageRecord) {
    let secs = r.seconds.max(1e-9);
    let tables: Vec<String> = r
        .tables
        .iter()
        .map(|(n, t)| format!("{n} {}", thousands(t.rows)))
        .collect();
    let resumed = if r.chunks_resumed > 0 {
        format!(", resumed {} of {} chunks", r.chunks_resumed, r.chunks)
    } else {
        String::new()
    };
    println!(
        "+ {} ({}): {} rows in {:.2} s, {} rows/s -> {}{resumed}",
        s.name,
        s.kind.kind(),
        thousands(r.rows_in),
        r.seconds,
        thousands((r.rows_in as f64 / secs) as u64),
        tables.join(", ")
    );
    for n in &r.notes {
        println!("    {n}");
    }
}

/// The data checks ([`crate::framework::stage::Stage::check`]) of the named stages (all
/// when `None`), in manifest order.
pub(crate) fn check_plan(plan: &Plan, stages: Option<&[String]>) -> Vec<(String, Finding)> {
    plan.stages
        .iter()
        .filter(|s| stages.is_none_or(|names| names.contains(&s.name)))
        .flat_map(|s| {
            s.bound
                .check(&plan.base_dir)
                .into_iter()
                .map(|f| (s.name.clone(), f))
        })
        .collect()
}

/// One line per stage for `genecis status`.
pub(crate) fn status_lines(plan: &Plan) -> Result<Vec<(String, StageState)>> {
    plan.stages
        .iter()
        .map(|s| Ok((s.name.clone(), stage_state(plan, s)?)))
        .collect()
}

/// `genecis status`: each stage done, missing, or stale with the reasons.
pub fn status_text(plan: &Plan) -> Result<String> {
    let mut out = format!("pipeline {} ({})\n", plan.name, plan.workdir.display());
    for (name, state) in status_lines(plan)? {
        match state {
            StageState::Done => out.push_str(&format!("  {name:<20} done\n")),
            StageState::Missing {
                resumable_chunks: 0,
            } => out.push_str(&format!("  {name:<20} missing\n")),
            StageState::Missing {
                resumable_chunks: k,
            } => out.push_str(&format!(
                "  {name:<20} missing ({k} chunk(s) of an interrupted run will be kept)\n"
            )),
            StageState::Stale(why) => {
                out.push_str(&format!("  {name:<20} stale\n"));
                for w in why {
                    out.push_str(&format!("  {:<20}   - {w}\n", ""));
                }
            }
        }
    }
    Ok(out)
}

/// `genecis check`: the report, and the number of errors in it.
pub fn check_text(plan: &Plan) -> (String, usize) {
    let mut out = format!(
        "checking pipeline {} ({} stages)\n",
        plan.name,
        plan.stages.len()
    );
    let findings = check_plan(plan, None);
    let mut errors = 0;
    for s in &plan.stages {
        let mine: Vec<_> = findings.iter().filter(|(n, _)| *n == s.name).collect();
        if mine.is_empty() {
            out.push_str(&format!("  ok    {} ({})\n", s.name, s.kind.kind()));
        }
        for (_, f) in mine {
            let tag = match f.severity {
                Severity::Error => {
                    errors += 1;
                    "ERROR"
                }
                Severity::Warning => "warn ",
            };
            out.push_str(&format!(
                "  {tag} {} ({}) {}: {}\n",
                s.name,
                s.kind.kind(),
                f.field,
                f.message
            ));
        }
    }
    if errors == 0 {
        out.push_str("all checks passed\n");
    }
    (out, errors)
}
