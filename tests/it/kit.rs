//! The GPU kit's check script (`scripts/gpu_check.sh`) on this machine:
//! without a GPU it runs its CPU half (encode against PyTorch, ranking,
//! fine-tuning steps against PyTorch's loop) and says the GPU half did
//! not run; with one, the GPU half too, at the small size.

use std::path::Path;

#[test]
fn gpu_check_runs_its_cpu_half_and_reports_in_json() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let r = std::process::Command::new(root.join("scripts/gpu_check.sh"))
        .arg(out.path())
        .arg("small")
        .env("GENECIS_BIN", env!("CARGO_BIN_EXE_genecis"))
        .env("PYTHON", root.join(".venv/bin/python"))
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(r.status.success(), "gpu_check failed:\n{log}");
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("gpu_check.json")).unwrap()).unwrap();
    assert_eq!(j["failures"], serde_json::json!([]), "{j:#}");
    let gpu = tch::Cuda::is_available();
    assert_eq!(
        j["gpu_half"].as_str().unwrap().starts_with("did not run"),
        !gpu,
        "{j:#}"
    );
    // The figures are there and within their bounds.
    let enc = &j["encode"]["cpu_vs_pytorch_cpu"];
    assert!(enc["image_rel"].as_f64().unwrap() <= enc["bound"].as_f64().unwrap());
    let ft = &j["finetune_steps"];
    assert_eq!(ft["losses_genecis"].as_array().unwrap().len(), 4);
    assert!(
        ft["weights_worst_share_of_a_full_update"].as_f64().unwrap()
            <= ft["bound"].as_f64().unwrap()
    );
    assert!(j["rank"]["cpu_queries_per_s"].as_f64().unwrap() > 0.0);
}
