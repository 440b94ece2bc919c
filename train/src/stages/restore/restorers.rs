//! `fit --stage restore`: the feature-space diffusion restorers (full model and ablations)
//! and the missing-token baseline, trained with the backbones and the head frozen.

use crate::stages::caption::batch_indices;
use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use duet_datasets::tokenizer::save_tokenizer;
use duet_diffusion::NoiseSchedule;
use duet_models::init::seeded;
use duet_models::params::named_tensors;
use duet_models::{FeatureRestorer, FusionHead, MissingTokens, Restorers};
use duet_run::checkpoint::{
    load_weights, read_json, save_weights, write_json, TrainState, STATE_FILE, WEIGHTS_FILE,
};
use duet_run::Stage;
use duet_run::{CONFIG_FILE, TOKENIZER_FILE};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use std::time::Instant;

use super::*;

/// `[B, 1]` column of `f(ᾱ_t)` for per-example timesteps.
fn per_example<B: Backend>(
    schedule: &NoiseSchedule,
    ts: &[usize],
    f: impl Fn(f64) -> f64,
    device: &B::Device,
) -> Tensor<B, 2> {
    let v: Vec<f32> = ts
        .iter()
        .map(|&t| f(schedule.alpha_bar(Some(t))) as f32)
        .collect();
    Tensor::from_data(TensorData::new(v, [ts.len(), 1]), device)
}

