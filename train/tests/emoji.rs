//! The Emoji-CLDR builder on the real sources (`scripts/fetch-emoji.sh`, run by
//! `scripts/setup.sh`): the whole index of both art styles, and a slice written to disk through
//! the `duet-train emoji` command.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;

mod common;
use common::{caption_args, generate_args};

use duet_datasets::emoji::{
    load_emoji_info, load_emoji_split, split_entries, ArtStyle, EmojiOptions, EmojiSource,
    NameSource, SPLITS,
};

fn source() -> EmojiSource {
    let dir = std::env::var_os("DUET_EMOJI_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.data/emoji-src"));
    assert!(
        dir.join("cldr-annotations-full/VERSION").exists(),
        "{}: Emoji-CLDR sources missing; run scripts/setup.sh (or scripts/fetch-emoji.sh)",
        dir.display()
    );
    EmojiSource::new(dir)
}

#[test]
fn both_styles_index_every_emoji_with_a_cldr_name() {
    let src = source();
    for style in [ArtStyle::Google, ArtStyle::Twitter] {
        let index = src.index(style).unwrap();
        // emoji-datasource 16.0.0: 1,911 base emoji and 1,875 skin-tone variants.
        assert_eq!(index.entries.len(), 3786, "{style}");
        assert_eq!(index.skipped_without_art, 0, "{style}");
        let bases: HashSet<&str> = index
            .entries
            .iter()
            .map(|e| e.record.base.as_str())
            .collect();
        assert_eq!(bases.len(), 1911, "{style}");
        let mut sources = BTreeMap::new();
        for e in &index.entries {
            let r = &e.record;
            assert!(!r.caption.trim().is_empty(), "{}", r.unified);
            assert!(e.art.is_file(), "{}", e.art.display());
            *sources.entry(r.name_source.as_str()).or_insert(0) += 1;
        }
        // Every caption is CLDR's English name: base emoji from the full set, sequences (skin
        // tones, most ZWJ sequences) from the derived set.
        assert_eq!(
            sources.get(NameSource::EmojiDatasource.as_str()),
            None,
            "{sources:?}"
        );
        assert_eq!(sources.values().sum::<usize>(), 3786);
        let by_code: HashMap<&str, &str> = index
            .entries
            .iter()
            .map(|e| (e.record.unified.as_str(), e.record.caption.as_str()))
            .collect();
        assert_eq!(by_code["1F44B"], "waving hand");
        assert_eq!(by_code["1F44B-1F3FD"], "waving hand: medium skin tone");
        assert_eq!(by_code["2764-FE0F"], "red heart");
        assert_eq!(by_code["1F1EA-1F1EC"], "flag: Egypt");
    }
}

#[test]
fn the_full_split_keeps_skin_tones_of_one_emoji_together() {
    let index = source().index(ArtStyle::Google).unwrap();
    let opts = EmojiOptions::default();
    let [train, val, test] = split_entries(index.entries, &opts);
    assert_eq!(train.len() + val.len() + test.len(), 3786);
    for (part, name) in [(&val, "val"), (&test, "test")] {
        let share = part.len() as f64 / 3786.0;
        assert!((0.09..0.12).contains(&share), "{name}: {share}");
    }
    let side = |part: &[duet_datasets::emoji::EmojiEntry]| -> HashSet<String> {
        part.iter().map(|e| e.record.base.clone()).collect()
    };
    let (a, b, c) = (side(&train), side(&val), side(&test));
    assert!(a.is_disjoint(&b) && a.is_disjoint(&c) && b.is_disjoint(&c));
    assert_eq!(a.len() + b.len() + c.len(), 1911);
}

