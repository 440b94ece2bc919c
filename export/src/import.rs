//! A bundle back to a training run (`duet-export import`): the parameters read from the
//! bundle's ONNX initializers (the exporter names each after its checkpoint key and stores it
//! unchanged), with the bundle's dimensions, tokenizer and diffusion settings, so a shipped
//! model whose training run is not at hand can be fine-tuned: a caption run (the captioner)
//! for `duet-train fit --stage caption --init-from RUN`, or a generate run (the captioner and
//! the generator) for `--init RUN` of the dream, unify, fusion and restore stages. The
//! inverse of the export for those graphs; checked by loading the result into Burn.

use std::path::{Path, PathBuf};

use anyhow::Context;
use duet_diffusion::NoiseSchedule;
use duet_models::params::{param_shapes, NamedTensor, NamedTensors};
use duet_models::{CaptionModel, GenerationModel, ModelSpec, Preset};
use duet_run::checkpoint::{save_weights, write_json, WEIGHTS_FILE};
use duet_run::{
    CaptionTrainConfig, DiffusionSettings, GenerateTrainConfig, Stage, TokenizerOrigin,
    CONFIG_FILE, TOKENIZER_FILE,
};
use duet_runtime::graph::Graph;
use duet_runtime::Bundle;
use prost::Message;

/// The backend the imported weights are checked on.
type Ref = burn::backend::NdArray<f32>;
use tract_onnx::pb::{tensor_proto::DataType, ModelProto, TensorProto};

/// What an import wrote.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub run: PathBuf,
    /// The stage of the run written: `caption` or `generate`.
    pub stage: Stage,
    pub parameters: usize,
    pub values: usize,
}

/// [`import_run`] of the captioner alone: a caption run.
pub fn import_captioner(bundle: &Path, out: &Path, command: &str) -> anyhow::Result<ImportReport> {
    import_run(bundle, out, Some(Stage::Caption), command)
}

