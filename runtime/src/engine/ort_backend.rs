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
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ndarray::ArrayViewD;
use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider, ExecutionProviderDispatch};
use ort::session::{Session, SessionInputValue};
use ort::value::{PrimitiveTensorElementType, Tensor, TensorElementType, TensorRef, ValueType};

use super::{EngineOptions, IoInfo, OrtInfo, Provider, Value, ValueView};
use crate::manifest::DType;

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
    let rel = Path::new(".ort").join("lib").join(lib_file_name());
    let mut out = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        out.extend(cwd.ancestors().map(|d| d.join(&rel)));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        out.push(exe_dir.join(lib_file_name()));
        out.extend(exe_dir.ancestors().map(|d| d.join(&rel)));
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

fn locate_library(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let candidates = library_candidates(explicit);
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(std::path::absolute(found).unwrap_or_else(|_| found.clone()));
    }
    let source = if explicit.is_some() {
        "the --ort-lib option"
    } else if std::env::var_os("ORT_DYLIB_PATH").is_some_and(|p| !p.is_empty()) {
        "ORT_DYLIB_PATH"
    } else {
        "the default search (run scripts/setup-ort.sh, or set ORT_DYLIB_PATH)"
    };
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(format!(
        "libonnxruntime not found: looked in {} (from {source})",
        looked.join(", ")
    ))
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
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
    let init = catch_unwind(AssertUnwindSafe(|| -> Result<OrtRuntime, String> {
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
    }));
    let rt = match init {
        Ok(r) => Arc::new(r?),
        Err(p) => {
            return Err(format!(
                "loading {} panicked: {}",
                library.display(),
                panic_text(p)
            ))
        }
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
    outputs: Vec<String>,
}

fn dtype_of(t: &ValueType) -> Option<DType> {
    match t {
        ValueType::Tensor {
            ty: TensorElementType::Float32,
            ..
        } => Some(DType::F32),
        ValueType::Tensor {
            ty: TensorElementType::Int64,
            ..
        } => Some(DType::I64),
        _ => None,
    }
}

/// The execution providers that make up `provider`, each failing loudly.
fn execution_providers(provider: Provider) -> Vec<(&'static str, ExecutionProviderDispatch)> {
    match provider {
        // TensorRT takes the subgraphs it supports; CUDA (not the CPU) gets the rest.
        Provider::TensorRt => vec![
            (
                ep::TensorRT::NAME,
                ep::TensorRT::default().build().error_on_failure(),
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
        Provider::OrtCpu | Provider::Tract => {
            vec![(ep::CPU::NAME, ep::CPU::default().build().error_on_failure())]
        }
    }
}

impl OrtEngine {
    pub(super) fn load(
        provider: Provider,
        path: &Path,
        options: &EngineOptions,
    ) -> Result<OrtEngine, String> {
        let rt = runtime(options.ort_lib.as_deref())?;
        let eps = execution_providers(provider);
        let missing: Vec<&str> = eps
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| !rt.providers.iter().any(|p| p == name))
            .collect();
        let builder = Session::builder(&rt.env).map_err(|e| e.to_string())?;
        let dispatch: Vec<ExecutionProviderDispatch> = eps.into_iter().map(|(_, d)| d).collect();
        let mut builder = match builder.with_execution_providers(dispatch) {
            Ok(b) => b,
            Err(e) => {
                let mut reason = format!("onnxruntime refused the execution provider: {e}");
                if !missing.is_empty() {
                    reason.push_str(&format!(
                        " ({} not compiled into {}, which has: {})",
                        missing.join(", "),
                        rt.library.display(),
                        rt.providers.join(", ")
                    ));
                }
                return Err(reason);
            }
        };
        let load = catch_unwind(AssertUnwindSafe(|| builder.commit_from_file(path)));
        let session = match load {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("onnxruntime could not load the graph: {e}")),
            Err(p) => {
                return Err(format!(
                    "onnxruntime panicked loading the graph: {}",
                    panic_text(p)
                ))
            }
        };
        let inputs = session
            .inputs()
            .iter()
            .map(|o| IoInfo {
                name: o.name().to_string(),
                dtype: dtype_of(o.dtype()),
            })
            .collect();
        let outputs = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        Ok(OrtEngine {
            session: Mutex::new(session),
            inputs,
            outputs,
        })
    }

    pub(super) fn inputs(&self) -> Vec<IoInfo> {
        self.inputs.clone()
    }

    pub(super) fn outputs(&self) -> Vec<String> {
        self.outputs.clone()
    }

    pub(super) fn run(
        &self,
        infos: &[IoInfo],
        ordered: &[&ValueView<'_>],
        output_names: &[String],
    ) -> Result<HashMap<String, Value>, (Option<String>, String)> {
        let mut feed: Vec<(String, SessionInputValue<'_>)> = Vec::with_capacity(ordered.len());
        for (info, value) in infos.iter().zip(ordered) {
            let v = match value {
                ValueView::F32(a) => input_value(a.view()),
                ValueView::I64(a) => input_value(a.view()),
            }
            .map_err(|e| (None, format!("input `{}`: {e}", info.name)))?;
            feed.push((info.name.clone(), v));
        }
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session.run(feed).map_err(|e| (None, e.to_string()))?;
        let mut out = HashMap::with_capacity(output_names.len());
        for name in output_names {
            let v = outputs
                .get(name.as_str())
                .ok_or_else(|| (Some(name.clone()), "not produced".to_string()))?;
            let value = if let Ok(a) = v.try_extract_array::<f32>() {
                Value::F32(a.to_owned())
            } else if let Ok(a) = v.try_extract_array::<i64>() {
                Value::I64(a.to_owned())
            } else {
                return Err((
                    Some(name.clone()),
                    format!("unsupported type {:?} (duet uses f32 and i64)", v.dtype()),
                ));
            };
            out.insert(name.clone(), value);
        }
        Ok(out)
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
