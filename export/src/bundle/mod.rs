//! `duet-export`: a trained run → ONNX graphs → parity checks → a bundle directory.
//!
//! The bundle is assembled in a staging directory next to the destination and only moved into
//! place once every graph has passed parity and the runtime's own [`Bundle::open`] accepts the
//! result, so a failed export never leaves a half-written or unverified bundle under the real
//! name, and a previous bundle there survives a failed export untouched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use duet_diffusion::Prediction;
use duet_models::params::named_tensors;
use duet_models::tokens::{BOS_ID, EOS_ID, PAD_ID, UNK_ID};
use duet_run::{CONFIG_FILE, HEAD, STATE_FILE, TOKENIZER_FILE};
use duet_runtime::bundle::{archive, sha256_file, Bundle};
use duet_runtime::engine::EngineOptions;
use duet_runtime::manifest::{
    DiffusionSpec, DimSpec, Graph, GraphSpec, ImageSpec, Manifest, QuestionsSpec, RestoreSpec,
    TensorSpec, TokenizerSpec, MANIFEST_FILE, SCHEMA_VERSION,
};
use tract_onnx::pb::{tensor_shape_proto, type_proto, ModelProto};

use crate::onnx::{
    build_caption_decoder, build_denoiser, build_dream_encoder, build_fusion_head, build_restorer,
    build_text_encoder, build_vision_encoder, save_model, ExportError,
};
use crate::parity::{check_parity, GraphParity, FP32_TOLERANCE};

mod cases;
mod source;

use cases::*;
use source::*;

/// The Burn backend the exporter evaluates the reference outputs on (CPU, f32).
type Ref = NdArray<f32>;
type RefDevice = burn::backend::ndarray::NdArrayDevice;

/// File names inside a bundle.
pub const TOKENIZER_BUNDLE_FILE: &str = "tokenizer.json";

/// Sampler defaults written into a generator bundle's manifest: DDIM with 30 steps and
/// guidance 3 is the setting the generate stage's evaluation uses (see `docs/RESULTS.md`).
pub const DEFAULT_SAMPLER_STEPS: usize = 30;
pub const DEFAULT_GUIDANCE: f32 = 3.0;

/// Seed of every parity input (recorded in the manifest).
pub const PARITY_SEED: u64 = 20_260_101;

/// What to export and how strictly.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Training run directory (`config.json`, `tokenizer.json`, `model.safetensors`).
    pub run: PathBuf,
    /// Bundle directory to write (replaced only after a fully verified export).
    pub out: PathBuf,
    /// Bundle name in the manifest (default: the run directory's name).
    pub name: Option<String>,
    /// Largest allowed absolute difference to Burn on ort and on tract.
    pub tolerance: f64,
    /// Where onnxruntime is loaded from for the ort parity check.
    pub engine: EngineOptions,
    /// The command line that ran the export (provenance).
    pub command: String,
}

impl ExportOptions {
    pub fn new(run: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            run: run.into(),
            out: out.into(),
            name: None,
            tolerance: FP32_TOLERANCE,
            engine: EngineOptions::default(),
            command: String::new(),
        }
    }
}

/// What a successful export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub bundle: PathBuf,
    pub parity: Vec<GraphParity>,
    pub manifest: Manifest,
}

/// Exports the run in `opts.run` to a verified bundle at `opts.out`: a directory, or a
/// single-file bundle when the name ends in `.duet` (exported as a directory beside it, then
/// packed and the directory removed: the same checks, the same bytes). An existing file there
/// is replaced only if it is a single-file bundle itself.
pub fn export_run(opts: &ExportOptions) -> Result<ExportReport, ExportError> {
    if !is_single_file(&opts.out) {
        return export_dir(opts);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Io { path, source }
    };
    refuse_non_bundle_file(&opts.out)?;
    // As for a directory bundle, the folder it goes in is made on the way.
    if let Some(parent) = opts.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let staging = duet_fsio::temp_dir_beside(&opts.out).map_err(io(&opts.out))?;
    let staged = ExportOptions {
        out: staging.path().join("bundle"),
        ..opts.clone()
    };
    let report = export_dir(&staged)?;
    let bundle = Bundle::open(&report.bundle).map_err(|source| ExportError::Bundle {
        path: report.bundle.clone(),
        source,
    })?;
    archive::pack(&bundle, &opts.out).map_err(|source| ExportError::Bundle {
        path: opts.out.clone(),
        source,
    })?;
    Ok(ExportReport {
        bundle: opts.out.clone(),
        ..report
    })
}

