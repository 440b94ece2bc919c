//! Task metrics of a bundle at each precision, measured through the runtime (the engines and
//! pipelines users run), so a variant is judged by what it does, not by max |Δ|:
//! - ShapeWorld caption exact match on a held-out folder (the scoring of `duet-train eval
//!   --stage caption`);
//! - the GenEval-style score of generated ShapeWorld scenes (the seeded prompt set and exact
//!   detector of `duet-train eval --stage generate`), when the bundle generates;
//! - classification accuracy with 70 % of the examples missing one modality (half the image,
//!   half the text, restored by the bundle's restorers), when the bundle restores: fresh seeded
//!   examples of its built-in pair task, the same for every precision.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use duet_datasets::pair_tasks::PairTask;
use duet_runtime::diffusion::Sampler;
use duet_runtime::engine::{EngineOptions, ProviderChoice};
use duet_runtime::{Bundle, Captioner, Classifier, Generator};
use duet_train::eval::geneval::{prompt_set, Category, Detector, GenEvalReport};
use duet_train::eval::restore::{missing_mask, Setting};
use duet_train::metrics::evaluate;

use super::Precision;
use crate::onnx::ExportError;

/// Metric names in manifests and reports.
pub const CAPTION_EXACT_MATCH: &str = "shapeworld_caption_exact_match";
pub const GENEVAL_OVERALL: &str = "geneval_overall";
/// Share of the foreground pixels of one-object generations that are of the asked colour: a
/// pixel-level score that still separates a working variant from a broken one where a small
/// generator draws few shapes the detector can read (GenEval near its floor).
pub const GENEVAL_COLOUR_FIDELITY: &str = "geneval_colour_fidelity";
pub const RESTORE_ACCURACY: &str = "restore_accuracy_mixed_70";

/// The missing rate of [`RESTORE_ACCURACY`].
pub const MISSING_RATE: f64 = 0.7;

/// Offset of the restoration examples' seed from `TaskEval::seed`, so they are not the first
/// examples a training run with a small seed drew.
const RESTORE_SEED_OFFSET: u64 = 1_000_003;

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct TaskEval {
    /// A ShapeWorld folder (`duet-train shapeworld`) whose scenes are captioned; `None`: no
    /// caption metric.
    pub data: Option<PathBuf>,
    /// Caption only the first N scenes.
    pub limit: Option<usize>,
    /// GenEval prompts per category (0: no generation metric).
    pub per_category: usize,
    /// Sampler and steps of the generations (the bundle's guidance).
    pub sampler: Sampler,
    pub steps: usize,
    /// Noise seed (the prompt set is always seed 0, as in `duet-train eval`); also seeds the
    /// restoration examples, their missing mask and the restorers' noise.
    pub seed: u64,
    /// Restoration examples to classify (0: no restoration metric).
    pub restore_examples: usize,
    /// Engine the pipelines run on.
    pub choice: ProviderChoice,
    pub engine: EngineOptions,
}

/// Images per pipeline call.
const BATCH: usize = 64;

fn fail(reason: impl std::fmt::Display) -> ExportError {
    ExportError::Evaluate {
        reason: reason.to_string(),
    }
}

