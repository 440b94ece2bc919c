//! Loading a trained dream run for evaluation and export, and drawing with its dream queries:
//! text to image (the blank image and a caption) and instruction editing (an image and an
//! instruction).

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use duet_datasets::image_to_chw;
use duet_datasets::tokenizer::{encode_caption, load_tokenizer};
use duet_diffusion::{gaussian, guide, sample, NoiseSchedule, SamplerConfig};
use duet_models::dream::dream_mask;
use duet_models::init::seeded;
use duet_models::params::load_named_tensors;
use duet_models::tokens::{BOS_ID, EOS_ID, PAD_ID};
use duet_models::{CaptionDecoder, DreamModel, DreamQueries, GenerationModel, VisionEncoder};
use image::RgbImage;
use ndarray::ArrayD;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use crate::checkpoint::{load_weights, read_json, WEIGHTS_FILE};
use crate::generator::to_ndarray;
use crate::{load_generator_weights, under, DreamTrainConfig, Stage, CONFIG_FILE, TOKENIZER_FILE};

/// A dream run loaded for inference.
pub struct LoadedDream<B: Backend> {
    pub config: DreamTrainConfig,
    pub tokenizer: Tokenizer,
    pub vision: VisionEncoder<B>,
    pub dream: DreamModel<B>,
    /// The frozen text encoder (the unconditional branch: the empty caption) and denoiser.
    pub generator: GenerationModel<B>,
    pub schedule: NoiseSchedule,
}

/// Loads a dream run. With `untrained`, the queries and their projection keep their seeded
/// initial weights (the decoder stays the trained one): the baseline of "do the trained
/// queries steer the denoiser".
pub fn load_dream<B: Backend>(
    run: &Path,
    untrained: bool,
    device: &B::Device,
) -> anyhow::Result<LoadedDream<B>> {
    let stage = crate::run_stage(run)?;
    if stage != Stage::Dream {
        anyhow::bail!("{} is a '{stage}' run, not a dream run", run.display());
    }
    let config: DreamTrainConfig = read_json(&run.join(CONFIG_FILE))?;
    let model = &config.run.model;
    let tokenizer = load_tokenizer(&run.join(TOKENIZER_FILE))?;
    let weights = load_weights(&run.join(WEIGHTS_FILE))?;
    let named = |e: duet_models::params::LoadError| {
        anyhow::anyhow!("{}: {e}", run.join(WEIGHTS_FILE).display())
    };
    let vision = load_named_tensors(
        VisionEncoder::<B>::new(model, device),
        &under(&weights, "vision"),
    )
    .map_err(named)?;
    let decoder = load_named_tensors(
        CaptionDecoder::<B>::new(model, device),
        &under(&weights, "decoder"),
    )
    .map_err(named)?;
    let queries = if untrained {
        seeded(device, config.run.seed, || {
            DreamQueries::<B>::new(model, device)
        })
    } else {
        load_named_tensors(
            DreamQueries::<B>::new(model, device),
            &under(&weights, "dream"),
        )
        .map_err(named)?
    };
    let generator = load_generator_weights::<B>(run, model, device)?;
    let schedule = NoiseSchedule::cosine(config.run.diffusion.train_timesteps)?;
    Ok(LoadedDream {
        config,
        tokenizer,
        vision,
        dream: DreamModel {
            decoder,
            dream: queries,
        },
        generator,
        schedule,
    })
}