/// Whether `out` names a single-file bundle (`*.duet`).
pub fn is_single_file(out: &Path) -> bool {
    out.extension().is_some_and(|e| e == archive::EXTENSION)
}

/// A file about to be replaced by a single-file bundle must be one already (or absent): a typo
/// in the output name must not overwrite someone's data.
pub fn refuse_non_bundle_file(out: &Path) -> Result<(), ExportError> {
    match std::fs::symlink_metadata(out) {
        Err(_) => Ok(()),
        Ok(m) if m.is_file() && Bundle::open(out).is_ok() => Ok(()),
        Ok(_) => Err(ExportError::OutputNotBundle {
            path: out.to_path_buf(),
        }),
    }
}

/// [`export_run`] into a directory.
fn export_dir(opts: &ExportOptions) -> Result<ExportReport, ExportError> {
    if !(opts.tolerance.is_finite() && opts.tolerance > 0.0) {
        return Err(ExportError::InvalidDims(format!(
            "tolerance {} must be a positive number",
            opts.tolerance
        )));
    }
    let device = Default::default();
    let load_err = |e: anyhow::Error| ExportError::LoadRun {
        path: opts.run.clone(),
        reason: format!("{e:#}"),
    };
    let src = load_source(&opts.run, &device).map_err(load_err)?;
    let cfg = &src.model;
    cfg.validate()
        .map_err(|e| ExportError::InvalidDims(e.to_string()))?;
    let dims = cfg.clone();
    let mut weights = weights_of(&src.captioner)?;
    if let Some(g) = &src.generator {
        for (name, t) in named_tensors(&g.generator) {
            weights.insert(name, t.shape, t.data)?;
        }
    }
    if let Some(q) = &src.dream {
        for (name, t) in named_tensors(q) {
            weights.insert(format!("dream.{name}"), t.shape, t.data)?;
        }
    }
    if let Some(r) = &src.restore {
        for (name, t) in named_tensors(&r.restorers) {
            weights.insert(format!("restorer.{name}"), t.shape, t.data)?;
        }
        for (name, t) in named_tensors(&r.head) {
            weights.insert(format!("{HEAD}.{name}"), t.shape, t.data)?;
        }
    }
    let generator = src.generator.as_ref();

    // Staged in a fresh directory beside the destination, created exclusively under an
    // unpredictable name (nothing planted there can redirect the writes); removed on error.
    if let Some(parent) = opts.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| io_err(parent, source))?;
    }
    let staging_dir =
        duet_fsio::temp_dir_beside(&opts.out).map_err(|source| io_err(&opts.out, source))?;
    let staging = staging_dir.path().to_path_buf();
    let result = (|| {
        let (vision_cases, decoder_cases) = parity_inputs(&src, &device)?;
        let mut jobs = vec![
            (
                Graph::VisionEncoder,
                build_vision_encoder(&weights, &dims)?,
                vision_cases,
            ),
            (
                Graph::CaptionDecoder,
                build_caption_decoder(&weights, &dims)?,
                decoder_cases,
            ),
        ];
        if let Some(gen) = generator {
            let (text_cases, denoiser_cases) = generator_parity_inputs(&src, gen, &device)?;
            jobs.push((
                Graph::TextEncoder,
                build_text_encoder(&weights, &dims)?,
                text_cases,
            ));
            jobs.push((
                Graph::Denoiser,
                build_denoiser(&weights, &dims)?,
                denoiser_cases,
            ));
        }
        if let Some(q) = &src.dream {
            jobs.push((
                Graph::DreamEncoder,
                build_dream_encoder(&weights, &dims)?,
                dream_parity_inputs(&src, q, &jobs[0].2, &device)?,
            ));
        }
        if let Some(r) = &src.restore {
            let rd = &r.config.restore;
            let (t2i_cases, i2t_cases, head_cases) = restore_parity_inputs(&src, r, &device)?;
            jobs.push((
                Graph::RestorerT2i,
                build_restorer(&weights, "restorer.t2i", Graph::RestorerT2i.name(), rd)?,
                t2i_cases,
            ));
            jobs.push((
                Graph::RestorerI2t,
                build_restorer(&weights, "restorer.i2t", Graph::RestorerI2t.name(), rd)?,
                i2t_cases,
            ));
            jobs.push((
                Graph::FusionHead,
                build_fusion_head(&weights, HEAD, rd)?,
                head_cases,
            ));
        }
        let mut parity = Vec::new();
        let mut graphs = Vec::new();
        for (role, model, cases) in &jobs {
            let (graph, file) = (role.name(), role.file());
            let path = staging.join(file);
            save_model(&path, model)?;
            let p = check_parity(graph, &path, cases, opts.tolerance, &opts.engine)?;
            tracing::info!(
                graph,
                ort = p.ort.max_abs_diff,
                tract = p.tract.max_abs_diff,
                "parity over {} input sets",
                p.cases
            );
            if !p.passed() {
                let (worst, which) = if p.ort.max_abs_diff > p.tract.max_abs_diff {
                    (&p.ort, "ort")
                } else {
                    (&p.tract, "tract")
                };
                return Err(ExportError::ParityFailed {
                    graph: (*graph).to_owned(),
                    backend: which.to_owned(),
                    output: worst.worst.clone(),
                    diff: worst.max_abs_diff,
                    tolerance: p.tolerance,
                });
            }
            graphs.push(graph_spec(*role, file, model, &p)?);
            parity.push(p);
        }

        let tok_src = opts.run.join(TOKENIZER_FILE);
        let tok_dst = staging.join(TOKENIZER_BUNDLE_FILE);
        let tok_bytes = std::fs::read(&tok_src).map_err(|source| io_err(&tok_src, source))?;
        duet_fsio::write_atomic_creating_dir(&tok_dst, &tok_bytes)
            .map_err(|source| io_err(&tok_dst, source))?;

        let mut files = BTreeMap::new();
        let names = jobs
            .iter()
            .map(|(graph, _, _)| graph.file())
            .chain([TOKENIZER_BUNDLE_FILE]);
        for name in names {
            let p = staging.join(name);
            files.insert(
                name.to_owned(),
                sha256_file(&p).map_err(|source| io_err(&p, source))?,
            );
        }
        let manifest = Manifest {
            schema_version: SCHEMA_VERSION,
            name: opts.name.clone().unwrap_or_else(|| {
                opts.run
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "duet".to_owned())
            }),
            preset: src.preset.clone(),
            model: dims.clone(),
            image: ImageSpec {
                size: cfg.image_size,
                channels: cfg.channels,
                // The training normalisation `x / 255 * 2 - 1` (see `image_to_chw`).
                mean: [0.5; 3],
                std: [0.5; 3],
                fit: cfg.image_fit,
            },
            tokenizer: TokenizerSpec {
                file: TOKENIZER_BUNDLE_FILE.to_owned(),
                pad_id: PAD_ID,
                bos_id: BOS_ID,
                eos_id: EOS_ID,
                unk_id: UNK_ID,
                max_len: cfg.max_len,
                origin: tokenizer_origin(&opts.run),
            },
            graphs,
            files,
            variants: Vec::new(),
            metrics: Default::default(),
            provenance: provenance(opts),
            questions: trained_questions(&opts.run).map(|trained_on| QuestionsSpec { trained_on }),
            diffusion: generator.map(|g| DiffusionSpec {
                prediction: g.prediction,
                schedule: "cosine".to_owned(),
                alphas_cumprod: g.schedule.alphas_cumprod().to_vec(),
                default_steps: DEFAULT_SAMPLER_STEPS,
                default_guidance: DEFAULT_GUIDANCE,
            }),
            restore: src.restore.as_ref().map(|r| RestoreSpec {
                task: r.config.task.to_string(),
                classes: (0..r.config.task.classes())
                    .map(|c| r.config.task.class_name(c))
                    .collect(),
                prediction: Prediction::V,
                schedule: "cosine".to_owned(),
                alphas_cumprod: r.schedule.alphas_cumprod().to_vec(),
                sampler_steps: r.sampler_steps,
                gating: true,
                trust_gate: true,
            }),
        };
        let text = manifest
            .to_json_pretty()
            .map_err(|e| ExportError::InvalidDims(format!("manifest serialisation: {e}")))?;
        let mpath = staging.join(MANIFEST_FILE);
        duet_fsio::write_atomic_creating_dir(&mpath, text.as_bytes())
            .map_err(|source| io_err(&mpath, source))?;
        // The runtime's own checks (hashes, schema, I/O contract) must accept what we wrote.
        Bundle::open(&staging).map_err(|e| ExportError::Parity {
            graph: "bundle".to_owned(),
            reason: format!("the runtime refuses the written bundle: {e}"),
        })?;
        Ok((parity, manifest))
    })();
    // On error the staging directory goes with `staging_dir`'s drop.
    let (parity, manifest) = result?;
    publish(staging_dir, &opts.out)?;
    Ok(ExportReport {
        bundle: opts.out.clone(),
        parity,
        manifest,
    })
}