/// Writes `out` as a run holding the model of the bundle at `bundle` (a folder or a `.duet`
/// file, opened and hash-checked as every command opens one): a `caption` run (vision encoder
/// and caption decoder) or a `generate` run (those and the text encoder and denoiser, with
/// the bundle's diffusion settings). `stage` `None` takes the most the bundle holds: a
/// generate run when it has the generator's graphs. `out` must not exist.
pub fn import_run(
    bundle: &Path,
    out: &Path,
    stage: Option<Stage>,
    command: &str,
) -> anyhow::Result<ImportReport> {
    if out.exists() {
        anyhow::bail!("{} exists; import writes a new run folder", out.display());
    }
    let b = Bundle::open(bundle).with_context(|| format!("opening bundle {}", bundle.display()))?;
    let manifest = b.manifest();
    // The dream queries are not imported (a dream run starts them again from its generate
    // run), so the run's model has none.
    let spec = ModelSpec {
        dream_queries: 0,
        ..manifest.model.clone()
    };
    let preset: Preset = manifest
        .preset
        .parse()
        .map_err(|e: String| anyhow::anyhow!("{}: {e}", bundle.display()))?;
    let has_generator = manifest.diffusion.is_some();
    let stage = match stage {
        None if has_generator => Stage::Generate,
        None | Some(Stage::Caption) => Stage::Caption,
        Some(Stage::Generate) if has_generator => Stage::Generate,
        Some(Stage::Generate) => anyhow::bail!(
            "{} has no generator (text_encoder and denoiser graphs): import it as a caption run",
            bundle.display()
        ),
        Some(other) => anyhow::bail!(
            "a bundle imports as a caption or a generate run, not a '{other}' run (the later \
             stages start from a generate run: `--init RUN`)"
        ),
    };
    let graphs: &[Graph] = match stage {
        Stage::Generate => &[
            Graph::VisionEncoder,
            Graph::CaptionDecoder,
            Graph::TextEncoder,
            Graph::Denoiser,
        ],
        _ => &[Graph::VisionEncoder, Graph::CaptionDecoder],
    };
    let mut initializers = NamedTensors::new();
    for &graph in graphs {
        let bytes = b.graph_bytes(graph)?;
        let model = ModelProto::decode(&bytes[..])
            .with_context(|| format!("{}: {graph} is not an ONNX model", bundle.display()))?;
        for t in model.graph.iter().flat_map(|g| &g.initializer) {
            if let Some(tensor) = f32_values(t) {
                initializers.insert(t.name.clone(), tensor);
            }
        }
    }
    // The modules' parameters by the names and shapes Burn's modules have: each must be an
    // initializer of that shape; other initializers are the graphs' own constants.
    let device = Default::default();
    let mut expected = param_shapes(&CaptionModel::<Ref>::new(&spec, &device));
    if stage == Stage::Generate {
        expected.extend(param_shapes(&GenerationModel::<Ref>::new(&spec, &device)));
    }
    let mut weights = NamedTensors::new();
    for (name, want) in &expected {
        let found = match initializers.remove(name) {
            Some(t) => t,
            None => take_chunks(&mut initializers, name).with_context(|| {
                format!(
                    "{}: the model's parameter {name} is not in its graphs",
                    bundle.display()
                )
            })?,
        };
        if &found.shape != want {
            anyhow::bail!(
                "{}: {name} is {:?} in the graph but {:?} in the model",
                bundle.display(),
                found.shape,
                want
            );
        }
        weights.insert(name.clone(), found);
    }
    // Loading checks names and shapes once more, the way training will.
    let loaded = |prefixes: &[&str]| duet_run::with_prefixes(&weights, prefixes);
    duet_models::params::load_named_tensors(
        CaptionModel::<Ref>::new(&spec, &device),
        &loaded(&["vision", "decoder"]),
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", bundle.display()))?;
    if stage == Stage::Generate {
        duet_models::params::load_named_tensors(
            GenerationModel::<Ref>::new(&spec, &device),
            &loaded(&["text", "denoiser"]),
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", bundle.display()))?;
    }

    let tokenizer_bytes = b
        .file_bytes(&manifest.tokenizer.file)
        .with_context(|| format!("{}: no tokenizer", bundle.display()))?;
    // The bytes written are the ones hashed; the path is the file a folder bundle holds, or
    // the single-file bundle itself (its entries have no path of their own).
    let sha256 = duet_runtime::bundle::sha256_hex(&tokenizer_bytes);
    let tokenizer_path = if bundle.is_dir() {
        bundle.join(&manifest.tokenizer.file)
    } else {
        bundle.to_path_buf()
    };
    let caption = caption_config(preset, spec.clone(), command, tokenizer_path, sha256);
    // The bundle's captioner keeps answering questions when it was trained to.
    let caption = CaptionTrainConfig {
        questions: manifest.questions.as_ref().map_or(0, |q| q.trained_on),
        ..caption
    };
    let config = match stage {
        Stage::Generate => serde_json::to_value(GenerateTrainConfig {
            tokenizer: Some(caption.tokenizer.clone()),
            ..generate_config(
                preset,
                spec,
                bundle,
                command,
                &caption.device,
                diffusion_settings(manifest, bundle)?,
            )
        })?,
        _ => serde_json::to_value(&caption)?,
    };
    // Built beside `out` and renamed into place, so a failed import leaves nothing behind.
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let built = duet_fsio::temp_dir_beside(out)?;
    duet_fsio::write_atomic(&built.path().join(TOKENIZER_FILE), &tokenizer_bytes)?;
    save_weights(&built.path().join(WEIGHTS_FILE), &weights)?;
    write_json(&built.path().join(CONFIG_FILE), &config)?;
    duet_fsio::replace_dir(built, out)?;
    Ok(ImportReport {
        run: out.to_path_buf(),
        stage,
        parameters: weights.len(),
        values: weights.values().map(|t| t.data.len()).sum(),
    })
}

/// The `config.json` of an imported caption run: the bundle's model and tokenizer, the
/// preset's training defaults for a fine-tune, no steps of its own.
fn caption_config(
    preset: Preset,
    model: ModelSpec,
    command: &str,
    tokenizer_path: PathBuf,
    sha256: String,
) -> CaptionTrainConfig {
    let (steps, batch_size, lr) = CaptionTrainConfig::for_preset(preset);
    CaptionTrainConfig {
        stage: Stage::Caption,
        preset,
        model,
        data: Vec::new(),
        steps: 0,
        batch_size,
        lr,
        warmup_steps: 0,
        // The stages' own, so a stage that carries its init's settings trains as usual.
        weight_decay: duet_run::WEIGHT_DECAY,
        grad_clip: duet_run::GRAD_CLIP,
        seed: 0,
        checkpoint_every: steps,
        log_every: steps,
        device: "none (imported)".into(),
        command: command.to_owned(),
        init_from: None,
        tokenizer: TokenizerOrigin::Reused {
            path: tokenizer_path,
            sha256,
        },
        questions: 0,
    }
}

/// The `config.json` of an imported generate run; `init` names the bundle it came from.
fn generate_config(
    preset: Preset,
    model: ModelSpec,
    bundle: &Path,
    command: &str,
    device: &str,
    diffusion: DiffusionSettings,
) -> GenerateTrainConfig {
    let (steps, batch_size, lr) = GenerateTrainConfig::for_preset(preset);
    GenerateTrainConfig {
        stage: Stage::Generate,
        preset,
        model,
        init: bundle.to_path_buf(),
        data: Vec::new(),
        steps: 0,
        batch_size,
        lr,
        warmup_steps: 0,
        // The stages' own, so a stage that carries its init's settings trains as usual.
        weight_decay: duet_run::WEIGHT_DECAY,
        grad_clip: duet_run::GRAD_CLIP,
        seed: 0,
        checkpoint_every: steps,
        log_every: steps,
        device: device.to_owned(),
        command: command.to_owned(),
        diffusion,
        tokenizer: None,
    }
}

/// The generator's diffusion settings: what the denoiser predicts and the number of training
/// timesteps from the manifest (whose schedule must be the cosine one training uses), the
/// training-only settings (guidance dropout, contrastive loss, EMA, loss weighting) from the
/// training config the provenance records, else the defaults.
fn diffusion_settings(
    manifest: &duet_runtime::Manifest,
    bundle: &Path,
) -> anyhow::Result<DiffusionSettings> {
    let d = manifest
        .diffusion
        .as_ref()
        .with_context(|| format!("{}: no diffusion settings", bundle.display()))?;
    let steps = d.alphas_cumprod.len();
    let cosine = NoiseSchedule::cosine(steps)
        .with_context(|| format!("{}: {steps} training timesteps", bundle.display()))?;
    let same = cosine
        .alphas_cumprod()
        .iter()
        .zip(&d.alphas_cumprod)
        .all(|(a, b)| (a - b).abs() <= 1e-9 * a.abs().max(1.0));
    if !same {
        anyhow::bail!(
            "{}: the noise schedule is not the cosine schedule of {steps} steps that training \
             uses; this generator cannot be fine-tuned here",
            bundle.display()
        );
    }
    let recorded = ["diffusion", "generator_diffusion"].iter().find_map(|key| {
        let v = manifest
            .provenance
            .pointer(&format!("/training/config/{key}"))?;
        serde_json::from_value::<DiffusionSettings>(v.clone()).ok()
    });
    Ok(DiffusionSettings {
        prediction: d.prediction,
        train_timesteps: steps,
        ..recorded.unwrap_or_default()
    })
}

/// A parameter the exporter stored as `n` slices along its last axis (the denoiser's adaLN
/// projections: one `MatMul` per modulation, `{name}.chunk{k}_{id}`), joined back in `k`
/// order; `None` unless slices 0..n are all there with one shape.
fn take_chunks(initializers: &mut NamedTensors, name: &str) -> Option<NamedTensor> {
    let prefix = format!("{name}.chunk");
    let mut chunks: Vec<(usize, String)> = initializers
        .keys()
        .filter_map(|key| {
            let rest = key.strip_prefix(&prefix)?;
            let (k, id) = rest.split_once('_')?;
            id.parse::<u64>().ok()?;
            Some((k.parse().ok()?, key.clone()))
        })
        .collect();
    chunks.sort();
    if chunks.is_empty() || chunks.iter().enumerate().any(|(i, (k, _))| i != *k) {
        return None;
    }
    let parts: Vec<NamedTensor> = chunks
        .iter()
        .map(|(_, key)| initializers.get(key).cloned())
        .collect::<Option<_>>()?;
    let shape = parts[0].shape.clone();
    let last = *shape.last()?;
    if last == 0 || parts.iter().any(|p| p.shape != shape) {
        return None;
    }
    let rows = parts[0].data.len() / last;
    let mut data = Vec::with_capacity(rows * last * parts.len());
    for r in 0..rows {
        for p in &parts {
            data.extend_from_slice(&p.data[r * last..(r + 1) * last]);
        }
    }
    for (_, key) in &chunks {
        initializers.remove(key);
    }
    let mut joined = shape;
    *joined.last_mut()? = last * parts.len();
    Some(NamedTensor {
        shape: joined,
        data,
    })
}

/// An f32 initializer's shape and values (raw little-endian bytes or `float_data`); `None` for
/// other element types (the graphs' integer constants).
fn f32_values(t: &TensorProto) -> Option<NamedTensor> {
    if t.data_type != DataType::Float as i32 {
        return None;
    }
    let shape: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<_>>()?;
    let data: Vec<f32> = if t.raw_data.is_empty() {
        t.float_data.clone()
    } else {
        t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    // Checked: the dims come from the file, and a product that wraps could match a short
    // data length.
    let count = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?;
    (data.len() == count).then_some(NamedTensor { shape, data })
}
