//! The captioning direction: accuracy floors of the trained tiny captioner, parity of its
//! exported graphs, ort and tract captions against Burn, and bad inputs.

use super::*;

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
        // Seeded like every module that starts random: an unseeded lazy draw here would land
        // in the middle of another test's seeded initialisation.
        model: duet_models::init::seeded(&device, 0, || {
            CaptionModel::<Cpu>::new(&trained.config.model, &device)
        }),
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
    assert!(m.diffusion.is_none());
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

/// The same run exported to one `.duet` file: the same graphs and tokenizer byte for byte,
/// and the file opens as a bundle with the directory's manifest (but its own command).
#[test]
fn a_run_exports_to_a_single_file_bundle() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    // Into a folder that does not exist yet: made on the way, as for a directory bundle.
    let file = dir.path().join("new").join("tiny.duet");
    let opts = ExportOptions {
        engine: engine_options(),
        command: "e2e single-file export".into(),
        ..ExportOptions::new(&f.run, &file)
    };
    let report = export_run(&opts).expect("single-file export");
    assert_eq!(report.bundle, file);
    let from_file = Bundle::open(&file).expect("the file opens");
    let from_dir = Bundle::open(&f.bundle).expect("bundle");
    assert_eq!(from_file.manifest().files, from_dir.manifest().files);
    for name in from_dir.manifest().files.keys() {
        assert_eq!(
            from_file.file_bytes(name),
            from_dir.file_bytes(name),
            "{name}"
        );
    }
    // Only the file is left: the staging directory beside it is gone.
    let left: Vec<_> = std::fs::read_dir(dir.path().join("new"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["tiny.duet"]);
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
        let full = cap.greedy_tokens_full(&tokens, &[]).expect("full decode");
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
