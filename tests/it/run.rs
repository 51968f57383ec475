//! Running manifests: skipping, staleness, overrides, resume after kill -9,
//! the workdir lock, --only/--from and sharding.

use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn second_run_skips_and_param_change_is_explained_and_rerun() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("data.tsv"), 500);
    let m = ingest_manifest(dir.path(), "data.tsv", ", chunk_rows = 100");
    let m = m.to_str().unwrap();

    let st = genecis(&["status", m]);
    assert!(
        st.ok().stdout.contains("captions             missing"),
        "{}",
        st.stdout
    );
    let r = genecis(&["run", m]);
    assert!(
        r.ok().stdout.contains("+ captions (ingest): 500 rows"),
        "{}",
        r.stdout
    );
    let r = genecis(&["run", m]);
    assert!(
        r.ok().stdout.contains("= captions (ingest): up to date"),
        "{}",
        r.stdout
    );
    assert!(genecis(&["status", m])
        .stdout
        .contains("captions             done"));

    // An override changes the fingerprint like an edit would.
    let st = genecis(&["status", m, "--set", "captions.chunk_rows=50"]);
    assert!(st.ok().stdout.contains("stale"), "{}", st.stdout);
    assert!(
        st.stdout.contains("param chunk_rows changed: 100 -> 50"),
        "{}",
        st.stdout
    );
    let r = genecis(&["run", m, "--set", "captions.chunk_rows=50"]);
    assert!(r.ok().stdout.contains("+ captions"), "{}", r.stdout);
    assert_eq!(parts(&dir.path().join("run/captions/captions")).len(), 10);
    // Back to the manifest's value: stale again, and says so.
    assert!(genecis(&["status", m])
        .stdout
        .contains("param chunk_rows changed: 50 -> 100"));

    // A changed input file is named too.
    synthetic_tsv(&dir.path().join("data.tsv"), 501);
    let st = genecis(&["status", m, "--set", "captions.chunk_rows=50"]);
    assert!(
        st.stdout.contains("data.tsv changed (size"),
        "{}",
        st.stdout
    );
}

#[test]
fn force_and_from_rerun_downstream() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("data.tsv"), 50);
    let data = "path = \"data.tsv\"";
    let m = Manifest::new("t")
        .stage("b", "ingest", &["a"], data)
        .stage("a", "ingest", &[], data)
        .stage("c", "ingest", &[], data)
        .write(dir.path());
    let m = m.to_str().unwrap();
    // Dependency order: a before b although b is written first.
    let r = genecis(&["run", m]);
    let out = &r.ok().stdout;
    assert!(
        out.find("+ a (").unwrap() < out.find("+ b (").unwrap(),
        "{out}"
    );

    let r = genecis(&["run", m, "--from", "a"]);
    assert!(
        r.ok().stdout.contains("+ a (") && r.stdout.contains("+ b ("),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("= c (ingest): up to date"),
        "{}",
        r.stdout
    );

    let r = genecis(&["run", m, "--only", "c", "--force"]);
    assert!(
        r.ok().stdout.contains("+ c (") && !r.stdout.contains(" a ("),
        "{}",
        r.stdout
    );

    // --only on a stage whose input is not done is refused.
    drop_stage(&dir.path().join("run"), "a");
    let r = genecis(&["run", m, "--only", "b", "--force"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("input stage 'a' is missing"),
        "{}",
        r.stderr
    );
    // And b is stale because its input changed under it.
    let st = genecis(&["status", m]);
    assert!(
        st.stdout.contains("a                    missing"),
        "{}",
        st.stdout
    );
}

