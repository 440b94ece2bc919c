//! Hostile bundles and images (one test per way they once got through; docs/SECURITY.md):
//! nothing here may panic,
//! hang, allocate without bound, read outside the bundle, or load bytes other than those
//! hashed. Every refusal is a typed error.

use duet_testkit as common;

use std::path::Path;

use common::*;
use duet_fsio::ReadError;
use duet_runtime::engine::{EngineOptions, Provider, ProviderChoice};
use duet_runtime::manifest::{DimSpec, Manifest};
use duet_runtime::preprocess::{load_image, ImageError};
use duet_runtime::{Bundle, BundleError, CaptionError, Captioner};
use image::{Rgb, RgbImage, Rgba, RgbaImage};

fn tract() -> ProviderChoice {
    ProviderChoice::Only(Provider::Tract)
}

fn options() -> EngineOptions {
    EngineOptions::default()
}

fn reread(dir: &Path) -> Manifest {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

fn bad_field(e: &BundleError) -> &str {
    match e {
        BundleError::BadManifest { field, .. } => field,
        other => panic!("expected a manifest refusal, got {other:?}"),
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Finding 4: sizes near 2^63 (which wrapped and aborted on a 2 TB allocation), sizes that do
/// not wrap but would allocate gigabytes, and `max_len` 1e18 (a capacity-overflow panic) are
/// refused at open, by field, before any file is read.
#[test]
fn huge_manifest_dimensions_are_refused_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let good = caption_bundle(dir.path(), 0.0);
    type Edit = Box<dyn Fn(&mut Manifest)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "model.image_size",
            Box::new(|m| {
                m.model.image_size = 1 << 62;
                m.image.size = 1 << 62;
            }),
        ),
        (
            "model.image_size",
            Box::new(|m| {
                m.model.image_size = 60_000;
                m.image.size = 60_000;
            }),
        ),
        (
            "model.max_len",
            Box::new(|m| m.model.max_len = 1_000_000_000_000_000_000),
        ),
        (
            "tokenizer.max_len",
            Box::new(|m| m.tokenizer.max_len = 1_000_000_000_000_000_000),
        ),
        (
            "model.vocab_size",
            Box::new(|m| m.model.vocab_size = usize::MAX),
        ),
        ("model.d_model", Box::new(|m| m.model.d_model = 1 << 40)),
        (
            "model.decoder_layers",
            Box::new(|m| m.model.decoder_layers = 100_000),
        ),
        (
            "model.denoiser_mlp_ratio",
            Box::new(|m| m.model.denoiser_mlp_ratio = Some(1 << 40)),
        ),
        // Each bound alone, but a KV cache of 200 layers × 4096 tokens × 8192 wide is 53 GB.
        (
            "model.max_len",
            Box::new(|m| {
                m.model.decoder_layers = 200;
                m.model.max_len = 4096;
                m.model.d_model = 8192;
            }),
        ),
    ];
    for (field, mutate) in cases {
        let mut m = good.clone();
        mutate(&mut m);
        write_manifest(dir.path(), &m);
        let e = Bundle::open(dir.path()).unwrap_err();
        assert_eq!(bad_field(&e), field, "{e}");
    }
}

/// Finding 7: a manifest that says two things about one key is refused, at any depth.
#[test]
fn duplicate_json_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), 0.0);
    let path = dir.path().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    for (from, to) in [
        ("\"name\": ", "\"name\": \"x\", \"name\": "),
        ("\"pad_id\": ", "\"pad_id\": 0, \"pad_id\": "),
    ] {
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
        let e = Bundle::open(dir.path()).unwrap_err();
        assert!(matches!(e, BundleError::Json { .. }), "{e:?}");
        assert!(e.to_string().contains("appears twice"), "{e}");
    }
    std::fs::write(&path, text).unwrap();
    Bundle::open(dir.path()).unwrap();
}

/// Finding 7: two graph entries naming one file would load the same bytes as two roles.
#[test]
fn one_file_for_two_graphs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = caption_bundle(dir.path(), 0.0);
    m.graphs[1].file = m.graphs[0].file.clone();
    write_manifest(dir.path(), &m);
    let e = Bundle::open(dir.path()).unwrap_err();
    assert_eq!(bad_field(&e), "graphs[caption_decoder].file", "{e}");
}

