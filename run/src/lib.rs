//! A training run on disk: the files each stage writes into its folder, the config that
//! defines it (`config.json`, one type per stage), its checkpoints, and loading the trained
//! modules back into Burn. The trainer writes runs; its evaluations and the exporter read them
//! through this crate, so the exporter does not depend on the trainer.

pub mod checkpoint;
pub mod config;
pub mod dream;
pub mod generator;
pub mod load;
mod stage;

pub use checkpoint::{CheckpointError, TrainState, OPTIMIZER_FILE, STATE_FILE, WEIGHTS_FILE};
pub use config::*;
pub use dream::{load_dream, LoadedDream};
pub use generator::{empty_caption, load_generator, load_generator_weights, LoadedGenerator};
pub use load::*;
pub use stage::Stage;

pub const CONFIG_FILE: &str = "config.json";
/// Where a run (and a bundle) keeps its `tokenizer.json`.
pub use duet_datasets::tokenizer::TOKENIZER_FILE;
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Burn record of the model, kept only so `--resume` can restore the optimizer state (which
/// Burn keys by parameter id); `model.safetensors` is the portable copy of the weights.
pub const MODEL_RECORD_FILE: &str = "model_record.bin";
