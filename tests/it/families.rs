//! Every CLIP family `arch` covers, against the reference libraries
//! themselves: tiny random models that open_clip 3.3.0 and transformers
//! 4.57.6 build and save (scripts/make_openclip_fixtures.py), loaded from
//! the files users have; the named config table against open_clip's own
//! configs; preprocessing bit for bit; `genecis encode` read back in Python.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use genecis::model::arch::{
    from_open_clip_json, known_names, named, ArchSpec, ClipConfig, ASSUMED_NOTE,
};
use genecis::model::clip::Clip;
use genecis::model::preprocess::{load_rgb_with, to_tensor_with, ImageKey};
use tch::{Device, Tensor};

use crate::common::{
    forward_tolerance, genecis, python, relative_max_diff, script_fixtures, Manifest,
};
use crate::eval::{small_world, templates_params};
use crate::model::check_parity;

fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| script_fixtures("make_openclip_fixtures.py", "done"))
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    Tensor::loadz_multi(fixtures().join(format!("{name}_ref.pt")))
        .unwrap()
        .into_iter()
        .collect()
}

fn json_arch(name: &str) -> ArchSpec {
    ArchSpec::Json(fixtures().join(format!("{name}.json")))
}

/// The chain of products of a tiny two-block tower (patch conv; per block
/// q/k/v, scores, values, out, two MLP layers; projection); the bound also
/// takes the longest dot product `k` (the MLP's hidden width, or the
/// ResNet's last 3x3 conv: 9 x 512).
const DEPTH: usize = 2 + 2 * 7 + 4;

/// Our encode_image / encode_text against the library's on the same batch.
fn parity(model: &Clip, name: &str, k: usize, device: Device) -> (f64, f64) {
    eprintln!("{name}:");
    check_parity(model, &reference(name), (k, DEPTH), device)
}

genecis::test_device!(open_clip_models_match_open_clip, |device| {
    // (fixture, the tower's widest MLP or conv sum)
    for (name, k) in [
        ("vit_gelu", 256),
        ("vit_quick", 256),
        ("hw80", 787),
        ("options", 256),
        ("rn_gelu", 9 * 512),
    ] {
        let m = Clip::load(
            &fixtures().join(format!("{name}.pt")),
            Some(&json_arch(name)),
            device,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!m.config.assumed);
        let (di, dt) = parity(&m, name, k, device);
        eprintln!("{name}: image {di:.2e}, text {dt:.2e} of scale");
    }
    // The other files open_clip users have: safetensors, and a training
    // checkpoint ({"epoch", "state_dict": {"module.*"}, "optimizer"}).
    for file in ["vit_gelu.safetensors", "vit_gelu_epoch_1.pt"] {
        let m = Clip::load(&fixtures().join(file), Some(&json_arch("vit_gelu")), device).unwrap();
        parity(&m, "vit_gelu", 256, device);
    }
});

genecis::test_device!(hugging_face_models_match_transformers, |device| {
    for name in ["hf_gelu", "hf_quick"] {
        let m = Clip::load(&fixtures().join(name), None, device)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!m.config.assumed);
        parity(&m, name, 256, device);
    }
    // hf_quick's config has the legacy eos id 2 (pool at the highest id),
    // hf_gelu the current one (pool at the first <eot>).
    let quick = Clip::load(&fixtures().join("hf_quick"), None, Device::Cpu).unwrap();
    assert_eq!(
        quick.config.text_pool,
        genecis::model::clip::TextPool::Argmax
    );
    let gelu = Clip::load(&fixtures().join("hf_gelu"), None, Device::Cpu).unwrap();
    assert_eq!(
        gelu.config.text_pool,
        genecis::model::clip::TextPool::Eos(49407)
    );
});

#[test]
fn named_configs_are_open_clips() {
    let text = std::fs::read_to_string(fixtures().join("named_configs.json")).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&text).unwrap();
    let names = known_names();
    assert!(names.len() >= 26, "{names:?}");
    for n in names {
        let cfg = theirs
            .get(n)
            .unwrap_or_else(|| panic!("open_clip 3.3.0 has no model named {n}"));
        let mut from_json = from_open_clip_json(cfg, None, "x").unwrap();
        let ours = named(n).unwrap();
        from_json.source = ours.source.clone();
        assert_eq!(ours, from_json, "{n}");
    }
    // The configs that set what this build does not implement are refused
    // by name, never loaded as something else.
    for (n, what) in [
        ("ViT-H-14-CLIPA", "hf_tokenizer_name"),
        ("coca_ViT-B-32", "multimodal_cfg"),
        ("ViT-B-16-SigLIP", "init_logit_bias"),
        ("convnext_base", "timm_model_name"),
    ] {
        let e = from_open_clip_json(&theirs[n], None, "x").unwrap_err();
        assert!(e.contains(what), "{n}: {e}");
    }
}

