//! Image captioning: vision encoder → the one-step KV-cache decoder, greedy, sampled or beam
//! search ([`crate::decode`]), optionally continuing a prompt.
//!
//! Two decoding loops are provided on purpose. [`Captioner::greedy_tokens_kv`] is the real one:
//! it feeds one token per step and carries `present_*` back in as `past_*`. The reference
//! [`Captioner::greedy_tokens_full`] recomputes the whole prefix every step with an empty cache
//! and a causal `attn_bias`; both must produce identical tokens, which checks the cache wiring
//! of the exported decoder end to end (positions, bias shape, concat axis).

use std::path::PathBuf;
use std::sync::Arc;

use image::RgbImage;
use ndarray::{Array2, Array3, Array4, ArrayD, ArrayView3, Axis, IxDyn};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use thiserror::Error;
use tokenizers::{
    DecodeStream, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer,
};

use crate::bundle::{Bundle, BundleError};
use crate::decode::{self, DecodeOptions, Decoding};
use crate::engine::{
    Engine, EngineError, EngineOptions, ProviderChoice, ProviderReport, Value, ValueView,
};
use crate::engine_set::EngineSet;
use crate::generate::{prompt_ids, GenerateError};
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
    #[error("invalid decoding option: {0}")]
    InvalidOption(String),
    #[error("this bundle's captioner was not trained to answer questions (export a caption run trained on a folder with questions.jsonl: `duet-train shapeworld --questions N`)")]
    NoQuestions,
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "the prompt is {tokens} tokens with [BOS]; at most {max} leave the model room to answer"
    )]
    PromptTooLong { tokens: usize, max: usize },
    #[error("the prompt has words the model never saw in training: {words:?} (they would be read as [UNK])")]
    UnknownWords { words: Vec<String> },
    #[error("a text of {tokens} tokens with [BOS] is longer than the model reads ({max})")]
    TextTooLong { tokens: usize, max: usize },
    #[error("the prompt cannot be tokenized: {reason}")]
    Encode { reason: String },
    /// A NaN or infinite logit: a broken graph or weights, or a provider computing in too low a
    /// precision (TensorRT fp16). Reported rather than decoded, since the argmax of a NaN row is
    /// an arbitrary token and the caption would look valid.
    #[error("graph `{graph}` returned a non-finite value (NaN or infinity) in `{output}`")]
    NonFinite { graph: String, output: String },
}

/// One decoded text: the generated token ids (after the prompt, before EOS) and their total
/// log-probability under the model (natural log; the EOS token's included when it ended the
/// text).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decoded {
    pub ids: Vec<u32>,
    pub log_prob: f64,
    /// The model ended the text (EOS); false when the length cap cut it.
    pub eos: bool,
}

/// Receives `(image index, text piece)` as tokens are decoded ([`Captioner::decode`]).
pub type OnToken<'a> = &'a mut dyn FnMut(usize, &str);

/// Keeps a finished hypothesis as an image's best if it scores above the one there.
fn offer(best: &mut Option<Decoded>, hyp: Decoded) {
    if best.as_ref().is_none_or(|b| hyp.log_prob > b.log_prob) {
        *best = Some(hyp);
    }
}

type TokenizerStream<'t> = DecodeStream<
    't,
    ModelWrapper,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// Streams decoded text to a caller's callback: the tokenizer's incremental decoder per image
/// (it holds back a token until its text is complete), special tokens skipped as in
/// [`Captioner::decode_tokens`].
struct Stream<'t, 'f> {
    per_image: Vec<TokenizerStream<'t>>,
    on_token: Option<OnToken<'f>>,
}

impl<'t, 'f> Stream<'t, 'f> {
    fn new(tokenizer: &'t Tokenizer, images: usize, on_token: Option<OnToken<'f>>) -> Self {
        let per_image = match on_token {
            Some(_) => (0..images).map(|_| tokenizer.decode_stream(true)).collect(),
            None => Vec::new(),
        };
        Stream {
            per_image,
            on_token,
        }
    }

