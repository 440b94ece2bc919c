//! A bundle back to a training run (`duet-export import`): the captioner's parameters read from
//! the bundle's ONNX initializers (the exporter names each after its checkpoint key and stores
//! it unchanged), with the bundle's dimensions and tokenizer, so `duet-train fit --stage
//! caption --init-from RUN` can fine-tune a shipped model whose training run is not at hand.
//! The inverse of the export for those two graphs; checked by loading the result into Burn.

use std::path::{Path, PathBuf};

use anyhow::Context;
use duet_models::params::{param_shapes, NamedTensor, NamedTensors};
use duet_models::{CaptionModel, Preset};
use duet_run::checkpoint::{save_weights, write_json, WEIGHTS_FILE};
use duet_run::{CaptionTrainConfig, Stage, TokenizerOrigin, CONFIG_FILE, TOKENIZER_FILE};
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
    pub parameters: usize,
    pub values: usize,
}

/// Writes `out` as a caption run holding the captioner of the bundle at `bundle` (a folder or
/// a `.duet` file, opened and hash-checked as every command opens one). `out` must not exist.
pub fn import_captioner(bundle: &Path, out: &Path, command: &str) -> anyhow::Result<ImportReport> {
    if out.exists() {
        anyhow::bail!("{} exists; import writes a new run folder", out.display());
    }
    let b = Bundle::open(bundle).with_context(|| format!("opening bundle {}", bundle.display()))?;
    let manifest = b.manifest();
    let spec = manifest.model.clone();
    let preset: Preset = manifest
        .preset
        .parse()
        .map_err(|e: String| anyhow::anyhow!("{}: {e}", bundle.display()))?;
    let mut initializers = NamedTensors::new();
    for graph in [Graph::VisionEncoder, Graph::CaptionDecoder] {
        let bytes = b.graph_bytes(graph)?;
        let model = ModelProto::decode(&bytes[..])
            .with_context(|| format!("{}: {graph} is not an ONNX model", bundle.display()))?;
        for t in model.graph.iter().flat_map(|g| &g.initializer) {
            if let Some(tensor) = f32_values(t) {
                initializers.insert(t.name.clone(), tensor);
            }
        }
    }
    // The captioner's parameters by the names and shapes Burn's module has: each must be an
    // initializer of that shape; other initializers are the graphs' own constants.
    let device = Default::default();
    let expected = param_shapes(&CaptionModel::<Ref>::new(&spec, &device));
    let mut weights = NamedTensors::new();
    for (name, want) in &expected {
        let found = initializers.remove(name).with_context(|| {
            format!(
                "{}: the captioner's parameter {name} is not in its graphs",
                bundle.display()
            )
        })?;
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
    duet_models::params::load_named_tensors(CaptionModel::<Ref>::new(&spec, &device), &weights)
        .map_err(|e| anyhow::anyhow!("{}: {e}", bundle.display()))?;

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
    let (steps, batch_size, lr) = CaptionTrainConfig::for_preset(preset);
    let config = CaptionTrainConfig {
        stage: Stage::Caption,
        preset,
        model: spec,
        data: Vec::new(),
        steps: 0,
        batch_size,
        lr,
        warmup_steps: 0,
        weight_decay: 0.0,
        grad_clip: 0.0,
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
        // The bundle's captioner keeps answering questions when it was trained to.
        questions: manifest.questions.as_ref().map_or(0, |q| q.trained_on),
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
        parameters: weights.len(),
        values: weights.values().map(|t| t.data.len()).sum(),
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
