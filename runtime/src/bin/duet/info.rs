//! `duet info`: the bundle's manifest and this machine's execution providers.

use super::*;

pub(crate) fn info(bundle_dir: Option<&std::path::Path>, ort_lib: Option<PathBuf>) -> Result<()> {
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

pub(crate) fn print_manifest(m: &Manifest) {
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
    match &m.questions {
        Some(q) => println!(
            "questions: the captioner answers them (`duet ask`; trained on {} question-answer pairs)",
            q.trained_on
        ),
        None => println!("questions: not trained (captions only)"),
    }
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
    if m.graphs.iter().any(|g| g.name == Graph::DreamEncoder) {
        println!(
            "dream queries: {} (`duet generate --condition dream`, `duet edit`: the captioner's \
             decoder conditions the denoiser)",
            s.dream_queries
        );
    }
    if let Some(r) = &m.restore {
        println!(
            "restoration: task {} ({} classes), feature restorers with {:?}-prediction, {} schedule with {} timesteps, {} DDIM steps, step gate {}, trust gate {}",
            r.task,
            r.classes.len(),
            r.prediction,
            r.schedule,
            r.alphas_cumprod.len(),
            r.sampler_steps,
            if r.gating { "on" } else { "off" },
            if r.trust_gate { "on" } else { "off" },
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
    // Precisions (`--precision`): fp32 is the graphs above; each variant with its task metrics.
    let metrics = |ms: &std::collections::BTreeMap<String, f64>| {
        if ms.is_empty() {
            "not measured".to_string()
        } else {
            ms.iter()
                .map(|(k, v)| format!("{k} {:.1} %", 100.0 * v))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    println!("precisions:");
    println!("  fp32: task metrics: {}", metrics(&m.metrics));
    for v in &m.variants {
        println!("  {}: {}", v.precision, v.method);
        println!("    task metrics: {}", metrics(&v.metrics));
        for (g, a) in &v.agreement {
            println!(
                "    {g} ({}): vs fp32 max|Δ| ort {:.3e}, tract {:.3e} (fp32 max |y| {:.3})",
                v.files.get(g).map_or("?", String::as_str),
                a.ort_max_abs_diff,
                a.tract_max_abs_diff,
                a.fp32_max_abs
            );
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
