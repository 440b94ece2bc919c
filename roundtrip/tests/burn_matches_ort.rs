//! The round trip: every graph of `shipped/duet-small`, imported into Burn by burn-onnx (see
//! `build.rs`), gives onnxruntime's outputs on the same inputs, within `TOLERANCE`.
//!
//! Inputs are what the runtime feeds: the sample images in `examples/images` (decoded and
//! normalised as the manifest says), tokenised prompts with padding, encoder outputs as the
//! conditions of the denoiser, restorers and fusion head, and the KV-cache loop of captioning.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use burn::backend::ndarray::{NdArray, NdArrayDevice};
use burn::tensor::{Int, Tensor, TensorData};
use duet_roundtrip::{
    bundle_dir, caption_decoder, denoiser, dream_encoder, fusion_head, restorer_i2t, restorer_t2i,
    text_encoder, vision_encoder, weights,
};
use ort::environment::Environment;
use ort::session::{Session, SessionInputValue};
use ort::value::Tensor as OrtTensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::Value as Json;

type B = NdArray<f32>;

/// The bound on |Burn − ort| for every output element. The exporter's own parity check
/// (Burn's training-time modules vs ort) measured ≤ 1.4e-5 on these graphs.
const TOLERANCE: f32 = 1e-4;

const DEVICE: NdArrayDevice = NdArrayDevice::Cpu;

/// A tensor on the host: what both runtimes are fed and what they give back.
#[derive(Clone, Debug)]
struct Host<T> {
    shape: Vec<usize>,
    data: Vec<T>,
}

impl<T> Host<T> {
    fn new(shape: &[usize], data: Vec<T>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?}"
        );
        Self {
            shape: shape.to_vec(),
            data,
        }
    }
}

impl Host<f32> {
    fn burn<const D: usize>(&self) -> Tensor<B, D> {
        Tensor::from_data(
            TensorData::new(self.data.clone(), self.shape.clone()),
            &DEVICE,
        )
    }

    fn from_burn<const D: usize>(t: Tensor<B, D>) -> Self {
        let shape = t.dims().to_vec();
        let data = t.into_data().to_vec::<f32>().expect("an f32 tensor");
        Self { shape, data }
    }

    fn ort(&self) -> SessionInputValue<'static> {
        OrtTensor::from_array((self.shape.clone(), self.data.clone()))
            .expect("an ort f32 tensor")
            .into()
    }

    fn randn(shape: &[usize], rng: &mut ChaCha8Rng) -> Self {
        let n = shape.iter().product();
        let data = (0..n).map(|_| StandardNormal.sample(rng)).collect();
        Self::new(shape, data)
    }
}

impl Host<i64> {
    fn burn<const D: usize>(&self) -> Tensor<B, D, Int> {
        Tensor::from_data(
            TensorData::new(self.data.clone(), self.shape.clone()),
            &DEVICE,
        )
    }

    fn ort(&self) -> SessionInputValue<'static> {
        OrtTensor::from_array((self.shape.clone(), self.data.clone()))
            .expect("an ort i64 tensor")
            .into()
    }
}

/// Largest |a − b| over all elements; the shapes must agree.
fn max_abs_diff(what: &str, burn: &Host<f32>, ort: &Host<f32>) -> f32 {
    assert_eq!(
        burn.shape, ort.shape,
        "{what}: Burn and ort output shapes differ"
    );
    assert!(
        ort.data.iter().all(|v| v.is_finite()),
        "{what}: ort gave a non-finite value"
    );
    burn.data
        .iter()
        .zip(&ort.data)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0.0,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

/// Asserts `burn` is within `TOLERANCE` of `ort` and returns the measured difference.
fn assert_close(what: &str, burn: &Host<f32>, ort: &Host<f32>) -> f32 {
    let d = max_abs_diff(what, burn, ort);
    let scale = ort.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    println!(
        "{what:<40} {:?}  max |Burn - ort| = {d:.2e}  (max |ort| = {scale:.3})",
        ort.shape
    );
    assert!(
        d <= TOLERANCE,
        "{what}: Burn differs from ort by {d:e} > {TOLERANCE:e}"
    );
    d
}

fn ort_library() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return PathBuf::from(p);
    }
    let local = bundle_dir().join("../../.ort/lib/libonnxruntime.so");
    assert!(
        local.is_file(),
        "no onnxruntime: set ORT_DYLIB_PATH or run scripts/setup.sh (expected {})",
        local.display()
    );
    local
}

