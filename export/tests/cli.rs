//! `duet-export` refuses bad runs with a clear error and a non-zero exit.

use std::process::Command;

#[test]
fn missing_run_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_duet-export"))
        .arg("--run")
        .arg(dir.path().join("no-such-run"))
        .arg("--out")
        .arg(dir.path().join("bundle"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("cannot load training run"), "{e}");
    assert!(e.contains("config.json"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(
        !dir.path().join("bundle").exists(),
        "nothing may be written"
    );
}
