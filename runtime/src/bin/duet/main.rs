//! `duet`: caption images, generate images or classify image + text pairs (either may be
//! missing) with a bundle, or describe a bundle and this machine's providers. The command line
//! and dispatch are here; the pipelines' commands in `run.rs`, `duet info` in `info.rs`,
//! `duet bench` in `bench.rs`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use duet_runtime::diffusion::Sampler;
use duet_runtime::engine::{ort_info, IdleWait, TensorRtOptions};
use duet_runtime::manifest::{Graph, Manifest, Precision};
use duet_runtime::preprocess;
use duet_runtime::{
    Bundle, Captioner, Dreamer, EngineOptions, GenerateOptions, Generator, ProviderChoice,
};

mod bench;
mod info;
mod run;

use bench::*;
use info::*;
use run::*;

#[derive(Parser, Debug)]
#[command(
    name = "duet",
    version,
    about = "duet runtime: run exported duet bundles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
struct EngineArgs {
    /// Backend: auto (TensorRT → CUDA → ort CPU → tract), tensorrt, cuda, ort-cpu or tract.
    #[arg(long, default_value = "auto")]
    provider: ProviderChoice,
    /// Fail instead of falling back when a provider is skipped.
    #[arg(long)]
    strict: bool,
    /// Path of libonnxruntime (default: $ORT_DYLIB_PATH, then beside the executable, then the
    /// build tree's .ort/lib/; never searched for from the working directory).
    #[arg(long, value_name = "PATH")]
    ort_lib: Option<PathBuf>,
    /// TensorRT: allow fp16 kernels.
    #[arg(long)]
    trt_fp16: bool,
    /// TensorRT: cache built engines here, so only the first start builds them.
    #[arg(long, value_name = "DIR")]
    trt_cache: Option<PathBuf>,
    /// Threads per graph run (onnxruntime's intra-op pool, tract's matrix products); default:
    /// onnxruntime one per core, tract one.
    #[arg(long)]
    threads: Option<std::num::NonZeroUsize>,
    /// How a run's other threads wait for work (with --threads above 1): spin (the fastest)
    /// or sleep (idle cores between the parallel parts: the choice on a battery).
    #[arg(long, default_value = "spin")]
    idle_wait: IdleWait,
    /// Which of the bundle's graph files to run: fp32 (the exported graphs), or a compressed
    /// variant the bundle has (fp16, int8: `duet-export quantize`).
    #[arg(long, default_value = "fp32")]
    precision: Precision,
}

impl EngineArgs {
    /// Opens and verifies the bundle and selects `--precision`; a variant says what it is.
    fn open_bundle(&self, dir: &Path) -> Result<Bundle> {
        let bundle = Bundle::open_for(dir, self.precision)
            .with_context(|| format!("opening bundle {}", dir.display()))?;
        if let Some(v) = bundle.manifest().variant(self.precision) {
            eprintln!("precision {}: {}", v.precision, v.method);
        }
        Ok(bundle)
    }

    fn options(&self) -> EngineOptions {
        EngineOptions {
            strict: self.strict,
            ort_lib: self.ort_lib.clone(),
            tensorrt: TensorRtOptions {
                fp16: self.trt_fp16,
                engine_cache: self.trt_cache.clone(),
            },
            threads: self.threads,
            idle_wait: self.idle_wait,
        }
    }
}

/// How `duet caption` picks tokens (greedy unless --beam or --temperature is given).
#[derive(clap::Args, Debug)]
struct DecodeArgs {
    /// Beam search with this many hypotheses per image (1..=16); returns the likeliest text
    /// found.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=16), conflicts_with_all = ["temperature", "top_k", "top_p"])]
    beam: Option<u16>,
    /// Sample tokens at this temperature (0 = greedy); with --top-k / --top-p / --seed.
    #[arg(long)]
    temperature: Option<f32>,
    /// Sample among the k likeliest tokens only.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    top_k: Option<u32>,
    /// Sample among the likeliest tokens that together hold this probability (0 < p <= 1).
    #[arg(long)]
    top_p: Option<f32>,
    /// Seed of the sampling: the same seed, image, prompt and bundle give the same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// At most this many generated tokens (the model's own limit always applies).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    max_tokens: Option<u16>,
}

