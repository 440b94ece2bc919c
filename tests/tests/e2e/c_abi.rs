//! Generation through the C ABI (`duet_generate`), from Rust and from a C program compiled
//! against the generated header, compared with the Rust runtime.

use super::*;

pub(crate) mod sys {
    use std::ffi::{c_char, CStr, CString};
    use std::ptr;

    use duet::*;

    pub fn take(s: *mut c_char) -> Option<String> {
        if s.is_null() {
            return None;
        }
        let text = unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned();
        unsafe { duet_string_free(s) };
        Some(text)
    }

    pub fn create(dir: &std::path::Path, provider: &str) -> *mut DuetRuntime {
        let dir = CString::new(dir.to_str().unwrap()).unwrap();
        let provider = CString::new(provider).unwrap();
        let (mut rt, mut err) = (ptr::null_mut(), ptr::null_mut());
        let s = unsafe {
            duet_runtime_create(dir.as_ptr(), provider.as_ptr(), true, &mut rt, &mut err)
        };
        assert_eq!(s, DuetStatus::Ok, "{:?}", take(err));
        rt
    }

    /// `duet_generate_rgb` into a fresh buffer of `len` bytes.
    pub fn generate(
        rt: *const DuetRuntime,
        prompt: &str,
        options: Option<&DuetGenerateOptions>,
        len: usize,
    ) -> (DuetStatus, Vec<u8>, Option<String>) {
        let prompt = CString::new(prompt).unwrap();
        let mut buf = vec![0u8; len];
        let mut err = ptr::null_mut();
        let s = unsafe {
            duet_generate_rgb(
                rt,
                prompt.as_ptr(),
                options.map_or(ptr::null(), |o| o as *const _),
                buf.as_mut_ptr(),
                len,
                &mut err,
            )
        };
        (s, buf, take(err))
    }
}

