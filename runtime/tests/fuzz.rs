//! Mutation fuzzing of everything a bundle or a user hands the runtime: manifest JSON,
//! tokenizer JSON, ONNX bytes, image bytes (PNG, JPEG, GIF, BMP, WebP) and the bundle's files
//! on disk. Each case must end in a typed error or a valid result: no panic (every case runs
//! under `catch_unwind` and a panic fails the test with the case), no hang (a watchdog aborts
//! with the case after 60 s), and no more than [`ALLOC_BOUND`] of memory held at once by the
//! case (a counting global allocator tracks live bytes and their peak).
//!
//! The cases are mutations of real, valid inputs — flipped bits, inserted and deleted bytes,
//! truncations, and for JSON, values replaced by hostile ones (huge and negative numbers,
//! control characters, wrong types) — drawn from a seeded ChaCha stream, so a failure is
//! reproducible from the seed it prints (`DUET_FUZZ_SEED`; `DUET_FUZZ_SCALE` multiplies the
//! case counts). Written here rather than with `proptest`/`cargo fuzz`: the inputs are real
//! files mutated with format knowledge, not generated values to shrink, and the tests must run
//! on stable Rust in CI's time. `tests/fuzz-corpus/` holds the interesting cases (the issue's
//! findings and anything a run ever failed on), run first on every run.

use duet_testkit as common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use duet_runtime::engine::{Engine, EngineOptions, Provider, ProviderChoice, Value};
use duet_runtime::manifest::Manifest;
use duet_runtime::preprocess::decode_image;
use duet_runtime::{Bundle, Captioner};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The most memory a case may hold at once above what was live when it started. The tiny test
/// bundle needs a few megabytes; a hostile manifest that got past the bounds would ask for
/// gigabytes, and a 10 MB prompt used to cost the tokenizer 1.08 GB.
const ALLOC_BOUND: usize = 256 << 20;

/// Counts live heap bytes and their peak (process-wide: the campaigns of this file run on
/// several test threads, so a case's figure includes its neighbours' and errs high).
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn seed() -> u64 {
    std::env::var("DUET_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_d0e7)
}

fn cases(n: usize) -> usize {
    let scale: f64 = std::env::var("DUET_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    ((n as f64 * scale).round() as usize).max(1)
}

/// Written past libtest's output capture, so the counts are in every CI log.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Runs the cases of one target and checks the three properties on each.
struct Campaign {
    name: &'static str,
    ran: usize,
    ok: usize,
    errors: BTreeMap<String, usize>,
    started: Instant,
    heartbeat: Arc<AtomicU64>,
}

impl Campaign {
    fn new(name: &'static str) -> Campaign {
        let heartbeat = Arc::new(AtomicU64::new(0));
        let beat = Arc::clone(&heartbeat);
        // The watchdog: if one case runs for a minute, the process ends with its name (a hang
        // would otherwise be seen only as CI's global timeout).
        std::thread::spawn(move || {
            let mut last = (u64::MAX, Instant::now());
            loop {
                std::thread::sleep(Duration::from_secs(5));
                let now = beat.load(Ordering::Relaxed);
                if now == u64::MAX {
                    return;
                }
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > Duration::from_secs(60) {
                    say(&format!("fuzz {name}: case {now} has run for 60 s: a hang"));
                    std::process::abort();
                }
            }
        });
        Campaign {
            name,
            ran: 0,
            ok: 0,
            errors: BTreeMap::new(),
            started: Instant::now(),
            heartbeat,
        }
    }

    /// `f` returns `Ok` for a valid result or the kind of its typed error.
    fn case(&mut self, what: &str, f: impl FnOnce() -> Result<(), String>) {
        self.heartbeat.store(self.ran as u64, Ordering::Relaxed);
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let result = catch_unwind(AssertUnwindSafe(f));
        let largest = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        self.ran += 1;
        match result {
            Ok(Ok(())) => self.ok += 1,
            Ok(Err(kind)) => *self.errors.entry(kind).or_default() += 1,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!(
                    "fuzz {}: case {} ({what}, seed {}) panicked: {msg}",
                    self.name,
                    self.ran - 1,
                    seed()
                );
            }
        }
        assert!(
            largest <= ALLOC_BOUND,
            "fuzz {}: case {} ({what}, seed {}) held {largest} bytes more at its peak",
            self.name,
            self.ran - 1,
            seed()
        );
    }

    fn finish(self) -> usize {
        self.heartbeat.store(u64::MAX, Ordering::Relaxed);
        let kinds: Vec<String> = self
            .errors
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        say(&format!(
            "fuzz {}: {} cases in {:.1} s (seed {:#x}): {} valid, {} typed errors [{}]",
            self.name,
            self.ran,
            self.started.elapsed().as_secs_f64(),
            seed(),
            self.ok,
            self.ran - self.ok,
            kinds.join(", ")
        ));
        self.ran
    }
}

/// The variant name of an error's `Debug` form: `HashMismatch { .. }` → `HashMismatch`.
fn kind(e: &impl std::fmt::Debug) -> String {
    let s = format!("{e:?}");
    let end = s.find([' ', '(', '{']).unwrap_or(s.len());
    s[..end].to_string()
}

/// Byte-level mutations: bit flips, random bytes, insertions, deletions, truncation, and
/// copies of a chunk elsewhere (a few per case).
fn mutate_bytes(rng: &mut ChaCha8Rng, input: &[u8]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        if b.is_empty() {
            b.push(rng.random());
            continue;
        }
        let i = rng.random_range(0..b.len());
        match rng.random_range(0..6) {
            0 => b[i] ^= 1 << rng.random_range(0..8),
            1 => b[i] = rng.random(),
            2 => {
                let n = rng.random_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                b.splice(i..i, bytes);
            }
            3 => {
                let end = (i + rng.random_range(1..=64)).min(b.len());
                b.drain(i..end);
            }
            4 => b.truncate(i),
            _ => {
                let end = (i + rng.random_range(1..=32)).min(b.len());
                let chunk = b[i..end].to_vec();
                let j = rng.random_range(0..=b.len());
                b.splice(j..j, chunk);
            }
        }
    }
    b
}

