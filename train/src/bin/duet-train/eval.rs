//! `duet-train eval`: the evaluations of a trained run and where each writes its report.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use duet_datasets::folders::{folder_kind, FolderKind};
use duet_diffusion::{Sampler, SamplerConfig};
use duet_run::checkpoint::write_json;
use duet_train::cpu;
use duet_train::eval::caption::GenerateEvalOptions;
use duet_train::eval::emoji::RetrievalOptions;
use duet_train::eval::restore::RestoreEvalOptions;
use duet_train::eval::Evaluation;
use duet_train::plot::write_png;
use duet_train::stages::unify::ReconstructionSettings;

#[derive(Args)]
pub struct EvalCommand {
    #[arg(long, value_enum, default_value_t = Evaluation::Caption)]
    pub stage: Evaluation,
    #[arg(long)]
    pub run: PathBuf,
    /// Held-out dataset: a ShapeWorld folder or an Emoji-CLDR split (caption), an
    /// Emoji-CLDR split (retrieval), a ShapeWorld folder (reconstruct); generate scores its
    /// own seeded prompt set.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Evaluate only the first N samples (caption, reconstruct, retrieval; questions for vqa).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Prompts per GenEval category (generate).
    #[arg(long, default_value_t = 20)]
    pub per_category: usize,
    /// Sampling steps (generate, retrieval; reconstruct uses DDIM with eta 0).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Sampler: ddim or dpmpp (generate, retrieval).
    #[arg(long, default_value = "ddim")]
    pub sampler: String,
    /// DDIM eta (generate, retrieval; ddim only).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f32,
    /// Classifier-free guidance scale (generate, retrieval).
    #[arg(long, default_value_t = 3.0)]
    pub guidance: f32,
    /// Noise seed (generate, retrieval); the prompt set uses seed 0 so runs compare on the same prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Score the untrained generator (the baseline) instead (generate).
    #[arg(long)]
    pub untrained: bool,
}

/// The GenEval-style options of `--stage generate` and `--stage dream` (the prompt set is seed
/// 0's, so runs compare on the same prompts).
fn generate_eval_options(
    per_category: usize,
    seed: u64,
    sampler: Sampler,
    steps: usize,
    guidance: f32,
    untrained: bool,
) -> GenerateEvalOptions {
    GenerateEvalOptions {
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
    }
}

pub fn run(cmd: EvalCommand, command_line: String) -> anyhow::Result<()> {
    let EvalCommand {
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
    } = cmd;
    match stage {
        Evaluation::Vqa => {
            let data = data.context(
                "--data is required for --stage vqa (a ShapeWorld folder written with --questions)",
            )?;
            let (report, answers) = cpu::eval_vqa(&run, &data, limit)?;
            for a in answers.iter().take(12) {
                println!("{} truth: {} | answer: {}", a.question, a.truth, a.answer);
            }
            println!("{report}");
            write_json(
                &run.join("vqa_eval.json"),
                &serde_json::json!({
                    "data": data, "report": report, "overall": report.overall(),
                    "majority_overall": report.majority_overall(), "limit": limit,
                    "command": command_line, "answers": answers,
                }),
            )?;
        }
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
            let (report, pairs) = cpu::eval_reconstruction(&run, &data, limit, &settings, seed)?;
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
            let opts =
                generate_eval_options(per_category, seed, sampler, steps, guidance, untrained);
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
        Evaluation::Dream => {
            let sampler = parse_sampler(&sampler, eta)?;
            let opts =
                generate_eval_options(per_category, seed, sampler, steps, guidance, untrained);
            let tag = if untrained {
                "dream-untrained"
            } else {
                "dream"
            };
            let (dream, images) = cpu::eval_dream_generate(&run, &opts)?;
            println!("text to image through the dream queries (blank image + prompt):\n{dream}");
            let shown: Vec<_> = images
                .chunks(per_category.max(1))
                .flat_map(|c| c.iter().take(8).cloned())
                .collect();
            let grid_path = run.join(format!("{tag}-geneval.png"));
            write_png(&grid_path, &duet_diffusion::grid(&shown, 8, 4))
                .with_context(|| format!("writing {}", grid_path.display()))?;
            let text = if untrained {
                None
            } else {
                let (text, _) = cpu::eval_generate(&run, &opts)?;
                println!("the same prompts through the text encoder:\n{text}");
                Some(text)
            };
            let mut edits = serde_json::Value::Null;
            if let Some(data) = &data {
                let (edited, drawn) = cpu::eval_edits(&run, data, limit, &opts, false)?;
                let (scratch, _) = cpu::eval_edits(&run, data, limit, &opts, true)?;
                println!("edits of {}:\n{edited}", data.display());
                println!("the instructions drawn from the blank image:\n{scratch}");
                // Sources on the odd rows, their edits below them.
                let mut shown = Vec::new();
                for chunk in drawn.chunks(8).take(4) {
                    shown.extend(chunk.iter().map(|d| d.source.clone()));
                    shown.extend(chunk.iter().map(|d| d.drawn.clone()));
                }
                let edits_path = run.join(format!("{tag}-edits.png"));
                write_png(&edits_path, &duet_diffusion::grid(&shown, 8, 4))
                    .with_context(|| format!("writing {}", edits_path.display()))?;
                for d in drawn.iter().take(8) {
                    println!("edit: {}", d.instruction);
                }
                println!("sources and edits in {}", edits_path.display());
                edits = serde_json::json!({
                    "data": data, "limit": limit, "edited": edited, "from_scratch": scratch,
                    "made": edited.made(), "kept": edited.kept(), "exact": edited.exact(),
                    "kept_colour": edited.kept_colour(), "scratch_made": scratch.made(),
                    "scratch_kept": scratch.kept(), "scratch_kept_colour": scratch.kept_colour(),
                    "instructions": drawn.iter().take(32).map(|d| d.instruction.clone())
                        .collect::<Vec<_>>(),
                });
            }
            println!(
                "generations (one row per category) in {}",
                grid_path.display()
            );
            write_json(
                &run.join(format!("{tag}_eval.json")),
                &serde_json::json!({
                    "dream": dream, "dream_overall": dream.overall(),
                    "dream_colour_fidelity": dream.colour_fidelity(),
                    "text": text, "text_overall": text.as_ref().map(|t| t.overall()),
                    "edits": edits, "per_category": per_category, "steps": steps,
                    "sampler": format!("{sampler:?}"), "guidance": guidance, "seed": seed,
                    "command": command_line,
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