    fn push(&mut self, image: usize, id: u32) -> Result<(), CaptionError> {
        let (Some(cb), Some(dec)) = (self.on_token.as_mut(), self.per_image.get_mut(image)) else {
            return Ok(());
        };
        match dec.step(id) {
            Ok(Some(text)) => cb(image, &text),
            Ok(None) => {}
            Err(e) => {
                return Err(CaptionError::Decode {
                    ids: vec![id],
                    reason: e.to_string(),
                })
            }
        }
        Ok(())
    }
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
    answers_questions: bool,
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
            answers_questions: m.questions.is_some(),
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

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
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

    /// Greedy decoding with the KV cache and no prompt (see [`Captioner::decode`]): the
    /// generated ids after BOS up to (not including) EOS, per image.
    pub fn greedy_tokens_kv(
        &self,
        image_tokens: &Array3<f32>,
    ) -> Result<Vec<Vec<u32>>, CaptionError> {
        Ok(self
            .decode(image_tokens, &[], &DecodeOptions::default(), None)?
            .into_iter()
            .map(|d| d.ids)
            .collect())
    }

    /// Decodes a caption (or an answer) for each image with the KV cache: the first call feeds
    /// `[BOS] + prompt` at positions `0..=P` with empty (`past` = 0) caches and a causal
    /// `attn_bias`, then one token per call, feeding `present_*` back as `past_*`. Greedy and
    /// sampling run one row per image; beam search one row per live hypothesis, the caches
    /// gathered by parent row after each call. `prompt` is token ids the text continues from
    /// ([`Captioner::prompt_ids`]); the returned ids are the generated ones only, up to (not
    /// including) EOS, with their total log-probability under the model (EOS included when it
    /// was chosen).
    ///
    /// `on_token(image, text)` receives each generated token's text as it is decided: every
    /// step for greedy and sampling, the chosen hypothesis at once when an image's beam search
    /// ends. Concatenated, the pieces are what [`Captioner::decode_tokens`] gives.
    pub fn decode(
        &self,
        image_tokens: &Array3<f32>,
        prompt: &[u32],
        opts: &DecodeOptions,
        on_token: Option<OnToken<'_>>,
    ) -> Result<Vec<Decoded>, CaptionError> {
        self.check_image_tokens(image_tokens)?;
        opts.validate().map_err(CaptionError::InvalidOption)?;
        let cap = self.token_cap(prompt.len(), opts.max_tokens)?;
        let b = image_tokens.shape()[0];
        let mut stream = Stream::new(&self.tokenizer, b, on_token);
        match opts.decoding {
            Decoding::Beam { width } => self.beam(image_tokens, prompt, width, cap, &mut stream),
            choice => self.one_row_per_image(image_tokens, prompt, choice, cap, &mut stream),
        }
    }

    /// How many tokens may be generated after `[BOS] + prompt`: the positions the model has
    /// left, capped by `max_tokens`. A prompt that leaves no room is an error.
    fn token_cap(&self, prompt: usize, max_tokens: Option<usize>) -> Result<usize, CaptionError> {
        let left = self.max_len().saturating_sub(1 + prompt);
        if left == 0 {
            return Err(CaptionError::PromptTooLong {
                tokens: prompt + 1,
                max: self.max_len().saturating_sub(1),
            });
        }
        Ok(max_tokens.map_or(left, |m| m.min(left)))
    }

    /// `[BOS] + prompt` for each of `rows` rows.
    fn prefix(&self, rows: usize, prompt: &[u32]) -> Array2<i64> {
        let row: Vec<i64> = std::iter::once(self.tok.bos_id)
            .chain(prompt.iter().copied())
            .map(i64::from)
            .collect();
        Array2::from_shape_fn((rows, row.len()), |(_, j)| row[j])
    }

