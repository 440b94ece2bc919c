use std::fs;

use image::{ImageFormat, Rgb};

use super::*;

fn opts(split: Option<Split>) -> ReadOptions<'static> {
    ReadOptions {
        split,
        side: 16,
        fit: ImageFit::Pad,
        max_len: 12,
        tokenizer: None,
    }
}

fn record(image: &str, caption: &str) -> CaptionedRecord {
    CaptionedRecord {
        image: image.into(),
        caption: caption.into(),
        label: None,
        split: None,
    }
}

fn save(dir: &Path, rel: &str, w: u32, h: u32, colour: [u8; 3], format: ImageFormat) {
    let path = dir.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_pixel(w, h, Rgb(colour))
        .save_with_format(path, format)
        .unwrap();
}

fn kinds(report: &FolderReport) -> Vec<(usize, &'static str)> {
    report
        .problems
        .iter()
        .map(|p| {
            let name = match p.kind {
                ProblemKind::Unreadable { .. } => "unreadable file",
                ProblemKind::BadLine { .. } => "bad line",
                ProblemKind::OutsidePath { .. } => "outside",
                ProblemKind::MissingImage { .. } => "missing",
                ProblemKind::UnreadableImage { .. } => "unreadable image",
                ProblemKind::UndecodableImage { .. } => "undecodable",
                ProblemKind::EmptyCaption { .. } => "empty caption",
                ProblemKind::LongCaption { .. } => "long caption",
                ProblemKind::PartialSplit { .. } => "partial split",
                ProblemKind::NoTrainPairs => "no train",
                ProblemKind::DuplicateImage { .. } => "duplicate image",
                ProblemKind::DuplicatePair { .. } => "duplicate pair",
            };
            (p.line, name)
        })
        .collect()
}

#[test]
fn a_good_folder_of_any_sizes_and_formats_loads_fitted_and_split() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let mut records = Vec::new();
    for k in 0..20u8 {
        let (rel, format) = if k % 2 == 0 {
            (format!("images/{k}.png"), ImageFormat::Png)
        } else {
            (format!("images/sub/{k}.jpg"), ImageFormat::Jpeg)
        };
        save(dir, &rel, 40 + u32::from(k), 20, [10 * k, 200, 30], format);
        records.push(record(&rel, &format!("a green picture number {k}")));
        // A second caption of the same image.
        records.push(CaptionedRecord {
            label: Some(Label::Name("green".into())),
            ..record(&rel, "Green, wide.")
        });
    }
    fs::write(dir.join(CAPTIONS_FILE), captions_jsonl(&records)).unwrap();
    assert!(is_captioned_folder(dir));

    let (report, all) = check_folder(dir, &opts(None));
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!((report.pairs, report.images, report.labels), (40, 20, 1));
    assert_eq!(report.min_size, Some((40, 20)));
    assert_eq!(report.max_size, Some((59, 20)));
    assert_eq!(report.non_square, 20);
    let (lo, hi) = report.aspect_range.unwrap();
    assert!(
        (lo - 2.0).abs() < 1e-9 && (hi - 2.95).abs() < 1e-9,
        "{lo} {hi}"
    );
    // "green," is written joined to a comma: the tokenizer will split it.
    assert_eq!(report.split_words.get("green,"), Some(&20));
    assert_eq!(report.words.get("green"), Some(&40));
    // "a green picture number 7": 5 words + [BOS] + [EOS].
    assert_eq!(report.longest_caption, 7);
    assert!(!report.split_given);
    // The seeded split keeps both captions of an image on one side: 2 of 20 images in val.
    assert_eq!(report.per_split[&Split::Train], 36);
    assert_eq!(report.per_split[&Split::Val], 4);
    assert_eq!(all.len(), 40);
    for s in &all {
        assert_eq!(s.image.dimensions(), (16, 16));
        // Padded: grey bands above and below a wide image.
        assert_eq!(s.image.get_pixel(8, 0).0, [PAD_GREY_TEST; 3]);
    }
    let train = load_captioned(dir, &opts(Some(Split::Train))).unwrap();
    let val = load_captioned(dir, &opts(Some(Split::Val))).unwrap();
    assert_eq!((train.len(), val.len()), (36, 4));
    for v in &val {
        assert!(train.iter().all(|t| t.image_path != v.image_path));
    }
    // Same seed, same split: a second read agrees.
    let again = load_captioned(dir, &opts(Some(Split::Val))).unwrap();
    let paths = |s: &[Sample]| s.iter().map(|x| x.image_path.clone()).collect::<Vec<_>>();
    assert_eq!(paths(&val), paths(&again));

    // The user's own split is kept as written.
    let given: Vec<CaptionedRecord> = records
        .iter()
        .enumerate()
        .map(|(k, r)| CaptionedRecord {
            split: Some(if k < 30 { Split::Train } else { Split::Test }),
            ..r.clone()
        })
        .collect();
    fs::write(dir.join(CAPTIONS_FILE), captions_jsonl(&given)).unwrap();
    let (report, test) = check_folder(dir, &opts(Some(Split::Test)));
    assert!(report.is_ok() && report.split_given);
    assert_eq!(test.len(), 10);
}

