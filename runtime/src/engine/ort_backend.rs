//! onnxruntime backend through `ort` (load-dynamic).
//!
//! The library is loaded once per process with [`ort::init_from`] from an explicit path, never
//! through ort's implicit loader: that one panics when the library is missing, while here a
//! missing or broken library is just the reason the ort providers are skipped. The load is also
//! wrapped in `catch_unwind`, since ort asserts on a few malformed-library conditions.
//!
//! GPU execution providers are registered with `error_on_failure()`. By default ort *logs* a
//! failed registration and carries on, so the session silently runs on CPU; with
//! `error_on_failure` the registration error (the text onnxruntime returns, e.g. that this build
//! has no CUDA support, or which `libcudart` could not be loaded) comes back to us and becomes
//! the skip reason, and a session we report as `cuda` really has the CUDA EP registered. The
//! CPU provider is registered explicitly too, so onnxruntime's automatic EP selection policy
//! (which ort enables on every session builder) never moves an `ort-cpu` graph elsewhere.
//!
//! Note that even with the CUDA EP registered, onnxruntime places a few nodes (shape
//! arithmetic) on the CPU by design; that is normal partitioning, not a fallback.

use std::collections::HashMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ndarray::ArrayViewD;
use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider, ExecutionProviderDispatch};
use ort::session::{Session, SessionInputValue};
use ort::value::{PrimitiveTensorElementType, Tensor, TensorElementType, TensorRef, ValueType};

use super::{
    EngineOptions, IoInfo, OpProfile, OrtInfo, Placement, Provider, TensorRtOptions, Value,
    ValueView,
};
use crate::manifest::{DType, DimSpec};

/// The loaded library and the process-wide ort environment (ort allows one per process).
struct OrtRuntime {
    library: PathBuf,
    env: Environment,
    build_info: String,
    providers: Vec<String>,
}

static RUNTIME: Mutex<Option<Arc<OrtRuntime>>> = Mutex::new(None);

fn lib_file_name() -> String {
    format!(
        "{}onnxruntime{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// Candidate library paths in search order. An explicit path (option, then `ORT_DYLIB_PATH`)
/// is the only candidate when given: silently loading some other library would hide a typo.
pub(super) fn library_candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        return vec![p.to_path_buf()];
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    default_candidates(std::env::current_exe().ok().as_deref())
}

/// The two fixed places a library is loaded from when none is named: beside the executable
/// (how an application ships it) and the `.ort/lib/` that `scripts/setup.sh` fills in the
/// source tree this crate was built from (an absolute path fixed at compile time). Never the
/// working directory or any parent of it, nor the parents of the executable's folder: a
/// library planted in any of those would run its code inside every `duet` process and every C
/// host that passes no library path.
pub(super) fn default_candidates(exe: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(exe_dir) = exe.and_then(Path::parent).filter(|d| d.is_absolute()) {
        out.push(exe_dir.join(lib_file_name()));
    }
    let built_tree = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|root| root.join(".ort").join("lib").join(lib_file_name()));
    out.extend(built_tree.filter(|p| p.is_absolute()));
    out.dedup();
    out
}

