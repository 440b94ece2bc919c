//! Evaluation on held-out Emoji-CLDR splits.
//!
//! - **Captions** (`duet-train eval --stage caption --data EMOJI/test`): the captioner's greedy
//!   name against CLDR's. *Exact name* compares the two as word sequences (case, spacing and
//!   punctuation ignored: the decoder joins `thumbs up : medium skin tone` with spaces); *token
//!   F1* is the bag-of-words F1 per emoji, averaged (partial credit for `thumbs up: light skin
//!   tone` against `thumbs down: light skin tone`).
//! - **Retrieval** (`duet-train eval --stage retrieval --run GENERATE_RUN --data EMOJI/test`):
//!   the trained encoders' embeddings (the vision encoder and the text encoder, aligned by the
//!   generate stage's contrastive loss) rank every caption of the split for each image and every
//!   image for each caption; recall@k is the share whose own partner ranks in the top k.
//!   **Generation** is judged the same way: the image generated from each caption is embedded by
//!   the vision encoder and ranks the split's captions; recall@k says how often its own prompt
//!   comes back.
//!
//! Ties count against the query (a partner tied with another candidate ranks below it), so a
//! model whose embeddings are all equal scores zero, not one.

use std::fmt;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use image::RgbImage;
use serde::Serialize;

use crate::stages::caption::{caption_samples, prepare};
use duet_datasets::folders::{folder_kind, load_generated, FolderKind};
use duet_datasets::shapeworld::Sample;
use duet_datasets::tokenizer::{encode_caption, PAD_ID};
use duet_run::load_run;

/// Lower-cased words of a name: runs of letters and digits; everything else separates.
pub fn name_words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The predicted name is the true one, word for word.
pub fn exact_name(pred: &str, truth: &str) -> bool {
    name_words(pred) == name_words(truth)
}

/// Bag-of-words F1 between a predicted and a true name (each word counted as often as it
/// occurs). Two empty names agree (1); one empty name against a non-empty one scores 0.
pub fn token_f1(pred: &str, truth: &str) -> f64 {
    let p = name_words(pred);
    let t = name_words(truth);
    if p.is_empty() && t.is_empty() {
        return 1.0;
    }
    let mut unmatched = t.clone();
    let mut common = 0usize;
    for w in &p {
        if let Some(k) = unmatched.iter().position(|u| u == w) {
            unmatched.swap_remove(k);
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / p.len() as f64;
    let recall = common as f64 / t.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Recall@k for each k of `ks` from an `n × n` row-major similarity matrix whose row `i` is
/// query `i` and whose column `i` is its partner. The partner's rank is the number of other
/// candidates scoring at least as high (ties count against the query).
pub fn recall_at(sim: &[f32], n: usize, ks: &[usize]) -> Vec<f64> {
    assert_eq!(sim.len(), n * n, "similarity matrix must be n × n");
    let mut hits = vec![0usize; ks.len()];
    for i in 0..n {
        let row = &sim[i * n..(i + 1) * n];
        let own = row[i];
        let rank = row
            .iter()
            .enumerate()
            .filter(|&(j, &s)| j != i && (s >= own || s.is_nan()))
            .count();
        for (h, &k) in hits.iter_mut().zip(ks) {
            if rank < k {
                *h += 1;
            }
        }
    }
    hits.iter()
        .map(|&h| if n == 0 { 0.0 } else { h as f64 / n as f64 })
        .collect()
}

/// `a · bᵀ` of row-major `[n, d]` matrices.
fn similarities(a: &[f32], b: &[f32], n: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] = (0..d).map(|k| a[i * d + k] * b[j * d + k]).sum();
        }
    }
    out
}

/// The transpose of an `n × n` row-major matrix (text queries against image candidates).
fn transpose(m: &[f32], n: usize) -> Vec<f32> {
    (0..n * n).map(|k| m[(k % n) * n + k / n]).collect()
}

