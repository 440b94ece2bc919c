//! Parity inputs: seeded ShapeWorld scenes, captions and noise fed to each graph in Burn and in
//! the exported ONNX, with the Burn outputs they must match.

use duet_datasets::image_to_chw;
use duet_datasets::pair_tasks::{PairData, PairTask};
use duet_datasets::shapeworld::{caption, generate_scene, render, SceneConfig};
use duet_datasets::tokenizer::encode_caption;
use duet_models::params::named_tensors;
use duet_models::tokens::{BOS_ID, EOS_ID, PAD_ID};
use duet_models::CaptionModel;
use duet_runtime::manifest::Graph;
use ndarray::{ArrayD, IxDyn};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::onnx::{ExportError, Weights};
use crate::parity::{
    decoder_cases, denoiser_cases, dream_cases, fusion_head_cases, parity_rng, random_array,
    random_ids, restorer_cases, text_cases, vision_cases, DenoiserInputs, DreamInputs, ParityCase,
    RestorerInputs,
};

use super::*;

/// Parity cases of `restorer_t2i`, `restorer_i2t` and `fusion_head`.
pub(super) type RestoreCases = (Vec<ParityCase>, Vec<ParityCase>, Vec<ParityCase>);

/// Parity inputs of the restoration graphs: real embeddings of seeded task examples (the
/// restorers' conditions and the head's pairs), samples at timesteps across the schedule, and
/// random embeddings.
pub(super) fn restore_parity_inputs(
    src: &Source,
    r: &RestoreSource,
    device: &RefDevice,
) -> Result<RestoreCases, ExportError> {
    let err = |e: anyhow::Error| ExportError::Parity {
        graph: Graph::FusionHead.name().to_owned(),
        reason: format!("embedding the parity examples: {e:#}"),
    };
    // A folder run's parity inputs are still seeded ShapeWorld pairs: parity needs realistic
    // embeddings, not the user's data (which need not be on the exporting machine).
    let task = match &r.config.task {
        PairData::Task(t) => *t,
        PairData::Folder(_) => PairTask::ColourColumn,
    };
    let examples = task.examples(6, PARITY_SEED, src.model.image_size as u32);
    let images: Vec<&image::RgbImage> = examples.iter().map(|e| &e.image).collect();
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let n = examples.len();
    let e = r.config.restore.embed_dim;
    let image = crate::parity::to_array(r.backbones.embed_images(&images, device).map_err(err)?);
    let text = crate::parity::to_array(r.backbones.embed_texts(&texts, device).map_err(err)?);
    let mut rng = parity_rng(PARITY_SEED ^ 0x7E57);
    let steps = r.schedule.train_steps() - 1;
    let timestep = ArrayD::from_shape_fn(IxDyn(&[n]), |ix| (ix[0] * steps / (n - 1)) as f32);
    let cases = |restorer, cond: &ArrayD<f32>, rng: &mut rand_chacha::ChaCha8Rng| {
        restorer_cases(
            restorer,
            &[
                RestorerInputs {
                    label: format!("real conditions, timesteps 0..={steps}"),
                    x: random_array(rng, &[n, e], 2.0),
                    timestep: timestep.clone(),
                    condition: cond.clone(),
                },
                RestorerInputs {
                    label: "random conditions".to_owned(),
                    x: random_array(rng, &[2, e], 1.0),
                    timestep: ArrayD::from_shape_vec(IxDyn(&[2]), vec![3.0, 640.0])
                        .expect("2 values fill [2]"),
                    condition: random_array(rng, &[2, e], 0.3),
                },
            ],
            device,
        )
    };
    let t2i = cases(&r.restorers.t2i, &text, &mut rng);
    let i2t = cases(&r.restorers.i2t, &image, &mut rng);
    let head = fusion_head_cases(
        &r.head,
        &[
            ("real pairs".to_owned(), image.clone(), text.clone()),
            (
                "random embeddings".to_owned(),
                random_array(&mut rng, &[3, e], 0.3),
                random_array(&mut rng, &[3, e], 0.3),
            ),
        ],
        device,
    );
    Ok((t2i, i2t, head))
}

/// Every float parameter of the Burn model, by module path, as the graph builders read them.
pub fn weights_of(model: &CaptionModel<Ref>) -> Result<Weights, ExportError> {
    let mut w = Weights::new();
    for (name, t) in named_tensors(model) {
        w.insert(name, t.shape, t.data)?;
    }
    Ok(w)
}