/// A graph's manifest entry, with its I/O read back from the built model so the manifest can
/// never disagree with the file.
fn graph_spec(
    role: Graph,
    file: &str,
    model: &ModelProto,
    parity: &GraphParity,
) -> Result<GraphSpec, ExportError> {
    let graph = model.graph.as_ref();
    let specs = |infos: &[tract_onnx::pb::ValueInfoProto]| -> Result<Vec<TensorSpec>, ExportError> {
        infos.iter().map(|i| tensor_spec(role, i)).collect()
    };
    Ok(GraphSpec {
        name: role,
        file: file.to_owned(),
        inputs: graph
            .map(|g| specs(&g.input))
            .transpose()?
            .unwrap_or_default(),
        outputs: graph
            .map(|g| specs(&g.output))
            .transpose()?
            .unwrap_or_default(),
        parity: Some(parity.to_manifest()),
    })
}

fn tensor_spec(
    role: Graph,
    info: &tract_onnx::pb::ValueInfoProto,
) -> Result<TensorSpec, ExportError> {
    let (elem, dims) = match info.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => (
            t.elem_type,
            t.shape.as_ref().map(|s| s.dim.clone()).unwrap_or_default(),
        ),
        _ => (0, Vec::new()),
    };
    let dtype = duet_runtime::manifest::DType::from_onnx_code(elem).ok_or_else(|| {
        ExportError::InvalidDims(format!(
            "{role}: `{}` has ONNX element type {elem}, which no manifest can declare",
            info.name
        ))
    })?;
    let shape = dims
        .iter()
        .map(|d| match &d.value {
            Some(tensor_shape_proto::dimension::Value::DimValue(n)) => {
                DimSpec::Fixed(usize::try_from(*n).unwrap_or(0))
            }
            Some(tensor_shape_proto::dimension::Value::DimParam(p)) => DimSpec::Symbolic(p.clone()),
            None => DimSpec::Symbolic(String::new()),
        })
        .collect();
    Ok(TensorSpec {
        name: info.name.clone(),
        dtype,
        shape,
    })
}

