//! Image captioning: vision encoder → greedy decoding with the one-step KV-cache decoder.
//!
//! Two decoding loops are provided on purpose. [`Captioner::greedy_tokens_kv`] is the real one:
//! it feeds one token per step and carries `present_*` back in as `past_*`. The reference
//! [`Captioner::greedy_tokens_full`] recomputes the whole prefix every step with an empty cache
//! and a causal `attn_bias`; both must produce identical tokens, which checks the cache wiring
//! of the exported decoder end to end (positions, bias shape, concat axis).

use std::path::PathBuf;
use std::sync::Arc;

use image::RgbImage;
use ndarray::{Array2, Array3, Array4, ArrayD, ArrayView1, Axis, IxDyn};
use thiserror::Error;
use tokenizers::Tokenizer;

use crate::bundle::{Bundle, BundleError};
use crate::engine::{
    Engine, EngineError, EngineOptions, ProviderChoice, ProviderReport, Value, ValueView,
};
use crate::engine_set::EngineSet;
use crate::manifest::{Graph, ImageSpec, ModelSpec, TokenizerSpec};
use crate::preprocess::{self, ImageError};

/// Captioning failures.
#[derive(Debug, Error)]
pub enum CaptionError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("cannot load tokenizer {}: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error("tokenizer could not decode {ids:?}: {reason}")]
    Decode { ids: Vec<u32>, reason: String },
    #[error("graph `{graph}`: {reason}")]
    Shape { graph: String, reason: String },
    /// A NaN or infinite logit: a broken graph or weights, or a provider computing in too low a
    /// precision (TensorRT fp16). Reported rather than decoded, since the argmax of a NaN row is
    /// an arbitrary token and the caption would look valid.
    #[error("graph `{graph}` returned a non-finite value (NaN or infinity) in `{output}`")]
    NonFinite { graph: String, output: String },
}

/// A bundle's captioning pipeline, loaded once and reused for every image.
pub struct Captioner {
    tokenizer: Tokenizer,
    vision: Arc<Engine>,
    decoder: Arc<Engine>,
    model: ModelSpec,
    tok: TokenizerSpec,
    image: ImageSpec,
    past_names: Vec<String>,
    present_names: Vec<String>,
    reports: Vec<ProviderReport>,
}

impl std::fmt::Debug for Captioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Captioner")
            .field("vision", &self.vision)
            .field("decoder", &self.decoder)
            .field("reports", &self.reports)
            .finish_non_exhaustive()
    }
}

fn shape_err(graph: &str, reason: impl Into<String>) -> CaptionError {
    CaptionError::Shape {
        graph: graph.to_string(),
        reason: reason.into(),
    }
}

/// Index of the largest logit; the lowest index wins ties so every backend agrees.
fn argmax(row: ArrayView1<'_, f32>) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best
}

impl Captioner {
    /// Loads the tokenizer and the two graphs of `bundle` (vision encoder, caption decoder),
    /// each on the first provider of `choice` that works.
    pub fn new(
        bundle: &Bundle,
        choice: ProviderChoice,
        options: &EngineOptions,
    ) -> Result<Self, CaptionError> {
        Self::with_engines(&mut EngineSet::new(bundle, choice, options))
    }

    /// Like [`Captioner::new`], sharing graphs already loaded into `engines`.
    pub fn with_engines(engines: &mut EngineSet<'_>) -> Result<Self, CaptionError> {
        let bundle = engines.bundle();
        let m = bundle.manifest();
        let tokenizer = bundle
            .load_tokenizer()
            .map_err(|(path, reason)| CaptionError::Tokenizer { path, reason })?;
        engines.preload::<CaptionError>(&[Graph::VisionEncoder, Graph::CaptionDecoder])?;
        let (vision, r1) = engines.get::<CaptionError>(Graph::VisionEncoder)?;
        let (decoder, r2) = engines.get::<CaptionError>(Graph::CaptionDecoder)?;
        let layers = m.model.decoder_layers;
        let kv_names = |prefix: &str| -> Vec<String> {
            (0..layers)
                .flat_map(|l| [format!("{prefix}_key_{l}"), format!("{prefix}_value_{l}")])
                .collect()
        };
        Ok(Captioner {
            tokenizer,
            vision,
            decoder,
            model: m.model.clone(),
            tok: m.tokenizer.clone(),
            image: m.image.clone(),
            past_names: kv_names("past"),
            present_names: kv_names("present"),
            reports: vec![r1, r2],
        })
    }

