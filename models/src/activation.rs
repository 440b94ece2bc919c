//! GELU written out from tensor ops, for its gradient.
//!
//! Burn 0.21's `activation::gelu` computes the exact (erf) GELU forward but back-propagates the
//! derivative of the tanh approximation, which `burn-ndarray` evaluates with `f64` `tanh` and a
//! general `powf` for `x³`: on the 2-core CPU that backward pass was about an eighth of a
//! `small` caption training step (perf: `tanh`, `expm1`, `powf` in libm). Written as
//! `x · ½(1 + erf(x/√2))`, autodiff differentiates each op instead: the exact derivative
//! `Φ(x) + x·φ(x)`, from an `f32` `exp` (erf's backward) and a few products. The forward pass
//! is the same op sequence as Burn's, so its values — and the exported graph's — are unchanged
//! bit for bit.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// The exact GELU `x · Φ(x) = x · ½(1 + erf(x/√2))`, element-wise.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let cdf = x
        .clone()
        .div_scalar(std::f64::consts::SQRT_2)
        .erf()
        .add_scalar(1.0);
    (x * cdf).div_scalar(2.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::TensorData;

    type B = Autodiff<NdArray>;

    /// Same values as Burn's GELU (the same ops in the same order), and the gradient is the
    /// exact derivative Φ(x) + x·φ(x), checked against central differences of the forward.
    #[test]
    fn matches_burn_forward_and_has_the_exact_gradient() {
        let device = Default::default();
        let xs: Vec<f32> = (-40..=40).map(|i| i as f32 * 0.15).collect();
        let n = xs.len();
        let x = Tensor::<B, 1>::from_data(TensorData::new(xs.clone(), [n]), &device);
        let ours = gelu(x.clone().require_grad());
        let burns = burn::tensor::activation::gelu(x.clone());
        assert_eq!(
            ours.clone().into_data().to_vec::<f32>().unwrap(),
            burns.into_data().to_vec::<f32>().unwrap(),
            "forward must be bit-identical to Burn's"
        );

        let xg = x.require_grad();
        let grads = gelu(xg.clone()).sum().backward();
        let g = xg
            .grad(&grads)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let f = |v: f64| v * 0.5 * (1.0 + libm::erf(v / std::f64::consts::SQRT_2));
        for (i, &v) in xs.iter().enumerate() {
            let h = 1e-3;
            let want = (f(v as f64 + h) - f(v as f64 - h)) / (2.0 * h);
            assert!(
                (g[i] as f64 - want).abs() < 1e-4,
                "gelu'({v}) = {} but central difference gives {want}",
                g[i]
            );
        }
    }
}
