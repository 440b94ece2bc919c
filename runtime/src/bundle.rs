//! Opening and verifying a bundle directory.
//!
//! A bundle is only trusted after [`Bundle::open`] has checked, in this order: the manifest
//! parses, its schema version is the one this runtime understands, every file name is a plain
//! name inside the bundle, every listed file exists with the recorded sha256, and the required
//! graphs declare exactly the I/O of `docs/ARCHITECTURE.md`. Each failure is a typed
//! [`BundleError`] naming the file or the manifest field, so a user can tell a truncated
//! download from an exporter/runtime version mismatch.

use std::fs::File;
use std::io;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::manifest::{
    DType, DimSpec, GraphSpec, Manifest, TensorSpec, CAPTION_DECODER, DENOISER, FUSION_HEAD,
    MANIFEST_FILE, RESTORER_I2T, RESTORER_T2I, SCHEMA_VERSION, TEXT_ENCODER, VISION_ENCODER,
};

/// Why a bundle was refused.
#[derive(Debug, Error)]
pub enum BundleError {
    #[error("bundle file missing: {}", path.display())]
    MissingFile { path: PathBuf },
    #[error("sha256 mismatch for {file}: manifest says {expected}, file has {actual}")]
    HashMismatch {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("unsupported manifest schema_version {found} (this runtime reads {supported})")]
    SchemaVersion { found: u32, supported: u32 },
    #[error("bad manifest field `{field}`: {reason}")]
    BadManifest { field: String, reason: String },
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not valid manifest JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> BundleError {
    BundleError::BadManifest {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A verified bundle: its directory and parsed manifest.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
}

impl Bundle {
    /// Reads and verifies the bundle in `dir` (see the module docs for what is checked).
    pub fn open(dir: impl AsRef<Path>) -> Result<Bundle, BundleError> {
        let dir = dir.as_ref().to_path_buf();
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&manifest_path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BundleError::MissingFile {
                    path: manifest_path,
                })
            }
            Err(source) => {
                return Err(BundleError::Io {
                    path: manifest_path,
                    source,
                })
            }
        };
        // Check the version before the full parse: a future schema may not deserialize into
        // these types at all, and "unsupported version" is the useful message then.
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| BundleError::Json {
                path: manifest_path.clone(),
                source,
            })?;
        match raw.get("schema_version").and_then(|v| v.as_u64()) {
            Some(v) if v == u64::from(SCHEMA_VERSION) => {}
            Some(v) => {
                return Err(BundleError::SchemaVersion {
                    found: u32::try_from(v).unwrap_or(u32::MAX),
                    supported: SCHEMA_VERSION,
                })
            }
            None => {
                return Err(bad(
                    "schema_version",
                    "missing or not a non-negative integer",
                ))
            }
        }
        let manifest: Manifest =
            serde_json::from_value(raw).map_err(|source| BundleError::Json {
                path: manifest_path,
                source,
            })?;
        verify_files(&dir, &manifest)?;
        validate_manifest(&manifest)?;
        Ok(Bundle { dir, manifest })
    }

    /// The bundle directory as given to [`Bundle::open`].
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The graph called `name`, if present.
    pub fn graph(&self, name: &str) -> Option<&GraphSpec> {
        self.manifest.graph(name)
    }

    /// Path of the ONNX file of graph `name`.
    pub fn graph_path(&self, name: &str) -> Result<PathBuf, BundleError> {
        let g = self
            .graph(name)
            .ok_or_else(|| bad("graphs", format!("no graph named `{name}`")))?;
        Ok(self.dir.join(&g.file))
    }

    /// Path of `tokenizer.json` (or whatever the manifest names it).
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.tokenizer.file)
    }

    /// Loads the bundle's tokenizer and checks its vocabulary against `model.vocab_size`;
    /// on failure returns the file and the reason (each pipeline wraps them in its own error).
    pub fn load_tokenizer(&self) -> Result<tokenizers::Tokenizer, (PathBuf, String)> {
        let path = self.tokenizer_path();
        let tokenizer = match tokenizers::Tokenizer::from_file(&path) {
            Ok(t) => t,
            Err(e) => return Err((path, e.to_string())),
        };
        let (vocab, want) = (
            tokenizer.get_vocab_size(true),
            self.manifest.model.vocab_size,
        );
        if vocab != want {
            return Err((
                path,
                format!("it has {vocab} tokens but model.vocab_size is {want}"),
            ));
        }
        Ok(tokenizer)
    }
}

