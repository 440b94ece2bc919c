//! `duet-export --run RUN --out BUNDLE`: build the ONNX graphs of a trained run, verify them
//! against Burn on onnxruntime and tract, and write the bundle only if every graph passes
//! (a directory, or one file when `BUNDLE` ends in `.duet`). `duet-export pack DIR FILE` and
//! `duet-export unpack FILE DIR` convert a verified bundle between the two forms.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use duet_export::bundle::refuse_non_bundle_file;
use duet_export::parity::FP32_TOLERANCE;
use duet_export::{export_run, ExportOptions};
use duet_runtime::bundle::archive;
use duet_runtime::engine::EngineOptions;
use duet_runtime::Bundle;

#[derive(Parser, Debug)]
#[command(
    name = "duet-export",
    version,
    about = "Export a trained duet run to a verified ONNX bundle",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    convert: Option<Convert>,
    /// Training run directory (written by `duet-train fit`).
    #[arg(long, required = true)]
    run: Option<PathBuf>,
    /// Bundle to write: a directory, or one file if the name ends in `.duet`. An existing
    /// bundle there is replaced only after success; anything else there is refused.
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// Bundle name in the manifest (default: the run directory's name).
    #[arg(long)]
    name: Option<String>,
    /// Largest allowed max-abs difference to Burn, on ort and on tract.
    #[arg(long, default_value_t = FP32_TOLERANCE)]
    tolerance: f64,
    /// Path of libonnxruntime for the ort parity check (default: $ORT_DYLIB_PATH, then .ort/lib/).
    #[arg(long, value_name = "PATH")]
    ort_lib: Option<PathBuf>,
}

/// Conversions between a bundle directory and a single-file bundle. Both verify the bundle
/// (hashes, manifest, graph contracts) before writing anything.
#[derive(Subcommand, Debug)]
enum Convert {
    /// Bundle directory → one `.duet` file (an uncompressed tar of the same files).
    Pack { dir: PathBuf, file: PathBuf },
    /// `.duet` file → a new bundle directory.
    Unpack { file: PathBuf, dir: PathBuf },
    /// Bundle (directory or `.duet`) → a new caption run holding its captioner, tokenizer and
    /// dimensions, to fine-tune with `duet-train fit --stage caption --init-from RUN`.
    Import { bundle: PathBuf, run: PathBuf },
}

fn convert(c: &Convert) -> anyhow::Result<()> {
    match c {
        Convert::Pack { dir, file } => {
            let bundle =
                Bundle::open(dir).with_context(|| format!("opening bundle {}", dir.display()))?;
            refuse_non_bundle_file(file)?;
            archive::pack(&bundle, file)
                .with_context(|| format!("packing {} into {}", dir.display(), file.display()))?;
            println!("bundle packed into {}", file.display());
        }
        Convert::Unpack { file, dir } => {
            let bundle =
                Bundle::open(file).with_context(|| format!("opening bundle {}", file.display()))?;
            archive::unpack(&bundle, dir)
                .with_context(|| format!("unpacking {} into {}", file.display(), dir.display()))?;
            println!("bundle unpacked into {}", dir.display());
        }
        Convert::Import { bundle, run } => {
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let report = duet_export::import::import_captioner(bundle, run, &command)?;
            println!(
                "captioner of {} imported into {}: {} parameters, {} values",
                bundle.display(),
                report.run.display(),
                report.parameters,
                report.values
            );
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,ort=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    if let Some(c) = &cli.convert {
        return convert(c);
    }
    let (Some(run), Some(out)) = (cli.run, cli.out) else {
        anyhow::bail!("--run and --out are required");
    };
    let opts = ExportOptions {
        name: cli.name,
        tolerance: cli.tolerance,
        engine: EngineOptions {
            strict: true,
            ort_lib: cli.ort_lib,
            ..EngineOptions::default()
        },
        command: std::env::args().collect::<Vec<_>>().join(" "),
        ..ExportOptions::new(&run, &out)
    };
    let report = export_run(&opts)
        .with_context(|| format!("exporting {} to {}", run.display(), out.display()))?;
    println!(
        "{:<16} {:>12} {:>12} {:>10} {:>6}",
        "graph", "ort max|Δ|", "tract max|Δ|", "tolerance", "cases"
    );
    for p in &report.parity {
        println!(
            "{:<16} {:>12.3e} {:>12.3e} {:>10.1e} {:>6}",
            p.graph, p.ort.max_abs_diff, p.tract.max_abs_diff, p.tolerance, p.cases
        );
    }
    println!("bundle written to {}", out.display());
    Ok(())
}
