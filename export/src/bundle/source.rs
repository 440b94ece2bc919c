//! The trained run an export starts from: its captioner, and the generator and restore modules
//! when the run carries them, loaded into Burn as the reference the graphs are checked against.

use std::path::Path;

use duet_datasets::tokenizer::load_tokenizer;
use duet_diffusion::{NoiseSchedule, Prediction};
use duet_models::params::load_named_tensors;
use duet_models::{CaptionModel, DreamQueries, FusionHead, GenerationModel, ModelSpec, Restorers};
use duet_run::checkpoint::{load_weights, WEIGHTS_FILE};
use duet_run::{
    load_captioner, load_dream, load_generator, load_generator_weights, load_restore, load_run,
    under, Backbones, PairTrainConfig, Stage, CONFIG_FILE, TOKENIZER_FILE, VARIANTS,
};
use tokenizers::Tokenizer;

use super::*;

/// What an export reads from a run: the captioner always, the generator from a generate,
/// unify or restore run, the restorers and head from a restore run.
pub(super) struct Source {
    pub(super) preset: String,
    pub(super) model: ModelSpec,
    pub(super) tokenizer: Tokenizer,
    pub(super) captioner: CaptionModel<Ref>,
    pub(super) generator: Option<GeneratorSource>,
    /// The dream queries of a dream run (read through `captioner.decoder`).
    pub(super) dream: Option<DreamQueries<Ref>>,
    pub(super) restore: Option<RestoreSource>,
}

pub(super) struct GeneratorSource {
    pub(super) generator: GenerationModel<Ref>,
    pub(super) prediction: Prediction,
    pub(super) schedule: NoiseSchedule,
}

pub(super) struct RestoreSource {
    pub(super) config: PairTrainConfig,
    pub(super) backbones: Backbones<Ref>,
    pub(super) head: FusionHead<Ref>,
    /// The full restorer (gating and mutual learning); the ablations are evaluation baselines
    /// and stay in the run.
    pub(super) restorers: Restorers<Ref>,
    pub(super) schedule: NoiseSchedule,
    pub(super) sampler_steps: usize,
}

pub(super) fn load_source(run: &Path, device: &RefDevice) -> anyhow::Result<Source> {
    let stage = run_stage(run);
    match stage {
        Stage::Restore => {
            let r = load_restore::<Ref>(run, device)?;
            let diffusion = r.config.generator_diffusion.clone().ok_or_else(|| {
                anyhow::anyhow!(
                    "{} was trained before restore runs recorded their generator's diffusion \
                     settings; re-run `fit --stage fusion` and `fit --stage restore` to export it",
                    run.display()
                )
            })?;
            let settings = r.config.settings.clone().unwrap_or_default();
            let full = VARIANTS
                .iter()
                .position(|v| v.gating && v.mutual)
                .expect("VARIANTS holds the full restorer");
            let mut models = r.models;
            let restorers = models.restorers.swap_remove(full);
            Ok(Source {
                preset: r.config.preset.to_string(),
                model: r.config.model.clone(),
                tokenizer: load_tokenizer(&run.join(TOKENIZER_FILE))?,
                captioner: load_captioner(run, &r.config.model, device)?,
                // A restore run carries its init's tensors: the dream queries too when the
                // chain went through a dream run (its model then counts them).
                dream: carried_dream_queries(run, &r.config.model, device)?,
                generator: Some(GeneratorSource {
                    generator: load_generator_weights(run, &r.config.model, device)?,
                    prediction: diffusion.prediction,
                    schedule: NoiseSchedule::cosine(diffusion.train_timesteps)?,
                }),
                restore: Some(RestoreSource {
                    schedule: NoiseSchedule::cosine(settings.train_timesteps)?,
                    sampler_steps: settings.sampler_steps,
                    config: r.config,
                    backbones: r.backbones,
                    head: models.head,
                    restorers,
                }),
            })
        }
        Stage::Fusion => anyhow::bail!(
            "{} is a fusion run: export the restore run trained from it (`fit --stage restore \
             --init {}`), which carries the head and the restorers",
            run.display(),
            run.display()
        ),
        _ => {
            let r = load_run::<Ref>(run, device)?;
            let generator = if matches!(stage, Stage::Generate | Stage::Unify | Stage::Dream) {
                let g = load_generator::<Ref>(run, false, device)?;
                Some(GeneratorSource {
                    prediction: g.config.diffusion.prediction,
                    generator: g.generator,
                    schedule: g.schedule,
                })
            } else {
                None
            };
            let (model, dream) = if stage == Stage::Dream {
                let d = load_dream::<Ref>(run, false, device)?;
                (d.config.run.model, Some(d.dream.dream))
            } else {
                (r.config.model.clone(), None)
            };
            Ok(Source {
                preset: r.config.preset.to_string(),
                model,
                tokenizer: r.tokenizer,
                captioner: r.model,
                generator,
                dream,
                restore: None,
            })
        }
    }
}

/// The dream queries (`dream.*`) a run carries from a dream run earlier in its chain, when
/// its model has them.
fn carried_dream_queries(
    run: &Path,
    model: &ModelSpec,
    device: &RefDevice,
) -> anyhow::Result<Option<DreamQueries<Ref>>> {
    if model.dream_queries == 0 {
        return Ok(None);
    }
    let weights = load_weights(&run.join(WEIGHTS_FILE))?;
    let queries = load_named_tensors(
        DreamQueries::<Ref>::new(model, device),
        &under(&weights, "dream"),
    )
    .map_err(|e| anyhow::anyhow!("{} (dream.*): {e}", run.join(WEIGHTS_FILE).display()))?;
    Ok(Some(queries))
}

/// `stage` of a run's `config.json` (`caption` when absent or unreadable: the caption loader
/// reports the real problem).
pub(super) fn run_stage(run: &Path) -> Stage {
    std::fs::read_to_string(run.join(CONFIG_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("stage").cloned())
        .and_then(|s| serde_json::from_value(s).ok())
        .unwrap_or(Stage::Caption)
}
