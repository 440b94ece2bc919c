//! `eval --stage restore`: every way of standing in for a missing modality, at missing rates
//! 0–90 % for image-missing, text-missing and mixed, scored by the frozen fusion head on the
//! held-out examples (accuracy and macro-F1), plus how close each stand-in is to the real
//! missing feature (cosine).

use std::fmt;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::plot::{LineChart, Series};
use crate::stages::restore::{ddim_restore, extract_features, to_vec, PairFeatures};
use duet_datasets::folders::ImageTarget;
use duet_diffusion::NoiseSchedule;
use duet_run::{load_restore, LoadedRestore, VARIANTS};

/// The missing rates every setting is scored at.
pub const RATES: [f64; 5] = [0.0, 0.3, 0.5, 0.7, 0.9];

/// Which modality goes missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Setting {
    ImageMissing,
    TextMissing,
    /// Each missing example loses its image or its text, half and half.
    Mixed,
}

impl Setting {
    pub const ALL: [Setting; 3] = [Setting::ImageMissing, Setting::TextMissing, Setting::Mixed];
    pub fn name(self) -> &'static str {
        match self {
            Setting::ImageMissing => "image missing",
            Setting::TextMissing => "text missing",
            Setting::Mixed => "mixed",
        }
    }
}

/// Scores of one method in one setting, one entry per rate of [`RATES`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodScores {
    pub method: String,
    pub accuracy: Vec<f64>,
    pub macro_f1: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SettingReport {
    pub setting: Setting,
    pub methods: Vec<MethodScores>,
}

/// Mean cosine between each stand-in and the real feature it replaces (held-out examples).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Closeness {
    pub method: String,
    pub image_cosine: f64,
    pub text_cosine: f64,
    /// The same after subtracting the training mean from both vectors: the embeddings are
    /// anisotropic (a shared direction dominates raw cosine), so this is the part that says
    /// whether a stand-in carries the example's own information. Mean-fill scores 0 here.
    pub image_centred: f64,
    pub text_centred: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreReport {
    pub task: String,
    pub test_examples: usize,
    pub rates: Vec<f64>,
    pub settings: Vec<SettingReport>,
    pub closeness: Vec<Closeness>,
    /// Accuracy of the best possible classifier that sees only the image / only the text.
    /// The best accuracy of one view alone, known for the built-in tasks (`None` for a
    /// user's folder).
    pub image_only_ceiling: Option<f64>,
    pub text_only_ceiling: Option<f64>,
}

impl RestoreReport {
    /// `(accuracy, macro_f1)` of `method` in `setting` at `rate`.
    pub fn score(&self, setting: Setting, method: &str, rate: f64) -> Option<(f64, f64)> {
        let r = self.rates.iter().position(|&x| (x - rate).abs() < 1e-9)?;
        let s = self.settings.iter().find(|s| s.setting == setting)?;
        let m = s.methods.iter().find(|m| m.method == method)?;
        Some((m.accuracy[r], m.macro_f1[r]))
    }

    /// A PNG: accuracy (top row) and macro-F1 (bottom row) against the missing rate, one panel
    /// per setting, one line per method.
    pub fn plot(&self) -> image::RgbImage {
        let mut charts = Vec::new();
        for metric in ["accuracy", "macro-F1"] {
            for s in &self.settings {
                charts.push(LineChart {
                    title: format!("{}: {} ({metric})", self.task, s.setting.name()),
                    x_label: "missing rate".into(),
                    series: s
                        .methods
                        .iter()
                        .map(|m| Series {
                            name: m.method.clone(),
                            points: self
                                .rates
                                .iter()
                                .zip(if metric == "accuracy" {
                                    &m.accuracy
                                } else {
                                    &m.macro_f1
                                })
                                .map(|(&x, &y)| (x, y))
                                .collect(),
                        })
                        .collect(),
                });
            }
        }
        crate::plot::grid(&charts, 3)
    }
}

