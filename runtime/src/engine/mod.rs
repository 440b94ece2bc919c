//! Inference engines: one loaded ONNX graph on one backend.
//!
//! Two backends sit behind one [`Engine`] type:
//! - **onnxruntime** through `ort` (execution providers TensorRT, CUDA or CPU). The shared
//!   library is loaded at run time (`load-dynamic`), so a machine without it still runs.
//! - **tract**, pure Rust, always compiled in: the fallback that always works.
//!
//! With [`ProviderChoice::Auto`] the providers are tried in the order TensorRT → CUDA → ort CPU
//! → tract and the first that loads the graph wins; every provider that was passed over is
//! recorded in the [`ProviderReport`] with the *real* reason (the text onnxruntime returned, the
//! path where the library was looked for …), so a user can see why a GPU was not used.
//!
//! This file (≈ 800 lines) is the engine's whole public surface — `Engine`, `Value`, options,
//! provider choice and reports, the error type — and the choice logic between the backends;
//! each backend's own code is in its file (`ort_backend.rs`, `tract_backend.rs`).

#[cfg(feature = "ort")]
mod ort_backend;
pub mod sample;
mod tract_backend;
mod tract_rewrite;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use duet_fsio::{Cap, Follow};

use ndarray::{ArrayD, ArrayViewD};
use thiserror::Error;

use crate::manifest::{DType, DimSpec};

/// The largest ONNX file read: protobuf's own limit for one message (larger graphs keep their
/// weights as external data, which duet does not write).
pub const MODEL_FILE_CAP: Cap = Cap::new(2 << 30, "an ONNX graph");

/// A concrete backend/execution provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    /// onnxruntime with the TensorRT execution provider (CUDA EP as fallback for nodes TensorRT
    /// rejects).
    TensorRt,
    /// onnxruntime with the CUDA execution provider.
    Cuda,
    /// onnxruntime on the CPU execution provider.
    OrtCpu,
    /// tract (pure Rust, CPU).
    Tract,
}

impl Provider {
    /// Every provider in the order `auto` tries them.
    pub const ALL: [Provider; 4] = [
        Provider::TensorRt,
        Provider::Cuda,
        Provider::OrtCpu,
        Provider::Tract,
    ];

    /// The command-line spelling (`tensorrt`, `cuda`, `ort-cpu`, `tract`).
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::TensorRt => "tensorrt",
            Provider::Cuda => "cuda",
            Provider::OrtCpu => "ort-cpu",
            Provider::Tract => "tract",
        }
    }

    /// The execution providers (onnxruntime's names; `tract` for tract) that may run the
    /// nodes of a graph loaded on this provider.
    pub fn execution_provider_names(self) -> &'static [&'static str] {
        match self {
            Provider::TensorRt => &["TensorrtExecutionProvider", "CUDAExecutionProvider"],
            Provider::Cuda => &["CUDAExecutionProvider"],
            Provider::OrtCpu => &["CPUExecutionProvider"],
            Provider::Tract => &["tract"],
        }
    }

    /// True for the providers that run on onnxruntime.
    pub fn is_ort(self) -> bool {
        !matches!(self, Provider::Tract)
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Valid values of `--provider`, for error messages.
pub const VALID_PROVIDER_NAMES: &str = "auto, tensorrt, cuda, ort-cpu, tract";

/// A provider name that is not one of [`VALID_PROVIDER_NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown provider `{name}` (valid: {valid})", valid = VALID_PROVIDER_NAMES)]
pub struct ParseProviderError {
    pub name: String,
}

impl FromStr for Provider {
    type Err = ParseProviderError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Provider::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ParseProviderError {
                name: s.to_string(),
            })
    }
}

/// What the user asked for: `auto` (first that works) or exactly one provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ProviderChoice {
    #[default]
    Auto,
    Only(Provider),
}

impl ProviderChoice {
    /// The providers to try, in order.
    pub fn candidates(self) -> Vec<Provider> {
        match self {
            ProviderChoice::Auto => Provider::ALL.to_vec(),
            ProviderChoice::Only(p) => vec![p],
        }
    }
}

impl FromStr for ProviderChoice {
    type Err = ParseProviderError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" {
            Ok(ProviderChoice::Auto)
        } else {
            s.parse().map(ProviderChoice::Only)
        }
    }
}

impl fmt::Display for ProviderChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProviderChoice::Auto => f.write_str("auto"),
            ProviderChoice::Only(p) => p.fmt(f),
        }
    }
}

