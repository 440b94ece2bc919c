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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use tract_linalg::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::*;

use super::{IdleWait, IoInfo, OpProfile, Value, ValueView};
use crate::manifest::{DType, DimSpec};

pub(super) struct TractEngine {
    plans: Plans,
    /// The matrix-product thread pool of this engine's runs (`None`: single-threaded).
    pool: Option<Arc<Pool>>,
    /// Whether runs skip the pool, decided from the last run's time ([`ShortRuns`]).
    short_runs: ShortRuns,
    inputs: Vec<IoInfo>,
    outputs: Vec<IoInfo>,
}

/// Runs too short to gain from the pool run on the caller, decided per input shape (a prefill
/// and a decoder step, or two batch sizes, differ). Handing a run to the pool and back costs
/// two thread wake-ups (tens of microseconds each on a busy machine), and a short run has no
/// product large enough to split ([`super::tract_rewrite`]): measured at two threads, the text
/// path of classification (three sub-millisecond runs) took 1.4–1.8 ms on the pool against
/// 1.14 ms on one thread. A shape whose run on the pool ends within [`ShortRuns::POOL_BELOW`]
/// runs on the caller from then on, and goes back to the pool once a run of it on the caller
/// takes [`ShortRuns::CALLER_ABOVE`] (a band, so that a shape near the bound does not
/// alternate). A shape not seen yet goes where the engine's last run went: a KV-cache decoder
/// meets a new shape at every step, all alike.
#[derive(Debug, Default)]
struct ShortRuns(Mutex<ShortRunsSeen>);

#[derive(Debug, Default)]
struct ShortRunsSeen {
    shapes: HashMap<ShapeSignature, bool>,
    last: bool,
}

impl ShortRuns {
    const POOL_BELOW: std::time::Duration = std::time::Duration::from_millis(1);
    const CALLER_ABOVE: std::time::Duration = std::time::Duration::from_millis(2);
    /// Shapes remembered; a caller sweeping more starts over.
    const SHAPES: usize = 64;

    fn on_caller(&self, shape: &ShapeSignature) -> bool {
        let seen = lock(&self.0);
        seen.shapes.get(shape).copied().unwrap_or(seen.last)
    }

    /// Records a run of `shape` that took `elapsed` (on the caller or not) for the next run's
    /// choice.
    fn took(&self, shape: ShapeSignature, on_caller: bool, elapsed: std::time::Duration) {
        let next = if on_caller {
            elapsed < Self::CALLER_ABOVE
        } else {
            elapsed < Self::POOL_BELOW
        };
        let mut seen = lock(&self.0);
        if seen.shapes.len() >= Self::SHAPES && !seen.shapes.contains_key(&shape) {
            seen.shapes.clear();
        }
        seen.shapes.insert(shape, next);
        seen.last = next;
    }
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

fn datum_type(dt: DType) -> DatumType {
    match dt {
        DType::F32 => DatumType::F32,
        DType::F16 => DatumType::F16,
        DType::I64 => DatumType::I64,
        DType::I32 => DatumType::I32,
        DType::I8 => DatumType::I8,
        DType::U8 => DatumType::U8,
        DType::Bool => DatumType::Bool,
    }
}

/// Name, element type and axes of a graph input or output as the ONNX file declares them
/// (what onnxruntime reports too). Read from the declaration rather than tract's facts: tract
/// leaves output facts open until it analyses the graph.
fn declared_io(info: &tract_onnx::pb::ValueInfoProto) -> IoInfo {
    use tract_onnx::pb::tensor_shape_proto::dimension::Value as V;
    let tensor = match info.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(tract_onnx::pb::type_proto::Value::TensorType(t)) => Some(t),
        _ => None,
    };
    let dtype = tensor.and_then(|t| DType::from_onnx_code(t.elem_type));
    let dims = tensor.and_then(|t| t.shape.as_ref()).map(|shape| {
        shape
            .dim
            .iter()
            .map(|d| match d.value.as_ref()? {
                V::DimValue(n) => usize::try_from(*n).ok().map(DimSpec::Fixed),
                V::DimParam(s) if !s.is_empty() => Some(DimSpec::Symbolic(s.clone())),
                V::DimParam(_) => None,
            })
            .collect()
    });
    IoInfo {
        name: info.name.clone(),
        dtype,
        dims,
    }
}

