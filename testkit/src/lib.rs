//! Test helpers shared by the runtime's and the C ABI's tests (dev-only, not published): a tiny
//! ONNX graph builder (tract's prost types), small contract-conforming duet graphs with random
//! weights, and bundle writing.
//!
//! One file on purpose (≈ 740 lines): every helper here exists for the contract-conforming
//! bundle at its end, and a test author reads the graph builder and the graphs it builds
//! together; split, each half would need the other open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use duet_runtime::bundle::sha256_file;
use duet_runtime::manifest::{
    DType, DimSpec, Graph, GraphSpec, ImageSpec, Manifest, ModelSpec, Preset, TensorSpec,
    TokenizerSpec, SCHEMA_VERSION,
};
use prost::Message;
use tract_onnx::pb;

pub const FLOAT: i32 = pb::tensor_proto::DataType::Float as i32;
pub const INT64: i32 = pb::tensor_proto::DataType::Int64 as i32;

/// An axis of a graph input/output declaration.
#[derive(Clone, Debug)]
pub enum D {
    N(i64),
    S(&'static str),
    /// An axis with neither a size nor a name (what many exporters write for a dynamic axis).
    Unknown,
}

/// Deterministic pseudo-random numbers in [-1, 1) (no rand dependency needed).
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Lcg(seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407))
    }
    pub fn uniform(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

#[derive(Default)]
pub struct GraphBuilder {
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
    counter: usize,
}

fn value_info(name: &str, elem: i32, dims: &[D]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value as DV, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            denotation: String::new(),
            value: match d {
                D::N(n) => Some(DV::DimValue(*n)),
                D::S(s) => Some(DV::DimParam(s.to_string())),
                D::Unknown => None,
            },
        })
        .collect();
    pb::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