fn locate_library(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let candidates = library_candidates(explicit);
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(std::path::absolute(found).unwrap_or_else(|_| found.clone()));
    }
    let source = if explicit.is_some() {
        "the explicit path: --ort-lib, or `ort_library` in the C ABI"
    } else if std::env::var_os("ORT_DYLIB_PATH").is_some_and(|p| !p.is_empty()) {
        "ORT_DYLIB_PATH"
    } else {
        "the default places: beside the executable and the build tree's .ort/lib (run \
         scripts/setup.sh, or set ORT_DYLIB_PATH)"
    };
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(format!(
        "libonnxruntime not found: looked in {} (from {source})",
        looked.join(", ")
    ))
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The process's ort runtime, loading the library on first use.
fn runtime(explicit: Option<&Path>) -> Result<Arc<OrtRuntime>, String> {
    let library = locate_library(explicit)?;
    let mut slot = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(rt) = slot.as_ref() {
        if same_file(&rt.library, &library) {
            return Ok(Arc::clone(rt));
        }
        return Err(format!(
            "onnxruntime is already loaded in this process from {}; cannot also load {}",
            rt.library.display(),
            library.display()
        ));
    }
    let init = crate::panic_guard::catch(|| -> Result<OrtRuntime, String> {
        let builder =
            ort::init_from(&library).map_err(|e| format!("loading {}: {e}", library.display()))?;
        let env = builder
            .with_name("duet")
            .with_telemetry(false)
            .build()
            .map_err(|e| format!("creating the onnxruntime environment: {e}"))?;
        let build_info = ort::info().to_string();
        let providers = available_providers()?;
        Ok(OrtRuntime {
            library: library.clone(),
            env,
            build_info,
            providers,
        })
    });
    let rt = match init {
        Ok(r) => Arc::new(r?),
        Err(panic) => return Err(format!("loading {} {panic}", library.display())),
    };
    tracing::debug!(
        "onnxruntime loaded from {} ({})",
        rt.library.display(),
        rt.build_info
    );
    *slot = Some(Arc::clone(&rt));
    Ok(rt)
}

/// `GetAvailableProviders`: the execution providers compiled into the loaded library.
///
/// ort only exposes this per EP type (`ExecutionProvider::is_available`); the raw call lists
/// every EP, including ones this crate has no type for.
fn available_providers() -> Result<Vec<String>, String> {
    let api = ort::api();
    let mut list: *mut *mut std::ffi::c_char = std::ptr::null_mut();
    let mut len: std::ffi::c_int = 0;
    // SAFETY: the library is loaded (`init_from` succeeded) so `api` is valid; both out
    // pointers point at live locals.
    let status = unsafe { (api.GetAvailableProviders)(&mut list, &mut len) };
    if !status.0.is_null() {
        // SAFETY: a non-null status returned by onnxruntime, released exactly once.
        unsafe { (api.ReleaseStatus)(status.0) };
        return Err("GetAvailableProviders failed".to_string());
    }
    if list.is_null() {
        return Ok(Vec::new());
    }
    let n = usize::try_from(len).unwrap_or(0);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: onnxruntime returned `len` valid NUL-terminated strings at `list`.
        let s = unsafe { std::ffi::CStr::from_ptr(*list.add(i)) };
        out.push(s.to_string_lossy().into_owned());
    }
    // SAFETY: releasing the array returned above with its own length.
    let status = unsafe { (api.ReleaseAvailableProviders)(list, len) };
    if !status.0.is_null() {
        // SAFETY: as above.
        unsafe { (api.ReleaseStatus)(status.0) };
    }
    Ok(out)
}

pub(super) fn info(options: &EngineOptions) -> Result<OrtInfo, String> {
    let rt = runtime(options.ort_lib.as_deref())?;
    let version = rt
        .library
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .and_then(|f| f.split_once(".so.").map(|(_, v)| v.to_string()))
        .or_else(|| {
            rt.build_info
                .split(|c: char| c == ',' || c.is_whitespace())
                .find_map(|t| t.strip_prefix("git-branch=rel-"))
                .map(str::to_string)
        });
    Ok(OrtInfo {
        library: rt.library.clone(),
        version,
        build_info: rt.build_info.clone(),
        providers: rt.providers.clone(),
    })
}

pub(super) struct OrtEngine {
    /// `Session::run` takes `&mut self` (onnxruntime's allocators are not thread safe), so
    /// concurrent callers of one engine take turns.
    session: Mutex<Session>,
    inputs: Vec<IoInfo>,
    outputs: Vec<IoInfo>,
    /// What the session was made from, so [`OrtEngine::placement`] can make a profiling twin.
    provider: Provider,
    model: Arc<[u8]>,
    /// The onnxruntime library the session runs in (for the provider report).
    library: PathBuf,
    options: EngineOptions,
    graph: String,
}

