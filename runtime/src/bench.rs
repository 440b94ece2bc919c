//! `duet bench`: latency, throughput, cold load time, peak memory and achieved GFLOP/s of every
//! pipeline on every provider, side by side with a Python onnxruntime + numpy reference of the
//! same pipelines on the same bundle.
//!
//! Each provider is measured in a child process of its own (`duet bench --worker P`), so its
//! cold load really is cold (the onnxruntime library is loaded in it) and its peak resident
//! memory (`VmHWM`) is its own. The parent collects the children's JSON ([`ProviderBench`]),
//! runs `benchmarks/python/bench.py`, which prints the same JSON, and renders one table.

use std::time::Instant;

use image::RgbImage;
use ndarray::{ArrayD, IxDyn};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::engine::{
    graph_flops_of, Engine, EngineError, EngineOptions, OpProfile, Provider, ProviderChoice,
    ValueView,
};
use crate::manifest::Graph;
use crate::{
    Bundle, Captioner, Classifier, DecodeOptions, Decoding, Dreamer, Error, GenerateOptions,
    Generator,
};

/// What to measure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchSettings {
    /// Timed runs per measurement (after `warmup` untimed ones).
    pub runs: usize,
    pub warmup: usize,
    /// Sampler steps of the generation rows (batch 1).
    pub steps: Vec<usize>,
    /// Batch size of the throughput rows.
    pub batch: usize,
    /// Steps of the batched generation throughput row.
    pub batch_steps: usize,
    pub prompt: String,
    /// Question of the `ask` row (bundles trained on questions).
    pub question: String,
    /// Instruction of the `edit` row (bundles with a dream encoder).
    pub instruction: String,
    pub seed: u64,
    /// Threads per graph run ([`EngineOptions::threads`]); `None`: each engine's default.
    pub threads: Option<std::num::NonZeroUsize>,
    /// How the threads of a run wait for work ([`EngineOptions::idle_wait`]).
    #[serde(default)]
    pub idle_wait: crate::engine::IdleWait,
    /// `bench --model`: also profile each engine by operator ([`Engine::op_profile`], over
    /// `runs` runs).
    pub profile: bool,
}

impl Default for BenchSettings {
    fn default() -> Self {
        BenchSettings {
            runs: 10,
            warmup: 2,
            steps: vec![10, 20, 50],
            batch: 8,
            batch_steps: 20,
            prompt: "a large red circle at the top left".to_string(),
            question: "what colour is the circle?".to_string(),
            instruction: "make the circle blue".to_string(),
            seed: 0,
            threads: None,
            idle_wait: crate::engine::IdleWait::Spin,
            profile: false,
        }
    }
}

/// Median and 90th percentile of timed runs, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub median_ms: f64,
    pub p90_ms: f64,
    pub runs: usize,
}

