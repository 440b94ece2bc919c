//! Emoji-CLDR: real emoji art paired with the Unicode CLDR English names.
//!
//! Sources, fetched at pinned versions by `scripts/fetch-emoji.sh` (`npm pack`, integrity
//! checked) into one folder, never committed:
//! - `emoji-datasource-google@16.0.0` (Noto Emoji art, Apache-2.0) or
//!   `emoji-datasource-twitter@16.0.0` (Twemoji art, CC-BY-4.0): `package/emoji.json` lists the
//!   1,911 base emoji with `unified` code points, `category`, `subcategory` and their
//!   `skin_variations`; `package/img/<style>/64/<image>` holds a 64 px RGBA PNG per emoji.
//!   The Apple and Facebook art in the same family of packages is not licensed for this use and
//!   is never read.
//! - `cldr-annotations-full@48.2.0` and `cldr-annotations-derived-full@48.2.0`: the English
//!   `tts` name (the caption) and `default` keywords, keyed by the emoji's characters. The full
//!   set names base emoji, the derived set names skin-tone and other sequences; the emoji
//!   package's own `name` is the last resort, and every record says which source named it.
//!
//! One record per image (3,786 a style). The split into train / val / test groups records by
//! their *base* emoji, so the skin-tone variants of one emoji never cross splits: a model is
//! scored on emoji it has never seen in any tone.
//!
//! On disk (`duet-train emoji --out DIR`): `DIR/{train,val,test}/images/<unified>.png` (RGB,
//! the art composited over white, resized to `--size`), `DIR/{train,val,test}/captions.jsonl`
//! in the folder format (`image`, `caption`, `label` = category, plus the emoji's metadata),
//! `ATTRIBUTION.txt` (the art's and CLDR's licences), and `DIR/dataset.json`, written last, with the counts, sources and the
//! command.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use crate::shapeworld::{
    encode_png, load_listed_image, push_json_line, read_jsonl, split_by_key, write_json_file,
    DataError,
};

mod source;
#[cfg(test)]
mod tests;

pub use source::*;

/// Name written into `dataset.json`, so a loader can recognise an Emoji-CLDR folder.
pub const GENERATOR_NAME: &str = "emoji-cldr";
/// Version of the on-disk layout; bump on incompatible changes.
pub const DATASET_FORMAT_VERSION: u32 = 1;
/// Pinned `emoji-datasource-*` version (`scripts/fetch-emoji.sh`).
pub const EMOJI_DATASOURCE_VERSION: &str = "16.0.0";
/// Pinned `cldr-annotations-*-full` version (`scripts/fetch-emoji.sh`).
pub const CLDR_VERSION: &str = "48.2.0";
/// Side of the source art in pixels.
pub const SOURCE_SIZE: u32 = 64;
/// The three splits, in the order they are written.
pub const SPLITS: [&str; 3] = ["train", "val", "test"];

/// Which licensed art set to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtStyle {
    /// Noto Emoji (Google), Apache-2.0.
    Google,
    /// Twemoji (Twitter), CC-BY-4.0.
    Twitter,
}

impl ArtStyle {
    pub fn name(self) -> &'static str {
        match self {
            ArtStyle::Google => "google",
            ArtStyle::Twitter => "twitter",
        }
    }

    /// The npm package holding this art.
    pub fn package(self) -> &'static str {
        match self {
            ArtStyle::Google => "emoji-datasource-google",
            ArtStyle::Twitter => "emoji-datasource-twitter",
        }
    }

    /// The art's licence and owner, for `dataset.json` and credits.
    pub fn licence(self) -> &'static str {
        match self {
            ArtStyle::Google => "Noto Emoji art, Copyright Google Inc., Apache-2.0",
            ArtStyle::Twitter => {
                "Twemoji art, Copyright Twitter, Inc. and other contributors, CC-BY-4.0"
            }
        }
    }
}

impl std::str::FromStr for ArtStyle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "google" => Ok(ArtStyle::Google),
            "twitter" => Ok(ArtStyle::Twitter),
            other => Err(format!(
                "unknown emoji style '{other}' (expected google or twitter; the Apple and \
                 Facebook sets are not licensed for this use)"
            )),
        }
    }
}

impl fmt::Display for ArtStyle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a record's caption came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NameSource {
    /// `cldr-annotations-full` (base emoji).
    Cldr,
    /// `cldr-annotations-derived-full` (skin tones and other sequences).
    CldrDerived,
    /// The emoji package's own `name`, where CLDR has none.
    EmojiDatasource,
}

