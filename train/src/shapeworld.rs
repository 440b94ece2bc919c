//! ShapeWorld: a seeded synthetic scene generator with exact ground truth.
//!
//! A scene is 1–4 coloured shapes on a black background, each in its own cell of a 3×3 grid.
//! Because every scene is known exactly, a caption can be parsed back into objects and scored
//! attribute by attribute (see [`crate::metrics`]) with no learned judge (DESIGN §6).
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
//! # Held-out data
//!
//! Scenes are a pure function of the seed, so a dataset written with a different seed is a fresh
//! sample from the same distribution. Because the scene space is finite (a single-object scene
//! has only 720 variants) two seeds can still produce identical captions; [`split`] therefore
//! groups samples by caption so that no caption appears on both sides of a train/val split.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader, Cursor};
use std::path::{Component, Path, PathBuf};

use image::{ImageFormat, Rgb, RgbImage};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

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

/// Integer bounding box `(x0, y0, n)` of an object: an `n×n` pixel square centred on its cell.
///
/// Snapping the box to whole pixels makes every shape of a given size render to the same pixel
/// pattern in every cell, which keeps tiny (5 px) shapes symmetric and recognisable.
pub fn object_box(object: &Object, image_size: u32) -> (u32, u32, u32) {
    let c = f64::from(image_size) / 3.0;
    let n = (c * object.size.cell_fraction()).round().max(1.0);
    let cx = (object.position.col() as f64 + 0.5) * c;
    let cy = (object.position.row() as f64 + 0.5) * c;
    let x0 = (cx - n / 2.0).round().max(0.0);
    let y0 = (cy - n / 2.0).round().max(0.0);
    (x0 as u32, y0 as u32, n as u32)
}

/// Whether pixel `(i, j)` (column, row) of an `n×n` box belongs to `shape`.
///
/// Geometry works on pixel centres mapped to `u, v ∈ [-1, 1]`:
/// circle `u² + v² ≤ 1` (a square minus its corners at 5 px); square = the whole box;
/// triangle pointing up with its apex at the top centre and its base on the bottom row;
/// diamond = square rotated 45° (`|u| + |v| ≤ 1`); cross = plus sign whose arms are about a
/// third of the box thick (odd/even matched to `n` so it stays centred; 1 px at 5 px so it
/// cannot collide with the circle's pattern).
fn shape_contains(shape: Shape, i: u32, j: u32, n: u32) -> bool {
    let nf = f64::from(n);
    let u = (f64::from(i) + 0.5) / nf * 2.0 - 1.0;
    let v = (f64::from(j) + 0.5) / nf * 2.0 - 1.0;
    const EPS: f64 = 1e-9;
    match shape {
        Shape::Square => true,
        Shape::Circle => u * u + v * v <= 1.0 + EPS,
        Shape::Diamond => u.abs() + v.abs() <= 1.0 + EPS,
        Shape::Triangle => u.abs() <= (v + 1.0) / 2.0 + EPS,
        Shape::Cross => {
            let t = cross_thickness(n);
            let a = (n - t) / 2;
            (a..a + t).contains(&i) || (a..a + t).contains(&j)
        }
    }
}

/// Arm thickness of the cross: the integer nearest to `n / 3` with the same parity as `n`, so
/// the arms stay centred in the box (1 px at `n = 5`, where 3 px would turn the cross into the
/// circle's pattern; 3 at 9, 4 at 10, 6 at 18).
fn cross_thickness(n: u32) -> u32 {
    let parity = n % 2;
    let x = f64::from(n) / 3.0;
    let t = 2 * ((x - f64::from(parity)) / 2.0).round().max(0.0) as u32 + parity;
    t.max(if parity == 0 { 2 } else { 1 }).min(n)
}

/// Renders a scene with crisp fills (no anti-aliasing) on a black background.
pub fn render(scene: &Scene, image_size: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(image_size, image_size, Rgb(BACKGROUND));
    for object in &scene.objects {
        let (x0, y0, n) = object_box(object, image_size);
        let colour = Rgb(object.colour.rgb());
        for j in 0..n {
            for i in 0..n {
                let (x, y) = (x0 + i, y0 + j);
                if x < image_size && y < image_size && shape_contains(object.shape, i, j, n) {
                    img.put_pixel(x, y, colour);
                }
            }
        }
    }
    img
}

