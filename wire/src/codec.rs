//! Value codecs for outer gradients and fragments, on host copies of f32 tensors.
//!
//! | codec | layout | bits/value (block 256) |
//! |---|---|---|
//! | `f32` | little-endian f32 | 32 |
//! | `bf16` | little-endian bf16, round to nearest even | 16 |
//! | `int8` | per block: f32 scale = absmax/127, then i8 values | 8.125 |
//! | `e3m0` | per block: f32 scale = absmax, then 4-bit codes (sign + 3-bit exponent, no mantissa), two per byte, low nibble first | 4.125 |
//! | `int2` | per block: f32 scale = absmax, then 2-bit codes, four per byte, lowest bits first | 2.125 |
//!
//! E3M0 magnitudes are {0} ∪ {2^-6, …, 2^-1, 1} × scale, rounded to the nearest level in the
//! linear domain. int2 levels are (q − 1.5) × absmax / 1.5 for q in 0..4.

use crate::WireError;

pub const DEFAULT_BLOCK: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    F32,
    Bf16,
    Int8,
    E3M0,
    Int2,
}

pub const ALL_CODECS: [Codec; 5] = [
    Codec::F32,
    Codec::Bf16,
    Codec::Int8,
    Codec::E3M0,
    Codec::Int2,
];

impl Codec {
    pub fn id(self) -> u8 {
        match self {
            Codec::F32 => 0,
            Codec::Bf16 => 1,
            Codec::Int8 => 2,
            Codec::E3M0 => 3,
            Codec::Int2 => 4,
        }
    }

    pub fn from_id(id: u8) -> Result<Self, WireError> {
        ALL_CODECS
            .into_iter()
            .find(|c| c.id() == id)
            .ok_or(WireError::UnknownCodec(id))
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::F32 => "f32",
            Codec::Bf16 => "bf16",
            Codec::Int8 => "int8",
            Codec::E3M0 => "e3m0",
            Codec::Int2 => "int2",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        ALL_CODECS.into_iter().find(|c| c.name() == name)
    }

    /// Whether values are grouped in blocks with one f32 scale each.
    pub fn is_blocked(self) -> bool {
        matches!(self, Codec::Int8 | Codec::E3M0 | Codec::Int2)
    }

    /// Bytes of the encoded payload for `n` values.
    pub fn encoded_len(self, n: usize, block: usize) -> usize {
        let per_block = |bytes_for: fn(usize) -> usize| {
            let full = n / block;
            let rest = n % block;
            full * (4 + bytes_for(block)) + if rest > 0 { 4 + bytes_for(rest) } else { 0 }
        };
        match self {
            Codec::F32 => 4 * n,
            Codec::Bf16 => 2 * n,
            Codec::Int8 => per_block(|k| k),
            Codec::E3M0 => per_block(|k| k.div_ceil(2)),
            Codec::Int2 => per_block(|k| k.div_ceil(4)),
        }
    }

    /// Average bits per value for a long tensor.
    pub fn bits_per_value(self, block: usize) -> f64 {
        let n = block * 1024;
        8.0 * self.encoded_len(n, block) as f64 / n as f64
    }
}

fn check_finite(values: &[f32]) -> Result<(), WireError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(WireError::NonFinite { index }),
        None => Ok(()),
    }
}

fn absmax(values: &[f32]) -> f32 {
    // Eight independent lanes so the compiler can vectorise (f32::max is not reassociated).
    let mut lanes = [0.0f32; 8];
    let mut chunks = values.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            let a = v.abs();
            *l = if a > *l { a } else { *l };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()));
    lanes.iter().fold(tail, |m, l| m.max(*l))
}

pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    // Round to nearest, ties to even (inputs are finite: checked before encoding).
    let rounding = 0x7fff + ((bits >> 16) & 1);
    ((bits + rounding) >> 16) as u16
}

pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// 4-bit code of x scaled by `inv` (= 1 / absmax): sign bit 8, magnitude m (0 = zero,
/// 1..=7 = 2^(m−7)), nearest level in the linear domain. Branch-free so blocks vectorise.
#[inline(always)]
fn e3m0_code(x: f32, inv: f32) -> u8 {
    let y = (x * inv).abs().min(1.0);
    let bits = y.to_bits();
    let exponent = ((bits >> 23) & 0xff) as i32 - 127;
    // Between 2^e and 2^(e+1) the linear midpoint is 1.5·2^e: the first mantissa bit rounds up.
    // In [2^-7, 2^-6) every value is at or past the midpoint between 0 and 2^-6 (clamp to 1);
    // below 2^-7 it rounds to zero.
    let level = exponent + ((bits >> 22) & 1) as i32;
    let magnitude = if exponent >= -7 {
        (level + 7).clamp(1, 7)
    } else {
        0
    } as u8;
    let negative = ((x.to_bits() >> 31) as u8) & (magnitude != 0) as u8;
    magnitude | (negative << 3)
}

fn e3m0_table(scale: f32) -> [f32; 16] {
    let mut t = [0.0f32; 16];
    for m in 1..8 {
        let v = scale * (2.0f32).powi(m as i32 - 7);
        t[m] = v;
        t[m | 8] = -v;
    }
    t
}

const INT2_LEVELS: [f32; 4] = [-1.5, -0.5, 0.5, 1.5];

/// Appends the encoding of `values` to `out`. Non-finite values are refused.
pub fn encode(
    codec: Codec,
    values: &[f32],
    block: usize,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    if codec.is_blocked() && block == 0 {
        return Err(WireError::BadBlock(block));
    }
    check_finite(values)?;
    out.reserve(codec.encoded_len(values.len(), block));
    match codec {
        Codec::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Codec::Bf16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f32_to_bf16(*v).to_le_bytes())),
        Codec::Int8 => {
            for chunk in values.chunks(block) {
                let scale = absmax(chunk) / 127.0;
                out.extend_from_slice(&scale.to_le_bytes());
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                out.extend(
                    chunk
                        .iter()
                        .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8),
                );
            }
        }
        Codec::E3M0 => {
            let mut codes = vec![0u8; block];
            for chunk in values.chunks(block) {
                let scale = absmax(chunk);
                out.extend_from_slice(&scale.to_le_bytes());
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                let codes = &mut codes[..chunk.len()];
                for (c, v) in codes.iter_mut().zip(chunk) {
                    *c = e3m0_code(*v, inv);
                }
                let mut pairs = codes.chunks_exact(2);
                for pair in &mut pairs {
                    out.push(pair[0] | (pair[1] << 4));
                }
                if let [last] = pairs.remainder() {
                    out.push(*last);
                }
            }
        }
        Codec::Int2 => {
            for chunk in values.chunks(block) {
                let scale = absmax(chunk);
                out.extend_from_slice(&scale.to_le_bytes());
                let inv = if scale > 0.0 { 1.5 / scale } else { 0.0 };
                // The nearest of the levels −1.5, −0.5, 0.5, 1.5 (in steps) by counting the
                // midpoints −1, 0, 1 at or below the value: ties go up, as rounding half away
                // from zero does after the +1.5 shift, and the comparisons vectorise.
                let code = |v: f32| {
                    let y = v * inv;
                    (y >= -1.0) as u8 + (y >= 0.0) as u8 + (y >= 1.0) as u8
                };
                let mut quads = chunk.chunks_exact(4);
                for quad in &mut quads {
                    out.push(
                        code(quad[0])
                            | code(quad[1]) << 2
                            | code(quad[2]) << 4
                            | code(quad[3]) << 6,
                    );
                }
                let rest = quads.remainder();
                if !rest.is_empty() {
                    out.push(
                        rest.iter()
                            .enumerate()
                            .fold(0u8, |byte, (i, v)| byte | code(*v) << (2 * i)),
                    );
                }
            }
        }
    }
    Ok(())
}