#[test]
fn laion_weights_without_arch_run_as_openai_and_say_so() {
    // An open_clip GELU state dict has OpenAI's key names: without arch it
    // loads as OpenAI's (QuickGELU) config, which is a different function.
    let m = Clip::load(&fixtures().join("vit_gelu.pt"), None, Device::Cpu).unwrap();
    assert!(m.config.assumed);
    let refs = reference("vit_gelu");
    let img = m.encode_image(&refs["images"]).unwrap();
    let off = relative_max_diff(&img, &refs["image_features"]);
    assert!(
        off > 100.0 * forward_tolerance(256, DEPTH, Device::Cpu),
        "QuickGELU in place of GELU changed the features by only {off}"
    );
    // The summary says so (and `arch` fixes it: open_clip_models_match_open_clip).
    let dir = tempfile::tempdir().unwrap();
    let r = genecis(&[
        "encode",
        "--checkpoint",
        fixtures().join("vit_gelu.pt").to_str().unwrap(),
        "--texts",
        write_texts(dir.path()).to_str().unwrap(),
        "--out",
        dir.path().join("t.parquet").to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    r.ok();
    assert!(r.stdout.contains(ASSUMED_NOTE), "{}", r.stdout);
}

fn write_texts(dir: &Path) -> PathBuf {
    let p = dir.join("texts.txt");
    std::fs::write(&p, "a photo of a dog\nred\non beach\nred\n").unwrap();
    p
}

#[test]
fn a_checkpoint_that_does_not_fit_its_arch_names_the_key() {
    let load = |file: &str, arch: &str| {
        Clip::load(&fixtures().join(file), Some(&json_arch(arch)), Device::Cpu)
            .err()
            .unwrap_or_else(|| panic!("{file} loaded as {arch}"))
            .to_string()
    };
    // Another width: the first tensor checked (the image projection), with
    // both shapes.
    let e = load("vit_gelu.pt", "hw80");
    assert!(
        e.contains("'visual.proj' has shape [64, 32], expected [160, _]"),
        "{e}"
    );
    // LayerScale weights the config has no place for.
    let e = load("options.pt", "vit_gelu");
    assert!(e.contains("ln_pre") || e.contains("ls_1.gamma"), "{e}");
    // A ResNet under a ViT config.
    let e = load("rn_gelu.pt", "vit_gelu");
    assert!(e.contains("visual.") && e.contains("arch"), "{e}");
    // Unknown names list the known ones.
    let e = ArchSpec::parse("ViT-Q-99", Path::new("")).unwrap_err();
    assert!(e.contains("ViT-H-14") && e.contains("RN50x64"), "{e}");
    // The same, as manifest errors, before anything runs.
    let dir = tempfile::tempdir().unwrap();
    let m = Manifest::new("arch")
        .stage("texts", "ingest", &[], "path = \"none.tsv\"")
        .stage(
            "embed",
            "embed",
            &["texts"],
            "checkpoint = \"w.pt\", arch = \"ViT-Q-99\", device = \"cpu\"",
        )
        .write(dir.path());
    let r = genecis(&["check", m.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    assert!(
        (r.stdout.clone() + &r.stderr).contains("unknown arch 'ViT-Q-99'"),
        "{}{}",
        r.stdout,
        r.stderr
    );
}

#[test]
fn preprocessing_matches_open_clip_and_transformers_bit_for_bit() {
    let refs: HashMap<String, Tensor> = Tensor::loadz_multi(fixtures().join("preprocess_ref.pt"))
        .unwrap()
        .into_iter()
        .collect();
    let oc = ArchSpec::Json(fixtures().join("preprocess_cfg.json"))
        .config()
        .unwrap();
    let hf = Clip::load(&fixtures().join("hf_gelu"), None, Device::Cpu)
        .unwrap()
        .config;
    let names = std::fs::read_to_string(fixtures().join("images.txt")).unwrap();
    let mut n = 0;
    for name in names.lines() {
        let path = fixtures().join(name);
        for (family, cfg) in [("openclip", &oc), ("hf", &hf)] {
            let key = ImageKey {
                path: &path,
                bbox: None,
                rgb_first: false,
            };
            let ours = to_tensor_with(
                &load_rgb_with(&key, &cfg.preprocess).unwrap(),
                &cfg.preprocess,
            );
            let theirs = &refs[&format!("{family}/{name}")];
            assert_eq!(ours.size(), theirs.size());
            let differ = ours
                .ne_tensor(theirs)
                .sum(tch::Kind::Int64)
                .int64_value(&[]);
            assert_eq!(differ, 0, "{family} {name}: {differ} values differ");
            n += 1;
        }
    }
    assert_eq!(n, 16);
}

#[test]
fn encode_writes_tables_pandas_reads_and_open_clip_agrees_with() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(images.join("sub")).unwrap();
    for (i, name) in ["img_0.jpg", "img_1.png", "img_2.jpg"].iter().enumerate() {
        let to = if i == 2 {
            images.join("sub").join(name)
        } else {
            images.join(name)
        };
        std::fs::copy(fixtures().join(name), to).unwrap();
    }
    std::fs::write(images.join("notes.txt"), "not an image").unwrap();
    let out = dir.path().join("feats.parquet");
    let r = genecis(&[
        "encode",
        "--checkpoint",
        fixtures().join("vit_gelu.pt").to_str().unwrap(),
        "--arch",
        fixtures().join("vit_gelu.json").to_str().unwrap(),
        "--images",
        images.to_str().unwrap(),
        "--texts",
        write_texts(dir.path()).to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--batch-size",
        "2",
    ]);
    r.ok();
    assert!(
        r.stdout.contains("3 images") && r.stdout.contains("images/s"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains(ASSUMED_NOTE));
    // pandas reads both tables; open_clip's own transform and model on the
    // same files give the same features (float32 bound of the tiny ViT).
    let tol = forward_tolerance(256, DEPTH, Device::Cpu);
    let code = format!(
        r#"
import json, torch, pandas as pd, pyarrow.parquet as pq, open_clip
from PIL import Image
from open_clip.model import CLIP
cfg = json.load(open({cfg:?}))
m = CLIP(**cfg).eval()
m.load_state_dict(torch.load({w:?}))
tf = open_clip.image_transform(32, is_train=False)
img = pq.read_table({img:?}).to_pandas()
txt = pq.read_table({txt:?}).to_pandas()
assert list(img.columns) == ["image_key", "model", "embedding"], img.columns
assert list(img.image_key) == ["img_0.jpg", "img_1.png", "sub/img_2.jpg"], list(img.image_key)
assert set(img.model) == {{"vit_gelu"}}
assert list(txt.text) == ["a photo of a dog", "on beach", "red"], list(txt.text)
worst = 0.0
with torch.no_grad():
    for k, e in zip(img.image_key, img.embedding):
        ref = m.encode_image(tf(Image.open({root:?} + "/" + k)).unsqueeze(0))[0]
        worst = max(worst, float((torch.tensor(e) - ref).abs().max() / ref.abs().max()))
    toks = open_clip.tokenize(list(txt.text))
    ref = m.encode_text(toks)
    got = torch.tensor(list(map(list, txt.embedding)))
    worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
assert worst <= {tol}, worst
print(worst)
"#,
        cfg = fixtures().join("vit_gelu.json").display().to_string(),
        w = fixtures().join("vit_gelu.pt").display().to_string(),
        img = dir
            .path()
            .join("feats.images.parquet")
            .display()
            .to_string(),
        txt = dir.path().join("feats.texts.parquet").display().to_string(),
        root = images.display().to_string(),
    );
    let worst: f64 = python(&code).trim().parse().unwrap();
    eprintln!("encode vs open_clip: {worst:.2e} of scale (bound {tol:.2e})");
}

#[test]
fn other_families_run_through_embed_and_score_and_notes_say_which() {
    let dir = tempfile::tempdir().unwrap();
    let w = small_world(dir.path());
    let fx = fixtures();
    let embed = |ckpt: &Path, arch: &str| {
        format!(
            "checkpoint = \"{}\"{arch}, device = \"cpu\", batch_size = 8",
            ckpt.display()
        )
    };
    let m = Manifest::new("families")
        .stage("templates", "templates", &[], &templates_params(&w))
        .stage(
            "assumed",
            "embed",
            &["templates"],
            &embed(&fx.join("vit_gelu.pt"), ""),
        )
        .stage(
            "wide",
            "embed",
            &["templates"],
            &embed(
                &fx.join("hw80.pt"),
                &format!(", arch = \"{}\"", fx.join("hw80.json").display()),
            ),
        )
        .stage(
            "hf",
            "embed",
            &["templates"],
            &embed(&fx.join("hf_gelu"), ""),
        )
        .stage(
            "score_wide",
            "score",
            &["templates", "wide"],
            "device = \"cpu\"",
        )
        .stage(
            "score_hf",
            "score",
            &["templates", "hf"],
            "device = \"cpu\"",
        )
        .write(dir.path());
    genecis(&["run", m.to_str().unwrap(), "-q"]).ok();
    let notes = |stage: &str| -> Vec<String> {
        let v = crate::common::head_record(&dir.path().join("run"), stage).unwrap();
        v["notes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        notes("assumed").iter().any(|n| n == ASSUMED_NOTE),
        "{:?}",
        notes("assumed")
    );
    for s in ["wide", "hf"] {
        assert!(
            !notes(s).iter().any(|n| n == ASSUMED_NOTE),
            "{s}: {:?}",
            notes(s)
        );
    }
    assert!(
        notes("wide").iter().any(|n| n.contains("2 heads of 80")),
        "{:?}",
        notes("wide")
    );
    // 48-d (hw80) and 32-d (HF) embeddings both scored.
    let csv = crate::common::sql_csv(
        &m,
        "SELECT count(*) AS n, min(arrow_typeof(embedding)) AS t FROM wide.image_embeddings",
    );
    assert!(csv[1].contains("48"), "{csv:?}");
    for s in ["score_wide", "score_hf"] {
        let csv = crate::common::sql_csv(&m, &format!("SELECT count(*) FROM {s}.results"));
        assert!(csv[1].trim().parse::<i64>().unwrap() > 0, "{s}: {csv:?}");
    }
}

/// [`ClipConfig`] is public so a user's tool can inspect what loaded.
#[allow(dead_code)]
fn _config_is_public(c: &ClipConfig) -> i64 {
    c.embed_dim
}

/// Configs that lie (heads that do not divide the width, no heads, patch
/// 0, a billion layers) are errors naming the field and the file, exit 2,
/// before a tensor is built; never a libtorch panic or an abort.
#[test]
fn model_configs_that_lie_are_refused_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let texts = write_texts(dir.path());
    let src = fixtures().join("hf_gelu");
    let hf_cases: [(&str, &str, serde_json::Value, &str); 5] = [
        (
            "vision_config",
            "num_attention_heads",
            3.into(),
            "vision_config.num_attention_heads",
        ),
        (
            "text_config",
            "num_attention_heads",
            0.into(),
            "text_config.num_attention_heads",
        ),
        (
            "text_config",
            "num_attention_heads",
            (-2).into(),
            "text_config.num_attention_heads",
        ),
        (
            "vision_config",
            "patch_size",
            0.into(),
            "vision_config.patch_size",
        ),
        (
            "text_config",
            "num_hidden_layers",
            1_000_000_000.into(),
            "text_config.num_hidden_layers",
        ),
    ];
    for (i, (tower, field, value, named)) in hf_cases.into_iter().enumerate() {
        let folder = dir.path().join(format!("hf{i}"));
        std::fs::create_dir(&folder).unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), folder.join(e.file_name())).unwrap();
        }
        let cfg = folder.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        v[tower][field] = value.clone();
        std::fs::write(&cfg, v.to_string()).unwrap();
        let r = genecis(&[
            "encode",
            "--checkpoint",
            folder.to_str().unwrap(),
            "--texts",
            texts.to_str().unwrap(),
            "--out",
            dir.path().join(format!("out{i}")).to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        assert_eq!(
            r.code, 2,
            "{tower}.{field} = {value}: {}{}",
            r.stdout, r.stderr
        );
        assert!(
            r.stderr.contains(named) && r.stderr.contains(folder.to_str().unwrap()),
            "{tower}.{field} = {value}: {}",
            r.stderr
        );
    }
    // open_clip's model config: patch_size 0, and no heads (head_width over
    // the width).
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("vit_gelu.json")).unwrap())
            .unwrap();
    for (i, (field, value, named)) in [
        ("patch_size", 0, "vision_cfg.patch_size"),
        ("head_width", 128, "vision_cfg.head_width"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut v = json.clone();
        v["vision_cfg"][field] = value.into();
        let arch = dir.path().join(format!("lie{i}.json"));
        std::fs::write(&arch, v.to_string()).unwrap();
        let e = Clip::load(
            &fixtures().join("vit_gelu.pt"),
            Some(&ArchSpec::Json(arch.clone())),
            Device::Cpu,
        )
        .err()
        .unwrap_or_else(|| panic!("{field} = {value} loaded"))
        .to_string();
        assert!(e.contains(named), "{field} = {value}: {e}");
        let r = genecis(&[
            "encode",
            "--checkpoint",
            fixtures().join("vit_gelu.pt").to_str().unwrap(),
            "--arch",
            arch.to_str().unwrap(),
            "--texts",
            texts.to_str().unwrap(),
            "--out",
            dir.path().join(format!("oc{i}")).to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        assert_eq!(r.code, 2, "{field} = {value}: {}", r.stderr);
        assert!(r.stderr.contains(named), "{}", r.stderr);
    }
}