    /// One decoder call: `ids` `[R, L]` at positions `start..start + L` after `past` (length
    /// `start`). Returns the last position's logits `[R, V]` and the `present_*` caches.
    fn step(
        &self,
        image_tokens: ArrayView3<'_, f32>,
        ids: &Array2<i64>,
        start: usize,
        past: &[ArrayD<f32>],
    ) -> Result<(Array2<f32>, Vec<ArrayD<f32>>), CaptionError> {
        let (r, l) = ids.dim();
        let (pos, bias) = positions_and_bias(r, l, start);
        let ids = ids.view().into_dyn();
        let mut inputs: Vec<(&str, ValueView<'_>)> = vec![
            ("input_ids", ValueView::I64(ids)),
            ("position_ids", ValueView::I64(pos.view())),
            ("attn_bias", ValueView::F32(bias.view())),
            ("image_tokens", ValueView::F32(image_tokens.into_dyn())),
        ];
        for (name, p) in self.past_names.iter().zip(past) {
            inputs.push((name, ValueView::F32(p.view())));
        }
        let mut outs = self.decoder.run_views(&inputs)?;
        let logits = self.logits(&mut outs, r, l)?;
        let last = logits.index_axis(Axis(1), l - 1).to_owned();
        let present: Vec<ArrayD<f32>> = self
            .present_names
            .iter()
            .map(|n| take_f32(&mut outs, Graph::CaptionDecoder.name(), n))
            .collect::<Result<_, _>>()?;
        let want = [r, self.model.n_heads, start + l, self.model.head_dim()];
        if let Some(p) = present.iter().find(|p| p.shape() != want) {
            return Err(shape_err(
                Graph::CaptionDecoder.name(),
                format!("present tensors should be {want:?}, got {:?}", p.shape()),
            ));
        }
        Ok((last, present))
    }

