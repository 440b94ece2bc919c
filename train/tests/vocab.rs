//! `duet-train extend-vocab`: a run learns new words without losing the old ones — every old
//! text keeps its ids and every old parameter its values, the new words start below the
//! trained ones, and the grown run fine-tunes (caption and dream stages) reading them.

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use duet_datasets::shapeworld::{write_dataset, write_dataset_with, DatasetExtras, SceneConfig};
use duet_datasets::tokenizer::{load_tokenizer, unknown_words};
use duet_models::params::load_named_tensors;
use duet_models::tokens::UNK_ID;
use duet_models::{CaptionModel, ModelSpec};
use duet_run::checkpoint::{load_weights, read_json, WEIGHTS_FILE};
use duet_run::{
    with_prefixes, CaptionTrainConfig, GenerateTrainConfig, Stage, TokenizerOrigin, CONFIG_FILE,
    TOKENIZER_FILE,
};
use duet_train::backend::CpuBackend;
use duet_train::stages::caption::fit;
use duet_train::stages::dream::fit_dream;
use duet_train::vocab::{extend_run, folder_texts};

mod common;
use common::{caption_args, chain, dream_args};

type Infer = burn::backend::NdArray<f32>;

/// Captions only (the words of a run trained on it), and the same kind of scenes with
/// questions and edit instructions (words it never saw).
fn folders(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let plain = dir.join("plain");
    write_dataset(&plain, 32, 3, &SceneConfig::default(), "test").unwrap();
    let asked = dir.join("asked");
    let extras = DatasetExtras {
        questions_per_scene: 2,
        edits_per_scene: 2,
        ..Default::default()
    };
    write_dataset_with(&asked, 32, 4, &SceneConfig::default(), "test", &extras).unwrap();
    (plain, asked)
}

/// The decoder's logits at every position of `ids` for a fixed image, `[S, V]`.
fn logits(run: &Path, model: &ModelSpec, ids: &[u32]) -> Vec<Vec<f32>> {
    let device = Default::default();
    let weights = with_prefixes(
        &load_weights(&run.join(WEIGHTS_FILE)).unwrap(),
        &["vision", "decoder"],
    );
    let m = load_named_tensors(CaptionModel::<Infer>::new(model, &device), &weights).unwrap();
    let side = model.image_size;
    let pixels: Vec<f32> = (0..3 * side * side)
        .map(|i| ((i * 37) % 101) as f32 / 101.0 - 0.5)
        .collect();
    let image = Tensor::<Infer, 4>::from_data(TensorData::new(pixels, [1, 3, side, side]), &device);
    let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    let input =
        Tensor::<Infer, 2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), &device);
    let out = m
        .decoder
        .forward(input, m.vision.forward(image).patch_tokens);
    let [_, s, v] = out.dims();
    let flat: Vec<f32> = out.into_data().to_vec().unwrap();
    (0..s).map(|p| flat[p * v..(p + 1) * v].to_vec()).collect()
}

