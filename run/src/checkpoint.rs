//! Checkpoints: model weights as plain safetensors (keys = Burn module paths, see
//! `docs/ARCHITECTURE.md`), the optimizer state as a Burn record, and a small JSON state.
//! Every file is written atomically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use duet_models::params::{NamedTensor, NamedTensors};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use duet_fsio::write_atomic_creating_dir as write_atomic;

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.bin";
pub const STATE_FILE: &str = "state.json";

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: tensor '{name}' has dtype {dtype:?}, expected F32")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: Dtype,
    },
    #[error("{path}: {reason}")]
    Json { path: PathBuf, reason: String },
    /// Not a regular file, over its cap, or unreadable.
    #[error(transparent)]
    Read(#[from] duet_fsio::ReadError),
}

/// Largest run `config.json` / `state.json` read.
pub const JSON_FILE_CAP: duet_fsio::Cap = duet_fsio::Cap::new(64 << 20, "a run's JSON file");
/// Largest `model.safetensors` read (the small preset's is a few MB; generous for larger runs,
/// small enough that a damaged or hostile run cannot make a reader allocate without end).
pub const WEIGHTS_FILE_CAP: duet_fsio::Cap = duet_fsio::Cap::new(4 << 30, "a run's weights");

/// Training progress saved next to the weights so `--resume` continues where it stopped.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub step: usize,
    pub seed: u64,
    pub last_loss: f64,
}

pub fn save_weights(path: &Path, tensors: &NamedTensors) -> Result<(), CheckpointError> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| {
            let b: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (k.clone(), b, t.shape.clone())
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(k, b, s)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| CheckpointError::Safetensors {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<_, _>>()?;
    let meta: HashMap<String, String> = HashMap::from([("format".to_string(), "duet".to_string())]);
    let data =
        safetensors::serialize(views, Some(meta)).map_err(|e| CheckpointError::Safetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    write_atomic(path, &data).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub fn load_weights(path: &Path) -> Result<NamedTensors, CheckpointError> {
    let data = duet_fsio::read_capped(path, WEIGHTS_FILE_CAP, duet_fsio::Follow::Yes)?;
    let st =
        safetensors::SafeTensors::deserialize(&data).map_err(|e| CheckpointError::Safetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let mut out = NamedTensors::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(CheckpointError::Dtype {
                path: path.to_path_buf(),
                name,
                dtype: view.dtype(),
            });
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(
            name,
            NamedTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), CheckpointError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CheckpointError::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    write_atomic(path, text.as_bytes()).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, CheckpointError> {
    let text = duet_fsio::read_capped_text(path, JSON_FILE_CAP, duet_fsio::Follow::Yes)?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run's files are read as regular files under their caps: a directory (or a link where
    /// one is not followed, or a huge file) is a typed error, never a read without end.
    #[test]
    fn run_files_are_read_as_capped_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let state = TrainState {
            step: 3,
            seed: 1,
            last_loss: 0.5,
        };
        let path = dir.path().join(STATE_FILE);
        write_json(&path, &state).unwrap();
        assert_eq!(read_json::<TrainState>(&path).unwrap(), state);
        let folder = dir.path().join("model.safetensors");
        std::fs::create_dir(&folder).unwrap();
        for err in [
            read_json::<TrainState>(&folder).map(drop).unwrap_err(),
            load_weights(&folder).map(drop).unwrap_err(),
        ] {
            assert!(
                matches!(
                    err,
                    CheckpointError::Read(duet_fsio::ReadError::NotRegular { .. })
                ),
                "{err}"
            );
        }
        let missing = read_json::<TrainState>(&dir.path().join("none.json")).unwrap_err();
        assert!(missing.to_string().contains("does not exist"), "{missing}");
    }
}