#[test]
fn kill_minus_9_then_rerun_gives_the_same_table() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("data.tsv"), 300_000);
    let m = ingest_manifest(dir.path(), "data.tsv", ", chunk_rows = 1000");
    let run = dir.path().join("run");

    let mut killed_midway = false;
    for _attempt in 0..3 {
        let mut child = bin()
            .args(["run", m.to_str().unwrap(), "-q"])
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        loop {
            let n = work_folders(&run, "captions")
                .first()
                .and_then(|f| std::fs::read_dir(f.join("captions")).ok())
                .map(|d| d.count())
                .unwrap_or(0);
            if n >= 5 || t0.elapsed() > Duration::from_secs(120) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if head_record(&run, "captions").is_none() {
            killed_midway = true;
            break;
        }
        std::fs::remove_dir_all(dir.path().join("run")).unwrap();
    }
    assert!(
        killed_midway,
        "could not interrupt the ingest before it finished"
    );

    let st = genecis(&["status", m.to_str().unwrap()]);
    assert!(
        st.ok()
            .stdout
            .contains("chunk(s) of an interrupted run will be kept"),
        "{}",
        st.stdout
    );
    let r = genecis(&["run", m.to_str().unwrap(), "-q"]);
    assert!(r.ok().stdout.contains("resumed"), "{}", r.stdout);

    // An uninterrupted run elsewhere: the part files are byte-identical.
    let clean = dir.path().join("clean");
    let r = genecis(&[
        "run",
        m.to_str().unwrap(),
        "-q",
        "--workdir",
        clean.to_str().unwrap(),
    ]);
    r.ok();
    for table in ["captions", "rejects"] {
        let a = parts(&dir.path().join("run/captions").join(table));
        let b = parts(&clean.join("captions").join(table));
        assert_eq!(a.len(), 300);
        assert!(a == b, "table {table} differs after resume");
    }
    let n = sql_csv(
        &dir.path().join("run"),
        "SELECT count(*) AS n, count(DISTINCT image_id) AS d FROM captions",
    );
    assert_eq!(n[1], "300000,300000");
}

#[test]
fn a_second_run_on_the_same_workdir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("data.tsv"), 10);
    let m = ingest_manifest(dir.path(), "data.tsv", "");
    let workdir = dir.path().join("run");
    let _held = genecis::framework::store::WorkdirLock::acquire(&workdir, None).unwrap();
    let r = genecis(&["run", m.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("is in use by another genecis run"),
        "{}",
        r.stderr
    );
    assert!(!workdir.join("captions").exists());
    // Shards may not run beside a whole run either.
    let r = genecis(&["run", m.to_str().unwrap(), "--shard", "0/2"]);
    assert!(r.stderr.contains("in use"), "{}", r.stderr);
}

#[test]
fn shards_union_equals_the_unsharded_table() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("data.tsv"), 2_000);
    let m = ingest_manifest(dir.path(), "data.tsv", ", chunk_rows = 150");
    let m = m.to_str().unwrap();
    let r0 = genecis(&["run", m, "--shard", "0/3"]);
    assert!(
        r0.ok().stdout.contains("have not finished"),
        "{}",
        r0.stdout
    );
    assert!(genecis(&["status", m]).stdout.contains("missing"));
    genecis(&["run", m, "--shard", "2/3"]).ok();
    let r1 = genecis(&["run", m, "--shard", "1/3"]);
    assert!(
        r1.ok().stdout.contains("+ captions"),
        "the last shard commits: {}",
        r1.stdout
    );
    assert!(genecis(&["status", m]).stdout.contains("done"));

    let whole = dir.path().join("whole");
    genecis(&["run", m, "--workdir", whole.to_str().unwrap()]).ok();
    for table in ["captions", "rejects"] {
        assert!(
            parts(&dir.path().join("run/captions").join(table))
                == parts(&whole.join("captions").join(table)),
            "{table}: shards differ from the unsharded run"
        );
    }
}

