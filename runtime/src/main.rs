//! `duet`: caption images or generate images with a bundle, or describe a bundle and this
//! machine's providers.

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
    /// Path of libonnxruntime (default: $ORT_DYLIB_PATH, then .ort/lib/ near the working
    /// directory or the executable).
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
    /// Generate images from a text prompt; writes a PNG (a grid when --count > 1).
    Generate {
        /// Bundle directory (exported from a generate run).
        #[arg(long)]
        bundle: PathBuf,
        #[command(flatten)]
        engine: EngineArgs,
        /// What to draw, e.g. "a large red circle at the top left".
        prompt: String,
        /// Output PNG.
        #[arg(short, long, default_value = "generated.png")]
        out: PathBuf,
        /// Sampler steps (default: the bundle's).
        #[arg(long)]
        steps: Option<usize>,
        /// Sampler: ddim or dpmpp (DPM-Solver++ 2M).
        #[arg(long, default_value = "ddim")]
        sampler: SamplerArg,
        /// DDIM noise (0: deterministic).
        #[arg(long, default_value_t = 0.0)]
        eta: f32,
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

fn main() -> ExitCode {
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
        } => generate(
            &bundle,
            &engine,
            &prompt,
            &out,
            GenerateArgs {
                steps,
                sampler: match sampler {
                    SamplerArg::Ddim => Sampler::Ddim { eta },
                    SamplerArg::Dpmpp => Sampler::DpmSolverPp2M,
                },
                guidance,
                seed,
                count: usize::from(count),
                scale,
            },
        ),
        Command::Info { bundle, ort_lib } => info(bundle.as_deref(), ort_lib),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
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
    // Decode every image before loading models so a bad path fails fast.
    let loaded = images
        .iter()
        .map(preprocess::load_image)
        .collect::<Result<Vec<_>, _>>()?;
    let captioner = Captioner::new(&bundle, engine.provider, &engine.options())
        .context("loading the captioning graphs")?;
    for report in captioner.reports() {
        eprintln!("{report}");
    }
    for (paths, imgs) in images.chunks(batch).zip(loaded.chunks(batch)) {
        let captions = captioner.caption_images(imgs)?;
        for (path, caption) in paths.iter().zip(captions) {
            println!("{}\t{caption}", path.display());
        }
    }
    Ok(())
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
    prompt: &str,
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
    let prompts = vec![prompt; args.count];
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
    } else {
        let cols = (images.len() as f64).sqrt().ceil() as usize;
        duet_runtime::diffusion::grid(&images, cols, args.scale)
    };
    save_png_atomic(&picture, out)?;
    println!("{}", out.display());
    Ok(())
}

/// Writes a PNG next to `out` and renames it into place, so an interrupted run never leaves
/// a truncated image under the requested name.
fn save_png_atomic(img: &image::RgbImage, out: &Path) -> Result<()> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image.png".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming into {}", out.display()))?;
    Ok(())
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
