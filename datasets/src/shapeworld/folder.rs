//! Dataset folders on disk: writing a seeded dataset (images, captions, scenes, `dataset.json`),
//! loading one back with every error naming its file and line, and caption-disjoint splits.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{BufRead, BufReader, Cursor};
use std::path::{Component, Path, PathBuf};

use image::{ImageFormat, RgbImage};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::*;

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
    /// Questions written per scene to `questions.jsonl` (0: no such file).
    #[serde(default)]
    pub questions_per_scene: usize,
    /// Instruction edits written per scene to `edits.jsonl` (0: no such file).
    #[serde(default)]
    pub edits_per_scene: usize,
    /// The folder whose scenes this one was kept apart from (`--held-out-from`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out_from: Option<String>,
}

/// One line of `questions.jsonl`: a question about the image and its exact answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuestionRecord {
    pub image: String,
    pub kind: QuestionKind,
    pub question: String,
    pub answer: String,
}

/// One line of `edits.jsonl`: an instruction about the image and the exact scene it asks for
/// (rendered by [`render`] when loaded: the target image is a function of its objects).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EditRecord {
    pub image: String,
    pub kind: EditKind,
    pub instruction: String,
    pub target: Vec<Object>,
}

/// What [`write_dataset_with`] writes besides images, captions and scenes.
#[derive(Debug, Clone, Default)]
pub struct DatasetExtras {
    /// Questions per scene for `questions.jsonl` (0: none).
    pub questions_per_scene: usize,
    /// Instruction edits per scene for `edits.jsonl` (0: none).
    pub edits_per_scene: usize,
    /// Captions of scenes this folder must not contain (another folder's: a held-out split
    /// whose scenes, and so whose (question, scene) pairs, never occur there), and that
    /// folder's path for `dataset.json`.
    pub exclude: Option<(String, HashSet<String>)>,
}

/// The captions of a folder's scenes (`captions.jsonl`), for [`DatasetExtras::exclude`].
pub fn folder_captions(dir: &Path) -> Result<HashSet<String>, DataError> {
    let path = dir.join("captions.jsonl");
    Ok(read_jsonl::<CaptionRecord>(&path)?
        .into_iter()
        .map(|(_, r)| r.caption)
        .collect())
}

/// Reads `questions.jsonl` of a folder (an empty list when the folder has none). Every
/// question must be about an image the folder lists, with an answer and a question ending in
/// " ?"; the answer is checked against the scene (`scenes`: image → objects) when given.
pub fn load_questions(dir: &Path) -> Result<Vec<QuestionRecord>, DataError> {
    let path = dir.join("questions.jsonl");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let records: Vec<(usize, QuestionRecord)> = read_jsonl(&path)?;
    let images = listed_images(dir)?;
    let mut out = Vec::with_capacity(records.len());
    for (line, r) in records {
        let problem = if !images.contains(&r.image) {
            Some(format!("image {:?} is not in captions.jsonl", r.image))
        } else if !r.question.ends_with(" ?") || r.question.len() < 3 {
            Some(format!("question {:?} must end with \" ?\"", r.question))
        } else if r.answer.trim().is_empty() {
            Some("empty answer".to_string())
        } else {
            None
        };
        if let Some(message) = problem {
            return Err(DataError::Invalid {
                path: path.clone(),
                line,
                message,
            });
        }
        out.push(r);
    }
    Ok(out)
}

/// The images a folder's `captions.jsonl` lists (what its questions and edits may be about).
fn listed_images(dir: &Path) -> Result<HashSet<String>, DataError> {
    Ok(read_jsonl::<CaptionRecord>(&dir.join("captions.jsonl"))?
        .into_iter()
        .map(|(_, r)| r.image)
        .collect())
}

/// Reads `edits.jsonl` of a folder (an empty list when the folder has none). Every edit must
/// be of an image the folder lists, with an instruction and a target of at most one object
/// per cell.
pub fn load_edits(dir: &Path) -> Result<Vec<EditRecord>, DataError> {
    let path = dir.join("edits.jsonl");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let records: Vec<(usize, EditRecord)> = read_jsonl(&path)?;
    let images = listed_images(dir)?;
    let mut out = Vec::with_capacity(records.len());
    for (line, r) in records {
        let cells: HashSet<Position> = r.target.iter().map(|o| o.position).collect();
        let problem = if !images.contains(&r.image) {
            Some(format!("image {:?} is not in captions.jsonl", r.image))
        } else if r.instruction.trim().is_empty() {
            Some("empty instruction".to_string())
        } else if cells.len() != r.target.len() {
            Some("the target has two objects in one cell".to_string())
        } else {
            None
        };
        if let Some(message) = problem {
            return Err(DataError::Invalid {
                path: path.clone(),
                line,
                message,
            });
        }
        out.push(r);
    }
    Ok(out)
}

