//! `duet-export import` is the inverse of the export for the captioner: a run exported and
//! imported back holds the very same parameters (bit for bit), dimensions and tokenizer.

use std::path::Path;

use duet_datasets::tokenizer::{save_tokenizer, train_tokenizer};
use duet_export::import::import_captioner;
use duet_export::{export_run, ExportOptions};
use duet_models::params::named_tensors;
use duet_models::{CaptionModel, ImageFit, ModelSpec, Preset};
use duet_run::checkpoint::{load_weights, read_json, save_weights, write_json, WEIGHTS_FILE};
use duet_run::{CaptionTrainConfig, Stage, TokenizerOrigin, CONFIG_FILE, TOKENIZER_FILE};

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
        assert_eq!(back.len(), original.len());
        for (name, t) in &original {
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
        let config: CaptionTrainConfig = read_json(&imported.join(CONFIG_FILE)).unwrap();
        assert_eq!(config.model, model);
        assert_eq!(config.stage, Stage::Caption);
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
