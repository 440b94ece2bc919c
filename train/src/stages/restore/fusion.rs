//! `fit --stage fusion`: the task head on complete image + text pairs, and the losses and
//! accuracies the restore stage shares with it.

use crate::stages::caption::batch_indices;
use anyhow::Context;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor};
use duet_datasets::tokenizer::save_tokenizer;
use duet_models::init::seeded;
use duet_models::params::named_tensors;
use duet_models::FusionHead;
use duet_run::checkpoint::{
    load_weights, read_json, save_weights, write_json, TrainState, STATE_FILE, WEIGHTS_FILE,
};
use duet_run::Stage;
use duet_run::{CONFIG_FILE, TOKENIZER_FILE};
use std::time::Instant;

use super::*;

/// Cross-entropy of `logits` `[b, C]` against integer labels, summed over the rows and divided
/// by `batch`: the mean when the rows are the whole batch, a data-parallel peer's part of it
/// when they are its shard.
pub(super) fn cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    batch: usize,
) -> Tensor<B, 1> {
    let [b, _] = logits.dims();
    log_softmax(logits, 1)
        .gather(1, labels.reshape([b, 1]))
        .sum()
        .div_scalar(batch as f64)
        .neg()
}

/// `KL(p ‖ softmax(logits))` summed over the rows and divided by `batch` (the mean per example
/// over the whole batch, of which the rows may be a data-parallel peer's shard), `p` given as
/// probabilities (no gradient).
pub(super) fn kl_from<B: Backend>(
    p: Tensor<B, 2>,
    logits: Tensor<B, 2>,
    batch: usize,
) -> Tensor<B, 1> {
    let logp = p.clone().clamp_min(1e-8).log();
    (p * (logp - log_softmax(logits, 1)))
        .sum()
        .div_scalar(batch as f64)
        .reshape([1])
}

/// Fraction of rows of `logits` whose argmax is the label.
pub fn accuracy<B: Backend>(logits: Tensor<B, 2>, labels: &[usize]) -> anyhow::Result<f64> {
    let pred = to_vec(logits.argmax(1).float())?;
    let right = pred
        .iter()
        .zip(labels)
        .filter(|(p, &l)| **p as usize == l)
        .count();
    Ok(right as f64 / labels.len().max(1) as f64)
}

/// Accuracy of `head` on the complete pairs of `features`.
pub(super) fn complete_accuracy<B: Backend>(
    head: &FusionHead<B>,
    features: &PairFeatures,
    device: &B::Device,
) -> anyhow::Result<f64> {
    let all: Vec<usize> = (0..features.n).collect();
    accuracy(
        head.forward(
            features.image_rows(&all, device),
            features.text_rows(&all, device),
        ),
        &features.labels,
    )
}

