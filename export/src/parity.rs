//! Parity verification: every exported graph is run on onnxruntime (CPU) and on tract with the
//! same inputs as the Burn model it was built from, and its outputs are compared.
//!
//! The checks go through `duet_runtime::Engine`, the very code path the runtime serves bundles
//! with, so a graph that passes here is a graph the runtime can load and run on both backends.
//! A graph whose largest difference exceeds the tolerance is never written into a bundle.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use duet_models::caption::causal_bias;
use duet_models::{
    CaptionDecoder, CaptionModel, Denoiser, DreamQueries, FeatureRestorer, FusionHead, KvCache,
    ModelSpec, TextEncoder,
};
use duet_runtime::engine::{Engine, EngineOptions, Provider, ProviderChoice, Value};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::onnx::ExportError;

/// fp32 bound on the largest absolute output difference between Burn and each engine.
pub const FP32_TOLERANCE: f64 = 1e-4;

/// One set of graph inputs and the outputs Burn computed for them.
#[derive(Debug, Clone)]
pub struct ParityCase {
    /// What the inputs are (`real images`, `random pixels`, `kv step` …), for reports.
    pub label: String,
    pub inputs: Vec<(String, Value)>,
    /// Burn's outputs by graph output name; every one is compared.
    pub expected: Vec<(String, ArrayD<f32>)>,
}

/// Largest difference of one backend against Burn over every case and output.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendDiff {
    pub provider: Provider,
    pub max_abs_diff: f64,
    /// Output (and case) where the largest difference occurred.
    pub worst: String,
}

/// Parity of one graph on both backends.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphParity {
    pub graph: String,
    pub ort: BackendDiff,
    pub tract: BackendDiff,
    pub tolerance: f64,
    pub cases: usize,
}

impl GraphParity {
    pub fn passed(&self) -> bool {
        self.ort.max_abs_diff <= self.tolerance && self.tract.max_abs_diff <= self.tolerance
    }

    /// The manifest's record of this check.
    pub fn to_manifest(&self) -> duet_runtime::manifest::Parity {
        duet_runtime::manifest::Parity {
            ort_max_abs_diff: self.ort.max_abs_diff,
            tract_max_abs_diff: self.tract.max_abs_diff,
            tolerance: self.tolerance,
            inputs_checked: self.cases,
        }
    }
}

/// Runs `cases` through the graph at `path` on ort CPU and on tract and measures the largest
/// absolute difference to Burn's outputs. Errors when a backend cannot load or run the graph;
/// a difference above `tolerance` is reported in the result (see [`GraphParity::passed`]), not
/// as an error, so callers can print the figures before refusing the graph.
pub fn check_parity(
    graph: &str,
    path: &Path,
    cases: &[ParityCase],
    tolerance: f64,
    options: &EngineOptions,
) -> Result<GraphParity, ExportError> {
    let mut diffs = Vec::with_capacity(2);
    for provider in [Provider::OrtCpu, Provider::Tract] {
        let (engine, _) = Engine::load(path, graph, ProviderChoice::Only(provider), options)
            .map_err(|e| ExportError::Parity {
                graph: graph.to_owned(),
                reason: e.to_string(),
            })?;
        diffs.push(backend_diff(&engine, cases)?);
    }
    let tract = diffs.pop().expect("two backends were checked");
    let ort = diffs.pop().expect("two backends were checked");
    Ok(GraphParity {
        graph: graph.to_owned(),
        ort,
        tract,
        tolerance,
        cases: cases.len(),
    })
}

fn backend_diff(engine: &Engine, cases: &[ParityCase]) -> Result<BackendDiff, ExportError> {
    let graph = engine.graph().to_owned();
    let mut best = BackendDiff {
        provider: engine.provider(),
        max_abs_diff: 0.0,
        worst: String::new(),
    };
    for case in cases {
        let feed: Vec<(&str, Value)> = case
            .inputs
            .iter()
            .map(|(n, v)| (n.as_str(), v.clone()))
            .collect();
        let outputs = engine.run(&feed).map_err(|e| ExportError::Parity {
            graph: graph.clone(),
            reason: format!("{}: {e}", case.label),
        })?;
        for (name, want) in &case.expected {
            let got =
                outputs
                    .get(name)
                    .and_then(Value::as_f32)
                    .ok_or_else(|| ExportError::Parity {
                        graph: graph.clone(),
                        reason: format!("{}: output `{name}` missing or not f32", case.label),
                    })?;
            if got.shape() != want.shape() {
                return Err(ExportError::Parity {
                    graph: graph.clone(),
                    reason: format!(
                        "{}: output `{name}` has shape {:?}, Burn computed {:?}",
                        case.label,
                        got.shape(),
                        want.shape()
                    ),
                });
            }
            let d = max_abs_diff(got, want);
            if d > best.max_abs_diff || best.worst.is_empty() {
                best.max_abs_diff = d;
                best.worst = format!("{name} ({})", case.label);
            }
        }
    }
    Ok(best)
}

