//! The generation pipeline on a broken copy of the shipped bundle: a NaN weight in the denoiser
//! must stop generation with an error naming the graph, not come out as a black image.

use duet_testkit as common;

use std::path::Path;

use common::*;
use duet_runtime::bundle::sha256_file;
use duet_runtime::engine::{EngineOptions, Provider, ProviderChoice};
use duet_runtime::manifest::Manifest;
use duet_runtime::{Bundle, GenerateError, Generator};
use prost::Message;
use tract_onnx::pb;

fn shipped() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shipped/duet-small"
    ))
}

/// Copies the shipped bundle into `dir` with one NaN in the bias of the denoiser's last layer
/// (its convolutional head, or the linear head of a denoiser without one), and the manifest's
/// hash updated so the bundle still opens. Nothing stands between that bias and the output.
/// A NaN further upstream is not enough: with one in the head's weight the reference ONNX
/// evaluator gives 1,587 NaN outputs but tract and onnxruntime none, and with one in the first
/// block's MLP tract still none (measured on the shipped denoiser; the engines' activation
/// kernels, SiLU before the head and GELU in the blocks, do not carry every NaN through).
fn bundle_with_nan_denoiser(dir: &Path) {
    for entry in std::fs::read_dir(shipped()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    let graph = dir.join("denoiser.onnx");
    let mut model = pb::ModelProto::decode(std::fs::read(&graph).unwrap().as_slice()).unwrap();
    let weights = &mut model.graph.as_mut().unwrap().initializer;
    let name = if weights.iter().any(|t| t.name == "denoiser.out_conv.bias") {
        "denoiser.out_conv.bias"
    } else {
        "denoiser.head.bias"
    };
    let bias = weights
        .iter_mut()
        .find(|t| t.name == name && t.data_type == FLOAT)
        .unwrap();
    if bias.raw_data.is_empty() {
        bias.float_data[0] = f32::NAN;
    } else {
        bias.raw_data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(&graph, model.encode_to_vec()).unwrap();
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let mut manifest: Manifest = serde_json::from_str(&text).unwrap();
    manifest
        .files
        .insert("denoiser.onnx".into(), sha256_file(&graph).unwrap());
    write_manifest(dir, &manifest);
}

#[test]
fn non_finite_denoiser_output_is_an_error_not_an_image() {
    let dir = tempfile::tempdir().unwrap();
    bundle_with_nan_denoiser(dir.path());
    let bundle = Bundle::open(dir.path()).unwrap();
    let mut providers = vec![Provider::Tract];
    if ort_lib().is_some() {
        providers.push(Provider::OrtCpu);
    }
    let options = EngineOptions {
        strict: true,
        ort_lib: ort_lib(),
        ..EngineOptions::default()
    };
    for p in providers {
        let generator = Generator::new(&bundle, ProviderChoice::Only(p), &options).unwrap();
        let mut opts = generator.default_options();
        opts.steps = 2;
        for prompts in [
            &["a large red circle on the left"][..],
            &["grinning face"; 2],
        ] {
            let err = generator.generate_images(prompts, &opts).unwrap_err();
            assert!(
                matches!(&err, GenerateError::NonFinite { graph, output }
                    if graph == "denoiser" && output == "prediction"),
                "{p}: {err:?}"
            );
            assert_eq!(
                err.to_string(),
                "graph `denoiser` returned a non-finite value (NaN or infinity) in `prediction`"
            );
        }
    }
}
