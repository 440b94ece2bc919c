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
use duet_train::stages::restore::{fit_fusion, fit_restore, PairFitArgs};

mod common;
use common::{caption_args, chain, generate_args, max_difference};

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

/// The fusion head and the restorers on two peers: each draws the whole batch's timesteps and
/// noise and takes its rows, every loss divides by the whole batch, so 2 peers with 8 examples
/// each train what one device trains with 16 (the restorers through the unrolled sampler too).
#[test]
fn two_cpu_peers_train_fusion_and_restore_like_one_device() {
    use duet_datasets::pair_tasks::PairTask;
    use duet_run::RestoreSettings;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 24, 3, &SceneConfig::default(), "test").unwrap();
    let device = Default::default();
    let (_, generate) = chain(dir.path(), &data);
    let pair = |init: &Path, out: &Path, devices, steps| PairFitArgs {
        task: Some(PairTask::ColourColumn),
        train_examples: Some(64),
        test_examples: Some(16),
        steps: Some(steps),
        batch_size: Some(16),
        seed: 3,
        settings: Some(RestoreSettings {
            token_steps: 3,
            ..RestoreSettings::default()
        }),
        devices,
        command: "test".into(),
        quiet: true,
        ..PairFitArgs::new(init, out)
    };
    let fusion = |out: &Path, devices| {
        fit_fusion::<CpuBackend>(&pair(&generate, out, devices, 4), &device).unwrap();
        load_weights(&out.join(WEIGHTS_FILE)).unwrap()
    };
    let (one, two) = (dir.path().join("fusion-1"), dir.path().join("fusion-2"));
    let delta = max_difference(&fusion(&one, 1), &fusion(&two, 2));
    eprintln!("fusion, 1 device vs 2 peers: max |Δ| = {delta:e}");
    assert!(delta <= 1e-6, "2 peers trained another head: {delta}");

    let restore = |out: &Path, devices, steps| {
        fit_restore::<CpuBackend>(&pair(&one, out, devices, steps), &device).unwrap();
        load_weights(&out.join(WEIGHTS_FILE)).unwrap()
    };
    let (a, b) = (
        restore(&dir.path().join("restore-1"), 1, 4),
        restore(&dir.path().join("restore-2"), 2, 4),
    );
    let delta = max_difference(&a, &b);
    eprintln!("restore, 1 device vs 2 peers: max |Δ| = {delta:e}");
    assert!(delta <= 1e-6, "2 peers trained other restorers: {delta}");
    // The steps moved the restorers by far more than that (3 more steps than a 1-step run).
    let moved = max_difference(&a, &restore(&dir.path().join("restore-short"), 1, 1));
    eprintln!("restore, 4 steps vs 1: max |Δ| = {moved:e}");
    assert!(
        moved > 100.0 * delta.max(1e-7),
        "training moved the restorers by {moved}"
    );
}

/// The unify stage on two peers: stage 1 splits each step's images (each image's captions come
/// from its own generator stream and its rebuild from its own start noise, whichever peer takes
/// it) and stage 2 each batch, so both stages end where one device ends, with the same rewards.
#[test]
fn two_cpu_peers_run_the_unify_stage_one_device_runs() {
    use duet_train::stages::unify::{fit_unify, UnifyFitArgs, STAGE1_DIR, STAGE2_DIR};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 24, 3, &SceneConfig::default(), "test").unwrap();
    let device = Default::default();
    let (_, generate) = chain(dir.path(), &data);
    let unify = |out: &Path, devices| {
        let args = UnifyFitArgs {
            init: generate.clone(),
            data: vec![data.clone()],
            out: out.to_path_buf(),
            understand_steps: Some(3),
            understand_images: Some(4),
            understand_lr: Some(1e-3),
            group: Some(3),
            temperature: Some(2.0),
            generate_steps: Some(2),
            seed: 5,
            device: "cpu".into(),
            devices,
            quiet: true,
            ..UnifyFitArgs::default()
        };
        fit_unify::<CpuBackend>(&args, &device).unwrap()
    };
    let (one, two) = (dir.path().join("unify-1"), dir.path().join("unify-2"));
    let (a, b) = (unify(&one, 1), unify(&two, 2));
    eprintln!("unify, 1 device: {a:?}\n2 peers: {b:?}");
    for (x, y) in [
        (a.reward_start, b.reward_start),
        (a.reward_end, b.reward_end),
        (a.final_kl, b.final_kl),
        (a.informative_groups, b.informative_groups),
        (a.final_diffusion_loss, b.final_diffusion_loss),
    ] {
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-3), "{a:?} vs {b:?}");
    }
    assert!(a.informative_groups > 0.0, "stage 1 never updated: {a:?}");
    for stage in [STAGE1_DIR, STAGE2_DIR] {
        let delta = max_difference(
            &load_weights(&one.join(stage).join(WEIGHTS_FILE)).unwrap(),
            &load_weights(&two.join(stage).join(WEIGHTS_FILE)).unwrap(),
        );
        eprintln!("unify {stage}, 1 device vs 2 peers: max |Δ| = {delta:e}");
        assert!(
            delta <= 1e-6,
            "{stage}: 2 peers trained other weights: {delta}"
        );
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

/// Each peer runs on a rayon pool of its own, of one thread, so burn-ndarray's parallel loops
/// inside a peer run on that peer's thread instead of queueing on the global pool behind the
/// other peers' (docs/TRAINING.md: a part of 0.98 → 0.70 s a `small` caption step on two
/// peers; one thread per matrix product is the other).
#[test]
fn each_peer_runs_its_parallel_loops_on_its_own_thread() {
    use rayon::prelude::*;
    let devices = vec![Default::default(); 2];
    let names = run_peers::<CpuBackend, Vec<String>, _>(&devices, |peer: Peer, device| {
        assert_eq!(rayon::current_num_threads(), 1, "peer {}", peer.rank());
        let here = std::thread::current().id();
        let elsewhere = (0..64)
            .into_par_iter()
            .filter(|_| std::thread::current().id() != here)
            .count();
        assert_eq!(
            elsewhere,
            0,
            "peer {}: a parallel loop left its thread",
            peer.rank()
        );
        // Both peers are in the group at once (a sum needs both), each on its own thread.
        let name = std::thread::current().name().unwrap_or("").to_string();
        assert_eq!(name, format!("duet-peer-{}", peer.rank()));
        peer.sum::<CpuBackend>(1.0, device)?;
        Ok(vec![name])
    })
    .unwrap();
    assert_eq!(names, ["duet-peer-0"]);
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
    assert!(!out.exists(), "nothing is written on a refused run");
}