/// The declared shape of a tensor input (onnxruntime says -1 for a dynamic axis).
/// The declared axes of an input or output: onnxruntime reports a dynamic axis as -1 with its
/// symbol, or an empty symbol when the graph names none.
fn dims_of(t: &ValueType) -> Option<Vec<Option<DimSpec>>> {
    match t {
        ValueType::Tensor {
            shape,
            dimension_symbols,
            ..
        } => Some(
            shape
                .iter()
                .enumerate()
                .map(|(axis, &d)| match usize::try_from(d) {
                    Ok(n) => Some(DimSpec::Fixed(n)),
                    Err(_) => dimension_symbols
                        .get(axis)
                        .filter(|s| !s.is_empty())
                        .map(|s| DimSpec::Symbolic(s.clone())),
                })
                .collect(),
        ),
        _ => None,
    }
}

fn dtype_of(t: &ValueType) -> Option<DType> {
    let ValueType::Tensor { ty, .. } = t else {
        return None;
    };
    match ty {
        TensorElementType::Float32 => Some(DType::F32),
        TensorElementType::Float16 => Some(DType::F16),
        TensorElementType::Int64 => Some(DType::I64),
        TensorElementType::Int32 => Some(DType::I32),
        TensorElementType::Int8 => Some(DType::I8),
        TensorElementType::Uint8 => Some(DType::U8),
        TensorElementType::Bool => Some(DType::Bool),
        _ => None,
    }
}

fn io_info(o: &ort::value::Outlet) -> IoInfo {
    IoInfo {
        name: o.name().to_string(),
        dtype: dtype_of(o.dtype()),
        dims: dims_of(o.dtype()),
    }
}

/// The TensorRT execution provider with duet's options: fp16 when asked, and an engine (plus
/// timing) cache in `engine_cache` so a second start loads the engine instead of rebuilding
/// it. Cached engines are named after the graph (`trt_engine_cache_prefix`), which is how
/// [`cached_trt_engines`] tells a cold start from a warm one.
fn tensorrt_ep(options: &TensorRtOptions, graph: &str) -> ep::TensorRT {
    let mut trt = ep::TensorRT::default().with_fp16(options.fp16);
    if options.fp16 {
        // LayerNorm in fp16 loses too much (its variance underflows); TensorRT keeps it fp32.
        trt = trt.with_layer_norm_fp32_fallback(true);
    }
    if let Some(dir) = &options.engine_cache {
        let dir = dir.display().to_string();
        trt = trt
            .with_engine_cache(true)
            .with_engine_cache_path(&dir)
            .with_engine_cache_prefix(graph)
            .with_timing_cache(true)
            .with_timing_cache_path(&dir);
    }
    trt
}

/// Engine files TensorRT cached for `graph` in `dir` (see [`tensorrt_ep`]).
pub(super) fn cached_trt_engines(dir: &Path, graph: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(graph) && n[graph.len()..].starts_with('_') && n.ends_with(".engine")
            })
        })
        .collect();
    found.sort();
    found
}

/// Says, before onnxruntime starts TensorRT, whether an engine is about to be built (minutes
/// for a large graph, so the user should know why nothing happens) or loaded from the cache.
fn log_trt_start(options: &TensorRtOptions, graph: &str) {
    match &options.engine_cache {
        None => tracing::info!(
            "TensorRT: building the engine for `{graph}` (cold start, can take minutes; \
             pass --trt-cache DIR to build it once)"
        ),
        Some(dir) => {
            let cached = cached_trt_engines(dir, graph);
            if cached.is_empty() {
                tracing::info!(
                    "TensorRT: no cached engine for `{graph}` in {}: building it (cold start, \
                     can take minutes; later starts reuse it)",
                    dir.display()
                );
            } else {
                tracing::info!(
                    "TensorRT: loading the cached engine for `{graph}` from {}",
                    cached[0].display()
                );
            }
        }
    }
}

