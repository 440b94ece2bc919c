//! Classification tasks that need both modalities, built from ShapeWorld scenes with exact
//! labels (the design is explained in `docs/RESTORE.md`).
//!
//! Each example is an image and a text of the *same* scene, and each is a faulty view of it:
//! one attribute of the label is corrupted half of the time in the image and the other
//! attribute half of the time in the text. So either modality alone is informative (it gets
//! one attribute right always and the other one at least half of the time; see
//! [`PairTask::single_view_ceiling`]), both together give the label
//! exactly, and the two modalities overlap enough (shape, size, the uncorrupted half) that the
//! missing one can be partly restored from the present one.

use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

mod folder;
pub use folder::{LabelledFolder, PairData, PairExamples, MAX_CLASSES};

use crate::shapeworld::{objects_caption, render, Colour, Object, Position, Scene, Shape, Size};

/// Probability that the corrupted attribute of a view is wrong.
pub const CORRUPTION: f64 = 0.5;

/// A two-modality classification task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairTask {
    /// One object. Label = colour × column (8 × 3 = 24 classes). The image shows the true
    /// column but a wrong colour half of the time; the text names the true colour but a wrong
    /// position half of the time.
    ColourColumn,
    /// One to three objects of one shape. Label = shape × count (5 × 3 = 15 classes). The
    /// image shows the true shape but a wrong number of objects half of the time; the text
    /// lists the true objects but names a wrong shape half of the time.
    ShapeCount,
}

impl std::str::FromStr for PairTask {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "colour-column" => Ok(PairTask::ColourColumn),
            "shape-count" => Ok(PairTask::ShapeCount),
            other => Err(format!(
                "unknown task '{other}' (expected colour-column or shape-count)"
            )),
        }
    }
}

impl std::fmt::Display for PairTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PairTask::ColourColumn => "colour-column",
            PairTask::ShapeCount => "shape-count",
        })
    }
}

/// One example: the two views and the exact label.
#[derive(Debug, Clone)]
pub struct PairExample {
    pub image: RgbImage,
    pub text: String,
    pub label: usize,
}

impl PairTask {
    pub fn classes(self) -> usize {
        match self {
            PairTask::ColourColumn => Colour::ALL.len() * 3,
            PairTask::ShapeCount => Shape::ALL.len() * 3,
        }
    }

    /// A readable name of class `label`, e.g. "red, right" or "circle × 2".
    pub fn class_name(self, label: usize) -> String {
        match self {
            PairTask::ColourColumn => {
                let col = ["left", "centre", "right"][label % 3];
                format!("{}, {col}", Colour::ALL[label / 3].word())
            }
            PairTask::ShapeCount => {
                format!("{} x {}", Shape::ALL[label / 3].word(), label % 3 + 1)
            }
        }
    }

    /// The accuracy an optimal classifier reaches with only the image (`image_only`) or only the
    /// text: the always-right attribute times the chance the corrupted one is right (a wrong
    /// value is never the true one, so the best guess is to trust the view).
    pub fn single_view_ceiling(self, image_only: bool) -> f64 {
        match (self, image_only) {
            // Image: colour right with p = 1 − CORRUPTION; column always right.
            (PairTask::ColourColumn, true) => 1.0 - CORRUPTION,
            // Text: colour always right; a wrong position still has the right column 2 / 8 of
            // the time.
            (PairTask::ColourColumn, false) => 1.0 - CORRUPTION + CORRUPTION * 2.0 / 8.0,
            // Image: count right with p = 1 − CORRUPTION; text: shape right with the same p.
            (PairTask::ShapeCount, _) => 1.0 - CORRUPTION,
        }
    }

    /// Draws one example.
    pub fn sample<R: Rng + ?Sized>(self, rng: &mut R, image_size: u32) -> PairExample {
        match self {
            PairTask::ColourColumn => colour_column(rng, image_size),
            PairTask::ShapeCount => shape_count(rng, image_size),
        }
    }

    /// `n` examples from `seed` (the same seed gives the same examples on every platform).
    pub fn examples(self, n: usize, seed: u64, image_size: u32) -> Vec<PairExample> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| self.sample(&mut rng, image_size)).collect()
    }
}

fn pick<T: Copy, R: Rng + ?Sized>(rng: &mut R, all: &[T]) -> T {
    all[rng.random_range(0..all.len())]
}

/// A value of `all` other than `not`.
fn other<T: Copy + PartialEq, R: Rng + ?Sized>(rng: &mut R, all: &[T], not: T) -> T {
    loop {
        let v = pick(rng, all);
        if v != not {
            return v;
        }
    }
}

