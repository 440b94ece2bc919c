//! How the caption decoder's next token is chosen: greedy, seeded sampling (temperature, top-k,
//! top-p) or beam search, and the length limit. The choice is pure arithmetic on one logits
//! row, kept apart from the graph-feeding loops in [`crate::caption`] so it can be tested
//! without a model.

use ndarray::ArrayView1;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Widest beam [`Decoding::Beam`] accepts: every beam is one more row in each decoder call.
pub const MAX_BEAM_WIDTH: usize = 16;

/// Token selection strategy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decoding {
    /// The most likely token at each step (ties: the lowest id, so every engine agrees).
    Greedy,
    /// A token drawn from the model's distribution, reshaped by [`Sampling`].
    Sample(Sampling),
    /// Beam search over `width` hypotheses per image, scored by the sum of token log-probabilities
    /// (EOS included); the best finished hypothesis is returned.
    Beam { width: usize },
}

/// Sampling settings. `temperature` 0 is greedy; `top_k` keeps the k likeliest tokens, `top_p`
/// the smallest set of likeliest tokens whose probability reaches p (both after temperature).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    /// The same seed, image, prompt and bundle give the same text.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

/// How to decode: the strategy and an optional cap on generated tokens (EOS not counted; the
/// model's own length limit always applies).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeOptions {
    pub decoding: Decoding,
    pub max_tokens: Option<usize>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            decoding: Decoding::Greedy,
            max_tokens: None,
        }
    }
}

impl DecodeOptions {
    /// Checks every setting, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_tokens == Some(0) {
            return Err("max_tokens must be at least 1".into());
        }
        match self.decoding {
            Decoding::Greedy => Ok(()),
            Decoding::Beam { width } => {
                if (1..=MAX_BEAM_WIDTH).contains(&width) {
                    Ok(())
                } else {
                    Err(format!(
                        "beam width must be 1..={MAX_BEAM_WIDTH}, got {width}"
                    ))
                }
            }
            Decoding::Sample(s) => {
                if !(s.temperature.is_finite() && s.temperature >= 0.0) {
                    return Err(format!(
                        "temperature must be a finite number >= 0, got {}",
                        s.temperature
                    ));
                }
                if s.top_k == Some(0) {
                    return Err("top_k must be at least 1".into());
                }
                if let Some(p) = s.top_p {
                    if !(p > 0.0 && p <= 1.0) {
                        return Err(format!("top_p must be in (0, 1], got {p}"));
                    }
                }
                Ok(())
            }
        }
    }
}

/// Index of the largest logit; the lowest index wins ties so every backend agrees.
pub(crate) fn argmax(row: ArrayView1<'_, f32>) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best
}

/// `log Σ exp(row)` in f64 (the rows are finite: non-finite logits are refused before this).
pub(crate) fn log_sum_exp(row: ArrayView1<'_, f32>) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln()
}

