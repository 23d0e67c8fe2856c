//! The CUDA backend: NCCL through cudarc's bindings. `libnccl.so.2` and `libcudart.so.13` are
//! loaded at run time (dlopen; the CUDA libtorch of `scripts/setup-libtorch.sh` ships both next
//! to libtorch_cuda and already has them loaded), so this code is compiled into every build and
//! only refuses, with an error, where there is no GPU.
//!
//! Operations are enqueued on the device's default (legacy) stream, the one libtorch computes on
//! unless a caller installs another, so they are ordered after the kernels that produced their
//! inputs and before those that consume their outputs. Each call then waits for its operation to
//! finish, polling NCCL's asynchronous error state, and aborts the communicator after
//! [`CollectiveOptions::timeout`], so a dead peer is an error rather than a hang.
//!
//! Not run on a GPU yet: the bucketing, config check and control traffic it shares with the TCP
//! backend are tested on CPU; the NCCL calls themselves are not.

use std::ffi::CStr;
use std::time::{Duration, Instant};

use cudarc::nccl::sys as nccl;
use cudarc::runtime::sys as cudart;
use tch::{Device, Kind, Tensor};

use crate::error::{CollectiveError, Result};
use crate::rank::{CollectiveOptions, RankConfig};
use crate::tcp::{shard_shape, TcpCollective};
use crate::wire::{check_reduce, kind_code};
use crate::{Backend, Collective, ReduceOp};

/// How often a waiting call checks whether its NCCL operation finished.
const POLL_INTERVAL: Duration = Duration::from_micros(50);

/// Whether NCCL and the CUDA runtime can be loaded in this process.
pub fn nccl_available() -> bool {
    // SAFETY: these only try to dlopen the libraries by name.
    unsafe { nccl::is_culib_present() && cudart::is_culib_present() }
}

/// The version of the NCCL library this process loads, as (major, minor, patch), or `None`
/// when it cannot be loaded. Needs no GPU.
pub fn nccl_version() -> Option<(u32, u32, u32)> {
    if !nccl_available() {
        return None;
    }
    let code = cudarc::nccl::result::get_nccl_version().ok()? as u32;
    // NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch.
    Some((code / 10000, code / 100 % 100, code % 100))
}

/// Checks that libtorch sees CUDA device `index` and that NCCL can be loaded.
pub(crate) fn check_cuda_device(index: usize) -> Result<()> {
    if !tch::Cuda::is_available() {
        return Err(CollectiveError::Unavailable(format!(
            "CUDA device {index} requested but libtorch sees no CUDA device (no GPU or driver on \
             this machine, or a CPU-only libtorch: build the CUDA one with ATOLL_CUDA=1 \
             scripts/setup-libtorch.sh)"
        )));
    }
    let count = tch::Cuda::device_count() as usize;
    if index >= count {
        return Err(CollectiveError::Unavailable(format!(
            "CUDA device {index} requested but libtorch sees {count} device(s) (0..{})",
            count.saturating_sub(1)
        )));
    }
    if !nccl_available() {
        return Err(CollectiveError::Unavailable(
            "NCCL is needed for collectives on CUDA but libnccl.so.2 (or libcudart.so.13) cannot \
             be loaded; the CUDA libtorch of scripts/setup-libtorch.sh ships it"
                .into(),
        ));
    }
    Ok(())
}

fn nccl_type(kind: Kind) -> Result<nccl::ncclDataType_t> {
    kind_code(kind)?;
    Ok(match kind {
        Kind::Uint8 => nccl::ncclDataType_t::ncclUint8,
        Kind::Int8 => nccl::ncclDataType_t::ncclInt8,
        Kind::Int => nccl::ncclDataType_t::ncclInt32,
        Kind::Int64 => nccl::ncclDataType_t::ncclInt64,
        Kind::Half => nccl::ncclDataType_t::ncclFloat16,
        Kind::BFloat16 => nccl::ncclDataType_t::ncclBfloat16,
        Kind::Float => nccl::ncclDataType_t::ncclFloat32,
        Kind::Double => nccl::ncclDataType_t::ncclFloat64,
        other => unreachable!("kind_code accepted {other:?}"),
    })
}