/// Hostile JSON values: numbers at and past every bound, negative and fractional sizes,
/// wrong types, control characters, deep nesting.
fn hostile_value(rng: &mut ChaCha8Rng) -> serde_json::Value {
    use serde_json::json;
    let choices = [
        json!(0),
        json!(-1),
        json!(1),
        json!(2),
        json!(3),
        json!(1.5),
        json!(1e18),
        json!(9_223_372_036_854_775_807u64),
        json!(18_446_744_073_709_551_615u64),
        json!(4_294_967_296u64),
        json!(65_536),
        json!(1025),
        json!(-1e308),
        json!(null),
        json!(true),
        json!(""),
        json!("\u{1b}[31m\r\n\u{0}"),
        json!("../../etc/passwd"),
        json!("/etc/passwd"),
        json!("x".repeat(10_000)),
        json!([]),
        json!({}),
        json!([[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]),
        json!({"a": {"b": {"c": 1}}}),
    ];
    choices[rng.random_range(0..choices.len())].clone()
}

/// Replaces, removes or adds one value somewhere in a JSON document.
fn mutate_json(rng: &mut ChaCha8Rng, v: &mut serde_json::Value) {
    use serde_json::Value as J;
    // Choose a random path (as a JSON pointer), stopping at a random depth, then edit there.
    let mut pointer = String::new();
    let mut at: &J = v;
    loop {
        if !rng.random_bool(0.75) {
            break;
        }
        match at {
            J::Object(m) if !m.is_empty() => {
                let (k, next) = m.iter().nth(rng.random_range(0..m.len())).unwrap();
                pointer.push('/');
                pointer.push_str(&k.replace('~', "~0").replace('/', "~1"));
                at = next;
            }
            J::Array(a) if !a.is_empty() => {
                let i = rng.random_range(0..a.len());
                pointer.push_str(&format!("/{i}"));
                at = &a[i];
            }
            _ => break,
        }
    }
    let node = v.pointer_mut(&pointer).expect("a path just walked");
    match node {
        J::Object(m) if !m.is_empty() && rng.random_bool(0.3) => {
            let k = m.keys().nth(rng.random_range(0..m.len())).cloned().unwrap();
            m.remove(&k);
        }
        J::Object(m) if rng.random_bool(0.2) => {
            m.insert("extra".into(), hostile_value(rng));
        }
        J::Array(a) if rng.random_bool(0.3) => {
            if a.is_empty() || rng.random_bool(0.5) {
                a.push(hostile_value(rng));
            } else {
                let i = rng.random_range(0..a.len());
                a.remove(i);
            }
        }
        other => *other = hostile_value(rng),
    }
}

/// A tiny captioning bundle on disk, its manifest, and an image for it.
fn base_bundle() -> (tempfile::TempDir, Manifest) {
    let dir = tempfile::tempdir().unwrap();
    let m = caption_bundle(dir.path(), 0.0);
    (dir, m)
}

/// Opens the bundle in `dir` and, when it opens, captions one image on tract: the whole path
/// a hostile bundle takes through the runtime.
fn open_and_caption(dir: &Path) -> Result<(), String> {
    let bundle = Bundle::open(dir).map_err(|e| format!("open:{}", kind(&e)))?;
    let cap = Captioner::new(
        &bundle,
        ProviderChoice::Only(Provider::Tract),
        &EngineOptions::default(),
    )
    .map_err(|e| format!("load:{}", kind(&e)))?;
    let side = bundle.manifest().image.size.min(64) as u32;
    let img = image::RgbImage::from_pixel(side, side, image::Rgb([200, 30, 30]));
    let img = duet_runtime::preprocess::resize_for(&img, &bundle.manifest().image);
    cap.caption_images(&[img])
        .map(drop)
        .map_err(|e| format!("caption:{}", kind(&e)))
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus")
}

/// The kept manifests of `fuzz-corpus/` (see its README): JSON patches over the base manifest
/// (`manifest-*.json`), or text inserted after its opening brace (`manifest-*.txt`).
fn corpus_manifests(base: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("manifest-"))
        })
        .collect();
    names.sort();
    for p in names {
        let text = std::fs::read_to_string(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".json") {
            let patch: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
            let mut v: serde_json::Value = serde_json::from_str(base).unwrap();
            for (ptr, value) in patch {
                *v.pointer_mut(&ptr)
                    .unwrap_or_else(|| panic!("{name}: no {ptr} in the base manifest")) = value;
            }
            out.push((name, v.to_string()));
        } else {
            out.push((name, format!("{{{}{}", text.trim_end(), &base[1..])));
        }
    }
    out
}

