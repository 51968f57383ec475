//! The `train` stage: parity of our steps with PyTorch's, learning on a
//! small mined world, exact resume after kill -9, PyTorch-loadable
//! weights, and the errors bad input gets.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use genecis::model::clip::{ArchSpec, Clip};
use genecis::model::combiner::{Combiner, Dropout};
use genecis::model::optim::{clip_grad_norm, AdamW, GradScaler};
use genecis::model::torch_pickle::read_state_dict;
use genecis::model::StateDict;
use genecis::stages::train::{train_step, Finetune, Optimizer, StepConfig};

use crate::common::{
    bin, forward_tolerance, genecis, head_record, python, script_fixtures, sql_csv, work_folders,
    write, Manifest, EPS32,
};
use crate::eval::{small_world, templates_params};
use crate::model::fixtures;

fn train_fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| script_fixtures("make_train_fixtures.py", "combiner_seed5.pt"))
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    read_state_dict(path).unwrap().into_iter().collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Three AdamW steps of ours against three of PyTorch's (the original's
/// loss, clip_grad_norm_ on CLIP, weight decay on), dropout off.
fn parity(name: &str, device: Device) {
    let fx = train_fixtures();
    let batch = load(&fx.join(format!("{name}_batch.pt")));
    let init = fx.join(format!("{name}_init.pt"));
    let mut clip = if name == "oc" {
        let arch = ArchSpec::Json(fx.join("oc.json"));
        Clip::load(&init, Some(&arch), device).unwrap()
    } else {
        Clip::new(StateDict::load(&init, device).unwrap()).unwrap()
    };
    clip.set_training(true);
    let comb = Combiner::new(
        StateDict::load(&fx.join(format!("{name}_combiner_init.pt")), device).unwrap(),
    )
    .unwrap();
    let mut opt = Optimizer::new(
        &comb,
        Some(&clip),
        Finetune::ImagePlusTextWhole,
        AdamW::new((0.9, 0.999), 1e-6, 0.01),
        GradScaler::new(false),
    );
    let cfg = StepConfig {
        lamda: 100.0,
        clip_grad_norm: 1.0,
        clip_before_unscale: true,
        device,
        amp: false,
    };
    let images = batch["images"].to_device(device);
    let tokens = batch["tokens"].to_kind(Kind::Int64).to_device(device);
    let losses = Vec::<f64>::try_from(&batch["losses"]).unwrap();
    // The fixture script's LR.
    let lr = 1e-4;
    let tower = if name != "rn" {
        (4 * 64, 2 + 2 * 7)
    } else {
        (9 * 512, 3 + 4 * 3 + 4)
    };
    for (s, want) in losses.iter().enumerate() {
        let m = train_step(&cfg, &mut opt, &comb, lr, Dropout::Off, None, || {
            let f = clip.encode_image(&images)?;
            let p = f.chunk(3, 0);
            Ok((
                p[0].shallow_clone(),
                p[1].shallow_clone(),
                clip.encode_text(&tokens)?,
            ))
        })
        .unwrap();
        // The loss is CE over lamda * cosines of towers' outputs; the towers
        // carry float32 reordering error up to their forward bound (see
        // model.rs), a cosine twice that, and CE is 2-Lipschitz in the
        // logits' max norm.
        let got = m.metrics[0].1;
        let tol = 2.0 * cfg.lamda * 2.0 * forward_tolerance(tower.0, tower.1, device);
        assert!(
            (got - want).abs() <= tol,
            "{name} step {s}: loss {got} vs PyTorch {want} (bound {tol})"
        );
    }
    let want_clip = load(&fx.join(format!("{name}_final.pt")));
    let want_comb = load(&fx.join(format!("{name}_combiner_final.pt")));
    let init_comb = load(&fx.join(format!("{name}_combiner_init.pt")));
    // Weights, per tensor: the distance to PyTorch's against the size of
    // a full Adam update of that tensor, lr per element and step
    // (|m_hat / sqrt(v_hat)| is 1 at step 1). Not per element: Adam moves
    // an element by about lr whatever its gradient's size, so an element
    // whose gradient is within float noise of zero (attnpool's key bias has
    // no true gradient at all) can step either way, by an amount that
    // depends on the CPU's GEMM kernels (an absolute 1e-5 failed on an AMD
    // EPYC). Such elements are a small share of a tensor, so over its norm
    // they stay far below UPDATE_SHARE; a plumbing bug (a parameter not
    // stepped, a wrong loss, a clip over the wrong set or none) moved some
    // tensor by 0.1 to 0.4 of a full update when tried, float reordering
    // by 1e-4 at most here. The optimizer's
    // arithmetic itself is held to float32 rounding by
    // `adamw_and_clipping_match_pytorch_to_float32_rounding`.
    const UPDATE_SHARE: f64 = 0.02;
    let full = |t: &Tensor| lr * losses.len() as f64 * (t.numel() as f64).sqrt();
    let mut worst = (0.0, String::new());
    for (ours, want, what) in [
        (&clip.weights().tensors, &want_clip, "CLIP"),
        (&comb.weights().tensors, &want_comb, "Combiner"),
    ] {
        for (k, w) in want {
            let off = l2(&(ours[k].to_device(Device::Cpu) - w));
            if !w.is_floating_point() {
                // BatchNorm's step counter.
                assert_eq!(off, 0.0, "{name}: {what} {k} differs");
            } else if off / full(w) > worst.0 {
                worst = (off / full(w), format!("{what} {k}"));
            }
        }
    }
    assert!(
        worst.0 <= UPDATE_SHARE,
        "{name}: {} is off PyTorch's by {:.3} of a full update",
        worst.1,
        worst.0
    );
    let moved = l2(&(&want_comb["combiner_layer.weight"] - &init_comb["combiner_layer.weight"]));
    assert!(
        moved > 0.5 * full(&want_comb["combiner_layer.weight"]),
        "{name}: the steps moved the weights ({moved:.3e})"
    );
    eprintln!(
        "{name}: weights off PyTorch's by at most {:.2e} of a full update ({})",
        worst.0, worst.1
    );
}

