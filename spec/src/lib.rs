//! The duet model family's dimensions: [`ModelSpec`], one serde type that Burn's modules are
//! built from (`duet-models`), that the exporter writes into `manifest.json` as `model` and
//! that the runtime reads back and checks its graphs against. It has no Burn dependency, so the
//! runtime can use it without pulling Burn in. Adding a dimension is one field here (with a
//! serde default, so older checkpoints and bundles still load) plus the code that uses it.

use serde::{Deserialize, Serialize};

pub mod pixels;
pub use pixels::{fit_image, ImageFit, PAD_GREY};

/// Size presets: `tiny` for tests and CI, `small` for the shipped bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    Tiny,
    Small,
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "small" => Ok(Preset::Small),
            other => Err(format!("unknown preset '{other}' (expected tiny or small)")),
        }
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
        })
    }
}

/// Every dimension of the model family (see the table in `docs/ARCHITECTURE.md`).
///
/// A plain serde struct rather than a Burn `Config` so that it round-trips through the
/// checkpoint directory and the bundle manifest with the same field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub image_size: usize,
    pub channels: usize,
    pub patch_size: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub vision_layers: usize,
    pub decoder_layers: usize,
    pub mlp_ratio: usize,
    pub embed_dim: usize,
    pub vocab_size: usize,
    pub max_len: usize,
    pub layer_norm_eps: f64,
    /// Transformer layers of the text encoder (generation direction). Defaults keep configs
    /// written before the generation direction existed loadable.
    #[serde(default = "default_text_layers")]
    pub text_layers: usize,
    /// DiT blocks of the diffusion denoiser.
    #[serde(default = "default_denoiser_layers")]
    pub denoiser_layers: usize,
    /// Side of the denoiser's pixel patches (its token grid is `image_size / this` squared).
    #[serde(default = "default_denoiser_patch_size")]
    pub denoiser_patch_size: usize,
    /// Whether the denoiser also conditions its adaptive LayerNorms on the masked mean of the
    /// text tokens (as Imagen and SD-XL add a pooled text embedding to the timestep one).
    /// Global attributes such as an object's colour then reach every token directly instead
    /// of only through cross-attention, which learns them several times faster. Off in configs
    /// written before it existed, so their checkpoints keep loading.
    #[serde(default)]
    pub denoiser_pooled_text: bool,
    /// U-ViT long skip connections (Bao et al. 2023): block `L-1-i` of the denoiser's second
    /// half also reads block `i`'s output (concatenated, projected back to `d_model`), so
    /// fine spatial detail from the first blocks reaches the output without passing through
    /// every block. Off in configs written before it existed.
    #[serde(default)]
    pub denoiser_long_skips: bool,
    /// Channels of a small convolutional output head: the last linear layer emits this many
    /// channels per pixel instead of the image's, and a 3×3 convolution maps them to the image
    /// (U-ViT's "extra conv"). The convolution sees across patch borders, which a per-token
    /// linear head cannot, so it can remove the seams between patches. `None`: the linear
    /// head writes pixels directly (configs written before it existed).
    #[serde(default)]
    pub denoiser_conv_head: Option<usize>,
    /// MLP width of the denoiser's blocks as a multiple of `d_model`, when it differs from the
    /// encoders' `mlp_ratio`: the denoiser is the part of the family that most needs capacity
    /// (it must emit every pixel), so it can be widened alone. `None`: `mlp_ratio` (configs
    /// written before it existed).
    #[serde(default)]
    pub denoiser_mlp_ratio: Option<usize>,
    /// How an image of another size or shape becomes `image_size` square, in training and at
    /// inference alike ([`fit_image`]). `stretch` in configs written before it existed (what
    /// they did).
    #[serde(default)]
    pub image_fit: ImageFit,
    /// Learnable dream queries (DreamLLM) appended after the caption decoder's prompt: their
    /// last-layer states, projected, condition the denoiser in place of the text encoder's
    /// tokens. 0: the model has none (every run before the dream stage, and caption and
    /// generate runs).
    #[serde(default)]
    pub dream_queries: usize,
}

/// Most dream queries a model may have: each is a denoiser cross-attention token, and a few
/// dozen already carry a scene (DreamLLM uses 64 for whole photographs).
pub const MAX_DREAM_QUERIES: usize = 64;

fn default_text_layers() -> usize {
    2
}
fn default_denoiser_layers() -> usize {
    2
}
fn default_denoiser_patch_size() -> usize {
    4
}