/// Caption quality on an Emoji-CLDR split.
#[derive(Debug, Clone, Serialize)]
pub struct EmojiCaptionReport {
    pub samples: usize,
    /// Share of emoji whose greedy caption is their CLDR name.
    pub exact_name: f64,
    /// Mean bag-of-words F1 of the caption against the name.
    pub token_f1: f64,
}

impl fmt::Display for EmojiCaptionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "| emoji ({}) | score |", self.samples)?;
        writeln!(f, "|---|---|")?;
        writeln!(f, "| exact name | {:.2}% |", 100.0 * self.exact_name)?;
        write!(f, "| token F1 | {:.2}% |", 100.0 * self.token_f1)
    }
}

/// Scores `(truth, prediction)` pairs.
pub fn score_captions(pairs: &[(String, String)]) -> EmojiCaptionReport {
    let n = pairs.len();
    let exact = pairs.iter().filter(|(t, p)| exact_name(p, t)).count();
    let f1: f64 = pairs.iter().map(|(t, p)| token_f1(p, t)).sum();
    EmojiCaptionReport {
        samples: n,
        exact_name: if n == 0 { 0.0 } else { exact as f64 / n as f64 },
        token_f1: if n == 0 { 0.0 } else { f1 / n as f64 },
    }
}

/// Loads an Emoji-CLDR split (refusing other folders: the scores assume names as captions),
/// the first `limit` emoji if given.
fn load_emoji_samples(data: &Path, limit: Option<usize>) -> anyhow::Result<Vec<Sample>> {
    if folder_kind(data)? != FolderKind::EmojiSplit {
        anyhow::bail!("{}: not an Emoji-CLDR split", data.display());
    }
    let mut samples = load_generated(data, FolderKind::EmojiSplit)?;
    if let Some(n) = limit {
        samples.truncate(n);
    }
    if samples.is_empty() {
        anyhow::bail!("{}: no samples to evaluate", data.display());
    }
    Ok(samples)
}

/// Greedy captions of an Emoji-CLDR split by any run that carries a captioner, scored against
/// the names. Returns the report and every `(truth, prediction)` pair.
pub fn eval_emoji_captions<B: Backend>(
    run: &Path,
    data: &Path,
    limit: Option<usize>,
    device: &B::Device,
) -> anyhow::Result<(EmojiCaptionReport, Vec<(String, String)>)> {
    let loaded = load_run::<B>(run, device)?;
    let samples = load_emoji_samples(data, limit)?;
    let cfg = &loaded.config.model;
    // Names longer than the decoder's window cannot be produced; `prepare` would refuse them.
    // They are scored against what the model says all the same, so only images are prepared.
    let prepared = prepare_images(&samples, &loaded.tokenizer, cfg.image_size, cfg.max_len)?;
    let predictions = caption_samples(&loaded, &prepared, device);
    let pairs: Vec<(String, String)> = samples
        .iter()
        .zip(predictions)
        .map(|(s, p)| (s.caption.clone(), p))
        .collect();
    Ok((score_captions(&pairs), pairs))
}

/// [`prepare`] with every caption blanked: only the pixels are used.
fn prepare_images(
    samples: &[Sample],
    tokenizer: &tokenizers::Tokenizer,
    image_size: usize,
    max_len: usize,
) -> anyhow::Result<crate::stages::caption::PreparedData> {
    let blank: Vec<Sample> = samples
        .iter()
        .map(|s| Sample {
            caption: String::new(),
            ..s.clone()
        })
        .collect();
    prepare(&blank, tokenizer, image_size, max_len)
}

/// Retrieval scores of a generate (or unify) run on an Emoji-CLDR split.
#[derive(Debug, Clone, Serialize)]
pub struct EmojiRetrievalReport {
    pub samples: usize,
    /// Real image → its caption among all captions of the split.
    pub image_to_text: [f64; 2],
    /// Caption → its real image among all images.
    pub text_to_image: [f64; 2],
    /// Image generated from a caption → that caption among all captions.
    pub generated_to_text: [f64; 2],
}