/// Largest `|a - b|` over two arrays of the same shape; a NaN anywhere counts as an infinite
/// difference (NaN never compares greater, so it would otherwise pass any tolerance).
pub fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| {
            let d = (f64::from(*x) - f64::from(*y)).abs();
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f64::max)
}

/// A Burn float tensor as an ndarray (row-major copy).
pub fn to_array<B: Backend, const D: usize>(t: Tensor<B, D>) -> ArrayD<f32> {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32 above");
    ArrayD::from_shape_vec(IxDyn(&shape), data).expect("Burn data fills its shape")
}

fn from_array<B: Backend, const D: usize>(a: &ArrayD<f32>, device: &B::Device) -> Tensor<B, D> {
    let data = a.as_standard_layout().iter().copied().collect::<Vec<_>>();
    Tensor::from_data(TensorData::new(data, a.shape().to_vec()), device)
}

fn ids_tensor<B: Backend>(ids: &ArrayD<i64>, device: &B::Device) -> Tensor<B, 2, Int> {
    let data = ids.iter().copied().collect::<Vec<_>>();
    Tensor::from_data(TensorData::new(data, ids.shape().to_vec()), device)
}

/// Uniform random array in `[-a, a)`.
pub fn random_array(rng: &mut ChaCha8Rng, shape: &[usize], a: f32) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(shape), |_| rng.random_range(-a..a))
}

/// Vision-encoder cases: each pixel batch `[B, 3, S, S]` with Burn's `patch_tokens` and
/// `embedding`.
pub fn vision_cases<B: Backend>(
    model: &CaptionModel<B>,
    batches: &[(String, ArrayD<f32>)],
    device: &B::Device,
) -> Vec<ParityCase> {
    batches
        .iter()
        .map(|(label, pixels)| {
            let out = model.vision.forward(from_array::<B, 4>(pixels, device));
            ParityCase {
                label: label.clone(),
                inputs: vec![("pixels".into(), Value::F32(pixels.clone()))],
                expected: vec![
                    ("patch_tokens".into(), to_array(out.patch_tokens)),
                    ("embedding".into(), to_array(out.embedding)),
                ],
            }
        })
        .collect()
}