const PAD_GREY_TEST: u8 = duet_spec::PAD_GREY;

#[test]
fn every_kind_of_problem_is_found_in_one_pass() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    save(&dir, "images/a.png", 8, 8, [1, 2, 3], ImageFormat::Png);
    save(&dir, "images/b.png", 8, 8, [9, 9, 9], ImageFormat::Png);
    fs::copy(dir.join("images/a.png"), dir.join("images/a-copy.png")).unwrap();
    fs::write(dir.join("images/text.png"), "not an image").unwrap();
    fs::create_dir_all(dir.join("images/folder.png")).unwrap();
    const SECRET: [u8; 3] = [250, 0, 250];
    save(root.path(), "secret.png", 8, 8, SECRET, ImageFormat::Png);
    save(
        root.path(),
        "elsewhere/secret.png",
        8,
        8,
        SECRET,
        ImageFormat::Png,
    );
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(root.path().join("secret.png"), dir.join("images/link.png"))
            .unwrap();
        // A linked directory: the file inside it is a regular file, the way to it is not.
        std::os::unix::fs::symlink(root.path().join("elsewhere"), dir.join("images/linked"))
            .unwrap();
    }
    let long = ["word"; 11].join(" ");
    let lines = [
        r#"{"image": "images/a.png", "caption": "a small thing"}"#.to_string(), // 1 ok
        r#"{"image": "images/a.png", "caption": "A small thing"}"#.into(),      // 2 dup pair
        r#"{"image": "images/a-copy.png", "caption": "copy"}"#.into(),          // 3 dup image
        r#"{"image": "images/none.png", "caption": "missing"}"#.into(),         // 4
        r#"{"image": "images/text.png", "caption": "text"}"#.into(),            // 5
        r#"{"image": "images/folder.png", "caption": "folder"}"#.into(),        // 6
        r#"{"image": "images/link.png", "caption": "link"}"#.into(),            // 7
        r#"{"image": "../secret.png", "caption": "escape"}"#.into(),            // 8
        r#"{"image": "/etc/passwd", "caption": "absolute"}"#.into(),            // 9
        r#"{"image": "images/b.png", "caption": "  "}"#.into(),                 // 10
        format!(r#"{{"image": "images/b.png", "caption": "{long}"}}"#),         // 11
        r#"{"image": "images/b.png", "captoin": "typo"}"#.into(),               // 12
        "{ not json".into(),                                                    // 13
        r#"{"image": "images/linked/secret.png", "caption": "linked dir"}"#.into(), // 14
    ];
    fs::write(dir.join(CAPTIONS_FILE), lines.join("\n")).unwrap();
    let (report, _) = check_folder(&dir, &opts(Some(Split::Train)));
    let mut expected = vec![
        (2, "duplicate pair"),
        (3, "duplicate image"),
        (4, "missing"),
        (5, "undecodable"),
        (6, "unreadable image"),
        (8, "outside"),
        (9, "outside"),
        (10, "empty caption"),
        (11, "long caption"),
        (12, "bad line"),
        (13, "bad line"),
    ];
    #[cfg(unix)]
    {
        expected.insert(5, (7, "unreadable image"));
        expected.push((14, "outside"));
    }
    assert_eq!(kinds(&report), expected, "{:#?}", report.problems);
    assert!(!report.is_ok());
    assert_eq!(report.warnings().count(), 2);
    // The refusal lists the errors with their lines and says how to see the full report.
    let err = load_captioned(&dir, &opts(Some(Split::Train))).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("data check"), "{text}");
    assert!(
        text.contains("line 4: image images/none.png does not exist"),
        "{text}"
    );
    assert!(
        text.contains("line 12: not a pair record: unknown field `captoin`"),
        "{text}"
    );
    assert!(text.contains("line 11: caption is 13 tokens"), "{text}");
    // Nothing outside the folder was read into a sample: the secret's pixels are nowhere.
    let (_, samples) = check_folder(&dir, &opts(None));
    let captions: Vec<&str> = samples.iter().map(|s| s.caption.as_str()).collect();
    assert_eq!(
        captions,
        ["a small thing", "A small thing", "copy", long.as_str()]
    );
    for s in &samples {
        assert!(s.image.pixels().all(|p| p.0 != SECRET), "{}", s.caption);
    }
}

