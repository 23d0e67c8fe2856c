//! What travels between ranks of the TCP backend: length-prefixed frames, the header that
//! describes each contribution (so rank 0 can check that every rank called the same operation
//! with the same tensor), and the host-side conversions and reductions.

use std::io::{Read, Write};

use tch::{Device, Kind, Tensor};

use crate::error::{CollectiveError, Result};
use crate::ReduceOp;

pub(crate) const MAGIC: &[u8; 8] = b"ATOLLCL1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum FrameTag {
    Hello = 1,
    Welcome = 2,
    Contribution = 3,
    Reply = 4,
    Error = 5,
}

impl FrameTag {
    fn from_u8(v: u8) -> Option<FrameTag> {
        Some(match v {
            1 => FrameTag::Hello,
            2 => FrameTag::Welcome,
            3 => FrameTag::Contribution,
            4 => FrameTag::Reply,
            5 => FrameTag::Error,
            _ => return None,
        })
    }
}

/// The largest frame accepted: a corrupt or foreign length prefix must not make a rank try to
/// allocate terabytes.
const MAX_FRAME_BYTES: u64 = 1 << 40;

pub(crate) fn write_frame(
    w: &mut impl Write,
    tag: FrameTag,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut header = [0u8; 9];
    header[0] = tag as u8;
    header[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    w.write_all(&header)?;
    w.write_all(payload)?;
    w.flush()
}

pub(crate) enum ReadError {
    Closed,
    TimedOut,
    Io(std::io::Error),
    Malformed(String),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe => ReadError::Closed,
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ReadError::TimedOut,
            _ => ReadError::Io(e),
        }
    }
}

pub(crate) fn read_frame(r: &mut impl Read) -> Result<(FrameTag, Vec<u8>), ReadError> {
    let mut header = [0u8; 9];
    r.read_exact(&mut header)?;
    let tag = FrameTag::from_u8(header[0])
        .ok_or_else(|| ReadError::Malformed(format!("unknown frame tag {}", header[0])))?;
    let len = u64::from_le_bytes(header[1..].try_into().expect("8 bytes"));
    if len > MAX_FRAME_BYTES {
        return Err(ReadError::Malformed(format!("frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    Ok((tag, payload))
}

/// The operation a contribution belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum OpCode {
    AllReduce = 1,
    Broadcast = 2,
    AllGather = 3,
    ReduceScatter = 4,
    Barrier = 5,
    GatherBytes = 6,
}

impl OpCode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            OpCode::AllReduce => "all_reduce",
            OpCode::Broadcast => "broadcast",
            OpCode::AllGather => "all_gather",
            OpCode::ReduceScatter => "reduce_scatter",
            OpCode::Barrier => "barrier",
            OpCode::GatherBytes => "all_gather_bytes",
        }
    }

    fn from_u8(v: u8) -> Option<OpCode> {
        Some(match v {
            1 => OpCode::AllReduce,
            2 => OpCode::Broadcast,
            3 => OpCode::AllGather,
            4 => OpCode::ReduceScatter,
            5 => OpCode::Barrier,
            6 => OpCode::GatherBytes,
            _ => return None,
        })
    }
}

/// Everything every rank must agree on for one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OpHeader {
    /// The operation's index in this group's sequence of operations.
    pub seq: u64,
    pub op: OpCode,
    pub reduce: Option<ReduceOp>,
    pub root: u32,
    /// The tensor's kind code (0 for byte operations) and shape.
    pub kind: u8,
    pub shape: Vec<i64>,
}

