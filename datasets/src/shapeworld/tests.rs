use std::collections::HashSet;
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
