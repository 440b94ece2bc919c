//! The fusion and restore stages on the tiny generator.

use super::*;

/// The fusion and restore stages on the tiny generator: the backbones and the head come out of
/// the restore stage bit for bit as they went in, the restorers bring a missing feature closer
/// (cosine) to the real one than the mean-fill vector on held-out examples, and the report holds
/// every method, setting and rate (its plot is a real PNG).
#[test]
fn restore_stage_freezes_backbones_and_restores_closer_than_mean_fill() {
    use duet_datasets::pair_tasks::PairTask;
    use duet_run::checkpoint::load_weights;
    use duet_run::{RestoreSettings, VARIANTS};
    use duet_train::eval::restore::{eval_restore, RestoreEvalOptions, Setting};
    use duet_train::stages::restore::{fit_fusion, fit_restore, PairFitArgs};

    let g = gen_fixture();
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("duet-e2e-restore");
    let _ = std::fs::remove_dir_all(&root);
    let args = |init: &Path, out: &Path, steps: usize| PairFitArgs {
        task: Some(PairTask::ColourColumn),
        train_examples: Some(2000),
        test_examples: Some(500),
        steps: Some(steps),
        settings: Some(RestoreSettings {
            token_steps: 200,
            ..RestoreSettings::default()
        }),
        command: "e2e restore".into(),
        quiet: true,
        ..PairFitArgs::new(init, out)
    };
    let fusion = root.join("fusion");
    let outcome = fit_fusion::<duet_train::backend::CpuBackend>(
        &args(&g.run, &fusion, 600),
        &Default::default(),
    )
    .expect("fusion stage");
    eprintln!("fusion: {outcome:?}");
    // Both views together give the label; the tiny encoders must carry colour and column.
    assert!(outcome.complete_accuracy > 0.8, "{outcome:?}");

    let restore = root.join("restore");
    fit_restore::<duet_train::backend::CpuBackend>(
        &args(&fusion, &restore, 300),
        &Default::default(),
    )
    .expect("restore stage");
    let before = load_weights(&fusion.join("model.safetensors")).unwrap();
    let after = load_weights(&restore.join("model.safetensors")).unwrap();
    for prefix in ["vision.", "text.", "head.", "decoder.", "denoiser."] {
        let names: Vec<_> = before.keys().filter(|k| k.starts_with(prefix)).collect();
        assert!(!names.is_empty(), "{prefix}");
        for name in names {
            // Bit for bit: compare the raw f32 bits, so even a -0.0 / 0.0 flip would show.
            let bits = |t: &duet_models::params::NamedTensor| {
                t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(bits(&before[name]), bits(&after[name]), "{name} moved");
        }
    }
    for v in VARIANTS {
        assert!(after
            .keys()
            .any(|k| k.starts_with(&format!("{}.t2i.", v.prefix))));
    }
    // Retraining into a finished run is refused instead of overwriting it.
    let again = fit_restore::<duet_train::backend::CpuBackend>(
        &args(&fusion, &restore, 1),
        &Default::default(),
    );
    assert!(format!("{:#}", again.unwrap_err()).contains("already holds a finished run"));

    let report = eval_restore::<Cpu>(
        &restore,
        &RestoreEvalOptions {
            seed: 0,
            limit: None,
        },
        &Default::default(),
    )
    .expect("eval restore");
    eprintln!("{report}");
    let none = eval_restore::<Cpu>(
        &restore,
        &RestoreEvalOptions {
            seed: 0,
            limit: Some(0),
        },
        &Default::default(),
    );
    assert!(format!("{:#}", none.unwrap_err()).contains("--limit 0"));
    let cos = |m: &str| {
        let c = report.closeness.iter().find(|c| c.method == m).unwrap();
        (
            c.image_cosine,
            c.text_cosine,
            c.image_centred,
            c.text_centred,
        )
    };
    // The denoising restorer (no mutual learning, which trades closeness for the head's
    // agreement) carries each example's own information: centred on the training mean its
    // restorations point towards the real features, where mean-fill scores 0 by construction;
    // raw, it beats mean-fill on text. (Raw image cosine is dominated by one direction shared
    // by every image embedding, which the constant mean gets for free; see docs/RESTORE.md.)
    let (_, rt, ci, ct) = cos("restorer w/o mutual");
    let (_, mt, mci, mct) = cos("mean-fill");
    assert!(rt > mt, "raw text cosine: restorer {rt} vs mean-fill {mt}");
    assert!(
        ci > mci + 0.05 && ct > mct + 0.05,
        "centred cosine ({ci}, {ct})"
    );
    // The full restorer beats mean-fill where half the examples miss one modality or other.
    let (full, _) = report.score(Setting::Mixed, "restorer", 0.7).unwrap();
    let (mean, _) = report.score(Setting::Mixed, "mean-fill", 0.7).unwrap();
    assert!(
        full > mean,
        "mixed 70%: restorer {full} vs mean-fill {mean}"
    );
    for setting in Setting::ALL {
        // At 0% missing every method scores the complete-pair accuracy.
        let (complete, _) = report.score(setting, "zero-fill", 0.0).unwrap();
        assert!((complete - outcome.complete_accuracy).abs() < 0.05);
        for m in [
            "mean-fill",
            "missing token",
            "restorer",
            "restorer w/o gating",
        ] {
            let (acc, f1) = report.score(setting, m, 0.0).unwrap();
            assert_eq!(acc, complete, "{m}");
            assert!(f1 > 0.0 && f1 <= 1.0);
            assert!(report.score(setting, m, 0.9).is_some());
        }
    }
    let png = report.plot();
    assert_eq!(png.width(), 3 * 420);
    assert_eq!(png.height(), 2 * 330);
}

/// The fusion and restore stages on a user's labelled folder instead of a built-in task: the
/// head learns the folder's own label names (sorted), the restore stage and the evaluation
/// read the same folder back, the exported bundle names those classes and classifies held-out
/// pairs on onnxruntime as well as the Burn head did; a folder without labels, or one whose
/// labels changed since the fusion run, is refused before anything is written.
#[test]
fn fusion_and_restore_learn_a_labelled_folders_classes() {
    use duet_datasets::captioned::{captions_jsonl, CaptionedRecord, Label, Split};
    use duet_datasets::pair_tasks::{PairData, PairTask};
    use duet_run::{PairTrainConfig, RestoreSettings};
    use duet_runtime::Classifier;
    use duet_train::eval::restore::{eval_restore, RestoreEvalOptions};
    use duet_train::stages::restore::{fit_fusion, fit_restore, PairFitArgs};

    let g = gen_fixture();
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("duet-e2e-restore-folder");
    let _ = std::fs::remove_dir_all(&root);
    // A user's folder: colour-column pairs (each view faulty on one attribute, so the label
    // needs both) with the label written out as a name and a split of the user's own.
    let task = PairTask::ColourColumn;
    let examples = task.examples(1800, 77, 32);
    let write_folder = |dir: &Path, label: &dyn Fn(usize) -> Option<Label>| {
        std::fs::create_dir_all(dir.join("images")).unwrap();
        let mut records = Vec::new();
        for (i, ex) in examples.iter().enumerate() {
            let name = format!("images/{i:04}.png");
            ex.image.save(dir.join(&name)).unwrap();
            records.push(CaptionedRecord {
                image: name,
                caption: ex.text.clone(),
                label: label(i),
                split: Some(if i < 1500 { Split::Train } else { Split::Val }),
            });
        }
        std::fs::write(dir.join("captions.jsonl"), captions_jsonl(&records)).unwrap();
    };
    let folder = root.join("labelled");
    write_folder(&folder, &|i| {
        Some(Label::Name(task.class_name(examples[i].label)))
    });
    let args = |init: &Path, out: &Path, steps: usize, data: Option<&Path>| PairFitArgs {
        data: data.map(Path::to_path_buf),
        steps: Some(steps),
        settings: Some(RestoreSettings {
            token_steps: 20,
            ..RestoreSettings::default()
        }),
        command: "e2e restore folder".into(),
        quiet: true,
        ..PairFitArgs::new(init, out)
    };
    let cpu = Default::default();

    // Every pair needs a label: one without is named, and no run directory appears.
    let unlabelled = root.join("unlabelled");
    write_folder(&unlabelled, &|i| {
        (i != 7).then(|| Label::Name(task.class_name(examples[i].label)))
    });
    let refused = root.join("refused");
    let err = fit_fusion::<duet_train::backend::CpuBackend>(
        &args(&g.run, &refused, 10, Some(&unlabelled)),
        &cpu,
    )
    .expect_err("a folder with an unlabelled pair");
    assert!(
        format!("{err:#}").contains("line 8 has no \"label\" (1 pair(s)"),
        "{err:#}"
    );
    assert!(!refused.exists());

    let fusion = root.join("fusion");
    let outcome = fit_fusion::<duet_train::backend::CpuBackend>(
        &args(&g.run, &fusion, 600, Some(&folder)),
        &cpu,
    )
    .expect("fusion on a folder");
    eprintln!("fusion on a folder: {outcome:?}");
    assert!(outcome.complete_accuracy > 0.7, "{outcome:?}");
    let cfg: PairTrainConfig =
        serde_json::from_str(&std::fs::read_to_string(fusion.join("config.json")).unwrap())
            .unwrap();
    let PairData::Folder(recorded) = &cfg.task else {
        panic!("{:?}", cfg.task)
    };
    let mut names: Vec<String> = (0..task.classes()).map(|c| task.class_name(c)).collect();
    names.sort();
    assert_eq!(recorded.classes, names);
    assert_eq!((cfg.train_examples, cfg.test_examples), (1500, 300));
    assert_eq!(cfg.restore.classes, 24);

    let restore = root.join("restore");
    fit_restore::<duet_train::backend::CpuBackend>(&args(&fusion, &restore, 60, None), &cpu)
        .expect("restore on the fusion run's folder");
    let report = eval_restore::<Cpu>(
        &restore,
        &RestoreEvalOptions {
            seed: 0,
            limit: None,
        },
        &cpu,
    )
    .expect("eval restore on a folder");
    assert_eq!(report.task, "folder labelled");
    assert_eq!(report.test_examples, 300);
    assert_eq!(report.image_only_ceiling, None);

    let bundle_dir = root.join("bundle");
    let exported = export_run(&ExportOptions {
        engine: engine_options(),
        command: "e2e restore folder export".into(),
        ..ExportOptions::new(&restore, &bundle_dir)
    })
    .expect("export a folder restore run");
    let spec = exported.manifest.restore.clone().expect("restore section");
    assert_eq!(spec.task, "folder labelled");
    assert_eq!(spec.classes, names);
    let bundle = Bundle::open(&bundle_dir).unwrap();
    let ort = Classifier::new(
        &bundle,
        ProviderChoice::Only(Provider::OrtCpu),
        &engine_options(),
    )
    .unwrap();
    let held_out = &examples[1500..];
    let right = held_out
        .iter()
        .filter(|ex| {
            let c = ort.classify(Some(&ex.image), Some(&ex.text), 0).unwrap();
            c.label == task.class_name(ex.label)
        })
        .count();
    let runtime_accuracy = right as f64 / held_out.len() as f64;
    assert!(
        (runtime_accuracy - outcome.complete_accuracy).abs() < 0.02,
        "runtime {runtime_accuracy} vs Burn {}",
        outcome.complete_accuracy
    );

    // The folder changed under the fusion run: a label it never saw is refused by name.
    write_folder(&folder, &|i| {
        Some(Label::Name(if i == 3 {
            "violet, left".to_owned()
        } else {
            task.class_name(examples[i].label)
        }))
    });
    let again = root.join("restore-again");
    let err = fit_restore::<duet_train::backend::CpuBackend>(&args(&fusion, &again, 5, None), &cpu)
        .expect_err("a changed folder");
    assert!(
        format!("{err:#}").contains("label \"violet, left\" is not one of the run's 24 classes"),
        "{err:#}"
    );
    assert!(!again.exists());
}
