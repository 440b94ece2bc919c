//! Data-parallel training (`--devices N`, Burn's collective engine): N CPU peers take the
//! steps one device takes, resume like one device, and bad configurations are refused before
//! anything is written.

use std::path::Path;
use std::process::Command;

use duet_datasets::shapeworld::{write_dataset, SceneConfig};
use duet_run::checkpoint::{load_weights, WEIGHTS_FILE};
use duet_run::METRICS_FILE;
use duet_train::backend::CpuBackend;
use duet_train::parallel::{run_peers, ParallelError, Peer};
use duet_train::stages::caption::{fit, FitArgs};
use duet_train::stages::generate::{fit_generate, GenerateFitArgs};

mod common;
use common::{caption_args, generate_args, max_difference};

fn args(data: &Path, out: &Path, steps: usize, devices: usize, resume: bool) -> FitArgs {
    FitArgs {
        devices,
        ..caption_args(data, out, steps, resume)
    }
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join(METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// Two peers with 4 samples each take the step one device takes with 8: the same losses and,
/// after 6 AdamW steps, the same weights up to the order of floating-point additions (each
/// peer sums half the batch; measured max |Δ| 1.2e-7).
#[test]
fn two_cpu_peers_train_the_weights_one_device_trains() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 48, 3, &SceneConfig::default(), "test").unwrap();
    let device = Default::default();
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    fit::<CpuBackend>(&args(&data, &one, 6, 1, false), &device).unwrap();
    fit::<CpuBackend>(&args(&data, &two, 6, 2, false), &device).unwrap();
    let a = load_weights(&one.join(WEIGHTS_FILE)).unwrap();
    let b = load_weights(&two.join(WEIGHTS_FILE)).unwrap();
    let delta = max_difference(&a, &b);
    eprintln!("1 device vs 2 peers: max |Δ| = {delta:e}");
    assert!(
        delta <= 1e-6,
        "2 peers trained other weights: max |Δ| {delta}"
    );
    // And the steps moved the weights by far more than that.
    let start = dir.path().join("start");
    fit::<CpuBackend>(&args(&data, &start, 0, 1, false), &device).unwrap();
    let moved = max_difference(&a, &load_weights(&start.join(WEIGHTS_FILE)).unwrap());
    assert!(
        moved > 1000.0 * delta.max(1e-7),
        "training moved weights by {moved}"
    );

    let (la, lb) = (losses(&one), losses(&two));
    assert_eq!(la.len(), lb.len());
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "losses {la:?} vs {lb:?}");
    }
}

/// The generate stage on two peers: each draws the whole batch's dropout and noise and takes
/// its rows, and the contrastive loss sees every peer's text embeddings (gathered as
/// constants; each peer's gradient flows through its own captions), so 2 peers with 4
/// captions each take the step one device takes with 8 (measured max |Δ| 2.4e-7, Min-SNR-γ on).
#[test]
fn two_cpu_peers_train_the_generator_one_device_trains() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 40, 3, &SceneConfig::default(), "test").unwrap();
    let device = Default::default();
    let caption = dir.path().join("caption");
    fit::<CpuBackend>(&args(&data, &caption, 2, 1, false), &device).unwrap();
    let gen = |out: &Path, devices| GenerateFitArgs {
        min_snr_gamma: Some(5.0),
        seed: 2,
        devices,
        ..generate_args(&caption, vec![data.clone()], out, 5)
    };
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    fit_generate::<CpuBackend>(&gen(&one, 1), &device).unwrap();
    fit_generate::<CpuBackend>(&gen(&two, 2), &device).unwrap();
    let a = load_weights(&one.join(WEIGHTS_FILE)).unwrap();
    let b = load_weights(&two.join(WEIGHTS_FILE)).unwrap();
    let delta = max_difference(&a, &b);
    eprintln!("generate, 1 device vs 2 peers: max |Δ| = {delta:e}");
    assert!(
        delta <= 1e-6,
        "2 peers trained another generator: max |Δ| {delta}"
    );
    let (la, lb) = (losses(&one), losses(&two));
    assert_eq!(la.len(), lb.len());
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "losses {la:?} vs {lb:?}");
    }
}

