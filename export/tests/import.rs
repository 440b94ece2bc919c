//! `duet-export import` is the inverse of the export for the captioner and the generator: a
//! run exported and imported back holds the very same parameters (bit for bit), dimensions,
//! tokenizer and diffusion settings.

use std::path::Path;

use duet_datasets::tokenizer::{save_tokenizer, train_tokenizer};
use duet_export::import::{import_captioner, import_run};
use duet_export::{export_run, ExportOptions};
use duet_models::params::{named_tensors, NamedTensors};
use duet_models::{CaptionModel, GenerationModel, ImageFit, ModelSpec, Preset};
use duet_run::checkpoint::{load_weights, read_json, save_weights, write_json, WEIGHTS_FILE};
use duet_run::{
    CaptionTrainConfig, DiffusionSettings, GenerateTrainConfig, Stage, TokenizerOrigin,
    CONFIG_FILE, TOKENIZER_FILE,
};

type B = burn::backend::NdArray<f32>;

/// A caption run with the random initial weights of a tiny captioner (nothing here needs
/// training: the round trip is about names, shapes and bytes).
fn random_run(run: &Path) -> ModelSpec {
    let tokenizer = train_tokenizer(&[
        "a red circle".to_string(),
        "a blue square on the left".into(),
    ])
    .unwrap();
    save_tokenizer(&tokenizer, &run.join(TOKENIZER_FILE)).unwrap();
    let model = ModelSpec {
        image_fit: ImageFit::Crop,
        ..ModelSpec::preset(Preset::Tiny, tokenizer.get_vocab_size(true), 32)
    };
    let weights = named_tensors(&CaptionModel::<B>::new(&model, &Default::default()));
    save_weights(&run.join(WEIGHTS_FILE), &weights).unwrap();
    let config = CaptionTrainConfig {
        stage: Stage::Caption,
        preset: Preset::Tiny,
        model: model.clone(),
        data: Vec::new(),
        steps: 0,
        batch_size: 8,
        lr: 1e-3,
        warmup_steps: 0,
        weight_decay: 0.0,
        grad_clip: 1.0,
        seed: 0,
        checkpoint_every: 1,
        log_every: 1,
        device: "cpu".into(),
        command: "test".into(),
        init_from: None,
        tokenizer: TokenizerOrigin::Trained,
        questions: 0,
    };
    write_json(&run.join(CONFIG_FILE), &config).unwrap();
    model
}

/// The same parameters, with the same shapes and the same bits.
fn assert_bit_identical(original: &NamedTensors, back: &NamedTensors) {
    assert_eq!(back.len(), original.len());
    for (name, t) in original {
        let b = &back[name];
        assert_eq!(b.shape, t.shape, "{name}");
        assert!(
            b.data
                .iter()
                .zip(&t.data)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} changed"
        );
    }
}