/// Lowercase hex sha256 of a file, streamed (graphs can be large).
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// True for a name that stays inside the bundle directory: one normal path component, no
/// separators of either platform, no `.`/`..`, not absolute.
pub fn is_plain_file_name(name: &str) -> bool {
    if name.is_empty() || name.contains('/') || name.contains('\\') || name.contains('\0') {
        return false;
    }
    let mut comps = Path::new(name).components();
    matches!(
        (comps.next(), comps.next()),
        (Some(Component::Normal(_)), None)
    )
}

fn verify_files(dir: &Path, m: &Manifest) -> Result<(), BundleError> {
    if m.files.is_empty() {
        return Err(bad("files", "no files listed"));
    }
    for (name, expected) in &m.files {
        if !is_plain_file_name(name) {
            return Err(bad(
                format!("files[{name:?}]"),
                "not a plain file name inside the bundle (no `/`, `..` or absolute paths)",
            ));
        }
        let expected_norm = expected.to_ascii_lowercase();
        if expected_norm.len() != 64 || !expected_norm.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(
                format!("files[{name:?}]"),
                format!("`{expected}` is not a sha256 hex digest"),
            ));
        }
        let path = dir.join(name);
        if !path.is_file() {
            return Err(BundleError::MissingFile { path });
        }
        let actual = sha256_file(&path).map_err(|source| BundleError::Io {
            path: path.clone(),
            source,
        })?;
        if actual != expected_norm {
            return Err(BundleError::HashMismatch {
                file: name.clone(),
                expected: expected.clone(),
                actual,
            });
        }
    }
    Ok(())
}

