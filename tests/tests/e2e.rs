//! End to end on the understanding direction: generate ShapeWorld → train the tiny captioner in
//! Burn → export a verified ONNX bundle → caption with onnxruntime and tract.
//!
//! Training is the slow part, so one fixture (data, run, bundle) is built once per test binary
//! under `CARGO_TARGET_TMPDIR` and shared by the tests below. `DUET_E2E_STEPS` overrides the
//! step budget (default [`CI_STEPS`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::backend::NdArray;
use duet_export::{export_run, ExportError, ExportOptions};
use duet_models::Captioner as BurnCaptioner;
use duet_runtime::bundle::BundleError;
use duet_runtime::engine::{EngineOptions, Provider, ProviderChoice};
use duet_runtime::preprocess::{self, ImageError};
use duet_runtime::{Bundle, Captioner};
use duet_train::caption_stage::{caption_samples, fit, load_run, prepare, FitArgs, LoadedRun};
use duet_train::eval::eval_caption;
use duet_train::metrics::{evaluate, CaptionMetrics};
use duet_train::shapeworld::{load_dataset, write_dataset, Sample, SceneConfig};

type Cpu = NdArray<f32>;

/// Training steps of the shared fixture: what CI can afford on 2 cores.
const CI_STEPS: usize = 2000;

struct Fixture {
    train: PathBuf,
    val: PathBuf,
    run: PathBuf,
    bundle: PathBuf,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repo")
        .to_path_buf()
}

/// onnxruntime as installed by `scripts/setup.sh`, unless `ORT_DYLIB_PATH` says otherwise.
fn engine_options() -> EngineOptions {
    let local = repo_root().join(".ort/lib/libonnxruntime.so");
    EngineOptions {
        strict: true,
        ort_lib: (std::env::var_os("ORT_DYLIB_PATH").is_none() && local.is_file()).then_some(local),
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("duet-e2e");
        let _ = std::fs::remove_dir_all(&root);
        let cfg = SceneConfig {
            image_size: 32,
            min_objects: 1,
            max_objects: 2,
        };
        let train = root.join("train");
        let val = root.join("val");
        write_dataset(&train, 4000, 1, &cfg, "e2e fixture").expect("train data");
        write_dataset(&val, 400, 2, &cfg, "e2e fixture").expect("val data");
        let steps = std::env::var("DUET_E2E_STEPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(CI_STEPS);
        let run = root.join("run");
        let args = FitArgs {
            preset: duet_models::Preset::Tiny,
            data: train.clone(),
            out: run.clone(),
            steps: Some(steps),
            batch_size: None,
            lr: None,
            seed: 0,
            resume: false,
            device: "cpu".into(),
            command: format!("e2e fixture: fit --stage caption --preset tiny --steps {steps}"),
            quiet: true,
        };
        let outcome =
            fit::<duet_train::backend::CpuBackend>(&args, &Default::default()).expect("training");
        eprintln!(
            "fixture: trained {} steps in {:.0}s, final loss {:.3}",
            outcome.steps_done, outcome.seconds, outcome.final_loss
        );
        let bundle = root.join("bundle");
        let opts = ExportOptions {
            engine: engine_options(),
            command: "e2e fixture export".into(),
            ..ExportOptions::new(&run, &bundle)
        };
        export_run(&opts).expect("export");
        Fixture {
            train,
            val,
            run,
            bundle,
        }
    })
}

/// Greedy captions of `samples` by `run`, scored against their exact scenes.
fn score(run: &LoadedRun<Cpu>, samples: &[Sample]) -> CaptionMetrics {
    let device = Default::default();
    let prepared = prepare(
        samples,
        &run.tokenizer,
        run.config.model.image_size,
        run.config.model.max_len,
    )
    .expect("prepare");
    let preds = caption_samples(run, &prepared, &device);
    let pairs: Vec<_> = samples
        .iter()
        .zip(preds)
        .map(|(s, p)| (s.objects.clone(), p))
        .collect();
    evaluate(&pairs)
}

