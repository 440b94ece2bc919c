//! A folder of the user's own image–caption pairs: `DIR/captions.jsonl` listing images under
//! `DIR` (by convention `DIR/images/…`), one pair per line —
//!
//! ```text
//! {"image": "images/cat.jpg", "caption": "a cat on a sofa", "label": "cat", "split": "train"}
//! ```
//!
//! `label` (a name or a number) and `split` (`train`, `val` or `test`) are optional; an image
//! may be listed on several lines with different captions. Images may be of any size, shape
//! and format the `image` crate reads: they are fitted to the run's square side by the run's
//! [`ImageFit`], the transform the runtime applies at inference. Without `split` fields the
//! images are split by [`AUTO_SPLIT_SEED`] ([`AUTO_VAL_FRACTION`] to validation, every caption
//! of an image on one side); with them the user's split is kept as written.
//!
//! Reading a folder checks it ([`check_folder`]): the same pass that loads the images for
//! training finds every problem, so training refuses a broken folder with the list that
//! `duet-train data check` prints.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use duet_fsio::{Cap, Follow};
use duet_spec::pixels::{decode_image, fit_image, ImageFit};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::{PreTokenizedString, PreTokenizer, Tokenizer};

use crate::shapeworld::{split_by_key, Sample};

/// The file that lists a folder's pairs.
pub const CAPTIONS_FILE: &str = "captions.jsonl";
/// The largest `captions.jsonl` read.
pub const CAPTIONS_FILE_CAP: Cap = Cap::new(256 << 20, "a captions.jsonl");
/// The largest image file read.
pub const IMAGE_FILE_CAP: Cap = Cap::new(64 << 20, "an image file");
/// Fraction of the images that go to validation when no line says its split.
pub const AUTO_VAL_FRACTION: f64 = 0.1;
/// Seed of that split (fixed, so every run and `data check` see the same split).
pub const AUTO_SPLIT_SEED: u64 = 0;
/// Problems listed in full by a refusal; the rest are counted.
pub const SHOWN_PROBLEMS: usize = 10;

/// Which part of a folder a pair belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Split::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| format!("unknown split '{s}' (expected train, val or test)"))
    }
}

/// A pair's optional class: a name or a number (numbers sort before names, by value).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Label {
    Index(u64),
    Name(String),
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Label::Index(i) => write!(f, "{i}"),
            Label::Name(n) => f.write_str(n),
        }
    }
}

/// One line of `captions.jsonl`. Unknown fields are refused, so a misspelt `"captoin"` is found
/// rather than read as a pair without a caption.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionedRecord {
    pub image: String,
    pub caption: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<Label>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
}

/// Something wrong with a folder. `line` is 1-based in `captions.jsonl` (0: the file itself).
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub line: usize,
    pub kind: ProblemKind,
}

/// What is wrong. Errors refuse training ([`ProblemKind::is_error`]); the others are reported
/// by `data check` and let training go on.
#[derive(Debug, Clone, PartialEq)]
pub enum ProblemKind {
    /// `captions.jsonl` is missing, not a regular file, too large or not UTF-8.
    Unreadable {
        reason: String,
    },
    /// A line that is not a JSON record of the expected fields.
    BadLine {
        reason: String,
    },
    /// An image path that is absolute, empty or climbs out of the folder with `..`.
    OutsidePath {
        image: String,
    },
    MissingImage {
        image: String,
    },
    /// Not a regular file (a link, a folder, a device), too large, or unreadable.
    UnreadableImage {
        image: String,
        reason: String,
    },
    UndecodableImage {
        image: String,
        reason: String,
    },
    EmptyCaption {
        image: String,
    },
    /// More tokens (with `[BOS]`/`[EOS]`) than the model's `max_len`.
    LongCaption {
        tokens: usize,
        max_len: usize,
    },
    /// Some lines say their split and others do not: the folder's split would be half chosen.
    PartialSplit {
        first_without: usize,
    },
    /// No pair in the train split.
    NoTrainPairs,
    /// The same bytes under another name (warning: the pair is seen twice as often).
    DuplicateImage {
        image: String,
        same_as: String,
    },
    /// The same image and caption on an earlier line (warning).
    DuplicatePair {
        same_as_line: usize,
    },
}

