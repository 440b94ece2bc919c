//! `duet-train fit`: the flags of every stage, which stage reads which, and the dispatch to
//! the stage on the chosen device.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use duet_datasets::pair_tasks::PairTask;
use duet_models::{ImageFit, Preset};
use duet_run::Stage;
use duet_train::backend::DeviceKind;
use duet_train::cpu;
use duet_train::parallel::{NetworkSpec, DEFAULT_PEER_TIMEOUT};
use duet_train::stages::caption::FitArgs;
use duet_train::stages::dream::{DreamFitArgs, DreamOutcome};
use duet_train::stages::generate::DenoiserOptions;
use duet_train::stages::generate::{GenerateFitArgs, GenerateOutcome};
use duet_train::stages::restore::PairFitArgs;
use duet_train::stages::unify::{
    Stage2Captions, UnifyFitArgs, UnifyOutcome, STAGE1_DIR, STAGE2_DIR,
};

#[derive(Args)]
pub struct FitCommand {
    #[arg(long, value_enum, default_value_t = Stage::Caption)]
    pub stage: Stage,
    /// `--stage caption`: model size (default tiny); later stages take it from --init.
    #[arg(long)]
    pub preset: Option<Preset>,
    /// Training data: a folder of your own pairs (captions.jsonl), a ShapeWorld folder or an
    /// Emoji-CLDR split (DIR/train); repeat the flag to train on several, e.g. `--data
    /// data/train --data data/emoji/train`. `--stage fusion`: one captioned folder with a
    /// label on every pair, instead of --task (restore reads the fusion run's).
    #[arg(long)]
    pub data: Vec<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue from the last checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// `--stage generate`: the trained caption run to start from (its vision encoder is
    /// frozen and its tokenizer reused). `--stage unify`: the trained generate run.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// `--stage unify`: captions sampled per image in a GRPO group (stage 1). There
    /// `--steps`, `--batch-size` (images per step) and `--lr` are stage 1's.
    #[arg(long)]
    pub group: Option<usize>,
    /// `--stage unify`: sampling temperature of stage 1's captions (default 1). A
    /// confident captioner needs more to sample differing captions within a group.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// `--stage unify`: generator fine-tune steps (stage 2).
    #[arg(long)]
    pub gen_steps: Option<usize>,
    /// `--stage unify`: peak learning rate of stage 2.
    #[arg(long)]
    pub gen_lr: Option<f64>,
    /// `--stage unify`: captions stage 2 trains on: the captioner's own (the loop) or the
    /// dataset's (the same-budget control).
    #[arg(long, value_enum)]
    pub captions: Option<Stage2Captions>,
    /// `--stage fusion`: the two-modality task (colour-column or shape-count).
    #[arg(long)]
    pub task: Option<PairTask>,
    /// `--stage generate`: weight each sample's diffusion loss by Min-SNR-γ (Hang et al.
    /// 2023; γ = 5 there) instead of uniformly. Off by default.
    #[arg(long)]
    pub min_snr_gamma: Option<f64>,
    /// `--stage generate`: U-ViT long skip connections in the denoiser.
    #[arg(long)]
    pub long_skips: bool,
    /// `--stage generate`: a convolutional output head of this many channels in the
    /// denoiser (a 3×3 convolution across patch borders).
    #[arg(long)]
    pub conv_head: Option<usize>,
    /// `--stage generate`: DiT blocks of the denoiser instead of the preset's.
    #[arg(long)]
    pub denoiser_layers: Option<usize>,
    /// `--stage generate`: side in pixels of the denoiser's patches instead of the preset's
    /// (smaller patches: more tokens, finer detail, slower).
    #[arg(long)]
    pub denoiser_patch: Option<usize>,
    /// `--stage caption`: side of the model's square images (default: that of the first
    /// generated dataset in --data, else 32; at most 1024). Later stages take it from --init.
    #[arg(long, value_parser = image_side)]
    pub image_size: Option<usize>,
    /// `--stage caption`: how images of other sizes or shapes become square: pad (keep all,
    /// grey borders; the default), crop (centre square) or stretch. The bundle applies the
    /// same at inference.
    #[arg(long)]
    pub image_fit: Option<ImageFit>,
    /// `--stage caption`: reuse this tokenizer.json (or the one in a run or bundle folder)
    /// instead of training one on the captions.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// `--stage caption`: fine-tune the captioner of this run (e.g. one made by
    /// `duet-export import` from a bundle) on --data, keeping its dimensions and tokenizer.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Every stage: train data-parallel on this many devices
    /// through Burn's collective engine: N CPU peers with `--device cpu`, CUDA devices 0..N
    /// with `--device cuda` (all but fusion and restore, which are CPU-only). Each
    /// takes 1/N of every batch (so --batch-size must divide by N) and the gradients are summed
    /// before every step: the same run as on one device, up to floating-point rounding.
    #[arg(long)]
    pub devices: Option<usize>,
    /// Every stage: train as one process of a data-parallel group of several
    /// processes, possibly on several machines: the HOST:PORT of every peer in rank order,
    /// comma-separated; rank 0 listens on the first. Every peer runs the same command with
    /// its own --rank (and one device: no --devices).
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<String>,
    /// With --peers: this process's rank, its index in --peers (0 writes the run).
    #[arg(long)]
    pub rank: Option<usize>,
    /// With --peers: seconds to wait for a peer to join or to answer before stopping with an
    /// error naming it (default 300).
    #[arg(long)]
    pub peer_timeout: Option<f64>,
    /// `--stage dream`: learnable dream queries appended after the decoder's prompt (the
    /// denoiser's conditioning tokens; default: tiny 8, small 16).
    #[arg(long)]
    pub dream_queries: Option<usize>,
    /// `--stage dream`: weight of the caption/VQA loss beside the diffusion loss (default 1;
    /// 0: the decoder learns to dream alone).
    #[arg(long)]
    pub understanding_weight: Option<f64>,
    /// `--stage dream`: weight of matching the text encoder path's prediction on the target's
    /// caption beside the diffusion loss (default 10; 0: diffusion loss alone).
    #[arg(long)]
    pub distill_weight: Option<f64>,
    /// `--stage dream`: weight of the generation objective (default 1; 0: the caption/VQA
    /// loss alone on the same rows and schedule, the control of the joint-vs-separate
    /// comparison in docs/DREAM.md).
    #[arg(long)]
    pub generation_weight: Option<f64>,
    /// `--stage dream`: weight of matching each generation row's prompt tokens to the text
    /// encoder's tokens of the same caption (default 0).
    #[arg(long)]
    pub token_weight: Option<f64>,
}