fn validate_manifest(m: &Manifest) -> Result<(), BundleError> {
    let s = &m.model;
    let positive = [
        ("model.image_size", s.image_size),
        ("model.channels", s.channels),
        ("model.patch_size", s.patch_size),
        ("model.d_model", s.d_model),
        ("model.n_heads", s.n_heads),
        ("model.decoder_layers", s.decoder_layers),
        ("model.embed_dim", s.embed_dim),
        ("model.vocab_size", s.vocab_size),
        ("model.max_len", s.max_len),
    ];
    for (field, v) in positive {
        if v == 0 {
            return Err(bad(field, "must be > 0"));
        }
    }
    if !s.image_size.is_multiple_of(s.patch_size) {
        return Err(bad(
            "model.patch_size",
            format!(
                "{} does not divide image_size {}",
                s.patch_size, s.image_size
            ),
        ));
    }
    if !s.d_model.is_multiple_of(s.n_heads) {
        return Err(bad(
            "model.n_heads",
            format!("{} does not divide d_model {}", s.n_heads, s.d_model),
        ));
    }
    if s.channels != 3 {
        return Err(bad(
            "model.channels",
            format!("{} (only RGB, 3, is supported)", s.channels),
        ));
    }
    if m.image.size != s.image_size {
        return Err(bad(
            "image.size",
            format!("{} but model.image_size is {}", m.image.size, s.image_size),
        ));
    }
    if m.image.channels != s.channels {
        return Err(bad(
            "image.channels",
            format!("{} but model.channels is {}", m.image.channels, s.channels),
        ));
    }
    for (i, sd) in m.image.std.iter().enumerate() {
        if !sd.is_finite() || *sd == 0.0 {
            return Err(bad(
                format!("image.std[{i}]"),
                format!("{sd} (must be finite, non-zero)"),
            ));
        }
    }
    let t = &m.tokenizer;
    if !m.files.contains_key(&t.file) {
        return Err(bad(
            "tokenizer.file",
            format!("`{}` is not listed in `files`", t.file),
        ));
    }
    for (field, id) in [
        ("tokenizer.pad_id", t.pad_id),
        ("tokenizer.bos_id", t.bos_id),
        ("tokenizer.eos_id", t.eos_id),
        ("tokenizer.unk_id", t.unk_id),
    ] {
        if id as usize >= s.vocab_size {
            return Err(bad(
                field,
                format!("{id} >= model.vocab_size {}", s.vocab_size),
            ));
        }
    }
    if t.max_len < 2 {
        return Err(bad("tokenizer.max_len", "must be >= 2 (BOS and EOS)"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for g in &m.graphs {
        if !seen.insert(g.name.as_str()) {
            return Err(bad(
                format!("graphs[{}]", g.name),
                "graph name listed twice",
            ));
        }
        if !m.files.contains_key(&g.file) {
            return Err(bad(
                format!("graphs[{}].file", g.name),
                format!("`{}` is not listed in `files`", g.file),
            ));
        }
    }
    for (name, contract) in [
        (VISION_ENCODER, vision_encoder_contract(m)),
        (CAPTION_DECODER, caption_decoder_contract(m)),
    ] {
        let g = m
            .graph(name)
            .ok_or_else(|| bad("graphs", format!("required graph `{name}` is missing")))?;
        check_graph(g, &contract)?;
    }
    validate_generation(m)?;
    validate_restoration(m)
}

/// Restoration is optional, but all of it or none: both restorers, the head and the `restore`
/// section; it needs the text encoder for text embeddings.
fn validate_restoration(m: &Manifest) -> Result<(), BundleError> {
    let graphs = [RESTORER_T2I, RESTORER_I2T, FUSION_HEAD].map(|n| m.graph(n));
    let spec = match (&graphs, &m.restore) {
        ([None, None, None], None) => return Ok(()),
        ([Some(_), Some(_), Some(_)], Some(spec)) => spec,
        (g, spec) => {
            let have = |b: bool| if b { "present" } else { "missing" };
            return Err(bad(
                "graphs",
                format!(
                    "restoration is incomplete: `{RESTORER_T2I}` {}, `{RESTORER_I2T}` {}, \
                     `{FUSION_HEAD}` {}, `restore` section {}",
                    have(g[0].is_some()),
                    have(g[1].is_some()),
                    have(g[2].is_some()),
                    have(spec.is_some())
                ),
            ));
        }
    };
    if m.graph(TEXT_ENCODER).is_none() {
        return Err(bad(
            "graphs",
            format!("restoration needs the `{TEXT_ENCODER}` graph for text embeddings"),
        ));
    }
    if spec.classes.len() < 2 {
        return Err(bad("restore.classes", "must name at least 2 classes"));
    }
    // `duet classify` reports a class by name: a blank or repeated name would make two
    // different answers print the same.
    for (k, name) in spec.classes.iter().enumerate() {
        if name.trim().is_empty() {
            return Err(bad(
                "restore.classes",
                format!("class {k} has an empty name"),
            ));
        }
        if spec.classes[..k].contains(name) {
            return Err(bad(
                "restore.classes",
                format!("class name {name:?} repeats"),
            ));
        }
    }
    if spec.task.trim().is_empty() {
        return Err(bad("restore.task", "is empty"));
    }
    duet_diffusion::NoiseSchedule::from_alphas_cumprod(spec.alphas_cumprod.clone())
        .map_err(|e| bad("restore.alphas_cumprod", e.to_string()))?;
    if spec.sampler_steps == 0 || spec.sampler_steps > spec.alphas_cumprod.len() {
        return Err(bad(
            "restore.sampler_steps",
            format!(
                "{} (must be 1 ..= {} training timesteps)",
                spec.sampler_steps,
                spec.alphas_cumprod.len()
            ),
        ));
    }
    let e = m.model.embed_dim;
    for g in [&graphs[0], &graphs[1]].into_iter().flatten() {
        check_graph(g, &restorer_contract(e))?;
    }
    if let Some(head) = graphs[2] {
        check_graph(head, &fusion_head_contract(e, spec.classes.len()))?;
    }
    Ok(())
}

/// The generation direction is optional, but all of it or none: both graphs, the diffusion
/// section and the generator's dimensions.
fn validate_generation(m: &Manifest) -> Result<(), BundleError> {
    let text = m.graph(TEXT_ENCODER);
    let denoiser = m.graph(DENOISER);
    let (text, denoiser, spec) = match (text, denoiser, &m.diffusion) {
        (None, None, None) => return Ok(()),
        (Some(t), Some(d), Some(spec)) => (t, d, spec),
        (t, d, spec) => {
            let have = |b: bool| if b { "present" } else { "missing" };
            return Err(bad(
                "graphs",
                format!(
                    "the generation direction is incomplete: `{TEXT_ENCODER}` {}, `{DENOISER}` \
                     {}, `diffusion` section {}",
                    have(t.is_some()),
                    have(d.is_some()),
                    have(spec.is_some())
                ),
            ));
        }
    };
    let s = &m.model;
    for (field, v) in [
        ("model.text_layers", s.text_layers),
        ("model.denoiser_layers", s.denoiser_layers),
        ("model.denoiser_patch_size", s.denoiser_patch_size),
    ] {
        if v == 0 {
            return Err(bad(field, "must be > 0 in a bundle with a generator"));
        }
    }
    if !s.image_size.is_multiple_of(s.denoiser_patch_size) {
        return Err(bad(
            "model.denoiser_patch_size",
            format!(
                "{} does not divide image_size {}",
                s.denoiser_patch_size, s.image_size
            ),
        ));
    }
    duet_diffusion::NoiseSchedule::from_alphas_cumprod(spec.alphas_cumprod.clone())
        .map_err(|e| bad("diffusion.alphas_cumprod", e.to_string()))?;
    if spec.default_steps == 0 || spec.default_steps > spec.alphas_cumprod.len() {
        return Err(bad(
            "diffusion.default_steps",
            format!(
                "{} (must be 1 ..= {} training timesteps)",
                spec.default_steps,
                spec.alphas_cumprod.len()
            ),
        ));
    }
    if !(spec.default_guidance.is_finite() && spec.default_guidance >= 0.0) {
        return Err(bad(
            "diffusion.default_guidance",
            format!("{} (must be finite and >= 0)", spec.default_guidance),
        ));
    }
    check_graph(text, &text_encoder_contract(m))?;
    check_graph(denoiser, &denoiser_contract(m))
}

/// One expected axis: a fixed size derived from the model config, or "any symbolic name".
#[derive(Debug, Clone, Copy)]
enum Want {
    Fixed(usize),
    /// Dynamic in the contract (`batch`, `seq`, `past`, `total`); the exporter may name it as
    /// it likes, but it must not be frozen to a number or the runtime could not vary it.
    Sym,
}

struct Contract {
    inputs: Vec<(String, DType, Vec<Want>)>,
    outputs: Vec<(String, DType, Vec<Want>)>,
}

fn vision_encoder_contract(m: &Manifest) -> Contract {
    let s = &m.model;
    let p = s.num_patches();
    Contract {
        inputs: vec![(
            "pixels".into(),
            DType::F32,
            vec![
                Want::Sym,
                Want::Fixed(s.channels),
                Want::Fixed(s.image_size),
                Want::Fixed(s.image_size),
            ],
        )],
        outputs: vec![
            (
                "patch_tokens".into(),
                DType::F32,
                vec![Want::Sym, Want::Fixed(p), Want::Fixed(s.d_model)],
            ),
            (
                "embedding".into(),
                DType::F32,
                vec![Want::Sym, Want::Fixed(s.embed_dim)],
            ),
        ],
    }
}

fn caption_decoder_contract(m: &Manifest) -> Contract {
    let s = &m.model;
    let (h, dh) = (s.n_heads, s.head_dim());
    let kv = || vec![Want::Sym, Want::Fixed(h), Want::Sym, Want::Fixed(dh)];
    let mut inputs = vec![
        ("input_ids".into(), DType::I64, vec![Want::Sym, Want::Sym]),
        (
            "position_ids".into(),
            DType::I64,
            vec![Want::Sym, Want::Sym],
        ),
        (
            "attn_bias".into(),
            DType::F32,
            vec![Want::Sym, Want::Fixed(1), Want::Sym, Want::Sym],
        ),
        (
            "image_tokens".into(),
            DType::F32,
            vec![
                Want::Sym,
                Want::Fixed(s.num_patches()),
                Want::Fixed(s.d_model),
            ],
        ),
    ];
    let mut outputs = vec![(
        "logits".into(),
        DType::F32,
        vec![Want::Sym, Want::Sym, Want::Fixed(s.vocab_size)],
    )];
    for l in 0..s.decoder_layers {
        inputs.push((format!("past_key_{l}"), DType::F32, kv()));
        inputs.push((format!("past_value_{l}"), DType::F32, kv()));
        outputs.push((format!("present_key_{l}"), DType::F32, kv()));
        outputs.push((format!("present_value_{l}"), DType::F32, kv()));
    }
    Contract { inputs, outputs }
}

fn text_encoder_contract(m: &Manifest) -> Contract {
    let s = &m.model;
    let l = m.tokenizer.max_len;
    Contract {
        inputs: vec![
            (
                "input_ids".into(),
                DType::I64,
                vec![Want::Sym, Want::Fixed(l)],
            ),
            (
                "attn_mask".into(),
                DType::F32,
                vec![Want::Sym, Want::Fixed(l)],
            ),
        ],
        outputs: vec![
            (
                "text_tokens".into(),
                DType::F32,
                vec![Want::Sym, Want::Fixed(l), Want::Fixed(s.d_model)],
            ),
            (
                "text_embedding".into(),
                DType::F32,
                vec![Want::Sym, Want::Fixed(s.embed_dim)],
            ),
        ],
    }
}

fn denoiser_contract(m: &Manifest) -> Contract {
    let s = &m.model;
    let img = || {
        vec![
            Want::Sym,
            Want::Fixed(s.channels),
            Want::Fixed(s.image_size),
            Want::Fixed(s.image_size),
        ]
    };
    Contract {
        inputs: vec![
            ("x".into(), DType::F32, img()),
            ("timestep".into(), DType::F32, vec![Want::Sym]),
            (
                "text_tokens".into(),
                DType::F32,
                vec![Want::Sym, Want::Sym, Want::Fixed(s.d_model)],
            ),
            ("text_mask".into(), DType::F32, vec![Want::Sym, Want::Sym]),
        ],
        outputs: vec![("prediction".into(), DType::F32, img())],
    }
}

fn restorer_contract(e: usize) -> Contract {
    let row = || vec![Want::Sym, Want::Fixed(e)];
    Contract {
        inputs: vec![
            ("x".into(), DType::F32, row()),
            ("timestep".into(), DType::F32, vec![Want::Sym]),
            ("condition".into(), DType::F32, row()),
        ],
        outputs: vec![
            ("prediction".into(), DType::F32, row()),
            ("trust".into(), DType::F32, vec![Want::Sym, Want::Fixed(1)]),
            ("restored".into(), DType::F32, row()),
        ],
    }
}

fn fusion_head_contract(e: usize, classes: usize) -> Contract {
    let row = || vec![Want::Sym, Want::Fixed(e)];
    Contract {
        inputs: vec![
            ("image_embedding".into(), DType::F32, row()),
            ("text_embedding".into(), DType::F32, row()),
        ],
        outputs: vec![(
            "logits".into(),
            DType::F32,
            vec![Want::Sym, Want::Fixed(classes)],
        )],
    }
}

fn check_graph(g: &GraphSpec, c: &Contract) -> Result<(), BundleError> {
    // Inputs must match exactly: an extra input would never be fed and fail at run time.
    for t in &g.inputs {
        if !c.inputs.iter().any(|(n, _, _)| *n == t.name) {
            return Err(bad(
                format!("graphs[{}].inputs[{}]", g.name, t.name),
                "not an input of the contract",
            ));
        }
    }
    for (name, dtype, shape) in &c.inputs {
        let t = g.input(name).ok_or_else(|| {
            bad(
                format!("graphs[{}].inputs", g.name),
                format!("missing input `{name}`"),
            )
        })?;
        check_tensor(&g.name, "inputs", t, *dtype, shape)?;
    }
    // Extra outputs are harmless (the runtime ignores them); the contract's must all be there.
    for (name, dtype, shape) in &c.outputs {
        let t = g.output(name).ok_or_else(|| {
            bad(
                format!("graphs[{}].outputs", g.name),
                format!("missing output `{name}`"),
            )
        })?;
        check_tensor(&g.name, "outputs", t, *dtype, shape)?;
    }
    Ok(())
}

fn check_tensor(
    graph: &str,
    side: &str,
    t: &TensorSpec,
    dtype: DType,
    shape: &[Want],
) -> Result<(), BundleError> {
    let field = |f: &str| format!("graphs[{graph}].{side}[{}].{f}", t.name);
    if t.dtype != dtype {
        return Err(bad(
            field("dtype"),
            format!("{} but the contract says {dtype}", t.dtype),
        ));
    }
    if t.shape.len() != shape.len() {
        return Err(bad(
            field("shape"),
            format!(
                "rank {} but the contract says rank {}",
                t.shape.len(),
                shape.len()
            ),
        ));
    }
    for (i, (have, want)) in t.shape.iter().zip(shape).enumerate() {
        let ok = match (have, want) {
            (DimSpec::Fixed(a), Want::Fixed(b)) => a == b,
            (DimSpec::Symbolic(s), Want::Sym) => !s.is_empty(),
            _ => false,
        };
        if !ok {
            let want = match want {
                Want::Fixed(n) => n.to_string(),
                Want::Sym => "a symbolic (dynamic) axis".to_string(),
            };
            return Err(bad(
                field(&format!("shape[{i}]")),
                format!("`{have}` but the contract says {want}"),
            ));
        }
    }
    Ok(())
}
