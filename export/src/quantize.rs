//! Compressed copies of exported graphs: fp16 weight storage and int8 matrix products.
//!
//! Both are rewrites of a finished ONNX graph (so an existing bundle can gain a variant without
//! its training run), keeping the graph's inputs and outputs, and plain opset 18:
//!
//! - **fp16**: every f32 initializer of at least [`MIN_CONVERTED_ELEMENTS`] values is stored as
//!   IEEE half and widened back by a `Cast` node. Both engines fold the `Cast` of a constant
//!   when the graph loads, so the arithmetic stays f32: half the download, the same speed, and
//!   results within fp16 rounding of the weights. A tensor with a value fp16 cannot hold (over
//!   65504 in magnitude) stays f32.
//! - **int8**: the weight `W [K, N]` of every `MatMul` whose second input is a constant is
//!   stored as int8, symmetric, one scale per output column (`s_n = max_k |W_kn| / 127`), and
//!   the product is done in integers: `DynamicQuantizeLinear` turns the activation into u8 with
//!   a scale and zero point computed at run time (once per activation, shared by the Q/K/V
//!   projections that read it), `MatMulInteger` multiplies, and the i32 result is scaled back
//!   by `a_scale · s_n`. This is the form onnxruntime fuses into one `DynamicQuantizeMatMul`
//!   kernel (its own `quantize_dynamic` writes the same nodes); tract runs it too, as integer
//!   einsums. The token-embedding table of a `Gather` is stored as int8 rows with one scale per
//!   row, dequantised after the lookup (only the looked-up rows are widened). Everything else
//!   — LayerNorm, biases, the patch convolution, attention between activations — stays f32.
//!
//! Written by hand over tract-onnx's protobuf types, like the graph builder: no Rust crate
//! rewrites ONNX graphs, and the two passes are a few loops over nodes and initializers.

use std::collections::{BTreeSet, HashMap, HashSet};

use half::f16;
use prost::Message;
use tract_onnx::pb::{tensor_proto::DataType, ModelProto, NodeProto, TensorProto};

use duet_runtime::engine::{Engine, EngineOptions, Provider, ProviderChoice, Value};
pub use duet_runtime::manifest::{Precision, VariantAgreement};

use crate::onnx::builder::attr_int;
use crate::onnx::ExportError;

/// Initializers smaller than this stay f32 in the fp16 variant: scalars and short vectors save
/// nothing worth a `Cast` node each, and they are the constants (scales, epsilons, axes
/// companions) where a rounded value shifts every output.
pub const MIN_CONVERTED_ELEMENTS: usize = 64;

/// The largest magnitude an IEEE half holds.
const F16_MAX: f32 = 65504.0;

/// What one rewrite changed, for reports and the manifest's `method`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantizeReport {
    /// Initializers stored at the lower precision.
    pub converted: usize,
    /// Initializers kept in f32, with why (too small, out of fp16 range, not a matrix weight).
    pub kept: usize,
    /// `MatMul`s rewritten to integer products (int8).
    pub matmuls: usize,
    /// `Gather` tables stored as int8 rows (int8).
    pub gathers: usize,
    /// Serialised size before and after, in bytes.
    pub bytes_before: usize,
    pub bytes_after: usize,
}

