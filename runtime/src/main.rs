//! `duet`: caption images, generate images or classify image + text pairs (either may be
//! missing) with a bundle, or describe a bundle and this machine's providers.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use duet_runtime::diffusion::Sampler;
use duet_runtime::engine::{ort_info, TensorRtOptions};
use duet_runtime::manifest::Manifest;
use duet_runtime::preprocess;
use duet_runtime::{Bundle, Captioner, EngineOptions, GenerateOptions, Generator, ProviderChoice};

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
}

impl EngineArgs {
    fn options(&self) -> EngineOptions {
        EngineOptions {
            strict: self.strict,
            ort_lib: self.ort_lib.clone(),
            tensorrt: TensorRtOptions {
                fp16: self.trt_fp16,
                engine_cache: self.trt_cache.clone(),
            },
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Caption images; prints `PATH<TAB>CAPTION` per image on stdout.
    Caption {
        /// Bundle directory.
        #[arg(long)]
        bundle: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
        /// Images per batch.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
        batch: u16,
        /// Image files.
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Generate images from text prompts; writes a PNG (a grid when --count > 1 or with
    /// several prompts: one row per prompt, --count images each).
    Generate {
        /// Bundle directory (exported from a generate run).
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
    },
    /// Classify an image + text pair with the bundle's task head; either may be missing (its
    /// embedding is restored from the other by the feature-space diffusion restorer).
    Classify {
        /// Bundle directory (exported from a restore run).
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
        /// Bundle directory (texts need a text encoder: a bundle from a generate run or later).
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
        /// Bundle directory.
        #[arg(long)]
        bundle: PathBuf,
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
        /// Also write the table (with the command and machine) to this Markdown file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Path of libonnxruntime (see `caption --help`).
        #[arg(long, value_name = "PATH")]
        ort_lib: Option<PathBuf>,
        /// Internal: measure this one provider and print JSON (what each child process does).
        #[arg(long, hide = true)]
        worker: Option<duet_runtime::Provider>,
        /// Internal: the raw RGB image the children caption.
        #[arg(long, hide = true)]
        image_raw: Option<PathBuf>,
    },
    /// Summarise a bundle (if given) and the providers available on this machine.
    Info {
        /// Bundle directory.
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
            batch,
            images,
        } => caption(&bundle, &engine, usize::from(batch), &images),
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
            providers,
            runs,
            steps,
            batch,
            prompt,
            image,
            python,
            python_script,
            no_python,
            out,
            ort_lib,
            worker,
            image_raw,
        } => {
            let settings = duet_runtime::bench::BenchSettings {
                runs: usize::from(runs),
                steps,
                batch: usize::from(batch),
                prompt,
                ..Default::default()
            };
            match (worker, image_raw) {
                (Some(p), Some(raw)) => bench_worker(&bundle, p, ort_lib, &settings, &raw),
                _ => bench(BenchArgs {
                    bundle: &bundle,
                    providers: &providers,
                    settings: &settings,
                    image: image.as_deref(),
                    python: (!no_python).then_some((python.as_str(), python_script.as_path())),
                    out: out.as_deref(),
                    ort_lib,
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

fn caption(
    bundle_dir: &std::path::Path,
    engine: &EngineArgs,
    batch: usize,
    images: &[PathBuf],
) -> Result<()> {
    let bundle = Bundle::open(bundle_dir)
        .with_context(|| format!("opening bundle {}", bundle_dir.display()))?;
    // Decode every image before loading models so a bad path fails fast; each is reduced to
    // the model's size as soon as it is decoded, so only one full-size image is ever held.
    let spec = &bundle.manifest().image;
    let loaded = images
        .iter()
        .map(|p| preprocess::load_image_for(p, spec))
        .collect::<Result<Vec<_>, _>>()?;
    let captioner = Captioner::new(&bundle, engine.provider, &engine.options())
        .context("loading the captioning graphs")?;
    for report in captioner.reports() {
        eprintln!("{report}");
    }
    // The pipeline's stages are run here one by one (what `caption_images` does) so each can be
    // timed: the vision encoder once per batch, the decoder once per generated token.
    let (mut encode_s, mut decode_s, mut decode_steps) = (0.0, 0.0, 0usize);
    for (paths, imgs) in images.chunks(batch).zip(loaded.chunks(batch)) {
        let resized: Vec<_> = imgs
            .iter()
            .map(|i| preprocess::resize_for(i, captioner.image_spec()))
            .collect();
        let pixels = preprocess::to_pixels_batch(&resized, captioner.image_spec())?;
        let t0 = Instant::now();
        let image_tokens = captioner.encode(&pixels)?;
        let t1 = Instant::now();
        let ids = captioner.greedy_tokens_kv(&image_tokens)?;
        encode_s += (t1 - t0).as_secs_f64();
        decode_s += t1.elapsed().as_secs_f64();
        // One decoder call per token, plus the one that produced EOS when there was room for it.
        let max_len = captioner
            .model_spec()
            .max_len
            .min(captioner.tokenizer_spec().max_len);
        decode_steps +=
            (ids.iter().map(Vec::len).max().unwrap_or(0) + 1).min(max_len.saturating_sub(1));
        for (path, ids) in paths.iter().zip(&ids) {
            println!(
                "{}\t{}",
                duet_runtime::display::tsv_field(&path.to_string_lossy()),
                captioner.decode_tokens(ids)?
            );
        }
    }
    eprintln!(
        "{} image(s) in batches of {batch}: vision encoder {:.1} ms, decoder {decode_steps} \
         steps {:.1} ms ({:.2} ms per step)",
        images.len(),
        1e3 * encode_s,
        1e3 * decode_s,
        1e3 * decode_s / decode_steps.max(1) as f64
    );
    Ok(())
}

/// Prints which modality was restored (and its trust), the class and the runner-up classes.
fn classify(
    bundle_dir: &Path,
    engine: &EngineArgs,
    image: Option<&Path>,
    text: Option<&str>,
    seed: u64,
    top: usize,
) -> Result<()> {
    if image.is_none() && text.is_none() {
        return Err(duet_runtime::ClassifyError::NothingGiven.into());
    }
    if text.is_some_and(|t| t.trim().is_empty()) {
        return Err(duet_runtime::ClassifyError::EmptyText.into());
    }
    let bundle = Bundle::open(bundle_dir)
        .with_context(|| format!("opening bundle {}", bundle_dir.display()))?;
    // Decode the image before loading models so a bad file fails fast.
    let image = image.map(preprocess::load_image).transpose()?;
    let classifier = duet_runtime::Classifier::new(&bundle, engine.provider, &engine.options())
        .context("loading the classification graphs")?;
    for report in classifier.reports() {
        eprintln!("{report}");
    }
    let t0 = Instant::now();
    let out = classifier.classify(image.as_ref(), text, seed)?;
    let ms = 1e3 * t0.elapsed().as_secs_f64();
    match &out.restored {
        Some(r) => {
            eprintln!(
                "classified in {ms:.1} ms (embedding, {} restoration steps, head)",
                classifier.spec().sampler_steps
            );
            let from = match r.modality {
                duet_runtime::Modality::Image => "text",
                duet_runtime::Modality::Text => "image",
            };
            println!(
                "restored: {} (missing; restored from the {from}, trust {:.3})",
                r.modality, r.trust
            );
        }
        None => {
            eprintln!("classified in {ms:.1} ms (embeddings, head)");
            println!("restored: nothing (image and text given)");
        }
    }
    println!(
        "class: {} (p = {:.3})",
        out.label, out.probabilities[out.class]
    );
    let classes = &classifier.spec().classes;
    for (rank, (i, p)) in out.top(top).into_iter().enumerate() {
        println!("  {}. {} (p = {p:.3})", rank + 1, classes[i]);
    }
    Ok(())
}

fn embed(
    bundle_dir: &Path,
    engine: &EngineArgs,
    images: &[PathBuf],
    texts: &[String],
    out: Option<&Path>,
) -> Result<()> {
    if images.is_empty() && texts.is_empty() {
        anyhow::bail!("nothing to embed: give --image FILE and/or --text TEXT");
    }
    if let Some(out) = out {
        check_out_dir(out)?;
        // Writing the embeddings over one of the images they came from would lose it.
        if let Ok(out_real) = std::fs::canonicalize(out) {
            for image in images {
                if std::fs::canonicalize(image).is_ok_and(|i| i == out_real) {
                    anyhow::bail!(
                        "--out {} is one of the input images; choose another file",
                        out.display()
                    );
                }
            }
        }
    }
    let bundle = Bundle::open(bundle_dir)
        .with_context(|| format!("opening bundle {}", bundle_dir.display()))?;
    // Decode every image before loading models so a bad file fails fast, each reduced to the
    // model's size at once (one full-size image in memory at a time).
    let spec = &bundle.manifest().image;
    let decoded = images
        .iter()
        .map(|p| preprocess::load_image_for(p, spec))
        .collect::<Result<Vec<_>, _>>()?;
    let embedder = duet_runtime::Embedder::new(&bundle, engine.provider, &engine.options())
        .context("loading the encoders")?;
    for report in embedder.reports() {
        eprintln!("{report}");
    }
    let t0 = Instant::now();
    let image_vecs = embedder.embed_images(&decoded)?;
    let text_refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let text_vecs = if texts.is_empty() {
        Vec::new()
    } else {
        embedder.embed_texts(&text_refs)?
    };
    eprintln!(
        "embedded {} image(s) and {} text(s) in {:.1} ms ({} dimensions)",
        images.len(),
        texts.len(),
        1e3 * t0.elapsed().as_secs_f64(),
        embedder.embed_dim()
    );
    if !image_vecs.is_empty() && !text_vecs.is_empty() {
        println!(
            "cosine similarity (rows: images, columns: texts 1..{})",
            texts.len()
        );
        for (i, t) in texts.iter().enumerate() {
            println!("  text {}: {t}", i + 1);
        }
        for (path, v) in images.iter().zip(&image_vecs) {
            let sims: Vec<f32> = text_vecs
                .iter()
                .map(|t| duet_runtime::embed::cosine(v, t))
                .collect();
            let best = (0..sims.len())
                .max_by(|&a, &b| sims[a].total_cmp(&sims[b]))
                .unwrap_or(0);
            let cells: Vec<String> = sims.iter().map(|c| format!("{c:+.3}")).collect();
            println!(
                "{}: {}  best: text {} ({})",
                path.display(),
                cells.join(" "),
                best + 1,
                texts[best]
            );
        }
    }
    let mut lines = String::new();
    let inputs = images
        .iter()
        .map(|p| ("image", p.display().to_string()))
        .zip(&image_vecs)
        .chain(texts.iter().map(|t| ("text", t.clone())).zip(&text_vecs));
    for ((kind, input), v) in inputs {
        let line = serde_json::json!({ "kind": kind, "input": input, "embedding": v });
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    match out {
        Some(out) => {
            write_file_atomic(out, lines.as_bytes())?;
            println!("{}", out.display());
        }
        // One kind only: no table to show, so the embeddings themselves are the answer.
        None if image_vecs.is_empty() || text_vecs.is_empty() => print!("{lines}"),
        None => {}
    }
    Ok(())
}

/// Writes `bytes` to `out` atomically ([`duet_fsio::write_atomic`]: an O_EXCL temporary file
/// beside it, every write and the sync checked, then a rename), so a reader never sees half a
/// file and a full disk leaves the previous contents.
fn write_file_atomic(out: &Path, bytes: &[u8]) -> Result<()> {
    duet_fsio::write_atomic(out, bytes).with_context(|| format!("writing {}", out.display()))
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

/// The directory `out` will be written in must exist: checked before any work, so a typo costs
/// nothing.
fn check_out_dir(out: &Path) -> Result<()> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        anyhow::bail!(
            "cannot write {}: the directory {} does not exist",
            out.display(),
            dir.display()
        );
    }
    Ok(())
}

/// The sampler `--sampler` and `--eta` ask for; `--eta` with a sampler that has no noise is an
/// error rather than silently dropped.
fn sampler_of(sampler: SamplerArg, eta: Option<f32>) -> Result<Sampler> {
    match (sampler, eta) {
        (SamplerArg::Ddim, eta) => Ok(Sampler::Ddim {
            eta: eta.unwrap_or(0.0),
        }),
        (SamplerArg::Dpmpp, None) => Ok(Sampler::DpmSolverPp2M),
        (SamplerArg::Dpmpp, Some(_)) => anyhow::bail!(
            "--eta is DDIM's noise; --sampler dpmpp (DPM-Solver++) is deterministic and takes none"
        ),
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum SamplerArg {
    Ddim,
    Dpmpp,
}

struct GenerateArgs {
    steps: Option<usize>,
    sampler: Sampler,
    guidance: Option<f32>,
    seed: u64,
    count: usize,
    scale: u32,
}

fn generate(
    bundle_dir: &Path,
    engine: &EngineArgs,
    prompt: &[String],
    out: &Path,
    args: GenerateArgs,
) -> Result<()> {
    if out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        != Some("png".into())
    {
        anyhow::bail!("--out {} must end in .png", out.display());
    }
    // A missing directory is said now, not after minutes of sampling.
    check_out_dir(out)?;
    // Row-major: each prompt's `count` images side by side.
    let prompts: Vec<&str> = prompt
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.as_str(), args.count))
        .collect();
    // One batch holds them all, so the library's per-call bound is the run's bound; checked
    // here, before any graph is loaded.
    const MAX_IMAGES: usize = duet_runtime::generate::MAX_BATCH;
    if prompts.len() > MAX_IMAGES {
        anyhow::bail!(
            "{} prompts x --count {} = {} images; at most {MAX_IMAGES} per run",
            prompt.len(),
            args.count,
            prompts.len()
        );
    }
    let bundle = Bundle::open(bundle_dir)
        .with_context(|| format!("opening bundle {}", bundle_dir.display()))?;
    let generator = Generator::new(&bundle, engine.provider, &engine.options())
        .context("loading the generation graphs")?;
    for report in generator.reports() {
        eprintln!("{report}");
    }
    let defaults = generator.default_options();
    let opts = GenerateOptions {
        sampler: args.sampler,
        steps: args.steps.unwrap_or(defaults.steps),
        guidance: args.guidance.unwrap_or(defaults.guidance),
        seed: args.seed,
    };
    let t0 = Instant::now();
    let images = generator.generate_images(&prompts, &opts)?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "{} image(s), {:?}, {} steps, guidance {}, seed {}: {:.2} s ({:.1} ms per step)",
        images.len(),
        opts.sampler,
        opts.steps,
        opts.guidance,
        opts.seed,
        secs,
        1e3 * secs / opts.steps as f64
    );
    let picture = if images.len() == 1 {
        let img = &images[0];
        image::imageops::resize(
            img,
            img.width() * args.scale,
            img.height() * args.scale,
            image::imageops::FilterType::Nearest,
        )
    } else if prompt.len() == 1 {
        let cols = (images.len() as f64).sqrt().ceil() as usize;
        duet_runtime::diffusion::grid(&images, cols, args.scale)
    } else {
        duet_runtime::diffusion::grid(&images, args.count, args.scale)
    };
    save_png_atomic(&picture, out)?;
    println!("{}", out.display());
    Ok(())
}

/// Encodes a PNG in memory and writes it with [`write_file_atomic`], so an interrupted run or
/// a full disk never leaves a truncated image under the requested name (`image`'s own `save`
/// flushes through a buffered writer whose last error is lost on drop).
fn save_png_atomic(img: &image::RgbImage, out: &Path) -> Result<()> {
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .context("encoding the PNG")?;
    write_file_atomic(out, &png)
}

fn info(bundle_dir: Option<&std::path::Path>, ort_lib: Option<PathBuf>) -> Result<()> {
    if let Some(dir) = bundle_dir {
        let bundle =
            Bundle::open(dir).with_context(|| format!("opening bundle {}", dir.display()))?;
        print_manifest(bundle.manifest());
        println!();
    }
    let options = EngineOptions {
        strict: false,
        ort_lib,
        ..EngineOptions::default()
    };
    println!("providers on this machine:");
    match ort_info(&options) {
        Ok(ort) => {
            println!("  onnxruntime: {}", ort.library.display());
            if let Some(v) = &ort.version {
                println!("    version: {v}");
            }
            println!("    build: {}", ort.build_info);
            println!(
                "    execution providers compiled in: {}",
                ort.providers.join(", ")
            );
            let has = |n: &str| ort.providers.iter().any(|p| p == n);
            let state = |n: &str| {
                if has(n) {
                    "compiled in (still needs a GPU and its libraries at run time)"
                } else {
                    "not compiled into this library"
                }
            };
            println!("    tensorrt: {}", state("TensorrtExecutionProvider"));
            println!("    cuda: {}", state("CUDAExecutionProvider"));
            println!(
                "    ort-cpu: {}",
                if has("CPUExecutionProvider") {
                    "available"
                } else {
                    "not compiled into this library"
                }
            );
        }
        Err(reason) => println!("  onnxruntime: unavailable ({reason})"),
    }
    println!("  tract: always available (pure Rust, CPU)");
    Ok(())
}

fn print_manifest(m: &Manifest) {
    let s = &m.model;
    println!(
        "bundle: {} (preset {}, schema v{})",
        m.name, m.preset, m.schema_version
    );
    println!(
        "model: image {}x{} patch {} (P={}), d_model {}, heads {}, vision layers {}, decoder layers {}, mlp x{}, embed {}, vocab {}, max_len {}",
        s.image_size,
        s.image_size,
        s.patch_size,
        s.num_patches(),
        s.d_model,
        s.n_heads,
        s.vision_layers,
        s.decoder_layers,
        s.mlp_ratio,
        s.embed_dim,
        s.vocab_size,
        s.max_len
    );
    if let Some(d) = &m.diffusion {
        println!(
            "generator: text layers {}, denoiser layers {} (patch {}), {:?}-prediction, {} schedule with {} timesteps; defaults {} steps, guidance {}",
            s.text_layers,
            s.denoiser_layers,
            s.denoiser_patch_size,
            d.prediction,
            d.schedule,
            d.alphas_cumprod.len(),
            d.default_steps,
            d.default_guidance
        );
    }
    if let Some(r) = &m.restore {
        println!(
            "restoration: task {} ({} classes), feature restorers with {:?}-prediction, {} schedule with {} timesteps, {} DDIM steps, step gate {}, trust gate {}",
            r.task,
            r.classes.len(),
            r.prediction,
            r.schedule,
            r.alphas_cumprod.len(),
            r.sampler_steps,
            if r.gating { "on" } else { "off" },
            if r.trust_gate { "on" } else { "off" },
        );
    }
    println!(
        "image: {}x{} RGB, mean {:?}, std {:?}",
        m.image.size, m.image.size, m.image.mean, m.image.std
    );
    let t = &m.tokenizer;
    println!(
        "tokenizer: {} (pad {}, bos {}, eos {}, unk {}, max_len {})",
        t.file, t.pad_id, t.bos_id, t.eos_id, t.unk_id, t.max_len
    );
    println!("graphs:");
    for g in &m.graphs {
        println!("  {} ({})", g.name, g.file);
        for i in &g.inputs {
            println!("    in  {i}");
        }
        for o in &g.outputs {
            println!("    out {o}");
        }
        match &g.parity {
            Some(p) => println!(
                "    parity: ort max|Δ| {:.3e}, tract max|Δ| {:.3e}, tolerance {:.1e}, {} input sets",
                p.ort_max_abs_diff, p.tract_max_abs_diff, p.tolerance, p.inputs_checked
            ),
            None => println!("    parity: not recorded"),
        }
    }
    let command = m
        .provenance
        .get("command")
        .map(|c| match c {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .unwrap_or_else(|| "not recorded".to_string());
    println!("provenance command: {command}");
}

struct BenchArgs<'a> {
    bundle: &'a Path,
    providers: &'a [duet_runtime::Provider],
    settings: &'a duet_runtime::bench::BenchSettings,
    image: Option<&'a Path>,
    python: Option<(&'a str, &'a Path)>,
    out: Option<&'a Path>,
    ort_lib: Option<PathBuf>,
}

/// The benchmark image at the model's size: `--image`, or the bundle's own generation.
fn bench_image(bundle: &Bundle, args: &BenchArgs<'_>) -> Result<image::RgbImage> {
    let spec = &bundle.manifest().image;
    if let Some(path) = args.image {
        return Ok(preprocess::load_image_for(path, spec)?);
    }
    if bundle.manifest().diffusion.is_none() {
        anyhow::bail!("this bundle has no generator to draw a benchmark image: pass --image");
    }
    let generator = Generator::new(
        bundle,
        ProviderChoice::Only(duet_runtime::Provider::Tract),
        &EngineOptions::default(),
    )?;
    let opts = GenerateOptions {
        seed: args.settings.seed,
        ..generator.default_options()
    };
    generator
        .generate_images(&[args.settings.prompt.as_str()], &opts)?
        .pop()
        .context("no image generated")
}

fn bench(args: BenchArgs<'_>) -> Result<()> {
    use duet_runtime::bench::{machine_peak_gflops, render_markdown, write_raw_rgb, ProviderBench};
    let bundle = Bundle::open(args.bundle)
        .with_context(|| format!("opening bundle {}", args.bundle.display()))?;
    let image = bench_image(&bundle, &args)?;
    // An unpredictable, exclusively created name (removed when `tmp_file` drops), written
    // through its own handle rather than reopened by name.
    let tmp_file = tempfile::Builder::new()
        .prefix("duet-bench-")
        .suffix(".rgb")
        .tempfile()
        .context("creating the benchmark's image file")?;
    let tmp = tmp_file.path().to_owned();
    write_raw_rgb(&image, tmp_file.as_file())?;
    let exe = std::env::current_exe()?;
    let s = args.settings;
    let steps: Vec<String> = s.steps.iter().map(ToString::to_string).collect();
    let common = |cmd: &mut std::process::Command| {
        cmd.arg("--runs")
            .arg(s.runs.to_string())
            .arg("--steps")
            .arg(steps.join(","))
            .arg("--batch")
            .arg(s.batch.to_string())
            .arg("--prompt")
            .arg(&s.prompt);
        die_with_parent(cmd);
    };
    let mut results: Vec<ProviderBench> = Vec::new();
    let mut skipped: Vec<(String, String)> = Vec::new();
    let mut record = |name: String, out: std::io::Result<std::process::Output>| match out {
        Ok(o) if o.status.success() => match serde_json::from_slice::<ProviderBench>(&o.stdout) {
            Ok(r) => {
                eprintln!("{name}: done");
                results.push(r)
            }
            Err(e) => skipped.push((name, format!("unreadable result: {e}"))),
        },
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let why = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("failed without a message")
                .trim_start_matches("error: ")
                .to_string();
            eprintln!("{name}: not measured: {why}");
            skipped.push((name, why));
        }
        Err(e) => {
            eprintln!("{name}: not measured: {e}");
            skipped.push((name, e.to_string()))
        }
    };
    for p in args.providers {
        eprintln!("{p}: measuring in a child process");
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("bench")
            .arg("--bundle")
            .arg(args.bundle)
            .arg("--worker")
            .arg(p.as_str())
            .arg("--image-raw")
            .arg(&tmp);
        if let Some(lib) = &args.ort_lib {
            cmd.arg("--ort-lib").arg(lib);
        }
        common(&mut cmd);
        record(p.to_string(), cmd.output());
    }
    if let Some((python, script)) = args.python {
        eprintln!("python-ort-cpu: measuring {}", script.display());
        let mut cmd = std::process::Command::new(python);
        cmd.arg(script)
            .arg("--bundle")
            .arg(args.bundle)
            .arg("--image-raw")
            .arg(&tmp);
        common(&mut cmd);
        record("python-ort-cpu".to_string(), cmd.output());
    }
    let machine = machine_peak_gflops();
    let mut table = render_markdown(&results, &skipped, s, machine.as_ref());
    if let Some(rust) = results.iter().find(|r| r.provider == "ort-cpu") {
        for r in &results {
            if r.caption != rust.caption {
                table.push_str(&format!(
                    "\n**Mismatch**: {} captions the image \"{}\", ort-cpu \"{}\".\n",
                    r.provider, r.caption, rust.caption
                ));
            }
        }
    }
    println!("{table}");
    if let Some(out) = args.out {
        let command: Vec<String> = std::env::args().collect();
        let doc = format!(
            "Bundle `{}`, {} timed runs per cell (fewer for the slow rows), benchmark caption \"{}\".\n\nCommand: `{}`\n\n{table}",
            args.bundle.display(),
            s.runs,
            results.first().map(|r| r.caption.as_str()).unwrap_or(""),
            command.join(" ")
        );
        write_file_atomic(out, doc.as_bytes())?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// One provider, in its own process: JSON on stdout.
fn bench_worker(
    bundle_dir: &Path,
    provider: duet_runtime::Provider,
    ort_lib: Option<PathBuf>,
    settings: &duet_runtime::bench::BenchSettings,
    raw: &Path,
) -> Result<()> {
    let bundle = Bundle::open(bundle_dir)?;
    let side = bundle.manifest().image.size as u32;
    let bytes = std::fs::read(raw)?;
    let image = image::RgbImage::from_raw(side, side, bytes)
        .context("benchmark image does not match the model's size")?;
    let options = EngineOptions {
        ort_lib,
        ..EngineOptions::default()
    };
    let r = duet_runtime::bench::run_provider(
        &bundle,
        ProviderChoice::Only(provider),
        &options,
        settings,
        &image,
    )?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
