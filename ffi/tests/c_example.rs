//! `examples/c/caption.c` compiled with `cc` against the committed header and `libduet.so`,
//! run on a bundle (under valgrind when it is installed, which `scripts/setup.sh` ensures in CI):
//! same captions as the Rust runtime, zero leaks, zero invalid accesses.

#[path = "c_build/mod.rs"]
mod c_build;
use duet_testkit as common;

use duet_runtime::engine::{EngineOptions, Provider, ProviderChoice};
use duet_runtime::{Bundle, Captioner};

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
    let exe = c_build::compile("caption", dir.path());
    let valgrind = c_build::have_valgrind();
    let mut cmd = c_build::command(&exe, valgrind);
    let (stdout, stderr) = c_build::run_ok(
        cmd.args(["--provider", "tract", "--strict"])
            .arg(&bundle)
            .args(&images),
    );
    assert!(stderr.contains("running on tract"), "{stderr}");
    c_build::assert_clean(&stderr, valgrind);

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

    // Beam search and sampling through DuetDecodeOptions, streamed through the callback with
    // its user pointer: the same text as the Rust runtime's with the same options.
    for (args, decoding) in [
        (
            &["--beam", "3", "--stream"][..],
            duet_runtime::Decoding::Beam { width: 3 },
        ),
        (
            &["--temperature", "2", "--seed", "5", "--stream"][..],
            duet_runtime::Decoding::Sample(duet_runtime::Sampling {
                temperature: 2.0,
                seed: 5,
                ..Default::default()
            }),
        ),
    ] {
        let mut cmd = c_build::command(&exe, valgrind);
        let (stdout, stderr) = c_build::run_ok(
            cmd.args(["--provider", "tract", "--prompt", "a red"])
                .args(args)
                .arg(&bundle)
                .args(&images),
        );
        c_build::assert_clean(&stderr, valgrind);
        let opts = duet_runtime::DecodeOptions {
            decoding,
            max_tokens: None,
        };
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), images.len(), "{stdout}");
        for (line, path) in lines.iter().zip(&images) {
            let img = duet_runtime::preprocess::load_image(path).unwrap();
            let want = reference
                .caption_images_with(&[img], Some("a red"), &opts, None)
                .unwrap()
                .pop()
                .unwrap();
            assert_eq!(*line, format!("{}\t{want}", path.display()), "{args:?}");
        }
    }

    // A bad image is reported by the C program with duet's message, and it exits non-zero.
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"nope").unwrap();
    let out = c_build::command(&exe, false)
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

    // `--ort-lib` goes through `DuetRuntimeOptions.ort_library`: a missing library is the
    // provider error naming it, the real one runs the graphs on onnxruntime.
    if cfg!(feature = "ort") {
        let out = c_build::command(&exe, false)
            .args(["--provider", "ort-cpu", "--strict", "--ort-lib"])
            .arg("/nonexistent/libonnxruntime.so")
            .arg(&bundle)
            .arg(&images[0])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("duet_runtime_create_with_options failed (status 4)")
                && stderr.contains("looked in /nonexistent/libonnxruntime.so"),
            "{stderr}"
        );
    }
    if let Some(lib) = common::ort_lib() {
        let out = c_build::command(&exe, false)
            .args(["--provider", "ort-cpu", "--strict", "--ort-lib"])
            .arg(lib)
            .arg(&bundle)
            .arg(&images[0])
            .env_remove("ORT_DYLIB_PATH")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains("caption_decoder: running on ort-cpu"),
            "{stderr}"
        );
    }
}