fn colour_column<R: Rng + ?Sized>(rng: &mut R, image_size: u32) -> PairExample {
    let truth = Object {
        shape: pick(rng, &Shape::ALL),
        colour: pick(rng, &Colour::ALL),
        size: pick(rng, &Size::ALL),
        position: pick(rng, &Position::ALL),
    };
    let mut seen = truth;
    if rng.random_bool(CORRUPTION) {
        seen.colour = other(rng, &Colour::ALL, truth.colour);
    }
    let mut told = truth;
    if rng.random_bool(CORRUPTION) {
        told.position = other(rng, &Position::ALL, truth.position);
    }
    let colour = Colour::ALL
        .iter()
        .position(|&c| c == truth.colour)
        .unwrap_or(0);
    PairExample {
        image: render(&Scene::new(vec![seen]), image_size),
        text: objects_caption(&[told]),
        label: colour * 3 + truth.position.col(),
    }
}

fn shape_count<R: Rng + ?Sized>(rng: &mut R, image_size: u32) -> PairExample {
    let shape = pick(rng, &Shape::ALL);
    let count = rng.random_range(1..=3usize);
    let shown = if rng.random_bool(CORRUPTION) {
        other(rng, &[1usize, 2, 3], count)
    } else {
        count
    };
    // Distinct cells for up to three objects; the image's objects are the true ones, minus
    // the last ones or plus extra ones when its count is wrong.
    let mut cells = Position::ALL;
    cells.shuffle(rng);
    let objects: Vec<Object> = cells[..count.max(shown)]
        .iter()
        .map(|&position| Object {
            shape,
            colour: pick(rng, &Colour::ALL),
            size: pick(rng, &Size::ALL),
            position,
        })
        .collect();
    let named = if rng.random_bool(CORRUPTION) {
        other(rng, &Shape::ALL, shape)
    } else {
        shape
    };
    let told: Vec<Object> = objects[..count]
        .iter()
        .map(|o| Object { shape: named, ..*o })
        .collect();
    let s = Shape::ALL.iter().position(|&x| x == shape).unwrap_or(0);
    PairExample {
        image: render(&Scene::new(objects[..shown].to_vec()), image_size),
        text: objects_caption(&told),
        label: s * 3 + (count - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapeworld::parse_caption;

    /// Evaluation draws only the first `n` held-out examples of a run: they must be the
    /// first `n` of the run's own draw.
    #[test]
    fn a_shorter_draw_is_a_prefix_of_a_longer_one() {
        for task in [PairTask::ColourColumn, PairTask::ShapeCount] {
            let long = task.examples(40, 9, 32);
            let short = task.examples(7, 9, 32);
            for (a, b) in short.iter().zip(&long) {
                assert_eq!((&a.text, a.label), (&b.text, b.label));
                assert_eq!(a.image, b.image);
            }
        }
    }

    #[test]
    fn labels_cover_every_class_and_views_are_corrupted_at_the_set_rate() {
        for task in [PairTask::ColourColumn, PairTask::ShapeCount] {
            let ex = task.examples(4000, 7, 32);
            let mut seen = vec![0usize; task.classes()];
            let mut text_right = 0usize;
            for e in &ex {
                seen[e.label] += 1;
                let objs = parse_caption(&e.text).expect("texts follow the grammar");
                let right = match task {
                    PairTask::ColourColumn => {
                        let c = Colour::ALL
                            .iter()
                            .position(|&c| c == objs[0].colour)
                            .unwrap();
                        c * 3 + objs[0].position.col() == e.label
                    }
                    PairTask::ShapeCount => {
                        let s = Shape::ALL.iter().position(|&s| s == objs[0].shape).unwrap();
                        s * 3 + objs.len() - 1 == e.label
                    }
                };
                text_right += right as usize;
            }
            assert!(seen.iter().all(|&n| n > 0), "{task}: {seen:?}");
            // The text alone is right at its ceiling rate (within sampling noise).
            let rate = text_right as f64 / ex.len() as f64;
            let want = task.single_view_ceiling(false);
            assert!(
                (rate - want).abs() < 0.03,
                "{task}: text right {rate}, want {want}"
            );
        }
    }

    #[test]
    fn examples_are_reproducible() {
        let a = PairTask::ShapeCount.examples(5, 3, 32);
        let b = PairTask::ShapeCount.examples(5, 3, 32);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!((x.label, &x.text), (y.label, &y.text));
            assert_eq!(x.image, y.image);
        }
    }
}
