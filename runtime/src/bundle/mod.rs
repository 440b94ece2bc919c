//! Opening and verifying a bundle directory.
//!
//! A bundle is only trusted after [`Bundle::open`] has checked, in this order: the manifest
//! is a regular file under its size cap and parses with no key repeated, its schema version is
//! the one this runtime understands, every file name is a plain name inside the bundle, every
//! dimension is inside the bounds of [`limits`] (checked arithmetic, before anything is
//! allocated from them), the required graphs declare exactly the I/O of
//! `docs/ARCHITECTURE.md`, and every listed file is a regular file (not a symlink), read once
//! under its cap, with the recorded sha256. Graphs and the tokenizer are later loaded from
//! those same bytes, never read again from disk, so a file swapped after the check is never
//! loaded. Each failure is a typed [`BundleError`] naming the file or the manifest field, so a
//! user can tell a truncated download from an exporter/runtime version mismatch.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use duet_fsio::{Cap, Follow, ReadError};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use sha2::{Digest, Sha256};
use thiserror::Error;

pub use crate::display::escape_controls;
use crate::engine::{IoInfo, MODEL_FILE_CAP};

use crate::manifest::{
    DimSpec, Graph, GraphSpec, Manifest, Precision, MANIFEST_FILE, SCHEMA_VERSION,
};

pub mod archive;
mod contract;
mod validate;

use contract::*;
use validate::*;

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
    /// A bundle file that is not one to read: a symlink, a FIFO or device, over its size cap.
    #[error("bundle file refused: {0}")]
    File(ReadError),
    /// A loaded graph whose real inputs or outputs differ from what the manifest declares.
    #[error("graph `{graph}` does not match the manifest: {reason}")]
    GraphMismatch { graph: String, reason: String },
    /// A single-file bundle that is not a plain archive of plain files.
    #[error("single-file bundle {} refused: {reason}", path.display())]
    Archive { path: PathBuf, reason: String },
    /// A precision asked for that the bundle has no variant of.
    #[error(
        "the bundle has no {precision} variant (it has: {}); make one with `duet-export \
         quantize --bundle BUNDLE --precision {precision}`",
        available.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
    )]
    MissingPrecision {
        precision: Precision,
        available: Vec<Precision>,
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
        field: escape_controls(&field.into()),
        reason: escape_controls(&reason.into()),
    }
}

/// Hard upper bounds on what a manifest may ask for, checked before anything is allocated from
/// it. Generous for the models duet trains (the shipped `small` bundle uses 32 px images, 128
/// wide, 48 tokens), small enough that no bundle can make the runtime allocate gigabytes.
pub mod limits {
    /// Side of the square input image, in pixels: the trainers' limit too.
    pub const MAX_IMAGE_SIZE: usize = duet_spec::MAX_IMAGE_SIZE;
    /// Model width, embedding width.
    pub const MAX_WIDTH: usize = 8192;
    /// Attention heads.
    pub const MAX_HEADS: usize = 256;
    /// Layers of any stack.
    pub const MAX_LAYERS: usize = 256;
    /// MLP ratio.
    pub const MAX_MLP_RATIO: usize = 64;
    /// Vocabulary size.
    pub const MAX_VOCAB: usize = 1 << 20;
    /// Tokens per sequence (model and tokenizer).
    pub const MAX_SEQ_LEN: usize = 4096;
    /// Image patches or denoiser tokens per image.
    pub const MAX_TOKENS: usize = 16384;
    /// Bytes of one sequence's KV cache (`2 · layers · max_len · d_model · 4`).
    pub const MAX_KV_CACHE_BYTES: usize = 1 << 30;
    /// Diffusion training timesteps (length of `alphas_cumprod`).
    pub const MAX_TIMESTEPS: usize = 100_000;
    /// Classes of the fusion head.
    pub const MAX_CLASSES: usize = 100_000;
    /// Files listed in the manifest.
    pub const MAX_FILES: usize = 64;
    /// All listed files together, in bytes.
    pub const MAX_BUNDLE_BYTES: u64 = 4 << 30;
}

/// The largest `manifest.json` read (the shipped one is 68 KB).
pub const MANIFEST_CAP: Cap = Cap::new(16 << 20, "a bundle manifest");

