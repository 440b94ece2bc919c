//! The `duet` binary end to end on a small random-weight bundle.

use duet_testkit as common;

use std::process::Command;

use common::*;
use image::{Rgb, RgbImage};

fn duet() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_duet"));
    c.env("RUST_LOG", "info");
    if let Some(lib) = ort_lib() {
        c.env("ORT_DYLIB_PATH", lib);
    }
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn caption_prints_path_tab_caption() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    caption_bundle(&bundle, -100.0);
    let a = dir.path().join("a.png");
    let b = dir.path().join("b.png");
    RgbImage::from_pixel(8, 8, Rgb([250, 0, 0]))
        .save(&a)
        .unwrap();
    RgbImage::from_pixel(32, 32, Rgb([0, 0, 250]))
        .save(&b)
        .unwrap();
    for provider in ["tract", "auto"] {
        let out = duet()
            .args(["caption", "--bundle"])
            .arg(&bundle)
            .args(["--provider", provider])
            .arg(&a)
            .arg(&b)
            .output()
            .unwrap();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{provider}: {stderr}");
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 2, "{stdout}");
        for (line, img) in lines.iter().zip([&a, &b]) {
            let (path, caption) = line.split_once('\t').unwrap();
            assert_eq!(path, img.display().to_string());
            assert_eq!(caption.split(' ').count(), 7, "{line}");
        }
        assert!(stderr.contains("vision_encoder: running on"), "{stderr}");
        assert!(stderr.contains("caption_decoder: running on"), "{stderr}");
        // Whose code runs is said: the onnxruntime library's path when ort runs the graph.
        if let (Some(lib), "auto") = (ort_lib(), provider) {
            let line = format!("running on ort-cpu ({})", lib.display());
            assert!(stderr.contains(&line), "{stderr}");
        }
        assert!(
            stderr.contains("2 image(s) in batches of") && stderr.contains(" ms per step)"),
            "{stderr}"
        );
        assert!(
            stderr.contains("resizing image from 32x32 to 8x8"),
            "{stderr}"
        );
        if provider == "auto" {
            eprintln!("{stderr}");
            assert!(stderr.contains("skipped tensorrt: "), "{stderr}");
        }
    }
}

#[test]
fn embed_prints_the_similarity_table_and_writes_json_lines() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("emb.jsonl");
    let out = duet()
        .args(["embed", "--provider", "tract", "--bundle"])
        .arg(root.join("shipped/duet-small"))
        .arg("--image")
        .arg(root.join("examples/images/emoji-google-1f600.png"))
        .arg("--image")
        .arg(root.join("examples/images/shapeworld-val-000000.png"))
        .args(["--text", "a large cyan diamond on the right"])
        .args(["--text", "grinning face"])
        .arg("--out")
        .arg(&out_file)
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("text_encoder: running on tract"),
        "{stderr}"
    );
    assert!(
        stderr.contains("embedded 2 image(s) and 2 text(s)"),
        "{stderr}"
    );
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("best: text"))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(
        rows[0].contains("emoji-google-1f600.png")
            && rows[0].ends_with("best: text 2 (grinning face)"),
        "{stdout}"
    );
    assert!(
        rows[1].ends_with("best: text 1 (a large cyan diamond on the right)"),
        "{stdout}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["kind"], "image");
    assert_eq!(lines[3]["kind"], "text");
    assert_eq!(lines[3]["input"], "grinning face");
    assert!(lines
        .iter()
        .all(|l| l["embedding"].as_array().unwrap().len() == 128));

    // Texts only, no --out: the embeddings themselves go to stdout, the same as in the file.
    let out = duet()
        .args(["embed", "--provider", "tract", "--bundle"])
        .arg(root.join("shipped/duet-small"))
        .args(["--text", "grinning face"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let only: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0]["input"], "grinning face");
    // Same text, batch of one here and of two above: equal up to float rounding.
    let (a, b) = (
        only[0]["embedding"].as_array().unwrap(),
        lines[3]["embedding"].as_array().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-5);
    }
}

