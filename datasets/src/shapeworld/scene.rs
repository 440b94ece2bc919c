//! Scenes: the closed sets of shapes, colours, sizes and grid positions, objects, and seeded
//! scene generation.

use std::fmt;

use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::*;

/// Version of the on-disk layout written by [`write_dataset`]; bump on incompatible changes.
pub const DATASET_FORMAT_VERSION: u32 = 1;

/// Name written into `dataset.json` so other loaders can recognise a ShapeWorld folder.
pub const GENERATOR_NAME: &str = "shapeworld";

/// Shape of an object. Chosen so that all five stay distinguishable even at 5×5 pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Cross,
    Diamond,
}

impl Shape {
    pub const ALL: [Shape; 5] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Cross,
        Shape::Diamond,
    ];

    /// The caption word (also the serde name).
    pub fn word(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Cross => "cross",
            Shape::Diamond => "diamond",
        }
    }

    /// Inverse of [`Shape::word`].
    pub fn from_word(word: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.word() == word)
    }
}

/// Named colour of an object, drawn on a black background.
///
/// RGB values ([`Colour::rgb`]) are spread out so that a colour-segmentation detector can
/// classify a pixel by nearest palette entry with a large margin: red (255,0,0),
/// green (0,255,0), blue (0,0,255), yellow (255,255,0), purple (170,0,255), orange (255,128,0),
/// cyan (0,255,255), white (255,255,255). The closest pair (orange/yellow) is 127 apart in RGB
/// Euclidean distance, and every colour is at least 255 away from the black background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    Cyan,
    White,
}

impl Colour {
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
        Colour::Cyan,
        Colour::White,
    ];

    /// The caption word (also the serde name).
    pub fn word(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
            Colour::Cyan => "cyan",
            Colour::White => "white",
        }
    }

    /// Inverse of [`Colour::word`].
    pub fn from_word(word: &str) -> Option<Colour> {
        Colour::ALL.into_iter().find(|c| c.word() == word)
    }

    /// Exact fill colour used by [`render`] (renders have no anti-aliasing).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [255, 0, 0],
            Colour::Green => [0, 255, 0],
            Colour::Blue => [0, 0, 255],
            Colour::Yellow => [255, 255, 0],
            Colour::Purple => [170, 0, 255],
            Colour::Orange => [255, 128, 0],
            Colour::Cyan => [0, 255, 255],
            Colour::White => [255, 255, 255],
        }
    }
}

/// Background colour of every render.
pub const BACKGROUND: [u8; 3] = [0, 0, 0];

/// Object size relative to its grid cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    /// The caption word (also the serde name).
    pub fn word(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }

    /// Inverse of [`Size::word`].
    pub fn from_word(word: &str) -> Option<Size> {
        Size::ALL.into_iter().find(|s| s.word() == word)
    }

    /// Side of the object's bounding box as a fraction of the cell side.
    pub fn cell_fraction(self) -> f64 {
        match self {
            Size::Small => 0.45,
            Size::Large => 0.85,
        }
    }
}

/// Cell of the 3×3 grid. Declaration order is the canonical row-major caption order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    TopLeft,
    Top,
    TopRight,
    Left,
    Centre,
    Right,
    BottomLeft,
    Bottom,
    BottomRight,
}

impl Position {
    /// All cells in canonical (row-major) order.
    pub const ALL: [Position; 9] = [
        Position::TopLeft,
        Position::Top,
        Position::TopRight,
        Position::Left,
        Position::Centre,
        Position::Right,
        Position::BottomLeft,
        Position::Bottom,
        Position::BottomRight,
    ];

    /// Row-major cell index 0..9.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Inverse of [`Position::index`].
    pub fn from_index(index: usize) -> Option<Position> {
        Position::ALL.get(index).copied()
    }

    /// Grid row 0..3 (0 = top).
    pub fn row(self) -> usize {
        self.index() / 3
    }

    /// Grid column 0..3 (0 = left).
    pub fn col(self) -> usize {
        self.index() % 3
    }