impl From<Provider> for ProviderChoice {
    fn from(p: Provider) -> Self {
        ProviderChoice::Only(p)
    }
}

/// Input-shape signatures whose tract plans an engine keeps (see [`Engine::specialised_plans`]).
pub const TRACT_PLAN_CACHE: usize = tract_backend::PLAN_CACHE;

/// Options shared by every engine of a run.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Turn every skipped provider into an error instead of falling through to the next one.
    pub strict: bool,
    /// Explicit path of `libonnxruntime`; wins over `ORT_DYLIB_PATH` and the default search.
    pub ort_lib: Option<PathBuf>,
    /// Settings of the TensorRT provider (unused by the others).
    pub tensorrt: TensorRtOptions,
    /// Threads one graph run may use: onnxruntime's intra-op pool, tract's matrix-product pool.
    /// `None`: each engine's own default (onnxruntime one per physical core, tract one), which
    /// is not a fair comparison; `duet bench --threads N` sets both. tract runs a graph on its
    /// pool (large products and a batch's convolutions split among the threads, the others
    /// kept looking for work during the run), except input shapes whose runs there end within
    /// a millisecond: those run on the calling thread, where the hand-off would cost more than
    /// the split saves, until a run there takes two (a shape not seen yet goes where the last
    /// run went). tract engines with the same count (and [`IdleWait`]) share one pool of that
    /// many threads in the process, so a pipeline's graphs hold `N` threads between them, not
    /// `N` each.
    pub threads: Option<std::num::NonZeroUsize>,
    /// How a run's other threads wait for work while it runs (with `threads` above 1).
    pub idle_wait: IdleWait,
}

/// How the threads of a multi-threaded run wait between the pieces of work it hands them.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum IdleWait {
    /// Keep looking for work for the whole run (onnxruntime's intra-op threads spin between
    /// ops; tract's pool threads are kept looking by a helper, backing off to yielding their
    /// core): the fastest, at the price of cores kept busy while a run waits on one thread.
    #[default]
    Spin,
    /// Sleep until woken for a piece of work (onnxruntime's `session.intra_op.allow_spinning`
    /// off; no helpers on tract's pool): slower runs, idle cores while a run is sequential —
    /// the choice on a battery.
    Sleep,
}

impl IdleWait {
    pub const ALL: [IdleWait; 2] = [IdleWait::Spin, IdleWait::Sleep];

    pub fn name(self) -> &'static str {
        match self {
            IdleWait::Spin => "spin",
            IdleWait::Sleep => "sleep",
        }
    }
}

impl fmt::Display for IdleWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for IdleWait {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        IdleWait::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| format!("unknown idle wait '{s}' (expected spin or sleep)"))
    }
}

/// TensorRT execution-provider settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TensorRtOptions {
    /// Let TensorRT pick fp16 kernels (LayerNorm stays fp32).
    pub fp16: bool,
    /// Directory for built engines and the timing cache: the first start builds (minutes), later
    /// starts load. `None` rebuilds at every start.
    pub engine_cache: Option<PathBuf>,
}

/// Where onnxruntime really ran a graph's nodes, read from its profiler: execution-provider
/// name (`CPUExecutionProvider`, `CUDAExecutionProvider`, …, or `tract`) → number of nodes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placement {
    pub nodes: std::collections::BTreeMap<String, usize>,
}

impl Placement {
    /// Counts the distinct nodes per provider in an onnxruntime profile (the JSON array of
    /// trace events `end_profiling` writes; node events have `cat: "Node"` and
    /// `args.provider`).
    pub fn from_ort_profile(json: &str) -> Result<Placement, String> {
        let events: Vec<serde_json::Value> =
            serde_json::from_str(json).map_err(|e| format!("profile is not a JSON array: {e}"))?;
        let mut seen = std::collections::HashSet::new();
        let mut nodes = std::collections::BTreeMap::new();
        for ev in events.iter().filter(|ev| ev["cat"] == "Node") {
            // Each node has `<name>_fence_before`, `_kernel_time` and `_fence_after` events;
            // the kernel event is the one that ran, once per node per run.
            let (Some(name), Some(provider)) =
                (ev["name"].as_str(), ev["args"]["provider"].as_str())
            else {
                continue;
            };
            if let Some(node) = name.strip_suffix("_kernel_time") {
                if seen.insert(node.to_string()) {
                    *nodes.entry(provider.to_string()).or_insert(0) += 1;
                }
            }
        }
        if nodes.is_empty() {
            return Err("the profile has no node events".to_string());
        }
        Ok(Placement { nodes })
    }

