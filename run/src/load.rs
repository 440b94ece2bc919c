//! Loading a run's trained modules back into Burn (inference backend, no autodiff).

use std::path::Path;

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use duet_datasets::image_to_chw;
use duet_datasets::tokenizer::{encode_caption, load_tokenizer};
use duet_models::params::{load_named_tensors, NamedTensors};
use duet_models::tokens::PAD_ID;
use duet_models::{
    CaptionModel, FusionHead, MissingTokens, ModelSpec, Preset, Restorers, TextEncoder,
    VisionEncoder,
};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::checkpoint::{load_weights, read_json, WEIGHTS_FILE};
use crate::{
    CaptionTrainConfig, PairTrainConfig, Stage, CONFIG_FILE, HEAD, MISSING_TOKEN, TOKENIZER_FILE,
    VARIANTS,
};

/// The tensors of `weights` whose names start with one of `prefixes` followed by a dot.
pub fn with_prefixes(weights: &NamedTensors, prefixes: &[&str]) -> NamedTensors {
    weights
        .iter()
        .filter(|(k, _)| {
            prefixes
                .iter()
                .any(|p| k.strip_prefix(p).is_some_and(|rest| rest.starts_with('.')))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A trained captioner loaded from a run directory (inference backend, no autodiff).
pub struct LoadedRun<B: Backend> {
    pub config: CaptionTrainConfig,
    pub tokenizer: Tokenizer,
    pub model: CaptionModel<B>,
}

pub fn load_run<B: Backend>(run: &Path, device: &B::Device) -> anyhow::Result<LoadedRun<B>> {
    let config: CaptionTrainConfig = read_json(&run.join(CONFIG_FILE))?;
    let tokenizer = load_tokenizer(&run.join(TOKENIZER_FILE))?;
    let model = load_captioner(run, &config.model, device)?;
    Ok(LoadedRun {
        config,
        tokenizer,
        model,
    })
}

/// The captioner (`vision.*`, `decoder.*`) of any run that carries one, built for `model`.
pub fn load_captioner<B: Backend>(
    run: &Path,
    model: &ModelSpec,
    device: &B::Device,
) -> anyhow::Result<CaptionModel<B>> {
    // A later stage's run holds more than the captioner: take the captioner's part.
    let weights = with_prefixes(
        &load_weights(&run.join(WEIGHTS_FILE))?,
        &["vision", "decoder"],
    );
    load_named_tensors(CaptionModel::<B>::new(model, device), &weights)
        .map_err(|e| anyhow::anyhow!("{}: {e}", run.join(WEIGHTS_FILE).display()))
}

/// The frozen encoders of a run and what they need.
pub struct Backbones<B: Backend> {
    pub preset: Preset,
    pub model: ModelSpec,
    pub tokenizer: Tokenizer,
    pub vision: VisionEncoder<B>,
    pub text: TextEncoder<B>,
}

#[derive(Deserialize)]
struct RunHeader {
    stage: Stage,
    preset: Preset,
    model: ModelSpec,
}

/// Strips `prefix.` from the names of the tensors under `prefix`.
pub fn under(weights: &NamedTensors, prefix: &str) -> NamedTensors {
    with_prefixes(weights, &[prefix])
        .into_iter()
        .map(|(k, v)| (k[prefix.len() + 1..].to_string(), v))
        .collect()
}

/// Puts `prefix.` in front of every name.
pub fn prefixed(weights: NamedTensors, prefix: &str) -> NamedTensors {
    weights
        .into_iter()
        .map(|(k, v)| (format!("{prefix}.{k}"), v))
        .collect()
}

pub fn load_module<B: Backend, M: Module<B>>(
    module: M,
    weights: &NamedTensors,
    prefix: &str,
    run: &Path,
) -> anyhow::Result<M> {
    load_named_tensors(module, &under(weights, prefix))
        .map_err(|e| anyhow::anyhow!("{} ({prefix}.*): {e}", run.join(WEIGHTS_FILE).display()))
}

/// Loads the vision and text encoders of a generate, unify, fusion or restore run.
pub fn load_backbones<B: Backend>(run: &Path, device: &B::Device) -> anyhow::Result<Backbones<B>> {
    let header: RunHeader = read_json(&run.join(CONFIG_FILE))?;
    if !header.stage.has_generator() {
        anyhow::bail!(
            "{} is a '{}' run; restoration needs both encoders (a generate run or later)",
            run.display(),
            header.stage
        );
    }
    let weights = load_weights(&run.join(WEIGHTS_FILE))?;
    let vision = load_module(
        VisionEncoder::new(&header.model, device),
        &weights,
        "vision",
        run,
    )?;
    let text = load_module(
        TextEncoder::new(&header.model, device),
        &weights,
        "text",
        run,
    )?;
    Ok(Backbones {
        preset: header.preset,
        model: header.model,
        tokenizer: load_tokenizer(&run.join(TOKENIZER_FILE))?,
        vision,
        text,
    })
}

impl<B: Backend> Backbones<B> {
    /// Pooled image embeddings `[N, E]` of RGB images of the model's size.
    pub fn embed_images(
        &self,
        images: &[&image::RgbImage],
        device: &B::Device,
    ) -> anyhow::Result<Tensor<B, 2>> {
        let s = self.model.image_size;
        let mut pixels = Vec::with_capacity(images.len() * 3 * s * s);
        for img in images {
            if img.dimensions() != (s as u32, s as u32) {
                anyhow::bail!(
                    "image is {}x{}, the model expects {s}x{s}",
                    img.width(),
                    img.height()
                );
            }
            pixels.extend(image_to_chw(img));
        }
        let x = Tensor::from_data(TensorData::new(pixels, [images.len(), 3, s, s]), device);
        Ok(self.vision.forward(x).embedding)
    }

    /// Pooled text embeddings `[N, E]`, each text padded to `max_len` as the runtime does.
    pub fn embed_texts(&self, texts: &[&str], device: &B::Device) -> anyhow::Result<Tensor<B, 2>> {
        let l = self.model.max_len;
        let mut ids = Vec::with_capacity(texts.len() * l);
        let mut mask = Vec::with_capacity(texts.len() * l);
        for text in texts {
            let seq = encode_caption(&self.tokenizer, text, l)?;
            for k in 0..l {
                ids.push(seq.get(k).map_or(PAD_ID as i64, |&t| t as i64));
                mask.push(if k < seq.len() { 1.0f32 } else { 0.0 });
            }
        }
        let n = texts.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, l]), device);
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [n, l]), device);
        Ok(self.text.forward(ids, mask).embedding)
    }
}