impl ProblemKind {
    pub fn is_error(&self) -> bool {
        !matches!(
            self,
            ProblemKind::DuplicateImage { .. } | ProblemKind::DuplicatePair { .. }
        )
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line > 0 {
            write!(f, "line {}: ", self.line)?;
        }
        match &self.kind {
            ProblemKind::Unreadable { reason } => write!(f, "{CAPTIONS_FILE}: {reason}"),
            ProblemKind::BadLine { reason } => write!(f, "not a pair record: {reason}"),
            ProblemKind::OutsidePath { image } => write!(
                f,
                "image path {image:?} must be relative and stay inside the folder"
            ),
            ProblemKind::MissingImage { image } => write!(f, "image {image} does not exist"),
            ProblemKind::UnreadableImage { image, reason } => {
                write!(f, "image {image} cannot be read: {reason}")
            }
            ProblemKind::UndecodableImage { image, reason } => {
                write!(f, "image {image} cannot be decoded: {reason}")
            }
            ProblemKind::EmptyCaption { image } => write!(f, "empty caption for {image}"),
            ProblemKind::LongCaption { tokens, max_len } => write!(
                f,
                "caption is {tokens} tokens with [BOS]/[EOS], over the model's max_len {max_len}"
            ),
            ProblemKind::PartialSplit { first_without } => write!(
                f,
                "some lines give a \"split\" and line {first_without} does not: give it on \
                 every line or on none"
            ),
            ProblemKind::NoTrainPairs => write!(f, "no pair in the train split"),
            ProblemKind::DuplicateImage { image, same_as } => {
                write!(f, "image {image} has the same bytes as {same_as}")
            }
            ProblemKind::DuplicatePair { same_as_line } => {
                write!(f, "the same image and caption as line {same_as_line}")
            }
        }
    }
}

/// What a read of a folder found: its pairs (with their images, fitted) and every problem.
#[derive(Debug, Clone, Default)]
pub struct FolderReport {
    pub dir: PathBuf,
    /// Lines read as records, in file order, each with its line and assigned split.
    pub pairs: usize,
    pub per_split: BTreeMap<Split, usize>,
    /// Distinct image files listed.
    pub images: usize,
    pub labels: usize,
    /// Smallest and largest width and height of the images as stored.
    pub min_size: Option<(u32, u32)>,
    pub max_size: Option<(u32, u32)>,
    /// Images that are not square (the fit decides what the model sees of them).
    pub non_square: usize,
    /// Widest and tallest aspect ratio (width / height).
    pub aspect_range: Option<(f64, f64)>,
    /// Whether the splits came from the lines (`true`) or from [`AUTO_SPLIT_SEED`].
    pub split_given: bool,
    /// Words of the captions and how often each occurs (lowercased, as the tokenizer sees them).
    pub words: BTreeMap<String, usize>,
    /// Words written joined to punctuation, which the tokenizer splits (`face:` → `face`, `:`).
    pub split_words: BTreeMap<String, usize>,
    /// Words the given tokenizer does not know (they become `[UNK]`); empty without one.
    pub unknown_words: BTreeMap<String, usize>,
    /// Longest caption in tokens, with `[BOS]`/`[EOS]`.
    pub longest_caption: usize,
    pub problems: Vec<Problem>,
}

impl FolderReport {
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(|p| p.kind.is_error())
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(|p| !p.kind.is_error())
    }

    pub fn is_ok(&self) -> bool {
        self.errors().next().is_none()
    }

    /// The first [`SHOWN_PROBLEMS`] errors, one per line, and a count of the rest.
    pub fn error_summary(&self) -> String {
        let errors: Vec<&Problem> = self.errors().collect();
        let mut out: Vec<String> = errors
            .iter()
            .take(SHOWN_PROBLEMS)
            .map(|p| format!("  {p}"))
            .collect();
        if errors.len() > SHOWN_PROBLEMS {
            out.push(format!("  … and {} more", errors.len() - SHOWN_PROBLEMS));
        }
        out.join("\n")
    }
}