pub fn attr_int(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, ints: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

pub fn attr_float(name: &str, f: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}

impl GraphBuilder {
    pub fn input(&mut self, name: &str, elem: i32, dims: &[D]) -> String {
        self.inputs.push(value_info(name, elem, dims));
        name.to_string()
    }

    pub fn output(&mut self, name: &str, elem: i32, dims: &[D]) {
        self.outputs.push(value_info(name, elem, dims));
    }

    pub fn f32(&mut self, name: &str, dims: &[usize], data: Vec<f32>) -> String {
        assert_eq!(dims.iter().product::<usize>(), data.len(), "{name}");
        self.inits.push(pb::TensorProto {
            name: name.to_string(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: FLOAT,
            float_data: data,
            ..Default::default()
        });
        name.to_string()
    }

    pub fn i64(&mut self, name: &str, data: &[i64]) -> String {
        self.inits.push(pb::TensorProto {
            name: name.to_string(),
            dims: vec![data.len() as i64],
            data_type: INT64,
            int64_data: data.to_vec(),
            ..Default::default()
        });
        name.to_string()
    }

    /// Adds a node with one output; `out` names it (e.g. a graph output) or a fresh name is made.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<pb::AttributeProto>,
        out: Option<&str>,
    ) -> String {
        self.counter += 1;
        let out = out
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}_{}", op.to_lowercase(), self.counter));
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: format!("n{}_{op}", self.counter),
            op_type: op.to_string(),
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    pub fn op(&mut self, op: &str, inputs: &[&str]) -> String {
        self.node(op, inputs, vec![], None)
    }

    pub fn finish(self, opset: i64) -> Vec<u8> {
        let model = pb::ModelProto {
            ir_version: 8,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: opset,
            }],
            producer_name: "duet-runtime-tests".into(),
            graph: Some(pb::GraphProto {
                node: self.nodes,
                name: "g".into(),
                initializer: self.inits,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            ..Default::default()
        };
        model.encode_to_vec()
    }
}

/// `y = x @ W + b`, x `[batch, 3]`, W `[3, 2]` — the smallest model with a symbolic axis.
pub const LINEAR_W: [f32; 6] = [1.0, -2.0, 0.5, 3.0, -1.5, 0.25];
pub const LINEAR_B: [f32; 2] = [0.1, -0.2];

pub fn linear_model() -> Vec<u8> {
    let mut g = GraphBuilder::default();
    let x = g.input("x", FLOAT, &[D::S("batch"), D::N(3)]);
    let w = g.f32("W", &[3, 2], LINEAR_W.to_vec());
    let b = g.f32("b", &[2], LINEAR_B.to_vec());
    let xw = g.op("MatMul", &[&x, &w]);
    g.node("Add", &[&xw, &b], vec![], Some("y"));
    g.output("y", FLOAT, &[D::S("batch"), D::N(2)]);
    g.finish(17)
}

/// [`linear_model`] with its batch axis neither sized nor named, and a `Reshape` to
/// `[batch, 2, 1]` through `Shape`/`Gather`/`Concat` of that axis, as exporters write a dynamic
/// axis: tract cannot type this graph until it is given the input's shape.
pub fn unnamed_axis_model() -> Vec<u8> {
    let mut g = GraphBuilder::default();
    let x = g.input("x", FLOAT, &[D::Unknown, D::N(3)]);
    let w = g.f32("W", &[3, 2], LINEAR_W.to_vec());
    let b = g.f32("b", &[2], LINEAR_B.to_vec());
    let xw = g.op("MatMul", &[&x, &w]);
    let y = g.op("Add", &[&xw, &b]);
    let shape = g.op("Shape", &[&x]);
    let zero = g.i64("zero", &[0]);
    let batch = g.node("Gather", &[&shape, &zero], vec![attr_int("axis", 0)], None);
    let rest = g.i64("rest", &[2, 1]);
    let target = g.node("Concat", &[&batch, &rest], vec![attr_int("axis", 0)], None);
    g.node("Reshape", &[&y, &target], vec![], Some("y"));
    g.output("y", FLOAT, &[D::Unknown, D::N(2), D::N(1)]);
    g.finish(17)
}

/// A graph over one element type: input `x` `[batch, 3]` of ONNX type `elem`; outputs
/// `same = Identity(x)` (the type round trip) and `as_f32 = Cast(x → float)` (the values as
/// the graph saw them).
pub fn dtype_model(elem: i32) -> Vec<u8> {
    let mut g = GraphBuilder::default();
    let x = g.input("x", elem, &[D::S("batch"), D::N(3)]);
    g.node("Identity", &[&x], vec![], Some("same"));
    g.node(
        "Cast",
        &[&x],
        vec![attr_int("to", FLOAT as i64)],
        Some("as_f32"),
    );
    g.output("same", elem, &[D::S("batch"), D::N(3)]);
    g.output("as_f32", FLOAT, &[D::S("batch"), D::N(3)]);
    g.finish(17)
}

/// Minimal KV-cache attention: `k_all = concat(past, x)` on axis 1,
/// `out = softmax(x @ k_allᵀ + bias) @ k_all`; outputs `out` and `present = k_all`.
pub fn cache_model() -> Vec<u8> {
    let mut g = GraphBuilder::default();
    let x = g.input("x", FLOAT, &[D::S("batch"), D::S("seq"), D::N(4)]);
    let past = g.input("past", FLOAT, &[D::S("batch"), D::S("past"), D::N(4)]);
    let bias = g.input("bias", FLOAT, &[D::S("batch"), D::S("seq"), D::S("total")]);
    let k_all = g.node(
        "Concat",
        &[&past, &x],
        vec![attr_int("axis", 1)],
        Some("present"),
    );
    let kt = g.node(
        "Transpose",
        &[&k_all],
        vec![attr_ints("perm", &[0, 2, 1])],
        None,
    );
    let s = g.op("MatMul", &[&x, &kt]);
    let s = g.op("Add", &[&s, &bias]);
    let p = g.node("Softmax", &[&s], vec![attr_int("axis", -1)], None);
    g.node("MatMul", &[&p, &k_all], vec![], Some("out"));
    g.output("out", FLOAT, &[D::S("batch"), D::S("seq"), D::N(4)]);
    g.output("present", FLOAT, &[D::S("batch"), D::S("total"), D::N(4)]);
    g.finish(17)
}

/// Dimensions of the test captioning model.
pub fn tiny_spec(vocab: usize) -> ModelSpec {
    ModelSpec {
        image_size: 8,
        channels: 3,
        patch_size: 4,
        d_model: 8,
        n_heads: 2,
        vision_layers: 0,
        decoder_layers: 2,
        mlp_ratio: 4,
        embed_dim: 6,
        vocab_size: vocab,
        max_len: 8,
        layer_norm_eps: 1e-5,
        denoiser_patch_size: 4,
        // The generation-side fields as the tiny preset has them.
        ..ModelSpec::preset(Preset::Tiny, vocab, 8)
    }
}

fn layer_norm(g: &mut GraphBuilder, x: &str, d: usize, prefix: &str, rng: &mut Lcg) -> String {
    let gamma: Vec<f32> = rng.vec(d, 0.2).iter().map(|v| 1.0 + v).collect();
    let gamma = g.f32(&format!("{prefix}.gamma"), &[d], gamma);
    let beta = g.f32(&format!("{prefix}.beta"), &[d], rng.vec(d, 0.1));
    g.node(
        "LayerNormalization",
        &[x, &gamma, &beta],
        vec![attr_int("axis", -1), attr_float("epsilon", 1e-5)],
        None,
    )
}

fn linear(
    g: &mut GraphBuilder,
    x: &str,
    a: usize,
    b: usize,
    prefix: &str,
    rng: &mut Lcg,
    scale: f32,
) -> String {
    let w = g.f32(&format!("{prefix}.weight"), &[a, b], rng.vec(a * b, scale));
    let bias = g.f32(&format!("{prefix}.bias"), &[b], rng.vec(b, 0.1));
    let y = g.op("MatMul", &[x, &w]);
    g.op("Add", &[&y, &bias])
}

/// `[B, N, D] → [B, H, N, Dh]`
fn split_heads(g: &mut GraphBuilder, x: &str, shape: &str) -> String {
    let r = g.op("Reshape", &[x, shape]);
    g.node(
        "Transpose",
        &[&r],
        vec![attr_ints("perm", &[0, 2, 1, 3])],
        None,
    )
}

/// The vision encoder of the contract with `vision_layers = 0` (patch embed, pos embed,
/// ln_final, mean-pool, proj, L2 normalise).
pub fn vision_model(spec: &ModelSpec, seed: u64) -> Vec<u8> {
    let mut rng = Lcg::new(seed);
    let (d, p, s, ps) = (
        spec.d_model,
        spec.num_patches(),
        spec.image_size,
        spec.patch_size,
    );
    let mut g = GraphBuilder::default();
    let px = g.input(
        "pixels",
        FLOAT,
        &[D::S("batch"), D::N(3), D::N(s as i64), D::N(s as i64)],
    );
    let w = g.f32(
        "patch.weight",
        &[d, 3, ps, ps],
        rng.vec(d * 3 * ps * ps, 0.3),
    );
    let b = g.f32("patch.bias", &[d], rng.vec(d, 0.1));
    let conv = g.node(
        "Conv",
        &[&px, &w, &b],
        vec![
            attr_ints("kernel_shape", &[ps as i64, ps as i64]),
            attr_ints("strides", &[ps as i64, ps as i64]),
        ],
        None,
    );
    let shape = g.i64("shape_bdp", &[0, d as i64, -1]);
    let r = g.op("Reshape", &[&conv, &shape]);
    let t = g.node(
        "Transpose",
        &[&r],
        vec![attr_ints("perm", &[0, 2, 1])],
        None,
    );
    let pos = g.f32("pos_embed", &[1, p, d], rng.vec(p * d, 0.5));
    let x = g.op("Add", &[&t, &pos]);
    let gamma = g.f32("ln.gamma", &[d], vec![1.0; d]);
    let beta = g.f32("ln.beta", &[d], vec![0.0; d]);
    g.node(
        "LayerNormalization",
        &[&x, &gamma, &beta],
        vec![attr_int("axis", -1), attr_float("epsilon", 1e-5)],
        Some("patch_tokens"),
    );
    let mean = g.node(
        "ReduceMean",
        &["patch_tokens"],
        vec![attr_ints("axes", &[1]), attr_int("keepdims", 0)],
        None,
    );
    let y = linear(&mut g, &mean, d, spec.embed_dim, "proj", &mut rng, 0.5);
    let sq = g.op("Mul", &[&y, &y]);
    // ReduceSum takes `axes` as an input since opset 13.
    let axes = g.i64("axes_last", &[-1]);
    let sum = g.node(
        "ReduceSum",
        &[&sq, &axes],
        vec![attr_int("keepdims", 1)],
        None,
    );
    let eps = g.f32("eps", &[], vec![1e-12]);
    let sum = g.op("Add", &[&sum, &eps]);
    let norm = g.op("Sqrt", &[&sum]);
    g.node("Div", &[&y, &norm], vec![], Some("embedding"));
    g.output(
        "patch_tokens",
        FLOAT,
        &[D::S("batch"), D::N(p as i64), D::N(d as i64)],
    );
    g.output(
        "embedding",
        FLOAT,
        &[D::S("batch"), D::N(spec.embed_dim as i64)],
    );
    g.finish(17)
}

/// The one-step KV-cache caption decoder of the contract (no MLP: it is not what the runtime
/// tests exercise). `eos_logit_bias` is added to the EOS logit, to force or forbid stopping;
/// ids 0, 1 and 3 (PAD, BOS, UNK) are suppressed.
pub fn decoder_model(spec: &ModelSpec, seed: u64, eos_id: usize, eos_logit_bias: f32) -> Vec<u8> {
    let mut rng = Lcg::new(seed);
    let (d, h, dh, v) = (spec.d_model, spec.n_heads, spec.head_dim(), spec.vocab_size);
    let mut g = GraphBuilder::default();
    let ids = g.input("input_ids", INT64, &[D::S("batch"), D::S("seq")]);
    let pos = g.input("position_ids", INT64, &[D::S("batch"), D::S("seq")]);
    let bias = g.input(
        "attn_bias",
        FLOAT,
        &[D::S("batch"), D::N(1), D::S("seq"), D::S("total")],
    );
    let img = g.input(
        "image_tokens",
        FLOAT,
        &[
            D::S("batch"),
            D::N(spec.num_patches() as i64),
            D::N(d as i64),
        ],
    );
    let kv_dims = [D::S("batch"), D::N(h as i64), D::S("past"), D::N(dh as i64)];
    let out_kv_dims = [
        D::S("batch"),
        D::N(h as i64),
        D::S("total"),
        D::N(dh as i64),
    ];
    for l in 0..spec.decoder_layers {
        g.input(&format!("past_key_{l}"), FLOAT, &kv_dims);
        g.input(&format!("past_value_{l}"), FLOAT, &kv_dims);
    }
    let tok = g.f32("tok_embed", &[v, d], rng.vec(v * d, 1.0));
    let pos_t = g.f32(
        "pos_embed",
        &[spec.max_len, d],
        rng.vec(spec.max_len * d, 1.0),
    );
    let te = g.node("Gather", &[&tok, &ids], vec![attr_int("axis", 0)], None);
    let pe = g.node("Gather", &[&pos_t, &pos], vec![attr_int("axis", 0)], None);
    let mut x = g.op("Add", &[&te, &pe]);
    let heads = g.i64("heads_shape", &[0, 0, h as i64, dh as i64]);
    let merge = g.i64("merge_shape", &[0, 0, d as i64]);
    let scale = g.f32("scale", &[], vec![1.0 / (dh as f32).sqrt()]);
    for l in 0..spec.decoder_layers {
        // self-attention with the cache
        let hx = layer_norm(&mut g, &x, d, &format!("l{l}.ln1"), &mut rng);
        let q = linear(&mut g, &hx, d, d, &format!("l{l}.sa.q"), &mut rng, 0.6);
        let k = linear(&mut g, &hx, d, d, &format!("l{l}.sa.k"), &mut rng, 0.6);
        let vv = linear(&mut g, &hx, d, d, &format!("l{l}.sa.v"), &mut rng, 0.6);
        let (q, k, vv) = (
            split_heads(&mut g, &q, &heads),
            split_heads(&mut g, &k, &heads),
            split_heads(&mut g, &vv, &heads),
        );
        let pk = format!("past_key_{l}");
        let pv = format!("past_value_{l}");
        let k_all = g.node(
            "Concat",
            &[&pk, &k],
            vec![attr_int("axis", 2)],
            Some(&format!("present_key_{l}")),
        );
        let v_all = g.node(
            "Concat",
            &[&pv, &vv],
            vec![attr_int("axis", 2)],
            Some(&format!("present_value_{l}")),
        );
        let kt = g.node(
            "Transpose",
            &[&k_all],
            vec![attr_ints("perm", &[0, 1, 3, 2])],
            None,
        );
        let s = g.op("MatMul", &[&q, &kt]);
        let s = g.op("Mul", &[&s, &scale]);
        let s = g.op("Add", &[&s, &bias]);
        let p = g.node("Softmax", &[&s], vec![attr_int("axis", -1)], None);
        let o = g.op("MatMul", &[&p, &v_all]);
        let o = g.node(
            "Transpose",
            &[&o],
            vec![attr_ints("perm", &[0, 2, 1, 3])],
            None,
        );
        let o = g.op("Reshape", &[&o, &merge]);
        let o = linear(&mut g, &o, d, d, &format!("l{l}.sa.out"), &mut rng, 0.6);
        x = g.op("Add", &[&x, &o]);
        // cross-attention on the image tokens
        let hx = layer_norm(&mut g, &x, d, &format!("l{l}.ln2"), &mut rng);
        let q = linear(&mut g, &hx, d, d, &format!("l{l}.ca.q"), &mut rng, 0.6);
        let k = linear(&mut g, &img, d, d, &format!("l{l}.ca.k"), &mut rng, 0.6);
        let vv = linear(&mut g, &img, d, d, &format!("l{l}.ca.v"), &mut rng, 0.6);
        let (q, k, vv) = (
            split_heads(&mut g, &q, &heads),
            split_heads(&mut g, &k, &heads),
            split_heads(&mut g, &vv, &heads),
        );
        let kt = g.node(
            "Transpose",
            &[&k],
            vec![attr_ints("perm", &[0, 1, 3, 2])],
            None,
        );
        let s = g.op("MatMul", &[&q, &kt]);
        let s = g.op("Mul", &[&s, &scale]);
        let p = g.node("Softmax", &[&s], vec![attr_int("axis", -1)], None);
        let o = g.op("MatMul", &[&p, &vv]);
        let o = g.node(
            "Transpose",
            &[&o],
            vec![attr_ints("perm", &[0, 2, 1, 3])],
            None,
        );
        let o = g.op("Reshape", &[&o, &merge]);
        let o = linear(&mut g, &o, d, d, &format!("l{l}.ca.out"), &mut rng, 0.6);
        x = g.op("Add", &[&x, &o]);
    }
    let hx = layer_norm(&mut g, &x, d, "ln_final", &mut rng);
    let w = g.f32("lm_head.weight", &[d, v], rng.vec(d * v, 1.0));
    let mut b = rng.vec(v, 0.1);
    b[eos_id] += eos_logit_bias;
    // Keep PAD, BOS and UNK out of generated text so captions have a predictable word count.
    for special in [0, 1, 3] {
        b[special] -= 100.0;
    }
    let b = g.f32("lm_head.bias", &[v], b);
    let y = g.op("MatMul", &[&hx, &w]);
    g.node("Add", &[&y, &b], vec![], Some("logits"));
    g.output(
        "logits",
        FLOAT,
        &[D::S("batch"), D::S("seq"), D::N(v as i64)],
    );
    for l in 0..spec.decoder_layers {
        g.output(&format!("present_key_{l}"), FLOAT, &out_kv_dims);
        g.output(&format!("present_value_{l}"), FLOAT, &out_kv_dims);
    }
    g.finish(17)
}

pub const WORDS: [&str; 12] = [
    "a", "cat", "dog", "sits", "on", "the", "mat", "red", "blue", "ball", "under", "tree",
];

/// A WordLevel tokenizer: `[PAD]`=0, `[BOS]`=1, `[EOS]`=2, `[UNK]`=3, then [`WORDS`].
pub fn tokenizer_json() -> String {
    let specials = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"];
    let mut vocab = serde_json::Map::new();
    for (i, t) in specials.iter().chain(WORDS.iter()).enumerate() {
        vocab.insert(t.to_string(), serde_json::json!(i));
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
    .to_string()
}

pub fn vocab_size() -> usize {
    4 + WORDS.len()
}

fn ts(name: &str, dtype: DType, shape: &[DimSpec]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
    }
}

fn sym(s: &str) -> DimSpec {
    DimSpec::Symbolic(s.into())
}

fn fixed(n: usize) -> DimSpec {
    DimSpec::Fixed(n)
}

/// Graph specs exactly as the contract describes them.
pub fn contract_graphs(spec: &ModelSpec) -> Vec<GraphSpec> {
    let (d, p, s) = (spec.d_model, spec.num_patches(), spec.image_size);
    let kv = |n: &str, len: &str| {
        ts(
            n,
            DType::F32,
            &[
                sym("batch"),
                fixed(spec.n_heads),
                sym(len),
                fixed(spec.head_dim()),
            ],
        )
    };
    let mut dec_in = vec![
        ts("input_ids", DType::I64, &[sym("batch"), sym("seq")]),
        ts("position_ids", DType::I64, &[sym("batch"), sym("seq")]),
        ts(
            "attn_bias",
            DType::F32,
            &[sym("batch"), fixed(1), sym("seq"), sym("total")],
        ),
        ts(
            "image_tokens",
            DType::F32,
            &[sym("batch"), fixed(p), fixed(d)],
        ),
    ];
    let mut dec_out = vec![ts(
        "logits",
        DType::F32,
        &[sym("batch"), sym("seq"), fixed(spec.vocab_size)],
    )];
    for l in 0..spec.decoder_layers {
        dec_in.push(kv(&format!("past_key_{l}"), "past"));
        dec_in.push(kv(&format!("past_value_{l}"), "past"));
        dec_out.push(kv(&format!("present_key_{l}"), "total"));
        dec_out.push(kv(&format!("present_value_{l}"), "total"));
    }
    vec![
        GraphSpec {
            name: Graph::VisionEncoder,
            file: "vision_encoder.onnx".into(),
            inputs: vec![ts(
                "pixels",
                DType::F32,
                &[sym("batch"), fixed(3), fixed(s), fixed(s)],
            )],
            outputs: vec![
                ts(
                    "patch_tokens",
                    DType::F32,
                    &[sym("batch"), fixed(p), fixed(d)],
                ),
                ts(
                    "embedding",
                    DType::F32,
                    &[sym("batch"), fixed(spec.embed_dim)],
                ),
            ],
            parity: None,
        },
        GraphSpec {
            name: Graph::CaptionDecoder,
            file: "caption_decoder.onnx".into(),
            inputs: dec_in,
            outputs: dec_out,
            parity: None,
        },
    ]
}

/// Writes `files` into `dir` and a manifest listing their hashes; returns the manifest.
pub fn write_bundle(dir: &Path, spec: &ModelSpec, files: &[(&str, Vec<u8>)]) -> Manifest {
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let hashes: BTreeMap<String, String> = files
        .iter()
        .map(|(n, _)| (n.to_string(), sha256_file(&dir.join(n)).unwrap()))
        .collect();
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        name: "test-bundle".into(),
        preset: "tiny".into(),
        model: spec.clone(),
        image: ImageSpec {
            size: spec.image_size,
            channels: 3,
            mean: [0.5; 3],
            std: [0.5; 3],
            fit: spec.image_fit,
        },
        tokenizer: TokenizerSpec {
            file: "tokenizer.json".into(),
            pad_id: 0,
            bos_id: 1,
            eos_id: 2,
            unk_id: 3,
            max_len: spec.max_len,
            origin: None,
        },
        graphs: contract_graphs(spec),
        files: hashes,
        variants: Vec::new(),
        metrics: Default::default(),
        provenance: serde_json::json!({"command": "cargo test", "seed": 7}),
        diffusion: None,
        restore: None,
        questions: None,
    };
    write_manifest(dir, &manifest);
    manifest
}