fn l2(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).norm().double_value(&[])
}

/// The largest |m_hat / sqrt(v_hat)| Adam can take at step t (so its
/// update is at most lr times this): by Cauchy-Schwarz on the moments'
/// weights, (1 - b1) / (1 - b1^t) * sqrt((1 - b2^t) / (1 - b2)) *
/// sqrt(sum_{j<t} (b1^2 / b2)^j). It is 1 at step 1.
fn adam_ratio_bound(b1: f64, b2: f64, t: usize) -> f64 {
    let s: f64 = (0..t).map(|j| (b1 * b1 / b2).powi(j as i32)).sum();
    (1.0 - b1) / (1.0 - b1.powi(t as i32))
        * ((1.0 - b2.powi(t as i32)) / (1.0 - b2)).sqrt()
        * s.sqrt()
}

// AdamW and clip_grad_norm_ alone, on gradients PyTorch used, so nothing
// but elementwise rounding differs and the bound is derived. Per element
// and step: the decay and the final add round once each relative to |p|;
// the update (at most lr * adam_ratio_bound) carries the moments' rounding
// (lerp, mul + addcmul: 3 eps a step, kept from step to step), the
// denominator's and the division's (4 eps), and twice the clipping
// coefficient's relative error (ATen's cascade sum: log2 n + 4 eps).
// A wrong beta, a missing weight decay or a clip in the wrong place moves
// elements by orders of magnitude more.
genecis::test_device!(
    adamw_and_clipping_match_pytorch_to_float32_rounding,
    |device| {
        let fx = load(&train_fixtures().join("optimizer.pt"));
        let hyper = Vec::<f64>::try_from(&fx["hyper"]).unwrap();
        let (lr, wd, eps, steps) = (hyper[0], hyper[1], hyper[2], hyper[3] as usize);
        let (b1, b2) = (0.9, 0.999);
        let names = ["w", "b", "ln", "skipped"];
        let params: Vec<(String, Tensor)> = names
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    fx[&format!("init.{n}")].copy().to_device(device),
                )
            })
            .collect();
        let clipped: i64 = params[..2].iter().map(|(_, p)| p.numel() as i64).sum();
        let mut opt = AdamW::new((b1, b2), eps, wd);
        for t in 0..steps {
            let mut grads: Vec<Option<Tensor>> = names
                .iter()
                .map(|n| {
                    fx.get(&format!("grad{t}.{n}"))
                        .map(|g| g.copy().to_device(device))
                })
                .collect();
            clip_grad_norm(&mut grads[..2], 1.0).unwrap();
            opt.step(lr, &params, &grads).unwrap();
        }
        let coef = 2.0 * ((clipped as f64).log2().ceil() + 4.0);
        let mut update_tol = 0.0;
        for t in 1..=steps {
            update_tol += lr * adam_ratio_bound(b1, b2, t) * EPS32 * (3.0 * t as f64 + 4.0 + coef);
        }
        for (n, p) in &params {
            let want = fx[&format!("final.{n}")].to_kind(Kind::Double);
            let tol = want.abs() * (2.0 * EPS32 * steps as f64) + update_tol;
            let p = p.to_device(Device::Cpu).to_kind(Kind::Double);
            let excess = ((p - &want).abs() - &tol).max().double_value(&[]);
            assert!(
                excess <= 0.0,
                "{n}: off PyTorch's by {excess:.3e} beyond the rounding bound"
            );
            let moved = l2(&(&want - fx[&format!("init.{n}")].to_kind(Kind::Double)));
            assert!(
                moved > 100.0 * l2(&tol),
                "{n}: the steps moved it ({moved:.3e})"
            );
        }
    }
);