#[test]
fn split_fields_must_be_all_or_nothing_and_train_must_hold_pairs() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    save(dir, "images/a.png", 8, 8, [1, 2, 3], ImageFormat::Png);
    let lines = [
        r#"{"image": "images/a.png", "caption": "one", "split": "val"}"#,
        r#"{"image": "images/a.png", "caption": "two"}"#,
    ];
    fs::write(dir.join(CAPTIONS_FILE), lines.join("\n")).unwrap();
    let (report, _) = check_folder(dir, &opts(None));
    assert_eq!(kinds(&report), vec![(0, "partial split")]);
    assert!(report.problems[0].to_string().contains("line 2 does not"));

    fs::write(dir.join(CAPTIONS_FILE), lines[0]).unwrap();
    let (report, _) = check_folder(dir, &opts(None));
    assert_eq!(kinds(&report), vec![(0, "no train")]);

    // An empty file is refused as training would refuse it.
    fs::write(dir.join(CAPTIONS_FILE), "\n").unwrap();
    let (report, _) = check_folder(dir, &opts(None));
    assert_eq!(kinds(&report), vec![(0, "no train")]);
    assert!(!report.is_ok());

    fs::remove_file(dir.join(CAPTIONS_FILE)).unwrap();
    let (report, _) = check_folder(dir, &opts(None));
    assert_eq!(kinds(&report), vec![(0, "unreadable file")]);
}

#[test]
fn words_a_given_tokenizer_lacks_are_reported() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    save(dir, "images/a.png", 8, 8, [1, 2, 3], ImageFormat::Png);
    let lines = [r#"{"image": "images/a.png", "caption": "a Red zebra"}"#];
    fs::write(dir.join(CAPTIONS_FILE), lines.join("\n")).unwrap();
    let tokenizer =
        crate::tokenizer::train_tokenizer(&["a red circle".to_string(), "a blue one".into()])
            .unwrap();
    let (report, samples) = check_folder(
        dir,
        &ReadOptions {
            tokenizer: Some(&tokenizer),
            ..opts(None)
        },
    );
    assert!(report.is_ok());
    assert_eq!(
        report.unknown_words,
        BTreeMap::from([("zebra".to_string(), 1)])
    );
    // Captions keep the user's case; the tokenizer lowercases.
    assert_eq!(samples[0].caption, "a Red zebra");
}
