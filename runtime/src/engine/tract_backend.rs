//! tract backend (pure Rust, always available).
//!
//! The ONNX model is parsed once, typed and optimised with its symbolic axes (`batch`, `seq`,
//! `past`, …) left symbolic, and turned into a runnable plan; tract resolves the symbols from
//! the concrete input shapes on every run, so one plan serves every batch size and every decode
//! step, including the first one whose KV-cache inputs have a zero-length `past` axis.
//!
//! Zero-length `past` needed no workaround in tract 0.23: `Concat` of a `[B, H, 0, Dh]` cache
//! with the new `[B, H, seq, Dh]` keys, and the `[B, 1, seq, total]` bias broadcast against
//! `[B, H, seq, past + seq]` scores, resolve at run time (tract keeps `total` and `past + seq` as
//! a symbolic broadcast and checks them on concrete shapes). `tests/engine.rs`
//! (`zero_length_cache_axis_on_tract_and_ort`) and `tests/caption.rs` (KV vs full recompute)
//! pin this down, so a tract upgrade that breaks it fails loudly; the fallback would be to
//! concretise the symbols per input-shape signature and cache one plan per signature.
//!
//! Graphs from other exporters often leave a dynamic axis with neither a size nor a name. tract
//! cannot type such a graph (an unknown axis flowing into `Shape`/`Reshape`), so it would refuse
//! a graph onnxruntime runs. For those the engine keeps the parsed model and builds one plan
//! per input-shape signature on first use (the input facts set to the concrete shapes), caching
//! the most recent [`PLAN_CACHE`] signatures.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use super::{IoInfo, Value, ValueView};
use crate::manifest::DType;

pub(super) struct TractEngine {
    plans: Plans,
    /// The matrix-product thread pool of this engine's runs (`None`: single-threaded).
    executor: Option<Executor>,
    inputs: Vec<IoInfo>,
    outputs: Vec<String>,
}

/// Specialised plans kept per engine: a caller alternating among a few input shapes (batch
/// sizes, the two KV-cache phases) reuses them; a caller sweeping shapes rebuilds, with memory
/// bounded.
pub(super) const PLAN_CACHE: usize = 8;

type ShapeSignature = Vec<Vec<usize>>;

enum Plans {
    /// One plan, typed with the graph's symbolic axes, for every input shape.
    Symbolic(Arc<TypedRunnableModel>),
    /// The graph cannot be typed before its input shapes are known: plans built per input
    /// shape signature, most recently used last.
    PerShape {
        model: Box<InferenceModel>,
        cache: Mutex<VecDeque<(ShapeSignature, Arc<TypedRunnableModel>)>>,
    },
}

fn dtype_of(dt: Option<DatumType>) -> Option<DType> {
    match dt {
        Some(DatumType::F32) => Some(DType::F32),
        Some(DatumType::I64) => Some(DType::I64),
        _ => None,
    }
}

impl TractEngine {
    /// Nodes of the optimised plan (tract fuses ops, so fewer than the ONNX graph has).
    pub(super) fn node_count(&self) -> usize {
        match &self.plans {
            Plans::Symbolic(plan) => plan.model().nodes().len(),
            Plans::PerShape { model, cache } => lock(cache)
                .back()
                .map(|(_, plan)| plan.model().nodes().len())
                .unwrap_or_else(|| model.nodes().len()),
        }
    }

    /// Shape-specialised plans held now; `None` when one symbolic plan serves every shape.
    pub(super) fn specialised_plans(&self) -> Option<usize> {
        match &self.plans {
            Plans::Symbolic(_) => None,
            Plans::PerShape { cache, .. } => Some(lock(cache).len()),
        }
    }

