//! `duet-edge` on the shipped bundle: what it prints, and what it does with bad arguments and
//! a full disk (it used to panic on a non-UTF-8 argument, ignore extra ones, and
//! write its PNG in place, losing the old one when the disk filled).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shipped/duet-small")
}

fn edge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_duet-edge"))
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn generates_then_captions_what_it_drew_with_a_quoted_file_name() {
    let dir = tempfile::tempdir().unwrap();
    // A newline in the name would split the TSV line: it is printed quoted.
    let out = dir.path().join("red\ncircle.png");
    let o = edge()
        .arg("generate")
        .arg(bundle())
        .arg(&out)
        .arg("a large red circle at the top left")
        .args(["--steps", "4", "--seed", "3"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("4 steps in"), "{stderr}");
    let png = image::open(&out).unwrap();
    assert_eq!((png.width(), png.height()), (32, 32));

    let o = edge()
        .arg("caption")
        .arg(bundle())
        .arg(&out)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert_eq!(stdout.lines().count(), 1, "one line per image: {stdout:?}");
    let (name, caption) = stdout.trim_end().split_once('\t').unwrap();
    assert!(
        name.starts_with('"') && name.contains("red\\ncircle.png"),
        "{name}"
    );
    assert!(!caption.trim().is_empty(), "{stdout:?}");
}

/// With a file-size limit of 100 bytes (what a full disk does to a write), the PNG cannot be
/// written: the command fails, the old file is whole, and no temporary file is left.
#[test]
fn a_full_disk_keeps_the_old_png_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    std::fs::write(&out, b"the previous picture").unwrap();
    let mut cmd = edge();
    cmd.arg("generate")
        .arg(bundle())
        .arg(&out)
        .arg("a large red circle at the top left")
        .args(["--steps", "2"]);
    // SAFETY: between fork and exec only async-signal-safe calls (signal, setrlimit).
    unsafe {
        cmd.pre_exec(|| {
            // Without this the kernel kills the process with SIGXFSZ; ignored, the write
            // returns EFBIG, the error a full disk gives as ENOSPC.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: 100,
                rlim_max: 100,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    let (stdout, stderr) = text(&o);
    assert!(!o.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("writing"), "{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), b"the previous picture");
    assert_eq!(entries(dir.path()), vec!["x.png".to_string()]);
}

#[test]
fn bad_arguments_are_usage_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let bad_utf8 = OsStr::from_bytes(b"a \xff\xfe prompt");
    let b = bundle();
    let b = b.as_os_str();
    let cases: Vec<Vec<&OsStr>> = vec![
        vec![],
        vec!["caption".as_ref()],
        vec!["caption".as_ref(), b],
        vec!["generate".as_ref(), b, "o.png".as_ref(), bad_utf8],
        vec![
            "generate".as_ref(),
            b,
            "o.png".as_ref(),
            "red".as_ref(),
            "extra".as_ref(),
        ],
        vec![
            "generate".as_ref(),
            b,
            "o.png".as_ref(),
            "red".as_ref(),
            "--steps".as_ref(),
            "many".as_ref(),
        ],
        vec!["frobnicate".as_ref()],
    ];
    for args in cases {
        let o = edge().current_dir(dir.path()).args(&args).output().unwrap();
        let (stdout, stderr) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {stdout}\n{stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error:") || stderr.contains("Usage:"),
            "{args:?}: {stderr}"
        );
    }
    assert!(entries(dir.path()).is_empty(), "nothing was written");
}

/// A missing output directory is reported at once, before the bundle is even opened.
#[test]
fn a_missing_output_directory_is_reported_before_sampling() {
    let o = edge()
        .arg("generate")
        .arg("/nonexistent/bundle")
        .arg("/nonexistent/dir/x.png")
        .arg("red")
        .output()
        .unwrap();
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the directory of /nonexistent/dir/x.png does not exist"),
        "{stderr}"
    );
}
