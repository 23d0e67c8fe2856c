//! Data-plane messages. A learner opens its connection with a [`Hello`] on a bidirectional
//! stream; afterwards every unidirectional stream carries one part: a fixed [`PartHeader`]
//! followed by exactly one ATF1 frame (one part of a fragment: a tensor, or a run of a larger
//! tensor's values; see atoll-coordinator's plan). Parts of one message (a
//! contribution, an update, a full fragment) may travel on different streams or connections and
//! are reassembled by (fragment, round or version).
//!
//! Header layout (little-endian, 60 bytes):
//! ```text
//! magic "ATP1" | version u8 | kind u8 | reserved u16 | fragment u32 | round_or_version u64
//! | base_version u64 | steps u64 | tokens u64 | part u32 | parts u32 | frame_len u32
//! ```

use thiserror::Error;

pub const PART_MAGIC: [u8; 4] = *b"ATP1";
pub const HELLO_MAGIC: [u8; 4] = *b"ATH1";
pub const DATA_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 60;
const MAX_TOKEN_LEN: usize = 256;

#[derive(Debug, Error, PartialEq)]
pub enum DataError {
    #[error("bad magic {0:?}: not an Atoll data-plane message")]
    BadMagic([u8; 4]),
    #[error("data-plane version {0} is not supported (this build speaks {DATA_VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown part kind {0}")]
    UnknownKind(u8),
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: u64, limit: u64 },
    #[error("part {part} of {parts} is out of range")]
    BadPartIndex { part: u32, parts: u32 },
    #[error("truncated message")]
    Truncated,
    #[error("session token longer than {MAX_TOKEN_LEN} bytes")]
    TokenTooLong,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartKind {
    /// Learner → coordinator: one part of a fragment's outer gradient.
    Contribution = 1,
    /// Coordinator → learner: one part of the encoded update from `base_version`.
    Update = 2,
    /// Coordinator → learner: one part of the full fragment (f32), for catch-up or when the
    /// learner lacks the base of an update.
    Full = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartHeader {
    pub kind: PartKind,
    pub fragment: u32,
    /// The round for a contribution, the new version for an update or a full fragment.
    pub round_or_version: u64,
    pub base_version: u64,
    pub steps: u64,
    pub tokens: u64,
    /// This part's index in the message, in the plan's part order.
    pub part: u32,
    /// Parts in the message.
    pub parts: u32,
    pub frame_len: u32,
}

impl PartHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&PART_MAGIC);
        b[4] = DATA_VERSION;
        b[5] = self.kind as u8;
        b[8..12].copy_from_slice(&self.fragment.to_le_bytes());
        b[12..20].copy_from_slice(&self.round_or_version.to_le_bytes());
        b[20..28].copy_from_slice(&self.base_version.to_le_bytes());
        b[28..36].copy_from_slice(&self.steps.to_le_bytes());
        b[36..44].copy_from_slice(&self.tokens.to_le_bytes());
        b[44..48].copy_from_slice(&self.part.to_le_bytes());
        b[48..52].copy_from_slice(&self.parts.to_le_bytes());
        b[52..56].copy_from_slice(&self.frame_len.to_le_bytes());
        b
    }

    /// Parses and checks a header; `max_frame` bounds the frame that follows.
    pub fn decode(b: &[u8; HEADER_LEN], max_frame: u64) -> Result<Self, DataError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != PART_MAGIC {
            return Err(DataError::BadMagic(magic));
        }
        if b[4] != DATA_VERSION {
            return Err(DataError::UnsupportedVersion(b[4]));
        }
        let kind = match b[5] {
            1 => PartKind::Contribution,
            2 => PartKind::Update,
            3 => PartKind::Full,
            k => return Err(DataError::UnknownKind(k)),
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        let header = PartHeader {
            kind,
            fragment: u32_at(8),
            round_or_version: u64_at(12),
            base_version: u64_at(20),
            steps: u64_at(28),
            tokens: u64_at(36),
            part: u32_at(44),
            parts: u32_at(48),
            frame_len: u32_at(52),
        };
        if header.part >= header.parts {
            return Err(DataError::BadPartIndex {
                part: header.part,
                parts: header.parts,
            });
        }
        if header.frame_len as u64 > max_frame {
            return Err(DataError::TooLarge {
                len: header.frame_len as u64,
                limit: max_frame,
            });
        }
        Ok(header)
    }
}

