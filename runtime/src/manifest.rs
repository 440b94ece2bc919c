//! The bundle manifest (`manifest.json`).
//!
//! These types are the single definition of the manifest schema: the exporter writes a bundle
//! by filling a [`Manifest`] and serialising it, the runtime reads it back with the same types,
//! so the two can never disagree on a field name. Unknown fields are tolerated on read so that
//! newer exporters can add optional sections (schedules, sampler defaults …) without breaking
//! older runtimes; anything the runtime relies on is validated by [`crate::bundle::Bundle::open`].

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The manifest schema version this runtime reads and the exporter writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Name of the manifest file inside a bundle directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The graphs a bundle can hold (names, files, contracts).
pub use crate::graph::Graph;

/// Top level of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Must equal [`SCHEMA_VERSION`]; checked before anything else is trusted.
    pub schema_version: u32,
    /// Human-readable bundle name.
    pub name: String,
    /// Size preset the model was trained with (`tiny`, `small`).
    pub preset: String,
    /// Every model dimension (the spec the model was trained with).
    pub model: ModelSpec,
    /// Image size and normalisation expected by the vision encoder.
    pub image: ImageSpec,
    /// Tokenizer file and special token ids.
    pub tokenizer: TokenizerSpec,
    /// Every ONNX graph in the bundle with its I/O signature.
    pub graphs: Vec<GraphSpec>,
    /// Plain file name inside the bundle → lowercase hex sha256 of its bytes.
    pub files: BTreeMap<String, String>,
    /// Noise schedule and sampler defaults of the generation direction; present exactly when
    /// the bundle has the [`Graph::TextEncoder`] and [`Graph::Denoiser`] graphs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diffusion: Option<DiffusionSpec>,
    /// Missing-modality restoration and the task head; present exactly when the bundle has the
    /// [`Graph::RestorerT2i`], [`Graph::RestorerI2t`] and [`Graph::FusionHead`] graphs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreSpec>,
    /// Present when the caption decoder was trained to answer questions about the image (a
    /// question as its prompt: `duet ask`); absent for captioners trained on captions only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub questions: Option<QuestionsSpec>,
    /// Compressed copies of every graph (fp16, int8), each with its own files and measured task
    /// metrics; the graphs above are the fp32 originals. Empty in a bundle without variants
    /// (and ignored by runtimes that predate them: the fp32 graphs stay where they were).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<VariantSpec>,
    /// Task metrics of the fp32 graphs measured through the runtime, by the evaluation that
    /// also scored each variant (`duet-export quantize --eval-data`); empty when not measured.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// Training provenance (command, config, data, seed, metrics); free-form.
    #[serde(default)]
    pub provenance: serde_json::Value,
}

impl Manifest {
    /// The bundle's `graph`, if it has one.
    pub fn graph(&self, graph: Graph) -> Option<&GraphSpec> {
        self.graphs.iter().find(|g| g.name == graph)
    }

    /// The variant of `precision`, if the bundle has one (fp32 is the graphs themselves).
    pub fn variant(&self, precision: Precision) -> Option<&VariantSpec> {
        self.variants.iter().find(|v| v.precision == precision)
    }

    /// Every precision the bundle can run at: fp32, then its variants in manifest order.
    pub fn precisions(&self) -> Vec<Precision> {
        std::iter::once(Precision::Fp32)
            .chain(self.variants.iter().map(|v| v.precision))
            .collect()
    }

    /// Pretty JSON, the form written to `manifest.json`.
    pub fn to_json_pretty(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }
}

/// Model dimensions: the one spec type Burn's modules are built from and the exporter writes
/// (`duet-spec` has no Burn dependency, so the runtime stays free of Burn).
pub use duet_spec::{ImageFit, ModelSpec, Preset, SpecError};

/// What the vision encoder expects: a `size × size` RGB image (an image of another size or
/// shape made so by `fit`, as in training), scaled to `[0, 1]` by `x / 255` and then
/// normalised per channel as `(x - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSpec {
    pub size: usize,
    pub channels: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// A copy of `model.image_fit` (checked equal at load) beside the rest of the recipe, so
    /// a reader of the manifest sees how to prepare an image in one place.
    #[serde(default)]
    pub fit: ImageFit,
}

