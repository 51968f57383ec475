//! `import-scores`: the README's Python example writes a model's scores,
//! the stage checks them against the run's templates, and `score` ranks
//! them beside its own methods. The example's model is image_only, so its
//! ranks must be the built-in image_only's; queries and gallery given as
//! embeddings must reproduce it bit for bit. Bad files write nothing.

use std::collections::HashMap;
use std::path::Path;

use arrow::array::AsArray;
use arrow::datatypes::{Float32Type, UInt32Type};
use genecis::framework::store::read_table;

use crate::common::{genecis, python_with, write, Manifest, EPS32};
use crate::eval::{small_world, templates_params};
use crate::model::fixtures;

/// The README block after the import-scores marker.
pub(crate) fn readme_example() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let at = readme
        .find("<!-- import-scores example")
        .expect("the README's import-scores example");
    let body = &readme[at..];
    let start = body.find("```python\n").unwrap() + "```python\n".len();
    body[start..start + body[start..].find("```").unwrap()].to_string()
}

/// The base stages and, after them, `extra` stages.
fn manifest(
    dir: &Path,
    w: &crate::eval::World,
    extra: &[(&str, &str, &[&str], String)],
) -> std::path::PathBuf {
    manifest_with(dir, w, "device = \"cpu\", bootstrap = 0", extra)
}

/// templates -> embed (the tiny ViT) -> score with `score` params, then
/// `extra` stages.
pub(crate) fn manifest_with(
    dir: &Path,
    w: &crate::eval::World,
    score: &str,
    extra: &[(&str, &str, &[&str], String)],
) -> std::path::PathBuf {
    let mut m = Manifest::new("import-test")
        .stage("templates", "templates", &[], &templates_params(w))
        .stage(
            "embed",
            "embed",
            &["templates"],
            &format!(
                "checkpoint = \"{}\", model = \"tiny-vit\", device = \"cpu\", batch_size = 4",
                fixtures().join("vit_state.pt").display()
            ),
        )
        .stage("score", "score", &["templates", "embed"], score);
    for (name, kind, inputs, params) in extra {
        m = m.stage(name, kind, inputs, params);
    }
    m.write(dir)
}

/// (task, template_id, method) -> (rank, similarities) of a score stage.
pub(crate) type Scored = HashMap<(String, u32, String), (u32, Vec<f32>)>;

pub(crate) fn scores(dir: &Path) -> Scored {
    let mut out = HashMap::new();
    for b in read_table(dir).unwrap() {
        let task = b.column_by_name("task").unwrap().as_string::<i32>().clone();
        let id = b
            .column_by_name("template_id")
            .unwrap()
            .as_primitive::<UInt32Type>()
            .clone();
        let m = b
            .column_by_name("method")
            .unwrap()
            .as_string::<i32>()
            .clone();
        let r = b
            .column_by_name("target_rank")
            .unwrap()
            .as_primitive::<UInt32Type>()
            .clone();
        let s = b
            .column_by_name("similarities")
            .unwrap()
            .as_list::<i32>()
            .clone();
        for i in 0..b.num_rows() {
            let v = s.value(i);
            out.insert(
                (
                    task.value(i).to_string(),
                    id.value(i),
                    m.value(i).to_string(),
                ),
                (
                    r.value(i),
                    v.as_primitive::<Float32Type>().values().to_vec(),
                ),
            );
        }
    }
    out
}

fn run_py(script: &str, args: &[&str]) {
    python_with(script, args);
}