    pub(super) fn load(
        model: &[u8],
        threads: Option<std::num::NonZeroUsize>,
    ) -> Result<TractEngine, String> {
        let executor = match threads.map(std::num::NonZeroUsize::get) {
            None | Some(1) => None,
            // rayon panics only when the OS refuses threads; that is a load error here.
            Some(n) => Some(
                crate::panic_guard::catch(|| Executor::multithread_with_name(n, "duet-tract"))
                    .map_err(|panic| format!("tract could not start {n} threads: {panic}"))?,
            ),
        };
        let load = move || -> TractResult<TractEngine> {
            let model = tract_onnx::onnx().model_for_read(&mut &model[..])?;
            let mut inputs = Vec::new();
            for (ix, outlet) in model.input_outlets()?.iter().enumerate() {
                let fact = model.input_fact(ix)?;
                inputs.push(IoInfo {
                    name: model.node(outlet.node).name.clone(),
                    dtype: dtype_of(fact.datum_type()),
                    dims: fact.shape.concretize().map(|dims| {
                        dims.iter()
                            .map(|d| d.to_i64().ok().and_then(|n| usize::try_from(n).ok()))
                            .collect()
                    }),
                });
            }
            let outputs = model
                .output_outlets()?
                .iter()
                .map(|o| {
                    model
                        .outlet_label(*o)
                        .map(str::to_string)
                        .unwrap_or_else(|| model.node(o.node).name.clone())
                })
                .collect();
            let plans = match model.clone().into_optimized() {
                Ok(typed) => Plans::Symbolic(typed.into_runnable()?),
                // Only an input axis without a fixed size is a reason to wait for shapes; a
                // graph with every input axis sized that still fails is broken, and says so now.
                Err(e) if inputs.iter().any(has_unknown_axis) => {
                    tracing::info!(
                        "tract: the graph cannot be typed with unknown input axes ({e}); \
                         building one plan per input shape on first use"
                    );
                    Plans::PerShape {
                        model: Box::new(model),
                        cache: Mutex::new(VecDeque::new()),
                    }
                }
                Err(e) => return Err(e),
            };
            Ok(TractEngine {
                plans,
                executor,
                inputs,
                outputs,
            })
        };
        // tract reports malformed models as errors; the guard is for the odd assertion deep in
        // an optimiser pass, which must become a skip reason rather than abort the CLI.
        match crate::panic_guard::catch(load) {
            Ok(r) => r.map_err(|e| format!("tract could not load the graph: {e:?}")),
            Err(panic) => Err(format!("tract {panic} loading the graph")),
        }
    }

    pub(super) fn inputs(&self) -> Vec<IoInfo> {
        self.inputs.clone()
    }

    pub(super) fn outputs(&self) -> Vec<String> {
        self.outputs.clone()
    }