/// Six processes race on one stage in one local workdir: in even trials
/// its four shards (shards 1 and 3 run twice), in odd trials six copies of
/// shard 0/1 (every process writes every part and reaches the commit at
/// about the same time). In every trial two are killed with SIGKILL at a
/// random moment and rerun. Each trial ends with one log version that
/// exactly one process committed (the others waited for shards, or lost
/// the race for the version and re-read it), every part intact (`status`
/// reads them all), and tables byte-identical to an unsharded run.
#[test]
fn racing_shard_processes_commit_once_and_match_the_unsharded_run() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("data.tsv"), 20_000);
    let m = ingest_manifest(dir.path(), "data.tsv", ", chunk_rows = 500");
    let m = m.to_str().unwrap();
    let whole = dir.path().join("whole");
    genecis(&["run", m, "-q", "--workdir", whole.to_str().unwrap()]).ok();
    let (mut kills, mut reread, trials) = (0, 0, 6u64);
    for trial in 0..trials {
        let shards = match trial % 2 {
            0 => ["0/4", "1/4", "2/4", "3/4", "1/4", "3/4"],
            _ => ["0/1"; 6],
        };
        let run = dir.path().join(format!("race{trial}"));
        let start = |shard: &str| {
            bin()
                .args([
                    "run",
                    m,
                    "-q",
                    "--workdir",
                    run.to_str().unwrap(),
                    "--shard",
                    shard,
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut children: Vec<_> = shards.iter().map(|s| start(s)).collect();
        // Two victims and a kill time, from the trial number.
        let h = |k: u64| (trial * 0x9E37_79B9 + k * 0x85EB_CA6B).wrapping_mul(0xC2B2_AE35) >> 7;
        let victims = [
            h(1) as usize % 6,
            (h(1) as usize % 6 + 1 + h(2) as usize % 5) % 6,
        ];
        std::thread::sleep(Duration::from_millis(150 + h(3) % 600));
        let mut outs = Vec::new();
        for &v in &victims {
            if children[v].try_wait().unwrap().is_none() {
                children[v].kill().unwrap(); // SIGKILL
                kills += 1;
            }
        }
        for c in children {
            let o: Res = c.wait_with_output().unwrap().into();
            outs.push(o.stdout);
        }
        for &v in &victims {
            let o: Res = start(shards[v]).wait_with_output().unwrap().into();
            outs.push(o.ok().stdout.clone());
        }
        let all = outs.join("");
        let committed = all.matches("+ captions (").count();
        assert_eq!(committed, 1, "trial {trial}: one commit\n{all}");
        let log = std::fs::read_dir(store_of(&run, "captions").join("_log"))
            .unwrap()
            .count();
        assert_eq!(log, 1, "trial {trial}: one log version");
        let st = genecis(&["status", m, "--workdir", run.to_str().unwrap()]);
        assert!(
            st.ok().stdout.contains("captions             done"),
            "{}",
            st.stdout
        );
        for table in ["captions", "rejects"] {
            assert!(
                parts(&run.join("captions").join(table))
                    == parts(&whole.join("captions").join(table)),
                "trial {trial}: {table} differs from the unsharded run"
            );
        }
        let lost = all.matches("committed by another shard").count();
        reread += lost;
        println!(
            "trial {trial}: shards {:?}, victims {victims:?}, {lost} lost the commit and re-read it, {} waited for shards, {} found it done",
            shards[0],
            all.matches("have not finished").count(),
            all.matches("): up to date").count()
        );
    }
    println!(
        "{trials} trials, {kills} processes killed mid-run, {reread} lost the race for the version; every table byte-identical"
    );
    assert!(reread > 0, "no process lost the race for the commit");
}

/// A workdir of the old layout (`<stage>/_stage.json` beside the tables):
/// the next run moves it into the store without recomputing it.
#[test]
fn an_old_layout_workdir_is_moved_into_the_store() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("data.tsv"), 500);
    let m = ingest_manifest(dir.path(), "data.tsv", ", chunk_rows = 100");
    let m = m.to_str().unwrap();
    let run = dir.path().join("run");
    genecis(&["run", m, "-q"]).ok();
    let before = parts(&run.join("captions/captions"));
    // Rebuild the old layout from the new one.
    let mut rec = head_record(&run, "captions").unwrap();
    let folder = work_folders(&run, "captions").pop().unwrap();
    std::fs::remove_file(run.join("captions")).unwrap();
    std::fs::rename(&folder, run.join("captions")).unwrap();
    std::fs::remove_dir_all(run.join("captions/_shards")).unwrap();
    rec["version"] = 0.into();
    write(&run.join("captions/_stage.json"), rec.to_string());
    std::fs::remove_dir_all(run.join(".genecis")).unwrap();

    let st = genecis(&["status", m]);
    assert!(
        st.ok().stdout.contains("next run moves it into the store"),
        "{}",
        st.stdout
    );
    let r = genecis(&["run", m]);
    assert!(
        r.ok().stdout.contains("captions (ingest): up to date"),
        "{}",
        r.stdout
    );
    assert!(head_record(&run, "captions").is_some());
    assert!(!run.join("captions/_stage.json").exists());
    assert!(parts(&run.join("captions/captions")) == before);
}

