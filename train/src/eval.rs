//! `duet-train eval --stage caption`: greedy captions on held-out scenes, scored by parsing
//! them back into objects.

use std::path::Path;

use burn::tensor::backend::Backend;

use crate::caption_stage::{caption_samples, load_run, prepare};
use crate::metrics::{evaluate, CaptionMetrics};
use crate::shapeworld::load_dataset;

/// Captions every sample of `data` with the run's model and scores the captions.
/// Returns the metrics and up to `examples` (truth, prediction) pairs for display.
pub fn eval_caption<B: Backend>(
    run: &Path,
    data: &Path,
    limit: Option<usize>,
    device: &B::Device,
) -> anyhow::Result<(CaptionMetrics, Vec<(String, String)>)> {
    let loaded = load_run::<B>(run, device)?;
    let mut samples = load_dataset(data)?;
    if let Some(n) = limit {
        samples.truncate(n);
    }
    if samples.is_empty() {
        anyhow::bail!("{}: no samples to evaluate", data.display());
    }
    let prepared = prepare(
        &samples,
        &loaded.tokenizer,
        loaded.config.model.image_size,
        loaded.config.model.max_len,
    )?;
    let predictions = caption_samples(&loaded, &prepared, device);
    let pairs: Vec<_> = samples
        .iter()
        .zip(&predictions)
        .map(|(s, p)| (s.objects.clone(), p.clone()))
        .collect();
    let examples = samples
        .iter()
        .zip(&predictions)
        .take(5)
        .map(|(s, p)| (s.caption.clone(), p.clone()))
        .collect();
    Ok((evaluate(&pairs), examples))
}
