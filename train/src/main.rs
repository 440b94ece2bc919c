//! `duet-train`: ShapeWorld data generation, training stages and evaluation.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use duet_diffusion::{Sampler, SamplerConfig};
use duet_models::Preset;
use duet_train::backend::DeviceKind;
use duet_train::caption_stage::FitArgs;
use duet_train::checkpoint::write_json;
use duet_train::cpu;
use duet_train::datasets::{folder_kind, FolderKind};
use duet_train::emoji::{write_emoji_dataset, ArtStyle, EmojiOptions, EmojiSource};
use duet_train::emoji_eval::RetrievalOptions;
use duet_train::eval::GenerateEvalOptions;
use duet_train::fsutil::write_png;
use duet_train::generate_stage::DenoiserOptions;
use duet_train::generate_stage::{GenerateFitArgs, GenerateOutcome};
use duet_train::pair_tasks::PairTask;
use duet_train::restore_eval::RestoreEvalOptions;
use duet_train::restore_stage::PairFitArgs;
use duet_train::shapeworld::{write_dataset, SceneConfig};
use duet_train::stage::{Evaluation, Stage};
use duet_train::unify_stage::{
    ReconstructionSettings, Stage2Captions, UnifyFitArgs, UnifyOutcome, STAGE1_DIR, STAGE2_DIR,
};

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
    /// Train a stage.
    Fit {
        #[arg(long, value_enum, default_value_t = Stage::Caption)]
        stage: Stage,
        /// `--stage caption`: model size (default tiny); later stages take it from --init.
        #[arg(long)]
        preset: Option<Preset>,
        /// Training data (caption, generate, unify; fusion and restore draw their own examples
        /// of --task): a ShapeWorld folder or an Emoji-CLDR split (DIR/train); repeat the flag
        /// to train on several, e.g. `--data data/train --data data/emoji/train`.
        #[arg(long)]
        data: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        steps: Option<usize>,
        #[arg(long)]
        batch_size: Option<usize>,
        #[arg(long)]
        lr: Option<f64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Continue from the last checkpoint in --out.
        #[arg(long)]
        resume: bool,
        /// `--stage generate`: the trained caption run to start from (its vision encoder is
        /// frozen and its tokenizer reused). `--stage unify`: the trained generate run.
        #[arg(long)]
        init: Option<PathBuf>,
        /// `--stage unify`: captions sampled per image in a GRPO group (stage 1). There
        /// `--steps`, `--batch-size` (images per step) and `--lr` are stage 1's.
        #[arg(long)]
        group: Option<usize>,
        /// `--stage unify`: sampling temperature of stage 1's captions (default 1). A
        /// confident captioner needs more to sample differing captions within a group.
        #[arg(long)]
        temperature: Option<f64>,
        /// `--stage unify`: generator fine-tune steps (stage 2).
        #[arg(long)]
        gen_steps: Option<usize>,
        /// `--stage unify`: peak learning rate of stage 2.
        #[arg(long)]
        gen_lr: Option<f64>,
        /// `--stage unify`: captions stage 2 trains on: the captioner's own (the loop) or the
        /// dataset's (the same-budget control).
        #[arg(long, value_enum)]
        captions: Option<Stage2Captions>,
        /// `--stage fusion`: the two-modality task (colour-column or shape-count).
        #[arg(long)]
        task: Option<PairTask>,
        /// `--stage generate`: weight each sample's diffusion loss by Min-SNR-γ (Hang et al.
        /// 2023; γ = 5 there) instead of uniformly. Off by default.
        #[arg(long)]
        min_snr_gamma: Option<f64>,
        /// `--stage generate`: U-ViT long skip connections in the denoiser.
        #[arg(long)]
        long_skips: bool,
        /// `--stage generate`: a convolutional output head of this many channels in the
        /// denoiser (a 3×3 convolution across patch borders).
        #[arg(long)]
        conv_head: Option<usize>,
    },
    /// Evaluate a trained run on a dataset.
    Eval {
        #[arg(long, value_enum, default_value_t = Evaluation::Caption)]
        stage: Evaluation,
        #[arg(long)]
        run: PathBuf,
        /// Held-out dataset: a ShapeWorld folder or an Emoji-CLDR split (caption), an
        /// Emoji-CLDR split (retrieval), a ShapeWorld folder (reconstruct); generate scores its
        /// own seeded prompt set.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Evaluate only the first N samples (caption, reconstruct, retrieval).
        #[arg(long)]
        limit: Option<usize>,
        /// Prompts per GenEval category (generate).
        #[arg(long, default_value_t = 20)]
        per_category: usize,
        /// Sampling steps (generate, retrieval; reconstruct uses DDIM with eta 0).
        #[arg(long, default_value_t = 50)]
        steps: usize,
        /// Sampler: ddim or dpmpp (generate, retrieval).
        #[arg(long, default_value = "ddim")]
        sampler: String,
        /// DDIM eta (generate, retrieval; ddim only).
        #[arg(long, default_value_t = 0.0)]
        eta: f32,
        /// Classifier-free guidance scale (generate, retrieval).
        #[arg(long, default_value_t = 3.0)]
        guidance: f32,
        /// Noise seed (generate, retrieval); the prompt set uses seed 0 so runs compare on the same prompts.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Score the untrained generator (the baseline) instead (generate).
        #[arg(long)]
        untrained: bool,
    },
}