#[test]
fn an_exported_captioner_imports_back_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let model = random_run(&run);
    for out in ["bundle", "model.duet"] {
        let bundle = dir.path().join(out);
        export_run(&ExportOptions::new(&run, &bundle)).unwrap();
        let manifest = duet_runtime::Bundle::open(&bundle)
            .unwrap()
            .manifest()
            .clone();
        assert_eq!(manifest.image.fit, ImageFit::Crop);
        assert_eq!(
            manifest.tokenizer.origin.as_deref(),
            Some("trained on the run's captions")
        );

        let imported = dir.path().join(format!("imported-{out}"));
        let report = import_captioner(&bundle, &imported, "test import").unwrap();
        let original = load_weights(&run.join(WEIGHTS_FILE)).unwrap();
        let back = load_weights(&imported.join(WEIGHTS_FILE)).unwrap();
        assert_eq!(report.parameters, original.len());
        assert_bit_identical(&original, &back);
        let config: CaptionTrainConfig = read_json(&imported.join(CONFIG_FILE)).unwrap();
        assert_eq!(config.model, model);
        assert_eq!(config.stage, Stage::Caption);
        // The stages' optimizer settings, not zeros: a later stage that carries its init's
        // settings must still update (a clip norm of 0 stops every step).
        assert_eq!(
            (config.weight_decay, config.grad_clip),
            (duet_run::WEIGHT_DECAY, duet_run::GRAD_CLIP)
        );
        // The origin names a file that exists: the folder's tokenizer.json or the .duet
        // itself; its hash is that of the bytes imported.
        let TokenizerOrigin::Reused { path, sha256 } = &config.tokenizer else {
            panic!("{:?}", config.tokenizer);
        };
        let expected = if out == "bundle" {
            bundle.join(TOKENIZER_FILE)
        } else {
            bundle.clone()
        };
        assert_eq!(path, &expected);
        assert_eq!(
            sha256,
            &duet_runtime::bundle::sha256_hex(
                &std::fs::read(imported.join(TOKENIZER_FILE)).unwrap()
            )
        );
        assert_eq!(
            std::fs::read(imported.join(TOKENIZER_FILE)).unwrap(),
            std::fs::read(run.join(TOKENIZER_FILE)).unwrap()
        );

        // A second import never overwrites the first.
        let err = import_captioner(&bundle, &imported, "again").unwrap_err();
        assert!(err.to_string().contains("exists"), "{err}");
    }
    // Nothing but a bundle is imported: a run folder is refused, and nothing is written.
    let err = import_captioner(&run, &dir.path().join("from-run"), "x").unwrap_err();
    assert!(format!("{err:#}").contains("manifest"), "{err:#}");
    assert!(!dir.path().join("from-run").exists());
}

/// `random_run`'s captioner with a random generator beside it: a generate run.
fn random_generate_run(run: &Path) -> ModelSpec {
    let model = random_run(run);
    let mut weights = load_weights(&run.join(WEIGHTS_FILE)).unwrap();
    weights.extend(named_tensors(&GenerationModel::<B>::new(
        &model,
        &Default::default(),
    )));
    save_weights(&run.join(WEIGHTS_FILE), &weights).unwrap();
    let diffusion = DiffusionSettings {
        cond_dropout: 0.25,
        min_snr_gamma: Some(5.0),
        ..DiffusionSettings::default()
    };
    let config = GenerateTrainConfig {
        stage: Stage::Generate,
        preset: Preset::Tiny,
        model: model.clone(),
        init: run.to_path_buf(),
        data: Vec::new(),
        steps: 0,
        batch_size: 8,
        lr: 1e-3,
        warmup_steps: 0,
        weight_decay: 0.0,
        grad_clip: 1.0,
        seed: 0,
        checkpoint_every: 1,
        log_every: 1,
        device: "cpu".into(),
        command: "test".into(),
        diffusion,
        tokenizer: None,
    };
    write_json(&run.join(CONFIG_FILE), &config).unwrap();
    model
}

