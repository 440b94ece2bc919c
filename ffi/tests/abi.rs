//! The C ABI called the way C calls it (raw pointers, out-parameters) on a small
//! random-weight bundle: statuses, error texts, ownership, strict mode and concurrency.

use duet_testkit as common;

mod strings;

use std::ffi::{CStr, CString};
use std::ptr;

use duet::*;
use duet_runtime::engine::{EngineOptions, Provider, ProviderChoice};
use duet_runtime::{Bundle, Captioner};
use strings::take;

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// Creates a runtime; returns the status, the handle (maybe NULL) and the error text.
fn create(
    dir: Option<&str>,
    provider: Option<&str>,
    strict: bool,
) -> (DuetStatus, *mut DuetRuntime, Option<String>) {
    let dir = dir.map(cstr);
    let provider = provider.map(cstr);
    let mut rt = ptr::null_mut();
    let mut err = ptr::null_mut();
    let status = unsafe {
        duet_runtime_create(
            dir.as_ref().map_or(ptr::null(), |d| d.as_ptr()),
            provider.as_ref().map_or(ptr::null(), |p| p.as_ptr()),
            strict,
            &mut rt,
            &mut err,
        )
    };
    (status, rt, take(err))
}

fn caption_rgb(
    rt: *const DuetRuntime,
    rgb: &[u8],
    w: u32,
    h: u32,
) -> (DuetStatus, Option<String>, Option<String>) {
    let mut cap = ptr::null_mut();
    let mut err = ptr::null_mut();
    let status = unsafe { duet_caption_rgb(rt, rgb.as_ptr(), rgb.len(), w, h, &mut cap, &mut err) };
    (status, take(cap), take(err))
}

fn bundle() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    common::caption_bundle(dir.path(), -100.0);
    dir
}

