use std::sync::Arc;

use super::*;
use crate::onnx::test_util::{module_parameters, random_weights, tiny_dims};
use crate::onnx::{build_caption_decoder, build_vision_encoder, model_to_bytes};

/// A tiny graph built from `module`'s parameters (random, seeded) by `build`.
fn graph_bytes<M: burn::module::Module<burn::backend::NdArray<f32>>>(
    module: M,
    prefix: &str,
    seed: u64,
    build: fn(&crate::onnx::Weights, &crate::onnx::ModelSpec) -> Result<ModelProto, ExportError>,
) -> Arc<[u8]> {
    let w = random_weights(&module_parameters(&module, prefix), seed);
    Arc::from(model_to_bytes(&build(&w, &tiny_dims()).unwrap()))
}

fn decoder_bytes() -> Arc<[u8]> {
    let m = duet_models::CaptionDecoder::new(&tiny_dims(), &Default::default());
    graph_bytes(m, "decoder", 5, build_caption_decoder)
}

fn vision_bytes() -> Arc<[u8]> {
    let m = duet_models::VisionEncoder::new(&tiny_dims(), &Default::default());
    graph_bytes(m, "vision", 7, build_vision_encoder)
}

fn ops(bytes: &[u8]) -> Vec<String> {
    let m = ModelProto::decode(bytes).unwrap();
    m.graph
        .unwrap()
        .node
        .into_iter()
        .map(|n| n.op_type)
        .collect()
}

fn count(ops: &[String], op: &str) -> usize {
    ops.iter().filter(|o| *o == op).count()
}

/// Initializers of `bytes` by element type.
fn initializer_types(bytes: &[u8]) -> Vec<(String, i32, Vec<i64>)> {
    let m = ModelProto::decode(bytes).unwrap();
    m.graph
        .unwrap()
        .initializer
        .into_iter()
        .map(|t| (t.name, t.data_type, t.dims))
        .collect()
}

#[test]
fn symmetric_codes_use_the_full_range_per_line() {
    // 2 × 3, per column: column maxima 2, 0 (all zero) and 4.
    let w = [2.0, 0.0, -4.0, -1.0, 0.0, 1.0];
    let (codes, scale) = quantize_symmetric(&w, 2, 3, true, 127.0);
    assert_eq!(scale, vec![2.0 / 127.0, 1.0, 4.0 / 127.0]);
    assert_eq!(codes, vec![127, 0, -127, -64, 0, 32]);
    // The integer products' 7-bit range: the same lines, half the steps.
    let (codes63, scale63) = quantize_symmetric(&w, 2, 3, true, MATMUL_MAX_CODE);
    assert_eq!(scale63, vec![2.0 / 63.0, 1.0, 4.0 / 63.0]);
    assert_eq!(codes63, vec![63, 0, -63, -31, 0, 16]); // -1 / (2 / 63) is -31.4999… in f32
                                                       // Per row: row maxima 4 and 1.
    let (codes, scale) = quantize_symmetric(&w, 2, 3, false, 127.0);
    assert_eq!(scale, vec![4.0 / 127.0, 1.0 / 127.0]);
    assert_eq!(codes, vec![64, 0, -127, -127, 0, 127]);
    // Dequantised values are within half a step of the originals.
    for (i, &v) in w.iter().enumerate() {
        let back = f32::from(codes[i]) * scale[i / 3];
        assert!(
            (back - v).abs() <= scale[i / 3] / 2.0 + 1e-7,
            "{v} -> {back}"
        );
    }
}

#[test]
fn int8_turns_every_weight_matmul_into_an_integer_product() {
    let fp32 = decoder_bytes();
    let before = ops(&fp32);
    let (int8, report) = quantize_graph(&fp32, Precision::Int8, "caption_decoder").unwrap();
    let after = ops(&int8);
    // Every MatMul with a constant weight went, each into one integer product; those left
    // multiply two activations (attention scores and their weighted sum: two per self- and
    // two per cross-attention of each layer).
    let layers = tiny_dims().decoder_layers;
    assert_eq!(count(&after, "MatMul"), 4 * layers, "{after:?}");
    assert_eq!(report.matmuls, count(&before, "MatMul") - 4 * layers);
    assert_eq!(count(&after, "MatMulInteger"), report.matmuls);
    // One DynamicQuantizeLinear per distinct activation, fewer than products (Q, K, V share).
    let dql = count(&after, "DynamicQuantizeLinear");
    assert!(
        dql > 0 && dql < report.matmuls,
        "{dql} vs {}",
        report.matmuls
    );
    // The token and position tables are int8 rows now; no rank-2 f32 weight is left.
    assert_eq!(report.gathers, 2);
    let inits = initializer_types(&int8);
    assert!(
        inits
            .iter()
            .all(|(n, t, d)| !(d.len() == 2 && *t == DataType::Float as i32) || n.is_empty()),
        "{inits:?}"
    );
    // The weights dominate: the file is well under a third of the fp32 one.
    assert!(
        report.bytes_after * 10 < report.bytes_before * 4,
        "{} -> {} bytes",
        report.bytes_before,
        report.bytes_after
    );
}

