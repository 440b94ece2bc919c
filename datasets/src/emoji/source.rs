//! Reading the pinned sources: `emoji-datasource`'s index and art (by style), and the CLDR
//! annotation files that name each emoji, matched by code points; file names checked.

use crate::shapeworld::DataError;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use super::*;

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
