//! `duet-edge`: the smallest useful duet program for a device. It opens and verifies a bundle,
//! loads its graphs on tract (pure Rust: no shared libraries, no onnxruntime) and
//!
//! - `duet-edge caption BUNDLE IMAGE...` prints one caption per image (`PATH<TAB>CAPTION`,
//!   the path quoted when it holds a tab, newline or other control character);
//! - `duet-edge generate BUNDLE OUT.png PROMPT [--steps N] [--seed S]` draws the prompt into a
//!   PNG (the bundle's default steps and seed 0 when not given), written atomically: a failed
//!   write leaves any previous `OUT.png` whole and exits non-zero.
//!
//! Copy it as the starting point of an embedded integration. Arguments are parsed by clap, as
//! in the main CLI: a non-UTF-8 or unexpected argument is a usage error, never a panic or
//! silently ignored.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use duet_runtime::engine::{EngineOptions, Provider, ProviderChoice};
use duet_runtime::manifest::Precision;
use duet_runtime::{preprocess, Bundle, Captioner, Generator};

#[derive(Parser)]
#[command(
    name = "duet-edge",
    version,
    about = "Caption and generate with a duet bundle on tract"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Which of the bundle's graph files to load: fp32, or a variant it has (fp16 halves the
    /// download at the same speed on tract; int8 is slower on tract than fp32).
    #[arg(long, global = true, default_value = "fp32")]
    precision: Precision,
}

#[derive(Subcommand)]
enum Command {
    /// One caption per image: `PATH<TAB>CAPTION`.
    Caption {
        /// The bundle: a directory, or a single `.duet` file.
        bundle: PathBuf,
        /// Images (any size: each is resized to the model's).
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Draws PROMPT into OUT (a PNG).
    Generate {
        /// The bundle: a directory, or a single `.duet` file.
        bundle: PathBuf,
        /// Output PNG; its directory must exist.
        out: PathBuf,
        /// What to draw.
        prompt: String,
        /// Sampler steps (default: the bundle's).
        #[arg(long)]
        steps: Option<usize>,
        /// Seed of the initial noise.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", duet_runtime::display::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Opens and verifies the bundle, reading only the files of `precision`.
fn open(dir: &Path, precision: Precision) -> anyhow::Result<Bundle> {
    Bundle::open_for(dir, precision).with_context(|| format!("opening bundle {}", dir.display()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let tract = ProviderChoice::Only(Provider::Tract);
    let options = EngineOptions::default();
    match cli.command {
        Command::Caption { bundle, images } => {
            let bundle = open(&bundle, cli.precision)?;
            let captioner = Captioner::new(&bundle, tract, &options)?;
            for path in &images {
                let started = Instant::now();
                let img = preprocess::load_image_for(path, captioner.image_spec())?;
                let caption = captioner
                    .caption_images(std::slice::from_ref(&img))?
                    .pop()
                    .context("the captioner returned no caption")?;
                let shown = duet_runtime::display::tsv_field(&path.to_string_lossy());
                println!("{shown}\t{caption}");
                eprintln!("{shown}: {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
            }
        }
        Command::Generate {
            bundle,
            out,
            prompt,
            steps,
            seed,
        } => {
            // The output's directory is checked before any sampling, not after.
            let dir = match out.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            anyhow::ensure!(
                dir.is_dir(),
                "the directory of {} does not exist",
                out.display()
            );
            let bundle = open(&bundle, cli.precision)?;
            let generator = Generator::new(&bundle, tract, &options)?;
            let mut opts = generator.default_options();
            if let Some(steps) = steps {
                opts.steps = steps;
            }
            opts.seed = seed;
            let started = Instant::now();
            let image = generator
                .generate_images(&[prompt.as_str()], &opts)?
                .pop()
                .context("no image was produced")?;
            let mut png = Vec::new();
            image
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .context("encoding the PNG")?;
            duet_fsio::write_atomic(&out, &png)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", out.display());
            eprintln!(
                "{} steps in {:.1} ms",
                opts.steps,
                started.elapsed().as_secs_f64() * 1e3
            );
        }
    }
    Ok(())
}