    /// The provider that ran the most nodes.
    pub fn main_provider(&self) -> Option<&str> {
        self.nodes
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(p, _)| p.as_str())
    }

    /// True when the nodes ran where `provider` says: tract on tract; for an ort provider the
    /// provider that ran the most nodes is one of its execution providers (GPU providers leave
    /// shape arithmetic on the CPU by design, so CPU nodes alongside are normal).
    pub fn matches(&self, provider: Provider) -> bool {
        self.main_provider()
            .is_some_and(|main| provider.execution_provider_names().contains(&main))
    }
}

/// Where a graph's run time goes, by operator: what a per-op profile of one engine says
/// (`duet bench --model FILE --profile`). tract's rows are the ops of its optimised plan
/// (`OptMatMul`, `RmsNorm`, … after fusion); onnxruntime's the kernels it ran (`MatMul`,
/// `FusedMatMul`, `LayerNormalization`, …).
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct OpProfile {
    /// Profiled runs the times are averaged over (after one unprofiled warm-up run).
    pub runs: usize,
    /// Slowest first.
    pub ops: Vec<OpTime>,
}

/// One operator's share of a run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OpTime {
    pub op: String,
    /// Nodes of this op in the graph the engine ran.
    pub nodes: usize,
    /// Time per run summed over those nodes, milliseconds.
    pub ms_per_run: f64,
}

impl OpProfile {
    /// From per-node observations `(op, node, seconds)` over `runs` runs.
    pub(crate) fn from_nodes<'a>(
        runs: usize,
        observations: impl IntoIterator<Item = (&'a str, &'a str, f64)>,
    ) -> OpProfile {
        let mut by_op: std::collections::BTreeMap<&str, (std::collections::BTreeSet<&str>, f64)> =
            Default::default();
        for (op, node, seconds) in observations {
            let e = by_op.entry(op).or_default();
            e.0.insert(node);
            e.1 += seconds;
        }
        let mut ops: Vec<OpTime> = by_op
            .into_iter()
            .map(|(op, (nodes, s))| OpTime {
                op: op.to_string(),
                nodes: nodes.len(),
                ms_per_run: s * 1e3 / runs.max(1) as f64,
            })
            .collect();
        ops.sort_by(|a, b| b.ms_per_run.total_cmp(&a.ms_per_run));
        OpProfile { runs, ops }
    }

    /// Reads an onnxruntime profile (the JSON array `end_profiling` writes) of a session that
    /// ran once to warm up and then `runs` more times: kernel events after the first
    /// `model_run` are summed by `args.op_name`.
    pub fn from_ort_profile(json: &str) -> Result<OpProfile, String> {
        let events: Vec<serde_json::Value> =
            serde_json::from_str(json).map_err(|e| format!("profile is not a JSON array: {e}"))?;
        let run_ends: Vec<u64> = events
            .iter()
            .filter(|ev| ev["cat"] == "Session" && ev["name"] == "model_run")
            .filter_map(|ev| Some(ev["ts"].as_u64()? + ev["dur"].as_u64()?))
            .collect();
        let Some(&warm_end) = run_ends.iter().min() else {
            return Err("the profile has no model_run events".to_string());
        };
        let runs = run_ends.len() - 1;
        if runs == 0 {
            return Err("the profile has only the warm-up run".to_string());
        }
        let observations = events.iter().filter_map(|ev| {
            let name = ev["name"].as_str()?.strip_suffix("_kernel_time")?;
            (ev["cat"] == "Node" && ev["ts"].as_u64()? > warm_end).then_some((
                ev["args"]["op_name"].as_str()?,
                name,
                ev["dur"].as_u64()? as f64 * 1e-6,
            ))
        });
        let profile = OpProfile::from_nodes(runs, observations);
        if profile.ops.is_empty() {
            return Err("the profile has no kernel events after the warm-up run".to_string());
        }
        Ok(profile)
    }

    /// Time per run over all ops, milliseconds.
    pub fn total_ms(&self) -> f64 {
        self.ops.iter().map(|o| o.ms_per_run).sum()
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .nodes
            .iter()
            .map(|(p, n)| format!("{n} nodes on {p}"))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// Which provider runs a graph and why the ones before it were passed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderReport {
    pub graph: String,
    pub used: Provider,
    /// `(provider, reason)` for every provider tried before `used`.
    pub skipped: Vec<(Provider, String)>,
    /// The onnxruntime library that runs the graph (`None` on tract), so a report always says
    /// which file's code is running.
    pub library: Option<PathBuf>,
}

