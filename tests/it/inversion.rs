//! The textual-inversion methods (Pic2Word, SEARLE, LinCIR) on GeneCIS:
//! random networks in their projects' file formats, a tiny CLIP, and the
//! similarities a transcription of their published inference gives
//! (`scripts/make_inversion_fixtures.py`, which names the files and
//! commits it transcribes), against `score`'s.

use std::collections::HashMap;
use std::path::Path;

use arrow::array::AsArray;
use arrow::datatypes::{Float64Type, UInt32Type};
use genecis::framework::store::read_table;

use crate::common::{forward_tolerance, genecis};
use crate::eval::{small_world, World};
use crate::import::scores;
use crate::model::fixtures;

type Sims = HashMap<(String, String, u32), Vec<f64>>;

fn manifest(dir: &Path, w: &World, score: &str) -> std::path::PathBuf {
    crate::import::manifest_with(dir, w, score, &[])
}

fn expected(dir: &Path, variant: &str) -> Sims {
    let mut out = HashMap::new();
    for b in read_table(dir).unwrap() {
        let s = |n: &str| b.column_by_name(n).unwrap().as_string::<i32>().clone();
        let (m, v, t) = (s("method"), s("variant"), s("task"));
        let id = b
            .column_by_name("template_id")
            .unwrap()
            .as_primitive::<UInt32Type>()
            .clone();
        let sims = b
            .column_by_name("similarities")
            .unwrap()
            .as_list::<i32>()
            .clone();
        for i in 0..b.num_rows() {
            if v.value(i) != variant {
                continue;
            }
            let x = sims.value(i);
            let x = x.as_primitive::<Float64Type>().values().to_vec();
            out.insert(
                (m.value(i).to_string(), t.value(i).to_string(), id.value(i)),
                x,
            );
        }
    }
    out
}

#[test]
fn textual_inversion_methods_match_their_published_inference() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let w = small_world(d);
    let clip = fixtures().join("vit_state.pt");
    let base = "device = \"cpu\", bootstrap = 0, methods = [\"image_only\"]";
    genecis(&["run", manifest(d, &w, base).to_str().unwrap(), "-q"]).ok();
    let run = d.join("run");
    let fx = d.join("fx");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/make_inversion_fixtures.py"))
        .args([&run, &clip, &fx])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fixture script failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nets = |extra: &str| {
        format!(
            "device = \"cpu\", bootstrap = 0, methods = [\"image_only\", \"pic2word\", \"searle\", \"lincir\"], clip = \"{}\", pic2word = \"{}\", searle = \"{}\", lincir = \"{}\"{extra}",
            clip.display(),
            fx.join("pic2word.pt").display(),
            fx.join("searle.pt").display(),
            fx.join("lincir.pt").display()
        )
    };
    // Cosines of unit vectors: the longest dot product has 4 x 64 terms
    // (the text MLP, Phi's hidden layer); 3 network layers, 5 products in
    // each of the 2 text blocks and the projection chain 14 of them.
    let tol = forward_tolerance(256, 14, tch::Device::Cpu);
    for (variant, extra) in [
        ("published", String::new()),
        (
            "condition",
            ", inversion_object_condition = \"condition\"".to_string(),
        ),
    ] {
        let r = genecis(&[
            "run",
            manifest(d, &w, &nets(&extra)).to_str().unwrap(),
            "-q",
        ]);
        r.ok();
        let want = expected(&fx.join("expected"), variant);
        let got = scores(&run.join("score/scores"));
        let mut worst = 0f64;
        let mut n = 0;
        for ((m, t, id), e) in &want {
            let key = (m.clone(), t.clone(), *id);
            let (rank_got, g) = got
                .get(&(t.clone(), *id, m.clone()))
                .unwrap_or_else(|| panic!("no score for {key:?}"));
            assert_eq!(g.len(), e.len());
            let off = g
                .iter()
                .zip(e)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            worst = worst.max(off);
            assert!(
                off <= tol,
                "{variant} {key:?}: off by {off:e} (bound {tol:e})"
            );
            let rank = 1 + e[1..].iter().filter(|&&x| x > e[0]).count() as u32;
            if !e[1..].iter().any(|x| (x - e[0]).abs() <= 2.0 * tol) {
                assert_eq!(*rank_got, rank, "{variant} {key:?}");
            }
            n += 1;
        }
        assert_eq!(n, 3 * 10, "three methods, ten templates");
        println!("{variant}: {n} (template, method) pairs, similarities within {worst:.2e} of the transcription (bound {tol:.2e})");
        // The object prompt matters: the two variants' object scores differ.
        if variant == "condition" {
            let published = expected(&fx.join("expected"), "published");
            let k = ("lincir".to_string(), "focus_object".to_string(), 0);
            assert!(published[&k]
                .iter()
                .zip(&want[&k])
                .any(|(a, b)| (a - b).abs() > 1e-3));
        }
    }
    // Files that do not fit: a Phi given as Pic2Word's network names the
    // key; another CLIP than the embeddings' is refused.
    let swapped = nets("").replace("pic2word.pt", "lincir.pt");
    let r = genecis(&["run", manifest(d, &w, &swapped).to_str().unwrap(), "-q"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("layers.0.0.weight"), "{}", r.stderr);
    let other = nets("").replace("vit_state.pt", "rn_state.pt");
    let r = genecis(&["run", manifest(d, &w, &other).to_str().unwrap(), "-q"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr
            .contains("not the model whose embeddings are scored"),
        "{}",
        r.stderr
    );
    let r = genecis(&[
        "run",
        manifest(d, &w, "device = \"cpu\", methods = [\"lincir\"]")
            .to_str()
            .unwrap(),
        "-q",
    ]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("params.lincir") && r.stderr.contains("params.clip"),
        "{}",
        r.stderr
    );
}
