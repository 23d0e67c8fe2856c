//! Arbitrary payloads into every codec's decoder, for every length the input can claim.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let codec = atoll_wire::ALL_CODECS[data[0] as usize % atoll_wire::ALL_CODECS.len()];
    let n = u16::from_le_bytes([data[1], data[2]]) as usize % 4096;
    let mut out = vec![0.0f32; n];
    let _ = atoll_wire::decode(codec, &data[3..], atoll_wire::DEFAULT_BLOCK, &mut out);
});