/// A folder refused for training: its report's errors.
#[derive(Debug, thiserror::Error)]
#[error(
    "{}: {} problem(s) in this folder (run `duet-train data check {}` for the full report):\n{}",
    report.dir.display(), report.errors().count(), report.dir.display(), report.error_summary()
)]
pub struct FolderRefused {
    pub report: Box<FolderReport>,
}

/// What to read: which split, fitted to which square side, checked against which model limits.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions<'t> {
    /// `None`: read every split.
    pub split: Option<Split>,
    pub side: u32,
    pub fit: ImageFit,
    pub max_len: usize,
    /// The tokenizer the run will use, when it exists already (fine-tuning, a later stage):
    /// its unknown words are reported.
    pub tokenizer: Option<&'t Tokenizer>,
}

/// Whether `dir` is a captioned folder: a `captions.jsonl` and no ShapeWorld `scenes.jsonl`.
pub fn is_captioned_folder(dir: &Path) -> bool {
    dir.join(CAPTIONS_FILE).is_file() && !dir.join("scenes.jsonl").exists()
}

/// Reads and checks a folder: every line, every listed image (each file read once, a regular
/// file under [`IMAGE_FILE_CAP`], never through a link), and the samples of `opts.split`,
/// fitted. Problems are collected, not returned early, so one pass finds them all.
pub fn check_folder(dir: &Path, opts: &ReadOptions) -> (FolderReport, Vec<Sample>) {
    let (report, pairs) = check_pairs(dir, opts);
    let samples = pairs
        .into_iter()
        .filter(|p| opts.split.is_none_or(|s| s == p.split))
        .map(|p| p.sample)
        .collect();
    (report, samples)
}

/// One readable pair of a folder with its split and label.
#[derive(Debug, Clone)]
pub struct CaptionedPair {
    pub sample: Sample,
    pub split: Split,
    pub label: Option<Label>,
    /// 1-based line in `captions.jsonl`.
    pub line: usize,
}

/// [`check_folder`] keeping every split and each pair's label (`opts.split` is not applied):
/// what the fusion and restore stages read from a labelled folder.
pub fn check_pairs(dir: &Path, opts: &ReadOptions) -> (FolderReport, Vec<CaptionedPair>) {
    let mut report = FolderReport {
        dir: dir.to_path_buf(),
        ..FolderReport::default()
    };
    let jsonl = dir.join(CAPTIONS_FILE);
    // Images are opened without following a link, and their directories must resolve inside
    // the folder itself: a linked `images/` subdirectory is as far outside as `../`.
    let root = match dir.canonicalize() {
        Ok(root) => root,
        Err(e) => {
            report.problems.push(Problem {
                line: 0,
                kind: ProblemKind::Unreadable {
                    reason: format!("{}: {e}", dir.display()),
                },
            });
            return (report, Vec::new());
        }
    };
    let text = match duet_fsio::read_capped_text(&jsonl, CAPTIONS_FILE_CAP, Follow::No) {
        Ok(t) => t,
        Err(e) => {
            report.problems.push(Problem {
                line: 0,
                kind: ProblemKind::Unreadable {
                    reason: e.to_string(),
                },
            });
            return (report, Vec::new());
        }
    };
    let mut records: Vec<(usize, CaptionedRecord)> = Vec::new();
    for (k, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<CaptionedRecord>(line) {
            Ok(r) => records.push((k + 1, r)),
            Err(e) => report.problems.push(Problem {
                line: k + 1,
                kind: ProblemKind::BadLine {
                    reason: e.to_string(),
                },
            }),
        }
    }
    report.pairs = records.len();
    let splits = assign_splits(&records, &mut report);

    // Each distinct image once: read, hashed, decoded, fitted.
    let mut images: HashMap<String, Option<RgbImage>> = HashMap::new();
    let mut by_hash: HashMap<[u8; 32], String> = HashMap::new();
    let mut seen_pairs: HashMap<(String, String), usize> = HashMap::new();
    let mut labels = std::collections::HashSet::new();
    let whitespace = Whitespace {};
    let mut samples = Vec::new();
    for ((line, record), split) in records.iter().zip(&splits) {
        let line = *line;
        let problem = |kind| Problem { line, kind };
        if let Some(l) = &record.label {
            labels.insert(l.clone());
        }
        if !images.contains_key(&record.image) {
            let loaded = read_image(dir, &root, &record.image, &mut report, &mut by_hash, line);
            images.insert(
                record.image.clone(),
                loaded.map(|img| fit_image(&img, opts.side, opts.fit)),
            );
        }
        let caption = record.caption.trim();
        if caption.is_empty() {
            report.problems.push(problem(ProblemKind::EmptyCaption {
                image: record.image.clone(),
            }));
            continue;
        }
        let tokens = caption_words(&whitespace, caption, &mut report, opts.tokenizer) + 2;
        report.longest_caption = report.longest_caption.max(tokens);
        if tokens > opts.max_len {
            report.problems.push(problem(ProblemKind::LongCaption {
                tokens,
                max_len: opts.max_len,
            }));
        }
        let key = (record.image.clone(), caption.to_lowercase());
        if let Some(&first) = seen_pairs.get(&key) {
            report.problems.push(problem(ProblemKind::DuplicatePair {
                same_as_line: first,
            }));
        } else {
            seen_pairs.insert(key, line);
        }
        *report.per_split.entry(*split).or_default() += 1;
        if let Some(Some(img)) = images.get(&record.image) {
            samples.push(CaptionedPair {
                sample: Sample {
                    image_path: dir.join(&record.image),
                    caption: caption.to_owned(),
                    objects: Vec::new(),
                    image: img.clone(),
                },
                split: *split,
                label: record.label.clone(),
                line,
            });
        }
    }
    report.images = images.len();
    report.labels = labels.len();
    // An empty file too: training would stop on it, so the check does.
    if report.per_split.get(&Split::Train).copied().unwrap_or(0) == 0 {
        report.problems.push(Problem {
            line: 0,
            kind: ProblemKind::NoTrainPairs,
        });
    }
    report.problems.sort_by_key(|p| p.line);
    (report, samples)
}

