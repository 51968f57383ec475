//! Hostile and damaged input: each class gets a clear error (exit code and
//! a message naming the file or field), nothing outside the run changes
//! (a canary file), and the bombs stay under a stated memory bound,
//! measured as the child process's own peak RSS.

use std::path::{Path, PathBuf};

use crate::common::{
    genecis, head_record, ingest_manifest, python, store_of, synthetic_tsv, write, Res,
};
use crate::eval::{jpeg, manifest as eval_manifest, small_world};

/// Peak RSS a refused bomb may reach: what libtorch, DataFusion and the
/// binary take to start and check a tiny pipeline is 550 to 610 MiB here;
/// the bombs below would take 10 to 13 GB if decoded.
const BOMB_RSS_MIB: f64 = 1024.0;

/// A wrapper whose own footprint is small (a bare Python, ~10 MiB): it
/// forks, execs the command and reports the child's `ru_maxrss` from
/// `wait4`. Measuring from the test process itself would not do: on Linux
/// a child's `ru_maxrss` keeps the high-water mark its memory had before
/// `exec`, i.e. the forking process's own (the test binary's, over 1 GiB
/// late in a full run).
const PEAK_RSS_WRAPPER: &str = "import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], 'w').write(str(usage.ru_maxrss))
if os.WIFSIGNALED(status):
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
";