/// Decodes `out.len()` values from `payload`, which must be exactly their encoding.
pub fn decode(
    codec: Codec,
    payload: &[u8],
    block: usize,
    out: &mut [f32],
) -> Result<(), WireError> {
    if codec.is_blocked() && block == 0 {
        return Err(WireError::BadBlock(block));
    }
    let expected = codec.encoded_len(out.len(), block);
    if payload.len() != expected {
        return Err(WireError::PayloadLength {
            expected,
            got: payload.len(),
        });
    }
    let read_scale = |bytes: &[u8]| -> Result<f32, WireError> {
        let s = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if s.is_finite() && s >= 0.0 {
            Ok(s)
        } else {
            Err(WireError::BadScale)
        }
    };
    match codec {
        Codec::F32 => {
            for (o, b) in out.iter_mut().zip(payload.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Codec::Bf16 => {
            for (o, b) in out.iter_mut().zip(payload.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        Codec::Int8 => {
            let mut pos = 0;
            for chunk in out.chunks_mut(block) {
                let scale = read_scale(&payload[pos..])?;
                pos += 4;
                let len = chunk.len();
                for (o, b) in chunk.iter_mut().zip(&payload[pos..pos + len]) {
                    *o = (*b as i8) as f32 * scale;
                }
                pos += len;
            }
        }
        Codec::E3M0 => {
            let mut pos = 0;
            for chunk in out.chunks_mut(block) {
                let table = e3m0_table(read_scale(&payload[pos..])?);
                pos += 4;
                let bytes = &payload[pos..pos + chunk.len().div_ceil(2)];
                let mut pairs = chunk.chunks_exact_mut(2);
                for (pair, byte) in (&mut pairs).zip(bytes) {
                    pair[0] = table[(byte & 0x0f) as usize];
                    pair[1] = table[(byte >> 4) as usize];
                }
                if let [last] = pairs.into_remainder() {
                    *last = table[(bytes[bytes.len() - 1] & 0x0f) as usize];
                }
                pos += bytes.len();
            }
        }
        Codec::Int2 => {
            let mut pos = 0;
            for chunk in out.chunks_mut(block) {
                let step = read_scale(&payload[pos..])? / 1.5;
                let table = INT2_LEVELS.map(|l| l * step);
                pos += 4;
                let bytes = &payload[pos..pos + chunk.len().div_ceil(4)];
                let mut quads = chunk.chunks_exact_mut(4);
                for (quad, &byte) in (&mut quads).zip(bytes) {
                    quad[0] = table[(byte & 3) as usize];
                    quad[1] = table[((byte >> 2) & 3) as usize];
                    quad[2] = table[((byte >> 4) & 3) as usize];
                    quad[3] = table[(byte >> 6) as usize];
                }
                let last = bytes[bytes.len() - 1];
                for (i, o) in quads.into_remainder().iter_mut().enumerate() {
                    *o = table[((last >> (2 * i)) & 3) as usize];
                }
                pos += bytes.len();
            }
        }
    }
    Ok(())
}

/// Error feedback: what quantisation dropped from one send is added to the next, so the
/// accumulated signal is unbiased over time.
#[derive(Debug, Clone, Default)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// Encodes values + residual and keeps the new residual.
    pub fn encode(
        &mut self,
        codec: Codec,
        values: &[f32],
        block: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        if self.residual.len() != values.len() {
            self.residual = vec![0.0; values.len()];
        }
        let corrected: Vec<f32> = values
            .iter()
            .zip(&self.residual)
            .map(|(v, r)| v + r)
            .collect();
        let start = out.len();
        encode(codec, &corrected, block, out)?;
        let mut decoded = vec![0.0f32; values.len()];
        decode(codec, &out[start..], block, &mut decoded)?;
        for ((r, c), d) in self.residual.iter_mut().zip(&corrected).zip(&decoded) {
            *r = c - d;
        }
        Ok(())
    }

    pub fn residual(&self) -> &[f32] {
        &self.residual
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn sample(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        // Outer gradients are heavy-tailed: mix scales so blocks differ.
        (0..n)
            .map(|i| {
                let scale = if i % 300 < 10 { 1.0 } else { 0.01 };
                (rng.random::<f64>() * 2.0 - 1.0) as f32 * scale
            })
            .collect()
    }

    /// Values a hair below int2's midpoints (0 and +1 step) get their nearest level. Adding 1.5
    /// in f32 before rounding, as the first encoder did, put them on the midpoint and then a
    /// level up.
    #[test]
    fn int2_gives_values_next_to_a_midpoint_their_nearest_level() {
        // absmax 1.5: one step is exactly 1.0, the levels are ±0.5 and ±1.5.
        let values = [1.5f32, -3e-8, 0.99999994, -1.0000001, 3e-8];
        let out = round_trip(Codec::Int2, &values, 8);
        assert_eq!(out, vec![1.5, -0.5, 0.5, -1.5, 0.5]);
    }

    fn round_trip(codec: Codec, values: &[f32], block: usize) -> Vec<f32> {
        let mut buf = Vec::new();
        encode(codec, values, block, &mut buf).unwrap();
        assert_eq!(buf.len(), codec.encoded_len(values.len(), block));
        let mut out = vec![0.0; values.len()];
        decode(codec, &buf, block, &mut out).unwrap();
        out
    }

    /// Independent float64 model of each codec's dequantised value.
    fn reference(codec: Codec, values: &[f32], block: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(values.len());
        for chunk in values.chunks(block) {
            let amax = chunk.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
            for &v in chunk {
                let v = v as f64;
                out.push(match codec {
                    Codec::F32 => v,
                    Codec::Bf16 => unreachable!(),
                    Codec::Int8 => {
                        let s = (amax as f32 / 127.0) as f64;
                        if s == 0.0 {
                            0.0
                        } else {
                            (v / s).round().clamp(-127.0, 127.0) * s
                        }
                    }
                    Codec::E3M0 => {
                        if amax == 0.0 {
                            0.0
                        } else {
                            let y = v.abs() / amax;
                            let levels = [
                                0.0,
                                1.0 / 64.0,
                                1.0 / 32.0,
                                1.0 / 16.0,
                                0.125,
                                0.25,
                                0.5,
                                1.0,
                            ];
                            let best = levels
                                .iter()
                                .copied()
                                .min_by(|a, b| {
                                    (y - a).abs().total_cmp(&(y - b).abs()).then(b.total_cmp(a))
                                })
                                .unwrap();
                            best * amax * v.signum()
                        }
                    }
                    Codec::Int2 => {
                        let step = amax / 1.5;
                        if step == 0.0 {
                            0.0
                        } else {
                            ((v / step + 1.5).round().clamp(0.0, 3.0) - 1.5) * step
                        }
                    }
                });
            }
        }
        out
    }

    #[test]
    fn lossless_and_bf16_round_trips() {
        let v = sample(1000, 1);
        assert_eq!(round_trip(Codec::F32, &v, DEFAULT_BLOCK), v);
        for (a, b) in round_trip(Codec::Bf16, &v, DEFAULT_BLOCK).iter().zip(&v) {
            assert!(
                ((a - b) as f64).abs() <= (*b as f64).abs() * 2f64.powi(-8),
                "{a} vs {b}"
            );
        }
        assert_eq!(
            bf16_to_f32(f32_to_bf16(1.0 + 2f32.powi(-8))),
            1.0,
            "ties go to even"
        );
    }

    /// Block codecs against the float64 model: equal to f32 rounding (1e-6 relative to the
    /// block scale), on a length that leaves a partial last block.
    #[test]
    fn blocked_codecs_match_the_float64_reference() {
        let v = sample(1000, 2);
        for codec in [Codec::Int8, Codec::E3M0, Codec::Int2] {
            for block in [256, 64, 7] {
                let got = round_trip(codec, &v, block);
                let want = reference(codec, &v, block);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let amax = v[i / block * block..((i / block + 1) * block).min(v.len())]
                        .iter()
                        .fold(0.0f32, |m, x| m.max(x.abs())) as f64;
                    assert!(
                        (*g as f64 - w).abs() <= 1e-6 * amax,
                        "{codec:?} block {block} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn error_bounds_follow_the_bit_width() {
        let v = sample(4096, 3);
        let rel_err = |codec| {
            let got = round_trip(codec, &v, DEFAULT_BLOCK);
            let num: f64 = got
                .iter()
                .zip(&v)
                .map(|(g, x)| ((g - x) as f64).powi(2))
                .sum();
            let den: f64 = v.iter().map(|x| (*x as f64).powi(2)).sum();
            (num / den).sqrt()
        };
        let (int8, e3m0, int2) = (
            rel_err(Codec::Int8),
            rel_err(Codec::E3M0),
            rel_err(Codec::Int2),
        );
        assert!(
            int8 < 0.05 && int8 < e3m0 && e3m0 < 0.3 && e3m0 < int2,
            "{int8} {e3m0} {int2}"
        );
        assert!((Codec::E3M0.bits_per_value(256) - 4.125).abs() < 1e-12);
        assert!((Codec::Int2.bits_per_value(256) - 2.125).abs() < 1e-12);
    }

    #[test]
    fn zeros_extremes_and_non_finite_values() {
        let zeros = vec![0.0f32; 300];
        for codec in ALL_CODECS {
            assert!(
                round_trip(codec, &zeros, 256).iter().all(|x| *x == 0.0),
                "{codec:?}"
            );
            let mut buf = Vec::new();
            let err = encode(codec, &[1.0, f32::NAN], 256, &mut buf).unwrap_err();
            assert_eq!(err, WireError::NonFinite { index: 1 });
        }
        // Levels 2^-k·scale; below 2^-7·scale (the midpoint to 2^-6) values round to zero.
        let e = round_trip(
            Codec::E3M0,
            &[-3.0, 3.0, 3.0 / 64.0, 3.0 / 100.0, 3.0 / 129.0, 0.7 * 3.0],
            256,
        );
        assert_eq!(e, vec![-3.0, 3.0, 3.0 / 64.0, 3.0 / 64.0, 0.0, 1.5]);
    }

    #[test]
    fn decode_refuses_wrong_lengths_and_bad_scales() {
        let mut buf = Vec::new();
        encode(Codec::E3M0, &[1.0; 10], 256, &mut buf).unwrap();
        let mut out = vec![0.0; 11];
        assert!(matches!(
            decode(Codec::E3M0, &buf, 256, &mut out),
            Err(WireError::PayloadLength { .. })
        ));
        buf[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        let mut out = vec![0.0; 10];
        assert_eq!(
            decode(Codec::E3M0, &buf, 256, &mut out),
            Err(WireError::BadScale)
        );
    }

    #[test]
    fn error_feedback_carries_what_quantisation_dropped() {
        let v = sample(512, 4);
        let mut ef = ErrorFeedback::default();
        let mut sent = vec![0.0f64; v.len()];
        for _ in 0..20 {
            let mut buf = Vec::new();
            ef.encode(Codec::Int2, &v, 256, &mut buf).unwrap();
            let mut d = vec![0.0; v.len()];
            decode(Codec::Int2, &buf, 256, &mut d).unwrap();
            sent.iter_mut().zip(&d).for_each(|(s, x)| *s += *x as f64);
        }
        // Over 20 sends the transmitted sum tracks 20·v up to one residual.
        for ((s, x), r) in sent.iter().zip(&v).zip(ef.residual()) {
            assert!(
                (s - 20.0 * *x as f64 + *r as f64).abs() < 1e-4,
                "{s} {x} {r}"
            );
        }
    }
}
