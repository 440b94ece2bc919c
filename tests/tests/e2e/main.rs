//! End to end, one test binary split by what it checks: generate ShapeWorld → train the tiny
//! captioner in Burn → export a verified ONNX bundle → caption with onnxruntime and tract
//! (`caption.rs`); train the tiny generator on top of that captioner → export all four graphs →
//! generate with onnxruntime, tract and Burn (`generate.rs`) and through the C ABI
//! (`c_abi.rs`); the unify stage (`unify.rs`); the fusion and restore stages (`restore.rs`) and
//! classification with a missing modality through the exported bundle (`classify.rs`); the
//! captioner trained on questions too, answering them in Burn, on both engines, through `duet
//! ask` and the C ABI (`vqa.rs`); the dream stage on top of that captioner's generator,
//! drawing and editing through its dream queries in Burn, on both engines, through `duet
//! edit` and the C ABI (`dream.rs`).
//!
//! Training is the slow part, so each fixture (data, run, bundle; `fixtures.rs`) is built once
//! per test binary under `CARGO_TARGET_TMPDIR` and shared by the tests. `DUET_E2E_STEPS` and
//! `DUET_E2E_GEN_STEPS` override the step budgets (defaults [`fixtures::CI_STEPS`],
//! [`fixtures::CI_GEN_STEPS`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

#[path = "../common/mod.rs"]
mod common;
use common::{engine_options, repo_root};
use std::sync::OnceLock;

use burn::backend::NdArray;
use duet_datasets::shapeworld::{load_dataset, write_dataset, Sample, SceneConfig};
use duet_export::{export_run, ExportError, ExportOptions};
use duet_models::CaptionModel;
use duet_run::load_generator;
use duet_run::{load_run, LoadedRun};
use duet_runtime::bundle::BundleError;
use duet_runtime::diffusion::{NoiseSchedule, Prediction, Sampler, SamplerConfig};
use duet_runtime::engine::{Provider, ProviderChoice};
use duet_runtime::graph::Graph;
use duet_runtime::preprocess::{self, ImageError};
use duet_runtime::{Bundle, Captioner, GenerateError, GenerateOptions, Generator};
use duet_train::eval::caption::{
    eval_caption, eval_generate, eval_reconstruction, GenerateEvalOptions,
};
use duet_train::eval::geneval::{Category, GenEvalReport};
use duet_train::metrics::{evaluate, CaptionMetrics};
use duet_train::stages::caption::{caption_samples, fit, prepare, FitArgs};
use duet_train::stages::generate::{fit_generate, GenerateFitArgs};
use duet_train::stages::unify::{
    fit_unify, ReconstructionSettings, UnifyFitArgs, STAGE1_DIR, STAGE2_DIR,
};

type Cpu = NdArray<f32>;

#[path = "../../../ffi/tests/c_build/mod.rs"]
mod c_build;

mod c_abi;
mod caption;
mod classify;
mod dream;
mod fixtures;
mod generate;
mod quantize;
mod restore;
mod unify;
mod vqa;

use fixtures::*;

/// `onnx.checker.check_model(full_check=True)` through Python's `onnx` package (installed by
/// `scripts/setup.sh`). Fails, never skips, when it is missing.
fn onnx_check(path: &Path) {
    let python = std::env::var("DUET_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .args([
            "-c",
            "import sys, onnx; onnx.checker.check_model(sys.argv[1], full_check=True); print('ok')",
        ])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        out.status.success(),
        "onnx.checker rejected {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The `duet` binary `cargo test --workspace` built next to this test (the runtime's own
/// integration tests make cargo build it into `target/<profile>/`).
fn duet_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let bin = profile_dir.join("duet");
    assert!(
        bin.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        bin.display()
    );
    bin
}

/// The onnxruntime library the CLI children load.
fn ort_dylib() -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".ort/lib/libonnxruntime.so"))
}
