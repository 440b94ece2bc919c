//! Random arguments through the C ABI, the way a buggy or hostile host passes them: NULLs,
//! sizes that do not match their buffers or overflow, non-UTF-8 and 20 KB prompts, paths to
//! FIFOs, devices and directories, NaN and out-of-range options. On the shipped bundle
//! (every pipeline) through tract. Each call must return a status with an error message, or
//! succeed; never `DUET_STATUS_PANIC` (a panic caught at the boundary is still a bug), never
//! a crash or hang. Seeded (`DUET_FUZZ_SEED`), counts printed past libtest's capture.

mod strings;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::ptr;

use duet::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use strings::take;

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shipped/duet-small")
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, xs: &[T]) -> T {
    xs[rng.random_range(0..xs.len())]
}

/// A prompt: words of the bundle's vocabulary, random bytes (valid UTF-8 or not, never NUL
/// inside), control characters, or 20 KB.
fn prompt(rng: &mut ChaCha8Rng) -> CString {
    let words = [
        "a", "large", "red", "circle", "at", "the", "top", "left", "grinning", "face",
    ];
    let bytes: Vec<u8> = match rng.random_range(0..5) {
        0 | 1 => (0..rng.random_range(1..8))
            .map(|_| pick(rng, &words))
            .collect::<Vec<_>>()
            .join(" ")
            .into_bytes(),
        2 => (0..rng.random_range(0..64))
            .map(|_| rng.random_range(1..=255u8))
            .collect(),
        3 => b"\x1b[31m red \r\n circle \x07".to_vec(),
        _ => vec![b'a'; 20_000],
    };
    CString::new(bytes).unwrap()
}

#[test]
fn fuzz_c_abi_arguments() {
    let seed: u64 = std::env::var("DUET_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_d0e7);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 5);
    let dir = CString::new(shipped().to_str().unwrap()).unwrap();
    let tract = CString::new("tract").unwrap();
    let mut rt = ptr::null_mut();
    let mut err = ptr::null_mut();
    let status =
        unsafe { duet_runtime_create(dir.as_ptr(), tract.as_ptr(), false, &mut rt, &mut err) };
    assert_eq!(status, DuetStatus::Ok, "{:?}", take(err));

    let scratch = tempfile::tempdir().unwrap();
    let fifo = scratch.path().join("fifo.png");
    let c = CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let png = scratch.path().join("ok.png");
    image::RgbImage::from_pixel(40, 20, image::Rgb([10, 200, 30]))
        .save(&png)
        .unwrap();
    let paths: Vec<CString> = [
        fifo.to_str().unwrap(),
        "/dev/zero",
        "/",
        "/nonexistent/x.png",
        png.to_str().unwrap(),
        "",
    ]
    .iter()
    .map(|p| CString::new(*p).unwrap())
    .collect();

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let cases = 300;
    for case in 0..cases {
        let mut err = ptr::null_mut();
        let call = rng.random_range(0..4);
        let status = unsafe {
            match call {
                0 => {
                    // Sizes that match, do not match, or overflow `w * h * 3`.
                    let (w, h) = pick(
                        &mut rng,
                        &[
                            (32, 32),
                            (8, 8),
                            (0, 0),
                            (1, 0),
                            (u32::MAX, u32::MAX),
                            (65_536, 65_536),
                            (3, 5),
                        ],
                    );
                    let buf: Vec<u8> = (0..rng.random_range(0..4096))
                        .map(|_| rng.random())
                        .collect();
                    let len = if rng.random_bool(0.5) {
                        (w as usize)
                            .saturating_mul(h as usize)
                            .saturating_mul(3)
                            .min(buf.len())
                    } else {
                        buf.len()
                    };
                    let data = if rng.random_bool(0.1) {
                        ptr::null()
                    } else {
                        buf.as_ptr()
                    };
                    let mut cap = ptr::null_mut();
                    let s = duet_caption_rgb(rt, data, len, w, h, &mut cap, &mut err);
                    take(cap);
                    s
                }
                1 => {
                    let path = &paths[rng.random_range(0..paths.len())];
                    let mut cap = ptr::null_mut();
                    let s = duet_caption_file(rt, path.as_ptr(), &mut cap, &mut err);
                    take(cap);
                    s
                }
                2 => {
                    let p = prompt(&mut rng);
                    let size = std::mem::size_of::<DuetGenerateOptions>() as u32;
                    let opts = DuetGenerateOptions {
                        struct_size: pick(&mut rng, &[size, size, size, 0, 4, size + 8]),
                        sampler: pick(&mut rng, &[0, 1, 2, u32::MAX]),
                        eta: pick(&mut rng, &[0.0, 1.0, -1.0, f32::NAN, f32::INFINITY]),
                        steps: pick(&mut rng, &[0, 1, 2, 3, 1001, u32::MAX]),
                        guidance: pick(&mut rng, &[0.0, 1.0, 3.0, -1.0, f32::NAN, f32::INFINITY]),
                        seed: rng.random(),
                    };
                    let len = pick(&mut rng, &[32 * 32 * 3, 0, 12, usize::MAX]);
                    // The buffer is never larger than a real image: a wrong `len` (up to
                    // usize::MAX) must be refused before anything is written.
                    let mut out = vec![0u8; (32 * 32 * 3).min(len)];
                    let out_ptr = out.as_mut_ptr();
                    let opts_ptr = if rng.random_bool(0.2) {
                        ptr::null()
                    } else {
                        &opts
                    };
                    duet_generate_rgb(rt, p.as_ptr(), opts_ptr, out_ptr, len, &mut err)
                }
                _ => {
                    let (w, h, n) = pick(
                        &mut rng,
                        &[(32, 32, 3072), (0, 0, 0), (8, 8, 192), (32, 32, 7)],
                    );
                    let buf = vec![rng.random::<u8>(); n];
                    let data = if n == 0 { ptr::null() } else { buf.as_ptr() };
                    let text = prompt(&mut rng);
                    let text_ptr = if rng.random_bool(0.3) {
                        ptr::null()
                    } else {
                        text.as_ptr()
                    };
                    let mut out = std::mem::MaybeUninit::<DuetClassification>::zeroed();
                    let mut label = ptr::null_mut();
                    let s = duet_classify(
                        rt,
                        data,
                        n,
                        w,
                        h,
                        text_ptr,
                        rng.random(),
                        out.as_mut_ptr(),
                        &mut label,
                        &mut err,
                    );
                    take(label);
                    s
                }
            }
        };
        let message = take(err);
        assert_ne!(
            status,
            DuetStatus::Panic,
            "case {case} (call {call}, seed {seed}): {message:?}"
        );
        if status == DuetStatus::Ok {
            assert!(
                message.is_none(),
                "case {case}: success with an error {message:?}"
            );
        } else {
            let m = message.unwrap_or_default();
            assert!(!m.is_empty(), "case {case}: {status:?} without a message");
        }
        *counts.entry(format!("{status:?}")).or_default() += 1;
    }
    unsafe { duet_runtime_destroy(rt) };
    let summary: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(
        std::io::stderr(),
        "fuzz C ABI: {cases} calls (seed {seed:#x}): [{}]",
        summary.join(", ")
    );
    assert!(
        counts.get("Ok").copied().unwrap_or(0) > 0,
        "no call succeeded: {counts:?}"
    );
}
