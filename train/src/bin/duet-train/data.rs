//! `duet-train data check DIR`: what training would read from a folder, and every problem in
//! it, before any training starts (training on a captioned folder runs the same check and
//! refuses the folder on its errors).

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use duet_datasets::captioned::{check_folder, FolderReport, ReadOptions, Split};
use duet_datasets::folders::{folder_kind, load_generated, FolderKind};
use duet_datasets::tokenizer::load_tokenizer;
use duet_models::ImageFit;

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
    /// Side the images will be fitted to (the run's --image-size).
    #[arg(long, default_value_t = 32)]
    pub image_size: u32,
    /// How they will be fitted (the run's --image-fit).
    #[arg(long, default_value = "pad")]
    pub image_fit: ImageFit,
    /// The model's longest caption in tokens, with [BOS] and [EOS].
    #[arg(long, default_value_t = 48)]
    pub max_len: usize,
    /// A tokenizer.json to be reused (or a run or bundle folder holding one): its unknown
    /// words are listed.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Words listed per kind (most frequent first).
    #[arg(long, default_value_t = 20)]
    pub show: usize,
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
        Some(p) if p.is_dir() => Some(load_tokenizer(&p.join(duet_run::TOKENIZER_FILE))?),
        Some(p) => Some(load_tokenizer(p)?),
        None => None,
    };
    let opts = ReadOptions {
        split: Some(Split::Train),
        side: args.image_size,
        fit: args.image_fit,
        max_len: args.max_len,
        tokenizer: tokenizer.as_ref(),
    };
    let (report, _) = check_folder(&args.dir, &opts);
    print!("{}", render(&report, &args));
    if !report.is_ok() {
        std::process::exit(1);
    }
    Ok(())
}

/// The report as people read it.
fn render(r: &FolderReport, args: &CheckArgs) -> String {
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
            lo.0, lo.1, hi.0, hi.1, r.non_square, args.image_size, args.image_size, args.image_fit
        );
    }
    let _ = writeln!(
        out,
        "  captions: {} distinct words, longest {} tokens with [BOS]/[EOS] (max_len {})",
        r.words.len(),
        r.longest_caption,
        args.max_len
    );
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
