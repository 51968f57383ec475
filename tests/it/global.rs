//! The original's global evaluations, CIRR val and MIT-States test, on small
//! datasets in the real layouts written here: the queries `templates` makes,
//! recall against a brute-force ranking, and `check` naming what is missing.

use std::collections::HashMap;
use std::path::Path;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, UInt32Type};
use genecis::framework::store::read_table;

use crate::common::*;
use crate::eval::{embeddings, jpeg, unit};
use crate::model::fixtures;

/// CIRR: 12 val images (PNG, as CIRR ships), 8 captions, one caption whose
/// reference is not in the split; each caption's `img_set.members` holds
/// its reference, its target and 4 others, in a rotated order. The same
/// for test1 (its own 12 images), without targets.
fn cirr(root: &Path) {
    for split in ["val", "test1"] {
        let prefix = if split == "val" { "dev" } else { "test1" };
        let name = |i: usize| format!("{prefix}-{i}-0-img0");
        let mut names = serde_json::Map::new();
        for i in 0..12 {
            let rel = format!("./{prefix}/{}.png", name(i));
            let img = image::RgbImage::from_fn(40 + i as u32, 30 + 2 * i as u32, |x, y| {
                let i = i as u32 + if split == "val" { 0 } else { 7 };
                image::Rgb([(x * 5 + i * 20) as u8, (y * 7) as u8, ((x + y) * i) as u8])
            });
            std::fs::create_dir_all(root.join(prefix)).unwrap();
            img.save(root.join(format!("{prefix}/{}.png", name(i))))
                .unwrap();
            names.insert(name(i), serde_json::Value::String(rel));
        }
        let caps: Vec<serde_json::Value> = (0..9)
            .map(|i| {
                let caption = ["make it red", "add a dog", "on the beach", "remove the cup"][i % 4];
                let (r, t) = (i, (i * 5 + 3) % 12);
                let mut members: Vec<String> = vec![name(r), name(t)];
                members.extend((0..12).filter(|&j| j != r && j != t).take(4).map(name));
                members.rotate_left(i % 6);
                let mut c = serde_json::json!({
                    "pairid": 100 + i,
                    "reference": if i == 8 { "dev-99-0-img0".to_string() } else { name(r) },
                    "caption": caption,
                    "img_set": {"id": i, "members": members}
                });
                if split == "val" {
                    c["target_hard"] = name(t).into();
                    c["target_soft"] = serde_json::json!({});
                }
                c
            })
            .collect();
        write(
            &root.join(format!("cirr/image_splits/split.rc2.{split}.json")),
            serde_json::to_string(&names).unwrap(),
        );
        write(
            &root.join(format!("cirr/captions/cap.rc2.{split}.json")),
            serde_json::to_string(&caps).unwrap(),
        );
    }
}

/// MIT-States: two test nouns (tomato: 3 adjectives, fish: 2), a noun not
/// in the test list, an "adj" folder and a folder without an adjective.
fn mit_states(root: &Path) {
    let folders = [
        ("ripe tomato", 2),
        ("unripe tomato", 2),
        ("rotten tomato", 1),
        ("raw fish", 2),
        ("cooked fish", 1),
        ("old car", 2),
        ("adj tomato", 1),
        ("tomato", 1),
    ];
    let mut seed = 0;
    for (f, n) in folders {
        for j in 0..n {
            seed += 1;
            jpeg(
                &root.join(format!("images/{f}/img_{j}.jpg")),
                seed,
                48,
                36 + 4 * j,
            );
        }
    }
    // A grayscale image: the original converts it to RGB before resizing.
    image::GrayImage::from_fn(50, 40, |x, y| image::Luma([(x * 5 + y) as u8]))
        .save(root.join("images/raw fish/img_gray.jpg"))
        .unwrap();
}

/// The embed stage's params: the tiny ViT on the CPU.
fn embed_params() -> String {
    format!(
        "checkpoint = \"{}\", device = \"cpu\"",
        fixtures().join("vit_state.pt").display()
    )
}