#[test]
fn an_exported_generator_imports_back_as_a_generate_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("gen");
    let model = random_generate_run(&run);
    let bundle = dir.path().join("bundle");
    export_run(&ExportOptions::new(&run, &bundle)).unwrap();

    // By default the most the bundle holds: captioner and generator, bit for bit.
    let imported = dir.path().join("imported");
    let report = import_run(&bundle, &imported, None, "test import").unwrap();
    assert_eq!(report.stage, Stage::Generate);
    let original = load_weights(&run.join(WEIGHTS_FILE)).unwrap();
    let back = load_weights(&imported.join(WEIGHTS_FILE)).unwrap();
    assert_bit_identical(&original, &back);
    let config: GenerateTrainConfig = read_json(&imported.join(CONFIG_FILE)).unwrap();
    assert_eq!(config.stage, Stage::Generate);
    assert_eq!(config.model, model);
    assert_eq!(config.init, bundle);
    assert_eq!(
        (config.weight_decay, config.grad_clip),
        (duet_run::WEIGHT_DECAY, duet_run::GRAD_CLIP)
    );
    // What the manifest says (prediction, timesteps) and what the provenance recorded of the
    // training-only settings.
    let original: GenerateTrainConfig = read_json(&run.join(CONFIG_FILE)).unwrap();
    assert_eq!(config.diffusion, original.diffusion);
    // The imported run loads as a generator, the way the dream and restore stages read it.
    duet_run::load_generator::<B>(&imported, false, &Default::default()).unwrap();

    // It says where its tokenizer came from, and so do the bundles made from it (its `init`
    // names a bundle, not a caption run) and from a run whose vocabulary grew from it.
    let origin = |b: &Path| {
        let said = duet_runtime::Bundle::open(b)
            .unwrap()
            .manifest()
            .tokenizer
            .origin
            .clone();
        said.unwrap_or_else(|| panic!("{}: no tokenizer origin", b.display()))
    };
    let sha =
        duet_runtime::bundle::sha256_hex(&std::fs::read(bundle.join(TOKENIZER_FILE)).unwrap());
    let again = dir.path().join("again");
    export_run(&ExportOptions::new(&imported, &again)).unwrap();
    assert_eq!(
        origin(&again),
        format!(
            "reused from {} (sha256 {sha})",
            bundle.join(TOKENIZER_FILE).display()
        )
    );
    let data = dir.path().join("data");
    let scenes = duet_datasets::shapeworld::SceneConfig::default();
    duet_datasets::shapeworld::write_dataset_with(
        &data,
        8,
        2,
        &scenes,
        "test",
        &Default::default(),
    )
    .unwrap();
    let grown = dir.path().join("grown");
    let report = duet_train::vocab::extend_run(&imported, &[data], &grown, 0, "test").unwrap();
    let grown_bundle = dir.path().join("grown-bundle");
    export_run(&ExportOptions::new(&grown, &grown_bundle)).unwrap();
    assert_eq!(
        origin(&grown_bundle),
        format!(
            "{} (sha256 {sha}) with {} words added: {}",
            imported.join(TOKENIZER_FILE).display(),
            report.added.len(),
            report
                .added
                .iter()
                .map(|(w, _)| w.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        )
    );

    // The captioner alone, on request; a caption-only bundle has no generator to import.
    let captioner = dir.path().join("captioner");
    let report = import_run(&bundle, &captioner, Some(Stage::Caption), "test").unwrap();
    assert_eq!(report.stage, Stage::Caption);
    assert_eq!(
        load_weights(&captioner.join(WEIGHTS_FILE)).unwrap().len(),
        named_tensors(&CaptionModel::<B>::new(&model, &Default::default())).len()
    );
    let caption_run = dir.path().join("caption-run");
    random_run(&caption_run);
    let caption_bundle = dir.path().join("caption-bundle");
    export_run(&ExportOptions::new(&caption_run, &caption_bundle)).unwrap();
    let err = import_run(
        &caption_bundle,
        &dir.path().join("x"),
        Some(Stage::Generate),
        "x",
    )
    .unwrap_err();
    assert!(err.to_string().contains("no generator"), "{err}");
    let err = import_run(&bundle, &dir.path().join("y"), Some(Stage::Dream), "y").unwrap_err();
    assert!(
        err.to_string().contains("caption or a generate run"),
        "{err}"
    );
    assert!(!dir.path().join("x").exists() && !dir.path().join("y").exists());
}

