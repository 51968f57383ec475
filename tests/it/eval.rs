//! templates -> embed -> score end to end: real image files (placeholder
//! JPEGs written here), the tiny CLIP and Combiner of the parity fixtures,
//! recall checked against a brute-force computation.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float32Type, Float64Type, UInt32Type};
use genecis::framework::store::read_table;

use crate::common::{forward_tolerance, genecis, sql_csv, write, Manifest};
use crate::model::fixtures;

/// A small JPEG whose content depends on `seed` (gradients plus a hashed
/// pattern), so different ids give different embeddings.
pub(crate) fn jpeg(path: &Path, seed: u64, w: u32, h: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as u32;
        let c = |k: u32| ((x * (3 + k) + y * (5 + (v >> (k * 4)) % 7) + v * (k + 1)) % 256) as u8;
        image::Rgb([c(0), c(1), c(2)])
    });
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    img.save_with_format(path, image::ImageFormat::Jpeg)
        .unwrap();
}

fn coco_ref(id: u64) -> String {
    format!("{{\"val_image_id\": {id}}}")
}

fn vaw_ref(id: u64, b: [f64; 4]) -> String {
    format!(
        "{{\"image_id\": \"{id}\", \"instance_bbox\": [{}, {}, {}, {}], \"object_name\": \"thing\"}}",
        b[0], b[1], b[2], b[3]
    )
}

fn template(cond: &str, r: &str, t: &str, gallery: &[String]) -> String {
    format!(
        "{{\"condition\": \"{cond}\", \"reference\": {r}, \"target\": {t}, \"gallery\": [{}]}}",
        gallery.join(", ")
    )
}

pub(crate) struct World {
    pub(crate) coco_json: PathBuf,
    pub(crate) vaw_json: PathBuf,
    pub(crate) coco_dir: PathBuf,
    pub(crate) vg_dir: PathBuf,
    pub(crate) coco_ids: BTreeSet<u64>,
    vaw_keys: BTreeSet<String>,
}

/// The `templates` stage's params over a generated world.
pub(crate) fn templates_params(w: &World) -> String {
    format!(
        "focus_object = \"{}\", focus_attribute = \"{}\", coco_dir = \"{}\", vg_dir = \"{}\"",
        w.coco_json.display(),
        w.vaw_json.display(),
        w.coco_dir.display(),
        w.vg_dir.display()
    )
}

/// 6 COCO-style templates over 20 images (gallery 14) and 4 VAW-style ones
/// over 5 images: one (image, box) pair repeats, one image has two boxes.
pub(crate) fn small_world(dir: &Path) -> World {
    let coco_dir = dir.join("coco/val2017");
    let vg_dir = dir.join("vg/images");
    let pool: Vec<u64> = (0..20).map(|i| 100_000 + i * 37).collect();
    let mut coco_ids = BTreeSet::new();
    let conds = ["cardboard", "wall", "dog", "red car", "on beach", "wall"];
    let mut ts = Vec::new();
    for (t, cond) in conds.iter().enumerate() {
        let ids: Vec<u64> = (0..16).map(|k| pool[(t * 3 + k) % pool.len()]).collect();
        coco_ids.extend(ids.iter().copied());
        let gallery: Vec<String> = ids[2..].iter().map(|&i| coco_ref(i)).collect();
        ts.push(template(
            cond,
            &coco_ref(ids[0]),
            &coco_ref(ids[1]),
            &gallery,
        ));
    }
    let coco_json = dir.join("focus_object.json");
    write(&coco_json, format!("[{}]", ts.join(",\n")));
    for &id in &coco_ids {
        jpeg(&coco_dir.join(format!("{id:012}.jpg")), id, 48, 36);
    }
    let boxes = [
        [4.0, 3.0, 20.0, 10.0],
        [30.0, 20.0, 15.0, 30.0],
        [0.5, 0.5, 40.0, 40.0],
        [10.0, 5.0, 8.0, 25.5],
    ];
    let mut vaw_keys = BTreeSet::new();
    let mut vs = Vec::new();
    for t in 0..4u64 {
        let r = vaw_ref(7, boxes[0]);
        vaw_keys.insert(format!("vg/7.jpg#{},{},{},{}", 4, 3, 20, 10));
        let tgt_box = boxes[(t as usize + 1) % 4];
        let tgt = vaw_ref(8 + t % 2, tgt_box);
        vaw_keys.insert(format!(
            "vg/{}.jpg#{},{},{},{}",
            8 + t % 2,
            tgt_box[0],
            tgt_box[1],
            tgt_box[2],
            tgt_box[3]
        ));
        let gallery: Vec<String> = (0..3)
            .map(|g| {
                let id = 10 + g;
                let b = boxes[(g as usize + t as usize) % 4];
                vaw_keys.insert(format!("vg/{id}.jpg#{},{},{},{}", b[0], b[1], b[2], b[3]));
                vaw_ref(id, b)
            })
            .collect();
        vs.push(template(
            ["color", "material", "shape", "color"][t as usize],
            &r,
            &tgt,
            &gallery,
        ));
    }
    let vaw_json = dir.join("focus_attribute.json");
    write(&vaw_json, format!("[{}]", vs.join(",\n")));
    for id in 7..13u64 {
        jpeg(&vg_dir.join(format!("{id}.jpg")), id * 7919, 64, 48);
    }
    World {
        coco_json,
        vaw_json,
        coco_dir,
        vg_dir,
        coco_ids,
        vaw_keys,
    }
}

