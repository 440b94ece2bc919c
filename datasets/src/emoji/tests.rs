use std::collections::HashMap;
use std::fs;
use std::path::Path;

use super::*;
use image::{Rgba, RgbaImage};

/// A miniature source folder in the real packages' layout: three base emoji (one with two
/// skin tones, one named only by the emoji package, one with an FE0F-qualified sequence that
/// CLDR lists without FE0F), art for every one of them.
fn mini_source(dir: &Path) -> EmojiSource {
    let pkg = dir.join("emoji-datasource-google/package");
    let art = pkg.join("img/google/64");
    fs::create_dir_all(&art).unwrap();
    fs::write(pkg.join("LICENSE"), "MIT (test)").unwrap();
    let emoji = serde_json::json!([
        {"unified": "1F44B", "image": "1f44b.png", "name": "WAVING HAND SIGN",
         "category": "People & Body", "subcategory": "hand-fingers-open",
         "has_img_google": true, "has_img_twitter": true,
         "skin_variations": {
            "1F3FB": {"unified": "1F44B-1F3FB", "image": "1f44b-1f3fb.png",
                      "has_img_google": true},
            "1F3FF": {"unified": "1F44B-1F3FF", "image": "1f44b-1f3ff.png",
                      "has_img_google": true}}},
        {"unified": "1F600", "image": "1f600.png", "name": "Grinning Face",
         "category": "Smileys & Emotion", "subcategory": "face-smiling",
         "has_img_google": true},
        {"unified": "2764-FE0F", "image": "2764-fe0f.png", "name": "HEAVY BLACK HEART",
         "category": "Smileys & Emotion", "subcategory": "heart",
         "has_img_google": true},
        {"unified": "1F4A9", "image": "1f4a9.png", "name": "PILE OF POO",
         "category": "Smileys & Emotion", "subcategory": "face-costume",
         "has_img_google": false}
    ]);
    fs::write(pkg.join("emoji.json"), emoji.to_string()).unwrap();
    for (name, colour) in [
        ("1f44b.png", [250, 200, 0, 255]),
        ("1f44b-1f3fb.png", [250, 220, 190, 255]),
        ("1f44b-1f3ff.png", [90, 60, 40, 255]),
        ("1f600.png", [255, 210, 60, 255]),
        ("2764-fe0f.png", [220, 0, 0, 255]),
    ] {
        // A disc of the colour on a transparent background whose hidden colour is black.
        let img = RgbaImage::from_fn(64, 64, |x, y| {
            let (dx, dy) = (x as f32 - 31.5, y as f32 - 31.5);
            if dx * dx + dy * dy < 20.0 * 20.0 {
                Rgba(colour)
            } else {
                Rgba([0, 0, 0, 0])
            }
        });
        img.save(art.join(name)).unwrap();
    }
    let full = dir.join("cldr-annotations-full/package/annotations/en");
    fs::create_dir_all(&full).unwrap();
    let full_json = serde_json::json!({"annotations": {"identity": {}, "annotations": {
        "👋": {"default": ["hand", "wave"], "tts": ["waving hand"]},
        "❤": {"default": ["heart"], "tts": ["red heart"]}
    }}});
    fs::write(full.join("annotations.json"), full_json.to_string()).unwrap();
    fs::write(
        dir.join("cldr-annotations-full/package/LICENSE"),
        "UNICODE (test)",
    )
    .unwrap();
    let derived = dir.join("cldr-annotations-derived-full/package/annotationsDerived/en");
    fs::create_dir_all(&derived).unwrap();
    let derived_json = serde_json::json!({"annotationsDerived": {"identity": {},
        "annotations": {
            "👋🏻": {"default": ["hand", "light skin tone"],
                    "tts": ["waving hand: light skin tone"]},
            "👋🏿": {"default": ["hand"], "tts": ["waving hand: dark skin tone"]}
    }}});
    fs::write(derived.join("annotations.json"), derived_json.to_string()).unwrap();
    EmojiSource::new(dir)
}

