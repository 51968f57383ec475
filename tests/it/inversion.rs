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
    // COCO's most common size: at the tiny CLIP's 32 px its resized long
    // side is 47, a margin of 15, which torchvision's CenterCrop rounds to
    // 8 and transformers' floors to 7: every object-task image moves.
    for &id in &w.coco_ids {
        crate::eval::jpeg(&w.coco_dir.join(format!("{id:012}.jpg")), id, 640, 427);
    }
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
    let embed_only = ", inversion_preprocess = \"embed\"";
    for (variant, extra) in [
        ("published/lincir", String::new()),
        (
            "condition/lincir",
            ", inversion_object_condition = \"condition\"".to_string(),
        ),
        ("published", embed_only.to_string()),
        (
            "condition",
            format!(", inversion_object_condition = \"condition\"{embed_only}"),
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
        // `results` says how each method's images were prepared.
        let lincir = variant.ends_with("/lincir");
        for b in read_table(&run.join("score/results")).unwrap() {
            let col = |n: &str| b.column_by_name(n).unwrap().as_string::<i32>().clone();
            let (m, pre) = (col("method"), col("preprocess"));
            for i in 0..b.num_rows() {
                let want = match (m.value(i), lincir) {
                    ("image_only", _) | (_, false) => "embed: torchvision",
                    _ => "LinCIR: CLIPImageProcessor",
                };
                assert_eq!(pre.value(i), want, "{variant} {}", m.value(i));
            }
        }
        // The object prompt matters: the two variants' object scores differ.
        if variant == "condition/lincir" {
            let published = expected(&fx.join("expected"), "published/lincir");
            let k = ("lincir".to_string(), "focus_object".to_string(), 0);
            assert!(published[&k]
                .iter()
                .zip(&want[&k])
                .any(|(a, b)| (a - b).abs() > 1e-3));
        }
    }
    // The preprocessing matters: on the embed stage's torchvision crops the
    // object tasks' similarities move far beyond the bound, and ranks with
    // them; the default reproduces LinCIR's.
    let (old, new) = (
        expected(&fx.join("expected"), "published"),
        expected(&fx.join("expected"), "published/lincir"),
    );
    let mut moved = 0f64;
    let mut ranks_changed = 0;
    let rank = |e: &[f64]| e[1..].iter().filter(|&&x| x > e[0]).count();
    for (k, a) in &new {
        let b = &old[k];
        moved = moved.max(
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max),
        );
        ranks_changed += usize::from(rank(a) != rank(b));
    }
    println!("torchvision vs LinCIR's crops: similarities move by up to {moved:.2e}, {ranks_changed} of {} ranks change", new.len());
    assert!(moved > 100.0 * tol, "{moved:e}");
    assert!(
        ranks_changed > 0,
        "no rank changes: the case does not tell the crops apart"
    );
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

/// The two centre crops, against the libraries themselves on odd and even
/// margins: torchvision's `CenterCrop` rounds `(n - 224) / 2` half to even,
/// transformers' `center_crop` floors it; they part when `n - 224` is 3
/// mod 4 (640x427: 335 - 224 = 111 gives 56 and 55). Every value of both
/// pipelines equals ours, and the two differ exactly where they should.
#[test]
fn both_centre_crops_match_torchvision_and_transformers() {
    use genecis::model::preprocess::{load_rgb_with, to_tensor_with, ImageKey, Preprocess};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // (width, height): margins 111 (3 mod 4), 74, 76, 77 (1 mod 4), 79 (3), 0.
    let sizes = [
        (640, 427),
        (427, 640),
        (500, 375),
        (300, 224),
        (301, 224),
        (303, 224),
        (224, 224),
    ];
    for (i, (w, h)) in sizes.iter().enumerate() {
        crate::eval::jpeg(&d.join(format!("{i}.jpg")), 7 + i as u64, *w, *h);
    }
    crate::common::python_with(
        r#"
import sys, torch
from PIL import Image
from torchvision import transforms as T
from transformers import CLIPImageProcessor
mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# OpenAI's clip._transform(224).
tv = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(mean, std)])
# LinCIR's genecis/evaluate.py processor.
hf = CLIPImageProcessor(crop_size={"height": 224, "width": 224}, do_center_crop=True, do_convert_rgb=True,
                        do_normalize=True, do_rescale=True, do_resize=True, image_mean=mean, image_std=std,
                        resample=3, size={"shortest_edge": 224})
d, n = sys.argv[1], int(sys.argv[2])
out = {}
for i in range(n):
    im = Image.open(f"{d}/{i}.jpg")
    out[f"tv{i}"] = tv(im)
    out[f"hf{i}"] = torch.from_numpy(hf(im, return_tensors="np")["pixel_values"][0])
torch.save(out, f"{d}/ref.pt")
"#,
        &[d.to_str().unwrap(), &sizes.len().to_string()],
    );
    let refs: HashMap<String, tch::Tensor> = tch::Tensor::loadz_multi(d.join("ref.pt"))
        .unwrap()
        .into_iter()
        .collect();
    let tv = Preprocess::openai(224);
    let hf = Preprocess::huggingface(
        224,
        [0.48145466, 0.4578275, 0.40821073],
        [0.26862954, 0.26130258, 0.27577711],
        1.0 / 255.0,
    );
    for (i, (w, h)) in sizes.iter().enumerate() {
        let path = d.join(format!("{i}.jpg"));
        let key = ImageKey {
            path: &path,
            bbox: None,
            rgb_first: false,
        };
        let ours = |pre: &Preprocess| to_tensor_with(&load_rgb_with(&key, pre).unwrap(), pre);
        let (a, b) = (ours(&tv), ours(&hf));
        for (name, x) in [("tv", &a), ("hf", &b)] {
            let theirs = &refs[&format!("{name}{i}")];
            let differ = x.ne_tensor(theirs).sum(tch::Kind::Int64).int64_value(&[]);
            assert_eq!(
                differ, 0,
                "{name} {w}x{h}: {differ} values differ from the library's"
            );
        }
        let long = 224 * (*w).max(*h) / (*w).min(*h);
        let parts = (long - 224) % 4 == 3;
        let apart = a.ne_tensor(&b).sum(tch::Kind::Int64).int64_value(&[]);
        assert_eq!(
            apart > 0,
            parts,
            "{w}x{h}: margin {}, {apart} values apart",
            long - 224
        );
    }
}
