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
//! process-wide lock). Or they are processes, one device each, possibly on other machines
//! (`--peers`, `--rank`): see [`net`].

mod net;
pub use net::{NetGroup, NetworkSpec, DEFAULT_PEER_TIMEOUT};

use std::fs::{File, OpenOptions};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::collective::{
    self, AllReduceStrategy, CollectiveConfig, CollectiveError, PeerId, ReduceOperation,
};
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData, TensorPrimitive};
use duet_run::METRICS_FILE;
use sha2::{Digest, Sha256};
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
    #[error("peer {rank} of {devices}: its thread pool could not start ({detail})")]
    Pool {
        rank: usize,
        devices: usize,
        detail: String,
    },
    #[error("--peers {address}: {detail}")]
    Address { address: String, detail: String },
    #[error("rank 0 at {address} could not be reached within {seconds:.0} s (is it started, and listening there?)")]
    Unreachable { address: String, seconds: f64 },
    #[error("rank(s) {ranks:?} did not join within {seconds:.0} s (are they started, with the same --peers?)")]
    Missing { ranks: Vec<usize>, seconds: f64 },
    #[error("rank {rank} disagrees with rank 0 on the {what}: every peer must run the same command on the same data")]
    Disagree { rank: usize, what: &'static str },
    #[error("bad peer group: {0}")]
    BadPeers(String),
    #[error("lost rank {rank}: {detail}")]
    PeerLost { rank: usize, detail: String },
    #[error(
        "--peers runs one device per process: drop --devices, or start one process per device"
    )]
    PeersWithDevices,
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

/// One member of a data-parallel group: its rank, the group's size and, in a multi-process
/// group, its connections to the other processes.
#[derive(Clone)]
pub struct Peer {
    rank: usize,
    devices: usize,
    net: Option<Arc<Mutex<NetGroup>>>,
}

impl Peer {
    /// Training on one device: no collective operations at all.
    pub const ALONE: Peer = Peer {
        rank: 0,
        devices: 1,
        net: None,
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
        &batch[self.shard_range(batch.len())]
    }

    /// The rows of a global batch of `len` that are this peer's.
    pub fn shard_range(&self, len: usize) -> std::ops::Range<usize> {
        let n = len / self.devices;
        self.rank * n..(self.rank + 1) * n
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
        if let Some(net) = &self.net {
            return sum_gradients_over(net, module, grads);
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
        if let Some(net) = &self.net {
            let device = t.device();
            let shape = t.shape();
            let mut values = host_values(t.into_data());
            lock(net).sum(&mut values)?;
            return Ok(Tensor::from_data(TensorData::new(values, shape), &device));
        }
        let summed = collective::all_reduce::<B>(
            self.id(),
            t.into_primitive().tensor(),
            ReduceOperation::Sum,
        )
        .map_err(|e| self.failed(e))?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(summed)))
    }

    /// Checks that every peer starts from the same weights of `model` at the same `step`
    /// (peers in other processes build or load their own; threads of one process cannot
    /// differ, and skip the hashing).
    pub fn agree_on_start<B: Backend, M: burn::module::Module<B>>(
        &self,
        model: &M,
        step: usize,
    ) -> Result<(), ParallelError> {
        if self.net.is_none() {
            return Ok(());
        }
        self.agree(
            "initial weights and step (resume every peer from the same run)",
            digest_of(&[&weights_digest(model), &(step as u64).to_le_bytes()]),
        )
    }

    /// Checks that every peer holds the same `digest` of `what` (e.g. its initial weights):
    /// peers in other processes load their own copies; threads of one process share them.
    pub fn agree(&self, what: &'static str, digest: [u8; 32]) -> Result<(), ParallelError> {
        match &self.net {
            Some(net) => lock(net).agree(what, digest),
            None => Ok(()),
        }
    }
}

fn lock(net: &Mutex<NetGroup>) -> std::sync::MutexGuard<'_, NetGroup> {
    net.lock().unwrap_or_else(|p| p.into_inner())
}

/// A tensor's values as f32 on the host (the wire format of [`NetGroup::sum`]).
fn host_values(data: TensorData) -> Vec<f32> {
    data.convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32 just above")
}