/// Metrics of the bundle at `bundle_path` for each of `precisions` (each must be in the bundle).
pub fn evaluate_precisions(
    bundle_path: &Path,
    precisions: &[Precision],
    eval: &TaskEval,
) -> Result<BTreeMap<Precision, BTreeMap<String, f64>>, ExportError> {
    let bundle = Bundle::open(bundle_path).map_err(|source| ExportError::Bundle {
        path: bundle_path.to_path_buf(),
        source,
    })?;
    let samples = match &eval.data {
        Some(dir) => {
            let mut s = duet_datasets::shapeworld::load_dataset(dir)
                .map_err(|e| fail(format!("{}: {e}", dir.display())))?;
            if let Some(n) = eval.limit {
                s.truncate(n);
            }
            if s.is_empty() {
                return Err(fail(format!("{}: no scenes to caption", dir.display())));
            }
            s
        }
        None => Vec::new(),
    };
    let mut out = BTreeMap::new();
    for &precision in precisions {
        let b = bundle
            .clone()
            .with_precision(precision)
            .map_err(|source| ExportError::Bundle {
                path: bundle_path.to_path_buf(),
                source,
            })?;
        let mut metrics = BTreeMap::new();
        if !samples.is_empty() {
            let captioner = Captioner::new(&b, eval.choice, &eval.engine).map_err(fail)?;
            let mut pairs = Vec::with_capacity(samples.len());
            for chunk in samples.chunks(BATCH) {
                let images: Vec<_> = chunk.iter().map(|s| s.image.clone()).collect();
                let captions = captioner.caption_images(&images).map_err(fail)?;
                pairs.extend(chunk.iter().map(|s| s.objects.clone()).zip(captions));
            }
            let m = evaluate(&pairs);
            metrics.insert(CAPTION_EXACT_MATCH.to_owned(), m.exact_match);
        }
        if eval.per_category > 0 && b.manifest().diffusion.is_some() {
            let report = geneval(&b, eval)?;
            metrics.insert(GENEVAL_OVERALL.to_owned(), report.overall());
            metrics.insert(GENEVAL_COLOUR_FIDELITY.to_owned(), report.colour_fidelity());
            for c in Category::ALL {
                if let Some(a) = report.accuracy(c) {
                    metrics.insert(format!("geneval_{}", c.name().replace(' ', "_")), a);
                }
            }
        }
        if eval.restore_examples > 0 && b.manifest().restore.is_some() {
            metrics.insert(RESTORE_ACCURACY.to_owned(), restore_accuracy(&b, eval)?);
        }
        tracing::info!(%precision, ?metrics, "task metrics");
        out.insert(precision, metrics);
    }
    Ok(out)
}

/// The GenEval-style report of the bundle's generator (one noise seed per batch of prompts,
/// derived from `eval.seed` as `duet-train eval` does).
fn geneval(bundle: &Bundle, eval: &TaskEval) -> Result<GenEvalReport, ExportError> {
    let generator = Generator::new(bundle, eval.choice, &eval.engine).map_err(fail)?;
    let prompts = prompt_set(eval.per_category, 0);
    let detector = Detector::new(generator.image_size() as u32);
    let mut report = GenEvalReport::default();
    for (k, chunk) in prompts.chunks(BATCH).enumerate() {
        let mut opts = generator.default_options();
        opts.sampler = eval.sampler;
        opts.steps = eval.steps;
        opts.seed = eval.seed.wrapping_add(k as u64);
        let texts: Vec<&str> = chunk.iter().map(|p| p.text.as_str()).collect();
        let images = generator.generate_images(&texts, &opts).map_err(fail)?;
        for (p, img) in chunk.iter().zip(&images) {
            report.add(p, &detector.detect(img));
            report.add_colour_pixels(p, img);
        }
    }
    Ok(report)
}

/// Accuracy of the bundle's classifier on `eval.restore_examples` fresh examples of its task,
/// [`MISSING_RATE`] of them missing a modality (the mixed setting: half image, half text).
fn restore_accuracy(bundle: &Bundle, eval: &TaskEval) -> Result<f64, ExportError> {
    let spec = bundle
        .manifest()
        .restore
        .as_ref()
        .expect("checked by the caller");
    let task: PairTask = spec.task.parse().map_err(fail)?;
    let classifier = Classifier::new(bundle, eval.choice, &eval.engine).map_err(fail)?;
    let seed = eval.seed.wrapping_add(RESTORE_SEED_OFFSET);
    let n = eval.restore_examples;
    let examples = task.examples(n, seed, bundle.manifest().image.size as u32);
    let mask = missing_mask(n, MISSING_RATE, Setting::Mixed, seed);
    let mut right = 0usize;
    for (i, (ex, missing)) in examples.iter().zip(&mask).enumerate() {
        let (image, text) = match missing {
            Some(true) => (None, Some(ex.text.as_str())),
            Some(false) => (Some(&ex.image), None),
            None => (Some(&ex.image), Some(ex.text.as_str())),
        };
        let c = classifier
            .classify(image, text, seed.wrapping_add(i as u64))
            .map_err(fail)?;
        right += usize::from(c.class == ex.label);
    }
    Ok(right as f64 / n as f64)
}