/// The `n` likeliest tokens of a row as `(log-probability, id)`, likeliest first, ties by the
/// lower id (so beam width 1 picks what greedy picks).
pub(crate) fn top_log_probs(row: ArrayView1<'_, f32>, n: usize) -> Vec<(f64, usize)> {
    let lse = log_sum_exp(row);
    let mut all: Vec<(f64, usize)> = row
        .iter()
        .enumerate()
        .map(|(i, &v)| (v as f64 - lse, i))
        .collect();
    let by_score = |a: &(f64, usize), b: &(f64, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let n = n.min(all.len());
    if n > 0 && n < all.len() {
        all.select_nth_unstable_by(n - 1, by_score);
        all.truncate(n);
    }
    all.sort_by(by_score);
    all
}

/// Draws a token from `row` under `s`. Temperature 0 is exactly [`argmax`].
pub(crate) fn sample(row: ArrayView1<'_, f32>, s: &Sampling, rng: &mut ChaCha8Rng) -> usize {
    if s.temperature == 0.0 {
        return argmax(row);
    }
    let t = f64::from(s.temperature);
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    // Weights exp((v - max) / t), likeliest first, ties by the lower id: the order top-k and
    // top-p cut from, and the order the draw walks (so a seed picks the same token everywhere).
    let mut weights: Vec<(f64, usize)> = row
        .iter()
        .enumerate()
        .map(|(i, &v)| (((v as f64 - max) / t).exp(), i))
        .collect();
    weights.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    if let Some(k) = s.top_k {
        weights.truncate(k.max(1));
    }
    if let Some(p) = s.top_p {
        let total: f64 = weights.iter().map(|w| w.0).sum();
        let mut acc = 0.0;
        let mut keep = weights.len();
        for (i, w) in weights.iter().enumerate() {
            acc += w.0;
            if acc >= f64::from(p) * total {
                keep = i + 1;
                break;
            }
        }
        weights.truncate(keep.max(1));
    }
    let total: f64 = weights.iter().map(|w| w.0).sum();
    let mut u = rng.random::<f64>() * total;
    for &(w, i) in &weights {
        if u < w {
            return i;
        }
        u -= w;
    }
    // Rounding left `u` at the very end of the range: the last kept token.
    weights.last().map_or(0, |w| w.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr1;
    use rand::SeedableRng;

    #[test]
    fn top_log_probs_are_normalised_sorted_and_tie_to_the_lower_id() {
        let row = arr1(&[1.0f32, 3.0, 3.0, -2.0]);
        let top = top_log_probs(row.view(), 3);
        assert_eq!(top.iter().map(|t| t.1).collect::<Vec<_>>(), vec![1, 2, 0]);
        let all = top_log_probs(row.view(), 10);
        let total: f64 = all.iter().map(|t| t.0.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12, "{total}");
        assert!((all[0].0 - (3.0 - log_sum_exp(row.view()))).abs() < 1e-12);
    }

    #[test]
    fn sampling_respects_top_k_top_p_and_temperature_zero() {
        let row = arr1(&[0.0f32, 2.0, 1.0, 2.0, -1.0]);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let greedy = Sampling {
            temperature: 0.0,
            ..Sampling::default()
        };
        assert_eq!(sample(row.view(), &greedy, &mut rng), argmax(row.view()));
        assert_eq!(argmax(row.view()), 1, "ties go to the lower id");
        let top2 = Sampling {
            top_k: Some(2),
            ..Sampling::default()
        };
        let mut seen = [0usize; 5];
        for _ in 0..400 {
            seen[sample(row.view(), &top2, &mut rng)] += 1;
        }
        assert_eq!((seen[0], seen[2], seen[4]), (0, 0, 0), "{seen:?}");
        assert!(seen[1] > 100 && seen[3] > 100, "{seen:?}");
        // p = 0.5: token 1 alone holds 0.38 of the mass, 1 and 3 together 0.77.
        let nucleus = Sampling {
            top_p: Some(0.5),
            ..Sampling::default()
        };
        let mut seen = [0usize; 5];
        for _ in 0..400 {
            seen[sample(row.view(), &nucleus, &mut rng)] += 1;
        }
        assert_eq!(seen[0] + seen[2] + seen[4], 0, "{seen:?}");
        // No cut: every token is drawn about as often as its probability says.
        let mut seen = [0usize; 5];
        let n = 20_000;
        for _ in 0..n {
            seen[sample(row.view(), &Sampling::default(), &mut rng)] += 1;
        }
        let lse = log_sum_exp(row.view());
        for (i, &c) in seen.iter().enumerate() {
            let p = (f64::from(row[i]) - lse).exp();
            let got = c as f64 / n as f64;
            assert!((got - p).abs() < 0.02, "token {i}: {got} vs {p}");
        }
    }

    #[test]
    fn options_are_checked() {
        let bad = [
            DecodeOptions {
                max_tokens: Some(0),
                ..DecodeOptions::default()
            },
            DecodeOptions {
                decoding: Decoding::Beam { width: 0 },
                max_tokens: None,
            },
            DecodeOptions {
                decoding: Decoding::Beam {
                    width: MAX_BEAM_WIDTH + 1,
                },
                max_tokens: None,
            },
            DecodeOptions {
                decoding: Decoding::Sample(Sampling {
                    temperature: f32::NAN,
                    ..Sampling::default()
                }),
                max_tokens: None,
            },
            DecodeOptions {
                decoding: Decoding::Sample(Sampling {
                    temperature: -1.0,
                    ..Sampling::default()
                }),
                max_tokens: None,
            },
            DecodeOptions {
                decoding: Decoding::Sample(Sampling {
                    top_p: Some(0.0),
                    ..Sampling::default()
                }),
                max_tokens: None,
            },
            DecodeOptions {
                decoding: Decoding::Sample(Sampling {
                    top_k: Some(0),
                    ..Sampling::default()
                }),
                max_tokens: None,
            },
        ];
        for o in bad {
            assert!(o.validate().is_err(), "{o:?}");
        }
        assert!(DecodeOptions::default().validate().is_ok());
        assert!(DecodeOptions {
            decoding: Decoding::Beam { width: 4 },
            max_tokens: Some(3)
        }
        .validate()
        .is_ok());
    }
}
