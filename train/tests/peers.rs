//! Data-parallel training across processes (`--peers`, `--rank`) over loopback TCP: two
//! processes take the steps one device takes, a killed peer stops the run with an error naming
//! it and `--resume` continues from the last checkpoint, and bad groups (a peer missing, a
//! disagreeing configuration, bad ranks) are typed errors before anything is written. Every
//! child runs with a `--peer-timeout`, so no test can hang.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use duet_datasets::shapeworld::{write_dataset, SceneConfig};
use duet_run::checkpoint::{load_weights, read_json, TrainState, STATE_FILE, WEIGHTS_FILE};
use duet_run::METRICS_FILE;
use duet_train::backend::CpuBackend;
use duet_train::stages::caption::fit;
use duet_train::stages::generate::{fit_generate, GenerateFitArgs};

mod common;
use common::{caption_args, generate_args, max_difference};

/// `--peers` for two processes on loopback: a port free now for rank 0 (rank 1's entry only
/// names its host).
fn loopback_peers() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port},127.0.0.1:{}", port.wrapping_add(1))
}

/// `duet-train fit --stage caption` as the tests' one-device `caption_args` (tiny, batch 8,
/// seed 7), into `out`.
fn caption(data: &Path, out: &Path, steps: usize) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_duet-train"));
    c.args(["fit", "--stage", "caption", "--preset", "tiny", "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args([
            "--steps",
            &steps.to_string(),
            "--batch-size",
            "8",
            "--seed",
            "7",
        ]);
    c
}

/// Adds this process's place in a two-process group to `c`.
fn as_rank(mut c: Command, peers: &str, rank: usize, timeout_s: u32) -> Command {
    c.args(["--peers", peers, "--rank", &rank.to_string()])
        .args(["--peer-timeout", &timeout_s.to_string()]);
    c
}

fn spawn(mut c: Command) -> Child {
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs both ranks at once and returns (rank 0's output, rank 1's output).
fn run_pair(rank0: Command, rank1: Command) -> (Output, Output) {
    let one = spawn(rank1);
    let zero = spawn(rank0);
    (
        zero.wait_with_output().unwrap(),
        one.wait_with_output().unwrap(),
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Two processes with 4 samples each take the step one device takes with 8, for the caption
/// and the generate stage: the same weights within 1e-6 (the same tolerance as two threads:
/// the sums differ from one device's only in the order of additions), and the second process
/// writes nothing (its --out is not even created).
#[test]
fn two_processes_over_loopback_train_the_weights_one_device_trains() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 40, 3, &SceneConfig::default(), "test").unwrap();
    let device = Default::default();
    let one = dir.path().join("one");
    fit::<CpuBackend>(&caption_args(&data, &one, 6, false), &device).unwrap();

    let two = dir.path().join("two");
    let worker = dir.path().join("worker");
    let peers = loopback_peers();
    let (zero, first) = run_pair(
        as_rank(caption(&data, &two, 6), &peers, 0, 60),
        as_rank(caption(&data, &worker, 6), &peers, 1, 60),
    );
    assert!(zero.status.success(), "rank 0: {}", stderr(&zero));
    assert!(first.status.success(), "rank 1: {}", stderr(&first));
    assert!(!worker.exists(), "rank 1 wrote its --out");
    let a = load_weights(&one.join(WEIGHTS_FILE)).unwrap();
    let b = load_weights(&two.join(WEIGHTS_FILE)).unwrap();
    let delta = max_difference(&a, &b);
    eprintln!("caption, 1 device vs 2 processes: max |Δ| = {delta:e}");
    assert!(delta <= 1e-6, "2 processes trained other weights: {delta}");

    // The generate stage, from that caption run.
    let gen = |out: &Path| GenerateFitArgs {
        min_snr_gamma: Some(5.0),
        ..generate_args(&one, vec![data.clone()], out, 4)
    };
    let gen_one = dir.path().join("gen-one");
    fit_generate::<CpuBackend>(&gen(&gen_one), &device).unwrap();
    let gen_cli = |out: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_duet-train"));
        c.args(["fit", "--stage", "generate", "--init"])
            .arg(&one)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(out)
            .args(["--steps", "4", "--batch-size", "8", "--seed", "1"])
            .args(["--min-snr-gamma", "5"]);
        c
    };
    let gen_two = dir.path().join("gen-two");
    let peers = loopback_peers();
    let (zero, first) = run_pair(
        as_rank(gen_cli(&gen_two), &peers, 0, 60),
        as_rank(gen_cli(&worker), &peers, 1, 60),
    );
    assert!(zero.status.success(), "rank 0: {}", stderr(&zero));
    assert!(first.status.success(), "rank 1: {}", stderr(&first));
    assert!(!worker.exists(), "rank 1 wrote its --out");
    let a = load_weights(&gen_one.join(WEIGHTS_FILE)).unwrap();
    let b = load_weights(&gen_two.join(WEIGHTS_FILE)).unwrap();
    let delta = max_difference(&a, &b);
    eprintln!("generate, 1 device vs 2 processes: max |Δ| = {delta:e}");
    assert!(
        delta <= 1e-6,
        "2 processes trained another generator: {delta}"
    );
}