/// Brute-force R@K and ranks: cosine against the whole gallery, the
/// reference at -1e5, rank = 1 + images strictly above the best hit.
fn brute(q: &[f64], gallery: &[Vec<f64>], reference: usize, hits: &[usize]) -> usize {
    let mut sims: Vec<f64> = gallery
        .iter()
        .map(|g| g.iter().zip(q).map(|(a, b)| a * b).sum())
        .collect();
    sims[reference] = -1e5;
    let best = hits.iter().map(|&h| sims[h]).fold(f64::MIN, f64::max);
    1 + sims.iter().filter(|&&s| s > best).count()
}

#[test]
fn cirr_and_mit_states_rank_the_whole_gallery() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, ms) = (tmp.path().join("cirr_root"), tmp.path().join("mit"));
    cirr(&c);
    mit_states(&ms);
    let fx = fixtures();
    let m = Manifest::new("global")
        .stage(
            "templates",
            "templates",
            &[],
            &format!(
                "cirr_dir = \"{}\", mit_states_dir = \"{}\"",
                c.display(),
                ms.display()
            ),
        )
        .stage("embed", "embed", &["templates"], &embed_params())
        .stage(
            "score",
            "score",
            &["templates", "embed"],
            &format!(
                "combiner = \"{}\", device = \"cpu\"",
                fx.join("combiner_state.pt").display()
            ),
        )
        .write(tmp.path());
    let ms_ = m.to_str().unwrap();
    // The caption that names no image is a check error; run anyway: it becomes a reject.
    let r = genecis(&["run", ms_, "-q", "--skip-check"]);
    assert!(r.ok().stdout.contains("R@1 / R@5 / R@10"), "{}", r.stdout);

    // The queries: CIRR one per good caption; MIT-States one per image and
    // other adjective of its noun (tomato 5 images x 2, fish 4 x 1).
    let n = sql_csv(
        &m,
        "SELECT task, count(*) FROM templates GROUP BY task ORDER BY task",
    );
    assert_eq!(n[1..], ["cirr_val,8", "mit_states,14"]);
    let rej = sql_csv(&m, "SELECT line_number, reason FROM templates.rejects");
    assert!(
        rej.len() == 2 && rej[1].contains("reference 'dev-99-0-img0' is not an image"),
        "{rej:?}"
    );
    let g = sql_csv(
        &m,
        "SELECT gallery_set, count(*) FROM galleries GROUP BY 1 ORDER BY 1",
    );
    assert_eq!(g[1..], ["cirr_val,12", "mit_states,9"]);
    let q = sql_csv(
        &m,
        "SELECT condition, array_length(target_keys, 1) FROM templates WHERE task = 'mit_states' AND reference_key = 'mit_states/raw fish/img_gray.jpg'",
    );
    assert_eq!(q[1..], ["cooked,1"]);
    let gray = sql_csv(
        &m,
        "SELECT rgb_first FROM image_keys WHERE image_key LIKE '%img_gray%'",
    );
    assert_eq!(gray[1], "true");

    // Brute force over the stored embeddings.
    let run = tmp.path().join("run");
    let img = embeddings(&run.join("embed/image_embeddings"), "image_key");
    let txt = embeddings(&run.join("embed/text_embeddings"), "text");
    let mut gallery: HashMap<String, Vec<String>> = HashMap::new();
    for b in read_table(&run.join("templates/galleries")).unwrap() {
        let s = b
            .column_by_name("gallery_set")
            .unwrap()
            .as_string::<i32>()
            .clone();
        let k = b
            .column_by_name("image_key")
            .unwrap()
            .as_string::<i32>()
            .clone();
        for i in 0..b.num_rows() {
            gallery
                .entry(s.value(i).into())
                .or_default()
                .push(k.value(i).into());
        }
    }
    let mut ranks: HashMap<(String, u32, String), u32> = HashMap::new();
    for b in read_table(&run.join("score/scores")).unwrap() {
        let t = b.column_by_name("task").unwrap().as_string::<i32>().clone();
        let id = b
            .column_by_name("template_id")
            .unwrap()
            .as_primitive::<UInt32Type>()
            .clone();
        let me = b
            .column_by_name("method")
            .unwrap()
            .as_string::<i32>()
            .clone();
        let rk = b
            .column_by_name("target_rank")
            .unwrap()
            .as_primitive::<UInt32Type>()
            .clone();
        let top = b
            .column_by_name("top_keys")
            .unwrap()
            .as_list::<i32>()
            .clone();
        for i in 0..b.num_rows() {
            // Recall_subset rows rank a subset, not the gallery.
            if !t.value(i).ends_with("_subset") {
                // The 10 best, the reference left out.
                assert_eq!(top.value(i).len(), 10.min(gallery[t.value(i)].len() - 1));
            }
            ranks.insert(
                (t.value(i).into(), id.value(i), me.value(i).into()),
                rk.value(i),
            );
        }
    }
    let mut hits: HashMap<(String, String), [usize; 3]> = HashMap::new();
    let mut count: HashMap<String, usize> = HashMap::new();
    for b in read_table(&run.join("templates/templates")).unwrap() {
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let (task, id, cond, rf, tk, sub) = (
            col("task"),
            col("template_id"),
            col("condition"),
            col("reference_key"),
            col("target_keys"),
            col("gallery_keys"),
        );
        for i in 0..b.num_rows() {
            let task = task.as_string::<i32>().value(i).to_string();
            let keys = &gallery[&task];
            let pos = |k: &str| keys.iter().position(|x| x == k).unwrap();
            let units: Vec<Vec<f64>> = keys.iter().map(|k| unit(&img[k])).collect();
            let reference = rf.as_string::<i32>().value(i);
            let targets = tk.as_list::<i32>().value(i);
            let targets: Vec<usize> = (0..targets.len())
                .map(|j| pos(targets.as_string::<i32>().value(j)))
                .collect();
            let (r, x) = (&img[reference], &txt[cond.as_string::<i32>().value(i)]);
            let mix: Vec<f32> = r.iter().zip(x).map(|(a, b)| 0.5 * a + 0.5 * b).collect();
            *count.entry(task.clone()).or_default() += 1;
            for (method, q) in [
                ("image_only", unit(r)),
                ("text_only", unit(x)),
                ("image_plus_text", unit(&mix)),
            ] {
                let want = brute(&q, &units, pos(reference), &targets);
                let tid = id.as_primitive::<UInt32Type>().value(i);
                assert_eq!(
                    ranks[&(task.clone(), tid, method.to_string())] as usize,
                    want,
                    "{task} #{tid} {method}"
                );
                let h = hits.entry((task.clone(), method.into())).or_default();
                for (j, k) in [1, 5, 10].into_iter().enumerate() {
                    h[j] += (want <= k) as usize;
                }
                // CIRR's Recall_subset: the target among img_set.members
                // without the reference, ties to the target.
                let members = sub.as_list::<i32>().value(i);
                let members: Vec<usize> = (0..members.len())
                    .map(|j| pos(members.as_string::<i32>().value(j)))
                    .collect();
                if task == "cirr_val" {
                    assert_eq!(members.len(), 5, "6 members less the reference");
                    assert!(!members.contains(&pos(reference)));
                    let sim =
                        |m: usize| -> f64 { units[m].iter().zip(&q).map(|(a, b)| a * b).sum() };
                    let t = targets[0];
                    let want = 1 + members
                        .iter()
                        .filter(|&&m| m != t && sim(m) > sim(t))
                        .count();
                    let key = ("cirr_val_subset".to_string(), tid, method.to_string());
                    assert_eq!(ranks[&key] as usize, want, "{key:?}");
                    let h = hits
                        .entry(("cirr_val_subset".into(), method.into()))
                        .or_default();
                    for (j, k) in [1, 2, 3].into_iter().enumerate() {
                        h[j] += (want <= k) as usize;
                    }
                    *count.entry("cirr_val_subset".into()).or_default() +=
                        usize::from(method == "image_only");
                }
            }
        }
    }
    for b in read_table(&run.join("score/results")).unwrap() {
        let s = |n: &str| b.column_by_name(n).unwrap().as_string::<i32>().clone();
        let f = |n: &str| {
            b.column_by_name(n)
                .unwrap()
                .as_primitive::<Float64Type>()
                .clone()
        };
        let (task, method) = (s("task"), s("method"));
        for i in 0..b.num_rows() {
            let key = (task.value(i).to_string(), method.value(i).to_string());
            let Some(h) = hits.get(&key) else { continue };
            let cols = if key.0.ends_with("_subset") {
                ["recall_at_1", "recall_at_2", "recall_at_3"]
            } else {
                ["recall_at_1", "recall_at_5", "recall_at_10"]
            };
            // Every hit of these small galleries is within 50.
            assert_eq!(f("recall_at_50").value(i), 1.0, "{key:?}");
            for (j, col) in cols.iter().enumerate() {
                let want = h[j] as f64 / count[&key.0] as f64;
                assert!((f(col).value(i) - want).abs() < 1e-12, "{key:?} {col}");
            }
        }
    }
    assert!(
        !sql_csv(&m, "SELECT task FROM results WHERE task = 'average'")
            .iter()
            .any(|l| l == "average")
    );
    for l in sql_csv(
        &m,
        "SELECT task, method, recall_at_1, recall_at_2, recall_at_3, recall_at_5, recall_at_10, recall_at_50, n_templates FROM results WHERE task LIKE 'cirr%' ORDER BY task, method",
    ) {
        eprintln!("{l}");
    }
}

