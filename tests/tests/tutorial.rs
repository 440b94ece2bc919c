//! `docs/TUTORIAL.md`, run as written: every `bash` block of it, in order, in one shell from
//! the repository root, with the binaries this test build made on `PATH` (the tutorial's `sh`
//! set-up block builds release ones; `cargo test --workspace` has built these). Then what the
//! tutorial promises is checked on what it left behind: the broken folder refused without a
//! run, a single-file bundle that captions its training pictures, the fine-tuned shipped
//! model better on them than the shipped one, and manifests that say how images are fitted and
//! where the tokenizer came from.

mod common;
use common::{engine_options, repo_root};

use std::path::{Path, PathBuf};
use std::process::Command;

use duet_datasets::captioned::{check_folder, ReadOptions, Split};
use duet_runtime::engine::{Provider, ProviderChoice};
use duet_runtime::manifest::ImageFit;
use duet_runtime::preprocess;
use duet_runtime::{Bundle, Captioner};

/// The tutorial's `bash` blocks, joined in order.
fn tutorial_script() -> String {
    let text = std::fs::read_to_string(repo_root().join("docs/TUTORIAL.md")).unwrap();
    let mut script = String::new();
    let mut in_bash = false;
    for line in text.lines() {
        match (in_bash, line.trim_end()) {
            (false, "```bash") => in_bash = true,
            (true, "```") => in_bash = false,
            (true, l) => {
                script.push_str(l);
                script.push('\n');
            }
            _ => {}
        }
    }
    assert!(!in_bash, "an unclosed bash block in docs/TUTORIAL.md");
    script
}

/// Where cargo put this test's sibling binaries (`duet`, `duet-train`, `duet-export`,
/// `duet-edge`).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    for bin in ["duet", "duet-train", "duet-export", "duet-edge"] {
        assert!(
            dir.join(bin).is_file(),
            "{} is missing: run the tests with `cargo test --workspace`, which builds it",
            dir.join(bin).display()
        );
    }
    dir
}

/// Captions of the train split of `pairs` by the bundle at `bundle` on tract: how many equal
/// one of their image's captions, of how many images.
fn train_exact_matches(bundle: &Path, pairs: &Path) -> (usize, usize) {
    let b = Bundle::open(bundle).unwrap();
    let cap = Captioner::new(&b, ProviderChoice::Only(Provider::Tract), &engine_options()).unwrap();
    let spec = cap.image_spec().clone();
    let (report, samples) = check_folder(
        pairs,
        &ReadOptions {
            split: Some(Split::Train),
            side: spec.size as u32,
            fit: spec.fit,
            max_len: 48,
            tokenizer: None,
        },
    );
    assert!(report.is_ok());
    let mut images: Vec<PathBuf> = samples.iter().map(|s| s.image_path.clone()).collect();
    images.dedup();
    let loaded: Vec<_> = images
        .iter()
        .map(|p| preprocess::load_image_for(p, &spec).unwrap())
        .collect();
    let captions = cap.caption_images(&loaded).unwrap();
    let hits = images
        .iter()
        .zip(&captions)
        .filter(|(path, got)| {
            samples
                .iter()
                .any(|s| &&s.image_path == path && s.caption.eq_ignore_ascii_case(got))
        })
        .count();
    (hits, images.len())
}

#[test]
fn the_tutorial_runs_as_written_and_does_what_it_says() {
    let work = tempfile::tempdir().unwrap();
    let t = work.path().join("tutorial");
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ort = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".ort/lib/libonnxruntime.so"));
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &tutorial_script()])
        .current_dir(repo_root())
        .env("PATH", path)
        .env("ORT_DYLIB_PATH", ort)
        .env("DUET_TUTORIAL_DIR", &t)
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    assert!(out.status.success(), "the tutorial failed: {stderr}");

    // Step 2: the good folder passes; the broken one is refused by the check and by training,
    // with both problems named, and training left no run behind.
    assert!(stdout.contains("ok: 0 warning(s), no errors"), "{stdout}");
    assert!(
        stdout.contains("line 18: image images/gone.png does not exist"),
        "{stdout}"
    );
    assert!(
        stdout.contains("line 19: empty caption for images/2615.png"),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("refused (exit status 1)").count(),
        2,
        "{stdout}"
    );
    assert!(stderr.contains("run `duet-train data check"), "{stderr}");
    assert!(!t.join("runs/broken").exists());
    // Step 5's check names the word the shipped vocabulary lacks.
    assert!(
        stdout.contains("words the tokenizer does not know (they train as [UNK]) 1: snowman (1)"),
        "{stdout}"
    );

    // ...against the imported run's model, whose size, fit and caption length it took.
    assert!(
        stdout.contains("image size, fit and max_len of the model in"),
        "{stdout}"
    );
    // Step 6's label check: five labels, and held-out pairs.
    assert!(
        stdout.contains("labels ok: 5 classes (animal, food, plant, sky, thing), "),
        "{stdout}"
    );

    // Steps 3–4: the single-file bundle records its fit and tokenizer, and captions (nearly)
    // every training picture as written; duet and duet-edge printed captions of its pictures.
    let mine = Bundle::open(t.join("mine.duet")).unwrap();
    assert_eq!(mine.manifest().image.fit, ImageFit::Pad);
    assert_eq!(mine.manifest().model.image_fit, ImageFit::Pad);
    assert_eq!(
        mine.manifest().tokenizer.origin.as_deref(),
        Some("trained on the run's captions")
    );
    let pairs = t.join("pairs");
    let (hits, n) = train_exact_matches(&t.join("mine.duet"), &pairs);
    println!("from scratch: {hits}/{n} training pictures captioned exactly");
    assert!(hits * 10 >= n * 9, "{hits}/{n}");
    for image in ["1f34e.png\ta red apple", "1f680.png\ta rocket"] {
        assert!(stdout.contains(image), "{stdout}");
    }
    assert!(
        stdout.contains("1f436.png\t"),
        "duet-edge printed no caption: {stdout}"
    );

    // Step 5: the fine-tuned shipped model keeps the shipped vocabulary and fit, and captions
    // the folder's pictures far better than the shipped model does.
    let tuned = Bundle::open(t.join("tuned.duet")).unwrap();
    let shipped = Bundle::open(repo_root().join("shipped/duet-small")).unwrap();
    // All but the dream queries: an import takes the captioner and generator, and a caption
    // fine-tune trains no queries.
    assert_eq!(
        tuned.manifest().model,
        duet_models::ModelSpec {
            dream_queries: 0,
            ..shipped.manifest().model.clone()
        }
    );
    let origin = tuned.manifest().tokenizer.origin.clone().unwrap();
    assert!(origin.starts_with("reused from "), "{origin}");
    assert!(
        origin.contains("runs/duet-small/tokenizer.json"),
        "{origin}"
    );
    let before = train_exact_matches(&repo_root().join("shipped/duet-small"), &pairs);
    let after = train_exact_matches(&t.join("tuned.duet"), &pairs);
    println!(
        "shipped model: {}/{} training pictures captioned exactly; fine-tuned: {}/{}",
        before.0, before.1, after.0, after.1
    );
    // "a snowman" cannot come out of the shipped vocabulary: at most n − 1 are reachable.
    assert!(after.0 >= before.0 + 5, "{before:?} → {after:?}");
    assert!(after.0 * 10 >= (after.1 - 1) * 7, "{after:?}");
}
