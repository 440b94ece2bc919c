//! duet training: the Burn training stages (`stages`), evaluation (`eval`), and the plumbing
//! they share (backends, metrics, curves, plots). The datasets and tokenizer are `duet-datasets`;
//! what a run writes and how it is read back (configs, checkpoints, loading) is `duet-run`.

pub mod alloc;
pub mod backend;
// Not in the unit-test build: its instances would be compiled a second time there for nothing.
#[cfg(not(test))]
pub mod cpu;
pub mod curves;
pub mod ema;
pub mod eval;
pub mod metrics;
pub mod parallel;
pub mod plot;
pub mod stages;
pub mod vocab;
