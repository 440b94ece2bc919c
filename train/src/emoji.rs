//! Emoji-CLDR: real emoji art paired with the Unicode CLDR English names (DESIGN §6).
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

use std::collections::{BTreeMap, HashMap, HashSet};
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

#[derive(Deserialize)]
struct RawEmoji {
    unified: String,
    image: String,
    name: Option<String>,
    category: String,
    subcategory: String,
    /// Position in Unicode's emoji ordering (smileys, people, ..., flags).
    #[serde(default)]
    sort_order: Option<u32>,
    #[serde(default)]
    has_img_google: bool,
    #[serde(default)]
    has_img_twitter: bool,
    #[serde(default)]
    skin_variations: Option<BTreeMap<String, RawVariation>>,
}

#[derive(Deserialize)]
struct RawVariation {
    unified: String,
    image: String,
    #[serde(default)]
    has_img_google: bool,
    #[serde(default)]
    has_img_twitter: bool,
}

fn has_art(style: ArtStyle, google: bool, twitter: bool) -> bool {
    match style {
        ArtStyle::Google => google,
        ArtStyle::Twitter => twitter,
    }
}

/// `annotations.json` and `annotationsDerived` files share one shape under different keys.
#[derive(Deserialize)]
struct CldrFile {
    #[serde(alias = "annotationsDerived")]
    annotations: CldrBlock,
}

#[derive(Deserialize)]
struct CldrBlock {
    annotations: HashMap<String, CldrEntry>,
}

#[derive(Deserialize)]
struct CldrEntry {
    #[serde(default)]
    default: Vec<String>,
    #[serde(default)]
    tts: Vec<String>,
}

/// The folder `scripts/fetch-emoji.sh` fills: one sub-folder per npm package.
#[derive(Debug, Clone)]
pub struct EmojiSource {
    root: PathBuf,
}

/// A record before its image is read: where the art is, and what it becomes.
#[derive(Debug, Clone)]
pub struct EmojiEntry {
    pub record: EmojiRecord,
    /// Full path of the 64 px source PNG.
    pub art: PathBuf,
}

/// The index of one style: every pair, in Unicode's emoji order (base, then its variants).
#[derive(Debug, Clone)]
pub struct EmojiIndex {
    pub entries: Vec<EmojiEntry>,
    pub skipped_without_art: usize,
}

