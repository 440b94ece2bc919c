//! Data-parallel training (`--devices N`) on Burn's collective engine (`burn-collective`).
//!
//! Every peer holds the whole model and optimizer and runs the same loop: all of them draw the
//! same global batch, each takes its contiguous `1/N` of it ([`Peer::shard`]), computes its
//! part of the loss, and the gradients are summed across peers ([`Peer::sum_gradients`]) before
//! one optimizer step that is therefore the same on every peer. Losses are written so that the
//! parts *sum* to the one-device loss (each shard divides by the global batch's normaliser), so
//! `N` peers with `B/N` samples each take the step one device takes with `B`, up to the order of
//! floating-point additions. One peer, the leader, writes the checkpoints and the metrics.
//!
//! The peers are threads of this process, each with its own device: `N` CPU peers (to test and
//! to use cores that one small step leaves idle) or one per CUDA device. Burn's collective
//! server is one per process and backend, so one group trains at a time ([`run_peers`] holds a
//! process-wide lock).

use std::fs::{File, OpenOptions};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Mutex;

use burn::collective::{
    self, AllReduceStrategy, CollectiveConfig, CollectiveError, PeerId, ReduceOperation,
};
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorPrimitive};
use duet_run::METRICS_FILE;
use thiserror::Error;

/// Why data-parallel training cannot start or stopped.
#[derive(Debug, Error)]
pub enum ParallelError {
    #[error("--devices must be at least 1")]
    NoDevices,
    #[error(
        "a batch of {batch} does not split evenly over {devices} devices: choose a --batch-size \
         divisible by {devices}"
    )]
    UnevenBatch { batch: usize, devices: usize },
    #[error("peer {rank} of {devices}: the collective operation failed ({detail})")]
    Collective {
        rank: usize,
        devices: usize,
        detail: String,
    },
    #[error("peer {rank} of {devices} panicked: {detail}")]
    Panicked {
        rank: usize,
        devices: usize,
        detail: String,
    },
}

/// Checks a data-parallel configuration before anything is written: at least one device, and a
/// global batch that splits into equal shards (unequal shards would weigh samples unequally).
pub fn check(devices: usize, batch: usize) -> Result<(), ParallelError> {
    if devices == 0 {
        return Err(ParallelError::NoDevices);
    }
    if !batch.is_multiple_of(devices) || batch < devices {
        return Err(ParallelError::UnevenBatch { batch, devices });
    }
    Ok(())
}

/// One member of a data-parallel group: its rank and the group's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    rank: usize,
    devices: usize,
}

impl Peer {
    /// Training on one device: no collective operations at all.
    pub const ALONE: Peer = Peer {
        rank: 0,
        devices: 1,
    };

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn devices(&self) -> usize {
        self.devices
    }

    /// The peer that writes checkpoints, metrics and progress.
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// The run's metrics log, opened for appending: the leader's (`None` on the others, which
    /// write nothing).
    pub fn metrics_log(&self, run: &Path) -> std::io::Result<Option<File>> {
        if !self.is_leader() {
            return Ok(None);
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(run.join(METRICS_FILE))
            .map(Some)
    }

    /// This peer's contiguous part of a global batch ([`check`] made the parts equal).
    pub fn shard<'a, T>(&self, batch: &'a [T]) -> &'a [T] {
        let n = batch.len() / self.devices;
        &batch[self.rank * n..(self.rank + 1) * n]
    }

    fn id(&self) -> PeerId {
        PeerId::from(self.rank as u32)
    }

    fn failed(&self, e: CollectiveError) -> ParallelError {
        ParallelError::Collective {
            rank: self.rank,
            devices: self.devices,
            detail: format!("{e:?}"),
        }
    }

    /// The sum over all peers of each parameter's gradient, in `module`'s parameter order (the
    /// same on every peer, unlike the random parameter ids of separately built models).
    pub fn sum_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        module: &M,
        mut grads: GradientsParams,
    ) -> Result<GradientsParams, ParallelError> {
        if self.devices == 1 {
            return Ok(grads);
        }
        let mut visitor = SumGradients::<B> {
            peer: self.id(),
            grads: &mut grads,
            error: None,
            _backend: std::marker::PhantomData,
        };
        module.visit(&mut visitor);
        match visitor.error {
            Some(e) => Err(self.failed(e)),
            None => Ok(grads),
        }
    }

    /// The sum over all peers of `value` (a loss part, a count).
    pub fn sum<B: AutodiffBackend>(
        &self,
        value: f64,
        device: &B::Device,
    ) -> Result<f64, ParallelError> {
        if self.devices == 1 {
            return Ok(value);
        }
        let t = Tensor::<B::InnerBackend, 1>::from_floats([value as f32], device);
        Ok(self.sum_tensor(t)?.into_scalar().elem::<f64>())
    }

    /// The element-wise sum over all peers of `t` (same shape on every peer); an all-gather
    /// when each peer fills only its own rows of a zeroed tensor.
    pub fn sum_tensor<B: Backend, const D: usize>(
        &self,
        t: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, ParallelError> {
        if self.devices == 1 {
            return Ok(t);
        }
        let summed = collective::all_reduce::<B>(
            self.id(),
            t.into_primitive().tensor(),
            ReduceOperation::Sum,
        )
        .map_err(|e| self.failed(e))?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(summed)))
    }
}