#[test]
fn trained_tiny_captioner_reaches_accuracy_floors() {
    let f = fixture();
    let device = Default::default();
    // Held out for real: scenes whose caption (and so whose rendering) occurs in the training
    // set are dropped, so the floors measure generalisation, not recall of seen images.
    let seen: HashSet<String> = load_dataset(&f.train)
        .expect("train")
        .into_iter()
        .map(|s| s.caption)
        .collect();
    let held_out: Vec<Sample> = load_dataset(&f.val)
        .expect("val")
        .into_iter()
        .filter(|s| !seen.contains(&s.caption))
        .collect();
    // About half the validation scenes have one object (720 variants, most seen in training).
    assert!(
        held_out.len() >= 150,
        "only {} unseen scenes",
        held_out.len()
    );

    let trained = load_run::<Cpu>(&f.run, &device).expect("load run");
    let m = score(&trained, &held_out);
    eprintln!("held-out (unseen captions):\n{m}");
    assert!(
        m.colour_acc >= 0.9,
        "colour accuracy {:.3} < 0.9",
        m.colour_acc
    );
    assert!(
        m.shape_acc >= 0.8,
        "shape accuracy {:.3} < 0.8",
        m.shape_acc
    );

    // `duet-train eval` (the CLI's path) on the whole validation folder agrees in kind.
    let (all, _) = eval_caption::<Cpu>(&f.run, &f.val, None, &device).expect("eval");
    assert_eq!(all.n, 400);
    assert!(all.colour_acc >= 0.9, "eval colour {:.3}", all.colour_acc);

    // The same architecture untrained cannot do it: the floors measure learning.
    let untrained = LoadedRun {
        model: BurnCaptioner::<Cpu>::new(&trained.config.model, &device),
        config: trained.config.clone(),
        tokenizer: trained.tokenizer.clone(),
    };
    let base = score(&untrained, &held_out);
    assert!(
        base.colour_acc < 0.5 && base.shape_acc < 0.5,
        "untrained model scores colour {:.3} shape {:.3}",
        base.colour_acc,
        base.shape_acc
    );
}

#[test]
fn exported_graphs_have_parity_and_pass_the_onnx_checker() {
    let f = fixture();
    let bundle = Bundle::open(&f.bundle).expect("bundle opens");
    let m = bundle.manifest();
    assert_eq!(m.graphs.len(), 2);
    for g in &m.graphs {
        let p = g.parity.as_ref().expect("parity recorded");
        assert!(
            p.ort_max_abs_diff <= 1e-4,
            "{}: ort {}",
            g.name,
            p.ort_max_abs_diff
        );
        assert!(
            p.tract_max_abs_diff <= 1e-4,
            "{}: tract {}",
            g.name,
            p.tract_max_abs_diff
        );
        assert!(
            p.inputs_checked >= 2,
            "{}: {} input sets",
            g.name,
            p.inputs_checked
        );
        onnx_check(&f.bundle.join(&g.file));
    }
    let training_command = m.provenance["training"]["command"].as_str().unwrap_or("");
    assert!(
        training_command.contains("fit"),
        "provenance: {}",
        m.provenance
    );
    assert_eq!(
        m.provenance["training"]["state"]["step"],
        m.provenance["training"]["config"]["steps"]
    );
}

