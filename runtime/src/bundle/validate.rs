//! The manifest's checks, all before any graph is loaded: resource bounds, the spec's
//! invariants, the tokenizer, every graph's I/O against its contract, and the generation and
//! restoration sections, each all-or-nothing.

use crate::manifest::{Graph, Manifest, Precision};

use super::*;

/// `v` within `1 ..= max`, or the manifest error naming `field`.
pub(super) fn bounded(field: &str, v: usize, max: usize) -> Result<(), BundleError> {
    if v == 0 {
        return Err(bad(field, "must be > 0"));
    }
    if v > max {
        return Err(bad(field, format!("{v} is over the limit of {max}")));
    }
    Ok(())
}

/// The size limits of [`limits`] on the model's dimensions, with checked arithmetic, so that
/// nothing derived from them later (patches, KV cache, logits) can wrap or allocate without end.
pub(super) fn check_bounds(m: &Manifest) -> Result<(), BundleError> {
    use limits::*;
    let s = &m.model;
    bounded("model.image_size", s.image_size, MAX_IMAGE_SIZE)?;
    bounded("model.channels", s.channels, 4)?;
    bounded("model.patch_size", s.patch_size, MAX_IMAGE_SIZE)?;
    bounded("model.d_model", s.d_model, MAX_WIDTH)?;
    bounded("model.n_heads", s.n_heads, MAX_HEADS)?;
    bounded("model.decoder_layers", s.decoder_layers, MAX_LAYERS)?;
    bounded("model.embed_dim", s.embed_dim, MAX_WIDTH)?;
    bounded("model.vocab_size", s.vocab_size, MAX_VOCAB)?;
    bounded("model.max_len", s.max_len, MAX_SEQ_LEN)?;
    bounded("tokenizer.max_len", m.tokenizer.max_len, MAX_SEQ_LEN)?;
    for (field, v) in [
        ("model.vision_layers", s.vision_layers),
        ("model.text_layers", s.text_layers),
        ("model.denoiser_layers", s.denoiser_layers),
    ] {
        if v > MAX_LAYERS {
            return Err(bad(field, format!("{v} is over the limit of {MAX_LAYERS}")));
        }
    }
    for (field, v) in [
        ("model.mlp_ratio", s.mlp_ratio),
        (
            "model.denoiser_mlp_ratio",
            s.denoiser_mlp_ratio.unwrap_or(0),
        ),
    ] {
        if v > MAX_MLP_RATIO {
            return Err(bad(
                field,
                format!("{v} is over the limit of {MAX_MLP_RATIO}"),
            ));
        }
    }
    if s.denoiser_patch_size > MAX_IMAGE_SIZE {
        return Err(bad(
            "model.denoiser_patch_size",
            format!(
                "{} is over the limit of {MAX_IMAGE_SIZE}",
                s.denoiser_patch_size
            ),
        ));
    }
    if m.image.size > MAX_IMAGE_SIZE {
        return Err(bad(
            "image.size",
            format!("{} is over the limit of {MAX_IMAGE_SIZE}", m.image.size),
        ));
    }
    if m.tokenizer.max_len > s.max_len {
        return Err(bad(
            "tokenizer.max_len",
            format!(
                "{} but the decoder's positions stop at model.max_len {}",
                m.tokenizer.max_len, s.max_len
            ),
        ));
    }
    if s.num_patches() > MAX_TOKENS || s.denoiser_tokens() > MAX_TOKENS {
        return Err(bad(
            "model.patch_size",
            format!("more than {MAX_TOKENS} patches per image"),
        ));
    }
    let kv = [2, s.decoder_layers, s.max_len, s.d_model, 4]
        .into_iter()
        .try_fold(1usize, usize::checked_mul);
    if kv.is_none_or(|b| b > MAX_KV_CACHE_BYTES) {
        return Err(bad(
            "model.max_len",
            format!(
                "a KV cache of {} layers × {} tokens × {} wide is over {MAX_KV_CACHE_BYTES} bytes",
                s.decoder_layers, s.max_len, s.d_model
            ),
        ));
    }
    for (field, len) in [
        (
            "diffusion.alphas_cumprod",
            m.diffusion.as_ref().map(|d| d.alphas_cumprod.len()),
        ),
        (
            "restore.alphas_cumprod",
            m.restore.as_ref().map(|r| r.alphas_cumprod.len()),
        ),
    ] {
        if len.is_some_and(|n| n > MAX_TIMESTEPS) {
            return Err(bad(field, format!("more than {MAX_TIMESTEPS} timesteps")));
        }
    }
    if m.restore
        .as_ref()
        .is_some_and(|r| r.classes.len() > MAX_CLASSES)
    {
        return Err(bad(
            "restore.classes",
            format!("more than {MAX_CLASSES} classes"),
        ));
    }
    Ok(())
}

