//! `duet-train fit --stage dream`: what it trains and what it keeps frozen, exact resume, and
//! the runs and data it refuses.

use std::path::Path;

use duet_datasets::shapeworld::{write_dataset, write_dataset_with, DatasetExtras, SceneConfig};
use duet_models::params::NamedTensors;
use duet_run::checkpoint::{load_weights, read_json, TrainState, STATE_FILE, WEIGHTS_FILE};
use duet_train::backend::CpuBackend;

mod common;
use common::{chain, dream_args, max_difference};
use duet_train::stages::dream::{fit_dream, DreamFitArgs};

#[test]
fn dream_trains_decoder_and_queries_keeps_the_rest_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("edits");
    let extras = DatasetExtras {
        questions_per_scene: 1,
        edits_per_scene: 2,
        ..Default::default()
    };
    write_dataset_with(&data, 32, 3, &SceneConfig::default(), "test", &extras).unwrap();
    let (_, gen) = chain(dir.path(), &data);
    let device = Default::default();
    let straight = dir.path().join("straight");
    let resumed = dir.path().join("resumed");
    fit_dream::<CpuBackend>(&dream_args(&gen, &data, &straight, 4, false), &device).unwrap();
    fit_dream::<CpuBackend>(&dream_args(&gen, &data, &resumed, 2, false), &device).unwrap();
    let half: TrainState = read_json(&resumed.join(STATE_FILE)).unwrap();
    assert_eq!(half.step, 2);
    fit_dream::<CpuBackend>(&dream_args(&gen, &data, &resumed, 4, true), &device).unwrap();

    let init = load_weights(&gen.join(WEIGHTS_FILE)).unwrap();
    let a = load_weights(&straight.join(WEIGHTS_FILE)).unwrap();
    let b = load_weights(&resumed.join(WEIGHTS_FILE)).unwrap();
    let diff = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max)
    };
    // Bit for bit: CPU training is deterministic.
    let worst = max_difference(&a, &b);
    assert_eq!(worst, 0.0, "resumed weights differ by {worst}");
    assert_eq!(a["dream.queries"].shape, vec![1, 3, 64]);
    for (name, t) in &init {
        let moved = diff(&t.data, &a[name].data);
        if name.starts_with("decoder.") {
            continue;
        }
        // Vision, text encoder and denoiser are carried bit for bit.
        assert_eq!(moved, 0.0, "{name} changed");
    }
    let decoder_moved = init
        .iter()
        .filter(|(n, _)| n.starts_with("decoder."))
        .map(|(n, t)| diff(&t.data, &a[n].data))
        .fold(0.0f32, f32::max);
    assert!(decoder_moved > 0.0, "the decoder did not train");
    let config: serde_json::Value = read_json(&straight.join("config.json")).unwrap();
    assert_eq!(config["stage"], "dream");
    assert_eq!(config["model"]["dream_queries"], 3);
    assert_eq!(config["understanding_weight"], 1.0);
    assert_eq!(config["generation_weight"], 1.0);

    // The control of the joint-vs-separate comparison: generation weight 0 trains the decoder
    // on captions and questions alone; the queries get no gradient, so one more step leaves
    // them as they were, and no diffusion loss is logged.
    let control = |out: &Path, steps| DreamFitArgs {
        generation_weight: Some(0.0),
        ..dream_args(&gen, &data, out, steps, false)
    };
    let (one, two) = (dir.path().join("control1"), dir.path().join("control2"));
    fit_dream::<CpuBackend>(&control(&one, 1), &device).unwrap();
    let outcome = fit_dream::<CpuBackend>(&control(&two, 2), &device).unwrap();
    assert!(outcome.final_diffusion_loss.is_nan());
    assert!(outcome.final_understanding_loss.is_finite());
    let (c1, c2) = (
        load_weights(&one.join(WEIGHTS_FILE)).unwrap(),
        load_weights(&two.join(WEIGHTS_FILE)).unwrap(),
    );
    for name in c2.keys().filter(|n| n.starts_with("dream.")) {
        assert_eq!(
            c1[name].data, c2[name].data,
            "{name} trained without generation"
        );
    }
    let moved = |x: &NamedTensors, y: &NamedTensors| {
        x.iter()
            .filter(|(n, _)| n.starts_with("decoder."))
            .map(|(n, t)| diff(&t.data, &y[n].data))
            .fold(0.0f32, f32::max)
    };
    assert!(moved(&c1, &c2) > 0.0, "the control's decoder did not train");
    let last = std::fs::read_to_string(two.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
    assert!(last["diffusion_loss"].is_null(), "{last}");
    assert!(last["understanding_loss"].as_f64().unwrap() > 0.0, "{last}");

    // The per-token match is logged when on, absent when off (the default).
    let tokens = dir.path().join("tokens");
    let args = DreamFitArgs {
        token_weight: Some(1.0),
        ..dream_args(&gen, &data, &tokens, 1, false)
    };
    fit_dream::<CpuBackend>(&args, &device).unwrap();
    let line = std::fs::read_to_string(tokens.join("metrics.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert!(line["token_mse"].as_f64().unwrap() > 0.0, "{line}");
    let plain = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    let plain: serde_json::Value = serde_json::from_str(plain.lines().last().unwrap()).unwrap();
    assert!(plain["token_mse"].is_null(), "{plain}");
    assert!(plain["teacher_mse"].as_f64().unwrap() > 0.0, "{plain}");
}

#[test]
fn dream_refuses_a_caption_run_and_a_vocabulary_without_the_instructions() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    write_dataset(&plain, 24, 3, &SceneConfig::default(), "test").unwrap();
    let edits = dir.path().join("edits");
    let extras = DatasetExtras {
        edits_per_scene: 2,
        ..Default::default()
    };
    write_dataset_with(&edits, 24, 4, &SceneConfig::default(), "test", &extras).unwrap();
    let (caption, gen) = chain(dir.path(), &plain);
    let device = Default::default();
    let out = dir.path().join("dream");
    let err = fit_dream::<CpuBackend>(&dream_args(&caption, &edits, &out, 1, false), &device)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not a generate run"), "{err}");
    // The captioner never saw "add", "make", … : refused, not read as [UNK].
    let err =
        fit_dream::<CpuBackend>(&dream_args(&gen, &edits, &out, 1, false), &device).unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("--edits"), "{err}");
    // Settings refused before anything trains: (what, the words the error must hold).
    let base = || dream_args(&gen, &plain, &out, 1, false);
    for (args, says) in [
        (
            DreamFitArgs {
                queries: Some(0),
                ..base()
            },
            "at least 1",
        ),
        (
            DreamFitArgs {
                generation_weight: Some(0.0),
                understanding_weight: Some(0.0),
                ..base()
            },
            "nothing would train",
        ),
        (
            DreamFitArgs {
                generation_weight: Some(-1.0),
                ..base()
            },
            "--generation-weight",
        ),
        (
            DreamFitArgs {
                token_weight: Some(f64::NAN),
                ..base()
            },
            "--token-weight",
        ),
    ] {
        let err = fit_dream::<CpuBackend>(&args, &device)
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{err}");
    }
}

