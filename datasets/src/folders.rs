//! Training data drawn from several dataset folders at once (`--data A --data B`): ShapeWorld
//! folders, Emoji-CLDR split folders and the user's own captioned folders are read by their
//! own loaders and concatenated, in the order given, into one list of [`Sample`]s. Emoji and
//! captioned samples carry no scene (`objects` is empty): the stages only need an image and
//! its caption.

use std::path::{Path, PathBuf};

use duet_spec::ImageFit;
use serde::{Deserialize, Deserializer};
use tokenizers::Tokenizer;

use crate::captioned::{is_captioned_folder, load_captioned, FolderRefused, ReadOptions, Split};
use crate::emoji::{load_emoji_info, load_emoji_split, EmojiError};
use crate::shapeworld::{load_dataset, load_dataset_info, DataError, Sample};

/// What a dataset folder holds, told from its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderKind {
    /// A folder written by `duet-train shapeworld` (`scenes.jsonl` beside `captions.jsonl`).
    ShapeWorld,
    /// One split (`train`, `val` or `test`) of a folder written by `duet-train emoji`.
    EmojiSplit,
    /// The user's own pairs: `captions.jsonl` and the images it lists (`crate::captioned`).
    Captioned,
}

/// How the images of a run are read: the model's square side and how other sizes are fitted
/// to it, the train split of captioned folders, and their checks against the run's limits.
#[derive(Debug, Clone, Copy)]
pub struct ImageTarget<'t> {
    pub side: u32,
    pub fit: ImageFit,
    pub max_len: usize,
    /// The run's tokenizer where it already exists (its unknown words are reported).
    pub tokenizer: Option<&'t Tokenizer>,
}

impl<'t> ImageTarget<'t> {
    /// The images a model of `spec` reads, with the run's tokenizer where it exists.
    pub fn of(spec: &duet_spec::ModelSpec, tokenizer: Option<&'t Tokenizer>) -> Self {
        ImageTarget {
            side: u32::try_from(spec.image_size).unwrap_or(u32::MAX),
            fit: spec.image_fit,
            max_len: spec.max_len,
            tokenizer,
        }
    }
}

/// Errors of [`folder_kind`] and [`load_folders`].
#[derive(Debug, thiserror::Error)]
pub enum FoldersError {
    #[error("no dataset folder given (pass --data DIR, once per folder)")]
    NoFolders,
    #[error("{}: given twice", path.display())]
    Duplicate { path: PathBuf },
    #[error(
        "{}: is the root of an Emoji-CLDR dataset; pass one of its splits, e.g. {}",
        path.display(), path.join("train").display()
    )]
    EmojiRoot { path: PathBuf },
    #[error(
        "{}: not a dataset folder (expected a folder with captions.jsonl: your own pairs, a \
         ShapeWorld folder or a split of an Emoji-CLDR dataset)", path.display()
    )]
    Unknown { path: PathBuf },
    #[error("{}: holds no samples", path.display())]
    Empty { path: PathBuf },
    #[error(
        "{}: images are {found}px but the run's are {expected}px; build the dataset again with \
         --size {expected}", path.display()
    )]
    SizeMismatch {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "{}: line {line} has no \"label\" ({count} pair(s) without one); the fusion and \
         restore stages learn the labels, so every pair needs one", path.display()
    )]
    Unlabelled {
        path: PathBuf,
        line: usize,
        count: usize,
    },
    #[error(
        "{}: {} distinct label(s); the fusion head needs 2 to {max}", path.display(),
        if found > max { format!("more than {max}") } else { found.to_string() }
    )]
    Classes {
        path: PathBuf,
        /// Counted no further than `max + 1`.
        found: usize,
        max: usize,
    },
    #[error(
        "{}: label {label:?} is not one of the run's {classes} classes (the folder changed \
         since the fusion run?)", path.display()
    )]
    UnknownLabel {
        path: PathBuf,
        label: String,
        classes: usize,
    },
    #[error(
        "{}: no held-out pairs (a val or test split) to measure the head on", path.display()
    )]
    NoHeldOut { path: PathBuf },
    #[error(transparent)]
    Refused(#[from] FolderRefused),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Emoji(#[from] EmojiError),
}

