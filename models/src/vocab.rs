//! Growing a trained model's vocabulary: the parameters whose size follows the tokenizer's
//! (token embeddings, the caption decoder's output layer) and how new entries are filled, so a
//! fine-tune can learn words its starting model never saw instead of reading them as `[UNK]`.

use std::collections::BTreeMap;

use burn_ndarray::NdArray;

use crate::params::{param_shapes, NamedTensors};
use crate::{CaptionModel, GenerationModel, ModelSpec};

type Shapes = NdArray<f32>;

/// Every captioner and generator parameter with a vocabulary axis (checkpoint name → axis),
/// found by building both models at `spec.vocab_size` and at one more entry and comparing the
/// shapes: the model definitions stay the one source of which tables follow the vocabulary.
pub fn vocab_axes(spec: &ModelSpec) -> BTreeMap<String, usize> {
    let shapes = |vocab_size: usize| {
        let spec = ModelSpec {
            vocab_size,
            ..spec.clone()
        };
        let device = Default::default();
        let mut all = param_shapes(&CaptionModel::<Shapes>::new(&spec, &device));
        all.extend(param_shapes(&GenerationModel::<Shapes>::new(
            &spec, &device,
        )));
        all
    };
    let (now, more) = (shapes(spec.vocab_size), shapes(spec.vocab_size + 1));
    now.iter()
        .filter_map(|(name, a)| {
            let b = &more[name];
            a.iter()
                .zip(b)
                .position(|(x, y)| x != y)
                .map(|axis| (name.clone(), axis))
        })
        .collect()
}

/// Why a vocabulary could not be grown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrowError {
    #[error("{name}: axis {axis} of shape {shape:?} is not the vocabulary of {vocab_size}")]
    Shape {
        name: String,
        shape: Vec<usize>,
        axis: usize,
        vocab_size: usize,
    },
    #[error("the vocabulary can only grow: {from} → {to}")]
    Shrink { from: usize, to: usize },
}

/// Grows the vocabulary axis of each tensor of `weights` named in `axes` from `from` to `to`
/// entries; tensors `weights` does not hold (a caption run has no text encoder) are skipped.
/// Each new entry is the mean of the existing entries along the axis plus `noise()` times
/// their standard deviation around that mean: a new word starts as an average word — its
/// logit near the others', so the trained outputs barely move (Hewitt, "Initializing New Word
/// Embeddings for Pretrained Language Models", 2021) — and the noise tells new words apart.
/// Returns the names grown.
pub fn grow_vocab(
    weights: &mut NamedTensors,
    axes: &BTreeMap<String, usize>,
    from: usize,
    to: usize,
    mut noise: impl FnMut() -> f32,
) -> Result<Vec<String>, GrowError> {
    if to < from {
        return Err(GrowError::Shrink { from, to });
    }
    let mut grown = Vec::new();
    for (name, &axis) in axes {
        let Some(t) = weights.get_mut(name) else {
            continue;
        };
        if t.shape.get(axis) != Some(&from) {
            return Err(GrowError::Shape {
                name: name.clone(),
                shape: t.shape.clone(),
                axis,
                vocab_size: from,
            });
        }
        // Row-major: entry k of the axis at (outer o, inner i) is at (o·from + k)·inner + i.
        let outer: usize = t.shape[..axis].iter().product();
        let inner: usize = t.shape[axis + 1..].iter().product();
        let mut data = Vec::with_capacity(outer * to * inner);
        for o in 0..outer {
            let block = &t.data[o * from * inner..(o + 1) * from * inner];
            data.extend_from_slice(block);
            let mut mean = vec![0f64; inner];
            for k in 0..from {
                for (m, &x) in mean.iter_mut().zip(&block[k * inner..(k + 1) * inner]) {
                    *m += f64::from(x);
                }
            }
            mean.iter_mut().for_each(|m| *m /= from as f64);
            let mut var = vec![0f64; inner];
            for k in 0..from {
                for ((v, &x), m) in var
                    .iter_mut()
                    .zip(&block[k * inner..(k + 1) * inner])
                    .zip(&mean)
                {
                    *v += (f64::from(x) - m).powi(2);
                }
            }
            for _ in from..to {
                for (m, v) in mean.iter().zip(&var) {
                    let std = (v / from as f64).sqrt();
                    data.push((m + std * f64::from(noise())) as f32);
                }
            }
        }
        t.shape[axis] = to;
        t.data = data;
        grown.push(name.clone());
    }
    Ok(grown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::NamedTensor;
    use crate::Preset;

    #[test]
    fn the_vocabulary_axes_are_the_embeddings_and_the_output_layer() {
        let spec = ModelSpec::preset(Preset::Tiny, 40, 32);
        let axes = vocab_axes(&spec);
        let want: BTreeMap<String, usize> = [
            ("decoder.tok_embed.weight", 0),
            ("decoder.lm_head.weight", 1),
            ("decoder.lm_head.bias", 0),
            ("text.tok_embed.weight", 0),
        ]
        .into_iter()
        .map(|(n, a)| (n.to_string(), a))
        .collect();
        assert_eq!(axes, want);
    }

    #[test]
    fn growing_keeps_every_old_entry_and_adds_the_mean_plus_scaled_noise() {
        // [2, 3] along axis 1 (as the output layer's weight): rows (1, 2, 3) and (0, 0, 6).
        let mut weights = NamedTensors::new();
        weights.insert(
            "w".into(),
            NamedTensor {
                shape: vec![2, 3],
                data: vec![1.0, 2.0, 3.0, 0.0, 0.0, 6.0],
            },
        );
        let axes: BTreeMap<String, usize> = [("w".to_string(), 1), ("absent".into(), 0)].into();
        let grown = grow_vocab(&mut weights, &axes, 3, 5, || 1.0).unwrap();
        assert_eq!(grown, vec!["w".to_string()]);
        let w = &weights["w"];
        assert_eq!(w.shape, vec![2, 5]);
        // Row 0: mean 2, std sqrt(2/3); row 1: mean 2, std sqrt(8).
        let (s0, s1) = ((2.0f32 / 3.0).sqrt(), 8.0f32.sqrt());
        let want = [
            1.0,
            2.0,
            3.0,
            2.0 + s0,
            2.0 + s0,
            0.0,
            0.0,
            6.0,
            2.0 + s1,
            2.0 + s1,
        ];
        for (got, want) in w.data.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{:?}", w.data);
        }
        // A tensor whose axis is not the vocabulary is refused, as is shrinking.
        assert!(matches!(
            grow_vocab(&mut weights, &axes, 3, 6, || 0.0),
            Err(GrowError::Shape { .. })
        ));
        assert!(matches!(
            grow_vocab(&mut weights, &axes, 5, 4, || 0.0),
            Err(GrowError::Shrink { .. })
        ));
    }
}