#[test]
fn info_summarises_bundle_and_providers() {
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), 0.0);
    let out = duet()
        .args(["info", "--bundle"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for want in [
        "bundle: test-bundle (preset tiny",
        "d_model 8",
        "caption_decoder (caption_decoder.onnx)",
        "in  past_key_1: f32[batch, 2, past, 4]",
        "parity: not recorded",
        "provenance command: cargo test",
        "tract: always available",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in\n{stdout}");
    }
    if ort_lib().is_some() {
        assert!(stdout.contains("CPUExecutionProvider"), "{stdout}");
    }
}

/// A closed pipe ends `duet` quietly (SIGPIPE), never with a panic message.
#[cfg(unix)]
#[test]
fn closed_stdout_pipe_is_not_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), 0.0);
    let mut child = duet()
        .args(["info", "--bundle"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before `duet` has printed anything (it loads the bundle first).
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.signal() == Some(SIGPIPE) || out.status.success(),
        "{:?}: {stderr}",
        out.status
    );
}

/// SIGPIPE's number on Linux and the BSDs.
#[cfg(unix)]
const SIGPIPE: i32 = 13;

#[test]
fn errors_exit_non_zero_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), 0.0);
    let img = dir.path().join("x.png");
    RgbImage::new(8, 8).save(&img).unwrap();
    let corrupt = dir.path().join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nbroken").unwrap();

    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (
            vec![
                "caption".into(),
                "--bundle".into(),
                dir.path().into(),
                "--provider".into(),
                "gpu".into(),
                img.clone().into(),
            ],
            "unknown provider `gpu`",
        ),
        (
            vec![
                "caption".into(),
                "--bundle".into(),
                "/nonexistent".into(),
                img.clone().into(),
            ],
            "manifest.json",
        ),
        (
            vec![
                "caption".into(),
                "--bundle".into(),
                dir.path().into(),
                corrupt.clone().into(),
            ],
            "corrupt.png",
        ),
        (
            vec![
                "caption".into(),
                "--bundle".into(),
                dir.path().into(),
                "--ort-lib".into(),
                "/nonexistent/libonnxruntime.so".into(),
                "--provider".into(),
                "ort-cpu".into(),
                img.clone().into(),
            ],
            if cfg!(feature = "ort") {
                "libonnxruntime not found"
            } else {
                "without the `ort` feature"
            },
        ),
    ];
    // Several prompts make one grid row each; the images of a run are bounded, checked before
    // anything is loaded.
    let mut many: Vec<std::ffi::OsString> = vec![
        "generate".into(),
        "--bundle".into(),
        dir.path().into(),
        "--count".into(),
        "13".into(),
        "-o".into(),
        dir.path().join("grid.png").into(),
    ];
    many.extend(["a", "b", "c", "d", "e"].map(std::ffi::OsString::from));
    let mut cases = cases;
    // 65 images: one more than the library generates per call.
    cases.push((many, "5 prompts x --count 13 = 65 images; at most 64"));
    // DDIM's noise with a deterministic sampler: an error, not silently dropped.
    cases.push((
        vec![
            "generate".into(),
            "--bundle".into(),
            dir.path().into(),
            "--sampler".into(),
            "dpmpp".into(),
            "--eta".into(),
            "0.5".into(),
            "a".into(),
        ],
        "--eta is DDIM's noise",
    ));
    for (args, want) in cases {
        let out = duet().args(&args).output().unwrap();
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }

    // Tampered graph: refused with the file name.
    std::fs::write(dir.path().join("caption_decoder.onnx"), b"x").unwrap();
    let out = duet()
        .args(["caption", "--bundle"])
        .arg(dir.path())
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("sha256 mismatch for caption_decoder.onnx"));
}

