//! Compiling the C examples of `examples/c/` against the committed header and `libduet.so`,
//! and running them under valgrind. Shared by the ffi tests and the end-to-end tests (which
//! include this file with `#[path]`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where cargo put `libduet.so` for this build: `target/<profile>/deps` (next to the test
/// executable) when built for the tests, `target/<profile>` after a plain `cargo build`.
pub fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let found = [deps, deps.parent().unwrap()]
        .into_iter()
        .find(|d| d.join("libduet.so").is_file())
        .unwrap_or(deps)
        .to_path_buf();
    found
}

/// `cc -Wall -Wextra -Werror` of `examples/c/<name>.c` into `out/<name>`.
pub fn compile(name: &str, out: &Path) -> PathBuf {
    let lib_dir = lib_dir();
    assert!(
        lib_dir.join("libduet.so").is_file(),
        "no libduet.so in {}",
        lib_dir.display()
    );
    let exe = out.join(name);
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g"])
        .arg("-I")
        .arg(repo_root().join("ffi/include"))
        .arg(repo_root().join(format!("examples/c/{name}.c")))
        .arg("-L")
        .arg(&lib_dir)
        .arg("-lduet")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-o")
        .arg(&exe)
        .status()
        .expect("a C compiler (cc) is needed for this test");
    assert!(status.success(), "cc failed on {name}.c");
    exe
}

/// True when valgrind is installed. CI must check memory safety, not skip it: there
/// `scripts/setup.sh` installs valgrind, so its absence is a failure.
pub fn have_valgrind() -> bool {
    let valgrind = Command::new("valgrind").arg("--version").output().is_ok();
    assert!(
        valgrind || std::env::var("CI").as_deref() != Ok("true"),
        "valgrind is required in CI"
    );
    if !valgrind {
        eprintln!("valgrind not installed: running the C example without it");
    }
    valgrind
}

/// A command running `exe` under valgrind (leak check, errors exit 99) when `valgrind`.
///
/// The loader is pointed at the `libduet.so` `exe` was linked against: cargo runs tests with
/// `LD_LIBRARY_PATH` holding both `target/<profile>/deps` and `target/<profile>`, and a stale
/// `libduet.so` from an earlier plain `cargo build` in the latter would otherwise win over the
/// executable's rpath.
pub fn command(exe: &Path, valgrind: bool) -> Command {
    let mut c = if valgrind {
        Command::new("valgrind")
    } else {
        Command::new(exe)
    };
    c.env("LD_LIBRARY_PATH", lib_dir());
    if !valgrind {
        return c;
    }
    c.arg(format!(
        "--suppressions={}",
        repo_root().join("examples/c/valgrind.supp").display()
    ))
    .args([
        "--quiet",
        "--error-exitcode=99",
        // Deep enough that the suppression's `OptimizerSession::optimize` frame is recorded.
        "--num-callers=64",
        "--leak-check=full",
        "--errors-for-leak-kinds=definite,indirect",
        "--show-leak-kinds=definite,indirect",
    ])
    .arg(exe);
    c
}

/// The run was clean under valgrind: no leaks, no invalid accesses.
pub fn assert_clean(stderr: &str, valgrind: bool) {
    if valgrind {
        assert!(!stderr.contains("definitely lost"), "{stderr}");
        assert!(
            !stderr.contains("Invalid read") && !stderr.contains("Invalid write"),
            "{stderr}"
        );
    }
}

/// Runs `cmd`, asserts it exited 0, and returns its stdout and stderr.
pub fn run_ok(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status.code()
    );
    (stdout, stderr)
}
