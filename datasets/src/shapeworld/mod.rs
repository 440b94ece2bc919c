//! ShapeWorld: a seeded synthetic scene generator with exact ground truth.
//!
//! A scene is 1–4 coloured shapes on a black background, each in its own cell of a 3×3 grid.
//! Because every scene is known exactly, a caption can be parsed back into objects and scored
//! attribute by attribute (see `duet_train::metrics`) with no learned judge.
//!
//! # Caption grammar
//!
//! ```text
//! caption  := clause (" and " clause)*
//! clause   := "a" SIZE COLOUR SHAPE POSITION
//! SIZE     := "small" | "large"
//! COLOUR   := "red" | "green" | "blue" | "yellow" | "purple" | "orange" | "cyan" | "white"
//! SHAPE    := "circle" | "square" | "triangle" | "cross" | "diamond"
//! POSITION := "at the top left" | "at the top" | "at the top right"
//!           | "on the left" | "in the centre" | "on the right"
//!           | "at the bottom left" | "at the bottom" | "at the bottom right"
//! ```
//!
//! Captions are lowercase with single spaces and no punctuation. Clauses are listed in
//! canonical row-major cell order (top left first, bottom right last) so a captioner has one
//! deterministic target per scene. The position phrases are unambiguous: "at the top" is only a
//! complete phrase when it is not followed by "left" or "right", and the parser always tries the
//! longest phrase first; no vocabulary word other than the separator is "and".
//!
//! # Questions
//!
//! `questions.jsonl` (written with `--questions N`) holds questions about each scene with
//! answers computed from it; see the `questions` module for the templates.
//!
//! # Edits
//!
//! `edits.jsonl` (written with `--edits N`) holds instructions about each scene ("make the
//! square blue") with the exact target scene; see the `edits` module.
//!
//! # Held-out data
//!
//! Scenes are a pure function of the seed, so a dataset written with a different seed is a fresh
//! sample from the same distribution. Because the scene space is finite (a single-object scene
//! has only 720 variants) two seeds can still produce identical captions; [`split`] therefore
//! groups samples by caption so that no caption appears on both sides of a train/val split.

mod draw;
mod edits;
mod folder;
mod grammar;
mod questions;
mod scene;
#[cfg(test)]
mod tests;

pub use draw::*;
pub use edits::*;
pub use folder::*;
pub use grammar::*;
pub use questions::*;
pub use scene::*;
