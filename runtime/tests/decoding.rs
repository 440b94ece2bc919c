//! Decoding options on a small contract-conforming captioning bundle with random weights, on
//! every engine: beam width 1 is greedy, beam search scores at least as well as greedy, the
//! reported scores are the model's, temperature 0 is greedy, a seed repeats, a prompt is
//! continued exactly as the full-recompute reference continues it, and streamed pieces add up
//! to the text.

use duet_testkit as common;

use common::*;
use duet_runtime::engine::{EngineOptions, Provider, ProviderChoice};
use duet_runtime::{
    Bundle, CaptionError, Captioner, DecodeOptions, Decoded, Decoding, ErrorKind, Sampling,
};
use image::{Rgb, RgbImage};
use ndarray::{Array3, Array4};

fn options() -> EngineOptions {
    engine_options(false)
}

fn pixels(batch: usize, seed: u64) -> Array4<f32> {
    let mut rng = Lcg::new(seed);
    Array4::from_shape_vec((batch, 3, 8, 8), rng.vec(batch * 3 * 64, 1.0)).unwrap()
}

fn opts(decoding: Decoding) -> DecodeOptions {
    DecodeOptions {
        decoding,
        max_tokens: None,
    }
}

fn decode(cap: &Captioner, tokens: &Array3<f32>, prompt: &[u32], o: DecodeOptions) -> Vec<Decoded> {
    cap.decode(tokens, prompt, &o, None).unwrap()
}

#[test]
fn beam_width_one_is_greedy_and_wider_beams_score_at_least_as_well() {
    let dir = tempfile::tempdir().unwrap();
    // An EOS bias that ends texts at different lengths.
    caption_bundle(dir.path(), 3.5);
    let bundle = Bundle::open(dir.path()).unwrap();
    for p in providers() {
        let cap = Captioner::new(&bundle, ProviderChoice::Only(p), &options()).unwrap();
        let tokens = cap.encode(&pixels(6, 5)).unwrap();
        let greedy = decode(&cap, &tokens, &[], opts(Decoding::Greedy));
        assert_eq!(
            greedy.iter().map(|d| d.ids.clone()).collect::<Vec<_>>(),
            cap.greedy_tokens_full(&tokens, &[]).unwrap(),
            "{p}"
        );
        let beam1 = decode(&cap, &tokens, &[], opts(Decoding::Beam { width: 1 }));
        for (g, b) in greedy.iter().zip(&beam1) {
            assert_eq!(g.ids, b.ids, "{p}");
            assert_eq!(g.eos, b.eos, "{p}");
            // Rows batched differently round differently in the last bits.
            assert!((g.log_prob - b.log_prob).abs() < 1e-5, "{p}: {g:?} {b:?}");
        }
        let lengths: Vec<usize> = greedy.iter().map(|d| d.ids.len()).collect();
        assert!(
            lengths.iter().any(|&l| l != lengths[0]),
            "{p}: the bias should give texts of different lengths, got {lengths:?}"
        );
        let mut strictly_better = 0;
        for width in [2, 4, 8] {
            let beam = decode(&cap, &tokens, &[], opts(Decoding::Beam { width }));
            for (g, b) in greedy.iter().zip(&beam) {
                assert!(
                    b.log_prob >= g.log_prob - 1e-5,
                    "{p}: width {width} found {b:?}, worse than greedy's {g:?}"
                );
                strictly_better += usize::from(b.log_prob > g.log_prob + 1e-6);
            }
        }
        assert!(
            strictly_better > 0,
            "{p}: no beam ever beat greedy: the search is not searching"
        );
    }
}