pub(crate) fn manifest(dir: &Path, w: &World, combiner: bool) -> PathBuf {
    let fx = fixtures();
    let comb = if combiner {
        format!(
            ", combiner = \"{}\"",
            fx.join("combiner_state.pt").display()
        )
    } else {
        String::new()
    };
    let m = Manifest::new("eval-test")
        .stage(
            "templates",
            "templates",
            &[],
            &templates_params(w),
        )
        .stage(
            "embed",
            "embed",
            &["templates"],
            &format!(
                "checkpoint = \"{}\", model = \"tiny-vit\", device = \"cpu\", batch_size = 4, chunk_size = 8",
                fx.join("vit_state.pt").display()
            ),
        )
        .stage("score", "score", &["templates", "embed"], &format!("device = \"cpu\"{comb}"));
    let path = dir.join("eval.toml");
    write(&path, m.toml());
    path
}

pub(crate) fn embeddings(dir: &Path, key: &str) -> HashMap<String, Vec<f32>> {
    let mut out = HashMap::new();
    for b in read_table(dir).unwrap() {
        let k = b.column_by_name(key).unwrap().as_string::<i32>().clone();
        let e = b
            .column_by_name("embedding")
            .unwrap()
            .as_fixed_size_list()
            .clone();
        for i in 0..b.num_rows() {
            let v = e.value(i);
            let v = v.as_primitive::<Float32Type>();
            out.insert(k.value(i).to_string(), v.values().to_vec());
        }
    }
    out
}

pub(crate) fn unit(v: &[f32]) -> Vec<f64> {
    let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    v.iter().map(|x| *x as f64 / n).collect()
}

/// Rank of candidate 0 by sorting all candidates (stable, descending).
fn brute_rank(q: &[f64], cands: &[Vec<f64>]) -> usize {
    let sims: Vec<f64> = cands
        .iter()
        .map(|c| c.iter().zip(q).map(|(a, b)| a * b).sum())
        .collect();
    let mut order: Vec<usize> = (0..sims.len()).collect();
    order.sort_by(|&a, &b| sims[b].partial_cmp(&sims[a]).unwrap());
    order.iter().position(|&i| i == 0).unwrap() + 1
}

struct TemplateRow {
    task: String,
    id: u32,
    cond: String,
    keys: Vec<String>,
}

fn templates(dir: &Path) -> Vec<TemplateRow> {
    let mut out = Vec::new();
    for b in read_table(dir).unwrap() {
        let s = |n: &str| b.column_by_name(n).unwrap().as_string::<i32>().clone();
        let (task, cond, r, t) = (
            s("task"),
            s("condition"),
            s("reference_key"),
            s("target_key"),
        );
        let id = b
            .column_by_name("template_id")
            .unwrap()
            .as_primitive::<UInt32Type>()
            .clone();
        let g = b
            .column_by_name("gallery_keys")
            .unwrap()
            .as_list::<i32>()
            .clone();
        for i in 0..b.num_rows() {
            let gl = g.value(i);
            let gl = gl.as_string::<i32>();
            let mut keys = vec![r.value(i).to_string(), t.value(i).to_string()];
            keys.extend((0..gl.len()).map(|j| gl.value(j).to_string()));
            out.push(TemplateRow {
                task: task.value(i).to_string(),
                id: id.value(i),
                cond: cond.value(i).to_string(),
                keys,
            });
        }
    }
    out
}

fn results(dir: &Path) -> HashMap<(String, String), [f64; 3]> {
    let mut out = HashMap::new();
    for b in read_table(dir).unwrap() {
        let s = |n: &str| b.column_by_name(n).unwrap().as_string::<i32>().clone();
        let f = |n: &str| {
            b.column_by_name(n)
                .unwrap()
                .as_primitive::<Float64Type>()
                .clone()
        };
        let (task, method) = (s("task"), s("method"));
        let (a1, a2, a3) = (f("recall_at_1"), f("recall_at_2"), f("recall_at_3"));
        for i in 0..b.num_rows() {
            out.insert(
                (task.value(i).to_string(), method.value(i).to_string()),
                [a1.value(i), a2.value(i), a3.value(i)],
            );
        }
    }
    out
}