impl NameSource {
    /// The name `captions.jsonl` and `dataset.json` use.
    pub fn as_str(self) -> &'static str {
        match self {
            NameSource::Cldr => "cldr",
            NameSource::CldrDerived => "cldr-derived",
            NameSource::EmojiDatasource => "emoji-datasource",
        }
    }
}

/// One image–caption pair: a line of `captions.jsonl` without the image decoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmojiRecord {
    /// Image path relative to the split folder (`images/<unified>.png`).
    pub image: String,
    /// The CLDR English name, e.g. "waving hand: medium skin tone".
    pub caption: String,
    /// The emoji category, e.g. "People & Body" (the class label).
    pub label: String,
    pub subcategory: String,
    /// Code points of this image, e.g. "1F44B-1F3FD".
    pub unified: String,
    /// Code points of its base emoji (equal to `unified` for a base emoji): the split key.
    pub base: String,
    /// CLDR keywords (empty where the name came from the emoji package).
    pub keywords: Vec<String>,
    pub name_source: NameSource,
}

/// A record with its image, as loaded for training or evaluation.
#[derive(Debug, Clone)]
pub struct EmojiSample {
    pub record: EmojiRecord,
    pub image_path: PathBuf,
    pub image: RgbImage,
}

/// How to build the dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmojiOptions {
    pub style: ArtStyle,
    /// Output side in pixels (32 or 64).
    pub size: u32,
    /// Seed of the split.
    pub seed: u64,
    /// Fractions of the records (grouped by base emoji) in val and test.
    pub val_fraction: f64,
    pub test_fraction: f64,
    /// Keep only the first N base emoji in Unicode's order (a slice for tests); None = all.
    pub limit: Option<usize>,
}

impl Default for EmojiOptions {
    fn default() -> Self {
        EmojiOptions {
            style: ArtStyle::Google,
            size: 32,
            seed: 0,
            val_fraction: 0.1,
            test_fraction: 0.1,
            limit: None,
        }
    }
}

impl EmojiOptions {
    pub fn validate(&self) -> Result<(), EmojiError> {
        if self.size != 32 && self.size != 64 {
            return Err(EmojiError::Options(format!(
                "size must be 32 or 64, got {}",
                self.size
            )));
        }
        let ok = |f: f64| f.is_finite() && (0.0..1.0).contains(&f);
        if !ok(self.val_fraction)
            || !ok(self.test_fraction)
            || self.val_fraction + self.test_fraction >= 1.0
        {
            return Err(EmojiError::Options(format!(
                "val and test fractions must be in [0, 1) and leave training data, got {} and {}",
                self.val_fraction, self.test_fraction
            )));
        }
        if self.limit == Some(0) {
            return Err(EmojiError::Options("limit must be at least 1".into()));
        }
        Ok(())
    }
}

/// `dataset.json` of an Emoji-CLDR folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmojiSummary {
    /// Always [`GENERATOR_NAME`].
    pub generator: String,
    pub format_version: u32,
    pub options: EmojiOptions,
    /// `package@version` of every source read.
    pub sources: Vec<String>,
    pub licence: String,
    /// Records per split, in [`SPLITS`] order.
    pub counts: BTreeMap<String, usize>,
    /// Base emoji per split.
    pub base_counts: BTreeMap<String, usize>,
    /// Records per caption source.
    pub name_sources: BTreeMap<String, usize>,
    /// Emoji listed without art in this style (skipped).
    pub skipped_without_art: usize,
    /// Records per category over all splits.
    pub categories: BTreeMap<String, usize>,
    pub max_caption_words: usize,
    /// The exact command line that produced the folder.
    pub command: String,
}