/// The stage-specific flags of `fit` each stage reads (the common ones — --out, --device,
/// --steps, --batch-size, --lr, --seed — apply to all). A flag given to a stage that does not
/// read it is an error rather than silently ignored: `--stage caption --init RUN` would
/// otherwise train from scratch without a word.
fn stage_flags(stage: Stage) -> &'static [&'static str] {
    match stage {
        Stage::Caption => &["--preset", "--data", "--resume"],
        Stage::Generate => &[
            "--data",
            "--resume",
            "--init",
            "--min-snr-gamma",
            "--long-skips",
            "--conv-head",
        ],
        Stage::Unify => &[
            "--data",
            "--init",
            "--group",
            "--temperature",
            "--gen-steps",
            "--gen-lr",
            "--captions",
        ],
        Stage::Fusion | Stage::Restore => &["--init", "--task"],
    }
}

fn check_fit_flags(stage: Stage, given: &[(&str, bool)]) -> anyhow::Result<()> {
    let reads = stage_flags(stage);
    let ignored: Vec<&str> = given
        .iter()
        .filter(|(flag, set)| *set && !reads.contains(flag))
        .map(|(flag, _)| *flag)
        .collect();
    if !ignored.is_empty() {
        anyhow::bail!(
            "--stage {stage} does not use {} (it reads {} besides the common flags)",
            ignored.join(", "),
            reads.join(", ")
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    match Cli::parse().command {
        Command::Shapeworld {
            out,
            count,
            seed,
            size,
            min_objects,
            max_objects,
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
            let summary = write_dataset(&out, count, seed, &cfg, &command_line)
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
        Command::Fit {
            stage,
            preset,
            data,
            out,
            device,
            steps,
            batch_size,
            lr,
            seed,
            resume,
            init,
            group,
            temperature,
            gen_steps,
            gen_lr,
            min_snr_gamma,
            long_skips,
            conv_head,
            captions,
            task,
        } => {
            check_fit_flags(
                stage,
                &[
                    ("--preset", preset.is_some()),
                    ("--data", !data.is_empty()),
                    ("--resume", resume),
                    ("--init", init.is_some()),
                    ("--group", group.is_some()),
                    ("--temperature", temperature.is_some()),
                    ("--gen-steps", gen_steps.is_some()),
                    ("--gen-lr", gen_lr.is_some()),
                    ("--captions", captions.is_some()),
                    ("--task", task.is_some()),
                    ("--min-snr-gamma", min_snr_gamma.is_some()),
                    ("--long-skips", long_skips),
                    ("--conv-head", conv_head.is_some()),
                ],
            )?;
            let preset = preset.unwrap_or(Preset::Tiny);
            let kind: DeviceKind = device.parse()?;
            // Every stage but the restoration pair trains on --data.
            let need_data = || -> anyhow::Result<()> {
                if data.is_empty() {
                    anyhow::bail!("--stage {stage} needs --data <dataset> (repeat it for several)");
                }
                Ok(())
            };
            match stage {
                Stage::Fusion | Stage::Restore => {
                    let args = PairFitArgs {
                        init: init.with_context(|| {
                            format!(
                                "--stage {stage} needs --init <{}>",
                                if stage == Stage::Fusion {
                                    "generate run"
                                } else {
                                    "fusion run"
                                }
                            )
                        })?,
                        out: out.clone(),
                        task,
                        train_examples: None,
                        test_examples: None,
                        steps,
                        batch_size,
                        lr,
                        seed,
                        settings: None,
                        device: kind.to_string(),
                        command: command_line,
                        quiet: false,
                    };
                    let outcome = match (kind, stage == Stage::Fusion) {
                        (DeviceKind::Cpu, true) => cpu::fit_fusion(&args)?,
                        (DeviceKind::Cpu, false) => cpu::fit_restore(&args)?,
                        (DeviceKind::Cuda, _) => anyhow::bail!(
                        "--stage {stage} trains small MLPs on cached embeddings; use --device cpu"
                    ),
                    };
                    println!(
                        "{stage}: held-out accuracy on complete pairs {:.4}, final loss {:.4}, \
                     {:.1}s; run in {}",
                        outcome.complete_accuracy,
                        outcome.final_loss,
                        outcome.seconds,
                        out.display()
                    );
                }
                Stage::Unify => {
                    need_data()?;
                    if resume {
                        anyhow::bail!(
                            "unify runs do not resume; start them again (they are short)"
                        );
                    }
                    let args = UnifyFitArgs {
                        init: init.context("--stage unify needs --init <generate run>")?,
                        data,
                        out: out.clone(),
                        understand_steps: steps,
                        understand_images: batch_size,
                        understand_lr: lr,
                        group,
                        temperature,
                        generate_steps: gen_steps,
                        generate_lr: gen_lr,
                        captions,
                        seed,
                        device: kind.to_string(),
                        command: command_line,
                        quiet: false,
                    };
                    let outcome = match kind {
                        DeviceKind::Cpu => cpu::fit_unify(&args)?,
                        DeviceKind::Cuda => fit_unify_cuda(&args)?,
                    };
                    if outcome.grpo_steps > 0 {
                        println!(
                        "stage 1: {} GRPO steps, reward {:.4} -> {:.4} (means of the first/last \
                         min(10, steps/2) steps), KL {:.2e}, informative groups {:.0}%",
                        outcome.grpo_steps,
                        outcome.reward_start,
                        outcome.reward_end,
                        outcome.final_kl,
                        100.0 * outcome.informative_groups
                    );
                    }
                    println!(
                    "stage 2: diffusion loss {:.4}; {:.1}s in all; runs in {}/{{{STAGE1_DIR},{STAGE2_DIR}}}",
                    outcome.final_diffusion_loss,
                    outcome.seconds,
                    out.display()
                );
                }
                Stage::Generate => {
                    need_data()?;
                    let init = init.context("--stage generate needs --init <caption run>")?;
                    let args = GenerateFitArgs {
                        init,
                        data,
                        out: out.clone(),
                        steps,
                        batch_size,
                        lr,
                        min_snr_gamma,
                        denoiser: DenoiserOptions {
                            long_skips,
                            conv_head,
                        },
                        seed,
                        resume,
                        device: kind.to_string(),
                        command: command_line,
                        quiet: false,
                    };
                    let outcome = match kind {
                        DeviceKind::Cpu => cpu::fit_generate(&args)?,
                        DeviceKind::Cuda => fit_generate_cuda(&args)?,
                    };
                    println!(
                        "trained {} steps in {:.1}s, final diffusion loss {:.4}; run in {}",
                        outcome.steps_done,
                        outcome.seconds,
                        outcome.final_diffusion_loss,
                        out.display()
                    );
                }
                Stage::Caption => {
                    need_data()?;
                    let args = FitArgs {
                        preset,
                        data,
                        out: out.clone(),
                        steps,
                        batch_size,
                        lr,
                        seed,
                        resume,
                        device: kind.to_string(),
                        command: command_line,
                        quiet: false,
                    };
                    let outcome = match kind {
                        DeviceKind::Cpu => cpu::fit_caption(&args)?,
                        DeviceKind::Cuda => fit_cuda(&args)?,
                    };
                    println!(
                        "trained {} steps in {:.1}s, final loss {:.4}; run in {}",
                        outcome.steps_done,
                        outcome.seconds,
                        outcome.final_loss,
                        out.display()
                    );
                }
            }
        }
        Command::Eval {
            stage,
            run,
            data,
            limit,
            per_category,
            steps,
            sampler,
            eta,
            guidance,
            seed,
            untrained,
        } => {
            match stage {
                Evaluation::Restore => {
                    let opts = RestoreEvalOptions { seed, limit };
                    let report = cpu::eval_restore(&run, &opts)?;
                    println!("{report}");
                    let plot_path = run.join("restore_eval.png");
                    write_png(&plot_path, &report.plot())
                        .with_context(|| format!("writing {}", plot_path.display()))?;
                    println!("plot in {}", plot_path.display());
                    write_json(
                        &run.join("restore_eval.json"),
                        &serde_json::json!({"report": report, "seed": seed, "command": command_line}),
                    )?;
                }
                Evaluation::Reconstruct => {
                    let data = data.context("--data is required for --stage reconstruct")?;
                    let settings = ReconstructionSettings {
                        steps,
                        guidance,
                        ..Default::default()
                    };
                    let (report, pairs) =
                        cpu::eval_reconstruction(&run, &data, limit, &settings, seed)?;
                    println!("{report}");
                    // Originals on the odd rows, their rebuilds below them.
                    let mut shown = Vec::new();
                    for chunk in pairs.chunks(8) {
                        shown.extend(chunk.iter().map(|(o, _)| o.clone()));
                        shown.extend(chunk.iter().map(|(_, r)| r.clone()));
                    }
                    let grid_path = run.join("reconstruct.png");
                    write_png(&grid_path, &duet_diffusion::grid(&shown, 8, 4))
                        .with_context(|| format!("writing {}", grid_path.display()))?;
                    println!("originals and rebuilds in {}", grid_path.display());
                    write_json(
                        &run.join("reconstruct.json"),
                        &serde_json::json!({
                            "data": data, "report": report, "steps": steps, "guidance": guidance,
                            "seed": seed, "command": command_line,
                        }),
                    )?;
                }
                Evaluation::Generate => {
                    let sampler = parse_sampler(&sampler, eta)?;
                    let opts = GenerateEvalOptions {
                        per_category,
                        prompt_seed: 0,
                        seed,
                        sampler: SamplerConfig {
                            sampler,
                            steps,
                            clip_x0: true,
                        },
                        guidance,
                        untrained,
                        batch: 64,
                    };
                    let (report, images) = cpu::eval_generate(&run, &opts)?;
                    println!("{report}");
                    let tag = if untrained {
                        "geneval-untrained"
                    } else {
                        "geneval"
                    };
                    let grid_path = run.join(format!("{tag}.png"));
                    // One row per category, the first 8 prompts of each.
                    let shown: Vec<_> = images
                        .chunks(per_category.max(1))
                        .flat_map(|c| c.iter().take(8).cloned())
                        .collect();
                    write_png(&grid_path, &duet_diffusion::grid(&shown, 8, 4))
                        .with_context(|| format!("writing {}", grid_path.display()))?;
                    println!("grid (one row per category) in {}", grid_path.display());
                    write_json(
                        &run.join(format!("{tag}.json")),
                        &serde_json::json!({
                            "report": report, "overall": report.overall(),
                            "per_category": per_category, "steps": steps, "sampler": format!("{sampler:?}"),
                            "guidance": guidance, "seed": seed, "command": command_line,
                        }),
                    )?;
                }
                Evaluation::Retrieval => {
                    let data = data.context(
                        "--data is required for --stage retrieval (an Emoji-CLDR split, e.g. \
                     data/emoji/test)",
                    )?;
                    let sampler = parse_sampler(&sampler, eta)?;
                    let opts = RetrievalOptions {
                        sampler: SamplerConfig {
                            sampler,
                            steps,
                            clip_x0: true,
                        },
                        guidance,
                        seed,
                        batch: 64,
                    };
                    let (report, pairs) = cpu::eval_emoji_retrieval(&run, &data, limit, &opts)?;
                    println!("{report}");
                    // Real emoji on the odd rows, the images generated from their names below.
                    let mut shown = Vec::new();
                    for chunk in pairs.chunks(8).take(4) {
                        shown.extend(chunk.iter().map(|(real, _)| real.clone()));
                        shown.extend(chunk.iter().map(|(_, generated)| generated.clone()));
                    }
                    let grid_path = run.join("retrieval.png");
                    write_png(&grid_path, &duet_diffusion::grid(&shown, 8, 4))
                        .with_context(|| format!("writing {}", grid_path.display()))?;
                    println!("real emoji and generations in {}", grid_path.display());
                    write_json(
                        &run.join("retrieval.json"),
                        &serde_json::json!({
                            "data": data, "report": report, "limit": limit, "steps": steps,
                            "sampler": format!("{sampler:?}"), "guidance": guidance, "seed": seed,
                            "command": command_line,
                        }),
                    )?;
                }
                Evaluation::Caption => {
                    let data = data.context("--data is required for --stage caption")?;
                    if folder_kind(&data)? == FolderKind::EmojiSplit {
                        let (report, pairs) = cpu::eval_emoji_captions(&run, &data, limit)?;
                        for (truth, pred) in pairs.iter().take(8) {
                            println!("truth: {truth}\n pred: {pred}");
                        }
                        println!("{report}");
                        write_json(
                            &run.join("eval-emoji.json"),
                            &serde_json::json!({
                                "data": data, "report": report, "limit": limit, "command": command_line,
                                "captions": pairs,
                            }),
                        )?;
                        return Ok(());
                    }
                    let (metrics, examples) = cpu::eval_caption(&run, &data, limit)?;
                    for (truth, pred) in &examples {
                        println!("truth: {truth}\n pred: {pred}");
                    }
                    println!("{metrics}");
                    write_json(
                        &run.join("eval.json"),
                        &serde_json::json!({
                            "data": data, "metrics": metrics, "command": command_line,
                        }),
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// `--sampler` of the generate and retrieval evaluations.
fn parse_sampler(name: &str, eta: f32) -> anyhow::Result<Sampler> {
    match name {
        "ddim" => Ok(Sampler::Ddim { eta }),
        "dpmpp" => Ok(Sampler::DpmSolverPp2M),
        other => anyhow::bail!("unknown sampler '{other}' (ddim or dpmpp)"),
    }
}

#[cfg(feature = "cuda")]
fn fit_cuda(args: &FitArgs) -> anyhow::Result<duet_train::caption_stage::FitOutcome> {
    let device = duet_train::backend::probe_cuda()?;
    duet_train::caption_stage::fit::<duet_train::backend::CudaBackend>(args, &device)
}

#[cfg(feature = "cuda")]
fn fit_generate_cuda(args: &GenerateFitArgs) -> anyhow::Result<GenerateOutcome> {
    let device = duet_train::backend::probe_cuda()?;
    duet_train::generate_stage::fit_generate::<duet_train::backend::CudaBackend>(args, &device)
}

#[cfg(not(feature = "cuda"))]
fn fit_generate_cuda(_args: &GenerateFitArgs) -> anyhow::Result<GenerateOutcome> {
    Err(duet_train::backend::BackendError::CudaNotCompiled.into())
}

#[cfg(feature = "cuda")]
fn fit_unify_cuda(args: &UnifyFitArgs) -> anyhow::Result<UnifyOutcome> {
    let device = duet_train::backend::probe_cuda()?;
    duet_train::unify_stage::fit_unify::<duet_train::backend::CudaBackend>(args, &device)
}

#[cfg(not(feature = "cuda"))]
fn fit_unify_cuda(_args: &UnifyFitArgs) -> anyhow::Result<UnifyOutcome> {
    Err(duet_train::backend::BackendError::CudaNotCompiled.into())
}

#[cfg(not(feature = "cuda"))]
fn fit_cuda(_args: &FitArgs) -> anyhow::Result<duet_train::caption_stage::FitOutcome> {
    Err(duet_train::backend::BackendError::CudaNotCompiled.into())
}
