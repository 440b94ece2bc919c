//! `duet-train fit`: resuming continues exactly where the run stopped, and bad device requests
//! are clear errors.

use std::path::Path;
use std::process::Command;

use duet_datasets::shapeworld::{write_dataset, SceneConfig};
use duet_run::checkpoint::{load_weights, read_json, TrainState, STATE_FILE, WEIGHTS_FILE};
use duet_run::METRICS_FILE;
use duet_train::backend::CpuBackend;
use duet_train::stages::caption::{fit, FitArgs};

mod common;
use common::{caption_args as args, max_difference};

#[test]
fn resume_continues_exactly_like_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 48, 3, &SceneConfig::default(), "test").unwrap();
    let straight = dir.path().join("straight");
    let resumed = dir.path().join("resumed");
    let device = Default::default();
    fit::<CpuBackend>(&args(&data, &straight, 6, false), &device).unwrap();
    fit::<CpuBackend>(&args(&data, &resumed, 3, false), &device).unwrap();
    let half: TrainState = read_json(&resumed.join(STATE_FILE)).unwrap();
    assert_eq!(half.step, 3);
    fit::<CpuBackend>(&args(&data, &resumed, 6, true), &device).unwrap();

    let a = load_weights(&straight.join(WEIGHTS_FILE)).unwrap();
    let b = load_weights(&resumed.join(WEIGHTS_FILE)).unwrap();
    let worst = max_difference(&a, &b);
    // Bit for bit: CPU training is deterministic (docs/TRAINING.md "Seeds and initial weights").
    assert_eq!(worst, 0.0, "resumed weights differ by {worst}");
    // And training did move the weights: a 3-step checkpoint is not the 6-step one.
    let state: TrainState = read_json(&resumed.join(STATE_FILE)).unwrap();
    assert_eq!(state.step, 6);
    let steps: Vec<u64> = std::fs::read_to_string(resumed.join(METRICS_FILE))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps.last(), Some(&6), "metrics log: {steps:?}");
}

/// `duet-train fit --stage generate --init CAPTION --data DATA --out OUT`, to add flags to.
fn fit_generate_cli(caption: &Path, data: &Path, out: &Path) -> Command {
    let mut c = duet_train();
    c.args(["fit", "--stage", "generate", "--init"])
        .arg(caption)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out);
    c
}

fn duet_train() -> Command {
    Command::new(env!("CARGO_BIN_EXE_duet-train"))
}

#[test]
fn device_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 4, 1, &SceneConfig::default(), "test").unwrap();
    let run = |device: &str| {
        let out = duet_train()
            .args([
                "fit", "--stage", "caption", "--preset", "tiny", "--steps", "1",
            ])
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(dir.path().join("run"))
            .args(["--device", device])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--device {device} must fail here");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run("gpu");
    assert!(e.contains("unknown device 'gpu'"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    let e = run("cuda");
    // Without the feature: says how to rebuild; with it on a machine without a GPU: says why.
    assert!(
        e.contains("without the `cuda` feature") || e.contains("CUDA backend could not start"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
}

/// A flag the chosen stage does not read is an error naming it, before anything is written:
/// `--stage caption --init RUN` must not quietly train from scratch.
#[test]
fn fit_flags_the_stage_does_not_read_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_s = out.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &[
                "--stage",
                "caption",
                "--data",
                "d",
                "--conv-head",
                "8",
                "--long-skips",
            ],
            "--stage caption does not use --long-skips, --conv-head",
        ),
        (
            &["--stage", "caption", "--data", "d", "--init", "runs/x"],
            "--stage caption does not use --init (it reads --preset, --data, --resume",
        ),
        (
            &[
                "--stage", "generate", "--init", "r", "--data", "d", "--preset", "small",
            ],
            "--stage generate does not use --preset",
        ),
        (
            &[
                "--stage", "restore", "--init", "r", "--data", "d", "--resume",
            ],
            "--stage restore does not use --data, --resume",
        ),
        (
            &[
                "--stage",
                "restore",
                "--init",
                "r",
                "--group",
                "8",
                "--gen-steps",
                "4",
            ],
            "--stage restore does not use --group, --gen-steps",
        ),
        (
            &["--stage", "decode", "--data", "d"],
            // A closed set: clap refuses the word and lists the stages.
            "possible values: caption, generate, unify, dream, fusion, restore",
        ),
    ];
    for (args, want) in cases {
        let o = duet_train()
            .arg("fit")
            .args(args)
            .args(["--out", out_s])
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} must fail");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{e}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
}

#[test]
fn shapeworld_command_rejects_bad_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let out = duet_train()
        .args(["shapeworld", "--count", "2", "--size", "48", "--out"])
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--size must be 32 or 64"), "{e}");
}

