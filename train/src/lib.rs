//! duet training: datasets, tokenizer, Burn training stages and evaluation.

pub mod backend;
pub mod caption_stage;
pub mod checkpoint;
// Not in the unit-test build: its instances would be compiled a second time there for nothing.
#[cfg(not(test))]
pub mod cpu;
pub mod curves;
pub mod datasets;
pub mod ema;
pub mod emoji;
pub mod emoji_eval;
pub mod eval;
pub mod fsutil;
pub mod generate_stage;
pub mod geneval;
pub mod grpo;
pub mod metrics;
pub mod pair_tasks;
pub mod plot;
pub mod progress;
pub mod restore_eval;
pub mod restore_stage;
pub mod shapeworld;
pub mod stage;
pub mod tokenizer;
pub mod unify_stage;
