//! Manifest schema and `Bundle::open` refusals.

use duet_testkit as common;

use common::*;
use duet_runtime::bundle::is_plain_file_name;
use duet_runtime::manifest::{DType, DimSpec, Graph, Manifest, Parity, Precision, VariantSpec};
use duet_runtime::{Bundle, BundleError};

/// A valid bundle whose graph files are small placeholders (hashes are all `open` checks).
fn small_bundle(dir: &std::path::Path) -> Manifest {
    let spec = tiny_spec(vocab_size());
    write_bundle(
        dir,
        &spec,
        &[
            ("vision_encoder.onnx", b"vision".to_vec()),
            ("caption_decoder.onnx", b"decoder".to_vec()),
            ("tokenizer.json", tokenizer_json().into_bytes()),
        ],
    )
}

#[test]
fn manifest_round_trips_through_json() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = small_bundle(dir.path());
    m.graphs[0].parity = Some(Parity {
        ort_max_abs_diff: 1.5e-6,
        tract_max_abs_diff: 2.0e-6,
        tolerance: 1e-4,
        inputs_checked: 8,
    });
    let json = m.to_json_pretty().unwrap();
    let back: Manifest = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m);
    // Spot-check the wire format the exporter and runtime share.
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["graphs"][0]["inputs"][0]["dtype"], "f32");
    assert_eq!(v["graphs"][0]["inputs"][0]["shape"][0], "batch");
    assert_eq!(v["graphs"][0]["inputs"][0]["shape"][1], 3);
    assert_eq!(v["graphs"][1]["inputs"][0]["dtype"], "i64");
    assert!(v["graphs"][1].get("parity").is_none());
    assert_eq!(
        back.graphs[0].inputs[0].shape[0],
        DimSpec::Symbolic("batch".into())
    );
    assert_eq!(back.graphs[1].inputs[0].dtype, DType::I64);
}