impl EmojiSource {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        EmojiSource { root: root.into() }
    }

    fn package_file(&self, package: &str, rel: &str) -> Result<PathBuf, EmojiError> {
        let path = self.root.join(package).join("package").join(rel);
        if path.exists() {
            Ok(path)
        } else {
            Err(EmojiError::MissingSource { path })
        }
    }

    fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, EmojiError> {
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        serde_json::from_str(&text).map_err(|source| {
            EmojiError::Data(DataError::JsonFile {
                path: path.to_path_buf(),
                source,
            })
        })
    }

    /// `ATTRIBUTION.txt` for a dataset of `style`: the art's licence (stated in the package's
    /// README, not in its LICENSE file, which covers the package's own code and data), then the
    /// licence texts of the emoji package (MIT) and of CLDR (Unicode License v3).
    pub fn attribution(&self, style: ArtStyle) -> Result<String, EmojiError> {
        let read = |package: &str| -> Result<String, EmojiError> {
            let path = self.package_file(package, "LICENSE")?;
            fs::read_to_string(&path).map_err(io_err(&path))
        };
        Ok(format!(
            "Emoji-CLDR, built by duet-train from:\n\
             - images: {}@{EMOJI_DATASOURCE_VERSION}: {}\n\
             - captions: cldr-annotations-full@{CLDR_VERSION} and \
             cldr-annotations-derived-full@{CLDR_VERSION} (Unicode CLDR), Unicode License v3\n\n\
             ==== {} LICENSE ====\n{}\n==== Unicode CLDR LICENSE ====\n{}",
            style.package(),
            style.licence(),
            style.package(),
            read(style.package())?,
            read("cldr-annotations-full")?,
        ))
    }

    /// Reads `emoji.json` and both CLDR files and lists every pair of `style`.
    pub fn index(&self, style: ArtStyle) -> Result<EmojiIndex, EmojiError> {
        let emoji_path = self.package_file(style.package(), "emoji.json")?;
        let art_dir = self.package_file(style.package(), &format!("img/{style}/64"))?;
        let full_path =
            self.package_file("cldr-annotations-full", "annotations/en/annotations.json")?;
        let derived_path = self.package_file(
            "cldr-annotations-derived-full",
            "annotationsDerived/en/annotations.json",
        )?;
        let mut raw: Vec<RawEmoji> = Self::read_json(&emoji_path)?;
        // Unicode's order rather than the file's (by code point), so a slice (`limit`) is
        // smileys and people, skin tones included, not keycaps and flags.
        raw.sort_by_key(|e| e.sort_order.unwrap_or(u32::MAX));
        let full: CldrFile = Self::read_json(&full_path)?;
        let derived: CldrFile = Self::read_json(&derived_path)?;
        let (full, derived) = (
            full.annotations.annotations,
            derived.annotations.annotations,
        );

        let mut entries = Vec::new();
        let mut skipped_without_art = 0;
        let mut seen = HashSet::new();
        for base in &raw {
            let variants = base
                .skin_variations
                .iter()
                .flat_map(|v| v.values())
                .map(|v| {
                    (
                        &v.unified,
                        &v.image,
                        has_art(style, v.has_img_google, v.has_img_twitter),
                    )
                });
            let own = (
                &base.unified,
                &base.image,
                has_art(style, base.has_img_google, base.has_img_twitter),
            );
            for (unified, image, art) in std::iter::once(own).chain(variants) {
                if !art {
                    skipped_without_art += 1;
                    continue;
                }
                if !seen.insert(unified.clone()) {
                    return Err(EmojiError::Source {
                        path: emoji_path.clone(),
                        message: format!("emoji {unified} is listed twice"),
                    });
                }
                let chars = chars_of(unified).ok_or_else(|| EmojiError::Source {
                    path: emoji_path.clone(),
                    message: format!("emoji {unified:?} is not a list of hex code points"),
                })?;
                let (caption, keywords, name_source) = match lookup(&full, &chars)
                    .map(|e| (e, NameSource::Cldr))
                    .or_else(|| lookup(&derived, &chars).map(|e| (e, NameSource::CldrDerived)))
                {
                    Some((e, source)) => (e.tts[0].clone(), e.default.clone(), source),
                    None => match base.name.as_deref().filter(|n| !n.trim().is_empty()) {
                        // Only a base emoji's own name describes it; a variant without a
                        // CLDR name would get its base's name and lose the tone.
                        Some(name) if unified == &base.unified => {
                            (name.to_lowercase(), Vec::new(), NameSource::EmojiDatasource)
                        }
                        _ => {
                            return Err(EmojiError::Source {
                                path: derived_path.clone(),
                                message: format!("no English name for emoji {unified}"),
                            })
                        }
                    },
                };
                let art = art_dir.join(safe_file_name(image, &emoji_path)?);
                entries.push(EmojiEntry {
                    record: EmojiRecord {
                        image: format!("images/{}.png", unified.to_lowercase()),
                        caption,
                        label: base.category.clone(),
                        subcategory: base.subcategory.clone(),
                        unified: unified.clone(),
                        base: base.unified.clone(),
                        keywords,
                        name_source,
                    },
                    art,
                });
            }
        }
        if entries.is_empty() {
            return Err(EmojiError::Source {
                path: emoji_path,
                message: format!("no emoji with {style} art"),
            });
        }
        Ok(EmojiIndex {
            entries,
            skipped_without_art,
        })
    }
}

/// "1F44B-1F3FD" → "👋🏽"; None when a part is not a code point.
fn chars_of(unified: &str) -> Option<String> {
    unified
        .split('-')
        .map(|h| u32::from_str_radix(h, 16).ok().and_then(char::from_u32))
        .collect()
}

/// CLDR keys drop the emoji presentation selector (U+FE0F) that `emoji.json` keeps for
/// fully-qualified sequences, so try the exact sequence first, then without it.
fn lookup<'a>(table: &'a HashMap<String, CldrEntry>, chars: &str) -> Option<&'a CldrEntry> {
    let named = |e: &&CldrEntry| e.tts.first().is_some_and(|t| !t.trim().is_empty());
    table.get(chars).filter(named).or_else(|| {
        let bare: String = chars.chars().filter(|&c| c != '\u{FE0F}').collect();
        table.get(&bare).filter(named)
    })
}