/// Parity inputs: real ShapeWorld renders with their captions (seeded, drawn at the model's
/// image size) and random pixels / random tokens, for both graphs.
pub(super) fn parity_inputs(
    src: &Source,
    device: &RefDevice,
) -> Result<(Vec<ParityCase>, Vec<ParityCase>), ExportError> {
    let cfg = &src.model;
    let s = cfg.image_size;
    let scenes = parity_scenes(s);
    let mut pixels = Vec::with_capacity(4 * 3 * s * s);
    let mut seqs = Vec::new();
    for scene in &scenes {
        pixels.extend(image_to_chw(&render(scene, s as u32)));
        let ids = encode_caption(&src.tokenizer, &caption(scene), cfg.max_len).map_err(|e| {
            ExportError::Parity {
                graph: Graph::CaptionDecoder.name().to_owned(),
                reason: format!("encoding a parity caption: {e}"),
            }
        })?;
        seqs.push(ids);
    }
    let real_pixels = ArrayD::from_shape_vec(IxDyn(&[4, 3, s, s]), pixels)
        .expect("4 rendered images fill [4, 3, S, S]");
    let mut rng = parity_rng(PARITY_SEED);
    let random_pixels = random_array(&mut rng, &[2, 3, s, s], 1.0);
    let vision = vision_cases(
        &src.captioner,
        &[
            ("real ShapeWorld images".to_owned(), real_pixels.clone()),
            ("random pixels".to_owned(), random_pixels),
        ],
        device,
    );

    // Real captions, cut to the shortest one so they form one [B, L] batch.
    let l = seqs.iter().map(Vec::len).min().unwrap_or(2).clamp(2, 12);
    let ids = ArrayD::from_shape_fn(IxDyn(&[4, l]), |ix| i64::from(seqs[ix[0]][ix[1]]));
    let image_tokens = vision[0].expected[0].1.clone();
    let mut decoder = decoder_cases(&src.captioner, "real captions", &image_tokens, &ids, device);
    let rand_tokens = random_array(&mut rng, &[3, cfg.num_patches(), cfg.d_model], 2.0);
    let rand_ids = random_ids(&mut rng, 3, 6, cfg.vocab_size);
    decoder.extend(decoder_cases(
        &src.captioner,
        "random tokens",
        &rand_tokens,
        &rand_ids,
        device,
    ));
    Ok((vision, decoder))
}

/// Parity inputs of the dream encoder: the parity scenes' captions as prompts over their images'
/// tokens (the vision cases' first output), and random ids over random tokens.
pub(super) fn dream_parity_inputs(
    src: &Source,
    queries: &duet_models::DreamQueries<Ref>,
    vision: &[ParityCase],
    device: &RefDevice,
) -> Result<Vec<ParityCase>, ExportError> {
    let cfg = &src.model;
    let l = cfg.max_len;
    let mut seqs = Vec::new();
    for scene in parity_scenes(cfg.image_size) {
        let mut ids = encode_caption(&src.tokenizer, &caption(&scene), l).map_err(|e| {
            ExportError::Parity {
                graph: Graph::DreamEncoder.name().to_owned(),
                reason: format!("encoding a parity caption: {e}"),
            }
        })?;
        ids.pop();
        seqs.push(ids);
    }
    let n = seqs.len();
    let ids = ArrayD::from_shape_fn(IxDyn(&[n, l]), |ix| {
        seqs[ix[0]]
            .get(ix[1])
            .map_or(i64::from(PAD_ID), |&t| i64::from(t))
    });
    let mask = ArrayD::from_shape_fn(IxDyn(&[n, l]), |ix| {
        f32::from(u8::from(ix[1] < seqs[ix[0]].len()))
    });
    let image_tokens = vision
        .first()
        .and_then(|c| c.expected.first())
        .map(|(_, t)| t.clone())
        .ok_or_else(|| ExportError::Parity {
            graph: Graph::DreamEncoder.name().to_owned(),
            reason: "no vision parity case to take image tokens from".to_owned(),
        })?;
    let mut rng = parity_rng(PARITY_SEED ^ 0xD3);
    let rand_ids = random_ids(&mut rng, 2, l, cfg.vocab_size);
    let rand_mask = ArrayD::from_shape_fn(IxDyn(&[2, l]), |ix| {
        f32::from(u8::from(ix[1] < 3 + 5 * ix[0]))
    });
    let rand_tokens = random_array(&mut rng, &[2, cfg.num_patches(), cfg.d_model], 2.0);
    Ok(dream_cases(
        &src.captioner.decoder,
        queries,
        &[
            DreamInputs {
                label: "real captions over their images".to_owned(),
                ids,
                mask,
                image_tokens,
            },
            DreamInputs {
                label: "random ids over random tokens".to_owned(),
                ids: rand_ids,
                mask: rand_mask,
                image_tokens: rand_tokens,
            },
        ],
        device,
    ))
}