/// Caption-decoder cases for one batch of image tokens and token sequences `[B, L]` (`L ≥ 2`):
/// - **prefill**: the whole sequence with an empty cache and a causal bias;
/// - **kv step**: the first `L - 1` tokens are run through Burn to fill the cache, then the last
///   token is fed alone with that cache (what the runtime does while decoding).
///
/// Every output is compared: the logits and every `present_*` tensor.
pub fn decoder_cases<B: Backend>(
    model: &CaptionModel<B>,
    label: &str,
    image_tokens: &ArrayD<f32>,
    ids: &ArrayD<i64>,
    device: &B::Device,
) -> Vec<ParityCase> {
    let (b, l) = (ids.shape()[0], ids.shape()[1]);
    assert!(l >= 2, "decoder parity needs at least two tokens");
    let img = from_array::<B, 3>(image_tokens, device);
    let positions =
        |from: usize, n: usize| ArrayD::from_shape_fn(IxDyn(&[b, n]), |ix| (from + ix[1]) as i64);
    let bias_array = |seq: usize, past: usize| {
        let t = causal_bias::<B>(seq, past, device).expand([b, 1, seq, past + seq]);
        to_array(t)
    };
    let cfg_layers = model.decoder.blocks.len();
    let heads = model.decoder.blocks[0].self_attn.n_heads;
    let dh = image_tokens.shape()[2] / heads;
    let empty = ArrayD::<f32>::zeros(IxDyn(&[b, heads, 0, dh]));

    let case = |label: String,
                ids: ArrayD<i64>,
                pos: ArrayD<i64>,
                bias: ArrayD<f32>,
                past: Option<&KvCache<B>>| {
        let (logits, present) = model.decoder.forward_step(
            ids_tensor::<B>(&ids, device),
            ids_tensor::<B>(&pos, device),
            from_array::<B, 4>(&bias, device),
            img.clone(),
            past,
        );
        let mut inputs = vec![
            ("input_ids".to_owned(), Value::I64(ids)),
            ("position_ids".to_owned(), Value::I64(pos)),
            ("attn_bias".to_owned(), Value::F32(bias)),
            ("image_tokens".to_owned(), Value::F32(image_tokens.clone())),
        ];
        for layer in 0..cfg_layers {
            let (k, v) = match past {
                Some(c) => (
                    to_array(c.keys[layer].clone()),
                    to_array(c.values[layer].clone()),
                ),
                None => (empty.clone(), empty.clone()),
            };
            inputs.push((format!("past_key_{layer}"), Value::F32(k)));
            inputs.push((format!("past_value_{layer}"), Value::F32(v)));
        }
        let mut expected = vec![("logits".to_owned(), to_array(logits))];
        for layer in 0..cfg_layers {
            expected.push((
                format!("present_key_{layer}"),
                to_array(present.keys[layer].clone()),
            ));
            expected.push((
                format!("present_value_{layer}"),
                to_array(present.values[layer].clone()),
            ));
        }
        ParityCase {
            label,
            inputs,
            expected,
        }
    };

    let prefill = case(
        format!("{label}, prefill of {l} tokens"),
        ids.clone(),
        positions(0, l),
        bias_array(l, 0),
        None,
    );
    // Fill the cache with the first l-1 tokens in Burn, then step with the last one.
    let head = ids.slice(ndarray::s![.., ..l - 1]).to_owned().into_dyn();
    let (_, cache) = model.decoder.forward_step(
        ids_tensor::<B>(&head, device),
        ids_tensor::<B>(&positions(0, l - 1), device),
        from_array::<B, 4>(&bias_array(l - 1, 0), device),
        img.clone(),
        None,
    );
    let last = ids.slice(ndarray::s![.., l - 1..]).to_owned().into_dyn();
    let step = case(
        format!("{label}, kv step at position {}", l - 1),
        last,
        positions(l - 1, 1),
        bias_array(1, l - 1),
        Some(&cache),
    );
    vec![prefill, step]
}

/// Text-encoder cases: token ids and 1/0 masks `[B, max_len]` with Burn's `text_tokens` and
/// `text_embedding`.
pub fn text_cases<B: Backend>(
    text: &TextEncoder<B>,
    batches: &[(String, ArrayD<i64>, ArrayD<f32>)],
    device: &B::Device,
) -> Vec<ParityCase> {
    batches
        .iter()
        .map(|(label, ids, mask)| {
            let out = text.forward(
                ids_tensor::<B>(ids, device),
                from_array::<B, 2>(mask, device),
            );
            ParityCase {
                label: label.clone(),
                inputs: vec![
                    ("input_ids".into(), Value::I64(ids.clone())),
                    ("attn_mask".into(), Value::F32(mask.clone())),
                ],
                expected: vec![
                    ("text_tokens".into(), to_array(out.tokens)),
                    ("text_embedding".into(), to_array(out.embedding)),
                ],
            }
        })
        .collect()
}

/// One batch of dream-encoder inputs.
#[derive(Debug, Clone)]
pub struct DreamInputs {
    pub label: String,
    /// `[B, max_len]` `[BOS]` + prompt ids and their 1/0 mask.
    pub ids: ArrayD<i64>,
    pub mask: ArrayD<f32>,
    /// `[B, P, D]`.
    pub image_tokens: ArrayD<f32>,
}

/// Dream-encoder cases with Burn's `dream_tokens`.
pub fn dream_cases<B: Backend>(
    decoder: &CaptionDecoder<B>,
    queries: &DreamQueries<B>,
    batches: &[DreamInputs],
    device: &B::Device,
) -> Vec<ParityCase> {
    batches
        .iter()
        .map(
            |DreamInputs {
                 label,
                 ids,
                 mask,
                 image_tokens,
             }| {
                let out = queries.forward(
                    decoder,
                    ids_tensor::<B>(ids, device),
                    from_array::<B, 2>(mask, device),
                    from_array::<B, 3>(image_tokens, device),
                );
                ParityCase {
                    label: label.clone(),
                    inputs: vec![
                        ("input_ids".into(), Value::I64(ids.clone())),
                        ("attn_mask".into(), Value::F32(mask.clone())),
                        ("image_tokens".into(), Value::F32(image_tokens.clone())),
                    ],
                    expected: vec![("dream_tokens".into(), to_array(out))],
                }
            },
        )
        .collect()
}