/// A two-peer run stopped after 3 steps and resumed (on two peers) ends where the
/// uninterrupted two-peer run ends, bit for bit: two peers' sums do not depend on which
/// arrives first.
#[test]
fn a_two_peer_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 32, 4, &SceneConfig::default(), "test").unwrap();
    let device = Default::default();
    let straight = dir.path().join("straight");
    let resumed = dir.path().join("resumed");
    fit::<CpuBackend>(&args(&data, &straight, 5, 2, false), &device).unwrap();
    fit::<CpuBackend>(&args(&data, &resumed, 3, 2, false), &device).unwrap();
    fit::<CpuBackend>(&args(&data, &resumed, 5, 2, true), &device).unwrap();
    let a = load_weights(&straight.join(WEIGHTS_FILE)).unwrap();
    let b = load_weights(&resumed.join(WEIGHTS_FILE)).unwrap();
    assert_eq!(max_difference(&a, &b), 0.0);
}

/// A peer that fails stops the whole group with its own error, instead of leaving the others
/// waiting forever on a collective operation it will never join.
#[test]
fn a_failing_peer_stops_the_group_with_its_error() {
    let devices = vec![Default::default(); 2];
    let out = run_peers::<CpuBackend, (), _>(&devices, |peer: Peer, device| {
        peer.sum::<CpuBackend>(1.0, device)?;
        if peer.rank() == 1 {
            anyhow::bail!("disk full on peer {}", peer.rank());
        }
        // The leader waits on a sum peer 1 never joins.
        peer.sum::<CpuBackend>(2.0, device)?;
        Ok(())
    });
    let e = format!("{:#}", out.unwrap_err());
    assert!(e.contains("disk full on peer 1"), "{e}");
    assert!(e.contains("peer 1 of 2"), "{e}");

    // A peer that panics (a bug, not an error) stops the group the same way.
    let out = run_peers::<CpuBackend, (), _>(&devices, |peer: Peer, device| {
        peer.sum::<CpuBackend>(1.0, device)?;
        assert!(peer.rank() != 1, "peer {} hit a bug", peer.rank());
        peer.sum::<CpuBackend>(2.0, device)?;
        Ok(())
    });
    let e = format!("{:#}", out.unwrap_err());
    assert!(e.contains("peer 1 of 2 panicked: peer 1 hit a bug"), "{e}");

    // The group after it works: sums are sums.
    let out = run_peers::<CpuBackend, f64, _>(&devices, |peer: Peer, device| {
        Ok(peer.sum::<CpuBackend>(peer.rank() as f64 + 1.0, device)?)
    })
    .unwrap();
    assert_eq!(out, 3.0);
    assert!(matches!(
        run_peers::<CpuBackend, (), _>(&[], |_: Peer, _| Ok(()))
            .unwrap_err()
            .downcast_ref(),
        Some(ParallelError::NoDevices)
    ));
}

/// A batch that does not split evenly, or no devices, is refused before the run folder exists.
#[test]
fn uneven_batches_and_zero_devices_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 16, 3, &SceneConfig::default(), "test").unwrap();
    let out = dir.path().join("run");
    let run = |devices: &str| {
        Command::new(env!("CARGO_BIN_EXE_duet-train"))
            .args(["fit", "--stage", "caption", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .args(["--steps", "2", "--batch-size", "8", "--devices", devices])
            .output()
            .unwrap()
    };
    let o = run("3");
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("a batch of 8 does not split evenly over 3 devices"),
        "{e}"
    );
    let o = run("0");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--devices must be at least 1"));
    assert!(!out.exists(), "nothing is written on a refused run");
    // A stage that does not train data-parallel yet says so.
    let o = Command::new(env!("CARGO_BIN_EXE_duet-train"))
        .args(["fit", "--stage", "unify", "--init"])
        .arg(&out)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args(["--devices", "2"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("--stage unify does not use --devices"), "{e}");
}