impl DecodeArgs {
    fn options(&self) -> duet_runtime::DecodeOptions {
        use duet_runtime::{Decoding, Sampling};
        let sampled = self.temperature.is_some() || self.top_k.is_some() || self.top_p.is_some();
        let decoding = match self.beam {
            Some(width) => Decoding::Beam {
                width: usize::from(width),
            },
            None if sampled => Decoding::Sample(Sampling {
                temperature: self.temperature.unwrap_or(1.0),
                top_k: self.top_k.map(|k| k as usize),
                top_p: self.top_p,
                seed: self.seed,
            }),
            None => Decoding::Greedy,
        };
        duet_runtime::DecodeOptions {
            decoding,
            max_tokens: self.max_tokens.map(usize::from),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Caption images; prints `PATH<TAB>CAPTION` per image on stdout (with one image, the
    /// caption as it is decoded).
    Caption {
        /// Bundle: a directory, or a single `.duet` file.
        #[arg(long)]
        bundle: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
        #[command(flatten)]
        decode: DecodeArgs,
        /// Text to continue from (the start of a caption); the printed text is what follows it.
        #[arg(long)]
        prompt: Option<String>,
        /// Images per batch.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
        batch: u16,
        /// Image files.
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Answer a question about an image (a bundle whose captioner was trained on questions:
    /// `duet-train shapeworld --questions N`); prints the answer as it is decoded.
    Ask {
        /// Bundle: a directory, or a single `.duet` file.
        #[arg(long)]
        bundle: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
        #[command(flatten)]
        decode: DecodeArgs,
        /// The image the question is about.
        #[arg(long)]
        image: PathBuf,
        /// The question, e.g. "what colour is the circle?".
        question: String,
    },
    /// Generate images from text prompts; writes a PNG (a grid when --count > 1 or with
    /// several prompts: one row per prompt, --count images each).
    Generate {
        /// Bundle, a directory or a single `.duet` file (exported from a generate run).
        #[arg(long)]
        bundle: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
        /// What to draw, e.g. "a large red circle at the top left"; give several to compare.
        #[arg(required = true)]
        prompt: Vec<String>,
        /// Output PNG.
        #[arg(short, long, default_value = "generated.png")]
        out: PathBuf,
        /// Sampler steps (default: the bundle's).
        #[arg(long)]
        steps: Option<usize>,
        /// Sampler: ddim or dpmpp (DPM-Solver++ 2M).
        #[arg(long, default_value = "ddim")]
        sampler: SamplerArg,
        /// DDIM noise (default 0: deterministic); DDIM only.
        #[arg(long)]
        eta: Option<f32>,
        /// Classifier-free guidance scale (default: the bundle's; 1 = no guidance).
        #[arg(long)]
        guidance: Option<f32>,
        /// Noise seed: the same seed, prompt and bundle give the same image.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Images to generate from the prompt (different noise each).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        count: u16,
        /// Nearest-neighbour upscaling of the written PNG (the model draws 32×32).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=32))]
        scale: u32,
        /// What conditions the denoiser: the text encoder, or the dream queries of the model
        /// that captions and answers (a bundle exported from a dream run).
        #[arg(long, value_enum, default_value_t = Condition::Text)]
        condition: Condition,
    },
    /// Edit an image by instruction ("make the square blue", "remove the circle", "add a small
    /// red circle at the top left", "move the triangle to the centre") through the dream
    /// queries; writes the source and one edit per instruction side by side.
    Edit {
        /// Bundle, a directory or a single `.duet` file (exported from a dream run).
        #[arg(long)]
        bundle: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
        /// The image to edit.
        #[arg(long)]
        image: PathBuf,
        /// What to change; give several to compare.
        #[arg(required = true)]
        instruction: Vec<String>,
        /// Output PNG.
        #[arg(short, long, default_value = "edited.png")]
        out: PathBuf,
        /// Sampler steps (default: the bundle's).
        #[arg(long)]
        steps: Option<usize>,
        /// Sampler: ddim or dpmpp (DPM-Solver++ 2M).
        #[arg(long, default_value = "ddim")]
        sampler: SamplerArg,
        /// DDIM noise (default 0: deterministic); DDIM only.
        #[arg(long)]
        eta: Option<f32>,
        /// Classifier-free guidance scale (default: the bundle's; 1 = no guidance).
        #[arg(long)]
        guidance: Option<f32>,
        /// Noise seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Nearest-neighbour upscaling of the written PNG.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=32))]
        scale: u32,
    },
    /// Classify an image + text pair with the bundle's task head; either may be missing (its
    /// embedding is restored from the other by the feature-space diffusion restorer).
    Classify {
        /// Bundle, a directory or a single `.duet` file (exported from a restore run).
        #[arg(long)]
        bundle: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
        /// Image file (leave out to restore the image from the text).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Text describing the same scene (leave out to restore it from the image).
        #[arg(long)]
        text: Option<String>,
        /// Seed of the restorer's start noise.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Classes to list, most probable first.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
        top: u16,
    },
    /// Embed images and texts in the bundle's shared space: with both, prints their cosine
    /// similarities and the best-matching text for each image; with one kind only, prints the
    /// embeddings as JSON lines (`kind`, `input`, `embedding`).
    Embed {
        /// Bundle, a directory or a single `.duet` file (texts need a text encoder: a bundle from a generate run or later).
        #[arg(long)]
        bundle: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
        /// Image file; repeat for several.
        #[arg(long)]
        image: Vec<PathBuf>,
        /// Text; repeat for several.
        #[arg(long)]
        text: Vec<String>,
        /// Also write every embedding as a JSON line (`kind`, `input`, `embedding`).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Benchmark every pipeline on every provider (each in its own process) and a Python
    /// onnxruntime reference; prints a Markdown table.
    Bench {
        /// Bundle: a directory, or a single `.duet` file.
        #[arg(long, required_unless_present = "model")]
        bundle: Option<PathBuf>,
        /// Instead of a bundle's pipelines, one ONNX graph of your own: load time, first run,
        /// median/p90 latency and placement per provider, on sample inputs of its declared
        /// shapes (see --dim). No Python reference.
        #[arg(long, conflicts_with_all = ["bundle", "image", "steps", "batch", "prompt"])]
        model: Option<PathBuf>,
        /// With --model: the size of a symbolic axis, as NAME=N (repeatable); symbolic axes
        /// not given are 1, and so are axes with neither a size nor a name.
        #[arg(long = "dim", value_parser = duet_runtime::engine::sample::parse_dim, requires = "model")]
        dims: Vec<(String, usize)>,
        /// With --model: also time each operator on each engine (tract's optimised plan,
        /// onnxruntime's profiler) over the --runs runs, and print where the time goes.
        #[arg(long, requires = "model")]
        profile: bool,
        /// Providers to measure (comma-separated); unavailable ones are listed with the reason.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "tensorrt,cuda,ort-cpu,tract"
        )]
        providers: Vec<duet_runtime::Provider>,
        /// Timed runs per measurement.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..))]
        runs: u16,
        /// Sampler steps of the generation rows (each 1 ..= 1000).
        #[arg(long, value_delimiter = ',', default_value = "10,20,50", value_parser = sampler_steps)]
        steps: Vec<usize>,
        /// Batch size of the throughput rows.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
        batch: u16,
        /// Prompt of the generation rows.
        #[arg(long, default_value = "a large red circle at the top left")]
        prompt: String,
        /// Image to caption (default: the bundle's own generation of the prompt, seed 0).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Python interpreter for the reference pipeline (needs onnxruntime and numpy:
        /// `pip install -r benchmarks/python/requirements.txt`).
        #[arg(long, default_value = "python3")]
        python: String,
        /// The reference script.
        #[arg(long, default_value = "benchmarks/python/bench.py")]
        python_script: PathBuf,
        /// Skip the Python reference.
        #[arg(long)]
        no_python: bool,
        /// Threads per graph run for every engine measured, Python's onnxruntime included
        /// (default: each engine's own, onnxruntime one per core and tract one).
        #[arg(long)]
        threads: Option<std::num::NonZeroUsize>,
        /// How a run's other threads wait for work on every engine measured (see `caption
        /// --help`); the Python reference keeps onnxruntime's default (spin).
        #[arg(long, default_value = "spin")]
        idle_wait: IdleWait,
        /// Also write the table (with the command and machine) to this Markdown file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Path of libonnxruntime (see `caption --help`).
        #[arg(long, value_name = "PATH")]
        ort_lib: Option<PathBuf>,
        /// Precisions to measure (comma-separated: fp32, fp16, int8), each provider at each;
        /// default: every precision the bundle has. One of them with --worker.
        #[arg(long, value_delimiter = ',', conflicts_with = "model")]
        precision: Vec<Precision>,
        /// Internal: measure this one provider and print JSON (what each child process does).
        #[arg(long, hide = true)]
        worker: Option<duet_runtime::Provider>,
        /// Internal: the raw RGB image the children caption (`-`: read from stdin).
        #[arg(long, hide = true)]
        image_raw: Option<PathBuf>,
    },
    /// Summarise a bundle (if given) and the providers available on this machine.
    Info {
        /// Bundle: a directory, or a single `.duet` file.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Path of libonnxruntime (see `caption --help`).
        #[arg(long, value_name = "PATH")]
        ort_lib: Option<PathBuf>,
    },
}

/// A measuring child ends when `duet bench` does (SIGTERM, Ctrl-C, a crash): on Linux the
/// kernel sends it SIGTERM when its parent dies, so no worker keeps a core busy after the
/// command that started it is gone.
fn die_with_parent(cmd: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: `prctl` is async-signal-safe, the only call between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// `duet info | head` must stop quietly when the reader goes away, as every Unix tool does.
/// Rust starts programs with SIGPIPE ignored, so `println!` would panic on the broken pipe
/// instead; the default action (end the process) is what a pipeline expects.
#[cfg(unix)]
fn restore_default_sigpipe() {
    // SAFETY: called first thing in `main`, before any thread exists; `signal` with `SIG_DFL`
    // only resets the disposition of SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    #[cfg(unix)]
    restore_default_sigpipe();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Caption {
            bundle,
            engine,
            decode,
            prompt,
            batch,
            images,
        } => caption(
            &bundle,
            &engine,
            &decode,
            prompt.as_deref(),
            usize::from(batch),
            &images,
        ),
        Command::Ask {
            bundle,
            engine,
            decode,
            image,
            question,
        } => ask(&bundle, &engine, &decode, &image, &question),
        Command::Generate {
            bundle,
            engine,
            prompt,
            out,
            steps,
            sampler,
            eta,
            guidance,
            seed,
            count,
            scale,
            condition,
        } => sampler_of(sampler, eta).and_then(|sampler| {
            generate(
                &bundle,
                &engine,
                &prompt,
                &out,
                GenerateArgs {
                    steps,
                    sampler,
                    guidance,
                    seed,
                    count: usize::from(count),
                    scale,
                    condition,
                },
            )
        }),
        Command::Edit {
            bundle,
            engine,
            image,
            instruction,
            out,
            steps,
            sampler,
            eta,
            guidance,
            seed,
            scale,
        } => sampler_of(sampler, eta).and_then(|sampler| {
            edit(
                &bundle,
                &engine,
                &image,
                &instruction,
                &out,
                GenerateArgs {
                    steps,
                    sampler,
                    guidance,
                    seed,
                    count: 1,
                    scale,
                    condition: Condition::Dream,
                },
            )
        }),
        Command::Classify {
            bundle,
            engine,
            image,
            text,
            seed,
            top,
        } => classify(
            &bundle,
            &engine,
            image.as_deref(),
            text.as_deref(),
            seed,
            usize::from(top),
        ),
        Command::Embed {
            bundle,
            engine,
            image,
            text,
            out,
        } => embed(&bundle, &engine, &image, &text, out.as_deref()),
        Command::Info { bundle, ort_lib } => info(bundle.as_deref(), ort_lib),
        Command::Bench {
            bundle,
            model,
            dims,
            profile,
            providers,
            runs,
            steps,
            batch,
            prompt,
            image,
            python,
            python_script,
            no_python,
            threads,
            idle_wait,
            out,
            ort_lib,
            precision,
            worker,
            image_raw,
        } => {
            let settings = duet_runtime::bench::BenchSettings {
                runs: usize::from(runs),
                steps,
                batch: usize::from(batch),
                prompt,
                threads,
                idle_wait,
                profile,
                ..Default::default()
            };
            match (model, bundle, worker, image_raw) {
                (Some(model), _, Some(p), _) => {
                    bench_model_worker(&model, p, ort_lib, &settings, &dims)
                }
                (Some(model), ..) => bench_model(
                    &model,
                    &providers,
                    &settings,
                    &dims,
                    ort_lib,
                    out.as_deref(),
                ),
                (None, Some(bundle), Some(p), Some(raw)) => {
                    let precision = precision.first().copied().unwrap_or(Precision::Fp32);
                    bench_worker(&bundle, p, precision, ort_lib, &settings, &raw)
                }
                // clap requires one of --bundle and --model.
                (None, None, ..) => Err(anyhow::anyhow!("bench needs --bundle or --model")),
                (None, Some(bundle), ..) => bench(BenchArgs {
                    bundle: &bundle,
                    providers: &providers,
                    settings: &settings,
                    image: image.as_deref(),
                    python: (!no_python).then_some((python.as_str(), python_script.as_path())),
                    out: out.as_deref(),
                    ort_lib,
                    precisions: &precision,
                }),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", duet_runtime::display::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// `--steps` of `duet bench`: a number of sampler steps, 1 ..= 1000 (0 would measure nothing
/// and print an empty table).
fn sampler_steps(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n @ 1..=1000) => Ok(n),
        Ok(n) => Err(format!("{n} steps: must be 1 ..= 1000")),
        Err(e) => Err(format!("`{s}` is not a number of steps: {e}")),
    }
}

/// What conditions the denoiser in `duet generate`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Condition {
    /// The text encoder's tokens of the prompt.
    Text,
    /// The dream queries read out of the caption decoder over the prompt and the black image.
    Dream,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub(crate) enum SamplerArg {
    Ddim,
    Dpmpp,
}
