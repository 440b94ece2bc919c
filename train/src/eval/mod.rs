//! Evaluation of trained runs (`duet-train eval`): captions on ShapeWorld and on emoji,
//! GenEval-style scoring of generations, and classification with a modality missing.

pub mod caption;
pub mod emoji;
pub mod geneval;
pub mod restore;
