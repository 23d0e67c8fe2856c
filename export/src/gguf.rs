//! A streaming GGUF (version 3) writer: header, key/value metadata, tensor infos, then each
//! tensor's data at an offset aligned to `general.alignment` (32), written one tensor at a time.
//! Dimensions are stored in ggml order (innermost first), so a PyTorch `[out, in]` weight is
//! written `[in, out]`.

use crate::quant::GgmlType;
use anyhow::{bail, Result};
use std::io::Write;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
pub const ALIGNMENT: u64 = 32;

/// A metadata value (GGUF value types 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
    BoolArray(Vec<bool>),
}

impl MetaValue {
    fn type_id(&self) -> u32 {
        match self {
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::StrArray(_) | MetaValue::I32Array(_) | MetaValue::BoolArray(_) => 9,
        }
    }
}

/// One tensor as planned: name, ggml-order dimensions, type.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: ne[0] (innermost, the input dimension of a weight) first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    pub fn n_bytes(&self) -> u64 {
        self.ty.bytes_for(self.n_elements() as usize) as u64
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::Str(s) => put_str(out, s),
        MetaValue::StrArray(items) => {
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|s| put_str(out, s));
        }
        MetaValue::I32Array(items) => {
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        MetaValue::BoolArray(items) => {
            out.extend_from_slice(&7u32.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            out.extend(items.iter().map(|&b| b as u8));
        }
    }
}

fn padding(pos: u64) -> usize {
    ((ALIGNMENT - pos % ALIGNMENT) % ALIGNMENT) as usize
}

/// Writes a GGUF file: [`GgufWriter::start`] writes everything up to the data section, then
/// [`GgufWriter::write_tensor`] once per tensor in plan order.
pub struct GgufWriter<W: Write> {
    out: W,
    tensors: Vec<TensorInfo>,
    next: usize,
    pos: u64,
    in_tensor: u64,
}

impl<W: Write> GgufWriter<W> {
    pub fn start(
        mut out: W,
        metadata: &[(String, MetaValue)],
        tensors: Vec<TensorInfo>,
    ) -> Result<Self> {
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            put_str(&mut head, key);
            head.extend_from_slice(&value.type_id().to_le_bytes());
            put_value(&mut head, value);
        }
        let mut offset = 0u64;
        for t in &tensors {
            if t.name.len() > 64 {
                bail!("GGUF tensor name {} is longer than 64 bytes", t.name);
            }
            put_str(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            t.dims
                .iter()
                .for_each(|d| head.extend_from_slice(&d.to_le_bytes()));
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset += t.n_bytes();
            offset += padding(offset) as u64;
        }
        head.resize(head.len() + padding(head.len() as u64), 0);
        out.write_all(&head)?;
        Ok(GgufWriter {
            out,
            tensors,
            next: 0,
            pos: 0,
            in_tensor: 0,
        })
    }

    /// Writes the next tensor's encoded bytes (checked against its planned size) and padding.
    pub fn write_tensor(&mut self, bytes: &[u8]) -> Result<()> {
        self.write_chunk(bytes)?;
        self.end_tensor()
    }

    /// Appends part of the current tensor's encoded bytes.
    pub fn write_chunk(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(info) = self.tensors.get(self.next) else {
            bail!("internal: more tensors written than planned");
        };
        if self.in_tensor + bytes.len() as u64 > info.n_bytes() {
            bail!(
                "internal: tensor {} encodes to more than the planned {} bytes",
                info.name,
                info.n_bytes()
            );
        }
        self.out.write_all(bytes)?;
        self.in_tensor += bytes.len() as u64;
        Ok(())
    }

    /// Ends the current tensor: checks its size and pads to the alignment.
    pub fn end_tensor(&mut self) -> Result<()> {
        let Some(info) = self.tensors.get(self.next) else {
            bail!("internal: more tensors written than planned");
        };
        if self.in_tensor != info.n_bytes() {
            bail!(
                "internal: tensor {} encodes to {} bytes, planned {}",
                info.name,
                self.in_tensor,
                info.n_bytes()
            );
        }
        self.pos += self.in_tensor;
        self.in_tensor = 0;
        let pad = padding(self.pos);
        self.out.write_all(&vec![0u8; pad])?;
        self.pos += pad as u64;
        self.next += 1;
        Ok(())
    }

    pub fn finish(mut self) -> Result<W> {
        if self.next != self.tensors.len() {
            bail!(
                "internal: {} of {} tensors written",
                self.next,
                self.tensors.len()
            );
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_aligned_and_sized() {
        let tensors = vec![
            TensorInfo {
                name: "a".into(),
                dims: vec![3],
                ty: GgmlType::F32,
            },
            TensorInfo {
                name: "b".into(),
                dims: vec![32, 2],
                ty: GgmlType::Q8_0,
            },
        ];
        let meta = vec![(
            "general.architecture".to_string(),
            MetaValue::Str("x".into()),
        )];
        let mut w = GgufWriter::start(Vec::new(), &meta, tensors).unwrap();
        w.write_tensor(&[0u8; 12]).unwrap();
        assert!(w.write_tensor(&[0u8; 70]).is_err());
        w.end_tensor().unwrap_err();
        w.write_chunk(&[1u8; 2]).unwrap();
        w.write_tensor(&[1u8; 66]).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(&bytes[..4], b"GGUF");
        // header padded to 32, tensor a at 0 (12 bytes + 20 pad), b at 32 (68 bytes + 28 pad)
        assert_eq!(bytes.len() % 32, 0);
        let data = &bytes[bytes.len() - 128..];
        assert_eq!(&data[..12], &[0u8; 12][..]);
        assert_eq!(&data[32..100], &[1u8; 68][..]);
    }
}
