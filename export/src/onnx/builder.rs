//! A small ONNX graph builder over tract-onnx's prost types.
//!
//! Burn's tracer cannot emit the ops our transformers need (Transpose, Softmax,
//! LayerNormalization, Erf, Gather, …), so graphs are written node by node from the trained
//! parameters, like onnxruntime-genai's model builder does. The builder only knows the handful of
//! ops listed in `docs/ARCHITECTURE.md`, all in the form that is valid at [`OPSET_VERSION`], and
//! a few composites (Linear, LayerNorm, GELU, MLP, multi-head attention) whose formulas are the
//! contract shared with the Burn models and the runtime.
//!
//! One file on purpose (≈ 740 lines): the primitive ops and the composites built from them are
//! one vocabulary; each composite is a few lines over the primitives above it, and reading a
//! composite's ONNX form means reading those primitives.

use std::collections::{BTreeSet, HashMap};

use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

use super::{ExportError, Weights};

/// The `ai.onnx` opset every graph is written against.
///
/// 17 is the minimum (LayerNormalization); 18 is chosen so that ReduceMean/ReduceSum take their
/// axes as an input in the standard way (ReduceMean switched at 18, ReduceSum at 13). tract 0.23
/// is tested against opsets 9..=18 and onnxruntime 1.24 implements all ops used here at 18.
pub const OPSET_VERSION: i64 = 18;

/// ONNX IR version 8 is the one released together with opset 18 (ONNX 1.13), so older
/// consumers that check IR ≥ opset compatibility accept the files.
pub const IR_VERSION: i64 = 8;

/// `producer_name` written into every model.
pub const PRODUCER_NAME: &str = "duet-export";

/// Element type of a graph input or output: the runtime's (and the manifest's) `DType`.
pub use duet_runtime::manifest::DType;

/// One axis of a declared graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A size fixed by the model config (e.g. `d_model`).
    Fixed(usize),
    /// A named, run-time size (`batch`, `seq`, `past`, `total`); equal names mean equal sizes
    /// to ONNX shape inference and to the runtime's contract checks.
    Sym(&'static str),
}

/// Handle to a tensor (graph input, initializer or node output) inside one [`GraphBuilder`].
///
/// A newtype rather than a bare `String` so a parameter name can never be passed where a graph
/// value is expected.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GraphValue(String);

impl GraphValue {
    /// The tensor's name in the ONNX graph.
    pub fn name(&self) -> &str {
        &self.0
    }
}

/// Cached key/value tensors of one attention layer from earlier decoding steps.
#[derive(Debug, Clone)]
pub struct PastKv {
    pub key: GraphValue,
    pub value: GraphValue,
}

/// What [`GraphBuilder::mha`] returns.
#[derive(Debug, Clone)]
pub struct MhaOutput {
    /// Attention output after the `out` projection, `[B, N, D]`.
    pub out: GraphValue,
    /// Keys over past + current positions, `[B, H, total, Dh]` (the decoder's `present_key_l`).
    pub k_all: GraphValue,
    /// Values over past + current positions, `[B, H, total, Dh]`.
    pub v_all: GraphValue,
}

/// Builds one ONNX graph. Weights are read from a borrowed [`Weights`]; every parameter that is
/// turned into an initializer is recorded so the caller can reject checkpoints with parameters
/// the graph does not use (a sign that the model and the contract drifted apart).
pub struct GraphBuilder<'w> {
    weights: &'w Weights,
    used: BTreeSet<String>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    initializers: Vec<TensorProto>,
    nodes: Vec<NodeProto>,
    /// Parameter name → initializer, so a parameter read twice is stored once.
    param_values: HashMap<String, GraphValue>,
    /// Deduplicated i64 constants (reshape targets, axes).
    i64_consts: HashMap<Vec<i64>, GraphValue>,
    /// Every name already used for a tensor or node; ONNX requires SSA-unique tensor names.
    taken: BTreeSet<String>,
    counter: usize,
    scope: Vec<String>,
    doc: String,
}