#[test]
fn variants_run_on_both_engines_close_to_fp32() {
    let options = EngineOptions::default();
    for (graph, fp32) in [
        ("caption_decoder", decoder_bytes()),
        ("vision_encoder", vision_bytes()),
    ] {
        let (fp16, r16) = quantize_graph(&fp32, Precision::Fp16, graph).unwrap();
        assert!(r16.converted > 0 && r16.kept > 0, "{r16:?}");
        assert!(
            r16.bytes_after * 100 < r16.bytes_before * 56,
            "fp16 {graph}: {r16:?}"
        );
        let a16 = variant_agreement(graph, &fp32, &Arc::from(fp16), &options).unwrap();
        // Half-precision weights: relative error of a few 1e-4 per weight, summed over a
        // product of 64-256 terms and a few layers.
        for d in [a16.ort_max_abs_diff, a16.tract_max_abs_diff] {
            assert!(
                d > 0.0 && d < 1e-2 * a16.fp32_max_abs,
                "fp16 {graph}: {a16:?}"
            );
        }
        let (int8, _) = quantize_graph(&fp32, Precision::Int8, graph).unwrap();
        let a8 = variant_agreement(graph, &fp32, &Arc::from(int8), &options).unwrap();
        // 8-bit weights and activations: about 1 % per product; the bound leaves room for
        // the layers it compounds through, and still fails a wrong scale (off by 127×) or
        // a transposed per-channel layout at once.
        for d in [a8.ort_max_abs_diff, a8.tract_max_abs_diff] {
            assert!(d > 0.0 && d < 0.1 * a8.fp32_max_abs, "int8 {graph}: {a8:?}");
        }
        assert!(
            a8.ort_max_abs_diff > a16.ort_max_abs_diff,
            "{a8:?} vs {a16:?}"
        );
    }
}

#[test]
fn fp32_is_the_graph_itself_and_garbage_is_a_typed_error() {
    let fp32 = decoder_bytes();
    let (same, r) = quantize_graph(&fp32, Precision::Fp32, "caption_decoder").unwrap();
    assert_eq!(&same[..], &fp32[..]);
    assert_eq!(r.bytes_after, r.bytes_before);
    let e = quantize_graph(b"not onnx at all", Precision::Int8, "denoiser").unwrap_err();
    assert!(
        matches!(&e, ExportError::Quantize { graph, .. } if graph == "denoiser"),
        "{e:?}"
    );
}

#[test]
fn a_weight_read_by_another_op_keeps_its_f32_values() {
    // Tie the decoder's first MatMul weight into an extra Identity output: that reader needs
    // the f32 tensor, so the weight must not be replaced.
    let mut m = ModelProto::decode(&decoder_bytes()[..]).unwrap();
    let g = m.graph.as_mut().unwrap();
    let inits: HashSet<String> = g.initializer.iter().map(|t| t.name.clone()).collect();
    let w = g
        .node
        .iter()
        .find(|n| n.op_type == "MatMul" && inits.contains(&n.input[1]))
        .map(|n| n.input[1].clone())
        .unwrap();
    g.node.push(node(
        "Identity",
        "tie".into(),
        vec![w.clone()],
        vec!["tied".into()],
    ));
    let bytes = m.encode_to_vec();
    let (int8, _) = quantize_graph(&bytes, Precision::Int8, "caption_decoder").unwrap();
    let inits = initializer_types(&int8);
    assert!(
        inits
            .iter()
            .any(|(n, t, _)| *n == w && *t == DataType::Float as i32),
        "{w} was replaced"
    );
}

mod bundles {
    use super::*;
    use crate::quantize::variants::{add_variants, VariantOptions};
    use duet_runtime::Bundle;

