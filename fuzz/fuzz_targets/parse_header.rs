//! The safetensors header reader on arbitrary bytes, taken as a whole file. It must never
//! panic, and whatever it accepts must be safe to index with: every tensor's byte range inside
//! the data region, sized by its dtype and shape, and no two ranges overlapping.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smelt::io::safetensors::parse_header;

fuzz_target!(|data: &[u8]| {
    let file_len = data.len() as u64;
    let Ok(h) = parse_header(data, file_len) else {
        return;
    };
    assert!(h.data_start >= 8 && h.data_start as u64 <= file_len);
    let data_len = data.len() - h.data_start;
    let mut ranges = Vec::new();
    for t in &h.tensors {
        assert!(
            t.begin <= t.end && t.end <= data_len,
            "{t:?} is outside the data"
        );
        let bytes = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(t.dtype.size()))
            .expect("an accepted shape's byte count overflows");
        assert_eq!(
            t.end - t.begin,
            bytes,
            "{t:?}: range and dtype x shape disagree"
        );
        if t.end > t.begin {
            ranges.push((t.begin, t.end));
        }
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        assert!(w[1].0 >= w[0].1, "overlapping ranges accepted: {w:?}");
    }
    let mut names: Vec<&str> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "a duplicate tensor name was accepted");
});
