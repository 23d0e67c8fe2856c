//! ggml tensor encodings: f32, f16, bf16 and the Q8_0 / Q4_0 block formats, with their inverse for
//! checks. Block formats follow ggml's reference quantisers (`quantize_row_q8_0_ref`,
//! `quantize_row_q4_0_ref`): 32 values per block along the innermost (input) dimension, an f16
//! scale first.

use anyhow::{bail, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Values per Q8_0 / Q4_0 block.
pub const BLOCK: usize = 32;

/// A ggml tensor type Atoll writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
}

impl GgmlType {
    /// The `ggml_type` id stored in a GGUF tensor info.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q8_0 => 8,
            GgmlType::Bf16 => 30,
        }
    }

    pub fn is_block(self) -> bool {
        matches!(self, GgmlType::Q8_0 | GgmlType::Q4_0)
    }

    /// Bytes that `n` values take (a multiple of [`BLOCK`] for block types).
    pub fn bytes_for(self, n: usize) -> usize {
        match self {
            GgmlType::F32 => 4 * n,
            GgmlType::F16 | GgmlType::Bf16 => 2 * n,
            GgmlType::Q8_0 => n / BLOCK * 34,
            GgmlType::Q4_0 => n / BLOCK * 18,
        }
    }

    /// Encodes row-major values (rows of `row_len`, the ggml ne[0]) into `out`.
    pub fn encode(self, values: &[f32], row_len: usize, out: &mut Vec<u8>) -> Result<()> {
        out.reserve(self.bytes_for(values.len()));
        match self {
            GgmlType::F32 => write_elements(values, out, |v| v.to_le_bytes()),
            GgmlType::F16 => {
                // The slice conversion uses the CPU's F16C instructions when it has them; a
                // stack buffer keeps it allocation-free and in the L1 cache.
                let mut halves = [f16::ZERO; 512];
                for piece in values.chunks(halves.len()) {
                    let halves = &mut halves[..piece.len()];
                    halves.convert_from_f32_slice(piece);
                    write_elements(halves, out, |h| h.to_le_bytes());
                }
            }
            GgmlType::Bf16 => write_elements(values, out, |v| bf16::from_f32(*v).to_le_bytes()),
            GgmlType::Q8_0 | GgmlType::Q4_0 => {
                if !row_len.is_multiple_of(BLOCK) {
                    bail!("rows of {row_len} values do not split into {BLOCK}-value blocks");
                }
                for block in values.chunks_exact(BLOCK) {
                    if self == GgmlType::Q8_0 {
                        encode_q8_0(block, out);
                    } else {
                        encode_q4_0(block, out);
                    }
                }
            }
        }
        Ok(())
    }

    /// Decodes `bytes` of this type back to f32.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            GgmlType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            GgmlType::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            GgmlType::Bf16 => bytes
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            GgmlType::Q8_0 => bytes
                .chunks_exact(34)
                .flat_map(|b| {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    b[2..].iter().map(move |&q| (q as i8) as f32 * d)
                })
                .collect(),
            GgmlType::Q4_0 => bytes
                .chunks_exact(18)
                .flat_map(|b| {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    let low = b[2..]
                        .iter()
                        .map(move |&q| ((q & 0x0f) as i32 - 8) as f32 * d);
                    let high = b[2..]
                        .iter()
                        .map(move |&q| ((q >> 4) as i32 - 8) as f32 * d);
                    low.chain(high).collect::<Vec<_>>()
                })
                .collect(),
        }
    }
}

/// d = max|x| / 127, q = round(x / d) (half away from zero, as C's `roundf`).
fn encode_q8_0(block: &[f32], out: &mut Vec<u8>) {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend(block.iter().map(|v| ((v * id).round() as i8) as u8));
}

/// d = (the value of largest magnitude) / -8, q = min(15, trunc(x / d + 8.5)); element j in the
/// low nibble of byte j, element j + 16 in its high nibble.
fn encode_q4_0(block: &[f32], out: &mut Vec<u8>) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in block {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    let nibble = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    for j in 0..BLOCK / 2 {
        out.push(nibble(block[j]) | (nibble(block[j + BLOCK / 2]) << 4));
    }
}

/// Appends each element's `N` little-endian bytes to `out`: one resize, then a loop over
/// fixed-size chunks that the compiler vectorises (no per-element capacity checks).
fn write_elements<T, const N: usize>(
    items: &[T],
    out: &mut Vec<u8>,
    bytes: impl Fn(&T) -> [u8; N],
) {
    let start = out.len();
    out.resize(start + N * items.len(), 0);
    for (item, dst) in items.iter().zip(out[start..].chunks_exact_mut(N)) {
        dst.copy_from_slice(&bytes(item));
    }
}