#[test]
fn fuzz_manifest_json() {
    let (dir, _) = base_bundle();
    let path = dir.path().join("manifest.json");
    let base = std::fs::read_to_string(&path).unwrap();
    let mut c = Campaign::new("manifest");
    let corpus = corpus_manifests(&base);
    assert!(corpus.len() >= 4, "the regression corpus is missing");
    for (name, text) in &corpus {
        std::fs::write(&path, text).unwrap();
        // Every kept case is hostile: it must be refused, not only survived.
        c.case(name, || match open_and_caption(dir.path()) {
            Ok(()) => panic!("{name} was accepted"),
            Err(kind) => Err(kind),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed());
    let base_json: serde_json::Value = serde_json::from_str(&base).unwrap();
    for i in 0..cases(1200) {
        let text = if i % 3 == 0 {
            String::from_utf8_lossy(&mutate_bytes(&mut rng, base.as_bytes())).into_owned()
        } else {
            let mut v = base_json.clone();
            for _ in 0..rng.random_range(1..=3) {
                mutate_json(&mut rng, &mut v);
            }
            v.to_string()
        };
        std::fs::write(&path, &text).unwrap();
        c.case("mutated manifest", || open_and_caption(dir.path()));
    }
    assert!(c.finish() >= 1200);
}

/// One tokenizer case: the file's own hash recorded (the tokenizer is the hostile part), the
/// bundle opened, the tokenizer loaded and run both ways on a few texts.
fn tokenizer_case(dir: &Path, base: &Manifest, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(dir.join("tokenizer.json"), bytes).unwrap();
    let mut m = base.clone();
    m.files.insert(
        "tokenizer.json".into(),
        duet_runtime::bundle::sha256_hex(bytes),
    );
    write_manifest(dir, &m);
    let bundle = Bundle::open(dir).map_err(|e| format!("open:{}", kind(&e)))?;
    let tok = bundle
        .load_tokenizer()
        .map_err(|_| "tokenizer".to_string())?;
    for text in ["a red circle", "", "\u{1b}[0m ünïcödé 🍎", "[UNK] [PAD]"] {
        let enc = tok.encode(text, true).map_err(|_| "encode".to_string())?;
        tok.decode(enc.get_ids(), true)
            .map_err(|_| "decode".to_string())?;
    }
    Ok(())
}

#[test]
fn fuzz_tokenizer_json() {
    let (dir, base_manifest) = base_bundle();
    let base = std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap();
    let base_json: serde_json::Value = serde_json::from_str(&base).unwrap();
    let mut c = Campaign::new("tokenizer");
    // Kept cases first: whole tokenizer files, `fuzz-corpus/tokenizer-*.json`.
    let mut kept: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("tokenizer-"))
        })
        .collect();
    kept.sort();
    assert!(!kept.is_empty(), "the tokenizer corpus is missing");
    for p in &kept {
        let bytes = std::fs::read(p).unwrap();
        c.case(&p.display().to_string(), || {
            tokenizer_case(dir.path(), &base_manifest, &bytes)
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed() ^ 1);
    for i in 0..cases(400) {
        let bytes = if i % 3 == 0 {
            mutate_bytes(&mut rng, base.as_bytes())
        } else {
            let mut v = base_json.clone();
            mutate_json(&mut rng, &mut v);
            v.to_string().into_bytes()
        };
        if std::env::var_os("DUET_FUZZ_DUMP").is_some() {
            // For a failing case to be kept: its bytes, by index.
            let _ = std::fs::write(
                std::env::temp_dir().join(format!("tokenizer-{i}.json")),
                &bytes,
            );
        }
        c.case("mutated tokenizer", || {
            tokenizer_case(dir.path(), &base_manifest, &bytes)
        });
    }
    assert!(c.finish() >= 400);
}

#[test]
fn fuzz_onnx_bytes() {
    let spec = tiny_spec(vocab_size());
    let base = vision_model(&spec, 11);
    let mut rng = ChaCha8Rng::seed_from_u64(seed() ^ 2);
    let mut c = Campaign::new("onnx");
    let pixels = ndarray::ArrayD::from_elem(vec![1, 3, 8, 8], 0.5f32);
    for _ in 0..cases(300) {
        let bytes: Arc<[u8]> = mutate_bytes(&mut rng, &base).into();
        c.case("mutated vision encoder", || {
            let (engine, _) = Engine::load_bytes(
                bytes,
                "vision_encoder",
                ProviderChoice::Only(Provider::Tract),
                &EngineOptions::default(),
            )
            .map_err(|e| format!("load:{}", kind(&e)))?;
            engine
                .run(&[("pixels", Value::F32(pixels.clone()))])
                .map(drop)
                .map_err(|e| format!("run:{}", kind(&e)))
        });
    }
    assert!(c.finish() >= 300);
}

#[test]
fn fuzz_image_bytes() {
    let mut seeds = Vec::new();
    let mut rgba = image::RgbaImage::new(12, 9);
    for (x, y, p) in rgba.enumerate_pixels_mut() {
        *p = image::Rgba([(x * 20) as u8, (y * 25) as u8, 90, (x * y * 3) as u8]);
    }
    let rgb = image::DynamicImage::ImageRgba8(rgba.clone()).into_rgb8();
    for (format, img) in [
        (
            image::ImageFormat::Png,
            image::DynamicImage::ImageRgba8(rgba.clone()),
        ),
        (
            image::ImageFormat::Jpeg,
            image::DynamicImage::ImageRgb8(rgb.clone()),
        ),
        (
            image::ImageFormat::Gif,
            image::DynamicImage::ImageRgba8(rgba.clone()),
        ),
        (
            image::ImageFormat::Bmp,
            image::DynamicImage::ImageRgb8(rgb.clone()),
        ),
        (
            image::ImageFormat::WebP,
            image::DynamicImage::ImageRgba8(rgba.clone()),
        ),
    ] {
        let mut bytes = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut bytes), format)
            .unwrap();
        assert!(
            decode_image(&bytes).is_ok(),
            "{format:?} seed does not decode"
        );
        seeds.push((format, bytes));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed() ^ 3);
    let mut c = Campaign::new("image");
    for i in 0..cases(1000) {
        let (format, base) = &seeds[i % seeds.len()];
        let bytes = mutate_bytes(&mut rng, base);
        c.case(&format!("mutated {format:?}"), || {
            decode_image(&bytes)
                .map(drop)
                .map_err(|_| format!("{format:?} refused"))
        });
    }
    assert!(c.finish() >= 1000);
}

