//! Classification with a missing modality through the exported restore bundle, on ort and
//! tract, against Burn, and through `duet classify`.

use super::*;

#[test]
fn restore_bundle_classifies_with_a_missing_modality_on_ort_and_tract_like_burn() {
    use duet_datasets::pair_tasks::PairTask;
    use duet_run::{load_restore, RestoreSettings};
    use duet_runtime::{Classifier, ClassifyError, Modality};
    use duet_train::stages::restore::{ddim_restore, fit_fusion, fit_restore, to_vec, PairFitArgs};

    let g = gen_fixture();
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("duet-e2e-classify");
    let _ = std::fs::remove_dir_all(&root);
    // Short stages: this test is about export and serving, not about accuracy (the test above
    // holds the accuracy floors).
    let args = |init: &Path, out: &Path, steps: usize| PairFitArgs {
        task: Some(PairTask::ColourColumn),
        train_examples: Some(600),
        test_examples: Some(200),
        steps: Some(steps),
        settings: Some(RestoreSettings {
            token_steps: 20,
            ..RestoreSettings::default()
        }),
        command: "e2e classify".into(),
        quiet: true,
        ..PairFitArgs::new(init, out)
    };
    let fusion = root.join("fusion");
    fit_fusion::<duet_train::backend::CpuBackend>(&args(&g.run, &fusion, 150), &Default::default())
        .expect("fusion stage");
    let restore = root.join("restore");
    fit_restore::<duet_train::backend::CpuBackend>(
        &args(&fusion, &restore, 40),
        &Default::default(),
    )
    .expect("restore stage");

    // A fusion run has no restorers: exporting it is a clear error, not half a bundle.
    let fusion_bundle = root.join("fusion-bundle");
    let err = export_run(&ExportOptions {
        engine: engine_options(),
        ..ExportOptions::new(&fusion, &fusion_bundle)
    })
    .expect_err("fusion run exported");
    assert!(err.to_string().contains("fusion run"), "{err}");
    assert!(!fusion_bundle.exists());

    let bundle_dir = root.join("bundle");
    let report = export_run(&ExportOptions {
        engine: engine_options(),
        command: "e2e restore export".into(),
        ..ExportOptions::new(&restore, &bundle_dir)
    })
    .expect("export restore run");
    let names: Vec<&str> = report.parity.iter().map(|p| p.graph.as_str()).collect();
    for graph in [
        "restorer_t2i",
        "restorer_i2t",
        "fusion_head",
        "text_encoder",
    ] {
        let p = report.parity.iter().find(|p| p.graph == graph);
        let p = p.unwrap_or_else(|| panic!("{graph} not exported: {names:?}"));
        assert!(p.passed() && p.ort.max_abs_diff <= 1e-4 && p.tract.max_abs_diff <= 1e-4);
        onnx_check(&bundle_dir.join(format!("{graph}.onnx")));
    }
    let spec = report.manifest.restore.clone().expect("restore section");
    assert_eq!(spec.sampler_steps, RestoreSettings::default().sampler_steps);
    assert_eq!(spec.classes.len(), PairTask::ColourColumn.classes());
    assert_eq!(spec.classes[0], PairTask::ColourColumn.class_name(0));
    assert!(spec.gating && spec.trust_gate);

    // The runtime refuses restoration sections that disagree with themselves or the graphs,
    // naming the field.
    type Mutation = Box<dyn Fn(&mut duet_runtime::manifest::Manifest)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|m| m.restore.as_mut().unwrap().classes[1] = " ".into()),
            "restore.classes",
        ),
        (
            Box::new(|m| {
                let r = m.restore.as_mut().unwrap();
                r.classes[1] = r.classes[0].clone();
            }),
            "restore.classes",
        ),
        (
            Box::new(|m| m.restore.as_mut().unwrap().classes.truncate(1)),
            "restore.classes",
        ),
        (
            Box::new(|m| m.restore.as_mut().unwrap().task.clear()),
            "restore.task",
        ),
        (
            Box::new(|m| m.restore.as_mut().unwrap().sampler_steps = 0),
            "restore.sampler_steps",
        ),
        (
            Box::new(|m| m.restore.as_mut().unwrap().alphas_cumprod[0] = 1.5),
            "restore.alphas_cumprod",
        ),
        (
            // One class more than the head's logits.
            Box::new(|m| m.restore.as_mut().unwrap().classes.push("extra".into())),
            "graphs[fusion_head].outputs[logits].shape[1]",
        ),
        (Box::new(|m| m.restore = None), "graphs"),
    ];
    for (mutate, want_field) in cases {
        let copy = root.join("bundle-mutated");
        let _ = std::fs::remove_dir_all(&copy);
        std::fs::create_dir_all(&copy).unwrap();
        for entry in std::fs::read_dir(&bundle_dir).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
        }
        let mpath = copy.join("manifest.json");
        let mut m: duet_runtime::manifest::Manifest =
            serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
        mutate(&mut m);
        std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        match Bundle::open(&copy) {
            Err(BundleError::BadManifest { field, reason }) => {
                assert_eq!(field, want_field, "reason: {reason}")
            }
            other => panic!("{want_field}: {other:?}"),
        }
    }

    let bundle = Bundle::open(&bundle_dir).unwrap();
    let load = |p| Classifier::new(&bundle, ProviderChoice::Only(p), &engine_options()).unwrap();
    let (ort, tract) = (load(Provider::OrtCpu), load(Provider::Tract));
    let burn = load_restore::<Cpu>(&restore, &Default::default()).unwrap();
    let full = &burn.models.restorers[0];
    let schedule = NoiseSchedule::cosine(1000).unwrap();
    let dev = Default::default();
    let row = |v: &[f32]| {
        burn::tensor::Tensor::<Cpu, 2>::from_data(
            burn::tensor::TensorData::new(v.to_vec(), [1, v.len()]),
            &dev,
        )
    };
    let max_diff = |a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    let size = burn.backbones.model.image_size as u32;
    let examples = PairTask::ColourColumn.examples(6, 4242, size);
    let mut agreements = 0;
    for (i, ex) in examples.iter().enumerate() {
        let seed = i as u64;
        // The runtime's embeddings are Burn's.
        let img_rt = ort.embed_image(&ex.image).unwrap();
        let txt_rt = ort.embed_text(&ex.text).unwrap();
        let img_burn = to_vec(burn.backbones.embed_images(&[&ex.image], &dev).unwrap()).unwrap();
        let txt_burn = to_vec(burn.backbones.embed_texts(&[&ex.text], &dev).unwrap()).unwrap();
        assert!(max_diff(&img_rt, &img_burn) < 1e-4);
        assert!(max_diff(&txt_rt, &txt_burn) < 1e-4);
        // Restoration through `duet_diffusion::sample` on the graph equals the trainer's
        // unrolled Burn sampler fed the same start noise, trust gate included.
        for (missing, restorer, cond) in [
            (Modality::Image, &full.t2i, &txt_rt),
            (Modality::Text, &full.i2t, &img_rt),
        ] {
            let noise = ort.start_noise(seed);
            let rt = ort.restore_from(missing, cond, noise.clone()).unwrap();
            let x = row(noise.as_slice().unwrap());
            let r =
                ddim_restore(restorer, &schedule, spec.sampler_steps, row(cond), x, true).unwrap();
            let want = to_vec(restorer.blend(r, row(cond), true)).unwrap();
            let tau = to_vec(restorer.trust(row(cond), true)).unwrap()[0];
            assert!(
                max_diff(&rt.embedding, &want) < 1e-4,
                "{missing} restoration differs from Burn by {}",
                max_diff(&rt.embedding, &want)
            );
            assert!((rt.trust - tau).abs() < 1e-5 && rt.trust > 0.0 && rt.trust < 1.0);
        }
        // ort and tract agree on every input form, and say what they restored.
        for (image, text, restored) in [
            (Some(&ex.image), None, Some(Modality::Text)),
            (None, Some(ex.text.as_str()), Some(Modality::Image)),
            (Some(&ex.image), Some(ex.text.as_str()), None),
        ] {
            let a = ort.classify(image, text, seed).unwrap();
            let b = tract.classify(image, text, seed).unwrap();
            assert_eq!(a.restored.as_ref().map(|r| r.modality), restored);
            assert!(max_diff(&a.logits, &b.logits) < 1e-3);
            assert!((a.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            assert_eq!(a.label, spec.classes[a.class]);
            // A near tie may fall either way within float rounding; anything else must agree.
            let mut sorted = a.logits.clone();
            sorted.sort_by(|x, y| y.total_cmp(x));
            agreements += usize::from(a.class == b.class || sorted[0] - sorted[1] < 1e-3);
            if restored.is_none() {
                let want =
                    to_vec(burn.models.head.forward(row(&img_burn), row(&txt_burn))).unwrap();
                assert!(max_diff(&a.logits, &want) < 1e-4);
            }
        }
    }
    assert_eq!(
        agreements,
        3 * examples.len(),
        "ort and tract chose different classes"
    );

    // Bad inputs are typed errors.
    let ex = &examples[0];
    assert!(matches!(
        ort.classify(None, None, 0),
        Err(ClassifyError::NothingGiven)
    ));
    assert!(matches!(
        ort.classify(Some(&ex.image), Some("  "), 0),
        Err(ClassifyError::EmptyText)
    ));
    match ort.classify(None, Some("a red unicorn"), 0) {
        Err(ClassifyError::UnknownWords { words }) => assert_eq!(words, ["unicorn"]),
        other => panic!("wrong result {other:?}"),
    }
    let long = "a small red circle at the top and ".repeat(8);
    assert!(matches!(
        ort.classify(None, Some(&long), 0),
        Err(ClassifyError::TextTooLong { .. })
    ));
    // A bundle without restoration says so.
    let gen_bundle = Bundle::open(&g.bundle).unwrap();
    assert!(matches!(
        Classifier::new(
            &gen_bundle,
            ProviderChoice::Only(Provider::Tract),
            &engine_options()
        ),
        Err(ClassifyError::NoRestorer)
    ));

    // The CLI: image only, text only, both; on ort and tract the same class.
    let png = root.join("scene.png");
    ex.image.save(&png).unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(duet_bin())
            .args(["classify", "--bundle"])
            .arg(&bundle_dir)
            .args(extra)
            .env("ORT_DYLIB_PATH", ort_dylib())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let png_arg = png.to_str().unwrap();
    for (extra, restored) in [
        (vec!["--image", png_arg], "restored: text"),
        (vec!["--text", ex.text.as_str()], "restored: image"),
        (
            vec!["--image", png_arg, "--text", ex.text.as_str()],
            "restored: nothing",
        ),
    ] {
        let mut classes = Vec::new();
        for provider in ["ort-cpu", "tract"] {
            let mut a = extra.clone();
            a.extend(["--provider", provider, "--strict", "--seed", "3"]);
            let (ok, stdout, stderr) = run(&a);
            assert!(ok, "{a:?}: {stderr}");
            assert!(stdout.starts_with(restored), "{a:?}: {stdout}");
            let class = stdout
                .lines()
                .find_map(|l| l.strip_prefix("class: "))
                .and_then(|l| l.split(" (p = ").next())
                .unwrap_or_else(|| panic!("{stdout}"))
                .to_owned();
            assert!(spec.classes.contains(&class), "{class}");
            classes.push(class);
        }
        assert_eq!(classes[0], classes[1], "ort and tract disagree: {extra:?}");
    }
    let garbage = root.join("garbage.png");
    std::fs::write(&garbage, b"not a png at all").unwrap();
    let garbage_arg = garbage.to_str().unwrap();
    let missing = root.join("missing.png");
    let missing_arg = missing.to_str().unwrap();
    for (extra, message) in [
        (vec![], "neither an image nor a text was given"),
        (vec!["--text", ""], "the text is empty"),
        (vec!["--image", png_arg, "--text", " "], "the text is empty"),
        (vec!["--image", garbage_arg], "cannot decode image"),
        (vec!["--image", missing_arg], "cannot read image"),
        (vec!["--text", "a red unicorn"], "unicorn"),
    ] {
        let (ok, stdout, stderr) = run(&extra);
        assert!(!ok, "{extra:?} succeeded: {stdout}");
        assert!(stderr.contains(message), "{extra:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let (ok, _, stderr) = std::process::Command::new(duet_bin())
        .args(["classify", "--bundle"])
        .arg(&g.bundle)
        .args(["--text", "a red circle"])
        .env("ORT_DYLIB_PATH", ort_dylib())
        .output()
        .map(|o| {
            (
                o.status.success(),
                (),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert!(!ok && stderr.contains("no restoration graphs"), "{stderr}");

    // The C ABI answers like the Rust runtime, with the same inputs and seed.
    {
        use duet::*;
        use std::ffi::{CStr, CString};
        let dir = CString::new(bundle_dir.to_str().unwrap()).unwrap();
        let provider = CString::new("tract").unwrap();
        let mut rt = std::ptr::null_mut();
        let status = unsafe {
            duet_runtime_create(
                dir.as_ptr(),
                provider.as_ptr(),
                true,
                &mut rt,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(status, DuetStatus::Ok);
        let text = CString::new(ex.text.as_str()).unwrap();
        let (w, h) = ex.image.dimensions();
        let rgb = ex.image.as_raw();
        for (with_image, with_text, restored) in [
            (true, false, DUET_RESTORED_TEXT),
            (false, true, DUET_RESTORED_IMAGE),
            (true, true, DUET_RESTORED_NONE),
        ] {
            let mut out = DuetClassification {
                class_index: u32::MAX,
                probability: 0.0,
                restored: u32::MAX,
                trust: 0.0,
            };
            let mut label = std::ptr::null_mut();
            let (ptr, len, w, h) = if with_image {
                (rgb.as_ptr(), rgb.len(), w, h)
            } else {
                (std::ptr::null(), 0, 0, 0)
            };
            let status = unsafe {
                duet_classify(
                    rt,
                    ptr,
                    len,
                    w,
                    h,
                    if with_text {
                        text.as_ptr()
                    } else {
                        std::ptr::null()
                    },
                    5,
                    &mut out,
                    &mut label,
                    std::ptr::null_mut(),
                )
            };
            assert_eq!(status, DuetStatus::Ok);
            let name = unsafe { CStr::from_ptr(label) }
                .to_string_lossy()
                .into_owned();
            unsafe { duet_string_free(label) };
            let want = tract
                .classify(
                    with_image.then_some(&ex.image),
                    with_text.then_some(ex.text.as_str()),
                    5,
                )
                .unwrap();
            assert_eq!(out.restored, restored);
            assert_eq!(out.class_index as usize, want.class);
            assert_eq!(name, want.label);
            assert!((out.probability - want.probabilities[want.class]).abs() < 1e-6);
            let trust = want.restored.as_ref().map_or(1.0, |r| r.trust);
            assert!((out.trust - trust).abs() < 1e-6);
        }
        // Neither modality, and a NULL image with a size, are errors with a reason.
        let mut out = DuetClassification {
            class_index: 0,
            probability: 0.0,
            restored: 0,
            trust: 0.0,
        };
        let mut err = std::ptr::null_mut();
        let status = unsafe {
            duet_classify(
                rt,
                std::ptr::null(),
                0,
                0,
                0,
                std::ptr::null(),
                0,
                &mut out,
                std::ptr::null_mut(),
                &mut err,
            )
        };
        assert_eq!(status, DuetStatus::InvalidArgument);
        let msg = unsafe { CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned();
        unsafe { duet_string_free(err) };
        assert!(msg.contains("neither an image nor a text"), "{msg}");
        let status = unsafe {
            duet_classify(
                rt,
                std::ptr::null(),
                12,
                2,
                2,
                text.as_ptr(),
                0,
                &mut out,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        assert_eq!(status, DuetStatus::NullPointer);
        unsafe { duet_runtime_destroy(rt) };
    }

    // `duet bench` measures classification on a bundle with restoration.
    let out = std::process::Command::new(duet_bin())
        .args(["bench", "--bundle"])
        .arg(&bundle_dir)
        .args([
            "--providers",
            "ort-cpu,tract",
            "--runs",
            "1",
            "--steps",
            "2",
        ])
        .args(["--batch", "2", "--no-python", "--image"])
        .arg(&png)
        .env("ORT_DYLIB_PATH", ort_dylib())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in [
        "| classify, text missing (restored from the image) (ms) |",
        "| classify, image missing (restored from the text) (ms) |",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("{stdout}"));
        // Two providers, each "median / p90" in milliseconds.
        assert_eq!(line.matches(" / ").count(), 2, "{line}");
    }
}