/// The C ABI's generation on the trained tiny generator: the same pixels as the Rust runtime,
/// the bundle's defaults and image size, typed errors for bad arguments (the buffer untouched),
/// 8 threads × 100 calls on one handle equal to sequential calls, and `examples/c/generate.c`
/// compiled with `cc` and run under valgrind with zero leaks and invalid accesses.
#[test]
fn c_abi_generates_like_the_rust_runtime() {
    use duet::*;
    let g = gen_fixture();
    let rt = sys::create(&g.bundle, "tract");
    let (mut w, mut h) = (0u32, 0u32);
    let s = unsafe { duet_generate_image_size(rt, &mut w, &mut h, std::ptr::null_mut()) };
    assert_eq!((s, w, h), (DuetStatus::Ok, 32, 32));
    let len = (w * h * 3) as usize;
    let mut defaults = DuetGenerateOptions {
        struct_size: std::mem::size_of::<DuetGenerateOptions>() as u32,
        sampler: 9,
        eta: 9.0,
        steps: 0,
        guidance: 0.0,
        seed: 9,
    };
    let s = unsafe { duet_generate_defaults(rt, &mut defaults, std::ptr::null_mut()) };
    assert_eq!(s, DuetStatus::Ok);

    let bundle = Bundle::open(&g.bundle).unwrap();
    let reference = Generator::new(
        &bundle,
        ProviderChoice::Only(Provider::Tract),
        &engine_options(),
    )
    .unwrap();
    let d = reference.default_options();
    assert_eq!(
        defaults,
        DuetGenerateOptions {
            struct_size: std::mem::size_of::<DuetGenerateOptions>() as u32,
            sampler: DUET_SAMPLER_DDIM,
            eta: 0.0,
            steps: d.steps as u32,
            guidance: d.guidance,
            seed: 0,
        }
    );
    let prompt = "a large red circle at the top left";
    let opts = DuetGenerateOptions {
        steps: 6,
        seed: 3,
        ..defaults
    };
    let (s, pixels, e) = sys::generate(rt, prompt, Some(&opts), len);
    assert_eq!(s, DuetStatus::Ok, "{e:?}");
    // The Rust runtime's image for these options: what the FFI and the C program must write.
    let want6 = reference
        .generate_images(
            &[prompt],
            &GenerateOptions {
                steps: 6,
                seed: 3,
                ..d
            },
        )
        .unwrap()
        .remove(0);
    assert_eq!(pixels, want6.as_raw().as_slice());
    // NULL options = the bundle's defaults.
    let (s, pixels, _) = sys::generate(rt, prompt, None, len);
    assert_eq!(s, DuetStatus::Ok);
    let want = reference.generate_images(&[prompt], &d).unwrap();
    assert_eq!(pixels, want[0].as_raw().as_slice());

    // Bad arguments: typed status, a message naming the problem, the buffer left as it was.
    let bad_opts = |o: DuetGenerateOptions| sys::generate(rt, prompt, Some(&o), len);
    for (status, bytes, err, needle) in [
        {
            let (s, b, e) = sys::generate(rt, prompt, Some(&opts), len - 1);
            (s, b, e, "`len` is")
        },
        {
            let (s, b, e) = sys::generate(rt, "", Some(&opts), len);
            (s, b, e, "empty")
        },
        {
            let (s, b, e) = sys::generate(rt, "a red unicorn", Some(&opts), len);
            (s, b, e, "unicorn")
        },
        {
            let (s, b, e) = bad_opts(DuetGenerateOptions { sampler: 7, ..opts });
            (s, b, e, "unknown sampler 7")
        },
        {
            let (s, b, e) = bad_opts(DuetGenerateOptions { steps: 0, ..opts });
            (s, b, e, "steps must be")
        },
        {
            let (s, b, e) = bad_opts(DuetGenerateOptions {
                guidance: f32::NAN,
                ..opts
            });
            (s, b, e, "guidance")
        },
    ] {
        assert_eq!(status, DuetStatus::InvalidArgument, "{err:?}");
        let err = err.unwrap();
        assert!(err.contains(needle), "{err}");
        assert!(bytes.iter().all(|&b| b == 0), "buffer written on error");
    }
    let null_prompt = unsafe {
        duet_generate_rgb(
            rt,
            std::ptr::null(),
            &opts,
            vec![0u8; len].as_mut_ptr(),
            len,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(null_prompt, DuetStatus::NullPointer);
    let null_buf = unsafe {
        duet_generate_rgb(
            rt,
            c"a red circle".as_ptr(),
            &opts,
            std::ptr::null_mut(),
            len,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(null_buf, DuetStatus::NullPointer);

    // 8 threads × 100 calls on one handle give what sequential calls give.
    let prompts = [
        "a large red circle at the top left",
        "a small blue square in the centre",
        "a large green cross at the bottom",
    ];
    let quick = DuetGenerateOptions { steps: 2, ..opts };
    let sequential: Vec<Vec<u8>> = prompts
        .iter()
        .map(|p| sys::generate(rt, p, Some(&quick), len).1)
        .collect();
    let handle = rt as usize;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..8)
            .map(|t| {
                let (prompts, sequential) = (&prompts, &sequential);
                scope.spawn(move || {
                    for i in 0..100 {
                        let k = (t + i) % prompts.len();
                        let (s, px, e) = sys::generate(
                            handle as *const DuetRuntime,
                            prompts[k],
                            Some(&quick),
                            len,
                        );
                        assert_eq!(s, DuetStatus::Ok, "{e:?}");
                        assert!(px == sequential[k], "thread {t} call {i} differs");
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
    });
    unsafe { duet_runtime_destroy(rt) };

    // The C program, under valgrind when installed (always in CI).
    let dir = tempfile::tempdir().unwrap();
    let exe = c_build::compile("generate", dir.path());
    let valgrind = c_build::have_valgrind();
    let ppm = dir.path().join("out.ppm");
    let (_, stderr) = c_build::run_ok(
        c_build::command(&exe, valgrind)
            .args([
                "--provider",
                "tract",
                "--strict",
                "--steps",
                "6",
                "--seed",
                "3",
            ])
            .arg(&g.bundle)
            .arg(&ppm)
            .arg(prompt),
    );
    assert!(stderr.contains("denoiser: running on tract"), "{stderr}");
    c_build::assert_clean(&stderr, valgrind);
    let written = std::fs::read(&ppm).unwrap();
    let header = b"P6\n32 32\n255\n";
    assert_eq!(&written[..header.len()], header);
    // Exact bytes in-process (above). Under valgrind, which does not emulate AVX-512, tract
    // dispatches other SIMD kernels, so float rounding may move a pixel by one level (seen once
    // in CI: 1 byte of 3,072 off by 1); without valgrind the program must match exactly.
    let got = &written[header.len()..];
    let want = want6.as_raw().as_slice();
    assert_eq!(got.len(), want.len());
    let off: Vec<(usize, u8, u8)> = (0..got.len())
        .filter(|&i| got[i] != want[i])
        .map(|i| (i, got[i], want[i]))
        .collect();
    let (max_diff, max_off) = if valgrind {
        (1, got.len() / 100)
    } else {
        (0, 0)
    };
    assert!(
        off.len() <= max_off && off.iter().all(|&(_, a, b)| a.abs_diff(b) <= max_diff),
        "the C program's image differs from the runtime's at {} bytes: {:?}",
        off.len(),
        &off[..off.len().min(20)]
    );
    // An unknown word is reported by the C program with duet's message and a non-zero exit.
    let out = c_build::command(&exe, false)
        .args(["--provider", "tract"])
        .arg(&g.bundle)
        .arg(&ppm)
        .arg("a red unicorn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("status 2") && stderr.contains("unicorn"),
        "{stderr}"
    );
}
