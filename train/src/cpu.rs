//! Every stage and evaluation on the CPU backend, instantiated once, here.
//!
//! Training and evaluation are generic over the Burn backend, and every crate that names a
//! concrete backend compiles its own copy of Burn's whole autodiff and tensor stack for it —
//! minutes of codegen per crate on two cores. In the dev/test profile (`-O1` for the
//! workspace) rustc shares generic instances across crates (`share-generics`): a crate links
//! an instance an upstream crate already compiled instead of compiling it again. So the
//! CPU entry points are compiled in this library once, and the `duet-train` binary, the
//! exporter and every test binary that calls them (or the generic functions with these same
//! backends) link this copy.

use std::path::Path;

use crate::backend::CpuBackend;
use crate::eval::caption::{GenerateEvalOptions, ReconstructionReport};
use crate::eval::emoji::{EmojiCaptionReport, EmojiRetrievalReport, RetrievalOptions};
use crate::eval::geneval::GenEvalReport;
use crate::eval::restore::{RestoreEvalOptions, RestoreReport};
use crate::metrics::CaptionMetrics;
use crate::stages::caption::{FitArgs, FitOutcome, PreparedData};
use crate::stages::generate::{GenerateFitArgs, GenerateOutcome};
use crate::stages::restore::{PairFitArgs, PairOutcome};
use crate::stages::unify::{ReconstructionSettings, UnifyFitArgs, UnifyOutcome};
use duet_run::LoadedGenerator;
use duet_run::LoadedRestore;
use duet_run::LoadedRun;

/// Gives each matrix product one thread in a process about to train `peers` data-parallel CPU
/// peers (`--devices N`), unless `MATMUL_NUM_THREADS` is already set. burn-ndarray's products
/// run on `matrixmultiply`, whose one thread pool per process (sized by that variable when the
/// first product runs; the machine's physical cores otherwise) would take both peers'
/// products, one at a time: a `small` caption step on two peers took 0.95 s that way and 0.70 s
/// with a thread per product (docs/TRAINING.md). The peers already keep the cores busy. Thread
/// counts never change a product's values (its threads split rows and columns, not sums).
///
/// After the process's first product it has no effect.
///
/// # Safety
///
/// Sets an environment variable: call it before any other thread of the process starts
/// (`duet-train` calls it first thing in `main`), as no other thread may read or write the
/// environment while it runs.
pub unsafe fn single_thread_products_for_peers(peers: usize) {
    const VAR: &str = "MATMUL_NUM_THREADS";
    if peers > 1 && std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "1");
    }
}

/// The inference backend of evaluation and export (the training backend without autodiff).
pub type Infer = burn::backend::NdArray<f32>;

type Pairs = Vec<(image::RgbImage, image::RgbImage)>;

pub fn fit_caption(args: &FitArgs) -> anyhow::Result<FitOutcome> {
    crate::stages::caption::fit::<CpuBackend>(args, &Default::default())
}

pub fn fit_generate(args: &GenerateFitArgs) -> anyhow::Result<GenerateOutcome> {
    crate::stages::generate::fit_generate::<CpuBackend>(args, &Default::default())
}

pub fn fit_dream(
    args: &crate::stages::dream::DreamFitArgs,
) -> anyhow::Result<crate::stages::dream::DreamOutcome> {
    crate::stages::dream::fit_dream::<CpuBackend>(args, &Default::default())
}

pub fn fit_unify(args: &UnifyFitArgs) -> anyhow::Result<UnifyOutcome> {
    crate::stages::unify::fit_unify::<CpuBackend>(args, &Default::default())
}

pub fn fit_fusion(args: &PairFitArgs) -> anyhow::Result<PairOutcome> {
    crate::stages::restore::fit_fusion::<CpuBackend>(args, &Default::default())
}

pub fn fit_restore(args: &PairFitArgs) -> anyhow::Result<PairOutcome> {
    crate::stages::restore::fit_restore::<CpuBackend>(args, &Default::default())
}

pub fn load_run(run: &Path) -> anyhow::Result<LoadedRun<Infer>> {
    duet_run::load_run::<Infer>(run, &Default::default())
}

pub fn load_generator(run: &Path, untrained: bool) -> anyhow::Result<LoadedGenerator<Infer>> {
    duet_run::load_generator::<Infer>(run, untrained, &Default::default())
}

pub fn load_restore(run: &Path) -> anyhow::Result<LoadedRestore<Infer>> {
    duet_run::load_restore::<Infer>(run, &Default::default())
}

pub fn caption_samples(run: &LoadedRun<Infer>, data: &PreparedData) -> Vec<String> {
    crate::stages::caption::caption_samples(run, data, &Default::default())
}

pub fn eval_caption(
    run: &Path,
    data: &Path,
    limit: Option<usize>,
) -> anyhow::Result<(CaptionMetrics, Vec<(String, String)>)> {
    crate::eval::caption::eval_caption::<Infer>(run, data, limit, &Default::default())
}

pub fn eval_vqa(
    run: &Path,
    data: &Path,
    limit: Option<usize>,
) -> anyhow::Result<(crate::eval::vqa::VqaReport, Vec<crate::eval::vqa::Answered>)> {
    crate::eval::vqa::eval_vqa::<Infer>(run, data, limit, &Default::default())
}

pub fn eval_dream_generate(
    run: &Path,
    opts: &GenerateEvalOptions,
) -> anyhow::Result<(GenEvalReport, Vec<image::RgbImage>)> {
    crate::eval::dream::eval_dream_generate::<Infer>(run, opts, &Default::default())
}

pub fn eval_edits(
    run: &Path,
    data: &Path,
    limit: Option<usize>,
    opts: &GenerateEvalOptions,
    from_scratch: bool,
) -> anyhow::Result<(
    crate::eval::dream::EditReport,
    Vec<crate::eval::dream::DrawnEdit>,
)> {
    crate::eval::dream::eval_edits::<Infer>(
        run,
        data,
        limit,
        opts,
        from_scratch,
        &Default::default(),
    )
}

pub fn eval_generate(
    run: &Path,
    opts: &GenerateEvalOptions,
) -> anyhow::Result<(GenEvalReport, Vec<image::RgbImage>)> {
    crate::eval::caption::eval_generate::<Infer>(run, opts, &Default::default())
}

pub fn eval_reconstruction(
    run: &Path,
    data: &Path,
    limit: Option<usize>,
    settings: &ReconstructionSettings,
    seed: u64,
) -> anyhow::Result<(ReconstructionReport, Pairs)> {
    crate::eval::caption::eval_reconstruction::<Infer>(
        run,
        data,
        limit,
        settings,
        seed,
        &Default::default(),
    )
}

pub fn eval_emoji_captions(
    run: &Path,
    data: &Path,
    limit: Option<usize>,
) -> anyhow::Result<(EmojiCaptionReport, Vec<(String, String)>)> {
    crate::eval::emoji::eval_emoji_captions::<Infer>(run, data, limit, &Default::default())
}

pub fn eval_emoji_retrieval(
    run: &Path,
    data: &Path,
    limit: Option<usize>,
    opts: &RetrievalOptions,
) -> anyhow::Result<(EmojiRetrievalReport, Pairs)> {
    crate::eval::emoji::eval_emoji_retrieval::<Infer>(run, data, limit, opts, &Default::default())
}

pub fn eval_restore(run: &Path, opts: &RestoreEvalOptions) -> anyhow::Result<RestoreReport> {
    crate::eval::restore::eval_restore::<Infer>(run, opts, &Default::default())
}