pub(super) fn validate_manifest(m: &Manifest) -> Result<(), BundleError> {
    check_bounds(m)?;
    let s = &m.model;
    // The spec's own invariants (the ones Burn and the exporter checked when it was written).
    s.validate()
        .map_err(|e| bad(format!("model.{}", e.field), e.reason))?;
    if s.channels != 3 {
        return Err(bad(
            "model.channels",
            format!("{} (only RGB, 3, is supported)", s.channels),
        ));
    }
    if m.image.size != s.image_size {
        return Err(bad(
            "image.size",
            format!("{} but model.image_size is {}", m.image.size, s.image_size),
        ));
    }
    if m.image.fit != s.image_fit {
        return Err(bad(
            "image.fit",
            format!("{} but model.image_fit is {}", m.image.fit, s.image_fit),
        ));
    }
    if m.image.channels != s.channels {
        return Err(bad(
            "image.channels",
            format!("{} but model.channels is {}", m.image.channels, s.channels),
        ));
    }
    for (i, sd) in m.image.std.iter().enumerate() {
        if !sd.is_finite() || *sd == 0.0 {
            return Err(bad(
                format!("image.std[{i}]"),
                format!("{sd} (must be finite, non-zero)"),
            ));
        }
    }
    let t = &m.tokenizer;
    if !m.files.contains_key(&t.file) {
        return Err(bad(
            "tokenizer.file",
            format!("`{}` is not listed in `files`", t.file),
        ));
    }
    for (field, id) in [
        ("tokenizer.pad_id", t.pad_id),
        ("tokenizer.bos_id", t.bos_id),
        ("tokenizer.eos_id", t.eos_id),
        ("tokenizer.unk_id", t.unk_id),
    ] {
        if id as usize >= s.vocab_size {
            return Err(bad(
                field,
                format!("{id} >= model.vocab_size {}", s.vocab_size),
            ));
        }
    }
    if t.max_len < 2 {
        return Err(bad("tokenizer.max_len", "must be >= 2 (BOS and EOS)"));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut files_seen = std::collections::BTreeSet::from([t.file.as_str()]);
    for g in &m.graphs {
        if !seen.insert(g.name) {
            return Err(bad(
                format!("graphs[{}]", g.name),
                "graph name listed twice",
            ));
        }
        // One file per role: a file named by two graphs (or by a graph and the tokenizer)
        // would load the same bytes as two different things.
        if !files_seen.insert(g.file.as_str()) {
            return Err(bad(
                format!("graphs[{}].file", g.name),
                format!(
                    "`{}` is already the file of another graph or the tokenizer",
                    g.file
                ),
            ));
        }
        if !m.files.contains_key(&g.file) {
            return Err(bad(
                format!("graphs[{}].file", g.name),
                format!("`{}` is not listed in `files`", g.file),
            ));
        }
    }
    for graph in [Graph::VisionEncoder, Graph::CaptionDecoder] {
        let g = m
            .graph(graph)
            .ok_or_else(|| bad("graphs", format!("required graph `{graph}` is missing")))?;
        check_io(g, &contract(graph, m))?;
    }
    validate_generation(m)?;
    validate_restoration(m)?;
    validate_variants(m, files_seen)
}

/// Each variant: a compressed precision (not fp32), listed once, giving a file for exactly the
/// bundle's graphs, each file listed in `files` and used by nothing else (a variant file that
/// is also the fp32 graph, or another variant's, would load one set of bytes as two things).
fn validate_variants<'m>(
    m: &'m Manifest,
    mut files_seen: std::collections::BTreeSet<&'m str>,
) -> Result<(), BundleError> {
    let mut precisions = std::collections::BTreeSet::new();
    for v in &m.variants {
        let field = format!("variants[{}]", v.precision);
        if v.precision == Precision::Fp32 {
            return Err(bad(field, "fp32 is the bundle's own graphs, not a variant"));
        }
        if !precisions.insert(v.precision) {
            return Err(bad(field, "precision listed twice"));
        }
        for g in &m.graphs {
            if !v.files.contains_key(&g.name) {
                return Err(bad(
                    format!("{field}.files"),
                    format!("no file for graph `{}`", g.name),
                ));
            }
        }
        for (graph, file) in &v.files {
            let field = format!("{field}.files[{graph}]");
            if m.graph(*graph).is_none() {
                return Err(bad(field, "the bundle has no such graph"));
            }
            if !files_seen.insert(file.as_str()) {
                return Err(bad(
                    field,
                    format!("`{file}` is already the file of another graph or the tokenizer"),
                ));
            }
            if !m.files.contains_key(file) {
                return Err(bad(field, format!("`{file}` is not listed in `files`")));
            }
        }
        for (name, value) in &v.metrics {
            if !value.is_finite() {
                return Err(bad(
                    format!("{field}.metrics[{name:?}]"),
                    "not a finite number",
                ));
            }
        }
    }
    Ok(())
}