#[test]
fn reported_scores_are_the_models_log_probabilities() {
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), 1.5);
    let bundle = Bundle::open(dir.path()).unwrap();
    for p in providers() {
        let cap = Captioner::new(&bundle, ProviderChoice::Only(p), &options()).unwrap();
        let tokens = cap.encode(&pixels(4, 8)).unwrap();
        let prompt = cap.prompt_ids("the dog").unwrap();
        for decoding in [
            Decoding::Greedy,
            Decoding::Beam { width: 3 },
            Decoding::Sample(Sampling {
                seed: 3,
                ..Sampling::default()
            }),
        ] {
            let out = decode(&cap, &tokens, &prompt, opts(decoding));
            assert!(out.iter().any(|d| d.eos), "{p} {decoding:?}: {out:?}");
            for (i, d) in out.iter().enumerate() {
                // Re-scored in one full-recompute call, independently of the KV-cache loop.
                let img = tokens.slice(ndarray::s![i..i + 1, .., ..]).to_owned();
                let again = cap.score(&img, &prompt, &d.ids, d.eos).unwrap()[0];
                assert!(
                    (again - d.log_prob).abs() < 1e-4,
                    "{p} {decoding:?}: decoding says {}, the model {again}",
                    d.log_prob
                );
                assert!(d.log_prob < 0.0, "{d:?}");
            }
        }
        let too_long = [4u32; 8];
        assert!(matches!(
            cap.score(&tokens, &[], &too_long, false).unwrap_err(),
            CaptionError::TextTooLong { tokens: 9, max: 8 }
        ));
    }
}

#[test]
fn sampling_repeats_with_a_seed_and_temperature_zero_is_greedy() {
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), -100.0);
    let bundle = Bundle::open(dir.path()).unwrap();
    for p in providers() {
        let cap = Captioner::new(&bundle, ProviderChoice::Only(p), &options()).unwrap();
        let tokens = cap.encode(&pixels(4, 9)).unwrap();
        let greedy = decode(&cap, &tokens, &[], opts(Decoding::Greedy));
        let cold = decode(
            &cap,
            &tokens,
            &[],
            opts(Decoding::Sample(Sampling {
                temperature: 0.0,
                seed: 42,
                ..Sampling::default()
            })),
        );
        assert_eq!(greedy, cold, "{p}");
        let hot = |seed| {
            decode(
                &cap,
                &tokens,
                &[],
                opts(Decoding::Sample(Sampling {
                    temperature: 2.0,
                    seed,
                    ..Sampling::default()
                })),
            )
        };
        assert_eq!(hot(1), hot(1), "{p}: a seed must repeat");
        assert_ne!(hot(1), hot(2), "{p}: other seeds should differ");
        assert_ne!(hot(1), greedy, "{p}: temperature 2 should leave greedy");
        // An image's text does not depend on the batch it is in.
        let alone = cap.encode(&pixels(4, 9)).unwrap();
        let first = alone.slice(ndarray::s![0..1, .., ..]).to_owned();
        let one = cap
            .decode(
                &first,
                &[],
                &opts(Decoding::Sample(Sampling {
                    temperature: 2.0,
                    seed: 1,
                    ..Sampling::default()
                })),
                None,
            )
            .unwrap();
        assert_eq!(one[0], hot(1)[0], "{p}");
        // top_k 1 is greedy whatever the temperature.
        let k1 = decode(
            &cap,
            &tokens,
            &[],
            opts(Decoding::Sample(Sampling {
                temperature: 5.0,
                top_k: Some(1),
                seed: 9,
                top_p: None,
            })),
        );
        assert_eq!(
            k1.iter().map(|d| &d.ids).collect::<Vec<_>>(),
            greedy.iter().map(|d| &d.ids).collect::<Vec<_>>(),
            "{p}"
        );
    }
}

#[test]
fn a_prompt_is_continued_like_the_reference_and_max_tokens_caps() {
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), -100.0);
    let bundle = Bundle::open(dir.path()).unwrap();
    for p in providers() {
        let cap = Captioner::new(&bundle, ProviderChoice::Only(p), &options()).unwrap();
        let tokens = cap.encode(&pixels(3, 12)).unwrap();
        let prompt = cap.prompt_ids("a red ball").unwrap();
        assert_eq!(prompt.len(), 3);
        let kv = decode(&cap, &tokens, &prompt, opts(Decoding::Greedy));
        let full = cap.greedy_tokens_full(&tokens, &prompt).unwrap();
        assert_eq!(
            kv.iter().map(|d| d.ids.clone()).collect::<Vec<_>>(),
            full,
            "{p}"
        );
        // max_len 8 = BOS + 3 prompt tokens + 4 generated.
        assert!(kv.iter().all(|d| d.ids.len() == 4 && !d.eos), "{p}: {kv:?}");
        let no_prompt = decode(&cap, &tokens, &[], opts(Decoding::Greedy));
        assert_ne!(kv, no_prompt, "{p}: the prompt should change the text");
        for width in [1, 3] {
            let capped = decode(
                &cap,
                &tokens,
                &prompt,
                DecodeOptions {
                    decoding: Decoding::Beam { width },
                    max_tokens: Some(2),
                },
            );
            assert!(capped.iter().all(|d| d.ids.len() == 2), "{p}: {capped:?}");
        }
        let capped = decode(
            &cap,
            &tokens,
            &prompt,
            DecodeOptions {
                decoding: Decoding::Greedy,
                max_tokens: Some(2),
            },
        );
        for (c, k) in capped.iter().zip(&kv) {
            assert_eq!(c.ids[..], k.ids[..2], "{p}");
        }
    }
}