#[test]
fn coco_and_vaw_templates_end_to_end_with_brute_force_recall() {
    let tmp = tempfile::tempdir().unwrap();
    let w = small_world(tmp.path());
    let m = manifest(tmp.path(), &w, true);
    let ms = m.to_str().unwrap();
    let r = genecis(&["run", ms, "-q"]);
    r.ok();
    assert!(
        r.stdout.contains("image_plus_text"),
        "results table printed:\n{}",
        r.stdout
    );
    let run = tmp.path().join("run");

    // Each distinct image key once: 20 COCO images, and the VAW (image, box) pairs.
    let keys: Vec<String> = read_table(&run.join("templates/image_keys"))
        .unwrap()
        .iter()
        .flat_map(|b| {
            let k = b
                .column_by_name("image_key")
                .unwrap()
                .as_string::<i32>()
                .clone();
            (0..k.len()).map(move |i| k.value(i).to_string())
        })
        .collect();
    let expected: BTreeSet<String> = w
        .coco_ids
        .iter()
        .map(|id| format!("coco/{id:012}.jpg"))
        .chain(w.vaw_keys.iter().cloned())
        .collect();
    assert_eq!(keys.iter().cloned().collect::<BTreeSet<_>>(), expected);
    assert_eq!(keys.len(), expected.len());
    let img = embeddings(&run.join("embed/image_embeddings"), "image_key");
    let txt = embeddings(&run.join("embed/text_embeddings"), "text");
    assert_eq!(img.len(), expected.len());
    assert!(img.values().all(|v| v.len() == 32));
    assert_eq!(txt.len(), 8, "distinct conditions of both files");
    // The crop path: one image, two boxes -> two different embeddings.
    let a = &img["vg/10.jpg#4,3,20,10"];
    let b = &img["vg/10.jpg#30,20,15,30"];
    assert!(a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-4));

    // Brute force: cosine, sorted ranks; image_plus_text averages the raw
    // features, as the original's FeatureComb does.
    let ts = templates(&run.join("templates/templates"));
    assert_eq!(ts.len(), 10);
    let comb = genecis::model::combiner::Combiner::new(
        genecis::model::StateDict::load(&fixtures().join("combiner_state.pt"), tch::Device::Cpu)
            .unwrap(),
    )
    .unwrap();
    let mut ranks: HashMap<(String, u32, String), usize> = HashMap::new();
    let mut hits: HashMap<(String, String), [usize; 3]> = HashMap::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for t in &ts {
        *counts.entry(t.task.clone()).or_default() += 1;
        let r = unit(&img[&t.keys[0]]);
        let x = unit(&txt[&t.cond]);
        let cands: Vec<Vec<f64>> = t.keys[1..].iter().map(|k| unit(&img[k])).collect();
        let mix: Vec<f64> = img[&t.keys[0]]
            .iter()
            .zip(&txt[&t.cond])
            .map(|(a, b)| 0.5 * *a as f64 + 0.5 * *b as f64)
            .collect();
        let mix_n = {
            let n = mix.iter().map(|v| v * v).sum::<f64>().sqrt();
            mix.iter().map(|v| v / n).collect::<Vec<_>>()
        };
        let ci = tch::Tensor::from_slice(&img[&t.keys[0]]).view([1, 32]);
        let ct = tch::Tensor::from_slice(&txt[&t.cond]).view([1, 32]);
        let c = Vec::<f32>::try_from(comb.forward(&ci, &ct).unwrap().view([-1])).unwrap();
        for (method, q) in [
            ("image_only", r.clone()),
            ("text_only", x.clone()),
            ("image_plus_text", mix_n),
            ("combiner", unit(&c)),
        ] {
            let rank = brute_rank(&q, &cands);
            ranks.insert((t.task.clone(), t.id, method.to_string()), rank);
            let h = hits
                .entry((t.task.clone(), method.to_string()))
                .or_default();
            for (k, hk) in h.iter_mut().enumerate() {
                if rank <= k + 1 {
                    *hk += 1;
                }
            }
        }
    }
    let res = results(&run.join("score/results"));
    for ((task, method), h) in &hits {
        let got = res[&(task.clone(), method.clone())];
        for k in 0..3 {
            let want = h[k] as f64 / counts[task] as f64;
            assert!(
                (got[k] - want).abs() < 1e-12,
                "{task} {method} R@{}: {} vs {want}",
                k + 1,
                got[k]
            );
        }
    }
    // The average row is the mean over the two tasks.
    for method in ["image_only", "text_only", "image_plus_text", "combiner"] {
        let avg = res[&("average".to_string(), method.to_string())];
        let fa = res[&("focus_attribute".to_string(), method.to_string())];
        let fo = res[&("focus_object".to_string(), method.to_string())];
        assert!((avg[0] - (fa[0] + fo[0]) / 2.0).abs() < 1e-12);
    }
    // Per-template ranks agree too.
    let rows = sql_csv(
        &m,
        "SELECT task, template_id, method, target_rank, array_length(similarities, 1) FROM scores",
    );
    assert_eq!(rows.len() - 1, 40);
    for row in &rows[1..] {
        let f: Vec<&str> = row.split(',').collect();
        let key = (f[0].to_string(), f[1].parse().unwrap(), f[2].to_string());
        assert_eq!(f[3].parse::<usize>().unwrap(), ranks[&key], "{row}");
        assert_eq!(f[4], if f[0] == "focus_object" { "15" } else { "4" });
    }

    // Report and chart in the stage folder.
    let md = std::fs::read_to_string(run.join("score/report.md")).unwrap();
    assert!(md.contains("| combiner |") && md.contains("focus_object R@1"));
    let png = image::open(run.join("score/results.png")).unwrap();
    assert_eq!((png.width(), png.height()), (960, 540));

    // Up to date on a second run.
    let again = genecis(&["run", ms, "-q"]);
    again.ok();
    assert_eq!(
        again.stdout.matches("): up to date").count(),
        3,
        "{}",
        again.stdout
    );
}