/// The `image` field of `emoji.json` must be a plain file name.
fn safe_file_name<'a>(name: &'a str, emoji_path: &Path) -> Result<&'a str, EmojiError> {
    let plain = !name.is_empty()
        && !name.contains(['/', '\\'])
        && name != "."
        && name != ".."
        && name.ends_with(".png");
    if plain {
        Ok(name)
    } else {
        Err(EmojiError::Source {
            path: emoji_path.to_path_buf(),
            message: format!("image name {name:?} is not a plain .png file name"),
        })
    }
}

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
            crate::fsutil::write_atomic(&path, &png).map_err(io_err(&path))?;
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
        crate::fsutil::write_atomic(&captions, jsonl.as_bytes()).map_err(io_err(&captions))?;
        counts.insert(split.to_string(), part.len());
        base_counts.insert(split.to_string(), bases.len());
    }
    pb.finish_and_clear();
    let attribution_path = dir.join("ATTRIBUTION.txt");
    crate::fsutil::write_atomic(&attribution_path, attribution.as_bytes())
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
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgba, RgbaImage};

    /// A miniature source folder in the real packages' layout: three base emoji (one with two
    /// skin tones, one named only by the emoji package, one with an FE0F-qualified sequence that
    /// CLDR lists without FE0F), art for every one of them.
    fn mini_source(dir: &Path) -> EmojiSource {
        let pkg = dir.join("emoji-datasource-google/package");
        let art = pkg.join("img/google/64");
        fs::create_dir_all(&art).unwrap();
        fs::write(pkg.join("LICENSE"), "MIT (test)").unwrap();
        let emoji = serde_json::json!([
            {"unified": "1F44B", "image": "1f44b.png", "name": "WAVING HAND SIGN",
             "category": "People & Body", "subcategory": "hand-fingers-open",
             "has_img_google": true, "has_img_twitter": true,
             "skin_variations": {
                "1F3FB": {"unified": "1F44B-1F3FB", "image": "1f44b-1f3fb.png",
                          "has_img_google": true},
                "1F3FF": {"unified": "1F44B-1F3FF", "image": "1f44b-1f3ff.png",
                          "has_img_google": true}}},
            {"unified": "1F600", "image": "1f600.png", "name": "Grinning Face",
             "category": "Smileys & Emotion", "subcategory": "face-smiling",
             "has_img_google": true},
            {"unified": "2764-FE0F", "image": "2764-fe0f.png", "name": "HEAVY BLACK HEART",
             "category": "Smileys & Emotion", "subcategory": "heart",
             "has_img_google": true},
            {"unified": "1F4A9", "image": "1f4a9.png", "name": "PILE OF POO",
             "category": "Smileys & Emotion", "subcategory": "face-costume",
             "has_img_google": false}
        ]);
        fs::write(pkg.join("emoji.json"), emoji.to_string()).unwrap();
        for (name, colour) in [
            ("1f44b.png", [250, 200, 0, 255]),
            ("1f44b-1f3fb.png", [250, 220, 190, 255]),
            ("1f44b-1f3ff.png", [90, 60, 40, 255]),
            ("1f600.png", [255, 210, 60, 255]),
            ("2764-fe0f.png", [220, 0, 0, 255]),
        ] {
            // A disc of the colour on a transparent background whose hidden colour is black.
            let img = RgbaImage::from_fn(64, 64, |x, y| {
                let (dx, dy) = (x as f32 - 31.5, y as f32 - 31.5);
                if dx * dx + dy * dy < 20.0 * 20.0 {
                    Rgba(colour)
                } else {
                    Rgba([0, 0, 0, 0])
                }
            });
            img.save(art.join(name)).unwrap();
        }
        let full = dir.join("cldr-annotations-full/package/annotations/en");
        fs::create_dir_all(&full).unwrap();
        let full_json = serde_json::json!({"annotations": {"identity": {}, "annotations": {
            "👋": {"default": ["hand", "wave"], "tts": ["waving hand"]},
            "❤": {"default": ["heart"], "tts": ["red heart"]}
        }}});
        fs::write(full.join("annotations.json"), full_json.to_string()).unwrap();
        fs::write(
            dir.join("cldr-annotations-full/package/LICENSE"),
            "UNICODE (test)",
        )
        .unwrap();
        let derived = dir.join("cldr-annotations-derived-full/package/annotationsDerived/en");
        fs::create_dir_all(&derived).unwrap();
        let derived_json = serde_json::json!({"annotationsDerived": {"identity": {},
            "annotations": {
                "👋🏻": {"default": ["hand", "light skin tone"],
                        "tts": ["waving hand: light skin tone"]},
                "👋🏿": {"default": ["hand"], "tts": ["waving hand: dark skin tone"]}
        }}});
        fs::write(derived.join("annotations.json"), derived_json.to_string()).unwrap();
        EmojiSource::new(dir)
    }

    #[test]
    fn index_names_every_pair_from_the_right_source() {
        let tmp = tempfile::tempdir().unwrap();
        let index = mini_source(tmp.path()).index(ArtStyle::Google).unwrap();
        let got: Vec<(&str, &str, &str, NameSource)> = index
            .entries
            .iter()
            .map(|e| {
                let r = &e.record;
                (
                    r.unified.as_str(),
                    r.base.as_str(),
                    r.caption.as_str(),
                    r.name_source,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("1F44B", "1F44B", "waving hand", NameSource::Cldr),
                (
                    "1F44B-1F3FB",
                    "1F44B",
                    "waving hand: light skin tone",
                    NameSource::CldrDerived
                ),
                (
                    "1F44B-1F3FF",
                    "1F44B",
                    "waving hand: dark skin tone",
                    NameSource::CldrDerived
                ),
                (
                    "1F600",
                    "1F600",
                    "grinning face",
                    NameSource::EmojiDatasource
                ),
                ("2764-FE0F", "2764-FE0F", "red heart", NameSource::Cldr),
            ]
        );
        assert_eq!(
            index.skipped_without_art, 1,
            "the poo has no Google art here"
        );
        assert_eq!(index.entries[0].record.keywords, ["hand", "wave"]);
        assert_eq!(index.entries[0].record.label, "People & Body");
        assert_eq!(index.entries[1].record.image, "images/1f44b-1f3fb.png");
    }

    #[test]
    fn missing_sources_and_bad_options_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let err = EmojiSource::new(tmp.path())
            .index(ArtStyle::Twitter)
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("emoji-datasource-twitter") && text.contains("fetch-emoji.sh"));
        let src = mini_source(tmp.path());
        // The twitter art is not in this source folder.
        assert!(matches!(
            src.index(ArtStyle::Twitter),
            Err(EmojiError::MissingSource { .. })
        ));
        for bad in [
            EmojiOptions {
                size: 48,
                ..Default::default()
            },
            EmojiOptions {
                val_fraction: 0.6,
                test_fraction: 0.4,
                ..Default::default()
            },
            EmojiOptions {
                test_fraction: f64::NAN,
                ..Default::default()
            },
            EmojiOptions {
                limit: Some(0),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(EmojiError::Options(_))),
                "{bad:?}"
            );
        }
        assert!("apple"
            .parse::<ArtStyle>()
            .unwrap_err()
            .contains("not licensed"));
        // A variant CLDR cannot name is an error, not a caption without its tone.
        let derived = tmp
            .path()
            .join("cldr-annotations-derived-full/package/annotationsDerived/en/annotations.json");
        fs::write(&derived, r#"{"annotationsDerived": {"annotations": {}}}"#).unwrap();
        let err = src.index(ArtStyle::Google).unwrap_err().to_string();
        assert!(
            err.contains("no English name for emoji 1F44B-1F3FB"),
            "{err}"
        );
    }

    #[test]
    fn art_is_composited_over_white_and_resized() {
        let tmp = tempfile::tempdir().unwrap();
        mini_source(tmp.path());
        let path = tmp
            .path()
            .join("emoji-datasource-google/package/img/google/64/2764-fe0f.png");
        let big = render_art(&path, 64).unwrap();
        assert_eq!(
            big.get_pixel(0, 0).0,
            [255, 255, 255],
            "transparent becomes white"
        );
        assert_eq!(big.get_pixel(32, 32).0, [220, 0, 0]);
        let small = render_art(&path, 32).unwrap();
        assert_eq!(small.dimensions(), (32, 32));
        assert_eq!(small.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(small.get_pixel(16, 16).0, [220, 0, 0]);
        // Edges mix red with white, never with the hidden black.
        assert!(small.pixels().all(|p| p.0[0] >= 220));
        let garbage = tmp.path().join("garbage.png");
        fs::write(&garbage, b"nope").unwrap();
        assert!(render_art(&garbage, 32)
            .unwrap_err()
            .to_string()
            .contains("cannot decode"));
    }

    #[test]
    fn dataset_splits_by_base_emoji_and_loads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let src = mini_source(tmp.path());
        let out = tmp.path().join("out");
        for seed in 0..6 {
            let opts = EmojiOptions {
                seed,
                val_fraction: 0.25,
                test_fraction: 0.25,
                ..Default::default()
            };
            let summary = write_emoji_dataset(&src, &out, &opts, "test").unwrap();
            assert_eq!(summary.counts.values().sum::<usize>(), 5);
            assert_eq!(
                summary.base_counts.values().sum::<usize>(),
                3,
                "{summary:?}"
            );
            let mut seen = HashMap::new();
            for split in SPLITS {
                for s in load_emoji_split(&out.join(split)).unwrap() {
                    assert_eq!(s.image.dimensions(), (32, 32));
                    let prev = seen.insert(s.record.base.clone(), split);
                    assert!(
                        prev.is_none_or(|p| p == split),
                        "{} in two splits",
                        s.record.base
                    );
                }
            }
            assert_eq!(seen.len(), 3);
            assert_eq!(load_emoji_info(&out).unwrap(), summary);
        }
        // A slice keeps whole base emoji.
        let opts = EmojiOptions {
            limit: Some(1),
            ..Default::default()
        };
        let summary = write_emoji_dataset(&src, &out, &opts, "test").unwrap();
        assert_eq!(summary.counts.values().sum::<usize>(), 3);
        let attribution = fs::read_to_string(out.join("ATTRIBUTION.txt")).unwrap();
        for part in ["Apache-2.0", "MIT (test)", "UNICODE (test)"] {
            assert!(attribution.contains(part), "{attribution}");
        }
        // Something that is not a dataset is never replaced.
        let precious = tmp.path().join("precious");
        fs::create_dir_all(&precious).unwrap();
        fs::write(precious.join("notes.txt"), "keep").unwrap();
        let err = write_emoji_dataset(&src, &precious, &opts, "test").unwrap_err();
        assert!(matches!(err, EmojiError::NotADataset { .. }));
        assert_eq!(
            fs::read_to_string(precious.join("notes.txt")).unwrap(),
            "keep"
        );
    }

    #[test]
    fn loading_rejects_broken_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let src = mini_source(tmp.path());
        let out = tmp.path().join("out");
        write_emoji_dataset(&src, &out, &EmojiOptions::default(), "test").unwrap();
        let train = out.join("train");
        let jsonl = train.join("captions.jsonl");
        let text = fs::read_to_string(&jsonl).unwrap();
        let first = text.lines().next().unwrap();
        let mut record: EmojiRecord = serde_json::from_str(first).unwrap();
        let write_first = |r: &EmojiRecord| {
            fs::write(&jsonl, format!("{}\n", serde_json::to_string(r).unwrap())).unwrap();
        };
        record.caption = " ".into();
        write_first(&record);
        let err = load_emoji_split(&train).unwrap_err().to_string();
        assert!(
            err.contains("captions.jsonl:1") && err.contains("empty caption"),
            "{err}"
        );
        record.caption = "waving hand".into();
        record.image = "../../etc/passwd".into();
        write_first(&record);
        let err = load_emoji_split(&train).unwrap_err().to_string();
        assert!(err.contains("stay inside"), "{err}");
        record.image = "images/missing.png".into();
        write_first(&record);
        assert!(load_emoji_split(&train).is_err());
        fs::write(out.join("dataset.json"), r#"{"generator": "shapeworld"}"#).unwrap();
        assert!(load_emoji_info(&out).is_err());
    }
}