    /// Which provider runs each graph and why the others were skipped.
    pub fn reports(&self) -> &[ProviderReport] {
        &self.reports
    }

    pub fn image_spec(&self) -> &ImageSpec {
        &self.image
    }

    pub fn model_spec(&self) -> &ModelSpec {
        &self.model
    }

    pub fn tokenizer_spec(&self) -> &TokenizerSpec {
        &self.tok
    }

    pub fn vision_engine(&self) -> &Engine {
        &self.vision
    }

    pub fn decoder_engine(&self) -> &Engine {
        &self.decoder
    }

    /// Longest caption in tokens, BOS and EOS included.
    fn max_len(&self) -> usize {
        self.model.max_len.min(self.tok.max_len)
    }

    /// Runs the vision encoder on `[B, 3, S, S]` normalised pixels and returns `patch_tokens`
    /// `[B, P, D]`.
    pub fn encode(&self, pixels: &Array4<f32>) -> Result<Array3<f32>, CaptionError> {
        let s = self.model.image_size;
        let want = [pixels.shape()[0], self.model.channels, s, s];
        if pixels.shape() != want || want[0] == 0 {
            return Err(shape_err(
                Graph::VisionEncoder.name(),
                format!(
                    "pixels must be [B>0, {}, {s}, {s}], got {:?}",
                    want[1],
                    pixels.shape()
                ),
            ));
        }
        let px = pixels.view().into_dyn();
        let mut outs = self.vision.run_views(&[("pixels", ValueView::F32(px))])?;
        let tokens = take_f32(&mut outs, Graph::VisionEncoder.name(), "patch_tokens")?;
        let want = [want[0], self.model.num_patches(), self.model.d_model];
        if tokens.shape() != want {
            return Err(shape_err(
                Graph::VisionEncoder.name(),
                format!("patch_tokens should be {want:?}, got {:?}", tokens.shape()),
            ));
        }
        tokens
            .into_dimensionality()
            .map_err(|e| shape_err(Graph::VisionEncoder.name(), e.to_string()))
    }

    fn check_image_tokens(&self, image_tokens: &Array3<f32>) -> Result<(), CaptionError> {
        let want = [self.model.num_patches(), self.model.d_model];
        if image_tokens.shape()[1..] != want || image_tokens.shape()[0] == 0 {
            return Err(shape_err(
                Graph::CaptionDecoder.name(),
                format!(
                    "image_tokens must be [B>0, {}, {}], got {:?}",
                    want[0],
                    want[1],
                    image_tokens.shape()
                ),
            ));
        }
        Ok(())
    }

    fn empty_past(&self, batch: usize) -> ArrayD<f32> {
        ArrayD::zeros(IxDyn(&[
            batch,
            self.model.n_heads,
            0,
            self.model.head_dim(),
        ]))
    }