/// Tokenizer file (Hugging Face `tokenizers` JSON) and its fixed special ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerSpec {
    /// Plain file name inside the bundle (also listed in [`Manifest::files`]).
    pub file: String,
    pub pad_id: u32,
    pub bos_id: u32,
    pub eos_id: u32,
    pub unk_id: u32,
    /// Maximum caption length in tokens, BOS and EOS included.
    pub max_len: usize,
    /// Where the vocabulary came from: "trained on the run's captions", or "reused from PATH
    /// (sha256 …)" when a fine-tune or `--tokenizer` kept another model's. Absent in bundles
    /// exported before it was recorded, or when the run's caption stage cannot be found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// What a sampler needs to drive the bundle's denoiser: the exact schedule constants it was
/// trained with (not a formula to re-derive, so a runtime can never disagree with training)
/// and the defaults `duet generate` uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiffusionSpec {
    /// What the denoiser predicts (`epsilon` or `v`).
    pub prediction: duet_diffusion::Prediction,
    /// Name of the schedule the constants came from (`cosine`), for people reading the file.
    pub schedule: String,
    /// `ᾱ_t` for the training timesteps `t = 0 … T−1` (the denoiser's `timestep` input).
    pub alphas_cumprod: Vec<f64>,
    /// Default number of sampler steps.
    pub default_steps: usize,
    /// Default classifier-free guidance scale.
    pub default_guidance: f32,
}

/// How the caption decoder answers questions: trained on `[BOS] question ? answer [EOS]`
/// beside the captions, the question's words taking no loss.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuestionsSpec {
    /// Question-answer pairs in training (the folders' `questions.jsonl`).
    pub trained_on: usize,
}

/// How the bundle classifies an image + text pair and restores a missing modality's
/// embedding (see `docs/RESTORE.md`).
///
/// A restorer graph is one denoiser evaluation in a standardised feature space: the runtime
/// draws `x ~ N(0, I)` of shape `[1, embed_dim]`, runs deterministic DDIM (eta 0, no clipping)
/// with these constants, calling the graph once per step for its `prediction`, and calls it
/// once more on the final sample for `restored`, the embedding (statistics baked into the
/// graph, trust gate applied) that goes to the `fusion_head`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreSpec {
    /// Name of the task the head was trained on (`colour-column`, `shape-count`).
    pub task: String,
    /// Class names in logit order.
    pub classes: Vec<String>,
    /// What the restorers predict (`v`).
    pub prediction: duet_diffusion::Prediction,
    /// Name of the schedule the constants came from (`cosine`).
    pub schedule: String,
    /// `ᾱ_t` for the restorers' training timesteps (their `timestep` input).
    pub alphas_cumprod: Vec<f64>,
    /// DDIM steps the restorers were trained to be sampled with.
    pub sampler_steps: usize,
    /// Whether the restorers' step gate is active (dynamic modality gating).
    pub gating: bool,
    /// Whether `restored` blends the sample with the mean embedding through the trust gate
    /// (`τ r + (1 − τ) μ`); when false `trust` is 1.
    pub trust_gate: bool,
}

/// One ONNX graph and its I/O signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphSpec {
    /// The graph's role (written as `vision_encoder`, `caption_decoder`, …).
    pub name: Graph,
    /// Plain file name inside the bundle (also listed in [`Manifest::files`]).
    pub file: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Export-time parity figures; `None` when the exporter did not check this graph.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parity: Option<Parity>,
}

impl GraphSpec {
    /// The input called `name`.
    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|t| t.name == name)
    }

    /// The output called `name`.
    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|t| t.name == name)
    }
}

/// Name, element type and (possibly symbolic) shape of one graph input or output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<DimSpec>,
}

impl fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}[", self.name, self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Tensor element types the engines feed and return. duet's own graphs use `f32` and `i64`
/// (their I/O contracts say which); the others are for users' graphs run through
/// [`crate::Engine`] (image bytes, quantised tensors, masks, half precision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    I64,
    I32,
    I8,
    U8,
    Bool,
}

impl DType {
    /// Every element type, in declaration order.
    pub const ALL: [DType; 7] = [
        DType::F32,
        DType::F16,
        DType::I64,
        DType::I32,
        DType::I8,
        DType::U8,
        DType::Bool,
    ];