/// A verified bundle: its directory, parsed manifest, and the bytes of every file it lists,
/// read once and hashed (cheap to clone: the bytes are shared).
#[derive(Clone)]
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
    /// `manifest.json` as read (what [`archive::pack`] and [`archive::unpack`] write back).
    manifest_text: Arc<str>,
    files: Arc<BTreeMap<String, Arc<[u8]>>>,
    /// Which files [`Bundle::graph_bytes`] hands out: the fp32 graphs or a variant's.
    precision: Precision,
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sizes: BTreeMap<&str, usize> = self
            .files
            .iter()
            .map(|(n, b)| (n.as_str(), b.len()))
            .collect();
        f.debug_struct("Bundle")
            .field("dir", &self.dir)
            .field("name", &self.manifest.name)
            .field("file_bytes", &sizes)
            .finish_non_exhaustive()
    }
}

impl Bundle {
    /// Reads and verifies the bundle at `path`: a directory, or a single-file bundle (an
    /// archive of the same files, see [`archive`]), every file it lists (all precisions). See
    /// the module docs for what is checked. What only runs one precision should use
    /// [`Bundle::open_for`], which reads only that precision's files.
    pub fn open(path: impl AsRef<Path>) -> Result<Bundle, BundleError> {
        Bundle::open_selected(path.as_ref(), None)
    }

    /// [`Bundle::open`] for running at `precision`: the manifest is verified whole, but only
    /// the tokenizer and that precision's graph files are read and hashed (a bundle with
    /// variants holds two or three copies of every graph; reading and hashing the others
    /// would only slow the start). A single-file bundle is still read through whole (one pass
    /// over the archive), but only those files are hashed and kept. A precision the bundle
    /// lacks is
    /// [`BundleError::MissingPrecision`].
    pub fn open_for(path: impl AsRef<Path>, precision: Precision) -> Result<Bundle, BundleError> {
        Bundle::open_selected(path.as_ref(), Some(precision))
    }

