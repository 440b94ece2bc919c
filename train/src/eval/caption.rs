//! `duet-train eval --stage caption`: greedy captions on held-out scenes, scored by parsing
//! them back into objects.

use std::path::Path;

use burn::tensor::backend::Backend;

use crate::metrics::{evaluate, CaptionMetrics};
use crate::stages::caption::{caption_samples, prepare};
use duet_datasets::shapeworld::load_dataset;
use duet_run::load_run;

/// Captions every sample of `data` with the run's model and scores the captions.
/// Returns the metrics and up to `examples` (truth, prediction) pairs for display.
pub fn eval_caption<B: Backend>(
    run: &Path,
    data: &Path,
    limit: Option<usize>,
    device: &B::Device,
) -> anyhow::Result<(CaptionMetrics, Vec<(String, String)>)> {
    let loaded = load_run::<B>(run, device)?;
    let mut samples = load_dataset(data)?;
    if let Some(n) = limit {
        samples.truncate(n);
    }
    if samples.is_empty() {
        anyhow::bail!("{}: no samples to evaluate", data.display());
    }
    let prepared = prepare(
        &samples,
        &loaded.tokenizer,
        loaded.config.model.image_size,
        loaded.config.model.max_len,
    )?;
    let predictions = caption_samples(&loaded, &prepared, device);
    let pairs: Vec<_> = samples
        .iter()
        .zip(&predictions)
        .map(|(s, p)| (s.objects.clone(), p.clone()))
        .collect();
    let examples = samples
        .iter()
        .zip(&predictions)
        .take(5)
        .map(|(s, p)| (s.caption.clone(), p.clone()))
        .collect();
    Ok((evaluate(&pairs), examples))
}

/// Settings of `duet-train eval --stage generate`.
#[derive(Debug, Clone)]
pub struct GenerateEvalOptions {
    /// Prompts per GenEval category.
    pub per_category: usize,
    /// Seed of the prompt set.
    pub prompt_seed: u64,
    /// Seed of the sampling noise.
    pub seed: u64,
    pub sampler: duet_diffusion::SamplerConfig,
    pub guidance: f32,
    /// Score the generator's seeded initial weights instead of the trained ones.
    pub untrained: bool,
    /// Prompts per sampling batch (memory bound).
    pub batch: usize,
}

/// Generates an image for every prompt of a seeded GenEval-style prompt set and scores the
/// images with the exact ShapeWorld detector. Returns the report and the generated images in
/// prompt order (for a PNG grid).
pub fn eval_generate<B: Backend>(
    run: &Path,
    opts: &GenerateEvalOptions,
    device: &B::Device,
) -> anyhow::Result<(crate::eval::geneval::GenEvalReport, Vec<image::RgbImage>)> {
    use crate::eval::geneval::{prompt_set, Detector, GenEvalReport};
    let loaded = duet_run::load_generator::<B>(run, opts.untrained, device)?;
    let prompts = prompt_set(opts.per_category, opts.prompt_seed);
    let detector = Detector::new(loaded.config.model.image_size as u32);
    let mut report = GenEvalReport::default();
    let mut images = Vec::with_capacity(prompts.len());
    let pb = indicatif::ProgressBar::new(prompts.len() as u64);
    for (k, chunk) in prompts.chunks(opts.batch.max(1)).enumerate() {
        let texts: Vec<String> = chunk.iter().map(|p| p.text.clone()).collect();
        // One noise seed per batch, derived from the run seed: the same prompts get the same
        // noise whatever else is evaluated.
        let x = loaded.generate(
            &texts,
            &opts.sampler,
            opts.guidance,
            opts.seed.wrapping_add(k as u64),
            device,
        )?;
        for (p, img) in chunk.iter().zip(duet_diffusion::to_images(&x)?) {
            report.add(p, &detector.detect(&img));
            report.add_colour_pixels(p, &img);
            images.push(img);
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok((report, images))
}

/// Reconstruction similarity of a run's auto-encoder: mean over the samples of the cosine
/// between the frozen vision encoder's embeddings of an image and of its rebuild from the
/// run's own greedy caption, and their pixel MSE.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ReconstructionReport {
    pub samples: usize,
    pub cosine: f64,
    pub pixel_mse: f64,
}

impl std::fmt::Display for ReconstructionReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "reconstruction over {} images: embedding cosine {:.4}, pixel MSE {:.4}",
            self.samples, self.cosine, self.pixel_mse
        )
    }
}

/// `duet-train eval --stage reconstruct`: caption every sample with the run's captioner, rebuild
/// it with the run's generator (one seeded start noise per image) and compare. The vision
/// encoder that measures is the run's own, which every stage after captioning keeps frozen,
/// so runs that share a captioner lineage are measured with the same ruler. Returns the
/// report and `(original, rebuilt)` image pairs for a picture.
pub fn eval_reconstruction<B: Backend>(
    run: &Path,
    data: &Path,
    limit: Option<usize>,
    settings: &crate::stages::unify::ReconstructionSettings,
    seed: u64,
    device: &B::Device,
) -> anyhow::Result<(
    ReconstructionReport,
    Vec<(image::RgbImage, image::RgbImage)>,
)> {
    let captioner = load_run::<B>(run, device)?;
    let generator = duet_run::load_generator::<B>(run, false, device)?;
    let mut samples = load_dataset(data)?;
    if let Some(n) = limit {
        samples.truncate(n);
    }
    if samples.is_empty() {
        anyhow::bail!("{}: no samples to evaluate", data.display());
    }
    let cfg = &captioner.config.model;
    let prepared = prepare(&samples, &captioner.tokenizer, cfg.image_size, cfg.max_len)?;
    let (mut cos, mut mse) = (0.0f64, 0.0f64);
    let mut pairs = Vec::new();
    let idx: Vec<usize> = (0..prepared.n).collect();
    let pb = indicatif::ProgressBar::new(prepared.n as u64);
    for (k, chunk) in idx.chunks(64).enumerate() {
        let pixels = prepared.pixels_batch::<B>(chunk, device);
        let seqs = crate::stages::unify::greedy_tokens(
            &captioner.model,
            &prepared,
            chunk,
            cfg.max_len,
            device,
        );
        let rebuilt = crate::stages::unify::reconstruct(
            &generator,
            &seqs,
            1,
            settings,
            seed.wrapping_add(k as u64),
            0,
            chunk.len(),
            device,
        )?;
        for (c, m) in
            crate::stages::unify::similarity(&captioner.model.vision, pixels, &rebuilt, 1, device)
        {
            cos += f64::from(c);
            mse += f64::from(m);
        }
        if pairs.len() < 16 {
            for (&i, img) in chunk.iter().zip(duet_diffusion::to_images(&rebuilt)?) {
                if pairs.len() < 16 {
                    pairs.push((samples[i].image.clone(), img));
                }
            }
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let n = prepared.n as f64;
    Ok((
        ReconstructionReport {
            samples: prepared.n,
            cosine: cos / n,
            pixel_mse: mse / n,
        },
        pairs,
    ))
}