impl fmt::Display for EmojiRetrievalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.samples;
        writeln!(f, "| retrieval among {n} emoji | R@1 | R@5 |")?;
        writeln!(f, "|---|---|---|")?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, r: [f64; 2]| {
            writeln!(
                f,
                "| {name} | {:.2}% | {:.2}% |",
                100.0 * r[0],
                100.0 * r[1]
            )
        };
        row(f, "image → caption", self.image_to_text)?;
        row(f, "caption → image", self.text_to_image)?;
        row(f, "generated image → its prompt", self.generated_to_text)?;
        write!(
            f,
            "(chance: R@1 {:.2}%, R@5 {:.2}%)",
            100.0 / n as f64,
            100.0 * 5.0_f64.min(n as f64) / n as f64
        )
    }
}

/// Settings of the generation half of [`eval_emoji_retrieval`].
#[derive(Debug, Clone)]
pub struct RetrievalOptions {
    pub sampler: duet_diffusion::SamplerConfig,
    pub guidance: f32,
    pub seed: u64,
    /// Prompts per sampling batch (memory bound).
    pub batch: usize,
}

/// Image↔caption retrieval with the run's encoders, and generation judged by retrieval.
/// Returns the report and, per emoji, the real image and the one generated from its name.
pub fn eval_emoji_retrieval<B: Backend>(
    run: &Path,
    data: &Path,
    limit: Option<usize>,
    opts: &RetrievalOptions,
    device: &B::Device,
) -> anyhow::Result<(EmojiRetrievalReport, Vec<(RgbImage, RgbImage)>)> {
    let generator = duet_run::load_generator::<B>(run, false, device)?;
    // The captioner's vision encoder, frozen during the generate stage, is the image side.
    let captioner = load_run::<B>(run, device)?;
    let cfg = generator.config.model.clone();
    let samples = load_emoji_samples(data, limit)?;
    let n = samples.len();
    let d = cfg.embed_dim;
    let prepared = prepare_images(&samples, &generator.tokenizer, cfg.image_size, cfg.max_len)?;

    let embed_images = |pixels: Tensor<B, 4>| -> anyhow::Result<Vec<f32>> {
        captioner
            .model
            .vision
            .forward(pixels)
            .embedding
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("reading embeddings: {e:?}"))
    };
    let idx: Vec<usize> = (0..n).collect();
    let mut image_emb = Vec::with_capacity(n * d);
    for chunk in idx.chunks(opts.batch.max(1)) {
        image_emb.extend(embed_images(prepared.pixels_batch::<B>(chunk, device))?);
    }

    let mut text_emb = Vec::with_capacity(n * d);
    let l = cfg.max_len;
    for chunk in samples.chunks(opts.batch.max(1)) {
        let mut ids = Vec::with_capacity(chunk.len() * l);
        let mut mask = Vec::with_capacity(chunk.len() * l);
        for s in chunk {
            let seq = encode_caption(&generator.tokenizer, &s.caption, l)?;
            for k in 0..l {
                ids.push(seq.get(k).map_or(i64::from(PAD_ID), |&t| i64::from(t)));
                mask.push(if k < seq.len() { 1.0f32 } else { 0.0 });
            }
        }
        let b = chunk.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, l]), device);
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [b, l]), device);
        let emb = generator.generator.text.forward(ids, mask).embedding;
        text_emb.extend(
            emb.into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("reading embeddings: {e:?}"))?,
        );
    }

    let mut generated_emb = Vec::with_capacity(n * d);
    let mut pairs = Vec::with_capacity(n);
    let pb = indicatif::ProgressBar::new(n as u64);
    for (k, chunk) in samples.chunks(opts.batch.max(1)).enumerate() {
        let prompts: Vec<String> = chunk.iter().map(|s| s.caption.clone()).collect();
        let x = generator.generate(
            &prompts,
            &opts.sampler,
            opts.guidance,
            opts.seed.wrapping_add(k as u64),
            device,
        )?;
        let images = duet_diffusion::to_images(&x)?;
        let flat: Vec<f32> = images
            .iter()
            .flat_map(duet_datasets::image_to_chw)
            .collect();
        let s = cfg.image_size;
        let pixels =
            Tensor::<B, 4>::from_data(TensorData::new(flat, [chunk.len(), 3, s, s]), device);
        generated_emb.extend(embed_images(pixels)?);
        for (sample, img) in chunk.iter().zip(images) {
            pairs.push((sample.image.clone(), img));
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();

    let ks = [1, 5];
    let image_text = similarities(&image_emb, &text_emb, n, d);
    let generated_text = similarities(&generated_emb, &text_emb, n, d);
    let pick = |r: Vec<f64>| [r[0], r[1]];
    let report = EmojiRetrievalReport {
        samples: n,
        image_to_text: pick(recall_at(&image_text, n, &ks)),
        text_to_image: pick(recall_at(&transpose(&image_text, n), n, &ks)),
        generated_to_text: pick(recall_at(&generated_text, n, &ks)),
    };
    Ok((report, pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_compare_as_words() {
        assert_eq!(
            name_words("Thumbs up: medium-light skin tone"),
            ["thumbs", "up", "medium", "light", "skin", "tone"]
        );
        // The decoder's spacing of punctuation does not matter; words do.
        assert!(exact_name(
            "thumbs up : medium - light skin tone",
            "thumbs up: medium-light skin tone"
        ));
        assert!(!exact_name("thumbs up", "thumbs down"));
        assert!(!exact_name("", "waving hand"));
    }

    #[test]
    fn token_f1_counts_shared_words() {
        assert_eq!(token_f1("waving hand", "waving hand"), 1.0);
        assert_eq!(token_f1("red apple", "waving hand"), 0.0);
        // 4 of 5 predicted words are right, 4 of 5 true words found.
        let f = token_f1("thumbs up: light skin tone", "thumbs down: light skin tone");
        assert!((f - 0.8).abs() < 1e-12, "{f}");
        // Repeated words count once per occurrence: "face face" vs "face" → P 1/2, R 1.
        let f = token_f1("face face", "face");
        assert!((f - 2.0 / 3.0).abs() < 1e-12, "{f}");
        assert_eq!(token_f1("", ""), 1.0);
        assert_eq!(token_f1("", "face"), 0.0);
        let r = score_captions(&[
            ("waving hand".into(), "waving hand".into()),
            ("red apple".into(), "green apple".into()),
        ]);
        assert_eq!(r.samples, 2);
        assert_eq!(r.exact_name, 0.5);
        assert!((r.token_f1 - 0.75).abs() < 1e-12);
    }

    #[test]
    fn recall_ranks_partners_and_ties_count_against() {
        // Query 0 finds its partner first; query 1 ranks it third; query 2 second.
        let sim = [
            0.9, 0.1, 0.2, //
            0.8, 0.3, 0.5, //
            0.1, 0.9, 0.7,
        ];
        assert_eq!(recall_at(&sim, 3, &[1, 2, 3]), [1.0 / 3.0, 2.0 / 3.0, 1.0]);
        // Identical embeddings retrieve nothing at k = 1 rather than everything.
        assert_eq!(recall_at(&[0.5; 9], 3, &[1, 3]), [0.0, 1.0]);
        // A NaN candidate outranks the partner.
        let nan = [1.0, f32::NAN, 0.0, 1.0];
        assert_eq!(recall_at(&nan, 2, &[1]), [0.5]);
        assert_eq!(transpose(&sim, 3)[1], sim[3]);
        let s = similarities(&[1.0, 0.0, 0.0, 1.0], &[0.6, 0.8, 1.0, 0.0], 2, 2);
        assert_eq!(s, [0.6, 1.0, 0.8, 0.0]);
    }
}