#[test]
fn missing_and_corrupt_images_are_named_before_and_during_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let w = small_world(tmp.path());
    let m = manifest(tmp.path(), &w, false);
    let ms = m.to_str().unwrap();
    let gone = w
        .coco_dir
        .join(format!("{:012}.jpg", w.coco_ids.iter().next().unwrap()));
    std::fs::remove_file(&gone).unwrap();

    let c = genecis(&["check", ms]);
    assert_eq!(c.code, 1, "{}{}", c.stdout, c.stderr);
    assert!(
        c.stdout.contains("do not exist") && c.stdout.contains(gone.to_str().unwrap()),
        "{}",
        c.stdout
    );
    assert!(
        c.stdout.contains("warn") && c.stdout.contains("5,000"),
        "{}",
        c.stdout
    );

    // run does the same check first, and writes nothing.
    let r = genecis(&["run", ms, "-q"]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("nothing was run") && r.stderr.contains(gone.to_str().unwrap()),
        "{}",
        r.stderr
    );
    assert!(!tmp.path().join("run").exists());

    // Past the check, embed names the missing file before encoding.
    let r = genecis(&["run", ms, "-q", "--skip-check"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("do not exist") && r.stderr.contains(gone.to_str().unwrap()),
        "{}",
        r.stderr
    );

    // A corrupt file fails its chunk only; after the fix the rerun keeps the others.
    jpeg(&gone, 1, 48, 36);
    let bad = w.vg_dir.join("9.jpg");
    std::fs::write(&bad, b"not a jpeg at all").unwrap();
    let r = genecis(&["run", ms, "-q", "--skip-check"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("could not be read") && r.stderr.contains("vg/9.jpg#"),
        "{}",
        r.stderr
    );
    jpeg(&bad, 9 * 7919, 64, 48);
    let r = genecis(&["run", ms, "-q"]);
    r.ok();
    assert!(r.stdout.contains("resumed"), "{}", r.stdout);
}

#[test]
fn check_explains_vg_split_folders_and_bad_template_files() {
    let tmp = tempfile::tempdir().unwrap();
    let w = small_world(tmp.path());
    // VG as shipped: two subfolders instead of one folder of images.
    let shipped = tmp.path().join("vg_shipped");
    std::fs::create_dir_all(shipped.join("VG_100K")).unwrap();
    std::fs::create_dir_all(shipped.join("VG_100K_2")).unwrap();
    for id in 7..13u64 {
        std::fs::copy(
            w.vg_dir.join(format!("{id}.jpg")),
            shipped.join("VG_100K").join(format!("{id}.jpg")),
        )
        .unwrap();
    }
    // A malformed template among good ones.
    let broken = tmp.path().join("broken.json");
    let text = std::fs::read_to_string(&w.coco_json).unwrap();
    write(
        &broken,
        text.replacen(
            "\"gallery\": [",
            "\"gallery\": [{\"val_image_id\": -3}, ",
            1,
        ),
    );
    let m = manifest(tmp.path(), &w, false);
    let ms = m.to_str().unwrap();
    let c = genecis(&[
        "check",
        ms,
        "--set",
        &format!("templates.vg_dir={}", shipped.display()),
        "--set",
        &format!("templates.focus_object={}", broken.display()),
    ]);
    assert_eq!(c.code, 1);
    assert!(
        c.stdout.contains("VG_100K") && c.stdout.contains("one folder") && c.stdout.contains("ln "),
        "{}",
        c.stdout
    );
    assert!(
        c.stdout.contains("1 of 6 templates") && c.stdout.contains("#0: gallery[0]"),
        "{}",
        c.stdout
    );

    // A file that is not a template list at all.
    write(&broken, "{\"not\": \"a list\"}");
    let c = genecis(&[
        "check",
        ms,
        "--set",
        &format!("templates.focus_object={}", broken.display()),
    ]);
    assert_eq!(c.code, 1);
    assert!(
        c.stdout.contains("expected a JSON array of templates"),
        "{}",
        c.stdout
    );

    // A checkpoint that is not one.
    let c = genecis(&[
        "check",
        ms,
        "--set",
        &format!("embed.checkpoint={}", w.coco_json.display()),
    ]);
    assert_eq!(c.code, 1);
    assert!(
        c.stdout.contains("checkpoint") && c.stdout.contains("cannot load"),
        "{}",
        c.stdout
    );

    // Malformed templates go to rejects when run anyway.
    write(
        &broken,
        text.replacen(
            "\"gallery\": [",
            "\"gallery\": [{\"val_image_id\": -3}, ",
            1,
        ),
    );
    let r = genecis(&[
        "run",
        ms,
        "-q",
        "--skip-check",
        "--only",
        "templates",
        "--set",
        &format!("templates.focus_object={}", broken.display()),
    ]);
    r.ok();
    let rej = sql_csv(&m, "SELECT line_number, reason FROM templates.rejects");
    assert_eq!(rej.len(), 2, "{rej:?}");
    assert!(
        rej[1].starts_with("0,gallery[0]: val_image_id -3"),
        "{rej:?}"
    );
}

#[test]
fn score_params_are_validated_before_running() {
    let tmp = tempfile::tempdir().unwrap();
    let w = small_world(tmp.path());
    let m = manifest(tmp.path(), &w, false);
    let ms = m.to_str().unwrap();
    let r = genecis(&[
        "run",
        ms,
        "--set",
        "score.methods=[\"combiner\"]",
        "--set",
        "score.text_weight=2",
    ]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("params.combiner") && r.stderr.contains("params.text_weight"),
        "{}",
        r.stderr
    );
    assert!(!tmp.path().join("run").exists());
}

#[test]
fn shipped_eval_manifest_checks_with_paths_set() {
    let tmp = tempfile::tempdir().unwrap();
    let w = small_world(tmp.path());
    let m = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/genecis_eval.toml");
    let ms = m.to_str().unwrap();
    // As shipped, the data paths do not exist: a clear validation error.
    let r = genecis(&["check", ms]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("params.focus_object") && r.stderr.contains("does not exist"),
        "{}",
        r.stderr
    );
    let fx = fixtures();
    let set = |k: &str, v: &Path| format!("{k}={}", v.display());
    let args = [
        set("templates.focus_attribute", &w.vaw_json),
        set("templates.change_attribute", &w.vaw_json),
        set("templates.focus_object", &w.coco_json),
        set("templates.change_object", &w.coco_json),
        set("templates.coco_dir", &w.coco_dir),
        set("templates.vg_dir", &w.vg_dir),
        set("embed.checkpoint", &fx.join("vit_state.pt")),
        set("score.combiner", &fx.join("combiner_state.pt")),
    ];
    let mut cmd = vec!["check", ms];
    for a in &args {
        cmd.push("--set");
        cmd.push(a);
    }
    let c = genecis(&cmd);
    c.ok();
    assert!(c.stdout.contains("all checks passed"), "{}", c.stdout);
}

/// The official object templates: every template loads, and each distinct
/// image is encoded once (2,198 and 2,739 of 31,360 references).
#[test]
fn real_object_templates_encode_each_image_once() {
    let (Some(fo), Some(co)) = (
        crate::common::shared("data/genecis/focus_object.json"),
        crate::common::shared("data/genecis/change_object.json"),
    ) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let coco = tmp.path().join("val2017");
    let mut ids = BTreeSet::new();
    for f in [&fo, &co] {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        for t in v.as_array().unwrap() {
            let mut add = |x: &serde_json::Value| {
                ids.insert(x["val_image_id"].as_u64().unwrap());
            };
            add(&t["reference"]);
            add(&t["target"]);
            t["gallery"].as_array().unwrap().iter().for_each(add);
        }
    }
    for &id in &ids {
        jpeg(&coco.join(format!("{id:012}.jpg")), id, 24, 18);
    }
    let fx = fixtures();
    let m = Manifest::new("real-object")
        .stage(
            "templates",
            "templates",
            &[],
            &format!(
                "focus_object = \"{}\", change_object = \"{}\", coco_dir = \"{}\"",
                fo.display(),
                co.display(),
                coco.display()
            ),
        )
        .stage(
            "embed",
            "embed",
            &["templates"],
            &format!(
                "checkpoint = \"{}\", device = \"cpu\", batch_size = 256",
                fx.join("vit_state.pt").display()
            ),
        )
        .stage(
            "score",
            "score",
            &["templates", "embed"],
            &format!("combiner = \"{}\"", fx.join("combiner_state.pt").display()),
        )
        .write(tmp.path());
    genecis(&["run", m.to_str().unwrap(), "-q"]).ok();
    let counts = sql_csv(
        &m,
        "SELECT task, count(*) AS n, count(DISTINCT reference_key) AS refs FROM templates GROUP BY task ORDER BY task",
    );
    assert!(
        counts[1].starts_with("change_object,1960,") && counts[2].starts_with("focus_object,1960,")
    );
    let distinct = sql_csv(
        &m,
        "SELECT task, count(DISTINCT k) FROM (
           SELECT task, reference_key AS k FROM templates
           UNION ALL SELECT task, target_key FROM templates
           UNION ALL SELECT task, unnest(gallery_keys) FROM templates) GROUP BY task ORDER BY task",
    );
    assert_eq!(distinct[1..], ["change_object,2739", "focus_object,2198"]);
    let refs = sql_csv(&m, "SELECT sum(1 + 1 + array_length(gallery_keys, 1)) FROM templates WHERE task = 'focus_object'");
    assert_eq!(refs[1], "31360");
    let enc = sql_csv(&m, "SELECT count(*) FROM image_embeddings");
    assert_eq!(enc[1], ids.len().to_string());
    assert_eq!(
        sql_csv(&m, "SELECT count(*) FROM templates.rejects")[1],
        "0"
    );
    let res = sql_csv(
        &m,
        "SELECT task, n_templates FROM results WHERE method = 'combiner' ORDER BY task",
    );
    assert_eq!(
        res[1..],
        ["average,3920", "change_object,1960", "focus_object,1960"]
    );
}

