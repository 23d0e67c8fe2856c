//! Atoll's wire formats: value codecs for outer gradients and fragments, error feedback, and
//! the versioned, checksummed frame that carries one encoded tensor. Pure Rust, no tch: it runs on
//! host copies of fragments.

pub mod codec;
pub mod frame;

pub use codec::{decode, encode, Codec, ErrorFeedback, ALL_CODECS, DEFAULT_BLOCK};
pub use frame::{decode_frame, encode_frame, frame_encoded, Frame, FrameLimits};

/// Deterministic values shaped like outer gradients, for benchmarks: mostly within ±0.005, one
/// in 64 within ±0.5 (the heavy tail block scales must cope with).
pub fn synthetic_outer_gradient(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed | 1; // xorshift never leaves 0
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 11) as f64 / (1u64 << 53) as f64;
            ((u - 0.5) * if state.is_multiple_of(64) { 1.0 } else { 0.01 }) as f32
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("value {index} is NaN or infinite")]
    NonFinite { index: usize },
    #[error("block size {0} is invalid for a block codec")]
    BadBlock(usize),
    #[error("payload has {got} bytes, the codec needs {expected}")]
    PayloadLength { expected: usize, got: usize },
    #[error("a block scale is negative, NaN or infinite")]
    BadScale,
    #[error("unknown codec id {0}")]
    UnknownCodec(u8),
    #[error("not an Atoll frame (bad magic)")]
    BadMagic,
    #[error("unsupported frame version {0} (this build reads version 1)")]
    UnsupportedVersion(u8),
    #[error("unknown frame flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("frame has {0} dimensions (at most 8)")]
    TooManyDims(usize),
    #[error("frame exceeds the limit of {limit} elements")]
    TooLarge { limit: u64 },
    #[error("frame is truncated")]
    Truncated,
    #[error("frame is followed by {0} unexpected bytes")]
    TrailingBytes(usize),
    #[error("frame checksum does not match its payload")]
    Checksum,
    #[error("shape holds {elements} elements but {values} values were given")]
    ShapeMismatch { elements: u64, values: u64 },
    #[error("zstd: {0}")]
    Compression(String),
}