/// One line of `captions.jsonl` (`label` is optional and unused here).
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

/// Writes `bytes` to `path` atomically (see [`duet_fsio::write_atomic_creating_dir`]), naming the
/// path in the error.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    duet_fsio::write_atomic_creating_dir(path, bytes).map_err(|source| DataError::Io {
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
    write_dataset_with(
        out_dir,
        count,
        seed,
        cfg,
        command,
        &DatasetExtras::default(),
    )
}

/// [`write_dataset`] with questions (`questions.jsonl`, drawn from the seed's second ChaCha
/// stream, so the scenes are those of the same seed without questions), edits (`edits.jsonl`,
/// the third stream) and scenes kept apart
/// from another folder's (a scene whose caption is excluded is drawn again).
pub fn write_dataset_with(
    out_dir: &Path,
    count: usize,
    seed: u64,
    cfg: &SceneConfig,
    command: &str,
    extras: &DatasetExtras,
) -> Result<DatasetSummary, DataError> {
    cfg.validate()?;
    // With at most one object per scene there are 720 scenes in all: an excluded set that
    // covers them would make the redraw below loop for ever.
    const MAX_REDRAWS: usize = 10_000;
    let images_dir = out_dir.join("images");
    fs::create_dir_all(&images_dir).map_err(|source| DataError::Io {
        path: images_dir.clone(),
        source,
    })?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut question_rng = ChaCha8Rng::seed_from_u64(seed);
    question_rng.set_stream(1);
    let mut edit_rng = ChaCha8Rng::seed_from_u64(seed);
    edit_rng.set_stream(2);
    let mut edits_jsonl = String::new();
    let mut captions_jsonl = String::new();
    let mut scenes_jsonl = String::new();
    let mut questions_jsonl = String::new();
    let mut total_objects = 0;
    let mut max_caption_words = 0;
    for index in 0..count {
        let mut scene = generate_scene(&mut rng, cfg);
        if let Some((from, excluded)) = &extras.exclude {
            let mut redraws = 0;
            while excluded.contains(&caption(&scene)) {
                redraws += 1;
                if redraws > MAX_REDRAWS {
                    return Err(DataError::InvalidConfig(format!(
                        "{MAX_REDRAWS} scenes in a row were all in {from}: too few scenes \
                         are left to hold out (allow more objects per scene)"
                    )));
                }
                scene = generate_scene(&mut rng, cfg);
            }
        }
        let rel = image_rel_path(index);
        let path = out_dir.join(&rel);
        let png = encode_png(&render(&scene, cfg.image_size), &path)?;
        write_atomic(&path, &png)?;
        for q in questions_for(&scene, extras.questions_per_scene, &mut question_rng) {
            push_json_line(
                &mut questions_jsonl,
                &QuestionRecord {
                    image: rel.clone(),
                    kind: q.kind,
                    question: q.question,
                    answer: q.answer,
                },
                &out_dir.join("questions.jsonl"),
            )?;
        }
        for e in edits_for(&scene, extras.edits_per_scene, &mut edit_rng) {
            push_json_line(
                &mut edits_jsonl,
                &EditRecord {
                    image: rel.clone(),
                    kind: e.kind,
                    instruction: e.instruction,
                    target: e.target.objects,
                },
                &out_dir.join("edits.jsonl"),
            )?;
        }
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
    if extras.questions_per_scene > 0 {
        write_atomic(&out_dir.join("questions.jsonl"), questions_jsonl.as_bytes())?;
    }
    if extras.edits_per_scene > 0 {
        write_atomic(&out_dir.join("edits.jsonl"), edits_jsonl.as_bytes())?;
    }
    let summary = DatasetSummary {
        generator: GENERATOR_NAME.to_string(),
        format_version: DATASET_FORMAT_VERSION,
        config: *cfg,
        seed,
        count,
        command: command.to_string(),
        total_objects,
        max_caption_words,
        questions_per_scene: extras.questions_per_scene,
        edits_per_scene: extras.edits_per_scene,
        held_out_from: extras.exclude.as_ref().map(|(from, _)| from.clone()),
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
