//! Numeric parity of the tch model layer with OpenAI's PyTorch code, on tiny
//! random models that scripts/make_clip_fixtures.py writes (state dicts,
//! TorchScript archives and reference outputs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use genecis::model::clip::{Clip, Vision};
use genecis::model::combiner::Combiner;
use genecis::model::tokenizer::ClipTokenizer;
use genecis::model::{ModelError, StateDict};
use tch::{Device, Tensor};

/// Generated once into a temp folder named after the generator script's
/// hash, and reused while the script is unchanged (written to a scratch
/// folder, then renamed, so concurrent test runs never see half a set).
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let script = root.join("scripts/make_clip_fixtures.py");
        let hash = blake3::hash(&std::fs::read(&script).unwrap()).to_hex()[..12].to_string();
        let dir = std::env::temp_dir().join(format!("genecis-clip-fixtures-{hash}"));
        if dir.join("preprocess_ref.pt").is_file() {
            return dir;
        }
        let scratch = std::env::temp_dir().join(format!(
            "genecis-clip-fixtures-{hash}.{}",
            std::process::id()
        ));
        let py = root.join(".venv/bin/python");
        let out = std::process::Command::new(&py)
            .arg(&script)
            .arg(&scratch)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} (run scripts/setup.sh): {e}", py.display()));
        assert!(
            out.status.success(),
            "fixture script failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if std::fs::rename(&scratch, &dir).is_err() {
            // Another run got there first.
            let _ = std::fs::remove_dir_all(&scratch);
        }
        dir
    })
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    Tensor::loadz_multi(fixtures().join(name))
        .unwrap()
        .into_iter()
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn clip_from(file: &str) -> Clip {
    Clip::new(StateDict::load(&fixtures().join(file), Device::Cpu).unwrap()).unwrap()
}

fn check_parity(model: &Clip, refs: &HashMap<String, Tensor>) {
    let img = model.encode_image(&refs["images"]).unwrap();
    let txt = model.encode_text(&refs["tokens"]).unwrap();
    let (di, dt) = (
        max_diff(&img, &refs["image_features"]),
        max_diff(&txt, &refs["text_features"]),
    );
    assert!(di < 1e-4, "encode_image differs by {di}");
    assert!(dt < 1e-4, "encode_text differs by {dt}");
}