/// The variant of the graph in `bytes` at `precision` (fp32 returns the bytes unchanged).
pub fn quantize_graph(
    bytes: &[u8],
    precision: Precision,
    graph: &str,
) -> Result<(Vec<u8>, QuantizeReport), ExportError> {
    let mut report = QuantizeReport {
        bytes_before: bytes.len(),
        ..QuantizeReport::default()
    };
    if precision == Precision::Fp32 {
        report.bytes_after = bytes.len();
        return Ok((bytes.to_vec(), report));
    }
    let fail = |reason: String| ExportError::Quantize {
        graph: graph.to_owned(),
        reason,
    };
    let mut model =
        ModelProto::decode(bytes).map_err(|e| fail(format!("not an ONNX model: {e}")))?;
    // The rewrite writes Unsqueeze with axes as an input (opset >= 13) and does not follow
    // reads from inside subgraphs (If, Loop, Scan): such graphs are refused, not broken.
    let opset = model
        .opset_import
        .iter()
        .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .max()
        .unwrap_or(0);
    if opset < 13 {
        return Err(fail(format!(
            "default-domain opset {opset}; the variants need opset 13 or later"
        )));
    }
    let g = model
        .graph
        .as_mut()
        .ok_or_else(|| fail("the model has no graph".into()))?;
    if g.node.iter().any(|n| {
        n.attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
    }) {
        return Err(fail(
            "graphs with subgraphs (If, Loop, Scan) are not supported".into(),
        ));
    }
    let mut names = Names::of(g);
    match precision {
        Precision::Fp32 => unreachable!("returned above"),
        Precision::Fp16 => to_fp16(g, &mut names, &mut report).map_err(fail)?,
        Precision::Int8 => to_int8(g, &mut names, &mut report).map_err(fail)?,
    }
    let out = model.encode_to_vec();
    report.bytes_after = out.len();
    Ok((out, report))
}

/// Every tensor and node name of a graph, to mint new ones that collide with none.
struct Names(HashSet<String>);

impl Names {
    fn of(g: &tract_onnx::pb::GraphProto) -> Names {
        let mut set = HashSet::new();
        set.extend(g.initializer.iter().map(|t| t.name.clone()));
        set.extend(g.input.iter().map(|v| v.name.clone()));
        set.extend(g.output.iter().map(|v| v.name.clone()));
        for n in &g.node {
            set.insert(n.name.clone());
            set.extend(n.input.iter().cloned());
            set.extend(n.output.iter().cloned());
        }
        Names(set)
    }

    /// `stem`, or `stem_2`, `stem_3`, … : the first not taken, now taken.
    fn fresh(&mut self, stem: &str) -> String {
        let mut name = stem.to_owned();
        let mut k = 2;
        while self.0.contains(&name) {
            name = format!("{stem}_{k}");
            k += 1;
        }
        self.0.insert(name.clone());
        name
    }
}

/// The f32 values of an initializer (raw little-endian bytes or `float_data`), or `None` for
/// another element type.
fn f32_values(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != DataType::Float as i32 {
        return None;
    }
    if !t.raw_data.is_empty() {
        Some(
            t.raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )
    } else {
        Some(t.float_data.clone())
    }
}

/// The element count the dims declare, checked against the data actually held.
fn checked_len(t: &TensorProto, values: &[f32]) -> Result<usize, String> {
    let n = t
        .dims
        .iter()
        .try_fold(1usize, |acc, &d| {
            usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        })
        .ok_or_else(|| format!("initializer `{}` has bad dims {:?}", t.name, t.dims))?;
    if n != values.len() {
        return Err(format!(
            "initializer `{}` declares {n} values and holds {}",
            t.name,
            values.len()
        ));
    }
    Ok(n)
}

fn tensor(name: String, dims: Vec<i64>, data_type: DataType, raw_data: Vec<u8>) -> TensorProto {
    TensorProto {
        name,
        dims,
        data_type: data_type as i32,
        raw_data,
        ..Default::default()
    }
}

fn node(op: &str, name: String, inputs: Vec<String>, outputs: Vec<String>) -> NodeProto {
    NodeProto {
        op_type: op.to_owned(),
        name,
        input: inputs,
        output: outputs,
        ..Default::default()
    }
}

/// `Cast(x) → out` to f32.
fn cast_to_f32(names: &mut Names, x: String, out: String) -> NodeProto {
    let mut n = node(
        "Cast",
        names.fresh(&format!("{out}/cast")),
        vec![x],
        vec![out],
    );
    n.attribute.push(attr_int("to", DataType::Float as i64));
    n
}