impl fmt::Display for ProviderReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: running on {}", self.graph, self.used)?;
        if let Some(lib) = &self.library {
            write!(f, " ({})", lib.display())?;
        }
        for (p, why) in &self.skipped {
            write!(f, "\n  skipped {p}: {why}")?;
        }
        Ok(())
    }
}

/// Engine failures.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("graph `{graph}`: provider {provider} unavailable: {reason}")]
    ProviderUnavailable {
        graph: String,
        provider: Provider,
        reason: String,
    },
    #[error("graph `{graph}`: no provider could load it:{}", fmt_skipped(.skipped))]
    NoProvider {
        graph: String,
        skipped: Vec<(Provider, String)>,
    },
    #[error("graph `{graph}`: model file not found: {}", path.display())]
    ModelNotFound { graph: String, path: PathBuf },
    /// The model file exists but is not one to read: not a regular file, a symlink where none
    /// is followed, over the size limit, or unreadable.
    #[error("graph `{graph}`: {source}")]
    ModelFile {
        graph: String,
        #[source]
        source: duet_fsio::ReadError,
    },
    #[error("graph `{graph}`: missing input `{name}`")]
    MissingInput { graph: String, name: String },
    #[error("graph `{graph}`: unknown input `{name}` (inputs are: {expected})")]
    UnknownInput {
        graph: String,
        name: String,
        expected: String,
    },
    #[error("graph `{graph}`: input `{name}` given twice")]
    DuplicateInput { graph: String, name: String },
    #[error("graph `{graph}`: input `{name}` must be {expected}, got {got}")]
    InputDType {
        graph: String,
        name: String,
        expected: DType,
        got: DType,
    },
    #[error(
        "graph `{graph}`: input `{name}` has an element type the engines do not feed (they feed \
         f32, f16, i64, i32, i8, u8 and bool)"
    )]
    UnsupportedInputType { graph: String, name: String },
    /// No sample input could be made for an input (`duet bench --model`, `duet-onnx-run`).
    #[error("graph `{graph}`: input `{name}`: no sample input can be made: {reason}")]
    SampleInput {
        graph: String,
        name: String,
        reason: String,
    },
    #[error("graph `{graph}` on {provider}: run failed: {reason}")]
    Run {
        graph: String,
        provider: Provider,
        reason: String,
    },
    #[error("graph `{graph}` on {provider}: output `{name}`: {reason}")]
    Output {
        graph: String,
        provider: Provider,
        name: String,
        reason: String,
    },
}

fn fmt_skipped(skipped: &[(Provider, String)]) -> String {
    skipped
        .iter()
        .map(|(p, r)| format!("\n  {p}: {r}"))
        .collect()
}

/// Declares `Value` and `ValueView` with one variant per [`DType`] and the conversions between
/// them and ndarray arrays. A macro because the seven variants differ only in their element
/// type: written out, every match below would be seven near-identical arms, easy to let drift.
macro_rules! values {
    ($($variant:ident($t:ty)),+ $(,)?) => {
        /// An owned tensor passed to or returned from a graph.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Value {
            $($variant(ArrayD<$t>),)+
        }

        /// A borrowed tensor: lets callers feed large, reused inputs (image tokens, KV cache)
        /// without copying them for every call. onnxruntime reads standard-layout views in
        /// place; tract needs owned tensors and copies.
        #[derive(Debug, Clone)]
        pub enum ValueView<'a> {
            $($variant(ArrayViewD<'a, $t>),)+
        }

        impl Value {
            pub fn dtype(&self) -> DType {
                match self {
                    $(Value::$variant(_) => DType::$variant,)+
                }
            }

            pub fn shape(&self) -> &[usize] {
                match self {
                    $(Value::$variant(a) => a.shape(),)+
                }
            }

            /// A borrowed view, for [`Engine::run_views`].
            pub fn view(&self) -> ValueView<'_> {
                match self {
                    $(Value::$variant(a) => ValueView::$variant(a.view()),)+
                }
            }
        }

        impl ValueView<'_> {
            pub fn dtype(&self) -> DType {
                match self {
                    $(ValueView::$variant(_) => DType::$variant,)+
                }
            }

            pub fn shape(&self) -> &[usize] {
                match self {
                    $(ValueView::$variant(a) => a.shape(),)+
                }
            }
        }

        $(
            impl From<ArrayD<$t>> for Value {
                fn from(a: ArrayD<$t>) -> Self {
                    Value::$variant(a)
                }
            }

            impl<'a> From<ArrayViewD<'a, $t>> for ValueView<'a> {
                fn from(a: ArrayViewD<'a, $t>) -> Self {
                    ValueView::$variant(a)
                }
            }
        )+
    };
}

