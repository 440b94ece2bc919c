//! Questions about a scene with exact answers (visual question answering on ShapeWorld).
//!
//! Every answer is computed from the scene, so a model's answer is right or wrong with no
//! judge. A question names an object only by a description that fits exactly one object of
//! its scene (the shape alone, else colour + shape, else size + colour + shape), and never by
//! the attribute it asks about. Answers are short phrases from the caption grammar's words
//! plus "yes", "no", "nothing" and the number words.
//!
//! ```text
//! colour   "what colour is the circle ?"            → "red"
//! size     "what size is the red circle ?"          → "small"
//! shape_at "what shape is at the top left ?"        → "circle" | "nothing"
//! count    "how many red objects are there ?"       → "zero" … "nine"
//! exists   "is there a red circle ?"                → "yes" | "no"
//! where    "where is the circle ?"                  → "at the top left"
//! left_of  "what is left of the circle ?"           → "a small red square" | "nothing"
//! above    "what is above the circle ?"             → "a small red square" | "nothing"
//! ```
//!
//! The text before the answer ends with " ?", which the tokenizer keeps as its own word: the
//! model reads `[BOS] question ? answer [EOS]` and learns to answer after the "?".

use std::fmt;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::*;

/// The kinds of question, each with its own template and answer set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuestionKind {
    Colour,
    Size,
    ShapeAt,
    Count,
    Exists,
    Where,
    LeftOf,
    Above,
}

impl QuestionKind {
    pub const ALL: [QuestionKind; 8] = [
        QuestionKind::Colour,
        QuestionKind::Size,
        QuestionKind::ShapeAt,
        QuestionKind::Count,
        QuestionKind::Exists,
        QuestionKind::Where,
        QuestionKind::LeftOf,
        QuestionKind::Above,
    ];

    /// The serde name, e.g. `shape_at`.
    pub fn name(self) -> &'static str {
        match self {
            QuestionKind::Colour => "colour",
            QuestionKind::Size => "size",
            QuestionKind::ShapeAt => "shape_at",
            QuestionKind::Count => "count",
            QuestionKind::Exists => "exists",
            QuestionKind::Where => "where",
            QuestionKind::LeftOf => "left_of",
            QuestionKind::Above => "above",
        }
    }
}

impl fmt::Display for QuestionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One question about a scene and its exact answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Question {
    pub kind: QuestionKind,
    /// Ends with " ?".
    pub question: String,
    pub answer: String,
}

const NUMBERS: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// Which attributes a description may use.
#[derive(Clone, Copy)]
pub(super) struct Allowed {
    pub(super) colour: bool,
    pub(super) size: bool,
}

/// The shortest description ("the circle", "the red circle", "the small red circle") that
/// fits `o` and no other object of `scene`, using only the allowed attributes besides the
/// shape; `None` when none is unique.
fn describe(scene: &Scene, o: &Object, allowed: Allowed) -> Option<String> {
    let unique =
        |same: &dyn Fn(&Object) -> bool| scene.objects.iter().filter(|x| same(x)).count() == 1;
    if unique(&|x| x.shape == o.shape) {
        return Some(format!("the {}", o.shape.word()));
    }
    if allowed.colour && unique(&|x| x.shape == o.shape && x.colour == o.colour) {
        return Some(format!("the {} {}", o.colour.word(), o.shape.word()));
    }
    if allowed.size && !allowed.colour && unique(&|x| x.shape == o.shape && x.size == o.size) {
        return Some(format!("the {} {}", o.size.word(), o.shape.word()));
    }
    if allowed.size
        && allowed.colour
        && unique(&|x| x.shape == o.shape && x.colour == o.colour && x.size == o.size)
    {
        return Some(format!(
            "the {} {} {}",
            o.size.word(),
            o.colour.word(),
            o.shape.word()
        ));
    }
    None
}

/// Every object of `scene` that has a unique description under `allowed`, with it.
fn described(scene: &Scene, allowed: Allowed) -> Vec<(String, &Object)> {
    scene
        .objects
        .iter()
        .filter_map(|o| describe(scene, o, allowed).map(|d| (d, o)))
        .collect()
}

/// A random object of `scene` with a unique description under `allowed`, and the description.
pub(super) fn pick_described<'s, R: Rng + ?Sized>(
    scene: &'s Scene,
    allowed: Allowed,
    rng: &mut R,
) -> Option<(String, &'s Object)> {
    pick(rng, &described(scene, allowed)).cloned()
}

/// "a small red square" (an object without its position).
fn noun_phrase(o: &Object) -> String {
    format!("a {} {} {}", o.size.word(), o.colour.word(), o.shape.word())
}

fn at(scene: &Scene, row: usize, col: usize) -> Option<&Object> {
    scene
        .objects
        .iter()
        .find(|o| o.position.row() == row && o.position.col() == col)
}

pub(super) fn pick<'a, T, R: Rng + ?Sized>(rng: &mut R, items: &'a [T]) -> Option<&'a T> {
    (!items.is_empty()).then(|| &items[rng.random_range(0..items.len())])
}