/// The bundle's files replaced by what a hostile directory can hold: symlinks in and out,
/// FIFOs, directories, empty and sparse files past the caps, missing files.
#[test]
fn fuzz_bundle_files() {
    let (dir, m) = base_bundle();
    let outside = tempfile::tempdir().unwrap();
    let originals: Vec<(String, Vec<u8>)> = m
        .files
        .keys()
        .chain(std::iter::once(&"manifest.json".to_string()))
        .map(|n| (n.clone(), std::fs::read(dir.path().join(n)).unwrap()))
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed() ^ 4);
    let mut c = Campaign::new("bundle files");
    for _ in 0..cases(150) {
        // Restore, then damage one or two files.
        for (n, bytes) in &originals {
            let p = dir.path().join(n);
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::remove_dir_all(&p);
            std::fs::write(&p, bytes).unwrap();
        }
        for _ in 0..rng.random_range(1..=2) {
            let (name, bytes) = &originals[rng.random_range(0..originals.len())];
            let p = dir.path().join(name);
            // (The same file may be picked twice: it may be a directory by now.)
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::remove_dir_all(&p);
            match rng.random_range(0..7) {
                0 => {
                    let target = outside.path().join(name);
                    std::fs::write(&target, bytes).unwrap();
                    std::os::unix::fs::symlink(&target, &p).unwrap();
                }
                1 => std::os::unix::fs::symlink("/dev/zero", &p).unwrap(),
                2 => {
                    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
                    // SAFETY: a valid NUL-terminated path.
                    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
                }
                3 => std::fs::create_dir(&p).unwrap(),
                4 => std::fs::write(&p, b"").unwrap(),
                5 => {
                    let f = std::fs::File::create(&p).unwrap();
                    f.set_len(5 << 30).unwrap();
                }
                _ => {}
            }
        }
        c.case("damaged bundle directory", || open_and_caption(dir.path()));
    }
    assert!(c.finish() >= 150);
}

