//! The captioning pipeline on a small contract-conforming bundle with random weights:
//! KV-cache and full-recompute greedy decoding must agree, and so must the backends.

use duet_testkit as common;

use common::*;
use duet_runtime::engine::{EngineOptions, Provider, ProviderChoice};
use duet_runtime::{Bundle, CaptionError, Captioner};
use image::{Rgb, RgbImage};
use ndarray::Array4;

fn options() -> EngineOptions {
    engine_options(false)
}

fn pixels(batch: usize) -> Array4<f32> {
    let mut rng = Lcg::new(99);
    Array4::from_shape_vec((batch, 3, 8, 8), rng.vec(batch * 3 * 64, 1.0)).unwrap()
}

#[test]
fn kv_cache_and_full_recompute_give_identical_tokens() {
    let dir = tempfile::tempdir().unwrap();
    // EOS strongly discouraged: every caption runs to max_len, exercising every cache step.
    caption_bundle(dir.path(), -100.0);
    let bundle = Bundle::open(dir.path()).unwrap();
    let mut per_provider = Vec::new();
    for p in providers() {
        let cap = Captioner::new(&bundle, ProviderChoice::Only(p), &options()).unwrap();
        assert!(
            cap.reports().iter().all(|r| r.used == p),
            "{:?}",
            cap.reports()
        );
        let tokens = cap.encode(&pixels(3)).unwrap();
        assert_eq!(tokens.shape(), &[3, 4, 8]);
        let kv = cap.greedy_tokens_kv(&tokens).unwrap();
        let full = cap.greedy_tokens_full(&tokens, &[]).unwrap();
        assert_eq!(kv, full, "{p}");
        for ids in &kv {
            assert_eq!(ids.len(), 7, "{p}: max_len 8 = BOS + 7 tokens");
        }
        // Different images should not all caption identically with random weights.
        assert!(kv.iter().any(|t| t != &kv[0]) || kv[0].iter().any(|&t| t != kv[0][0]));
        per_provider.push(kv);
    }
    if per_provider.len() == 2 {
        assert_eq!(per_provider[0], per_provider[1], "tract vs ort-cpu tokens");
    }
}

#[test]
fn captions_stop_at_eos_and_decode() {
    let dir = tempfile::tempdir().unwrap();
    // EOS strongly favoured: the first generated token is EOS, so captions are empty.
    caption_bundle(dir.path(), 100.0);
    let bundle = Bundle::open(dir.path()).unwrap();
    for p in providers() {
        let cap = Captioner::new(&bundle, ProviderChoice::Only(p), &options()).unwrap();
        let tokens = cap.encode(&pixels(2)).unwrap();
        assert_eq!(
            cap.greedy_tokens_kv(&tokens).unwrap(),
            vec![Vec::<u32>::new(); 2]
        );
        assert_eq!(
            cap.greedy_tokens_full(&tokens, &[]).unwrap(),
            vec![Vec::<u32>::new(); 2]
        );
        assert_eq!(
            cap.caption_pixels(&pixels(2)).unwrap(),
            vec![String::new(); 2]
        );
    }
}

#[test]
fn non_finite_logits_are_an_error_not_a_caption() {
    let dir = tempfile::tempdir().unwrap();
    // A NaN in the LM head's bias (as a broken export or an fp16 overflow would give): every
    // logits row holds a NaN, whose argmax would be some arbitrary token.
    caption_bundle(dir.path(), f32::NAN);
    let bundle = Bundle::open(dir.path()).unwrap();
    for p in providers() {
        let cap = Captioner::new(&bundle, ProviderChoice::Only(p), &options()).unwrap();
        let tokens = cap.encode(&pixels(2)).unwrap();
        for err in [
            cap.greedy_tokens_kv(&tokens).unwrap_err(),
            cap.greedy_tokens_full(&tokens, &[]).unwrap_err(),
            cap.caption_pixels(&pixels(2)).unwrap_err(),
        ] {
            assert!(
                matches!(&err, CaptionError::NonFinite { graph, output }
                    if graph == "caption_decoder" && output == "logits"),
                "{p}: {err:?}"
            );
            assert_eq!(
                err.to_string(),
                "graph `caption_decoder` returned a non-finite value (NaN or infinity) in `logits`"
            );
        }
    }
}

#[test]
fn caption_text_and_token_decoding() {
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), -100.0);
    let bundle = Bundle::open(dir.path()).unwrap();
    let cap = Captioner::new(&bundle, ProviderChoice::Auto, &options()).unwrap();
    // BOS/PAD dropped, stop at EOS: ids 4.. are WORDS.
    assert_eq!(
        cap.decode_tokens(&[1, 4, 5, 0, 7, 2, 6]).unwrap(),
        "a cat sits"
    );
    let imgs = vec![
        RgbImage::from_pixel(8, 8, Rgb([200, 10, 10])),
        RgbImage::from_pixel(20, 12, Rgb([10, 10, 200])),
    ];
    let captions = cap.caption_images(&imgs).unwrap();
    assert_eq!(captions.len(), 2);
    for c in &captions {
        let words: Vec<&str> = c.split(' ').collect();
        assert_eq!(words.len(), 7, "{c:?}");
        assert!(words.iter().all(|w| WORDS.contains(w)), "{c:?}");
    }
    let report = cap
        .reports()
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(report.contains("vision_encoder: running on"), "{report}");
    assert!(report.contains("caption_decoder: running on"), "{report}");
}

