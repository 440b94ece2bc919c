//! Evaluation of trained runs (`duet-train eval`): captions on ShapeWorld and on emoji,
//! GenEval-style scoring of generations, classification with a modality missing, and answers
//! to questions about ShapeWorld scenes.

pub mod caption;
pub mod dream;
pub mod emoji;
pub mod geneval;
pub mod restore;
pub mod vqa;

use std::fmt;

/// What `duet-train eval` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Evaluation {
    /// Caption metrics on a ShapeWorld folder, or token F1 on an Emoji-CLDR split.
    Caption,
    /// GenEval-style scores of the generator on its seeded prompt set.
    Generate,
    /// Caption → generate → compare: the auto-encoder view.
    Reconstruct,
    /// Missing-modality restoration against mean-fill.
    Restore,
    /// Generated emoji retrieved by their own names.
    Retrieval,
    /// Answers to a ShapeWorld folder's questions, per kind, beside the majority baseline.
    Vqa,
    /// A dream run: GenEval-style scores through the dream queries beside the text encoder's,
    /// and a folder's instruction edits (change made, others kept) beside drawing the
    /// instruction from the blank image.
    Dream,
}

impl fmt::Display for Evaluation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use clap::ValueEnum;
        let name = self.to_possible_value().expect("no variant is skipped");
        f.write_str(name.get_name())
    }
}
