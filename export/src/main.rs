//! `duet-export --run RUN --out BUNDLE`: build the ONNX graphs of a trained run, verify them
//! against Burn on onnxruntime and tract, and write the bundle only if every graph passes
//! (a directory, or one file when `BUNDLE` ends in `.duet`). `duet-export pack DIR FILE` and
//! `duet-export unpack FILE DIR` convert a verified bundle between the two forms.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use duet_export::bundle::refuse_non_bundle_file;
use duet_export::parity::FP32_TOLERANCE;
use duet_export::quantize::evaluate::{evaluate_precisions, TaskEval};
use duet_export::quantize::variants::{add_variants, record_metrics, VariantOptions};
use duet_export::quantize::Precision;
use duet_export::{export_run, ExportOptions};
use duet_runtime::bundle::archive;
use duet_runtime::diffusion::Sampler;
use duet_runtime::engine::{EngineOptions, ProviderChoice};
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
    /// Also write these compressed variants of every graph (fp16, int8; comma-separated), as
    /// `duet-export quantize` does.
    #[arg(long, value_delimiter = ',')]
    quantize: Vec<Precision>,
}

/// Conversions between a bundle directory and a single-file bundle. Both verify the bundle
/// (hashes, manifest, graph contracts) before writing anything.
#[derive(Subcommand, Debug)]
enum Convert {
    /// Bundle directory → one `.duet` file (an uncompressed tar of the same files).
    Pack { dir: PathBuf, file: PathBuf },
    /// `.duet` file → a new bundle directory.
    Unpack { file: PathBuf, dir: PathBuf },
    /// Add fp16 / int8 variants of every graph to a bundle (in place, or written to --out),
    /// each checked on onnxruntime and tract against its fp32 graph; with --eval-data and/or
    /// --geneval, the task metrics of fp32 and each variant, measured through the runtime,
    /// go into the manifest. Pick one at run time with `duet --precision`.
    Quantize(QuantizeArgs),
    /// Bundle (directory or `.duet`) → a new run holding its model, tokenizer and dimensions,
    /// to fine-tune: a generate run (captioner and generator, with the bundle's diffusion
    /// settings) when the bundle has a generator, for `duet-train fit --init RUN` of the dream,
    /// unify, fusion and restore stages; else (or with `--stage caption`) a caption run, for
    /// `duet-train fit --stage caption --init-from RUN`.
    Import {
        bundle: PathBuf,
        run: PathBuf,
        /// The run to write: `caption` or `generate` (default: the most the bundle holds).
        #[arg(long)]
        stage: Option<duet_run::Stage>,
    },
}

#[derive(clap::Args, Debug)]
struct QuantizeArgs {
    /// The bundle (directory or `.duet`).
    #[arg(long)]
    bundle: PathBuf,
    /// Variants to make (repeatable or comma-separated): fp16, int8.
    #[arg(long, value_delimiter = ',', required = true)]
    precision: Vec<Precision>,
    /// Write the bundle with its variants here instead of updating --bundle.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A held-out ShapeWorld folder (`duet-train shapeworld`) to score captions on.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// Caption only the first N scenes of --eval-data.
    #[arg(long)]
    eval_limit: Option<usize>,
    /// GenEval-style prompts per category to generate and score (0: none).
    #[arg(long, default_value_t = 0)]
    geneval: usize,
    /// Restoration examples to classify with 70 % missing a modality (0: none; only bundles
    /// with restorers).
    #[arg(long, default_value_t = 0)]
    restore_examples: usize,
    /// Sampler of the GenEval generations: dpmpp (DPM-Solver++ 2M, as the model card's
    /// GenEval) or ddim.
    #[arg(long, default_value = "dpmpp", value_parser = ["dpmpp", "ddim"])]
    sampler: String,
    /// Sampler steps of the GenEval generations (the bundle's guidance).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Noise seed of the GenEval generations.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Engine the evaluation runs on (ort-cpu, tract, …).
    #[arg(long, default_value = "ort-cpu")]
    provider: ProviderChoice,
    /// Path of libonnxruntime (default: $ORT_DYLIB_PATH, then .ort/lib/).
    #[arg(long, value_name = "PATH")]
    ort_lib: Option<PathBuf>,
}

