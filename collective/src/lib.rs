//! Collectives over tch tensors for data-parallel ranks: all-reduce, broadcast, all-gather,
//! reduce-scatter and barrier behind one [`Collective`] trait, with two backends:
//!
//! * [`TcpCollective`]: CPU tensors (or any tensor, staged through host memory) over TCP, a star
//!   through rank 0. Rank 0 reduces the contributions in rank order, so results are bit-identical
//!   on every rank and from run to run. Every wait is bounded by [`CollectiveOptions::timeout`];
//!   a peer that exits turns into an error on every other rank, never a hang.
//! * [`NcclCollective`]: CUDA tensors through NCCL (cudarc's bindings, `libnccl.so.2` loaded at
//!   run time, so every build links and runs without CUDA). Not run on a GPU yet.
//!
//! Ranks find each other through [`RankConfig`] (the usual `RANK` / `WORLD_SIZE` /
//! `MASTER_ADDR` / `MASTER_PORT` variables, or given explicitly); [`local_group`] gives R
//! connected ranks inside one process, one per thread. [`verify_same_config`] checks at start-up
//! that every rank runs the same recipe and model config, and [`average_gradients`] averages the
//! gradients of a parameter list in a few flattened buckets (the data-parallel step).

mod agree;
mod bucket;
mod error;
mod nccl;
mod rank;
mod tcp;
mod wire;

pub use agree::{config_digest, verify_same_config};
pub use bucket::{
    all_reduce_tensors, average_gradients, average_gradients_with, plan_buckets, Bucket,
    DEFAULT_BUCKET_BYTES,
};
pub use error::{CollectiveError, Result};
pub use nccl::{nccl_available, nccl_version, NcclCollective};
pub use rank::{CollectiveOptions, RankConfig, DEFAULT_MASTER_PORT};
pub use tcp::TcpCollective;

use tch::{Device, Tensor};

/// How [`Collective::all_reduce_`] and [`Collective::reduce_scatter`] combine the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the world size (floating-point tensors only).
    Mean,
}

/// Which transport a [`Collective`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Host memory over TCP ([`TcpCollective`]).
    Tcp,
    /// NCCL on CUDA devices ([`NcclCollective`]).
    Nccl,
}

impl Backend {
    /// The backend for tensors on `device`: TCP for the CPU, NCCL for CUDA. Asking for a CUDA
    /// device that libtorch cannot see, or NCCL when `libnccl.so.2` cannot be loaded, is an error
    /// that says so (rather than a crash or a silent fallback to the CPU).
    pub fn for_device(device: Device) -> Result<Backend> {
        match device {
            Device::Cpu => Ok(Backend::Tcp),
            Device::Cuda(index) => {
                nccl::check_cuda_device(index)?;
                Ok(Backend::Nccl)
            }
            other => Err(CollectiveError::Unavailable(format!(
                "no collective backend for device {other:?} (CPU and CUDA are supported)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Tcp => "tcp",
            Backend::Nccl => "nccl",
        }
    }
}

/// Collective operations among `world_size()` ranks. Every rank must call the same operations in
/// the same order with tensors of the same shape and kind; a rank that does not (or that exits)
/// makes the others fail with an error naming it, after at most [`CollectiveOptions::timeout`].
/// An error leaves the collective unusable: later calls return [`CollectiveError::Broken`].
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    fn backend(&self) -> Backend;

    /// Replaces `tensor` on every rank by the element-wise sum (or mean) over the ranks.
    fn all_reduce_(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()>;

    /// Replaces `tensor` on every rank by rank `root`'s value.
    fn broadcast_(&mut self, tensor: &mut Tensor, root: usize) -> Result<()>;

    /// Every rank's `tensor`, in rank order (each of the shape and kind of `tensor`, on its device).
    fn all_gather(&mut self, tensor: &Tensor) -> Result<Vec<Tensor>>;

    /// Reduces `input` over the ranks and returns this rank's shard of the result: rows
    /// `rank * n / R .. (rank + 1) * n / R` of dimension 0 (`n`, the size of dimension 0, must be
    /// a multiple of the world size R).
    fn reduce_scatter(&mut self, input: &Tensor, op: ReduceOp) -> Result<Tensor>;

    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;

    /// Every rank's `bytes`, in rank order (lengths may differ): small control messages such as
    /// the config digest of [`verify_same_config`], which travel through host memory on every
    /// backend.
    fn all_gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
}

/// Connects this process's rank of the group described by `config`, with the backend for
/// `device` ([`Backend::for_device`]). Blocks until every rank has joined, at most
/// `options.connect_timeout`.
pub fn connect(
    config: &RankConfig,
    device: Device,
    options: &CollectiveOptions,
) -> Result<Box<dyn Collective>> {
    match Backend::for_device(device)? {
        Backend::Tcp => Ok(Box::new(TcpCollective::connect(config, options)?)),
        Backend::Nccl => {
            let Device::Cuda(index) = device else {
                unreachable!("for_device gives NCCL only for CUDA devices")
            };
            Ok(Box::new(NcclCollective::connect(config, index, options)?))
        }
    }
}

/// `devices.len()` connected ranks inside this process, rank `i` for `devices[i]`, to be moved
/// into one thread each: TCP over 127.0.0.1 when every device is the CPU, NCCL when every device
/// is a distinct CUDA device. (Mixed lists are an error.)
pub fn local_group(
    devices: &[Device],
    options: &CollectiveOptions,
) -> Result<Vec<Box<dyn Collective>>> {
    if devices.is_empty() {
        return Err(CollectiveError::InvalidConfig(
            "a local group needs at least one device".into(),
        ));
    }
    let backends = devices
        .iter()
        .map(|&d| Backend::for_device(d))
        .collect::<Result<Vec<_>>>()?;
    if backends.iter().all(|&b| b == Backend::Tcp) {
        return Ok(TcpCollective::local_group(devices.len(), options)?
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Collective>)
            .collect());
    }
    let cuda: Vec<usize> = devices
        .iter()
        .filter_map(|d| match d {
            Device::Cuda(i) => Some(*i),
            _ => None,
        })
        .collect();
    if cuda.len() != devices.len() {
        return Err(CollectiveError::InvalidConfig(format!(
            "a local group needs all-CPU or all-CUDA devices, got {devices:?}"
        )));
    }
    Ok(NcclCollective::local_group(&cuda, options)?
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Collective>)
        .collect())
}