values! {
    F32(f32),
    F16(half::f16),
    I64(i64),
    I32(i32),
    I8(i8),
    U8(u8),
    Bool(bool),
}

impl Value {
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Value::F32(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<&ArrayD<i64>> {
        match self {
            Value::I64(a) => Some(a),
            _ => None,
        }
    }

    pub fn into_f32(self) -> Option<ArrayD<f32>> {
        match self {
            Value::F32(a) => Some(a),
            _ => None,
        }
    }

    pub fn into_i64(self) -> Option<ArrayD<i64>> {
        match self {
            Value::I64(a) => Some(a),
            _ => None,
        }
    }
}

impl<'a> From<&'a Value> for ValueView<'a> {
    fn from(v: &'a Value) -> Self {
        v.view()
    }
}

/// Name, element type and declared shape of a graph input or output, as the backend reads
/// them from the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoInfo {
    pub name: String,
    /// `None` when the graph uses an element type the engines do not feed or return (string,
    /// f64, u16, …); running such a graph is refused with the type named.
    pub dtype: Option<DType>,
    /// The declared shape, one entry per axis: `Some(Fixed(n))`, `Some(Symbolic(name))` for a
    /// named dynamic axis, `None` for an axis with neither size nor name; `None` as a whole
    /// when the graph does not declare the rank.
    pub dims: Option<Vec<Option<DimSpec>>>,
}

impl IoInfo {
    /// The size of every axis when all are fixed.
    pub fn fixed_shape(&self) -> Option<Vec<usize>> {
        self.dims
            .as_ref()?
            .iter()
            .map(|d| match d {
                Some(DimSpec::Fixed(n)) => Some(*n),
                _ => None,
            })
            .collect()
    }
}

impl fmt::Display for IoInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dtype = self.dtype.map_or("unsupported type", DType::name);
        write!(f, "{}: {dtype}", self.name)?;
        match &self.dims {
            None => f.write_str(" [rank unknown]"),
            Some(dims) => {
                let axes: Vec<String> = dims
                    .iter()
                    .map(|d| d.as_ref().map_or("?".to_string(), DimSpec::to_string))
                    .collect();
                write!(f, " [{}]", axes.join(", "))
            }
        }
    }
}

enum Backend {
    #[cfg(feature = "ort")]
    Ort(ort_backend::OrtEngine),
    Tract(tract_backend::TractEngine),
}

/// One loaded graph on one backend. Loaded once, run many times; `run` takes `&self` so an
/// engine can be shared between threads (the ort session is behind a mutex, the tract plan is
/// immutable).
pub struct Engine {
    graph: String,
    provider: Provider,
    inputs: Vec<IoInfo>,
    outputs: Vec<IoInfo>,
    /// `outputs`' names, in order (what the backends return results by).
    output_names: Vec<String>,
    backend: Backend,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("graph", &self.graph)
            .field("provider", &self.provider)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Loads `path` (graph `graph_name`, used in messages and reports) on the first provider
    /// of `choice` that works.
    ///
    /// Under `auto` a provider that cannot load the graph is skipped with its reason, unless
    /// `options.strict` is set; an explicitly chosen provider that cannot be used is always an
    /// error ([`EngineError::ProviderUnavailable`]).
    pub fn load(
        path: impl AsRef<Path>,
        graph_name: &str,
        choice: ProviderChoice,
        options: &EngineOptions,
    ) -> Result<(Engine, ProviderReport), EngineError> {
        let bytes = Engine::read_model(path.as_ref(), graph_name)?;
        Engine::load_bytes(bytes, graph_name, choice, options)
    }

    /// The bytes of an ONNX file (a regular file under [`MODEL_FILE_CAP`]), read once, for
    /// [`Engine::load_bytes`] and anything else that reads the same graph.
    pub fn read_model(path: &Path, graph_name: &str) -> Result<Arc<[u8]>, EngineError> {
        let bytes =
            duet_fsio::read_capped(path, MODEL_FILE_CAP, Follow::Yes).map_err(|e| match e {
                duet_fsio::ReadError::NotFound { path } => EngineError::ModelNotFound {
                    graph: graph_name.to_string(),
                    path,
                },
                source => EngineError::ModelFile {
                    graph: graph_name.to_string(),
                    source,
                },
            })?;
        Ok(bytes.into())
    }