impl ModelSpec {
    pub fn preset(preset: Preset, vocab_size: usize, image_size: usize) -> Self {
        let (d_model, vision_layers, decoder_layers, text_layers, denoiser_layers) = match preset {
            Preset::Tiny => (64, 2, 2, 2, 2),
            Preset::Small => (128, 4, 4, 2, 4),
        };
        // The tiny captioner sees a 4×4 grid of patches (8 px at 32 px): a quarter of the
        // small preset's tokens, so it trains 2.5× faster per step and, on ShapeWorld scenes
        // of at most a few objects, reaches higher held-out accuracy in fewer steps (measured:
        // 97% exact captions after 1,500 steps against 88% with 4 px patches). The denoiser
        // keeps 4 px patches in both: its head must emit every pixel's noise from one
        // `d_model`-wide token, and 8×8×3 = 192 values from 64 channels cannot be independent,
        // which leaves visible noise in every sample.
        let patch_size = match preset {
            Preset::Tiny => (image_size / 4).max(1),
            Preset::Small => (image_size / 8).max(1),
        };
        Self {
            image_size,
            channels: 3,
            patch_size,
            d_model,
            n_heads: 4,
            vision_layers,
            decoder_layers,
            mlp_ratio: 4,
            embed_dim: d_model,
            vocab_size,
            max_len: 48,
            layer_norm_eps: 1e-5,
            text_layers,
            denoiser_layers,
            denoiser_patch_size: (image_size / 8).max(1),
            denoiser_pooled_text: true,
            denoiser_long_skips: false,
            denoiser_conv_head: None,
            denoiser_mlp_ratio: None,
            image_fit: ImageFit::default(),
            dream_queries: 0,
        }
    }

    /// Number of image patches `P = (image_size / patch_size)^2` (0 if `patch_size` is 0:
    /// a manifest is read before it is validated).
    pub fn num_patches(&self) -> usize {
        let side = self.image_size.checked_div(self.patch_size).unwrap_or(0);
        side * side
    }

    /// Number of denoiser tokens `(image_size / denoiser_patch_size)^2` (0 if the patch size
    /// is 0).
    pub fn denoiser_tokens(&self) -> usize {
        let side = self
            .image_size
            .checked_div(self.denoiser_patch_size)
            .unwrap_or(0);
        side * side
    }

    /// Attention head width `Dh = d_model / n_heads` (0 if `n_heads` is 0).
    pub fn head_dim(&self) -> usize {
        self.d_model.checked_div(self.n_heads).unwrap_or(0)
    }

    /// MLP hidden width `mlp_ratio · d_model`.
    pub fn mlp_hidden(&self) -> usize {
        self.mlp_ratio * self.d_model
    }

    /// MLP hidden width of the denoiser's blocks: `denoiser_mlp_ratio` (or `mlp_ratio`) ·
    /// `d_model`.
    pub fn denoiser_mlp_hidden(&self) -> usize {
        self.denoiser_mlp_ratio.unwrap_or(self.mlp_ratio) * self.d_model
    }

    /// Long skips of the denoiser: one per block of its second half when
    /// `denoiser_long_skips` is on (the middle block of an odd count has none).
    pub fn denoiser_long_skip_count(&self) -> usize {
        if self.denoiser_long_skips {
            self.denoiser_layers / 2
        } else {
            0
        }
    }

    /// Checks the invariants every user of the spec relies on (Burn's modules, the graph
    /// builders, the runtime's shape checks), so a bad config file or manifest fails here with
    /// the field named instead of as a shape panic deep inside a forward pass. The runtime adds
    /// its own resource limits on top (`duet_runtime::bundle::limits`).
    pub fn validate(&self) -> Result<(), SpecError> {
        let err = |field, reason: String| Err(SpecError { field, reason });
        for (field, v) in [
            ("image_size", self.image_size),
            ("channels", self.channels),
            ("patch_size", self.patch_size),
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("mlp_ratio", self.mlp_ratio),
            ("embed_dim", self.embed_dim),
            ("denoiser_patch_size", self.denoiser_patch_size),
        ] {
            if v == 0 {
                return err(field, "must be > 0".into());
            }
        }
        if self.image_size > MAX_IMAGE_SIZE {
            return err(
                "image_size",
                format!("{} is over the limit of {MAX_IMAGE_SIZE}", self.image_size),
            );
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return err(
                "patch_size",
                format!(
                    "{} does not divide image_size {}",
                    self.patch_size, self.image_size
                ),
            );
        }
        if !self.image_size.is_multiple_of(self.denoiser_patch_size) {
            return err(
                "denoiser_patch_size",
                format!(
                    "{} does not divide image_size {}",
                    self.denoiser_patch_size, self.image_size
                ),
            );
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return err(
                "n_heads",
                format!("{} does not divide d_model {}", self.n_heads, self.d_model),
            );
        }
        if !self.d_model.is_multiple_of(2) {
            return err(
                "d_model",
                format!(
                    "{} must be even (sinusoidal timestep features)",
                    self.d_model
                ),
            );
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return err(
                "layer_norm_eps",
                format!("{} must be a positive finite number", self.layer_norm_eps),
            );
        }
        if self.denoiser_mlp_ratio == Some(0) {
            return err("denoiser_mlp_ratio", "must be > 0".into());
        }
        if self.denoiser_conv_head == Some(0) {
            return err(
                "denoiser_conv_head",
                "must have at least one channel".into(),
            );
        }
        if self.vocab_size < 5 {
            return err(
                "vocab_size",
                format!(
                    "{} is too small (the 4 special tokens and a word)",
                    self.vocab_size
                ),
            );
        }
        if self.dream_queries > MAX_DREAM_QUERIES {
            return err(
                "dream_queries",
                format!(
                    "{} is over the limit of {MAX_DREAM_QUERIES}",
                    self.dream_queries
                ),
            );
        }
        if self.max_len < 3 {
            return err(
                "max_len",
                format!("{} is too small (BOS, a word, EOS)", self.max_len),
            );
        }
        Ok(())
    }
}