#[test]
fn embed_resumes_after_kill_minus_9_with_the_same_embeddings() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let w = small_world(tmp.path());
    let m = manifest(tmp.path(), &w, false);
    let ms = m.to_str().unwrap();
    let one = ["--set", "embed.chunk_size=1"];
    genecis(&["run", ms, "-q", "--only", "templates"]).ok();
    let run = tmp.path().join("run");
    let mut killed_midway = false;
    for _attempt in 0..5 {
        let mut child = crate::common::bin()
            .args(["run", ms, "-q", "--only", "embed", one[0], one[1]])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        loop {
            let n = crate::common::work_folders(&run, "embed")
                .first()
                .and_then(|f| std::fs::read_dir(f.join("image_embeddings")).ok())
                .map(|d| d.count())
                .unwrap_or(0);
            if n >= 3 || t0.elapsed() > Duration::from_secs(120) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if crate::common::head_record(&run, "embed").is_none() {
            killed_midway = true;
            break;
        }
        crate::common::drop_stage(&run, "embed");
    }
    assert!(
        killed_midway,
        "could not interrupt embed before it finished"
    );
    let r = genecis(&["run", ms, "-q", "--only", "embed", one[0], one[1]]);
    r.ok();
    assert!(r.stdout.contains("resumed"), "{}", r.stdout);
    let resumed = embeddings(&tmp.path().join("run/embed/image_embeddings"), "image_key");

    let fresh = tempfile::tempdir().unwrap();
    let w2 = small_world(fresh.path());
    let m2 = manifest(fresh.path(), &w2, false);
    genecis(&["run", m2.to_str().unwrap(), "-q", one[0], one[1]]).ok();
    let whole = embeddings(
        &fresh.path().join("run/embed/image_embeddings"),
        "image_key",
    );
    assert_eq!(resumed.len(), whole.len());
    for (k, v) in &whole {
        assert_eq!(&resumed[k], v, "{k}");
    }
}

