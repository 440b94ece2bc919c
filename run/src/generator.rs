//! Loading a trained generate run (or its seeded untrained generator) for evaluation and
//! export, and sampling images from it.

use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use duet_datasets::tokenizer::{encode_caption, load_tokenizer};
use duet_diffusion::{gaussian, guide, sample, NoiseSchedule, SamplerConfig};
use duet_models::init::seeded;
use duet_models::params::{load_named_tensors, NamedTensors};
use duet_models::tokens::{BOS_ID, EOS_ID, PAD_ID};
use duet_models::{GenerationModel, ModelSpec};
use ndarray::ArrayD;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use crate::checkpoint::{load_weights, read_json, WEIGHTS_FILE};
use crate::{with_prefixes, GenerateTrainConfig, Stage, CONFIG_FILE, TOKENIZER_FILE};

/// A trained generate run loaded for inference.
pub struct LoadedGenerator<B: Backend> {
    pub config: GenerateTrainConfig,
    pub tokenizer: Tokenizer,
    pub generator: GenerationModel<B>,
    pub schedule: NoiseSchedule,
}

/// Loads a generate run. With `untrained`, the generator keeps its seeded initial weights (the
/// baseline that evaluation compares against).
pub fn load_generator<B: Backend>(
    run: &Path,
    untrained: bool,
    device: &B::Device,
) -> anyhow::Result<LoadedGenerator<B>> {
    let stage = crate::run_stage(run)?;
    // A unify run carries a (fine-tuned) generator in the same layout, a dream run its
    // init's unchanged.
    if !matches!(stage, Stage::Generate | Stage::Unify | Stage::Dream) {
        anyhow::bail!(
            "{} is a '{stage}' run, not a generate or unify run",
            run.display()
        );
    }
    let config: GenerateTrainConfig = read_json(&run.join(CONFIG_FILE))?;
    let tokenizer = load_tokenizer(&run.join(TOKENIZER_FILE))?;
    let generator = if untrained {
        seeded(device, config.seed, || {
            GenerationModel::<B>::new(&config.model, device)
        })
    } else {
        load_generator_weights(run, &config.model, device)?
    };
    let schedule = NoiseSchedule::cosine(config.diffusion.train_timesteps)?;
    Ok(LoadedGenerator {
        config,
        tokenizer,
        generator,
        schedule,
    })
}

/// The generator (`text.*`, `denoiser.*`) of any run that carries one, built for `model`.
pub fn load_generator_weights<B: Backend>(
    run: &Path,
    model: &ModelSpec,
    device: &B::Device,
) -> anyhow::Result<GenerationModel<B>> {
    let weights: NamedTensors = with_prefixes(
        &load_weights(&run.join(WEIGHTS_FILE))?,
        &["text", "denoiser"],
    );
    load_named_tensors(GenerationModel::<B>::new(model, device), &weights)
        .map_err(|e| anyhow::anyhow!("{}: {e}", run.join(WEIGHTS_FILE).display()))
}

/// A tensor's values as an `ndarray` of its shape (what the shared samplers step).
pub(crate) fn to_ndarray<B: Backend>(t: Tensor<B, 4>) -> anyhow::Result<ArrayD<f32>> {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("reading a tensor: {e:?}"))?;
    Ok(ArrayD::from_shape_vec(shape, data)?)
}

impl<B: Backend> LoadedGenerator<B> {
    /// The same generator on `device` (a data-parallel peer's own).
    pub fn to_device(&self, device: &B::Device) -> Self {
        Self {
            config: self.config.clone(),
            tokenizer: self.tokenizer.clone(),
            generator: self.generator.clone().to_device(device),
            schedule: self.schedule.clone(),
        }
    }