/// Decodes safetensors elements of `dtype` into `out` (cleared first; its allocation reused).
pub fn decode_into(dtype: &str, bytes: &[u8], out: &mut Vec<f32>) -> Result<()> {
    fn fill<const N: usize>(bytes: &[u8], out: &mut Vec<f32>, value: impl Fn([u8; N]) -> f32) {
        out.clear();
        out.resize(bytes.len() / N, 0.0);
        for (v, b) in out.iter_mut().zip(bytes.chunks_exact(N)) {
            *v = value(b.try_into().expect("N bytes"));
        }
    }
    match dtype {
        "F32" => fill(bytes, out, f32::from_le_bytes),
        "F16" => fill(bytes, out, |b: [u8; 2]| f16::from_le_bytes(b).to_f32()),
        "BF16" => fill(bytes, out, |b: [u8; 2]| {
            f32::from_bits((u16::from_le_bytes(b) as u32) << 16)
        }),
        "F64" => fill(bytes, out, |b: [u8; 8]| f64::from_le_bytes(b) as f32),
        other => bail!("tensor dtype {other} cannot be exported (f32, f16, bf16, f64 can)"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let scale = if i % 97 == 0 { 4.0 } else { 0.3 };
                (rng.random::<f64>() * 2.0 - 1.0) as f32 * scale
            })
            .collect()
    }

    /// Every element of a Q8_0 round trip lies within half a quantisation step of the float64
    /// value, the step being the block scale computed in float64 (plus the f16 rounding of the
    /// stored scale times the largest code). Q4_0's codes run -8..7 with the largest magnitude at
    /// -8, so values of the other sign near the extreme clip to 7 steps: within one step.
    #[test]
    fn block_formats_match_a_float64_reference() {
        let values = random(BLOCK * 64, 7);
        for (ty, levels, max_code, steps) in [
            (GgmlType::Q8_0, 127.0, 127.0, 0.5),
            (GgmlType::Q4_0, 8.0, 8.0, 1.0),
        ] {
            let mut bytes = Vec::new();
            ty.encode(&values, BLOCK * 8, &mut bytes).unwrap();
            assert_eq!(bytes.len(), ty.bytes_for(values.len()));
            let back = ty.decode(&bytes);
            for (b, (orig, got)) in values.chunks(BLOCK).zip(back.chunks(BLOCK)).enumerate() {
                let amax = orig.iter().fold(0f64, |m, v| m.max((*v as f64).abs()));
                let d64 = amax / levels;
                let d16 = f16::from_f32(d64 as f32).to_f64();
                let bound = steps * d64 + max_code * (d16 - d64).abs() + 1e-7;
                for (x, y) in orig.iter().zip(got) {
                    let err = (*x as f64 - *y as f64).abs();
                    assert!(
                        err <= bound,
                        "{ty:?} block {b}: |{x} - {y}| = {err} > {bound}"
                    );
                }
            }
        }
    }

    #[test]
    fn q4_0_packs_low_and_high_nibbles_as_ggml() {
        // x = -8 d .. 7 d in the first 16 slots and 7 d .. -8 d in the last: codes 0..15, 15..0.
        let d = 0.5f32;
        let mut block: Vec<f32> = (0..16).map(|i| (i as f32 - 8.0) * d).collect();
        block.extend((0..16).map(|i| (7.0 - i as f32) * d));
        block[0] = -8.0 * d; // largest magnitude is negative: d = max / -8 = +0.5
        let mut out = Vec::new();
        GgmlType::Q4_0.encode(&block, BLOCK, &mut out).unwrap();
        assert_eq!(f16::from_le_bytes([out[0], out[1]]).to_f32(), d);
        for j in 0..16 {
            assert_eq!(out[2 + j] & 0x0f, j as u8);
            assert_eq!(out[2 + j] >> 4, 15 - j as u8);
        }
        assert_eq!(GgmlType::Q4_0.decode(&out), block);
    }

    #[test]
    fn float_encodings_round_to_nearest() {
        let values = [1.0f32, -2.5, 1.0e-3, 65504.0, 3.140_625];
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Bf16] {
            let mut out = Vec::new();
            ty.encode(&values, values.len(), &mut out).unwrap();
            let back = ty.decode(&out);
            let rel = match ty {
                GgmlType::F32 => 0.0,
                GgmlType::F16 => 2f64.powi(-11),
                _ => 2f64.powi(-8),
            };
            for (x, y) in values.iter().zip(&back) {
                assert!(((*x as f64) - (*y as f64)).abs() <= rel * (*x as f64).abs());
            }
        }
        let mut out = Vec::new();
        assert!(GgmlType::Q8_0.encode(&[0.0; 48], 48, &mut out).is_err());
    }
}
