//! Instruction edits of a scene with the exact target scene (instruction editing on
//! ShapeWorld).
//!
//! The target of every instruction is computed from the source scene, so an edit a model
//! draws can be scored with the exact detector: the asked change made, every other object
//! unchanged. Objects are named as in the questions (the shortest unique description); the
//! words are the caption grammar's plus "add", "make", "remove", "move" and "to".
//!
//! ```text
//! add      "add a small red circle at the top left"   (an empty cell)
//! recolour "make the square blue"                     (another colour)
//! remove   "remove the red circle"
//! move     "move the circle to the bottom right"      (an empty cell)
//! ```

use std::fmt;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::questions::{pick, pick_described, Allowed};
use super::*;

/// The kinds of edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EditKind {
    Add,
    Recolour,
    Remove,
    Move,
}

impl EditKind {
    pub const ALL: [EditKind; 4] = [
        EditKind::Add,
        EditKind::Recolour,
        EditKind::Remove,
        EditKind::Move,
    ];

    /// The serde name, e.g. `recolour`.
    pub fn name(self) -> &'static str {
        match self {
            EditKind::Add => "add",
            EditKind::Recolour => "recolour",
            EditKind::Remove => "remove",
            EditKind::Move => "move",
        }
    }
}

impl fmt::Display for EditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One instruction and the scene it asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Edit {
    pub kind: EditKind,
    pub instruction: String,
    pub target: Scene,
}

/// "to the top left", "to the centre": the destination phrase of a move.
pub fn destination_phrase(p: Position) -> String {
    let phrase = p.phrase();
    let rest = phrase
        .strip_prefix("at ")
        .or_else(|| phrase.strip_prefix("on "))
        .or_else(|| phrase.strip_prefix("in "))
        .unwrap_or(phrase);
    format!("to {rest}")
}

fn empty_cells(scene: &Scene) -> Vec<Position> {
    Position::ALL
        .into_iter()
        .filter(|p| !scene.objects.iter().any(|o| o.position == *p))
        .collect()
}

/// One edit of `kind` of `scene`, or `None` when the scene allows none (no empty cell to add
/// to or move to, no object with a unique description).
pub fn edit<R: Rng + ?Sized>(scene: &Scene, kind: EditKind, rng: &mut R) -> Option<Edit> {
    let all = Allowed {
        colour: true,
        size: true,
    };
    let replaced = |old: &Object, new: Option<Object>| {
        Scene::new(
            scene
                .objects
                .iter()
                .filter(|o| *o != old)
                .copied()
                .chain(new)
                .collect(),
        )
    };
    let (instruction, target) = match kind {
        EditKind::Add => {
            let cell = *pick(rng, &empty_cells(scene))?;
            let o = Object {
                shape: Shape::ALL[rng.random_range(0..Shape::ALL.len())],
                colour: Colour::ALL[rng.random_range(0..Colour::ALL.len())],
                size: Size::ALL[rng.random_range(0..Size::ALL.len())],
                position: cell,
            };
            let mut objects = scene.objects.clone();
            objects.push(o);
            (format!("add {o}"), Scene::new(objects))
        }
        EditKind::Recolour => {
            let (d, o) = pick_described(scene, all, rng)?;
            let others: Vec<Colour> = Colour::ALL.into_iter().filter(|c| *c != o.colour).collect();
            let colour = *pick(rng, &others)?;
            (
                format!("make {d} {}", colour.word()),
                replaced(o, Some(Object { colour, ..*o })),
            )
        }
        EditKind::Remove => {
            let (d, o) = pick_described(scene, all, rng)?;
            (format!("remove {d}"), replaced(o, None))
        }
        EditKind::Move => {
            let cell = *pick(rng, &empty_cells(scene))?;
            let (d, o) = pick_described(scene, all, rng)?;
            (
                format!("move {d} {}", destination_phrase(cell)),
                replaced(
                    o,
                    Some(Object {
                        position: cell,
                        ..*o
                    }),
                ),
            )
        }
    };
    Some(Edit {
        kind,
        instruction,
        target,
    })
}

/// Up to `count` distinct edits of `scene`, of kinds drawn uniformly (a kind the scene allows
/// none of is drawn again, a bounded number of times).
pub fn edits_for<R: Rng + ?Sized>(scene: &Scene, count: usize, rng: &mut R) -> Vec<Edit> {
    let mut out: Vec<Edit> = Vec::with_capacity(count);
    for _ in 0..count * 8 {
        if out.len() == count {
            break;
        }
        let kind = EditKind::ALL[rng.random_range(0..EditKind::ALL.len())];
        if let Some(e) = edit(scene, kind, rng) {
            if !out.iter().any(|o| o.instruction == e.instruction) {
                out.push(e);
            }
        }
    }
    out
}

/// Every word instructions use beyond the caption grammar's (for tokenizer tests).
pub fn instruction_words() -> Vec<&'static str> {
    vec!["add", "make", "remove", "move", "to"]
}