/// Reads the pairs of `opts.split` of a folder for training, refusing it if the check found
/// any error.
pub fn load_captioned(dir: &Path, opts: &ReadOptions) -> Result<Vec<Sample>, FolderRefused> {
    let (report, samples) = check_folder(dir, opts);
    if !report.is_ok() {
        return Err(FolderRefused {
            report: Box::new(report),
        });
    }
    tracing::info!(
        "{}: {} pairs of the {} split, images fitted to {}px ({})",
        dir.display(),
        samples.len(),
        opts.split.map_or("whole", Split::name),
        opts.side,
        opts.fit
    );
    Ok(samples)
}

/// The split of every record: as written, or by [`AUTO_SPLIT_SEED`] grouped by image.
fn assign_splits(records: &[(usize, CaptionedRecord)], report: &mut FolderReport) -> Vec<Split> {
    let given = records.iter().filter(|(_, r)| r.split.is_some()).count();
    if given > 0 {
        report.split_given = true;
        if let Some((line, _)) = records.iter().find(|(_, r)| r.split.is_none()) {
            report.problems.push(Problem {
                line: 0,
                kind: ProblemKind::PartialSplit {
                    first_without: *line,
                },
            });
        }
        return records
            .iter()
            .map(|(_, r)| r.split.unwrap_or(Split::Train))
            .collect();
    }
    let indexed: Vec<(usize, &str)> = records
        .iter()
        .enumerate()
        .map(|(k, (_, r))| (k, r.image.as_str()))
        .collect();
    let (_, val) = split_by_key(indexed, AUTO_VAL_FRACTION, AUTO_SPLIT_SEED, |(_, image)| {
        image.to_string()
    });
    let mut splits = vec![Split::Train; records.len()];
    for (k, _) in val {
        splits[k] = Split::Val;
    }
    splits
}