/// [`Peer::sum_gradients`] across processes: every gradient, in module order, in one buffer
/// and one round trip (a round trip per parameter would cost a network latency each).
fn sum_gradients_over<B: AutodiffBackend, M: AutodiffModule<B>>(
    net: &Mutex<NetGroup>,
    module: &M,
    mut grads: GradientsParams,
) -> Result<GradientsParams, ParallelError> {
    /// Puts a summed gradient back: built where the parameter's rank `D` is known.
    type Restore = Box<dyn FnOnce(&mut GradientsParams, &[f32])>;
    struct Take<'a, B: AutodiffBackend> {
        grads: &'a mut GradientsParams,
        taken: Vec<(usize, Restore)>,
        values: Vec<f32>,
        _backend: std::marker::PhantomData<B>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Take<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            // A parameter without a gradient (frozen, or unused by this loss) has none on any
            // peer: the peers run the same graph.
            let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) else {
                return;
            };
            let (id, shape, device) = (param.id, grad.shape(), grad.device());
            let n = shape.num_elements();
            self.values.extend(host_values(grad.into_data()));
            let restore: Restore = Box::new(move |grads, values| {
                let data = TensorData::new(values.to_vec(), shape);
                grads.register(id, Tensor::<B::InnerBackend, D>::from_data(data, &device));
            });
            self.taken.push((n, restore));
        }
    }
    let mut take = Take::<B> {
        grads: &mut grads,
        taken: Vec::new(),
        values: Vec::new(),
        _backend: std::marker::PhantomData,
    };
    module.visit(&mut take);
    let (taken, mut values) = (take.taken, take.values);
    lock(net).sum(&mut values)?;
    let mut at = 0;
    for (n, restore) in taken {
        restore(&mut grads, &values[at..at + n]);
        at += n;
    }
    Ok(grads)
}

