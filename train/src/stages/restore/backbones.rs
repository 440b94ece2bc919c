//! The frozen backbones of a generate run (vision and text encoders) and the pooled pair
//! features computed once from them, which the fusion and restore stages train on.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use duet_datasets::pair_tasks::PairExample;
use duet_run::Backbones;

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
