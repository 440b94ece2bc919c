//! `duet-edge BUNDLE IMAGE...`: the smallest useful duet program for a device. It opens and
//! verifies a bundle, loads both graphs on tract (pure Rust, no shared libraries) and prints one
//! caption per image. Copy it as the starting point of an embedded integration.

use std::path::PathBuf;

use anyhow::{bail, Context};
use duet_runtime::engine::{EngineOptions, Provider, ProviderChoice};
use duet_runtime::{preprocess, Bundle, Captioner};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let Some(bundle_dir) = args.next() else {
        bail!("usage: duet-edge BUNDLE IMAGE...");
    };
    let images: Vec<PathBuf> = args.collect();
    if images.is_empty() {
        bail!("usage: duet-edge BUNDLE IMAGE... (no images given)");
    }
    let bundle = Bundle::open(&bundle_dir)
        .with_context(|| format!("opening bundle {}", bundle_dir.display()))?;
    let captioner = Captioner::new(
        &bundle,
        ProviderChoice::Only(Provider::Tract),
        &EngineOptions::default(),
    )?;
    for path in &images {
        let img = preprocess::load_image(path)?;
        let caption = captioner
            .caption_images(std::slice::from_ref(&img))?
            .pop()
            .unwrap_or_default();
        println!("{}\t{caption}", path.display());
    }
    Ok(())
}