fn quantize(q: &QuantizeArgs) -> anyhow::Result<()> {
    let engine = EngineOptions {
        strict: true,
        ort_lib: q.ort_lib.clone(),
        ..EngineOptions::default()
    };
    let reports = add_variants(&VariantOptions {
        bundle: q.bundle.clone(),
        out: q.out.clone(),
        precisions: q.precision.clone(),
        engine: engine.clone(),
    })
    .with_context(|| format!("adding variants to {}", q.bundle.display()))?;
    let written = q.out.clone().unwrap_or_else(|| q.bundle.clone());
    println!(
        "{:<10} {:<16} {:>10} {:>10} {:>12} {:>12} {:>10}",
        "precision", "graph", "bytes", "fp32", "ort max|Δ|", "tract max|Δ|", "fp32 max"
    );
    for r in &reports {
        for (graph, q, a) in &r.graphs {
            println!(
                "{:<10} {:<16} {:>10} {:>10} {:>12.3e} {:>12.3e} {:>10.3}",
                r.precision.name(),
                graph.name(),
                q.bytes_after,
                q.bytes_before,
                a.ort_max_abs_diff,
                a.tract_max_abs_diff,
                a.fp32_max_abs
            );
        }
        let (after, before) = r.bytes();
        println!(
            "{:<10} {:<16} {:>10} {:>10}   ({:.2}x smaller)",
            r.precision.name(),
            "all graphs",
            after,
            before,
            before as f64 / after.max(1) as f64
        );
    }
    if q.eval_data.is_some() || q.geneval > 0 || q.restore_examples > 0 {
        let eval = TaskEval {
            data: q.eval_data.clone(),
            limit: q.eval_limit,
            per_category: q.geneval,
            sampler: match q.sampler.as_str() {
                "ddim" => Sampler::Ddim { eta: 0.0 },
                _ => Sampler::DpmSolverPp2M,
            },
            steps: q.steps,
            seed: q.seed,
            restore_examples: q.restore_examples,
            choice: q.provider,
            engine,
        };
        let precisions: Vec<Precision> = std::iter::once(Precision::Fp32)
            .chain(q.precision.iter().copied())
            .collect();
        let metrics = evaluate_precisions(&written, &precisions, &eval)?;
        for (p, m) in &metrics {
            for (name, v) in m {
                println!("{:<10} {name:<40} {:>8.2} %", p.name(), 100.0 * v);
            }
        }
        record_metrics(&written, &metrics)?;
    }
    println!("bundle with variants written to {}", written.display());
    Ok(())
}

fn convert(c: &Convert) -> anyhow::Result<()> {
    match c {
        Convert::Quantize(q) => quantize(q)?,
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
        Convert::Import { bundle, run, stage } => {
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let report = duet_export::import::import_run(bundle, run, *stage, &command)?;
            println!(
                "{} imported into {} as a {} run: {} parameters, {} values",
                bundle.display(),
                report.run.display(),
                report.stage,
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
    if !cli.quantize.is_empty() {
        let reports = add_variants(&VariantOptions {
            bundle: report.bundle.clone(),
            out: None,
            precisions: cli.quantize.clone(),
            engine: opts.engine.clone(),
        })
        .context("adding the compressed variants")?;
        for r in &reports {
            let (after, before) = r.bytes();
            println!(
                "{} variant: {after} bytes of graphs ({:.2}x smaller than fp32)",
                r.precision,
                before as f64 / after.max(1) as f64
            );
        }
    }
    println!("bundle written to {}", out.display());
    Ok(())
}
