//! `duet-train extend-vocab`: a run whose tokenizer lacks words of new training data — a
//! shipped model imported with `duet-export import`, fine-tuned on questions or instructions
//! it never saw — grown to know them. The new words are appended after the tokenizer's last
//! id (every text it encoded keeps its ids), and every table with a vocabulary axis (the
//! decoder's and text encoder's token embeddings, the decoder's output layer) grows by as
//! many entries, each starting as an average word (`duet_models::vocab::grow_vocab`). The
//! result is a new run of the same stage that `fit --init-from` / `--init` starts from.

use std::path::{Path, PathBuf};

use anyhow::Context;
use duet_datasets::shapeworld::{folder_captions, load_edits, load_questions};
use duet_datasets::tokenizer::{extend_vocabulary, reuse_tokenizer, unknown_words, vocab_size};
use duet_models::vocab::{grow_vocab, vocab_axes};
use duet_run::checkpoint::{load_weights, read_json, save_weights, write_json, WEIGHTS_FILE};
use duet_run::{
    CaptionTrainConfig, GenerateTrainConfig, Stage, TokenizerOrigin, CONFIG_FILE, TOKENIZER_FILE,
};
use rand::SeedableRng;
use rand_distr::Distribution;

/// Standard deviations of noise around the mean entry, per new word (see [`extend_run`]).
pub const NEW_WORD_NOISE: f32 = 0.1;

/// What [`extend_run`] did.
#[derive(Debug, Clone)]
pub struct ExtendReport {
    pub out: PathBuf,
    pub stage: Stage,
    /// The words added, in id order (from the old vocabulary size on), with their counts in
    /// the folders' texts.
    pub added: Vec<(String, usize)>,
    pub vocab_size: usize,
    /// The parameters grown.
    pub grown: Vec<String>,
}

/// The texts a fine-tune on `folders` reads: captions, questions with their answers, and
/// edit instructions.
pub fn folder_texts(folders: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut texts = Vec::new();
    for dir in folders {
        let mut captions: Vec<String> = folder_captions(dir)
            .with_context(|| format!("reading the captions of {}", dir.display()))?
            .into_iter()
            .collect();
        // A set: sorted so the counts (and the order of equal counts) never depend on it.
        captions.sort();
        texts.extend(captions);
        texts.extend(
            load_questions(dir)?
                .into_iter()
                .map(|q| format!("{} {}", q.question, q.answer)),
        );
        texts.extend(load_edits(dir)?.into_iter().map(|e| e.instruction));
    }
    Ok(texts)
}

/// Writes `out`: the caption or generate run `run` with its vocabulary grown by the words of
/// `folders`' texts it lacks (most frequent first). New entries are the mean of the old ones
/// plus [`NEW_WORD_NOISE`] of their standard deviation times normal noise drawn from `seed`.
/// `out` must not exist; it is built beside itself and renamed into place. A run that
/// already knows every word is refused (nothing to do; fine-tune from it directly).
pub fn extend_run(
    run: &Path,
    folders: &[PathBuf],
    out: &Path,
    seed: u64,
    command: &str,
) -> anyhow::Result<ExtendReport> {
    if out.exists() {
        anyhow::bail!(
            "{} exists; extend-vocab writes a new run folder",
            out.display()
        );
    }
    let config: serde_json::Value = read_json(&run.join(CONFIG_FILE))
        .with_context(|| format!("{}: not a training run", run.display()))?;
    let stage: Stage = config
        .get("stage")
        .cloned()
        .map(serde_json::from_value)
        .transpose()?
        .unwrap_or(Stage::Caption);
    let reused = reuse_tokenizer(run)?;
    let texts = folder_texts(folders)?;
    let added = unknown_words(&reused.tokenizer, &texts)?;
    if added.is_empty() {
        anyhow::bail!(
            "the tokenizer of {} already has every word of the folders' captions, questions \
             and instructions: fine-tune from it as it is",
            run.display()
        );
    }
    let words: Vec<String> = added.iter().map(|(w, _)| w.clone()).collect();
    let tokenizer = extend_vocabulary(&reused.tokenizer, &words)?;
    let (from, to) = (vocab_size(&reused.tokenizer), vocab_size(&tokenizer));

    // The new config: the same stage with the new vocabulary, made by this command.
    let grown_size = |model_vocab: usize| {
        if model_vocab == from {
            Ok(to)
        } else {
            Err(anyhow::anyhow!(
                "{}: the model's vocabulary ({model_vocab}) is not its tokenizer's ({from})",
                run.display()
            ))
        }
    };
    let (config, model) = match stage {
        Stage::Caption => {
            let mut c: CaptionTrainConfig = serde_json::from_value(config)?;
            c.model.vocab_size = grown_size(c.model.vocab_size)?;
            c.tokenizer = TokenizerOrigin::Extended {
                path: reused.file.clone(),
                sha256: reused.sha256.clone(),
                added: words.clone(),
            };
            c.init_from = Some(run.to_path_buf());
            c.command = command.to_owned();
            (serde_json::to_value(&c)?, c.model)
        }
        Stage::Generate => {
            let mut c: GenerateTrainConfig = serde_json::from_value(config)?;
            c.model.vocab_size = grown_size(c.model.vocab_size)?;
            c.tokenizer = Some(TokenizerOrigin::Extended {
                path: reused.file.clone(),
                sha256: reused.sha256.clone(),
                added: words.clone(),
            });
            c.init = run.to_path_buf();
            c.command = command.to_owned();
            (serde_json::to_value(&c)?, c.model)
        }
        other => anyhow::bail!(
            "{} is a '{other}' run: extend the vocabulary of the caption or generate run the \
             later stages start from",
            run.display()
        ),
    };
    let mut weights = load_weights(&run.join(WEIGHTS_FILE))?;
    let old_model = duet_models::ModelSpec {
        vocab_size: from,
        ..model.clone()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let normal = rand_distr::StandardNormal;
    let grown = grow_vocab(&mut weights, &vocab_axes(&old_model), from, to, || {
        let z: f32 = normal.sample(&mut rng);
        NEW_WORD_NOISE * z
    })?;
    // Loading checks every name and shape against the grown model, as training will.
    let device = Default::default();
    type Check = burn::backend::NdArray<f32>;
    let part = |prefixes: &[&str]| duet_run::with_prefixes(&weights, prefixes);
    duet_models::params::load_named_tensors(
        duet_models::CaptionModel::<Check>::new(&model, &device),
        &part(&["vision", "decoder"]),
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", run.display()))?;
    if stage == Stage::Generate {
        duet_models::params::load_named_tensors(
            duet_models::GenerationModel::<Check>::new(&model, &device),
            &part(&["text", "denoiser"]),
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", run.display()))?;
    }

    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let built = duet_fsio::temp_dir_beside(out)?;
    duet_datasets::tokenizer::save_tokenizer(&tokenizer, &built.path().join(TOKENIZER_FILE))?;
    save_weights(&built.path().join(WEIGHTS_FILE), &weights)?;
    write_json(&built.path().join(CONFIG_FILE), &config)?;
    duet_fsio::replace_dir(built, out)?;
    Ok(ExtendReport {
        out: out.to_path_buf(),
        stage,
        added,
        vocab_size: to,
        grown,
    })
}