/// One question of `kind` about `scene`, or `None` when the scene offers none (no object can
/// be described uniquely, no object has a left neighbour cell, …).
pub fn ask<R: Rng + ?Sized>(scene: &Scene, kind: QuestionKind, rng: &mut R) -> Option<Question> {
    let all = Allowed {
        colour: true,
        size: true,
    };
    let (question, answer) = match kind {
        QuestionKind::Colour => {
            let allowed = Allowed {
                colour: false,
                size: true,
            };
            let (d, o) = pick_described(scene, allowed, rng)?;
            (format!("what colour is {d} ?"), o.colour.word().to_string())
        }
        QuestionKind::Size => {
            let allowed = Allowed {
                colour: true,
                size: false,
            };
            let (d, o) = pick_described(scene, allowed, rng)?;
            (format!("what size is {d} ?"), o.size.word().to_string())
        }
        QuestionKind::ShapeAt => {
            // Occupied cells two times in three, so "nothing" is not the majority answer.
            let occupied: Vec<Position> = scene.objects.iter().map(|o| o.position).collect();
            let empty: Vec<Position> = Position::ALL
                .into_iter()
                .filter(|p| !occupied.contains(p))
                .collect();
            let cell = if rng.random_range(0..3) < 2 || empty.is_empty() {
                *pick(rng, &occupied)?
            } else {
                *pick(rng, &empty)?
            };
            let answer = scene
                .objects
                .iter()
                .find(|o| o.position == cell)
                .map_or("nothing", |o| o.shape.word());
            (
                format!("what shape is {} ?", cell.phrase()),
                answer.to_string(),
            )
        }
        QuestionKind::Count => {
            // A quarter of the questions about any colour (mostly absent: "zero"), half about a
            // colour the scene repeats (a scene without one asks another kind), a quarter
            // about a colour it has: otherwise "one" would be most answers, as one object of
            // a colour is the common case.
            let count_of = |c: Colour| scene.objects.iter().filter(|o| o.colour == c).count();
            let present: Vec<Colour> = scene.objects.iter().map(|o| o.colour).collect();
            let repeated: Vec<Colour> = present
                .iter()
                .copied()
                .filter(|&c| count_of(c) > 1)
                .collect();
            let colour = match rng.random_range(0..4) {
                0 => Colour::ALL[rng.random_range(0..Colour::ALL.len())],
                1 | 2 => *pick(rng, &repeated)?,
                _ => *pick(rng, &present)?,
            };
            let n = scene.objects.iter().filter(|o| o.colour == colour).count();
            (
                format!("how many {} objects are there ?", colour.word()),
                NUMBERS.get(n)?.to_string(),
            )
        }
        QuestionKind::Exists => {
            // Half yes (an object's colour and shape), half no (a pair no object has).
            let (colour, shape) = if rng.random_range(0..2) == 0 {
                let o = pick(rng, &scene.objects)?;
                (o.colour, o.shape)
            } else {
                let absent: Vec<(Colour, Shape)> = Colour::ALL
                    .into_iter()
                    .flat_map(|c| Shape::ALL.into_iter().map(move |s| (c, s)))
                    .filter(|&(c, s)| !scene.objects.iter().any(|o| o.colour == c && o.shape == s))
                    .collect();
                *pick(rng, &absent)?
            };
            let yes = scene
                .objects
                .iter()
                .any(|o| o.colour == colour && o.shape == shape);
            (
                format!("is there a {} {} ?", colour.word(), shape.word()),
                if yes { "yes" } else { "no" }.to_string(),
            )
        }
        QuestionKind::Where => {
            let (d, o) = pick_described(scene, all, rng)?;
            (format!("where is {d} ?"), o.position.phrase().to_string())
        }
        QuestionKind::LeftOf | QuestionKind::Above => {
            let left = kind == QuestionKind::LeftOf;
            // Only objects that have a cell on that side: the answer is its occupant or
            // "nothing", never a fact about the grid's edge.
            let neighbour = |o: &Object| {
                if left {
                    at(scene, o.position.row(), o.position.col() - 1)
                } else {
                    at(scene, o.position.row() - 1, o.position.col())
                }
            };
            let cands: Vec<(String, &Object)> = scene
                .objects
                .iter()
                .filter(|o| {
                    if left {
                        o.position.col() > 0
                    } else {
                        o.position.row() > 0
                    }
                })
                .filter_map(|o| describe(scene, o, all).map(|d| (d, o)))
                .collect();
            // Asked only of scenes where some object has a neighbour on that side, about such
            // an object two times in three: with few objects in nine cells, most neighbour
            // cells are empty and "nothing" would otherwise be the answer to learn.
            let (full, empty): (Vec<_>, Vec<_>) =
                cands.into_iter().partition(|(_, o)| neighbour(o).is_some());
            if full.is_empty() {
                return None;
            }
            let (d, o) = if rng.random_range(0..3) < 2 || empty.is_empty() {
                pick(rng, &full)?
            } else {
                pick(rng, &empty)?
            };
            let answer = neighbour(o).map_or("nothing".to_string(), noun_phrase);
            let rel = if left { "left of" } else { "above" };
            (format!("what is {rel} {d} ?"), answer)
        }
    };
    Some(Question {
        kind,
        question,
        answer,
    })
}

/// Up to `count` distinct questions about `scene`, of kinds drawn uniformly (a kind the
/// scene offers no question of is drawn again, a bounded number of times).
pub fn questions_for<R: Rng + ?Sized>(scene: &Scene, count: usize, rng: &mut R) -> Vec<Question> {
    let mut out: Vec<Question> = Vec::with_capacity(count);
    for _ in 0..count * 8 {
        if out.len() == count {
            break;
        }
        let kind = QuestionKind::ALL[rng.random_range(0..QuestionKind::ALL.len())];
        if let Some(q) = ask(scene, kind, rng) {
            if !out.iter().any(|o| o.question == q.question) {
                out.push(q);
            }
        }
    }
    out
}

/// Every word questions and answers use beyond the caption grammar's (for tokenizer tests).
pub fn question_words() -> Vec<&'static str> {
    let mut words = vec![
        "what", "colour", "is", "size", "shape", "how", "many", "objects", "are", "there", "where",
        "of", "above", "?", "yes", "no", "nothing",
    ];
    words.extend(NUMBERS);
    words
}