pub fn run(cmd: FitCommand, command_line: String) -> anyhow::Result<()> {
    let FitCommand {
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
        denoiser_layers,
        denoiser_patch,
        captions,
        task,
        image_size,
        image_fit,
        tokenizer,
        init_from,
        dream_queries,
        understanding_weight,
        distill_weight,
        generation_weight,
        token_weight,
        devices,
        peers,
        rank,
        peer_timeout,
    } = cmd;
    let network = network_spec(peers, rank, peer_timeout)?;
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
            ("--denoiser-layers", denoiser_layers.is_some()),
            ("--denoiser-patch", denoiser_patch.is_some()),
            ("--image-size", image_size.is_some()),
            ("--image-fit", image_fit.is_some()),
            ("--tokenizer", tokenizer.is_some()),
            ("--init-from", init_from.is_some()),
            ("--dream-queries", dream_queries.is_some()),
            ("--understanding-weight", understanding_weight.is_some()),
            ("--distill-weight", distill_weight.is_some()),
            ("--generation-weight", generation_weight.is_some()),
            ("--token-weight", token_weight.is_some()),
            ("--devices", devices.is_some()),
            ("--peers", network.is_some()),
        ],
    )?;
    if let (Some(preset), Some(from)) = (preset, &init_from) {
        // The source run fixes the dimensions; a preset that would be ignored is refused.
        anyhow::bail!(
            "--init-from {} fixes the model's dimensions (those of its run); drop --preset {preset}",
            from.display()
        );
    }
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
            let data = match data.as_slice() {
                [] => None,
                [one] => Some(one.clone()),
                _ => anyhow::bail!(
                    "--stage fusion reads one labelled folder; --data given {} times",
                    data.len()
                ),
            };
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
                data,
                train_examples: None,
                test_examples: None,
                steps,
                batch_size,
                lr,
                seed,
                settings: None,
                device: kind.to_string(),
                devices: devices.unwrap_or(1),
                network: network.clone(),
                command: command_line,
                quiet: false,
            };
            let outcome = match (kind, stage == Stage::Fusion) {
                (DeviceKind::Cpu, true) => cpu::fit_fusion(&args)?,
                (DeviceKind::Cpu, false) => cpu::fit_restore(&args)?,
                (DeviceKind::Cuda, _) => anyhow::bail!(
                    "--stage {stage} trains small MLPs on cached embeddings; use --device cpu \
                     (with --devices N for N CPU peers)"
                ),
            };
            println!(
                "{stage}: held-out accuracy on complete pairs {:.4}, final loss {:.4}, \
                 {:.1}s; run in {}",
                outcome.complete_accuracy,
                outcome.final_loss,
                outcome.seconds,
                written_to(&out, network.as_ref())
            );
        }
        Stage::Unify => {
            need_data()?;
            if resume {
                anyhow::bail!("unify runs do not resume; start them again (they are short)");
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
                devices: devices.unwrap_or(1),
                network: network.clone(),
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
                written_to(&out, network.as_ref())
            );
        }
        Stage::Dream => {
            need_data()?;
            let args = DreamFitArgs {
                init: init.context("--stage dream needs --init <generate run>")?,
                data,
                out: out.clone(),
                steps,
                batch_size,
                lr,
                queries: dream_queries,
                understanding_weight,
                distill_weight,
                generation_weight,
                token_weight,
                seed,
                resume,
                device: kind.to_string(),
                devices: devices.unwrap_or(1),
                network: network.clone(),
                command: command_line,
                quiet: false,
            };
            let outcome = match kind {
                DeviceKind::Cpu => cpu::fit_dream(&args)?,
                DeviceKind::Cuda => fit_dream_cuda(&args)?,
            };
            println!(
                "trained {} steps in {:.1}s, final diffusion loss {:.4}, understanding loss \
                 {:.4}; run in {}",
                outcome.steps_done,
                outcome.seconds,
                outcome.final_diffusion_loss,
                outcome.final_understanding_loss,
                written_to(&out, network.as_ref())
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
                    layers: denoiser_layers,
                    patch_size: denoiser_patch,
                },
                seed,
                resume,
                device: kind.to_string(),
                devices: devices.unwrap_or(1),
                network: network.clone(),
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
                written_to(&out, network.as_ref())
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
                image_size,
                image_fit,
                tokenizer,
                init_from,
                device: kind.to_string(),
                devices: devices.unwrap_or(1),
                network: network.clone(),
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
                written_to(&out, network.as_ref())
            );
        }
    }
    Ok(())
}