/// fp16 storage: f32 initializers become half, widened by a `Cast` named as the original so
/// every consumer is untouched.
fn to_fp16(
    g: &mut tract_onnx::pb::GraphProto,
    names: &mut Names,
    report: &mut QuantizeReport,
) -> Result<(), String> {
    let mut casts = Vec::new();
    // An initializer that is also a graph input is a default a caller may override: kept.
    let inputs: HashSet<String> = g.input.iter().map(|i| i.name.clone()).collect();
    for t in g.initializer.iter_mut() {
        if inputs.contains(&t.name) {
            report.kept += 1;
            continue;
        }
        let Some(values) = f32_values(t) else {
            report.kept += 1;
            continue;
        };
        let n = checked_len(t, &values)?;
        let representable = values.iter().all(|v| v.is_finite() && v.abs() <= F16_MAX);
        if n < MIN_CONVERTED_ELEMENTS || !representable {
            report.kept += 1;
            continue;
        }
        let original = std::mem::take(&mut t.name);
        let half_name = names.fresh(&format!("{original}.fp16"));
        *t = tensor(
            half_name.clone(),
            std::mem::take(&mut t.dims),
            DataType::Float16,
            values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
        );
        casts.push(cast_to_f32(names, half_name, original));
        report.converted += 1;
    }
    // Initializers are defined before any node runs, so the casts can lead the node list.
    casts.append(&mut g.node);
    g.node = casts;
    Ok(())
}

/// Largest code of a `MatMulInteger` weight: 7 bits, not 8. onnxruntime's u8 × s8 kernels on
/// x86 CPUs without VNNI (AVX2) add pairs of products in saturating 16-bit lanes; with codes up
/// to ±127 against activations up to 255 a pair reaches 64,770 and clips (measured on an AMD
/// EPYC with AVX2 only: a tiny decoder's int8 output off by 27 % of its range on onnxruntime,
/// 0.9 % on tract). With ±63 a pair stays under 32,767 on every CPU, as onnxruntime's own
/// quantiser does with `reduce_range` for such machines; the cost is one bit of weight
/// precision, per output channel.
pub const MATMUL_MAX_CODE: f32 = 63.0;
/// Largest code of an int8 `Gather` table (dequantised before use: no integer products).
pub const TABLE_MAX_CODE: f32 = 127.0;

/// Symmetric int8 of `values` laid out as `rows × cols`, one scale per column (`per_column`)
/// or per row, codes in `-max_code..=max_code`; an all-zero line gets scale 1 (its codes are
/// 0 either way).
fn quantize_symmetric(
    values: &[f32],
    rows: usize,
    cols: usize,
    per_column: bool,
    max_code: f32,
) -> (Vec<i8>, Vec<f32>) {
    let lines = if per_column { cols } else { rows };
    let mut scale = vec![0f32; lines];
    for (i, &v) in values.iter().enumerate() {
        let line = if per_column { i % cols } else { i / cols };
        scale[line] = scale[line].max(v.abs());
    }
    for s in &mut scale {
        *s = if *s > 0.0 { *s / max_code } else { 1.0 };
    }
    let codes = values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let line = if per_column { i % cols } else { i / cols };
            (v / scale[line]).round().clamp(-max_code, max_code) as i8
        })
        .collect();
    (codes, scale)
}

