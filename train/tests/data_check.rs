//! `duet-train data check`: refuses what training would refuse (an empty file included),
//! checks labels for the fusion and restore stages with `--labels`, and takes the image size,
//! fit and caption length of the model whose tokenizer it is given.

use std::path::Path;
use std::process::{Command, Output};

use duet_datasets::captioned::{captions_jsonl, CaptionedRecord, Label, CAPTIONS_FILE};
use duet_datasets::tokenizer::{save_tokenizer, train_tokenizer};
use duet_models::{ImageFit, ModelSpec, Preset};
use image::{Rgb, RgbImage};

fn check(dir: &Path, extra: &[&str]) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_duet-train"))
        .args(["data", "check"])
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    (out, text)
}

/// Two 40×20 images, two captions each, labelled by colour when `labels`; val by the seed.
fn folder(dir: &Path, labels: bool) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let mut records = Vec::new();
    for k in 0..10u8 {
        let (name, colour) = if k % 2 == 0 {
            ("red", [200, 10, 10])
        } else {
            ("blue", [10, 10, 200])
        };
        let rel = format!("images/{k}.png");
        RgbImage::from_pixel(40, 20, Rgb([colour[0], colour[1], colour[2] + k]))
            .save(dir.join(&rel))
            .unwrap();
        for caption in [
            format!("a {name} picture"),
            format!("picture {k} is {name}"),
        ] {
            records.push(CaptionedRecord {
                image: rel.clone(),
                caption,
                label: labels.then(|| Label::Name(name.into())),
                split: None,
            });
        }
    }
    std::fs::write(dir.join(CAPTIONS_FILE), captions_jsonl(&records)).unwrap();
}

#[test]
fn an_empty_folder_file_is_refused_as_training_would() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(CAPTIONS_FILE), "").unwrap();
    let (out, text) = check(dir.path(), &[]);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("no pair in the train split"), "{text}");
}

#[test]
fn labels_are_checked_for_the_fusion_stage_only_when_asked() {
    let root = tempfile::tempdir().unwrap();
    let plain = root.path().join("plain");
    folder(&plain, false);
    let (out, text) = check(&plain, &[]);
    assert!(out.status.success(), "{text}");
    let (out, text) = check(&plain, &["--labels"]);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("line 1 has no \"label\" (20 pair(s)"),
        "{text}"
    );

    let labelled = root.path().join("labelled");
    folder(&labelled, true);
    let (out, text) = check(&labelled, &["--labels"]);
    assert!(out.status.success(), "{text}");
    // The seeded split holds 1 of the 10 images (2 pairs) out.
    assert!(
        text.contains("labels ok: 2 classes (blue, red), 18 training and 2 held-out pairs"),
        "{text}"
    );
}

#[test]
fn a_run_given_as_tokenizer_sets_the_image_size_fit_and_caption_length() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    folder(&data, false);
    let run = root.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let tokenizer = train_tokenizer(&["a red picture".to_string()]).unwrap();
    save_tokenizer(&tokenizer, &run.join("tokenizer.json")).unwrap();
    let model = ModelSpec {
        image_fit: ImageFit::Crop,
        max_len: 5,
        ..ModelSpec::preset(Preset::Tiny, tokenizer.get_vocab_size(true), 16)
    };
    let config = serde_json::json!({ "stage": "caption", "model": model });
    std::fs::write(run.join("config.json"), config.to_string()).unwrap();

    let (out, text) = check(&data, &["--tokenizer", run.to_str().unwrap()]);
    // "picture 3 is blue" is 4 words + [BOS]/[EOS]: over the run's max_len of 5.
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("fitted to 16x16 by crop"), "{text}");
    assert!(text.contains("caption is 6 tokens"), "{text}");
    assert!(text.contains("words the tokenizer does not know"), "{text}");
    assert!(text.contains("blue (10)"), "{text}");
    // Flags given win over the run's.
    let (out, text) = check(
        &data,
        &[
            "--tokenizer",
            run.to_str().unwrap(),
            "--max-len",
            "8",
            "--image-size",
            "24",
        ],
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("fitted to 24x24 by crop"), "{text}");

    let (out, text) = check(&data, &["--image-size", "4096"]);
    assert!(!out.status.success());
    assert!(text.contains("must be from 1 to 1024 pixels"), "{text}");
}
