//! Numeric parity of the tch model layer with OpenAI's PyTorch code, on tiny
//! random models that scripts/make_clip_fixtures.py writes (state dicts,
//! TorchScript archives and reference outputs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use genecis::model::clip::{Act, Blocks, Clip, Vision, VisionPool};
use genecis::model::combiner::Combiner;
use genecis::model::tokenizer::ClipTokenizer;
use genecis::model::{ModelError, StateDict};
use tch::{Device, Tensor};

use crate::common::{forward_tolerance, relative_max_diff, script_fixtures};

/// The tiny ViT's longest dot product (its MLP: 4 x width 64) and its chain
/// of products (patch conv; per layer q/k/v, scores, values, out, two MLP
/// layers; projection), for the towers' float32 bound; its text tower has
/// the same width and depth.
const VIT: (usize, usize) = (4 * 64, 2 + 2 * 7);
/// The tiny ModifiedResNet: its last 3x3 conv sums 9 x 512 terms; three
/// stem convs, three per bottleneck, the attention pool's four products.
const RN: (usize, usize) = (9 * 512, 3 + 4 * 3 + 4);

/// Generated once into a temp folder named after the generator script's
/// hash, and reused while the script is unchanged (written to a scratch
/// folder, then renamed, so concurrent test runs never see half a set).
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| script_fixtures("make_clip_fixtures.py", "preprocess_ref.pt"))
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    Tensor::loadz_multi(fixtures().join(name))
        .unwrap()
        .into_iter()
        .collect()
}

fn clip_from(file: &str, device: Device) -> Clip {
    Clip::new(StateDict::load(&fixtures().join(file), device).unwrap()).unwrap()
}

/// Our towers against PyTorch's on the same batch, within float32's
/// reordering bound for the towers' longest dot product: `k` terms
/// (ViT: the MLP's 4 x width; ResNet: the last 3x3 conv's 9 x channels),
/// chained `depth` times (layers and projections), on `device`; the
/// comparison on the CPU.
pub(crate) fn check_parity(
    model: &Clip,
    refs: &HashMap<String, Tensor>,
    (k, depth): (usize, usize),
    device: Device,
) -> (f64, f64) {
    let on = |t: &Tensor| t.to_device(device);
    let img = model
        .encode_image(&on(&refs["images"]))
        .unwrap()
        .to_device(Device::Cpu);
    let txt = model
        .encode_text(&on(&refs["tokens"]))
        .unwrap()
        .to_device(Device::Cpu);
    let (di, dt) = (
        relative_max_diff(&img, &refs["image_features"]),
        relative_max_diff(&txt, &refs["text_features"]),
    );
    let tol = forward_tolerance(k, depth, device);
    assert!(
        di <= tol,
        "encode_image differs by {di} of its scale (bound {tol})"
    );
    assert!(
        dt <= tol,
        "encode_text differs by {dt} of its scale (bound {tol})"
    );
    eprintln!("  encode_image {di:.2e}, encode_text {dt:.2e} of their scale (bound {tol:.2e})");
    (di, dt)
}