/// Tells a ShapeWorld folder from an Emoji-CLDR split folder; anything else is an error that
/// says what was expected (an Emoji-CLDR root gets a hint to pass a split).
pub fn folder_kind(dir: &Path) -> Result<FolderKind, FoldersError> {
    if dir.join("scenes.jsonl").is_file() {
        return Ok(FolderKind::ShapeWorld);
    }
    if dir.join("captions.jsonl").is_file() {
        // Resolved first so that `.` or `train/` still find the dataset root above them.
        let resolved = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        if let Some(parent) = resolved.parent() {
            // Only an Emoji-CLDR dataset's own `dataset.json` makes this a split (and its
            // errors are then reported); any other file of that name above a user's folder
            // is not ours to read.
            if claims_emoji(parent) {
                load_emoji_info(parent)?;
                return Ok(FolderKind::EmojiSplit);
            }
        }
    }
    if dir.join("dataset.json").is_file() && load_emoji_info(dir).is_ok() {
        return Err(FoldersError::EmojiRoot {
            path: dir.to_path_buf(),
        });
    }
    if is_captioned_folder(dir) {
        return Ok(FolderKind::Captioned);
    }
    Err(FoldersError::Unknown {
        path: dir.to_path_buf(),
    })
}

/// Whether `dir/dataset.json` is JSON that names the Emoji-CLDR generator.
fn claims_emoji(dir: &Path) -> bool {
    let cap = duet_fsio::Cap::new(16 << 20, "a dataset.json");
    duet_fsio::read_capped_text(&dir.join("dataset.json"), cap, duet_fsio::Follow::Yes)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .is_some_and(|v| v["generator"] == crate::emoji::GENERATOR_NAME)
}

/// The side of a generated dataset's images (ShapeWorld, Emoji-CLDR), from its metadata; `None`
/// for a captioned folder, whose images may be of any size.
pub fn native_image_size(dir: &Path) -> Result<Option<u32>, FoldersError> {
    Ok(match folder_kind(dir)? {
        FolderKind::ShapeWorld => Some(load_dataset_info(dir)?.config.image_size),
        FolderKind::EmojiSplit => {
            let resolved = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
            let root = resolved.parent().unwrap_or(&resolved);
            Some(load_emoji_info(root)?.options.size)
        }
        FolderKind::Captioned => None,
    })
}

/// The side a new run takes from its data when none is asked for: that of the first
/// generated dataset, else `default`.
pub fn default_image_side(dirs: &[PathBuf], default: u32) -> Result<u32, FoldersError> {
    for dir in dirs {
        if let Some(side) = native_image_size(dir)? {
            return Ok(side);
        }
    }
    Ok(default)
}

/// Loads one folder of any kind for a run of `target`: a generated dataset must already be of
/// the run's side (it is regenerated, never resampled); a captioned folder's train split is
/// checked and fitted.
pub fn load_folder(dir: &Path, target: &ImageTarget) -> Result<Vec<Sample>, FoldersError> {
    let samples = match folder_kind(dir)? {
        FolderKind::Captioned => {
            return Ok(load_captioned(
                dir,
                &ReadOptions {
                    split: Some(Split::Train),
                    side: target.side,
                    fit: target.fit,
                    max_len: target.max_len,
                    tokenizer: target.tokenizer,
                },
            )?)
        }
        kind => load_generated(dir, kind)?,
    };
    if let Some(found) = samples.first().map(|s| s.image.width()) {
        if found != target.side {
            return Err(FoldersError::SizeMismatch {
                path: dir.to_path_buf(),
                found,
                expected: target.side,
            });
        }
    }
    Ok(samples)
}