/// Caption of a list of objects, always in canonical cell order (see the module grammar).
pub fn objects_caption(objects: &[Object]) -> String {
    let mut sorted = objects.to_vec();
    sorted.sort_by_key(|o| o.position);
    sorted
        .iter()
        .map(Object::to_string)
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The caption of a scene, e.g. "a small red circle at the top left and a large blue square in
/// the centre".
pub fn caption(scene: &Scene) -> String {
    objects_caption(&scene.objects)
}

/// Why a caption does not follow the grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty caption")]
    Empty,
    #[error("clause {clause}: expected {expected}, found {found:?} (word {word})")]
    UnexpectedWord {
        clause: usize,
        word: usize,
        expected: &'static str,
        found: String,
    },
    #[error("clause {clause}: expected {expected}, found end of caption")]
    UnexpectedEnd {
        clause: usize,
        expected: &'static str,
    },
}

/// Position phrases as word lists, longest first so "at the top left" wins over "at the top".
fn position_phrases() -> Vec<(Vec<&'static str>, Position)> {
    let mut phrases: Vec<_> = Position::ALL
        .into_iter()
        .map(|p| (p.phrase().split(' ').collect::<Vec<_>>(), p))
        .collect();
    phrases.sort_by_key(|(words, _)| std::cmp::Reverse(words.len()));
    phrases
}