impl<B: Backend> LoadedDream<B> {
    /// The denoiser's conditioning `[N, P + K, D]` and its key mask `[N, P + K]` for
    /// `prompts`, each read over its source image (`None`: the blank image).
    pub fn condition(
        &self,
        prompts: &[String],
        sources: &[Option<&RgbImage>],
        device: &B::Device,
    ) -> anyhow::Result<(Tensor<B, 3>, Tensor<B, 2>)> {
        let cfg = &self.config.run.model;
        let n = prompts.len();
        if sources.len() != n {
            anyhow::bail!("{} prompts but {} source images", n, sources.len());
        }
        let s = cfg.image_size;
        let blank = RgbImage::new(s as u32, s as u32);
        let mut pixels = Vec::with_capacity(n * 3 * s * s);
        for src in sources {
            let img = src.unwrap_or(&blank);
            if img.dimensions() != (s as u32, s as u32) {
                anyhow::bail!(
                    "a source image is {}x{}, the model reads {s}x{s}",
                    img.width(),
                    img.height()
                );
            }
            pixels.extend(image_to_chw(img));
        }
        let mut seqs = Vec::with_capacity(n);
        for p in prompts {
            let mut ids = encode_caption(&self.tokenizer, p, cfg.max_len)?;
            ids.pop();
            seqs.push(ids);
        }
        let p = seqs.iter().map(Vec::len).max().unwrap_or(1);
        let mut ids = Vec::with_capacity(n * p);
        let mut mask = Vec::with_capacity(n * p);
        for seq in &seqs {
            for k in 0..p {
                ids.push(seq.get(k).map_or(PAD_ID as i64, |&t| i64::from(t)));
                mask.push(if k < seq.len() { 1.0f32 } else { 0.0 });
            }
        }
        let image_tokens = self
            .vision
            .forward(Tensor::from_data(
                TensorData::new(pixels, [n, 3, s, s]),
                device,
            ))
            .patch_tokens;
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [n, p]), device);
        let tokens = self.dream.condition(
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, p]), device),
            mask.clone(),
            image_tokens,
        );
        Ok((tokens, dream_mask(mask, cfg.dream_queries)))
    }

    /// Draws one image per prompt (over its source image, `None`: blank) with classifier-free
    /// guidance against the text encoder's empty caption, in the shared samplers. Returns
    /// `[N, 3, S, S]` in `[-1, 1]`.
    pub fn generate(
        &self,
        prompts: &[String],
        sources: &[Option<&RgbImage>],
        sampler: &SamplerConfig,
        guidance: f32,
        seed: u64,
        device: &B::Device,
    ) -> anyhow::Result<ArrayD<f32>> {
        let cfg = &self.config.run.model;
        let n = prompts.len();
        let s = cfg.image_size;
        let (cond, cond_mask) = self.condition(prompts, sources, device)?;
        let l = cond.dims()[1];
        // The unconditional rows: the empty caption's two tokens, padded with masked rows to
        // the conditioning's width (padding is never attended to, so this equals the text
        // path's unconditional call).
        let empty = Tensor::<B, 2, Int>::from_data(
            TensorData::new(vec![BOS_ID as i64, EOS_ID as i64], [1, 2]),
            device,
        );
        let uncond = self
            .generator
            .text
            .forward(empty, Tensor::ones([1, 2], device))
            .tokens;
        let d = cfg.d_model;
        let width = l.max(2);
        let pad = |t: Tensor<B, 3>, m: Tensor<B, 2>| {
            let len = t.dims()[1];
            if len < width {
                (
                    Tensor::cat(vec![t, Tensor::zeros([n, width - len, d], device)], 1),
                    Tensor::cat(vec![m, Tensor::zeros([n, width - len], device)], 1),
                )
            } else {
                (t, m)
            }
        };
        let (c, cm) = pad(cond, cond_mask);
        let (u, um) = pad(uncond.expand([n, 2, d]), Tensor::ones([n, 2], device));
        let memory = Tensor::cat(vec![c, u], 0);
        let mask = Tensor::cat(vec![cm, um], 0);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x = gaussian(&[n, 3, s, s], &mut rng);
        let denoise = |x: &ArrayD<f32>, t: usize| -> anyhow::Result<ArrayD<f32>> {
            let flat: Vec<f32> = x.iter().copied().collect();
            let xb = Tensor::<B, 4>::from_data(TensorData::new(flat, [n, 3, s, s]), device);
            let xb = Tensor::cat(vec![xb.clone(), xb], 0);
            let tb =
                Tensor::<B, 1>::from_data(TensorData::new(vec![t as f32; 2 * n], [2 * n]), device);
            let out = self
                .generator
                .denoiser
                .forward(cfg, xb, tb, memory.clone(), mask.clone());
            let cond = to_ndarray(out.clone().slice([0..n, 0..3, 0..s, 0..s]))?;
            let uncond = to_ndarray(out.slice([n..2 * n, 0..3, 0..s, 0..s]))?;
            Ok(guide(&uncond, &cond, guidance))
        };
        sample(
            &self.schedule,
            self.config.run.diffusion.prediction,
            sampler,
            x,
            &mut rng,
            denoise,
        )
    }
}