/// Runs the binary and returns its result with its own peak RSS (MiB),
/// measured by [`PEAK_RSS_WRAPPER`].
fn measured(args: &[&str]) -> (Res, f64) {
    let dir = tempfile::tempdir().unwrap();
    let (out, err, peak) = (
        dir.path().join("out"),
        dir.path().join("err"),
        dir.path().join("peak"),
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = std::process::Command::new(root.join(".venv/bin/python"))
        .arg("-c")
        .arg(PEAK_RSS_WRAPPER)
        .arg(&peak)
        .arg(env!("CARGO_BIN_EXE_genecis"))
        .args(args)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    let res = Res {
        code: status.code().unwrap_or(-1),
        signal: std::os::unix::process::ExitStatusExt::signal(&status),
        stdout: std::fs::read_to_string(out).unwrap(),
        stderr: std::fs::read_to_string(err).unwrap(),
    };
    let kib: f64 = std::fs::read_to_string(&peak)
        .unwrap_or_else(|e| panic!("the wrapper wrote no peak ({e}): {}", res.stderr))
        .trim()
        .parse()
        .unwrap();
    (res, kib / 1024.0)
}

/// The bound measures the child alone: with 2 GiB touched in this
/// process, `genecis --version` still peaks far below it (measured from
/// here with `wait4`, it would report at least 2 GiB).
#[test]
fn the_memory_bound_measures_the_child_alone() {
    let ballast = vec![1u8; 2048 << 20];
    let (r, rss) = measured(&["--version"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    eprintln!("genecis --version beside 2 GiB of ballast: peak RSS {rss:.0} MiB");
    assert!(
        rss < BOMB_RSS_MIB,
        "peak RSS {rss:.0} MiB: the parent's memory was counted"
    );
    assert_eq!(
        ballast.iter().map(|&x| x as usize).sum::<usize>(),
        2048 << 20
    );
}

/// A file outside every run, which no command may touch.
fn canary(dir: &Path) -> (PathBuf, Vec<u8>) {
    let p = dir.join("canary.txt");
    let bytes = b"the user's own data\n".to_vec();
    write(&p, &bytes);
    (p, bytes)
}

fn assert_untouched((p, bytes): &(PathBuf, Vec<u8>)) {
    assert_eq!(&std::fs::read(p).unwrap(), bytes, "{} changed", p.display());
}

#[test]
fn a_users_folder_named_like_a_stage_is_refused_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("c.tsv"), 20);
    let m = ingest_manifest(dir.path(), "c.tsv", "");
    let run = dir.path().join("run");
    // The user's folder where stage `captions` would commit, inside a run.
    genecis(&["run", m.to_str().unwrap(), "-q"]).ok();
    std::fs::remove_dir_all(run.join("captions")).unwrap();
    let own = canary(&run.join("captions"));
    let r = genecis(&["run", m.to_str().unwrap(), "-q", "--force"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&run.join("captions").display().to_string())
            && r.stderr.contains("not made by genecis"),
        "{}",
        r.stderr
    );
    assert_untouched(&own);
    // The same for the stage's folder in the run's store.
    std::fs::remove_dir_all(run.join("captions")).unwrap();
    std::fs::remove_dir_all(store_of(&run, "captions")).unwrap();
    let own_work = canary(&store_of(&run, "captions"));
    let r = genecis(&["run", m.to_str().unwrap(), "-q"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_untouched(&own_work);
}

#[test]
fn root_and_foreign_workdirs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("c.tsv"), 20);
    let m = ingest_manifest(dir.path(), "c.tsv", "");
    let r = genecis(&["run", m.to_str().unwrap(), "-q", "--workdir", "/"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("file system root"), "{}", r.stderr);
    assert!(!Path::new("/captions").exists() && !Path::new("/.work").exists());

    // A folder of the user's, not empty, holding no run.
    let theirs = dir.path().join("theirs");
    let c = canary(&theirs);
    let w = theirs.to_str().unwrap();
    let r = genecis(&["run", m.to_str().unwrap(), "-q", "--workdir", w]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--adopt-workdir"), "{}", r.stderr);
    assert_eq!(
        std::fs::read_dir(&theirs).unwrap().count(),
        1,
        "nothing written"
    );
    // Said explicitly, it runs there and leaves the user's file alone.
    genecis(&[
        "run",
        m.to_str().unwrap(),
        "-q",
        "--workdir",
        w,
        "--adopt-workdir",
    ])
    .ok();
    assert!(head_record(&theirs, "captions").is_some());
    assert_untouched(&c);
}

#[test]
fn sql_cannot_write_into_a_run_or_anywhere_else() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("c.tsv"), 20);
    let m = ingest_manifest(dir.path(), "c.tsv", "");
    genecis(&["run", m.to_str().unwrap(), "-q"]).ok();
    let run = dir.path().join("run");
    let parts = || {
        std::fs::read_dir(run.join("captions/captions"))
            .unwrap()
            .count()
    };
    let before = parts();
    let target = run.to_str().unwrap();
    let insert = "INSERT INTO captions.captions SELECT * FROM captions.captions";
    let r = genecis(&["sql", target, insert]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("read-only") && r.stderr.contains("--out"),
        "{}",
        r.stderr
    );
    assert_eq!(parts(), before, "no part was added");
    let elsewhere = dir.path().join("copied.csv");
    let copy = format!(
        "COPY (SELECT * FROM captions.captions) TO '{}'",
        elsewhere.display()
    );
    let r = genecis(&["sql", target, &copy]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(!elsewhere.exists());
    // The run still answers in full.
    let r = genecis(&[
        "sql",
        target,
        "SELECT count(*) AS n FROM captions",
        "--format",
        "csv",
    ]);
    r.ok();
    assert_eq!(r.stdout.lines().nth(1), Some("20"));
}

#[test]
fn stage_names_that_break_sql_or_folders_are_manifest_errors() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("c.tsv"), 5);
    for name in ["information_schema", "public", &"x".repeat(300)] {
        let m = crate::common::Manifest::new("t")
            .stage(name, "ingest", &[], "path = \"c.tsv\"")
            .write(dir.path());
        let r = genecis(&["run", m.to_str().unwrap(), "-q"]);
        assert_eq!(r.code, 2, "{name}: {}", r.stderr);
        assert!(r.stderr.contains("name"), "{}", r.stderr);
        assert!(
            !dir.path().join("run").exists(),
            "nothing written for {name}"
        );
    }
}

/// A Combiner (or CLIP) with a NaN weight is refused by name before any
/// run: before, every similarity was NaN and the rank rule put every
/// target first (R@1 = 100%).
#[test]
fn non_finite_weights_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let w = small_world(dir.path());
    let m = eval_manifest(dir.path(), &w, true);
    let fx = crate::model::fixtures();
    let nan = dir.path().join("nan_combiner.pt");
    python(&format!(
        "import torch\n\
         sd = torch.load('{}')\n\
         sd['combiner_layer.weight'][0, 0] = float('nan')\n\
         torch.save(sd, '{}')",
        fx.join("combiner_state.pt").display(),
        nan.display()
    ));
    let text = std::fs::read_to_string(&m).unwrap().replace(
        &fx.join("combiner_state.pt").display().to_string(),
        &nan.display().to_string(),
    );
    write(&m, text);
    let r = genecis(&["run", m.to_str().unwrap(), "-q"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("combiner_layer.weight") && r.stderr.contains("NaN"),
        "{}",
        r.stderr
    );
    assert!(!dir.path().join("run/score").exists());
}