/// Four seeded ShapeWorld scenes at image size `s`: the real inputs of every parity check.
pub(super) fn parity_scenes(s: usize) -> Vec<duet_datasets::shapeworld::Scene> {
    let scene_cfg = SceneConfig {
        image_size: s as u32,
        min_objects: 1,
        max_objects: 4,
    };
    let mut scene_rng = ChaCha8Rng::seed_from_u64(PARITY_SEED);
    (0..4)
        .map(|_| generate_scene(&mut scene_rng, &scene_cfg))
        .collect()
}

/// Parity inputs of the generation graphs: the real captions of [`parity_scenes`] plus the
/// empty caption (the unconditional branch) and random ids for the text encoder; noisy images
/// at timesteps across the schedule with real and random text features for the denoiser.
pub(super) fn generator_parity_inputs(
    src: &Source,
    gen: &GeneratorSource,
    device: &RefDevice,
) -> Result<(Vec<ParityCase>, Vec<ParityCase>), ExportError> {
    let cfg = &src.model;
    let (s, l, d) = (cfg.image_size, cfg.max_len, cfg.d_model);
    let mut seqs = Vec::new();
    for scene in parity_scenes(s) {
        let ids = encode_caption(&src.tokenizer, &caption(&scene), l).map_err(|e| {
            ExportError::Parity {
                graph: Graph::TextEncoder.name().to_owned(),
                reason: format!("encoding a parity caption: {e}"),
            }
        })?;
        seqs.push(ids.iter().map(|&t| i64::from(t)).collect::<Vec<_>>());
    }
    seqs.push(vec![i64::from(BOS_ID), i64::from(EOS_ID)]);
    let n = seqs.len();
    let real_ids = ArrayD::from_shape_fn(IxDyn(&[n, l]), |ix| {
        seqs[ix[0]].get(ix[1]).copied().unwrap_or(i64::from(PAD_ID))
    });
    let real_mask = ArrayD::from_shape_fn(IxDyn(&[n, l]), |ix| {
        f32::from(u8::from(ix[1] < seqs[ix[0]].len()))
    });
    let mut rng = parity_rng(PARITY_SEED ^ 0x6E);
    let rand_ids = random_ids(&mut rng, 2, l, cfg.vocab_size);
    let rand_mask = ArrayD::from_shape_fn(IxDyn(&[2, l]), |ix| {
        f32::from(u8::from(ix[1] < 7 + 9 * ix[0]))
    });
    let text = text_cases(
        &gen.generator.text,
        &[
            (
                "real captions + empty caption".to_owned(),
                real_ids,
                real_mask.clone(),
            ),
            ("random ids".to_owned(), rand_ids, rand_mask),
        ],
        device,
    );

    // Real text features cut to the longest caption, as the runtime feeds them.
    let longest = seqs.iter().map(Vec::len).max().unwrap_or(2);
    let tokens = text[0].expected[0]
        .1
        .slice(ndarray::s![.., ..longest, ..])
        .to_owned()
        .into_dyn();
    let mask = real_mask
        .slice(ndarray::s![.., ..longest])
        .to_owned()
        .into_dyn();
    let steps = gen.schedule.train_steps() - 1;
    let timestep = ArrayD::from_shape_fn(IxDyn(&[n]), |ix| (ix[0] * steps / (n - 1)) as f32);
    let x = random_array(&mut rng, &[n, 3, s, s], 2.0);
    let rand_tokens = random_array(&mut rng, &[2, 5, d], 2.0);
    let rand_mask = ArrayD::from_shape_fn(IxDyn(&[2, 5]), |ix| {
        f32::from(u8::from(ix[1] < 3 + 2 * ix[0]))
    });
    let denoiser = denoiser_cases(
        cfg,
        &gen.generator.denoiser,
        &[
            DenoiserInputs {
                label: format!("real text features, timesteps 0..={steps}"),
                x,
                timestep,
                text_tokens: tokens,
                text_mask: mask,
            },
            DenoiserInputs {
                label: "random text features".to_owned(),
                x: random_array(&mut rng, &[2, 3, s, s], 1.0),
                timestep: ArrayD::from_shape_vec(IxDyn(&[2]), vec![17.0, 512.0])
                    .expect("2 values fill [2]"),
                text_tokens: rand_tokens,
                text_mask: rand_mask,
            },
        ],
        device,
    );
    Ok((text, denoiser))
}
