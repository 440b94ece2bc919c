use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::path::Path;

use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::*;

fn scene_for(seed: u64) -> Scene {
    generate_scene(
        &mut ChaCha8Rng::seed_from_u64(seed),
        &SceneConfig::default(),
    )
}

#[test]
fn caption_parse_round_trip() {
    for seed in 0..2000 {
        let scene = scene_for(seed);
        assert!((1..=4).contains(&scene.objects.len()));
        let text = caption(&scene);
        assert_eq!(parse_caption(&text).unwrap(), scene.objects, "{text}");
        assert_eq!(parse_caption_lenient(&text), scene.objects, "{text}");
    }
}

#[test]
fn scenes_have_distinct_sorted_cells_and_cover_the_space() {
    let mut counts = HashSet::new();
    let mut shapes = HashSet::new();
    let mut colours = HashSet::new();
    for seed in 0..500 {
        let scene = scene_for(seed);
        let cells: Vec<_> = scene.objects.iter().map(|o| o.position).collect();
        assert!(cells.windows(2).all(|w| w[0] < w[1]), "{cells:?}");
        counts.insert(scene.objects.len());
        for o in &scene.objects {
            shapes.insert(o.shape);
            colours.insert(o.colour);
        }
    }
    assert_eq!(counts.len(), 4);
    assert_eq!(shapes.len(), 5);
    assert_eq!(colours.len(), 8);
}

#[test]
fn example_caption_matches_grammar() {
    let scene = Scene::new(vec![
        Object {
            shape: Shape::Square,
            colour: Colour::Blue,
            size: Size::Large,
            position: Position::Centre,
        },
        Object {
            shape: Shape::Circle,
            colour: Colour::Red,
            size: Size::Small,
            position: Position::TopLeft,
        },
    ]);
    assert_eq!(
        caption(&scene),
        "a small red circle at the top left and a large blue square in the centre"
    );
}

#[test]
fn all_positions_round_trip() {
    for position in Position::ALL {
        let o = Object {
            shape: Shape::Cross,
            colour: Colour::White,
            size: Size::Small,
            position,
        };
        let text = objects_caption(&[o, o]);
        assert_eq!(parse_caption(&text).unwrap(), vec![o, o]);
    }
}

#[test]
fn determinism() {
    let cfg = SceneConfig::default();
    let a = generate_scene(&mut ChaCha8Rng::seed_from_u64(42), &cfg);
    let b = generate_scene(&mut ChaCha8Rng::seed_from_u64(42), &cfg);
    assert_eq!(a, b);
    assert_eq!(caption(&a), caption(&b));
    let (ra, rb) = (render(&a, 32), render(&b, 32));
    assert_eq!(ra.as_raw(), rb.as_raw());
    let p = Path::new("x.png");
    assert_eq!(encode_png(&ra, p).unwrap(), encode_png(&rb, p).unwrap());
    // Different seeds should (almost always) differ.
    let distinct: HashSet<_> = (0..50).map(|s| caption(&scene_for(s))).collect();
    assert!(distinct.len() > 40);
}