pub(super) fn gaussian<B: Backend, R: Rng>(
    rng: &mut R,
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2> {
    let v: Vec<f32> = (0..shape[0] * shape[1])
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Restores features with DDIM (eta 0, `v`-prediction) from the start noise `x` (in the
/// standardised space) and returns them as embeddings (`μ + σ z`): the same update rule as
/// `duet_diffusion::sample` (checked in a test), written on Burn tensors so the training losses
/// can differentiate through the whole sampler.
pub fn ddim_restore<B: Backend>(
    restorer: &FeatureRestorer<B>,
    schedule: &NoiseSchedule,
    steps: usize,
    cond: Tensor<B, 2>,
    x: Tensor<B, 2>,
    gating: bool,
) -> anyhow::Result<Tensor<B, 2>> {
    let ts = schedule.timesteps(steps)?;
    let [b, _] = x.dims();
    let device = x.device();
    let mut x = x;
    for (i, &t) in ts.iter().enumerate() {
        let ab = schedule.alpha_bar(Some(t));
        let ab_next = schedule.alpha_bar(ts.get(i + 1).copied());
        let tt = Tensor::<B, 1>::from_data(TensorData::new(vec![t as f32; b], [b]), &device);
        let v = restorer.forward(x.clone(), tt, cond.clone(), gating);
        let (a, s) = (ab.sqrt(), (1.0 - ab).sqrt());
        let x0 = x.clone().mul_scalar(a) - v.clone().mul_scalar(s);
        let eps = x.mul_scalar(s) + v.mul_scalar(a);
        x = x0.mul_scalar(ab_next.sqrt()) + eps.mul_scalar((1.0 - ab_next).sqrt());
    }
    Ok(restorer.unstandardise(x))
}

/// `1 − cos(a, b)` summed over rows and divided by `batch` (the mean over the whole batch when
/// the rows are a data-parallel peer's shard of it).
fn cosine_distance<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>, batch: usize) -> Tensor<B, 1> {
    let dot = (a.clone() * b.clone()).sum_dim(1);
    let na = a.powi_scalar(2).sum_dim(1).add_scalar(1e-12).sqrt();
    let nb = b.powi_scalar(2).sum_dim(1).add_scalar(1e-12).sqrt();
    (dot / (na * nb))
        .neg()
        .add_scalar(1.0)
        .sum()
        .div_scalar(batch as f64)
}

/// The rows of a whole batch that a data-parallel peer computes: every peer draws the whole
/// batch's timesteps and noise (so the peers draw what one device draws) and keeps these.
#[derive(Debug, Clone)]
struct Shard {
    rows: std::ops::Range<usize>,
    batch: usize,
}

impl Shard {
    fn of<B: Backend>(&self, t: Tensor<B, 2>) -> Tensor<B, 2> {
        t.slice([self.rows.clone()])
    }
}

/// Losses of one restorer step.
struct RestoreLosses<B: Backend> {
    total: Tensor<B, 1>,
    diffusion: f64,
    agreement: f64,
    cycle: f64,
}

#[allow(clippy::too_many_arguments)]
fn restore_loss<B: AutodiffBackend>(
    model: &Restorers<B>,
    head: &FusionHead<B>,
    variant: Variant,
    settings: &RestoreSettings,
    schedule: &NoiseSchedule,
    image: Tensor<B, 2>,
    text: Tensor<B, 2>,
    shard: &Shard,
    rng: &mut ChaCha8Rng,
) -> anyhow::Result<RestoreLosses<B>> {
    let [b, e] = image.dims();
    let whole = shard.batch;
    let device = image.device();
    let t_max = schedule.train_steps();
    // Denoising: each direction predicts `v` of its own modality at a random timestep.
    let mut diffusion = Tensor::<B, 1>::zeros([1], &device);
    for (restorer, x0, cond) in [
        (
            &model.t2i,
            model.t2i.standardise(image.clone()),
            text.clone(),
        ),
        (
            &model.i2t,
            model.i2t.standardise(text.clone()),
            image.clone(),
        ),
    ] {
        let ts: Vec<usize> = (0..whole).map(|_| rng.random_range(0..t_max)).collect();
        let ts = &ts[shard.rows.clone()];
        let a = per_example::<B>(schedule, ts, f64::sqrt, &device);
        let s = per_example::<B>(schedule, ts, |ab| (1.0 - ab).sqrt(), &device);
        let noise = shard.of(gaussian::<B, _>(rng, [whole, e], &device));
        let x_t = x0.clone() * a.clone() + noise.clone() * s.clone();
        let target = noise * a - x0 * s;
        let tt = Tensor::<B, 1>::from_data(
            TensorData::new(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), [b]),
            &device,
        );
        let v = restorer.forward(x_t, tt, cond, variant.gating);
        diffusion = diffusion
            + (v - target)
                .powi_scalar(2)
                .sum()
                .div_scalar((whole * e) as f64);
    }
    let diffusion_value = diffusion.clone().into_scalar().elem::<f64>();
    if !variant.mutual {
        return Ok(RestoreLosses {
            total: diffusion,
            diffusion: diffusion_value,
            agreement: 0.0,
            cycle: 0.0,
        });
    }
    // Cross-modal mutual learning, through the whole (unrolled) sampler.
    let k = settings.sampler_steps;
    let r_image = ddim_restore(
        &model.t2i,
        schedule,
        k,
        text.clone(),
        shard.of(gaussian::<B, _>(rng, [whole, e], &device)),
        variant.gating,
    )?;
    let r_text = ddim_restore(
        &model.i2t,
        schedule,
        k,
        image.clone(),
        shard.of(gaussian::<B, _>(rng, [whole, e], &device)),
        variant.gating,
    )?;
    // Agreement: the head's prediction with a restored (gated) feature should match its
    // prediction on the real pair.
    let target = softmax(head.forward(image.clone(), text.clone()), 1).detach();
    let f_image = model
        .t2i
        .blend(r_image.clone(), text.clone(), variant.trusts());
    let f_text = model
        .i2t
        .blend(r_text.clone(), image.clone(), variant.trusts());
    let agreement = kl_from(target.clone(), head.forward(f_image, text.clone()), whole)
        + kl_from(target, head.forward(image.clone(), f_text), whole);
    // Cycle consistency: restoring back from a restored feature should land on the real
    // feature of the start modality (raw cosine distance). The cycle's second leg is the
    // sampler's first x0 estimate from pure noise (one step, not the unrolled sampler, to keep
    // a step cheap).
    let t_last = t_max - 1;
    let ab = schedule.alpha_bar(Some(t_last));
    let one_step = |r: &FeatureRestorer<B>, cond: Tensor<B, 2>, rng: &mut ChaCha8Rng| {
        let x = shard.of(gaussian::<B, _>(rng, [whole, e], &device));
        let tt = Tensor::<B, 1>::from_data(TensorData::new(vec![t_last as f32; b], [b]), &device);
        let v = r.forward(x.clone(), tt, cond, variant.gating);
        r.unstandardise(x.mul_scalar(ab.sqrt()) - v.mul_scalar((1.0 - ab).sqrt()))
    };
    let back_text = one_step(&model.i2t, r_image, rng);
    let back_image = one_step(&model.t2i, r_text, rng);
    let cycle = cosine_distance(back_text, text, whole) + cosine_distance(back_image, image, whole);
    let agreement_value = agreement.clone().into_scalar().elem::<f64>();
    let cycle_value = cycle.clone().into_scalar().elem::<f64>();
    Ok(RestoreLosses {
        total: diffusion
            + agreement.mul_scalar(settings.agreement_weight)
            + cycle.mul_scalar(settings.cycle_weight),
        diffusion: diffusion_value,
        agreement: agreement_value,
        cycle: cycle_value,
    })
}

/// `fit --stage restore`: the missing-token baseline and the three restorer variants, with the
/// backbones and the fusion head frozen.
pub fn fit_restore<B: AutodiffBackend>(
    args: &PairFitArgs,
    device: &B::Device,
) -> anyhow::Result<PairOutcome> {
    let t0 = Instant::now();
    validate_args(args)?;
    let fusion: PairTrainConfig = read_json(&args.init.join(CONFIG_FILE))?;
    if fusion.stage != Stage::Fusion {
        anyhow::bail!(
            "{} is a '{}' run; --stage restore starts from a fusion run",
            args.init.display(),
            fusion.stage
        );
    }
    if args.task.is_some_and(|t| PairData::Task(t) != fusion.task) {
        anyhow::bail!(
            "--task differs from the fusion run's task '{}'",
            fusion.task
        );
    }
    if args.data.is_some() {
        anyhow::bail!("--stage restore reads the fusion run's data; --data does not apply");
    }
    let bb = load_backbones::<B::InnerBackend>(&args.init, device)?;
    let cfg = resolve_config(
        args,
        Stage::Restore,
        fusion.preset,
        fusion.model.clone(),
        fusion.task.clone(),
        Some(&fusion),
        fusion.generator_diffusion.clone(),
    );
    // Read before anything is written: a folder that moved or changed is refused here.
    let examples = cfg.task.examples(
        cfg.train_examples,
        cfg.test_examples,
        cfg.data_seed,
        &ImageTarget::of(&cfg.model, Some(&bb.tokenizer)),
    )?;
    let settings = cfg.settings.clone().unwrap_or_default();
    check_out(&args.out)?;
    let network = args.network.as_ref();
    let devices = vec![device.clone(); args.devices];
    crate::parallel::check(
        crate::parallel::group_size(devices.len(), network)?,
        cfg.batch_size,
    )?;
    let init_weights = load_weights(&args.init.join(WEIGHTS_FILE))?;
    let train = extract_features(&bb, &examples.train, device)?;
    let group = crate::parallel::Group::<B>::join(&devices, network, || {
        pair_digest(&cfg, &examples.train, &bb)
    })?;
    let writes = crate::parallel::writes_run(network);
    if writes {
        create_out(&args.out)?;
        write_json(&args.out.join(CONFIG_FILE), &cfg)?;
        save_tokenizer(&bb.tokenizer, &args.out.join(TOKENIZER_FILE))?;
    }
    let shared = RestoreInputs {
        args,
        cfg: &cfg,
        settings: &settings,
        train: &train,
        init_weights: &init_weights,
    };
    let (head, tokens, restorers, last) =
        group.run(|peer, device| train_restorers::<B>(&shared, &peer, device))?;
    let test = extract_features(&bb, &examples.test, device)?;
    let complete_accuracy = complete_accuracy(&head, &test, device)?;
    if writes {
        // The run: the init run's tensors, with the frozen modules written from the very
        // instances this stage used (so a test can prove they did not move), and the new ones.
        let mut weights = init_weights;
        weights.retain(|k, _| {
            !(k.starts_with("vision.") || k.starts_with("text.") || k.starts_with("head."))
        });
        weights.extend(prefixed(named_tensors(&bb.vision), "vision"));
        weights.extend(prefixed(named_tensors(&bb.text), "text"));
        weights.extend(prefixed(named_tensors(&head), HEAD));
        weights.extend(prefixed(named_tensors(&tokens), MISSING_TOKEN));
        for (variant, model) in VARIANTS.iter().zip(&restorers) {
            weights.extend(prefixed(named_tensors(model), variant.prefix));
        }
        save_weights(&args.out.join(WEIGHTS_FILE), &weights)?;
        write_json(
            &args.out.join(STATE_FILE),
            &TrainState {
                step: cfg.steps,
                seed: cfg.seed,
                last_loss: last,
            },
        )?;
    }
    Ok(PairOutcome {
        complete_accuracy,
        final_loss: last,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// What every peer of a restore run reads.
struct RestoreInputs<'a> {
    args: &'a PairFitArgs,
    cfg: &'a PairTrainConfig,
    settings: &'a RestoreSettings,
    train: &'a PairFeatures,
    init_weights: &'a duet_models::params::NamedTensors,
}

/// The frozen head, the missing-token baseline, the restorer of each variant, and the last
/// loss: what a restore run trains.
type Restored<B> = (FusionHead<B>, MissingTokens<B>, Vec<Restorers<B>>, f64);

/// The restore stage's training on one data-parallel peer: the missing-token baseline, then
/// each restorer variant, every step on the peer's shard of the batch with the gradients
/// summed across peers; the leader logs.
fn train_restorers<B: AutodiffBackend>(
    inputs: &RestoreInputs<'_>,
    peer: &Peer,
    device: &B::Device,
) -> anyhow::Result<Restored<B::InnerBackend>> {
    let RestoreInputs {
        args,
        cfg,
        settings,
        train,
        init_weights,
    } = *inputs;
    let leader = peer.is_leader();
    let quiet = args.quiet || !leader;
    // The frozen head, without gradients: only the restorers' optimisers step.
    let head = load_module(
        FusionHead::<B>::new(&cfg.restore, device),
        init_weights,
        HEAD,
        &args.init,
    )?
    .no_grad();
    // Each peer reads the frozen head from its own --init: all must hold the same one.
    peer.agree("fusion head", crate::parallel::weights_digest(&head))?;
    let schedule = NoiseSchedule::cosine(settings.train_timesteps)?;
    let e = train.dim;
    let stats = |data: &[f32]| {
        let (m, s) = PairFeatures::mean_std(data, e);
        (
            Tensor::<B, 1>::from_data(TensorData::new(m, [e]), device),
            Tensor::<B, 1>::from_data(TensorData::new(s, [e]), device),
        )
    };
    let (image_stats, text_stats) = (stats(&train.image), stats(&train.text));

    // The prompt-style baseline: a learned vector per modality, trained on the task loss with
    // the other modality present.
    let mut tokens = seeded(device, cfg.seed, || MissingTokens::<B>::new(e, device));
    let mut token_optim = AdamWConfig::new().init();
    let pb = duet_datasets::progress::stage_bar(quiet, settings.token_steps, "missing token");
    for step in 0..settings.token_steps {
        let batch = batch_indices(train.n, cfg.batch_size, step, cfg.seed);
        let idx = peer.shard(&batch);
        let b = idx.len();
        let labels = train.label_rows(idx, device);
        let ti = tokens.image.val().reshape([1, e]).expand([b, e]);
        let tt = tokens.text.val().reshape([1, e]).expand([b, e]);
        let loss = cross_entropy(
            head.forward(ti, train.text_rows(idx, device)),
            labels.clone(),
            batch.len(),
        ) + cross_entropy(
            head.forward(train.image_rows(idx, device), tt),
            labels,
            batch.len(),
        );
        let grads = GradientsParams::from_grads(loss.backward(), &tokens);
        let grads = peer.sum_gradients(&tokens, grads)?;
        tokens = token_optim.step(cfg.lr, tokens, grads);
        pb.inc(1);
    }
    pb.finish_and_clear();

    let mut restorers = Vec::new();
    let mut last = f64::NAN;
    for variant in VARIANTS {
        let mut model = seeded(device, cfg.seed, || Restorers::<B> {
            t2i: FeatureRestorer::new(&cfg.restore, device)
                .with_statistics(image_stats.clone(), text_stats.clone()),
            i2t: FeatureRestorer::new(&cfg.restore, device)
                .with_statistics(text_stats.clone(), image_stats.clone()),
        });
        let mut optim = AdamWConfig::new()
            .with_weight_decay(1e-4)
            .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(1.0)))
            .init();
        let pb = duet_datasets::progress::stage_bar(quiet, cfg.steps, variant.method);
        for step in 0..cfg.steps {
            let batch = batch_indices(train.n, cfg.batch_size, step, cfg.seed);
            let shard = Shard {
                rows: peer.shard_range(batch.len()),
                batch: batch.len(),
            };
            let idx = &batch[shard.rows.clone()];
            let mut rng = ChaCha8Rng::seed_from_u64(
                cfg.seed ^ 0x5EED_u64.wrapping_mul(step as u64 + 1).rotate_left(23),
            );
            let losses = restore_loss(
                &model,
                &head,
                variant,
                settings,
                &schedule,
                train.image_rows(idx, device),
                train.text_rows(idx, device),
                &shard,
                &mut rng,
            )?;
            last = peer.sum::<B>(losses.total.clone().into_scalar().elem::<f64>(), device)?;
            if !last.is_finite() {
                anyhow::bail!("{}: loss became {last} at step {step}", variant.method);
            }
            let grads = GradientsParams::from_grads(losses.total.backward(), &model);
            let grads = peer.sum_gradients(&model, grads)?;
            let lr = duet_run::warmup_cosine_lr(cfg.lr, 50, cfg.steps, step);
            model = optim.step(lr, model, grads);
            if step % 50 == 0 || step + 1 == cfg.steps {
                let (diffusion, agreement, cycle) = (
                    peer.sum::<B>(losses.diffusion, device)?,
                    peer.sum::<B>(losses.agreement, device)?,
                    peer.sum::<B>(losses.cycle, device)?,
                );
                if leader {
                    pb.set_message(format!(
                        "diffusion {diffusion:.4} agree {agreement:.4} cycle {cycle:.4}"
                    ));
                    append_metric(
                        &args.out,
                        &serde_json::json!({
                            "stage": Stage::Restore, "variant": variant.prefix, "step": step,
                            "loss": last, "diffusion": diffusion,
                            "agreement": agreement, "cycle": cycle,
                        }),
                    )?;
                }
            }
            pb.inc(1);
        }
        pb.finish_and_clear();
        if leader {
            tracing::info!(variant = variant.method, loss = last, "restorer trained");
        }
        restorers.push(model.valid());
    }
    Ok((head.valid(), tokens.valid(), restorers, last))
}