/// The restore stage's trained modules (inference backend).
pub struct RestoreModels<B: Backend> {
    pub head: FusionHead<B>,
    pub tokens: MissingTokens<B>,
    /// In the order of [`VARIANTS`].
    pub restorers: Vec<Restorers<B>>,
}

/// A trained restore run loaded for evaluation.
pub struct LoadedRestore<B: Backend> {
    pub config: PairTrainConfig,
    pub backbones: Backbones<B>,
    pub models: RestoreModels<B>,
}

pub fn load_restore<B: Backend>(
    run: &Path,
    device: &B::Device,
) -> anyhow::Result<LoadedRestore<B>> {
    let config: PairTrainConfig = read_json(&run.join(CONFIG_FILE))?;
    if config.stage != Stage::Restore {
        anyhow::bail!(
            "{} is a '{}' run, not a restore run",
            run.display(),
            config.stage
        );
    }
    let backbones = load_backbones(run, device)?;
    let weights = load_weights(&run.join(WEIGHTS_FILE))?;
    let head = load_module(
        FusionHead::new(&config.restore, device),
        &weights,
        HEAD,
        run,
    )?;
    let tokens = load_module(
        MissingTokens::new(config.restore.embed_dim, device),
        &weights,
        MISSING_TOKEN,
        run,
    )?;
    let restorers = VARIANTS
        .iter()
        .map(|v| {
            load_module(
                Restorers::new(&config.restore, device),
                &weights,
                v.prefix,
                run,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(LoadedRestore {
        config,
        backbones,
        models: RestoreModels {
            head,
            tokens,
            restorers,
        },
    })
}
