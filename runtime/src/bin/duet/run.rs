//! `duet caption`, `duet generate`, `duet classify` and `duet embed`: each builds its pipeline
//! from the bundle, runs it and writes its output (atomically, when it is a file).

use super::*;

pub(crate) fn caption(
    bundle_dir: &std::path::Path,
    engine: &EngineArgs,
    decode: &DecodeArgs,
    prompt: Option<&str>,
    batch: usize,
    images: &[PathBuf],
) -> Result<()> {
    let opts = decode.options();
    opts.validate()
        .map_err(duet_runtime::CaptionError::InvalidOption)?;
    let bundle = engine.open_bundle(bundle_dir)?;
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
    let prompt = prompt
        .map(|p| captioner.prompt_ids(p))
        .transpose()?
        .unwrap_or_default();
    // One image: its caption is printed as it is decoded.
    let streaming = images.len() == 1;
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
        let decoded = if streaming {
            use std::io::Write;
            print!(
                "{}\t",
                duet_runtime::display::tsv_field(&paths[0].to_string_lossy())
            );
            let mut out = std::io::stdout();
            let mut print = |_: usize, text: &str| {
                // A closed stdout ends the process (SIGPIPE); other write errors surface at
                // the final newline below.
                let _ = write!(out, "{text}").and_then(|()| out.flush());
            };
            let decoded = captioner.decode(&image_tokens, &prompt, &opts, Some(&mut print))?;
            println!();
            decoded
        } else {
            let decoded = captioner.decode(&image_tokens, &prompt, &opts, None)?;
            for (path, d) in paths.iter().zip(&decoded) {
                println!(
                    "{}\t{}",
                    duet_runtime::display::tsv_field(&path.to_string_lossy()),
                    captioner.decode_tokens(&d.ids)?
                );
            }
            decoded
        };
        encode_s += (t1 - t0).as_secs_f64();
        decode_s += t1.elapsed().as_secs_f64();
        // One decoder call per token of the longest text, plus the one that chose EOS.
        decode_steps += decoded
            .iter()
            .map(|d| d.ids.len() + usize::from(d.eos))
            .max()
            .unwrap_or(0);
        for (path, d) in paths.iter().zip(&decoded) {
            tracing::debug!(
                path = %path.display(),
                tokens = d.ids.len(),
                log_prob = d.log_prob,
                eos = d.eos,
                "decoded"
            );
        }
    }
    eprintln!(
        "{} image(s) in batches of {batch}: vision encoder {:.1} ms, decoder ({}) \
         {decode_steps} steps {:.1} ms ({:.2} ms per step)",
        images.len(),
        1e3 * encode_s,
        describe_decoding(&opts),
        1e3 * decode_s,
        1e3 * decode_s / decode_steps.max(1) as f64
    );
    Ok(())
}

/// `duet ask`: one image, one question, the answer printed as it is decoded.
pub(crate) fn ask(
    bundle_dir: &Path,
    engine: &EngineArgs,
    decode: &DecodeArgs,
    image: &Path,
    question: &str,
) -> Result<()> {
    let opts = decode.options();
    opts.validate()
        .map_err(duet_runtime::CaptionError::InvalidOption)?;
    let bundle = engine.open_bundle(bundle_dir)?;
    if bundle.manifest().questions.is_none() {
        return Err(duet_runtime::CaptionError::NoQuestions.into());
    }
    let img = preprocess::load_image_for(image, &bundle.manifest().image)?;
    let captioner = Captioner::new(&bundle, engine.provider, &engine.options())
        .context("loading the captioning graphs")?;
    for report in captioner.reports() {
        eprintln!("{report}");
    }
    let t0 = Instant::now();
    let mut out = std::io::stdout();
    let mut print = |_: usize, text: &str| {
        use std::io::Write;
        let _ = write!(out, "{text}").and_then(|()| out.flush());
    };
    captioner.answer_images(
        std::slice::from_ref(&img),
        question,
        &opts,
        Some(&mut print),
    )?;
    println!();
    eprintln!(
        "answered in {:.1} ms ({})",
        1e3 * t0.elapsed().as_secs_f64(),
        describe_decoding(&opts)
    );
    Ok(())
}

fn describe_decoding(opts: &duet_runtime::DecodeOptions) -> String {
    use duet_runtime::Decoding;
    match opts.decoding {
        Decoding::Greedy => "greedy".into(),
        Decoding::Beam { width } => format!("beam {width}"),
        Decoding::Sample(s) => format!(
            "sampling, temperature {}{}{}, seed {}",
            s.temperature,
            s.top_k.map(|k| format!(", top-k {k}")).unwrap_or_default(),
            s.top_p.map(|p| format!(", top-p {p}")).unwrap_or_default(),
            s.seed
        ),
    }
}