impl fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ceiling =
            |c: Option<f64>| c.map_or_else(|| "unknown".to_owned(), |c| format!("{c:.3}"));
        writeln!(
            f,
            "task {} ({} held-out examples); single-modality ceilings: image {}, text {}",
            self.task,
            self.test_examples,
            ceiling(self.image_only_ceiling),
            ceiling(self.text_only_ceiling)
        )?;
        for s in &self.settings {
            writeln!(
                f,
                "\n{} — accuracy / macro-F1 by missing rate",
                s.setting.name()
            )?;
            write!(f, "| method |")?;
            for r in &self.rates {
                write!(f, " {:.0}% |", r * 100.0)?;
            }
            writeln!(f)?;
            write!(f, "|---|")?;
            for _ in &self.rates {
                write!(f, "---|")?;
            }
            writeln!(f)?;
            for m in &s.methods {
                write!(f, "| {} |", m.method)?;
                for (a, f1) in m.accuracy.iter().zip(&m.macro_f1) {
                    write!(f, " {a:.3} / {f1:.3} |")?;
                }
                writeln!(f)?;
            }
        }
        writeln!(
            f,
            "\ncosine to the real missing feature (held-out), raw and centred on the training mean\n\
             | method | image | text | image (centred) | text (centred) |\n|---|---|---|---|---|"
        )?;
        for c in &self.closeness {
            writeln!(
                f,
                "| {} | {:.3} | {:.3} | {:.3} | {:.3} |",
                c.method, c.image_cosine, c.text_cosine, c.image_centred, c.text_centred
            )?;
        }
        Ok(())
    }
}

/// Macro-averaged F1 over the classes that occur in the labels or the predictions.
pub fn macro_f1(pred: &[usize], truth: &[usize], classes: usize) -> f64 {
    let mut tp = vec![0usize; classes];
    let mut fp = vec![0usize; classes];
    let mut fnn = vec![0usize; classes];
    for (&p, &t) in pred.iter().zip(truth) {
        if p == t {
            tp[t] += 1;
        } else {
            fp[p] += 1;
            fnn[t] += 1;
        }
    }
    let mut sum = 0.0;
    let mut n = 0usize;
    for c in 0..classes {
        if tp[c] + fp[c] + fnn[c] == 0 {
            continue;
        }
        sum += 2.0 * tp[c] as f64 / (2 * tp[c] + fp[c] + fnn[c]) as f64;
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Which examples miss which modality: `None` (complete), `Some(true)` (image missing) or
/// `Some(false)` (text missing). Exactly `round(rate · n)` examples miss one, chosen by a
/// seeded permutation; in the mixed setting the first half of them miss the image.
pub fn missing_mask(n: usize, rate: f64, setting: Setting, seed: u64) -> Vec<Option<bool>> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let k = (rate * n as f64).round() as usize;
    let mut mask = vec![None; n];
    for (j, &i) in order[..k].iter().enumerate() {
        mask[i] = Some(match setting {
            Setting::ImageMissing => true,
            Setting::TextMissing => false,
            Setting::Mixed => j < k / 2,
        });
    }
    mask
}

/// Stand-ins for every held-out example's image and text features, per method.
struct StandIns {
    method: String,
    image: Vec<f32>,
    text: Vec<f32>,
}

fn repeat(row: &[f32], n: usize) -> Vec<f32> {
    row.iter().copied().cycle().take(row.len() * n).collect()
}

/// Mean cosine between the rows of `a` and `b` after subtracting `centre` from both (0 for a
/// zero-length row).
fn mean_cosine(a: &[f32], b: &[f32], centre: &[f32]) -> f64 {
    let dim = centre.len();
    let mut sum = 0.0;
    let mut n = 0;
    for (x, y) in a.chunks_exact(dim).zip(b.chunks_exact(dim)) {
        let (mut dot, mut nx, mut ny) = (0.0f64, 0.0f64, 0.0f64);
        for ((&p, &q), &c) in x.iter().zip(y).zip(centre) {
            let (p, q) = (f64::from(p - c), f64::from(q - c));
            dot += p * q;
            nx += p * p;
            ny += q * q;
        }
        sum += if nx * ny > 1e-24 {
            dot / (nx * ny).sqrt()
        } else {
            0.0
        };
        n += 1;
    }
    sum / n.max(1) as f64
}

/// Restored (and gated) features of every example, in batches.
pub fn restore_all<B: Backend>(
    loaded: &LoadedRestore<B>,
    test: &PairFeatures,
    variant: usize,
    seed: u64,
    device: &B::Device,
) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
    let v = VARIANTS[variant];
    let model = &loaded.models.restorers[variant];
    let settings = loaded.config.settings.clone().unwrap_or_default();
    let schedule = NoiseSchedule::cosine(settings.train_timesteps)?;
    let e = test.dim;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut image, mut text) = (Vec::new(), Vec::new());
    let all: Vec<usize> = (0..test.n).collect();
    for idx in all.chunks(512) {
        let b = idx.len();
        let noise = |rng: &mut ChaCha8Rng| {
            let v: Vec<f32> = (0..b * e)
                .map(|_| rng.sample::<f32, _>(StandardNormal))
                .collect();
            Tensor::<B, 2>::from_data(TensorData::new(v, [b, e]), device)
        };
        let txt = test.text_rows::<B>(idx, device);
        let img = test.image_rows::<B>(idx, device);
        let r = ddim_restore(
            &model.t2i,
            &schedule,
            settings.sampler_steps,
            txt.clone(),
            noise(&mut rng),
            v.gating,
        )?;
        image.extend(to_vec(model.t2i.blend(r, txt, v.trusts()))?);
        let r = ddim_restore(
            &model.i2t,
            &schedule,
            settings.sampler_steps,
            img.clone(),
            noise(&mut rng),
            v.gating,
        )?;
        text.extend(to_vec(model.i2t.blend(r, img, v.trusts()))?);
    }
    Ok((image, text))
}

