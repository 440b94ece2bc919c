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

use anyhow::{bail, Context};
use clap::Parser;
use duet_runtime::engine::{Engine, EngineOptions, IoInfo, ProviderChoice, Value, ValueView};
use duet_runtime::manifest::{DType, DimSpec};
use ndarray::{ArrayD, IxDyn};

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
    #[arg(long = "dim", value_parser = parse_dim)]
    dims: Vec<(String, usize)>,
    /// Threads of one run (both engines).
    #[arg(long)]
    threads: Option<std::num::NonZeroUsize>,
    /// Path of libonnxruntime (default: $ORT_DYLIB_PATH, then the fixed places duet looks in).
    #[arg(long)]
    ort_lib: Option<PathBuf>,
}

fn parse_dim(s: &str) -> Result<(String, usize), String> {
    let (name, n) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected NAME=N"))?;
    let n = n
        .parse()
        .map_err(|e| format!("`{s}`: {n} is not a size: {e}"))?;
    Ok((name.to_string(), n))
}

/// Largest total input fed, in elements: a typo in `--dim` must not allocate the machine away.
const MAX_INPUT_ELEMENTS: usize = 1 << 28;

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

    let mut feed = Vec::new();
    let mut total = 0usize;
    for (ix, info) in engine.inputs().iter().enumerate() {
        let shape = concrete_shape(info, &args.dims)?;
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|n| total.checked_add(n).map(|t| (n, t)))
            .filter(|&(_, t)| t <= MAX_INPUT_ELEMENTS)
            .map(|(n, t)| {
                total = t;
                n
            })
            .with_context(|| {
                format!(
                    "input `{}` of shape {shape:?} takes the inputs over {MAX_INPUT_ELEMENTS} \
                     elements",
                    info.name
                )
            })?;
        let Some(dtype) = info.dtype else {
            bail!(
                "input `{}` has an element type the engines do not feed",
                info.name
            );
        };
        println!("feeding {} {dtype} {shape:?}", info.name);
        feed.push((info.name.clone(), pattern(dtype, &shape, n, ix)?));
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

/// The shape fed to `info`: fixed axes as declared, symbolic ones from `--dim` (or 1).
fn concrete_shape(info: &IoInfo, dims: &[(String, usize)]) -> anyhow::Result<Vec<usize>> {
    let Some(axes) = &info.dims else {
        bail!(
            "input `{}` declares no shape; this example needs one to make an input",
            info.name
        );
    };
    Ok(axes
        .iter()
        .map(|a| match a {
            Some(DimSpec::Fixed(n)) => *n,
            Some(DimSpec::Symbolic(s)) => dims.iter().find(|(d, _)| d == s).map_or(1, |d| d.1),
            None => 1,
        })
        .collect())
}

/// A deterministic input: values cycling through -3..=3 (shifted for the unsigned type, scaled
/// by 1/3 for the float ones), offset per input so two inputs differ.
fn pattern(dtype: DType, shape: &[usize], n: usize, input: usize) -> anyhow::Result<Value> {
    let k = (0..n).map(|i| ((i + 3 * input) % 7) as i64 - 3);
    let shape = IxDyn(shape);
    Ok(match dtype {
        DType::F32 => Value::F32(ArrayD::from_shape_vec(
            shape,
            k.map(|v| v as f32 / 3.0).collect(),
        )?),
        DType::F16 => Value::F16(ArrayD::from_shape_vec(
            shape,
            k.map(|v| half::f16::from_f32(v as f32 / 3.0)).collect(),
        )?),
        DType::I64 => Value::I64(ArrayD::from_shape_vec(shape, k.collect())?),
        DType::I32 => Value::I32(ArrayD::from_shape_vec(
            shape,
            k.map(|v| v as i32).collect(),
        )?),
        DType::I8 => Value::I8(ArrayD::from_shape_vec(shape, k.map(|v| v as i8).collect())?),
        DType::U8 => Value::U8(ArrayD::from_shape_vec(
            shape,
            k.map(|v| (v + 3) as u8).collect(),
        )?),
        DType::Bool => Value::Bool(ArrayD::from_shape_vec(shape, k.map(|v| v > 0).collect())?),
    })
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
