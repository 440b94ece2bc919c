//! The fusion and restore stages on a user's own labelled pairs: a captioned folder
//! (`crate::captioned`) whose every line has a `label`. The head learns those labels; the
//! folder's train split trains it and its val and test splits are held out.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{PairExample, PairTask};
use crate::captioned::{check_pairs, CaptionedPair, FolderRefused, Label, ReadOptions, Split};
use crate::folders::{FoldersError, ImageTarget};

/// The most classes a folder's head is built for (a guard against a typo in the label field
/// — a caption pasted as a label — making a head of one class per pair).
pub const MAX_CLASSES: usize = 1024;

/// What the fusion head classifies and where its pairs come from. Serialised as the task's
/// name or as the folder's record, so run configs written before folders existed still read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PairData {
    /// A ShapeWorld task with exact labels, drawn from a seed.
    Task(PairTask),
    /// The labelled pairs of a user's captioned folder.
    Folder(LabelledFolder),
}

/// A captioned folder with a label on every pair, and its classes in the head's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelledFolder {
    pub dir: PathBuf,
    /// Class names, index = the head's output: the folder's labels sorted (numbers by value,
    /// then names).
    pub classes: Vec<String>,
}

/// Training and held-out examples of a pair task or folder.
#[derive(Debug, Clone)]
pub struct PairExamples {
    pub train: Vec<PairExample>,
    pub test: Vec<PairExample>,
}

impl PairData {
    pub fn classes(&self) -> usize {
        match self {
            PairData::Task(t) => t.classes(),
            PairData::Folder(f) => f.classes.len(),
        }
    }

    pub fn class_name(&self, label: usize) -> String {
        match self {
            PairData::Task(t) => t.class_name(label),
            PairData::Folder(f) => f.classes.get(label).cloned().unwrap_or_default(),
        }
    }

    /// The best single-view accuracy, known for the built-in tasks only (a folder's views are
    /// whatever the user's images and captions say).
    pub fn single_view_ceiling(&self, image_only: bool) -> Option<f64> {
        match self {
            PairData::Task(t) => Some(t.single_view_ceiling(image_only)),
            PairData::Folder(_) => None,
        }
    }

    /// The training and held-out examples: a task draws `train_n` from `seed` and `test_n`
    /// from `seed + 1`; a folder gives its train split and its val + test splits (the counts
    /// and the seed do not apply), its labels mapped to the classes recorded here.
    pub fn examples(
        &self,
        train_n: usize,
        test_n: usize,
        seed: u64,
        target: &ImageTarget,
    ) -> Result<PairExamples, FoldersError> {
        match self {
            PairData::Task(t) => Ok(PairExamples {
                train: t.examples(train_n, seed, target.side),
                test: t.examples(test_n, seed.wrapping_add(1), target.side),
            }),
            PairData::Folder(f) => f.examples(target),
        }
    }
}

impl std::fmt::Display for PairData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PairData::Task(t) => t.fmt(f),
            // The folder's own name, not its path: this goes into manifests that leave the
            // machine.
            PairData::Folder(l) => write!(
                f,
                "folder {}",
                l.dir.file_name().map_or_else(
                    || l.dir.display().to_string(),
                    |n| n.to_string_lossy().into_owned()
                )
            ),
        }
    }
}

impl LabelledFolder {
    /// Reads a folder for the fusion stage and takes its classes from the labels: the folder
    /// must pass the check, label every pair, have two to [`MAX_CLASSES`] labels and hold
    /// pairs out (a val or test split).
    pub fn open(dir: &Path, target: &ImageTarget) -> Result<(Self, PairExamples), FoldersError> {
        Self::from_pairs(dir, read_pairs(dir, target)?)
    }