/// The whole evaluation against a Python transcription of the original's
/// (scripts/make_eval_fixtures.py: torchvision preprocessing, the VAW crop,
/// clip.tokenize, eval_functions.validate with the Combiner and
/// FeatureComb) on a 224 px random CLIP, a `module.`-prefixed Combiner and
/// real JPEGs (grayscale among them): every similarity within float32's
/// bound for the model, and the same target rank for every template and
/// method. A rank may differ only where the measured similarity error
/// explains it: ours and the original's order two candidates differently
/// only if their similarities are within the two errors of each other.
#[test]
fn scores_match_the_original_evaluation() {
    use arrow::array::ListArray;
    let dir = crate::common::script_fixtures("make_eval_fixtures.py", "refs.json");
    let tmp = tempfile::tempdir().unwrap();
    let file = |n: &str| dir.join(n).display().to_string();
    let m = Manifest::new("parity")
        .stage(
            "templates",
            "templates",
            &[],
            &format!(
                "focus_attribute = \"{}\", change_attribute = \"{}\", focus_object = \"{}\", change_object = \"{}\", coco_dir = \"{}\", vg_dir = \"{}\"",
                file("focus_attribute.json"),
                file("change_attribute.json"),
                file("focus_object.json"),
                file("change_object.json"),
                file("coco"),
                file("vg")
            ),
        )
        .stage(
            "embed",
            "embed",
            &["templates"],
            &format!("checkpoint = \"{}\", device = \"cpu\", batch_size = 16", file("clip_vit224.pt")),
        )
        .stage(
            "score",
            "score",
            &["templates", "embed"],
            &format!("combiner = \"{}\", device = \"cpu\"", file("combiner_module.pt")),
        )
        .write(tmp.path());
    genecis(&["run", m.to_str().unwrap(), "-q"]).ok();

    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("refs.json")).unwrap()).unwrap();
    let mut ours: HashMap<(String, u32, String), (u32, Vec<f32>)> = HashMap::new();
    for b in read_table(&tmp.path().join("run/score/scores")).unwrap() {
        let task = b.column_by_name("task").unwrap().as_string::<i32>().clone();
        let id = b
            .column_by_name("template_id")
            .unwrap()
            .as_primitive::<UInt32Type>()
            .clone();
        let method = b
            .column_by_name("method")
            .unwrap()
            .as_string::<i32>()
            .clone();
        let rank = b
            .column_by_name("target_rank")
            .unwrap()
            .as_primitive::<UInt32Type>()
            .clone();
        let sims = b
            .column_by_name("similarities")
            .unwrap()
            .as_any()
            .downcast_ref::<ListArray>()
            .unwrap()
            .clone();
        for i in 0..b.num_rows() {
            let s = sims.value(i);
            ours.insert(
                (task.value(i).into(), id.value(i), method.value(i).into()),
                (
                    rank.value(i),
                    s.as_primitive::<arrow::datatypes::Float32Type>()
                        .values()
                        .to_vec(),
                ),
            );
        }
    }
    // The fixture's ViT: its patch conv sums 3 x 32 x 32 terms; 2 + 2 x 7
    // products through the towers, 4 more in the Combiner. Similarities are
    // cosines, at most 1 in size.
    let tol = forward_tolerance(3 * 32 * 32, 2 + 2 * 7 + 4, tch::Device::Cpu);
    let (mut n, mut worst, mut near_ties) = (0, 0f64, 0);
    let mut rank_diffs = Vec::new();
    for (task, rows) in refs.as_object().unwrap() {
        for r in rows.as_array().unwrap() {
            let key = (
                task.clone(),
                r["template_id"].as_u64().unwrap() as u32,
                r["method"].as_str().unwrap().to_string(),
            );
            let (rank, sims) = ours
                .get(&key)
                .unwrap_or_else(|| panic!("no score for {key:?}"));
            let want: Vec<f64> = r["similarities"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(sims.len(), want.len(), "{key:?}");
            for (a, b) in sims.iter().zip(&want) {
                worst = worst.max((*a as f64 - b).abs());
            }
            let err = sims
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            let near_tie = want[1..].iter().any(|s| (s - want[0]).abs() <= 2.0 * err);
            if near_tie {
                near_ties += 1;
            } else if *rank as u64 != r["target_rank"].as_u64().unwrap() {
                rank_diffs.push(format!(
                    "{key:?}: ours {rank}, original {}",
                    r["target_rank"]
                ));
            }
            n += 1;
        }
    }
    eprintln!("evaluation parity: {n} (template, method) pairs, largest similarity difference {worst:.2e} (bound {tol:.1e}), {near_ties} near ties");
    assert_eq!(n, ours.len(), "we score templates the original does not");
    assert_eq!(n, 4 * 6 * 4);
    assert!(rank_diffs.is_empty(), "{}", rank_diffs.join("\n"));
    assert!(
        worst <= tol,
        "similarities differ by up to {worst} (bound {tol})"
    );
    assert!(
        near_ties * 10 < n,
        "too many near ties ({near_ties}) to test ranks"
    );
}