/// Finding 5: a FIFO as the manifest or as a graph is refused at once (it used to block for
/// ever in `open`), and so is a device.
#[test]
fn fifos_and_devices_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), 0.0);
    let graph = dir.path().join("vision_encoder.onnx");
    std::fs::remove_file(&graph).unwrap();
    mkfifo(&graph);
    let e = Bundle::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            e,
            BundleError::File(ReadError::NotRegular { kind: "a FIFO", .. })
        ),
        "{e:?}"
    );

    let manifest = dir.path().join("manifest.json");
    std::fs::remove_file(&manifest).unwrap();
    mkfifo(&manifest);
    let e = Bundle::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            e,
            BundleError::File(ReadError::NotRegular { kind: "a FIFO", .. })
        ),
        "{e:?}"
    );

    let img = dir.path().join("pic.png");
    mkfifo(&img);
    let e = load_image(&img).unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::Read {
                source: ReadError::NotRegular { .. },
                ..
            }
        ),
        "{e:?}"
    );
    let e = load_image("/dev/zero").unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::Read {
                source: ReadError::NotRegular {
                    kind: "a character device",
                    ..
                },
                ..
            }
        ),
        "{e:?}"
    );
}

/// Finding 6: a bundle file that is a symlink — to a graph outside the bundle, to
/// `/etc/passwd` as the tokenizer — is refused, even when its hash is the recorded one.
#[test]
fn symlinks_out_of_the_bundle_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), 0.0);
    let graph = dir.path().join("vision_encoder.onnx");
    let moved = outside.path().join("vision_encoder.onnx");
    std::fs::rename(&graph, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &graph).unwrap();
    let e = Bundle::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, BundleError::File(ReadError::Symlink { .. })),
        "{e:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let mut m = caption_bundle(dir.path(), 0.0);
    let tok = dir.path().join("tokenizer.json");
    std::fs::remove_file(&tok).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &tok).unwrap();
    // Even with the linked file's own hash recorded, nothing of it is read or printed.
    if let Ok(hash) = duet_runtime::bundle::sha256_file(Path::new("/etc/passwd")) {
        m.files.insert("tokenizer.json".into(), hash);
        write_manifest(dir.path(), &m);
    }
    let e = Bundle::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, BundleError::File(ReadError::Symlink { .. })),
        "{e:?}"
    );
    assert!(!e.to_string().contains("root:"), "{e}");
}

/// Finding 6: graphs load from the bytes that were hashed at open. A file swapped on disk
/// afterwards (the race the issue won 5 times in 80) is never read.
#[test]
fn a_graph_swapped_after_open_is_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), 0.0);
    let pixels = ndarray::Array4::from_elem((1, 3, 8, 8), 0.25f32);
    let before = {
        let bundle = Bundle::open(dir.path()).unwrap();
        let cap = Captioner::new(&bundle, tract(), &options()).unwrap();
        cap.encode(&pixels).unwrap()
    };
    let bundle = Bundle::open(dir.path()).unwrap();
    // Swapped for another valid graph of the same contract (different weights), and the
    // tokenizer for garbage.
    let spec = bundle.manifest().model.clone();
    std::fs::write(
        dir.path().join("vision_encoder.onnx"),
        vision_model(&spec, 999),
    )
    .unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), b"{ garbage").unwrap();
    let cap = Captioner::new(&bundle, tract(), &options()).unwrap();
    assert_eq!(cap.encode(&pixels).unwrap(), before);
    // Opened now, the swap is caught by its hash.
    assert!(matches!(
        Bundle::open(dir.path()).unwrap_err(),
        BundleError::HashMismatch { .. }
    ));
}