/// `duet bench` on a caption-only bundle: each provider measured in its own process, the
/// unavailable ones listed with onnxruntime's reason, the table rows present, and the placement
/// read from ort's profiler. (It measures; nothing here asserts a speed.)
#[test]
fn bench_prints_the_side_by_side_table() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    caption_bundle(&bundle, -100.0);
    let img = dir.path().join("a.png");
    RgbImage::from_pixel(8, 8, Rgb([250, 0, 0]))
        .save(&img)
        .unwrap();
    let md = dir.path().join("bench.md");
    let out = duet()
        .args(["bench", "--bundle"])
        .arg(&bundle)
        .args([
            "--providers",
            "cuda,ort-cpu,tract",
            "--runs",
            "1",
            "--no-python",
        ])
        .arg("--image")
        .arg(&img)
        .arg("--out")
        .arg(&md)
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let written = std::fs::read_to_string(&md).unwrap();
    assert!(written.contains(stdout.trim()), "{written}");
    assert!(written.contains("Command: `"), "{written}");
    for row in [
        "cold load, caption graphs (ms)",
        "caption, batch 1: median / p90 (ms)",
        "caption, batch 8: images/s",
        "peak resident memory (MiB)",
    ] {
        assert!(stdout.contains(row), "{row}: {stdout}");
    }
    assert!(
        stdout.contains("- tract: vision_encoder: ") && stdout.contains(" nodes on tract"),
        "{stdout}"
    );
    if ort_lib().is_some() {
        assert!(
            stdout
                .lines()
                .next()
                .unwrap()
                .contains("| ort-cpu | tract |"),
            "{stdout}"
        );
        assert!(
            stdout.contains("- ort-cpu: vision_encoder: ")
                && stdout.contains(" nodes on CPUExecutionProvider"),
            "{stdout}"
        );
        // The CPU-only onnxruntime cannot run CUDA: listed with the reason, not measured.
        assert!(
            stdout.contains("- cuda: ")
                && stdout.contains("CUDA execution provider is not enabled"),
            "{stdout}"
        );
    }
    // A caption-only bundle has no generation rows to fill.
    assert!(
        stdout.contains("| generate 10 steps, batch 1: median / p90 (ms) | – |"),
        "{stdout}"
    );
}

/// FLOPs come from tract's cost model: `x[4,3] @ W[3,2]` is 24 multiply-adds.
#[test]
fn graph_flops_counts_multiply_adds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("linear.onnx");
    std::fs::write(&path, linear_model()).unwrap();
    let flops = duet_runtime::engine::graph_flops(&path, &[("x", &[4, 3])]).unwrap();
    assert_eq!(flops, 2 * 4 * 3 * 2);
    let e = duet_runtime::engine::graph_flops(&path, &[("y", &[4, 3])]).unwrap_err();
    assert!(e.contains("no shape given for input `x`"), "{e}");
}

/// A library planted as `.ort/lib/libonnxruntime.so` in the working directory or any parent of
/// it is never loaded: the planted file is a real shared library whose constructor would leave
/// a marker file the moment anything `dlopen`ed it.
#[test]
fn a_library_planted_near_the_working_directory_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("planted-code-ran");
    let lib_dir = dir.path().join(".ort").join("lib");
    std::fs::create_dir_all(&lib_dir).unwrap();
    let src = dir.path().join("planted.c");
    std::fs::write(
        &src,
        format!(
            "#include <stdio.h>\n__attribute__((constructor)) static void planted(void) {{\n\
             FILE *f = fopen(\"{}\", \"w\"); if (f) fclose(f); }}\n",
            marker.display()
        ),
    )
    .unwrap();
    let cc = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(lib_dir.join("libonnxruntime.so"))
        .arg(&src)
        .output()
        .expect("a C compiler (cc) is needed for this test");
    assert!(cc.status.success(), "{}", text(&cc.stderr));

    let bundle = dir.path().join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    caption_bundle(&bundle, -100.0);
    let img = dir.path().join("a.png");
    RgbImage::from_pixel(32, 32, Rgb([250, 0, 0]))
        .save(&img)
        .unwrap();
    // The working directory is a child of the planted tree; no library is named, so the
    // default places are all the runtime may try.
    let cwd = dir.path().join("work").join("deeper");
    std::fs::create_dir_all(&cwd).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_duet"))
        .current_dir(&cwd)
        .env_remove("ORT_DYLIB_PATH")
        .args(["caption", "--provider", "ort-cpu", "--bundle"])
        .arg(&bundle)
        .arg(&img)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!marker.exists(), "the planted library ran: {stderr}");
    assert!(
        !stderr.contains(&lib_dir.display().to_string()),
        "the planted path was even considered: {stderr}"
    );
}

fn shipped() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shipped/duet-small")
}

fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Regression: with the disk full (a 100-byte file-size limit makes the write fail
/// as ENOSPC would), `duet generate -o x.png` used to exit 0 and leave a truncated `x.png`.
/// Now it fails, the old file is whole, and no temporary file is left.
#[test]
fn generate_on_a_full_disk_keeps_the_old_png_and_fails() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    std::fs::write(&out, b"the previous picture").unwrap();
    let mut cmd = duet();
    cmd.args([
        "generate",
        "--provider",
        "tract",
        "--steps",
        "2",
        "--bundle",
    ])
    .arg(shipped())
    .arg("-o")
    .arg(&out)
    .arg("a large red circle at the top left");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
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
    let stderr = text(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(stderr.contains("writing"), "{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), b"the previous picture");
    assert_eq!(entries(dir.path()), vec!["x.png".to_string()]);
}

/// Regression: a missing `-o` directory is said before any sampling;
/// `bench --steps 0` is a usage error, not an empty table; `embed --out` naming one of its own
/// images is refused and the image kept; a file name with a newline stays on one TSV line; and
/// an error's cause is not repeated.
#[test]
fn outputs_and_arguments_are_checked_before_the_work() {
    let dir = tempfile::tempdir().unwrap();
    let o = duet()
        .args(["generate", "--bundle"])
        .arg(shipped())
        .arg("-o")
        .arg(dir.path().join("no-such-dir/x.png"))
        .arg("a red circle")
        .output()
        .unwrap();
    let stderr = text(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("no-such-dir does not exist"), "{stderr}");
    assert!(
        !stderr.contains("running on"),
        "graphs were loaded first: {stderr}"
    );

    let o = duet()
        .args(["bench", "--steps", "0", "--bundle"])
        .arg(shipped())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("must be 1 ..= 1000"));

    let img = dir.path().join("pic.png");
    RgbImage::from_pixel(32, 32, Rgb([200, 0, 0]))
        .save(&img)
        .unwrap();
    let before = std::fs::read(&img).unwrap();
    let o = duet()
        .args(["embed", "--provider", "tract", "--bundle"])
        .arg(shipped())
        .arg("--image")
        .arg(&img)
        .arg("--out")
        .arg(dir.path().join(".").join("pic.png"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("is one of the input images"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(std::fs::read(&img).unwrap(), before);

    let odd = dir.path().join("two\nlines.png");
    std::fs::copy(&img, &odd).unwrap();
    let o = duet()
        .args(["caption", "--provider", "tract", "--bundle"])
        .arg(shipped())
        .arg(&odd)
        .output()
        .unwrap();
    let stdout = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    assert!(
        stdout.starts_with('"') && stdout.contains("two\\nlines.png"),
        "{stdout:?}"
    );

    // A path under a file: the OS error once, not "Not a directory: Not a directory".
    let o = duet()
        .args(["caption", "--provider", "tract", "--bundle"])
        .arg(img.join("bundle"))
        .arg(&img)
        .output()
        .unwrap();
    let stderr = text(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(stderr.matches("Not a directory").count(), 1, "{stderr}");
}

/// Regression: SIGTERM to `duet bench` used to leave its measuring child running, and its
/// temporary image file in the temp dir. The child now ends with its parent, and the image
/// goes to the children through a pipe.
#[cfg(target_os = "linux")]
#[test]
fn a_terminated_bench_takes_its_worker_with_it() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let mut parent = duet()
        .env("TMPDIR", tmp.path())
        .args([
            "bench",
            "--providers",
            "tract",
            "--no-python",
            "--runs",
            "5000",
        ])
        .arg("--bundle")
        .arg(shipped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = parent.id();
    let children = format!("/proc/{pid}/task/{pid}/children");
    let started = Instant::now();
    let worker: u32 = loop {
        let list = std::fs::read_to_string(&children).unwrap_or_default();
        if let Some(first) = list.split_whitespace().next() {
            break first.parse().unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no worker was started"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // SAFETY: signalling a child this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    parent.wait().unwrap();
    let gone = |p: u32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
    };
    let waited = Instant::now();
    while !gone(worker) {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "worker {worker} still runs after its parent ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind in TMPDIR: {left:?}");
}

/// Regression: every image used to be decoded at full size before any was resized
/// (40 images of 10,000² took 12 GB). Four 8,000² images now cost about one: each is reduced
/// to the model's size as soon as it is decoded. Peak resident memory of the child, from
/// `getrusage`: the four held at full size together would be over 768 MB.
#[cfg(target_os = "linux")]
#[test]
fn many_huge_images_are_decoded_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("big-0.png");
    // Uniform pixels compress to a small file; decoded, each is 192 MB.
    RgbImage::from_pixel(8_000, 8_000, Rgb([200, 30, 30]))
        .save(&first)
        .unwrap();
    let mut images = vec![first.clone()];
    for i in 1..4 {
        let p = dir.path().join(format!("big-{i}.png"));
        std::fs::copy(&first, &p).unwrap();
        images.push(p);
    }
    let o = duet()
        .args(["caption", "--provider", "tract", "--bundle"])
        .arg(shipped())
        .args(&images)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).lines().count(), 4);
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is writable storage for one `rusage`.
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) },
        0
    );
    // SAFETY: filled by the successful call above.
    let peak_kib = unsafe { usage.assume_init() }.ru_maxrss;
    eprintln!("peak resident memory of duet caption: {peak_kib} KiB");
    assert!(
        peak_kib < 600_000,
        "peak {peak_kib} KiB: the images were held at full size together"
    );
}