/// A [`ModelSpec`] that breaks an invariant: the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: &'static str,
    pub reason: String,
}

/// Largest side of a model's square images, in pixels: what a trainer accepts for
/// `--image-size` and a runtime for a manifest's `model.image_size`, so every trained model
/// can be exported and loaded.
pub const MAX_IMAGE_SIZE: usize = 1024;

/// Base of the sinusoidal timestep frequencies (as in the Transformer and DDPM papers).
pub const TIMESTEP_MAX_PERIOD: f64 = 10_000.0;

/// The frequencies `f_i = P^(−i/half)`, `i < half = dim / 2`, of the denoiser's sinusoidal
/// timestep features `[cos(t f_i), sin(t f_i)]`: the Burn module and the exported graph both
/// take them from here, so they cannot disagree.
pub fn timestep_frequencies(dim: usize) -> Vec<f32> {
    let half = dim / 2;
    (0..half)
        .map(|i| (-(TIMESTEP_MAX_PERIOD.ln()) * i as f64 / half as f64).exp() as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_round_trip_through_json() {
        for preset in [Preset::Tiny, Preset::Small] {
            let spec = ModelSpec::preset(preset, 100, 32);
            spec.validate().unwrap();
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(serde_json::from_str::<ModelSpec>(&json).unwrap(), spec);
        }
    }

    #[test]
    fn fields_added_later_take_their_defaults() {
        // A config written before the generation direction existed.
        let old = r#"{"image_size":32,"channels":3,"patch_size":8,"d_model":64,"n_heads":4,
            "vision_layers":2,"decoder_layers":2,"mlp_ratio":4,"embed_dim":64,"vocab_size":40,
            "max_len":48,"layer_norm_eps":1e-5}"#;
        let spec: ModelSpec = serde_json::from_str(old).unwrap();
        assert_eq!((spec.text_layers, spec.denoiser_layers), (2, 2));
        assert_eq!(spec.denoiser_patch_size, 4);
        assert!(!spec.denoiser_pooled_text && !spec.denoiser_long_skips);
        assert_eq!(spec.denoiser_conv_head, None);
        assert_eq!(spec.denoiser_mlp_ratio, None);
        assert_eq!(spec.denoiser_mlp_hidden(), spec.mlp_hidden());
    }

    #[test]
    fn the_denoiser_mlp_can_be_widened_alone() {
        let spec = ModelSpec {
            denoiser_mlp_ratio: Some(6),
            ..ModelSpec::preset(Preset::Tiny, 40, 32)
        };
        spec.validate().unwrap();
        assert_eq!((spec.mlp_hidden(), spec.denoiser_mlp_hidden()), (256, 384));
        let zero = ModelSpec {
            denoiser_mlp_ratio: Some(0),
            ..spec
        };
        assert_eq!(
            zero.validate().unwrap_err().to_string(),
            "denoiser_mlp_ratio: must be > 0"
        );
    }

    #[test]
    fn derived_sizes_never_divide_by_zero() {
        let spec = ModelSpec {
            patch_size: 0,
            denoiser_patch_size: 0,
            n_heads: 0,
            ..ModelSpec::preset(Preset::Tiny, 40, 32)
        };
        assert_eq!(
            (spec.num_patches(), spec.denoiser_tokens(), spec.head_dim()),
            (0, 0, 0)
        );
        let e = spec.validate().unwrap_err();
        assert_eq!(e.field, "patch_size");
        assert_eq!(e.to_string(), "patch_size: must be > 0");
        let odd = ModelSpec {
            n_heads: 3,
            ..ModelSpec::preset(Preset::Tiny, 40, 32)
        };
        assert_eq!(
            odd.validate().unwrap_err().to_string(),
            "n_heads: 3 does not divide d_model 64"
        );
        // The largest side the runtime loads is the largest a spec may have.
        ModelSpec::preset(Preset::Tiny, 40, MAX_IMAGE_SIZE)
            .validate()
            .unwrap();
        assert_eq!(
            ModelSpec::preset(Preset::Tiny, 40, MAX_IMAGE_SIZE + 8)
                .validate()
                .unwrap_err()
                .to_string(),
            "image_size: 1032 is over the limit of 1024"
        );
    }

    #[test]
    fn timestep_frequencies_fall_from_one() {
        let f = timestep_frequencies(8);
        assert_eq!(f.len(), 4);
        assert_eq!(f[0], 1.0);
        assert!((f[2] - 0.01).abs() < 1e-7);
    }
}
