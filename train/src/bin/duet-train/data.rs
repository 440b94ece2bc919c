//! `duet-train data check DIR`: what training would read from a folder, and every problem in
//! it, before any training starts (training on a captioned folder runs the same check and
//! refuses the folder on its errors).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use duet_datasets::captioned::{check_pairs, FolderReport, ReadOptions};
use duet_datasets::folders::{folder_kind, load_generated, FolderKind};
use duet_datasets::pair_tasks::LabelledFolder;
use duet_datasets::tokenizer::reuse_tokenizer;
use duet_models::{ImageFit, ModelSpec, Preset};
use duet_train::stages::caption::{DEFAULT_IMAGE_FIT, DEFAULT_IMAGE_SIDE};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Check a dataset folder: counts per split, missing, unreadable or undecodable images,
    /// empty or over-long captions, duplicate images (by content) and pairs, image sizes and
    /// aspect ratios, and the words the tokenizer splits or does not know. Exits with status
    /// 1 if training would refuse the folder.
    Check(CheckArgs),
}

#[derive(Args)]
pub struct CheckArgs {
    /// The folder (captions.jsonl and the images it lists).
    pub dir: PathBuf,
    /// Side the images will be fitted to (the run's --image-size; default: that of the
    /// --tokenizer run or bundle, else 32).
    #[arg(long, value_parser = crate::fit::image_side)]
    pub image_size: Option<usize>,
    /// How they will be fitted (the run's --image-fit; default: that of the --tokenizer run
    /// or bundle, else pad).
    #[arg(long)]
    pub image_fit: Option<ImageFit>,
    /// The model's longest caption in tokens, with [BOS] and [EOS] (default: that of the
    /// --tokenizer run or bundle, else the tiny preset's).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// A tokenizer.json to be reused, or a run or bundle folder (e.g. one to fine-tune with
    /// --init-from): its unknown words are listed, and a folder's model gives the image size,
    /// fit and caption length the check uses.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Also check what the fusion and restore stages need: a label on every pair, 2 to 1024
    /// distinct labels, and held-out (val or test) pairs.
    #[arg(long)]
    pub labels: bool,
    /// Words listed per kind (most frequent first).
    #[arg(long, default_value_t = 20)]
    pub show: usize,
}

/// What the images and captions are checked against, resolved from the flags and the
/// --tokenizer folder's model.
struct Target {
    side: usize,
    fit: ImageFit,
    max_len: usize,
    /// Where the defaults came from, when not from the flags.
    from: Option<PathBuf>,
}

pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    let DataCommand::Check(args) = cmd;
    let kind = folder_kind(&args.dir)?;
    if kind != FolderKind::Captioned {
        // Generated datasets are checked line by line as they load.
        let samples = load_generated(&args.dir, kind)?;
        println!(
            "{}: a generated {kind:?} dataset, {} pairs, all readable",
            args.dir.display(),
            samples.len()
        );
        return Ok(());
    }
    let tokenizer = match &args.tokenizer {
        Some(p) => Some(reuse_tokenizer(p)?.tokenizer),
        None => None,
    };
    let model = match &args.tokenizer {
        Some(p) if p.is_dir() => model_of(p)?,
        _ => None,
    };
    let tiny = ModelSpec::preset(Preset::Tiny, 0, DEFAULT_IMAGE_SIDE);
    let target = Target {
        side: args
            .image_size
            .or(model.as_ref().map(|m| m.image_size))
            .unwrap_or(DEFAULT_IMAGE_SIDE),
        fit: args
            .image_fit
            .or(model.as_ref().map(|m| m.image_fit))
            .unwrap_or(DEFAULT_IMAGE_FIT),
        max_len: args
            .max_len
            .or(model.as_ref().map(|m| m.max_len))
            .unwrap_or(tiny.max_len),
        from: model.as_ref().and(args.tokenizer.clone()),
    };
    let opts = ReadOptions {
        split: None,
        // At most MAX_IMAGE_SIZE: the flag is bounded by clap, a model's size by its `validate`.
        side: target.side as u32,
        fit: target.fit,
        max_len: target.max_len,
        tokenizer: tokenizer.as_ref(),
    };
    let (report, pairs) = check_pairs(&args.dir, &opts);
    print!("{}", render(&report, &args, &target));
    if !report.is_ok() {
        std::process::exit(1);
    }
    if args.labels {
        match LabelledFolder::from_pairs(&args.dir, pairs) {
            Ok((folder, examples)) => println!(
                "labels ok: {} classes ({}), {} training and {} held-out pairs",
                folder.classes.len(),
                shown_list(&folder.classes, args.show),
                examples.train.len(),
                examples.test.len()
            ),
            Err(e) => {
                println!("refused for --stage fusion/restore: {e}");
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

/// The model spec of a run (`config.json`) or bundle (`manifest.json`) folder, if it is one.
fn model_of(dir: &Path) -> anyhow::Result<Option<ModelSpec>> {
    #[derive(serde::Deserialize)]
    struct HasModel {
        model: ModelSpec,
    }
    for name in [duet_run::CONFIG_FILE, "manifest.json"] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let cap = duet_fsio::Cap::new(16 << 20, "a run config or bundle manifest");
        let text = duet_fsio::read_capped_text(&path, cap, duet_fsio::Follow::Yes)?;
        let has: HasModel = serde_json::from_str(&text)
            .with_context(|| format!("{}: no model spec in it", path.display()))?;
        has.model.validate().map_err(anyhow::Error::msg)?;
        return Ok(Some(has.model));
    }
    Ok(None)
}

/// The first `show` items, comma-separated, and how many more.
fn shown_list(items: &[String], show: usize) -> String {
    let mut out = items
        .iter()
        .take(show)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > show {
        let _ = write!(out, ", … {} more", items.len() - show);
    }
    out
}

/// The report as people read it.
fn render(r: &FolderReport, args: &CheckArgs, target: &Target) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", r.dir.display());
    let splits: Vec<String> = r
        .per_split
        .iter()
        .map(|(s, n)| format!("{s} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "  pairs {} ({}; split {}), images {}, labels {}",
        r.pairs,
        splits.join(", "),
        if r.split_given {
            "as the lines say"
        } else {
            "by seed 0, 10% of the images to val"
        },
        r.images,
        r.labels
    );
    if let (Some(lo), Some(hi), Some((alo, ahi))) = (r.min_size, r.max_size, r.aspect_range) {
        let _ = writeln!(
            out,
            "  image sizes {}x{} to {}x{}, aspect (w/h) {alo:.2} to {ahi:.2}, {} not square; \
             fitted to {}x{} by {}",
            lo.0, lo.1, hi.0, hi.1, r.non_square, target.side, target.side, target.fit
        );
    }
    let _ = writeln!(
        out,
        "  captions: {} distinct words, longest {} tokens with [BOS]/[EOS] (max_len {})",
        r.words.len(),
        r.longest_caption,
        target.max_len
    );
    if let Some(from) = &target.from {
        let _ = writeln!(
            out,
            "  image size, fit and max_len of the model in {}",
            from.display()
        );
    }
    let mut words = |title: &str, map: &std::collections::BTreeMap<String, usize>| {
        if map.is_empty() {
            return;
        }
        let mut v: Vec<_> = map.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let shown: Vec<String> = v
            .iter()
            .take(args.show)
            .map(|(w, n)| format!("{w} ({n})"))
            .collect();
        let more = v.len().saturating_sub(args.show);
        let _ = writeln!(
            out,
            "  {title} {}: {}{}",
            v.len(),
            shown.join(", "),
            if more > 0 {
                format!(", … {more} more")
            } else {
                String::new()
            }
        );
    };
    words(
        "words joined to punctuation (the tokenizer splits them)",
        &r.split_words,
    );
    if args.tokenizer.is_some() {
        words(
            "words the tokenizer does not know (they train as [UNK])",
            &r.unknown_words,
        );
    }
    let errors = r.errors().count();
    let warnings = r.warnings().count();
    for p in r.warnings().take(args.show) {
        let _ = writeln!(out, "  warning: {p}");
    }
    if warnings > args.show {
        let _ = writeln!(out, "  … {} more warnings", warnings - args.show);
    }
    if errors == 0 {
        let _ = writeln!(out, "ok: {warnings} warning(s), no errors");
    } else {
        let _ = writeln!(
            out,
            "refused: {errors} error(s) that training would stop on, {warnings} warning(s):\n{}",
            r.error_summary()
        );
    }
    out
}