/// The execution providers that make up `provider`, each failing loudly.
fn execution_providers(
    provider: Provider,
    options: &EngineOptions,
    graph: &str,
) -> Vec<(&'static str, ExecutionProviderDispatch)> {
    match provider {
        // TensorRT takes the subgraphs it supports; CUDA (not the CPU) gets the rest.
        Provider::TensorRt => vec![
            (
                ep::TensorRT::NAME,
                tensorrt_ep(&options.tensorrt, graph)
                    .build()
                    .error_on_failure(),
            ),
            (
                ep::CUDA::NAME,
                ep::CUDA::default().build().error_on_failure(),
            ),
        ],
        Provider::Cuda => vec![(
            ep::CUDA::NAME,
            ep::CUDA::default().build().error_on_failure(),
        )],
        // ort's `ep::CPU::default()` turns onnxruntime's memory arena *off* (its `use_arena`
        // defaults to false), so every intermediate tensor of every run would be a fresh
        // malloc/free; onnxruntime's own default (and Python's) keeps the arena on.
        Provider::OrtCpu | Provider::Tract => vec![(
            ep::CPU::NAME,
            ep::CPU::default()
                .with_arena_allocator(true)
                .build()
                .error_on_failure(),
        )],
    }
}

/// A session builder with `provider`'s execution providers registered (each failing loudly),
/// and the library's list of providers for the error message when one is missing.
fn session_builder(
    provider: Provider,
    options: &EngineOptions,
    graph: &str,
) -> Result<ort::session::builder::SessionBuilder, String> {
    let rt = runtime(options.ort_lib.as_deref())?;
    let eps = execution_providers(provider, options, graph);
    let missing: Vec<&str> = eps
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !rt.providers.iter().any(|p| p == name))
        .collect();
    let mut builder = Session::builder(&rt.env).map_err(|e| e.to_string())?;
    if let Some(n) = options.threads {
        builder = builder
            .with_intra_threads(n.get())
            .map_err(|e| format!("onnxruntime refused {n} intra-op threads: {e}"))?;
    }
    if options.idle_wait == super::IdleWait::Sleep {
        builder = builder
            .with_intra_op_spinning(false)
            .map_err(|e| format!("onnxruntime refused to turn intra-op spinning off: {e}"))?;
    }
    let dispatch: Vec<ExecutionProviderDispatch> = eps.into_iter().map(|(_, d)| d).collect();
    builder.with_execution_providers(dispatch).map_err(|e| {
        let mut reason = format!("onnxruntime refused the execution provider: {e}");
        if !missing.is_empty() {
            reason.push_str(&format!(
                " ({} not compiled into {}, which has: {})",
                missing.join(", "),
                rt.library.display(),
                rt.providers.join(", ")
            ));
        }
        reason
    })
}

fn commit(
    mut builder: ort::session::builder::SessionBuilder,
    provider: Provider,
    options: &EngineOptions,
    model: &[u8],
    graph: &str,
) -> Result<Session, String> {
    if provider == Provider::TensorRt {
        log_trt_start(&options.tensorrt, graph);
    }
    match crate::panic_guard::catch(|| builder.commit_from_memory(model)) {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("onnxruntime could not load the graph: {e}")),
        Err(panic) => Err(format!("onnxruntime {panic} loading the graph")),
    }
}

impl OrtEngine {
    pub(super) fn load(
        provider: Provider,
        model: Arc<[u8]>,
        options: &EngineOptions,
        graph: &str,
    ) -> Result<OrtEngine, String> {
        let builder = session_builder(provider, options, graph)?;
        let session = commit(builder, provider, options, &model, graph)?;
        let library = runtime(options.ort_lib.as_deref())?.library.clone();
        let inputs = session.inputs().iter().map(io_info).collect();
        let outputs = session.outputs().iter().map(io_info).collect();
        Ok(OrtEngine {
            session: Mutex::new(session),
            inputs,
            outputs,
            provider,
            model,
            library,
            options: options.clone(),
            graph: graph.to_string(),
        })
    }

