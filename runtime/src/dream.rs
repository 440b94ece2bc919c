//! Generation and instruction editing through the dream queries (DreamLLM): the vision encoder
//! reads the source image (the black image for text to image), the dream encoder — the caption
//! decoder over `[BOS] prompt` and the learnt queries — turns prompt and image into the
//! denoiser's conditioning, and the generator's sampler draws with it, guided against the
//! text encoder's empty caption. The same denoiser graph serves the text-encoder path.

use std::sync::Arc;

use image::RgbImage;
use ndarray::{Array2, Array3, ArrayD, Axis};

use crate::bundle::Bundle;
use crate::caption::Captioner;
use crate::diffusion;
use crate::engine::{Engine, EngineOptions, ProviderChoice, ProviderReport, Value};
use crate::engine_set::EngineSet;
use crate::generate::{prompt_ids, GenerateError, GenerateOptions, Generator, MAX_BATCH};
use crate::manifest::Graph;
use crate::preprocess::{resize_for, to_pixels_batch};

/// A bundle's dream pipeline: the captioner's vision encoder and tokenizer, the dream encoder,
/// and the generator's graphs, loaded once.
pub struct Dreamer {
    captioner: Captioner,
    dream: Arc<Engine>,
    generator: Generator,
    reports: Vec<ProviderReport>,
}

impl std::fmt::Debug for Dreamer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dreamer")
            .field("dream", &self.dream)
            .field("generator", &self.generator)
            .finish_non_exhaustive()
    }
}

fn shape_err(reason: impl Into<String>) -> GenerateError {
    GenerateError::Shape {
        graph: Graph::DreamEncoder.name().to_string(),
        reason: reason.into(),
    }
}