/// 531 bytes of torch.save that declare a 50000 x 50000 float tensor over
/// a one-element storage (stride 0): about 10 GB if materialised.
#[test]
fn a_torch_save_bomb_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let w = small_world(dir.path());
    let m = eval_manifest(dir.path(), &w, false);
    let bomb = dir.path().join("bomb.pt");
    python(&format!(
        "import torch; torch.save({{'visual.proj': torch.zeros(1).expand(50000, 50000)}}, '{}')",
        bomb.display()
    ));
    assert!(std::fs::metadata(&bomb).unwrap().len() < 4096);
    let fx = crate::model::fixtures();
    let text = std::fs::read_to_string(&m).unwrap().replace(
        &fx.join("vit_state.pt").display().to_string(),
        &bomb.display().to_string(),
    );
    write(&m, text);
    let (r, rss) = measured(&["check", m.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    assert!(
        r.stdout.contains("larger than its storage")
            || r.stderr.contains("larger than its storage"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    eprintln!("torch.save bomb: peak RSS {rss:.0} MiB (bound {BOMB_RSS_MIB})");
    assert!(rss < BOMB_RSS_MIB, "peak RSS {rss:.0} MiB");
}

/// A small JPEG whose header claims 65000 x 65000 pixels (12.7 GB decoded)
/// is refused by Pillow's rule before any pixel buffer exists.
#[test]
fn a_jpeg_bomb_is_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let w = small_world(dir.path());
    let m = eval_manifest(dir.path(), &w, false);
    let id = *w.coco_ids.iter().next().unwrap();
    let victim = w.coco_dir.join(format!("{id:012}.jpg"));
    jpeg(&victim, 1, 16, 16);
    let mut bytes = std::fs::read(&victim).unwrap();
    // The SOF0 marker's height and width fields.
    let sof = bytes.windows(2).position(|x| x == [0xFF, 0xC0]).unwrap();
    bytes[sof + 5..sof + 9].copy_from_slice(&[0xFD, 0xE8, 0xFD, 0xE8]);
    write(&victim, &bytes);
    assert!(bytes.len() < 8192);
    let (r, rss) = measured(&["run", m.to_str().unwrap(), "-q", "--skip-check"]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(
        all.contains("65000x65000") && all.contains("max_image_pixels"),
        "{all}"
    );
    eprintln!("JPEG bomb: peak RSS {rss:.0} MiB (bound {BOMB_RSS_MIB})");
    assert!(rss < BOMB_RSS_MIB, "peak RSS {rss:.0} MiB");
}

/// Strings that end a script block or open an HTML comment, in a condition
/// and in a template file's name, reach report.html's embedded data: the
/// page must still render every card (before, `<!--` emptied it).
#[test]
fn hostile_strings_cannot_break_the_report_page() {
    let dir = tempfile::tempdir().unwrap();
    let w = small_world(dir.path());
    let hostile = "wall <!--<script>document.body.innerHTML='owned'</script>--> & \\\" '";
    let json = std::fs::read_to_string(&w.coco_json).unwrap();
    let renamed = dir.path().join("focus_object <!--<script>.json");
    write(
        &renamed,
        json.replace("\"cardboard\"", &serde_json::to_string(hostile).unwrap()),
    );
    let m = eval_manifest(dir.path(), &w, true);
    // The Combiner's file name reaches the page's provenance.
    let fx = crate::model::fixtures().join("combiner_state.pt");
    let comb = dir.path().join("head <!--<script>.pt");
    std::fs::copy(&fx, &comb).unwrap();
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace(
            &w.coco_json.display().to_string(),
            &renamed.display().to_string(),
        )
        .replace(&fx.display().to_string(), &comb.display().to_string());
    write(&m, text);
    genecis(&["run", m.to_str().unwrap(), "-q"]).ok();
    // An imported method's name reaches the page's menus and cards.
    let scores = dir.path().join("scores.parquet");
    crate::common::python_with(
        &crate::import::readme_example().replace(
            "\"my_model\"",
            "\"<img src=x onerror=\\\"document.body.innerHTML='owned'\\\">\"",
        ),
        &[
            dir.path().join("run").to_str().unwrap(),
            scores.to_str().unwrap(),
        ],
    );
    let text = std::fs::read_to_string(&m).unwrap().replace(
        "inputs = [\"templates\", \"embed\"]\nparams = { device",
        "inputs = [\"templates\", \"embed\", \"imp\"]\nparams = { device",
    );
    assert!(text.contains("\"imp\"]"), "score takes the import stage");
    let imp = format!(
        "[[stage]]\nname = \"imp\"\nkind = \"import-scores\"\ninputs = [\"templates\"]\nparams = {{ file = \"{}\" }}\n\n",
        scores.display()
    );
    let at = text.find("[[stage]]\nname = \"score\"").unwrap();
    write(&m, format!("{}{imp}{}", &text[..at], &text[at..]));
    genecis(&["run", m.to_str().unwrap(), "-q"]).ok();
    let page = dir.path().join("run/score/report.html");
    let html = std::fs::read_to_string(&page).unwrap();
    let data = &html[html.find("id=\"data\">").unwrap()..];
    let data = &data[..data.find("</script>").unwrap()];
    assert!(!data[10..].contains('<'), "raw < in the embedded data");
    assert!(
        html.contains("head &lt;!--&lt;script&gt;.pt") || data.contains("head \\u003c!--"),
        "the Combiner's file name is on the page"
    );
    let Some(chrome) = crate::report::chromium() else {
        return;
    };
    let url = format!("file://{}#eager=1&method=image_only", page.display());
    let dom = crate::report::browser(&chrome, &["--dump-dom", &url]);
    // Shown as text (escaped), not run: a run script would have replaced
    // the body and no card would be there.
    assert!(
        dom.contains("&lt;!--&lt;script&gt;"),
        "the condition is shown as text"
    );
    assert_eq!(
        crate::report::attr(&dom, "count"),
        10,
        "every card rendered"
    );
}

/// Non-finite floats and sizes that would overflow or exhaust memory are
/// manifest errors: exit 2, the field named, nothing written.
#[test]
fn absurd_numbers_are_manifest_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = crate::common::Manifest::new("t")
        .stage(
            "world",
            "synth",
            &[],
            "train_scenes = 50, heldout_scenes = 40, templates_per_task = 2",
        )
        .stage("clip", "pretrain", &["world"], "")
        .write(dir.path());
    let m = m.to_str().unwrap();
    for (set, field) in [
        ("world.image_size=4000000000", "params.image_size"),
        (
            "world.train_scenes=9223372036854775807",
            "params.train_scenes",
        ),
        ("world.closeups=nan", "params.closeups"),
        ("clip.lr=inf", "params.lr"),
        ("clip.width=-64", "params.width"),
        ("clip.image_resolution=1000000", "params.image_resolution"),
    ] {
        let r = genecis(&["run", m, "-q", "--set", set]);
        assert_eq!(r.code, 2, "{set}: {}", r.stderr);
        assert!(r.stderr.contains(field), "{set}: {}", r.stderr);
        assert!(!dir.path().join("run").exists(), "{set}: nothing written");
    }
}

/// A part overwritten at its own size is found by its blake3 (`status`,
/// `run`), and the next run rebuilds it; a deleted part stops `sql`
/// instead of answering with fewer rows.
#[test]
fn damaged_parts_are_found_by_content_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("c.tsv"), 100);
    let m = ingest_manifest(dir.path(), "c.tsv", ", chunk_rows = 40");
    let m = m.to_str().unwrap();
    genecis(&["run", m, "-q"]).ok();
    let part = dir.path().join("run/captions/captions/part-00001.parquet");
    let good = std::fs::read(&part).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xFF;
    std::fs::write(&part, &bad).unwrap();
    let st = genecis(&["status", m]);
    assert!(
        st.ok()
            .stdout
            .contains("part-00001.parquet differs from what the stage wrote"),
        "{}",
        st.stdout
    );
    genecis(&["run", m, "-q"]).ok();
    assert_eq!(std::fs::read(&part).unwrap(), good, "rebuilt as it was");
    std::fs::remove_file(&part).unwrap();
    let r = genecis(&["sql", m, "SELECT count(*) FROM captions"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stderr.contains("part-00001.parquet is missing") && r.stderr.contains("--force"),
        "{}",
        r.stderr
    );
}

/// A result of 20 million rows streams: the table format prints its first
/// 1000 rows and counts the rest, CSV writes batch by batch. Held whole,
/// it would take gigabytes before the first line.
#[test]
fn large_sql_results_stream_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("c.tsv"), 10);
    let m = ingest_manifest(dir.path(), "c.tsv", "");
    genecis(&["run", m.to_str().unwrap(), "-q"]).ok();
    let run = dir.path().join("run");
    let q = "SELECT value, value * 2 AS twice FROM generate_series(1, 20000000)";
    let (r, rss) = measured(&["sql", run.to_str().unwrap(), q]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains(
            "(20000001 rows; the first 1000 shown: --format csv or --out FILE gives all)"
        ) || r.stdout.contains("(20000000 rows; the first 1000 shown"),
        "{}",
        &r.stdout[r.stdout.len().saturating_sub(300)..]
    );
    eprintln!("20 M rows as a table: peak RSS {rss:.0} MiB (bound {BOMB_RSS_MIB})");
    assert!(rss < BOMB_RSS_MIB, "peak RSS {rss:.0} MiB");
    let csv = dir.path().join("all.csv");
    let (r, rss) = measured(&[
        "sql",
        run.to_str().unwrap(),
        q,
        "--format",
        "csv",
        "--out",
        csv.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    eprintln!("20 M rows as CSV: peak RSS {rss:.0} MiB (bound {BOMB_RSS_MIB})");
    assert!(rss < BOMB_RSS_MIB, "peak RSS {rss:.0} MiB");
    let lines =
        std::io::BufRead::lines(std::io::BufReader::new(std::fs::File::open(&csv).unwrap()))
            .count();
    assert!(lines >= 20_000_000, "{lines} lines");
}

/// Messages that used to mislead: each names what is really wrong.
#[test]
fn unclear_cases_get_messages_that_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // CR-only line ends: three captions, not one rejected line.
    write(
        &d.join("mac.tsv"),
        "a dog on a bench\thttp://x.invalid/1.jpg\ra cat in a box\thttp://x.invalid/2.jpg\ra car on a road\thttp://x.invalid/3.jpg\r",
    );
    let m = ingest_manifest(d, "mac.tsv", "");
    genecis(&["run", m.to_str().unwrap(), "-q"]).ok();
    let run = d.join("run");
    let rows = crate::common::sql_csv(&run, "SELECT count(*) AS n FROM captions.captions");
    assert_eq!(rows[1], "3", "{rows:?}");

    // A bare table name that several stages have is ambiguous, not missing.
    let m2 = crate::common::Manifest::new("t")
        .stage("a", "ingest", &[], "path = \"mac.tsv\"")
        .stage("b", "ingest", &[], "path = \"mac.tsv\"")
        .write(&d.join("two"));
    std::fs::copy(d.join("mac.tsv"), d.join("two/mac.tsv")).unwrap();
    genecis(&["run", m2.to_str().unwrap(), "-q"]).ok();
    let r = genecis(&["sql", m2.to_str().unwrap(), "SELECT count(*) FROM rejects"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("ambiguous") && r.stderr.contains("a.rejects"),
        "{}",
        r.stderr
    );

    // A template file with a byte-order mark says so.
    let bom = d.join("focus_object.json");
    let t = "{\"condition\": \"dog\", \"reference\": {\"val_image_id\": 1}, \"target\": {\"val_image_id\": 2}, \"gallery\": [{\"val_image_id\": 1}, {\"val_image_id\": 3}]}";
    write(&bom, format!("\u{feff}[{t}]"));
    let r = genecis(&["audit", bom.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("byte-order mark"), "{}", r.stderr);

    // A reference that is also one of its own distractors is an audit finding.
    write(&bom, format!("[{t}]"));
    let r = genecis(&["audit", bom.to_str().unwrap()]);
    r.ok();
    assert!(r.stdout.contains("reference_in_gallery"), "{}", r.stdout);
}

/// Pickles that would exhaust a naive reader: 40 levels of a dict shared
/// by memo references (2^40 paths, ~500 bytes; Python shares them), a
/// million nested lists and nested dicts (a recursive reader or
/// drop overflows the stack). Each is a clear error naming the file, in
/// bounded memory, never an abort. (100,000 nested dicts: far past the
/// depth limit and a recursive reader's stack.)
#[test]
fn pickles_that_share_or_nest_without_end_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    python(&format!(
        r#"
import pickle, zipfile
def write(path, pkl):
    # torch.save's layout, by Python's zipfile.
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
d = {{}}
for _ in range(40):
    d = {{"a": d, "b": d}}
shared = pickle.dumps(d, protocol=2)
assert len(shared) < 1024, len(shared)
write("{d}/shared.pt", shared)
n = 1_000_000
write("{d}/lists.pt", b"\x80\x02}}X\x01\x00\x00\x00w" + b"]" * n + b"a" * (n - 1) + b"s.")
m = 100_000
write("{d}/dicts.pt", b"\x80\x02" + b"}}X\x01\x00\x00\x00k" * m + b"}}" + b"s" * m + b".")
"#,
        d = d.display()
    ));
    let texts = d.join("t.txt");
    write(&texts, "red\n");
    for (file, says) in [
        ("shared.pt", "more paths than its pickle has bytes"),
        ("lists.pt", "no named tensors"),
        ("dicts.pt", "nest more than 1000 levels"),
    ] {
        let p = d.join(file);
        let (r, rss) = measured(&[
            "encode",
            "--checkpoint",
            p.to_str().unwrap(),
            "--texts",
            texts.to_str().unwrap(),
            "--out",
            d.join("o.parquet").to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        assert_eq!(r.signal, None, "{file}: {}", r.stderr);
        assert_eq!(r.code, 1, "{file}: {}", r.stderr);
        assert!(
            r.stderr.contains(p.to_str().unwrap()) && r.stderr.contains(says),
            "{file}: {}",
            r.stderr
        );
        eprintln!("{file}: refused, peak RSS {rss:.0} MiB (bound {BOMB_RSS_MIB})");
        assert!(rss < BOMB_RSS_MIB, "{file}: peak RSS {rss:.0} MiB");
    }
}

/// A stage record that lies (a fingerprint with a character of several
/// bytes where the folder name is cut, a table named like a path, a part
/// count no run has) is named as corrupt, with the command that rebuilds
/// it, by `sql`, `status` and `run`; never a panic or a loop.
#[test]
fn stage_records_that_lie_are_named_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("c.tsv"), 10);
    let m = ingest_manifest(dir.path(), "c.tsv", "");
    genecis(&["run", m.to_str().unwrap(), "-q"]).ok();
    let run = dir.path().join("run");
    let log = store_of(&run, "captions")
        .join("_log")
        .join("0000000001.json");
    let good = std::fs::read_to_string(&log).unwrap();
    let rec: serde_json::Value = serde_json::from_str(&good).unwrap();
    let fp = rec["fingerprint"].as_str().unwrap().to_string();
    let lies: [(&str, Box<dyn Fn(&mut serde_json::Value)>); 3] = [
        (
            "is not a fingerprint",
            Box::new(|r| r["fingerprint"] = format!("{}\u{e9}{}", &fp[..15], &fp[16..]).into()),
        ),
        (
            "is not a plain name",
            Box::new(|r| {
                let tables = r["tables"].as_object_mut().unwrap();
                let t = tables.remove("captions").unwrap();
                tables.insert("../../x".into(), t);
            }),
        ),
        (
            "more than any run has",
            Box::new(|r| r["tables"]["captions"]["parts"] = u64::MAX.into()),
        ),
    ];
    for (says, lie) in lies {
        let mut r = rec.clone();
        lie(&mut r);
        write(&log, r.to_string());
        for args in [
            vec![
                "sql",
                run.to_str().unwrap(),
                "SELECT count(*) FROM captions",
            ],
            vec!["status", m.to_str().unwrap()],
            vec!["run", m.to_str().unwrap(), "-q"],
        ] {
            let res = genecis(&args);
            assert_eq!(res.signal, None, "{args:?}: {}", res.stderr);
            assert_ne!(res.code, 101, "{args:?} panicked: {}", res.stderr);
            assert_ne!(res.code, 0, "{args:?} trusted it: {}", res.stdout);
            let all = format!("{}{}", res.stdout, res.stderr);
            assert!(
                all.contains("corrupt run record")
                    && all.contains(says)
                    && all.contains("--from captions"),
                "{args:?}: {all}"
            );
        }
    }
    // A log version no writer made (its successor would overflow).
    write(&log, &good);
    let huge = log.with_file_name(format!("{}.json", u64::MAX));
    write(&huge, &good);
    let res = genecis(&["run", m.to_str().unwrap(), "-q"]);
    assert_ne!(res.code, 101, "panicked: {}", res.stderr);
    assert!(
        res.stderr.contains("beyond any genecis writes"),
        "{}",
        res.stderr
    );
    // The repair the message names works.
    std::fs::remove_dir_all(store_of(&run, "captions")).unwrap();
    genecis(&["run", m.to_str().unwrap(), "-q", "--from", "captions"]).ok();
    assert_eq!(
        head_record(&run, "captions").unwrap()["fingerprint"],
        fp.as_str()
    );
}