fn i8_bytes(codes: &[i8]) -> Vec<u8> {
    codes.iter().map(|&c| c as u8).collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// int8: constant `MatMul` weights to integer products, `Gather` tables to int8 rows.
fn to_int8(
    g: &mut tract_onnx::pb::GraphProto,
    names: &mut Names,
    report: &mut QuantizeReport,
) -> Result<(), String> {
    let index: HashMap<String, usize> = g
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    // How each initializer is used: only one read by nothing but MatMul B inputs (or Gather
    // tables) may be replaced; anything else reading it needs the f32 values.
    let mut uses: HashMap<&str, BTreeSet<(&str, usize)>> = HashMap::new();
    for n in &g.node {
        // Only the forms the rewrite handles count as MatMul/Gather reads: one output, and for
        // Gather the default axis 0; any other form is "another use" that keeps f32 values.
        let handled = n.output.len() == 1
            && (n.op_type != "Gather" || n.attribute.iter().all(|a| a.name != "axis" || a.i == 0));
        let op = if handled { n.op_type.as_str() } else { "other" };
        for (slot, i) in n.input.iter().enumerate() {
            uses.entry(i.as_str()).or_default().insert((op, slot));
        }
    }
    // Initializers that are also graph inputs are defaults a caller may override: kept.
    let graph_io: HashSet<&str> = g
        .output
        .iter()
        .chain(&g.input)
        .map(|o| o.name.as_str())
        .collect();
    let only = |name: &str, op: &str, slot: usize| {
        !graph_io.contains(name)
            && uses
                .get(name)
                .is_some_and(|u| u.iter().all(|&(o, s)| o == op && s == slot))
    };
    let rank2 = |name: &str| {
        index.get(name).map(|&i| &g.initializer[i]).filter(|t| {
            // Empty weights are skipped: nothing to save, and their other dim (unbounded
            // when the product is 0) must not size an allocation.
            t.dims.len() == 2
                && t.dims.iter().all(|&d| d > 0)
                && t.data_type == DataType::Float as i32
        })
    };
    let matmul_weights: BTreeSet<String> = g
        .node
        .iter()
        .filter(|n| n.op_type == "MatMul" && n.input.len() == 2)
        .map(|n| n.input[1].clone())
        .filter(|w| rank2(w).is_some() && only(w, "MatMul", 1))
        .collect();
    let gather_tables: BTreeSet<String> = g
        .node
        .iter()
        .filter(|n| n.op_type == "Gather" && n.input.len() == 2)
        .filter(|n| n.attribute.iter().all(|a| a.name != "axis" || a.i == 0))
        .map(|n| n.input[0].clone())
        .filter(|w| rank2(w).is_some() && only(w, "Gather", 0))
        .collect();

    // The replacements of the weights: codes (+ zero points for MatMulInteger) and scales.
    struct Quantized {
        codes: String,
        zero_point: Option<String>,
        scale: String,
    }
    let mut quantized: HashMap<String, Quantized> = HashMap::new();
    let mut new_inits = Vec::new();
    for name in matmul_weights.iter().chain(&gather_tables) {
        let t = &g.initializer[index[name]];
        let values = f32_values(t).expect("rank2 checked the type");
        checked_len(t, &values)?;
        let (rows, cols) = (t.dims[0] as usize, t.dims[1] as usize);
        let per_column = matmul_weights.contains(name);
        let max_code = if per_column {
            MATMUL_MAX_CODE
        } else {
            TABLE_MAX_CODE
        };
        let (codes, scale) = quantize_symmetric(&values, rows, cols, per_column, max_code);
        let codes_name = names.fresh(&format!("{name}.int8"));
        let scale_name = names.fresh(&format!("{name}.scale"));
        new_inits.push(tensor(
            codes_name.clone(),
            t.dims.clone(),
            DataType::Int8,
            i8_bytes(&codes),
        ));
        new_inits.push(tensor(
            scale_name.clone(),
            vec![scale.len() as i64],
            DataType::Float,
            f32_bytes(&scale),
        ));
        let zero_point = per_column.then(|| {
            let zp = names.fresh(&format!("{name}.zero_point"));
            new_inits.push(tensor(
                zp.clone(),
                vec![cols as i64],
                DataType::Int8,
                vec![0u8; cols],
            ));
            zp
        });
        quantized.insert(
            name.clone(),
            Quantized {
                codes: codes_name,
                zero_point,
                scale: scale_name,
            },
        );
    }
    if quantized.is_empty() {
        return Ok(());
    }

    // Activation → its (u8 codes, scale, zero point), one DynamicQuantizeLinear each.
    let mut activations: HashMap<String, [String; 3]> = HashMap::new();
    let mut nodes = Vec::with_capacity(g.node.len() * 2);
    for n in std::mem::take(&mut g.node) {
        let one_output = n.output.len() == 1;
        let is_matmul = n.op_type == "MatMul" && n.input.len() == 2 && one_output;
        let is_gather = n.op_type == "Gather" && n.input.len() == 2 && one_output;
        match (is_matmul, is_gather) {
            (true, _) if quantized.contains_key(&n.input[1]) => {
                let q = &quantized[&n.input[1]];
                let a = &n.input[0];
                let y = &n.output[0];
                let [a_q, a_scale, a_zp] = match activations.get(a) {
                    Some(v) => v.clone(),
                    None => {
                        let v = [
                            names.fresh(&format!("{a}.u8")),
                            names.fresh(&format!("{a}.u8_scale")),
                            names.fresh(&format!("{a}.u8_zero_point")),
                        ];
                        nodes.push(node(
                            "DynamicQuantizeLinear",
                            names.fresh(&format!("{a}/quantize")),
                            vec![a.clone()],
                            v.to_vec(),
                        ));
                        activations.insert(a.clone(), v.clone());
                        v
                    }
                };
                let product = names.fresh(&format!("{y}.i32"));
                let widened = names.fresh(&format!("{y}.i32_f32"));
                let scale = names.fresh(&format!("{y}.scale"));
                let zp = q
                    .zero_point
                    .clone()
                    .expect("matmul weights have zero points");
                nodes.push(node(
                    "MatMulInteger",
                    names.fresh(&format!("{}/int8", n.name)),
                    vec![a_q, q.codes.clone(), a_zp, zp],
                    vec![product.clone()],
                ));
                nodes.push(cast_to_f32(names, product, widened.clone()));
                nodes.push(node(
                    "Mul",
                    names.fresh(&format!("{}/scales", n.name)),
                    vec![a_scale, q.scale.clone()],
                    vec![scale.clone()],
                ));
                nodes.push(node(
                    "Mul",
                    names.fresh(&format!("{}/dequantize", n.name)),
                    vec![widened, scale],
                    vec![y.clone()],
                ));
                report.matmuls += 1;
            }
            (_, true) if quantized.contains_key(&n.input[0]) => {
                // Rows looked up as int8 and widened with their own scales:
                // y = Cast(Gather(codes, ids)) · Unsqueeze(Gather(scale, ids), -1).
                let q = &quantized[&n.input[0]];
                let ids = &n.input[1];
                let y = &n.output[0];
                let rows = names.fresh(&format!("{y}.int8"));
                let rows_f = names.fresh(&format!("{y}.int8_f32"));
                let row_scale = names.fresh(&format!("{y}.row_scale"));
                let row_scale_col = names.fresh(&format!("{y}.row_scale_col"));
                let last_axis = names.fresh(&format!("{y}.last_axis"));
                new_inits.push(tensor(
                    last_axis.clone(),
                    vec![1],
                    DataType::Int64,
                    (-1i64).to_le_bytes().to_vec(),
                ));
                nodes.push(node(
                    "Gather",
                    names.fresh(&format!("{}/int8", n.name)),
                    vec![q.codes.clone(), ids.clone()],
                    vec![rows.clone()],
                ));
                nodes.push(cast_to_f32(names, rows, rows_f.clone()));
                nodes.push(node(
                    "Gather",
                    names.fresh(&format!("{}/row_scale", n.name)),
                    vec![q.scale.clone(), ids.clone()],
                    vec![row_scale.clone()],
                ));
                nodes.push(node(
                    "Unsqueeze",
                    names.fresh(&format!("{}/row_scale_col", n.name)),
                    vec![row_scale, last_axis],
                    vec![row_scale_col.clone()],
                ));
                nodes.push(node(
                    "Mul",
                    names.fresh(&format!("{}/dequantize", n.name)),
                    vec![rows_f, row_scale_col],
                    vec![y.clone()],
                ));
                report.gathers += 1;
            }
            _ => nodes.push(n),
        }
    }
    g.node = nodes;
    let replaced: HashSet<&String> = quantized.keys().collect();
    let before = g.initializer.len();
    g.initializer.retain(|t| !replaced.contains(&t.name));
    report.converted = before - g.initializer.len();
    report.kept = g.initializer.len();
    g.initializer.extend(new_inits);
    Ok(())
}

/// The largest max |variant − fp32| accepted, as a fraction of the largest |fp32 output|.
pub const MAX_RELATIVE_DISAGREEMENT: f64 = 0.5;

/// The axis sizes the agreement check feeds: two sequences, three new tokens after two cached
/// ones (so the decoder's KV path is exercised, not only its first step).
pub const AGREEMENT_DIMS: [(&str, usize); 4] =
    [("batch", 2), ("seq", 3), ("past", 2), ("total", 5)];

/// How far `variant`'s outputs are from `fp32`'s on both engines, on the runtime's fixed sample
/// inputs of [`AGREEMENT_DIMS`] (the same on both graphs: their inputs are identical).
/// Informational: a variant is judged by its task metrics, but a variant that does not load
/// on an engine, or whose outputs are not finite, is refused here.
pub fn variant_agreement(
    graph: &str,
    fp32: &std::sync::Arc<[u8]>,
    variant: &std::sync::Arc<[u8]>,
    options: &EngineOptions,
) -> Result<VariantAgreement, ExportError> {
    let fail = |reason: String| ExportError::Quantize {
        graph: graph.to_owned(),
        reason,
    };
    let dims: Vec<(String, usize)> = AGREEMENT_DIMS
        .iter()
        .map(|&(n, v)| (n.to_owned(), v))
        .collect();
    let mut diffs = [0f64; 2];
    let mut scale = 0f64;
    for (slot, provider) in [Provider::OrtCpu, Provider::Tract].into_iter().enumerate() {
        let load = |bytes: &std::sync::Arc<[u8]>, what: &str| {
            Engine::load_bytes(
                std::sync::Arc::clone(bytes),
                &format!("{graph} ({what})"),
                ProviderChoice::Only(provider),
                options,
            )
            .map(|(e, _)| e)
            .map_err(|e| fail(format!("{what} on {provider}: {e}")))
        };
        let (reference, candidate) = (load(fp32, "fp32")?, load(variant, "variant")?);
        let feed = reference
            .sample_inputs(&dims)
            .map_err(|e| fail(e.to_string()))?;
        let feed: Vec<(&str, Value)> = feed.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
        let want = reference.run(&feed).map_err(|e| fail(e.to_string()))?;
        let got = candidate.run(&feed).map_err(|e| fail(e.to_string()))?;
        for (name, w) in &want {
            let Some(w) = w.as_f32() else { continue };
            let Some(g) = got.get(name).and_then(Value::as_f32) else {
                return Err(fail(format!(
                    "output `{name}` is missing or not f32 in the variant on {provider}"
                )));
            };
            if w.shape() != g.shape() {
                return Err(fail(format!(
                    "output `{name}` has shape {:?} on {provider}, fp32 {:?}",
                    g.shape(),
                    w.shape()
                )));
            }
            for (a, b) in w.iter().zip(g.iter()) {
                if !a.is_finite() || !b.is_finite() {
                    return Err(fail(format!(
                        "output `{name}` is not finite on {provider} (fp32 {a}, variant {b})"
                    )));
                }
                diffs[slot] = diffs[slot].max(f64::from((a - b).abs()));
                scale = scale.max(f64::from(a.abs()));
            }
        }
    }
    // A variant off by half the outputs' scale is broken (a wrong scale, a mangled layout),
    // whatever its task metrics would say; measured variants sit at most at 2.3 % (int8) and
    // 0.1 % (fp16) of it on the shipped bundle.
    let worst = diffs[0].max(diffs[1]);
    if worst > MAX_RELATIVE_DISAGREEMENT * scale.max(f64::MIN_POSITIVE) {
        return Err(fail(format!(
            "max |variant - fp32| {worst:.3e} is over {MAX_RELATIVE_DISAGREEMENT} of the outputs' \
             scale {scale:.3e}"
        )));
    }
    Ok(VariantAgreement {
        ort_max_abs_diff: diffs[0],
        tract_max_abs_diff: diffs[1],
        fp32_max_abs: scale,
        inputs_checked: 1,
    })
}

pub mod evaluate;
pub mod variants;

#[cfg(test)]
mod tests;