/// Loads a generated dataset folder (ShapeWorld, or an Emoji-CLDR split) at its own size.
pub fn load_generated(dir: &Path, kind: FolderKind) -> Result<Vec<Sample>, FoldersError> {
    Ok(match kind {
        FolderKind::Captioned => return Err(FoldersError::Unknown { path: dir.into() }),
        FolderKind::ShapeWorld => load_dataset(dir)?,
        FolderKind::EmojiSplit => load_emoji_split(dir)?
            .into_iter()
            .map(|s| Sample {
                image_path: s.image_path,
                caption: s.record.caption,
                objects: Vec::new(),
                image: s.image,
            })
            .collect(),
    })
}

/// Loads every folder for a run of `target` and concatenates their samples in the order
/// given. Every folder must hold samples and no folder may be given twice.
pub fn load_folders(dirs: &[PathBuf], target: &ImageTarget) -> Result<Vec<Sample>, FoldersError> {
    if dirs.is_empty() {
        return Err(FoldersError::NoFolders);
    }
    let mut all: Vec<Sample> = Vec::new();
    // Compared resolved, so `a` and `./a` are the same folder.
    let resolved: Vec<PathBuf> = dirs
        .iter()
        .map(|d| d.canonicalize().unwrap_or_else(|_| d.clone()))
        .collect();
    for (k, dir) in dirs.iter().enumerate() {
        if resolved[..k].contains(&resolved[k]) {
            return Err(FoldersError::Duplicate { path: dir.clone() });
        }
        let samples = load_folder(dir, target)?;
        if samples.is_empty() {
            return Err(FoldersError::Empty { path: dir.clone() });
        }
        all.extend(samples);
    }
    Ok(all)
}

/// The folders as one line for messages: `a + b`.
pub fn folders_display(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(" + ")
}

