//! ONNX graphs built directly from trained weights.
//!
//! Burn's ONNX tracer cannot emit transpose, softmax, LayerNorm, GELU or gather, so the
//! exporter writes each graph node by node (see `docs/ARCHITECTURE.md` for the exact contract
//! of names, shapes and formulas). [`builder`] holds the generic graph builder; each other
//! module turns a checkpoint's parameters into one graph.

pub mod builder;
pub mod decoder;
pub mod denoiser;
pub mod dream;
pub mod restorer;
pub mod text;
pub mod vision;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use prost::Message;
use tract_onnx::pb::ModelProto;

pub use builder::{DType, Dim, GraphBuilder, GraphValue, MhaOutput, PastKv};
pub use decoder::build_caption_decoder;
pub use denoiser::build_denoiser;
pub use dream::build_dream_encoder;
pub use restorer::{build_fusion_head, build_restorer};
pub use text::build_text_encoder;
pub use vision::build_vision_encoder;

/// Why a graph could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("checkpoint has no parameter `{name}`")]
    MissingParameter { name: String },
    #[error("parameter `{name}` has shape {actual:?}, the graph contract expects {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("parameter `{name}` declares shape {shape:?} but holds {len} values")]
    DataLength {
        name: String,
        shape: Vec<usize>,
        len: usize,
    },
    #[error("{graph}: checkpoint parameters not used by the graph (model and export disagree): {names:?}")]
    UnusedParameters { graph: String, names: Vec<String> },
    #[error("invalid graph dimensions: {0}")]
    InvalidDims(String),
    #[error("tensor name `{0}` is used twice in one graph")]
    DuplicateName(String),
    #[error("cannot load training run {path}: {reason}")]
    LoadRun { path: PathBuf, reason: String },
    #[error("cannot make a compressed variant of `{graph}`: {reason}")]
    Quantize { graph: String, reason: String },
    #[error("task evaluation failed: {reason}")]
    Evaluate { reason: String },
    #[error("parity check of `{graph}` could not run: {reason}")]
    Parity { graph: String, reason: String },
    #[error("parity failed for `{graph}` on {backend}: max |Δ| {diff:.3e} at {output} exceeds the tolerance {tolerance:.1e}; no bundle was written")]
    ParityFailed {
        graph: String,
        backend: String,
        output: String,
        diff: f64,
        tolerance: f64,
    },
    #[error(
        "{path} exists and is not a bundle (a directory with a manifest.json, empty, or a \
         `.duet` file) of the form asked for; refusing to replace it"
    )]
    OutputNotBundle { path: PathBuf },
    #[error(
        "{path} is a bundle but also holds {others:?}, which its manifest does not list and the \
         new bundle would not keep; refusing to replace it (export to another directory, or move \
         those out first)"
    )]
    OutputHasOtherFiles { path: PathBuf, others: Vec<String> },
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The staged bundle failed a check of the runtime's own (opening, packing).
    #[error("bundle {path}: {source}")]
    Bundle {
        path: PathBuf,
        #[source]
        source: duet_runtime::BundleError,
    },
}

/// Trained parameters by checkpoint key (the Burn module path, e.g.
/// `vision.blocks.0.attn.q.weight`), each with its shape and row-major f32 data.
#[derive(Debug, Clone, Default)]
pub struct Weights {
    map: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Weights {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a parameter; errors if `data` does not fill `shape`.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        shape: Vec<usize>,
        data: Vec<f32>,
    ) -> Result<(), ExportError> {
        let name = name.into();
        if shape.iter().product::<usize>() != data.len() {
            return Err(ExportError::DataLength {
                name,
                shape,
                len: data.len(),
            });
        }
        self.map.insert(name, (shape, data));
        Ok(())
    }

    /// Builds from a map, validating every entry like [`Weights::insert`].
    pub fn from_map(map: HashMap<String, (Vec<usize>, Vec<f32>)>) -> Result<Self, ExportError> {
        let mut w = Self::new();
        for (name, (shape, data)) in map {
            w.insert(name, shape, data)?;
        }
        Ok(w)
    }