pub fn write_manifest(dir: &Path, m: &Manifest) {
    std::fs::write(dir.join("manifest.json"), m.to_json_pretty().unwrap()).unwrap();
}

/// A complete, valid captioning bundle with random weights.
pub fn caption_bundle(dir: &Path, eos_logit_bias: f32) -> Manifest {
    let spec = tiny_spec(vocab_size());
    write_bundle(
        dir,
        &spec,
        &[
            ("vision_encoder.onnx", vision_model(&spec, 11)),
            (
                "caption_decoder.onnx",
                decoder_model(&spec, 23, 2, eos_logit_bias),
            ),
            ("tokenizer.json", tokenizer_json().into_bytes()),
        ],
    )
}

/// The engines the tests compare: tract always, onnxruntime's CPU provider when its library
/// is installed.
pub fn providers() -> Vec<duet_runtime::Provider> {
    let mut p = vec![duet_runtime::Provider::Tract];
    if ort_lib().is_some() {
        p.push(duet_runtime::Provider::OrtCpu);
    }
    p
}

/// Engine options for the tests: [`ort_lib`]'s library, `strict` as asked.
pub fn engine_options(strict: bool) -> duet_runtime::EngineOptions {
    duet_runtime::EngineOptions {
        strict,
        ort_lib: ort_lib(),
        ..duet_runtime::EngineOptions::default()
    }
}

/// The onnxruntime library installed by `scripts/setup-ort.sh`, if present and the runtime under
/// test was built with onnxruntime.
pub fn ort_lib() -> Option<PathBuf> {
    if !duet_runtime::engine::ORT_COMPILED {
        return None;
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .join(".ort")
        .join("lib")
        .join("libonnxruntime.so");
    p.is_file().then_some(p)
}

/// Whether a thread of this process whose name starts with `prefix` appears within 5 s (Linux:
/// `/proc/self/task`). Thread pools start their threads, and name them, asynchronously, so a
/// test looks for them for a while rather than once.
#[cfg(target_os = "linux")]
pub fn thread_appears(prefix: &str) -> bool {
    let present = || {
        std::fs::read_dir("/proc/self/task")
            .map(|tasks| {
                tasks.filter_map(Result::ok).any(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|n| n.starts_with(prefix))
                })
            })
            .unwrap_or(false)
    };
    let started = std::time::Instant::now();
    while !present() {
        if started.elapsed() > std::time::Duration::from_secs(5) {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}
