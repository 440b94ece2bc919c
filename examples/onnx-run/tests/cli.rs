//! The example on graphs no duet exporter wrote: every element type, a symbolic batch axis set
//! with `--dim`, an axis with neither size nor name, on tract and (when installed) under `auto`.

use std::path::{Path, PathBuf};
use std::process::Command;

use duet_runtime::manifest::DType;
use duet_testkit::{dtype_model, linear_model, ort_lib, unnamed_axis_model};

fn write(dir: &Path, name: &str, bytes: Vec<u8>) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn run(args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_duet-onnx-run"));
    cmd.args(args);
    if let Some(lib) = ort_lib() {
        cmd.arg("--ort-lib").arg(lib);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn runs_a_user_graph_on_tract_with_a_symbolic_axis_set() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "linear.onnx", linear_model());
    let (ok, out, err) = run(&[
        p.to_str().unwrap(),
        "--provider",
        "tract",
        "--dim",
        "batch=4",
    ]);
    assert!(ok, "{out}\n{err}");
    assert!(out.starts_with("linear: running on tract"), "{out}");
    assert!(out.contains("  x: f32 [batch, 3]"), "{out}");
    assert!(out.contains("feeding x f32 [4, 3]"), "{out}");
    assert!(
        out.contains("results on tract:\n  y: f32 [4, 2] min "),
        "{out}"
    );
}

#[test]
fn every_element_type_and_an_unnamed_axis() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in DType::ALL {
        let p = write(
            dir.path(),
            &format!("{dtype}.onnx"),
            dtype_model(dtype.onnx_code()),
        );
        let (ok, out, err) = run(&[p.to_str().unwrap(), "--provider", "tract"]);
        assert!(ok, "{dtype}: {out}\n{err}");
        assert!(
            out.contains(&format!("  same: {dtype} [1, 3]")),
            "{dtype}: {out}"
        );
        assert!(out.contains("  as_f32: f32 [1, 3] "), "{dtype}: {out}");
    }
    let p = write(dir.path(), "unnamed.onnx", unnamed_axis_model());
    let (ok, out, err) = run(&[p.to_str().unwrap(), "--provider", "tract"]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("  x: f32 [?, 3]"), "{out}");
    assert!(out.contains("  y: f32 [1, 2, 1] "), "{out}");
}

/// Under `auto` on a CPU-only onnxruntime, the GPU providers are passed over with
/// onnxruntime's own reasons and the CPU provider runs the graph.
#[test]
fn auto_says_which_provider_ran_and_why_not_the_others() {
    if ort_lib().is_none() {
        eprintln!("skipping: onnxruntime not installed (scripts/setup-ort.sh)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "linear.onnx", linear_model());
    let (ok, out, err) = run(&[p.to_str().unwrap()]);
    assert!(ok, "{out}\n{err}");
    assert!(out.starts_with("linear: running on ort-cpu"), "{out}");
    assert!(out.contains("\n  skipped tensorrt: "), "{out}");
    assert!(out.contains("\n  skipped cuda: "), "{out}");
    assert!(out.contains("results on ort-cpu:"), "{out}");
}

#[test]
fn a_file_that_is_not_onnx_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "junk.onnx", b"not a model".to_vec());
    let (ok, out, err) = run(&[p.to_str().unwrap(), "--provider", "tract"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("loading") && err.contains("junk.onnx"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