genecis::test_device!(adamw_steps_match_pytorch_vit, |device| {
    parity("vit", device);
});

// Fine-tuning an open_clip ViT (GELU, LayerScale) against open_clip's
// own model under the same loop.
genecis::test_device!(adamw_steps_match_open_clip_vit, |device| {
    parity("oc", device);
});

genecis::test_device!(
    adamw_steps_match_pytorch_resnet_with_batchnorm_in_train_mode,
    |device| {
        parity("rn", device);
    }
);

#[test]
fn combiner_init_draws_as_pytorch_does() {
    let want = load(&train_fixtures().join("combiner_seed5.pt"));
    tch::manual_seed(5);
    let c = Combiner::init(32, 64, 128, Device::Cpu).unwrap();
    for (k, w) in &want {
        assert_eq!(max_diff(&c.weights().tensors[k], w), 0.0, "{k}");
    }
}

const SUBJECTS: [&str; 6] = ["dog", "cat", "horse", "boat", "man", "woman"];
const OBJECTS: [&str; 5] = ["bench", "beach", "grass", "table", "car"];

/// Captions "a <subject> on the <object>" over JPEGs whose colours follow
/// the object and whose pattern follows the subject, so a target is
/// predictable from (reference, condition). Returns the JSONL file.
fn train_world(dir: &Path) -> PathBuf {
    let mut lines = String::new();
    let mut id = 0;
    for (si, s) in SUBJECTS.iter().enumerate() {
        for (oi, o) in OBJECTS.iter().enumerate() {
            for k in 0..4u32 {
                let path = dir.join(format!("images/{si}_{oi}_{k}.jpg"));
                let img = image::RgbImage::from_fn(40, 32, |x, y| {
                    let stripe = ((x / (2 + si as u32)) + y / 3 + k).is_multiple_of(2);
                    let base = [
                        (oi * 50) as u8,
                        (255 - oi * 45) as u8,
                        ((oi * 97) % 256) as u8,
                    ];
                    let v = |c: u8| if stripe { c } else { c / 3 + 20 * si as u8 };
                    image::Rgb([v(base[0]), v(base[1]), v(base[2])])
                });
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                img.save(&path).unwrap();
                lines.push_str(&format!(
                    "{{\"image_id\": {id}, \"caption\": \"a {s} on the {o}\", \"image_path\": \"{}\"}}\n",
                    path.display()
                ));
                id += 1;
            }
        }
    }
    let f = dir.join("captions.jsonl");
    write(&f, lines);
    f
}

/// ingest -> parse -> mine over the train world.
fn mined(dir: &Path, samples: usize) -> Manifest {
    let captions = train_world(dir);
    Manifest::new("train-test")
        .stage(
            "captions",
            "ingest",
            &[],
            &format!("path = \"{}\"", captions.display()),
        )
        .stage("parse", "parse", &["captions"], "")
        .stage(
            "mine",
            "mine",
            &["parse.relations"],
            &format!("num_samples = {samples}, seed = 1, concreteness_threshold = \"none\""),
        )
}

const SMALL_HEAD: &str = "projection_dim = 64, hidden_dim = 128, device = \"cpu\"";