    pub(super) fn run(
        &self,
        ordered: &[&ValueView<'_>],
        output_names: &[String],
    ) -> Result<HashMap<String, Value>, (Option<String>, String)> {
        // tract consumes owned tensors, so this is the one place inputs are copied.
        let feed: TVec<TValue> = ordered
            .iter()
            .map(|v| match v {
                ValueView::F32(a) => {
                    Tensor::from(a.as_standard_layout().into_owned()).into_tvalue()
                }
                ValueView::I64(a) => {
                    Tensor::from(a.as_standard_layout().into_owned()).into_tvalue()
                }
            })
            .collect();
        let plan = self.plan_for(ordered).map_err(|e| (None, e))?;
        let results = match &self.executor {
            Some(pool) => multithread_tract_scope(pool.clone(), || plan.run(feed)),
            None => plan.run(feed),
        }
        .map_err(|e| (None, format!("{e:?}")))?;
        if results.len() != output_names.len() {
            return Err((
                None,
                format!(
                    "tract returned {} outputs, the graph declares {}",
                    results.len(),
                    output_names.len()
                ),
            ));
        }
        let mut out = HashMap::with_capacity(results.len());
        for (name, t) in output_names.iter().zip(results) {
            let t = t.into_tensor();
            let value = match t.datum_type() {
                DatumType::F32 => t.into_plain_array::<f32>().map(Value::F32),
                DatumType::I64 => t.into_plain_array::<i64>().map(Value::I64),
                other => {
                    return Err((
                        Some(name.clone()),
                        format!("unsupported type {other:?} (duet uses f32 and i64)"),
                    ))
                }
            }
            .map_err(|e| (Some(name.clone()), format!("{e:?}")))?;
            out.insert(name.clone(), value);
        }
        Ok(out)
    }
}

impl TractEngine {
    /// The plan that runs inputs of these shapes: the symbolic one, or a cached or newly built
    /// specialised one.
    fn plan_for(&self, ordered: &[&ValueView<'_>]) -> Result<Arc<TypedRunnableModel>, String> {
        let (model, cache) = match &self.plans {
            Plans::Symbolic(plan) => return Ok(Arc::clone(plan)),
            Plans::PerShape { model, cache } => (model, cache),
        };
        let signature: ShapeSignature = ordered.iter().map(|v| v.shape().to_vec()).collect();
        let mut cache = lock(cache);
        if let Some(ix) = cache.iter().position(|(s, _)| *s == signature) {
            let entry = cache.remove(ix).expect("position is in range");
            let plan = Arc::clone(&entry.1);
            cache.push_back(entry);
            return Ok(plan);
        }
        let started = Instant::now();
        let build = || -> TractResult<Arc<TypedRunnableModel>> {
            let mut m = InferenceModel::clone(model);
            for (ix, v) in ordered.iter().enumerate() {
                let dt = match v {
                    ValueView::F32(_) => DatumType::F32,
                    ValueView::I64(_) => DatumType::I64,
                };
                m.set_input_fact(ix, InferenceFact::dt_shape(dt, v.shape().to_vec()))?;
            }
            m.into_optimized()?.into_runnable()
        };
        let plan = match crate::panic_guard::catch(build) {
            Ok(r) => {
                r.map_err(|e| format!("tract could not plan the graph for {signature:?}: {e:?}"))?
            }
            Err(panic) => {
                return Err(format!(
                    "tract {panic} planning the graph for {signature:?}"
                ))
            }
        };
        tracing::debug!(
            "tract: planned the graph for input shapes {signature:?} in {:.1} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        if cache.len() == PLAN_CACHE {
            cache.pop_front();
        }
        cache.push_back((signature, Arc::clone(&plan)));
        Ok(plan)
    }
}

/// Whether an input axis has no fixed size (unknown, or a symbol tract could not type), or the
/// input no declared shape.
fn has_unknown_axis(info: &IoInfo) -> bool {
    info.dims
        .as_ref()
        .is_none_or(|dims| dims.iter().any(Option::is_none))
}

/// The plan cache's lock; a panic while it was held (caught by the panic guard) leaves only
/// complete entries behind, so a poisoned lock is still consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Floating-point operations of one run of the ONNX graph `model` with inputs of the given
/// concrete shapes (all f32 or i64 as the graph declares), from tract's per-op cost model:
/// 2 FLOPs per fused multiply-add, 1 per division. Used by `duet bench` to report achieved
/// GFLOP/s; elementwise ops other than those are not counted, so this is a lower bound
/// dominated by the matrix products.
pub fn graph_flops(model: &[u8], shapes: &[(&str, &[usize])]) -> Result<u64, String> {
    let count = || -> TractResult<u64> {
        let mut model = tract_onnx::onnx().model_for_read(&mut &model[..])?;
        for (ix, outlet) in model.input_outlets()?.to_vec().iter().enumerate() {
            let name = model.node(outlet.node).name.clone();
            let Some((_, shape)) = shapes.iter().find(|(n, _)| *n == name) else {
                return Err(anyhow::anyhow!("no shape given for input `{name}`"));
            };
            let dt = model.input_fact(ix)?.datum_type().unwrap_or(DatumType::F32);
            model.set_input_fact(ix, InferenceFact::dt_shape(dt, shape.to_vec()))?;
        }
        let typed = model.into_typed()?.into_decluttered()?;
        let mut flops = 0u64;
        for node in typed.eval_order()? {
            let node = typed.node(node);
            let facts: TVec<&TypedFact> = node
                .inputs
                .iter()
                .map(|i| typed.outlet_fact(*i))
                .collect::<TractResult<_>>()?;
            for (cost, n) in node.op.cost(&facts)? {
                let n = n.to_i64()? as u64;
                flops += match cost {
                    tract_onnx::tract_core::ops::Cost::FMA(_) => 2 * n,
                    tract_onnx::tract_core::ops::Cost::Div(_) => n,
                    _ => 0,
                };
            }
        }
        Ok(flops)
    };
    count().map_err(|e| format!("counting FLOPs: {e:?}"))
}