    fn opts(bundle: &std::path::Path, out: Option<std::path::PathBuf>) -> VariantOptions {
        VariantOptions {
            bundle: bundle.to_path_buf(),
            out,
            precisions: vec![Precision::Fp16, Precision::Int8],
            engine: EngineOptions::default(),
        }
    }

    #[test]
    fn variants_are_added_in_place_idempotently_and_to_a_single_file() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("b");
        std::fs::create_dir(&b).unwrap();
        duet_testkit::caption_bundle(&b, 0.0);
        std::fs::write(b.join("NOTES.md"), "a user's file").unwrap();
        let reports = add_variants(&opts(&b, None)).unwrap();
        assert_eq!(reports.len(), 2);
        let opened = Bundle::open(&b).unwrap();
        assert_eq!(opened.manifest().precisions(), Precision::ALL.to_vec());
        let first = std::fs::read(b.join("manifest.json")).unwrap();
        // Again: the same bytes, nothing to replace.
        add_variants(&opts(&b, None)).unwrap();
        assert_eq!(std::fs::read(b.join("manifest.json")).unwrap(), first);
        assert_eq!(
            std::fs::read_to_string(b.join("NOTES.md")).unwrap(),
            "a user's file"
        );
        // To a single file: every precision opens from it.
        let file = dir.path().join("b.duet");
        add_variants(&opts(&b, Some(file.clone()))).unwrap();
        for p in Precision::ALL {
            let f = Bundle::open_for(&file, p).unwrap();
            assert!(f
                .graph_bytes(duet_runtime::manifest::Graph::CaptionDecoder)
                .is_ok());
        }
    }

    #[test]
    fn in_place_writes_never_replace_a_file_that_is_not_the_bundles() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path();
        duet_testkit::caption_bundle(b, 0.0);
        std::fs::write(b.join("vision_encoder.int8.onnx"), "mine").unwrap();
        let before = std::fs::read(b.join("manifest.json")).unwrap();
        let e = add_variants(&opts(b, None)).unwrap_err();
        assert!(
            matches!(&e, ExportError::OutputHasOtherFiles { others, .. }
                if others == &["vision_encoder.int8.onnx".to_string()]),
            "{e:?}"
        );
        assert_eq!(
            std::fs::read_to_string(b.join("vision_encoder.int8.onnx")).unwrap(),
            "mine"
        );
        assert_eq!(std::fs::read(b.join("manifest.json")).unwrap(), before);
        assert!(!b.join("caption_decoder.fp16.onnx").exists());
    }
}

#[test]
fn forms_the_rewrite_does_not_handle_are_left_alone_or_refused() {
    // A table read by a Gather on another axis keeps its f32 values (the rewrite only knows
    // axis 0), and so does an initializer that is also a graph input (a caller's default).
    let mut m = ModelProto::decode(&decoder_bytes()[..]).unwrap();
    let g = m.graph.as_mut().unwrap();
    let gather = g.node.iter().position(|n| n.op_type == "Gather").unwrap();
    let table = g.node[gather].input[0].clone();
    g.node[gather].attribute.push(attr_int("axis", 1));
    let inits: HashSet<String> = g.initializer.iter().map(|t| t.name.clone()).collect();
    let w = g
        .node
        .iter()
        .find(|n| n.op_type == "MatMul" && inits.contains(&n.input[1]))
        .map(|n| n.input[1].clone())
        .unwrap();
    let mut as_input = g.input[0].clone();
    as_input.name = w.clone();
    g.input.push(as_input);
    let (int8, report) = quantize_graph(&m.encode_to_vec(), Precision::Int8, "d").unwrap();
    assert_eq!(report.gathers, 1, "{report:?}");
    let inits = initializer_types(&int8);
    for kept in [&table, &w] {
        assert!(
            inits
                .iter()
                .any(|(n, t, _)| n == kept && *t == DataType::Float as i32),
            "{kept} was replaced"
        );
    }
    let (fp16, _) = quantize_graph(&m.encode_to_vec(), Precision::Fp16, "d").unwrap();
    assert!(initializer_types(&fp16)
        .iter()
        .any(|(n, t, _)| *n == w && *t == DataType::Float as i32));
    // Below opset 13 the rewrite's Unsqueeze form does not exist: refused.
    let mut old = ModelProto::decode(&decoder_bytes()[..]).unwrap();
    old.opset_import[0].version = 12;
    let e = quantize_graph(&old.encode_to_vec(), Precision::Int8, "d").unwrap_err();
    assert!(e.to_string().contains("opset 12"), "{e}");
}