/// `fit --stage fusion|restore` and `eval --stage restore`: bad options and wrong runs are
/// clear errors before anything is written, never panics.
#[test]
fn restore_stages_refuse_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = |args: &[&str]| {
        let o = duet_train().args(args).output().unwrap();
        assert!(!o.status.success(), "{args:?} must fail");
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!e.contains("panicked"), "{e}");
        e
    };
    let out_s = out.to_str().unwrap();
    let missing = dir.path().join("no-run");
    let missing_s = missing.to_str().unwrap();
    let e = run(&[
        "fit",
        "--stage",
        "fusion",
        "--out",
        out_s,
        "--task",
        "colour-column",
    ]);
    assert!(e.contains("--stage fusion needs --init"), "{e}");
    let e = run(&[
        "fit",
        "--stage",
        "fusion",
        "--init",
        missing_s,
        "--out",
        out_s,
        "--task",
        "colour-column",
        "--batch-size",
        "0",
    ]);
    assert!(e.contains("--batch-size must be at least 1"), "{e}");
    let e = run(&[
        "fit", "--stage", "fusion", "--init", missing_s, "--out", out_s, "--task", "colour",
    ]);
    assert!(e.contains("unknown task 'colour'"), "{e}");
    let e = run(&[
        "fit", "--stage", "restore", "--init", missing_s, "--out", out_s,
    ]);
    assert!(e.contains("config.json"), "{e}");
    let e = run(&["eval", "--stage", "restore", "--run", missing_s]);
    assert!(e.contains("config.json"), "{e}");
    assert!(!out.exists(), "nothing is written on a refused run");
}