    fn open_selected(path: &Path, precision: Option<Precision>) -> Result<Bundle, BundleError> {
        let path = path.to_path_buf();
        if std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            return Bundle::open_archive(path, precision);
        }
        let manifest_path = path.join(MANIFEST_FILE);
        let text = duet_fsio::read_capped_text(&manifest_path, MANIFEST_CAP, Follow::No)
            .map_err(file_error)?;
        let manifest = parse_manifest(&text, &manifest_path)?;
        let wanted = wanted_files(&manifest, precision)?;
        let files = read_files(&path, &manifest, &wanted)?;
        Ok(Bundle {
            dir: path,
            manifest,
            manifest_text: text.into(),
            files: Arc::new(files),
            precision: precision.unwrap_or(Precision::Fp32),
        })
    }

    /// [`Bundle::open`] of a single-file bundle: every entry read from one pass over the file,
    /// then the same checks as a directory's files, on those bytes.
    fn open_archive(path: PathBuf, precision: Option<Precision>) -> Result<Bundle, BundleError> {
        let mut entries = archive::read_entries(&path)?;
        let manifest_path = path.join(MANIFEST_FILE);
        let text = entries
            .remove(MANIFEST_FILE)
            .ok_or_else(|| BundleError::MissingFile {
                path: manifest_path.clone(),
            })?;
        let text = String::from_utf8(text).map_err(|e| BundleError::Archive {
            path: path.clone(),
            reason: format!("{MANIFEST_FILE} is not UTF-8: {e}"),
        })?;
        let manifest = parse_manifest(&text, &manifest_path)?;
        if let Some(extra) = entries.keys().find(|n| !manifest.files.contains_key(*n)) {
            return Err(BundleError::Archive {
                path: path.clone(),
                reason: format!(
                    "entry `{}` is not listed in the manifest",
                    escape_controls(extra)
                ),
            });
        }
        let wanted = wanted_files(&manifest, precision)?;
        let mut files = BTreeMap::new();
        for (name, expected) in manifest.files.iter().filter(|(n, _)| wanted.contains(*n)) {
            let bytes = entries
                .remove(name)
                .ok_or_else(|| BundleError::MissingFile {
                    path: path.join(name),
                })?;
            check_hash(name, expected, &bytes)?;
            files.insert(name.clone(), Arc::from(bytes));
        }
        Ok(Bundle {
            dir: path,
            manifest,
            manifest_text: text.into(),
            files: Arc::new(files),
            precision: precision.unwrap_or(Precision::Fp32),
        })
    }

    /// The bundle's path as given to [`Bundle::open`] (a directory or a single file).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The same bundle, handing out the graph files of `precision` (the fp32 graphs, or the
    /// variant of that precision); a precision the bundle lacks is a typed error naming those
    /// it has. Cheap: the bytes were read and verified by [`Bundle::open`].
    pub fn with_precision(mut self, precision: Precision) -> Result<Bundle, BundleError> {
        if precision != Precision::Fp32 && self.manifest.variant(precision).is_none() {
            return Err(BundleError::MissingPrecision {
                precision,
                available: self.manifest.precisions(),
            });
        }
        let needed: Vec<&String> = match self.manifest.variant(precision) {
            Some(v) => v.files.values().collect(),
            None => self.manifest.graphs.iter().map(|g| &g.file).collect(),
        };
        if let Some(missing) = needed.iter().find(|f| !self.files.contains_key(**f)) {
            return Err(bad(
                format!("files[{missing:?}]"),
                format!(
                    "not read: the bundle was opened for {} only (open it with \
                     `Bundle::open_for(path, {precision})` or `Bundle::open`)",
                    self.precision
                ),
            ));
        }
        self.precision = precision;
        Ok(self)
    }

    /// The precision whose graph files [`Bundle::graph_bytes`] hands out.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The file `graph` loads from at the bundle's precision.
    fn graph_file(&self, graph: Graph) -> Result<&str, BundleError> {
        let g = self.require(graph)?;
        match self.manifest.variant(self.precision) {
            // Validated at open: a variant names a file for every graph.
            Some(v) => v.files.get(&graph).map(String::as_str).ok_or_else(|| {
                bad(
                    format!("variants[{}].files", self.precision),
                    format!("no file for graph `{graph}`"),
                )
            }),
            None => Ok(&g.file),
        }
    }

    /// The bundle's `graph`, if present.
    pub fn graph(&self, graph: Graph) -> Option<&GraphSpec> {
        self.manifest.graph(graph)
    }

    /// The bundle's `graph`, or the error that it has none.
    fn require(&self, graph: Graph) -> Result<&GraphSpec, BundleError> {
        self.graph(graph)
            .ok_or_else(|| bad("graphs", format!("no graph named `{graph}`")))
    }

    /// Path of `graph`'s ONNX file at the bundle's precision (for messages: load from
    /// [`Bundle::graph_bytes`]).
    pub fn graph_path(&self, graph: Graph) -> Result<PathBuf, BundleError> {
        Ok(self.dir.join(self.graph_file(graph)?))
    }

    /// The verified bytes of `graph`'s ONNX file at the bundle's precision, as read and hashed
    /// by [`Bundle::open`].
    pub fn graph_bytes(&self, graph: Graph) -> Result<Arc<[u8]>, BundleError> {
        let file = self.graph_file(graph)?;
        self.file_bytes(file)
            .ok_or_else(|| bad(format!("graphs[{graph}].file"), "not listed in `files`"))
    }

    /// The verified bytes of a file listed in the manifest.
    pub fn file_bytes(&self, file: &str) -> Option<Arc<[u8]>> {
        self.files.get(file).cloned()
    }

    /// Checks a loaded graph's real inputs (names, element types, fixed axes) and outputs
    /// against what the manifest declares for it, so a graph swapped between roles or a
    /// manifest that lies about a dimension is refused when the graph loads, not at the first
    /// inference.
    pub fn check_loaded_graph(
        &self,
        graph: Graph,
        inputs: &[IoInfo],
        outputs: &[IoInfo],
    ) -> Result<(), BundleError> {
        let outputs: Vec<String> = outputs.iter().map(|o| o.name.clone()).collect();
        let g = self.require(graph)?;
        let mismatch = |reason: String| BundleError::GraphMismatch {
            graph: graph.name().to_string(),
            reason: escape_controls(&reason),
        };
        let declared: Vec<&str> = g.inputs.iter().map(|t| t.name.as_str()).collect();
        let real: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        let (mut d_sorted, mut r_sorted) = (declared.clone(), real.clone());
        d_sorted.sort_unstable();
        r_sorted.sort_unstable();
        if d_sorted != r_sorted {
            return Err(mismatch(format!(
                "the graph's inputs are [{}], the manifest declares [{}]",
                real.join(", "),
                declared.join(", ")
            )));
        }
        for info in inputs {
            let spec = g.input(&info.name).expect("same names, checked above");
            if info.dtype != Some(spec.dtype) {
                let real = info
                    .dtype
                    .map_or("an unsupported type".to_string(), |d| d.to_string());
                return Err(mismatch(format!(
                    "input `{}` is {real}, the manifest says {}",
                    info.name, spec.dtype
                )));
            }
            let Some(dims) = &info.dims else { continue };
            if dims.len() != spec.shape.len() {
                return Err(mismatch(format!(
                    "input `{}` has rank {}, the manifest says {spec}",
                    info.name,
                    dims.len()
                )));
            }
            for (axis, (real, declared)) in dims.iter().zip(&spec.shape).enumerate() {
                // A fixed axis in the graph must be that number in the manifest; a dynamic one
                // accepts whatever the manifest fixes it to.
                if let Some(DimSpec::Fixed(n)) = real {
                    if *declared != DimSpec::Fixed(*n) {
                        return Err(mismatch(format!(
                            "input `{}` axis {axis} is {n} in the graph, `{declared}` in the manifest",
                            info.name
                        )));
                    }
                }
            }
        }
        for t in &g.outputs {
            if !outputs.contains(&t.name) {
                return Err(mismatch(format!(
                    "the manifest declares output `{}`, the graph's outputs are [{}]",
                    t.name,
                    outputs.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Path of `tokenizer.json` (or whatever the manifest names it).
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.tokenizer.file)
    }

    /// Loads the bundle's tokenizer and checks its vocabulary against `model.vocab_size`;
    /// on failure returns the file and the reason (each pipeline wraps them in its own error).
    pub fn load_tokenizer(&self) -> Result<tokenizers::Tokenizer, (PathBuf, String)> {
        let path = self.tokenizer_path();
        let Some(bytes) = self.file_bytes(&self.manifest.tokenizer.file) else {
            return Err((path, "not listed in `files`".to_string()));
        };
        // Valid JSON first (a typed error for the common damage), then the tokenizers crate
        // under `catch_unwind`: 0.22 panics (`expect("Helper")`) on a `decoder` that matches
        // none of its forms, which a hostile bundle can hold (kept in the fuzz corpus).
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
            return Err((path, format!("not valid JSON: {e}")));
        }
        let parsed = crate::panic_guard::catch(|| tokenizers::Tokenizer::from_bytes(&bytes));
        let tokenizer = match parsed {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err((path, escape_controls(&e.to_string()))),
            Err(panic) => {
                return Err((
                    path,
                    format!("the tokenizers library could not read it ({panic})"),
                ))
            }
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

/// Parses `manifest.json`'s text (`path` names it in errors) and checks everything that needs
/// no other file: no repeated key, the schema version, plain file names, every bound and
/// invariant, the required graphs' I/O contract.
fn parse_manifest(text: &str, path: &Path) -> Result<Manifest, BundleError> {
    let json_err = |source| BundleError::Json {
        path: path.to_path_buf(),
        source,
    };
    // serde_json keeps the last of two equal keys without a word; a manifest that says two
    // things about one field is refused instead.
    serde_json::from_str::<NoDuplicateKeys>(text).map_err(json_err)?;
    // Check the version before the full parse: a future schema may not deserialize into
    // these types at all, and "unsupported version" is the useful message then.
    let raw: serde_json::Value = serde_json::from_str(text).map_err(json_err)?;
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
    let manifest: Manifest = serde_json::from_value(raw).map_err(json_err)?;
    check_file_names(&manifest)?;
    validate_manifest(&manifest)?;
    Ok(manifest)
}

/// Checks `bytes` (the file `name`) against the manifest's sha256 for it.
fn check_hash(name: &str, expected: &str, bytes: &[u8]) -> Result<(), BundleError> {
    let actual = sha256_hex(bytes);
    if actual != expected.to_ascii_lowercase() {
        return Err(BundleError::HashMismatch {
            file: escape_controls(name),
            expected: escape_controls(expected),
            actual,
        });
    }
    Ok(())
}

/// Lowercase hex sha256 of a file (a regular file under the graph size cap).
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let bytes = duet_fsio::read_capped(path, MODEL_FILE_CAP, Follow::Yes).map_err(|e| match e {
        ReadError::Io { source, .. } => source,
        ReadError::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, e.to_string()),
        other => io::Error::other(other.to_string()),
    })?;
    Ok(sha256_hex(&bytes))
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn file_error(e: ReadError) -> BundleError {
    match e {
        ReadError::NotFound { path } => BundleError::MissingFile { path },
        ReadError::Io { path, source } => BundleError::Io { path, source },
        other => BundleError::File(other),
    }
}

/// Accepts any JSON value and fails on an object that repeats a key (at any depth).
struct NoDuplicateKeys;

impl<'de> Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeysVisitor)
    }
}

struct NoDuplicateKeysVisitor;

impl<'de> Visitor<'de> for NoDuplicateKeysVisitor {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(NoDuplicateKeys)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!(
                    "key {:?} appears twice in one object",
                    escape_controls(&key)
                )));
            }
            map.next_value::<NoDuplicateKeys>()?;
        }
        Ok(NoDuplicateKeys)
    }
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