/// Where a finished run is, as the closing line says it: a rank other than 0 of a
/// multi-process group writes nothing.
fn written_to(out: &std::path::Path, network: Option<&NetworkSpec>) -> String {
    match network {
        Some(spec) if spec.rank != 0 => format!(
            "rank 0's folder ({} here: rank {} writes nothing)",
            out.display(),
            spec.rank
        ),
        _ => out.display().to_string(),
    }
}

/// The multi-process group of `--peers`, `--rank` and `--peer-timeout` (all or none).
fn network_spec(
    peers: Vec<String>,
    rank: Option<usize>,
    timeout: Option<f64>,
) -> anyhow::Result<Option<NetworkSpec>> {
    if peers.is_empty() {
        if rank.is_some() || timeout.is_some() {
            anyhow::bail!("--rank and --peer-timeout belong to --peers HOST:PORT,HOST:PORT,...");
        }
        return Ok(None);
    }
    let rank = rank.context("--peers needs --rank R: this process's index in the list")?;
    let timeout = match timeout {
        None => DEFAULT_PEER_TIMEOUT,
        Some(s) if s.is_finite() && s > 0.0 && s <= 7.0 * 86400.0 => {
            std::time::Duration::from_secs_f64(s)
        }
        Some(s) => anyhow::bail!("--peer-timeout must be from 0 to a week of seconds, got {s}"),
    };
    Ok(Some(NetworkSpec {
        peers,
        rank,
        timeout,
    }))
}

