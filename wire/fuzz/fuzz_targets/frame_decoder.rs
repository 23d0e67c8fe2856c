//! Arbitrary bytes into the frame decoder and the data-plane header/hello parsers: errors are
//! fine, panics, hangs and huge allocations are not.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = atoll_wire::FrameLimits {
        max_elements: 1 << 20,
    };
    if let Ok(frame) = atoll_wire::decode_frame(data, limits) {
        assert_eq!(
            frame.values.len() as u64,
            frame.shape.iter().product::<u64>()
        );
    }
    if data.len() >= atoll_link::data::HEADER_LEN {
        let mut header = [0u8; atoll_link::data::HEADER_LEN];
        header.copy_from_slice(&data[..atoll_link::data::HEADER_LEN]);
        if let Ok(h) = atoll_link::PartHeader::decode(&header, 1 << 24) {
            assert!(h.tensor < h.tensors);
            assert_eq!(atoll_link::PartHeader::decode(&h.encode(), 1 << 24), Ok(h));
        }
    }
    let _ = atoll_link::Hello::decode(data);
});