#[test]
fn cached_training_learns_selects_on_templates_and_feeds_score() {
    let tmp = tempfile::tempdir().unwrap();
    let w = small_world(tmp.path());
    let fx = fixtures();
    let m = mined(tmp.path(), 400)
        .stage("templates", "templates", &[], &templates_params(&w))
        .stage(
            "embed",
            "embed",
            &["mine", "captions", "templates"],
            &format!(
                "checkpoint = \"{}\", model = \"tiny-vit\", device = \"cpu\", batch_size = 32",
                fx.join("vit_state.pt").display()
            ),
        )
        .stage(
            "train",
            "train",
            &["mine", "embed", "templates"],
            &format!("finetune = \"none\", epochs = 3, batch_size = 16, lr = 1e-3, {SMALL_HEAD}"),
        )
        .stage(
            "score",
            "score",
            &["templates", "embed", "train"],
            "device = \"cpu\"",
        )
        .write(tmp.path());
    let ms = m.to_str().unwrap();
    genecis(&["run", ms, "-q"]).ok();
    let run = tmp.path().join("run");
    let loss = sql_csv(
        &run,
        "SELECT epoch, value FROM train_metrics WHERE split = 'train' AND metric = 'base_loss' ORDER BY epoch",
    );
    let loss: Vec<f64> = loss[1..]
        .iter()
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(loss.len(), 3, "{loss:?}");
    assert!(loss[2] < loss[0], "train loss falls: {loss:?}");
    let r1 = sql_csv(
        &run,
        "SELECT value FROM train_metrics WHERE split = 'val' AND metric = 'recall_at_1' AND epoch = 2",
    );
    let r1: f64 = r1[1].parse().unwrap();
    assert!(r1 > 2.0 / 16.0, "val R@1 {r1} above chance (1/16)");
    // Selection ran on both GeneCIS tasks and their average each epoch.
    let sel = sql_csv(
        &run,
        "SELECT count(*) FROM train_metrics WHERE split = 'templates' AND metric = 'average/recall_at_1'",
    );
    assert_eq!(sel[1], "3");
    let weights = sql_csv(
        &run,
        "SELECT role, file, select_by FROM weights ORDER BY role",
    );
    assert_eq!(
        weights[1..],
        [
            "combiner,combiner_head.pt,templates/average/recall_at_1".to_string(),
            "combiner_safetensors,combiner_head.safetensors,templates/average/recall_at_1".into()
        ]
    );
    // score took the trained head from its train input.
    let res = sql_csv(
        &run,
        "SELECT count(*) FROM results WHERE method = 'combiner'",
    );
    assert_eq!(res[1], "3", "focus_object, focus_attribute, average");
    // Plain PyTorch loads it into the original's Combiner, strictly.
    let head = run.join("train/combiner_head.pt");
    let out = python(&format!(
        "import sys, torch; sys.path.insert(0, 'scripts'); from fixture_models import Combiner\n\
         sd = torch.load('{}', weights_only=True)\n\
         c = Combiner(32, proj=64, hidden=128); print(c.load_state_dict(sd, strict=True)); print(float(sum(v.double().sum() for v in sd.values())))",
        head.display()
    ));
    assert!(out.contains("All keys matched successfully"), "{out}");
    let ours: f64 = load(&head)
        .values()
        .map(|t| t.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]))
        .sum();
    let theirs: f64 = out.lines().last().unwrap().trim().parse().unwrap();
    assert!(
        (ours - theirs).abs() < 1e-9 * ours.abs().max(1.0),
        "{ours} vs {theirs}"
    );
}