/// A peer killed mid-run stops the other within seconds with an error naming it; the last
/// checkpoint stays valid, and both resumed with `--resume` end where one device ends.
#[test]
fn a_killed_peer_stops_the_run_and_resume_continues() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 40, 3, &SceneConfig::default(), "test").unwrap();
    // Both ranks use the same run folder here (as peers on shared storage do): rank 1 reads
    // it to resume, and writes nothing.
    let run = dir.path().join("run");
    let peers = loopback_peers();
    let (zero, first) = run_pair(
        as_rank(caption(&data, &run, 4), &peers, 0, 60),
        as_rank(caption(&data, &run, 4), &peers, 1, 60),
    );
    assert!(zero.status.success(), "rank 0: {}", stderr(&zero));
    assert!(first.status.success(), "rank 1: {}", stderr(&first));

    let resume = |c: Command| {
        let mut c = c;
        c.arg("--resume");
        c
    };
    // A rank resuming from another folder (a stale or missing copy of the run) is refused
    // before rank 0 touches the run: its config still says 4 steps.
    let config = std::fs::read(run.join("config.json")).unwrap();
    let elsewhere = dir.path().join("elsewhere");
    let peers = loopback_peers();
    let (zero, first) = run_pair(
        resume(as_rank(caption(&data, &run, 8), &peers, 0, 30)),
        resume(as_rank(caption(&data, &elsewhere, 8), &peers, 1, 30)),
    );
    assert!(!zero.status.success() && !first.status.success());
    assert!(
        stderr(&zero).contains(
            "rank 1 disagrees with rank 0 on the configuration, data or resumed checkpoint"
        ),
        "{}",
        stderr(&zero)
    );
    assert_eq!(std::fs::read(run.join("config.json")).unwrap(), config);
    assert!(!elsewhere.exists());

    // A long resumed run; rank 1 dies once rank 0 has logged step 10.
    let logged = |run: &Path| {
        std::fs::read_to_string(run.join(METRICS_FILE))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    let before = logged(&run);
    let peers = loopback_peers();
    let mut one = spawn(resume(as_rank(caption(&data, &run, 5000), &peers, 1, 60)));
    let zero = spawn(resume(as_rank(caption(&data, &run, 5000), &peers, 0, 60)));
    let start = Instant::now();
    while logged(&run) == before {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "rank 0 never logged"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    one.kill().unwrap();
    let killed_at = Instant::now();
    let zero = zero.wait_with_output().unwrap();
    let _ = one.wait();
    assert!(!zero.status.success());
    let e = stderr(&zero);
    assert!(e.contains("lost rank 1"), "{e}");
    assert!(e.contains("--resume"), "{e}");
    assert!(
        killed_at.elapsed() < Duration::from_secs(30),
        "rank 0 took {:?} to stop",
        killed_at.elapsed()
    );
    let state: TrainState = read_json(&run.join(STATE_FILE)).unwrap();
    assert_eq!(
        state.step, 4,
        "the last checkpoint is the one before the kill"
    );

    // Resumed on both ranks: the run one device makes in 6 steps.
    let peers = loopback_peers();
    let (zero, first) = run_pair(
        resume(as_rank(caption(&data, &run, 6), &peers, 0, 60)),
        resume(as_rank(caption(&data, &run, 6), &peers, 1, 60)),
    );
    assert!(zero.status.success(), "rank 0: {}", stderr(&zero));
    assert!(first.status.success(), "rank 1: {}", stderr(&first));
    let one_device = dir.path().join("one");
    fit::<CpuBackend>(
        &caption_args(&data, &one_device, 6, false),
        &Default::default(),
    )
    .unwrap();
    let delta = max_difference(
        &load_weights(&one_device.join(WEIGHTS_FILE)).unwrap(),
        &load_weights(&run.join(WEIGHTS_FILE)).unwrap(),
    );
    assert!(
        delta <= 1e-6,
        "the resumed run trained other weights: {delta}"
    );
}

/// A missing peer (either side) is an error after --peer-timeout, not a hang; peers whose
/// configurations differ are refused on both sides; bad ranks and --peers with --devices are
/// refused; and none of these writes anything.
#[test]
fn bad_peer_groups_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 16, 3, &SceneConfig::default(), "test").unwrap();
    let out = dir.path().join("run");
    let other = dir.path().join("other");

    // Rank 1 with no rank 0, rank 0 with no rank 1: each gives up after its timeout.
    let peers = loopback_peers();
    let t0 = Instant::now();
    let o = as_rank(caption(&data, &out, 2), &peers, 1, 1)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("could not be reached within 1 s"),
        "{}",
        stderr(&o)
    );
    let o = as_rank(caption(&data, &out, 2), &peers, 0, 1)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("rank(s) [1] did not join within 1 s"),
        "{}",
        stderr(&o)
    );
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());

    // Another learning rate on rank 1: both refuse.
    let peers = loopback_peers();
    let mut differing = caption(&data, &other, 2);
    differing.args(["--lr", "0.0005"]);
    let (zero, first) = run_pair(
        as_rank(caption(&data, &out, 2), &peers, 0, 30),
        as_rank(differing, &peers, 1, 30),
    );
    assert!(!zero.status.success() && !first.status.success());
    assert!(
        stderr(&zero).contains(
            "rank 1 disagrees with rank 0 on the configuration, data or resumed checkpoint"
        ),
        "{}",
        stderr(&zero)
    );
    assert!(
        stderr(&first)
            .contains("rank 1's configuration, data or resumed checkpoint differ from rank 0's"),
        "{}",
        stderr(&first)
    );

    // Ranks outside the list, --rank without --peers, --peers with several devices.
    let o = as_rank(caption(&data, &out, 2), &peers, 2, 1)
        .output()
        .unwrap();
    assert!(
        stderr(&o).contains("--rank 2 is not below the 2 peers"),
        "{}",
        stderr(&o)
    );
    let mut c = caption(&data, &out, 2);
    c.args(["--rank", "1"]);
    let o = c.output().unwrap();
    assert!(
        stderr(&o).contains("--rank and --peer-timeout belong to --peers"),
        "{}",
        stderr(&o)
    );
    let mut c = as_rank(caption(&data, &out, 2), &peers, 0, 1);
    c.args(["--devices", "2"]);
    let o = c.output().unwrap();
    assert!(
        stderr(&o).contains("one device per process"),
        "{}",
        stderr(&o)
    );
    assert!(
        !out.exists() && !other.exists(),
        "a refused run wrote its folder"
    );
}