/// A digest of a module's parameter values, in module order (to check that peers in other
/// processes start from the same weights).
pub fn weights_digest<B: Backend, M: burn::module::Module<B>>(module: &M) -> [u8; 32] {
    struct Hash(Sha256);
    impl<B: Backend> ModuleVisitor<B> for Hash {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let data = param.val().into_data();
            self.0.update(format!("{:?}", data.shape).as_bytes());
            self.0.update(data.as_bytes());
        }
    }
    let mut hash = Hash(Sha256::new());
    module.visit(&mut hash);
    hash.0.finalize().into()
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
    // Each peer runs on a rayon pool of its own, of one thread, so burn-ndarray's parallel loops
    // (batched products, convolutions) run inline on the peer's thread instead of queueing on
    // the global pool behind the other peers' while the peers' own threads wait (a `small`
    // caption step on two CPU peers: 0.98 s, 0.95 with these pools, 0.70 with one thread per
    // product as well: `crate::cpu::single_thread_products_for_peers`, docs/TRAINING.md).
    // Built before any peer starts: a peer that failed after the others began to register
    // would leave them waiting for it forever.
    let pools = (0..n)
        .map(|rank| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(move |_| format!("duet-peer-{rank}"))
                .build()
                .map_err(|e| ParallelError::Pool {
                    rank,
                    devices: n,
                    detail: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut results: Vec<anyhow::Result<T>> = std::thread::scope(|s| {
        let handles: Vec<_> = devices
            .iter()
            .zip(pools)
            .enumerate()
            .map(|(rank, (device, pool))| {
                let peer = Peer {
                    rank,
                    devices: n,
                    net: None,
                };
                let (body, config) = (&body, config.clone());
                s.spawn(move || -> anyhow::Result<T> {
                    pool.install(|| -> anyhow::Result<T> {
                        collective::register::<B::InnerBackend>(peer.id(), device.clone(), config)
                            .map_err(|e| peer.failed(e))?;
                        // A panic is caught here, not at the join: the others must be released
                        // now, and the leader, joined first, may be waiting on this peer.
                        let out = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            body(peer.clone(), device)
                        }))
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

/// The size of a run's data-parallel group: `devices` threads here, or the processes of
/// `network` (one device each).
pub fn group_size(devices: usize, network: Option<&NetworkSpec>) -> Result<usize, ParallelError> {
    match network {
        None => Ok(devices),
        Some(_) if devices != 1 => Err(ParallelError::PeersWithDevices),
        Some(spec) => Ok(spec.peers.len()),
    }
}

/// Whether this process writes the run's files: every single-process run, and rank 0 of a
/// multi-process one (the others read the run folder only to resume).
pub fn writes_run(network: Option<&NetworkSpec>) -> bool {
    network.is_none_or(|spec| spec.rank == 0)
}

/// The peers a run trains with, joined: threads of this process over `devices` (see
/// [`run_peers`]), or this process as one rank of a multi-process group.
pub enum Group<'a, B: AutodiffBackend> {
    Threads(&'a [B::Device]),
    Process { peer: Peer, device: &'a B::Device },
}

impl<'a, B: AutodiffBackend> Group<'a, B> {
    /// The threads over `devices`, or, with `network`, this process's place in its group once
    /// every rank has joined and agreed on `digest()` (the configuration and data it trains
    /// on). Called before the run writes anything, so a missing or disagreeing peer leaves
    /// nothing behind.
    pub fn join(
        devices: &'a [B::Device],
        network: Option<&NetworkSpec>,
        digest: impl FnOnce() -> anyhow::Result<[u8; 32]>,
    ) -> anyhow::Result<Self> {
        let Some(spec) = network else {
            return Ok(Group::Threads(devices));
        };
        let [device] = devices else {
            return Err(ParallelError::PeersWithDevices.into());
        };
        let group = NetGroup::connect(spec, digest()?)?;
        let peer = Peer {
            rank: group.rank(),
            devices: group.world(),
            net: Some(Arc::new(Mutex::new(group))),
        };
        Ok(Group::Process { peer, device })
    }

    /// Runs `body` on every peer of this process and returns the leader's result (or this
    /// rank's).
    pub fn run<T, F>(self, body: F) -> anyhow::Result<T>
    where
        T: Send,
        F: Fn(Peer, &B::Device) -> anyhow::Result<T> + Sync,
    {
        match self {
            Group::Threads(devices) => run_peers::<B, T, F>(devices, body),
            Group::Process { peer, device } => {
                let (rank, world) = (peer.rank, peer.devices);
                body(peer, device)
                    .map_err(|e| e.context(format!("data-parallel rank {rank} of {world}")))
            }
        }
    }
}

/// Adds to a lost peer's error what a run that checkpoints can do about it.
pub fn with_resume_hint(e: anyhow::Error) -> anyhow::Error {
    let lost = e
        .chain()
        .any(|c| matches!(c.downcast_ref(), Some(ParallelError::PeerLost { .. })));
    if lost {
        e.context(
            "a peer was lost: the last checkpoint stays valid; rerun every peer with --resume",
        )
    } else {
        e
    }
}

/// Fields of a run's configuration that may differ between peers training the same thing:
/// where each keeps its files (folders, the run it starts from, a reused tokenizer's path),
/// which device it names, and its command line.
const LOCAL_FIELDS: &[&str] = &[
    "device",
    "command",
    "init",
    "init_from",
    "data",
    "dir",
    "path",
];

/// A run's configuration as the peers of a group compare it ([`Group::join`]'s digest): its
/// JSON without [`LOCAL_FIELDS`], at any depth.
pub fn settings_bytes(config: &impl serde::Serialize) -> anyhow::Result<Vec<u8>> {
    fn strip(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(fields) => {
                for key in LOCAL_FIELDS {
                    fields.remove(*key);
                }
                fields.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(config)?;
    strip(&mut value);
    Ok(serde_json::to_vec(&value)?)
}

/// A digest of what a run trains on, for [`Group::join`]: every part in order, each
/// length-prefixed so that no two different lists hash alike.
pub fn digest_of(parts: &[&[u8]]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    hash.finalize().into()
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

#[cfg(test)]
mod tests {
    use super::settings_bytes;
    use serde_json::json;

    /// Peers keep their files in different places and name different devices; everything else
    /// they must agree on, at any depth of the configuration.
    #[test]
    fn settings_leave_out_paths_devices_and_command_lines_only() {
        let config = |root: &str, device: &str, lr: f64, steps: u32, sha: &str| {
            json!({
                "lr": lr, "device": device, "command": format!("duet-train --out {root}"),
                "run": {"data": [format!("{root}/data")], "init": format!("{root}/gen"), "steps": steps},
                "task": {"dir": format!("{root}/labelled"), "classes": 4},
                "tokenizer": {"from": "reused", "path": format!("{root}/tok.json"), "sha256": sha},
            })
        };
        let bytes = |v: serde_json::Value| settings_bytes(&v).unwrap();
        let here = bytes(config("/a", "cpu", 0.1, 3, "ab"));
        assert_eq!(here, bytes(config("/mnt/b", "cuda:1", 0.1, 3, "ab")));
        assert_ne!(here, bytes(config("/a", "cpu", 0.2, 3, "ab")));
        assert_ne!(here, bytes(config("/a", "cpu", 0.1, 4, "ab")));
        assert_ne!(here, bytes(config("/a", "cpu", 0.1, 3, "cd")));
    }
}
