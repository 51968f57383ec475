//! Manifest validation: every problem reported at once, exit code 2, and
//! nothing written.

use crate::common::*;

fn invalid(manifest: &str) -> Res {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("data.tsv"), "a dog .\thttp://x/1.jpg\n");
    let m = dir.path().join("m.toml");
    write(&m, manifest);
    let r = genecis(&["run", m.to_str().unwrap()]);
    assert_eq!(r.code, 2, "exit code 2 for a bad manifest\n{}", r.stderr);
    assert!(
        !dir.path().join("run").exists(),
        "a bad manifest must write nothing"
    );
    r
}

const HEAD: &str = "[pipeline]\nname = \"t\"\nworkdir = \"run\"\n";

#[test]
fn unknown_kind_names_stage_field_and_line() {
    let r = invalid(&format!(
        "{HEAD}\n[[stage]]\nname = \"caps\"\nkind = \"ingst\"\n"
    ));
    assert!(
        r.stderr.contains("stage 'caps', field 'kind'"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("unknown stage kind 'ingst'"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("known kinds: synth, ingest"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("line 7"), "{}", r.stderr);
}

#[test]
fn unknown_and_ill_typed_params() {
    let r = invalid(&format!(
        "{HEAD}\n[[stage]]\nname = \"a\"\nkind = \"ingest\"\nparams = {{ path = \"data.tsv\", chunk_rowz = 5 }}\n\n[[stage]]\nname = \"b\"\nkind = \"ingest\"\nparams = {{ path = \"data.tsv\", chunk_rows = \"many\" }}\n"
    ));
    assert!(
        r.stderr.contains("stage 'a'") && r.stderr.contains("unknown field `chunk_rowz`"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("stage 'b', field 'params.chunk_rows'"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("2 problem(s)"),
        "both problems in one error: {}",
        r.stderr
    );
}

#[test]
fn missing_input_file_and_missing_stage_input() {
    let r = invalid(&format!(
        "{HEAD}\n[[stage]]\nname = \"a\"\nkind = \"ingest\"\nparams = {{ path = \"nope.tsv\" }}\n\n[[stage]]\nname = \"b\"\nkind = \"ingest\"\ninputs = [\"ghost\"]\nparams = {{ path = \"data.tsv\" }}\n"
    ));
    assert!(
        r.stderr.contains("stage 'a', field 'params.path'")
            && r.stderr.contains("nope.tsv does not exist"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("stage 'b', field 'inputs[0]'")
            && r.stderr.contains("'ghost' is neither a stage"),
        "{}",
        r.stderr
    );
}

#[test]
fn cycle_and_duplicate_names() {
    let r = invalid(&format!(
        "{HEAD}\n[[stage]]\nname = \"a\"\nkind = \"ingest\"\ninputs = [\"b\"]\nparams = {{ path = \"data.tsv\" }}\n\n[[stage]]\nname = \"b\"\nkind = \"ingest\"\ninputs = [\"a\"]\nparams = {{ path = \"data.tsv\" }}\n"
    ));
    assert!(
        r.stderr.contains("stages a, b form a cycle"),
        "{}",
        r.stderr
    );
    let r = invalid(&format!(
        "{HEAD}\n[[stage]]\nname = \"b\"\nkind = \"ingest\"\nparams = {{ path = \"data.tsv\" }}\n\n[[stage]]\nname = \"b\"\nkind = \"ingest\"\nparams = {{ path = \"data.tsv\" }}\n"
    ));
    assert!(r.stderr.contains("duplicate stage name"), "{}", r.stderr);
}

#[test]
fn bad_table_reference_lists_tables() {
    let r = invalid(&format!(
        "{HEAD}\n[[stage]]\nname = \"a\"\nkind = \"ingest\"\nparams = {{ path = \"data.tsv\" }}\n\n[[stage]]\nname = \"b\"\nkind = \"ingest\"\ninputs = [\"a.caption\"]\nparams = {{ path = \"data.tsv\" }}\n"
    ));
    assert!(
        r.stderr
            .contains("has no table 'caption'; its tables are: captions, rejects"),
        "{}",
        r.stderr
    );
}

#[test]
fn toml_syntax_error_and_unknown_top_level_field() {
    let r = invalid("[pipeline\nname = 1\n");
    assert!(r.stderr.contains("not valid TOML"), "{}", r.stderr);
    let r = invalid(&format!(
        "{HEAD}\n[[stage]]\nname = \"a\"\nkind = \"ingest\"\nparam = {{ path = \"data.tsv\" }}\n"
    ));
    assert!(r.stderr.contains("unknown field `param`"), "{}", r.stderr);
}

#[test]
fn bad_set_override_and_stage_flags_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("data.tsv"), "a dog .\thttp://x/1.jpg\n");
    let m = ingest_manifest(dir.path(), "data.tsv", "");
    let m = m.to_str().unwrap();
    for args in [
        vec!["run", m, "--set", "nostage.path=x"],
        vec!["run", m, "--set", "captions.chunk_rows=zero"],
        vec!["run", m, "--set", "novalue"],
        vec!["run", m, "--only", "ghost"],
        vec!["run", m, "--shard", "3/3"],
    ] {
        let r = genecis(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
    }
    assert!(!dir.path().join("run").exists());
}

/// `kinds` shows each kind's inputs (optional ones marked) and exact table
/// schemas, the per-run embedding width as `d`.
#[test]
fn kinds_lists_inputs_and_schemas() {
    let r = genecis(&["kinds"]);
    let out = &r.ok().stdout;
    assert!(
        out.contains("  reads: image_keys? (one of: image sources), texts?, triplets? (one of: image sources), captions?, weights?\n"),
        "{out}"
    );
    assert!(
        out.contains(
            "image_embeddings(image_key Utf8, model Utf8, embedding FixedSizeList(d x Float32))"
        ),
        "{out}"
    );
    assert!(out.contains("url Utf8?"), "{out}");
    assert!(!out.contains("rules"), "{out}");
}