/// Tries to read one clause starting at `words[start]`. Returns the object and the number of
/// words consumed, or the index and description of the first mismatch.
fn parse_clause(
    words: &[&str],
    start: usize,
    phrases: &[(Vec<&'static str>, Position)],
) -> Result<(Object, usize), (usize, &'static str)> {
    let get = |k: usize| words.get(start + k).copied();
    if get(0) != Some("a") {
        return Err((start, "\"a\""));
    }
    let size = get(1)
        .and_then(Size::from_word)
        .ok_or((start + 1, "a size"))?;
    let colour = get(2)
        .and_then(Colour::from_word)
        .ok_or((start + 2, "a colour"))?;
    let shape = get(3)
        .and_then(Shape::from_word)
        .ok_or((start + 3, "a shape"))?;
    let rest = &words[(start + 4).min(words.len())..];
    for (phrase, position) in phrases {
        if rest.len() >= phrase.len() && rest[..phrase.len()] == phrase[..] {
            // "at the top" must not be a prefix of an unrecognised longer phrase like
            // "at the top middle": the next word has to end the clause.
            let next = rest.get(phrase.len()).copied();
            if next.is_none() || next == Some("and") {
                let object = Object {
                    shape,
                    colour,
                    size,
                    position: *position,
                };
                return Ok((object, 4 + phrase.len()));
            }
        }
    }
    Err((start + 4, "a position phrase"))
}

/// Strict inverse of [`caption`]: every word must fit the grammar. Object order is kept as
/// written (not re-sorted) so callers can check canonical order if they care.
pub fn parse_caption(text: &str) -> Result<Vec<Object>, ParseError> {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.is_empty() {
        return Err(ParseError::Empty);
    }
    let phrases = position_phrases();
    let mut objects = Vec::new();
    let mut i = 0;
    loop {
        let clause = objects.len();
        match parse_clause(&words, i, &phrases) {
            Ok((object, used)) => {
                objects.push(object);
                i += used;
            }
            Err((at, expected)) => {
                return Err(match words.get(at) {
                    Some(found) => ParseError::UnexpectedWord {
                        clause,
                        word: at,
                        expected,
                        found: (*found).to_string(),
                    },
                    None => ParseError::UnexpectedEnd { clause, expected },
                });
            }
        }
        match words.get(i) {
            None => return Ok(objects),
            Some(&"and") => {
                i += 1;
                if i == words.len() {
                    return Err(ParseError::UnexpectedEnd {
                        clause: clause + 1,
                        expected: "\"a\"",
                    });
                }
            }
            Some(found) => {
                return Err(ParseError::UnexpectedWord {
                    clause,
                    word: i,
                    expected: "\"and\" or end of caption",
                    found: (*found).to_string(),
                })
            }
        }
    }
}

/// Tolerant parser for model outputs: returns every well-formed
/// "a SIZE COLOUR SHAPE POSITION" clause found anywhere in `text`, skipping garbage words.
///
/// A clause counts when its position phrase is followed by "and", the end of the text, or
/// anything that is not a longer position phrase (garbage after a clause does not discard it).
/// Never fails; a caption with no recognisable clause yields an empty list.
pub fn parse_caption_lenient(text: &str) -> Vec<Object> {
    let lowered = text.to_lowercase();
    let words: Vec<&str> = lowered.split_whitespace().collect();
    let phrases = position_phrases();
    let mut objects = Vec::new();
    let mut i = 0;
    while i < words.len() {
        match lenient_clause(&words, i, &phrases) {
            Some((object, used)) => {
                objects.push(object);
                i += used;
            }
            None => i += 1,
        }
    }
    objects
}

/// Like [`parse_clause`] but accepts the longest matching position phrase whatever follows.
fn lenient_clause(
    words: &[&str],
    start: usize,
    phrases: &[(Vec<&'static str>, Position)],
) -> Option<(Object, usize)> {
    let get = |k: usize| words.get(start + k).copied();
    if get(0) != Some("a") {
        return None;
    }
    let size = get(1).and_then(Size::from_word)?;
    let colour = get(2).and_then(Colour::from_word)?;
    let shape = get(3).and_then(Shape::from_word)?;
    let rest = &words[(start + 4).min(words.len())..];
    phrases.iter().find_map(|(phrase, position)| {
        (rest.len() >= phrase.len() && rest[..phrase.len()] == phrase[..]).then_some((
            Object {
                shape,
                colour,
                size,
                position: *position,
            },
            4 + phrase.len(),
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// Dataset on disk
// ---------------------------------------------------------------------------------------------

/// Errors while writing or reading a dataset folder. Every variant names the file (and the
/// 1-based line for jsonl files) so a corrupt dataset can be fixed by hand.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("invalid ShapeWorld config: {0}")]
    InvalidConfig(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: invalid JSON: {source}", path.display())]
    JsonFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}:{line}: image {}: {source}", path.display(), image.display())]
    Image {
        path: PathBuf,
        line: usize,
        image: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("{}: cannot encode PNG: {source}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("{}:{line}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Metadata written to `dataset.json`: enough to regenerate the dataset bit for bit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSummary {
    /// Always [`GENERATOR_NAME`].
    pub generator: String,
    /// [`DATASET_FORMAT_VERSION`] at write time.
    pub format_version: u32,
    pub config: SceneConfig,
    pub seed: u64,
    pub count: usize,
    /// The exact command line that produced the folder (passed in by the caller).
    pub command: String,
    /// Total number of objects over all scenes.
    pub total_objects: usize,
    /// Longest caption in words (add 2 for BOS/EOS to compare with `max_len`).
    pub max_caption_words: usize,
}

/// One line of `captions.jsonl` (DESIGN §6 folder format; `label` is optional and unused here).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaptionRecord {
    pub image: String,
    pub caption: String,
}

/// One line of `scenes.jsonl`: the exact ground truth for the image on the same line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SceneRecord {
    pub image: String,
    pub objects: Vec<Object>,
}

/// A loaded sample.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Full path of the image (dataset dir joined with the relative path in the jsonl).
    pub image_path: PathBuf,
    pub caption: String,
    pub objects: Vec<Object>,
    pub image: RgbImage,
}

/// Writes `bytes` to `path` atomically (see [`crate::fsutil::write_atomic`]), naming the
/// path in the error.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    crate::fsutil::write_atomic(path, bytes).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Encodes an image as PNG bytes (deterministic for identical pixels).
pub fn encode_png(img: &RgbImage, path_for_errors: &Path) -> Result<Vec<u8>, DataError> {
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, ImageFormat::Png)
        .map_err(|source| DataError::Encode {
            path: path_for_errors.to_path_buf(),
            source,
        })?;
    Ok(buf.into_inner())
}

/// Relative path of sample `index` inside the dataset folder.
pub fn image_rel_path(index: usize) -> String {
    format!("images/{index:06}.png")
}

/// Generates `count` scenes from `ChaCha8Rng::seed_from_u64(seed)` and writes
/// `images/NNNNNN.png`, `captions.jsonl`, `scenes.jsonl` and `dataset.json` under `out_dir`.
///
/// Every file is written atomically, and `dataset.json` is written last, so its presence
/// marks a complete dataset. The same `(count, seed, cfg)` always yields identical bytes.
pub fn write_dataset(
    out_dir: &Path,
    count: usize,
    seed: u64,
    cfg: &SceneConfig,
    command: &str,
) -> Result<DatasetSummary, DataError> {
    cfg.validate()?;
    let images_dir = out_dir.join("images");
    fs::create_dir_all(&images_dir).map_err(|source| DataError::Io {
        path: images_dir.clone(),
        source,
    })?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut captions_jsonl = String::new();
    let mut scenes_jsonl = String::new();
    let mut total_objects = 0;
    let mut max_caption_words = 0;
    for index in 0..count {
        let scene = generate_scene(&mut rng, cfg);
        let rel = image_rel_path(index);
        let path = out_dir.join(&rel);
        let png = encode_png(&render(&scene, cfg.image_size), &path)?;
        write_atomic(&path, &png)?;
        let text = caption(&scene);
        total_objects += scene.objects.len();
        max_caption_words = max_caption_words.max(text.split(' ').count());
        push_json_line(
            &mut captions_jsonl,
            &CaptionRecord {
                image: rel.clone(),
                caption: text,
            },
            &out_dir.join("captions.jsonl"),
        )?;
        push_json_line(
            &mut scenes_jsonl,
            &SceneRecord {
                image: rel,
                objects: scene.objects,
            },
            &out_dir.join("scenes.jsonl"),
        )?;
    }
    write_atomic(&out_dir.join("captions.jsonl"), captions_jsonl.as_bytes())?;
    write_atomic(&out_dir.join("scenes.jsonl"), scenes_jsonl.as_bytes())?;
    let summary = DatasetSummary {
        generator: GENERATOR_NAME.to_string(),
        format_version: DATASET_FORMAT_VERSION,
        config: *cfg,
        seed,
        count,
        command: command.to_string(),
        total_objects,
        max_caption_words,
    };
    write_json_file(&out_dir.join("dataset.json"), &summary)?;
    Ok(summary)
}

/// Writes `value` as pretty JSON with a final newline, atomically (`dataset.json`).
pub(crate) fn write_json_file<T: Serialize>(path: &Path, value: &T) -> Result<(), DataError> {
    let mut json = serde_json::to_string_pretty(value).map_err(|source| DataError::JsonFile {
        path: path.to_path_buf(),
        source,
    })?;
    json.push('\n');
    write_atomic(path, json.as_bytes())
}

/// Appends `value` as one JSON line to `out` (a jsonl file being built for `path`).
pub(crate) fn push_json_line<T: Serialize>(
    out: &mut String,
    value: &T,
    path: &Path,
) -> Result<(), DataError> {
    let line = serde_json::to_string(value).map_err(|source| DataError::JsonFile {
        path: path.to_path_buf(),
        source,
    })?;
    out.push_str(&line);
    out.push('\n');
    Ok(())
}

/// Reads `dataset.json` of a folder written by [`write_dataset`].
pub fn load_dataset_info(dir: &Path) -> Result<DatasetSummary, DataError> {
    let path = dir.join("dataset.json");
    let text = fs::read_to_string(&path).map_err(|source| DataError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| DataError::JsonFile { path, source })
}

/// Reads a jsonl file into records, skipping blank lines; errors carry the 1-based line.
pub(crate) fn read_jsonl<T: for<'de> Deserialize<'de>>(
    path: &Path,
) -> Result<Vec<(usize, T)>, DataError> {
    let file = fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (k, line) in BufReader::new(file).lines().enumerate() {
        let line_no = k + 1;
        let line = line.map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(&line).map_err(|source| DataError::Json {
            path: path.to_path_buf(),
            line: line_no,
            source,
        })?;
        out.push((line_no, value));
    }
    Ok(out)
}

/// Resolves a jsonl image path inside `dir`, refusing absolute paths and `..` so a dataset
/// file cannot make the loader read outside its folder.
fn resolve_image(dir: &Path, rel: &str, jsonl: &Path, line: usize) -> Result<PathBuf, DataError> {
    let rel_path = Path::new(rel);
    let ok = !rel.is_empty()
        && rel_path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !ok {
        return Err(DataError::Invalid {
            path: jsonl.to_path_buf(),
            line,
            message: format!("image path {rel:?} must be relative and stay inside the dataset"),
        });
    }
    Ok(dir.join(rel_path))
}

/// Loads the image a jsonl line lists (path checked by [`resolve_image`]), decoded to RGB; it
/// must be square and of the size of the first image loaded (`expected_size` remembers it).
pub(crate) fn load_listed_image(
    dir: &Path,
    rel: &str,
    jsonl: &Path,
    line: usize,
    expected_size: &mut Option<(u32, u32)>,
) -> Result<(PathBuf, RgbImage), DataError> {
    let image_path = resolve_image(dir, rel, jsonl, line)?;
    let image = image::open(&image_path)
        .map_err(|source| DataError::Image {
            path: jsonl.to_path_buf(),
            line,
            image: image_path.clone(),
            source,
        })?
        .to_rgb8();
    let dims = image.dimensions();
    let expected = *expected_size.get_or_insert(dims);
    if dims.0 != dims.1 || dims != expected {
        return Err(DataError::Invalid {
            path: jsonl.to_path_buf(),
            line,
            message: format!(
                "image {} is {}x{}, expected square {}x{}",
                image_path.display(),
                dims.0,
                dims.1,
                expected.0,
                expected.1
            ),
        });
    }
    Ok((image_path, image))
}

/// Loads a ShapeWorld folder: `captions.jsonl`, `scenes.jsonl` (same images, same order) and
/// every image, decoded to RGB.
///
/// Checks that both jsonl files list the same images line by line, that every caption equals
/// [`objects_caption`] of its scene, and that all images are square and of one size. Any
/// problem is an error naming the file and line; nothing panics on bad input.
pub fn load_dataset(dir: &Path) -> Result<Vec<Sample>, DataError> {
    let captions_path = dir.join("captions.jsonl");
    let scenes_path = dir.join("scenes.jsonl");
    let captions: Vec<(usize, CaptionRecord)> = read_jsonl(&captions_path)?;
    let scenes: Vec<(usize, SceneRecord)> = read_jsonl(&scenes_path)?;
    if captions.len() != scenes.len() {
        return Err(DataError::Invalid {
            path: scenes_path,
            line: scenes.last().map_or(0, |(l, _)| *l),
            message: format!(
                "{} scene records but {} caption records in captions.jsonl",
                scenes.len(),
                captions.len()
            ),
        });
    }
    let mut samples = Vec::with_capacity(captions.len());
    let mut expected_size: Option<(u32, u32)> = None;
    for ((line, cap), (scene_line, scene)) in captions.into_iter().zip(scenes) {
        if cap.image != scene.image {
            return Err(DataError::Invalid {
                path: scenes_path.clone(),
                line: scene_line,
                message: format!(
                    "image {:?} does not match {:?} on line {line} of captions.jsonl",
                    scene.image, cap.image
                ),
            });
        }
        let expected_caption = objects_caption(&scene.objects);
        if cap.caption != expected_caption {
            return Err(DataError::Invalid {
                path: captions_path.clone(),
                line,
                message: format!(
                    "caption {:?} does not describe the scene on line {scene_line} of \
                     scenes.jsonl (expected {expected_caption:?})",
                    cap.caption
                ),
            });
        }
        let (image_path, image) =
            load_listed_image(dir, &cap.image, &captions_path, line, &mut expected_size)?;
        samples.push(Sample {
            image_path,
            caption: cap.caption,
            objects: scene.objects,
            image,
        });
    }
    Ok(samples)
}

/// Splits items into `(train, val)` so that items with equal keys land on the same side.
///
/// Keys are shuffled with `ChaCha8Rng::seed_from_u64(seed)` (after sorting, so the result does
/// not depend on input order of duplicates), then whole key groups go to `val` until it holds
/// at least `round(val_fraction * len)` items. Within each side the input order is kept.
pub fn split_by_key<T, K, F>(
    items: Vec<T>,
    val_fraction: f64,
    seed: u64,
    key: F,
) -> (Vec<T>, Vec<T>)
where
    K: Ord + Clone,
    F: Fn(&T) -> K,
{
    let fraction = if val_fraction.is_finite() {
        val_fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let target = (fraction * items.len() as f64).round() as usize;
    let mut groups: BTreeMap<K, usize> = BTreeMap::new();
    for item in &items {
        *groups.entry(key(item)).or_default() += 1;
    }
    let mut keys: Vec<(K, usize)> = groups.into_iter().collect();
    keys.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut val_keys = Vec::new();
    let mut taken = 0;
    for (k, n) in keys {
        if taken >= target {
            break;
        }
        taken += n;
        val_keys.push(k);
    }
    val_keys.sort();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for item in items {
        if val_keys.binary_search(&key(&item)).is_ok() {
            val.push(item);
        } else {
            train.push(item);
        }
    }
    (train, val)
}

/// Train/val split of samples grouped by caption, so no caption is seen in both splits.
pub fn split(samples: Vec<Sample>, val_fraction: f64, seed: u64) -> (Vec<Sample>, Vec<Sample>) {
    split_by_key(samples, val_fraction, seed, |s| s.caption.clone())
}

/// Number of distinct captions among samples (handy for reporting split overlap).
pub fn distinct_captions(samples: &[Sample]) -> usize {
    samples
        .iter()
        .map(|s| s.caption.as_str())
        .collect::<HashSet<_>>()
        .len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scene_for(seed: u64) -> Scene {
        generate_scene(
            &mut ChaCha8Rng::seed_from_u64(seed),
            &SceneConfig::default(),
        )
    }

    #[test]
    fn caption_parse_round_trip() {
        for seed in 0..2000 {
            let scene = scene_for(seed);
            assert!((1..=4).contains(&scene.objects.len()));
            let text = caption(&scene);
            assert_eq!(parse_caption(&text).unwrap(), scene.objects, "{text}");
            assert_eq!(parse_caption_lenient(&text), scene.objects, "{text}");
        }
    }

    #[test]
    fn scenes_have_distinct_sorted_cells_and_cover_the_space() {
        let mut counts = HashSet::new();
        let mut shapes = HashSet::new();
        let mut colours = HashSet::new();
        for seed in 0..500 {
            let scene = scene_for(seed);
            let cells: Vec<_> = scene.objects.iter().map(|o| o.position).collect();
            assert!(cells.windows(2).all(|w| w[0] < w[1]), "{cells:?}");
            counts.insert(scene.objects.len());
            for o in &scene.objects {
                shapes.insert(o.shape);
                colours.insert(o.colour);
            }
        }
        assert_eq!(counts.len(), 4);
        assert_eq!(shapes.len(), 5);
        assert_eq!(colours.len(), 8);
    }

    #[test]
    fn example_caption_matches_grammar() {
        let scene = Scene::new(vec![
            Object {
                shape: Shape::Square,
                colour: Colour::Blue,
                size: Size::Large,
                position: Position::Centre,
            },
            Object {
                shape: Shape::Circle,
                colour: Colour::Red,
                size: Size::Small,
                position: Position::TopLeft,
            },
        ]);
        assert_eq!(
            caption(&scene),
            "a small red circle at the top left and a large blue square in the centre"
        );
    }

    #[test]
    fn all_positions_round_trip() {
        for position in Position::ALL {
            let o = Object {
                shape: Shape::Cross,
                colour: Colour::White,
                size: Size::Small,
                position,
            };
            let text = objects_caption(&[o, o]);
            assert_eq!(parse_caption(&text).unwrap(), vec![o, o]);
        }
    }

    #[test]
    fn determinism() {
        let cfg = SceneConfig::default();
        let a = generate_scene(&mut ChaCha8Rng::seed_from_u64(42), &cfg);
        let b = generate_scene(&mut ChaCha8Rng::seed_from_u64(42), &cfg);
        assert_eq!(a, b);
        assert_eq!(caption(&a), caption(&b));
        let (ra, rb) = (render(&a, 32), render(&b, 32));
        assert_eq!(ra.as_raw(), rb.as_raw());
        let p = Path::new("x.png");
        assert_eq!(encode_png(&ra, p).unwrap(), encode_png(&rb, p).unwrap());
        // Different seeds should (almost always) differ.
        let distinct: HashSet<_> = (0..50).map(|s| caption(&scene_for(s))).collect();
        assert!(distinct.len() > 40);
    }

    fn count_in_cell(img: &RgbImage, o: &Object, size: u32) -> usize {
        let (x0, y0, x1, y1) = o.position.cell_rect(size);
        let mut n = 0;
        for y in y0..y1 {
            for x in x0..x1 {
                if img.get_pixel(x, y).0 == o.colour.rgb() {
                    n += 1;
                }
            }
        }
        n
    }

    #[test]
    fn every_object_is_drawn_in_its_cell() {
        for size in [32, 64] {
            let cfg = SceneConfig {
                image_size: size,
                ..SceneConfig::default()
            };
            for seed in 0..300 {
                let scene = generate_scene(&mut ChaCha8Rng::seed_from_u64(seed), &cfg);
                let img = render(&scene, size);
                let mut coloured = 0;
                for o in &scene.objects {
                    let n = count_in_cell(&img, o, size);
                    assert!(n > 0, "seed {seed}: {o} not drawn");
                    coloured += n;
                }
                // Nothing is drawn outside the objects' cells.
                let total = img.pixels().filter(|p| p.0 != BACKGROUND).count();
                assert_eq!(total, coloured, "seed {seed}: pixels leak out of cells");
            }
        }
    }

    #[test]
    fn small_objects_have_fewer_pixels_than_large() {
        for size in [32, 64] {
            for shape in Shape::ALL {
                for position in Position::ALL {
                    let mk = |s| Object {
                        shape,
                        colour: Colour::Green,
                        size: s,
                        position,
                    };
                    let small = mk(Size::Small);
                    let large = mk(Size::Large);
                    let ns = count_in_cell(&render(&Scene::new(vec![small]), size), &small, size);
                    let nl = count_in_cell(&render(&Scene::new(vec![large]), size), &large, size);
                    assert!(
                        0 < ns && ns < nl,
                        "{shape:?} {position:?} @{size}: {ns} vs {nl}"
                    );
                }
            }
        }
    }

    /// Pixel masks of the five shapes must all differ, at every size we render.
    #[test]
    fn shapes_are_distinguishable() {
        for size in [32, 64] {
            for s in Size::ALL {
                let masks: Vec<Vec<bool>> = Shape::ALL
                    .iter()
                    .map(|&shape| {
                        let o = Object {
                            shape,
                            colour: Colour::White,
                            size: s,
                            position: Position::Centre,
                        };
                        render(&Scene::new(vec![o]), size)
                            .pixels()
                            .map(|p| p.0 != BACKGROUND)
                            .collect()
                    })
                    .collect();
                for a in 0..masks.len() {
                    for b in a + 1..masks.len() {
                        assert_ne!(
                            masks[a],
                            masks[b],
                            "{:?} vs {:?}",
                            Shape::ALL[a],
                            Shape::ALL[b]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn parse_errors_on_garbage() {
        assert_eq!(parse_caption(""), Err(ParseError::Empty));
        assert_eq!(parse_caption("   "), Err(ParseError::Empty));
        for bad in [
            "hello world",
            "a small red circle",
            "a small red circle at the",
            "a small red circle at the top middle",
            "a tiny red circle at the top",
            "a small pink circle at the top",
            "a small red blob at the top",
            "a small red circle at the top and",
            "a small red circle at the top and and",
            "a small red circle at the top a small red circle at the left",
            "a small red circle in the centre extra",
            "A small red circle in the centre",
        ] {
            assert!(parse_caption(bad).is_err(), "{bad:?} should not parse");
        }
        let err = parse_caption("a small red blob at the top").unwrap_err();
        assert_eq!(
            err,
            ParseError::UnexpectedWord {
                clause: 0,
                word: 3,
                expected: "a shape",
                found: "blob".into()
            }
        );
    }

    #[test]
    fn lenient_parse_skips_garbage() {
        let text = "xx a small red circle at the top left left and and a large blob on \
                    the right a large white cross in the centre a small";
        let objs = parse_caption_lenient(text);
        assert_eq!(
            objs,
            vec![
                Object {
                    shape: Shape::Circle,
                    colour: Colour::Red,
                    size: Size::Small,
                    position: Position::TopLeft
                },
                Object {
                    shape: Shape::Cross,
                    colour: Colour::White,
                    size: Size::Large,
                    position: Position::Centre
                },
            ]
        );
        assert!(parse_caption_lenient("").is_empty());
        assert!(parse_caption_lenient("[UNK] [UNK] a a a").is_empty());
    }

    #[test]
    fn serde_names_are_lowercase() {
        let o = Object {
            shape: Shape::Triangle,
            colour: Colour::Purple,
            size: Size::Large,
            position: Position::BottomRight,
        };
        let json = serde_json::to_string(&o).unwrap();
        assert_eq!(
            json,
            r#"{"shape":"triangle","colour":"purple","size":"large","position":"bottom_right"}"#
        );
        assert_eq!(serde_json::from_str::<Object>(&json).unwrap(), o);
    }

    #[test]
    fn config_validation() {
        assert!(SceneConfig::default().validate().is_ok());
        let bad = SceneConfig {
            image_size: 8,
            ..SceneConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = SceneConfig {
            min_objects: 3,
            max_objects: 2,
            ..SceneConfig::default()
        };
        assert!(bad.validate().is_err());
        // generate_scene must not panic on an unvalidated config.
        let weird = SceneConfig {
            image_size: 32,
            min_objects: 0,
            max_objects: 100,
        };
        let scene = generate_scene(&mut ChaCha8Rng::seed_from_u64(1), &weird);
        assert!((1..=9).contains(&scene.objects.len()));
    }

    #[test]
    fn dataset_write_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SceneConfig::default();
        let summary = write_dataset(dir.path(), 20, 7, &cfg, "duet-train gen --seed 7").unwrap();
        assert_eq!(summary.count, 20);
        assert_eq!(load_dataset_info(dir.path()).unwrap(), summary);
        let samples = load_dataset(dir.path()).unwrap();
        assert_eq!(samples.len(), 20);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (k, s) in samples.iter().enumerate() {
            let scene = generate_scene(&mut rng, &cfg);
            assert_eq!(s.objects, scene.objects);
            assert_eq!(s.caption, caption(&scene));
            assert_eq!(s.image.as_raw(), render(&scene, 32).as_raw());
            assert_eq!(s.image_path, dir.path().join(format!("images/{k:06}.png")));
        }
        let first = fs::read_to_string(dir.path().join("captions.jsonl")).unwrap();
        assert!(first.starts_with(r#"{"image":"images/000000.png","caption":"a "#));
        // No temp files left behind.
        for entry in fs::read_dir(dir.path().join("images")).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(name.ends_with(".png") && !name.starts_with('.'), "{name}");
        }
        // Same seed → identical bytes.
        let dir2 = tempfile::tempdir().unwrap();
        write_dataset(dir2.path(), 20, 7, &cfg, "duet-train gen --seed 7").unwrap();
        for f in [
            "captions.jsonl",
            "scenes.jsonl",
            "dataset.json",
            "images/000013.png",
        ] {
            assert_eq!(
                fs::read(dir.path().join(f)).unwrap(),
                fs::read(dir2.path().join(f)).unwrap(),
                "{f}"
            );
        }
    }

    #[test]
    fn load_errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path(), 5, 3, &SceneConfig::default(), "test").unwrap();

        // Corrupt PNG.
        let png = dir.path().join("images/000002.png");
        let good_png = fs::read(&png).unwrap();
        fs::write(&png, b"not a png at all").unwrap();
        let err = load_dataset(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::Image { line: 3, .. }), "{err:?}");
        assert!(err.to_string().contains("000002.png"), "{err}");
        fs::write(&png, &good_png).unwrap();
        assert!(load_dataset(dir.path()).is_ok());

        // Missing image.
        fs::remove_file(&png).unwrap();
        let err = load_dataset(dir.path()).unwrap_err();
        assert!(err.to_string().contains("000002.png"), "{err}");
        fs::write(&png, &good_png).unwrap();

        // Malformed jsonl line.
        let cap_path = dir.path().join("captions.jsonl");
        let good = fs::read_to_string(&cap_path).unwrap();
        let mut lines: Vec<&str> = good.lines().collect();
        lines[3] = "{\"image\": \"images/000003.png\", \"caption\": ";
        fs::write(&cap_path, lines.join("\n")).unwrap();
        let err = load_dataset(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::Json { line: 4, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("captions.jsonl:4"), "{msg}");

        // Caption that does not match its scene.
        lines[3] = r#"{"image":"images/000003.png","caption":"a small red circle at the top"}"#;
        fs::write(&cap_path, lines.join("\n")).unwrap();
        let err = load_dataset(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::Invalid { line: 4, .. }), "{err:?}");

        // Path escaping the dataset folder.
        lines[3] = r#"{"image":"../x.png","caption":"x"}"#;
        fs::write(&cap_path, lines.join("\n")).unwrap();
        assert!(load_dataset(dir.path()).is_err());

        // Missing file.
        fs::remove_file(&cap_path).unwrap();
        let err = load_dataset(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }));
        assert!(err.to_string().contains("captions.jsonl"), "{err}");
    }

    #[test]
    fn split_keeps_captions_apart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SceneConfig {
            image_size: 32,
            min_objects: 1,
            max_objects: 1,
        };
        write_dataset(dir.path(), 300, 11, &cfg, "test").unwrap();
        let samples = load_dataset(dir.path()).unwrap();
        let (train, val) = split(samples.clone(), 0.2, 5);
        assert_eq!(train.len() + val.len(), 300);
        assert!((55..=80).contains(&val.len()), "{}", val.len());
        let train_caps: HashSet<_> = train.iter().map(|s| s.caption.clone()).collect();
        assert!(val.iter().all(|s| !train_caps.contains(&s.caption)));
        // Deterministic.
        let (train2, val2) = split(samples, 0.2, 5);
        assert_eq!(train.len(), train2.len());
        assert!(val
            .iter()
            .zip(&val2)
            .all(|(a, b)| a.image_path == b.image_path));
    }
}