struct SumGradients<'a, B: AutodiffBackend> {
    peer: PeerId,
    grads: &'a mut GradientsParams,
    error: Option<CollectiveError>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SumGradients<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.error.is_some() {
            return;
        }
        // A parameter without a gradient (frozen, or unused by this loss) has none on any peer:
        // the peers run the same graph.
        let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) else {
            return;
        };
        match collective::all_reduce::<B::InnerBackend>(
            self.peer,
            grad.into_primitive().tensor(),
            ReduceOperation::Sum,
        ) {
            Ok(sum) => self.grads.register::<B::InnerBackend, D>(
                param.id,
                Tensor::from_primitive(TensorPrimitive::Float(sum)),
            ),
            Err(e) => self.error = Some(e),
        }
    }
}

/// One data-parallel group at a time per process: Burn's collective server is process-wide.
static GROUP: Mutex<()> = Mutex::new(());

/// Runs `body` on one peer per entry of `devices`, each on its own thread and device, and
/// returns the leader's result. With one device `body` runs here, with no collective set-up.
/// When a peer fails, the collective is reset so that the others, waiting on it, stop too, and
/// that peer's own error (not the others' consequent collective errors) is returned.
pub fn run_peers<B, T, F>(devices: &[B::Device], body: F) -> anyhow::Result<T>
where
    B: AutodiffBackend,
    T: Send,
    F: Fn(Peer, &B::Device) -> anyhow::Result<T> + Sync,
{
    let n = devices.len();
    match devices {
        [] => return Err(ParallelError::NoDevices.into()),
        [device] => return body(Peer::ALONE, device),
        _ => {}
    }
    let _group = GROUP.lock().unwrap_or_else(|p| p.into_inner());
    collective::reset_collective::<B::InnerBackend>();
    // A binary tree sums the peers' gradients in a fixed pairing.
    let config = CollectiveConfig::default()
        .with_num_devices(n)
        .with_local_all_reduce_strategy(AllReduceStrategy::Tree(2));
    let mut results: Vec<anyhow::Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(rank, device)| {
                let peer = Peer { rank, devices: n };
                let (body, config) = (&body, config.clone());
                s.spawn(move || -> anyhow::Result<T> {
                    collective::register::<B::InnerBackend>(peer.id(), device.clone(), config)
                        .map_err(|e| peer.failed(e))?;
                    // A panic is caught here, not at the join: the others must be released
                    // now, and the leader, joined first, may be waiting on this peer.
                    let out = std::panic::catch_unwind(AssertUnwindSafe(|| body(peer, device)))
                        .unwrap_or_else(|panic| {
                            Err(ParallelError::Panicked {
                                rank,
                                devices: n,
                                detail: panic_text(&panic),
                            }
                            .into())
                        });
                    match &out {
                        Err(_) => collective::reset_collective::<B::InnerBackend>(),
                        Ok(_) => collective::finish_collective::<B::InnerBackend>(peer.id())
                            .map_err(|e| peer.failed(e))?,
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|panic| {
                    collective::reset_collective::<B::InnerBackend>();
                    Err(ParallelError::Panicked {
                        rank,
                        devices: n,
                        detail: panic_text(&panic),
                    }
                    .into())
                })
            })
            .collect()
    });
    // A peer's own failure explains the others' collective errors: report it first.
    let consequent = |r: &anyhow::Result<T>| {
        matches!(
            r.as_ref()
                .err()
                .and_then(|e| e.downcast_ref::<ParallelError>()),
            Some(ParallelError::Collective { .. })
        )
    };
    let failed = results
        .iter()
        .position(|r| r.is_err() && !consequent(r))
        .or_else(|| results.iter().position(|r| r.is_err()));
    match failed {
        Some(rank) => results
            .swap_remove(rank)
            .map_err(|e| e.context(format!("data-parallel peer {rank} of {n}"))),
        None => results.swap_remove(0),
    }
}

/// The message of a caught panic.
pub(crate) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}
