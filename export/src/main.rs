//! `duet-export --run RUN --out BUNDLE`: build the ONNX graphs of a trained run, verify them
//! against Burn on onnxruntime and tract, and write the bundle only if every graph passes.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use duet_export::parity::FP32_TOLERANCE;
use duet_export::{export_run, ExportOptions};
use duet_runtime::engine::EngineOptions;

#[derive(Parser, Debug)]
#[command(
    name = "duet-export",
    version,
    about = "Export a trained duet run to a verified ONNX bundle"
)]
struct Cli {
    /// Training run directory (written by `duet-train fit`).
    #[arg(long)]
    run: PathBuf,
    /// Bundle directory to write; an existing bundle there is replaced only after success.
    #[arg(long)]
    out: PathBuf,
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

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,ort=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let opts = ExportOptions {
        name: cli.name,
        tolerance: cli.tolerance,
        engine: EngineOptions {
            strict: true,
            ort_lib: cli.ort_lib,
            ..EngineOptions::default()
        },
        command: std::env::args().collect::<Vec<_>>().join(" "),
        ..ExportOptions::new(&cli.run, &cli.out)
    };
    let report = export_run(&opts)
        .with_context(|| format!("exporting {} to {}", cli.run.display(), cli.out.display()))?;
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
    println!("bundle written to {}", report.bundle.display());
    Ok(())
}