/// A tokenizer that made the `tokenizers` crate (0.22) panic — invalid UTF-8 inside its
/// `decoder`, found by the fuzzer and kept in its corpus — is a typed error naming the file,
/// and nothing on stderr speaks of a panic.
#[test]
fn a_tokenizer_that_panics_its_parser_is_a_quiet_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = caption_bundle(dir.path(), 0.0);
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus/tokenizer-decoder-panics-in-tokenizers.json");
    let bytes = std::fs::read(corpus).unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), &bytes).unwrap();
    m.files.insert(
        "tokenizer.json".into(),
        duet_runtime::bundle::sha256_hex(&bytes),
    );
    write_manifest(dir.path(), &m);
    let img = dir.path().join("x.png");
    RgbImage::new(8, 8).save(&img).unwrap();
    let o = duet()
        .args(["caption", "--provider", "tract", "--bundle"])
        .arg(dir.path())
        .arg(&img)
        .output()
        .unwrap();
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tokenizer.json"), "{stderr}");
    assert!(stderr.contains("not valid JSON"), "{stderr}");
    assert!(
        !stderr.contains("thread '"),
        "a panic report reached stderr: {stderr}"
    );
}

/// `--bundle` takes a single-file bundle as well as a directory, with the same captions.
#[test]
fn caption_reads_a_single_file_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    caption_bundle(&bundle, -100.0);
    let file = dir.path().join("model.duet");
    duet_runtime::bundle::archive::pack(&duet_runtime::Bundle::open(&bundle).unwrap(), &file)
        .unwrap();
    let img = dir.path().join("a.png");
    RgbImage::from_pixel(8, 8, Rgb([250, 0, 0]))
        .save(&img)
        .unwrap();
    let run = |b: &std::path::Path| {
        let out = duet()
            .args(["caption", "--provider", "tract", "--bundle"])
            .arg(b)
            .arg(&img)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    assert_eq!(run(&file), run(&bundle));
}