    /// Where onnxruntime really ran each node: a twin session with profiling on runs `ordered`
    /// once, and the profile's node events (each names its execution provider) are counted.
    /// This is the ground truth the provider report is checked against.
    pub(super) fn placement(
        &self,
        infos: &[IoInfo],
        ordered: &[&ValueView<'_>],
    ) -> Result<Placement, String> {
        Placement::from_ort_profile(&self.profiled_runs(infos, ordered, 1)?)
    }

    /// Per-operator time: a profiling twin runs once to warm up, then `runs` times.
    pub(super) fn op_profile(
        &self,
        infos: &[IoInfo],
        ordered: &[&ValueView<'_>],
        runs: usize,
    ) -> Result<OpProfile, String> {
        OpProfile::from_ort_profile(&self.profiled_runs(infos, ordered, runs + 1)?)
    }

    /// The profile (JSON text) of a twin session with profiling on that ran `ordered` `runs`
    /// times.
    fn profiled_runs(
        &self,
        infos: &[IoInfo],
        ordered: &[&ValueView<'_>],
        runs: usize,
    ) -> Result<String, String> {
        // onnxruntime names the profile after this prefix; a private directory (created
        // exclusively, removed on return) keeps it away from predictable names in /tmp.
        let private = tempfile::Builder::new()
            .prefix("duet-profile-")
            .tempdir()
            .map_err(|e| format!("creating a directory for the profile: {e}"))?;
        let prefix = private.path().join("profile");
        let builder = session_builder(self.provider, &self.options, &self.graph)?
            .with_profiling(&prefix)
            .map_err(|e| format!("enabling profiling: {e}"))?;
        let mut session = commit(
            builder,
            self.provider,
            &self.options,
            &self.model,
            &self.graph,
        )?;
        for _ in 0..runs {
            let feed = feed(infos, ordered).map_err(|(_, e)| e)?;
            session.run(feed).map_err(|e| e.to_string())?;
        }
        let file = PathBuf::from(
            session
                .end_profiling()
                .map_err(|e| format!("ending profiling: {e}"))?,
        );
        let text = std::fs::read_to_string(&file);
        let _ = std::fs::remove_file(&file);
        text.map_err(|e| format!("reading the profile {}: {e}", file.display()))
    }

    pub(super) fn inputs(&self) -> Vec<IoInfo> {
        self.inputs.clone()
    }

    pub(super) fn library(&self) -> &Path {
        &self.library
    }

    pub(super) fn outputs(&self) -> Vec<IoInfo> {
        self.outputs.clone()
    }

    pub(super) fn run(
        &self,
        infos: &[IoInfo],
        ordered: &[&ValueView<'_>],
        output_names: &[String],
    ) -> Result<HashMap<String, Value>, (Option<String>, String)> {
        let feed = feed(infos, ordered)?;
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session.run(feed).map_err(|e| (None, e.to_string()))?;
        let mut out = HashMap::with_capacity(output_names.len());
        for name in output_names {
            let v = outputs
                .get(name.as_str())
                .ok_or_else(|| (Some(name.clone()), "not produced".to_string()))?;
            let value = to_value(v).map_err(|e| (Some(name.clone()), e))?;
            out.insert(name.clone(), value);
        }
        Ok(out)
    }
}

type Feed<'v> = Vec<(String, SessionInputValue<'v>)>;

/// The inputs as ort values, in the graph's order.
fn feed<'a>(
    infos: &[IoInfo],
    ordered: &[&'a ValueView<'_>],
) -> Result<Feed<'a>, (Option<String>, String)> {
    let mut feed = Vec::with_capacity(ordered.len());
    for (info, value) in infos.iter().zip(ordered) {
        let v = match value {
            ValueView::F32(a) => input_value(a.view()),
            ValueView::F16(a) => input_value(a.view()),
            ValueView::I64(a) => input_value(a.view()),
            ValueView::I32(a) => input_value(a.view()),
            ValueView::I8(a) => input_value(a.view()),
            ValueView::U8(a) => input_value(a.view()),
            ValueView::Bool(a) => input_value(a.view()),
        }
        .map_err(|e| (None, format!("input `{}`: {e}", info.name)))?;
        feed.push((info.name.clone(), v));
    }
    Ok(feed)
}

/// An output of onnxruntime as a [`Value`] (copied out of ort's buffer); `Err` names a type
/// the engines do not return.
fn to_value(v: &ort::value::DynValue) -> Result<Value, String> {
    fn owned<T: PrimitiveTensorElementType + Clone + 'static>(
        v: &ort::value::DynValue,
    ) -> Result<ndarray::ArrayD<T>, String> {
        v.try_extract_array::<T>()
            .map(|a| a.to_owned())
            .map_err(|e| e.to_string())
    }
    match dtype_of(v.dtype()) {
        Some(DType::F32) => owned(v).map(Value::F32),
        Some(DType::F16) => owned(v).map(Value::F16),
        Some(DType::I64) => owned(v).map(Value::I64),
        Some(DType::I32) => owned(v).map(Value::I32),
        Some(DType::I8) => owned(v).map(Value::I8),
        Some(DType::U8) => owned(v).map(Value::U8),
        Some(DType::Bool) => owned(v).map(Value::Bool),
        None => Err(format!(
            "type {:?}, which the engines do not return (f32, f16, i64, i32, i8, u8, bool)",
            v.dtype()
        )),
    }
}