#[test]
fn index_names_every_pair_from_the_right_source() {
    let tmp = tempfile::tempdir().unwrap();
    let index = mini_source(tmp.path()).index(ArtStyle::Google).unwrap();
    let got: Vec<(&str, &str, &str, NameSource)> = index
        .entries
        .iter()
        .map(|e| {
            let r = &e.record;
            (
                r.unified.as_str(),
                r.base.as_str(),
                r.caption.as_str(),
                r.name_source,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("1F44B", "1F44B", "waving hand", NameSource::Cldr),
            (
                "1F44B-1F3FB",
                "1F44B",
                "waving hand: light skin tone",
                NameSource::CldrDerived
            ),
            (
                "1F44B-1F3FF",
                "1F44B",
                "waving hand: dark skin tone",
                NameSource::CldrDerived
            ),
            (
                "1F600",
                "1F600",
                "grinning face",
                NameSource::EmojiDatasource
            ),
            ("2764-FE0F", "2764-FE0F", "red heart", NameSource::Cldr),
        ]
    );
    assert_eq!(
        index.skipped_without_art, 1,
        "the poo has no Google art here"
    );
    assert_eq!(index.entries[0].record.keywords, ["hand", "wave"]);
    assert_eq!(index.entries[0].record.label, "People & Body");
    assert_eq!(index.entries[1].record.image, "images/1f44b-1f3fb.png");
}

#[test]
fn missing_sources_and_bad_options_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = EmojiSource::new(tmp.path())
        .index(ArtStyle::Twitter)
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("emoji-datasource-twitter") && text.contains("fetch-emoji.sh"));
    let src = mini_source(tmp.path());
    // The twitter art is not in this source folder.
    assert!(matches!(
        src.index(ArtStyle::Twitter),
        Err(EmojiError::MissingSource { .. })
    ));
    for bad in [
        EmojiOptions {
            size: 48,
            ..Default::default()
        },
        EmojiOptions {
            val_fraction: 0.6,
            test_fraction: 0.4,
            ..Default::default()
        },
        EmojiOptions {
            test_fraction: f64::NAN,
            ..Default::default()
        },
        EmojiOptions {
            limit: Some(0),
            ..Default::default()
        },
    ] {
        assert!(
            matches!(bad.validate(), Err(EmojiError::Options(_))),
            "{bad:?}"
        );
    }
    assert!("apple"
        .parse::<ArtStyle>()
        .unwrap_err()
        .contains("not licensed"));
    // A variant CLDR cannot name is an error, not a caption without its tone.
    let derived = tmp
        .path()
        .join("cldr-annotations-derived-full/package/annotationsDerived/en/annotations.json");
    fs::write(&derived, r#"{"annotationsDerived": {"annotations": {}}}"#).unwrap();
    let err = src.index(ArtStyle::Google).unwrap_err().to_string();
    assert!(
        err.contains("no English name for emoji 1F44B-1F3FB"),
        "{err}"
    );
}

#[test]
fn art_is_composited_over_white_and_resized() {
    let tmp = tempfile::tempdir().unwrap();
    mini_source(tmp.path());
    let path = tmp
        .path()
        .join("emoji-datasource-google/package/img/google/64/2764-fe0f.png");
    let big = render_art(&path, 64).unwrap();
    assert_eq!(
        big.get_pixel(0, 0).0,
        [255, 255, 255],
        "transparent becomes white"
    );
    assert_eq!(big.get_pixel(32, 32).0, [220, 0, 0]);
    let small = render_art(&path, 32).unwrap();
    assert_eq!(small.dimensions(), (32, 32));
    assert_eq!(small.get_pixel(0, 0).0, [255, 255, 255]);
    assert_eq!(small.get_pixel(16, 16).0, [220, 0, 0]);
    // Edges mix red with white, never with the hidden black.
    assert!(small.pixels().all(|p| p.0[0] >= 220));
    let garbage = tmp.path().join("garbage.png");
    fs::write(&garbage, b"nope").unwrap();
    assert!(render_art(&garbage, 32)
        .unwrap_err()
        .to_string()
        .contains("cannot decode"));
}