/// Restoration is optional, but all of it or none: both restorers, the head and the `restore`
/// section; it needs the text encoder for text embeddings.
pub(super) fn validate_restoration(m: &Manifest) -> Result<(), BundleError> {
    let graphs = [Graph::RestorerT2i, Graph::RestorerI2t, Graph::FusionHead].map(|g| m.graph(g));
    let spec = match (&graphs, &m.restore) {
        ([None, None, None], None) => return Ok(()),
        ([Some(_), Some(_), Some(_)], Some(spec)) => spec,
        (g, spec) => {
            let have = |b: bool| if b { "present" } else { "missing" };
            return Err(bad(
                "graphs",
                format!(
                    "restoration is incomplete: `{t2i}` {}, `{i2t}` {}, \
                     `{head}` {}, `restore` section {}",
                    have(g[0].is_some()),
                    have(g[1].is_some()),
                    have(g[2].is_some()),
                    have(spec.is_some()),
                    t2i = Graph::RestorerT2i,
                    i2t = Graph::RestorerI2t,
                    head = Graph::FusionHead,
                ),
            ));
        }
    };
    if m.graph(Graph::TextEncoder).is_none() {
        return Err(bad(
            "graphs",
            format!(
                "restoration needs the `{}` graph for text embeddings",
                Graph::TextEncoder
            ),
        ));
    }
    if spec.classes.len() < 2 {
        return Err(bad("restore.classes", "must name at least 2 classes"));
    }
    // `duet classify` reports a class by name: a blank or repeated name would make two
    // different answers print the same.
    for (k, name) in spec.classes.iter().enumerate() {
        if name.trim().is_empty() {
            return Err(bad(
                "restore.classes",
                format!("class {k} has an empty name"),
            ));
        }
        if spec.classes[..k].contains(name) {
            return Err(bad(
                "restore.classes",
                format!("class name {name:?} repeats"),
            ));
        }
    }
    if spec.task.trim().is_empty() {
        return Err(bad("restore.task", "is empty"));
    }
    duet_diffusion::NoiseSchedule::from_alphas_cumprod(spec.alphas_cumprod.clone())
        .map_err(|e| bad("restore.alphas_cumprod", e.to_string()))?;
    if spec.sampler_steps == 0 || spec.sampler_steps > spec.alphas_cumprod.len() {
        return Err(bad(
            "restore.sampler_steps",
            format!(
                "{} (must be 1 ..= {} training timesteps)",
                spec.sampler_steps,
                spec.alphas_cumprod.len()
            ),
        ));
    }
    for (graph, g) in [Graph::RestorerT2i, Graph::RestorerI2t, Graph::FusionHead]
        .into_iter()
        .zip(graphs)
    {
        if let Some(g) = g {
            check_io(g, &contract(graph, m))?;
        }
    }
    Ok(())
}

/// The generation direction is optional, but all of it or none: both graphs, the diffusion
/// section and the generator's dimensions.
pub(super) fn validate_generation(m: &Manifest) -> Result<(), BundleError> {
    let text = m.graph(Graph::TextEncoder);
    let denoiser = m.graph(Graph::Denoiser);
    let (text, denoiser, spec) = match (text, denoiser, &m.diffusion) {
        (None, None, None) => return Ok(()),
        (Some(t), Some(d), Some(spec)) => (t, d, spec),
        (t, d, spec) => {
            let have = |b: bool| if b { "present" } else { "missing" };
            return Err(bad(
                "graphs",
                format!(
                    "the generation direction is incomplete: `{text}` {}, `{denoiser}` \
                     {}, `diffusion` section {}",
                    have(t.is_some()),
                    have(d.is_some()),
                    have(spec.is_some()),
                    text = Graph::TextEncoder,
                    denoiser = Graph::Denoiser,
                ),
            ));
        }
    };
    let s = &m.model;
    for (field, v) in [
        ("model.text_layers", s.text_layers),
        ("model.denoiser_layers", s.denoiser_layers),
        ("model.denoiser_patch_size", s.denoiser_patch_size),
    ] {
        if v == 0 {
            return Err(bad(field, "must be > 0 in a bundle with a generator"));
        }
    }
    if !s.image_size.is_multiple_of(s.denoiser_patch_size) {
        return Err(bad(
            "model.denoiser_patch_size",
            format!(
                "{} does not divide image_size {}",
                s.denoiser_patch_size, s.image_size
            ),
        ));
    }
    duet_diffusion::NoiseSchedule::from_alphas_cumprod(spec.alphas_cumprod.clone())
        .map_err(|e| bad("diffusion.alphas_cumprod", e.to_string()))?;
    if spec.default_steps == 0 || spec.default_steps > spec.alphas_cumprod.len() {
        return Err(bad(
            "diffusion.default_steps",
            format!(
                "{} (must be 1 ..= {} training timesteps)",
                spec.default_steps,
                spec.alphas_cumprod.len()
            ),
        ));
    }
    if !(spec.default_guidance.is_finite() && spec.default_guidance >= 0.0) {
        return Err(bad(
            "diffusion.default_guidance",
            format!("{} (must be finite and >= 0)", spec.default_guidance),
        ));
    }
    check_io(text, &contract(Graph::TextEncoder, m))?;
    check_io(denoiser, &contract(Graph::Denoiser, m))
}