fn nccl_op(op: ReduceOp) -> nccl::ncclRedOp_t {
    match op {
        ReduceOp::Sum => nccl::ncclRedOp_t::ncclSum,
        ReduceOp::Mean => nccl::ncclRedOp_t::ncclAvg,
    }
}

fn nccl_message(result: nccl::ncclResult_t) -> String {
    // SAFETY: NCCL returns a static NUL-terminated string for every result code.
    unsafe {
        let s = nccl::ncclGetErrorString(result);
        if s.is_null() {
            format!("{result:?}")
        } else {
            format!("{result:?}: {}", CStr::from_ptr(s).to_string_lossy())
        }
    }
}

fn check_nccl(op: &'static str, result: nccl::ncclResult_t) -> Result<()> {
    match result {
        nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress => Ok(()),
        other => Err(CollectiveError::Nccl {
            op,
            detail: nccl_message(other),
        }),
    }
}

fn set_device(index: usize) -> Result<()> {
    // SAFETY: plain runtime call on an index libtorch reported as present.
    let status = unsafe { cudart::cudaSetDevice(index as i32) };
    if status != cudart::cudaError_t::cudaSuccess {
        return Err(CollectiveError::Unavailable(format!(
            "cudaSetDevice({index}) failed: {status:?}"
        )));
    }
    Ok(())
}

/// The default stream of the current device, as NCCL and the runtime each spell it.
fn nccl_stream() -> nccl::cudaStream_t {
    std::ptr::null_mut()
}

pub struct NcclCollective {
    rank: usize,
    world_size: usize,
    device: usize,
    comm: nccl::ncclComm_t,
    /// Host traffic (the NCCL id at start-up, byte gathers, barriers).
    control: TcpCollective,
    timeout: Duration,
    broken: Option<String>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap, which `&mut self` on every operation guarantees.
unsafe impl Send for NcclCollective {}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("device", &self.device)
            .finish()
    }
}