/// Reads a run config's `data` written either as one path (runs made before several folders
/// were accepted) or as a list.
pub fn one_or_many_paths<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(p) => vec![p],
        OneOrMany::Many(v) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapeworld::{write_dataset, SceneConfig};

    fn shapeworld(dir: &Path, count: usize, size: u32) {
        let cfg = SceneConfig {
            image_size: size,
            min_objects: 1,
            max_objects: 2,
        };
        write_dataset(dir, count, 3, &cfg, "test").unwrap();
    }

    #[test]
    fn config_data_reads_one_path_or_a_list() {
        #[derive(Deserialize)]
        struct C {
            #[serde(deserialize_with = "one_or_many_paths")]
            data: Vec<PathBuf>,
        }
        let one: C = serde_json::from_str(r#"{"data": "a/b"}"#).unwrap();
        assert_eq!(one.data, vec![PathBuf::from("a/b")]);
        let many: C = serde_json::from_str(r#"{"data": ["a", "b"]}"#).unwrap();
        assert_eq!(many.data, vec![PathBuf::from("a"), PathBuf::from("b")]);
    }

    #[test]
    fn a_captioned_folder_under_someone_elses_dataset_json_is_still_captioned() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("photos");
        std::fs::create_dir_all(dir.join("images")).unwrap();
        image::RgbImage::from_pixel(4, 4, image::Rgb([1, 2, 3]))
            .save(dir.join("images/a.png"))
            .unwrap();
        std::fs::write(
            dir.join("captions.jsonl"),
            r#"{"image": "images/a.png", "caption": "a dot"}"#,
        )
        .unwrap();
        for other in [r#"{"name": "my photos"}"#, "not json at all"] {
            std::fs::write(root.path().join("dataset.json"), other).unwrap();
            assert_eq!(folder_kind(&dir).unwrap(), FolderKind::Captioned, "{other}");
        }
        // An Emoji-CLDR dataset.json above it is read, and its errors said.
        std::fs::write(
            root.path().join("dataset.json"),
            r#"{"generator": "emoji-cldr", "format_version": 999}"#,
        )
        .unwrap();
        assert!(matches!(folder_kind(&dir), Err(FoldersError::Emoji(_))));
    }

    #[test]
    fn shapeworld_folders_concatenate_and_bad_lists_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let a = root.path().join("a");
        let b = root.path().join("b");
        let big = root.path().join("big");
        shapeworld(&a, 5, 32);
        shapeworld(&b, 3, 32);
        shapeworld(&big, 2, 64);
        assert_eq!(folder_kind(&a).unwrap(), FolderKind::ShapeWorld);

        let t32 = ImageTarget {
            side: 32,
            fit: ImageFit::Stretch,
            max_len: 48,
            tokenizer: None,
        };
        assert_eq!(
            default_image_side(&[a.clone(), big.clone()], 7).unwrap(),
            32
        );
        assert_eq!(
            default_image_side(std::slice::from_ref(&big), 7).unwrap(),
            64
        );
        let both = load_folders(&[a.clone(), b.clone()], &t32).unwrap();
        assert_eq!(both.len(), 8);
        assert!(both[..5].iter().all(|s| s.image_path.starts_with(&a)));
        assert!(both[5..].iter().all(|s| s.image_path.starts_with(&b)));

        assert!(matches!(
            load_folders(&[], &t32),
            Err(FoldersError::NoFolders)
        ));
        assert!(matches!(
            load_folders(&[a.clone(), a.clone()], &t32),
            Err(FoldersError::Duplicate { .. })
        ));
        assert!(matches!(
            load_folders(&[a.clone(), root.path().join("b/../a")], &t32),
            Err(FoldersError::Duplicate { .. })
        ));
        let err = load_folders(&[a.clone(), big.clone()], &t32).unwrap_err();
        assert!(
            matches!(
                err,
                FoldersError::SizeMismatch {
                    found: 64,
                    expected: 32,
                    ..
                }
            ),
            "{err}"
        );
        let empty = root.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = load_folders(&[a.clone(), empty], &t32).unwrap_err();
        assert!(matches!(err, FoldersError::Unknown { .. }), "{err}");
        assert!(err.to_string().contains("captions.jsonl"), "{err}");

        // A folder of the user's own pairs mixes with generated ones: its 70×50 picture is
        // fitted to the run's 32 px, and only its train split is read.
        let mine = root.path().join("mine");
        std::fs::create_dir_all(mine.join("images")).unwrap();
        image::RgbImage::from_pixel(70, 50, image::Rgb([9, 99, 199]))
            .save(mine.join("images/p.png"))
            .unwrap();
        std::fs::write(
            mine.join("captions.jsonl"),
            "{\"image\": \"images/p.png\", \"caption\": \"a blue photo\", \"split\": \"train\"}\n\
             {\"image\": \"images/p.png\", \"caption\": \"held out\", \"split\": \"val\"}\n",
        )
        .unwrap();
        assert_eq!(folder_kind(&mine).unwrap(), FolderKind::Captioned);
        assert_eq!(native_image_size(&mine).unwrap(), None);
        assert_eq!(
            default_image_side(&[mine.clone(), a.clone()], 7).unwrap(),
            32
        );
        let mixed = load_folders(&[a, mine.clone()], &t32).unwrap();
        assert_eq!(mixed.len(), 6);
        assert_eq!(mixed[5].caption, "a blue photo");
        assert_eq!(mixed[5].image.dimensions(), (32, 32));
        // A broken one is refused with its problems.
        std::fs::write(
            mine.join("captions.jsonl"),
            "{\"image\": \"gone.png\", \"caption\": \"x\"}\n",
        )
        .unwrap();
        let err = load_folders(&[mine], &t32).unwrap_err();
        assert!(matches!(err, FoldersError::Refused(_)), "{err}");
        assert!(err.to_string().contains("gone.png does not exist"), "{err}");
    }
}
