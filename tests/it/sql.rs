//! `genecis sql`: tables by name, output formats, errors without panics.

use crate::common::*;

fn demo_run() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    synthetic_tsv(&dir.path().join("data.tsv"), 100);
    let m = ingest_manifest(dir.path(), "data.tsv", ", chunk_rows = 30");
    genecis(&["run", m.to_str().unwrap()]).ok();
    (dir, m)
}

#[test]
fn tables_by_bare_and_stage_qualified_name_via_manifest_or_workdir() {
    let (dir, m) = demo_run();
    let a = sql_csv(&m, "SELECT count(*) FROM captions");
    let b = sql_csv(
        &dir.path().join("run"),
        "SELECT count(*) FROM captions.captions",
    );
    assert_eq!(a[1], "100");
    assert_eq!(b[1], "100");
    let t = sql_csv(&m, "SELECT table_schema, table_name FROM information_schema.tables WHERE table_schema <> 'information_schema' ORDER BY 1, 2");
    assert_eq!(
        t[1..],
        [
            "captions,captions",
            "captions,rejects",
            "public,captions",
            "public,rejects"
        ]
    );
}

#[test]
fn output_formats() {
    let (dir, m) = demo_run();
    let m = m.to_str().unwrap();
    let q = "SELECT image_id, caption FROM captions WHERE image_id < 2 ORDER BY image_id";
    let r = genecis(&["sql", m, q, "--format", "json"]);
    let lines: Vec<serde_json::Value> = r
        .ok()
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["image_id"], 1);
    let r = genecis(&["sql", m, q]);
    assert!(r.ok().stdout.contains("(2 rows)"), "{}", r.stdout);
    let out = dir.path().join("out.parquet");
    genecis(&[
        "sql",
        m,
        q,
        "--format",
        "parquet",
        "--out",
        out.to_str().unwrap(),
    ])
    .ok();
    let f = std::fs::File::open(&out).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 2);
    let csv_out = dir.path().join("out.csv");
    genecis(&[
        "sql",
        m,
        q,
        "--format",
        "csv",
        "--out",
        csv_out.to_str().unwrap(),
    ])
    .ok();
    assert!(std::fs::read_to_string(csv_out)
        .unwrap()
        .starts_with("image_id,caption\n0,"));
    let sqlf = dir.path().join("q.sql");
    write(&sqlf, "SELECT count(*) AS n FROM rejects");
    let r = genecis(&[
        "sql",
        m,
        "--file",
        sqlf.to_str().unwrap(),
        "--format",
        "csv",
    ]);
    assert_eq!(r.ok().stdout, "n\n0\n");
}

#[test]
fn sql_errors_are_reported_not_panics() {
    let (_dir, m) = demo_run();
    let m = m.to_str().unwrap();
    for q in [
        "SELEC 1",
        "SELECT nope FROM captions",
        "SELECT * FROM no_such_table",
    ] {
        let r = genecis(&["sql", m, q]);
        assert_eq!(r.code, 1, "{q}");
        assert!(
            r.stderr.starts_with("error: SQL error"),
            "{q}: {}",
            r.stderr
        );
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }
    let r = genecis(&["sql", "/nonexistent/run", "SELECT 1"]);
    assert!(r.stderr.contains("no genecis run at"), "{}", r.stderr);
    let r = genecis(&["sql", m, "SELECT 1", "--format", "parquet"]);
    assert_eq!(r.code, 2);
}

#[test]
fn interactive_prompt_reads_statements_and_meta_commands() {
    use std::io::Write;
    let (_dir, m) = demo_run();
    let mut child = bin()
        .args(["sql", m.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"\\d\nSELECT count(*)\n  AS n FROM captions;\nSELECT broken;\n\\q\n")
        .unwrap();
    let out: Res = child.wait_with_output().unwrap().into();
    out.ok();
    assert!(
        out.stdout
            .contains("captions.captions (also: captions): 100 rows"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("| 100 |"), "{}", out.stdout);
    assert!(out.stderr.contains("error: SQL error"), "{}", out.stderr);
}

#[test]
fn example_queries_run() {
    let (_dir, m) = demo_run();
    // The ingest examples; the mining ones are exercised in mine.rs.
    for name in ["caption_lengths.sql", "reject_reasons.sql"] {
        let out = crate::common::example_sql(&m, name);
        assert!(out.lines().count() >= 1, "{name}: {out}");
    }
}

/// CSV has no nested values: list columns print as DuckDB prints them.
#[test]
fn csv_renders_list_columns() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("c.tsv"),
        "two red cups on a wooden table\tu0\n",
    );
    let m = Manifest::new("p")
        .stage("captions", "ingest", &[], "path = \"c.tsv\"")
        .stage("graphs", "parse", &["captions"], "")
        .write(dir.path());
    genecis(&["run", m.to_str().unwrap()]).ok();
    let rows = sql_csv(
        &m,
        "SELECT head, modifiers, [1.5, 2.0] AS xs FROM entities ORDER BY entity_idx",
    );
    assert_eq!(rows[0], "head,modifiers,xs");
    assert_eq!(rows[1], "cups,\"[two, red]\",\"[1.5, 2.0]\"");
    assert_eq!(rows[2], "table,\"[a, wooden]\",\"[1.5, 2.0]\"");
}

/// A reader that goes away (`| head`) ends the command quietly.
#[test]
fn a_closed_pipe_ends_quietly() {
    use std::io::Read;
    let (_dir, m) = demo_run();
    let mut child = bin()
        .args([
            "sql",
            m.to_str().unwrap(),
            "SELECT * FROM captions CROSS JOIN captions AS b",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // stdout is closed here: no panic, and no error either.
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.is_empty(), "{err}");
}