/// Training provenance: the run's config (with its command), final state and evaluation, and
/// the export command.
fn provenance(opts: &ExportOptions) -> serde_json::Value {
    let read = |name: &str| -> serde_json::Value {
        std::fs::read_to_string(opts.run.join(name))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    let config = read(CONFIG_FILE);
    serde_json::json!({
        "command": opts.command,
        "run": opts.run,
        "training": {
            "command": config.get("command").cloned().unwrap_or(serde_json::Value::Null),
            "seed": config.get("seed").cloned().unwrap_or(serde_json::Value::Null),
            "data": config.get("data").cloned().unwrap_or(serde_json::Value::Null),
            "config": config,
            "state": read(STATE_FILE),
            "eval": read("eval.json"),
        },
        "parity": { "seed": PARITY_SEED, "backends": ["burn-ndarray", "ort-cpu", "tract"] },
        "exporter": format!("duet-export {}", env!("CARGO_PKG_VERSION")),
    })
}

/// The `config.json` of `run` and of each run of its `init` chain after it, parsed loosely,
/// newest first, until a link cannot be read (a bundle an imported run names, or a relative
/// `init` from another working directory) or the chain reaches its caption run.
fn init_chain(run: &Path) -> Vec<serde_json::Value> {
    let mut chain = Vec::new();
    let mut dir = Some(run.to_path_buf());
    // Bounded: a chain is at most a few stages long, and a loop must not hang the export.
    while let Some(d) = dir.take().filter(|_| chain.len() < 16) {
        let Some(config) = std::fs::read_to_string(d.join(CONFIG_FILE))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        else {
            break;
        };
        let stage = config.get("stage").and_then(|s| s.as_str());
        if !matches!(stage, None | Some("caption")) {
            dir = config
                .get("init")
                .and_then(|i| i.as_str())
                .map(PathBuf::from);
        }
        chain.push(config);
    }
    chain
}

/// Where the run's tokenizer came from: said by the newest run of its `init` chain that says
/// (every stage made since copies it; older chains say it in their caption run only, or, in
/// runs made before it was recorded, not at all: trained on the captions). `None` when no run
/// of the readable chain says and the chain does not reach a caption run.
fn tokenizer_origin(run: &Path) -> Option<String> {
    let chain = init_chain(run);
    let origin = match chain
        .iter()
        .find_map(|c| c.get("tokenizer").filter(|v| !v.is_null()))
    {
        Some(v) => serde_json::from_value::<duet_run::TokenizerOrigin>(v.clone()).ok()?,
        None => {
            let root = chain.last()?;
            let stage = root.get("stage").and_then(|s| s.as_str());
            if !matches!(stage, None | Some("caption")) {
                return None;
            }
            duet_run::TokenizerOrigin::default()
        }
    };
    Some(origin.to_string())
}

/// How many questions the run's caption decoder was trained on, when any: said by the
/// latest run of its `init` chain that trained it on questions (the caption stage, or a dream
/// stage, whose understanding loss trains the same decoder).
fn trained_questions(run: &Path) -> Option<usize> {
    init_chain(run).iter().find_map(|c| {
        c.get("questions")
            .and_then(|q| q.as_u64())
            .filter(|&n| n > 0)
            .and_then(|n| usize::try_from(n).ok())
    })
}

fn io_err(path: &Path, source: std::io::Error) -> ExportError {
    ExportError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Entries of the bundle directory `dir` that are neither its manifest nor a file the manifest
/// lists (a model card, evaluation files, notes): what replacing `dir` would delete. An
/// unreadable manifest lists nothing, so everything but it counts.
fn unlisted_entries(dir: &Path) -> Result<Vec<String>, ExportError> {
    let listed: Vec<String> = std::fs::read_to_string(dir.join(MANIFEST_FILE))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|m| {
            m.get("files")
                .and_then(|f| f.as_object())
                .map(|f| f.keys().cloned().collect())
        })
        .unwrap_or_default();
    let mut others = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|source| io_err(dir, source))? {
        let name = entry
            .map_err(|source| io_err(dir, source))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name != MANIFEST_FILE && !listed.contains(&name) {
            others.push(name);
        }
    }
    others.sort();
    Ok(others)
}

