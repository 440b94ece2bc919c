//! `duet bench`: each pipeline's latency per provider, one worker process per provider.

use super::*;

pub(crate) struct BenchArgs<'a> {
    pub(crate) bundle: &'a Path,
    pub(crate) providers: &'a [duet_runtime::Provider],
    pub(crate) settings: &'a duet_runtime::bench::BenchSettings,
    pub(crate) image: Option<&'a Path>,
    pub(crate) python: Option<(&'a str, &'a Path)>,
    pub(crate) out: Option<&'a Path>,
    pub(crate) ort_lib: Option<PathBuf>,
    /// Empty: every precision the bundle has.
    pub(crate) precisions: &'a [Precision],
}

/// The benchmark image at the model's size: `--image`, or the bundle's own generation.
pub(crate) fn bench_image(bundle: &Bundle, args: &BenchArgs<'_>) -> Result<image::RgbImage> {
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

pub(crate) fn bench(args: BenchArgs<'_>) -> Result<()> {
    use duet_runtime::bench::{machine_peak_gflops, render_markdown, ProviderBench};
    let bundle = Bundle::open(args.bundle)
        .with_context(|| format!("opening bundle {}", args.bundle.display()))?;
    let image = bench_image(&bundle, &args)?;
    // Each child reads the image's raw RGB on its stdin (`--image-raw -`): no file to leave
    // behind when this process is killed (a temporary file did, on every SIGTERM).
    let raw = image.as_raw().as_slice();
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
        if let Some(n) = s.threads {
            cmd.arg("--threads").arg(n.to_string());
        }
        cmd.arg("--idle-wait").arg(s.idle_wait.name());
        die_with_parent(cmd);
    };
    let mut results: Vec<ProviderBench> = Vec::new();
    let mut skipped: Vec<(String, String)> = Vec::new();
    let mut record = |name: String, out: std::io::Result<std::process::Output>| {
        record_child(name, out, &mut results, &mut skipped)
    };
    let precisions = if args.precisions.is_empty() {
        bundle.manifest().precisions()
    } else {
        args.precisions.to_vec()
    };
    for &precision in &precisions {
        // A precision the bundle lacks fails here, before any child starts.
        bundle.clone().with_precision(precision)?;
    }
    for p in args.providers {
        for &precision in &precisions {
            let name = column_name(*p, precision);
            eprintln!("{name}: measuring in a child process");
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("bench")
                .arg("--bundle")
                .arg(args.bundle)
                .arg("--worker")
                .arg(p.as_str())
                .arg("--precision")
                .arg(precision.name())
                .arg("--image-raw")
                .arg("-");
            if let Some(lib) = &args.ort_lib {
                cmd.arg("--ort-lib").arg(lib);
            }
            common(&mut cmd);
            record(name, output_fed(&mut cmd, raw));
        }
    }
    if args.python.is_some() && args.bundle.is_file() {
        skipped.push((
            "python-ort-cpu".to_string(),
            "the Python reference reads bundle directories: unpack the .duet file \
             (`duet-export unpack`) to compare against it"
                .to_string(),
        ));
    } else if let Some((python, script)) = args.python {
        eprintln!("python-ort-cpu: measuring {}", script.display());
        let mut cmd = std::process::Command::new(python);
        cmd.arg(script)
            .arg("--bundle")
            .arg(args.bundle)
            .arg("--image-raw")
            .arg("-");
        common(&mut cmd);
        record("python-ort-cpu".to_string(), output_fed(&mut cmd, raw));
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
            "Bundle `{}`, {} timed runs per cell (fewer for the slow rows), {}, benchmark caption \"{}\".\n\nCommand: `{}`\n\n{table}",
            args.bundle.display(),
            s.runs,
            match s.threads {
                Some(n) => format!(
                    "{n} thread(s) per graph run on every engine, idle threads {}",
                    s.idle_wait
                ),
                None => "each engine's default threads (onnxruntime one per core, tract one)".into(),
            },
            results.first().map(|r| r.caption.as_str()).unwrap_or(""),
            command.join(" ")
        );
        write_file_atomic(out, doc.as_bytes())?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// Runs `cmd` with `input` on its stdin and collects its output, as `Command::output` does.
/// The input is written from its own thread so that a child which writes a lot before it
/// reads cannot deadlock against a full pipe.
fn output_fed(
    cmd: &mut std::process::Command,
    input: &[u8],
) -> std::io::Result<std::process::Output> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("the child's stdin was not piped"))?;
    std::thread::scope(|scope| {
        // A child that exits without reading gives a broken pipe here; its own exit status
        // and stderr say why, so the write error is not the one to report.
        scope.spawn(move || {
            let _ = stdin.write_all(input);
        });
        child.wait_with_output()
    })
}

