//! The shipped `shipped/duet-small` bundle against its model card: the card's held-out emoji
//! caption scores and VQA accuracy were computed in Burn by `duet-train eval`
//! (`shipped/duet-small/eval/`); here the committed ONNX graphs, run by the runtime on tract and
//! on onnxruntime, caption a slice of the same held-out emoji (rebuilt from the sources
//! `scripts/setup.sh` fetches) and answer a slice of the same held-out questions (rebuilt from
//! the recipe's seeds), and must agree with those captions, answers and scores.

mod common;
use common::{engine_options, repo_root};

use duet_datasets::emoji::{load_emoji_split, write_emoji_dataset, EmojiOptions, EmojiSource};
use duet_runtime::engine::{Provider, ProviderChoice};
use duet_runtime::{Bundle, Captioner};
use duet_train::eval::emoji::score_captions;

/// Held-out emoji captioned through the runtime: enough to make the slice's token F1 a
/// meaningful estimate (± about 0.03), few enough to run in seconds.
const SLICE: usize = 100;

fn emoji_source() -> EmojiSource {
    let dir = repo_root().join(".data/emoji-src");
    assert!(
        dir.join("cldr-annotations-full/VERSION").exists(),
        "{}: Emoji-CLDR sources missing; run scripts/setup.sh",
        dir.display()
    );
    EmojiSource::new(dir)
}

#[test]
fn shipped_bundle_reproduces_its_cards_held_out_emoji_captions() {
    let model = repo_root().join("shipped/duet-small");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("eval/eval-emoji-google.json"))
            .expect("shipped/duet-small/eval/eval-emoji-google.json"),
    )
    .expect("eval json");
    // Burn's captions of the whole held-out google split, in the split's order.
    let burn: Vec<(String, String)> =
        serde_json::from_value(report["captions"].clone()).expect("captions");
    let card_f1 = report["report"]["token_f1"].as_f64().expect("token_f1");
    assert!(burn.len() > SLICE, "{} held-out emoji", burn.len());

    // The card quotes the whole split's figure and the slice's, which this test recomputes.
    let card = std::fs::read_to_string(model.join("MODEL_CARD.md")).expect("MODEL_CARD.md");
    let burn_slice = score_captions(&burn[..SLICE]);
    for (what, f1) in [("whole split", card_f1), ("slice", burn_slice.token_f1)] {
        let quoted = format!("{:.1} %", 100.0 * f1);
        assert!(
            card.contains(&quoted),
            "MODEL_CARD.md does not quote the held-out google token F1 of the {what}, {quoted}"
        );
    }

    // The split exactly as the recipe built it (`duet-train emoji --style google`, defaults).
    let data = tempfile::tempdir().unwrap();
    write_emoji_dataset(
        &emoji_source(),
        data.path(),
        &EmojiOptions::default(),
        "shipped-bundle test",
    )
    .expect("build the google split");
    let held_out = load_emoji_split(&data.path().join("test")).expect("test split");
    assert_eq!(held_out.len(), burn.len(), "held-out split size changed");
    let slice = &held_out[..SLICE];
    for (s, (truth, _)) in slice.iter().zip(&burn) {
        assert_eq!(&s.record.caption, truth, "split order changed");
    }
    let images: Vec<_> = slice.iter().map(|s| s.image.clone()).collect();

    let bundle = Bundle::open(&model).expect("the shipped bundle opens");
    for provider in [Provider::Tract, Provider::OrtCpu] {
        let captioner = Captioner::new(&bundle, ProviderChoice::Only(provider), &engine_options())
            .unwrap_or_else(|e| panic!("{provider}: {e}"));
        let mut predictions = Vec::with_capacity(SLICE);
        for batch in images.chunks(25) {
            predictions.extend(captioner.caption_images(batch).expect("caption"));
        }
        let pairs: Vec<(String, String)> = slice
            .iter()
            .zip(predictions)
            .map(|(s, p)| (s.record.caption.clone(), p))
            .collect();
        // Parity is 1e-4 per graph, so a greedy caption may flip only where two words tie.
        let same = pairs
            .iter()
            .zip(&burn)
            .filter(|((_, p), (_, b))| p == b)
            .count();
        assert!(
            same >= SLICE - 2,
            "{provider}: {same}/{SLICE} captions as in Burn's evaluation"
        );
        let runtime = score_captions(&pairs);
        assert!(
            (runtime.token_f1 - burn_slice.token_f1).abs() <= 0.02,
            "{provider}: slice token F1 {:.4} vs {:.4} in Burn",
            runtime.token_f1,
            burn_slice.token_f1
        );
    }
}

/// Held-out questions answered through the runtime: the held-out folder's first questions
/// (every kind occurs in them).
const QUESTION_SLICE: usize = 150;