#[test]
fn streamed_pieces_add_up_to_the_text() {
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), 1.5);
    let bundle = Bundle::open(dir.path()).unwrap();
    let cap = Captioner::new(&bundle, ProviderChoice::Only(Provider::Tract), &options()).unwrap();
    let tokens = cap.encode(&pixels(3, 21)).unwrap();
    for decoding in [Decoding::Greedy, Decoding::Beam { width: 3 }] {
        let mut pieces = vec![String::new(); 3];
        let mut calls = 0;
        let out = cap
            .decode(
                &tokens,
                &[],
                &opts(decoding),
                Some(&mut |i: usize, text: &str| {
                    pieces[i].push_str(text);
                    calls += 1;
                }),
            )
            .unwrap();
        let tokens_out: usize = out.iter().map(|d| d.ids.len()).sum();
        assert!(calls > 0 && calls <= tokens_out, "{calls} calls");
        for (piece, d) in pieces.iter().zip(&out) {
            assert_eq!(piece, &cap.decode_tokens(&d.ids).unwrap(), "{decoding:?}");
        }
    }
    // The image-level helper streams too and returns the same text.
    let img = RgbImage::from_fn(8, 8, |x, y| Rgb([(x * 30) as u8, (y * 30) as u8, 99]));
    let mut streamed = String::new();
    let texts = cap
        .caption_images_with(
            std::slice::from_ref(&img),
            Some("the cat"),
            &opts(Decoding::Greedy),
            Some(&mut |_, t: &str| streamed.push_str(t)),
        )
        .unwrap();
    assert_eq!(texts, vec![streamed]);
}

#[test]
fn bad_options_and_prompts_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), 0.0);
    let bundle = Bundle::open(dir.path()).unwrap();
    let cap = Captioner::new(&bundle, ProviderChoice::Only(Provider::Tract), &options()).unwrap();
    let tokens = cap.encode(&pixels(1, 1)).unwrap();
    let bad = [
        opts(Decoding::Beam { width: 0 }),
        opts(Decoding::Beam { width: 17 }),
        opts(Decoding::Sample(Sampling {
            temperature: f32::INFINITY,
            ..Sampling::default()
        })),
        opts(Decoding::Sample(Sampling {
            top_p: Some(1.5),
            ..Sampling::default()
        })),
        DecodeOptions {
            decoding: Decoding::Greedy,
            max_tokens: Some(0),
        },
    ];
    for o in bad {
        let err = cap.decode(&tokens, &[], &o, None).unwrap_err();
        assert!(
            matches!(err, CaptionError::InvalidOption(_)),
            "{o:?}: {err}"
        );
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }
    let err = cap.prompt_ids("  ").unwrap_err();
    assert!(matches!(err, CaptionError::EmptyPrompt), "{err}");
    let err = cap.prompt_ids("a purple ball").unwrap_err();
    assert!(
        matches!(&err, CaptionError::UnknownWords { words } if words == &["purple"]),
        "{err}"
    );
    // BOS + 7 words fills max_len 8: no room left to answer.
    let err = cap.prompt_ids("a cat sits on the mat under").unwrap_err();
    assert!(
        matches!(err, CaptionError::PromptTooLong { tokens: 8, max: 7 }),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(cap.prompt_ids("a cat sits on the mat").is_ok());
}