/// Options of `eval --stage restore`.
#[derive(Debug, Clone)]
pub struct RestoreEvalOptions {
    /// Seed of the missing masks and of the restorers' start noise.
    pub seed: u64,
    /// Score only the first N held-out examples.
    pub limit: Option<usize>,
}

pub fn eval_restore<B: Backend>(
    run: &std::path::Path,
    opts: &RestoreEvalOptions,
    device: &B::Device,
) -> anyhow::Result<RestoreReport> {
    let loaded = load_restore::<B>(run, device)?;
    let cfg = &loaded.config;
    let n = opts
        .limit
        .unwrap_or(cfg.test_examples)
        .min(cfg.test_examples);
    if n == 0 {
        anyhow::bail!("--limit 0 leaves no held-out example to score");
    }
    let target = ImageTarget::of(&cfg.model, Some(&loaded.backbones.tokenizer));
    // Only the held-out examples, and of a built-in task only the first `n` of them: its
    // draws from a seed are a stream, so they are the first `n` the run held out.
    let examples = cfg.task.examples(0, n, cfg.data_seed, &target)?.test;
    let n = n.min(examples.len());
    let test = extract_features(&loaded.backbones, &examples[..n], device)?;
    let e = test.dim;
    let models = &loaded.models;
    let mut stand_ins = vec![StandIns {
        method: "zero-fill".into(),
        image: vec![0.0; n * e],
        text: vec![0.0; n * e],
    }];
    let row = |t: Tensor<B, 1>| to_vec(t.reshape([1, e]));
    let mean_image = row(models.restorers[0].t2i.mean_fill.val())?;
    let mean_text = row(models.restorers[0].i2t.mean_fill.val())?;
    stand_ins.push(StandIns {
        method: "mean-fill".into(),
        image: repeat(&mean_image, n),
        text: repeat(&mean_text, n),
    });
    stand_ins.push(StandIns {
        method: "missing token".into(),
        image: repeat(&row(models.tokens.image.val())?, n),
        text: repeat(&row(models.tokens.text.val())?, n),
    });
    for (i, v) in VARIANTS.iter().enumerate() {
        let (image, text) = restore_all(&loaded, &test, i, opts.seed, device)?;
        stand_ins.push(StandIns {
            method: v.method.into(),
            image,
            text,
        });
    }

    let classes = cfg.restore.classes;
    let mut settings = Vec::new();
    for setting in Setting::ALL {
        let mut methods = Vec::new();
        for s in &stand_ins {
            let (mut accuracy, mut f1) = (Vec::new(), Vec::new());
            for (ri, &rate) in RATES.iter().enumerate() {
                let mask = missing_mask(n, rate, setting, opts.seed ^ ((ri as u64 + 1) * 7919));
                let mut image = test.image.clone();
                let mut text = test.text.clone();
                for (i, m) in mask.iter().enumerate() {
                    let span = i * e..(i + 1) * e;
                    match m {
                        Some(true) => image[span.clone()].copy_from_slice(&s.image[span]),
                        Some(false) => text[span.clone()].copy_from_slice(&s.text[span]),
                        None => {}
                    }
                }
                let logits = models.head.forward(
                    Tensor::<B, 2>::from_data(TensorData::new(image, [n, e]), device),
                    Tensor::<B, 2>::from_data(TensorData::new(text, [n, e]), device),
                );
                let pred: Vec<usize> = logits
                    .argmax(1)
                    .into_data()
                    .convert::<i64>()
                    .into_vec::<i64>()
                    .map_err(|e| anyhow::anyhow!("reading predictions: {e:?}"))?
                    .into_iter()
                    .map(|p| p as usize)
                    .collect();
                let right = pred
                    .iter()
                    .zip(&test.labels)
                    .filter(|(p, t)| p == t)
                    .count();
                accuracy.push(right as f64 / n.max(1) as f64);
                f1.push(macro_f1(&pred, &test.labels, classes));
            }
            methods.push(MethodScores {
                method: s.method.clone(),
                accuracy,
                macro_f1: f1,
            });
        }
        settings.push(SettingReport { setting, methods });
    }
    let closeness = stand_ins
        .iter()
        .filter(|s| s.method != "zero-fill")
        .map(|s| Closeness {
            method: s.method.clone(),
            image_cosine: mean_cosine(&s.image, &test.image, &vec![0.0; e]),
            text_cosine: mean_cosine(&s.text, &test.text, &vec![0.0; e]),
            image_centred: mean_cosine(&s.image, &test.image, &mean_image),
            text_centred: mean_cosine(&s.text, &test.text, &mean_text),
        })
        .collect();
    Ok(RestoreReport {
        task: cfg.task.to_string(),
        test_examples: n,
        rates: RATES.to_vec(),
        settings,
        closeness,
        image_only_ceiling: cfg.task.single_view_ceiling(true),
        text_only_ceiling: cfg.task.single_view_ceiling(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macro_f1_of_known_predictions() {
        // Class 0: tp 1, fn 1 → F1 2/3; class 1: tp 1, fp 1 → 2/3; class 2 unseen.
        let f1 = macro_f1(&[0, 1, 1], &[0, 1, 0], 3);
        assert!((f1 - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(macro_f1(&[2, 2], &[2, 2], 3), 1.0);
    }

    #[test]
    fn masks_have_the_exact_rate_and_split() {
        let m = missing_mask(100, 0.7, Setting::Mixed, 1);
        assert_eq!(m.iter().filter(|x| x.is_some()).count(), 70);
        assert_eq!(m.iter().filter(|x| **x == Some(true)).count(), 35);
        let m = missing_mask(100, 0.3, Setting::TextMissing, 1);
        assert_eq!(m.iter().filter(|x| **x == Some(false)).count(), 30);
        assert!(missing_mask(10, 0.0, Setting::ImageMissing, 1)
            .iter()
            .all(Option::is_none));
    }
}
