//! Versioned, checksummed frames carrying one encoded tensor (a fragment's outer gradient or a
//! merged fragment) between learners and the syncer.
//!
//! Layout (little-endian):
//! ```text
//! magic "ATF1" | version u8 | codec u8 | flags u8 (bit 0: zstd) | ndim u8 | block u32
//! | dims u64 × ndim | raw_len u64 (encoded bytes before zstd) | payload_len u64 | crc32 u32 (of payload)
//! | payload
//! ```
//! Decoding checks everything before allocating: magic, version, codec, dims against the element
//! limit, raw_len against the codec's exact size, payload length, checksum, and bounds zstd's
//! output to raw_len.

use crate::codec::{decode, encode, Codec};
use crate::WireError;

pub const MAGIC: [u8; 4] = *b"ATF1";
pub const VERSION: u8 = 1;
const FLAG_ZSTD: u8 = 1;
const MAX_DIMS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest tensor a frame may carry, in elements.
    pub max_elements: u64,
}

impl Default for FrameLimits {
    fn default() -> Self {
        // 1 Gi values: a frame holds one tensor, and a 12B model's largest, its tied embedding,
        // is 262,144 x 3,840 = 0.94 Gi values.
        FrameLimits {
            max_elements: 1 << 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub codec: Codec,
    pub block: u32,
    pub shape: Vec<u64>,
    pub values: Vec<f32>,
}

/// Encodes `values` (row-major, `shape`) into one frame; `zstd_level` 0 disables compression.
pub fn encode_frame(
    codec: Codec,
    block: u32,
    shape: &[u64],
    values: &[f32],
    zstd_level: i32,
) -> Result<Vec<u8>, WireError> {
    let n: u64 = shape.iter().product();
    if n != values.len() as u64 || shape.len() > MAX_DIMS {
        return Err(WireError::ShapeMismatch {
            elements: n,
            values: values.len() as u64,
        });
    }
    let mut raw = Vec::new();
    encode(codec, values, block as usize, &mut raw)?;
    frame_encoded(codec, block, shape, &raw, zstd_level)
}

/// Frames values already encoded with `codec` (for example the syncer's quantised update);
/// `raw.len()` must be the codec's exact size for `shape`. A slice, so that a run of a
/// larger tensor's blocks can be framed without a copy of its own.
pub fn frame_encoded(
    codec: Codec,
    block: u32,
    shape: &[u64],
    raw: &[u8],
    zstd_level: i32,
) -> Result<Vec<u8>, WireError> {
    let n: u64 = shape.iter().product();
    if shape.len() > MAX_DIMS || raw.len() != codec.encoded_len(n as usize, block as usize) {
        return Err(WireError::ShapeMismatch {
            elements: n,
            values: raw.len() as u64,
        });
    }
    let raw_len = raw.len() as u64;
    let compressed;
    let (payload, flags) = if zstd_level != 0 {
        compressed = zstd::bulk::compress(raw, zstd_level)
            .map_err(|e| WireError::Compression(e.to_string()))?;
        (compressed.as_slice(), FLAG_ZSTD)
    } else {
        (raw, 0)
    };
    let mut out = Vec::with_capacity(payload.len() + 40 + 8 * shape.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[VERSION, codec.id(), flags, shape.len() as u8]);
    out.extend_from_slice(&block.to_le_bytes());
    for d in shape {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or(WireError::Truncated)?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

/// Decodes one frame; `bytes` must hold exactly one frame.
pub fn decode_frame(bytes: &[u8], limits: FrameLimits) -> Result<Frame, WireError> {
    let mut r = Reader { bytes, pos: 0 };
    if r.take(4)? != MAGIC {
        return Err(WireError::BadMagic);
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let codec = Codec::from_id(r.u8()?)?;
    let flags = r.u8()?;
    if flags & !FLAG_ZSTD != 0 {
        return Err(WireError::UnknownFlags(flags));
    }
    let ndim = r.u8()? as usize;
    if ndim > MAX_DIMS {
        return Err(WireError::TooManyDims(ndim));
    }
    let block = r.u32()?;
    if codec.is_blocked() && block == 0 {
        return Err(WireError::BadBlock(0));
    }
    let mut shape = Vec::with_capacity(ndim);
    let mut n: u64 = 1;
    for _ in 0..ndim {
        let d = r.u64()?;
        n = n
            .checked_mul(d)
            .filter(|n| *n <= limits.max_elements)
            .ok_or(WireError::TooLarge {
                limit: limits.max_elements,
            })?;
        shape.push(d);
    }
    let raw_len = r.u64()?;
    let expected = codec.encoded_len(n as usize, block as usize) as u64;
    if raw_len != expected {
        return Err(WireError::PayloadLength {
            expected: expected as usize,
            got: raw_len as usize,
        });
    }
    let payload_len = r.u64()?;
    let crc = r.u32()?;
    let payload = r.take(usize::try_from(payload_len).map_err(|_| WireError::Truncated)?)?;
    if r.pos != bytes.len() {
        return Err(WireError::TrailingBytes(bytes.len() - r.pos));
    }
    if crc32fast::hash(payload) != crc {
        return Err(WireError::Checksum);
    }
    let raw;
    let encoded: &[u8] = if flags & FLAG_ZSTD != 0 {
        raw = zstd::bulk::decompress(payload, raw_len as usize)
            .map_err(|e| WireError::Compression(e.to_string()))?;
        &raw
    } else {
        payload
    };
    let mut values = vec![0.0f32; n as usize];
    decode(codec, encoded, block as usize, &mut values)?;
    Ok(Frame {
        codec,
        block,
        shape,
        values,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(zstd: i32) -> (Vec<u8>, Vec<f32>) {
        let values: Vec<f32> = (0..600)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        (
            encode_frame(Codec::E3M0, 256, &[20, 30], &values, zstd).unwrap(),
            values,
        )
    }

    #[test]
    fn frames_round_trip_with_and_without_zstd() {
        for level in [0, 3] {
            let (bytes, values) = frame(level);
            let f = decode_frame(&bytes, FrameLimits::default()).unwrap();
            assert_eq!(
                (f.codec, f.block, f.shape.clone()),
                (Codec::E3M0, 256, vec![20, 30])
            );
            let mut direct = Vec::new();
            encode(Codec::E3M0, &values, 256, &mut direct).unwrap();
            let mut want = vec![0.0; 600];
            decode(Codec::E3M0, &direct, 256, &mut want).unwrap();
            assert_eq!(f.values, want);
        }
        let zeros = encode_frame(Codec::F32, 0, &[4096], &[0.0; 4096], 3).unwrap();
        assert!(
            zeros.len() < 200,
            "zstd shrinks a zero tensor: {}",
            zeros.len()
        );
    }

    #[test]
    fn every_corruption_is_refused_without_panicking() {
        let (bytes, _) = frame(0);
        let limits = FrameLimits::default();
        for cut in [0, 3, 10, 30, bytes.len() - 1] {
            assert!(decode_frame(&bytes[..cut], limits).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(decode_frame(&bad, limits), Err(WireError::BadMagic));
        let mut bad = bytes.clone();
        bad[4] = 9;
        assert_eq!(
            decode_frame(&bad, limits),
            Err(WireError::UnsupportedVersion(9))
        );
        let mut bad = bytes.clone();
        bad[5] = 42;
        assert_eq!(decode_frame(&bad, limits), Err(WireError::UnknownCodec(42)));
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x55;
        assert_eq!(decode_frame(&bad, limits), Err(WireError::Checksum));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            decode_frame(&long, limits),
            Err(WireError::TrailingBytes(1))
        );
        let small = FrameLimits { max_elements: 100 };
        assert_eq!(
            decode_frame(&bytes, small),
            Err(WireError::TooLarge { limit: 100 })
        );
        // A header claiming 2^60 elements is refused before any allocation.
        let mut huge = bytes.clone();
        huge[12..20].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(
            decode_frame(&huge, limits),
            Err(WireError::TooLarge { .. })
        ));
    }
}