/// An owned tract tensor of the caller's data (tract consumes its inputs).
fn to_tensor(v: &ValueView<'_>) -> Tensor {
    match v {
        ValueView::F32(a) => a.as_standard_layout().into_owned().into(),
        ValueView::F16(a) => a.as_standard_layout().into_owned().into(),
        ValueView::I64(a) => a.as_standard_layout().into_owned().into(),
        ValueView::I32(a) => a.as_standard_layout().into_owned().into(),
        ValueView::I8(a) => a.as_standard_layout().into_owned().into(),
        ValueView::U8(a) => a.as_standard_layout().into_owned().into(),
        ValueView::Bool(a) => a.as_standard_layout().into_owned().into(),
    }
}

/// A result tensor as a [`Value`]; `Err` names a type the engines do not return.
fn to_value(t: Tensor) -> Result<Value, String> {
    let dt = t.datum_type();
    let v = match dt {
        DatumType::F32 => t.into_plain_array::<f32>().map(Value::F32),
        DatumType::F16 => t.into_plain_array::<f16>().map(Value::F16),
        DatumType::I64 => t.into_plain_array::<i64>().map(Value::I64),
        DatumType::I32 => t.into_plain_array::<i32>().map(Value::I32),
        DatumType::I8 => t.into_plain_array::<i8>().map(Value::I8),
        DatumType::U8 => t.into_plain_array::<u8>().map(Value::U8),
        DatumType::Bool => t.into_plain_array::<bool>().map(Value::Bool),
        other => {
            return Err(format!(
                "element type {other:?}, which the engines do not return (f32, f16, i64, i32, \
                 i8, u8, bool)"
            ))
        }
    };
    v.map_err(|e| format!("{e:?}"))
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
        idle_wait: IdleWait,
    ) -> Result<TractEngine, String> {
        let pool = match threads.map(std::num::NonZeroUsize::get) {
            None | Some(1) => None,
            Some(n) => Some(shared_pool(n, idle_wait)?),
        };
        let load = move || -> TractResult<TractEngine> {
            let onnx = super::tract_rewrite::onnx();
            let proto = onnx.proto_model_for_read(&mut &model[..])?;
            // The graph's own inputs: initializers may also be listed as inputs (IR < 4).
            let (inputs, outputs) = match proto.graph.as_ref() {
                Some(g) => {
                    let inits: std::collections::HashSet<&str> =
                        g.initializer.iter().map(|t| t.name.as_str()).collect();
                    (
                        g.input
                            .iter()
                            .filter(|i| !inits.contains(i.name.as_str()))
                            .map(declared_io)
                            .collect::<Vec<_>>(),
                        g.output.iter().map(declared_io).collect::<Vec<_>>(),
                    )
                }
                None => (Vec::new(), Vec::new()),
            };
            let model = onnx.model_for_proto_model(&proto)?;
            drop(proto);
            let plans = match optimised(model.clone()) {
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
                pool,
                short_runs: ShortRuns::default(),
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

    pub(super) fn outputs(&self) -> Vec<IoInfo> {
        self.outputs.clone()
    }

    pub(super) fn run(
        &self,
        ordered: &[&ValueView<'_>],
        output_names: &[String],
    ) -> Result<HashMap<String, Value>, (Option<String>, String)> {
        // tract consumes owned tensors, so this is the one place inputs are copied.
        let feed: TVec<TValue> = ordered.iter().map(|v| to_tensor(v).into_tvalue()).collect();
        let plan = self.plan_for(ordered).map_err(|e| (None, e))?;
        // Under the panic guard like loading: a user's graph can reach an assertion deep in an
        // op at run time too, which must be an error, not an abort of the host.
        // (The guard goes on the thread that runs the plan: with a pool, one of its threads.)
        let run = || crate::panic_guard::catch(|| plan.run(feed));
        let results = match &self.pool {
            Some(pool) => {
                let shape: ShapeSignature = ordered.iter().map(|v| v.shape().to_vec()).collect();
                let on_caller = self.short_runs.on_caller(&shape);
                let started = Instant::now();
                let results = if on_caller { run() } else { on_pool(pool, run) };
                self.short_runs.took(shape, on_caller, started.elapsed());
                results
            }
            None => run(),
        }
        .map_err(|panic| (None, format!("tract {panic} running the graph")))?
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
            let value = to_value(t.into_tensor()).map_err(|e| (Some(name.clone()), e))?;
            out.insert(name.clone(), value);
        }
        Ok(out)
    }
}

impl TractEngine {
    /// Per-operator time of the plan for these inputs: one warm-up run, then `runs` runs that
    /// time each node (the time of one node includes its share of the executor's threads).
    pub(super) fn op_profile(
        &self,
        ordered: &[&ValueView<'_>],
        runs: usize,
    ) -> Result<OpProfile, String> {
        let feed: TVec<TValue> = ordered.iter().map(|v| to_tensor(v).into_tvalue()).collect();
        let plan = self.plan_for(ordered)?;
        let profile = || -> TractResult<OpProfile> {
            let mut state = plan.spawn()?;
            state.run(feed.clone())?;
            // (op, node) names are owned by the plan, so the observations borrow nothing
            // across runs.
            let mut seen: Vec<(String, String, f64)> = Vec::new();
            let mut index: HashMap<usize, usize> = HashMap::new();
            for _ in 0..runs {
                state.run_plan_with_eval(feed.clone(), |ctx, op_state, node, inputs| {
                    let t = Instant::now();
                    let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                    let slot = *index.entry(node.id).or_insert_with(|| {
                        seen.push((node.op.name().to_string(), node.name.clone(), 0.0));
                        seen.len() - 1
                    });
                    seen[slot].2 += t.elapsed().as_secs_f64();
                    out
                })?;
            }
            Ok(OpProfile::from_nodes(
                runs,
                seen.iter()
                    .map(|(op, node, s)| (op.as_str(), node.as_str(), *s)),
            ))
        };
        let run = || crate::panic_guard::catch(profile);
        match &self.pool {
            Some(pool) => on_pool(pool, run),
            None => run(),
        }
        .map_err(|panic| format!("tract {panic} profiling the graph"))?
        .map_err(|e| format!("{e:?}"))
    }
}

/// A thread pool tract's products are split over, with what [`on_pool`] needs to run on it.
pub(super) struct Pool {
    /// `Executor::MultiThread` of the pool (another executor runs on the calling thread).
    executor: Executor,
    idle_wait: IdleWait,
    /// Runs on the pool now (spinning or not): a run keeps the other threads looking for work
    /// only while it is the only one ([`on_pool`] says why).
    runs: Arc<AtomicUsize>,
    /// Runs that started helpers.
    #[cfg(test)]
    helped_runs: AtomicUsize,
}

impl Pool {
    fn new(executor: Executor, idle_wait: IdleWait) -> Pool {
        Pool {
            executor,
            idle_wait,
            runs: Arc::new(AtomicUsize::new(0)),
            #[cfg(test)]
            helped_runs: AtomicUsize::new(0),
        }
    }
}

/// The pool of `n` threads every tract engine of the process that asks for `n` threads and
/// `idle_wait` shares: a pipeline's graphs run one after another, so one pool serves them all
/// instead of each graph holding `n` idle threads of its own (a classifier at `--threads 2`
/// held five pools). Engines used at the same time from several threads share its threads
/// too. Sleeping engines get a pool of their own, so no spinning run keeps their threads busy.
/// Dropped with the last engine that uses it.
///
/// Built here rather than by `Executor::multithread` for its start handler: a panic in a piece
/// of a split product reaches the run's guard on another thread, and is not printed here.
fn shared_pool(n: usize, idle_wait: IdleWait) -> Result<Arc<Pool>, String> {
    type Key = (usize, IdleWait);
    static POOLS: Mutex<Vec<(Key, std::sync::Weak<Pool>)>> = Mutex::new(Vec::new());
    let mut pools = lock(&POOLS);
    pools.retain(|(_, pool)| pool.strong_count() > 0);
    if let Some(pool) = pools
        .iter()
        .filter(|(key, _)| *key == (n, idle_wait))
        .find_map(|(_, pool)| pool.upgrade())
    {
        return Ok(pool);
    }
    let threads = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("duet-tract-{i}"))
        .start_handler(|_| crate::panic_guard::quiet_thread())
        .build()
        .map_err(|e| format!("tract could not start {n} threads: {e}"))?;
    let pool = Arc::new(Pool::new(
        Executor::MultiThread(Arc::new(threads)),
        idle_wait,
    ));
    pools.push(((n, idle_wait), Arc::downgrade(&pool)));
    Ok(pool)
}

/// Runs `work` (a whole plan run) on one of the pool's threads, with the executor set for the
/// products inside it, while the pool's other threads keep looking for work until the run
/// ends. Why not on the caller: a product split among the pool's threads would otherwise leave
/// the caller waiting beside them, one thread more than the pool's size, and the workers still
/// spinning after a product take the cores from the caller's next (sequential) ops. Why keep
/// the others looking: a rayon worker with nothing to do sleeps within microseconds, and
/// waking it costs more than the half of a small product it would take (onnxruntime's intra-op
/// threads likewise spin between the ops of a run by default).
///
/// The helpers are detached (`spawn_broadcast`: one per thread, which no other thread can
/// take) and stop at the run's end, so a run returns as soon as its plan does, whatever a
/// helper is doing then; they back off to `std::thread::yield_now` when idle, so a helper
/// gives its core to any other runnable thread.
///
/// Helpers look for work only while their run is the only one on the pool: a thread waiting
/// inside one run's product may pick up another run's helper, which then holds that thread
/// (and the product it waits in) until the other run ends; two runs doing that to each other's
/// threads would each wait for the other forever. So a run that starts beside another starts
/// no helpers, and the helpers of a run alone stop as soon as another starts; concurrent runs
/// share the pool the way any rayon pool is shared.
///
/// With [`IdleWait::Sleep`] no helpers are started: the other threads sleep until a product
/// wakes them.
fn on_pool<R: Send>(pool: &Pool, work: impl FnOnce() -> R + Send) -> R {
    let Executor::MultiThread(threads) = &pool.executor else {
        return with_executor(&pool.executor, work);
    };
    // Counted for the whole run, on unwinding too.
    struct Leave<'a>(&'a AtomicUsize);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    pool.runs.fetch_add(1, Ordering::AcqRel);
    let _leave = Leave(&pool.runs);
    threads.install(|| {
        if pool.idle_wait == IdleWait::Sleep || pool.runs.load(Ordering::Acquire) > 1 {
            return with_executor(&pool.executor, work);
        }
        let running = rayon::current_thread_index();
        let done = Arc::new(AtomicBool::new(false));
        // Set on unwinding too: a panicking run must not leave the helpers looking forever.
        struct Done(Arc<AtomicBool>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _done = Done(Arc::clone(&done));
        #[cfg(test)]
        pool.helped_runs.fetch_add(1, Ordering::SeqCst);
        let runs = Arc::clone(&pool.runs);
        threads.spawn_broadcast(move |thread| {
            // The running thread takes its own copy while it waits inside a product (or
            // after the run): it has its run to get back to.
            if Some(thread.index()) == running {
                return;
            }
            #[cfg(test)]
            let _live = tests::LiveHelper::new();
            let mut idle = 0u32;
            while !done.load(Ordering::Acquire) && runs.load(Ordering::Acquire) == 1 {
                match rayon::yield_now() {
                    Some(rayon::Yield::Executed) => idle = 0,
                    _ if idle < HELPER_SPINS => {
                        idle += 1;
                        std::hint::spin_loop();
                    }
                    _ => std::thread::yield_now(),
                }
            }
        });
        with_executor(&pool.executor, work)
    })
}

/// Idle rounds a helper of [`on_pool`] spins through before it yields its core at each round.
const HELPER_SPINS: u32 = 64;

/// `work` with tract's executor set to `executor`, the previous one back afterwards, also when
/// `work` panics (tract's own scope restores it only on return).
fn with_executor<R>(executor: &Executor, work: impl FnOnce() -> R) -> R {
    let caught = multithread_tract_scope(executor.clone(), || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
    });
    caught.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// tract's optimised model of a graph, with duet's own rewrites of the ops tract leaves slow
/// ([`super::tract_rewrite`]): convolutions and products of activations before tract's code
/// generation, element-wise ops after it (layer norms are read as one op by the parser,
/// [`super::tract_rewrite::onnx`]).
fn optimised(model: InferenceModel) -> TractResult<TypedModel> {
    let mut typed = model.into_typed()?.into_decluttered()?;
    let convolutions = super::tract_rewrite::rewrite_convolutions(&mut typed)?;
    let products = super::tract_rewrite::rewrite_products(&mut typed)?;
    let mut typed = typed.into_optimized()?;
    let element_wise = super::tract_rewrite::rewrite(&mut typed)?;
    if convolutions + products + element_wise > 0 {
        tracing::debug!(
            "tract: {convolutions} convolutions, {products} products of activations and \
             {element_wise} element-wise ops rewritten"
        );
    }
    Ok(typed)
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
                let dt = datum_type(v.dtype());
                m.set_input_fact(ix, InferenceFact::dt_shape(dt, v.shape().to_vec()))?;
            }
            optimised(m)?.into_runnable()
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
    info.fixed_shape().is_none()
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
        // tract's own parser: the count is of the graph, not of duet's rewrites of it.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Helpers of [`on_pool`] looking for work now, in this test process.
    static LIVE_HELPERS: AtomicUsize = AtomicUsize::new(0);

    /// A pool of `n` threads of its own (not [`shared_pool`]'s, which other tests share).
    fn own_pool(n: usize, idle_wait: IdleWait) -> Pool {
        Pool::new(Executor::multithread(n), idle_wait)
    }

    /// Two halves of a `rayon::join` that each wait for the other to start: completes only
    /// when two threads take part. Returns the two threads.
    fn split_in_two() -> (std::thread::ThreadId, std::thread::ThreadId) {
        let started = AtomicUsize::new(0);
        let part = || {
            started.fetch_add(1, Ordering::SeqCst);
            while started.load(Ordering::SeqCst) < 2 {
                std::hint::spin_loop();
            }
            std::thread::current().id()
        };
        rayon::join(part, part)
    }

    /// With [`IdleWait::Sleep`] a run on a pool starts no helpers and still splits its work
    /// among the pool's threads (rayon wakes them); with `Spin` it starts them.
    #[test]
    fn a_sleeping_pool_gets_no_helpers_and_still_splits() {
        within(60, || {
            for wait in IdleWait::ALL {
                let pool = own_pool(2, wait);
                let (a, b) = on_pool(&pool, split_in_two);
                assert_ne!(a, b, "{wait}: the work was not split");
                let helped = pool.helped_runs.load(Ordering::SeqCst);
                assert_eq!(helped, usize::from(wait == IdleWait::Spin), "{wait}");
                assert_eq!(pool.runs.load(Ordering::SeqCst), 0);
            }
            helpers_end();
        });
    }

    /// A run that starts while another is on the pool starts no helpers, and the first run's
    /// helpers stop looking for work (they would otherwise hold the threads the second run's
    /// products wait on); a run alone afterwards starts them again.
    #[test]
    fn runs_side_by_side_start_no_helpers() {
        within(60, || {
            let pool = Arc::new(own_pool(3, IdleWait::Spin));
            let second_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let first = {
                let (pool, second_done) = (Arc::clone(&pool), Arc::clone(&second_done));
                std::thread::spawn(move || {
                    on_pool(&pool, || {
                        while !second_done.load(Ordering::SeqCst) {
                            std::thread::yield_now();
                        }
                    })
                })
            };
            while pool.helped_runs.load(Ordering::SeqCst) == 0 {
                std::thread::yield_now();
            }
            let (a, b) = on_pool(&pool, || {
                assert_eq!(pool.runs.load(Ordering::SeqCst), 2);
                split_in_two()
            });
            assert_ne!(a, b);
            second_done.store(true, Ordering::SeqCst);
            first.join().unwrap();
            assert_eq!(
                pool.helped_runs.load(Ordering::SeqCst),
                1,
                "the second run had helpers"
            );
            assert_eq!(pool.runs.load(Ordering::SeqCst), 0);
            on_pool(&pool, || ());
            assert_eq!(pool.helped_runs.load(Ordering::SeqCst), 2);
            helpers_end();
        });
    }

    /// Three callers at once on a pool of four threads, each run splitting products in nested
    /// joins many times over: every run ends (a run holding another's threads would hang).
    #[test]
    fn concurrent_runs_on_a_wide_pool_all_end() {
        within(120, || {
            let pool = Arc::new(own_pool(4, IdleWait::Spin));
            let callers: Vec<_> = (0..3)
                .map(|c| {
                    let pool = Arc::clone(&pool);
                    std::thread::spawn(move || {
                        let mut total = 0u64;
                        for round in 0..200u64 {
                            total += on_pool(&pool, || {
                                fn sum(lo: u64, hi: u64) -> u64 {
                                    if hi - lo <= 64 {
                                        // Long enough leaves that halves are stolen and
                                        // waited for while the other callers' runs go on.
                                        return (lo..hi)
                                            .map(|v| {
                                                (0..200u64).fold(v, |a, _| std::hint::black_box(a))
                                            })
                                            .sum();
                                    }
                                    let mid = (lo + hi) / 2;
                                    let (a, b) = rayon::join(|| sum(lo, mid), || sum(mid, hi));
                                    a + b
                                }
                                sum(0, 4096 + round + c)
                            });
                        }
                        total
                    })
                })
                .collect();
            for (c, caller) in callers.into_iter().enumerate() {
                let want: u64 = (0..200u64)
                    .map(|round| {
                        let n = 4096 + round + c as u64;
                        n * (n - 1) / 2
                    })
                    .sum();
                assert_eq!(caller.join().unwrap(), want);
            }
            assert_eq!(pool.runs.load(Ordering::SeqCst), 0);
            helpers_end();
        });
    }

    pub(super) struct LiveHelper;
    impl LiveHelper {
        pub(super) fn new() -> Self {
            LIVE_HELPERS.fetch_add(1, Ordering::SeqCst);
            LiveHelper
        }
    }
    impl Drop for LiveHelper {
        fn drop(&mut self) {
            LIVE_HELPERS.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// `f` on a thread of its own, failed after `secs` instead of hanging the suite.
    fn within<R: Send + 'static>(secs: u64, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(secs))
            .expect("hung (or panicked) past its time")
    }

    /// A run on a pool goes to one of the pool's threads with the executor set there; at two
    /// and three threads the others take part in what it splits (each half or third waits
    /// for the others to start); afterwards tract's executor is back as it was and the
    /// helpers stop.
    #[test]
    fn a_run_on_a_pool_runs_on_its_threads_with_its_executor() {
        within(60, || {
            for n in [2usize, 3] {
                let pool = own_pool(n, IdleWait::Spin);
                let (index, set, threads) = on_pool(&pool, || {
                    let set = matches!(
                        tract_linalg::multithread::current_tract_executor(),
                        Executor::MultiThread(_)
                    );
                    let started = AtomicUsize::new(0);
                    let part = || {
                        started.fetch_add(1, Ordering::SeqCst);
                        while started.load(Ordering::SeqCst) < n {
                            std::hint::spin_loop();
                        }
                        std::thread::current().id()
                    };
                    let mut ids = std::sync::Mutex::new(Vec::new());
                    // (Each part takes the lock only after its rendezvous.)
                    let record = || {
                        let id = part();
                        ids.lock().unwrap().push(id);
                    };
                    rayon::scope(|scope| {
                        for _ in 1..n {
                            scope.spawn(|_| record());
                        }
                        record();
                    });
                    let ids = std::mem::take(ids.get_mut().unwrap());
                    (rayon::current_thread_index(), set, ids)
                });
                assert!(index.is_some(), "the run stayed on the calling thread");
                assert!(set, "tract's executor is not set for the run");
                let distinct: std::collections::HashSet<_> = threads.iter().collect();
                assert_eq!(distinct.len(), n, "{n} threads: {threads:?}");
            }
            // A pool of one runs the work with no helper; no pool, on the caller.
            assert_eq!(on_pool(&own_pool(1, IdleWait::Spin), || 7), 7);
            let single = Pool::new(Executor::SingleThread, IdleWait::Spin);
            assert_eq!(on_pool(&single, || 8), 8);
            helpers_end();
        });
    }

    /// Waits for the helpers of [`on_pool`] to end with their runs (another test's runs may
    /// hold some for a moment).
    fn helpers_end() {
        let started = Instant::now();
        while LIVE_HELPERS.load(Ordering::SeqCst) > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "helpers left running"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The choice between caller and pool, per input shape: the first shape goes to the pool,
    /// a short run there sends its shape to the caller, an unseen shape follows the last run,
    /// a long run on the caller sends its shape back, runs inside the band stay where they
    /// are, and a sweep of shapes is bounded.
    #[test]
    fn short_runs_are_chosen_per_shape_with_a_band() {
        let runs = ShortRuns::default();
        let (a, b, c) = (vec![vec![1, 4]], vec![vec![8, 4]], vec![vec![2, 4]]);
        let ms = |v: f64| Duration::from_secs_f64(v / 1e3);
        assert!(!runs.on_caller(&a));
        runs.took(a.clone(), false, ms(0.3));
        assert!(runs.on_caller(&a));
        assert!(runs.on_caller(&c), "an unseen shape follows the last run");
        runs.took(b.clone(), true, ms(3.0));
        assert!(!runs.on_caller(&b), "3 ms on the caller goes to the pool");
        assert!(runs.on_caller(&a), "a seen shape keeps its own choice");
        assert!(!runs.on_caller(&c), "an unseen shape follows the last run");
        runs.took(b.clone(), false, ms(1.5));
        assert!(!runs.on_caller(&b), "1.5 ms on the pool stays on the pool");
        runs.took(a.clone(), true, ms(1.5));
        assert!(
            runs.on_caller(&a),
            "1.5 ms on the caller stays on the caller"
        );
        runs.took(a.clone(), true, ms(2.5));
        assert!(
            !runs.on_caller(&a),
            "2.5 ms on the caller goes back to the pool"
        );
        for i in 0..3 * ShortRuns::SHAPES {
            runs.took(vec![vec![i]], false, ms(0.1));
        }
        assert!(lock(&runs.0).shapes.len() <= ShortRuns::SHAPES);
    }

    /// Engines asking for the same number of threads and idle wait share one pool while any of
    /// them lives; another count or idle wait gets its own; a pool goes with its last engine.
    #[test]
    fn engines_with_the_same_thread_count_share_one_pool() {
        use duet_testkit::{GraphBuilder, D, FLOAT};
        let mut g = GraphBuilder::default();
        let x = g.input("x", FLOAT, &[D::N(2)]);
        g.node("Relu", &[&x], vec![], Some("y"));
        g.output("y", FLOAT, &[D::N(2)]);
        let bytes = g.finish(17);
        let pool = |e: &TractEngine| Arc::clone(e.pool.as_ref().expect("no pool"));
        let threads = |e: &TractEngine| match &pool(e).executor {
            Executor::MultiThread(threads) => threads.current_num_threads(),
            other => panic!("{other:?}"),
        };
        // Thread counts no other test of this process uses, so their pools are this test's.
        let load = |n: usize| {
            TractEngine::load(&bytes, std::num::NonZeroUsize::new(n), IdleWait::Spin).unwrap()
        };
        let (a, b, c) = (load(5), load(5), load(6));
        assert!(
            Arc::ptr_eq(&pool(&a), &pool(&b)),
            "two engines of 5 threads, two pools"
        );
        assert!(!Arc::ptr_eq(&pool(&a), &pool(&c)));
        assert_eq!(threads(&c), 6);
        let sleeping =
            TractEngine::load(&bytes, std::num::NonZeroUsize::new(5), IdleWait::Sleep).unwrap();
        assert!(!Arc::ptr_eq(&pool(&a), &pool(&sleeping)));
        assert_eq!(threads(&sleeping), 5);
        let weak = Arc::downgrade(&pool(&a));
        drop(a);
        assert!(
            weak.upgrade().is_some(),
            "the pool went while an engine used it"
        );
        drop(b);
        assert!(weak.upgrade().is_none(), "the pool outlived its engines");
        assert!(TractEngine::load(&bytes, None, IdleWait::Spin)
            .unwrap()
            .pool
            .is_none());
    }

    /// An engine with a pool gives one thread's values on a short graph and a long one, called
    /// from four threads at once; no run hangs.
    #[test]
    fn runs_on_a_pool_from_several_callers_give_one_threads_values() {
        use duet_testkit::{GraphBuilder, Lcg, D, FLOAT};
        within(120, || {
            let model = |n: usize| {
                let mut g = GraphBuilder::default();
                let d = D::N(n as i64);
                let x = g.input("x", FLOAT, &[d.clone(), d.clone()]);
                let w = g.f32("W", &[n, n], Lcg::new(7).vec(n * n, 0.1));
                let h = g.node("MatMul", &[&x, &w], vec![], None);
                g.node("MatMul", &[&h, &w], vec![], Some("y"));
                g.output("y", FLOAT, &[d.clone(), d]);
                g.finish(17)
            };
            // 8×8: microseconds, on the caller after its first run; 256×256 twice: 34 M
            // multiply-adds, split on the pool.
            for n in [8usize, 256] {
                let bytes = model(n);
                let one = TractEngine::load(&bytes, None, IdleWait::Spin).unwrap();
                let two = Arc::new(
                    TractEngine::load(&bytes, std::num::NonZeroUsize::new(2), IdleWait::Spin)
                        .unwrap(),
                );
                let x = ndarray::ArrayD::from_shape_vec(
                    ndarray::IxDyn(&[n, n]),
                    Lcg::new(3).vec(n * n, 1.0),
                )
                .unwrap();
                let x = Value::F32(x);
                let names = ["y".to_string()];
                let want = Arc::new(one.run(&[&x.view()], &names).unwrap()["y"].clone());
                let callers: Vec<_> = (0..4)
                    .map(|_| {
                        let (two, x, want) = (Arc::clone(&two), x.clone(), Arc::clone(&want));
                        std::thread::spawn(move || {
                            for _ in 0..10 {
                                let got = two.run(&[&x.view()], &["y".to_string()]).unwrap();
                                let d = (got["y"].as_f32().unwrap() - want.as_f32().unwrap())
                                    .iter()
                                    .fold(0f32, |m, v| m.max(v.abs()));
                                assert!(d < 1e-4, "{n}×{n}: two threads differ by {d}");
                            }
                        })
                    })
                    .collect();
                for c in callers {
                    c.join().unwrap();
                }
            }
        });
    }

    /// A run that panics ends the helpers it started: the panic reaches the caller (it would
    /// hang there if the helpers kept looking for work), and the pool runs the next run.
    #[test]
    fn a_panicking_run_releases_the_pool() {
        within(60, || {
            let pool = own_pool(2, IdleWait::Spin);
            for round in 0..3 {
                let caught = crate::panic_guard::catch(|| {
                    on_pool(&pool, || -> usize { panic!("planted panic {round}") })
                });
                assert!(caught.unwrap_err().contains("planted panic"));
                // tract's executor setting is back to none on every thread of the pool.
                assert_eq!(
                    pool.runs.load(Ordering::SeqCst),
                    0,
                    "the run is still counted"
                );
                let Executor::MultiThread(threads) = &pool.executor else {
                    unreachable!()
                };
                let unset = threads.broadcast(|_| {
                    matches!(
                        tract_linalg::multithread::current_tract_executor(),
                        Executor::SingleThread
                    )
                });
                assert!(unset.iter().all(|&u| u), "executor left set: {unset:?}");
                assert_eq!(on_pool(&pool, || round), round);
            }
            helpers_end();
        });
    }
}
