//! The embedding pipeline on the shipped bundle (real encoders, real images) and on a
//! caption-only bundle: batch embeddings equal one-at-a-time ones and the classifier's, images
//! match their own captions, and bad inputs are typed errors.

use duet_testkit as common;

use std::path::{Path, PathBuf};

use common::*;
use duet_runtime::embed::cosine;
use duet_runtime::engine::{EngineOptions, Provider, ProviderChoice};
use duet_runtime::{preprocess, Bundle, Classifier, EmbedError, Embedder, GenerateError};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn options() -> EngineOptions {
    engine_options(true)
}

/// The sample images with their truth captions (examples/images/README.md).
const SAMPLES: [(&str, &str); 4] = [
    ("emoji-google-1f600.png", "grinning face"),
    ("emoji-google-1f347.png", "grapes"),
    ("shapeworld-val-000000.png", "a large cyan diamond on the right"),
    (
        "shapeworld-val-000001.png",
        "a large white square at the top left and a small yellow triangle on the right and a small cyan circle at the bottom left",
    ),
];

fn sample_paths() -> Vec<PathBuf> {
    SAMPLES
        .iter()
        .map(|(f, _)| repo().join("examples/images").join(f))
        .collect()
}

#[test]
fn shipped_bundle_embeddings_are_consistent_and_match_images_to_their_captions() {
    let bundle = Bundle::open(repo().join("shipped/duet-small")).unwrap();
    let images: Vec<_> = sample_paths()
        .iter()
        .map(|p| preprocess::load_image(p).unwrap())
        .collect();
    let texts: Vec<&str> = SAMPLES.iter().map(|(_, t)| *t).collect();
    for p in providers() {
        let embedder = Embedder::new(&bundle, ProviderChoice::Only(p), &options()).unwrap();
        assert!(embedder.embeds_text());
        assert!(embedder.reports().iter().all(|r| r.used == p));
        let iv = embedder.embed_images(&images).unwrap();
        let tv = embedder.embed_texts(&texts).unwrap();
        assert_eq!((iv.len(), tv.len()), (4, 4));
        assert!(iv
            .iter()
            .chain(&tv)
            .all(|v| v.len() == embedder.embed_dim()));

        // A batch gives what one input at a time gives, and what the classifier embeds.
        let classifier = Classifier::new(&bundle, ProviderChoice::Only(p), &options()).unwrap();
        for (i, img) in images.iter().enumerate() {
            let one = &embedder.embed_images(std::slice::from_ref(img)).unwrap()[0];
            let cls = classifier.embed_image(img).unwrap();
            for (a, b) in [(one, &iv[i]), (&cls, &iv[i])] {
                let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(d <= 1e-5, "{p}: image {i} differs by {d}");
            }
        }
        for (i, t) in texts.iter().enumerate() {
            let cls = classifier.embed_text(t).unwrap();
            let d = cls
                .iter()
                .zip(&tv[i])
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(d <= 1e-5, "{p}: text {i} differs by {d}");
        }

        // Each image is closest to its own caption among the four.
        for (i, v) in iv.iter().enumerate() {
            let sims: Vec<f32> = tv.iter().map(|t| cosine(v, t)).collect();
            let best = (0..4).max_by(|&a, &b| sims[a].total_cmp(&sims[b])).unwrap();
            assert_eq!(
                best, i,
                "{p}: {} best matches {:?} ({sims:?})",
                SAMPLES[i].0, texts[best]
            );
        }
    }
}

#[test]
fn texts_the_model_cannot_read_are_errors_naming_them() {
    let bundle = Bundle::open(repo().join("shipped/duet-small")).unwrap();
    let embedder =
        Embedder::new(&bundle, ProviderChoice::Only(Provider::Tract), &options()).unwrap();
    let err = embedder.embed_texts(&["grinning face", "  "]).unwrap_err();
    assert!(
        matches!(
            err,
            EmbedError::Text(GenerateError::EmptyPrompt { index: 1 })
        ),
        "{err:?}"
    );
    let err = embedder.embed_texts(&["a xylophonic zebra"]).unwrap_err();
    assert!(
        matches!(&err, EmbedError::Text(GenerateError::UnknownWords { index: 0, words })
            if words.contains(&"xylophonic".to_string())),
        "{err:?}"
    );
    assert!(embedder.embed_texts(&[]).unwrap().is_empty());
    assert!(embedder.embed_images(&[]).unwrap().is_empty());
}

#[test]
fn a_caption_only_bundle_embeds_images_but_not_texts() {
    let dir = tempfile::tempdir().unwrap();
    caption_bundle(dir.path(), -100.0);
    let bundle = Bundle::open(dir.path()).unwrap();
    let embedder =
        Embedder::new(&bundle, ProviderChoice::Only(Provider::Tract), &options()).unwrap();
    assert!(!embedder.embeds_text());
    let img = image::RgbImage::from_pixel(8, 8, image::Rgb([200, 10, 10]));
    let v = embedder.embed_images(&[img]).unwrap();
    assert_eq!(v[0].len(), embedder.embed_dim());
    let err = embedder.embed_texts(&["a cat"]).unwrap_err();
    assert!(matches!(err, EmbedError::NoTextEncoder), "{err:?}");
    assert!(err.to_string().contains("embeds images only"), "{err}");
}

#[test]
fn cosine_of_known_vectors() {
    assert_eq!(cosine(&[1.0, 0.0], &[0.0, 2.0]), 0.0);
    assert!((cosine(&[1.0, 1.0], &[2.0, 2.0]) - 1.0).abs() < 1e-6);
    assert!((cosine(&[1.0, 0.0], &[-3.0, 0.0]) + 1.0).abs() < 1e-6);
    assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
}
