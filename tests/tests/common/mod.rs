//! Helpers shared by the end-to-end test binaries (each includes this module).

use std::path::{Path, PathBuf};

use duet_runtime::engine::EngineOptions;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repo")
        .to_path_buf()
}

/// Strict engines with onnxruntime as installed by `scripts/setup.sh`, unless `ORT_DYLIB_PATH`
/// says otherwise.
pub fn engine_options() -> EngineOptions {
    let local = repo_root().join(".ort/lib/libonnxruntime.so");
    EngineOptions {
        strict: true,
        ort_lib: (std::env::var_os("ORT_DYLIB_PATH").is_none() && local.is_file()).then_some(local),
        ..EngineOptions::default()
    }
}
