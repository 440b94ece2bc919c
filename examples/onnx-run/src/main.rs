//! Runs any ONNX file through `duet_runtime::Engine`, the engine behind duet's pipelines:
//!
//! ```text
//! duet-onnx-run model.onnx [--provider auto] [--dim batch=4] [--threads 2]
//! ```
//!
//! It prints which execution provider took the graph and why the others were passed over, the
//! graph's inputs and outputs (element types, fixed and symbolic axes), then feeds every input
//! a deterministic pattern of its declared shape, where a symbolic axis takes its `--dim` value
//! or else one, and prints each output's shape and value range: a first check of whether
//! duet's engine runs a model here, and on what.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use duet_runtime::engine::{Engine, EngineOptions, ProviderChoice, Value, ValueView};

#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The ONNX file.
    model: PathBuf,
    /// `auto` (TensorRT → CUDA → onnxruntime CPU → tract, first that loads the graph), or one
    /// of `tensorrt`, `cuda`, `ort-cpu`, `tract`.
    #[arg(long, default_value = "auto")]
    provider: ProviderChoice,
    /// Under `auto`, fail instead of passing over a provider that cannot run the graph.
    #[arg(long)]
    strict: bool,
    /// Size of a symbolic axis, as NAME=N (repeatable); symbolic axes not given are 1, and so
    /// are axes with neither a size nor a name.
    #[arg(long = "dim", value_parser = duet_runtime::engine::sample::parse_dim)]
    dims: Vec<(String, usize)>,
    /// Threads of one run (both engines).
    #[arg(long)]
    threads: Option<std::num::NonZeroUsize>,
    /// Path of libonnxruntime (default: $ORT_DYLIB_PATH, then the fixed places duet looks in).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let options = EngineOptions {
        strict: args.strict,
        ort_lib: args.ort_lib.clone(),
        threads: args.threads,
        ..EngineOptions::default()
    };
    let name = args
        .model
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    let (engine, report) = Engine::load(&args.model, &name, args.provider, &options)
        .with_context(|| format!("loading {}", args.model.display()))?;
    println!("{report}");
    println!("inputs:");
    for i in engine.inputs() {
        println!("  {i}");
    }
    println!("outputs:");
    for o in engine.outputs() {
        println!("  {o}");
    }

    let feed = engine.sample_inputs(&args.dims)?;
    for (name, value) in &feed {
        println!("feeding {name} {} {:?}", value.dtype(), value.shape());
    }
    let inputs: Vec<(&str, ValueView<'_>)> =
        feed.iter().map(|(n, v)| (n.as_str(), v.view())).collect();
    let outputs = engine.run_views(&inputs)?;
    println!("results on {}:", engine.provider());
    for o in engine.outputs() {
        let v = &outputs[&o.name];
        println!("  {}: {} {:?} {}", o.name, v.dtype(), v.shape(), range(v));
    }
    Ok(())
}

/// `min … max` of a numeric output (true count for bool).
fn range(v: &Value) -> String {
    fn minmax(it: impl Iterator<Item = f64>) -> String {
        let (lo, hi) = it.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        });
        if lo > hi {
            "(empty)".into()
        } else {
            format!("min {lo:.4} max {hi:.4}")
        }
    }
    match v {
        Value::F32(a) => minmax(a.iter().map(|&x| f64::from(x))),
        Value::F16(a) => minmax(a.iter().map(|x| f64::from(x.to_f32()))),
        Value::I64(a) => minmax(a.iter().map(|&x| x as f64)),
        Value::I32(a) => minmax(a.iter().map(|&x| f64::from(x))),
        Value::I8(a) => minmax(a.iter().map(|&x| f64::from(x))),
        Value::U8(a) => minmax(a.iter().map(|&x| f64::from(x))),
        Value::Bool(a) => format!("{} of {} true", a.iter().filter(|&&b| b).count(), a.len()),
    }
}