/// Names and digests, before any file is opened.
fn check_file_names(m: &Manifest) -> Result<(), BundleError> {
    if m.files.is_empty() {
        return Err(bad("files", "no files listed"));
    }
    if m.files.len() > limits::MAX_FILES {
        return Err(bad(
            "files",
            format!("{} files (at most {})", m.files.len(), limits::MAX_FILES),
        ));
    }
    for (name, expected) in &m.files {
        if !is_plain_file_name(name) || name == MANIFEST_FILE {
            return Err(bad(
                format!("files[{name:?}]"),
                "not a plain file name inside the bundle (no `/`, `..`, absolute paths or the \
                 manifest itself)",
            ));
        }
        let expected_norm = expected.to_ascii_lowercase();
        if expected_norm.len() != 64 || !expected_norm.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(
                format!("files[{name:?}]"),
                format!("`{expected}` is not a sha256 hex digest"),
            ));
        }
    }
    Ok(())
}

/// The listed files a bundle opened for `precision` reads: all of them for `None`; else the
/// tokenizer and that precision's graph files (an error if the bundle has no such variant).
fn wanted_files(
    m: &Manifest,
    precision: Option<Precision>,
) -> Result<HashSet<String>, BundleError> {
    let Some(p) = precision else {
        return Ok(m.files.keys().cloned().collect());
    };
    let mut wanted = HashSet::from([m.tokenizer.file.clone()]);
    match p {
        Precision::Fp32 => wanted.extend(m.graphs.iter().map(|g| g.file.clone())),
        p => {
            let v = m.variant(p).ok_or_else(|| BundleError::MissingPrecision {
                precision: p,
                available: m.precisions(),
            })?;
            wanted.extend(v.files.values().cloned());
        }
    }
    Ok(wanted)
}

/// Reads every wanted listed file once — regular files only, symlinks not followed, each under the
/// graph cap and all under [`limits::MAX_BUNDLE_BYTES`] — and checks its sha256 on those bytes.
fn read_files(
    dir: &Path,
    m: &Manifest,
    wanted: &HashSet<String>,
) -> Result<BTreeMap<String, Arc<[u8]>>, BundleError> {
    let mut files = BTreeMap::new();
    let mut total = 0u64;
    for (name, expected) in m.files.iter().filter(|(n, _)| wanted.contains(*n)) {
        let path = dir.join(name);
        let bytes =
            duet_fsio::read_capped(&path, MODEL_FILE_CAP, Follow::No).map_err(file_error)?;
        total = total.saturating_add(bytes.len() as u64);
        if total > limits::MAX_BUNDLE_BYTES {
            return Err(bad(
                "files",
                format!(
                    "the listed files are larger than {} bytes together",
                    limits::MAX_BUNDLE_BYTES
                ),
            ));
        }
        check_hash(name, expected, &bytes)?;
        files.insert(name.clone(), Arc::from(bytes));
    }
    Ok(files)
}