fn image(seed: u8) -> Vec<u8> {
    (0..8 * 8 * 3)
        .map(|i: usize| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn version_is_the_crate_version() {
    let v = unsafe { CStr::from_ptr(duet_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn null_pointers_and_bad_arguments_are_errors() {
    let (s, rt, e) = create(None, None, false);
    assert_eq!(s, DuetStatus::NullPointer);
    assert!(rt.is_null());
    assert!(e.unwrap().contains("`bundle_dir` is NULL"));

    let dir = bundle();
    let path = dir.path().to_str().unwrap();
    let d = cstr(path);
    let s = unsafe {
        duet_runtime_create(
            d.as_ptr(),
            ptr::null(),
            false,
            ptr::null_mut(),
            ptr::null_mut(),
        )
    };
    assert_eq!(
        s,
        DuetStatus::NullPointer,
        "NULL out and NULL error are fine to pass"
    );

    let (s, rt, e) = create(Some(path), Some("gpu"), false);
    assert_eq!(s, DuetStatus::InvalidArgument);
    assert!(rt.is_null());
    assert!(e.unwrap().contains("unknown provider `gpu`"));

    let (s, _, e) = create(Some("/no/such/bundle"), None, false);
    assert_eq!(s, DuetStatus::Bundle);
    assert!(e.unwrap().contains("manifest.json"));

    let (s, rt, e) = create(Some(path), Some("tract"), false);
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    assert!(e.is_none(), "success clears the error");

    let img = image(0);
    let (s, cap, e) = caption_rgb(rt, &img, 8, 9);
    assert_eq!(s, DuetStatus::InvalidArgument);
    assert!(cap.is_none());
    let e = e.unwrap();
    assert!(e.contains("`len` is 192 bytes"), "{e}");
    // The expected size is a number, not "Some(216)".
    assert!(e.ends_with("has 216 bytes"), "{e}");
    let (s, _, e) = caption_rgb(rt, &[], 0, 8);
    assert_eq!(s, DuetStatus::InvalidArgument, "{e:?}");
    let (s, _, e) = caption_rgb(ptr::null(), &img, 8, 8);
    assert_eq!(s, DuetStatus::NullPointer);
    assert!(e.unwrap().contains("`runtime` is NULL"));
    let mut err = ptr::null_mut();
    let s = unsafe { duet_caption_rgb(rt, ptr::null(), 192, 8, 8, &mut ptr::null_mut(), &mut err) };
    assert_eq!(s, DuetStatus::NullPointer);
    assert!(take(err).unwrap().contains("`rgb` is NULL"));
    let s = unsafe {
        duet_caption_rgb(
            rt,
            img.as_ptr(),
            img.len(),
            8,
            8,
            ptr::null_mut(),
            ptr::null_mut(),
        )
    };
    assert_eq!(s, DuetStatus::NullPointer);

    // Unreadable image file.
    let png = dir.path().join("corrupt.png");
    std::fs::write(&png, b"not a png").unwrap();
    let p = cstr(png.to_str().unwrap());
    let mut cap = ptr::null_mut();
    let mut err = ptr::null_mut();
    let s = unsafe { duet_caption_file(rt, p.as_ptr(), &mut cap, &mut err) };
    assert_eq!(s, DuetStatus::Image);
    assert!(cap.is_null());
    assert!(take(err).unwrap().contains("corrupt.png"));

    unsafe {
        duet_runtime_destroy(rt);
        duet_runtime_destroy(ptr::null_mut());
        duet_string_free(ptr::null_mut());
    }
}

#[test]
fn captions_match_the_rust_runtime_and_report_the_provider() {
    let dir = bundle();
    let (s, rt, e) = create(Some(dir.path().to_str().unwrap()), Some("tract"), true);
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    let mut report = ptr::null_mut();
    assert_eq!(
        unsafe { duet_provider_report(rt, &mut report, ptr::null_mut()) },
        DuetStatus::Ok
    );
    let report = take(report).unwrap();
    assert!(
        report.contains("vision_encoder: running on tract"),
        "{report}"
    );
    assert!(
        report.contains("caption_decoder: running on tract"),
        "{report}"
    );

    let b = Bundle::open(dir.path()).unwrap();
    let reference = Captioner::new(
        &b,
        ProviderChoice::Only(Provider::Tract),
        &EngineOptions::default(),
    )
    .unwrap();
    for seed in 0..4 {
        let img = image(seed * 50);
        let (s, cap, e) = caption_rgb(rt, &img, 8, 8);
        assert_eq!(s, DuetStatus::Ok, "{e:?}");
        let want = reference
            .caption_images(&[image::RgbImage::from_raw(8, 8, img).unwrap()])
            .unwrap();
        assert_eq!(cap.unwrap(), want[0]);
    }
    unsafe { duet_runtime_destroy(rt) };
}

/// Creates a runtime through `duet_runtime_create_with_options`; `options` None passes NULL.
fn create_with(
    dir: &str,
    options: Option<&DuetRuntimeOptions>,
) -> (DuetStatus, *mut DuetRuntime, Option<String>) {
    let dir = cstr(dir);
    let mut rt = ptr::null_mut();
    let mut err = ptr::null_mut();
    let status = unsafe {
        duet_runtime_create_with_options(
            dir.as_ptr(),
            options.map_or(ptr::null(), |o| o as *const _),
            &mut rt,
            &mut err,
        )
    };
    (status, rt, take(err))
}

fn report(rt: *const DuetRuntime) -> String {
    let mut out = ptr::null_mut();
    assert_eq!(
        unsafe { duet_provider_report(rt, &mut out, ptr::null_mut()) },
        DuetStatus::Ok
    );
    take(out).unwrap()
}

/// The caption of a fixed test image.
fn caption_of(rt: *const DuetRuntime) -> String {
    let (s, cap, e) = caption_rgb(rt, &image(7), 8, 8);
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    cap.unwrap()
}

#[test]
fn options_name_the_provider_and_the_onnxruntime_library() {
    let dir = bundle();
    let path = dir.path().to_str().unwrap();
    let none = DuetRuntimeOptions {
        struct_size: std::mem::size_of::<DuetRuntimeOptions>() as u32,
        provider: ptr::null(),
        strict: false,
        ort_library: ptr::null(),
        tensorrt_fp16: false,
        tensorrt_cache_dir: ptr::null(),
        threads: 0,
        precision: ptr::null(),
        idle_wait: DUET_IDLE_WAIT_SPIN,
    };

    // NULL options and all-zero options (with their size) are the defaults: auto, not strict.
    for options in [None, Some(&none)] {
        let (s, rt, e) = create_with(path, options);
        assert_eq!(s, DuetStatus::Ok, "{e:?}");
        assert!(report(rt).contains("vision_encoder: running on"));
        unsafe { duet_runtime_destroy(rt) };
    }

    // A library that is not there, asked for strictly: the error names the path it was given
    // and nothing else is searched.
    let tract = cstr("tract");
    let ort_cpu = cstr("ort-cpu");
    let missing = cstr("/nonexistent/libonnxruntime.so");
    let options = DuetRuntimeOptions {
        provider: ort_cpu.as_ptr(),
        strict: true,
        ort_library: missing.as_ptr(),
        ..none
    };
    let (s, rt, e) = create_with(path, Some(&options));
    assert_eq!(s, DuetStatus::Provider);
    assert!(rt.is_null());
    let e = e.unwrap();
    let want = if cfg!(feature = "ort") {
        "libonnxruntime not found: looked in /nonexistent/libonnxruntime.so (from"
    } else {
        "without the `ort` feature"
    };
    assert!(e.contains(want), "{e}");

    // The same options with tract: the library is never needed.
    let options = DuetRuntimeOptions {
        provider: tract.as_ptr(),
        ..options
    };
    let (s, rt, e) = create_with(path, Some(&options));
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    assert!(report(rt).contains("caption_decoder: running on tract"));
    unsafe { duet_runtime_destroy(rt) };

    // The real library, named explicitly.
    if let Some(lib) = common::ort_lib() {
        let lib = cstr(lib.to_str().unwrap());
        let options = DuetRuntimeOptions {
            provider: ort_cpu.as_ptr(),
            strict: true,
            ort_library: lib.as_ptr(),
            ..none
        };
        let (s, rt, e) = create_with(path, Some(&options));
        assert_eq!(s, DuetStatus::Ok, "{e:?}");
        assert!(report(rt).contains("caption_decoder: running on ort-cpu"));
        unsafe { duet_runtime_destroy(rt) };
    }

    // A thread count reaches the engines and changes no caption; too many is an argument error.
    let baseline = {
        let options = DuetRuntimeOptions {
            provider: tract.as_ptr(),
            ..none
        };
        let (s, rt, e) = create_with(path, Some(&options));
        assert_eq!(s, DuetStatus::Ok, "{e:?}");
        let c = caption_of(rt);
        unsafe { duet_runtime_destroy(rt) };
        c
    };
    let options = DuetRuntimeOptions {
        provider: tract.as_ptr(),
        threads: 2,
        ..none
    };
    let (s, rt, e) = create_with(path, Some(&options));
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    assert_eq!(caption_of(rt), baseline);
    // The count reached tract: its pool's threads (named by the engine) exist now.
    #[cfg(target_os = "linux")]
    assert!(
        common::thread_appears("duet-tract-"),
        "threads = 2 started no tract pool"
    );
    unsafe { duet_runtime_destroy(rt) };
    let options = DuetRuntimeOptions {
        threads: DUET_MAX_THREADS + 1,
        ..none
    };
    let (s, rt, e) = create_with(path, Some(&options));
    assert_eq!(s, DuetStatus::InvalidArgument);
    assert!(rt.is_null());
    assert!(e.unwrap().contains("options.threads: 257"));

    // Bad fields are argument errors naming the field.
    let gpu = cstr("gpu");
    let options = DuetRuntimeOptions {
        provider: gpu.as_ptr(),
        ..none
    };
    let (s, rt, e) = create_with(path, Some(&options));
    assert_eq!(s, DuetStatus::InvalidArgument);
    assert!(rt.is_null());
    assert!(e.unwrap().contains("gpu"));
    let mut rt = ptr::null_mut();
    let status =
        unsafe { duet_runtime_create_with_options(ptr::null(), &none, &mut rt, ptr::null_mut()) };
    assert_eq!(status, DuetStatus::NullPointer);
    assert!(rt.is_null());
}

#[test]
fn the_precision_option_picks_a_variant_or_names_the_ones_there_are() {
    use duet_runtime::bundle::sha256_hex;
    use duet_runtime::manifest::{Graph, Precision, VariantSpec};
    let dir = bundle();
    let path = dir.path().to_str().unwrap();
    let tract = cstr("tract");
    let options = |precision: *const std::ffi::c_char| DuetRuntimeOptions {
        struct_size: std::mem::size_of::<DuetRuntimeOptions>() as u32,
        provider: tract.as_ptr(),
        strict: false,
        ort_library: ptr::null(),
        tensorrt_fp16: false,
        tensorrt_cache_dir: ptr::null(),
        threads: 0,
        precision,
        idle_wait: DUET_IDLE_WAIT_SPIN,
    };
    let (s, rt, e) = create_with(path, Some(&options(ptr::null())));
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    let baseline = caption_of(rt);
    assert!(report(rt).contains("caption_decoder: running on tract"));
    unsafe { duet_runtime_destroy(rt) };

    // A precision the bundle lacks: unsupported, naming what it has; an unknown name: an
    // argument error.
    let int8 = cstr("int8");
    let (s, rt, e) = create_with(path, Some(&options(int8.as_ptr())));
    assert_eq!(s, DuetStatus::Unsupported);
    assert!(rt.is_null());
    assert!(e.unwrap().contains("no int8 variant (it has: fp32)"));
    let int4 = cstr("int4");
    let (s, rt, e) = create_with(path, Some(&options(int4.as_ptr())));
    assert_eq!(s, DuetStatus::InvalidArgument);
    assert!(rt.is_null());
    assert!(e.unwrap().contains("unknown precision `int4`"));

    // With an int8 variant (here copies of the fp32 graphs under the variant's names, then the
    // fp32 files removed: what is tested is which files load; real quantised graphs are the
    // e2e suite's): it loads and says so.
    let mut m = Bundle::open(dir.path()).unwrap().manifest().clone();
    let mut files = std::collections::BTreeMap::new();
    for g in m.graphs.clone() {
        let bytes = std::fs::read(dir.path().join(&g.file)).unwrap();
        let name = g.file.replace(".onnx", ".int8.onnx");
        std::fs::write(dir.path().join(&name), &bytes).unwrap();
        m.files.insert(name.clone(), sha256_hex(&bytes));
        files.insert(g.name, name);
    }
    assert!(files.contains_key(&Graph::CaptionDecoder));
    m.variants.push(VariantSpec {
        precision: Precision::Int8,
        method: "copies".into(),
        files,
        agreement: Default::default(),
        metrics: Default::default(),
    });
    common::write_manifest(dir.path(), &m);
    // The fp32 graphs gone: what loads now can only be the variant's files.
    for g in &m.graphs {
        std::fs::remove_file(dir.path().join(&g.file)).unwrap();
    }
    let (s, rt, e) = create_with(path, Some(&options(ptr::null())));
    assert_eq!(s, DuetStatus::Bundle, "{e:?}");
    assert!(rt.is_null());
    let (s, rt, e) = create_with(path, Some(&options(int8.as_ptr())));
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    assert!(report(rt).contains("caption_decoder (int8): running on tract"));
    assert_eq!(caption_of(rt), baseline);
    unsafe { duet_runtime_destroy(rt) };
}

#[test]
fn strict_mode_turns_a_skipped_provider_into_an_error() {
    let dir = bundle();
    let path = dir.path().to_str().unwrap();
    // `auto` on this machine (no GPU, CPU-only onnxruntime or none) must skip TensorRT.
    let (s, rt, e) = create(Some(path), Some("auto"), true);
    assert_eq!(s, DuetStatus::Provider);
    assert!(rt.is_null());
    let e = e.unwrap();
    assert!(e.contains("provider tensorrt unavailable"), "{e}");
    let (s, rt, e) = create(Some(path), Some("auto"), false);
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    let mut report = ptr::null_mut();
    unsafe { duet_provider_report(rt, &mut report, ptr::null_mut()) };
    let report = take(report).unwrap();
    assert!(report.contains("skipped tensorrt"), "{report}");
    unsafe { duet_runtime_destroy(rt) };
}

#[test]
fn eight_threads_on_one_handle_match_sequential_calls() {
    let dir = bundle();
    let (s, rt, e) = create(Some(dir.path().to_str().unwrap()), Some("tract"), false);
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    let images: Vec<Vec<u8>> = (0..10).map(|i| image(i * 25)).collect();
    let sequential: Vec<String> = images
        .iter()
        .map(|img| caption_rgb(rt, img, 8, 8).1.unwrap())
        .collect();
    // Raw pointers are not Send; the handle's documented contract is that it may be shared.
    let handle = rt as usize;
    let results: Vec<Vec<String>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..8)
            .map(|t| {
                let images = &images;
                scope.spawn(move || {
                    (0..100)
                        .map(|i| {
                            let img = &images[(t + i) % images.len()];
                            let (s, cap, e) = caption_rgb(handle as *const DuetRuntime, img, 8, 8);
                            assert_eq!(s, DuetStatus::Ok, "{e:?}");
                            cap.unwrap()
                        })
                        .collect()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for (t, got) in results.iter().enumerate() {
        for (i, cap) in got.iter().enumerate() {
            assert_eq!(
                cap,
                &sequential[(t + i) % images.len()],
                "thread {t} call {i}"
            );
        }
    }
    unsafe { duet_runtime_destroy(rt) };
}

#[test]
fn generation_on_a_caption_only_bundle_is_unsupported_and_null_checked() {
    let dir = bundle();
    let (s, rt, e) = create(Some(dir.path().to_str().unwrap()), Some("tract"), true);
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    let (mut w, mut h) = (0u32, 0u32);
    let mut err = ptr::null_mut();
    let s = unsafe { duet_generate_image_size(rt, &mut w, &mut h, &mut err) };
    assert_eq!(s, DuetStatus::Unsupported);
    let e = take(err).unwrap();
    assert!(e.contains("no generator"), "{e}");
    let mut opts = DuetGenerateOptions {
        struct_size: std::mem::size_of::<DuetGenerateOptions>() as u32,
        sampler: DUET_SAMPLER_DDIM,
        eta: 0.0,
        steps: 1,
        guidance: 1.0,
        seed: 0,
    };
    let s = unsafe { duet_generate_defaults(rt, &mut opts, ptr::null_mut()) };
    assert_eq!(s, DuetStatus::Unsupported);
    let prompt = cstr("a red circle");
    let mut buf = vec![7u8; 8 * 8 * 3];
    let mut err = ptr::null_mut();
    let s = unsafe {
        duet_generate_rgb(
            rt,
            prompt.as_ptr(),
            &opts,
            buf.as_mut_ptr(),
            buf.len(),
            &mut err,
        )
    };
    assert_eq!(s, DuetStatus::Unsupported);
    assert!(take(err).unwrap().contains("no generator"));
    assert!(buf.iter().all(|&b| b == 7), "buffer written on error");

    // NULL arguments are reported before anything else is looked at.
    let calls: [(DuetStatus, &str); 5] = unsafe {
        let mut e = [ptr::null_mut(); 5];
        let s = [
            duet_generate_image_size(ptr::null(), &mut w, &mut h, &mut e[0]),
            duet_generate_image_size(rt, ptr::null_mut(), &mut h, &mut e[1]),
            duet_generate_defaults(rt, ptr::null_mut(), &mut e[2]),
            duet_generate_rgb(
                rt,
                ptr::null(),
                &opts,
                buf.as_mut_ptr(),
                buf.len(),
                &mut e[3],
            ),
            duet_generate_rgb(rt, prompt.as_ptr(), &opts, ptr::null_mut(), 3, &mut e[4]),
        ];
        let names = ["`runtime`", "`width`", "`options`", "`prompt`", "`rgb`"];
        for (i, err) in e.into_iter().enumerate() {
            let text = take(err).unwrap();
            assert!(text.contains(names[i]), "{i}: {text}");
        }
        [
            (s[0], "runtime"),
            (s[1], "width"),
            (s[2], "options"),
            (s[3], "prompt"),
            (s[4], "rgb"),
        ]
    };
    for (status, what) in calls {
        assert_eq!(status, DuetStatus::NullPointer, "NULL {what}");
    }
    unsafe { duet_runtime_destroy(rt) };
}

#[test]
fn classification_on_a_bundle_without_restoration_is_unsupported_and_null_checked() {
    let dir = tempfile::tempdir().unwrap();
    common::caption_bundle(dir.path(), -100.0);
    let (s, rt, e) = create(Some(dir.path().to_str().unwrap()), Some("tract"), true);
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    let text = cstr("a red circle");
    let mut out = DuetClassification {
        class_index: 7,
        probability: 0.0,
        restored: 9,
        trust: 0.0,
    };
    // A stale pointer the call must clear on failure (never dereferenced here).
    let stale = std::ptr::dangling_mut::<std::ffi::c_char>();
    let mut label = stale;
    let mut err = ptr::null_mut();
    let s = unsafe {
        duet_classify(
            rt,
            ptr::null(),
            0,
            0,
            0,
            text.as_ptr(),
            0,
            &mut out,
            &mut label,
            &mut err,
        )
    };
    assert_eq!(s, DuetStatus::Unsupported);
    assert!(take(err).unwrap().contains("no restoration graphs"));
    assert!(label.is_null(), "label not cleared on failure");
    assert_eq!(
        (out.class_index, out.restored),
        (7, 9),
        "out written on failure"
    );
    // NULL `out` still clears `label` first.
    let mut label = stale;
    let s = unsafe {
        duet_classify(
            rt,
            ptr::null(),
            0,
            0,
            0,
            text.as_ptr(),
            0,
            ptr::null_mut(),
            &mut label,
            ptr::null_mut(),
        )
    };
    assert_eq!(s, DuetStatus::NullPointer);
    assert!(label.is_null(), "label not cleared when `out` is NULL");
    // NULL arguments come first.
    let mut e = [ptr::null_mut(); 2];
    let s = unsafe {
        [
            duet_classify(
                ptr::null(),
                ptr::null(),
                0,
                0,
                0,
                text.as_ptr(),
                0,
                &mut out,
                ptr::null_mut(),
                &mut e[0],
            ),
            duet_classify(
                rt,
                ptr::null(),
                0,
                0,
                0,
                text.as_ptr(),
                0,
                ptr::null_mut(),
                ptr::null_mut(),
                &mut e[1],
            ),
        ]
    };
    assert_eq!(s, [DuetStatus::NullPointer; 2]);
    assert!(take(e[0]).unwrap().contains("`runtime`"));
    assert!(take(e[1]).unwrap().contains("`out`"));
    unsafe { duet_runtime_destroy(rt) };
}

/// A single-file bundle opens through the C ABI like its directory, with the same captions.
#[test]
fn a_single_file_bundle_opens_like_its_directory() {
    let dir = bundle();
    let file = dir.path().join("model.duet");
    let b = Bundle::open(dir.path()).unwrap();
    duet_runtime::bundle::archive::pack(&b, &file).unwrap();
    let mut got = Vec::new();
    for path in [dir.path(), file.as_path()] {
        let (s, rt, e) = create(Some(path.to_str().unwrap()), Some("tract"), true);
        assert_eq!(s, DuetStatus::Ok, "{e:?}");
        got.push(caption_of(rt));
        unsafe { duet_runtime_destroy(rt) };
    }
    assert_eq!(got[0], got[1]);
}

/// Collects the pieces the decoding callback receives (the `user` pointer is a `Vec<String>`).
unsafe extern "C" fn collect_piece(user: *mut std::ffi::c_void, text: *const std::ffi::c_char) {
    let pieces = &mut *(user as *mut Vec<String>);
    pieces.push(CStr::from_ptr(text).to_string_lossy().into_owned());
}

/// `duet_caption_rgb_with`: NULL options are greedy (`duet_caption_rgb`'s text), beam search
/// and seeded sampling give the Rust runtime's texts, the callback's pieces add up to the
/// caption, and bad options, prompts and pointers are typed statuses.
#[test]
fn decoding_options_prompt_and_streaming_callback() {
    let dir = tempfile::tempdir().unwrap();
    // An EOS bias that ends texts at different lengths, so beam search has choices to make.
    common::caption_bundle(dir.path(), 3.5);
    let path = dir.path().to_str().unwrap();
    let (s, rt, e) = create(Some(path), Some("tract"), false);
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    let bundle = Bundle::open(dir.path()).unwrap();
    let reference = Captioner::new(
        &bundle,
        ProviderChoice::Only(Provider::Tract),
        &EngineOptions::default(),
    )
    .unwrap();
    let call =
        |img: &[u8], prompt: Option<&str>, options: Option<&DuetDecodeOptions>, stream: bool| {
            let prompt = prompt.map(cstr);
            let mut pieces: Vec<String> = Vec::new();
            let mut cap = ptr::null_mut();
            let mut err = ptr::null_mut();
            let status = unsafe {
                duet_caption_rgb_with(
                    rt,
                    img.as_ptr(),
                    img.len(),
                    8,
                    8,
                    prompt.as_ref().map_or(ptr::null(), |p| p.as_ptr()),
                    options.map_or(ptr::null(), |o| o as *const _),
                    if stream { Some(collect_piece) } else { None },
                    &mut pieces as *mut Vec<String> as *mut std::ffi::c_void,
                    &mut cap,
                    &mut err,
                )
            };
            (status, take(cap), take(err), pieces)
        };
    // SAFETY: plain numbers; the call fills every field.
    let mut defaults: DuetDecodeOptions = unsafe { std::mem::zeroed() };
    defaults.struct_size = std::mem::size_of::<DuetDecodeOptions>() as u32;
    let s = unsafe { duet_decode_defaults(&mut defaults, ptr::null_mut()) };
    assert_eq!(s, DuetStatus::Ok);
    assert_eq!(defaults.strategy, DUET_DECODE_GREEDY);

    let mut beam_differs = false;
    for seed in 0..6u8 {
        let img = image(seed * 40);
        let (s, plain, _) = caption_rgb(rt, &img, 8, 8);
        assert_eq!(s, DuetStatus::Ok);
        let (s, greedy, e, _) = call(&img, None, None, false);
        assert_eq!(s, DuetStatus::Ok, "{e:?}");
        assert_eq!(greedy, plain, "NULL options are greedy");
        let (s, same, _, _) = call(&img, None, Some(&defaults), false);
        assert_eq!((s, &same), (DuetStatus::Ok, &plain));

        let rgb = image::RgbImage::from_raw(8, 8, img.clone()).unwrap();
        for (options, decoding) in [
            (
                DuetDecodeOptions {
                    strategy: DUET_DECODE_BEAM,
                    beam_width: 4,
                    ..defaults
                },
                duet_runtime::Decoding::Beam { width: 4 },
            ),
            (
                DuetDecodeOptions {
                    strategy: DUET_DECODE_SAMPLE,
                    temperature: 1.5,
                    top_k: 5,
                    seed: 11,
                    ..defaults
                },
                duet_runtime::Decoding::Sample(duet_runtime::Sampling {
                    temperature: 1.5,
                    top_k: Some(5),
                    top_p: None,
                    seed: 11,
                }),
            ),
        ] {
            let opts = duet_runtime::DecodeOptions {
                decoding,
                max_tokens: None,
            };
            let want = reference
                .caption_images_with(std::slice::from_ref(&rgb), Some("the"), &opts, None)
                .unwrap()
                .pop()
                .unwrap();
            let (s, got, e, pieces) = call(&img, Some("the"), Some(&options), true);
            assert_eq!(s, DuetStatus::Ok, "{e:?}");
            assert_eq!(got.as_deref(), Some(want.as_str()), "{decoding:?}");
            assert_eq!(pieces.concat(), want, "streamed pieces add up");
            if matches!(decoding, duet_runtime::Decoding::Beam { .. }) {
                let (_, greedy_prompted, _, _) = call(&img, Some("the"), None, false);
                beam_differs |= greedy_prompted.as_deref() != Some(want.as_str());
            }
        }
    }
    assert!(beam_differs, "beam search never chose other than greedy");

    let img = image(1);
    for (options, says) in [
        (
            DuetDecodeOptions {
                strategy: 9,
                ..defaults
            },
            "unknown decoding strategy 9",
        ),
        (
            DuetDecodeOptions {
                strategy: DUET_DECODE_BEAM,
                beam_width: 0,
                ..defaults
            },
            "beam width",
        ),
        (
            DuetDecodeOptions {
                strategy: DUET_DECODE_SAMPLE,
                top_p: 0.0,
                ..defaults
            },
            "top_p",
        ),
        (
            DuetDecodeOptions {
                strategy: DUET_DECODE_SAMPLE,
                temperature: f32::NAN,
                ..defaults
            },
            "temperature",
        ),
    ] {
        let (s, cap, e, _) = call(&img, None, Some(&options), false);
        assert_eq!(s, DuetStatus::InvalidArgument);
        assert!(cap.is_none());
        assert!(e.as_deref().unwrap_or("").contains(says), "{e:?}");
    }
    let (s, _, e, _) = call(&img, Some("a purple"), None, false);
    assert_eq!(s, DuetStatus::InvalidArgument);
    assert!(e.unwrap().contains("purple"));
    let (s, _, e, _) = call(&img, Some(" "), None, false);
    assert_eq!(s, DuetStatus::InvalidArgument, "{e:?}");
    let s = unsafe {
        duet_caption_rgb_with(
            rt,
            img.as_ptr(),
            img.len(),
            8,
            8,
            ptr::null(),
            ptr::null(),
            None,
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::null_mut(),
        )
    };
    assert_eq!(s, DuetStatus::NullPointer);
    let s = unsafe { duet_decode_defaults(ptr::null_mut(), ptr::null_mut()) };
    assert_eq!(s, DuetStatus::NullPointer);
    let mut cap = ptr::null_mut();
    let s = unsafe {
        duet_caption_file_with(
            rt,
            ptr::null(),
            ptr::null(),
            ptr::null(),
            None,
            ptr::null_mut(),
            &mut cap,
            ptr::null_mut(),
        )
    };
    assert_eq!(s, DuetStatus::NullPointer);
    unsafe { duet_runtime_destroy(rt) };
}

/// `duet_ask_rgb` on a bundle whose captioner never saw questions is `UNSUPPORTED` saying so
/// (not a caption continuing the question); NULL arguments are `NULL_POINTER`. Answers of a
/// trained model are checked end to end (`tests/tests/e2e/vqa.rs`).
#[test]
fn asking_a_captioner_not_trained_on_questions_is_unsupported() {
    let dir = bundle();
    let (s, rt, e) = create(Some(dir.path().to_str().unwrap()), Some("tract"), false);
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    let img = image(3);
    let q = cstr("what colour is the ball?");
    let ask = |question: *const std::ffi::c_char, answer: *mut *mut std::ffi::c_char| {
        let mut err = ptr::null_mut();
        let s = unsafe {
            duet_ask_rgb(
                rt,
                img.as_ptr(),
                img.len(),
                8,
                8,
                question,
                ptr::null(),
                None,
                ptr::null_mut(),
                answer,
                &mut err,
            )
        };
        (s, take(err))
    };
    let mut answer = ptr::null_mut();
    let (s, e) = ask(q.as_ptr(), &mut answer);
    assert_eq!(s, DuetStatus::Unsupported);
    assert!(answer.is_null());
    assert!(e.unwrap().contains("not trained to answer questions"));
    let (s, e) = ask(ptr::null(), &mut answer);
    assert_eq!(s, DuetStatus::NullPointer);
    assert!(e.unwrap().contains("`question` is NULL"));
    let (s, _) = ask(q.as_ptr(), ptr::null_mut());
    assert_eq!(s, DuetStatus::NullPointer);
    unsafe { duet_runtime_destroy(rt) };
}

/// An options struct whose `struct_size` is not this library's (unset, or from another
/// `duet.h`) is an argument error naming both sizes, for every options struct, before anything
/// else is read or written: a shorter struct is never read or written past its size.
#[test]
fn options_structs_of_another_size_are_refused() {
    let dir = bundle();
    let path = dir.path().to_str().unwrap();
    let tract = cstr("tract");
    let runtime_size = std::mem::size_of::<DuetRuntimeOptions>() as u32;
    let on_tract = |struct_size: u32| DuetRuntimeOptions {
        struct_size,
        provider: tract.as_ptr(),
        strict: false,
        ort_library: ptr::null(),
        tensorrt_fp16: false,
        tensorrt_cache_dir: ptr::null(),
        threads: 0,
        precision: ptr::null(),
        idle_wait: DUET_IDLE_WAIT_SPIN,
    };
    for (size, says) in [
        (0, "set it to sizeof(DuetRuntimeOptions)"),
        // (`runtime_size - 8` is, on 64-bit targets, the struct before `idle_wait`: taken, the
        // test below.)
        (runtime_size - 16, "another duet.h"),
        (runtime_size + 8, "another duet.h"),
    ] {
        let options = on_tract(size);
        let (s, rt, e) = create_with(path, Some(&options));
        assert_eq!(s, DuetStatus::InvalidArgument, "{size}");
        assert!(rt.is_null());
        let e = e.unwrap();
        assert!(
            e.contains(&format!("`options.struct_size` is {size}")),
            "{e}"
        );
        assert!(e.contains(says), "{e}");
    }

    let (s, rt, e) = create_with(path, Some(&on_tract(runtime_size)));
    assert_eq!(s, DuetStatus::Ok, "{e:?}");

    // A caller's struct of 4 bytes holding only its size: filling it would write past it.
    let mut short = [4u32, 0xdead_beef];
    let mut err = ptr::null_mut();
    let s =
        unsafe { duet_decode_defaults(short.as_mut_ptr().cast::<DuetDecodeOptions>(), &mut err) };
    assert_eq!(s, DuetStatus::InvalidArgument);
    let e = take(err).unwrap();
    assert!(e.contains("`options.struct_size` is 4"), "{e}");
    assert_eq!(short, [4, 0xdead_beef], "nothing written");
    let mut err = ptr::null_mut();
    let s = unsafe {
        duet_generate_defaults(
            rt,
            short.as_mut_ptr().cast::<DuetGenerateOptions>(),
            &mut err,
        )
    };
    assert_eq!(
        s,
        DuetStatus::InvalidArgument,
        "checked before the missing generator"
    );
    assert!(take(err).unwrap().contains("DuetGenerateOptions"));
    assert_eq!(short, [4, 0xdead_beef], "nothing written");

    // Read: decoding options of another size are refused, the right size decodes (greedy:
    // `caption_of`'s caption of the same image).
    let img = image(7);
    // SAFETY: plain numbers; the call fills every field.
    let mut decode: DuetDecodeOptions = unsafe { std::mem::zeroed() };
    decode.struct_size = std::mem::size_of::<DuetDecodeOptions>() as u32;
    assert_eq!(
        unsafe { duet_decode_defaults(&mut decode, ptr::null_mut()) },
        DuetStatus::Ok
    );
    let caption_with = |options: &DuetDecodeOptions| {
        let mut cap = ptr::null_mut();
        let mut err = ptr::null_mut();
        let s = unsafe {
            duet_caption_rgb_with(
                rt,
                img.as_ptr(),
                img.len(),
                8,
                8,
                ptr::null(),
                options,
                None,
                ptr::null_mut(),
                &mut cap,
                &mut err,
            )
        };
        (s, take(cap), take(err))
    };
    let (s, cap, e) = caption_with(&decode);
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    assert_eq!(cap.unwrap(), caption_of(rt));
    let (s, cap, e) = caption_with(&DuetDecodeOptions {
        struct_size: 0,
        ..decode
    });
    assert_eq!(s, DuetStatus::InvalidArgument);
    assert!(cap.is_none());
    assert!(e.unwrap().contains("sizeof(DuetDecodeOptions)"));
    unsafe { duet_runtime_destroy(rt) };
}

/// A host built with the `duet.h` before `idle_wait` passes its shorter struct: taken, with
/// spin, and the bytes after it (garbage where `idle_wait` is now) are not read. `idle_wait`
/// sleep runs and captions as spin does; another value is an argument error.
#[test]
fn runtime_options_of_the_header_before_idle_wait_are_taken() {
    /// `DuetRuntimeOptions` as the earlier `duet.h` declared it.
    #[repr(C)]
    struct Before {
        struct_size: u32,
        provider: *const std::ffi::c_char,
        strict: bool,
        ort_library: *const std::ffi::c_char,
        tensorrt_fp16: bool,
        tensorrt_cache_dir: *const std::ffi::c_char,
        threads: u32,
        precision: *const std::ffi::c_char,
    }
    /// The host's memory: its struct, then bytes that are not its.
    #[repr(C)]
    struct HostMemory {
        options: Before,
        after: [u8; 16],
    }
    assert!(std::mem::size_of::<Before>() < std::mem::size_of::<DuetRuntimeOptions>());
    assert!(std::mem::size_of::<HostMemory>() >= std::mem::size_of::<DuetRuntimeOptions>());
    let dir = bundle();
    let path = dir.path().to_str().unwrap();
    let tract = cstr("tract");
    let host = HostMemory {
        options: Before {
            struct_size: std::mem::size_of::<Before>() as u32,
            provider: tract.as_ptr(),
            strict: true,
            ort_library: ptr::null(),
            tensorrt_fp16: false,
            tensorrt_cache_dir: ptr::null(),
            threads: 2,
            precision: ptr::null(),
        },
        after: [0xA5; 16],
    };
    // SAFETY: `host` spans a whole `DuetRuntimeOptions` of valid field values (the bytes
    // after `Before` make a `u32`); the library reads only `Before`'s fields of it.
    let as_new = unsafe { &*(&host as *const HostMemory).cast::<DuetRuntimeOptions>() };
    assert_ne!(
        as_new.idle_wait, DUET_IDLE_WAIT_SPIN,
        "the garbage would be refused if read"
    );
    let (s, rt, e) = create_with(path, Some(as_new));
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    assert!(report(rt).contains("caption_decoder: running on tract"));
    let spin = caption_of(rt);
    unsafe { duet_runtime_destroy(rt) };

    let options = |idle_wait: u32| DuetRuntimeOptions {
        struct_size: std::mem::size_of::<DuetRuntimeOptions>() as u32,
        provider: tract.as_ptr(),
        strict: true,
        ort_library: ptr::null(),
        tensorrt_fp16: false,
        tensorrt_cache_dir: ptr::null(),
        threads: 2,
        precision: ptr::null(),
        idle_wait,
    };
    let (s, rt, e) = create_with(path, Some(&options(DUET_IDLE_WAIT_SLEEP)));
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    assert_eq!(caption_of(rt), spin);
    unsafe { duet_runtime_destroy(rt) };
    let (s, rt, e) = create_with(path, Some(&options(2)));
    assert_eq!(s, DuetStatus::InvalidArgument);
    assert!(rt.is_null());
    assert!(e.unwrap().contains("options.idle_wait: 2"));
}
