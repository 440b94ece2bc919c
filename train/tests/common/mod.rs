//! Helpers the training tests share: the tiny caption, generate and dream runs they start
//! from, and comparing checkpoints.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use duet_models::params::NamedTensors;
use duet_models::Preset;
use duet_train::backend::CpuBackend;
use duet_train::stages::caption::{fit, FitArgs};
use duet_train::stages::dream::DreamFitArgs;
use duet_train::stages::generate::{fit_generate, GenerateFitArgs};

/// A tiny caption run on `data` into `out`: `steps` steps of batch 8, seed 7, one device.
pub fn caption_args(data: &Path, out: &Path, steps: usize, resume: bool) -> FitArgs {
    FitArgs {
        steps: Some(steps),
        batch_size: Some(8),
        seed: 7,
        resume,
        command: "test".into(),
        quiet: true,
        ..FitArgs::new(Preset::Tiny, vec![data.to_path_buf()], out)
    }
}

/// A tiny generate run from the caption run `init` on `data` into `out`: `steps` steps of
/// batch 8, seed 1, one device.
pub fn generate_args(init: &Path, data: Vec<PathBuf>, out: &Path, steps: usize) -> GenerateFitArgs {
    GenerateFitArgs {
        steps: Some(steps),
        batch_size: Some(8),
        seed: 1,
        command: "test".into(),
        quiet: true,
        ..GenerateFitArgs::new(init, data, out)
    }
}

/// A tiny dream run from the generate run `init` on `data` into `out`: `steps` steps of batch
/// 4 with 3 queries, seed 5, one device.
pub fn dream_args(
    init: &Path,
    data: &Path,
    out: &Path,
    steps: usize,
    resume: bool,
) -> DreamFitArgs {
    DreamFitArgs {
        steps: Some(steps),
        batch_size: Some(4),
        queries: Some(3),
        seed: 5,
        resume,
        command: "test".into(),
        quiet: true,
        ..DreamFitArgs::new(init, vec![data.to_path_buf()], out)
    }
}

/// The largest |a - b| over every parameter of two checkpoints (which must hold the same
/// parameters with the same shapes).
pub fn max_difference(a: &NamedTensors, b: &NamedTensors) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f32;
    for (name, t) in a {
        let u = &b[name];
        assert_eq!(t.shape, u.shape, "{name}");
        for (x, y) in t.data.iter().zip(&u.data) {
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

/// A caption run and a generate run on `data` (2 steps each).
pub fn chain(dir: &Path, data: &Path) -> (PathBuf, PathBuf) {
    let caption = dir.join(format!(
        "caption-{}",
        data.file_name().unwrap().to_string_lossy()
    ));
    fit::<CpuBackend>(&caption_args(data, &caption, 2, false), &Default::default()).unwrap();
    let gen = dir.join(format!(
        "gen-{}",
        data.file_name().unwrap().to_string_lossy()
    ));
    let args = GenerateFitArgs {
        batch_size: Some(4),
        ..generate_args(&caption, vec![data.to_path_buf()], &gen, 2)
    };
    fit_generate::<CpuBackend>(&args, &Default::default()).unwrap();
    (caption, gen)
}