/// `fit --stage fusion`: trains the fusion head on complete pairs.
pub fn fit_fusion<B: AutodiffBackend>(
    args: &PairFitArgs,
    device: &B::Device,
) -> anyhow::Result<PairOutcome> {
    let t0 = Instant::now();
    validate_args(args)?;
    let bb = load_backbones::<B::InnerBackend>(&args.init, device)?;
    // A folder is read (and checked) before anything is written; a task is drawn below.
    let target = ImageTarget::of(&bb.model, Some(&bb.tokenizer));
    let (task, folder_examples) = match (args.task, &args.data) {
        (Some(t), None) => (PairData::Task(t), None),
        (None, Some(dir)) => {
            let (folder, examples) = LabelledFolder::open(dir, &target)?;
            tracing::info!(
                "{}: {} classes, {} training and {} held-out pairs",
                dir.display(),
                folder.classes.len(),
                examples.train.len(),
                examples.test.len()
            );
            (PairData::Folder(folder), Some(examples))
        }
        (Some(_), Some(_)) => {
            anyhow::bail!("--stage fusion takes --task or --data (a labelled folder), not both")
        }
        (None, None) => anyhow::bail!(
            "--stage fusion needs --task colour-column|shape-count, or --data FOLDER: a \
             captioned folder with a label on every pair"
        ),
    };
    let generator: duet_run::GenerateTrainConfig = read_json(&args.init.join(CONFIG_FILE))
        .with_context(|| {
            format!(
                "--stage fusion starts from a generate or unify run; {} is not one",
                args.init.display()
            )
        })?;
    let mut cfg = resolve_config(
        args,
        Stage::Fusion,
        bb.preset,
        bb.model.clone(),
        task,
        None,
        Some(generator.diffusion),
    );
    cfg.tokenizer = generator.tokenizer;
    // A folder's counts are its own.
    if let Some(e) = &folder_examples {
        cfg.train_examples = e.train.len();
        cfg.test_examples = e.test.len();
    }
    check_out(&args.out)?;
    let network = args.network.as_ref();
    let devices = vec![device.clone(); args.devices];
    crate::parallel::check(
        crate::parallel::group_size(devices.len(), network)?,
        cfg.batch_size,
    )?;
    let examples = match folder_examples {
        Some(e) => e,
        None => cfg.task.examples(
            cfg.train_examples,
            cfg.test_examples,
            cfg.data_seed,
            &target,
        )?,
    };
    let train = extract_features(&bb, &examples.train, device)?;
    let test = extract_features(&bb, &examples.test, device)?;
    let group = crate::parallel::Group::<B>::join(&devices, network, || {
        pair_digest(&cfg, &examples.train, &bb)
    })?;
    let writes = crate::parallel::writes_run(network);
    if writes {
        create_out(&args.out)?;
        write_json(&args.out.join(CONFIG_FILE), &cfg)?;
        save_tokenizer(&bb.tokenizer, &args.out.join(TOKENIZER_FILE))?;
    }
    let (head, last) =
        group.run(|peer, device| train_head::<B>(args, &cfg, &train, &peer, device))?;
    let complete_accuracy = complete_accuracy(&head, &test, device)?;
    if writes {
        let mut weights = load_weights(&args.init.join(WEIGHTS_FILE))?;
        weights.retain(|k, _| !k.starts_with("head."));
        weights.extend(prefixed(named_tensors(&head), HEAD));
        save_weights(&args.out.join(WEIGHTS_FILE), &weights)?;
        write_json(
            &args.out.join("fusion.json"),
            &serde_json::json!({"complete_accuracy": complete_accuracy, "task": cfg.task.to_string()}),
        )?;
        write_json(
            &args.out.join(STATE_FILE),
            &TrainState {
                step: cfg.steps,
                seed: cfg.seed,
                last_loss: last,
            },
        )?;
    }
    tracing::info!(complete_accuracy, "fusion head trained");
    Ok(PairOutcome {
        complete_accuracy,
        final_loss: last,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The fusion head's training loop on one data-parallel peer: every peer draws the same batch
/// and takes its shard; the leader logs. Returns the trained head and the last loss.
fn train_head<B: AutodiffBackend>(
    args: &PairFitArgs,
    cfg: &PairTrainConfig,
    train: &PairFeatures,
    peer: &Peer,
    device: &B::Device,
) -> anyhow::Result<(FusionHead<B::InnerBackend>, f64)> {
    let mut head = seeded(device, cfg.seed, || {
        FusionHead::<B>::new(&cfg.restore, device)
    });
    peer.agree_on_start(&head, 0)?;
    let mut optim = AdamWConfig::new().with_weight_decay(1e-4).init();
    let leader = peer.is_leader();
    let pb = duet_datasets::progress::stage_bar(args.quiet || !leader, cfg.steps, "fusion head");
    let mut last = f64::NAN;
    for step in 0..cfg.steps {
        let batch = batch_indices(train.n, cfg.batch_size, step, cfg.seed);
        let idx = peer.shard(&batch);
        let logits = head.forward(train.image_rows(idx, device), train.text_rows(idx, device));
        let loss = cross_entropy(logits, train.label_rows(idx, device), batch.len());
        last = peer.sum::<B>(loss.clone().into_scalar().elem::<f64>(), device)?;
        let grads = GradientsParams::from_grads(loss.backward(), &head);
        let grads = peer.sum_gradients(&head, grads)?;
        let lr = duet_run::warmup_cosine_lr(cfg.lr, 50, cfg.steps, step);
        head = optim.step(lr, head, grads);
        if leader && (step % 50 == 0 || step + 1 == cfg.steps) {
            pb.set_message(format!("loss {last:.4}"));
            append_metric(
                &args.out,
                &serde_json::json!({"stage": Stage::Fusion, "step": step, "loss": last}),
            )?;
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok((head.valid(), last))
}
