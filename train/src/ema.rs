//! Exponential moving average of a module's weights, kept on the host.
//!
//! Diffusion samplers are far more sensitive to the last optimizer steps' noise than a
//! classifier is: samples from the averaged weights are visibly cleaner than from the raw ones
//! (DDPM, DiT and EDM all sample from an EMA). Kept as plain [`NamedTensors`] rather than a
//! second Burn module so it costs one host copy per step and is written straight into the
//! checkpoint's safetensors file.

use burn::module::Module;
use burn::tensor::backend::Backend;
use duet_models::params::{named_tensors, NamedTensors};

#[derive(Debug, Clone)]
pub struct Ema {
    decay: f64,
    weights: NamedTensors,
}

impl Ema {
    /// Starts the average at `weights` (a fresh model's, or a checkpoint's on resume).
    pub fn new(decay: f64, weights: NamedTensors) -> Self {
        Self { decay, weights }
    }

    /// Decay used after `step` updates: ramps up as `(1 + step) / (10 + step)` so the average
    /// does not stay anchored to the random initialisation for the first thousand steps.
    pub fn decay_at(&self, step: usize) -> f64 {
        self.decay.min((1.0 + step as f64) / (10.0 + step as f64))
    }

    /// Folds the module's current weights in.
    pub fn update<B: Backend, M: Module<B>>(&mut self, module: &M, step: usize) {
        let d = self.decay_at(step) as f32;
        for (name, current) in named_tensors(module) {
            match self.weights.get_mut(&name) {
                Some(avg) if avg.shape == current.shape => {
                    for (a, c) in avg.data.iter_mut().zip(&current.data) {
                        *a = d * *a + (1.0 - d) * c;
                    }
                }
                // A parameter the average has not seen yet starts at its current value.
                _ => {
                    self.weights.insert(name, current);
                }
            }
        }
    }

    pub fn weights(&self) -> &NamedTensors {
        &self.weights
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::nn::{Linear, LinearConfig};
    use duet_models::params::load_named_tensors;

    type B = NdArray<f32>;

    #[test]
    fn average_moves_towards_the_weights_at_the_configured_rate() {
        let dev = Default::default();
        let a: Linear<B> = LinearConfig::new(2, 2).init(&dev);
        let mut ema = Ema::new(0.5, named_tensors(&a));
        // Move the module to all-ones weights and fold it in twice at decay 0.5.
        let mut ones = named_tensors(&a);
        for t in ones.values_mut() {
            t.data.iter_mut().for_each(|x| *x = 1.0);
        }
        let b = load_named_tensors(a.clone(), &ones).unwrap();
        let w0 = named_tensors(&a)["weight"].data.clone();
        ema.update(&b, 1000);
        ema.update(&b, 1001);
        for (avg, start) in ema.weights()["weight"].data.iter().zip(&w0) {
            // 0.25 · start + 0.75 · 1
            assert!(
                (avg - (0.25 * start + 0.75)).abs() < 1e-6,
                "{avg} vs {start}"
            );
        }
        assert!(ema.decay_at(0) < 0.11 && (ema.decay_at(1_000_000) - 0.5).abs() < 1e-12);
    }
}