impl<'w> GraphBuilder<'w> {
    /// Starts an empty graph whose parameters come from `weights`.
    pub fn new(weights: &'w Weights) -> Self {
        Self {
            weights,
            used: BTreeSet::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            initializers: Vec::new(),
            nodes: Vec::new(),
            param_values: HashMap::new(),
            i64_consts: HashMap::new(),
            taken: BTreeSet::new(),
            counter: 0,
            scope: Vec::new(),
            doc: String::new(),
        }
    }

    /// Sets the model's `doc_string` (what the graph is and which contract it follows).
    pub fn set_doc(&mut self, doc: impl Into<String>) {
        self.doc = doc.into();
    }

    /// Parameter names turned into initializers so far.
    pub fn used_parameters(&self) -> &BTreeSet<String> {
        &self.used
    }

    /// Errors with [`ExportError::UnusedParameters`] if `weights` holds a parameter under
    /// `prefix` that this graph never read: exporting would silently drop trained state.
    pub fn check_all_used(&self, prefix: &str, graph: &str) -> Result<(), ExportError> {
        let mut unused: Vec<String> = self
            .weights
            .names()
            .filter(|n| n.starts_with(prefix) && !self.used.contains(*n))
            .map(str::to_owned)
            .collect();
        if unused.is_empty() {
            Ok(())
        } else {
            unused.sort();
            Err(ExportError::UnusedParameters {
                graph: graph.to_owned(),
                names: unused,
            })
        }
    }