    /// The ONNX `TensorProto.DataType` code of this type (the one table of them: the
    /// exporter's graph builder, the tract engine's declarations and the tests read it).
    pub fn onnx_code(self) -> i32 {
        use tract_onnx::pb::tensor_proto::DataType as T;
        (match self {
            DType::F32 => T::Float,
            DType::F16 => T::Float16,
            DType::I64 => T::Int64,
            DType::I32 => T::Int32,
            DType::I8 => T::Int8,
            DType::U8 => T::Uint8,
            DType::Bool => T::Bool,
        }) as i32
    }

    /// The type of an ONNX `TensorProto.DataType` code, if it is one of these.
    pub fn from_onnx_code(code: i32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.onnx_code() == code)
    }

    /// The name in manifests and messages (`f32`, `u8`, `bool`, …).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One axis of a tensor shape: a fixed size or a symbolic name such as `batch`, `seq`, `past`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DimSpec {
    Fixed(usize),
    Symbolic(String),
}

impl fmt::Display for DimSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DimSpec::Fixed(n) => write!(f, "{n}"),
            DimSpec::Symbolic(s) => f.write_str(s),
        }
    }
}

impl From<usize> for DimSpec {
    fn from(n: usize) -> Self {
        DimSpec::Fixed(n)
    }
}

impl From<&str> for DimSpec {
    fn from(s: &str) -> Self {
        DimSpec::Symbolic(s.to_string())
    }
}

/// Numeric precision of a bundle's graph files: what `--precision` (and the C ABI's
/// `precision` option) choose between. Inputs and outputs stay f32 at every precision; only
/// the weights (and, for int8, the matrix products) change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The exported graphs as trained.
    Fp32,
    /// Weights stored as IEEE half floats, widened to f32 when the graph loads: half the
    /// download, the same arithmetic.
    Fp16,
    /// Matrix-product weights stored as int8 (symmetric, one scale per output channel) and
    /// multiplied in integer arithmetic against activations quantised to u8 at run time
    /// (ONNX `DynamicQuantizeLinear` + `MatMulInteger`).
    Int8,
}

impl Precision {
    /// Every precision, in the order bundles list them.
    pub const ALL: [Precision; 3] = [Precision::Fp32, Precision::Fp16, Precision::Int8];

    /// The name in manifests, file names and options (`fp32`, `fp16`, `int8`).
    pub const fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Int8 => "int8",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A precision name that is none of [`Precision::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown precision `{0}` (expected fp32, fp16 or int8)")]
pub struct ParsePrecisionError(pub String);

impl std::str::FromStr for Precision {
    type Err = ParsePrecisionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| ParsePrecisionError(s.to_string()))
    }
}

/// One compressed copy of a bundle's graphs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantSpec {
    /// fp16 or int8 (never fp32: those are [`Manifest::graphs`]).
    pub precision: Precision,
    /// How the files were made, in words (what was converted, what was kept in f32).
    pub method: String,
    /// Graph → its file at this precision; every graph of the bundle, each file listed in
    /// [`Manifest::files`]. Inputs and outputs are those of the fp32 graph.
    pub files: BTreeMap<Graph, String>,
    /// Numerical distance to the fp32 graphs, per graph, on the exporter's check inputs.
    #[serde(default)]
    pub agreement: BTreeMap<Graph, VariantAgreement>,
    /// Task metrics measured through the runtime at this precision (the same evaluation as
    /// [`Manifest::metrics`] of the fp32 graphs), name → value; empty when not measured.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

/// How far one variant graph's outputs are from the fp32 graph's on the same inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantAgreement {
    /// Largest |variant − fp32| over every output, on onnxruntime (CPU).
    pub ort_max_abs_diff: f64,
    /// The same on tract.
    pub tract_max_abs_diff: f64,
    /// Largest |fp32 output| on those inputs, the scale the differences are read against.
    pub fp32_max_abs: f64,
    /// How many input sets were compared.
    pub inputs_checked: usize,
}

/// Export-time numerical agreement of a graph with the Burn model it was built from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parity {
    /// Largest absolute difference between Burn and onnxruntime (CPU) outputs.
    pub ort_max_abs_diff: f64,
    /// Largest absolute difference between Burn and tract outputs.
    pub tract_max_abs_diff: f64,
    /// The bound both differences had to stay under for the graph to be written.
    pub tolerance: f64,
    /// How many input sets were compared.
    pub inputs_checked: usize,
}