#[test]
fn unknown_manifest_fields_are_tolerated() {
    let dir = tempfile::tempdir().unwrap();
    small_bundle(dir.path());
    let path = dir.path().join("manifest.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["schedule"] = serde_json::json!({"type": "cosine", "steps": 100});
    std::fs::write(&path, v.to_string()).unwrap();
    Bundle::open(dir.path()).unwrap();
}

#[test]
fn valid_bundle_opens() {
    let dir = tempfile::tempdir().unwrap();
    let m = small_bundle(dir.path());
    let b = Bundle::open(dir.path()).unwrap();
    assert_eq!(b.manifest(), &m);
    assert_eq!(
        b.graph_path(Graph::CaptionDecoder).unwrap(),
        dir.path().join("caption_decoder.onnx")
    );
    assert_eq!(b.tokenizer_path(), dir.path().join("tokenizer.json"));
}

#[test]
fn missing_manifest() {
    let dir = tempfile::tempdir().unwrap();
    match Bundle::open(dir.path()) {
        Err(BundleError::MissingFile { path }) => assert!(path.ends_with("manifest.json")),
        other => panic!("{other:?}"),
    }
}

/// Graph roles are a closed set: a manifest naming a graph this runtime does not know is refused
/// when it is parsed, with the name and the known ones, rather than carried along unused.
#[test]
fn unknown_graph_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    small_bundle(dir.path());
    let path = dir.path().join("manifest.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(v["graphs"][1]["name"], "caption_decoder");
    v["graphs"][1]["name"] = serde_json::json!("image_decoder");
    std::fs::write(&path, v.to_string()).unwrap();
    let e = Bundle::open(dir.path()).unwrap_err();
    assert!(matches!(e, BundleError::Json { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("manifest.json"), "{msg}");
    assert!(msg.contains("unknown variant `image_decoder`"), "{msg}");
    assert!(msg.contains("caption_decoder"), "{msg}");
}

#[test]
fn corrupt_manifest_json() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("manifest.json"), "{ not json").unwrap();
    let e = Bundle::open(dir.path()).unwrap_err();
    assert!(matches!(e, BundleError::Json { .. }), "{e:?}");
    assert!(e.to_string().contains("manifest.json"), "{e}");
}

#[test]
fn tampered_file_hash() {
    let dir = tempfile::tempdir().unwrap();
    let m = small_bundle(dir.path());
    std::fs::write(dir.path().join("caption_decoder.onnx"), b"tampered").unwrap();
    match Bundle::open(dir.path()) {
        Err(e @ BundleError::HashMismatch { .. }) => {
            let msg = e.to_string();
            let BundleError::HashMismatch {
                file,
                expected,
                actual,
            } = e
            else {
                unreachable!()
            };
            assert_eq!(file, "caption_decoder.onnx");
            assert_eq!(expected, m.files["caption_decoder.onnx"]);
            assert_ne!(actual, expected);
            assert!(
                msg.contains("caption_decoder.onnx") && msg.contains(&actual),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_listed_file() {
    let dir = tempfile::tempdir().unwrap();
    small_bundle(dir.path());
    std::fs::remove_file(dir.path().join("vision_encoder.onnx")).unwrap();
    match Bundle::open(dir.path()) {
        Err(BundleError::MissingFile { path }) => assert!(path.ends_with("vision_encoder.onnx")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn non_plain_file_names_are_refused() {
    for bad in ["../x", "/etc/passwd", "sub/x.onnx", "..", ".", "", "a\\b"] {
        assert!(!is_plain_file_name(bad), "{bad:?}");
        let dir = tempfile::tempdir().unwrap();
        let mut m = small_bundle(dir.path());
        m.files.insert(bad.to_string(), "0".repeat(64));
        write_manifest(dir.path(), &m);
        match Bundle::open(dir.path()) {
            Err(BundleError::BadManifest { field, .. }) => {
                assert!(field.starts_with("files["), "{bad:?}: {field}")
            }
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    assert!(is_plain_file_name("vision_encoder.fp16.onnx"));
}

#[test]
fn graph_file_must_be_listed() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = small_bundle(dir.path());
    m.graphs[1].file = "../caption_decoder.onnx".into();
    write_manifest(dir.path(), &m);
    match Bundle::open(dir.path()) {
        Err(BundleError::BadManifest { field, .. }) => {
            assert_eq!(field, "graphs[caption_decoder].file")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_required_graph() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = small_bundle(dir.path());
    m.graphs.retain(|g| g.name != Graph::CaptionDecoder);
    write_manifest(dir.path(), &m);
    let e = Bundle::open(dir.path()).unwrap_err();
    assert!(matches!(e, BundleError::BadManifest { .. }), "{e:?}");
    assert!(e.to_string().contains("caption_decoder"), "{e}");
}

#[test]
fn wrong_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = small_bundle(dir.path());
    m.schema_version = 2;
    write_manifest(dir.path(), &m);
    match Bundle::open(dir.path()) {
        Err(BundleError::SchemaVersion { found, supported }) => {
            assert_eq!((found, supported), (2, 1))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn io_contract_violations_name_graph_and_field() {
    type Mutation = Box<dyn Fn(&mut Manifest)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|m| m.graphs[1].inputs.retain(|t| t.name != "past_value_1")),
            "graphs[caption_decoder].inputs",
        ),
        (
            Box::new(|m| m.graphs[1].inputs[0].dtype = DType::F32),
            "graphs[caption_decoder].inputs[input_ids].dtype",
        ),
        (
            Box::new(|m| m.graphs[0].inputs[0].shape[2] = DimSpec::Fixed(64)),
            "graphs[vision_encoder].inputs[pixels].shape[2]",
        ),
        (
            Box::new(|m| m.graphs[0].inputs[0].shape[0] = DimSpec::Fixed(1)),
            "graphs[vision_encoder].inputs[pixels].shape[0]",
        ),
        (
            Box::new(|m| m.graphs[1].outputs.retain(|t| t.name != "logits")),
            "graphs[caption_decoder].outputs",
        ),
        (
            Box::new(|m| {
                let extra = m.graphs[1].inputs[0].clone();
                m.graphs[1].inputs.push(duet_runtime::manifest::TensorSpec {
                    name: "use_cache".into(),
                    ..extra
                })
            }),
            "graphs[caption_decoder].inputs[use_cache]",
        ),
        (
            Box::new(|m| m.graphs[1].outputs[1].shape.pop().map(|_| ()).unwrap_or(())),
            "graphs[caption_decoder].outputs[present_key_0].shape",
        ),
        (Box::new(|m| m.image.size = 16), "image.size"),
        (
            Box::new(|m| m.image.fit = duet_runtime::manifest::ImageFit::Crop),
            "image.fit",
        ),
        (Box::new(|m| m.tokenizer.eos_id = 999), "tokenizer.eos_id"),
    ];
    for (mutate, want_field) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut m = small_bundle(dir.path());
        mutate(&mut m);
        write_manifest(dir.path(), &m);
        match Bundle::open(dir.path()) {
            Err(BundleError::BadManifest { field, reason }) => {
                assert_eq!(field, want_field, "reason: {reason}")
            }
            other => panic!("{want_field}: {other:?}"),
        }
    }
}

#[test]
fn restoration_is_all_or_nothing() {
    use duet_runtime::manifest::RestoreSpec;
    let spec = RestoreSpec {
        task: "colour-column".into(),
        classes: vec!["a".into(), "b".into()],
        prediction: duet_runtime::diffusion::Prediction::V,
        schedule: "cosine".into(),
        alphas_cumprod: vec![0.9, 0.5, 0.1],
        sampler_steps: 2,
        gating: true,
        trust_gate: true,
    };
    // A `restore` section without its graphs (and without a text encoder) is refused.
    let dir = tempfile::tempdir().unwrap();
    let mut m = small_bundle(dir.path());
    m.restore = Some(spec);
    write_manifest(dir.path(), &m);
    match Bundle::open(dir.path()) {
        Err(BundleError::BadManifest { field, reason }) => {
            assert_eq!(field, "graphs");
            assert!(reason.contains("restoration is incomplete"), "{reason}");
            assert!(reason.contains("`restore` section present"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // The valid bundle without one opens, and says it has no restoration.
    let dir = tempfile::tempdir().unwrap();
    small_bundle(dir.path());
    assert!(Bundle::open(dir.path())
        .unwrap()
        .manifest()
        .restore
        .is_none());
}

/// `small_bundle` with an int8 variant: its two files written and listed.
fn bundle_with_variant(dir: &std::path::Path) -> Manifest {
    use duet_runtime::bundle::sha256_hex;
    let mut m = small_bundle(dir);
    let mut files = std::collections::BTreeMap::new();
    for (graph, file, bytes) in [
        (
            Graph::VisionEncoder,
            "vision_encoder.int8.onnx",
            &b"vision8"[..],
        ),
        (
            Graph::CaptionDecoder,
            "caption_decoder.int8.onnx",
            &b"decoder8"[..],
        ),
    ] {
        std::fs::write(dir.join(file), bytes).unwrap();
        m.files.insert(file.to_string(), sha256_hex(bytes));
        files.insert(graph, file.to_string());
    }
    m.variants.push(VariantSpec {
        precision: Precision::Int8,
        method: "test".into(),
        files,
        agreement: Default::default(),
        metrics: [("shapeworld_caption_exact_match".to_string(), 0.5)].into(),
    });
    write_manifest(dir, &m);
    m
}

#[test]
fn a_precision_selects_its_variant_files_and_a_missing_one_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = bundle_with_variant(dir.path());
    let b = Bundle::open(dir.path()).unwrap();
    assert_eq!(b.manifest(), &m);
    assert_eq!(b.precision(), Precision::Fp32);
    assert_eq!(&b.graph_bytes(Graph::VisionEncoder).unwrap()[..], b"vision");
    let int8 = b.clone().with_precision(Precision::Int8).unwrap();
    assert_eq!(int8.precision(), Precision::Int8);
    assert_eq!(
        &int8.graph_bytes(Graph::VisionEncoder).unwrap()[..],
        b"vision8"
    );
    assert_eq!(
        &int8.graph_bytes(Graph::CaptionDecoder).unwrap()[..],
        b"decoder8"
    );
    assert!(int8
        .graph_path(Graph::CaptionDecoder)
        .unwrap()
        .ends_with("caption_decoder.int8.onnx"));
    let e = b.with_precision(Precision::Fp16).unwrap_err();
    assert!(
        matches!(&e, BundleError::MissingPrecision { precision: Precision::Fp16, available }
            if *available == [Precision::Fp32, Precision::Int8]),
        "{e:?}"
    );
    assert_eq!(e.kind(), duet_runtime::ErrorKind::Unsupported);
    assert!(e.to_string().contains("it has: fp32, int8"), "{e}");
    // Names on the command line and in the C ABI.
    assert_eq!("int8".parse::<Precision>().unwrap(), Precision::Int8);
    assert!("int4".parse::<Precision>().is_err());
}

#[test]
fn inconsistent_variants_are_refused_at_open() {
    type Damage = fn(&mut Manifest);
    let cases: [(Damage, &str); 5] = [
        (
            |m| m.variants[0].precision = Precision::Fp32,
            "variants[fp32]",
        ),
        (|m| m.variants.push(m.variants[0].clone()), "variants[int8]"),
        (
            |m| {
                m.variants[0].files.remove(&Graph::CaptionDecoder);
            },
            "variants[int8].files",
        ),
        (
            // The fp32 graph's own file given as the variant's: one set of bytes as two things.
            |m| {
                m.variants[0]
                    .files
                    .insert(Graph::VisionEncoder, "vision_encoder.onnx".into());
            },
            "variants[int8].files[vision_encoder]",
        ),
        (
            |m| {
                m.variants[0]
                    .files
                    .insert(Graph::TextEncoder, "text.int8.onnx".into());
            },
            "variants[int8].files[text_encoder]",
        ),
    ];
    for (damage, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut m = bundle_with_variant(dir.path());
        damage(&mut m);
        write_manifest(dir.path(), &m);
        match Bundle::open(dir.path()) {
            Err(BundleError::BadManifest { field, .. }) => assert_eq!(field, want),
            other => panic!("{want}: {other:?}"),
        }
    }
    // An unlisted variant file.
    let dir = tempfile::tempdir().unwrap();
    let mut m = bundle_with_variant(dir.path());
    m.files.remove("caption_decoder.int8.onnx");
    write_manifest(dir.path(), &m);
    match Bundle::open(dir.path()) {
        Err(BundleError::BadManifest { field, reason }) => {
            assert_eq!(field, "variants[int8].files[caption_decoder]");
            assert!(reason.contains("not listed"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn open_for_reads_only_the_files_of_its_precision() {
    let dir = tempfile::tempdir().unwrap();
    bundle_with_variant(dir.path());
    // The fp32 graphs gone: a bundle opened for int8 never reads them.
    std::fs::remove_file(dir.path().join("vision_encoder.onnx")).unwrap();
    std::fs::remove_file(dir.path().join("caption_decoder.onnx")).unwrap();
    let int8 = Bundle::open_for(dir.path(), Precision::Int8).unwrap();
    assert_eq!(int8.precision(), Precision::Int8);
    assert_eq!(
        &int8.graph_bytes(Graph::CaptionDecoder).unwrap()[..],
        b"decoder8"
    );
    assert!(int8.file_bytes("caption_decoder.onnx").is_none());
    // Switching to a precision whose files were not read is refused, not a silent fallback.
    match int8.with_precision(Precision::Fp32) {
        Err(BundleError::BadManifest { reason, .. }) => {
            assert!(reason.contains("opened for int8 only"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Everything else is still verified: fp32 needs the missing files, open needs all.
    assert!(matches!(
        Bundle::open_for(dir.path(), Precision::Fp32),
        Err(BundleError::File(_) | BundleError::MissingFile { .. } | BundleError::Io { .. })
    ));
    assert!(Bundle::open(dir.path()).is_err());
    assert!(matches!(
        Bundle::open_for(dir.path(), Precision::Fp16),
        Err(BundleError::MissingPrecision { .. })
    ));
}
