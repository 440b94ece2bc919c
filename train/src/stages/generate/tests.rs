use duet_diffusion::Prediction;

use super::*;

#[test]
fn min_snr_weights_cap_the_clean_end_and_keep_the_noisy_end() {
    let uniform = DiffusionSettings::default();
    assert_eq!(uniform.loss_weight(0.999), 1.0);
    let v = DiffusionSettings {
        min_snr_gamma: Some(5.0),
        ..DiffusionSettings::default()
    };
    // SNR = 1 (ᾱ = 0.5) is under γ: weight SNR / (SNR + 1) = 0.5.
    assert!((v.loss_weight(0.5) - 0.5).abs() < 1e-12);
    // SNR = 99 (ᾱ = 0.99) is capped at γ = 5: 5 / 100.
    assert!((v.loss_weight(0.99) - 0.05).abs() < 1e-9);
    // The ends of the schedule stay finite.
    assert!(v.loss_weight(1.0).is_finite() && v.loss_weight(0.0) >= 0.0);
    let eps = DiffusionSettings {
        prediction: Prediction::Epsilon,
        ..v
    };
    // ε: min(SNR, γ) / SNR, 1 below γ and γ / SNR above it.
    assert!((eps.loss_weight(0.5) - 1.0).abs() < 1e-12);
    assert!((eps.loss_weight(0.99) - 5.0 / 99.0).abs() < 1e-9);
}