/// The stage-specific flags of `fit` each stage reads (the common ones — --out, --device,
/// --steps, --batch-size, --lr, --seed — apply to all). A flag given to a stage that does not
/// read it is an error rather than silently ignored: `--stage caption --init RUN` would
/// otherwise train from scratch without a word.
fn stage_flags(stage: Stage) -> &'static [&'static str] {
    match stage {
        Stage::Caption => &[
            "--preset",
            "--data",
            "--resume",
            "--image-size",
            "--image-fit",
            "--tokenizer",
            "--init-from",
            "--devices",
            "--peers",
        ],
        Stage::Generate => &[
            "--data",
            "--resume",
            "--init",
            "--min-snr-gamma",
            "--long-skips",
            "--conv-head",
            "--denoiser-layers",
            "--denoiser-patch",
            "--devices",
            "--peers",
        ],
        Stage::Unify => &[
            "--data",
            "--init",
            "--group",
            "--temperature",
            "--gen-steps",
            "--gen-lr",
            "--captions",
            "--devices",
            "--peers",
        ],
        Stage::Dream => &[
            "--data",
            "--resume",
            "--init",
            "--dream-queries",
            "--understanding-weight",
            "--distill-weight",
            "--generation-weight",
            "--token-weight",
            "--devices",
            "--peers",
        ],
        Stage::Fusion => &["--init", "--task", "--data", "--devices", "--peers"],
        Stage::Restore => &["--init", "--task", "--devices", "--peers"],
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

#[cfg(feature = "cuda")]
fn fit_cuda(args: &FitArgs) -> anyhow::Result<duet_train::stages::caption::FitOutcome> {
    duet_train::backend::probe_cuda()?;
    duet_train::stages::caption::fit_on::<duet_train::backend::CudaBackend>(
        args,
        &cuda_devices(args.devices),
    )
}

/// One data-parallel peer per CUDA device, 0..n.
#[cfg(feature = "cuda")]
fn cuda_devices(n: usize) -> Vec<burn::backend::cuda::CudaDevice> {
    (0..n)
        .map(|index| burn::backend::cuda::CudaDevice { index })
        .collect()
}

#[cfg(feature = "cuda")]
fn fit_generate_cuda(args: &GenerateFitArgs) -> anyhow::Result<GenerateOutcome> {
    duet_train::backend::probe_cuda()?;
    duet_train::stages::generate::fit_generate_on::<duet_train::backend::CudaBackend>(
        args,
        &cuda_devices(args.devices),
    )
}

#[cfg(feature = "cuda")]
fn fit_dream_cuda(args: &DreamFitArgs) -> anyhow::Result<DreamOutcome> {
    duet_train::backend::probe_cuda()?;
    duet_train::stages::dream::fit_dream_on::<duet_train::backend::CudaBackend>(
        args,
        &cuda_devices(args.devices),
    )
}

#[cfg(not(feature = "cuda"))]
fn fit_dream_cuda(_args: &DreamFitArgs) -> anyhow::Result<DreamOutcome> {
    Err(duet_train::backend::BackendError::CudaNotCompiled.into())
}

#[cfg(not(feature = "cuda"))]
fn fit_generate_cuda(_args: &GenerateFitArgs) -> anyhow::Result<GenerateOutcome> {
    Err(duet_train::backend::BackendError::CudaNotCompiled.into())
}

#[cfg(feature = "cuda")]
fn fit_unify_cuda(args: &UnifyFitArgs) -> anyhow::Result<UnifyOutcome> {
    duet_train::backend::probe_cuda()?;
    duet_train::stages::unify::fit_unify_on::<duet_train::backend::CudaBackend>(
        args,
        &cuda_devices(args.devices),
    )
}

#[cfg(not(feature = "cuda"))]
fn fit_unify_cuda(_args: &UnifyFitArgs) -> anyhow::Result<UnifyOutcome> {
    Err(duet_train::backend::BackendError::CudaNotCompiled.into())
}

#[cfg(not(feature = "cuda"))]
fn fit_cuda(_args: &FitArgs) -> anyhow::Result<duet_train::stages::caption::FitOutcome> {
    Err(duet_train::backend::BackendError::CudaNotCompiled.into())
}

/// An `--image-size`: a side from 1 to [`duet_models::MAX_IMAGE_SIZE`], refused before any
/// image is read or fitted (every fitted image is `side²` pixels).
pub fn image_side(text: &str) -> Result<usize, String> {
    let side: usize = text.parse().map_err(|e| format!("{e}"))?;
    if (1..=duet_models::MAX_IMAGE_SIZE).contains(&side) {
        Ok(side)
    } else {
        Err(format!(
            "must be from 1 to {} pixels",
            duet_models::MAX_IMAGE_SIZE
        ))
    }
}
