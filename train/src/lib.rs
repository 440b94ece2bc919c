//! duet training: datasets, tokenizer, Burn training stages and evaluation.

pub mod backend;
pub mod caption_stage;
pub mod checkpoint;
pub mod eval;
pub mod fsutil;
pub mod generate_stage;
pub mod geneval;
pub mod metrics;
pub mod shapeworld;
pub mod tokenizer;
