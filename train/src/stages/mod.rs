//! The training stages, in pipeline order: each module reads its run config, draws its data,
//! steps the model and writes checkpoints and metrics into its run directory.

pub mod caption;
pub mod dream;
pub mod generate;
pub mod grpo;
pub mod restore;
pub mod unify;
