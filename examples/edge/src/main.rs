//! `duet-edge`: the smallest useful duet program for a device. It opens and verifies a bundle,
//! loads its graphs on tract (pure Rust: no shared libraries, no onnxruntime) and
//!
//! - `duet-edge caption BUNDLE IMAGE...` prints one caption per image (`PATH<TAB>CAPTION`);
//! - `duet-edge generate BUNDLE OUT.png PROMPT [STEPS [SEED]]` draws the prompt into a PNG
//!   (the bundle's default steps and seed 0 when not given).
//!
//! Copy it as the starting point of an embedded integration. Arguments are parsed by hand
//! rather than with clap to keep the binary as small as the runtime allows.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use duet_runtime::engine::{EngineOptions, Provider, ProviderChoice};
use duet_runtime::{preprocess, Bundle, Captioner, Generator};

const USAGE: &str = "usage: duet-edge caption BUNDLE IMAGE...\n       duet-edge generate BUNDLE OUT.png PROMPT [STEPS [SEED]]";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(command), Some(bundle_dir)) = (args.first(), args.get(1)) else {
        bail!("{USAGE}");
    };
    let rest = &args[2..];
    let bundle =
        Bundle::open(bundle_dir).with_context(|| format!("opening bundle {bundle_dir}"))?;
    let tract = ProviderChoice::Only(Provider::Tract);
    let options = EngineOptions::default();
    match command.as_str() {
        "caption" => {
            if rest.is_empty() {
                bail!("no images given\n{USAGE}");
            }
            let captioner = Captioner::new(&bundle, tract, &options)?;
            for path in rest {
                let started = Instant::now();
                let img = preprocess::load_image(path)?;
                let caption = captioner
                    .caption_images(std::slice::from_ref(&img))?
                    .pop()
                    .unwrap_or_default();
                println!("{path}\t{caption}");
                eprintln!("{path}: {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
            }
        }
        "generate" => {
            let (Some(out), Some(prompt)) = (rest.first(), rest.get(1)) else {
                bail!("{USAGE}");
            };
            let generator = Generator::new(&bundle, tract, &options)?;
            let mut opts = generator.default_options();
            if let Some(steps) = rest.get(2) {
                opts.steps = steps
                    .parse()
                    .with_context(|| format!("STEPS `{steps}` is not a number"))?;
            }
            if let Some(seed) = rest.get(3) {
                opts.seed = seed
                    .parse()
                    .with_context(|| format!("SEED `{seed}` is not a number"))?;
            }
            let started = Instant::now();
            let image = generator
                .generate_images(&[prompt.as_str()], &opts)?
                .pop()
                .context("no image was produced")?;
            let out = PathBuf::from(out);
            image
                .save(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", out.display());
            eprintln!(
                "{} steps in {:.1} ms",
                opts.steps,
                started.elapsed().as_secs_f64() * 1e3
            );
        }
        other => bail!("unknown command `{other}`\n{USAGE}"),
    }
    Ok(())
}
