//! An OPCM state file (`opcm-state.json`) on arbitrary text, through
//! `smelt::methods::opcm::parse_state`. It must never panic, and what it accepts has finite
//! numbers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smelt::methods::opcm::parse_state;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    let Ok(s) = parse_state(&v) else {
        return;
    };
    assert!(s.alpha.is_finite(), "alpha {}", s.alpha);
    // one norm per model folded in; the weights digest a SHA-256 in hex
    assert_eq!(s.models.len(), s.prior.norms.len());
    assert!(s.weights.len() == 64 && s.weights.bytes().all(|c| c.is_ascii_hexdigit()));
});