/// The conditioning without the prompt positions every row masks out: `[N, longest + K, D]`
/// from `[N, max_len + K, D]`, so each denoiser step attends over the longest prompt and the
/// queries instead of all `max_len` positions (48 on tiny, most of them padding). A masked key
/// has zero attention weight and zero pooling weight, so the image is the same up to float
/// summation order.
fn drop_padding(
    cond: ArrayD<f32>,
    mask: ArrayD<f32>,
    max_len: usize,
) -> (ArrayD<f32>, ArrayD<f32>) {
    let width = mask.shape().get(1).copied().unwrap_or(0);
    if width < max_len {
        return (cond, mask);
    }
    // Prompts fill positions from 0 on, so the last used position of any row bounds them all.
    let longest = mask
        .outer_iter()
        .map(|row| {
            row.iter()
                .take(max_len)
                .enumerate()
                .filter_map(|(i, &m)| (m > 0.0).then_some(i + 1))
                .max()
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    let keep: Vec<usize> = (0..longest).chain(max_len..width).collect();
    // `select` along an inner axis gives a column-major array; the engines are fed row-major.
    let pick = |a: &ArrayD<f32>| a.select(Axis(1), &keep).as_standard_layout().into_owned();
    (pick(&cond), pick(&mask))
}

impl Dreamer {
    /// Loads the pipeline, each graph on the first provider of `choice` that works. A bundle
    /// without a `dream_encoder` is [`GenerateError::NoDream`].
    pub fn new(
        bundle: &Bundle,
        choice: ProviderChoice,
        options: &EngineOptions,
    ) -> Result<Self, GenerateError> {
        Self::with_engines(&mut EngineSet::new(bundle, choice, options))
    }

    /// Like [`Dreamer::new`], sharing graphs already loaded into `engines`.
    pub fn with_engines(engines: &mut EngineSet<'_>) -> Result<Self, GenerateError> {
        let has_dream = engines
            .bundle()
            .manifest()
            .graphs
            .iter()
            .any(|g| g.name == Graph::DreamEncoder);
        if !has_dream {
            return Err(GenerateError::NoDream);
        }
        let generator = Generator::with_engines(engines)?;
        let captioner =
            Captioner::with_engines(engines).map_err(|e| GenerateError::Caption(Box::new(e)))?;
        let (dream, report) = engines.get::<GenerateError>(Graph::DreamEncoder)?;
        let mut reports = captioner.reports().to_vec();
        reports.extend_from_slice(generator.reports());
        reports.push(report);
        Ok(Dreamer {
            captioner,
            dream,
            generator,
            reports,
        })
    }

    /// Which provider runs each graph and why the others were skipped.
    pub fn reports(&self) -> &[ProviderReport] {
        &self.reports
    }

    pub fn generator(&self) -> &Generator {
        &self.generator
    }

    pub fn dream_engine(&self) -> &Engine {
        &self.dream
    }

    /// The denoiser's conditioning `[N, max_len + K, D]` (the prompt's positions, then the
    /// queries') and its key mask `[N, max_len + K]` for `prompts` read over `images` (`None`:
    /// the black image), in the order given.
    pub fn condition(
        &self,
        prompts: &[&str],
        images: &[Option<&RgbImage>],
    ) -> Result<(ArrayD<f32>, ArrayD<f32>), GenerateError> {
        let n = prompts.len();
        if n == 0 {
            return Err(GenerateError::NoPrompts);
        }
        if n > MAX_BATCH {
            return Err(GenerateError::TooMany { count: n });
        }
        if images.len() != n {
            return Err(GenerateError::InvalidOption(format!(
                "{n} prompts but {} images",
                images.len()
            )));
        }
        let spec = self.captioner.image_spec();
        let tok = self.captioner.tokenizer_spec();
        let model = self.captioner.model_spec();
        let blank = RgbImage::new(spec.size as u32, spec.size as u32);
        let fitted: Vec<RgbImage> = images
            .iter()
            .map(|img| img.map_or_else(|| blank.clone(), |i| resize_for(i, spec)))
            .collect();
        let pixels = to_pixels_batch(&fitted, spec)
            .map_err(|e| GenerateError::Caption(Box::new(crate::CaptionError::Image(e))))?;
        let image_tokens: Array3<f32> = self
            .captioner
            .encode(&pixels)
            .map_err(|e| GenerateError::Caption(Box::new(e)))?;
        // `[BOS] words` (no EOS: the queries follow), padded to the graph's fixed length.
        let l = tok.max_len;
        let mut ids = Array2::<i64>::from_elem((n, l), i64::from(tok.pad_id));
        let mut mask = Array2::<f32>::zeros((n, l));
        for (i, p) in prompts.iter().enumerate() {
            let seq = prompt_ids(self.captioner.tokenizer(), tok, i, p)?;
            for (j, &t) in seq[..seq.len() - 1].iter().enumerate() {
                ids[[i, j]] = t;
                mask[[i, j]] = 1.0;
            }
        }
        let k = model.dream_queries;
        let mut key_mask = Array2::<f32>::ones((n, l + k));
        key_mask.slice_mut(ndarray::s![.., ..l]).assign(&mask);
        let mut outs = self.dream.run(&[
            ("input_ids", Value::I64(ids.into_dyn())),
            ("attn_mask", Value::F32(mask.into_dyn())),
            ("image_tokens", Value::F32(image_tokens.into_dyn())),
        ])?;
        let tokens = match outs.remove("dream_tokens") {
            Some(Value::F32(a)) => a,
            _ => return Err(shape_err("output `dream_tokens` missing or not f32")),
        };
        let want = [n, l + k, model.d_model];
        if tokens.shape() != want {
            return Err(shape_err(format!(
                "dream_tokens should be {want:?}, got {:?}",
                tokens.shape()
            )));
        }
        if !tokens.iter().all(|v| v.is_finite()) {
            return Err(GenerateError::NonFinite {
                graph: Graph::DreamEncoder.name().to_string(),
                output: "dream_tokens".to_string(),
            });
        }
        Ok((tokens, key_mask.into_dyn()))
    }

    fn draw(
        &self,
        prompts: &[&str],
        images: &[Option<&RgbImage>],
        opts: &GenerateOptions,
    ) -> Result<ArrayD<f32>, GenerateError> {
        let (cond, mask) = self.condition(prompts, images)?;
        let (cond, mask) = drop_padding(cond, mask, self.captioner.tokenizer_spec().max_len);
        self.generator.generate_conditioned(cond, mask, opts)
    }

    /// Text to image through the dream queries: one image per prompt, drawn from the black
    /// image; `[N, 3, S, S]` in `[-1, 1]`.
    pub fn generate(
        &self,
        prompts: &[&str],
        opts: &GenerateOptions,
    ) -> Result<ArrayD<f32>, GenerateError> {
        self.draw(prompts, &vec![None; prompts.len()], opts)
    }

    /// [`Dreamer::generate`] as RGB images.
    pub fn generate_images(
        &self,
        prompts: &[&str],
        opts: &GenerateOptions,
    ) -> Result<Vec<RgbImage>, GenerateError> {
        Ok(diffusion::to_images(&self.generate(prompts, opts)?)?)
    }

    /// Instruction editing: image `i` redrawn as `instructions[i]` asks ("make the square
    /// blue"). Images of another size are fitted as the captioner fits them.
    pub fn edit(
        &self,
        images: &[RgbImage],
        instructions: &[&str],
        opts: &GenerateOptions,
    ) -> Result<ArrayD<f32>, GenerateError> {
        if images.len() != instructions.len() {
            return Err(GenerateError::InvalidOption(format!(
                "{} images but {} instructions",
                images.len(),
                instructions.len()
            )));
        }
        let sources: Vec<Option<&RgbImage>> = images.iter().map(Some).collect();
        self.draw(instructions, &sources, opts)
    }

    /// [`Dreamer::edit`] as RGB images.
    pub fn edit_images(
        &self,
        images: &[RgbImage],
        instructions: &[&str],
        opts: &GenerateOptions,
    ) -> Result<Vec<RgbImage>, GenerateError> {
        Ok(diffusion::to_images(&self.edit(
            images,
            instructions,
            opts,
        )?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_padding_keeps_the_longest_prompt_and_every_query() {
        // Two rows over max_len 4 and K 2: prompts of 1 and 3 tokens.
        let (n, l, k, d) = (2, 4, 2, 3);
        let cond = ArrayD::from_shape_fn(vec![n, l + k, d], |ix| {
            (ix[0] * 100 + ix[1] * 10 + ix[2]) as f32
        });
        let mut mask = ArrayD::ones(vec![n, l + k]);
        for (row, len) in [(0, 1), (1, 3)] {
            for j in len..l {
                mask[[row, j]] = 0.0;
            }
        }
        let (c, m) = drop_padding(cond.clone(), mask, l);
        assert_eq!(c.shape(), &[n, 3 + k, d]);
        // Positions 0..3 of the prompts, then the queries at 4 and 5.
        for (out, src) in [(0, 0), (2, 2), (3, 4), (4, 5)] {
            assert_eq!(c[[1, out, 1]], cond[[1, src, 1]]);
        }
        assert!(c.is_standard_layout() && m.is_standard_layout());
        assert_eq!(
            m.iter().copied().collect::<Vec<_>>(),
            vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
        );
    }
}