#[test]
fn vit_matches_pytorch_from_every_checkpoint_format() {
    let refs = reference("vit_ref.pt");
    let m = clip_from("vit_state.pt");
    assert_eq!(
        m.config.vision,
        Vision::Vit {
            width: 64,
            layers: 2,
            patch: 8,
            heads: 1
        }
    );
    assert_eq!(
        (
            m.config.image_resolution,
            m.config.embed_dim,
            m.config.transformer_layers
        ),
        (32, 32, 2)
    );
    check_parity(&m, &refs);
    check_parity(&clip_from("vit_module_state.pt"), &refs);
    check_parity(&clip_from("vit_jit.pt"), &refs);
    // safetensors: written from the loaded state dict, read back.
    let sd = StateDict::load(&fixtures().join("vit_state.pt"), Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let st = tmp.path().join("vit.safetensors");
    sd.write_safetensors(&st).unwrap();
    check_parity(
        &Clip::new(StateDict::load(&st, Device::Cpu).unwrap()).unwrap(),
        &refs,
    );
}

#[test]
fn modified_resnet_matches_pytorch() {
    let refs = reference("rn_ref.pt");
    let m = clip_from("rn_state.pt");
    assert_eq!(
        m.config.vision,
        Vision::ResNet {
            width: 64,
            layers: [1, 1, 1, 1],
            heads: 32
        }
    );
    assert_eq!(m.config.image_resolution, 64);
    check_parity(&m, &refs);
    check_parity(&clip_from("rn_module_state.pt"), &refs);
}

#[test]
fn combiner_matches_pytorch() {
    let refs = reference("combiner_ref.pt");
    let c =
        Combiner::new(StateDict::load(&fixtures().join("combiner_state.pt"), Device::Cpu).unwrap())
            .unwrap();
    assert_eq!(c.dim, 32);
    let out = c.forward(&refs["image"], &refs["text"]).unwrap();
    let d = max_diff(&out, &refs["combined"]);
    assert!(d < 1e-4, "combiner differs by {d}");
}

#[test]
fn tokenizer_matches_clip_tokenize_truncate() {
    let refs = reference("tokenizer_ref.pt");
    let texts = std::fs::read_to_string(fixtures().join("tokenizer_texts.txt")).unwrap();
    let texts: Vec<String> = texts.lines().map(|l| l.replace("\\t", "\t")).collect();
    let tok = ClipTokenizer::default();
    let ours = tok.batch(&texts.iter().map(String::as_str).collect::<Vec<_>>());
    let theirs = &refs["tokens"];
    for i in 0..texts.len() as i64 {
        assert!(
            ours.get(i).equal(&theirs.get(i)),
            "{:?}: {:?} vs {:?}",
            texts[i as usize],
            Vec::<i64>::try_from(ours.get(i)).unwrap(),
            Vec::<i64>::try_from(theirs.get(i)).unwrap()
        );
    }
}

#[test]
fn missing_or_misshaped_tensors_are_named() {
    let mut sd = StateDict::load(&fixtures().join("vit_state.pt"), Device::Cpu).unwrap();
    sd.tensors.remove("transformer.resblocks.1.mlp.c_fc.weight");
    let e = Clip::new(sd).err().unwrap();
    assert!(
        matches!(&e, ModelError::Missing { key, .. } if key == "transformer.resblocks.1.mlp.c_fc.weight"),
        "{e}"
    );
    let mut sd = StateDict::load(&fixtures().join("vit_state.pt"), Device::Cpu).unwrap();
    sd.tensors.insert(
        "visual.proj".into(),
        Tensor::zeros([3, 3], (tch::Kind::Float, Device::Cpu)),
    );
    let e = Clip::new(sd).err().unwrap();
    assert!(
        e.to_string().contains("'visual.proj' has shape [3, 3]"),
        "{e}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("not_a_checkpoint.pt");
    std::fs::write(&bad, b"hello").unwrap();
    let e = StateDict::load(&bad, Device::Cpu).err().unwrap();
    assert!(e.to_string().contains("cannot load checkpoint"), "{e}");
}

#[test]
fn resnet_torchscript_archive_with_batchnorm_buffers() {
    let refs = reference("rn_ref.pt");
    let sd = StateDict::load(&fixtures().join("rn_jit.pt"), Device::Cpu).unwrap();
    assert!(
        sd.has("visual.bn1.running_mean"),
        "buffers come with the parameters"
    );
    check_parity(&Clip::new(sd).unwrap(), &refs);
}

#[test]
fn preprocessing_matches_pil() {
    use genecis::model::preprocess::resize_center_crop;
    let refs = reference("preprocess_ref.pt");
    let (mut worst_png, mut worst_jpg, mut sum_jpg, mut n_jpg) = (0i64, 0i64, 0f64, 0f64);
    for i in 0..5 {
        for ext in ["png", "jpg"] {
            let img = image::open(fixtures().join(format!("pre_{i}.{ext}"))).unwrap();
            let ours = resize_center_crop(&img, 32);
            let theirs = refs[&format!("pre_{i}_{ext}")].to_kind(tch::Kind::Int64);
            let ours = Tensor::from_slice(ours.as_raw().as_slice())
                .view([32, 32, 3])
                .to_kind(tch::Kind::Int64);
            let d = (ours - theirs).abs();
            let max = d.max().int64_value(&[]);
            if ext == "png" {
                worst_png = worst_png.max(max);
            } else {
                worst_jpg = worst_jpg.max(max);
                sum_jpg += d
                    .to_kind(tch::Kind::Double)
                    .sum(tch::Kind::Double)
                    .double_value(&[]);
                n_jpg += d.numel() as f64;
            }
        }
    }
    eprintln!("JPEG: max {worst_jpg} levels, mean {:.3}", sum_jpg / n_jpg);
    // Resize and crop are bit-exact with Pillow 10 (checked on PNG, where
    // decoding is lossless). JPEG decoders (libjpeg vs the image crate)
    // differ in chroma upsampling, by a fraction of a level on average.
    assert_eq!(worst_png, 0, "PNG pixels differ by up to {worst_png}");
    assert!(
        sum_jpg / n_jpg < 1.0,
        "JPEG pixels differ by {} on average",
        sum_jpg / n_jpg
    );
}
