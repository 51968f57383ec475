//! libtorch's own process groups from Rust (`src/model/c10d.cpp`): ranks
//! as separate processes on 127.0.0.1, rendezvous through a TCPStore,
//! collectives through ProcessGroupGloo; a rank alone fails within its
//! timeout, naming the address.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::bin;

/// A port free now, from the OS.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `genecis bench CMD` once per rank of a world of `world` on a free port,
/// all at once; each rank's JSON line, in rank order.
fn run_ranks(cmd: &str, world: usize) -> Vec<serde_json::Value> {
    let port = free_port().to_string();
    let children: Vec<_> = (0..world)
        .map(|r| {
            bin()
                .args(["bench", cmd, "--rank", &r.to_string()])
                .args([
                    "--world",
                    &world.to_string(),
                    "--port",
                    &port,
                    "--timeout",
                    "60",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .enumerate()
        .map(|(r, c)| {
            let o = c.wait_with_output().unwrap();
            assert!(
                o.status.success(),
                "rank {r}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            serde_json::from_slice(&o.stdout).unwrap()
        })
        .collect()
}

#[test]
fn gloo_collectives_across_processes() {
    let world = 3usize;
    for (r, j) in run_ranks("dist", world).into_iter().enumerate() {
        assert_eq!(j["rank"], r);
        // 1 + 2 + 3 on every rank.
        assert_eq!(j["all_reduce"], serde_json::json!([6.0, 6.0, 6.0, 6.0]));
        // Each rank's [10r, 10r + 1], in rank order.
        assert_eq!(
            j["all_gather"],
            serde_json::json!([0.0, 1.0, 10.0, 11.0, 20.0, 21.0])
        );
        // Rank 0's values everywhere.
        assert_eq!(j["broadcast"], serde_json::json!([100.0, 100.0, 100.0]));
    }
}

/// Runs a rank whose peers never come (3 s timeout): it fails within the
/// timeout and names the rendezvous address and the variables to check.
fn fails_alone(mut rank: std::process::Command, port: &str) {
    let t0 = Instant::now();
    let o = rank.output().unwrap();
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("MASTER_ADDR"), "{err}");
    assert!(took < Duration::from_secs(30), "gave up after {took:?}");
}

#[test]
fn a_rank_alone_fails_within_its_timeout_naming_the_address() {
    let port = free_port().to_string();
    let mut rank = bin();
    rank.args(["bench", "dist", "--rank", "0", "--world", "2"])
        .args(["--port", &port, "--timeout", "3"]);
    fails_alone(rank, &port);
}

/// The data-parallel gradient: each rank's slice gathered with gradient,
/// gradients summed over ranks, equals one process's gradient of the
/// whole batch. Float32 reordering only: the loss's sums run over 8 x 16
/// terms per logit and 8 logits per row, a few products deep.
#[test]
fn gathered_gradients_summed_equal_one_process() {
    let tol = crate::common::forward_tolerance(16 * 8, 6, tch::Device::Cpu);
    for (r, j) in run_ranks("dist-grad", 2).into_iter().enumerate() {
        let (diff, scale) = (
            j["max_diff"].as_f64().unwrap(),
            j["grad_scale"].as_f64().unwrap(),
        );
        assert!(scale > 1e-3, "a gradient to compare: {j}");
        assert!(
            diff <= tol * scale,
            "rank {r}: off by {diff:e} of {scale:e} (bound {tol:e} of it)"
        );
    }
}

/// `genecis run` as rank 1 of 2 (torchrun's variables) with no rank 0:
/// it fails within `--dist-timeout`, naming MASTER_ADDR:MASTER_PORT, and
/// writes nothing.
#[test]
fn a_run_rank_without_its_peers_fails_within_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let m = crate::common::Manifest::new("lonely")
        .stage(
            "synth",
            "synth",
            &[],
            "train_scenes = 50, heldout_scenes = 40, templates_per_task = 2",
        )
        .write(tmp.path());
    let port = free_port().to_string();
    let mut rank = bin();
    rank.args(["run", m.to_str().unwrap(), "-q", "--dist-timeout", "3"])
        .envs([
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", port.as_str()),
        ]);
    fails_alone(rank, &port);
    assert!(!tmp.path().join("run").exists(), "nothing written");
}