#[test]
fn bad_pixel_shapes_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), -100.0);
    let bundle = Bundle::open(dir.path()).unwrap();
    let cap = Captioner::new(&bundle, ProviderChoice::Only(Provider::Tract), &options()).unwrap();
    assert!(cap.encode(&Array4::zeros((1, 3, 16, 16))).is_err());
    assert!(cap.encode(&Array4::zeros((0, 3, 8, 8))).is_err());
    assert!(cap
        .greedy_tokens_kv(&ndarray::Array3::zeros((1, 5, 8)))
        .is_err());
}

#[test]
fn tokenizer_vocab_must_match_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = caption_bundle(dir.path(), 0.0);
    // Claim a bigger vocabulary than the tokenizer has (graphs don't matter: it fails first).
    m.model.vocab_size += 1;
    for g in &mut m.graphs {
        for t in g.outputs.iter_mut().filter(|t| t.name == "logits") {
            t.shape[2] = duet_runtime::manifest::DimSpec::Fixed(m.model.vocab_size);
        }
    }
    write_manifest(dir.path(), &m);
    let bundle = Bundle::open(dir.path()).unwrap();
    let e = Captioner::new(&bundle, ProviderChoice::Only(Provider::Tract), &options()).unwrap_err();
    assert!(e.to_string().contains("tokens but model.vocab_size"), "{e}");
}

#[test]
fn pipelines_built_from_one_engine_set_share_each_graph() {
    use duet_runtime::manifest::Graph;
    use duet_runtime::EngineSet;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), -100.0);
    let bundle = Bundle::open(dir.path()).unwrap();
    let tract = ProviderChoice::Only(Provider::Tract);
    let mut engines = EngineSet::new(&bundle, tract, &options());
    let a = Captioner::with_engines(&mut engines).unwrap();
    let b = Captioner::with_engines(&mut engines).unwrap();
    assert_eq!(engines.loaded(), 2, "two graphs, each loaded once");
    let (v1, r1) = engines
        .get::<duet_runtime::Error>(Graph::VisionEncoder)
        .unwrap();
    let (v2, _) = engines
        .get::<duet_runtime::Error>(Graph::VisionEncoder)
        .unwrap();
    assert!(Arc::ptr_eq(&v1, &v2));
    assert_eq!(r1.used, Provider::Tract);
    assert_eq!(a.reports(), b.reports());
    // Sharing changes nothing in the answers.
    let img = RgbImage::from_fn(8, 8, |x, y| Rgb([(x * 30) as u8, (y * 30) as u8, 90]));
    assert_eq!(
        a.caption_images(std::slice::from_ref(&img)).unwrap(),
        b.caption_images(&[img]).unwrap()
    );
    // A graph the bundle lacks is the bundle's error, not a panic.
    assert!(engines.get::<duet_runtime::Error>(Graph::Denoiser).is_err());
    assert!(engines
        .get::<duet_runtime::Error>(Graph::CaptionDecoder)
        .is_ok());
    assert_eq!(engines.loaded(), 2);
}

/// `EngineSet::preload` loads the graphs not loaded yet, each on its own thread: the same
/// engines a sequential load gives, reused by later pipelines; a graph that fails is the first
/// error in the caller's order, and the graphs that loaded are kept.
#[test]
fn preloading_in_parallel_keeps_order_and_what_loaded() {
    use duet_runtime::manifest::Graph;
    use duet_runtime::EngineSet;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), -100.0);
    let bundle = Bundle::open(dir.path()).unwrap();
    let tract = ProviderChoice::Only(Provider::Tract);
    let mut engines = EngineSet::new(&bundle, tract, &options());
    // The denoiser is not in a caption bundle: the first failing graph in the order given.
    let e = engines
        .preload::<duet_runtime::Error>(&[
            Graph::VisionEncoder,
            Graph::Denoiser,
            Graph::CaptionDecoder,
            Graph::TextEncoder,
        ])
        .unwrap_err();
    assert!(e.to_string().contains("denoiser"), "{e}");
    assert_eq!(engines.loaded(), 2, "both caption graphs loaded and kept");
    let (v1, _) = engines
        .get::<duet_runtime::Error>(Graph::VisionEncoder)
        .unwrap();
    let captioner = Captioner::with_engines(&mut engines).unwrap();
    assert_eq!(
        engines.loaded(),
        2,
        "the captioner reused the preloaded graphs"
    );
    let (v2, _) = engines
        .get::<duet_runtime::Error>(Graph::VisionEncoder)
        .unwrap();
    assert!(Arc::ptr_eq(&v1, &v2));
    // And answers as a captioner built on its own.
    let img = RgbImage::from_fn(8, 8, |x, y| Rgb([(x * 30) as u8, (y * 30) as u8, 90]));
    let alone = Captioner::new(&bundle, tract, &options()).unwrap();
    assert_eq!(
        captioner
            .caption_images(std::slice::from_ref(&img))
            .unwrap(),
        alone.caption_images(&[img]).unwrap()
    );
}
