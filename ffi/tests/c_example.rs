//! `examples/c/caption.c` compiled with `cc` against the committed header and `libduet.so`,
//! run on a bundle (under valgrind when it is installed, which `scripts/setup.sh` ensures in CI):
//! same captions as the Rust runtime, zero leaks, zero invalid accesses.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use duet_runtime::engine::{EngineOptions, Provider, ProviderChoice};
use duet_runtime::{Bundle, Captioner};

/// Where cargo put `libduet.so` for this build: `target/<profile>/deps` (next to this test's
/// executable) when built for the tests, `target/<profile>` after a plain `cargo build`.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let found = [deps, deps.parent().unwrap()]
        .into_iter()
        .find(|d| d.join("libduet.so").is_file())
        .unwrap_or(deps)
        .to_path_buf();
    found
}

fn compile(out: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let lib_dir = lib_dir();
    assert!(
        lib_dir.join("libduet.so").is_file(),
        "no libduet.so in {}",
        lib_dir.display()
    );
    let exe = out.join("caption");
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g"])
        .arg("-I")
        .arg(repo.join("ffi/include"))
        .arg(repo.join("examples/c/caption.c"))
        .arg("-L")
        .arg(&lib_dir)
        .arg("-lduet")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-o")
        .arg(&exe)
        .status()
        .expect("a C compiler (cc) is needed for this test");
    assert!(status.success(), "cc failed");
    exe
}

#[test]
fn c_example_captions_like_rust_and_runs_clean() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    common::caption_bundle(&bundle, -100.0);
    let mut images = Vec::new();
    for (i, colour) in [[250u8, 10, 10], [10, 250, 10], [10, 10, 250]]
        .iter()
        .enumerate()
    {
        let p = dir.path().join(format!("img{i}.png"));
        image::RgbImage::from_fn(8, 8, |x, y| {
            image::Rgb([
                colour[0] ^ (x as u8 * 16),
                colour[1],
                colour[2] ^ (y as u8 * 16),
            ])
        })
        .save(&p)
        .unwrap();
        images.push(p);
    }
    let exe = compile(dir.path());

    let valgrind = Command::new("valgrind").arg("--version").output().is_ok();
    // CI must check memory safety, not skip it: there `scripts/setup.sh` installs valgrind.
    assert!(
        valgrind || std::env::var("CI").as_deref() != Ok("true"),
        "valgrind is required in CI"
    );
    let mut cmd = if valgrind {
        let mut c = Command::new("valgrind");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        c.arg(format!(
            "--suppressions={}",
            repo.join("examples/c/valgrind.supp").display()
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
        .arg(&exe);
        c
    } else {
        eprintln!("valgrind not installed: running the C example without it");
        Command::new(&exe)
    };
    let out = cmd
        .args(["--provider", "tract", "--strict"])
        .arg(&bundle)
        .args(&images)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status.code()
    );
    assert!(stderr.contains("running on tract"), "{stderr}");
    if valgrind {
        assert!(!stderr.contains("definitely lost"), "{stderr}");
        assert!(
            !stderr.contains("Invalid read") && !stderr.contains("Invalid write"),
            "{stderr}"
        );
    }

    let b = Bundle::open(&bundle).unwrap();
    let reference = Captioner::new(
        &b,
        ProviderChoice::Only(Provider::Tract),
        &EngineOptions::default(),
    )
    .unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), images.len(), "{stdout}");
    for (line, path) in lines.iter().zip(&images) {
        let img = duet_runtime::preprocess::load_image(path).unwrap();
        let want = reference.caption_images(&[img]).unwrap().pop().unwrap();
        assert_eq!(*line, format!("{}\t{want}", path.display()));
    }

    // A bad image is reported by the C program with duet's message, and it exits non-zero.
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"nope").unwrap();
    let out = Command::new(&exe)
        .args(["--provider", "tract"])
        .arg(&bundle)
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("status 5") && stderr.contains("bad.png"),
        "{stderr}"
    );
}