/// Moves the verified staging directory to `out`. An existing `out` is replaced only if it is
/// empty, or a bundle (has a manifest) holding nothing its manifest does not list: anything
/// else is a user's directory or a user's files (a model card next to the graphs), never
/// deleted.
pub(crate) fn publish(staging: duet_fsio::TempDir, out: &Path) -> Result<(), ExportError> {
    if out.exists() {
        let is_bundle = out.join(MANIFEST_FILE).is_file();
        let is_empty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !(is_bundle || is_empty) {
            return Err(ExportError::OutputNotBundle {
                path: out.to_owned(),
            });
        }
        if is_bundle {
            let others = unlisted_entries(out)?;
            if !others.is_empty() {
                return Err(ExportError::OutputHasOtherFiles {
                    path: out.to_owned(),
                    others,
                });
            }
        }
    }
    // The previous bundle is moved aside and removed only once the new one is in place; a
    // failed swap puts it back.
    duet_fsio::replace_dir(staging, out).map_err(|source| io_err(out, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A staging directory holding a new bundle's manifest and one graph, and its path.
    fn staging(root: &Path) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::Builder::new()
            .prefix(".staging")
            .tempdir_in(root)
            .unwrap();
        std::fs::write(dir.path().join("g.onnx"), b"new").unwrap();
        std::fs::write(
            dir.path().join(MANIFEST_FILE),
            r#"{"files": {"g.onnx": "x"}}"#,
        )
        .unwrap();
        let path = dir.path().to_path_buf();
        (dir, path)
    }

    fn old_bundle(out: &Path) {
        std::fs::create_dir(out).unwrap();
        std::fs::write(out.join("g.onnx"), b"old").unwrap();
        std::fs::write(out.join("old.onnx"), b"old").unwrap();
        std::fs::write(
            out.join(MANIFEST_FILE),
            r#"{"files": {"g.onnx": "x", "old.onnx": "y"}}"#,
        )
        .unwrap();
    }

    #[test]
    fn publish_replaces_a_bundle_that_holds_only_its_own_files() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("bundle");
        old_bundle(&out);
        let (staged, staged_path) = staging(root.path());
        publish(staged, &out).unwrap();
        assert_eq!(std::fs::read(out.join("g.onnx")).unwrap(), b"new");
        assert!(!out.join("old.onnx").exists(), "the old bundle's graphs go");
        assert!(!staged_path.exists());
        let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the bundle is left beside it");
    }

    #[test]
    fn publish_refuses_to_delete_files_the_old_manifest_does_not_list() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("bundle");
        old_bundle(&out);
        std::fs::write(out.join("MODEL_CARD.md"), b"# card").unwrap();
        std::fs::create_dir(out.join("eval")).unwrap();
        std::fs::write(out.join("eval/eval.json"), b"{}").unwrap();
        let (staged, staged_path) = staging(root.path());
        let err = publish(staged, &out).unwrap_err();
        match &err {
            ExportError::OutputHasOtherFiles { path, others } => {
                assert_eq!(path, &out);
                assert_eq!(others, &["MODEL_CARD.md", "eval"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string().contains("[\"MODEL_CARD.md\", \"eval\"]"),
            "{err}"
        );
        // Nothing was touched, and the staging directory was cleaned up.
        assert_eq!(std::fs::read(out.join("g.onnx")).unwrap(), b"old");
        assert_eq!(std::fs::read(out.join("MODEL_CARD.md")).unwrap(), b"# card");
        assert!(out.join("eval/eval.json").is_file());
        assert!(!staged_path.exists());
    }

    #[test]
    fn publish_refuses_a_directory_that_is_not_a_bundle_and_fills_an_empty_one() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("notes");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("todo.txt"), b"keep").unwrap();
        let (staged, _) = staging(root.path());
        let err = publish(staged, &out).unwrap_err();
        assert!(
            matches!(err, ExportError::OutputNotBundle { .. }),
            "{err:?}"
        );
        assert_eq!(std::fs::read(out.join("todo.txt")).unwrap(), b"keep");

        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let (staged, _) = staging(root.path());
        publish(staged, &empty).unwrap();
        assert_eq!(std::fs::read(empty.join("g.onnx")).unwrap(), b"new");
    }
}