/// Prompts as a hostile caller passes them, through the shipped bundle's tokenizer and prompt
/// checks (`Generator::encode_prompts`): random bytes, control characters, every word of the
/// vocabulary, and 10 MB (which used to cost the tokenizer 1.08 GB before it was refused).
#[test]
fn fuzz_prompts() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shipped/duet-small");
    let bundle = Bundle::open(&shipped).unwrap();
    let generator = duet_runtime::Generator::new(
        &bundle,
        ProviderChoice::Only(Provider::Tract),
        &EngineOptions::default(),
    )
    .unwrap();
    let words = [
        "a", "large", "small", "red", "green", "blue", "circle", "square", "triangle", "at", "the",
        "top", "left", "right", "bottom", "grinning", "face", "apple", "and",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(seed() ^ 6);
    let mut c = Campaign::new("prompts");
    let huge = "red ".repeat(10 << 18);
    c.case("10 MB prompt", || {
        generator
            .encode_prompts(&[huge.as_str()])
            .map(drop)
            .map_err(|e| kind(&e))
    });
    for _ in 0..cases(300) {
        let prompt: String = match rng.random_range(0..4) {
            0 => (0..rng.random_range(1..12))
                .map(|_| words[rng.random_range(0..words.len())])
                .collect::<Vec<_>>()
                .join(" "),
            1 => (0..rng.random_range(0..200))
                .map(|_| char::from_u32(rng.random_range(0..0x11000)).unwrap_or('\u{fffd}'))
                .collect(),
            2 => (0..rng.random_range(0..64))
                .map(|_| char::from(rng.random_range(0..128u8)))
                .collect(),
            _ => words[rng.random_range(0..words.len())].repeat(rng.random_range(1..5000)),
        };
        c.case("random prompt", || {
            generator
                .encode_prompts(&[prompt.as_str()])
                .map(drop)
                .map_err(|e| kind(&e))
        });
    }
    assert!(c.finish() >= 300);
}