/// The card's VQA figure comes from `duet-train eval --stage vqa` in Burn (every answer in
/// `eval/vqa_eval.json`); the committed graphs answer the same held-out questions, rebuilt from
/// the recipe's seeds (`scripts/tune-small.sh`), the same way on tract and onnxruntime.
#[test]
fn shipped_bundle_answers_its_cards_held_out_questions() {
    use duet_datasets::shapeworld::{
        load_questions, write_dataset_with, DatasetExtras, SceneConfig,
    };
    use duet_runtime::DecodeOptions;

    let model = repo_root().join("shipped/duet-small");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("eval/vqa_eval.json"))
            .expect("shipped/duet-small/eval/vqa_eval.json"),
    )
    .expect("eval json");
    let burn: Vec<serde_json::Value> =
        serde_json::from_value(report["answers"].clone()).expect("answers");
    let overall = report["overall"].as_f64().expect("overall");
    let card = std::fs::read_to_string(model.join("MODEL_CARD.md")).expect("MODEL_CARD.md");
    let quoted = format!("{:.1} %", 100.0 * overall);
    assert!(
        card.contains(&quoted),
        "MODEL_CARD.md does not quote the held-out VQA accuracy {quoted}"
    );

    // The folders exactly as the recipe wrote them: the training scenes (only to be left out)
    // and the held-out questions.
    let data = tempfile::tempdir().unwrap();
    let scenes = SceneConfig {
        max_objects: 4,
        ..SceneConfig::default()
    };
    let train = data.path().join("sw-qa");
    let extras = DatasetExtras {
        questions_per_scene: 2,
        edits_per_scene: 2,
        exclude: None,
    };
    write_dataset_with(&train, 6000, 11, &scenes, "shipped test", &extras).unwrap();
    let held = data.path().join("sw-qa-val");
    let extras = DatasetExtras {
        questions_per_scene: 3,
        edits_per_scene: 2,
        exclude: Some((
            train.display().to_string(),
            duet_datasets::shapeworld::folder_captions(&train).unwrap(),
        )),
    };
    write_dataset_with(&held, 500, 12, &scenes, "shipped test", &extras).unwrap();
    let questions = load_questions(&held).unwrap();
    assert_eq!(questions.len(), burn.len(), "held-out questions changed");
    let slice = &questions[..QUESTION_SLICE];
    for (q, b) in slice.iter().zip(&burn) {
        assert_eq!(b["question"], q.question.as_str(), "question order changed");
        assert_eq!(b["truth"], q.answer.as_str(), "answers changed");
    }

    let bundle = Bundle::open(&model).expect("the shipped bundle opens");
    for provider in [Provider::Tract, Provider::OrtCpu] {
        let captioner = Captioner::new(&bundle, ProviderChoice::Only(provider), &engine_options())
            .unwrap_or_else(|e| panic!("{provider}: {e}"));
        assert!(captioner.answers_questions(), "{provider}: no questions");
        let mut same = 0;
        let mut right = 0;
        for (q, b) in slice.iter().zip(&burn) {
            let image = duet_runtime::preprocess::load_image(held.join(&q.image)).unwrap();
            let answer = captioner
                .answer_images(&[image], &q.question, &DecodeOptions::default(), None)
                .unwrap_or_else(|e| panic!("{provider}: {e}"))
                .remove(0);
            same += usize::from(b["answer"] == answer.as_str());
            right += usize::from(answer.trim() == q.answer);
        }
        // Parity is 1e-4 per graph: an answer may flip only where two words tie.
        assert!(
            same >= QUESTION_SLICE - 2,
            "{provider}: {same}/{QUESTION_SLICE} answers as in Burn's evaluation"
        );
        let burn_right = burn[..QUESTION_SLICE]
            .iter()
            .filter(|b| b["answer"] == b["truth"])
            .count();
        assert!(
            right.abs_diff(burn_right) <= 2,
            "{provider}: {right}/{QUESTION_SLICE} right, Burn {burn_right}"
        );
    }
}

/// A transparent emoji is seen at inference as it was in training: the runtime's image loader
/// and the trainer's `render_art` give the same pixels for one RGBA file (alpha over white,
/// rounded the same way), so a user's PNG with an alpha channel is not read with the hidden
/// colours of its transparent pixels.
#[test]
fn the_runtime_reads_transparent_images_as_training_did() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rgba.png");
    let art = image::RgbaImage::from_fn(64, 64, |x, y| {
        image::Rgba([
            (x * 4) as u8,
            (y * 4) as u8,
            ((x + y) * 2) as u8,
            ((x * 7 + y * 3) % 256) as u8,
        ])
    });
    art.save(&path).unwrap();
    let trained = duet_datasets::emoji::render_art(&path, 64).unwrap();
    let inferred = duet_runtime::preprocess::load_image(&path).unwrap();
    assert_eq!(trained, inferred);
    // Not trivially equal: the hidden colours would differ (alpha 0 at the origin is white).
    assert_eq!(inferred.get_pixel(0, 0), &image::Rgb([255, 255, 255]));
}