/// The same command trains the same weights in two processes, bit for bit: the generate stage
/// (text encoder, denoiser, contrastive loss) is the one that was not, through the approximate
/// reciprocals of burn-ndarray's `simd` feature, whose error depended on buffer addresses
/// (`duet_train::backend` tests the reciprocals themselves at every alignment).
#[test]
fn the_same_command_trains_the_same_weights_in_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 40, 3, &SceneConfig::default(), "test").unwrap();
    let caption = dir.path().join("caption");
    fit::<CpuBackend>(&args(&data, &caption, 2, false), &Default::default()).unwrap();
    let train = |out: &Path| {
        let o = fit_generate_cli(&caption, &data, out)
            .args(["--batch-size", "16", "--steps", "6", "--seed", "3"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        load_weights(&out.join(WEIGHTS_FILE)).unwrap()
    };
    let a = train(&dir.path().join("a"));
    let b = train(&dir.path().join("b"));
    assert_eq!(a.len(), b.len());
    let differing: Vec<&String> = a
        .iter()
        .filter(|(name, t)| b[*name].data != t.data)
        .map(|(name, _)| name)
        .collect();
    assert!(differing.is_empty(), "tensors that differ: {differing:?}");
}

/// The generate stage's recipe options: recorded in the run's config, trained through (the
/// checkpoint holds the skip and convolution weights), refused on resume when they differ and
/// refused when out of range, before anything is written.
#[test]
fn generate_options_are_recorded_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 24, 3, &SceneConfig::default(), "test").unwrap();
    let caption = dir.path().join("caption");
    fit::<CpuBackend>(&args(&data, &caption, 2, false), &Default::default()).unwrap();
    let gen = dir.path().join("gen");
    let run = |extra: &[&str]| {
        fit_generate_cli(&caption, &data, &gen)
            .args(["--batch-size", "4"])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&[
        "--steps",
        "2",
        "--min-snr-gamma",
        "5",
        "--conv-head",
        "8",
        "--long-skips",
        "--denoiser-layers",
        "3",
        "--denoiser-patch",
        "2",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config: serde_json::Value = read_json(&gen.join("config.json")).unwrap();
    assert_eq!(config["diffusion"]["min_snr_gamma"], 5.0);
    assert_eq!(config["model"]["denoiser_conv_head"], 8);
    assert_eq!(config["model"]["denoiser_long_skips"], true);
    assert_eq!(config["model"]["denoiser_layers"], 3);
    assert_eq!(config["model"]["denoiser_patch_size"], 2);
    let weights = load_weights(&gen.join(WEIGHTS_FILE)).unwrap();
    assert_eq!(weights["denoiser.out_conv.weight"].shape, vec![3, 8, 3, 3]);
    assert!(weights.contains_key("denoiser.skips.0.weight"));
    assert!(weights.keys().any(|k| k.starts_with("denoiser.blocks.2.")));
    assert!(!weights.keys().any(|k| k.starts_with("denoiser.blocks.3.")));
    // 2 px patches in; each token emits its 2×2 pixels' 8 conv-head channels.
    assert_eq!(weights["denoiser.patch_embed.weight"].shape[2..], [2, 2]);
    assert_eq!(weights["denoiser.head.weight"].shape[1], 2 * 2 * 8);
    assert!(gen.join("loss.png").is_file(), "no training curve drawn");

    let o = run(&["--resume", "--steps", "3", "--conv-head", "16"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("a resumed run keeps its denoiser"), "{e}");
    let o = run(&["--resume", "--steps", "3", "--denoiser-layers", "4"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("a resumed run keeps its denoiser"), "{e}");
    let o = run(&["--resume", "--steps", "3", "--min-snr-gamma", "1"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("a resumed run keeps its loss"), "{e}");
    let state: TrainState = read_json(&gen.join(STATE_FILE)).unwrap();
    assert_eq!(state.step, 2, "a refused resume must not train");

    let fresh = dir.path().join("fresh");
    for (bad, want) in [
        (
            ["--min-snr-gamma", "0"],
            "--min-snr-gamma must be a positive number",
        ),
        (
            ["--conv-head", "0"],
            "denoiser_conv_head: must have at least one channel",
        ),
        (
            ["--denoiser-patch", "5"],
            "denoiser_patch_size: 5 does not divide image_size",
        ),
        (
            ["--denoiser-layers", "0"],
            "--denoiser-layers must be at least 1",
        ),
    ] {
        let o = duet_train()
            .args(["fit", "--stage", "generate", "--init"])
            .arg(&caption)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&fresh)
            .args(["--steps", "2", "--batch-size", "4"])
            .args(bad)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{bad:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{bad:?}: {e}");
        assert!(!fresh.join("model.safetensors").exists(), "{bad:?} trained");
    }

    // A folder the check refuses leaves no run folder behind, for either later stage.
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(
        broken.join("captions.jsonl"),
        r#"{"image": "images/gone.png", "caption": "a red circle"}"#,
    )
    .unwrap();
    for (stage, init) in [("generate", &caption), ("unify", &gen)] {
        let out = dir.path().join(format!("refused-{stage}"));
        let o = duet_train()
            .args(["fit", "--stage", stage, "--init"])
            .arg(init)
            .arg("--data")
            .arg(&broken)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{stage}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("images/gone.png does not exist"), "{stage}: {e}");
        assert!(!out.exists(), "{stage} left {} behind", out.display());
    }
}

/// Fine-tuning (`--init-from`) takes the source run's dimensions, so a `--preset` that would
/// be ignored is refused; a fine-tune resumes from its own checkpoint without the source; an
/// image size over the limit is refused before any image is fitted.
#[test]
fn fine_tunes_refuse_a_preset_and_resume_without_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 24, 3, &SceneConfig::default(), "test").unwrap();
    let source = dir.path().join("source");
    let device = Default::default();
    fit::<CpuBackend>(&args(&data, &source, 2, false), &device).unwrap();

    let tuned = dir.path().join("tuned");
    let cli = |extra: &[&str]| {
        duet_train()
            .args(["fit", "--stage", "caption", "--steps", "1", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(&tuned)
            .args(extra)
            .output()
            .unwrap()
    };
    let source_s = source.to_str().unwrap();
    let o = cli(&["--init-from", source_s, "--preset", "small"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("drop --preset small"), "{e}");
    for side in ["0", "1025", "100000000"] {
        let o = cli(&["--image-size", side]);
        assert!(!o.status.success(), "--image-size {side}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("must be from 1 to 1024 pixels"), "{e}");
    }
    assert!(!tuned.exists(), "nothing is written on a refused run");

    let fine = |steps, resume| FitArgs {
        init_from: Some(source.clone()),
        ..args(&data, &tuned, steps, resume)
    };
    fit::<CpuBackend>(&fine(2, false), &device).unwrap();
    let moved = dir.path().join("moved");
    std::fs::rename(&source, &moved).unwrap();
    fit::<CpuBackend>(&fine(3, true), &device).unwrap();
    let state: TrainState = read_json(&tuned.join(STATE_FILE)).unwrap();
    assert_eq!(state.step, 3);
}