#[test]
fn imported_scores_rank_as_the_built_in_methods_do() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let w = small_world(d);
    genecis(&["run", manifest(d, &w, &[]).to_str().unwrap(), "-q"]).ok();
    let run = d.join("run");
    let file = d.join("my_scores.parquet");
    run_py(
        &readme_example(),
        &[run.to_str().unwrap(), file.to_str().unwrap()],
    );
    // The same scores as CSV (pandas' list text) and .npz, and as query and
    // gallery embeddings (the reference's embedding is the query).
    run_py(
        r#"
import sys, numpy as np, pandas as pd, pyarrow as pa, pyarrow.parquet as pq
run, d = sys.argv[1], sys.argv[2]
s = pq.read_table(f"{d}/my_scores.parquet").to_pandas()
s.assign(method="my_csv", similarities=[list(map(float, v)) for v in s.similarities]).to_csv(f"{d}/my_scores.csv", index=False)
np.savez(f"{d}/my_scores.npz", task=s.task.to_numpy().astype(str), template_id=s.template_id.to_numpy(),
         method=np.array(["my_npz"] * len(s)),  # templates of fewer candidates padded with NaN
         similarities=np.array([np.pad(v, (0, 15 - len(v)), constant_values=np.nan) for v in s.similarities], dtype=np.float32))
t = pq.read_table(f"{run}/templates/templates").to_pandas()
emb = pq.read_table(f"{run}/embed/image_embeddings").to_pandas().set_index("image_key").embedding
pq.write_table(pa.table({"task": t.task, "template_id": t.template_id, "method": ["my_emb"] * len(t),
    "embedding": [emb[k].tolist() for k in t.reference_key]}), f"{d}/queries.parquet")
pq.write_table(pa.table({"image_key": emb.index, "embedding": [v.tolist() for v in emb]}), f"{d}/gallery.parquet")
"#,
        &[run.to_str().unwrap(), d.to_str().unwrap()],
    );
    let imp = |name: &str, params: String| (name.to_string(), params);
    let stages = [
        imp("imp_parquet", format!("file = \"{}\"", file.display())),
        imp(
            "imp_csv",
            format!("file = \"{}\"", d.join("my_scores.csv").display()),
        ),
        imp(
            "imp_npz",
            format!("file = \"{}\"", d.join("my_scores.npz").display()),
        ),
        imp(
            "imp_emb",
            format!(
                "file = \"{}\", gallery = \"{}\"",
                d.join("queries.parquet").display(),
                d.join("gallery.parquet").display()
            ),
        ),
    ];
    let mut extra: Vec<(&str, &str, &[&str], String)> = stages
        .iter()
        .map(|(n, p)| (n.as_str(), "import-scores", &["templates"][..], p.clone()))
        .collect();
    // One import stage per score stage (a file may hold several methods).
    let inputs: Vec<[&str; 3]> = stages
        .iter()
        .map(|(n, _)| ["templates", "embed", n.as_str()])
        .collect();
    let names: Vec<String> = stages.iter().map(|(n, _)| format!("score_{n}")).collect();
    for (name, inputs) in names.iter().zip(&inputs) {
        extra.push((
            name.as_str(),
            "score",
            &inputs[..],
            "device = \"cpu\", bootstrap = 0".into(),
        ));
    }
    // Instead of the built-in methods: `methods = []`.
    let only = ["templates", "embed", "imp_parquet"];
    extra.push((
        "score_only",
        "score",
        &only[..],
        "device = \"cpu\", bootstrap = 0, methods = []".into(),
    ));
    let r = genecis(&["run", manifest(d, &w, &extra).to_str().unwrap(), "-q"]);
    r.ok();
    let mut s = scores(&run.join("score/scores"));
    for n in &names {
        s.extend(scores(&run.join(format!("{n}/scores"))));
    }
    let builtin: Vec<_> = s.iter().filter(|(k, _)| k.2 == "image_only").collect();
    assert_eq!(builtin.len(), 10, "every template scored by image_only");
    // numpy's float32 dot sums in another order than ours: each cosine is
    // off by at most d float32 roundings of unit-size terms.
    let tol = 4.0 * 32.0 * EPS32;
    for ((task, id, _), (rank, sims)) in builtin {
        for m in ["my_model", "my_csv", "my_npz", "my_emb"] {
            let (r, v) = s
                .get(&(task.clone(), *id, m.to_string()))
                .unwrap_or_else(|| panic!("{m} has no score for {task} {id}"));
            assert_eq!(v.len(), sims.len(), "{m} {task} {id}");
            if m == "my_emb" {
                assert_eq!(
                    v, sims,
                    "the same features give the same cosines, bit for bit"
                );
                assert_eq!(r, rank);
                continue;
            }
            let off = v
                .iter()
                .zip(sims)
                .map(|(a, b)| (a - b).abs() as f64)
                .fold(0.0, f64::max);
            assert!(
                off <= tol,
                "{m} {task} {id}: similarities off by {off:e} (bound {tol:e})"
            );
            // Ranks agree unless a candidate is within the bound of the target.
            let near_tie = sims[1..]
                .iter()
                .any(|x| (x - sims[0]).abs() as f64 <= 2.0 * tol);
            if !near_tie {
                assert_eq!(r, rank, "{m} {task} {id}");
            }
        }
    }
    // The imported methods have results rows like the built-in ones.
    let results = crate::common::sql_csv(
        &d.join("m.toml"),
        "SELECT method, count(*) FROM score_imp_npz.results WHERE task <> 'average' GROUP BY method ORDER BY method",
    );
    let only = crate::common::sql_csv(
        &d.join("m.toml"),
        "SELECT DISTINCT method FROM score_only.results",
    );
    assert_eq!(only[1..], ["my_model"], "only the imported method");
    assert!(
        results.iter().any(|l| l.starts_with("my_npz,")),
        "{results:?}"
    );
}