/// Inputs of one denoiser evaluation.
#[derive(Debug, Clone)]
pub struct DenoiserInputs {
    pub label: String,
    /// `[B, C, S, S]` noisy images.
    pub x: ArrayD<f32>,
    /// `[B]` timesteps (integers as floats).
    pub timestep: ArrayD<f32>,
    /// `[B, L, D]` text features and their `[B, L]` mask.
    pub text_tokens: ArrayD<f32>,
    pub text_mask: ArrayD<f32>,
}

/// Denoiser cases with Burn's `prediction`.
pub fn denoiser_cases<B: Backend>(
    cfg: &ModelSpec,
    denoiser: &Denoiser<B>,
    batches: &[DenoiserInputs],
    device: &B::Device,
) -> Vec<ParityCase> {
    batches
        .iter()
        .map(|c| {
            let out = denoiser.forward(
                cfg,
                from_array::<B, 4>(&c.x, device),
                from_array::<B, 1>(&c.timestep, device),
                from_array::<B, 3>(&c.text_tokens, device),
                from_array::<B, 2>(&c.text_mask, device),
            );
            ParityCase {
                label: c.label.clone(),
                inputs: vec![
                    ("x".into(), Value::F32(c.x.clone())),
                    ("timestep".into(), Value::F32(c.timestep.clone())),
                    ("text_tokens".into(), Value::F32(c.text_tokens.clone())),
                    ("text_mask".into(), Value::F32(c.text_mask.clone())),
                ],
                expected: vec![("prediction".into(), to_array(out))],
            }
        })
        .collect()
}

/// Inputs of one restorer evaluation.
#[derive(Debug, Clone)]
pub struct RestorerInputs {
    pub label: String,
    /// `[B, E]` samples in the standardised space.
    pub x: ArrayD<f32>,
    /// `[B]` timesteps (integers as floats).
    pub timestep: ArrayD<f32>,
    /// `[B, E]` raw embeddings of the present modality.
    pub condition: ArrayD<f32>,
}

/// Restorer cases (the full model: step gate and trust gate) with Burn's `prediction`,
/// `trust` and `restored` (`blend(unstandardise(x))`, what the trainer hands the head).
pub fn restorer_cases<B: Backend>(
    restorer: &FeatureRestorer<B>,
    batches: &[RestorerInputs],
    device: &B::Device,
) -> Vec<ParityCase> {
    batches
        .iter()
        .map(|c| {
            let x = from_array::<B, 2>(&c.x, device);
            let cond = from_array::<B, 2>(&c.condition, device);
            let prediction = restorer.forward(
                x.clone(),
                from_array::<B, 1>(&c.timestep, device),
                cond.clone(),
                true,
            );
            let trust = restorer.trust(cond.clone(), true);
            let restored = restorer.blend(restorer.unstandardise(x), cond, true);
            ParityCase {
                label: c.label.clone(),
                inputs: vec![
                    ("x".into(), Value::F32(c.x.clone())),
                    ("timestep".into(), Value::F32(c.timestep.clone())),
                    ("condition".into(), Value::F32(c.condition.clone())),
                ],
                expected: vec![
                    ("prediction".into(), to_array(prediction)),
                    ("trust".into(), to_array(trust)),
                    ("restored".into(), to_array(restored)),
                ],
            }
        })
        .collect()
}

/// Fusion-head cases: pairs of embedding batches `[B, E]` with Burn's `logits`.
pub fn fusion_head_cases<B: Backend>(
    head: &FusionHead<B>,
    batches: &[(String, ArrayD<f32>, ArrayD<f32>)],
    device: &B::Device,
) -> Vec<ParityCase> {
    batches
        .iter()
        .map(|(label, image, text)| {
            let logits = head.forward(
                from_array::<B, 2>(image, device),
                from_array::<B, 2>(text, device),
            );
            ParityCase {
                label: label.clone(),
                inputs: vec![
                    ("image_embedding".into(), Value::F32(image.clone())),
                    ("text_embedding".into(), Value::F32(text.clone())),
                ],
                expected: vec![("logits".into(), to_array(logits))],
            }
        })
        .collect()
}

/// Seeded random token ids in `[0, vocab)`, shape `[b, l]`.
pub fn random_ids(rng: &mut ChaCha8Rng, b: usize, l: usize, vocab: usize) -> ArrayD<i64> {
    ArrayD::from_shape_fn(IxDyn(&[b, l]), |_| rng.random_range(0..vocab as i64))
}

/// The random generator every parity input is drawn from, so the recorded figures are
/// reproducible.
pub fn parity_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Parity results of a bundle by graph name.
pub type ParityTable = BTreeMap<String, GraphParity>;