impl OpHeader {
    pub(crate) fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + 8 * self.shape.len() + data.len());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.push(self.op as u8);
        out.push(match self.reduce {
            None => 0,
            Some(ReduceOp::Sum) => 1,
            Some(ReduceOp::Mean) => 2,
        });
        out.extend_from_slice(&self.root.to_le_bytes());
        out.push(self.kind);
        out.push(self.shape.len() as u8);
        for d in &self.shape {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    /// Splits a contribution into its header and data.
    pub(crate) fn decode(bytes: &[u8]) -> std::result::Result<(OpHeader, &[u8]), String> {
        let fixed = 8 + 1 + 1 + 4 + 1 + 1;
        if bytes.len() < fixed {
            return Err(format!(
                "contribution of {} bytes is too short",
                bytes.len()
            ));
        }
        let seq = u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes"));
        let op =
            OpCode::from_u8(bytes[8]).ok_or_else(|| format!("unknown op code {}", bytes[8]))?;
        let reduce = match bytes[9] {
            0 => None,
            1 => Some(ReduceOp::Sum),
            2 => Some(ReduceOp::Mean),
            v => return Err(format!("unknown reduce op {v}")),
        };
        let root = u32::from_le_bytes(bytes[10..14].try_into().expect("4 bytes"));
        let kind = bytes[14];
        let ndim = bytes[15] as usize;
        let end = fixed + 8 * ndim;
        if bytes.len() < end {
            return Err("contribution shorter than its shape".into());
        }
        let shape = bytes[fixed..end]
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok((
            OpHeader {
                seq,
                op,
                reduce,
                root,
                kind,
                shape,
            },
            &bytes[end..],
        ))
    }

    pub(crate) fn describe(&self) -> String {
        let kind = kind_from_code(self.kind)
            .map(|k| format!("{k:?}"))
            .unwrap_or_else(|| "-".into());
        match self.op {
            OpCode::Barrier | OpCode::GatherBytes => format!("op #{} {}", self.seq, self.op.name()),
            _ => format!(
                "op #{} {}{}{} of {kind} {:?}",
                self.seq,
                self.op.name(),
                self.reduce.map(|r| format!("({r:?})")).unwrap_or_default(),
                if self.op == OpCode::Broadcast {
                    format!(" from rank {}", self.root)
                } else {
                    String::new()
                },
                self.shape
            ),
        }
    }
}

/// The tensor kinds the collectives carry, with their wire codes.
const KINDS: [(Kind, u8); 8] = [
    (Kind::Uint8, 1),
    (Kind::Int8, 2),
    (Kind::Int, 3),
    (Kind::Int64, 4),
    (Kind::Half, 5),
    (Kind::BFloat16, 6),
    (Kind::Float, 7),
    (Kind::Double, 8),
];

pub(crate) fn kind_code(kind: Kind) -> Result<u8> {
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, c)| *c)
        .ok_or_else(|| {
            CollectiveError::InvalidTensor(format!(
                "collectives carry uint8, int8, int32, int64, f16, bf16, f32 and f64 tensors, not {kind:?}"
            ))
        })
}

pub(crate) fn kind_from_code(code: u8) -> Option<Kind> {
    KINDS.iter().find(|(_, c)| *c == code).map(|(k, _)| *k)
}

pub(crate) fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
    )
}

/// Checks that `op` can reduce tensors of `kind`.
pub(crate) fn check_reduce(kind: Kind, op: ReduceOp) -> Result<()> {
    kind_code(kind)?;
    if op == ReduceOp::Mean && !is_float(kind) {
        return Err(CollectiveError::InvalidTensor(format!(
            "ReduceOp::Mean needs a floating-point tensor, not {kind:?}"
        )));
    }
    Ok(())
}

/// The tensor's elements as contiguous host bytes.
pub(crate) fn tensor_bytes(tensor: &Tensor) -> Result<Vec<u8>> {
    let host = tensor.f_to_device(Device::Cpu)?.f_contiguous()?;
    let numel = host.numel();
    let mut bytes = vec![0u8; numel * host.f_kind()?.elt_size_in_bytes()];
    if numel > 0 {
        host.f_copy_data_u8(&mut bytes, numel)?;
    }
    Ok(bytes)
}

/// A host tensor of `kind` and `shape` holding `bytes`.
pub(crate) fn tensor_from_bytes(bytes: &[u8], shape: &[i64], kind: Kind) -> Result<Tensor> {
    let numel: i64 = shape.iter().product();
    let expected = numel as usize * kind.elt_size_in_bytes();
    if bytes.len() != expected {
        return Err(CollectiveError::Mismatch {
            op: "tensor transfer",
            detail: format!(
                "{} bytes for a {kind:?} tensor of shape {shape:?} ({expected} expected)",
                bytes.len()
            ),
        });
    }
    Ok(Tensor::f_from_data_size(bytes, shape, kind)?)
}

/// Reduces the ranks' contributions (in rank order, so every run and every rank gets the same
/// bits) into a tensor of `kind`. Half-precision inputs accumulate in f32.
pub(crate) fn reduce_in_rank_order(parts: &[Tensor], kind: Kind, op: ReduceOp) -> Result<Tensor> {
    let acc_kind = match kind {
        Kind::Half | Kind::BFloat16 => Kind::Float,
        k => k,
    };
    let mut acc = parts[0].f_to_kind(acc_kind)?.f_detach_copy()?;
    for part in &parts[1..] {
        let _ = acc.f_add_(&part.f_to_kind(acc_kind)?)?;
    }
    if op == ReduceOp::Mean {
        let _ = acc.f_div_scalar_(parts.len() as f64)?;
    }
    Ok(acc.f_to_kind(kind)?)
}