/// Finding 7: graphs swapped between roles (hashes updated to match) are refused when they
/// load, naming the graph, not at the first inference.
#[test]
fn graphs_swapped_between_roles_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = caption_bundle(dir.path(), 0.0);
    let (a, b) = (m.graphs[0].file.clone(), m.graphs[1].file.clone());
    m.graphs[0].file = b;
    m.graphs[1].file = a;
    write_manifest(dir.path(), &m);
    let bundle = Bundle::open(dir.path()).unwrap();
    // On both engines: the check is on what the loaded graph declares, whoever loaded it.
    let mut providers = vec![Provider::Tract];
    if ort_lib().is_some() {
        providers.push(Provider::OrtCpu);
    }
    let opts = EngineOptions {
        ort_lib: ort_lib(),
        ..options()
    };
    for p in providers {
        let e = Captioner::new(&bundle, ProviderChoice::Only(p), &opts).unwrap_err();
        match &e {
            CaptionError::Bundle(BundleError::GraphMismatch { graph, reason }) => {
                assert_eq!(graph, "vision_encoder");
                assert!(reason.contains("inputs"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Finding 4: a manifest whose dimensions agree with each other but not with the graphs (it
/// claims 16 px images for graphs built for 8) is refused when the graph loads.
#[test]
fn a_manifest_that_lies_about_a_graph_dimension_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = caption_bundle(dir.path(), 0.0);
    for g in &mut m.graphs {
        for t in g.inputs.iter_mut().filter(|t| t.name == "pixels") {
            t.shape[2] = DimSpec::Fixed(16);
            t.shape[3] = DimSpec::Fixed(16);
        }
    }
    m.model.image_size = 16;
    m.model.patch_size = 8;
    m.image.size = 16;
    write_manifest(dir.path(), &m);
    let bundle = Bundle::open(dir.path()).unwrap();
    let e = Captioner::new(&bundle, tract(), &options()).unwrap_err();
    match &e {
        CaptionError::Bundle(BundleError::GraphMismatch { graph, reason }) => {
            assert_eq!(graph, "vision_encoder");
            assert!(reason.contains("axis 2 is 8 in the graph"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // The unchanged manifest loads.
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), 0.0);
    let bundle = Bundle::open(dir.path()).unwrap();
    Captioner::new(&bundle, tract(), &options()).unwrap();
    let _ = reread(dir.path());
}

/// Finding 8: control characters from a manifest (an ANSI escape in a graph name) never reach
/// the terminal raw through an error message.
#[test]
fn control_characters_in_a_manifest_are_escaped_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = caption_bundle(dir.path(), 0.0);
    // A graph file name with a screen-clearing escape, a colour and a carriage return.
    let mut bad = m.clone();
    bad.graphs[0].file = "\u{1b}[2J\u{1b}[31mvision\r.onnx".into();
    write_manifest(dir.path(), &bad);
    let e = Bundle::open(dir.path()).unwrap_err().to_string();
    assert!(!e.chars().any(|c| c.is_control()), "{e:?}");
    assert!(e.contains("\\u{1b}[2J"), "{e}");
    // And in a class name of a JSON error's key.
    let text = std::fs::read_to_string(dir.path().join("manifest.json")).unwrap();
    std::fs::write(
        dir.path().join("manifest.json"),
        format!("{{\"\\u001b[31m\": 1, \"\\u001b[31m\": 2,{}", &text[1..]),
    )
    .unwrap();
    let e = Bundle::open(dir.path()).unwrap_err().to_string();
    assert!(!e.chars().any(|c| c.is_control()), "{e:?}");
}

/// Finding 7: a transparent PNG is composited over white exactly as the training images were
/// (`c·a + 255·(1 − a)`, rounded), not read with its transparent pixels' hidden colours.
#[test]
fn alpha_is_composited_over_white_as_in_training() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rgba.png");
    let mut img = RgbaImage::from_pixel(3, 1, Rgba([200, 10, 0, 0]));
    img.put_pixel(1, 0, Rgba([200, 10, 0, 128]));
    img.put_pixel(2, 0, Rgba([200, 10, 0, 255]));
    img.save(&p).unwrap();
    let loaded = load_image(&p).unwrap();
    let over = |c: f32, a: f32| (c * a + 255.0 * (1.0 - a)).round() as u8;
    let a = 128.0 / 255.0;
    assert_eq!(
        loaded.get_pixel(0, 0),
        &Rgb([255, 255, 255]),
        "hidden colour leaked"
    );
    assert_eq!(
        loaded.get_pixel(1, 0),
        &Rgb([over(200.0, a), over(10.0, a), over(0.0, a)])
    );
    assert_eq!(loaded.get_pixel(2, 0), &Rgb([200, 10, 0]));
    // An opaque RGB image is untouched.
    let q = dir.path().join("rgb.png");
    let rgb = RgbImage::from_pixel(2, 2, Rgb([1, 2, 3]));
    rgb.save(&q).unwrap();
    assert_eq!(load_image(&q).unwrap(), rgb);
}

/// Finding 8: an image whose header claims more pixels than the decoder's limits is refused
/// without decoding it (a 20,000 × 1 PNG is tiny on disk).
#[test]
fn images_over_the_decoder_limits_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("wide.png");
    RgbImage::new(20_000, 1).save(&p).unwrap();
    let e = load_image(&p).unwrap_err();
    assert!(matches!(e, ImageError::Decode { .. }), "{e:?}");
    let p = dir.path().join("big.bin");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(duet_runtime::preprocess::IMAGE_FILE_CAP.bytes + 1)
        .unwrap();
    let e = load_image(&p).unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::Read {
                source: ReadError::TooLarge { .. },
                ..
            }
        ),
        "{e:?}"
    );
}