fn count_in_cell(img: &RgbImage, o: &Object, size: u32) -> usize {
    let (x0, y0, x1, y1) = o.position.cell_rect(size);
    let mut n = 0;
    for y in y0..y1 {
        for x in x0..x1 {
            if img.get_pixel(x, y).0 == o.colour.rgb() {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn every_object_is_drawn_in_its_cell() {
    for size in [32, 64] {
        let cfg = SceneConfig {
            image_size: size,
            ..SceneConfig::default()
        };
        for seed in 0..300 {
            let scene = generate_scene(&mut ChaCha8Rng::seed_from_u64(seed), &cfg);
            let img = render(&scene, size);
            let mut coloured = 0;
            for o in &scene.objects {
                let n = count_in_cell(&img, o, size);
                assert!(n > 0, "seed {seed}: {o} not drawn");
                coloured += n;
            }
            // Nothing is drawn outside the objects' cells.
            let total = img.pixels().filter(|p| p.0 != BACKGROUND).count();
            assert_eq!(total, coloured, "seed {seed}: pixels leak out of cells");
        }
    }
}

#[test]
fn small_objects_have_fewer_pixels_than_large() {
    for size in [32, 64] {
        for shape in Shape::ALL {
            for position in Position::ALL {
                let mk = |s| Object {
                    shape,
                    colour: Colour::Green,
                    size: s,
                    position,
                };
                let small = mk(Size::Small);
                let large = mk(Size::Large);
                let ns = count_in_cell(&render(&Scene::new(vec![small]), size), &small, size);
                let nl = count_in_cell(&render(&Scene::new(vec![large]), size), &large, size);
                assert!(
                    0 < ns && ns < nl,
                    "{shape:?} {position:?} @{size}: {ns} vs {nl}"
                );
            }
        }
    }
}

/// Pixel masks of the five shapes must all differ, at every size we render.
#[test]
fn shapes_are_distinguishable() {
    for size in [32, 64] {
        for s in Size::ALL {
            let masks: Vec<Vec<bool>> = Shape::ALL
                .iter()
                .map(|&shape| {
                    let o = Object {
                        shape,
                        colour: Colour::White,
                        size: s,
                        position: Position::Centre,
                    };
                    render(&Scene::new(vec![o]), size)
                        .pixels()
                        .map(|p| p.0 != BACKGROUND)
                        .collect()
                })
                .collect();
            for a in 0..masks.len() {
                for b in a + 1..masks.len() {
                    assert_ne!(
                        masks[a],
                        masks[b],
                        "{:?} vs {:?}",
                        Shape::ALL[a],
                        Shape::ALL[b]
                    );
                }
            }
        }
    }
}

#[test]
fn parse_errors_on_garbage() {
    assert_eq!(parse_caption(""), Err(ParseError::Empty));
    assert_eq!(parse_caption("   "), Err(ParseError::Empty));
    for bad in [
        "hello world",
        "a small red circle",
        "a small red circle at the",
        "a small red circle at the top middle",
        "a tiny red circle at the top",
        "a small pink circle at the top",
        "a small red blob at the top",
        "a small red circle at the top and",
        "a small red circle at the top and and",
        "a small red circle at the top a small red circle at the left",
        "a small red circle in the centre extra",
        "A small red circle in the centre",
    ] {
        assert!(parse_caption(bad).is_err(), "{bad:?} should not parse");
    }
    let err = parse_caption("a small red blob at the top").unwrap_err();
    assert_eq!(
        err,
        ParseError::UnexpectedWord {
            clause: 0,
            word: 3,
            expected: "a shape",
            found: "blob".into()
        }
    );
}

#[test]
fn lenient_parse_skips_garbage() {
    let text = "xx a small red circle at the top left left and and a large blob on \
                the right a large white cross in the centre a small";
    let objs = parse_caption_lenient(text);
    assert_eq!(
        objs,
        vec![
            Object {
                shape: Shape::Circle,
                colour: Colour::Red,
                size: Size::Small,
                position: Position::TopLeft
            },
            Object {
                shape: Shape::Cross,
                colour: Colour::White,
                size: Size::Large,
                position: Position::Centre
            },
        ]
    );
    assert!(parse_caption_lenient("").is_empty());
    assert!(parse_caption_lenient("[UNK] [UNK] a a a").is_empty());
}

#[test]
fn serde_names_are_lowercase() {
    let o = Object {
        shape: Shape::Triangle,
        colour: Colour::Purple,
        size: Size::Large,
        position: Position::BottomRight,
    };
    let json = serde_json::to_string(&o).unwrap();
    assert_eq!(
        json,
        r#"{"shape":"triangle","colour":"purple","size":"large","position":"bottom_right"}"#
    );
    assert_eq!(serde_json::from_str::<Object>(&json).unwrap(), o);
}

#[test]
fn config_validation() {
    assert!(SceneConfig::default().validate().is_ok());
    let bad = SceneConfig {
        image_size: 8,
        ..SceneConfig::default()
    };
    assert!(bad.validate().is_err());
    let bad = SceneConfig {
        min_objects: 3,
        max_objects: 2,
        ..SceneConfig::default()
    };
    assert!(bad.validate().is_err());
    // generate_scene must not panic on an unvalidated config.
    let weird = SceneConfig {
        image_size: 32,
        min_objects: 0,
        max_objects: 100,
    };
    let scene = generate_scene(&mut ChaCha8Rng::seed_from_u64(1), &weird);
    assert!((1..=9).contains(&scene.objects.len()));
}

#[test]
fn dataset_write_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SceneConfig::default();
    let summary = write_dataset(dir.path(), 20, 7, &cfg, "duet-train gen --seed 7").unwrap();
    assert_eq!(summary.count, 20);
    assert_eq!(load_dataset_info(dir.path()).unwrap(), summary);
    let samples = load_dataset(dir.path()).unwrap();
    assert_eq!(samples.len(), 20);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (k, s) in samples.iter().enumerate() {
        let scene = generate_scene(&mut rng, &cfg);
        assert_eq!(s.objects, scene.objects);
        assert_eq!(s.caption, caption(&scene));
        assert_eq!(s.image.as_raw(), render(&scene, 32).as_raw());
        assert_eq!(s.image_path, dir.path().join(format!("images/{k:06}.png")));
    }
    let first = fs::read_to_string(dir.path().join("captions.jsonl")).unwrap();
    assert!(first.starts_with(r#"{"image":"images/000000.png","caption":"a "#));
    // No temp files left behind.
    for entry in fs::read_dir(dir.path().join("images")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(name.ends_with(".png") && !name.starts_with('.'), "{name}");
    }
    // Same seed → identical bytes.
    let dir2 = tempfile::tempdir().unwrap();
    write_dataset(dir2.path(), 20, 7, &cfg, "duet-train gen --seed 7").unwrap();
    for f in [
        "captions.jsonl",
        "scenes.jsonl",
        "dataset.json",
        "images/000013.png",
    ] {
        assert_eq!(
            fs::read(dir.path().join(f)).unwrap(),
            fs::read(dir2.path().join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn load_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path(), 5, 3, &SceneConfig::default(), "test").unwrap();

    // Corrupt PNG.
    let png = dir.path().join("images/000002.png");
    let good_png = fs::read(&png).unwrap();
    fs::write(&png, b"not a png at all").unwrap();
    let err = load_dataset(dir.path()).unwrap_err();
    assert!(matches!(err, DataError::Image { line: 3, .. }), "{err:?}");
    assert!(err.to_string().contains("000002.png"), "{err}");
    fs::write(&png, &good_png).unwrap();
    assert!(load_dataset(dir.path()).is_ok());

    // Missing image.
    fs::remove_file(&png).unwrap();
    let err = load_dataset(dir.path()).unwrap_err();
    assert!(err.to_string().contains("000002.png"), "{err}");
    fs::write(&png, &good_png).unwrap();

    // Malformed jsonl line.
    let cap_path = dir.path().join("captions.jsonl");
    let good = fs::read_to_string(&cap_path).unwrap();
    let mut lines: Vec<&str> = good.lines().collect();
    lines[3] = "{\"image\": \"images/000003.png\", \"caption\": ";
    fs::write(&cap_path, lines.join("\n")).unwrap();
    let err = load_dataset(dir.path()).unwrap_err();
    assert!(matches!(err, DataError::Json { line: 4, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("captions.jsonl:4"), "{msg}");

    // Caption that does not match its scene.
    lines[3] = r#"{"image":"images/000003.png","caption":"a small red circle at the top"}"#;
    fs::write(&cap_path, lines.join("\n")).unwrap();
    let err = load_dataset(dir.path()).unwrap_err();
    assert!(matches!(err, DataError::Invalid { line: 4, .. }), "{err:?}");

    // Path escaping the dataset folder.
    lines[3] = r#"{"image":"../x.png","caption":"x"}"#;
    fs::write(&cap_path, lines.join("\n")).unwrap();
    assert!(load_dataset(dir.path()).is_err());

    // Missing file.
    fs::remove_file(&cap_path).unwrap();
    let err = load_dataset(dir.path()).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }));
    assert!(err.to_string().contains("captions.jsonl"), "{err}");
}

#[test]
fn split_keeps_captions_apart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SceneConfig {
        image_size: 32,
        min_objects: 1,
        max_objects: 1,
    };
    write_dataset(dir.path(), 300, 11, &cfg, "test").unwrap();
    let samples = load_dataset(dir.path()).unwrap();
    let (train, val) = split(samples.clone(), 0.2, 5);
    assert_eq!(train.len() + val.len(), 300);
    assert!((55..=80).contains(&val.len()), "{}", val.len());
    let train_caps: HashSet<_> = train.iter().map(|s| s.caption.clone()).collect();
    assert!(val.iter().all(|s| !train_caps.contains(&s.caption)));
    // Deterministic.
    let (train2, val2) = split(samples, 0.2, 5);
    assert_eq!(train.len(), train2.len());
    assert!(val
        .iter()
        .zip(&val2)
        .all(|(a, b)| a.image_path == b.image_path));
}

fn object(shape: Shape, colour: Colour, size: Size, position: Position) -> Object {
    Object {
        shape,
        colour,
        size,
        position,
    }
}

/// Every question drawn about a hand-made scene, with its answer.
fn all_questions(scene: &Scene) -> std::collections::BTreeMap<String, (QuestionKind, String)> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..3000 {
        for q in questions_for(scene, 3, &mut rng) {
            if let Some((_, a)) = seen.insert(q.question.clone(), (q.kind, q.answer.clone())) {
                assert_eq!(a, q.answer, "one question, two answers: {}", q.question);
            }
        }
    }
    seen
}

#[test]
fn questions_have_the_scenes_exact_answers() {
    let scene = Scene::new(vec![
        object(Shape::Circle, Colour::Red, Size::Small, Position::TopLeft),
        object(Shape::Square, Colour::Blue, Size::Large, Position::Top),
        object(Shape::Square, Colour::Red, Size::Large, Position::Centre),
    ]);
    let seen = all_questions(&scene);
    let expect = [
        ("what colour is the circle ?", "red"),
        // Two large squares: the colour question cannot name them (size does not single one
        // out and colour is what it asks).
        ("what size is the circle ?", "small"),
        ("what size is the blue square ?", "large"),
        ("what shape is at the top left ?", "circle"),
        ("what shape is in the centre ?", "square"),
        ("how many red objects are there ?", "two"),
        ("how many blue objects are there ?", "one"),
        ("is there a red circle ?", "yes"),
        ("is there a blue square ?", "yes"),
        ("where is the circle ?", "at the top left"),
        ("where is the red square ?", "in the centre"),
        ("what is left of the blue square ?", "a small red circle"),
        ("what is above the red square ?", "a large blue square"),
    ];
    for (q, a) in expect {
        assert_eq!(
            seen.get(q).map(|(_, a)| a.as_str()),
            Some(a),
            "{q} (asked: {:?})",
            seen.keys().collect::<Vec<_>>()
        );
    }
    for (q, (kind, a)) in &seen {
        assert!(q.ends_with(" ?"), "{q}");
        // A description never uses the attribute asked about, and never an ambiguous one.
        assert!(
            !q.starts_with("what colour is the blue") && !q.starts_with("what colour is the red"),
            "{q}"
        );
        assert_ne!(q, "what colour is the square ?");
        assert_ne!(q, "where is the square ?");
        match kind {
            QuestionKind::Exists => assert!(a == "yes" || a == "no", "{q} {a}"),
            QuestionKind::ShapeAt => {
                assert!(a == "nothing" || Shape::from_word(a).is_some(), "{q} {a}")
            }
            QuestionKind::LeftOf | QuestionKind::Above => {
                assert!(a == "nothing" || a.starts_with("a "), "{q} {a}")
            }
            _ => {}
        }
    }
    assert_eq!(
        seen.get("what shape is at the bottom right ?")
            .map(|x| x.1.as_str()),
        Some("nothing")
    );
    assert_eq!(
        seen.get("what is left of the red square ?")
            .map(|x| x.1.as_str()),
        Some("nothing")
    );
    // Objects with no cell on that side are not asked about.
    assert!(!seen.contains_key("what is left of the circle ?"));
    assert!(!seen.contains_key("what is above the circle ?"));
    let kinds: HashSet<QuestionKind> = seen.values().map(|(k, _)| *k).collect();
    assert_eq!(kinds.len(), QuestionKind::ALL.len(), "{kinds:?}");
}

#[test]
fn question_answers_are_balanced_enough_to_need_the_image() {
    // Over many scenes no kind's majority answer covers most of its questions (yes/no half
    // and half, "nothing" a minority of shape_at).
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut per_kind: std::collections::HashMap<
        QuestionKind,
        std::collections::HashMap<String, usize>,
    > = Default::default();
    for seed in 0..3000 {
        for q in questions_for(&scene_for(seed), 3, &mut rng) {
            *per_kind
                .entry(q.kind)
                .or_default()
                .entry(q.answer)
                .or_default() += 1;
        }
    }
    for (kind, answers) in &per_kind {
        let total: usize = answers.values().sum();
        let top = answers.values().max().copied().unwrap_or(0);
        assert!(total > 300, "{kind}: {total}");
        assert!(
            (top as f64) < 0.62 * total as f64,
            "{kind}: majority answer {top} of {total}: {answers:?}"
        );
    }
}

#[test]
fn questions_file_is_seeded_and_a_held_out_folder_shares_no_scene() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SceneConfig::default();
    let extras = DatasetExtras {
        questions_per_scene: 3,
        ..Default::default()
    };
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let plain = dir.path().join("plain");
    write_dataset_with(&a, 200, 3, &cfg, "test", &extras).unwrap();
    write_dataset_with(&b, 200, 3, &cfg, "test", &extras).unwrap();
    write_dataset(&plain, 200, 3, &cfg, "test").unwrap();
    let qa = fs::read(a.join("questions.jsonl")).unwrap();
    assert_eq!(qa, fs::read(b.join("questions.jsonl")).unwrap());
    // Questions take their own random stream: the scenes are those of the seed alone.
    assert_eq!(
        fs::read(a.join("captions.jsonl")).unwrap(),
        fs::read(plain.join("captions.jsonl")).unwrap()
    );
    assert!(!plain.join("questions.jsonl").exists());
    let questions = load_questions(&a).unwrap();
    assert!(questions.len() > 500, "{}", questions.len());
    assert!(load_questions(&plain).unwrap().is_empty());
    let info = load_dataset_info(&a).unwrap();
    assert_eq!(info.questions_per_scene, 3);

    // A held-out folder drawn from a seed that repeats many of a's scenes keeps none of them.
    let train_captions = folder_captions(&a).unwrap();
    let held = dir.path().join("held");
    let extras = DatasetExtras {
        questions_per_scene: 2,
        exclude: Some(("a".into(), train_captions.clone())),
        ..Default::default()
    };
    write_dataset_with(&held, 300, 3, &cfg, "test", &extras).unwrap();
    let held_captions = folder_captions(&held).unwrap();
    assert!(held_captions.is_disjoint(&train_captions));
    assert_eq!(
        load_dataset_info(&held).unwrap().held_out_from.as_deref(),
        Some("a")
    );
    // Every scene excluded: a typed error, not an endless loop.
    let one = SceneConfig {
        min_objects: 1,
        max_objects: 1,
        ..cfg
    };
    let mut everything = HashSet::new();
    for seed in 0..20_000 {
        let scene = generate_scene(&mut ChaCha8Rng::seed_from_u64(seed), &one);
        everything.insert(caption(&scene));
    }
    assert_eq!(everything.len(), 720);
    let err = write_dataset_with(
        &dir.path().join("none"),
        5,
        0,
        &one,
        "test",
        &DatasetExtras {
            exclude: Some(("all".into(), everything)),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, DataError::InvalidConfig(_)), "{err}");

    // A question about an image the folder does not list is refused with its line.
    let mut text = String::from_utf8(qa).unwrap();
    text.push_str(
        r#"{"image":"images/999999.png","kind":"colour","question":"what colour is the circle ?","answer":"red"}"#,
    );
    text.push('\n');
    fs::write(a.join("questions.jsonl"), text).unwrap();
    let err = load_questions(&a).unwrap_err().to_string();
    assert!(
        err.contains("questions.jsonl:") && err.contains("999999"),
        "{err}"
    );
}

#[test]
fn edits_name_one_object_and_change_exactly_what_they_say() {
    let cfg = SceneConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut per_kind: BTreeMap<EditKind, usize> = BTreeMap::new();
    for _ in 0..400 {
        let scene = generate_scene(&mut rng, &cfg);
        for e in edits_for(&scene, 3, &mut rng) {
            *per_kind.entry(e.kind).or_default() += 1;
            let words: Vec<&str> = e.instruction.split(' ').collect();
            let before: BTreeSet<Object> = scene.objects.iter().copied().collect();
            let after: BTreeSet<Object> = e.target.objects.iter().copied().collect();
            let gone: Vec<&Object> = before.difference(&after).collect();
            let new: Vec<&Object> = after.difference(&before).collect();
            // One cell per object, in canonical order, like every scene.
            assert_eq!(e.target, Scene::new(e.target.objects.clone()));
            match e.kind {
                EditKind::Add => {
                    assert!(gone.is_empty() && new.len() == 1, "{e:?}");
                    assert_eq!(e.instruction, format!("add {}", new[0]));
                    assert!(!scene.objects.iter().any(|o| o.position == new[0].position));
                }
                EditKind::Recolour => {
                    assert!(gone.len() == 1 && new.len() == 1, "{e:?}");
                    assert_eq!(
                        Object {
                            colour: gone[0].colour,
                            ..*new[0]
                        },
                        *gone[0],
                        "only the colour changes: {e:?}"
                    );
                    assert_ne!(gone[0].colour, new[0].colour);
                    assert_eq!(words[0], "make");
                    assert_eq!(*words.last().unwrap(), new[0].colour.word());
                }
                EditKind::Remove => {
                    assert!(gone.len() == 1 && new.is_empty(), "{e:?}");
                    assert_eq!(words[0], "remove");
                }
                EditKind::Move => {
                    assert!(gone.len() == 1 && new.len() == 1, "{e:?}");
                    assert_eq!(
                        Object {
                            position: gone[0].position,
                            ..*new[0]
                        },
                        *gone[0]
                    );
                    assert!(e
                        .instruction
                        .ends_with(&destination_phrase(new[0].position)));
                }
            }
            if matches!(
                e.kind,
                EditKind::Recolour | EditKind::Remove | EditKind::Move
            ) {
                // The named shape is the changed object's, and no other object fits the name.
                let named = words[1..]
                    .iter()
                    .find_map(|w| Shape::from_word(w))
                    .expect("a shape word");
                assert_eq!(named, gone[0].shape, "{e:?}");
            }
            for w in words {
                assert!(
                    instruction_words().contains(&w)
                        || Shape::from_word(w).is_some()
                        || Colour::from_word(w).is_some()
                        || Size::from_word(w).is_some()
                        || [
                            "a", "the", "at", "on", "in", "top", "bottom", "left", "right",
                            "centre"
                        ]
                        .contains(&w),
                    "{w} in {e:?}"
                );
            }
        }
    }
    for kind in EditKind::ALL {
        assert!(
            per_kind.get(&kind).copied().unwrap_or(0) > 150,
            "{per_kind:?}"
        );
    }
}

#[test]
fn edits_file_is_seeded_on_its_own_stream_and_checked_when_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SceneConfig::default();
    let extras = DatasetExtras {
        edits_per_scene: 2,
        ..Default::default()
    };
    let a = dir.path().join("a");
    let plain = dir.path().join("plain");
    write_dataset_with(&a, 100, 4, &cfg, "test", &extras).unwrap();
    write_dataset(&plain, 100, 4, &cfg, "test").unwrap();
    assert_eq!(
        fs::read(a.join("captions.jsonl")).unwrap(),
        fs::read(plain.join("captions.jsonl")).unwrap()
    );
    let edits = load_edits(&a).unwrap();
    assert!(edits.len() > 150, "{}", edits.len());
    assert!(load_edits(&plain).unwrap().is_empty());
    assert_eq!(load_dataset_info(&a).unwrap().edits_per_scene, 2);
    let mut text = fs::read_to_string(a.join("edits.jsonl")).unwrap();
    let some = edits.iter().find(|e| !e.target.is_empty()).unwrap();
    let bad = EditRecord {
        target: vec![some.target[0], some.target[0]],
        ..some.clone()
    };
    text.push_str(&serde_json::to_string(&bad).unwrap());
    text.push('\n');
    fs::write(a.join("edits.jsonl"), text).unwrap();
    let err = load_edits(&a).unwrap_err().to_string();
    assert!(
        err.contains("edits.jsonl:") && err.contains("one cell"),
        "{err}"
    );
}