    /// The caption phrase, e.g. "at the top left" or "in the centre".
    pub fn phrase(self) -> &'static str {
        match self {
            Position::TopLeft => "at the top left",
            Position::Top => "at the top",
            Position::TopRight => "at the top right",
            Position::Left => "on the left",
            Position::Centre => "in the centre",
            Position::Right => "on the right",
            Position::BottomLeft => "at the bottom left",
            Position::Bottom => "at the bottom",
            Position::BottomRight => "at the bottom right",
        }
    }

    /// Pixel rectangle `(x0, y0, x1, y1)` (exclusive end) covered by this cell at `image_size`.
    /// Cells use float geometry (`image_size / 3`), rounded to the nearest pixel boundary.
    pub fn cell_rect(self, image_size: u32) -> (u32, u32, u32, u32) {
        let c = f64::from(image_size) / 3.0;
        let edge = |k: usize| ((k as f64) * c).round() as u32;
        (
            edge(self.col()),
            edge(self.row()),
            edge(self.col() + 1),
            edge(self.row() + 1),
        )
    }
}

/// One object of a scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    pub position: Position,
}

impl fmt::Display for Object {
    /// The caption clause for this object, e.g. "a small red circle at the top left".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a {} {} {} {}",
            self.size.word(),
            self.colour.word(),
            self.shape.word(),
            self.position.phrase()
        )
    }
}

/// A scene: objects in distinct cells, in canonical row-major order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scene {
    pub objects: Vec<Object>,
}

impl Scene {
    /// Builds a scene, sorting objects into canonical cell order.
    pub fn new(mut objects: Vec<Object>) -> Scene {
        objects.sort_by_key(|o| o.position);
        Scene { objects }
    }
}

/// Generator settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SceneConfig {
    /// Square image side in pixels (32 by default; 64 allowed).
    pub image_size: u32,
    /// Minimum number of objects per scene (≥ 1).
    pub min_objects: usize,
    /// Maximum number of objects per scene (≤ 9, one per cell).
    pub max_objects: usize,
}

impl Default for SceneConfig {
    fn default() -> Self {
        SceneConfig {
            image_size: 32,
            min_objects: 1,
            max_objects: 4,
        }
    }
}

impl SceneConfig {
    /// Smallest image side for which small objects still get a few pixels each.
    pub const MIN_IMAGE_SIZE: u32 = 24;
    /// Largest supported image side (keeps datasets and models small).
    pub const MAX_IMAGE_SIZE: u32 = 256;

    /// Rejects settings the generator or renderer cannot honour.
    pub fn validate(&self) -> Result<(), DataError> {
        if !(Self::MIN_IMAGE_SIZE..=Self::MAX_IMAGE_SIZE).contains(&self.image_size) {
            return Err(DataError::InvalidConfig(format!(
                "image_size {} is outside {}..={}",
                self.image_size,
                Self::MIN_IMAGE_SIZE,
                Self::MAX_IMAGE_SIZE
            )));
        }
        if self.min_objects < 1 || self.max_objects > 9 || self.min_objects > self.max_objects {
            return Err(DataError::InvalidConfig(format!(
                "need 1 <= min_objects ({}) <= max_objects ({}) <= 9",
                self.min_objects, self.max_objects
            )));
        }
        Ok(())
    }
}

/// Draws a random scene: a uniform object count in `min_objects..=max_objects` (clamped to
/// 1..=9 so an unvalidated config cannot panic), distinct cells, uniform attributes.
///
/// For reproducibility pass a `ChaCha8Rng::seed_from_u64(seed)`; ChaCha's stream is stable
/// across platforms and rand versions, unlike `StdRng`.
pub fn generate_scene<R: Rng + ?Sized>(rng: &mut R, cfg: &SceneConfig) -> Scene {
    let lo = cfg.min_objects.clamp(1, 9);
    let hi = cfg.max_objects.clamp(lo, 9);
    let count = rng.random_range(lo..=hi);
    let mut cells = Position::ALL;
    cells.shuffle(rng);
    let objects = cells[..count]
        .iter()
        .map(|&position| Object {
            shape: Shape::ALL[rng.random_range(0..Shape::ALL.len())],
            colour: Colour::ALL[rng.random_range(0..Colour::ALL.len())],
            size: Size::ALL[rng.random_range(0..Size::ALL.len())],
            position,
        })
        .collect();
    Scene::new(objects)
}
