use std::fs;

use image::{ImageFormat, Rgb, RgbImage};

use super::*;
use crate::captioned::{captions_jsonl, CaptionedRecord, CAPTIONS_FILE};

const TARGET: ImageTarget<'static> = ImageTarget {
    side: 8,
    fit: duet_spec::ImageFit::Pad,
    max_len: 12,
    tokenizer: None,
};

/// A caption's label and split.
type Pair = (Option<Label>, Split);

/// A folder of one image with one caption per `(label, split)`.
fn folder(dir: &Path, pairs: &[Pair]) {
    fs::create_dir_all(dir.join("images")).unwrap();
    RgbImage::from_pixel(8, 8, Rgb([10, 20, 30]))
        .save_with_format(dir.join("images/a.png"), ImageFormat::Png)
        .unwrap();
    let records: Vec<CaptionedRecord> = pairs
        .iter()
        .enumerate()
        .map(|(k, (label, split))| CaptionedRecord {
            image: "images/a.png".into(),
            caption: format!("caption {k}"),
            label: label.clone(),
            split: Some(*split),
        })
        .collect();
    fs::write(dir.join(CAPTIONS_FILE), captions_jsonl(&records)).unwrap();
}

fn name(n: &str) -> Option<Label> {
    Some(Label::Name(n.into()))
}

#[test]
fn classes_are_the_sorted_distinct_labels_and_held_out_pairs_are_the_test_set() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    folder(
        dir,
        &[
            (name("cat"), Split::Train),
            (Some(Label::Index(10)), Split::Train),
            (Some(Label::Index(2)), Split::Train),
            (name("cat"), Split::Val),
            (name("2"), Split::Test),
            (name("ant"), Split::Train),
        ],
    );
    let (folder, examples) = LabelledFolder::open(dir, &TARGET).unwrap();
    // Numbers by value, then names; the name "2" is the class of the number 2.
    assert_eq!(folder.classes, ["2", "10", "ant", "cat"]);
    let labels = |v: &[PairExample]| v.iter().map(|e| e.label).collect::<Vec<_>>();
    assert_eq!(labels(&examples.train), [3, 1, 0, 2]);
    assert_eq!(labels(&examples.test), [3, 0]);
    assert_eq!(examples.test[1].text, "caption 4");
    // The same folder read again maps to the recorded classes.
    let again = folder.examples(&TARGET).unwrap();
    assert_eq!(labels(&again.train), labels(&examples.train));
}

#[test]
fn a_folder_the_head_cannot_learn_is_refused_with_the_reason() {
    let root = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<Pair>, &str)> = vec![
        (
            vec![(name("a"), Split::Train), (name("a"), Split::Test)],
            "1 distinct label(s)",
        ),
        (
            vec![(name("a"), Split::Train), (None, Split::Test)],
            "line 2",
        ),
        (
            vec![(name("a"), Split::Train), (name("b"), Split::Train)],
            "held",
        ),
        (
            (0..=MAX_CLASSES as u64 + 5)
                .map(|k| (Some(Label::Index(k)), Split::Train))
                .chain([(name("x"), Split::Test)])
                .collect(),
            "more than 1024 distinct label(s)",
        ),
    ];
    for (k, (pairs, expected)) in cases.iter().enumerate() {
        let dir = root.path().join(k.to_string());
        folder(&dir, pairs);
        let err = LabelledFolder::open(&dir, &TARGET).unwrap_err().to_string();
        assert!(err.contains(expected), "case {k}: {err}");
    }
}