    /// Greedy decoding with the KV cache: step 0 feeds `[BOS]` at position 0 with empty
    /// (`past` = 0) caches, then one token per step, feeding `present_*` back as `past_*`.
    /// Returns, per image, the generated ids after BOS up to (not including) EOS.
    pub fn greedy_tokens_kv(
        &self,
        image_tokens: &Array3<f32>,
    ) -> Result<Vec<Vec<u32>>, CaptionError> {
        self.check_image_tokens(image_tokens)?;
        let b = image_tokens.shape()[0];
        let img = image_tokens.view().into_dyn();
        let empty = self.empty_past(b);
        let mut past: Vec<ArrayD<f32>> = vec![empty; self.past_names.len()];
        let mut current = vec![i64::from(self.tok.bos_id); b];
        let mut state = GreedyState::new(b);
        for step in 0..self.max_len().saturating_sub(1) {
            let ids = Array2::from_shape_vec((b, 1), current.clone())
                .map_err(|e| shape_err(Graph::CaptionDecoder.name(), e.to_string()))?
                .into_dyn();
            let pos = ArrayD::from_elem(IxDyn(&[b, 1]), step as i64);
            let bias = ArrayD::<f32>::zeros(IxDyn(&[b, 1, 1, step + 1]));
            let mut inputs: Vec<(&str, ValueView<'_>)> = vec![
                ("input_ids", ValueView::I64(ids.view())),
                ("position_ids", ValueView::I64(pos.view())),
                ("attn_bias", ValueView::F32(bias.view())),
                ("image_tokens", ValueView::F32(img.clone())),
            ];
            for (name, p) in self.past_names.iter().zip(&past) {
                inputs.push((name, ValueView::F32(p.view())));
            }
            let mut outs = self.decoder.run_views(&inputs)?;
            let logits = self.logits(&mut outs, b, 1)?;
            let next = state.push(&logits, 0, &self.tok);
            if state.all_done() {
                break;
            }
            past = self
                .present_names
                .iter()
                .map(|n| take_f32(&mut outs, Graph::CaptionDecoder.name(), n))
                .collect::<Result<_, _>>()?;
            let want = [b, self.model.n_heads, step + 1, self.model.head_dim()];
            if let Some(p) = past.iter().find(|p| p.shape() != want) {
                return Err(shape_err(
                    Graph::CaptionDecoder.name(),
                    format!("present tensors should be {want:?}, got {:?}", p.shape()),
                ));
            }
            current = next;
        }
        Ok(state.tokens)
    }

    /// Reference greedy decoding without the cache: every step feeds the whole prefix
    /// (positions `0..L`, causal `attn_bias` with `bias[i][j] = 0` if `j <= i` else `-1e9`)
    /// with zero-length pasts, and reads the last position's logits. Same return value as
    /// [`Captioner::greedy_tokens_kv`].
    pub fn greedy_tokens_full(
        &self,
        image_tokens: &Array3<f32>,
    ) -> Result<Vec<Vec<u32>>, CaptionError> {
        self.check_image_tokens(image_tokens)?;
        let b = image_tokens.shape()[0];
        let img = image_tokens.view().into_dyn();
        let empty = self.empty_past(b);
        let mut seqs: Vec<Vec<i64>> = vec![vec![i64::from(self.tok.bos_id)]; b];
        let mut state = GreedyState::new(b);
        for step in 0..self.max_len().saturating_sub(1) {
            let l = step + 1;
            let flat: Vec<i64> = seqs.iter().flatten().copied().collect();
            let ids = Array2::from_shape_vec((b, l), flat)
                .map_err(|e| shape_err(Graph::CaptionDecoder.name(), e.to_string()))?
                .into_dyn();
            let pos = Array2::from_shape_fn((b, l), |(_, j)| j as i64).into_dyn();
            let bias = ArrayD::from_shape_fn(IxDyn(&[b, 1, l, l]), |ix| {
                if ix[3] <= ix[2] {
                    0.0f32
                } else {
                    -1e9
                }
            });
            let mut inputs: Vec<(&str, ValueView<'_>)> = vec![
                ("input_ids", ValueView::I64(ids.view())),
                ("position_ids", ValueView::I64(pos.view())),
                ("attn_bias", ValueView::F32(bias.view())),
                ("image_tokens", ValueView::F32(img.clone())),
            ];
            for name in &self.past_names {
                inputs.push((name, ValueView::F32(empty.view())));
            }
            let mut outs = self.decoder.run_views(&inputs)?;
            let logits = self.logits(&mut outs, b, l)?;
            let next = state.push(&logits, l - 1, &self.tok);
            if state.all_done() {
                break;
            }
            for (s, t) in seqs.iter_mut().zip(next) {
                s.push(t);
            }
        }
        Ok(state.tokens)
    }