    /// Generates one image per prompt with classifier-free guidance, sampling in the shared
    /// `duet-diffusion` samplers (the runtime uses the same code behind ort/tract). Returns
    /// `[N, 3, S, S]` in `[-1, 1]`.
    pub fn generate(
        &self,
        prompts: &[String],
        sampler: &SamplerConfig,
        guidance: f32,
        seed: u64,
        device: &B::Device,
    ) -> anyhow::Result<ArrayD<f32>> {
        let l = self.config.model.max_len;
        let seqs = prompts
            .iter()
            .map(|p| encode_caption(&self.tokenizer, p, l))
            .collect::<Result<Vec<_>, _>>()?;
        let s = self.config.model.image_size;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x = gaussian(&[prompts.len(), 3, s, s], &mut rng);
        self.generate_tokens(&seqs, x, sampler, guidance, &mut rng, device)
    }

    /// [`Self::generate`] from token sequences (`[BOS] … [EOS]`, cut at `max_len`) and a given
    /// start noise `x` `[N, 3, S, S]`: the unify stage rebuilds a group of sampled captions of
    /// one image from the same noise, so their rewards differ only by what the captions say.
    pub fn generate_tokens<R: Rng + ?Sized>(
        &self,
        seqs: &[Vec<u32>],
        x: ArrayD<f32>,
        sampler: &SamplerConfig,
        guidance: f32,
        rng: &mut R,
        device: &B::Device,
    ) -> anyhow::Result<ArrayD<f32>> {
        let cfg = &self.config.model;
        let n = seqs.len();
        let s = cfg.image_size;
        if x.shape() != [n, 3, s, s] {
            anyhow::bail!(
                "start noise is {:?}, expected [{n}, 3, {s}, {s}]",
                x.shape()
            );
        }
        // Padded to `max_len` like the exported graphs' callers, so Burn and the runtime see
        // the same inputs.
        let l = cfg.max_len;
        // Rows 0..n: the captions; rows n..2n: the empty caption (unconditional branch).
        let mut ids = Vec::with_capacity(2 * n * l);
        let mut mask = Vec::with_capacity(2 * n * l);
        for seq in seqs {
            for k in 0..l {
                ids.push(seq.get(k).map_or(PAD_ID as i64, |&t| t as i64));
                mask.push(if k < seq.len() { 1.0f32 } else { 0.0 });
            }
        }
        let (empty_ids, empty_mask) = empty_caption(l);
        for _ in 0..n {
            ids.extend_from_slice(&empty_ids);
            mask.extend_from_slice(&empty_mask);
        }
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [2 * n, l]), device);
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [2 * n, l]), device);
        let text = self.generator.text.forward(ids, mask.clone()).tokens;
        let denoise = |x: &ArrayD<f32>, t: usize| -> anyhow::Result<ArrayD<f32>> {
            let flat: Vec<f32> = x.iter().copied().collect();
            let xb = Tensor::<B, 4>::from_data(TensorData::new(flat, [n, 3, s, s]), device);
            let xb = Tensor::cat(vec![xb.clone(), xb], 0);
            let tb =
                Tensor::<B, 1>::from_data(TensorData::new(vec![t as f32; 2 * n], [2 * n]), device);
            let out = self
                .generator
                .denoiser
                .forward(cfg, xb, tb, text.clone(), mask.clone());
            let cond = to_ndarray(out.clone().slice([0..n, 0..3, 0..s, 0..s]))?;
            let uncond = to_ndarray(out.slice([n..2 * n, 0..3, 0..s, 0..s]))?;
            Ok(guide(&uncond, &cond, guidance))
        };
        sample(
            &self.schedule,
            self.config.diffusion.prediction,
            sampler,
            x,
            rng,
            denoise,
        )
    }
}

/// Token ids and 1/0 mask rows `[n, L]` of the empty caption (`[BOS] [EOS] [PAD]…`).
pub fn empty_caption(seq_len: usize) -> (Vec<i64>, Vec<f32>) {
    let mut ids = vec![PAD_ID as i64; seq_len];
    let mut mask = vec![0.0; seq_len];
    ids[0] = BOS_ID as i64;
    ids[1] = EOS_ID as i64;
    mask[0] = 1.0;
    mask[1] = 1.0;
    (ids, mask)
}