#[test]
fn extending_keeps_every_old_id_and_value_and_new_words_start_below_the_trained_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, asked) = folders(dir.path());
    let device = Default::default();
    let run = dir.path().join("caption");
    fit::<CpuBackend>(&caption_args(&plain, &run, 30, false), &device).unwrap();
    let old: CaptionTrainConfig = read_json(&run.join(CONFIG_FILE)).unwrap();
    let old_tok = load_tokenizer(&run.join(TOKENIZER_FILE)).unwrap();
    let texts = folder_texts(std::slice::from_ref(&asked)).unwrap();
    let unknown = unknown_words(&old_tok, &texts).unwrap();
    assert!(unknown.iter().any(|(w, _)| w == "what"), "{unknown:?}");

    let out = dir.path().join("grown");
    let report = extend_run(&run, std::slice::from_ref(&asked), &out, 0, "test extend").unwrap();
    assert_eq!(report.stage, Stage::Caption);
    assert_eq!(report.added, unknown);
    let new: CaptionTrainConfig = read_json(&out.join(CONFIG_FILE)).unwrap();
    let from = old.model.vocab_size;
    assert_eq!(new.model.vocab_size, from + unknown.len());
    assert_eq!(report.vocab_size, new.model.vocab_size);
    let TokenizerOrigin::Extended { added, .. } = &new.tokenizer else {
        panic!("{:?}", new.tokenizer)
    };
    assert_eq!(added.len(), unknown.len());

    // Every text encodes as before where the old tokenizer knew it, and no word of the new
    // folder is unknown any more; the new words have the new ids, in order.
    let new_tok = load_tokenizer(&out.join(TOKENIZER_FILE)).unwrap();
    assert!(unknown_words(&new_tok, &texts).unwrap().is_empty());
    for text in folder_texts(&[plain.clone(), asked.clone()]).unwrap() {
        let a = old_tok.encode(text.as_str(), false).unwrap();
        let b = new_tok.encode(text.as_str(), false).unwrap();
        assert_eq!(a.get_ids().len(), b.get_ids().len());
        for (x, y) in a.get_ids().iter().zip(b.get_ids()) {
            if *x != UNK_ID {
                assert_eq!(x, y, "{text}");
            } else {
                assert!(*y as usize >= from, "{text}");
            }
        }
    }
    for (i, (w, _)) in unknown.iter().enumerate() {
        assert_eq!(new_tok.token_to_id(w), Some((from + i) as u32));
    }

    // Old parameter values are kept bit for bit; the grown tables have the new rows.
    let a = load_weights(&run.join(WEIGHTS_FILE)).unwrap();
    let b = load_weights(&out.join(WEIGHTS_FILE)).unwrap();
    assert_eq!(a.len(), b.len());
    let d = old.model.d_model;
    for (name, t) in &a {
        let u = &b[name];
        let kept: Vec<f32> = match name.as_str() {
            "decoder.tok_embed.weight" => {
                assert_eq!(u.shape, vec![from + unknown.len(), d]);
                u.data[..from * d].to_vec()
            }
            "decoder.lm_head.weight" => {
                assert_eq!(u.shape, vec![d, from + unknown.len()]);
                u.data
                    .chunks(from + unknown.len())
                    .flat_map(|row| row[..from].to_vec())
                    .collect()
            }
            "decoder.lm_head.bias" => u.data[..from].to_vec(),
            _ => {
                assert_eq!(u.shape, t.shape, "{name}");
                u.data.clone()
            }
        };
        assert!(
            kept.iter()
                .zip(&t.data)
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name} changed"
        );
    }

    // On the same input the old words' logits are unchanged, and every new word scores below
    // the best old word at every position: greedy decoding reads as before.
    let caption = "a red circle";
    let ids: Vec<u32> = std::iter::once(duet_models::tokens::BOS_ID)
        .chain(
            old_tok
                .encode(caption, false)
                .unwrap()
                .get_ids()
                .iter()
                .copied(),
        )
        .collect();
    let before = logits(&run, &old.model, &ids);
    let after = logits(&out, &new.model, &ids);
    for (p, (x, y)) in before.iter().zip(&after).enumerate() {
        let worst = x
            .iter()
            .zip(&y[..from])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "position {p}: old logits moved by {worst}");
        let best_old = x.iter().copied().fold(f32::MIN, f32::max);
        let best_new = y[from..].iter().copied().fold(f32::MIN, f32::max);
        assert!(
            best_new < best_old,
            "position {p}: new {best_new} >= old {best_old}"
        );
    }

    // Nothing to add is refused, as is an existing output folder and a later stage's run.
    let again = extend_run(
        &out,
        std::slice::from_ref(&asked),
        &dir.path().join("again"),
        0,
        "x",
    )
    .unwrap_err();
    assert!(
        again.to_string().contains("already has every word"),
        "{again}"
    );
    let exists = extend_run(&run, std::slice::from_ref(&asked), &out, 0, "x").unwrap_err();
    assert!(exists.to_string().contains("exists"), "{exists}");

    // The grown run fine-tunes on the questions, reading their words.
    let tuned = dir.path().join("tuned");
    let mut args = caption_args(&asked, &tuned, 2, false);
    args.init_from = Some(out.clone());
    fit::<CpuBackend>(&args, &device).unwrap();
    let tuned_cfg: CaptionTrainConfig = read_json(&tuned.join(CONFIG_FILE)).unwrap();
    assert_eq!(tuned_cfg.model.vocab_size, new.model.vocab_size);
    assert!(tuned_cfg.questions > 0);
}

#[test]
fn a_grown_generate_run_trains_the_dream_stage_and_keeps_the_generator() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, asked) = folders(dir.path());
    let (_, gen) = chain(dir.path(), &plain);
    let out = dir.path().join("grown");
    let report = extend_run(&gen, std::slice::from_ref(&asked), &out, 1, "test extend").unwrap();
    assert_eq!(report.stage, Stage::Generate);
    assert!(
        report.grown.contains(&"text.tok_embed.weight".to_string()),
        "{:?}",
        report.grown
    );
    let cfg: GenerateTrainConfig = read_json(&out.join(CONFIG_FILE)).unwrap();
    assert_eq!(cfg.stage, Stage::Generate);
    assert_eq!(cfg.init, gen);
    let a = load_weights(&gen.join(WEIGHTS_FILE)).unwrap();
    let b = load_weights(&out.join(WEIGHTS_FILE)).unwrap();
    for (name, t) in with_prefixes(&a, &["denoiser", "vision"]) {
        assert_eq!(b[&name], t, "{name} changed");
    }

    let device = Default::default();
    let dream = dir.path().join("dream");
    let args = dream_args(&out, &asked, &dream, 2, false);
    fit_dream::<CpuBackend>(&args, &device).unwrap();
    let dream_cfg: serde_json::Value = read_json(&dream.join(CONFIG_FILE)).unwrap();
    assert_eq!(dream_cfg["model"]["vocab_size"], cfg.model.vocab_size);
    // The dream stage records the questions its decoder trained on (the export's `questions`).
    assert!(dream_cfg["questions"].as_u64().unwrap() > 0, "{dream_cfg}");
}