    /// [`open`](Self::open) on pairs already read by [`check_pairs`] from a folder that passed
    /// the check (`duet-train data check --labels` reads the folder once for both).
    pub fn from_pairs(
        dir: &Path,
        pairs: Vec<CaptionedPair>,
    ) -> Result<(Self, PairExamples), FoldersError> {
        let pairs = labelled(dir, pairs)?;
        // Distinct labels in order (numbers by value, then names), counted no further than
        // one past the limit.
        let mut distinct = BTreeSet::new();
        for (_, label, _) in &pairs {
            distinct.insert(label);
            if distinct.len() > MAX_CLASSES {
                break;
            }
        }
        // A number and a name can print alike (1 and "1"): one class, as the lookup by name
        // in `split` treats them.
        let mut classes: Vec<String> = Vec::with_capacity(distinct.len());
        let mut names = HashSet::new();
        for label in distinct {
            let name = label.to_string();
            if names.insert(name.clone()) {
                classes.push(name);
            }
        }
        if classes.len() < 2 || classes.len() > MAX_CLASSES {
            return Err(FoldersError::Classes {
                path: dir.to_path_buf(),
                found: classes.len(),
                max: MAX_CLASSES,
            });
        }
        let folder = LabelledFolder {
            dir: dir.to_path_buf(),
            classes,
        };
        let examples = folder.split(pairs)?;
        Ok((folder, examples))
    }

    /// The examples of a folder opened before (the restore stage, evaluation): every label
    /// must be one of the recorded classes.
    pub fn examples(&self, target: &ImageTarget) -> Result<PairExamples, FoldersError> {
        let pairs = labelled(&self.dir, read_pairs(&self.dir, target)?)?;
        self.split(pairs)
    }

    fn split(&self, pairs: Vec<(PairExample, Label, Split)>) -> Result<PairExamples, FoldersError> {
        let index: HashMap<&str, usize> = self
            .classes
            .iter()
            .enumerate()
            .map(|(k, c)| (c.as_str(), k))
            .collect();
        let mut out = PairExamples {
            train: Vec::new(),
            test: Vec::new(),
        };
        for (mut example, label, split) in pairs {
            let name = label.to_string();
            example.label =
                *index
                    .get(name.as_str())
                    .ok_or_else(|| FoldersError::UnknownLabel {
                        path: self.dir.clone(),
                        label: name.clone(),
                        classes: self.classes.len(),
                    })?;
            match split {
                Split::Train => out.train.push(example),
                Split::Val | Split::Test => out.test.push(example),
            }
        }
        if out.test.is_empty() {
            return Err(FoldersError::NoHeldOut {
                path: self.dir.clone(),
            });
        }
        Ok(out)
    }
}

/// Every pair of a folder, refusing it if the check found an error.
fn read_pairs(dir: &Path, target: &ImageTarget) -> Result<Vec<CaptionedPair>, FoldersError> {
    let opts = ReadOptions {
        split: None,
        side: target.side,
        fit: target.fit,
        max_len: target.max_len,
        tokenizer: target.tokenizer,
    };
    let (report, pairs) = check_pairs(dir, &opts);
    if !report.is_ok() {
        return Err(FolderRefused {
            report: Box::new(report),
        }
        .into());
    }
    Ok(pairs)
}

/// The pairs as examples (label still unmapped), refusing a pair that has no label.
fn labelled(
    dir: &Path,
    pairs: Vec<CaptionedPair>,
) -> Result<Vec<(PairExample, Label, Split)>, FoldersError> {
    let unlabelled: Vec<usize> = pairs
        .iter()
        .filter(|p| p.label.is_none())
        .map(|p| p.line)
        .collect();
    if let Some(&line) = unlabelled.first() {
        return Err(FoldersError::Unlabelled {
            path: dir.to_path_buf(),
            line,
            count: unlabelled.len(),
        });
    }
    Ok(pairs
        .into_iter()
        .filter_map(|p| {
            let label = p.label?;
            Some((
                PairExample {
                    image: p.sample.image,
                    text: p.sample.caption,
                    label: 0,
                },
                label,
                p.split,
            ))
        })
        .collect())
}

#[cfg(test)]
mod tests;