/// `duet bench --model FILE.onnx`: each provider in a child process of its own (a cold load,
/// its own peak memory, a crash that takes only its row), one table.
pub(crate) fn bench_model(
    model: &Path,
    providers: &[duet_runtime::Provider],
    settings: &duet_runtime::bench::BenchSettings,
    dims: &[(String, usize)],
    ort_lib: Option<PathBuf>,
    out: Option<&Path>,
) -> Result<()> {
    use duet_runtime::bench::{render_model_markdown, ModelBench};
    let exe = std::env::current_exe()?;
    let mut results: Vec<ModelBench> = Vec::new();
    let mut skipped: Vec<(String, String)> = Vec::new();
    for p in providers {
        eprintln!("{p}: measuring in a child process");
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("bench")
            .arg("--model")
            .arg(model)
            .arg("--worker")
            .arg(p.as_str())
            .arg("--runs")
            .arg(settings.runs.to_string());
        for (name, n) in dims {
            cmd.arg("--dim").arg(format!("{name}={n}"));
        }
        if let Some(n) = settings.threads {
            cmd.arg("--threads").arg(n.to_string());
        }
        cmd.arg("--idle-wait").arg(settings.idle_wait.name());
        if settings.profile {
            cmd.arg("--profile");
        }
        if let Some(lib) = &ort_lib {
            cmd.arg("--ort-lib").arg(lib);
        }
        die_with_parent(&mut cmd);
        record_child(p.to_string(), cmd.output(), &mut results, &mut skipped);
    }
    if results.is_empty() {
        let reasons: Vec<String> = skipped.iter().map(|(p, w)| format!("{p}: {w}")).collect();
        anyhow::bail!(
            "no provider ran {}: {}",
            model.display(),
            reasons.join("; ")
        );
    }
    let name = model.display().to_string();
    let table = render_model_markdown(&name, &results, &skipped, settings);
    println!("{table}");
    if let Some(out) = out {
        let command: Vec<String> = std::env::args().collect();
        let doc = format!("Command: `{}`\n\n{table}", command.join(" "));
        write_file_atomic(out, doc.as_bytes())?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// A measuring child's result: its JSON into `results`, or the last line of its error (or
/// why it could not start) into `skipped`, said on stderr as it comes.
fn record_child<T: serde::de::DeserializeOwned>(
    name: String,
    out: std::io::Result<std::process::Output>,
    results: &mut Vec<T>,
    skipped: &mut Vec<(String, String)>,
) {
    let why = match out {
        Ok(o) if o.status.success() => match serde_json::from_slice::<T>(&o.stdout) {
            Ok(r) => {
                eprintln!("{name}: done");
                results.push(r);
                return;
            }
            Err(e) => format!("unreadable result: {e}"),
        },
        Ok(o) => String::from_utf8_lossy(&o.stderr)
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("failed without a message")
            .trim_start_matches("error: ")
            .to_string(),
        Err(e) => e.to_string(),
    };
    eprintln!("{name}: not measured: {why}");
    skipped.push((name, why));
}

/// One provider of `bench --model`, in its own process: JSON on stdout.
pub(crate) fn bench_model_worker(
    model: &Path,
    provider: duet_runtime::Provider,
    ort_lib: Option<PathBuf>,
    settings: &duet_runtime::bench::BenchSettings,
    dims: &[(String, usize)],
) -> Result<()> {
    let options = EngineOptions {
        ort_lib,
        ..EngineOptions::default()
    };
    let r = duet_runtime::bench::run_model(model, provider, &options, settings, dims)?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// A result column: the provider, and the precision when it is not fp32 (`ort-cpu int8`).
fn column_name(provider: duet_runtime::Provider, precision: Precision) -> String {
    match precision {
        Precision::Fp32 => provider.to_string(),
        p => format!("{provider} {p}"),
    }
}

/// One provider at one precision, in its own process: JSON on stdout.
pub(crate) fn bench_worker(
    bundle_dir: &Path,
    provider: duet_runtime::Provider,
    precision: Precision,
    ort_lib: Option<PathBuf>,
    settings: &duet_runtime::bench::BenchSettings,
    raw: &Path,
) -> Result<()> {
    use std::io::Read;
    let bundle = Bundle::open_for(bundle_dir, precision)?;
    let side = bundle.manifest().image.size as u32;
    let expected = (side as usize) * (side as usize) * 3;
    // `-`: the parent's pipe; a path: a file someone made by hand. Capped one byte past the
    // expected size, so an oversized input is refused without reading it all.
    let mut bytes = Vec::with_capacity(expected);
    let source: Box<dyn Read> = if raw == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(raw).with_context(|| format!("opening {}", raw.display()))?)
    };
    source.take(expected as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() != expected {
        anyhow::bail!(
            "the benchmark image has {} bytes; a {side}x{side} RGB image has {expected}",
            bytes.len()
        );
    }
    let image = image::RgbImage::from_raw(side, side, bytes)
        .context("benchmark image does not match the model's size")?;
    let options = EngineOptions {
        ort_lib,
        ..EngineOptions::default()
    };
    let mut r = duet_runtime::bench::run_provider(
        &bundle,
        ProviderChoice::Only(provider),
        &options,
        settings,
        &image,
    )?;
    r.provider = column_name(provider, precision);
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