/// The original evaluates only templates whose gallery has the file's most
/// common size; the others are rejects here, unless asked to keep them.
#[test]
fn odd_gallery_sizes_are_dropped_as_the_original_does() {
    let tmp = tempfile::tempdir().unwrap();
    let w = small_world(tmp.path());
    let mut ts: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&w.coco_json).unwrap()).unwrap();
    ts[2]["gallery"].as_array_mut().unwrap().pop();
    write(&w.coco_json, serde_json::to_string(&ts).unwrap());
    let m = Manifest::new("odd")
        .stage(
            "templates",
            "templates",
            &[],
            &format!(
                "focus_object = \"{}\", coco_dir = \"{}\"",
                w.coco_json.display(),
                w.coco_dir.display()
            ),
        )
        .write(tmp.path());
    genecis(&["run", m.to_str().unwrap(), "-q"]).ok();
    assert_eq!(sql_csv(&m, "SELECT count(*) FROM templates")[1], "5");
    let rej = sql_csv(&m, "SELECT line_number, reason FROM rejects");
    assert!(
        rej.len() == 2 && rej[1].starts_with("2,gallery of 13 images; the file's usual size is 14"),
        "{rej:?}"
    );
    genecis(&[
        "run",
        m.to_str().unwrap(),
        "-q",
        "--set",
        "templates.keep_all_gallery_sizes=true",
    ])
    .ok();
    assert_eq!(sql_csv(&m, "SELECT count(*) FROM templates")[1], "6");
}

/// Every recall has its 95% interval, which holds the recall; every pair
/// of methods on every task has a paired row; the same run gives the same
/// intervals (seeded resamples).
#[test]
fn results_carry_intervals_and_paired_tests_reproducibly() {
    let dir = tempfile::tempdir().unwrap();
    let w = small_world(dir.path());
    let m = manifest(dir.path(), &w, true);
    genecis(&[
        "run",
        m.to_str().unwrap(),
        "-q",
        "--set",
        "score.bootstrap=2000",
    ])
    .ok();
    let run = dir.path().join("run");
    let rows = sql_csv(
        &run,
        "SELECT task, method, recall_at_1, recall_at_1_lo, recall_at_1_hi, recall_at_3_lo, recall_at_3_hi FROM score.results ORDER BY task, method",
    );
    assert_eq!(rows.len(), 1 + 3 * 4, "{rows:?}");
    for r in &rows[1..] {
        let v: Vec<f64> = r.split(',').skip(2).map(|x| x.parse().unwrap()).collect();
        assert!(
            v[1] <= v[0] && v[0] <= v[2],
            "R@1 outside its interval: {r}"
        );
        assert!(v[3] <= v[4], "{r}");
    }
    let paired = sql_csv(
        &run,
        "SELECT task, method_a, method_b, n, delta_recall_at_1, lo, hi, p_value FROM score.paired ORDER BY task, method_a, method_b",
    );
    // 3 tasks (two GeneCIS ones and their average) x C(4, 2) pairs.
    assert_eq!(paired.len(), 1 + 3 * 6, "{paired:?}");
    for r in &paired[1..] {
        let v: Vec<f64> = r.split(',').skip(3).map(|x| x.parse().unwrap()).collect();
        assert!(
            v[2] <= v[1] && v[1] <= v[3],
            "delta outside its interval: {r}"
        );
        assert!((0.0..=1.0).contains(&v[4]), "{r}");
    }
    let report = std::fs::read_to_string(run.join("score/report.md")).unwrap();
    assert!(report.contains("Paired differences in R@1"), "{report}");
    let html = std::fs::read_to_string(run.join("score/report.html")).unwrap();
    assert!(
        html.contains("id=\"paired\""),
        "report.html lists the pairs"
    );
    let before = std::fs::read(run.join("score/results/part-00000.parquet")).unwrap();
    genecis(&[
        "run",
        m.to_str().unwrap(),
        "-q",
        "--set",
        "score.bootstrap=2000",
        "--only",
        "score",
        "--force",
    ])
    .ok();
    let after = std::fs::read(run.join("score/results/part-00000.parquet")).unwrap();
    assert_eq!(before, after, "the same run gives the same intervals");
}