    /// Shape and data of `name`.
    pub fn get(&self, name: &str) -> Result<(&[usize], &[f32]), ExportError> {
        self.map
            .get(name)
            .map(|(s, d)| (s.as_slice(), d.as_slice()))
            .ok_or_else(|| ExportError::MissingParameter {
                name: name.to_owned(),
            })
    }

    /// Data of `name`, which must have exactly shape `expected`.
    pub fn get_shaped(&self, name: &str, expected: &[usize]) -> Result<&[f32], ExportError> {
        let (shape, data) = self.get(name)?;
        if shape != expected {
            return Err(ExportError::ShapeMismatch {
                name: name.to_owned(),
                expected: expected.to_vec(),
                actual: shape.to_vec(),
            });
        }
        Ok(data)
    }

    /// All parameter names, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The sizes a graph is built for: the model's one spec, the same value Burn's modules were
/// built from and the manifest records.
pub use duet_models::ModelSpec;

/// Rejects configurations no graph can be built for, before any node is written (the spec's
/// own invariants: one check for Burn, the exporter and the runtime).
pub fn validate_dims(dims: &ModelSpec) -> Result<(), ExportError> {
    dims.validate()
        .map_err(|e| ExportError::InvalidDims(e.to_string()))
}

/// Serialises a model to ONNX protobuf bytes.
pub fn model_to_bytes(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Writes `model` to `path` atomically: the bytes go to a temporary file in the same directory,
/// are flushed to disk, and the file is renamed over `path`, so a reader never sees half a graph
/// (and an interrupted export never leaves one behind under the real name).
pub fn save_model(path: impl AsRef<Path>, model: &ModelProto) -> Result<(), ExportError> {
    let path = path.as_ref();
    let io_err = |source| ExportError::Io {
        path: path.to_owned(),
        source,
    };
    // One atomic-write helper for the workspace: O_EXCL temporary file, checked writes and
    // sync, rename; the old graph stays whole on any error.
    duet_fsio::write_atomic(path, &model_to_bytes(model)).map_err(io_err)
}

/// Shared by the graph tests: tiny config, random weights, tract runner, plain-Rust reference
/// ops and the Python `onnx.checker` call.
#[cfg(test)]
pub(crate) mod test_util {
    use std::path::Path;
    use std::process::Command;

    use ndarray::{Array2, ArrayD};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use tract_onnx::prelude::*;

    use super::{model_to_bytes, ModelSpec, Weights};

    /// The `tiny` config of `docs/ARCHITECTURE.md` with a 40-token vocabulary.
    pub fn tiny_dims() -> ModelSpec {
        ModelSpec {
            image_size: 32,
            channels: 3,
            patch_size: 4,
            d_model: 64,
            n_heads: 4,
            vision_layers: 2,
            decoder_layers: 2,
            mlp_ratio: 4,
            embed_dim: 64,
            vocab_size: 40,
            max_len: 48,
            layer_norm_eps: 1e-5,
            text_layers: 2,
            denoiser_layers: 2,
            denoiser_patch_size: 4,
            ..ModelSpec::preset(duet_models::Preset::Tiny, 40, 32)
        }
    }

    /// A loaded, optimised tract model.
    pub type Plan = Arc<TypedRunnableModel>;

    pub fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// `(name, shape)` of every parameter of a Burn module, named as in a checkpoint under
    /// `prefix`: the graph tests take their parameter lists from the modules themselves, so no
    /// hand-written copy can drift from what training saves.
    pub fn module_parameters<M: burn::module::Module<burn::backend::NdArray<f32>>>(
        module: &M,
        prefix: &str,
    ) -> Vec<(String, Vec<usize>)> {
        duet_models::params::named_tensors(module)
            .into_iter()
            .map(|(name, t)| (format!("{prefix}.{name}"), t.shape))
            .collect()
    }

    /// Random parameters for every `(name, shape)`: LayerNorm gammas near 1, betas and biases
    /// small, matrices scaled by `1/sqrt(fan_in)` so activations stay O(1) through the blocks
    /// (otherwise softmax saturates and the numerical checks would prove little).
    pub fn random_weights(params: &[(String, Vec<usize>)], seed: u64) -> Weights {
        let mut r = rng(seed);
        let mut w = Weights::new();
        for (name, shape) in params {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with(".gamma") {
                (0..n).map(|_| 1.0 + r.random_range(-0.2..0.2)).collect()
            } else if name.ends_with(".beta") || name.ends_with(".bias") {
                (0..n).map(|_| r.random_range(-0.1..0.1)).collect()
            } else {
                let fan_in = match shape.len() {
                    4 => shape[1] * shape[2] * shape[3],
                    2 if name.ends_with("embed.weight") => 1,
                    2 => shape[0],
                    _ => 1,
                };
                let a = (3.0 / fan_in as f32).sqrt();
                (0..n).map(|_| r.random_range(-a..a)).collect()
            };
            w.insert(name.clone(), shape.clone(), data)
                .expect("generated data matches its shape");
        }
        w
    }

    pub fn random_array(r: &mut ChaCha8Rng, shape: &[usize], a: f32) -> ArrayD<f32> {
        ArrayD::from_shape_fn(shape, |_| r.random_range(-a..a))
    }

    /// `a` as a Burn tensor on the CPU test backend (for comparing a graph with the module).
    pub fn burn_tensor<const D: usize>(
        a: &ArrayD<f32>,
    ) -> burn::tensor::Tensor<burn::backend::NdArray<f32>, D> {
        let data: Vec<f32> = a.iter().copied().collect();
        burn::tensor::Tensor::from_data(
            burn::tensor::TensorData::new(data, a.shape().to_vec()),
            &Default::default(),
        )
    }

    /// Loads `bytes` in tract with the graph's own (symbolic) input facts, optimises it once and
    /// returns a plan that can be run with any concrete sizes.
    pub fn tract_plan(bytes: &[u8]) -> TractResult<Plan> {
        let model = tract_onnx::onnx().model_for_read(&mut &bytes[..])?;
        model.into_optimized()?.into_runnable()
    }

    pub fn tract_run(plan: &Plan, inputs: Vec<Tensor>) -> TractResult<Vec<ArrayD<f32>>> {
        let out = plan.run(inputs.into_iter().map(IntoTValue::into_tvalue).collect())?;
        out.iter()
            .map(|t| Ok(t.to_plain_array_view::<f32>()?.to_owned()))
            .collect()
    }

    pub fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f64>) -> f64 {
        assert_eq!(a.shape(), b.shape(), "shape mismatch");
        a.iter()
            .zip(b.iter())
            .map(|(x, y)| (*x as f64 - y).abs())
            .fold(0.0, f64::max)
    }

    /// Runs `onnx.checker.check_model(path, full_check=True)` (which includes strict shape
    /// inference). Panics — never skips — when Python or the `onnx` module is missing, because
    /// a graph ort might reject must not pass silently. `DUET_PYTHON` overrides the interpreter.
    pub fn onnx_check(path: &Path) {
        let python = std::env::var("DUET_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = "import sys\n\
            try:\n    import onnx\n\
            except ImportError as e:\n    print('MISSING-ONNX', e); sys.exit(3)\n\
            onnx.checker.check_model(sys.argv[1], full_check=True)\n\
            print('ok', onnx.__version__)\n";
        let out = Command::new(&python)
            .arg("-c")
            .arg(script)
            .arg(path)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run `{python}` for the ONNX checker ({e}); install Python 3 or set DUET_PYTHON")
            });
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() == Some(3) {
            panic!("`{python}` has no `onnx` module: run `pip install onnx==1.23.2` ({stdout})");
        }
        assert!(
            out.status.success(),
            "onnx.checker rejected {}:\n{stdout}\n{stderr}",
            path.display()
        );
    }

