//! The generation direction as one module.

use burn::module::Module;
use burn::tensor::backend::Backend;

use crate::{Denoiser, ModelSpec, TextEncoder};

/// Text encoder + denoiser: the module the generate stage trains, and the generation half of
/// every later run.
#[derive(Module, Debug)]
pub struct GenerationModel<B: Backend> {
    pub text: TextEncoder<B>,
    pub denoiser: Denoiser<B>,
}

impl<B: Backend> GenerationModel<B> {
    pub fn new(cfg: &ModelSpec, device: &B::Device) -> Self {
        Self {
            text: TextEncoder::new(cfg, device),
            denoiser: Denoiser::new(cfg, device),
        }
    }
}
