//! Fixed sin-cos position tables used to *initialise* learnt position embeddings.
//!
//! A small random init (std 0.02) leaves positions nearly invisible next to content features
//! for thousands of steps; the first generators trained that way scattered objects anywhere in
//! the image whatever the caption said. Sin-cos tables (Transformer; 2-D form as in MAE and DiT)
//! give every position a distinct, unit-scale code from step 0 and stay trainable.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// `[n, d]` row-major: position `i`, pair `k < d/2`: `sin(i ω_k)`, `cos(i ω_k)` at `2k`, `2k+1`,
/// `ω_k = 10000^(−2k/d)`.
pub fn sincos_1d(n: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n * d];
    for i in 0..n {
        for k in 0..d / 2 {
            let w = 10_000f64.powf(-(2.0 * k as f64) / d as f64);
            let a = i as f64 * w;
            out[i * d + 2 * k] = a.sin() as f32;
            out[i * d + 2 * k + 1] = a.cos() as f32;
        }
    }
    out
}

/// `[side², d]` for a `side × side` token grid in row-major order: the first `d/2` channels
/// encode the row, the last `d/2` the column (each a [`sincos_1d`] code of width `d/2`).
pub fn sincos_2d(side: usize, d: usize) -> Vec<f32> {
    let half = d / 2;
    let rows = sincos_1d(side, half);
    let mut out = vec![0.0f32; side * side * d];
    for r in 0..side {
        for c in 0..side {
            let t = r * side + c;
            out[t * d..t * d + half].copy_from_slice(&rows[r * half..(r + 1) * half]);
            out[t * d + half..t * d + 2 * half].copy_from_slice(&rows[c * half..(c + 1) * half]);
        }
    }
    out
}

/// A trainable `[1, n, d]` parameter holding `table`.
pub fn position_param<B: Backend>(
    table: Vec<f32>,
    n: usize,
    d: usize,
    device: &B::Device,
) -> Param<Tensor<B, 3>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(table, [1, n, d]), device))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (na * nb)
    }

    #[test]
    fn every_grid_position_has_a_distinct_code_and_neighbours_are_closer() {
        let (side, d) = (8, 128);
        let t = sincos_2d(side, d);
        let row = |i: usize| &t[i * d..(i + 1) * d];
        for i in 0..side * side {
            for j in 0..i {
                assert!(
                    cos(row(i), row(j)) < 0.999,
                    "positions {i} and {j} coincide"
                );
            }
        }
        // (0,0) is closer to (0,1) than to (7,7).
        assert!(cos(row(0), row(1)) > cos(row(0), row(63)));
        // Unit-scale entries: norm sqrt(d/2) per token.
        let n: f32 = row(5).iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n - (d as f32 / 2.0).sqrt()).abs() < 1e-3, "{n}");
    }
}