#[test]
fn the_command_writes_a_slice_that_loads_back() {
    let src = source();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("emoji");
    let bin = env!("CARGO_BIN_EXE_duet-train");
    let source_dir = std::env::var_os("DUET_EMOJI_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.data/emoji-src"));
    let run = |extra: &[&str]| {
        Command::new(bin)
            .arg("emoji")
            .arg("--out")
            .arg(&out)
            .arg("--source")
            .arg(&source_dir)
            .args(extra)
            .output()
            .unwrap()
    };
    // The first 300 base emoji in Unicode's order: smileys, then people, with their skin tones.
    let o = run(&["--limit", "300", "--style", "twitter", "--seed", "7"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = load_emoji_info(&out).unwrap();
    assert_eq!(summary.options.style, ArtStyle::Twitter);
    assert!(summary.sources[0].starts_with("emoji-datasource-twitter@16.0.0"));
    assert!(summary.licence.contains("CC-BY-4.0"));
    let attribution = std::fs::read_to_string(out.join("ATTRIBUTION.txt")).unwrap();
    for part in [
        "Twemoji",
        "CC-BY-4.0",
        "Cal Henderson",
        "UNICODE LICENSE V3",
    ] {
        assert!(
            attribution.contains(part),
            "{part} missing from ATTRIBUTION.txt"
        );
    }

    // Counts: the slice holds every image of its 300 base emoji, and nothing else.
    let index = src.index(ArtStyle::Twitter).unwrap();
    let mut first_bases = Vec::new();
    for e in &index.entries {
        if !first_bases.contains(&e.record.base) {
            first_bases.push(e.record.base.clone());
        }
    }
    first_bases.truncate(300);
    let expected = index
        .entries
        .iter()
        .filter(|e| first_bases.contains(&e.record.base))
        .count();
    assert!(expected > 300, "the slice must include skin-tone variants");
    assert_eq!(summary.counts.values().sum::<usize>(), expected);
    assert_eq!(summary.base_counts.values().sum::<usize>(), 300);

    let mut split_of_base: HashMap<String, &str> = HashMap::new();
    let mut loaded = 0;
    let mut with_tones = 0;
    let mut with_white = 0;
    for split in SPLITS {
        let samples = load_emoji_split(&out.join(split)).unwrap();
        assert_eq!(samples.len(), summary.counts[split], "{split}");
        assert!(!samples.is_empty(), "{split} is empty");
        for s in &samples {
            assert!(!s.record.caption.trim().is_empty());
            assert_eq!(s.image.dimensions(), (32, 32));
            // Real art on white: neither blank nor a flat colour.
            let px: HashSet<[u8; 3]> = s.image.pixels().map(|p| p.0).collect();
            assert!(px.len() > 8, "{} looks blank", s.record.image);
            // The art covers part of the image; around it the transparent background became
            // white (a few emoji, such as the framed heart, fill the whole square).
            let white = s.image.pixels().filter(|p| p.0 == [255, 255, 255]).count();
            assert!(white < 32 * 32, "{} is blank", s.record.image);
            with_white += usize::from(white > 0);
            let prev = split_of_base.insert(s.record.base.clone(), split);
            assert!(
                prev.is_none_or(|p| p == split),
                "{} is in {} and {split}",
                s.record.base,
                prev.unwrap_or_default()
            );
            with_tones += usize::from(s.record.unified != s.record.base);
        }
        loaded += samples.len();
    }
    assert_eq!(loaded, expected);
    assert!(with_tones > 0);
    assert!(
        with_white * 100 > loaded * 95,
        "{with_white} of {loaded} show white background"
    );

    // Bad options are clear errors that leave the dataset alone.
    for (extra, message) in [
        (vec!["--style", "apple"], "not licensed"),
        (vec!["--size", "48"], "size must be 32 or 64"),
        (vec!["--limit", "0"], "limit must be at least 1"),
    ] {
        let o = run(&extra);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && stderr.contains(message),
            "{extra:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let o = Command::new(bin)
        .args(["emoji", "--limit", "5", "--source"])
        .arg(tmp.path().join("nowhere"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("fetch-emoji.sh"),
        "{stderr}"
    );
    assert_eq!(load_emoji_info(&out).unwrap(), summary);
}

#[test]
fn an_emoji_split_trains_beside_shapeworld() {
    use duet_datasets::emoji::write_emoji_dataset;
    use duet_datasets::folders::{
        default_image_side, folder_kind, load_folders, FolderKind, FoldersError, ImageTarget,
    };
    use duet_datasets::shapeworld::{write_dataset, SceneConfig};

    let tmp = tempfile::tempdir().unwrap();
    let emoji = tmp.path().join("emoji");
    let opts = EmojiOptions {
        limit: Some(40),
        ..EmojiOptions::default()
    };
    write_emoji_dataset(&source(), &emoji, &opts, "test").unwrap();
    let shapes = tmp.path().join("shapes");
    let cfg = SceneConfig {
        image_size: 32,
        min_objects: 1,
        max_objects: 2,
    };
    write_dataset(&shapes, 6, 1, &cfg, "test").unwrap();

    let train = emoji.join("train");
    assert_eq!(folder_kind(&train).unwrap(), FolderKind::EmojiSplit);
    assert_eq!(
        folder_kind(&train.join(".")).unwrap(),
        FolderKind::EmojiSplit
    );
    let err = folder_kind(&emoji).unwrap_err();
    assert!(matches!(err, FoldersError::EmojiRoot { .. }), "{err}");
    assert!(err.to_string().contains("train"), "{err}");

    let expected = load_emoji_split(&train).unwrap();
    let t32 = ImageTarget {
        side: 32,
        fit: duet_models::ImageFit::Stretch,
        max_len: 48,
        tokenizer: None,
    };
    let mixed = load_folders(&[shapes.clone(), train.clone()], &t32).unwrap();
    assert_eq!(mixed.len(), 6 + expected.len());
    // ShapeWorld first, with its scenes; then the emoji, captioned by name, without scenes.
    assert!(mixed[..6].iter().all(|s| !s.objects.is_empty()));
    for (s, e) in mixed[6..].iter().zip(&expected) {
        assert_eq!(s.caption, e.record.caption);
        assert!(s.objects.is_empty());
        assert_eq!(s.image.dimensions(), (32, 32));
    }

    // A 64 px emoji split does not mix with 32 px ShapeWorld.
    let big = tmp.path().join("emoji64");
    let opts = EmojiOptions {
        size: 64,
        limit: Some(5),
        ..EmojiOptions::default()
    };
    write_emoji_dataset(&source(), &big, &opts, "test").unwrap();
    assert_eq!(default_image_side(&[big.join("train")], 32).unwrap(), 64);
    let err = load_folders(&[shapes, big.join("train")], &t32).unwrap_err();
    assert!(
        matches!(
            err,
            FoldersError::SizeMismatch {
                found: 64,
                expected: 32,
                ..
            }
        ),
        "{err}"
    );
}

/// Trains a tiny captioner and generator on ShapeWorld + an emoji slice for a few steps, then
/// scores held-out emoji: the numbers are reproducible, consistent with the pairs returned, and
/// folders or runs of the wrong kind are clear errors.
#[test]
fn held_out_emoji_are_scored_by_name_and_by_retrieval() {
    use duet_datasets::emoji::write_emoji_dataset;
    use duet_datasets::shapeworld::{write_dataset, SceneConfig};
    use duet_diffusion::{Sampler, SamplerConfig};
    use duet_train::backend::CpuBackend;
    use duet_train::eval::emoji::{
        eval_emoji_captions, eval_emoji_retrieval, score_captions, RetrievalOptions,
    };
    use duet_train::stages::caption::{fit, FitArgs};
    use duet_train::stages::generate::fit_generate;
    type Infer = burn::backend::NdArray<f32>;

    let tmp = tempfile::tempdir().unwrap();
    let emoji = tmp.path().join("emoji");
    let opts = EmojiOptions {
        limit: Some(120),
        ..EmojiOptions::default()
    };
    write_emoji_dataset(&source(), &emoji, &opts, "test").unwrap();
    let shapes = tmp.path().join("shapes");
    write_dataset(&shapes, 32, 1, &SceneConfig::default(), "test").unwrap();
    let data = vec![shapes.clone(), emoji.join("train")];
    let caption_run = tmp.path().join("caption");
    let device = Default::default();
    fit::<CpuBackend>(
        &FitArgs {
            data: data.clone(),
            seed: 1,
            ..caption_args(&shapes, &caption_run, 8, false)
        },
        &device,
    )
    .unwrap();
    let generate_run = tmp.path().join("generate");
    fit_generate::<CpuBackend>(
        &generate_args(&caption_run, data, &generate_run, 4),
        &device,
    )
    .unwrap();

    let test = emoji.join("test");
    let held_out = load_emoji_split(&test).unwrap();
    let (report, pairs) = eval_emoji_captions::<Infer>(&caption_run, &test, None, &device).unwrap();
    assert_eq!(report.samples, held_out.len());
    assert_eq!(pairs.len(), held_out.len());
    for ((truth, _), s) in pairs.iter().zip(&held_out) {
        assert_eq!(truth, &s.record.caption);
    }
    let again = score_captions(&pairs);
    assert_eq!(report.exact_name, again.exact_name);
    assert_eq!(report.token_f1, again.token_f1);
    assert!((0.0..=1.0).contains(&report.token_f1));

    let opts = RetrievalOptions {
        sampler: SamplerConfig {
            sampler: Sampler::Ddim { eta: 0.0 },
            steps: 3,
            clip_x0: true,
        },
        guidance: 2.0,
        seed: 0,
        batch: 7,
    };
    let limit = Some(10);
    let (r, images) =
        eval_emoji_retrieval::<Infer>(&generate_run, &test, limit, &opts, &device).unwrap();
    assert_eq!(r.samples, 10);
    assert_eq!(images.len(), 10);
    assert_eq!(images[0].0, held_out[0].image);
    for pair in [r.image_to_text, r.text_to_image, r.generated_to_text] {
        assert!(
            0.0 <= pair[0] && pair[0] <= pair[1] && pair[1] <= 1.0,
            "{r}"
        );
    }
    // Batching (7 then 3) and a second call change nothing.
    let (r2, images2) = eval_emoji_retrieval::<Infer>(
        &generate_run,
        &test,
        limit,
        &RetrievalOptions {
            batch: 10,
            ..opts.clone()
        },
        &device,
    )
    .unwrap();
    assert_eq!(r.image_to_text, r2.image_to_text);
    assert_eq!(r.text_to_image, r2.text_to_image);
    assert_eq!(images[9].0, images2[9].0);

    // Wrong folders and runs are errors that say what is wrong.
    let err = eval_emoji_captions::<Infer>(&caption_run, &shapes, None, &device).unwrap_err();
    assert!(err.to_string().contains("not an Emoji-CLDR split"), "{err}");
    let err =
        eval_emoji_retrieval::<Infer>(&caption_run, &test, limit, &opts, &device).unwrap_err();
    assert!(
        err.to_string().contains("not a generate or unify run"),
        "{err}"
    );
}