/// `onnx.checker.check_model(full_check=True)` through Python's `onnx` package (installed by
/// `scripts/setup.sh`). Fails, never skips, when it is missing.
fn onnx_check(path: &Path) {
    let python = std::env::var("DUET_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .args([
            "-c",
            "import sys, onnx; onnx.checker.check_model(sys.argv[1], full_check=True); print('ok')",
        ])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        out.status.success(),
        "onnx.checker rejected {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ort_and_tract_caption_like_burn_and_kv_matches_full_recompute() {
    let f = fixture();
    let samples = load_dataset(&f.val).expect("val");
    let samples = &samples[..24];
    let images: Vec<_> = samples.iter().map(|s| s.image.clone()).collect();
    let bundle = Bundle::open(&f.bundle).expect("bundle");
    let mut per_provider = Vec::new();
    for provider in [Provider::OrtCpu, Provider::Tract] {
        let cap = Captioner::new(&bundle, ProviderChoice::Only(provider), &engine_options())
            .unwrap_or_else(|e| panic!("{provider}: {e}"));
        assert!(cap.reports().iter().all(|r| r.used == provider));
        let pixels = preprocess::to_pixels_batch(&images, cap.image_spec()).expect("pixels");
        let tokens = cap.encode(&pixels).expect("encode");
        let kv = cap.greedy_tokens_kv(&tokens).expect("kv decode");
        let full = cap.greedy_tokens_full(&tokens).expect("full decode");
        assert_eq!(
            kv, full,
            "{provider}: KV-cache decoding differs from full recomputation"
        );
        per_provider.push(cap.caption_images(&images).expect("captions"));
    }
    assert_eq!(
        per_provider[0], per_provider[1],
        "ort and tract captions differ"
    );

    let device = Default::default();
    let run = load_run::<Cpu>(&f.run, &device).expect("run");
    let prepared = prepare(samples, &run.tokenizer, 32, run.config.model.max_len).expect("prep");
    let burn = caption_samples(&run, &prepared, &device);
    assert_eq!(burn, per_provider[0], "runtime captions differ from Burn's");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();

    // Tampered graph: the hash check names the file.
    let tampered = tmp.path().join("tampered");
    copy_dir(&f.bundle, &tampered);
    let g = tampered.join("caption_decoder.onnx");
    let mut bytes = std::fs::read(&g).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&g, bytes).unwrap();
    match Bundle::open(&tampered) {
        Err(BundleError::HashMismatch { file, .. }) => assert_eq!(file, "caption_decoder.onnx"),
        other => panic!("tampered graph accepted or wrong error: {other:?}"),
    }

    // Missing file.
    let missing = tmp.path().join("missing");
    copy_dir(&f.bundle, &missing);
    std::fs::remove_file(missing.join("tokenizer.json")).unwrap();
    match Bundle::open(&missing) {
        Err(e @ BundleError::MissingFile { .. }) => {
            assert!(e.to_string().contains("tokenizer.json"))
        }
        other => panic!("missing tokenizer accepted or wrong error: {other:?}"),
    }

    // Corrupt PNG.
    let png = tmp.path().join("corrupt.png");
    std::fs::write(&png, b"\x89PNG\r\n\x1a\nnot really a png").unwrap();
    match preprocess::load_image(&png) {
        Err(e @ ImageError::Decode { .. }) => assert!(e.to_string().contains("corrupt.png")),
        other => panic!("corrupt PNG decoded or wrong error: {other:?}"),
    }

    // Wrong-size image to the strict preprocessing, and wrong pixel shapes to the encoder.
    let bundle = Bundle::open(&f.bundle).unwrap();
    let cap = Captioner::new(
        &bundle,
        ProviderChoice::Only(Provider::Tract),
        &engine_options(),
    )
    .unwrap();
    let small = image::RgbImage::new(20, 20);
    match preprocess::to_pixels(&small, cap.image_spec()) {
        Err(ImageError::WrongImageSize {
            expected: 32,
            got: (20, 20),
        }) => {}
        other => panic!("wrong-size image accepted or wrong error: {other:?}"),
    }
    let e = cap
        .encode(&ndarray::Array4::zeros((1, 3, 20, 20)))
        .unwrap_err();
    assert!(e.to_string().contains("pixels must be"), "{e}");

    // Unknown provider.
    let e = "gpu".parse::<ProviderChoice>().unwrap_err();
    assert!(e.to_string().contains("unknown provider `gpu`"), "{e}");

    // Exporting a run whose checkpoint is gone fails and leaves the existing bundle intact.
    let run = tmp.path().join("run");
    copy_dir(&f.run, &run);
    std::fs::remove_file(run.join("model.safetensors")).unwrap();
    let out = tmp.path().join("out");
    copy_dir(&f.bundle, &out);
    let before = std::fs::read(out.join("manifest.json")).unwrap();
    let opts = ExportOptions {
        engine: engine_options(),
        ..ExportOptions::new(&run, &out)
    };
    match export_run(&opts) {
        Err(e @ ExportError::LoadRun { .. }) => {
            assert!(e.to_string().contains("model.safetensors"), "{e}")
        }
        other => panic!("export without weights: {other:?}"),
    }
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);
    assert!(
        Bundle::open(&out).is_ok(),
        "the previous bundle must survive a failed export"
    );
}