    /// Runs `f` with `name` pushed on the naming scope, so node and tensor names read like
    /// `decoder.blocks.0.self_attn/MatMul_12` in tools such as Netron and in tract errors.
    pub fn scoped<R>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> R) -> R {
        self.scope.push(name.to_owned());
        let r = f(self);
        self.scope.pop();
        r
    }

    fn fresh(&mut self, stem: &str) -> String {
        loop {
            self.counter += 1;
            let name = match self.scope.last() {
                Some(s) => format!("{s}/{stem}_{}", self.counter),
                None => format!("{stem}_{}", self.counter),
            };
            if self.taken.insert(name.clone()) {
                return name;
            }
        }
    }

    fn claim(&mut self, name: &str) -> Result<(), ExportError> {
        if self.taken.insert(name.to_owned()) {
            Ok(())
        } else {
            Err(ExportError::DuplicateName(name.to_owned()))
        }
    }

    // ----- graph interface -------------------------------------------------------------------

    /// Declares a graph input.
    pub fn input(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[Dim],
    ) -> Result<GraphValue, ExportError> {
        self.claim(name)?;
        self.inputs.push(value_info(name, dtype, shape));
        Ok(GraphValue(name.to_owned()))
    }

    /// Declares a graph output named `name` carrying `value`.
    ///
    /// The value is routed through an `Identity` node so the public name is independent of the
    /// internal naming and a value may be both consumed inside the graph and exported.
    pub fn output(
        &mut self,
        value: &GraphValue,
        name: &str,
        dtype: DType,
        shape: &[Dim],
    ) -> Result<(), ExportError> {
        self.claim(name)?;
        let node_name = self.fresh("Identity");
        self.nodes.push(NodeProto {
            input: vec![value.0.clone()],
            output: vec![name.to_owned()],
            name: node_name,
            op_type: "Identity".into(),
            ..Default::default()
        });
        self.outputs.push(value_info(name, dtype, shape));
        Ok(())
    }

    // ----- initializers ----------------------------------------------------------------------

    /// Adds the trained parameter `name` as an initializer (named after the parameter), after
    /// checking it has exactly `expected` shape.
    pub fn param(&mut self, name: &str, expected: &[usize]) -> Result<GraphValue, ExportError> {
        let data = self.weights.get_shaped(name, expected)?;
        if let Some(v) = self.param_values.get(name) {
            return Ok(v.clone());
        }
        self.claim(name)?;
        self.initializers.push(f32_tensor(name, expected, data));
        self.used.insert(name.to_owned());
        let v = GraphValue(name.to_owned());
        self.param_values.insert(name.to_owned(), v.clone());
        Ok(v)
    }

    /// Adds an f32 constant initializer. `shape` may be empty for a scalar.
    pub fn const_f32(
        &mut self,
        stem: &str,
        shape: &[usize],
        data: &[f32],
    ) -> Result<GraphValue, ExportError> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(ExportError::DataLength {
                name: stem.to_owned(),
                shape: shape.to_vec(),
                len: data.len(),
            });
        }
        let name = self.fresh(stem);
        self.initializers.push(f32_tensor(&name, shape, data));
        Ok(GraphValue(name))
    }

    /// An f32 scalar constant (shape `[]`), broadcast by the elementwise ops.
    pub fn scalar_f32(&mut self, stem: &str, v: f32) -> GraphValue {
        let name = self.fresh(stem);
        self.initializers.push(f32_tensor(&name, &[], &[v]));
        GraphValue(name)
    }

    /// A 1-D i64 constant (shapes for Reshape, axes for reductions); identical constants are
    /// stored once.
    pub fn const_i64(&mut self, stem: &str, data: &[i64]) -> GraphValue {
        if let Some(v) = self.i64_consts.get(data) {
            return v.clone();
        }
        let name = self.fresh(stem);
        let raw = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.initializers.push(TensorProto {
            name: name.clone(),
            dims: vec![data.len() as i64],
            data_type: DataType::Int64 as i32,
            raw_data: raw,
            ..Default::default()
        });
        let v = GraphValue(name);
        self.i64_consts.insert(data.to_vec(), v.clone());
        v
    }

    // ----- primitive ops ---------------------------------------------------------------------

    /// Appends one single-output node and returns its output.
    pub fn node(
        &mut self,
        op_type: &str,
        inputs: &[&GraphValue],
        attrs: Vec<AttributeProto>,
    ) -> GraphValue {
        let name = self.fresh(op_type);
        let out = format!("{name}:0");
        self.taken.insert(out.clone());
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|v| v.0.clone()).collect(),
            output: vec![out.clone()],
            name,
            op_type: op_type.to_owned(),
            attribute: attrs,
            ..Default::default()
        });
        GraphValue(out)
    }

    pub fn matmul(&mut self, a: &GraphValue, b: &GraphValue) -> GraphValue {
        self.node("MatMul", &[a, b], vec![])
    }

    pub fn add(&mut self, a: &GraphValue, b: &GraphValue) -> GraphValue {
        self.node("Add", &[a, b], vec![])
    }

    pub fn sub(&mut self, a: &GraphValue, b: &GraphValue) -> GraphValue {
        self.node("Sub", &[a, b], vec![])
    }

    pub fn mul(&mut self, a: &GraphValue, b: &GraphValue) -> GraphValue {
        self.node("Mul", &[a, b], vec![])
    }

    pub fn div(&mut self, a: &GraphValue, b: &GraphValue) -> GraphValue {
        self.node("Div", &[a, b], vec![])
    }

    pub fn sqrt(&mut self, x: &GraphValue) -> GraphValue {
        self.node("Sqrt", &[x], vec![])
    }

    pub fn erf(&mut self, x: &GraphValue) -> GraphValue {
        self.node("Erf", &[x], vec![])
    }

    pub fn sigmoid(&mut self, x: &GraphValue) -> GraphValue {
        self.node("Sigmoid", &[x], vec![])
    }

    pub fn cos(&mut self, x: &GraphValue) -> GraphValue {
        self.node("Cos", &[x], vec![])
    }

    pub fn sin(&mut self, x: &GraphValue) -> GraphValue {
        self.node("Sin", &[x], vec![])
    }

    /// Elementwise maximum (broadcasting).
    pub fn max(&mut self, a: &GraphValue, b: &GraphValue) -> GraphValue {
        self.node("Max", &[a, b], vec![])
    }

    pub fn identity(&mut self, x: &GraphValue) -> GraphValue {
        self.node("Identity", &[x], vec![])
    }

    /// Reshape to a constant target. Entries follow ONNX rules with `allowzero = 0`: `0` copies
    /// the input's size on that axis (how symbolic `batch`/`seq` survive), `-1` is inferred.
    pub fn reshape(&mut self, x: &GraphValue, shape: &[i64]) -> GraphValue {
        let s = self.const_i64("shape", shape);
        self.node("Reshape", &[x, &s], vec![])
    }

    pub fn transpose(&mut self, x: &GraphValue, perm: &[i64]) -> GraphValue {
        self.node("Transpose", &[x], vec![attr_ints("perm", perm)])
    }

    pub fn concat(&mut self, xs: &[&GraphValue], axis: i64) -> GraphValue {
        self.node("Concat", xs, vec![attr_int("axis", axis)])
    }

    /// Softmax over the last axis (opset ≥ 13 semantics: a single axis, not a flattened tail).
    pub fn softmax(&mut self, x: &GraphValue) -> GraphValue {
        self.node("Softmax", &[x], vec![attr_int("axis", -1)])
    }

    /// `LayerNormalization` over the last axis (opset 17+).
    pub fn layer_normalization(
        &mut self,
        x: &GraphValue,
        gamma: &GraphValue,
        beta: &GraphValue,
        eps: f32,
    ) -> GraphValue {
        self.node(
            "LayerNormalization",
            &[x, gamma, beta],
            vec![attr_int("axis", -1), attr_float("epsilon", eps)],
        )
    }

    /// `Gather` along axis 0: rows of `table` picked by integer `indices`.
    pub fn gather(&mut self, table: &GraphValue, indices: &GraphValue) -> GraphValue {
        self.node("Gather", &[table, indices], vec![attr_int("axis", 0)])
    }

    /// 2-D convolution without dilation; `pads` (`[top, left, bottom, right]`, ONNX's order)
    /// only when given, so unpadded convolutions keep the plain form.
    pub fn conv(
        &mut self,
        x: &GraphValue,
        w: &GraphValue,
        b: &GraphValue,
        kernel: [i64; 2],
        stride: [i64; 2],
        pads: Option<[i64; 4]>,
    ) -> GraphValue {
        let mut attrs = vec![
            attr_ints("kernel_shape", &kernel),
            attr_ints("strides", &stride),
        ];
        if let Some(pads) = pads {
            attrs.push(attr_ints("pads", &pads));
        }
        self.node("Conv", &[x, w, b], attrs)
    }

    /// Patch embedding of `x` `[B, C, S, S]` by `w` `[D, C, P, P]` + `b` `[D]` (a convolution
    /// with kernel = stride = `patch`) → tokens `[B, (S/P)², D]`, row-major over patches.
    ///
    /// Written as patches → one `MatMul`, not `Conv → Reshape → Transpose`: tract's optimiser
    /// pushes that transpose through the whole network and then runs every block channels
    /// first, where its per-channel broadcasting ops are slow (about 10 % of a denoiser call,
    /// `docs/BENCHMARKS.md`); onnxruntime runs both forms at the same speed. `w` stays the
    /// checkpoint's `[D, C, P, P]` tensor (reshaped in the graph and folded at load), so the
    /// parameter keeps its name and shape.
    pub fn patch_embed(
        &mut self,
        x: &GraphValue,
        w: &GraphValue,
        b: &GraphValue,
        [c, s, p, d]: [usize; 4],
    ) -> GraphValue {
        let (n, k) = ((s / p) as i64, (c * p * p) as i64);
        let (c, p) = (c as i64, p as i64);
        let grid = self.reshape(x, &[0, c, n, p, n, p]);
        let grid = self.transpose(&grid, &[0, 2, 4, 1, 3, 5]);
        let patches = self.reshape(&grid, &[0, n * n, k]);
        let wm = self.reshape(w, &[d as i64, k]);
        let wm = self.transpose(&wm, &[1, 0]);
        let y = self.matmul(&patches, &wm);
        self.add(&y, b)
    }

    /// `ReduceMean` with axes passed as an input (the opset-18 form).
    pub fn reduce_mean(&mut self, x: &GraphValue, axes: &[i64], keepdims: bool) -> GraphValue {
        let a = self.const_i64("axes", axes);
        self.node(
            "ReduceMean",
            &[x, &a],
            vec![attr_int("keepdims", keepdims as i64)],
        )
    }

    /// `ReduceSum` with axes passed as an input (the opset-13+ form).
    pub fn reduce_sum(&mut self, x: &GraphValue, axes: &[i64], keepdims: bool) -> GraphValue {
        let a = self.const_i64("axes", axes);
        self.node(
            "ReduceSum",
            &[x, &a],
            vec![attr_int("keepdims", keepdims as i64)],
        )
    }

    // ----- composites ------------------------------------------------------------------------

    /// `Linear(d_in→d_out)`: `x @ W + b` with `W = {prefix}.weight [d_in, d_out]` (Burn's
    /// layout, so no transpose is needed) and `b = {prefix}.bias [d_out]`.
    pub fn linear(
        &mut self,
        x: &GraphValue,
        prefix: &str,
        d_in: usize,
        d_out: usize,
    ) -> Result<GraphValue, ExportError> {
        let w = self.param(&format!("{prefix}.weight"), &[d_in, d_out])?;
        let b = self.param(&format!("{prefix}.bias"), &[d_out])?;
        Ok(self.scoped(prefix, |g| {
            let y = g.matmul(x, &w);
            g.add(&y, &b)
        }))
    }

    /// Columns `k·d_out .. (k+1)·d_out` of the `Linear(d_in → n·d_out)` at `prefix`: chunk
    /// `k` of its output, computed on its own. The DiT modulation layers produce `n` vectors
    /// (shift, scale, gate …) in one matrix; slicing the *weights* at export time gives each its
    /// own small MatMul instead of a Slice of the activations, and the parameter still counts as
    /// used by the graph.
    pub fn linear_chunk(
        &mut self,
        x: &GraphValue,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        k: usize,
        n: usize,
    ) -> Result<GraphValue, ExportError> {
        if k >= n {
            return Err(ExportError::InvalidDims(format!(
                "{prefix}: chunk {k} of {n} does not exist"
            )));
        }
        let wname = format!("{prefix}.weight");
        let bname = format!("{prefix}.bias");
        let w = self.weights.get_shaped(&wname, &[d_in, n * d_out])?;
        let b = self.weights.get_shaped(&bname, &[n * d_out])?;
        let cols = k * d_out..(k + 1) * d_out;
        let w_k: Vec<f32> = (0..d_in)
            .flat_map(|r| {
                w[r * n * d_out + cols.start..r * n * d_out + cols.end]
                    .iter()
                    .copied()
            })
            .collect();
        let b_k = b[cols].to_vec();
        self.used.insert(wname.clone());
        self.used.insert(bname);
        let w_k = self.const_f32(&format!("{wname}.chunk{k}"), &[d_in, d_out], &w_k)?;
        let b_k = self.const_f32(&format!("{prefix}.bias.chunk{k}"), &[d_out], &b_k)?;
        Ok(self.scoped(prefix, |g| {
            let y = g.matmul(x, &w_k);
            g.add(&y, &b_k)
        }))
    }

    /// LayerNorm over the last axis with `{prefix}.gamma`, `{prefix}.beta` `[d]`.
    pub fn layer_norm(
        &mut self,
        x: &GraphValue,
        prefix: &str,
        d: usize,
        eps: f32,
    ) -> Result<GraphValue, ExportError> {
        let gamma = self.param(&format!("{prefix}.gamma"), &[d])?;
        let beta = self.param(&format!("{prefix}.beta"), &[d])?;
        Ok(self.scoped(prefix, |g| g.layer_normalization(x, &gamma, &beta, eps)))
    }

    /// Exact GELU, `0.5 · x · (1 + erf(x / √2))`, spelled with core ops because the `Gelu`
    /// op only exists from opset 20.
    pub fn gelu(&mut self, x: &GraphValue) -> GraphValue {
        let sqrt2 = self.scalar_f32("sqrt2", std::f32::consts::SQRT_2);
        let one = self.scalar_f32("one", 1.0);
        let half = self.scalar_f32("half", 0.5);
        let t = self.div(x, &sqrt2);
        let t = self.erf(&t);
        let t = self.add(&t, &one);
        let t = self.mul(x, &t);
        self.mul(&t, &half)
    }

    /// `x · sigmoid(x)` (SiLU / swish), spelled with core ops.
    pub fn silu(&mut self, x: &GraphValue) -> GraphValue {
        let s = self.sigmoid(x);
        self.mul(x, &s)
    }

    /// LayerNorm over the last axis without learnt affine parameters (γ = 1, β = 0 constants).
    pub fn plain_layer_norm(
        &mut self,
        x: &GraphValue,
        d: usize,
        eps: f32,
    ) -> Result<GraphValue, ExportError> {
        let gamma = self.const_f32("ln_ones", &[d], &vec![1.0; d])?;
        let beta = self.const_f32("ln_zeros", &[d], &vec![0.0; d])?;
        Ok(self.layer_normalization(x, &gamma, &beta, eps))
    }

    /// `y / sqrt(Σ y² + 1e-12)` over the last axis (the pooled embeddings' normalisation).
    pub fn l2_normalize(&mut self, y: &GraphValue) -> GraphValue {
        let sq = self.mul(y, y);
        let ss = self.reduce_sum(&sq, &[-1], true);
        let tiny = self.scalar_f32("eps", 1e-12);
        let ss = self.add(&ss, &tiny);
        let norm = self.sqrt(&ss);
        self.div(y, &norm)
    }

    /// Additive key-padding bias `(mask − 1) · 1e9` reshaped to `[B, 1, 1, L]` from a `[B, L]`
    /// 1/0 mask (`padding_bias` in `duet-models`).
    pub fn padding_bias(&mut self, mask: &GraphValue) -> GraphValue {
        let one = self.scalar_f32("one", 1.0);
        let big = self.scalar_f32("masked", 1e9);
        let b = self.sub(mask, &one);
        let b = self.mul(&b, &big);
        self.reshape(&b, &[0, 1, 1, -1])
    }

    /// `fc2(gelu(fc1(x)))` with `fc1: d→hidden`, `fc2: hidden→d`.
    pub fn mlp(
        &mut self,
        x: &GraphValue,
        prefix: &str,
        d: usize,
        hidden: usize,
    ) -> Result<GraphValue, ExportError> {
        let h = self.linear(x, &format!("{prefix}.fc1"), d, hidden)?;
        let h = self.scoped(prefix, |g| g.gelu(&h));
        self.linear(&h, &format!("{prefix}.fc2"), hidden, d)
    }

    /// Multi-head attention with `{prefix}.{q,k,v,out}` Linears `D→D` (`D` is read from
    /// `{prefix}.q.weight`; all four must be `[D, D]`).
    ///
    /// Queries come from `q_in` `[B, Nq, D]`, keys and values from `kv_in` `[B, Nk, D]`. Heads
    /// are split with `Reshape [0, 0, H, Dh]` + `Transpose [0, 2, 1, 3]`; if `past` is given its
    /// tensors `[B, H, past, Dh]` are concatenated in front of the new keys/values on axis 2.
    /// Scores are `q @ kᵀ / √Dh (+ bias)`, softmax on the last axis, `@ v`, merged back to
    /// `[B, Nq, D]` and projected by `out`.
    pub fn mha(
        &mut self,
        q_in: &GraphValue,
        kv_in: &GraphValue,
        prefix: &str,
        n_heads: usize,
        bias: Option<&GraphValue>,
        past: Option<&PastKv>,
    ) -> Result<MhaOutput, ExportError> {
        let q_name = format!("{prefix}.q.weight");
        let d = self.weights.get(&q_name)?.0.first().copied().unwrap_or(0);
        if d == 0 || n_heads == 0 || !d.is_multiple_of(n_heads) {
            return Err(ExportError::InvalidDims(format!(
                "{prefix}: width {d} (from {q_name}) is not a positive multiple of n_heads {n_heads}"
            )));
        }
        let dh = d / n_heads;
        let q = self.linear(q_in, &format!("{prefix}.q"), d, d)?;
        let k = self.linear(kv_in, &format!("{prefix}.k"), d, d)?;
        let v = self.linear(kv_in, &format!("{prefix}.v"), d, d)?;
        let merged = self.scoped(prefix, |g| {
            let split = [0, 0, n_heads as i64, dh as i64];
            let heads = |g: &mut Self, x: &GraphValue| {
                let x = g.reshape(x, &split);
                g.transpose(&x, &[0, 2, 1, 3])
            };
            let qh = heads(g, &q);
            let mut kh = heads(g, &k);
            let mut vh = heads(g, &v);
            if let Some(p) = past {
                kh = g.concat(&[&p.key, &kh], 2);
                vh = g.concat(&[&p.value, &vh], 2);
            }
            let kt = g.transpose(&kh, &[0, 1, 3, 2]);
            let scores = g.matmul(&qh, &kt);
            let scale = g.scalar_f32("sqrt_dh", (dh as f32).sqrt());
            let mut scores = g.div(&scores, &scale);
            if let Some(b) = bias {
                scores = g.add(&scores, b);
            }
            let probs = g.softmax(&scores);
            let ctx = g.matmul(&probs, &vh);
            let ctx = g.transpose(&ctx, &[0, 2, 1, 3]);
            let ctx = g.reshape(&ctx, &[0, 0, d as i64]);
            (ctx, kh, vh)
        });
        let (ctx, k_all, v_all) = merged;
        let out = self.linear(&ctx, &format!("{prefix}.out"), d, d)?;
        Ok(MhaOutput { out, k_all, v_all })
    }

    /// Pre-norm residual step `x + f(ln(x))`, the shape of every transformer sub-block here.
    pub fn residual(
        &mut self,
        x: &GraphValue,
        f: impl FnOnce(&mut Self, &GraphValue) -> Result<GraphValue, ExportError>,
    ) -> Result<GraphValue, ExportError> {
        let y = f(self, x)?;
        Ok(self.add(x, &y))
    }

    /// Assembles the `ModelProto`.
    pub fn finish(self, graph_name: &str) -> ModelProto {
        let graph = GraphProto {
            node: self.nodes,
            name: graph_name.to_owned(),
            initializer: self.initializers,
            doc_string: self.doc.clone(),
            input: self.inputs,
            output: self.outputs,
            ..Default::default()
        };
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET_VERSION,
            }],
            producer_name: PRODUCER_NAME.to_owned(),
            producer_version: env!("CARGO_PKG_VERSION").to_owned(),
            doc_string: self.doc,
            graph: Some(graph),
            ..Default::default()
        }
    }
}

fn value_info(name: &str, dtype: DType, shape: &[Dim]) -> ValueInfoProto {
    let dim = shape
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            denotation: String::new(),
            value: Some(match d {
                Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n as i64),
                Dim::Sym(s) => tensor_shape_proto::dimension::Value::DimParam((*s).to_owned()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(TypeProto {
            denotation: String::new(),
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: dtype.onnx_code(),
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

/// f32 initializer stored as little-endian `raw_data`, the compact encoding every consumer reads.
fn f32_tensor(name: &str, shape: &[usize], data: &[f32]) -> TensorProto {
    TensorProto {
        name: name.to_owned(),
        dims: shape.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

pub(crate) fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        r#type: AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        r#type: AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}