    fn logits(
        &self,
        outs: &mut std::collections::HashMap<String, Value>,
        b: usize,
        seq: usize,
    ) -> Result<Array3<f32>, CaptionError> {
        let logits = take_f32(outs, Graph::CaptionDecoder.name(), "logits")?;
        let want = [b, seq, self.model.vocab_size];
        if logits.shape() != want {
            return Err(shape_err(
                Graph::CaptionDecoder.name(),
                format!("logits should be {want:?}, got {:?}", logits.shape()),
            ));
        }
        if !logits.iter().all(|v| v.is_finite()) {
            return Err(CaptionError::NonFinite {
                graph: Graph::CaptionDecoder.name().to_string(),
                output: "logits".to_string(),
            });
        }
        logits
            .into_dimensionality()
            .map_err(|e| shape_err(Graph::CaptionDecoder.name(), e.to_string()))
    }

    /// Turns generated ids into text: BOS and PAD are dropped, decoding stops at EOS, and the
    /// tokenizer skips any other special token.
    pub fn decode_tokens(&self, ids: &[u32]) -> Result<String, CaptionError> {
        let ids: Vec<u32> = ids
            .iter()
            .copied()
            .take_while(|&t| t != self.tok.eos_id)
            .filter(|&t| t != self.tok.bos_id && t != self.tok.pad_id)
            .collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| CaptionError::Decode {
                ids,
                reason: e.to_string(),
            })
    }

    /// Captions a batch of normalised `[B, 3, S, S]` pixels: encode, KV-cache greedy decode,
    /// detokenise.
    pub fn caption_pixels(&self, pixels: &Array4<f32>) -> Result<Vec<String>, CaptionError> {
        let tokens = self.encode(pixels)?;
        self.greedy_tokens_kv(&tokens)?
            .iter()
            .map(|ids| self.decode_tokens(ids))
            .collect()
    }

    /// Captions RGB images of any size: each is resized to the model's input size if needed
    /// (logged), normalised, and captioned in one batch.
    pub fn caption_images(&self, images: &[RgbImage]) -> Result<Vec<String>, CaptionError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let resized: Vec<RgbImage> = images
            .iter()
            .map(|i| preprocess::resize_for(i, &self.image))
            .collect();
        let pixels = preprocess::to_pixels_batch(&resized, &self.image)?;
        self.caption_pixels(&pixels)
    }
}

/// Per-image greedy bookkeeping shared by both decoding loops, so they differ only in what they
/// feed the decoder.
struct GreedyState {
    tokens: Vec<Vec<u32>>,
    done: Vec<bool>,
}

impl GreedyState {
    fn new(b: usize) -> Self {
        GreedyState {
            tokens: vec![Vec::new(); b],
            done: vec![false; b],
        }
    }

    /// Picks the argmax at position `pos` for every image, records it, and returns the ids to
    /// feed next (PAD for images that already finished; their outputs are ignored).
    fn push(&mut self, logits: &Array3<f32>, pos: usize, tok: &TokenizerSpec) -> Vec<i64> {
        let mut next = Vec::with_capacity(self.tokens.len());
        for (i, row) in logits.axis_iter(Axis(0)).enumerate() {
            if self.done[i] {
                next.push(i64::from(tok.pad_id));
                continue;
            }
            let t = argmax(row.row(pos)) as u32;
            if t == tok.eos_id {
                self.done[i] = true;
                next.push(i64::from(tok.pad_id));
            } else {
                self.tokens[i].push(t);
                next.push(i64::from(t));
            }
        }
        next
    }

    fn all_done(&self) -> bool {
        self.done.iter().all(|&d| d)
    }
}

fn take_f32(
    outs: &mut std::collections::HashMap<String, Value>,
    graph: &str,
    name: &str,
) -> Result<ArrayD<f32>, CaptionError> {
    match outs.remove(name) {
        Some(Value::F32(a)) => Ok(a),
        Some(other) => Err(shape_err(
            graph,
            format!("output `{name}` is {}, expected f32", other.dtype()),
        )),
        None => Err(shape_err(graph, format!("output `{name}` missing"))),
    }
}
