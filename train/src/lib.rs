//! duet training: datasets (`data`), Burn training stages (`stages`), evaluation (`eval`), and
//! the run plumbing they share (backends, checkpoints, metrics, curves, progress).

pub mod alloc;
pub mod backend;
pub mod checkpoint;
// Not in the unit-test build: its instances would be compiled a second time there for nothing.
#[cfg(not(test))]
pub mod cpu;
pub mod curves;
pub mod data;
pub mod ema;
pub mod eval;
pub mod fsutil;
pub mod metrics;
pub mod plot;
pub mod progress;
pub mod stage;
pub mod stages;
