//! Seeded, reproducible initial weights.
//!
//! Burn initialises a parameter lazily — on its first use — from one random generator per
//! backend that the whole process shares, reseeded by `Backend::seed`. So `B::seed(seed)`
//! followed by `Model::new` fixes the weights only when nothing else in the process draws
//! from that generator until every parameter has been used once: a second model trained on
//! another thread (parallel tests, a library user training two models) interleaves its draws
//! and both get different weights on every run. [`seeded`] makes the seed and the draws of
//! one model a single step: it holds a process-wide lock, seeds, builds, and forces every
//! parameter's draw in module order before releasing it.
//!
//! Every module in this workspace that starts from random weights is built through
//! [`seeded`]; modules that are loaded ([`crate::params::load_named_tensors`]) never draw, and
//! library code draws no other values from the backend generator (noise and shuffles come
//! from seeded `rand` generators). A draw outside [`seeded`] — `Tensor::random`, or a module
//! used before it was loaded or seeded — is not covered: it can still land in between.

use std::sync::{Mutex, PoisonError};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Held while a module's parameters are drawn, so no other seeded build can reseed or draw
/// from the backend generator in between.
static BACKEND_RNG: Mutex<()> = Mutex::new(());

/// Builds a module with `build` and draws all its random parameters from `seed`, atomically
/// with respect to every other [`seeded`] call in the process: the same seed gives the same
/// weights whatever other threads are doing.
pub fn seeded<B: Backend, M: Module<B>>(
    device: &B::Device,
    seed: u64,
    build: impl FnOnce() -> M,
) -> M {
    // A panic in another build leaves nothing half-done that matters here: the generator is
    // reseeded below before any draw.
    let _held = BACKEND_RNG.lock().unwrap_or_else(PoisonError::into_inner);
    B::seed(device, seed);
    let module = build();
    module.visit(&mut DrawAll);
    module
}

/// Forces each parameter's lazy initialisation, in module (field) order.
struct DrawAll;

impl<B: Backend> ModuleVisitor<B> for DrawAll {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let _ = param.val();
    }
}