/// The shipped bundle's chain: a dream run (its decoder trained on questions, its queries)
/// under the fusion and restore stages. The restore run carries the dream queries, and its
/// export holds every graph: the dream encoder beside the restorers, and the questions the
/// decoder was trained on (what `duet ask` checks).
#[test]
fn a_restore_run_over_a_dream_run_exports_the_dream_queries_and_questions() {
    use duet_datasets::pair_tasks::PairTask;
    use duet_datasets::shapeworld::{write_dataset_with, DatasetExtras, SceneConfig};
    use duet_run::RestoreSettings;
    use duet_runtime::graph::Graph;
    use duet_train::backend::CpuBackend;
    use duet_train::stages::caption::{fit, FitArgs};
    use duet_train::stages::dream::{fit_dream, DreamFitArgs};
    use duet_train::stages::generate::{fit_generate, GenerateFitArgs};
    use duet_train::stages::restore::{fit_fusion, fit_restore, PairFitArgs};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let extras = DatasetExtras {
        questions_per_scene: 1,
        edits_per_scene: 1,
        ..Default::default()
    };
    write_dataset_with(&data, 24, 3, &SceneConfig::default(), "test", &extras).unwrap();
    let run = |name: &str| dir.path().join(name);
    let device = Default::default();
    // One step of batch 4 per stage: the test is about what the runs carry, not training.
    let (steps, batch_size) = (Some(1), Some(4));
    fit::<CpuBackend>(
        &FitArgs {
            steps,
            batch_size,
            quiet: true,
            ..FitArgs::new(Preset::Tiny, vec![data.clone()], run("caption"))
        },
        &device,
    )
    .unwrap();
    fit_generate::<CpuBackend>(
        &GenerateFitArgs {
            steps,
            batch_size,
            quiet: true,
            ..GenerateFitArgs::new(run("caption"), vec![data.clone()], run("gen"))
        },
        &device,
    )
    .unwrap();
    fit_dream::<CpuBackend>(
        &DreamFitArgs {
            steps,
            batch_size,
            queries: Some(2),
            quiet: true,
            ..DreamFitArgs::new(run("gen"), vec![data.clone()], run("dream"))
        },
        &device,
    )
    .unwrap();
    let pair_args = |init: &str, out: &str| PairFitArgs {
        task: Some(PairTask::ColourColumn),
        train_examples: Some(64),
        test_examples: Some(32),
        steps,
        batch_size: Some(8),
        settings: Some(RestoreSettings {
            token_steps: 1,
            ..RestoreSettings::default()
        }),
        quiet: true,
        ..PairFitArgs::new(run(init), run(out))
    };
    fit_fusion::<CpuBackend>(&pair_args("dream", "fusion"), &device).unwrap();
    fit_restore::<CpuBackend>(&pair_args("fusion", "restore"), &device).unwrap();

    let carried = load_weights(&run("restore").join(WEIGHTS_FILE)).unwrap();
    let dreamt = load_weights(&run("dream").join(WEIGHTS_FILE)).unwrap();
    for (name, t) in dreamt.iter().filter(|(k, _)| k.starts_with("dream.")) {
        assert_eq!(&carried[name], t, "{name} not carried");
    }
    let bundle = run("bundle");
    export_run(&ExportOptions::new(run("restore"), &bundle)).unwrap();
    let b = duet_runtime::Bundle::open(&bundle).unwrap();
    let graphs: Vec<Graph> = b.manifest().graphs.iter().map(|g| g.name).collect();
    for g in [Graph::DreamEncoder, Graph::RestorerT2i, Graph::FusionHead] {
        assert!(graphs.contains(&g), "{g} missing from {graphs:?}");
    }
    assert!(
        b.manifest()
            .questions
            .as_ref()
            .is_some_and(|q| q.trained_on > 0),
        "{:?}",
        b.manifest().questions
    );
    // Every stage carries its init's tokenizer origin: the caption run's, four links back.
    assert_eq!(
        b.manifest().tokenizer.origin.as_deref(),
        Some("trained on the run's captions")
    );
    let fusion: serde_json::Value = read_json(&run("fusion").join(CONFIG_FILE)).unwrap();
    assert_eq!(fusion["tokenizer"]["from"], "trained", "{fusion}");
}