/// A borrowed ort tensor over the caller's data when it is contiguous (no copy); a copy only for
/// non-standard layouts, which onnxruntime cannot read in place.
fn input_value<'v, T>(a: ArrayViewD<'v, T>) -> ort::Result<SessionInputValue<'v>>
where
    T: PrimitiveTensorElementType + Debug + Clone + 'static,
{
    if a.is_standard_layout() {
        Ok(TensorRef::from_array_view(a)?.into())
    } else {
        Ok(Tensor::from_array(a.as_standard_layout().into_owned())?.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the executable's own folder and the build tree's `.ort/lib` are default places:
    /// no working directory, no parent folders (a library planted there would run its code).
    #[test]
    fn default_library_places_are_fixed() {
        let exe = Path::new("/opt/app/bin/duet");
        let got = default_candidates(Some(exe));
        let tree = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        assert_eq!(
            got,
            vec![
                Path::new("/opt/app/bin").join(lib_file_name()),
                tree.join(".ort").join("lib").join(lib_file_name()),
            ]
        );
        let cwd = std::env::current_dir().unwrap();
        assert!(got.iter().all(|p| p.is_absolute()));
        assert!(!got.contains(&cwd.join(".ort").join("lib").join(lib_file_name())) || cwd == tree);
        // A relative executable path (not produced by `current_exe`) adds nothing.
        assert_eq!(default_candidates(Some(Path::new("duet"))).len(), 1);
    }

    /// Cold vs warm TensorRT start is told by the engines cached under the graph's prefix.
    #[test]
    fn cached_engines_are_found_by_graph_prefix() {
        let dir = std::env::temp_dir().join(format!("duet-trt-cache-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(cached_trt_engines(&dir, "denoiser").is_empty());
        for name in [
            "denoiser_1234_0_0_sm90.engine",
            "denoiser_1234_0_0_sm90.profile",
            "denoiser2_77_sm90.engine",
            "text_encoder_9_sm90.engine",
        ] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        let found = cached_trt_engines(&dir, "denoiser");
        assert_eq!(found, vec![dir.join("denoiser_1234_0_0_sm90.engine")]);
        assert_eq!(cached_trt_engines(&dir, "text_encoder").len(), 1);
        assert!(cached_trt_engines(&dir.join("absent"), "denoiser").is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
