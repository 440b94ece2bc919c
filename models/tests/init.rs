//! `duet_models::init::seeded` in a process of its own: its guarantee covers draws made
//! through `seeded`, and the library's unit tests draw from the backend generator directly.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::backend::NdArray;
use duet_models::init::seeded;
use duet_models::params::{load_named_tensors, named_tensors};
use duet_models::{CaptionModel, ModelSpec, Preset};

type B = NdArray<f32>;

/// The weights a seed gives do not depend on other threads building and loading models at the
/// same time (before `seeded`, a concurrent build could reseed or draw between `B::seed` and a
/// parameter's first use, and loading drew every parameter before replacing it).
#[test]
fn a_seed_gives_the_same_weights_while_other_threads_build_models() {
    let dev = Default::default();
    let spec = ModelSpec::preset(Preset::Tiny, 16, 32);
    let build = |seed| seeded::<B, _>(&dev, seed, || CaptionModel::<B>::new(&spec, &dev));
    let alone = named_tensors(&build(7));
    let stop = AtomicBool::new(false);
    let together = std::thread::scope(|s| {
        s.spawn(|| {
            let donor = named_tensors(&build(99));
            while !stop.load(Ordering::Relaxed) {
                let _ = build(99);
                load_named_tensors(CaptionModel::<B>::new(&spec, &dev), &donor).unwrap();
            }
        });
        let runs: Vec<_> = (0..4).map(|_| named_tensors(&build(7))).collect();
        stop.store(true, Ordering::Relaxed);
        runs
    });
    for run in together {
        assert!(
            run == alone,
            "seed 7 gave other weights while another thread built models"
        );
    }
    assert!(
        named_tensors(&build(8)) != alone,
        "the seed must change the weights"
    );
}