impl Stats {
    /// Nearest-rank percentiles of `samples` (milliseconds); `None` when empty.
    pub fn from_samples(mut samples: Vec<f64>) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            samples[((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        Some(Stats {
            median_ms: rank(0.5),
            p90_ms: rank(0.9),
            runs: samples.len(),
        })
    }
}

/// One provider's numbers (also what the Python reference prints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderBench {
    /// `ort-cpu`, `tract`, … or `python-ort-cpu`.
    pub provider: String,
    /// Per graph, where its nodes really ran (ort's profiler; tract's own plan).
    pub placement: Vec<String>,
    pub load_caption_ms: f64,
    pub load_generate_ms: Option<f64>,
    /// One image, preprocessing + encoder + KV-cache greedy decoding + detokenising.
    pub caption_b1: Stats,
    /// Images per second captioning `batch` images per call.
    pub caption_batch_per_s: f64,
    /// One image with beam search of width 4 (four decoder rows per step).
    #[serde(default)]
    pub caption_beam4_b1: Option<Stats>,
    /// Answering one question about the image (bundles trained on questions).
    #[serde(default)]
    pub ask_b1: Option<Stats>,
    /// One image generated through the dream queries at the first of `steps` (bundles with
    /// a dream encoder).
    #[serde(default)]
    pub dream_generate_b1: Option<Stats>,
    /// One instruction edit of the benchmark image at the first of `steps` (bundles with a
    /// dream encoder).
    #[serde(default)]
    pub edit_b1: Option<Stats>,
    /// The caption of the benchmark image (the Python reference must produce the same).
    pub caption: String,
    /// `(steps, latency)` of one generated image, guidance on (denoiser batch 2).
    pub generate_b1: Vec<(usize, Stats)>,
    /// Images per second generating `batch` images per call at `batch_steps` steps.
    pub generate_batch_per_s: Option<f64>,
    /// One denoiser call at batch 2 (one guided step).
    pub denoiser_call: Option<Stats>,
    /// FLOPs of that call (tract's cost model).
    pub denoiser_flops: Option<u64>,
    /// Classifying one pair with the text missing (image embedding, restoring the text
    /// embedding with the bundle's sampler steps, head); bundles with restoration only.
    #[serde(default)]
    pub classify_text_missing: Option<Stats>,
    /// The same with the image missing (text embedding, restoring the image embedding, head).
    #[serde(default)]
    pub classify_image_missing: Option<Stats>,
    /// Peak resident memory of the process (`VmHWM`), MiB.
    pub peak_rss_mib: Option<f64>,
}

impl ProviderBench {
    /// Achieved GFLOP/s of the denoiser.
    pub fn denoiser_gflops(&self) -> Option<f64> {
        let (s, f) = (self.denoiser_call?, self.denoiser_flops?);
        Some(f as f64 / (s.median_ms * 1e-3) / 1e9)
    }
}

/// Times `f`: `warmup` untimed calls, then `runs` timed ones.
pub fn time<E>(
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> Result<(), E>,
) -> Result<Stats, E> {
    for _ in 0..warmup {
        f()?;
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Stats::from_samples(samples).expect("at least one run"))
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`); `None` elsewhere.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Nominal fp32 peak of this machine's CPUs: cores × clock × [`fp32_flops_per_cycle`]. A
/// nominal figure: clocks boost and throttle. Linux only.
pub fn machine_peak_gflops() -> Option<(f64, String)> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim())
    };
    let flags: Vec<&str> = field("flags")?.split_whitespace().collect();
    let mhz: f64 = field("cpu MHz")?.parse().ok()?;
    let model = field("model name").unwrap_or("unknown CPU").to_string();
    let vendor = field("vendor_id").unwrap_or("");
    let family: u32 = field("cpu family")
        .and_then(|f| f.parse().ok())
        .unwrap_or(0);
    let cores = std::thread::available_parallelism().ok()?.get();
    let per_cycle = fp32_flops_per_cycle(&flags, vendor, family);
    let peak = cores as f64 * mhz * 1e-3 * per_cycle;
    Some((
        peak,
        format!("{cores} × {model} at {mhz:.0} MHz × {per_cycle} FLOP/cycle"),
    ))
}

/// fp32 FLOPs one core retires per cycle, from its `/proc/cpuinfo` flags, vendor and family:
/// two FMAs a cycle of the widest vector the core executes at full width. AVX-512 counts as
/// 512 bits (64) on Intel and on AMD from Zen 5 (family 26), whose FMA units are 512 bits
/// wide; Zen 4 (family 25) splits each 512-bit FMA into two 256-bit halves, so it counts as
/// AVX2 + FMA (32). AVX alone (no FMA) 16, else SSE 8.
pub fn fp32_flops_per_cycle(flags: &[&str], vendor: &str, family: u32) -> f64 {
    let has = |f: &str| flags.contains(&f);
    let full_width_avx512 = match vendor {
        "GenuineIntel" => true,
        "AuthenticAMD" => family >= 26,
        _ => false,
    };
    if has("avx512f") && full_width_avx512 {
        64.0
    } else if has("fma") && has("avx2") {
        32.0
    } else if has("avx") {
        16.0
    } else {
        8.0
    }
}

/// Measures every pipeline of `bundle` on one provider (strictly: no fallback).
pub fn run_provider(
    bundle: &Bundle,
    choice: ProviderChoice,
    options: &EngineOptions,
    settings: &BenchSettings,
    image: &RgbImage,
) -> Result<ProviderBench, Error> {
    let options = EngineOptions {
        strict: true,
        threads: settings.threads,
        idle_wait: settings.idle_wait,
        ..options.clone()
    };
    let t = Instant::now();
    let captioner = Captioner::new(bundle, choice, &options)?;
    let load_caption_ms = t.elapsed().as_secs_f64() * 1e3;
    let provider = captioner.reports()[0].used;
    let pixels = crate::preprocess::to_pixels_batch(
        &[crate::preprocess::resize_for(image, captioner.image_spec())],
        captioner.image_spec(),
    )?;
    let mut placement = vec![format!(
        "vision_encoder: {}",
        captioner
            .vision_engine()
            .placement(&[("pixels", ValueView::F32(pixels.view().into_dyn()))])?
    )];
    let one = std::slice::from_ref(image);
    let caption = captioner.caption_images(one)?.pop().unwrap_or_default();
    let caption_b1 = time(settings.warmup, settings.runs, || {
        captioner.caption_images(one).map(drop)
    })?;
    let many = vec![image.clone(); settings.batch];
    let batch_stats = time(1, settings.runs.div_ceil(2), || {
        captioner.caption_images(&many).map(drop)
    })?;
    let caption_batch_per_s = settings.batch as f64 / (batch_stats.median_ms * 1e-3);
    let beam = DecodeOptions {
        decoding: Decoding::Beam { width: 4 },
        max_tokens: None,
    };
    let caption_beam4_b1 = Some(time(settings.warmup, settings.runs, || {
        captioner
            .caption_images_with(one, None, &beam, None)
            .map(drop)
    })?);
    let ask_b1 = if captioner.answers_questions() {
        let greedy = DecodeOptions::default();
        Some(time(settings.warmup, settings.runs, || {
            captioner
                .answer_images(one, &settings.question, &greedy, None)
                .map(drop)
        })?)
    } else {
        None
    };

    let mut out = ProviderBench {
        provider: provider.to_string(),
        placement: Vec::new(),
        load_caption_ms,
        load_generate_ms: None,
        caption_b1,
        caption_batch_per_s,
        caption_beam4_b1,
        ask_b1,
        dream_generate_b1: None,
        edit_b1: None,
        caption,
        generate_b1: Vec::new(),
        generate_batch_per_s: None,
        denoiser_call: None,
        denoiser_flops: None,
        classify_text_missing: None,
        classify_image_missing: None,
        peak_rss_mib: None,
    };
    if bundle.manifest().diffusion.is_some() {
        let t = Instant::now();
        let generator = Generator::new(bundle, choice, &options)?;
        out.load_generate_ms = Some(t.elapsed().as_secs_f64() * 1e3);
        let prompt = [settings.prompt.as_str()];
        let defaults = generator.default_options();
        for &steps in &settings.steps {
            let opts = GenerateOptions {
                steps,
                seed: settings.seed,
                ..defaults
            };
            let runs = if steps >= 50 {
                settings.runs.div_ceil(2)
            } else {
                settings.runs
            };
            let s = time(1, runs, || generator.generate(&prompt, &opts).map(drop))?;
            out.generate_b1.push((steps, s));
        }
        let prompts = vec![settings.prompt.as_str(); settings.batch];
        let opts = GenerateOptions {
            steps: settings.batch_steps,
            seed: settings.seed,
            ..defaults
        };
        let s = time(0, 2, || generator.generate(&prompts, &opts).map(drop))?;
        out.generate_batch_per_s = Some(settings.batch as f64 / (s.median_ms * 1e-3));

        // One guided denoiser step: batch 2 (conditional + unconditional rows), the prompt's
        // token length, random inputs (the cost does not depend on values).
        let longest = generator.encode_prompts(&prompt)?.longest;
        let m = &bundle.manifest().model;
        let (side, d) = (m.image_size, m.d_model);
        let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
        let x = crate::diffusion::gaussian(&[2, m.channels, side, side], &mut rng);
        let tstep = ArrayD::from_elem(IxDyn(&[2]), 500.0f32);
        let tokens = crate::diffusion::gaussian(&[2, longest, d], &mut rng);
        let mask = ArrayD::from_elem(IxDyn(&[2, longest]), 1.0f32);
        let inputs = [
            ("x", ValueView::F32(x.view())),
            ("timestep", ValueView::F32(tstep.view())),
            ("text_tokens", ValueView::F32(tokens.view())),
            ("text_mask", ValueView::F32(mask.view())),
        ];
        let den = generator.denoiser_engine();
        out.denoiser_call = Some(time(settings.warmup, settings.runs * 3, || {
            den.run_views(&inputs).map(drop)
        })?);
        out.denoiser_flops = graph_flops_of(
            &bundle.graph_bytes(Graph::Denoiser)?,
            &[
                ("x", &[2, m.channels, side, side]),
                ("timestep", &[2]),
                ("text_tokens", &[2, longest, d]),
                ("text_mask", &[2, longest]),
            ],
        )
        .map_err(|e| {
            tracing::warn!("{e}");
            e
        })
        .ok();
        placement.push(format!("denoiser: {}", den.placement(&inputs)?));
    }
    let has_dream = bundle
        .manifest()
        .graphs
        .iter()
        .any(|g| g.name == Graph::DreamEncoder);
    if let (true, Some(&steps)) = (has_dream, settings.steps.first()) {
        let dreamer = Dreamer::new(bundle, choice, &options)?;
        let opts = GenerateOptions {
            steps,
            seed: settings.seed,
            ..dreamer.generator().default_options()
        };
        let prompt = [settings.prompt.as_str()];
        out.dream_generate_b1 = Some(time(1, settings.runs, || {
            dreamer.generate(&prompt, &opts).map(drop)
        })?);
        let instruction = [settings.instruction.as_str()];
        out.edit_b1 = Some(time(1, settings.runs, || {
            dreamer.edit(one, &instruction, &opts).map(drop)
        })?);
    }
    if bundle.manifest().restore.is_some() {
        let classifier = Classifier::new(bundle, choice, &options)?;
        let text = settings.prompt.as_str();
        out.classify_text_missing = Some(time(settings.warmup, settings.runs * 3, || {
            classifier
                .classify(Some(image), None, settings.seed)
                .map(drop)
        })?);
        out.classify_image_missing = Some(time(settings.warmup, settings.runs * 3, || {
            classifier
                .classify(None, Some(text), settings.seed)
                .map(drop)
        })?);
    }
    out.placement = placement;
    out.peak_rss_mib = peak_rss_mib();
    Ok(out)
}

/// One ONNX graph of the user's on one provider (`duet bench --model`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelBench {
    pub provider: String,
    /// Cold load: reading the file and building the session or plan.
    pub load_ms: f64,
    /// The first run, apart: it includes what engines do once per shape (tract's plan for a
    /// new shape, onnxruntime's first allocations).
    pub first_run_ms: f64,
    pub run: Stats,
    /// Where the nodes ran (ort's profiler; tract's own plan).
    pub placement: String,
    /// The inputs fed, as `name dtype [shape]`.
    pub inputs: Vec<String>,
    /// FLOPs of one run (tract's cost model), where it can count them.
    pub flops: Option<u64>,
    /// Peak resident memory of the process (`VmHWM`), MiB.
    pub peak_rss_mib: Option<f64>,
    /// Time by operator, with `--profile`.
    #[serde(default)]
    pub ops: Option<OpProfile>,
}

/// Loads the graph at `path` on `provider` only (strictly) and times it on sample inputs
/// ([`Engine::sample_inputs`], symbolic axes from `dims`): `settings.warmup` untimed runs
/// after the first, then `settings.runs` timed ones.
pub fn run_model(
    path: &std::path::Path,
    provider: Provider,
    options: &EngineOptions,
    settings: &BenchSettings,
    dims: &[(String, usize)],
) -> Result<ModelBench, EngineError> {
    let options = EngineOptions {
        strict: true,
        threads: settings.threads,
        idle_wait: settings.idle_wait,
        ..options.clone()
    };
    let name = path
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    let t = Instant::now();
    let bytes = Engine::read_model(path, &name)?;
    let (engine, _) = Engine::load_bytes(
        bytes.clone(),
        &name,
        ProviderChoice::Only(provider),
        &options,
    )?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let feed = engine.sample_inputs(dims)?;
    let views: Vec<(&str, ValueView<'_>)> =
        feed.iter().map(|(n, v)| (n.as_str(), v.view())).collect();
    let t = Instant::now();
    engine.run_views(&views)?;
    let first_run_ms = t.elapsed().as_secs_f64() * 1e3;
    let run = time(settings.warmup, settings.runs, || {
        engine.run_views(&views).map(drop)
    })?;
    let shapes: Vec<(&str, &[usize])> = feed.iter().map(|(n, v)| (n.as_str(), v.shape())).collect();
    // After the timed runs, so profiling (a twin session on ort) cannot disturb them.
    let ops = match settings.profile {
        true => Some(engine.op_profile(&views, settings.runs)?),
        false => None,
    };
    Ok(ModelBench {
        provider: engine.provider().to_string(),
        load_ms,
        first_run_ms,
        run,
        placement: engine.placement(&views)?.to_string(),
        inputs: feed
            .iter()
            .map(|(n, v)| format!("{n} {} {:?}", v.dtype(), v.shape()))
            .collect(),
        flops: graph_flops_of(&bytes, &shapes)
            .map_err(|e| tracing::info!("no FLOP count: {e}"))
            .ok(),
        peak_rss_mib: peak_rss_mib(),
        ops,
    })
}

/// Operators shown per engine in the profile section of [`render_model_markdown`].
const PROFILE_ROWS: usize = 12;

/// The table of [`run_model`] results (Markdown): one column per provider, the providers not
/// measured with their reasons, and how many times faster onnxruntime's CPU run is than
/// tract's when both ran.
pub fn render_model_markdown(
    model: &str,
    results: &[ModelBench],
    skipped: &[(String, String)],
    settings: &BenchSettings,
) -> String {
    let mut out = format!(
        "`{model}`, {} timed runs, {}\n\n",
        settings.runs,
        match settings.threads {
            Some(n) => format!("{n} thread(s) per run on every engine"),
            None => "each engine's default threads".into(),
        }
    );
    if let Some(first) = results.first() {
        out.push_str(&format!("inputs: {}\n\n", first.inputs.join(", ")));
    }
    let header: Vec<&str> = results.iter().map(|r| r.provider.as_str()).collect();
    out.push_str(&format!(
        "| | {} |\n|---|{}\n",
        header.join(" | "),
        "---|".repeat(results.len())
    ));
    let mut row = |label: &str, f: &dyn Fn(&ModelBench) -> String| {
        let cells: Vec<String> = results.iter().map(f).collect();
        out.push_str(&format!("| {label} | {} |\n", cells.join(" | ")));
    };
    row("cold load (ms)", &|r| format!("{:.1}", r.load_ms));
    row("first run (ms)", &|r| format!("{:.1}", r.first_run_ms));
    row("run: median / p90 (ms)", &|r| ms(&r.run));
    row("GFLOP/s (tract's count)", &|r| {
        opt(r.flops, |f| {
            format!("{:.1}", f as f64 / (r.run.median_ms * 1e-3) / 1e9)
        })
    });
    row("peak resident memory (MiB)", &|r| {
        opt(r.peak_rss_mib, |m| format!("{m:.0}"))
    });
    row("placement", &|r| r.placement.clone());
    let by = |p: &str| results.iter().find(|r| r.provider == p);
    if let (Some(ort), Some(tract)) = (by("ort-cpu"), by("tract")) {
        out.push_str(&format!(
            "\ntract / ort-cpu median: {:.2}× (above 1: tract is slower)\n",
            tract.run.median_ms / ort.run.median_ms
        ));
    }
    for r in results {
        if let Some(profile) = &r.ops {
            out.push_str(&render_op_profile(&r.provider, profile));
        }
    }
    for (p, why) in skipped {
        out.push_str(&format!("\n{p}: not measured: {why}\n"));
    }
    out
}

/// One engine's time by operator: the slowest [`PROFILE_ROWS`] ops, the rest in one row.
fn render_op_profile(provider: &str, profile: &OpProfile) -> String {
    let total = profile.total_ms();
    let share = |ms: f64| 100.0 * ms / total.max(f64::MIN_POSITIVE);
    let mut out = format!(
        "\n{provider}: time by operator ({} profiled runs, {total:.2} ms per run in the ops)\n\n\
         | op | nodes | ms per run | share |\n|---|---:|---:|---:|\n",
        profile.runs
    );
    for o in profile.ops.iter().take(PROFILE_ROWS) {
        out.push_str(&format!(
            "| {} | {} | {:.3} | {:.1} % |\n",
            o.op,
            o.nodes,
            o.ms_per_run,
            share(o.ms_per_run)
        ));
    }
    let rest = &profile.ops[profile.ops.len().min(PROFILE_ROWS)..];
    if !rest.is_empty() {
        let ms: f64 = rest.iter().map(|o| o.ms_per_run).sum();
        let nodes: usize = rest.iter().map(|o| o.nodes).sum();
        out.push_str(&format!(
            "| {} other ops | {nodes} | {ms:.3} | {:.1} % |\n",
            rest.len(),
            share(ms)
        ));
    }
    out
}

fn ms(s: &Stats) -> String {
    format!("{} / {}", millis(s.median_ms), millis(s.p90_ms))
}

/// Milliseconds with about three significant digits: a decoder step (0.2–0.6 ms) printed to
/// one decimal would hide the differences the table is read for.
fn millis(ms: f64) -> String {
    if ms < 1.0 {
        format!("{ms:.3}")
    } else if ms < 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.1}")
    }
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "–".to_string())
}

/// The side-by-side table (Markdown): one column per provider, then the ratios the issue asks
/// about (Rust ort vs Python ort, tract vs ort), each as "how many times faster".
pub fn render_markdown(
    results: &[ProviderBench],
    skipped: &[(String, String)],
    settings: &BenchSettings,
    machine: Option<&(f64, String)>,
) -> String {
    let mut md = String::new();
    let head: Vec<&str> = results.iter().map(|r| r.provider.as_str()).collect();
    md.push_str(&format!("| | {} |\n", head.join(" | ")));
    md.push_str(&format!("|---|{}\n", "---|".repeat(results.len())));
    let mut row = |name: String, cells: Vec<String>| {
        md.push_str(&format!("| {name} | {} |\n", cells.join(" | ")));
    };
    row(
        "cold load, caption graphs (ms)".into(),
        results
            .iter()
            .map(|r| format!("{:.0}", r.load_caption_ms))
            .collect(),
    );
    row(
        "cold load, generation graphs (ms)".into(),
        results
            .iter()
            .map(|r| opt(r.load_generate_ms, |v| format!("{v:.0}")))
            .collect(),
    );
    row(
        "caption, batch 1: median / p90 (ms)".into(),
        results.iter().map(|r| ms(&r.caption_b1)).collect(),
    );
    row(
        format!("caption, batch {}: images/s", settings.batch),
        results
            .iter()
            .map(|r| format!("{:.1}", r.caption_batch_per_s))
            .collect(),
    );
    row(
        "caption, beam 4, batch 1: median / p90 (ms)".into(),
        results
            .iter()
            .map(|r| opt(r.caption_beam4_b1.as_ref(), ms))
            .collect(),
    );
    if results.iter().any(|r| r.ask_b1.is_some()) {
        row(
            format!("ask \"{}\", batch 1: median / p90 (ms)", settings.question),
            results.iter().map(|r| opt(r.ask_b1.as_ref(), ms)).collect(),
        );
    }
    for &steps in &settings.steps {
        row(
            format!("generate {steps} steps, batch 1: median / p90 (ms)"),
            results
                .iter()
                .map(|r| {
                    opt(
                        r.generate_b1
                            .iter()
                            .find(|(s, _)| *s == steps)
                            .map(|(_, s)| s),
                        ms,
                    )
                })
                .collect(),
        );
    }
    if let Some(&steps) = settings.steps.first() {
        if results.iter().any(|r| r.dream_generate_b1.is_some()) {
            row(
                format!(
                    "generate {steps} steps through the dream queries, batch 1: median / p90 (ms)"
                ),
                results
                    .iter()
                    .map(|r| opt(r.dream_generate_b1.as_ref(), ms))
                    .collect(),
            );
        }
        if results.iter().any(|r| r.edit_b1.is_some()) {
            row(
                format!(
                    "edit \"{}\", {steps} steps, batch 1: median / p90 (ms)",
                    settings.instruction
                ),
                results
                    .iter()
                    .map(|r| opt(r.edit_b1.as_ref(), ms))
                    .collect(),
            );
        }
    }
    row(
        format!(
            "generate {} steps, batch {}: images/s",
            settings.batch_steps, settings.batch
        ),
        results
            .iter()
            .map(|r| opt(r.generate_batch_per_s, |v| format!("{v:.2}")))
            .collect(),
    );
    row(
        "denoiser call, batch 2: median (ms)".into(),
        results
            .iter()
            .map(|r| opt(r.denoiser_call, |s| format!("{:.2}", s.median_ms)))
            .collect(),
    );
    row(
        "denoiser achieved GFLOP/s".into(),
        results
            .iter()
            .map(|r| {
                opt(r.denoiser_gflops(), |g| match machine {
                    Some((peak, _)) => format!("{g:.1} ({:.0}% of peak)", 100.0 * g / peak),
                    None => format!("{g:.1}"),
                })
            })
            .collect(),
    );
    row(
        "classify, text missing (restored from the image) (ms)".into(),
        results
            .iter()
            .map(|r| opt(r.classify_text_missing.as_ref(), ms))
            .collect(),
    );
    row(
        "classify, image missing (restored from the text) (ms)".into(),
        results
            .iter()
            .map(|r| opt(r.classify_image_missing.as_ref(), ms))
            .collect(),
    );
    row(
        "peak resident memory (MiB)".into(),
        results
            .iter()
            .map(|r| opt(r.peak_rss_mib, |m| format!("{m:.0}")))
            .collect(),
    );
    md.push('\n');

    // Ratios: > 1 means the first is faster.
    let find = |p: &str| results.iter().find(|r| r.provider == p);
    let mut ratios = Vec::new();
    for (a, b, what) in [
        ("ort-cpu", "python-ort-cpu", "Rust ort vs Python ort"),
        ("tract", "python-ort-cpu", "Rust tract vs Python ort"),
        ("tract", "ort-cpu", "tract vs ort (CPU)"),
    ] {
        let (Some(fast), Some(slow)) = (find(a), find(b)) else {
            continue;
        };
        let cap = slow.caption_b1.median_ms / fast.caption_b1.median_ms;
        let gens: Vec<String> = fast
            .generate_b1
            .iter()
            .filter_map(|(steps, s)| {
                let o = slow.generate_b1.iter().find(|(t, _)| t == steps)?;
                Some(format!("{steps} steps {:.2}×", o.1.median_ms / s.median_ms))
            })
            .collect();
        ratios.push(format!(
            "- {what} (> 1: {a} faster): caption {cap:.2}×; generate {}",
            gens.join(", ")
        ));
    }
    if !ratios.is_empty() {
        md.push_str("Speed ratios (median latency of the second ÷ the first):\n\n");
        md.push_str(&ratios.join("\n"));
        md.push_str("\n\n");
    }
    md.push_str("Where each graph ran (onnxruntime's profiler for ort, the plan for tract):\n\n");
    for r in results {
        md.push_str(&format!("- {}: {}\n", r.provider, r.placement.join("; ")));
    }
    if !skipped.is_empty() {
        md.push_str("\nNot measured:\n\n");
        for (p, why) in skipped {
            md.push_str(&format!("- {p}: {}\n", why.replace('\n', " ")));
        }
    }
    if let Some((peak, how)) = machine {
        md.push_str(&format!(
            "\nMachine fp32 peak (nominal): {peak:.0} GFLOP/s = {how}.\n"
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    #[test]
    fn flops_per_cycle_follow_the_widest_full_width_fma() {
        let avx512 = ["sse2", "avx", "avx2", "fma", "avx512f"];
        let avx2 = ["sse2", "avx", "avx2", "fma"];
        // Zen 5 (this repository's 2026-12-07 benchmark host) and Intel: 512-bit FMAs.
        assert_eq!(fp32_flops_per_cycle(&avx512, "AuthenticAMD", 26), 64.0);
        assert_eq!(fp32_flops_per_cycle(&avx512, "GenuineIntel", 6), 64.0);
        // Zen 4 runs AVX-512 as two 256-bit halves.
        assert_eq!(fp32_flops_per_cycle(&avx512, "AuthenticAMD", 25), 32.0);
        assert_eq!(fp32_flops_per_cycle(&avx2, "AuthenticAMD", 23), 32.0);
        assert_eq!(
            fp32_flops_per_cycle(&["sse2", "avx"], "GenuineIntel", 6),
            16.0
        );
        assert_eq!(fp32_flops_per_cycle(&["sse2"], "", 0), 8.0);
    }

    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = Stats::from_samples((1..=10).rev().map(f64::from).collect()).unwrap();
        assert_eq!((s.median_ms, s.p90_ms, s.runs), (5.0, 9.0, 10));
        let s = Stats::from_samples(vec![3.0]).unwrap();
        assert_eq!((s.median_ms, s.p90_ms), (3.0, 3.0));
        assert!(Stats::from_samples(vec![]).is_none());
    }

    #[test]
    fn peak_memory_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let mib = peak_rss_mib().unwrap();
            assert!(mib > 1.0 && mib < 1e6, "{mib}");
        }
    }
}
