//! The unify stage on the tiny fixture models.

use super::*;

/// The unify stage on the tiny fixture models: a few GRPO steps and a short generator fine-tune.
/// What the loop does to quality is measured at `small` size in `docs/RESULTS.md`; this checks,
/// on real trained models, that stage 1 moves the captioner (KL to the frozen reference > 0)
/// without wrecking it, and that both stage directories are complete runs that evaluate and
/// export with parity like any other.
#[test]
fn unify_stages_move_the_captioner_and_write_complete_runs() {
    let f = fixture();
    let g = gen_fixture();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("duet-e2e-unify");
    let _ = std::fs::remove_dir_all(&out);
    let args = UnifyFitArgs {
        init: g.run.clone(),
        data: vec![f.train.clone()],
        out: out.clone(),
        understand_steps: Some(6),
        understand_images: Some(4),
        understand_lr: Some(1e-4),
        group: Some(4),
        // The tiny captioner is near-certain on 1–2-object scenes: at temperature 1 every group
        // can sample one caption four times (no advantage, no update). 2 makes groups differ.
        temperature: Some(2.0),
        generate_steps: Some(10),
        command: "e2e: fit --stage unify --steps 6 --batch-size 4 --group 4 --temperature 2 \
                  --gen-steps 10"
            .into(),
        device: "cpu".into(),
        quiet: true,
        ..UnifyFitArgs::default()
    };
    let outcome =
        fit_unify::<duet_train::backend::CpuBackend>(&args, &Default::default()).expect("unify");
    eprintln!("{outcome:?}");
    assert!(
        outcome.informative_groups >= 0.5 && outcome.informative_groups <= 1.0,
        "too few groups sampled differing captions: {outcome:?}"
    );
    assert!(
        outcome.final_kl > 0.0 && outcome.final_kl.is_finite(),
        "{outcome:?}"
    );
    // Reward = embedding cosine − pixel MSE: a trained pair rebuilds something alike.
    assert!(
        outcome.reward_start > 0.3 && outcome.reward_end > 0.3,
        "{outcome:?}"
    );
    assert!(outcome.final_diffusion_loss.is_finite());

    let stage1 = out.join(STAGE1_DIR);
    let stage2 = out.join(STAGE2_DIR);
    let limit = Some(200);
    let device = Default::default();
    // The captioner the generator fixture (and so stage 1) starts from.
    let before = eval_caption::<Cpu>(&vqa_fixture().run, &f.val, limit, &device)
        .unwrap()
        .0;
    let after = eval_caption::<Cpu>(&stage1, &f.val, limit, &device)
        .unwrap()
        .0;
    eprintln!("captions before:\n{before}\nafter stage 1:\n{after}");
    assert!(
        after.exact_match >= before.exact_match - 0.05,
        "stage 1 broke the captioner: exact {:.3} -> {:.3}",
        before.exact_match,
        after.exact_match
    );
    let settings = ReconstructionSettings::default();
    let rec = eval_reconstruction::<Cpu>(&stage2, &f.val, Some(32), &settings, 0, &device)
        .expect("reconstruction eval")
        .0;
    assert!(
        rec.samples == 32 && rec.cosine > 0.3 && rec.cosine <= 1.0 + 1e-4,
        "{rec}"
    );

    let bundle = out.join("bundle");
    let opts = ExportOptions {
        engine: engine_options(),
        command: "e2e unify export".into(),
        ..ExportOptions::new(&stage2, &bundle)
    };
    export_run(&opts).expect("export unify stage 2");
    let b = Bundle::open(&bundle).expect("bundle opens");
    assert_eq!(b.manifest().graphs.len(), 4);
    for spec in &b.manifest().graphs {
        let p = spec.parity.as_ref().expect("parity recorded");
        assert!(
            p.ort_max_abs_diff <= 1e-4 && p.tract_max_abs_diff <= 1e-4,
            "{}",
            spec.name
        );
    }

    // Starting from anything but a generate run is refused with the reason.
    let err = fit_unify::<duet_train::backend::CpuBackend>(
        &UnifyFitArgs {
            init: f.run.clone(),
            out: out.join("bad"),
            ..args
        },
        &device,
    )
    .expect_err("a caption run is not a generator");
    assert!(err.to_string().contains("generate run"), "{err}");
}
