//! Training data drawn from several dataset folders at once (`--data A --data B`): ShapeWorld
//! folders and Emoji-CLDR split folders are read by their own loaders and concatenated, in the
//! order given, into one list of [`Sample`]s. Emoji samples carry no scene (`objects` is
//! empty): the stages only need an image and its caption.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::emoji::{load_emoji_info, load_emoji_split, EmojiError};
use crate::shapeworld::{load_dataset, DataError, Sample};

/// What a dataset folder holds, told from its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderKind {
    /// A folder written by `duet-train shapeworld` (`scenes.jsonl` beside `captions.jsonl`).
    ShapeWorld,
    /// One split (`train`, `val` or `test`) of a folder written by `duet-train emoji`.
    EmojiSplit,
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
        "{}: not a dataset folder (expected a ShapeWorld folder with scenes.jsonl, or a split of \
         an Emoji-CLDR dataset with captions.jsonl)", path.display()
    )]
    Unknown { path: PathBuf },
    #[error("{}: holds no samples", path.display())]
    Empty { path: PathBuf },
    #[error(
        "{}: images are {found}px but those of {} are {expected}px; build every folder at one \
         --size", path.display(), first.display()
    )]
    SizeMismatch {
        path: PathBuf,
        found: u32,
        first: PathBuf,
        expected: u32,
    },
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
            if parent.join("dataset.json").is_file() {
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
    Err(FoldersError::Unknown {
        path: dir.to_path_buf(),
    })
}

/// Loads one folder of either kind.
pub fn load_folder(dir: &Path) -> Result<Vec<Sample>, FoldersError> {
    Ok(match folder_kind(dir)? {
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

/// Loads every folder and concatenates their samples in the order given. Every folder must
/// hold samples, no folder may be given twice, and all images must share one size.
pub fn load_folders(dirs: &[PathBuf]) -> Result<Vec<Sample>, FoldersError> {
    if dirs.is_empty() {
        return Err(FoldersError::NoFolders);
    }
    let mut all: Vec<Sample> = Vec::new();
    let mut first: Option<(PathBuf, u32)> = None;
    // Compared resolved, so `a` and `./a` are the same folder.
    let resolved: Vec<PathBuf> = dirs
        .iter()
        .map(|d| d.canonicalize().unwrap_or_else(|_| d.clone()))
        .collect();
    for (k, dir) in dirs.iter().enumerate() {
        if resolved[..k].contains(&resolved[k]) {
            return Err(FoldersError::Duplicate { path: dir.clone() });
        }
        let samples = load_folder(dir)?;
        let Some(size) = samples.first().map(|s| s.image.width()) else {
            return Err(FoldersError::Empty { path: dir.clone() });
        };
        match &first {
            None => first = Some((dir.clone(), size)),
            Some((first_dir, expected)) if *expected != size => {
                return Err(FoldersError::SizeMismatch {
                    path: dir.clone(),
                    found: size,
                    first: first_dir.clone(),
                    expected: *expected,
                })
            }
            Some(_) => {}
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
    fn shapeworld_folders_concatenate_and_bad_lists_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let a = root.path().join("a");
        let b = root.path().join("b");
        let big = root.path().join("big");
        shapeworld(&a, 5, 32);
        shapeworld(&b, 3, 32);
        shapeworld(&big, 2, 64);
        assert_eq!(folder_kind(&a).unwrap(), FolderKind::ShapeWorld);

        let both = load_folders(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(both.len(), 8);
        assert!(both[..5].iter().all(|s| s.image_path.starts_with(&a)));
        assert!(both[5..].iter().all(|s| s.image_path.starts_with(&b)));

        assert!(matches!(load_folders(&[]), Err(FoldersError::NoFolders)));
        assert!(matches!(
            load_folders(&[a.clone(), a.clone()]),
            Err(FoldersError::Duplicate { .. })
        ));
        assert!(matches!(
            load_folders(&[a.clone(), root.path().join("b/../a")]),
            Err(FoldersError::Duplicate { .. })
        ));
        let err = load_folders(&[a.clone(), big.clone()]).unwrap_err();
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
        let err = load_folders(&[a, empty]).unwrap_err();
        assert!(matches!(err, FoldersError::Unknown { .. }), "{err}");
        assert!(err.to_string().contains("scenes.jsonl"), "{err}");
    }
}