    /// Loads a graph from the bytes of its ONNX file (what [`crate::Bundle`] hands out after
    /// hashing them, so the bytes checked are the bytes loaded); see [`Engine::load`].
    pub fn load_bytes(
        model: Arc<[u8]>,
        graph_name: &str,
        choice: ProviderChoice,
        options: &EngineOptions,
    ) -> Result<(Engine, ProviderReport), EngineError> {
        let explicit = matches!(choice, ProviderChoice::Only(_));
        let mut skipped = Vec::new();
        for provider in choice.candidates() {
            match load_backend(provider, &model, options, graph_name) {
                Ok((backend, inputs, outputs)) => {
                    let library = match &backend {
                        #[cfg(feature = "ort")]
                        Backend::Ort(e) => Some(e.library().to_path_buf()),
                        Backend::Tract(_) => None,
                    };
                    let report = ProviderReport {
                        graph: graph_name.to_string(),
                        used: provider,
                        skipped,
                        library,
                    };
                    tracing::debug!("{report}");
                    let engine = Engine {
                        graph: graph_name.to_string(),
                        provider,
                        inputs,
                        output_names: outputs.iter().map(|o| o.name.clone()).collect(),
                        outputs,
                        backend,
                    };
                    return Ok((engine, report));
                }
                Err(reason) => {
                    if explicit || options.strict {
                        return Err(EngineError::ProviderUnavailable {
                            graph: graph_name.to_string(),
                            provider,
                            reason,
                        });
                    }
                    tracing::debug!(graph = graph_name, %provider, "skipped: {reason}");
                    skipped.push((provider, reason));
                }
            }
        }
        Err(EngineError::NoProvider {
            graph: graph_name.to_string(),
            skipped,
        })
    }

    /// The provider this engine runs on.
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// The graph name given to [`Engine::load`].
    pub fn graph(&self) -> &str {
        &self.graph
    }

    /// Graph inputs in declaration order.
    pub fn inputs(&self) -> &[IoInfo] {
        &self.inputs
    }

    /// Graph outputs in declaration order.
    pub fn outputs(&self) -> &[IoInfo] {
        &self.outputs
    }

