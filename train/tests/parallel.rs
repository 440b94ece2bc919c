//! Data-parallel training (`--devices N`, Burn's collective engine): N CPU peers take the
//! steps one device takes, resume like one device, and bad configurations are refused before
//! anything is written.

use std::path::Path;
use std::process::Command;

use duet_datasets::shapeworld::{write_dataset, SceneConfig};
use duet_models::params::NamedTensors;
use duet_models::Preset;
use duet_run::checkpoint::{load_weights, WEIGHTS_FILE};
use duet_run::METRICS_FILE;
use duet_train::backend::CpuBackend;
use duet_train::parallel::{run_peers, ParallelError, Peer};
use duet_train::stages::caption::{fit, FitArgs};

fn args(data: &Path, out: &Path, steps: usize, devices: usize, resume: bool) -> FitArgs {
    FitArgs {
        preset: Preset::Tiny,
        data: vec![data.to_path_buf()],
        out: out.to_path_buf(),
        steps: Some(steps),
        batch_size: Some(8),
        lr: None,
        seed: 5,
        resume,
        image_size: None,
        image_fit: None,
        tokenizer: None,
        init_from: None,
        device: "cpu".into(),
        devices,
        command: "test".into(),
        quiet: true,
    }
}

/// The largest |a - b| over every parameter of two checkpoints.
fn max_difference(a: &NamedTensors, b: &NamedTensors) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f32;
    for (name, t) in a {
        let u = &b[name];
        assert_eq!(t.shape, u.shape, "{name}");
        for (x, y) in t.data.iter().zip(&u.data) {
            worst = worst.max((x - y).abs());
        }
    }
    worst
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
/// peer sums half the batch; measured max |Δ| 7.5e-9).
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
        .args(["fit", "--stage", "generate", "--init"])
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
    assert!(e.contains("--stage generate does not use --devices"), "{e}");
}