#[test]
fn check_names_missing_cirr_and_mit_states_data() {
    let tmp = tempfile::tempdir().unwrap();
    let c = tmp.path().join("cirr_root");
    cirr(&c);
    std::fs::remove_file(c.join("dev/dev-3-0-img0.png")).unwrap();
    let ms = tmp.path().join("mit");
    jpeg(&ms.join("images/old car/a.jpg"), 1, 32, 32);
    let m = Manifest::new("global")
        .stage(
            "templates",
            "templates",
            &[],
            &format!(
                "cirr_dir = \"{}\", mit_states_dir = \"{}\"",
                c.display(),
                ms.display()
            ),
        )
        .write(tmp.path());
    let r = genecis(&["check", m.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout
            .contains("1 of the 12 cirr_val images do not exist")
            && r.stdout.contains("dev-3-0-img0.png"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("no images of the 49 test nouns"),
        "{}",
        r.stdout
    );
    // A missing file the stage reads is a manifest error: nothing runs.
    std::fs::remove_file(c.join("cirr/captions/cap.rc2.val.json")).unwrap();
    let r = genecis(&["check", m.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("cap.rc2.val.json"), "{}", r.stderr);
}

/// The shipped CIRR and MIT-States manifests run as they are, with only
/// the data and model paths set.
#[test]
fn shipped_global_manifests_run_with_paths_set() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, ms) = (tmp.path().join("cirr_root"), tmp.path().join("mit"));
    cirr(&c);
    mit_states(&ms);
    let fx = fixtures();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (manifest, param, dir, task) in [
        (
            "pipelines/cirr_val.toml",
            "templates.cirr_dir",
            &c,
            "cirr_val",
        ),
        (
            "pipelines/mit_states.toml",
            "templates.mit_states_dir",
            &ms,
            "mit_states",
        ),
    ] {
        let m = root.join(manifest);
        let work = tmp.path().join(task);
        let sets = [
            format!("{param}={}", dir.display()),
            format!("embed.checkpoint={}", fx.join("vit_state.pt").display()),
            format!("score.combiner={}", fx.join("combiner_state.pt").display()),
            "embed.device=cpu".to_string(),
            "score.device=cpu".to_string(),
        ];
        let mut args = vec![
            "run",
            m.to_str().unwrap(),
            "-q",
            "--skip-check",
            "--workdir",
            work.to_str().unwrap(),
        ];
        for s in &sets {
            args.push("--set");
            args.push(s);
        }
        genecis(&args).ok();
        let rows = sql_csv(
            &work,
            &format!("SELECT count(*) FROM results WHERE task = '{task}'"),
        );
        assert_eq!(rows[1], "4", "{manifest}: one row per method");
    }
}

/// CIRR test1 hides its targets: no recall, but the two files the CIRR
/// server takes, per method: each pair id's 50 best gallery images (here
/// all 11 but the reference) and the best 3 of its subset, by cosine.
#[test]
fn cirr_test1_writes_the_server_submission_files() {
    let tmp = tempfile::tempdir().unwrap();
    let c = tmp.path().join("cirr_root");
    cirr(&c);
    let m = Manifest::new("test1")
        .stage(
            "templates",
            "templates",
            &[],
            &format!("cirr_dir = \"{}\", cirr_split = \"test1\"", c.display()),
        )
        .stage("embed", "embed", &["templates"], &embed_params())
        .stage(
            "score",
            "score",
            &["templates", "embed"],
            "device = \"cpu\", methods = [\"image_only\"]",
        )
        .write(tmp.path());
    genecis(&["run", m.to_str().unwrap(), "-q", "--skip-check"]).ok();
    let run = tmp.path().join("run");
    assert_eq!(
        sql_csv(&m, "SELECT count(*) FROM results")[1],
        "0",
        "no recall without labels"
    );
    let img = embeddings(&run.join("embed/image_embeddings"), "image_key");
    let read = |metric: &str| -> serde_json::Map<String, serde_json::Value> {
        let f = run.join(format!("score/cirr_test1.image_only.{metric}.json"));
        serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap()
    };
    let (recall, subset) = (read("recall"), read("recall_subset"));
    assert_eq!(recall["version"], "rc2");
    assert_eq!(recall["metric"], "recall");
    assert_eq!(subset["metric"], "recall_subset");
    let key = |n: &str| format!("cirr/test1/{n}.png");
    let caps: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(c.join("cirr/captions/cap.rc2.test1.json")).unwrap())
            .unwrap();
    let mut seen = 0;
    for cap in &caps {
        let pid = cap["pairid"].to_string();
        let r = cap["reference"].as_str().unwrap();
        if !img.contains_key(&key(r)) {
            assert!(
                !recall.contains_key(&pid),
                "a rejected caption has no entry"
            );
            continue;
        }
        seen += 1;
        let q = unit(&img[&key(r)]);
        let sim = |n: &str| -> f64 { unit(&img[&key(n)]).iter().zip(&q).map(|(a, b)| a * b).sum() };
        let ranked = |names: Vec<String>| {
            let mut v: Vec<(f64, String)> = names.into_iter().map(|n| (sim(&n), n)).collect();
            v.sort_by(|a, b| b.0.total_cmp(&a.0));
            v.into_iter().map(|x| x.1).collect::<Vec<_>>()
        };
        let all: Vec<String> = (0..12)
            .map(|i| format!("test1-{i}-0-img0"))
            .filter(|n| n != r)
            .collect();
        let members: Vec<String> = cap["img_set"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_string())
            .filter(|m| m != r)
            .collect();
        let got = |m: &serde_json::Map<String, serde_json::Value>| -> Vec<String> {
            m[&pid]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            got(&recall),
            ranked(all),
            "pair {pid}: every image but the reference, best first"
        );
        assert_eq!(
            got(&subset),
            ranked(members)[..3].to_vec(),
            "pair {pid}: the subset's best 3"
        );
    }
    assert_eq!(seen, 8);
    assert_eq!(recall.len(), 8 + 2, "8 pair ids, version, metric");
}