/// Prints which modality was restored (and its trust), the class and the runner-up classes.
pub(crate) fn classify(
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
    let bundle = engine.open_bundle(bundle_dir)?;
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

pub(crate) fn embed(
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
    let bundle = engine.open_bundle(bundle_dir)?;
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
pub(crate) fn write_file_atomic(out: &Path, bytes: &[u8]) -> Result<()> {
    duet_fsio::write_atomic(out, bytes).with_context(|| format!("writing {}", out.display()))
}

/// The directory `out` will be written in must exist: checked before any work, so a typo costs
/// nothing.
pub(crate) fn check_out_dir(out: &Path) -> Result<()> {
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
pub(crate) fn sampler_of(sampler: SamplerArg, eta: Option<f32>) -> Result<Sampler> {
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

pub(crate) struct GenerateArgs {
    pub(crate) steps: Option<usize>,
    pub(crate) sampler: Sampler,
    pub(crate) guidance: Option<f32>,
    pub(crate) seed: u64,
    pub(crate) count: usize,
    pub(crate) scale: u32,
    pub(crate) condition: Condition,
}

/// `--out` must name a PNG in an existing directory: said now, not after minutes of sampling.
fn check_png_out(out: &Path) -> Result<()> {
    if out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        != Some("png".into())
    {
        anyhow::bail!("--out {} must end in .png", out.display());
    }
    check_out_dir(out)
}

impl GenerateArgs {
    /// The sampling options: these flags over the bundle's defaults.
    fn options(&self, defaults: &GenerateOptions) -> GenerateOptions {
        GenerateOptions {
            sampler: self.sampler,
            steps: self.steps.unwrap_or(defaults.steps),
            guidance: self.guidance.unwrap_or(defaults.guidance),
            seed: self.seed,
        }
    }
}

/// `duet edit`: the source image and one edit per instruction in a row.
pub(crate) fn edit(
    bundle_dir: &Path,
    engine: &EngineArgs,
    image: &Path,
    instructions: &[String],
    out: &Path,
    args: GenerateArgs,
) -> Result<()> {
    check_png_out(out)?;
    if instructions.len() > duet_runtime::generate::MAX_BATCH {
        anyhow::bail!(
            "{} instructions; at most {} per run",
            instructions.len(),
            duet_runtime::generate::MAX_BATCH
        );
    }
    let bundle = engine.open_bundle(bundle_dir)?;
    let source = preprocess::load_image_for(image, &bundle.manifest().image)
        .with_context(|| format!("reading {}", image.display()))?;
    let dreamer = Dreamer::new(&bundle, engine.provider, &engine.options())
        .context("loading the dream graphs")?;
    for report in dreamer.reports() {
        eprintln!("{report}");
    }
    let opts = args.options(&dreamer.generator().default_options());
    let texts: Vec<&str> = instructions.iter().map(String::as_str).collect();
    let sources = vec![source.clone(); texts.len()];
    let t0 = Instant::now();
    let edits = dreamer.edit_images(&sources, &texts, &opts)?;
    eprintln!(
        "{} edit(s), {:?}, {} steps, guidance {}, seed {}: {:.2} s",
        edits.len(),
        opts.sampler,
        opts.steps,
        opts.guidance,
        opts.seed,
        t0.elapsed().as_secs_f64()
    );
    let mut row = vec![source];
    row.extend(edits);
    let cols = row.len();
    save_png_atomic(&duet_runtime::diffusion::grid(&row, cols, args.scale), out)?;
    println!("{}", out.display());
    Ok(())
}

pub(crate) fn generate(
    bundle_dir: &Path,
    engine: &EngineArgs,
    prompt: &[String],
    out: &Path,
    args: GenerateArgs,
) -> Result<()> {
    check_png_out(out)?;
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
    let bundle = engine.open_bundle(bundle_dir)?;
    let t0;
    let images;
    let opts;
    if args.condition == Condition::Dream {
        let dreamer = Dreamer::new(&bundle, engine.provider, &engine.options())
            .context("loading the dream graphs")?;
        for report in dreamer.reports() {
            eprintln!("{report}");
        }
        opts = args.options(&dreamer.generator().default_options());
        t0 = Instant::now();
        images = dreamer.generate_images(&prompts, &opts)?;
    } else {
        let generator = Generator::new(&bundle, engine.provider, &engine.options())
            .context("loading the generation graphs")?;
        for report in generator.reports() {
            eprintln!("{report}");
        }
        opts = args.options(&generator.default_options());
        t0 = Instant::now();
        images = generator.generate_images(&prompts, &opts)?;
    }
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
pub(crate) fn save_png_atomic(img: &image::RgbImage, out: &Path) -> Result<()> {
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .context("encoding the PNG")?;
    write_file_atomic(out, &png)
}
