//! The two convolutions of the model family, evaluated as matrix products.
//!
//! Both are stored as Burn `Conv2d` modules (their parameter names and shapes are the
//! checkpoint and export contract), but `burn-ndarray` runs a convolution and its backward as
//! direct loops, far slower than its `sgemm`: on the 2-core CPU the denoiser's 3×3 output
//! convolution alone was about a fifth of a `small` generate training step. Rewritten as a
//! reshape (patchify) or nine shifted copies (im2col) followed by one matmul, the same sums
//! run in `sgemm` and autodiff differentiates the reshapes and slices. The results equal
//! `Conv2d::forward` up to float summation order (tests below).

use burn::nn::conv::Conv2d;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// A patch embedding: `conv` has a square kernel `p` = its stride and no padding. `x`:
/// `[B, C, S, S]` → `[B, (S/p)², D]`, tokens in row-major patch order (what `conv.forward(x)`
/// flattened gives).
pub fn patchify<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 3> {
    let p = conv.kernel_size[0];
    let [b, c, s, _] = x.dims();
    let g = s / p;
    let w = conv.weight.val();
    let d = w.dims()[0];
    // [B, C, g, p, g, p] → [B, g, g, C, p, p]: each patch's pixels in the weight's (c, y, x) order.
    let cols = x
        .reshape([b, c, g, p, g, p])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([b, g * g, c * p * p]);
    let w = w.reshape([d, c * p * p]).transpose().unsqueeze_dim::<3>(0);
    let out = cols.matmul(w);
    match &conv.bias {
        Some(bias) => out + bias.val().reshape([1, 1, d]),
        None => out,
    }
}

/// A 3×3 convolution with padding 1 and stride 1. `x`: `[B, H, S, S]` → `[B, O, S, S]`.
pub fn conv3x3_same<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, s, _] = x.dims();
    let w = conv.weight.val();
    let o = w.dims()[0];
    let padded = x.pad((1, 1, 1, 1), 0.0);
    // im2col: the nine shifted views, stacked so that channel index = h·9 + ky·3 + kx (the
    // weight's [O, H, 3, 3] order).
    let shifts: Vec<Tensor<B, 5>> = (0..3)
        .flat_map(|ky| (0..3).map(move |kx| (ky, kx)))
        .map(|(ky, kx)| {
            padded
                .clone()
                .slice([0..b, 0..h, ky..ky + s, kx..kx + s])
                .unsqueeze_dim::<5>(2)
        })
        .collect();
    let cols = Tensor::cat(shifts, 2).reshape([b, h * 9, s * s]);
    let w = w.reshape([o, h * 9]).unsqueeze_dim::<3>(0);
    let out = w.matmul(cols).reshape([b, o, s, s]);
    match &conv.bias {
        Some(bias) => out + bias.val().reshape([1, o, 1, 1]),
        None => out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::PaddingConfig2d;
    use burn::tensor::Distribution;

    type B = Autodiff<NdArray<f32>>;

    /// `f(ours)` and `f(Burn's)` on separate copies of the same input: values and gradients
    /// (input, weight, bias) equal to float rounding.
    fn check(
        conv: &Conv2d<B>,
        ours: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>,
        theirs: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>,
    ) {
        let dev = Default::default();
        let x =
            Tensor::<NdArray<f32>, 4>::random([2, 3, 8, 8], Distribution::Normal(0.0, 1.0), &dev);
        let run = |f: &dyn Fn(Tensor<B, 4>) -> Tensor<B, 4>| {
            let x = Tensor::<B, 4>::from_inner(x.clone()).require_grad();
            let y = f(x.clone());
            let grads = y.clone().powi_scalar(2).sum().backward();
            let bias = conv.bias.as_ref().map(|b| b.grad(&grads).unwrap());
            (
                y.inner(),
                x.grad(&grads).unwrap(),
                conv.weight.grad(&grads).unwrap(),
                bias,
            )
        };
        let (y1, x1, w1, b1) = run(&ours);
        let (y2, x2, w2, b2) = run(&theirs);
        let diff = |a: Tensor<NdArray<f32>, 4>, b: Tensor<NdArray<f32>, 4>| {
            (a - b).abs().max().into_scalar()
        };
        assert_eq!(y1.dims(), y2.dims());
        assert!(diff(y1, y2) < 1e-5, "values");
        assert!(diff(x1, x2) < 1e-4, "input gradient");
        assert!(diff(w1, w2) < 1e-4, "weight gradient");
        let (b1, b2) = (b1.unwrap(), b2.unwrap());
        assert!((b1 - b2).abs().max().into_scalar() < 1e-4, "bias gradient");
    }

    #[test]
    fn patchify_matches_a_strided_conv2d() {
        let conv = Conv2dConfig::new([3, 5], [4, 4])
            .with_stride([4, 4])
            .init::<B>(&Default::default());
        // As [B, D, 2, 2] images, so both sides have one shape.
        check(
            &conv,
            |x| patchify(&conv, x).swap_dims(1, 2).reshape([2, 5, 2, 2]),
            |x| conv.forward(x),
        );
    }

    #[test]
    fn conv3x3_same_matches_a_padded_conv2d() {
        let conv = Conv2dConfig::new([3, 2], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init::<B>(&Default::default());
        check(&conv, |x| conv3x3_same(&conv, x), |x| conv.forward(x));
    }
}