/// `--shard auto` in a SLURM job array (`--array=1-3`): each task's shard
/// from its SLURM variables, the same table as explicit shards; outside an
/// array, a usage error naming the variable.
#[test]
fn shard_auto_takes_the_slurm_array_task() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("data.tsv"), 600);
    let m = ingest_manifest(dir.path(), "data.tsv", ", chunk_rows = 100");
    let m = m.to_str().unwrap();
    for id in ["3", "1", "2"] {
        let r: Res = bin()
            .args(["run", m, "--shard", "auto", "-q"])
            .env("SLURM_ARRAY_TASK_ID", id)
            .env("SLURM_ARRAY_TASK_COUNT", "3")
            .env("SLURM_ARRAY_TASK_MIN", "1")
            .output()
            .unwrap()
            .into();
        r.ok();
    }
    assert!(genecis(&["status", m]).stdout.contains("done"));
    let whole = dir.path().join("whole");
    genecis(&["run", m, "--workdir", whole.to_str().unwrap(), "-q"]).ok();
    assert!(
        parts(&dir.path().join("run/captions/captions")) == parts(&whole.join("captions/captions")),
        "auto shards differ from the unsharded run"
    );
    let r: Res = bin()
        .args(["run", m, "--shard", "auto"])
        .env_remove("SLURM_ARRAY_TASK_ID")
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("SLURM_ARRAY_TASK_ID"), "{}", r.stderr);
}

#[test]
fn doctor_loads_libtorch_through_the_rpath() {
    // No LD_LIBRARY_PATH: the binary must find libtorch by itself.
    let out: Res = bin()
        .arg("doctor")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap()
        .into();
    assert!(
        out.ok().stdout.contains("CPU check 1+4+9 = 14"),
        "{}",
        out.stdout
    );
}

/// A committed part file that was truncated afterwards: `status` notices
/// the size, `sql` names the file once with the fix, and the rerun the
/// message names rebuilds it.
#[test]
fn a_damaged_part_is_named_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("data.tsv"), 100);
    let m = ingest_manifest(dir.path(), "data.tsv", ", chunk_rows = 40");
    let m = m.to_str().unwrap();
    genecis(&["run", m]).ok();
    let part = dir.path().join("run/captions/captions/part-00001.parquet");
    let good = std::fs::read(&part).unwrap();
    std::fs::write(&part, &good[..5]).unwrap();

    let st = genecis(&["status", m]);
    assert!(
        st.ok().stdout.contains("captions             stale"),
        "{}",
        st.stdout
    );
    assert!(
        st.stdout.contains("part-00001.parquet has 5 bytes")
            && st.stdout.contains("--only captions --force"),
        "{}",
        st.stdout
    );
    let r = genecis(&["sql", m, "SELECT count(*) FROM captions"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("part-00001.parquet")
            && r.stderr.contains("stage 'captions' is damaged")
            && r.stderr
                .contains("genecis run MANIFEST --only captions --force"),
        "{}",
        r.stderr
    );
    // Named once, not once per layer of the query engine.
    assert_eq!(
        r.stderr.matches("part-00001.parquet").count(),
        1,
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("Parquet error"), "{}", r.stderr);
    let r = genecis(&["run", m]);
    assert!(r.ok().stdout.contains("+ captions"), "{}", r.stdout);
    assert_eq!(std::fs::read(&part).unwrap(), good);
}

/// A stage's failure names the stage as the manifest does, and its cause.
#[test]
fn failures_name_the_stage_as_the_manifest_does() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("p.jsonl"), "{\"row\": 0}\n");
    let m = Manifest::new("t")
        .stage("parses", "import-parses", &[], "path = \"p.jsonl\"")
        .stage(
            "triplets",
            "mine",
            &["parses.relations"],
            "concreteness_threshold = \"none\"",
        )
        .write(dir.path());
    let r = genecis(&["run", m.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("stage 'triplets' (mine) failed: the relations table is empty"),
        "{}",
        r.stderr
    );
}

#[test]
fn bad_shard_and_stage_names_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("data.tsv"), 10);
    let m = ingest_manifest(dir.path(), "data.tsv", "");
    let m = m.to_str().unwrap();
    for shard in ["3/3", "x", "1/0"] {
        let r = genecis(&["run", m, "--shard", shard]);
        assert_eq!(r.code, 2, "{shard}");
        assert!(r.stderr.contains("expected I/N"), "{}", r.stderr);
    }
    let r = genecis(&["run", m, "--only", "nope"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("no such stage; stages are: captions"),
        "{}",
        r.stderr
    );
    let r = genecis(&["run", m, "--only", "captions", "--from", "captions"]);
    assert_eq!(r.code, 2);
    assert!(!dir.path().join("run").exists());
}