fn fine_tune_manifest(dir: &Path, extra: &str) -> PathBuf {
    mined(dir, 120)
        .stage(
            "train",
            "train",
            &["mine", "captions"],
            &format!(
                "finetune = \"image_plus_text_whole\", checkpoint = \"{}\", epochs = 2, batch_size = 8, lr = 1e-4, checkpoint_every_steps = 1, seed = 3, {SMALL_HEAD}{extra}",
                fixtures().join("vit_state.pt").display()
            ),
        )
        .write(dir)
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn fine_tuning_resumes_after_kill_9_bit_identically() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let ma = fine_tune_manifest(a.path(), "");
    let mb = fine_tune_manifest(b.path(), "");
    genecis(&["run", ma.to_str().unwrap(), "-q"]).ok();
    // Run B: killed once a mid-epoch checkpoint exists, then rerun.
    let mut child = bin()
        .args(["run", mb.to_str().unwrap(), "-q"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let b_run = b.path().join("run");
    let t0 = Instant::now();
    let mut killed_at = None;
    while t0.elapsed() < Duration::from_secs(600) {
        if let Ok(s) = std::fs::read_to_string(checkpoint_state(&b_run)) {
            let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_default();
            if v["epoch"] == 0 && v["step"].as_u64().unwrap_or(0) >= 3 {
                child.kill().unwrap();
                killed_at = Some(v["step"].as_u64().unwrap());
                break;
            }
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.wait();
    assert!(killed_at.is_some(), "run B was killed mid-epoch");
    assert!(
        head_record(&b_run, "train").is_none(),
        "the killed run did not commit"
    );
    genecis(&["run", mb.to_str().unwrap(), "-q"]).ok();
    let record = head_record(&b_run, "train").unwrap().to_string();
    assert!(
        record.contains("resumed from") && record.contains("epoch 0, step"),
        "the rerun resumed mid-epoch: {record}"
    );
    same_training(a.path(), b.path(), &format!("killed at step {killed_at:?}"));
}

/// The resume state of a train stage in progress in `run` (empty until
/// its folder exists).
fn checkpoint_state(run: &Path) -> PathBuf {
    work_folders(run, "train")
        .first()
        .map(|f| f.join("last/state.json"))
        .unwrap_or_default()
}

/// Two fine-tuning runs (`<dir>/run`) ended bit-identically: weights,
/// optimiser state and every metric; and the backbone loads into OpenAI's
/// `build_model`, strictly.
fn same_training(a: &Path, b: &Path, what: &str) {
    for f in [
        "combiner_head.pt",
        "backbone.pt",
        "last/optimizer.pt",
        "last/backbone.pt",
    ] {
        assert!(
            bytes(&a.join("run/train").join(f)) == bytes(&b.join("run/train").join(f)),
            "{f} differs after resume ({what})"
        );
    }
    let q = "SELECT epoch, step, split, metric, value FROM train_metrics ORDER BY epoch, step, split, metric";
    assert_eq!(sql_csv(&a.join("run"), q), sql_csv(&b.join("run"), q));
    let out = python(&format!(
        "import sys, torch; sys.path.insert(0, 'scripts'); from fixture_models import load_clip_module\n\
         m = load_clip_module('model').build_model(torch.load('{}', weights_only=True)); print('built', m.visual.output_dim)",
        a.join("run/train/backbone.pt").display()
    ));
    assert!(out.contains("built 32"), "{out}");
}

#[test]
fn bad_training_input_gets_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let w = small_world(tmp.path());
    let vit = fixtures().join("vit_state.pt");
    let embed = format!("checkpoint = \"{}\", device = \"cpu\"", vit.display());
    let cached = |train: &str| -> PathBuf {
        mined(tmp.path(), 60)
            .stage("embed", "embed", &["mine", "captions"], &embed)
            .stage(
                "train",
                "train",
                &["mine", "embed"],
                &format!("finetune = \"none\", epochs = 1, batch_size = 8, {SMALL_HEAD}, {train}"),
            )
            .write(tmp.path())
    };
    let fails = |m: &Path, want: &str| {
        let r = genecis(&["run", m.to_str().unwrap(), "-q"]);
        assert_ne!(r.code, 0, "{want}");
        assert!(
            r.stderr.contains(want),
            "expected '{want}' in:\n{}",
            r.stderr
        );
        r.stderr
    };
    // A loss that overflows without AMP stops the run and names the step.
    let e = fails(&cached("lr = 1e30"), "without mixed precision");
    assert!(e.contains("epoch 0, step "), "{e}");
    // A head of another width.
    let narrow = tmp.path().join("narrow.pt");
    tch::manual_seed(1);
    let c = Combiner::init(16, 8, 8, Device::Cpu).unwrap();
    let tensors: Vec<(String, Tensor)> = Combiner::names()
        .into_iter()
        .map(|n| {
            let t = c.weights().tensors[&n].shallow_clone();
            (n, t)
        })
        .collect();
    genecis::model::torch_save::save_state_dict(&narrow, &tensors).unwrap();
    fails(
        &cached(&format!("combiner = \"{}\"", narrow.display())),
        "takes 16-d features",
    );
    // Features that lack the triplets' images: a few named, and the stage.
    let m = mined(tmp.path(), 60)
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
        .stage("template_features", "embed", &["templates"], &embed)
        .stage(
            "train",
            "train",
            &["mine", "template_features"],
            &format!("finetune = \"none\", epochs = 1, batch_size = 8, {SMALL_HEAD}"),
        )
        .write(tmp.path());
    let e = fails(&m, "have no embedding");
    assert!(e.contains("embed stage 'template_features'"), "{e}");
    // Fine-tuning reads images: without captions it is refused.
    let m = mined(tmp.path(), 60)
        .stage(
            "train",
            "train",
            &["mine"],
            &format!(
                "checkpoint = \"{}\", epochs = 1, batch_size = 8, {SMALL_HEAD}",
                vit.display()
            ),
        )
        .write(tmp.path());
    fails(&m, "list the ingest stage");
    // Fine-tuning without a CLIP is a manifest error: nothing runs.
    let m = mined(tmp.path(), 60)
        .stage("train", "train", &["mine", "captions"], SMALL_HEAD)
        .write(tmp.path());
    fails(&m, "params.checkpoint");
    // A missing training image fails before any step, naming it.
    let m = mined(tmp.path(), 60)
        .stage(
            "train",
            "train",
            &["mine", "captions"],
            &format!(
                "checkpoint = \"{}\", epochs = 1, batch_size = 8, {SMALL_HEAD}",
                vit.display()
            ),
        )
        .write(tmp.path());
    std::fs::remove_file(tmp.path().join("images/0_0_0.jpg")).unwrap();
    let e = genecis(&["run", m.to_str().unwrap(), "-q"]);
    assert_ne!(e.code, 0);
    assert!(
        e.stderr.contains("0_0_0.jpg") || e.stderr.contains("missing or unreadable"),
        "{}",
        e.stderr
    );
}

/// `pipelines/cc3m_train.toml` as shipped, its data paths set to a small
/// world: CC3M-style TSV with images named by row, the GeneCIS template
/// files, a tiny CLIP.
#[test]
fn shipped_train_manifest_runs_with_paths_set() {
    let tmp = tempfile::tempdir().unwrap();
    let w = small_world(tmp.path());
    let jsonl = train_world(tmp.path());
    // The same world as a CC3M TSV: caption<TAB>url, images named by row.
    let images = tmp.path().join("training");
    std::fs::create_dir_all(&images).unwrap();
    let mut tsv = String::new();
    for (row, line) in std::fs::read_to_string(&jsonl).unwrap().lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        std::fs::copy(
            v["image_path"].as_str().unwrap(),
            images.join(row.to_string()),
        )
        .unwrap();
        tsv.push_str(&format!(
            "{}\thttp://example.com/{row}.jpg\n",
            v["caption"].as_str().unwrap()
        ));
    }
    write(&tmp.path().join("train.tsv"), tsv);
    let mut ratings = String::from("Word\tBigram\tConc.M\tConc.SD\n");
    for word in SUBJECTS.iter().chain(&OBJECTS) {
        ratings.push_str(&format!("{word}\t0\t4.9\t0\n"));
    }
    write(&tmp.path().join("ratings.txt"), ratings);
    let m = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/cc3m_train.toml");
    let p = |f: &str| tmp.path().join(f).display().to_string();
    let vit = fixtures().join("vit_state.pt").display().to_string();
    let sets = [
        format!("captions.path={}", p("train.tsv")),
        format!("captions.images_dir={}", images.display()),
        format!("triplets.concreteness_path={}", p("ratings.txt")),
        "triplets.num_samples=300".into(),
        format!("selection.change_attribute={}", w.vaw_json.display()),
        format!("selection.focus_object={}", w.coco_json.display()),
        format!("selection.coco_dir={}", w.coco_dir.display()),
        format!("selection.vg_dir={}", w.vg_dir.display()),
        format!("templates.focus_attribute={}", w.vaw_json.display()),
        format!("templates.change_attribute={}", w.vaw_json.display()),
        format!("templates.focus_object={}", w.coco_json.display()),
        format!("templates.change_object={}", w.coco_json.display()),
        format!("templates.coco_dir={}", w.coco_dir.display()),
        format!("templates.vg_dir={}", w.vg_dir.display()),
        format!("features.checkpoint={vit}"),
        format!("eval_features.checkpoint={vit}"),
        "features.device=cpu".into(),
        "eval_features.device=cpu".into(),
        "train.device=cpu".into(),
        "train.epochs=2".into(),
        "train.batch_size=16".into(),
        "train.lr=0.001".into(),
        "train.projection_dim=64".into(),
        "train.hidden_dim=128".into(),
        "score.device=cpu".into(),
    ];
    let run = tmp.path().join("run");
    let mut cmd: Vec<&str> = vec!["run", m.to_str().unwrap(), "-q", "--workdir"];
    let rs = run.display().to_string();
    cmd.push(&rs);
    for s in &sets {
        cmd.push("--set");
        cmd.push(s);
    }
    genecis(&cmd).ok();
    let best = sql_csv(
        &run,
        "SELECT select_by FROM weights WHERE role = 'combiner'",
    );
    assert_eq!(best[1], "templates/average/recall_at_1");
    let res = sql_csv(
        &run,
        "SELECT task FROM results WHERE method = 'combiner' ORDER BY task",
    );
    assert_eq!(
        res[1..],
        [
            "average",
            "change_attribute",
            "change_object",
            "focus_attribute",
            "focus_object"
        ]
    );
}

/// Largest |a - b| over the tensors two state dicts share, and the count
/// of tensors (all keys must match).
fn state_dict_gap(a: &Path, b: &Path) -> (f64, usize) {
    let (a, b) = (load(a), load(b));
    assert_eq!(
        a.keys().collect::<std::collections::BTreeSet<_>>(),
        b.keys().collect::<std::collections::BTreeSet<_>>()
    );
    let gap = a
        .iter()
        .map(|(k, t)| max_diff(t, &b[k]))
        .fold(0.0, f64::max);
    (gap, a.len())
}

/// Data-parallel training (`--nproc 2`, Gloo on 127.0.0.1) in cached mode
/// ends with the Combiner one process trains: each rank steps on its
/// DistributedSampler share of the same global batches, dropout is drawn
/// per sample, features are gathered and gradients summed.
///
/// Bound: lr, one Adam step, over the whole run. The ranks only round
/// differently: each gradient is summed in another order (two partial
/// sums of 8 rows, then the all-reduce, instead of 16 rows), a relative
/// change of ~16 float32 ulps, which moves Adam's normalised step
/// lr * m / (sqrt(v) + eps) by the same relative amount; only a gradient
/// within rounding of zero can flip its step's sign, and such a gradient
/// is far below Adam's eps (1e-8) unless its terms are large, so its step
/// is a small share of lr. A real difference in what a step sees (another
/// batch, no gather, half the gradient, another dropout mask) changes the
/// sign of Adam's first step, exactly lr * sign(g), for many weights: 2 lr
/// apart from the first step on.
#[test]
fn two_ranks_train_what_one_rank_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let m = mined(tmp.path(), 400)
        .stage(
            "embed",
            "embed",
            &["mine", "captions"],
            &format!(
                "checkpoint = \"{}\", model = \"tiny-vit\", device = \"cpu\", batch_size = 32",
                fixtures().join("vit_state.pt").display()
            ),
        )
        .stage(
            "train",
            "train",
            &["mine", "embed"],
            &format!("finetune = \"none\", epochs = 2, batch_size = 16, lr = 1e-3, {SMALL_HEAD}"),
        )
        .write(tmp.path());
    let ms = m.to_str().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    genecis(&["run", ms, "-q", "--workdir", one.to_str().unwrap()]).ok();
    let t0 = Instant::now();
    let r = genecis(&[
        "run",
        ms,
        "-q",
        "--workdir",
        two.to_str().unwrap(),
        "--nproc",
        "2",
    ]);
    r.ok();
    println!(
        "two ranks: {:.1} s\n{}",
        t0.elapsed().as_secs_f64(),
        r.stdout
    );
    assert!(
        r.stdout.contains("rank 1 of 2 did its share"),
        "{}",
        r.stdout
    );
    let record = head_record(&two, "train").unwrap().to_string();
    assert!(record.contains("x 2 ranks"), "{record}");
    let q = "SELECT count(*) FROM train_metrics WHERE split = 'train_step'";
    let steps: f64 = sql_csv(&one, q)[1].parse().unwrap();
    let steps = steps / 2.0; // loss and accuracy rows
    let bound = 1e-3;
    let (gap, n) = state_dict_gap(
        &one.join("train/combiner_head.pt"),
        &two.join("train/combiner_head.pt"),
    );
    println!("1 vs 2 ranks: {n} tensors, max |diff| {gap:e} after {steps} steps (bound {bound:e})");
    assert!(gap <= bound, "{gap:e} > {bound:e}");
    // The same metrics, each within the loss's float error. In-batch
    // accuracy is left out of the training splits: its argmax breaks ties
    // (a target twice in a batch) by position, and the gathered batch is
    // in rank order, as the original's.
    let q = "SELECT epoch, step, split, metric, value FROM train_metrics WHERE NOT (metric = 'base_acc' AND split LIKE 'train%') ORDER BY epoch, step, split, metric";
    let (a, b) = (sql_csv(&one, q), sql_csv(&two, q));
    assert_eq!(a.len(), b.len());
    for (x, y) in a[1..].iter().zip(&b[1..]) {
        let (kx, vx) = x.rsplit_once(',').unwrap();
        let (ky, vy) = y.rsplit_once(',').unwrap();
        assert_eq!(kx, ky);
        let (vx, vy): (f64, f64) = (vx.parse().unwrap(), vy.parse().unwrap());
        assert!((vx - vy).abs() <= 1e-3 * vx.abs().max(1.0), "{x} vs {y}");
    }
}

/// A world size that does not split the batch is refused before any rank
/// starts or anything is written.
#[test]
fn a_world_that_does_not_split_the_batch_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fine_tune_manifest(tmp.path(), "");
    let r = genecis(&["run", m.to_str().unwrap(), "-q", "--nproc", "3"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("batch_size") && r.stderr.contains("world size 3"),
        "{}",
        r.stderr
    );
    assert!(!tmp.path().join("run").exists(), "nothing written");
}

/// Fine-tuning on 2 ranks started as torchrun starts them (RANK,
/// WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): rank 1 killed with
/// SIGKILL mid-epoch stops rank 0 well within its collective timeout and
/// nothing is committed; `--nproc 2` then resumes from the last checkpoint
/// and ends bit-identical to an uninterrupted 2-rank run, with weights
/// PyTorch loads.
#[test]
fn two_rank_fine_tuning_survives_kill_9_of_a_rank() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let ma = fine_tune_manifest(a.path(), "");
    let mb = fine_tune_manifest(b.path(), "");
    genecis(&["run", ma.to_str().unwrap(), "-q", "--nproc", "2"]).ok();
    // One rank fine-tunes the same weights, within rounding (the bound of
    // two_ranks_train_what_one_rank_trains: lr, here 1e-4): crops are drawn
    // per sample, a ViT has no batch statistics.
    let one = a.path().join("one");
    genecis(&[
        "run",
        ma.to_str().unwrap(),
        "-q",
        "--workdir",
        one.to_str().unwrap(),
    ])
    .ok();
    for f in ["combiner_head.pt", "backbone.pt"] {
        let (gap, n) = state_dict_gap(
            &one.join("train").join(f),
            &a.path().join("run/train").join(f),
        );
        println!("fine-tuning, 1 vs 2 ranks, {f}: {n} tensors, max |diff| {gap:e} (bound 1e-4)");
        assert!(gap <= 1e-4, "{f}: {gap:e}");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let rank = |r: &str| {
        bin()
            .args(["run", mb.to_str().unwrap(), "-q", "--dist-timeout", "60"])
            .envs([
                ("RANK", r),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", r),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", port.as_str()),
                ("OMP_NUM_THREADS", "1"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (mut r0, mut r1) = (rank("0"), rank("1"));
    let b_run = b.path().join("run");
    let t0 = Instant::now();
    let mut killed_at = None;
    while t0.elapsed() < Duration::from_secs(600) && killed_at.is_none() {
        if let Ok(s) = std::fs::read_to_string(checkpoint_state(&b_run)) {
            let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_default();
            if v["epoch"] == 0 && v["step"].as_u64().unwrap_or(0) >= 3 {
                r1.kill().unwrap();
                killed_at = Some((v["step"].as_u64().unwrap(), Instant::now()));
            }
        }
        if r0.try_wait().unwrap().is_some() || r1.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = r1.wait();
    let (step, at) = killed_at.expect("rank 1 was killed mid-epoch");
    let out = r0.wait_with_output().unwrap();
    let stopped = at.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("rank 1 killed at step {step}; rank 0 stopped after {stopped:?}: {err}");
    assert!(!out.status.success(), "rank 0 fails when rank 1 dies");
    assert!(stopped < Duration::from_secs(60), "took {stopped:?}");
    assert!(err.contains("stage 'train'"), "{err}");
    assert!(head_record(&b_run, "train").is_none(), "nothing committed");
    genecis(&["run", mb.to_str().unwrap(), "-q", "--nproc", "2"]).ok();
    let record = head_record(&b_run, "train").unwrap().to_string();
    assert!(
        record.contains("resumed from") && record.contains("x 2 ranks"),
        "{record}"
    );
    same_training(a.path(), b.path(), &format!("rank 1 killed at step {step}"));
}