/// `genecis compare`: two runs on the same templates, per task and on the
/// average; a run on other templates is refused with the counts, and
/// compared on the common ones with --common.
#[test]
fn compare_two_runs_on_the_same_templates() {
    let dir = tempfile::tempdir().unwrap();
    let w = small_world(dir.path());
    let m = manifest(dir.path(), &w, false);
    let m = m.to_str().unwrap();
    let (ra, rb, rc) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    genecis(&["run", m, "-q", "--workdir", ra.to_str().unwrap()]).ok();
    genecis(&[
        "run",
        m,
        "-q",
        "--workdir",
        rb.to_str().unwrap(),
        "--set",
        "score.text_weight=0.9",
    ])
    .ok();
    let r = genecis(&[
        "compare",
        ra.to_str().unwrap(),
        rb.to_str().unwrap(),
        "--format",
        "csv",
    ]);
    r.ok();
    let lines: Vec<&str> = r.stdout.lines().collect();
    // 3 methods x (2 tasks + their average).
    assert_eq!(lines.len(), 1 + 3 * 3, "{}", r.stdout);
    for l in &lines[1..] {
        let f: Vec<&str> = l.split(',').collect();
        if f[1] == "image_only" {
            // The same queries in both runs: no difference at all.
            assert_eq!(
                (f[5], f[8], f[9], f[10]),
                ("0.0000", "1.000000", "0", "0"),
                "{l}"
            );
        }
        let v: Vec<f64> = f[5..8].iter().map(|x| x.parse().unwrap()).collect();
        assert!(v[1] <= v[0] && v[0] <= v[2], "{l}");
    }
    let table = genecis(&["compare", ra.to_str().unwrap(), rb.to_str().unwrap()]);
    assert!(table.ok().stdout.contains("average"), "{}", table.stdout);

    // Other templates: one template fewer in focus_object.
    let json = std::fs::read_to_string(&w.coco_json).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let fewer = serde_json::Value::Array(v.as_array().unwrap()[..5].to_vec());
    let other = dir.path().join("fewer.json");
    write(&other, fewer.to_string());
    let text = std::fs::read_to_string(m).unwrap().replace(
        &w.coco_json.display().to_string(),
        &other.display().to_string(),
    );
    let m2 = dir.path().join("fewer.toml");
    write(&m2, text);
    genecis(&[
        "run",
        m2.to_str().unwrap(),
        "-q",
        "--workdir",
        rc.to_str().unwrap(),
    ])
    .ok();
    let r = genecis(&["compare", ra.to_str().unwrap(), rc.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("different templates") && r.stderr.contains("1 only in A"),
        "{}",
        r.stderr
    );
    let r = genecis(&[
        "compare",
        ra.to_str().unwrap(),
        rc.to_str().unwrap(),
        "--common",
        "--format",
        "json",
    ]);
    let rows: serde_json::Value = serde_json::from_str(&r.ok().stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 9);
}

/// `exclude`: results gain `subset = "audited"` rows over the templates no
/// excluded audit check flags, and they agree with the scores of exactly
/// those templates.
#[test]
fn audited_subset_leaves_out_flagged_templates() {
    let dir = tempfile::tempdir().unwrap();
    let w = small_world(dir.path());
    let m = manifest(dir.path(), &w, false);
    genecis(&[
        "run",
        m.to_str().unwrap(),
        "-q",
        "--set",
        "score.exclude=[\"singleton_condition\"]",
        "--set",
        "score.bootstrap=500",
    ])
    .ok();
    let run = dir.path().join("run");
    let got = sql_csv(
        &run,
        "SELECT task, method, n_templates, recall_at_1 FROM score.results WHERE subset = 'audited' AND task <> 'average' ORDER BY task, method",
    );
    let want = sql_csv(
        &run,
        "SELECT s.task, s.method, count(*) AS n_templates, avg(CASE WHEN s.target_rank <= 1 THEN 1.0 ELSE 0.0 END) AS recall_at_1 \
         FROM score.scores s WHERE NOT EXISTS (SELECT 1 FROM score.audit a WHERE a.task = s.task AND a.template_id = s.template_id AND a.\"check\" = 'singleton_condition') \
         GROUP BY s.task, s.method ORDER BY s.task, s.method",
    );
    assert_eq!(got.len(), 1 + 2 * 3, "{got:?}");
    assert_eq!(got, want);
    // Both conditions' tasks lose their singletons: 6 -> 2 and 4 -> 2.
    assert!(
        got[1..].iter().all(|r| r.split(',').nth(2) == Some("2")),
        "{got:?}"
    );
    let all = sql_csv(
        &run,
        "SELECT count(*) FROM score.results WHERE subset = 'all'",
    );
    assert_eq!(all[1], "9");
    let r = genecis(&[
        "run",
        m.to_str().unwrap(),
        "-q",
        "--set",
        "score.exclude=[\"no_such_check\"]",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("no_such_check"), "{}", r.stderr);
}
