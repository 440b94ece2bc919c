//! `duet-export` refuses bad runs with a clear error and a non-zero exit, and converts bundles
//! between a directory and a single file.

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

fn export_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_duet-export"))
}

/// Nothing is left behind by a failed single-file export either (it stages a directory
/// beside the file).
#[test]
fn a_failed_single_file_export_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = export_cmd()
        .arg("--run")
        .arg(dir.path().join("no-such-run"))
        .arg("--out")
        .arg(dir.path().join("model.duet"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn pack_and_unpack_convert_a_bundle_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    let manifest = duet_testkit::caption_bundle(&bundle, -100.0);
    let file = dir.path().join("model.duet");
    let out = export_cmd()
        .arg("pack")
        .arg(&bundle)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let opened = duet_runtime::Bundle::open(&file).unwrap();
    assert_eq!(opened.manifest(), &manifest);

    let back = dir.path().join("back");
    let out = export_cmd()
        .arg("unpack")
        .arg(&file)
        .arg(&back)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = manifest.files.keys().cloned().collect();
    names.push("manifest.json".into());
    for name in &names {
        assert_eq!(
            std::fs::read(back.join(name)).unwrap(),
            std::fs::read(bundle.join(name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(std::fs::read_dir(&back).unwrap().count(), names.len());

    // Neither overwrites what is not a bundle of its own form.
    let precious = dir.path().join("precious.duet");
    std::fs::write(&precious, b"not a bundle").unwrap();
    let out = export_cmd()
        .arg("pack")
        .arg(&bundle)
        .arg(&precious)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("refusing to replace it"), "{e}");
    assert_eq!(std::fs::read(&precious).unwrap(), b"not a bundle");
    let out = export_cmd()
        .arg("unpack")
        .arg(&file)
        .arg(&back)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    // A damaged file is refused before anything is written.
    let damaged = dir.path().join("damaged.duet");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x55;
    std::fs::write(&damaged, bytes).unwrap();
    let out = export_cmd()
        .arg("unpack")
        .arg(&damaged)
        .arg(dir.path().join("never"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!dir.path().join("never").exists());
}