/// The dream stage on two peers: peer 0 takes the step's generation rows and peer 1 its edit
/// rows (padded to the whole batch's prompt length, so the queries sit where one device puts
/// them), the noise of the whole batch is drawn on both, the per-token match is averaged over
/// both peers' marked tokens, and the understanding loss over the whole batch's targets: the
/// weights one device trains, within 1e-6.
#[test]
fn two_peers_train_the_dream_model_one_device_trains() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("edits");
    let extras = DatasetExtras {
        questions_per_scene: 1,
        edits_per_scene: 2,
        ..Default::default()
    };
    write_dataset_with(&data, 24, 3, &SceneConfig::default(), "test", &extras).unwrap();
    let (_, gen) = chain(dir.path(), &data);
    let device = Default::default();
    let run = |out: &Path, devices, steps| {
        let args = DreamFitArgs {
            devices,
            token_weight: Some(1.0),
            ..dream_args(&gen, &data, out, steps, false)
        };
        fit_dream::<CpuBackend>(&args, &device).unwrap();
        load_weights(&out.join(WEIGHTS_FILE)).unwrap()
    };
    let one = run(&dir.path().join("one"), 1, 3);
    let two = run(&dir.path().join("two"), 2, 3);
    let delta = max_difference(&one, &two);
    eprintln!("dream, 1 device vs 2 peers: max |Δ| = {delta:e}");
    assert!(
        delta <= 1e-6,
        "2 peers trained another dream model: {delta}"
    );
    let moved = max_difference(&one, &run(&dir.path().join("short"), 1, 1));
    assert!(
        moved > 100.0 * delta.max(1e-7),
        "training moved the weights by {moved}"
    );
}