impl NcclCollective {
    /// Joins the group of `config` on CUDA device `device`: the TCP rendezvous forms the group,
    /// rank 0's NCCL id travels over it, then every rank initializes its communicator.
    pub fn connect(
        config: &RankConfig,
        device: usize,
        options: &CollectiveOptions,
    ) -> Result<Self> {
        check_cuda_device(device)?;
        let mut control = TcpCollective::connect(config, options)?;
        let id = if config.rank == 0 {
            let id = cudarc::nccl::result::get_uniqueid().map_err(|e| CollectiveError::Nccl {
                op: "ncclGetUniqueId",
                detail: nccl_message(e.0),
            })?;
            id.internal.iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let ids = control.all_gather_bytes(&id)?;
        let mut unique = nccl::ncclUniqueId { internal: [0; 128] };
        if ids[0].len() != unique.internal.len() {
            return Err(CollectiveError::Mismatch {
                op: "NCCL start-up",
                detail: format!("rank 0 sent an NCCL id of {} bytes", ids[0].len()),
            });
        }
        for (dst, src) in unique.internal.iter_mut().zip(&ids[0]) {
            *dst = *src as std::ffi::c_char;
        }
        set_device(device)?;
        let mut comm: nccl::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id came from rank 0's ncclGetUniqueId.
        check_nccl("ncclCommInitRank", unsafe {
            nccl::ncclCommInitRank(
                &mut comm,
                config.world_size as i32,
                unique,
                config.rank as i32,
            )
        })?;
        tracing::info!(
            rank = config.rank,
            world_size = config.world_size,
            device,
            "NCCL communicator ready"
        );
        Ok(NcclCollective {
            rank: config.rank,
            world_size: config.world_size,
            device,
            comm,
            control,
            timeout: options.timeout,
            broken: None,
        })
    }

    /// One rank per CUDA device in `devices` (distinct), inside this process.
    pub fn local_group(devices: &[usize], options: &CollectiveOptions) -> Result<Vec<Self>> {
        for (i, d) in devices.iter().enumerate() {
            check_cuda_device(*d)?;
            if devices[..i].contains(d) {
                return Err(CollectiveError::InvalidConfig(format!(
                    "CUDA device {d} is listed twice; each rank needs its own GPU"
                )));
            }
        }
        let controls = TcpCollective::local_group(devices.len(), options)?;
        let mut comms: Vec<nccl::ncclComm_t> = vec![std::ptr::null_mut(); devices.len()];
        let list: Vec<i32> = devices.iter().map(|&d| d as i32).collect();
        // SAFETY: `comms` has one slot per device of `list`.
        check_nccl("ncclCommInitAll", unsafe {
            nccl::ncclCommInitAll(comms.as_mut_ptr(), list.len() as i32, list.as_ptr())
        })?;
        Ok(controls
            .into_iter()
            .zip(comms)
            .zip(devices)
            .enumerate()
            .map(|(rank, ((control, comm), &device))| NcclCollective {
                rank,
                world_size: devices.len(),
                device,
                comm,
                control,
                timeout: options.timeout,
                broken: None,
            })
            .collect())
    }

    pub fn device(&self) -> Device {
        Device::Cuda(self.device)
    }

    fn check_tensor(&self, tensor: &Tensor) -> Result<nccl::ncclDataType_t> {
        if tensor.device() != Device::Cuda(self.device) {
            return Err(CollectiveError::InvalidTensor(format!(
                "rank {} runs NCCL on cuda:{} but got a tensor on {:?}",
                self.rank,
                self.device,
                tensor.device()
            )));
        }
        nccl_type(tensor.f_kind()?)
    }

    /// Enqueues one NCCL operation and waits, bounded, for it to finish.
    fn run(
        &mut self,
        op: &'static str,
        enqueue: impl FnOnce(nccl::ncclComm_t) -> nccl::ncclResult_t,
    ) -> Result<()> {
        if let Some(reason) = &self.broken {
            return Err(CollectiveError::Broken(reason.clone()));
        }
        let result = set_device(self.device)
            .and_then(|_| check_nccl(op, enqueue(self.comm)))
            .and_then(|_| self.wait(op));
        result.inspect_err(|e| {
            // SAFETY: aborting a communicator that failed; later calls see `broken`.
            unsafe {
                nccl::ncclCommAbort(self.comm);
            }
            self.comm = std::ptr::null_mut();
            self.broken = Some(e.to_string());
        })
    }

    fn wait(&self, op: &'static str) -> Result<()> {
        let started = Instant::now();
        loop {
            // SAFETY: querying the current device's default stream.
            let status = unsafe { cudart::cudaStreamQuery(std::ptr::null_mut()) };
            match status {
                cudart::cudaError_t::cudaSuccess => return Ok(()),
                cudart::cudaError_t::cudaErrorNotReady => {}
                other => {
                    return Err(CollectiveError::Nccl {
                        op,
                        detail: format!("the CUDA stream failed: {other:?}"),
                    })
                }
            }
            let mut async_error = nccl::ncclResult_t::ncclSuccess;
            // SAFETY: `self.comm` is a live communicator; `async_error` is a valid out-pointer.
            check_nccl(op, unsafe {
                nccl::ncclCommGetAsyncError(self.comm, &mut async_error)
            })?;
            if async_error != nccl::ncclResult_t::ncclSuccess
                && async_error != nccl::ncclResult_t::ncclInProgress
            {
                return Err(CollectiveError::Nccl {
                    op,
                    detail: format!("a peer failed: {}", nccl_message(async_error)),
                });
            }
            if started.elapsed() > self.timeout {
                return Err(CollectiveError::Nccl {
                    op,
                    detail: format!(
                        "rank {} did not complete it within {:.1} s (a peer is gone or stuck); the \
                         communicator was aborted",
                        self.rank,
                        self.timeout.as_secs_f64()
                    ),
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: the communicator is live and no operation is in flight (`&mut self`).
            unsafe {
                nccl::ncclCommDestroy(self.comm);
            }
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn backend(&self) -> Backend {
        Backend::Nccl
    }

    fn all_reduce_(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        let dtype = self.check_tensor(tensor)?;
        check_reduce(tensor.f_kind()?, op)?;
        let contiguous = tensor.is_contiguous();
        let work = if contiguous {
            tensor.shallow_clone()
        } else {
            tensor.f_contiguous()?
        };
        let (ptr, count) = (work.data_ptr(), work.numel());
        self.run("all_reduce", |comm| unsafe {
            // SAFETY: in-place on a live, contiguous device buffer of `count` elements.
            nccl::ncclAllReduce(ptr, ptr, count, dtype, nccl_op(op), comm, nccl_stream())
        })?;
        if !contiguous {
            tch::no_grad(|| tensor.f_copy_(&work))?;
        }
        Ok(())
    }

    fn broadcast_(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(CollectiveError::InvalidConfig(format!(
                "broadcast from rank {root} in a group of {}",
                self.world_size
            )));
        }
        let dtype = self.check_tensor(tensor)?;
        let contiguous = tensor.is_contiguous();
        let work = if contiguous {
            tensor.shallow_clone()
        } else {
            tensor.f_contiguous()?
        };
        let (ptr, count) = (work.data_ptr(), work.numel());
        self.run("broadcast", |comm| unsafe {
            // SAFETY: in-place on a live, contiguous device buffer of `count` elements.
            nccl::ncclBroadcast(ptr, ptr, count, dtype, root as i32, comm, nccl_stream())
        })?;
        if !contiguous {
            tch::no_grad(|| tensor.f_copy_(&work))?;
        }
        Ok(())
    }

    fn all_gather(&mut self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        let dtype = self.check_tensor(tensor)?;
        let input = tensor.f_contiguous()?;
        let count = input.numel();
        let output = Tensor::f_empty(
            [(count * self.world_size) as i64],
            (input.f_kind()?, self.device()),
        )?;
        let (send, recv) = (input.data_ptr(), output.data_ptr());
        self.run("all_gather", |comm| unsafe {
            // SAFETY: `recv` holds world_size * count elements of `send`'s kind.
            nccl::ncclAllGather(send, recv, count, dtype, comm, nccl_stream())
        })?;
        let shape = tensor.size();
        (0..self.world_size)
            .map(|r| {
                Ok(output
                    .f_narrow(0, (r * count) as i64, count as i64)?
                    .f_reshape(shape.as_slice())?)
            })
            .collect()
    }

    fn reduce_scatter(&mut self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let dtype = self.check_tensor(input)?;
        check_reduce(input.f_kind()?, op)?;
        let shard = shard_shape(&input.size(), self.world_size)?;
        let input = input.f_contiguous()?;
        let output = Tensor::f_empty(shard.as_slice(), (input.f_kind()?, self.device()))?;
        let (send, recv, count) = (input.data_ptr(), output.data_ptr(), output.numel());
        self.run("reduce_scatter", |comm| unsafe {
            // SAFETY: `send` holds world_size * count elements, `recv` count.
            nccl::ncclReduceScatter(send, recv, count, dtype, nccl_op(op), comm, nccl_stream())
        })?;
        Ok(output)
    }

    fn barrier(&mut self) -> Result<()> {
        self.control.barrier()
    }

    fn all_gather_bytes(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.control.all_gather_bytes(bytes)
    }
}