genecis::test_device!(vit_matches_pytorch_from_every_checkpoint_format, |device| {
    let refs = reference("vit_ref.pt");
    let m = clip_from("vit_state.pt", device);
    assert_eq!(
        m.config.vision,
        Vision::Vit {
            blocks: Blocks {
                width: 64,
                layers: 2,
                heads: 1,
                mlp_width: 256,
                layer_scale: false,
                act: Act::QuickGelu,
                ln_eps: 1e-5,
            },
            patch: 8,
            ln_pre: true,
            pool: VisionPool::Tok,
            final_ln_after_pool: false,
        }
    );
    assert!(m.config.assumed);
    assert_eq!(
        (
            m.config.image_resolution,
            m.config.embed_dim,
            m.config.text.layers
        ),
        (32, 32, 2)
    );
    check_parity(&m, &refs, VIT, device);
    check_parity(
        &clip_from("vit_module_state.pt", device),
        &refs,
        VIT,
        device,
    );
    check_parity(&clip_from("vit_jit.pt", device), &refs, VIT, device);
    // safetensors: written from the loaded state dict, read back.
    let sd = StateDict::load(&fixtures().join("vit_state.pt"), Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let st = tmp.path().join("vit.safetensors");
    sd.write_safetensors(&st).unwrap();
    check_parity(
        &Clip::new(StateDict::load(&st, device).unwrap()).unwrap(),
        &refs,
        VIT,
        device,
    );
});

genecis::test_device!(modified_resnet_matches_pytorch, |device| {
    let refs = reference("rn_ref.pt");
    let m = clip_from("rn_state.pt", device);
    assert_eq!(
        m.config.vision,
        Vision::ResNet {
            width: 64,
            layers: [1, 1, 1, 1],
            heads: 32
        }
    );
    assert_eq!(m.config.image_resolution, 64);
    check_parity(&m, &refs, RN, device);
    check_parity(&clip_from("rn_module_state.pt", device), &refs, RN, device);
});

genecis::test_device!(combiner_matches_pytorch, |device| {
    let refs = reference("combiner_ref.pt");
    let sd = StateDict::load(&fixtures().join("combiner_state.pt"), device).unwrap();
    let c = Combiner::new(sd).unwrap();
    assert_eq!(c.dim, 32);
    let on = |t: &Tensor| t.to_device(device);
    let out = c
        .forward(&on(&refs["image"]), &on(&refs["text"]))
        .unwrap()
        .to_device(Device::Cpu);
    // Its longest dot product: the combiner layer over 2 x proj 64; four
    // products chained (projection, combiner layer, output, scalar).
    let (d, tol) = (
        relative_max_diff(&out, &refs["combined"]),
        forward_tolerance(2 * 64, 4, device),
    );
    assert!(
        d <= tol,
        "combiner differs by {d} of its scale (bound {tol})"
    );
});

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

genecis::test_device!(
    resnet_torchscript_archive_with_batchnorm_buffers,
    |device| {
        let refs = reference("rn_ref.pt");
        let sd = StateDict::load(&fixtures().join("rn_jit.pt"), device).unwrap();
        assert!(
            sd.has("visual.bn1.running_mean"),
            "buffers come with the parameters"
        );
        check_parity(&Clip::new(sd).unwrap(), &refs, RN, device);
    }
);

#[test]
fn preprocessing_matches_pil() {
    use genecis::model::preprocess::{load_rgb, ImageKey};
    let refs = reference("preprocess_ref.pt");
    for i in 0..5 {
        for ext in ["png", "jpg"] {
            let path = fixtures().join(format!("pre_{i}.{ext}"));
            let ours = load_rgb(
                &ImageKey {
                    path: &path,
                    bbox: None,
                    rgb_first: false,
                },
                32,
            )
            .unwrap();
            let theirs = refs[&format!("pre_{i}_{ext}")].to_kind(tch::Kind::Int64);
            let ours = Tensor::from_slice(ours.as_raw().as_slice())
                .view([32, 32, 3])
                .to_kind(tch::Kind::Int64);
            let max = (ours - theirs).abs().max().int64_value(&[]);
            assert_eq!(max, 0, "pre_{i}.{ext}: pixels differ by up to {max}");
        }
    }
}

/// Every mode and encoding the benchmarks meet (JPEG 4:2:0 / 4:2:2 / 4:4:4,
/// progressive, grayscale, CMYK, EXIF-rotated; PNG RGB, L, palette, RGBA,
/// LA; VAW crops with their pad), against the original's pipeline run by
/// scripts/make_image_fixtures.py with Pillow 10.4 and torchvision.
#[test]
fn decode_crop_and_resize_match_the_original_bit_for_bit() {
    use genecis::model::preprocess::{load_rgb, ImageKey};
    let dir = script_fixtures("make_image_fixtures.py", "refs.json");
    let refs: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("refs.json")).unwrap()).unwrap();
    assert!(refs.len() >= 25);
    let mut bad = Vec::new();
    for r in &refs {
        let path = dir.join(r["file"].as_str().unwrap());
        let bbox = r["bbox"].as_array().map(|a| {
            let v: Vec<f64> = a.iter().map(|x| x.as_f64().unwrap()).collect();
            [v[0], v[1], v[2], v[3]]
        });
        let n = r["n"].as_u64().unwrap() as u32;
        let got = load_rgb(
            &ImageKey {
                path: &path,
                bbox,
                rgb_first: false,
            },
            n,
        );
        if r["error"].as_bool() == Some(true) {
            assert!(got.is_err(), "{path:?} decodes although Pillow refuses it");
            continue;
        }
        let want: Vec<u8> = (0..r["rgb"].as_str().unwrap().len() / 2)
            .map(|i| u8::from_str_radix(&r["rgb"].as_str().unwrap()[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let got = got.unwrap_or_else(|e| panic!("{e}")).into_raw();
        let diff: Vec<i32> = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .collect();
        let (max, count) = (
            diff.iter().max().copied().unwrap_or(0),
            diff.iter().filter(|d| **d > 0).count(),
        );
        if got.len() != want.len() || max > 0 {
            bad.push(format!(
                "{} {bbox:?}: {count} values differ, by up to {max}",
                r["file"]
            ));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// When the towers' projections disagree, the error names both: either may
/// be the one that does not belong.
#[test]
fn disagreeing_projections_are_both_named() {
    let mut sd = StateDict::load(&fixtures().join("vit_state.pt"), Device::Cpu).unwrap();
    sd.tensors.insert(
        "text_projection".into(),
        Tensor::zeros([64, 16], (tch::Kind::Float, Device::Cpu)),
    );
    let e = Clip::new(sd).err().unwrap().to_string();
    assert!(
        e.contains("'text_projection' has shape [64, 16]")
            && e.contains("visual.proj projects to 32"),
        "{e}"
    );
}
