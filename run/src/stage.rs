//! The training stages, as a closed set: a typo in `--stage` is a usage error that lists the
//! choices, and every run's `config.json` names its stage with the same words
//! (`"stage": "caption"`), read back into the same enum.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A stage of `duet-train fit`, in pipeline order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// The captioner: vision encoder and caption decoder.
    Caption,
    /// The generator: text encoder and denoiser, on a frozen caption run's vision encoder.
    Generate,
    /// Unified-GRPO: the captioner rewarded by reconstruction, then the generator fine-tuned.
    Unify,
    /// Dream queries (DreamLLM): the caption decoder learns to condition the frozen denoiser,
    /// for generation from a blank image and instruction editing from a real one.
    Dream,
    /// The fusion head over image and text embeddings (missing-modality restoration, part 1).
    Fusion,
    /// The feature restorers (missing-modality restoration, part 2).
    Restore,
}

impl Stage {
    /// The word used on the command line and in `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Caption => "caption",
            Stage::Generate => "generate",
            Stage::Unify => "unify",
            Stage::Dream => "dream",
            Stage::Fusion => "fusion",
            Stage::Restore => "restore",
        }
    }

    /// Whether a run of this stage holds a generator (text encoder and denoiser).
    pub fn has_generator(self) -> bool {
        !matches!(self, Stage::Caption)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_names_are_the_config_words() {
        for s in [
            Stage::Caption,
            Stage::Generate,
            Stage::Unify,
            Stage::Dream,
            Stage::Fusion,
            Stage::Restore,
        ] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.name()));
            assert_eq!(serde_json::from_str::<Stage>(&json).unwrap(), s);
            assert_eq!(
                <Stage as clap::ValueEnum>::from_str(s.name(), false).unwrap(),
                s
            );
        }
        assert!(serde_json::from_str::<Stage>("\"decode\"").is_err());
    }
}