#[test]
fn dataset_splits_by_base_emoji_and_loads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let src = mini_source(tmp.path());
    let out = tmp.path().join("out");
    for seed in 0..6 {
        let opts = EmojiOptions {
            seed,
            val_fraction: 0.25,
            test_fraction: 0.25,
            ..Default::default()
        };
        let summary = write_emoji_dataset(&src, &out, &opts, "test").unwrap();
        assert_eq!(summary.counts.values().sum::<usize>(), 5);
        assert_eq!(
            summary.base_counts.values().sum::<usize>(),
            3,
            "{summary:?}"
        );
        let mut seen = HashMap::new();
        for split in SPLITS {
            for s in load_emoji_split(&out.join(split)).unwrap() {
                assert_eq!(s.image.dimensions(), (32, 32));
                let prev = seen.insert(s.record.base.clone(), split);
                assert!(
                    prev.is_none_or(|p| p == split),
                    "{} in two splits",
                    s.record.base
                );
            }
        }
        assert_eq!(seen.len(), 3);
        assert_eq!(load_emoji_info(&out).unwrap(), summary);
    }
    // A slice keeps whole base emoji.
    let opts = EmojiOptions {
        limit: Some(1),
        ..Default::default()
    };
    let summary = write_emoji_dataset(&src, &out, &opts, "test").unwrap();
    assert_eq!(summary.counts.values().sum::<usize>(), 3);
    let attribution = fs::read_to_string(out.join("ATTRIBUTION.txt")).unwrap();
    for part in ["Apache-2.0", "MIT (test)", "UNICODE (test)"] {
        assert!(attribution.contains(part), "{attribution}");
    }
    // Something that is not a dataset is never replaced.
    let precious = tmp.path().join("precious");
    fs::create_dir_all(&precious).unwrap();
    fs::write(precious.join("notes.txt"), "keep").unwrap();
    let err = write_emoji_dataset(&src, &precious, &opts, "test").unwrap_err();
    assert!(matches!(err, EmojiError::NotADataset { .. }));
    assert_eq!(
        fs::read_to_string(precious.join("notes.txt")).unwrap(),
        "keep"
    );
}

#[test]
fn loading_rejects_broken_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let src = mini_source(tmp.path());
    let out = tmp.path().join("out");
    write_emoji_dataset(&src, &out, &EmojiOptions::default(), "test").unwrap();
    let train = out.join("train");
    let jsonl = train.join("captions.jsonl");
    let text = fs::read_to_string(&jsonl).unwrap();
    let first = text.lines().next().unwrap();
    let mut record: EmojiRecord = serde_json::from_str(first).unwrap();
    let write_first = |r: &EmojiRecord| {
        fs::write(&jsonl, format!("{}\n", serde_json::to_string(r).unwrap())).unwrap();
    };
    record.caption = " ".into();
    write_first(&record);
    let err = load_emoji_split(&train).unwrap_err().to_string();
    assert!(
        err.contains("captions.jsonl:1") && err.contains("empty caption"),
        "{err}"
    );
    record.caption = "waving hand".into();
    record.image = "../../etc/passwd".into();
    write_first(&record);
    let err = load_emoji_split(&train).unwrap_err().to_string();
    assert!(err.contains("stay inside"), "{err}");
    record.image = "images/missing.png".into();
    write_first(&record);
    assert!(load_emoji_split(&train).is_err());
    fs::write(out.join("dataset.json"), r#"{"generator": "shapeworld"}"#).unwrap();
    assert!(load_emoji_info(&out).is_err());
}
