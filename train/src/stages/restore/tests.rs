use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use duet_diffusion::NoiseSchedule;
use duet_models::{FeatureRestorer, RestoreConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use burn::backend::NdArray;
use duet_diffusion::{sample, Prediction, Sampler, SamplerConfig};
use ndarray::ArrayD;

type B = NdArray<f32>;

#[test]
fn burn_ddim_unroll_matches_the_shared_sampler() {
    let dev = Default::default();
    let cfg = RestoreConfig::new(8, 3);
    B::seed(&dev, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // Real (non-trivial) statistics, so the standardised space differs from the raw one.
    let stat = |rng: &mut ChaCha8Rng, lo: f32| {
        let v: Vec<f32> = (0..8).map(|_| lo + rng.random::<f32>()).collect();
        Tensor::<B, 1>::from_data(TensorData::new(v, [8]), &dev)
    };
    let r = FeatureRestorer::<B>::new(&cfg, &dev).with_statistics(
        (stat(&mut rng, -0.5), stat(&mut rng, 0.1)),
        (stat(&mut rng, -0.5), stat(&mut rng, 0.1)),
    );
    let schedule = NoiseSchedule::cosine(1000).unwrap();
    let cond = gaussian::<B, _>(&mut rng, [2, 8], &dev);
    let x = gaussian::<B, _>(&mut rng, [2, 8], &dev);
    let ours =
        to_vec(ddim_restore(&r, &schedule, 4, cond.clone(), x.clone(), true).unwrap()).unwrap();
    let start = ArrayD::from_shape_vec(vec![2, 8], to_vec(x).unwrap()).unwrap();
    let theirs = sample(
        &schedule,
        Prediction::V,
        &SamplerConfig {
            sampler: Sampler::Ddim { eta: 0.0 },
            steps: 4,
            clip_x0: false,
        },
        start,
        &mut rng,
        |x: &ArrayD<f32>, t: usize| -> anyhow::Result<ArrayD<f32>> {
            let xb = Tensor::<B, 2>::from_data(
                TensorData::new(x.iter().copied().collect::<Vec<_>>(), [2, 8]),
                &dev,
            );
            let tb = Tensor::<B, 1>::from_data(TensorData::new(vec![t as f32; 2], [2]), &dev);
            let v = r.forward(xb, tb, cond.clone(), true);
            Ok(ArrayD::from_shape_vec(vec![2, 8], to_vec(v)?)?)
        },
    )
    .unwrap();
    // The shared sampler walks the standardised space; map its result back to embeddings.
    let theirs = to_vec(r.unstandardise(Tensor::<B, 2>::from_data(
        TensorData::new(theirs.iter().copied().collect::<Vec<_>>(), [2, 8]),
        &dev,
    )))
    .unwrap();
    for (a, b) in ours.iter().zip(theirs.iter()) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}