fn environment() -> &'static Environment {
    static ENV: OnceLock<Environment> = OnceLock::new();
    ENV.get_or_init(|| {
        let lib = ort_library();
        ort::init_from(&lib)
            .unwrap_or_else(|e| panic!("loading {}: {e}", lib.display()))
            .with_name("duet-roundtrip")
            .with_telemetry(false)
            .build()
            .expect("an onnxruntime environment")
    })
}

/// One of the bundle's graphs on ort's CPU execution provider.
struct OrtGraph {
    session: Session,
}

impl OrtGraph {
    fn load(graph: &str) -> Self {
        let path = bundle_dir().join(format!("{graph}.onnx"));
        let session = Session::builder(environment())
            .expect("a session builder")
            .commit_from_file(&path)
            .unwrap_or_else(|e| panic!("ort loading {}: {e}", path.display()));
        Self { session }
    }

    /// Runs the graph and returns every output by name.
    fn run(
        &mut self,
        inputs: Vec<(&str, SessionInputValue<'static>)>,
    ) -> HashMap<String, Host<f32>> {
        let names: Vec<String> = self
            .session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        let outputs = self.session.run(inputs).expect("ort run");
        names
            .into_iter()
            .map(|name| {
                let (shape, data) = outputs[name.as_str()]
                    .try_extract_tensor::<f32>()
                    .expect("an f32 output");
                let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                let host = Host::new(&shape, data.to_vec());
                (name, host)
            })
            .collect()
    }
}

fn manifest() -> Json {
    let text = std::fs::read_to_string(bundle_dir().join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest.json parses")
}

fn usize_at(m: &Json, pointer: &str) -> usize {
    m.pointer(pointer)
        .and_then(Json::as_u64)
        .unwrap_or_else(|| panic!("manifest has no integer at {pointer}")) as usize
}

fn f32s_at(m: &Json, pointer: &str) -> Vec<f32> {
    m.pointer(pointer)
        .and_then(Json::as_array)
        .unwrap_or_else(|| panic!("manifest has no array at {pointer}"))
        .iter()
        .map(|v| v.as_f64().expect("a number") as f32)
        .collect()
}

/// The sample images, `[N, 3, H, W]`, normalised `(x / 255 - mean) / std` as the manifest says.
fn sample_pixels(m: &Json) -> (Vec<String>, Host<f32>) {
    let size = usize_at(m, "/image/size");
    let (mean, std) = (f32s_at(m, "/image/mean"), f32s_at(m, "/image/std"));
    let dir = bundle_dir().join("../../examples/images");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples/images")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "examples/images holds the sample images");
    let mut data = Vec::with_capacity(files.len() * 3 * size * size);
    for file in &files {
        let img = image::open(file)
            .unwrap_or_else(|e| panic!("decoding {}: {e}", file.display()))
            .to_rgb8();
        assert_eq!(
            img.dimensions(),
            (size as u32, size as u32),
            "{}",
            file.display()
        );
        for c in 0..3 {
            for px in img.pixels() {
                data.push((f32::from(px.0[c]) / 255.0 - mean[c]) / std[c]);
            }
        }
    }
    let names = files.iter().map(|f| file_stem(f)).collect();
    (names, Host::new(&[files.len(), 3, size, size], data))
}

fn file_stem(p: &Path) -> String {
    p.file_stem().unwrap().to_string_lossy().into_owned()
}

/// The bundle's word-level vocabulary, both ways.
struct Vocab {
    ids: HashMap<String, i64>,
    words: HashMap<i64, String>,
}

impl Vocab {
    fn load() -> Self {
        let text =
            std::fs::read_to_string(bundle_dir().join("tokenizer.json")).expect("tokenizer.json");
        let json: Json = serde_json::from_str(&text).expect("tokenizer.json parses");
        let ids: HashMap<String, i64> = json["model"]["vocab"]
            .as_object()
            .expect("a word-level vocabulary")
            .iter()
            .map(|(w, id)| (w.clone(), id.as_i64().expect("an id")))
            .collect();
        let words = ids.iter().map(|(w, &id)| (id, w.clone())).collect();
        Self { ids, words }
    }

    fn decode(&self, ids: &[i64]) -> String {
        ids.iter()
            .map(|id| self.words.get(id).map_or("?", String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `[BOS] words [EOS]` padded to `max_len`, and its mask (1 on tokens, 0 on padding), for each
/// prompt; every word must be in the vocabulary so the inputs are ones the model was trained on.
/// Without `eos` the prompt is `[BOS] words`, as the dream encoder reads it (its queries follow).
fn tokenise(m: &Json, vocab: &Vocab, prompts: &[&str], eos: bool) -> (Host<i64>, Host<f32>) {
    let max_len = usize_at(m, "/tokenizer/max_len");
    let (pad, bos, eos_id) = (
        usize_at(m, "/tokenizer/pad_id") as i64,
        usize_at(m, "/tokenizer/bos_id") as i64,
        usize_at(m, "/tokenizer/eos_id") as i64,
    );
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for prompt in prompts {
        let mut seq = vec![bos];
        seq.extend(prompt.split_whitespace().map(|w| {
            *vocab
                .ids
                .get(w)
                .unwrap_or_else(|| panic!("`{w}` is not in the vocabulary"))
        }));
        if eos {
            seq.push(eos_id);
        }
        assert!(seq.len() < max_len);
        mask.extend((0..max_len).map(|j| if j < seq.len() { 1.0 } else { 0.0 }));
        seq.resize(max_len, pad);
        ids.extend(seq);
    }
    let shape = [prompts.len(), max_len];
    (Host::new(&shape, ids), Host::new(&shape, mask))
}

const PROMPTS: [&str; 3] = [
    "a large red circle on the left",
    "grinning face",
    "a small blue square at the top right and a large yellow triangle at the bottom",
];

/// The text encoder's outputs on `PROMPTS` through ort: the conditions fed to the later graphs.
fn ort_text(m: &Json) -> (Host<f32>, Host<f32>, Host<f32>) {
    let (ids, mask) = tokenise(m, &Vocab::load(), &PROMPTS, true);
    let mut out = OrtGraph::load("text_encoder")
        .run(vec![("input_ids", ids.ort()), ("attn_mask", mask.ort())]);
    (
        out.remove("text_tokens").unwrap(),
        out.remove("text_embedding").unwrap(),
        mask,
    )
}

#[test]
fn vision_encoder_matches_ort_on_the_sample_images() {
    let m = manifest();
    let (_, pixels) = sample_pixels(&m);
    let burn = vision_encoder::Model::<B>::from_file(weights("vision_encoder"), &DEVICE);
    let (patch_tokens, embedding) = burn.forward(pixels.burn());
    let mut ort = OrtGraph::load("vision_encoder").run(vec![("pixels", pixels.ort())]);
    assert_close(
        "vision_encoder patch_tokens",
        &Host::from_burn(patch_tokens),
        &ort.remove("patch_tokens").unwrap(),
    );
    assert_close(
        "vision_encoder embedding",
        &Host::from_burn(embedding),
        &ort.remove("embedding").unwrap(),
    );
}

/// Greedy captioning of the sample images with the KV cache, as `duet caption` runs it: step 0
/// feeds BOS with empty (`past` = 0) caches, then each step feeds one token and the previous
/// step's `present_*` as `past_*`. Burn keeps its own caches and ort its own; both are fed the
/// same image tokens and the same token each step, and must agree on every step's logits and
/// caches and on every chosen token.
#[test]
fn caption_decoder_matches_ort_through_the_kv_cache_loop() {
    let m = manifest();
    let vocab = Vocab::load();
    let (names, pixels) = sample_pixels(&m);
    let b = names.len();
    let (heads, head_dim) = (
        usize_at(&m, "/model/n_heads"),
        usize_at(&m, "/model/d_model") / usize_at(&m, "/model/n_heads"),
    );
    let layers = usize_at(&m, "/model/decoder_layers");
    assert_eq!(layers, 4, "the generated forward takes four layers' caches");
    let (bos, eos) = (
        usize_at(&m, "/tokenizer/bos_id") as i64,
        usize_at(&m, "/tokenizer/eos_id") as i64,
    );
    let max_len = usize_at(&m, "/tokenizer/max_len");

    let image_tokens = OrtGraph::load("vision_encoder")
        .run(vec![("pixels", pixels.ort())])
        .remove("patch_tokens")
        .unwrap();
    let burn = caption_decoder::Model::<B>::from_file(weights("caption_decoder"), &DEVICE);
    let mut ort = OrtGraph::load("caption_decoder");

    let empty: Host<f32> = Host::new(&[b, heads, 0, head_dim], Vec::new());
    let mut burn_past: Vec<Tensor<B, 4>> = (0..2 * layers).map(|_| empty.burn()).collect();
    let mut ort_past: Vec<Host<f32>> = vec![empty; 2 * layers];
    let mut current = vec![bos; b];
    let mut tokens: Vec<Vec<i64>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let mut worst = 0.0f32;
    let mut steps = 0;
    for step in 0..max_len - 1 {
        let ids = Host::new(&[b, 1], current.clone());
        let pos = Host::new(&[b, 1], vec![step as i64; b]);
        let bias = Host::new(&[b, 1, 1, step + 1], vec![0.0f32; b * (step + 1)]);

        let mut feed = vec![
            ("input_ids", ids.ort()),
            ("position_ids", pos.ort()),
            ("attn_bias", bias.ort()),
            ("image_tokens", image_tokens.ort()),
        ];
        let past_names: Vec<String> = (0..layers)
            .flat_map(|l| [format!("past_key_{l}"), format!("past_value_{l}")])
            .collect();
        for (name, p) in past_names.iter().zip(&ort_past) {
            feed.push((name.as_str(), p.ort()));
        }
        let mut ort_out = ort.run(feed);

        let [k0, v0, k1, v1, k2, v2, k3, v3]: [Tensor<B, 4>; 8] =
            burn_past.try_into().expect("eight caches");
        let (logits, pk0, pv0, pk1, pv1, pk2, pv2, pk3, pv3) = burn.forward(
            ids.burn(),
            pos.burn(),
            bias.burn(),
            image_tokens.burn(),
            k0,
            v0,
            k1,
            v1,
            k2,
            v2,
            k3,
            v3,
        );
        burn_past = vec![pk0, pv0, pk1, pv1, pk2, pv2, pk3, pv3];

        let ort_logits = ort_out.remove("logits").unwrap();
        let burn_logits = Host::from_burn(logits);
        worst = worst.max(max_abs_diff("logits", &burn_logits, &ort_logits));
        ort_past = (0..layers)
            .flat_map(|l| [format!("present_key_{l}"), format!("present_value_{l}")])
            .map(|n| ort_out.remove(&n).unwrap())
            .collect();
        for (bp, op) in burn_past.iter().zip(&ort_past) {
            worst = worst.max(max_abs_diff("present", &Host::from_burn(bp.clone()), op));
        }
        assert!(
            worst <= TOLERANCE,
            "step {step}: Burn differs from ort by {worst:e} > {TOLERANCE:e}"
        );

        let vocab_size = ort_logits.shape[2];
        for (i, row) in ort_logits.data.chunks(vocab_size).enumerate() {
            let ort_next = argmax(row);
            let burn_next = argmax(&burn_logits.data[i * vocab_size..(i + 1) * vocab_size]);
            assert_eq!(
                burn_next, ort_next,
                "step {step}, image {}: Burn picks another token",
                names[i]
            );
            if !done[i] {
                if ort_next == eos {
                    done[i] = true;
                } else {
                    tokens[i].push(ort_next);
                }
            }
            current[i] = ort_next;
        }
        steps = step + 1;
        if done.iter().all(|&d| d) {
            break;
        }
    }
    println!("caption_decoder: {steps} KV-cache steps, max |Burn - ort| over logits and caches = {worst:.2e}");
    for (name, t) in names.iter().zip(&tokens) {
        println!("  {name:<28} {}", vocab.decode(t));
    }
    assert!(
        done.iter().all(|&d| d),
        "every caption ends with EOS within max_len"
    );
    assert!(
        tokens.iter().all(|t| !t.is_empty()),
        "every sample image gets a non-empty caption"
    );
}

fn argmax(row: &[f32]) -> i64 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as i64
}

#[test]
fn text_encoder_matches_ort_on_padded_prompts() {
    let m = manifest();
    let (ids, mask) = tokenise(&m, &Vocab::load(), &PROMPTS, true);
    let burn = text_encoder::Model::<B>::from_file(weights("text_encoder"), &DEVICE);
    let (tokens, embedding) = burn.forward(ids.burn(), mask.burn());
    let mut ort = OrtGraph::load("text_encoder")
        .run(vec![("input_ids", ids.ort()), ("attn_mask", mask.ort())]);
    assert_close(
        "text_encoder text_tokens",
        &Host::from_burn(tokens),
        &ort.remove("text_tokens").unwrap(),
    );
    assert_close(
        "text_encoder text_embedding",
        &Host::from_burn(embedding),
        &ort.remove("text_embedding").unwrap(),
    );
}

/// One denoiser call per prompt at timesteps across the schedule, on Gaussian noise.
#[test]
fn denoiser_matches_ort_across_timesteps() {
    let m = manifest();
    let (text_tokens, _, mask) = ort_text(&m);
    let size = usize_at(&m, "/image/size");
    let steps = f32s_at(&m, "/diffusion/alphas_cumprod").len();
    let n = PROMPTS.len();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let burn = denoiser::Model::<B>::from_file(weights("denoiser"), &DEVICE);
    let mut ort = OrtGraph::load("denoiser");
    for t in [steps - 1, steps / 2, 0] {
        let x = Host::randn(&[n, 3, size, size], &mut rng);
        let timestep = Host::new(&[n], vec![t as f32; n]);
        let prediction = burn.forward(x.burn(), timestep.burn(), text_tokens.burn(), mask.burn());
        let mut out = ort.run(vec![
            ("x", x.ort()),
            ("timestep", timestep.ort()),
            ("text_tokens", text_tokens.ort()),
            ("text_mask", mask.ort()),
        ]);
        assert_close(
            &format!("denoiser prediction, t = {t}"),
            &Host::from_burn(prediction),
            &out.remove("prediction").unwrap(),
        );
    }
}

/// Both restorers on noisy features conditioned on the other modality's embedding (image
/// embeddings of the sample images for image → text, prompt embeddings for text → image).
#[test]
fn restorers_match_ort() {
    let m = manifest();
    let steps = f32s_at(&m, "/restore/alphas_cumprod").len();
    let (_, pixels) = sample_pixels(&m);
    let image_embedding = OrtGraph::load("vision_encoder")
        .run(vec![("pixels", pixels.ort())])
        .remove("embedding")
        .unwrap();
    let (_, text_embedding, _) = ort_text(&m);
    let mut rng = ChaCha8Rng::seed_from_u64(11);

    let i2t = restorer_i2t::Model::<B>::from_file(weights("restorer_i2t"), &DEVICE);
    let t2i = restorer_t2i::Model::<B>::from_file(weights("restorer_t2i"), &DEVICE);
    for (graph, condition) in [
        ("restorer_i2t", &image_embedding),
        ("restorer_t2i", &text_embedding),
    ] {
        let n = condition.shape[0];
        let mut ort = OrtGraph::load(graph);
        for t in [steps - 1, steps / 4] {
            let x = Host::randn(&condition.shape, &mut rng);
            let timestep = Host::new(&[n], vec![t as f32; n]);
            let (prediction, trust, restored) = match graph {
                "restorer_i2t" => i2t.forward(x.burn(), timestep.burn(), condition.burn()),
                _ => t2i.forward(x.burn(), timestep.burn(), condition.burn()),
            };
            let mut out = ort.run(vec![
                ("x", x.ort()),
                ("timestep", timestep.ort()),
                ("condition", condition.ort()),
            ]);
            for (name, burn) in [
                ("prediction", prediction),
                ("trust", trust),
                ("restored", restored),
            ] {
                assert_close(
                    &format!("{graph} {name}, t = {t}"),
                    &Host::from_burn(burn),
                    &out.remove(name).unwrap(),
                );
            }
        }
    }
}

/// The fusion head on the sample images' embeddings paired with prompt embeddings.
#[test]
fn fusion_head_matches_ort() {
    let m = manifest();
    let (_, pixels) = sample_pixels(&m);
    let image = OrtGraph::load("vision_encoder")
        .run(vec![("pixels", pixels.ort())])
        .remove("embedding")
        .unwrap();
    let (_, text, _) = ort_text(&m);
    // Pair each of the first `n` images with a prompt.
    let n = text.shape[0];
    let d = image.shape[1];
    let image = Host::new(&[n, d], image.data[..n * d].to_vec());
    let burn = fusion_head::Model::<B>::from_file(weights("fusion_head"), &DEVICE);
    let logits = burn.forward(image.burn(), text.burn());
    let mut out = OrtGraph::load("fusion_head").run(vec![
        ("image_embedding", image.ort()),
        ("text_embedding", text.ort()),
    ]);
    let classes = m["restore"]["classes"].as_array().expect("classes").len();
    let ort_logits = out.remove("logits").unwrap();
    assert_eq!(ort_logits.shape, vec![n, classes]);
    assert_close("fusion_head logits", &Host::from_burn(logits), &ort_logits);
}

/// The dream encoder (the caption decoder's weights reading `[BOS] prompt` over an image, then
/// the learnt dream queries) on the prompts over the first sample images, and the denoiser on
/// its dream tokens, as `duet generate --condition dream` and `duet edit` run them.
#[test]
fn dream_encoder_matches_ort_and_conditions_the_denoiser() {
    let m = manifest();
    let (ids, mask) = tokenise(&m, &Vocab::load(), &PROMPTS, false);
    let n = PROMPTS.len();
    let (_, pixels) = sample_pixels(&m);
    let per_image = pixels.data.len() / pixels.shape[0];
    let mut shape = pixels.shape.clone();
    shape[0] = n;
    let pixels = Host::new(&shape, pixels.data[..n * per_image].to_vec());
    let image_tokens = OrtGraph::load("vision_encoder")
        .run(vec![("pixels", pixels.ort())])
        .remove("patch_tokens")
        .unwrap();

    let burn = dream_encoder::Model::<B>::from_file(weights("dream_encoder"), &DEVICE);
    let dream_tokens = burn.forward(ids.burn(), mask.burn(), image_tokens.burn());
    let mut out = OrtGraph::load("dream_encoder").run(vec![
        ("input_ids", ids.ort()),
        ("attn_mask", mask.ort()),
        ("image_tokens", image_tokens.ort()),
    ]);
    let ort_tokens = out.remove("dream_tokens").unwrap();
    let queries = usize_at(&m, "/model/dream_queries");
    let max_len = usize_at(&m, "/tokenizer/max_len");
    assert_eq!(ort_tokens.shape[..2], [n, max_len + queries]);
    assert_close(
        "dream_encoder dream_tokens",
        &Host::from_burn(dream_tokens),
        &ort_tokens,
    );

    // The denoiser's key mask over the dream tokens: the prompt's positions, then every query.
    let key_mask: Vec<f32> = mask
        .data
        .chunks(max_len)
        .flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(1.0, queries)))
        .collect();
    let key_mask = Host::new(&[n, max_len + queries], key_mask);
    let size = usize_at(&m, "/image/size");
    let t = f32s_at(&m, "/diffusion/alphas_cumprod").len() / 2;
    let x = Host::randn(&[n, 3, size, size], &mut ChaCha8Rng::seed_from_u64(13));
    let timestep = Host::new(&[n], vec![t as f32; n]);
    let denoiser = denoiser::Model::<B>::from_file(weights("denoiser"), &DEVICE);
    let prediction = denoiser.forward(
        x.burn(),
        timestep.burn(),
        ort_tokens.burn(),
        key_mask.burn(),
    );
    let mut out = OrtGraph::load("denoiser").run(vec![
        ("x", x.ort()),
        ("timestep", timestep.ort()),
        ("text_tokens", ort_tokens.ort()),
        ("text_mask", key_mask.ort()),
    ]);
    assert_close(
        &format!("denoiser on dream tokens, t = {t}"),
        &Host::from_burn(prediction),
        &out.remove("prediction").unwrap(),
    );
}
