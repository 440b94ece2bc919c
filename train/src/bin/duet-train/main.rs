//! `duet-train`: dataset generation (ShapeWorld, Emoji-CLDR) here; the training stages in
//! `fit.rs` and the evaluations in `eval.rs`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use duet_datasets::emoji::{write_emoji_dataset, ArtStyle, EmojiOptions, EmojiSource};
use duet_datasets::shapeworld::{folder_captions, write_dataset_with, DatasetExtras, SceneConfig};
use duet_train::backend::DeviceKind;

mod data;
mod eval;
mod fit;

#[derive(Parser)]
#[command(name = "duet-train", version, about = "Train duet models with Burn")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a ShapeWorld dataset (PNG images, captions.jsonl, scenes.jsonl).
    Shapeworld {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 5000)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Image side in pixels (32 or 64).
        #[arg(long, default_value_t = 32)]
        size: u32,
        #[arg(long, default_value_t = 1)]
        min_objects: usize,
        #[arg(long, default_value_t = 4)]
        max_objects: usize,
        /// Questions per scene with exact answers, written to questions.jsonl (VQA: a caption
        /// run on the folder trains on them beside the captions).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=16))]
        questions: u8,
        /// Instruction edits per scene with the exact target scene, written to edits.jsonl
        /// (a dream run on the folder learns to draw them).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=8))]
        edits: u8,
        /// Keep this folder apart from another (its training folder): no scene of DIR occurs
        /// here, so no (question, scene) pair does either.
        #[arg(long, value_name = "DIR")]
        held_out_from: Option<PathBuf>,
    },
    /// Build the Emoji-CLDR dataset (real emoji art + CLDR English names) from the sources
    /// `scripts/fetch-emoji.sh` fetched: train/val/test split by base emoji.
    Emoji {
        #[arg(long)]
        out: PathBuf,
        /// Image side in pixels (32 or 64).
        #[arg(long, default_value_t = 32)]
        size: u32,
        /// Art set: google (Noto, Apache-2.0) or twitter (Twemoji, CC-BY-4.0).
        #[arg(long, default_value = "google")]
        style: ArtStyle,
        /// The folder scripts/fetch-emoji.sh filled.
        #[arg(long, default_value = ".data/emoji-src")]
        source: PathBuf,
        /// Seed of the train/val/test split.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
        #[arg(long, default_value_t = 0.1)]
        test_fraction: f64,
        /// Keep only the first N base emoji in Unicode's order (with all their skin tones).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Dataset folders: `data check DIR` before training on your own pairs.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Train a stage.
    Fit(Box<fit::FitCommand>),
    /// Evaluate a trained run on a dataset.
    Eval(eval::EvalCommand),
    /// Grow a caption or generate run's vocabulary by the words of new training folders it
    /// does not know (captions, questions and answers, edit instructions): a new run whose
    /// tokenizer keeps every old id and whose embeddings and output layer have a row per new
    /// word, to fine-tune from (e.g. a shipped model imported with `duet-export import`).
    ExtendVocab {
        /// The caption or generate run.
        #[arg(long)]
        run: PathBuf,
        /// The folders the fine-tune will train on (repeatable).
        #[arg(long, required = true)]
        data: Vec<PathBuf>,
        /// The new run folder (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the new rows' noise.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn main() -> anyhow::Result<()> {
    duet_train::alloc::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    let cli = Cli::parse();
    if let Command::Fit(fit) = &cli.command {
        // Before the first matrix product and before any thread starts (it sets a variable).
        if fit.device.parse::<DeviceKind>().ok() == Some(DeviceKind::Cpu) {
            // SAFETY: no other thread has started yet (the allocator option, the log
            // subscriber and the argument parser above start none).
            unsafe { duet_train::cpu::single_thread_products_for_peers(fit.devices.unwrap_or(1)) };
            let cores = std::thread::available_parallelism().map_or(1, usize::from);
            if fit.devices.is_none() && fit.peers.is_empty() && cores > 1 {
                tracing::info!(
                    "training as one CPU peer; on this machine's {cores} cores `--devices 2` \
                     trains the same run (up to rounding) 1.5-1.9x faster (docs/TRAINING.md)"
                );
            }
        }
    }
    match cli.command {
        Command::Shapeworld {
            out,
            count,
            seed,
            size,
            min_objects,
            max_objects,
            questions,
            edits,
            held_out_from,
        } => {
            if size != 32 && size != 64 {
                anyhow::bail!("--size must be 32 or 64, got {size}");
            }
            if min_objects < 1 || max_objects > 4 || min_objects > max_objects {
                anyhow::bail!("objects per scene must satisfy 1 <= min <= max <= 4");
            }
            let cfg = SceneConfig {
                image_size: size,
                min_objects,
                max_objects,
            };
            let exclude = held_out_from
                .map(|dir| {
                    folder_captions(&dir)
                        .map(|c| (dir.display().to_string(), c))
                        .with_context(|| format!("reading the scenes of {}", dir.display()))
                })
                .transpose()?;
            let extras = DatasetExtras {
                questions_per_scene: usize::from(questions),
                edits_per_scene: usize::from(edits),
                exclude,
            };
            let summary = write_dataset_with(&out, count, seed, &cfg, &command_line, &extras)
                .with_context(|| format!("writing ShapeWorld to {}", out.display()))?;
            println!("{summary:?}");
        }
        Command::Emoji {
            out,
            size,
            style,
            source,
            seed,
            val_fraction,
            test_fraction,
            limit,
        } => {
            let opts = EmojiOptions {
                style,
                size,
                seed,
                val_fraction,
                test_fraction,
                limit,
            };
            let summary =
                write_emoji_dataset(&EmojiSource::new(&source), &out, &opts, &command_line)
                    .with_context(|| format!("writing Emoji-CLDR to {}", out.display()))?;
            println!(
                "Emoji-CLDR ({style}, {size} px) in {}: {} train / {} val / {} test pairs \
                 ({} / {} / {} base emoji); art: {}",
                out.display(),
                summary.counts["train"],
                summary.counts["val"],
                summary.counts["test"],
                summary.base_counts["train"],
                summary.base_counts["val"],
                summary.base_counts["test"],
                summary.licence
            );
        }
        Command::Data(cmd) => data::run(cmd)?,
        Command::Fit(cmd) => fit::run(*cmd, command_line)?,
        Command::Eval(cmd) => eval::run(cmd, command_line)?,
        Command::ExtendVocab {
            run,
            data,
            out,
            seed,
        } => {
            let report = duet_train::vocab::extend_run(&run, &data, &out, seed, &command_line)?;
            let shown: Vec<String> = report
                .added
                .iter()
                .take(20)
                .map(|(w, n)| format!("{w} ({n})"))
                .collect();
            println!(
                "{} ({} run) → {}: {} words added (vocabulary {}), {} tables grown; {}{}",
                run.display(),
                report.stage,
                report.out.display(),
                report.added.len(),
                report.vocab_size,
                report.grown.len(),
                shown.join(", "),
                if report.added.len() > 20 { ", …" } else { "" }
            );
        }
    }
    Ok(())
}