    /// Writes `model` under `dir` and returns the path (via [`super::save_model`]). With
    /// `DUET_ONNX_DUMP_DIR` set, a copy also goes there for inspection (Netron, onnxruntime).
    pub fn write_model(
        dir: &Path,
        name: &str,
        model: &tract_onnx::pb::ModelProto,
    ) -> std::path::PathBuf {
        let p = dir.join(name);
        super::save_model(&p, model).expect("save model");
        assert_eq!(std::fs::read(&p).expect("read back"), model_to_bytes(model));
        if let Ok(dump) = std::env::var("DUET_ONNX_DUMP_DIR") {
            std::fs::create_dir_all(&dump).expect("create dump dir");
            super::save_model(Path::new(&dump).join(name), model).expect("dump model");
        }
        p
    }

    // ----- plain-Rust reference (f64) ----------------------------------------------------

    /// erf via Numerical Recipes' `erfcc` Chebyshev fit (fractional error < 1.2e-7), ample for
    /// the 1e-4 comparison of f32 graphs.
    pub fn erf(x: f64) -> f64 {
        let z = x.abs();
        let t = 1.0 / (1.0 + 0.5 * z);
        let poly = -z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77))))))));
        let erfc = t * poly.exp();
        if x >= 0.0 {
            1.0 - erfc
        } else {
            erfc - 1.0
        }
    }

    pub struct Reference<'a> {
        pub w: &'a Weights,
        pub dims: &'a ModelSpec,
    }

    impl Reference<'_> {
        pub fn mat(&self, name: &str) -> Array2<f64> {
            let (shape, data) = self.w.get(name).expect("param");
            assert_eq!(shape.len(), 2, "{name}");
            Array2::from_shape_vec(
                (shape[0], shape[1]),
                data.iter().map(|&x| x as f64).collect(),
            )
            .expect("shape")
        }

        pub fn vec(&self, name: &str) -> Vec<f64> {
            self.w
                .get(name)
                .expect("param")
                .1
                .iter()
                .map(|&x| x as f64)
                .collect()
        }

        pub fn linear(&self, x: &Array2<f64>, prefix: &str) -> Array2<f64> {
            let w = self.mat(&format!("{prefix}.weight"));
            let b = self.vec(&format!("{prefix}.bias"));
            let mut y = x.dot(&w);
            for mut row in y.rows_mut() {
                for (v, bb) in row.iter_mut().zip(&b) {
                    *v += bb;
                }
            }
            y
        }

        pub fn layer_norm(&self, x: &Array2<f64>, prefix: &str) -> Array2<f64> {
            let g = self.vec(&format!("{prefix}.gamma"));
            let b = self.vec(&format!("{prefix}.beta"));
            let mut y = x.clone();
            for mut row in y.rows_mut() {
                let n = row.len() as f64;
                let mean = row.sum() / n;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
                let inv = 1.0 / (var + self.dims.layer_norm_eps).sqrt();
                for (i, v) in row.iter_mut().enumerate() {
                    *v = (*v - mean) * inv * g[i] + b[i];
                }
            }
            y
        }

        pub fn gelu(x: &Array2<f64>) -> Array2<f64> {
            x.mapv(|v| 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2)))
        }

        pub fn mlp(&self, x: &Array2<f64>, prefix: &str) -> Array2<f64> {
            let h = Self::gelu(&self.linear(x, &format!("{prefix}.fc1")));
            self.linear(&h, &format!("{prefix}.fc2"))
        }

        /// Attention of `q_in [Nq, D]` over `kv_in [Nk, D]`; `allowed(i, j)` masks keys.
        pub fn attention(
            &self,
            q_in: &Array2<f64>,
            kv_in: &Array2<f64>,
            prefix: &str,
            allowed: impl Fn(usize, usize) -> bool,
        ) -> Array2<f64> {
            let h = self.dims.n_heads;
            let dh = self.dims.head_dim();
            let q = self.linear(q_in, &format!("{prefix}.q"));
            let k = self.linear(kv_in, &format!("{prefix}.k"));
            let v = self.linear(kv_in, &format!("{prefix}.v"));
            let (nq, nk) = (q.nrows(), k.nrows());
            let mut ctx = Array2::<f64>::zeros((nq, self.dims.d_model));
            for head in 0..h {
                let cols = head * dh..(head + 1) * dh;
                for i in 0..nq {
                    let scores: Vec<f64> = (0..nk)
                        .map(|j| {
                            let s: f64 = cols.clone().map(|c| q[[i, c]] * k[[j, c]]).sum();
                            let s = s / (dh as f64).sqrt();
                            if allowed(i, j) {
                                s
                            } else {
                                s - 1e9
                            }
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in cols.clone() {
                        ctx[[i, c]] = (0..nk).map(|j| e[j] / z * v[[j, c]]).sum();
                    }
                }
            }
            self.linear(&ctx, &format!("{prefix}.out"))
        }
    }
}