    /// Greedy or sampled decoding: one row per image; an image that has finished feeds PAD
    /// (its outputs are ignored) until every image has.
    fn one_row_per_image(
        &self,
        image_tokens: &Array3<f32>,
        prompt: &[u32],
        choice: Decoding,
        cap: usize,
        stream: &mut Stream<'_, '_>,
    ) -> Result<Vec<Decoded>, CaptionError> {
        let b = image_tokens.shape()[0];
        // One generator per image (the seed's stream `i`), so an image's text does not depend
        // on which other images share its batch.
        let mut rngs: Vec<ChaCha8Rng> = (0..b)
            .map(|i| {
                let seed = match choice {
                    Decoding::Sample(s) => s.seed,
                    _ => 0,
                };
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(i as u64);
                rng
            })
            .collect();
        let mut out = vec![Decoded::default(); b];
        let mut done = vec![false; b];
        let mut ids = self.prefix(b, prompt);
        let mut past = vec![self.empty_past(b); self.past_names.len()];
        let mut start = 0;
        for _ in 0..cap {
            let (logits, present) = self.step(image_tokens.view(), &ids, start, &past)?;
            start += ids.ncols();
            let mut next = Vec::with_capacity(b);
            for (i, row) in logits.axis_iter(Axis(0)).enumerate() {
                if done[i] {
                    next.push(i64::from(self.tok.pad_id));
                    continue;
                }
                let t = match choice {
                    Decoding::Sample(s) => decode::sample(row, &s, &mut rngs[i]),
                    _ => decode::argmax(row),
                };
                out[i].log_prob += f64::from(row[t]) - decode::log_sum_exp(row);
                let t = t as u32;
                if t == self.tok.eos_id {
                    done[i] = true;
                    out[i].eos = true;
                    next.push(i64::from(self.tok.pad_id));
                } else {
                    out[i].ids.push(t);
                    stream.push(i, t)?;
                    next.push(i64::from(t));
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            past = present;
            ids = Array2::from_shape_vec((b, 1), next)
                .map_err(|e| shape_err(Graph::CaptionDecoder.name(), e.to_string()))?;
        }
        Ok(out)
    }

    /// Beam search: `width` live hypotheses per image, each one row of the decoder call.
    /// Each step ranks the `2 × width` likeliest extensions of every live hypothesis; an EOS
    /// among the first `width` finishes a hypothesis, the first `width` others live on. An
    /// image is done when nothing live scores above its best finished hypothesis (scores only
    /// fall as tokens are added, so nothing live could overtake it) or at the length cap,
    /// where the live hypotheses count as finished.
    fn beam(
        &self,
        image_tokens: &Array3<f32>,
        prompt: &[u32],
        width: usize,
        cap: usize,
        stream: &mut Stream<'_, '_>,
    ) -> Result<Vec<Decoded>, CaptionError> {
        let b = image_tokens.shape()[0];
        // Per image: live hypotheses with the row of the last call that holds their cache.
        let mut live: Vec<Vec<(Decoded, usize)>> =
            (0..b).map(|i| vec![(Decoded::default(), i)]).collect();
        let mut best: Vec<Option<Decoded>> = vec![None; b];
        let mut row_image: Vec<usize> = (0..b).collect();
        let mut ids = self.prefix(b, prompt);
        let mut past = vec![self.empty_past(b); self.past_names.len()];
        let mut start = 0;
        for step in 0..cap {
            let rows_tokens = image_tokens.select(Axis(0), &row_image);
            let (logits, present) = self.step(rows_tokens.view(), &ids, start, &past)?;
            start += ids.ncols();
            let (mut parents, mut next_image, mut next_ids) = (Vec::new(), Vec::new(), Vec::new());
            for (i, hyps) in live.iter_mut().enumerate() {
                if hyps.is_empty() {
                    continue;
                }
                let mut cands: Vec<(f64, usize, usize)> = Vec::new();
                for (h, (hyp, row)) in hyps.iter().enumerate() {
                    for (lp, t) in decode::top_log_probs(logits.row(*row), 2 * width) {
                        cands.push((hyp.log_prob + lp, h, t));
                    }
                }
                cands.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
                let mut kept: Vec<(Decoded, usize)> = Vec::with_capacity(width);
                for (rank, &(score, h, t)) in cands.iter().enumerate() {
                    let (parent, row) = &hyps[h];
                    if t as u32 == self.tok.eos_id {
                        if rank < width {
                            let ids = parent.ids.clone();
                            offer(
                                &mut best[i],
                                Decoded {
                                    ids,
                                    log_prob: score,
                                    eos: true,
                                },
                            );
                        }
                        continue;
                    }
                    let mut ids = parent.ids.clone();
                    ids.push(t as u32);
                    kept.push((
                        Decoded {
                            ids,
                            log_prob: score,
                            eos: false,
                        },
                        *row,
                    ));
                    if kept.len() == width {
                        break;
                    }
                }
                if step + 1 == cap {
                    for (hyp, _) in kept.drain(..) {
                        offer(&mut best[i], hyp);
                    }
                }
                if let Some(done) = &best[i] {
                    if kept
                        .first()
                        .is_none_or(|(h, _)| h.log_prob <= done.log_prob)
                    {
                        kept.clear();
                    }
                }
                if kept.is_empty() {
                    for &t in best[i].iter().flat_map(|d| &d.ids) {
                        stream.push(i, t)?;
                    }
                }
                for (hyp, row) in &mut kept {
                    parents.push(*row);
                    next_image.push(i);
                    next_ids.push(i64::from(*hyp.ids.last().unwrap_or(&self.tok.pad_id)));
                    *row = parents.len() - 1;
                }
                *hyps = kept;
            }
            if parents.is_empty() {
                break;
            }
            past = present
                .iter()
                .map(|p| p.select(Axis(0), &parents))
                .collect();
            ids = Array2::from_shape_vec((parents.len(), 1), next_ids)
                .map_err(|e| shape_err(Graph::CaptionDecoder.name(), e.to_string()))?;
            row_image = next_image;
        }
        Ok(best.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Reference greedy decoding without the cache: every step feeds the whole prefix
    /// (`[BOS] + prompt` and what was generated; positions `0..L`, causal `attn_bias` with
    /// `bias[i][j] = 0` if `j <= i` else `-1e9`) with zero-length pasts, and reads the last
    /// position's logits. Same return value as [`Captioner::greedy_tokens_kv`] (and as
    /// greedy [`Captioner::decode`] with the same prompt).
    pub fn greedy_tokens_full(
        &self,
        image_tokens: &Array3<f32>,
        prompt: &[u32],
    ) -> Result<Vec<Vec<u32>>, CaptionError> {
        self.check_image_tokens(image_tokens)?;
        let cap = self.token_cap(prompt.len(), None)?;
        let b = image_tokens.shape()[0];
        let img = image_tokens.view().into_dyn();
        let empty = self.empty_past(b);
        let start: Vec<i64> = std::iter::once(self.tok.bos_id)
            .chain(prompt.iter().copied())
            .map(i64::from)
            .collect();
        let mut seqs: Vec<Vec<i64>> = vec![start; b];
        let mut state = GreedyState::new(b);
        for _ in 0..cap {
            let l = seqs[0].len();
            let flat: Vec<i64> = seqs.iter().flatten().copied().collect();
            let ids = Array2::from_shape_vec((b, l), flat)
                .map_err(|e| shape_err(Graph::CaptionDecoder.name(), e.to_string()))?
                .into_dyn();
            let (pos, bias) = positions_and_bias(b, l, 0);
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

    /// The log-probability of `ids` (then EOS when `eos`) following `[BOS] + prompt`, for each
    /// image: one decoder call over the whole text without the cache. Ranks candidate texts
    /// for an image (multiple-choice answers, retrieval), and checks the scores decoding
    /// reports.
    pub fn score(
        &self,
        image_tokens: &Array3<f32>,
        prompt: &[u32],
        ids: &[u32],
        eos: bool,
    ) -> Result<Vec<f64>, CaptionError> {
        self.check_image_tokens(image_tokens)?;
        let b = image_tokens.shape()[0];
        let fed: Vec<u32> = prompt.iter().chain(ids).copied().collect();
        if 1 + fed.len() > self.max_len() {
            return Err(CaptionError::TextTooLong {
                tokens: 1 + fed.len(),
                max: self.max_len(),
            });
        }
        let seq = self.prefix(b, &fed);
        let l = seq.ncols();
        let (pos, bias) = positions_and_bias(b, l, 0);
        let empty = self.empty_past(b);
        let seq = seq.into_dyn();
        let mut inputs: Vec<(&str, ValueView<'_>)> = vec![
            ("input_ids", ValueView::I64(seq.view())),
            ("position_ids", ValueView::I64(pos.view())),
            ("attn_bias", ValueView::F32(bias.view())),
            (
                "image_tokens",
                ValueView::F32(image_tokens.view().into_dyn()),
            ),
        ];
        for name in &self.past_names {
            inputs.push((name, ValueView::F32(empty.view())));
        }
        let mut outs = self.decoder.run_views(&inputs)?;
        let logits = self.logits(&mut outs, b, l)?;
        // Position `prompt.len() + k` (0 is BOS) predicts `ids[k]`; the one after the last id
        // predicts EOS.
        let targets: Vec<(usize, u32)> = ids
            .iter()
            .copied()
            .chain(eos.then_some(self.tok.eos_id))
            .enumerate()
            .map(|(k, t)| (prompt.len() + k, t))
            .collect();
        Ok(logits
            .axis_iter(Axis(0))
            .map(|rows| {
                targets
                    .iter()
                    .map(|&(at, t)| {
                        let row = rows.row(at);
                        f64::from(row[t as usize]) - decode::log_sum_exp(row)
                    })
                    .sum()
            })
            .collect())
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

    /// The ids of a prompt the text should continue from (a question, or the start of a
    /// caption), without BOS/EOS. Empty prompts, unknown words and prompts that leave the model
    /// no room to answer are errors.
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>, CaptionError> {
        let seq = prompt_ids(&self.tokenizer, &self.tok, 0, prompt).map_err(|e| match e {
            GenerateError::EmptyPrompt { .. } => CaptionError::EmptyPrompt,
            GenerateError::UnknownWords { words, .. } => CaptionError::UnknownWords { words },
            GenerateError::PromptTooLong { tokens, .. } => CaptionError::PromptTooLong {
                tokens: tokens - 1,
                max: self.max_len().saturating_sub(1),
            },
            other => CaptionError::Encode {
                reason: other.to_string(),
            },
        })?;
        // `prompt_ids` wraps the words in [BOS] … [EOS]; the decoder adds its own BOS.
        let ids: Vec<u32> = seq[1..seq.len() - 1].iter().map(|&t| t as u32).collect();
        self.token_cap(ids.len(), None)?;
        Ok(ids)
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

    /// Whether the bundle's captioner was trained to answer questions (manifest `questions`).
    pub fn answers_questions(&self) -> bool {
        self.answers_questions
    }

    /// Answers `question` about each image ("what colour is the circle?"): the question is
    /// the prompt, with the " ?" the model was trained to answer after added when missing.
    /// A bundle whose captioner never saw questions is [`CaptionError::NoQuestions`] rather
    /// than a caption continuing the question's words.
    pub fn answer_images(
        &self,
        images: &[RgbImage],
        question: &str,
        opts: &DecodeOptions,
        on_token: Option<OnToken<'_>>,
    ) -> Result<Vec<String>, CaptionError> {
        if !self.answers_questions {
            return Err(CaptionError::NoQuestions);
        }
        let q = question.trim();
        if q.is_empty() {
            return Err(CaptionError::EmptyPrompt);
        }
        let prompt = if q.ends_with('?') {
            q.to_string()
        } else {
            format!("{q} ?")
        };
        self.caption_images_with(images, Some(&prompt), opts, on_token)
    }

    /// [`Captioner::caption_images`] with decoding options and a prompt the text continues
    /// from (a question for a model trained to answer, or the start of a caption); each
    /// token's text goes to `on_token(image, text)` as it is decided (see
    /// [`Captioner::decode`]). Returns the generated text only, not the prompt.
    pub fn caption_images_with(
        &self,
        images: &[RgbImage],
        prompt: Option<&str>,
        opts: &DecodeOptions,
        on_token: Option<OnToken<'_>>,
    ) -> Result<Vec<String>, CaptionError> {
        opts.validate().map_err(CaptionError::InvalidOption)?;
        let prompt = prompt.map(|p| self.prompt_ids(p)).transpose()?;
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let resized: Vec<RgbImage> = images
            .iter()
            .map(|i| preprocess::resize_for(i, &self.image))
            .collect();
        let pixels = preprocess::to_pixels_batch(&resized, &self.image)?;
        let tokens = self.encode(&pixels)?;
        self.decode(&tokens, prompt.as_deref().unwrap_or(&[]), opts, on_token)?
            .iter()
            .map(|d| self.decode_tokens(&d.ids))
            .collect()
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
            let t = decode::argmax(row.row(pos)) as u32;
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

/// `position_ids` `[rows, seq]` (`past + j`) and the causal `attn_bias` `[rows, 1, seq, past +
/// seq]` of a decoder call: query `i` sees key `j` iff `j <= past + i` (0 there, -1e9 elsewhere).
fn positions_and_bias(rows: usize, seq: usize, past: usize) -> (ArrayD<i64>, ArrayD<f32>) {
    let pos = Array2::from_shape_fn((rows, seq), |(_, j)| (past + j) as i64).into_dyn();
    let bias = ArrayD::from_shape_fn(IxDyn(&[rows, 1, seq, past + seq]), |ix| {
        if ix[3] <= past + ix[2] {
            0.0f32
        } else {
            -1e9
        }
    });
    (pos, bias)
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
