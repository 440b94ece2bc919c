//! The frozen backbones of a generate run (vision and text encoders) and the pooled pair
//! features computed once from them, which the fusion and restore stages train on.

use crate::checkpoint::{load_weights, read_json, WEIGHTS_FILE};
use crate::data::pair_tasks::PairExample;
use crate::data::tokenizer::{encode_caption, load_tokenizer};
use crate::stage::Stage;
use crate::stages::caption::{image_to_chw, with_prefixes, CONFIG_FILE, TOKENIZER_FILE};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use duet_models::params::{load_named_tensors, NamedTensors};
use duet_models::tokens::PAD_ID;
use duet_models::{ModelSpec, Preset, TextEncoder, VisionEncoder};
use serde::Deserialize;
use std::path::Path;
use tokenizers::Tokenizer;

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

pub(super) fn load_module<B: Backend, M: Module<B>>(
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

/// Embeddings and labels of a set of examples, as plain rows.
#[derive(Debug, Clone)]
pub struct PairFeatures {
    pub n: usize,
    pub dim: usize,
    /// `[n, dim]` row-major.
    pub image: Vec<f32>,
    pub text: Vec<f32>,
    pub labels: Vec<usize>,
}

/// A tensor's values as plain `f32`s.
pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> anyhow::Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("reading a tensor: {e:?}"))
}

/// Embeds every example with the frozen encoders, in batches.
pub fn extract_features<B: Backend>(
    bb: &Backbones<B>,
    examples: &[PairExample],
    device: &B::Device,
) -> anyhow::Result<PairFeatures> {
    let dim = bb.model.embed_dim;
    let mut image = Vec::with_capacity(examples.len() * dim);
    let mut text = Vec::with_capacity(examples.len() * dim);
    for chunk in examples.chunks(256) {
        let imgs: Vec<&image::RgbImage> = chunk.iter().map(|e| &e.image).collect();
        image.extend(to_vec(bb.embed_images(&imgs, device)?)?);
        let txts: Vec<&str> = chunk.iter().map(|e| e.text.as_str()).collect();
        text.extend(to_vec(bb.embed_texts(&txts, device)?)?);
    }
    Ok(PairFeatures {
        n: examples.len(),
        dim,
        image,
        text,
        labels: examples.iter().map(|e| e.label).collect(),
    })
}

fn rows<B: Backend>(data: &[f32], dim: usize, idx: &[usize], device: &B::Device) -> Tensor<B, 2> {
    let mut out = Vec::with_capacity(idx.len() * dim);
    for &i in idx {
        out.extend_from_slice(&data[i * dim..(i + 1) * dim]);
    }
    Tensor::from_data(TensorData::new(out, [idx.len(), dim]), device)
}

impl PairFeatures {
    pub fn image_rows<B: Backend>(&self, idx: &[usize], device: &B::Device) -> Tensor<B, 2> {
        rows(&self.image, self.dim, idx, device)
    }
    pub fn text_rows<B: Backend>(&self, idx: &[usize], device: &B::Device) -> Tensor<B, 2> {
        rows(&self.text, self.dim, idx, device)
    }
    pub fn label_rows<B: Backend>(&self, idx: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
        let l: Vec<i64> = idx.iter().map(|&i| self.labels[i] as i64).collect();
        Tensor::from_data(TensorData::new(l, [idx.len()]), device)
    }
    /// Column means (the mean-fill vector) and standard deviations of `data` `[n, dim]`; the
    /// deviations are floored at 1e-4 so a constant dimension cannot divide by zero.
    pub fn mean_std(data: &[f32], dim: usize) -> (Vec<f32>, Vec<f32>) {
        let n = (data.len() / dim).max(1) as f64;
        let mut m = vec![0.0f64; dim];
        let mut sq = vec![0.0f64; dim];
        for row in data.chunks_exact(dim) {
            for ((a, q), &v) in m.iter_mut().zip(sq.iter_mut()).zip(row) {
                *a += f64::from(v);
                *q += f64::from(v) * f64::from(v);
            }
        }
        let mean: Vec<f64> = m.iter().map(|v| v / n).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(q, mu)| ((q / n - mu * mu).max(0.0).sqrt().max(1e-4)) as f32)
            .collect();
        (mean.into_iter().map(|v| v as f32).collect(), std)
    }
}