#[test]
fn bad_imported_files_are_refused_with_their_rows_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let w = small_world(d);
    genecis(&["run", manifest(d, &w, &[]).to_str().unwrap(), "-q"]).ok();
    let run = d.join("run");
    let good = d.join("good.parquet");
    run_py(
        &readme_example(),
        &[run.to_str().unwrap(), good.to_str().unwrap()],
    );
    // Each case: (file, how to spoil the table in pandas, what the error says).
    let cases = [
        ("missing", "s = s.iloc[1:]", "lacks 1 template(s)"),
        ("twice", "s = pd.concat([s, s.iloc[:2]])", "is also in row"),
        (
            "short",
            "s.at[s.index[0], 'similarities'] = s.similarities.iloc[0][:-1]",
            "candidates (target first",
        ),
        (
            "nan",
            "s.at[s.index[1], 'similarities'] = [float('nan')] * len(s.similarities.iloc[1])",
            "NaN, infinite or missing",
        ),
        (
            "unknown",
            "s.iloc[0, s.columns.get_loc('template_id')] = 99999",
            "not a template of this run",
        ),
        (
            "builtin",
            "s['method'] = 'image_only'",
            "is a built-in method of score",
        ),
    ];
    for (name, spoil, _) in &cases {
        run_py(
            &format!(
                "import sys, pandas as pd, pyarrow as pa, pyarrow.parquet as pq\ns = pq.read_table(sys.argv[1]).to_pandas()\n{spoil}\npq.write_table(pa.Table.from_pandas(s, preserve_index=False), sys.argv[2])\n"
            ),
            &[good.to_str().unwrap(), d.join(format!("{name}.parquet")).to_str().unwrap()],
        );
    }
    for (name, _, says) in &cases {
        let extra = [(
            "imp",
            "import-scores",
            &["templates"][..],
            format!("file = \"{}\"", d.join(format!("{name}.parquet")).display()),
        )];
        let r = genecis(&["run", manifest(d, &w, &extra).to_str().unwrap(), "-q"]);
        assert_ne!(r.code, 0, "{name} must fail");
        assert!(
            r.stderr.contains(says),
            "{name}: expected '{says}' in:\n{}",
            r.stderr
        );
        assert!(
            r.stderr.contains("problem(s)"),
            "{name}: the count of problems:\n{}",
            r.stderr
        );
        assert!(!run.join("imp").exists(), "{name}: nothing written");
    }
    // A wrong width of query embeddings and a gallery lacking an image.
    run_py(
        r#"
import sys, pandas as pd, pyarrow as pa, pyarrow.parquet as pq
run, d = sys.argv[1], sys.argv[2]
t = pq.read_table(f"{run}/templates/templates").to_pandas()
emb = pq.read_table(f"{run}/embed/image_embeddings").to_pandas().set_index("image_key").embedding
q = [emb[k].tolist() for k in t.reference_key]
q[0] = q[0][:5]
pq.write_table(pa.table({"task": t.task, "template_id": t.template_id, "method": ["m"] * len(t), "embedding": q}), f"{d}/q.parquet")
pq.write_table(pa.table({"image_key": emb.index[1:], "embedding": [v.tolist() for v in emb.iloc[1:]]}), f"{d}/g.parquet")
"#,
        &[run.to_str().unwrap(), d.to_str().unwrap()],
    );
    let extra = [(
        "imp",
        "import-scores",
        &["templates"][..],
        format!(
            "file = \"{}\", gallery = \"{}\"",
            d.join("q.parquet").display(),
            d.join("g.parquet").display()
        ),
    )];
    let r = genecis(&["run", manifest(d, &w, &extra).to_str().unwrap(), "-q"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("5 values, the method's other queries 32"),
        "{}",
        r.stderr
    );
    assert!(!run.join("imp").exists());
    write(&d.join("x.txt"), "task\n");
    let extra = [(
        "imp",
        "import-scores",
        &["templates"][..],
        format!("file = \"{}\"", d.join("x.txt").display()),
    )];
    let r = genecis(&["run", manifest(d, &w, &extra).to_str().unwrap(), "-q"]);
    assert!(
        r.stderr.contains("is not a format this reads"),
        "{}",
        r.stderr
    );
}