/// Reads one listed image: a relative path inside `dir` (whose canonical form is `root`) whose
/// directories resolve inside `root`, a regular file (not followed through a link), under the
/// cap, decodable. Records every problem in `report`; `None` on any.
fn read_image(
    dir: &Path,
    root: &Path,
    rel: &str,
    report: &mut FolderReport,
    by_hash: &mut HashMap<[u8; 32], String>,
    line: usize,
) -> Option<RgbImage> {
    let mut fail = |kind| {
        report.problems.push(Problem { line, kind });
        None
    };
    let rel_path = Path::new(rel);
    let inside = !rel.is_empty()
        && rel_path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !inside {
        return fail(ProblemKind::OutsidePath {
            image: rel.to_owned(),
        });
    }
    let path = dir.join(rel_path);
    let parent = path.parent().unwrap_or(dir);
    match parent.canonicalize() {
        Ok(real) if real.starts_with(root) => {}
        Ok(_) => {
            return fail(ProblemKind::OutsidePath {
                image: rel.to_owned(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return fail(ProblemKind::MissingImage {
                image: rel.to_owned(),
            })
        }
        Err(e) => {
            return fail(ProblemKind::UnreadableImage {
                image: rel.to_owned(),
                reason: format!("{}: {e}", parent.display()),
            })
        }
    }
    let bytes = match duet_fsio::read_capped(&path, IMAGE_FILE_CAP, Follow::No) {
        Ok(b) => b,
        Err(duet_fsio::ReadError::NotFound { .. }) => {
            return fail(ProblemKind::MissingImage {
                image: rel.to_owned(),
            })
        }
        Err(e) => {
            return fail(ProblemKind::UnreadableImage {
                image: rel.to_owned(),
                reason: e.to_string(),
            })
        }
    };
    let hash: [u8; 32] = Sha256::digest(&bytes).into();
    let img = match decode_image(&bytes) {
        Ok(img) => img,
        Err(reason) => {
            return fail(ProblemKind::UndecodableImage {
                image: rel.to_owned(),
                reason,
            })
        }
    };
    if let Some(first) = by_hash.get(&hash) {
        report.problems.push(Problem {
            line,
            kind: ProblemKind::DuplicateImage {
                image: rel.to_owned(),
                same_as: first.clone(),
            },
        });
    } else {
        by_hash.insert(hash, rel.to_owned());
    }
    let (w, h) = img.dimensions();
    let grow = |a: Option<(u32, u32)>, f: fn(u32, u32) -> u32| {
        Some(a.map_or((w, h), |(aw, ah)| (f(aw, w), f(ah, h))))
    };
    report.min_size = grow(report.min_size, u32::min);
    report.max_size = grow(report.max_size, u32::max);
    if w != h {
        report.non_square += 1;
    }
    let aspect = f64::from(w) / f64::from(h.max(1));
    report.aspect_range = Some(report.aspect_range.map_or((aspect, aspect), |(lo, hi)| {
        (lo.min(aspect), hi.max(aspect))
    }));
    Some(img)
}

/// Counts a caption's tokens as the word-level tokenizer makes them (lowercased, split on
/// whitespace and punctuation), noting words joined to punctuation and words `tokenizer` lacks.
fn caption_words(
    whitespace: &Whitespace,
    caption: &str,
    report: &mut FolderReport,
    tokenizer: Option<&Tokenizer>,
) -> usize {
    let lower = caption.to_lowercase();
    let mut pieces = PreTokenizedString::from(lower.as_str());
    if whitespace.pre_tokenize(&mut pieces).is_err() {
        return lower.split_whitespace().count();
    }
    let pieces: Vec<String> = pieces
        .get_splits(
            tokenizers::OffsetReferential::Original,
            tokenizers::OffsetType::Char,
        )
        .into_iter()
        .map(|(s, _, _)| s.to_owned())
        .collect();
    for word in lower.split_whitespace() {
        let alnum = word.chars().any(char::is_alphanumeric);
        let punct = word.chars().any(|c| !c.is_alphanumeric() && c != '_');
        if alnum && punct {
            *report.split_words.entry(word.to_owned()).or_default() += 1;
        }
    }
    for piece in &pieces {
        *report.words.entry(piece.clone()).or_default() += 1;
        if let Some(tok) = tokenizer {
            if tok.token_to_id(piece).is_none() {
                *report.unknown_words.entry(piece.clone()).or_default() += 1;
            }
        }
    }
    pieces.len()
}

/// Writes `captions.jsonl` for `records` (the tutorial and the tests build folders with it).
pub fn captions_jsonl(records: &[CaptionedRecord]) -> String {
    records
        .iter()
        .map(|r| serde_json::to_string(r).expect("a record serialises") + "\n")
        .collect()
}

#[cfg(test)]
mod tests;