/// `duet bench --model`: a graph of the user's, its symbolic axis set by `--dim`, timed on
/// each provider in its own process; an input too large to make and flags of the bundle mode
/// are refused. (It measures; nothing here asserts a speed.)
#[test]
fn bench_times_a_users_own_graph() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("linear.onnx");
    std::fs::write(&model, linear_model()).unwrap();
    let md = dir.path().join("model.md");
    let bench = |extra: &[&str]| {
        duet()
            .args(["bench", "--model"])
            .arg(&model)
            .args(["--runs", "2"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = bench(&[
        "--providers",
        "cuda,ort-cpu,tract",
        "--dim",
        "batch=4",
        "--threads",
        "1",
        "--out",
        md.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("2 timed runs, 1 thread(s) per run"),
        "{stdout}"
    );
    assert!(stdout.contains("inputs: x f32 [4, 3]"), "{stdout}");
    for row in [
        "| cold load (ms) |",
        "| first run (ms) |",
        "| run: median / p90 (ms) |",
        "| placement |",
    ] {
        assert!(stdout.contains(row), "{row}: {stdout}");
    }
    assert!(stdout.contains("| tract"), "{stdout}");
    // tract's own plan: the graph's one MatMul and one Add.
    assert!(stdout.contains("nodes on tract"), "{stdout}");
    // No GPU here: cuda is listed with the reason, not silently dropped.
    assert!(stdout.contains("cuda: not measured: "), "{stdout}");
    if common::ort_lib().is_some() {
        assert!(stdout.contains("| ort-cpu"), "{stdout}");
        assert!(stdout.contains("tract / ort-cpu median: "), "{stdout}");
    }
    let written = std::fs::read_to_string(&md).unwrap();
    assert!(written.contains(stdout.trim()), "{written}");

    // --profile adds each engine's time by operator.
    let out = bench(&["--providers", "ort-cpu,tract", "--profile"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains("tract: time by operator (2 profiled runs"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| op | nodes | ms per run | share |"),
        "{stdout}"
    );
    if common::ort_lib().is_some() {
        assert!(
            stdout.contains("ort-cpu: time by operator (2 profiled runs"),
            "{stdout}"
        );
    }
    let out = bench(&["--providers", "tract", "--profile", "--bundle", "x"]);
    assert!(!out.status.success());

    let out = bench(&["--providers", "tract", "--dim", "batch=100000000000"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("input `x`: no sample input can be made: shape [100000000000, 3]"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let out = bench(&["--prompt", "a red circle"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cannot be used with"),
        "{}",
        text(&out.stderr)
    );
}

/// Decoding options on the shipped captioner (a trained model, so the texts mean something):
/// beam search and greedy agree on a scene the model knows, a seed repeats a sample, a prompt
/// is continued, `--max-tokens` caps, one image streams its caption, and a bad option is an
/// error before anything loads.
#[test]
fn caption_decoding_options_on_the_shipped_model() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let scene = root.join("examples/images/shapeworld-val-000000.png");
    let emoji = root.join("examples/images/emoji-google-1f600.png");
    let run = |args: &[&str]| {
        let out = duet()
            .args(["caption", "--provider", "tract", "--bundle"])
            .arg(root.join("shipped/duet-small"))
            .args(args)
            .arg(&scene)
            .arg(&emoji)
            .output()
            .unwrap();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{args:?}: {stderr}");
        let captions: Vec<String> = stdout
            .lines()
            .map(|l| l.split_once('\t').unwrap().1.to_string())
            .collect();
        assert_eq!(captions.len(), 2, "{stdout}");
        (captions, stderr)
    };
    let (greedy, stderr) = run(&[]);
    assert_eq!(greedy[0], "a large cyan diamond on the right");
    assert!(stderr.contains("decoder (greedy)"), "{stderr}");
    let (beam, stderr) = run(&["--beam", "4"]);
    assert_eq!(beam, greedy);
    assert!(stderr.contains("decoder (beam 4)"), "{stderr}");
    let sample = ["--temperature", "1.5", "--top-p", "0.95", "--seed", "7"];
    let (a, stderr) = run(&sample);
    assert!(
        stderr.contains("temperature 1.5, top-p 0.95, seed 7"),
        "{stderr}"
    );
    assert_eq!(run(&sample).0, a, "a seed repeats");
    let (cont, _) = run(&["--prompt", "a large cyan", "--max-tokens", "1"]);
    assert_eq!(cont[0], "diamond");
    assert!(cont.iter().all(|c| c.split(' ').count() == 1), "{cont:?}");

    // One image: streamed, same text.
    let out = duet()
        .args(["caption", "--provider", "tract", "--beam", "2", "--bundle"])
        .arg(root.join("shipped/duet-small"))
        .arg(&scene)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("{}\ta large cyan diamond on the right\n", scene.display())
    );

    for (bad, says) in [
        (&["--top-p", "1.5"][..], "top_p must be in (0, 1]"),
        (&["--temperature=-1"][..], "temperature must be"),
        (&["--prompt", "a zzyzx"][..], "[\"zzyzx\"]"),
        (&["--beam", "0"][..], "--beam"),
        (
            &["--beam", "2", "--temperature", "1"][..],
            "cannot be used with",
        ),
    ] {
        let out = duet()
            .args(["caption", "--provider", "tract", "--bundle"])
            .arg(root.join("shipped/duet-small"))
            .args(bad)
            .arg(&scene)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad:?}");
        assert!(
            text(&out.stderr).contains(says),
            "{bad:?}: {}",
            text(&out.stderr)
        );
    }
}
