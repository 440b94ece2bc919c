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
        init: init.to_path_buf(),
        out: out.to_path_buf(),
        task: Some(PairTask::ColourColumn),
        train_examples: Some(2000),
        test_examples: Some(500),
        steps: Some(steps),
        batch_size: None,
        lr: None,
        seed: 0,
        settings: Some(RestoreSettings {
            token_steps: 200,
            ..RestoreSettings::default()
        }),
        device: "cpu".into(),
        command: "e2e restore".into(),
        quiet: true,
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
