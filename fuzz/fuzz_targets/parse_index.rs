//! `model.safetensors.index.json` on arbitrary text. It must never panic, and no shard path
//! it accepts may leave the model folder (absolute, `..`, a drive or root prefix).
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use smelt::io::model::parse_index;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(shards) = parse_index(text) else {
        return;
    };
    let mut listed = 0;
    for (shard, tensors) in &shards {
        assert!(!shard.is_empty(), "an empty shard path was accepted");
        assert!(
            Path::new(shard)
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
            "shard path {shard:?} escapes the folder but was accepted"
        );
        assert!(!tensors.is_empty());
        listed += tensors.len();
    }
    // every weight_map entry lands in exactly one shard
    let v: serde_json::Value = serde_json::from_str(text).expect("accepted text is JSON");
    assert_eq!(listed, v["weight_map"].as_object().map_or(0, |m| m.len()));
});