/// Errors while reading the sources or writing / loading the dataset. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum EmojiError {
    #[error("invalid Emoji-CLDR options: {0}")]
    Options(String),
    #[error(
        "{}: not found; fetch the Emoji-CLDR sources with scripts/fetch-emoji.sh (or pass \
         --source)", path.display()
    )]
    MissingSource { path: PathBuf },
    #[error("{}: {message}", path.display())]
    Source { path: PathBuf, message: String },
    #[error(
        "{}: exists and is not an Emoji-CLDR dataset; refusing to replace it", path.display()
    )]
    NotADataset { path: PathBuf },
    #[error(transparent)]
    Data(#[from] DataError),
    /// A file that is not a regular file, over its cap, or unreadable.
    #[error(transparent)]
    Read(#[from] duet_fsio::ReadError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EmojiError + '_ {
    move |source| {
        EmojiError::Data(DataError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the sources
// ---------------------------------------------------------------------------------------------

/// Splits entries into train / val / test with whole base-emoji groups on one side.
pub fn split_entries(entries: Vec<EmojiEntry>, opts: &EmojiOptions) -> [Vec<EmojiEntry>; 3] {
    let n = entries.len() as f64;
    let base = |e: &EmojiEntry| e.record.base.clone();
    let (rest, test) = split_by_key(entries, opts.test_fraction, opts.seed, base);
    // The second split's fraction is of what is left, so val is val_fraction of the whole.
    let val_of_rest = if rest.is_empty() {
        0.0
    } else {
        opts.val_fraction * n / rest.len() as f64
    };
    let (train, val) = split_by_key(rest, val_of_rest, opts.seed.wrapping_add(1), base);
    [train, val, test]
}

/// Reads a 64 px RGBA emoji, composites it over white and resizes it to `size`.
///
/// Compositing before resizing averages colours weighted by coverage (the same as resizing
/// premultiplied colour), so transparent pixels' hidden colours never bleed into edges.
pub fn render_art(path: &Path, size: u32) -> Result<RgbImage, EmojiError> {
    let rgba = image::open(path)
        .map_err(|source| EmojiError::Source {
            path: path.to_path_buf(),
            message: format!("cannot decode: {source}"),
        })?
        .to_rgba8();
    if rgba.dimensions() != (SOURCE_SIZE, SOURCE_SIZE) {
        let (w, h) = rgba.dimensions();
        return Err(EmojiError::Source {
            path: path.to_path_buf(),
            message: format!("art is {w}x{h}, expected {SOURCE_SIZE}x{SOURCE_SIZE}"),
        });
    }
    let rgb = RgbImage::from_fn(SOURCE_SIZE, SOURCE_SIZE, |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = p[3] as f32 / 255.0;
        let over = |c: u8| (c as f32 * a + 255.0 * (1.0 - a)).round().clamp(0.0, 255.0) as u8;
        Rgb([over(p[0]), over(p[1]), over(p[2])])
    });
    Ok(if size == SOURCE_SIZE {
        rgb
    } else {
        image::imageops::resize(&rgb, size, size, FilterType::Triangle)
    })
}

// ---------------------------------------------------------------------------------------------
// Writing and loading
// ---------------------------------------------------------------------------------------------

/// Builds the dataset from `source` into `out` and returns its summary.
///
/// Everything is written into a sibling temporary folder that is renamed over `out` at the end,
/// so an interrupted build never leaves a half dataset, and a previous Emoji-CLDR dataset at
/// `out` is replaced whole. Anything else at `out` is refused, never deleted.
pub fn write_emoji_dataset(
    source: &EmojiSource,
    out: &Path,
    opts: &EmojiOptions,
    command: &str,
) -> Result<EmojiSummary, EmojiError> {
    opts.validate()?;
    if out.exists() && !is_emoji_dataset(out) && !is_empty_dir(out) {
        return Err(EmojiError::NotADataset {
            path: out.to_path_buf(),
        });
    }
    let index = source.index(opts.style)?;
    let attribution = source.attribution(opts.style)?;
    let mut entries = index.entries;
    if let Some(limit) = opts.limit {
        let mut keep = HashSet::new();
        for e in &entries {
            if keep.len() == limit && !keep.contains(&e.record.base) {
                break;
            }
            keep.insert(e.record.base.clone());
        }
        entries.retain(|e| keep.contains(&e.record.base));
    }

    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    // Built in a fresh directory beside `out` (exclusive, unpredictable name: nothing planted
    // can redirect it), removed on error, swapped in whole on success.
    let tmp = duet_fsio::temp_dir_beside(out).map_err(io_err(&parent))?;
    let summary = write_into(
        tmp.path(),
        entries,
        opts,
        &attribution,
        index.skipped_without_art,
        command,
    )?;
    duet_fsio::replace_dir(tmp, out).map_err(io_err(out))?;
    Ok(summary)
}

fn is_empty_dir(path: &Path) -> bool {
    fs::read_dir(path).is_ok_and(|mut d| d.next().is_none())
}

fn is_emoji_dataset(path: &Path) -> bool {
    load_emoji_info(path).is_ok()
}

fn write_into(
    dir: &Path,
    entries: Vec<EmojiEntry>,
    opts: &EmojiOptions,
    attribution: &str,
    skipped_without_art: usize,
    command: &str,
) -> Result<EmojiSummary, EmojiError> {
    let _ = fs::remove_dir_all(dir);
    let mut counts = BTreeMap::new();
    let mut base_counts = BTreeMap::new();
    let mut name_sources = BTreeMap::new();
    let mut categories = BTreeMap::new();
    let mut max_caption_words = 0;
    let total = entries.len();
    let pb = crate::progress::stage_bar(total < 500, total, "emoji images");
    for (split, part) in SPLITS.iter().zip(split_entries(entries, opts)) {
        let split_dir = dir.join(split);
        let images = split_dir.join("images");
        fs::create_dir_all(&images).map_err(io_err(&images))?;
        let mut jsonl = String::new();
        let mut bases = HashSet::new();
        for entry in &part {
            let r = &entry.record;
            let path = split_dir.join(&r.image);
            let png = encode_png(&render_art(&entry.art, opts.size)?, &path)?;
            duet_fsio::write_atomic_creating_dir(&path, &png).map_err(io_err(&path))?;
            push_json_line(&mut jsonl, r, &split_dir.join("captions.jsonl"))?;
            bases.insert(r.base.as_str());
            *name_sources
                .entry(r.name_source.as_str().to_owned())
                .or_insert(0) += 1;
            *categories.entry(r.label.clone()).or_insert(0) += 1;
            max_caption_words = max_caption_words.max(r.caption.split_whitespace().count());
            pb.inc(1);
        }
        let captions = split_dir.join("captions.jsonl");
        duet_fsio::write_atomic_creating_dir(&captions, jsonl.as_bytes())
            .map_err(io_err(&captions))?;
        counts.insert(split.to_string(), part.len());
        base_counts.insert(split.to_string(), bases.len());
    }
    pb.finish_and_clear();
    let attribution_path = dir.join("ATTRIBUTION.txt");
    duet_fsio::write_atomic_creating_dir(&attribution_path, attribution.as_bytes())
        .map_err(io_err(&attribution_path))?;
    let summary = EmojiSummary {
        generator: GENERATOR_NAME.into(),
        format_version: DATASET_FORMAT_VERSION,
        options: opts.clone(),
        sources: vec![
            format!("{}@{EMOJI_DATASOURCE_VERSION}", opts.style.package()),
            format!("cldr-annotations-full@{CLDR_VERSION}"),
            format!("cldr-annotations-derived-full@{CLDR_VERSION}"),
        ],
        licence: opts.style.licence().into(),
        counts,
        base_counts,
        name_sources,
        skipped_without_art,
        categories,
        max_caption_words,
        command: command.into(),
    };
    write_json_file(&dir.join("dataset.json"), &summary)?;
    Ok(summary)
}

/// Reads `dataset.json` of a folder written by [`write_emoji_dataset`].
pub fn load_emoji_info(dir: &Path) -> Result<EmojiSummary, EmojiError> {
    let path = dir.join("dataset.json");
    let cap = duet_fsio::Cap::new(16 << 20, "a dataset.json");
    let text = duet_fsio::read_capped_text(&path, cap, duet_fsio::Follow::Yes)?;
    let summary: EmojiSummary = serde_json::from_str(&text).map_err(|source| {
        EmojiError::Data(DataError::JsonFile {
            path: path.clone(),
            source,
        })
    })?;
    if summary.generator != GENERATOR_NAME || summary.format_version != DATASET_FORMAT_VERSION {
        return Err(EmojiError::Source {
            path,
            message: format!(
                "not an Emoji-CLDR dataset of format {DATASET_FORMAT_VERSION} (generator {:?}, \
                 format {})",
                summary.generator, summary.format_version
            ),
        });
    }
    Ok(summary)
}

/// Loads one split folder (`DIR/train`, ...): every record of `captions.jsonl` with its image,
/// checking that captions are non-empty, images stay inside the folder, decode, and are all
/// square and of one size.
pub fn load_emoji_split(split_dir: &Path) -> Result<Vec<EmojiSample>, EmojiError> {
    let jsonl = split_dir.join("captions.jsonl");
    let records: Vec<(usize, EmojiRecord)> = read_jsonl(&jsonl)?;
    let mut out = Vec::with_capacity(records.len());
    let mut size = None;
    for (line, record) in records {
        if record.caption.trim().is_empty() {
            return Err(EmojiError::Data(DataError::Invalid {
                path: jsonl.clone(),
                line,
                message: format!("empty caption for {}", record.image),
            }));
        }
        let (image_path, image) =
            load_listed_image(split_dir, &record.image, &jsonl, line, &mut size)?;
        out.push(EmojiSample {
            record,
            image_path,
            image,
        });
    }
    Ok(out)
}