/// The first message of a learner's data connection: its session token from Join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub session: String,
}

impl Hello {
    pub fn encode(&self) -> Result<Vec<u8>, DataError> {
        let token = self.session.as_bytes();
        if token.len() > MAX_TOKEN_LEN {
            return Err(DataError::TokenTooLong);
        }
        let mut b = Vec::with_capacity(7 + token.len());
        b.extend_from_slice(&HELLO_MAGIC);
        b.push(DATA_VERSION);
        b.extend_from_slice(&(token.len() as u16).to_le_bytes());
        b.extend_from_slice(token);
        Ok(b)
    }

    pub fn decode(b: &[u8]) -> Result<Self, DataError> {
        if b.len() < 7 {
            return Err(DataError::Truncated);
        }
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != HELLO_MAGIC {
            return Err(DataError::BadMagic(magic));
        }
        if b[4] != DATA_VERSION {
            return Err(DataError::UnsupportedVersion(b[4]));
        }
        let len = u16::from_le_bytes([b[5], b[6]]) as usize;
        if len > MAX_TOKEN_LEN {
            return Err(DataError::TokenTooLong);
        }
        let token = b.get(7..7 + len).ok_or(DataError::Truncated)?;
        Ok(Hello {
            session: String::from_utf8_lossy(token).into_owned(),
        })
    }

    /// Upper bound of an encoded hello, for reading it with a limit.
    pub const MAX_LEN: usize = 7 + MAX_TOKEN_LEN;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PartHeader {
        PartHeader {
            kind: PartKind::Update,
            fragment: 3,
            round_or_version: 17,
            base_version: 16,
            steps: 24,
            tokens: 24 * 1024,
            part: 1,
            parts: 4,
            frame_len: 1000,
        }
    }

    #[test]
    fn headers_round_trip_and_bad_ones_are_named() {
        let h = header();
        assert_eq!(PartHeader::decode(&h.encode(), 1 << 20), Ok(h));
        assert_eq!(
            PartHeader::decode(&h.encode(), 999),
            Err(DataError::TooLarge {
                len: 1000,
                limit: 999
            })
        );
        let mut b = h.encode();
        b[4] = 9;
        assert_eq!(
            PartHeader::decode(&b, 1 << 20),
            Err(DataError::UnsupportedVersion(9))
        );
        let mut b = h.encode();
        b[5] = 7;
        assert_eq!(
            PartHeader::decode(&b, 1 << 20),
            Err(DataError::UnknownKind(7))
        );
        let mut b = h.encode();
        b[0] = b'X';
        assert!(matches!(
            PartHeader::decode(&b, 1 << 20),
            Err(DataError::BadMagic(_))
        ));
        let bad = PartHeader { part: 4, ..h };
        assert_eq!(
            PartHeader::decode(&bad.encode(), 1 << 20),
            Err(DataError::BadPartIndex { part: 4, parts: 4 })
        );
    }

    #[test]
    fn hellos_round_trip_and_truncation_is_caught() {
        let h = Hello {
            session: "abc123".into(),
        };
        let b = h.encode().unwrap();
        assert_eq!(Hello::decode(&b), Ok(h));
        assert_eq!(Hello::decode(&b[..b.len() - 1]), Err(DataError::Truncated));
        assert_eq!(Hello::decode(&b[..3]), Err(DataError::Truncated));
        assert!(Hello {
            session: "x".repeat(300)
        }
        .encode()
        .is_err());
    }
}