    /// Runs the graph on owned inputs; see [`Engine::run_views`].
    pub fn run(&self, inputs: &[(&str, Value)]) -> Result<HashMap<String, Value>, EngineError> {
        let views: Vec<(&str, ValueView<'_>)> =
            inputs.iter().map(|(n, v)| (*n, v.view())).collect();
        self.run_views(&views)
    }

    /// Runs the graph. Every input must be given exactly once, by name, with the graph's
    /// element type; the result maps every graph output name to its value.
    pub fn run_views(
        &self,
        inputs: &[(&str, ValueView<'_>)],
    ) -> Result<HashMap<String, Value>, EngineError> {
        let ordered = self.order_inputs(inputs)?;
        let outputs = match &self.backend {
            #[cfg(feature = "ort")]
            Backend::Ort(e) => e.run(&self.inputs, &ordered, &self.output_names),
            Backend::Tract(e) => e.run(&ordered, &self.output_names),
        };
        outputs.map_err(|(name, reason)| match name {
            Some(name) => EngineError::Output {
                graph: self.graph.clone(),
                provider: self.provider,
                name,
                reason,
            },
            None => EngineError::Run {
                graph: self.graph.clone(),
                provider: self.provider,
                reason,
            },
        })
    }

    /// How many shape-specialised tract plans this engine holds now (at most
    /// [`TRACT_PLAN_CACHE`]), or `None` when one plan serves every input shape (ort, and tract
    /// on a graph it can type with its symbolic axes). tract builds a plan per input-shape
    /// signature for graphs whose dynamic axes have neither a size nor a name.
    pub fn specialised_plans(&self) -> Option<usize> {
        match &self.backend {
            #[cfg(feature = "ort")]
            Backend::Ort(_) => None,
            Backend::Tract(e) => e.specialised_plans(),
        }
    }

    /// Where the nodes of this graph really run, checked independently of the report: for ort
    /// a profiling twin of the session runs `inputs` once and onnxruntime's profile says which
    /// execution provider ran each node; tract runs every node itself.
    pub fn placement(&self, inputs: &[(&str, ValueView<'_>)]) -> Result<Placement, EngineError> {
        // Checked on every backend, so bad inputs fail the same way with or without ort.
        let ordered = self.order_inputs(inputs)?;
        match &self.backend {
            #[cfg(feature = "ort")]
            Backend::Ort(e) => {
                e.placement(&self.inputs, &ordered)
                    .map_err(|reason| EngineError::Run {
                        graph: self.graph.clone(),
                        provider: self.provider,
                        reason: format!("profiling: {reason}"),
                    })
            }
            Backend::Tract(e) => {
                let _ = ordered;
                Ok(Placement {
                    nodes: [("tract".to_string(), e.node_count())].into(),
                })
            }
        }
    }

    /// Per-operator time of this graph on its engine ([`OpProfile`]): one warm-up run, then
    /// `runs` profiled ones on `inputs`. For ort a profiling twin of the session runs them
    /// (onnxruntime's own profiler); tract times each node of its plan.
    pub fn op_profile(
        &self,
        inputs: &[(&str, ValueView<'_>)],
        runs: usize,
    ) -> Result<OpProfile, EngineError> {
        let ordered = self.order_inputs(inputs)?;
        let runs = runs.max(1);
        let profiled = match &self.backend {
            #[cfg(feature = "ort")]
            Backend::Ort(e) => e.op_profile(&self.inputs, &ordered, runs),
            Backend::Tract(e) => e.op_profile(&ordered, runs),
        };
        profiled.map_err(|reason| EngineError::Run {
            graph: self.graph.clone(),
            provider: self.provider,
            reason: format!("profiling: {reason}"),
        })
    }

    /// Checks names and dtypes and returns the inputs in the graph's declaration order (what
    /// tract needs; ort takes names but the same order costs nothing).
    fn order_inputs<'a, 'v>(
        &self,
        inputs: &'a [(&'a str, ValueView<'v>)],
    ) -> Result<Vec<&'a ValueView<'v>>, EngineError> {
        let mut slots: Vec<Option<&'a ValueView<'v>>> = vec![None; self.inputs.len()];
        for (name, value) in inputs {
            let Some(ix) = self.inputs.iter().position(|i| i.name == *name) else {
                return Err(EngineError::UnknownInput {
                    graph: self.graph.clone(),
                    name: name.to_string(),
                    expected: self
                        .inputs
                        .iter()
                        .map(|i| i.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            if slots[ix].is_some() {
                return Err(EngineError::DuplicateInput {
                    graph: self.graph.clone(),
                    name: name.to_string(),
                });
            }
            let Some(expected) = self.inputs[ix].dtype else {
                return Err(EngineError::UnsupportedInputType {
                    graph: self.graph.clone(),
                    name: name.to_string(),
                });
            };
            if expected != value.dtype() {
                return Err(EngineError::InputDType {
                    graph: self.graph.clone(),
                    name: name.to_string(),
                    expected,
                    got: value.dtype(),
                });
            }
            slots[ix] = Some(value);
        }
        self.inputs
            .iter()
            .zip(slots)
            .map(|(info, slot)| {
                slot.ok_or_else(|| EngineError::MissingInput {
                    graph: self.graph.clone(),
                    name: info.name.clone(),
                })
            })
            .collect()
    }
}

type Loaded = (Backend, Vec<IoInfo>, Vec<IoInfo>);

fn load_backend(
    provider: Provider,
    model: &Arc<[u8]>,
    options: &EngineOptions,
    graph: &str,
) -> Result<Loaded, String> {
    match provider {
        Provider::Tract => {
            let e = tract_backend::TractEngine::load(model, options.threads, options.idle_wait)?;
            let (i, o) = (e.inputs(), e.outputs());
            Ok((Backend::Tract(e), i, o))
        }
        #[cfg(feature = "ort")]
        p => {
            let e = ort_backend::OrtEngine::load(p, Arc::clone(model), options, graph)?;
            let (i, o) = (e.inputs(), e.outputs());
            Ok((Backend::Ort(e), i, o))
        }
        #[cfg(not(feature = "ort"))]
        _ => {
            let _ = (options, graph);
            Err("this duet binary was built without the `ort` feature".to_string())
        }
    }
}

/// FLOPs of one run of the graph at `path` with inputs of the given shapes (tract's cost
/// model: 2 per multiply-add, 1 per division; a lower bound dominated by matrix products).
pub fn graph_flops(path: &Path, shapes: &[(&str, &[usize])]) -> Result<u64, String> {
    let bytes =
        duet_fsio::read_capped(path, MODEL_FILE_CAP, Follow::Yes).map_err(|e| e.to_string())?;
    graph_flops_of(&bytes, shapes)
}

/// [`graph_flops`] of a graph already in memory.
pub fn graph_flops_of(model: &[u8], shapes: &[(&str, &[usize])]) -> Result<u64, String> {
    tract_backend::graph_flops(model, shapes)
}

/// What this process can see of onnxruntime, for `duet info`.
#[derive(Debug, Clone)]
pub struct OrtInfo {
    /// The shared library that was loaded.
    pub library: PathBuf,
    /// Version, when it can be told from the library file name or build string.
    pub version: Option<String>,
    /// onnxruntime's build-info line.
    pub build_info: String,
    /// Execution providers compiled into the library (`GetAvailableProviders`).
    pub providers: Vec<String>,
}

/// Whether this build of the runtime has the onnxruntime engine (the `ort` feature); without it
/// only tract runs, and every ort provider is reported unavailable.
pub const ORT_COMPILED: bool = cfg!(feature = "ort");

/// Loads onnxruntime (if not already loaded) and describes it; `Err` carries the reason it is
/// unavailable, the same text engines report when they skip the ort providers.
pub fn ort_info(options: &EngineOptions) -> Result<OrtInfo, String> {
    #[cfg(feature = "ort")]
    {
        ort_backend::info(options)
    }
    #[cfg(not(feature = "ort"))]
    {
        let _ = options;
        Err("this duet binary was built without the `ort` feature".to_string())
    }
}

/// Where the runtime looks for `libonnxruntime`, in order, given `options` and the process
/// environment. Useful in messages and for `duet info`.
pub fn ort_library_candidates(options: &EngineOptions) -> Vec<PathBuf> {
    #[cfg(feature = "ort")]
    {
        ort_backend::library_candidates(options.ort_lib.as_deref())
    }
    #[cfg(not(feature = "ort"))]
    {
        let _ = options;
        Vec::new()
    }
}

#[cfg(test)]
mod op_profile_tests {
    use super::OpProfile;

    /// The warm-up run's kernels are left out and the rest averaged over the timed runs.
    #[test]
    fn ort_profiles_leave_out_the_warm_up_run() {
        let node = |ts: u64, name: &str, op: &str, dur: u64| {
            format!(
                r#"{{"cat":"Node","name":"{name}_kernel_time","ts":{ts},"dur":{dur},"args":{{"op_name":"{op}","provider":"CPUExecutionProvider"}}}}"#
            )
        };
        let run = |ts: u64, dur: u64| {
            format!(r#"{{"cat":"Session","name":"model_run","ts":{ts},"dur":{dur}}}"#)
        };
        let events = [
            run(0, 100),
            node(10, "mm", "MatMul", 90_000),
            run(200, 100),
            node(210, "mm", "MatMul", 400),
            node(260, "add", "Add", 100),
            run(400, 100),
            node(410, "mm", "MatMul", 600),
            node(460, "add", "Add", 300),
        ];
        let p = OpProfile::from_ort_profile(&format!("[{}]", events.join(","))).unwrap();
        assert_eq!(p.runs, 2);
        assert_eq!(p.ops.len(), 2);
        assert_eq!((p.ops[0].op.as_str(), p.ops[0].nodes), ("MatMul", 1));
        assert!((p.ops[0].ms_per_run - 0.5).abs() < 1e-9, "{p:?}");
        assert!((p.ops[1].ms_per_run - 0.2).abs() < 1e-9, "{p:?}");
        let only_warm_up = format!("[{},{}]", run(0, 100), node(10, "mm", "MatMul", 5));
        assert!(OpProfile::from_ort_profile(&only_warm_up).is_err());
    }
}

#[cfg(test)]
mod idle_wait_tests {
    use super::IdleWait;

    /// Each name parses back to its value (the CLI's `--idle-wait`, the bench worker's
    /// argument); others are an error naming both; spin is the default.
    #[test]
    fn idle_wait_names_round_trip() {
        for w in IdleWait::ALL {
            assert_eq!(w.to_string().parse::<IdleWait>(), Ok(w));
        }
        let e = "busy".parse::<IdleWait>().unwrap_err();
        assert!(e.contains("spin or sleep"), "{e}");
        assert_eq!(IdleWait::default(), IdleWait::Spin);
    }
}
