//! `adapter_config.json` (PEFT's LoRA config) on arbitrary text. It must never panic or hang
//! (the patterns are regexes from the file), and what it accepts has a positive rank.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use smelt::lora::AdapterConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = AdapterConfig::parse(text, Path::new("fuzz")) else {
        return;
    };
    assert!(cfg.max_rank() > 0, "a rank-0 adapter config was accepted");
});
