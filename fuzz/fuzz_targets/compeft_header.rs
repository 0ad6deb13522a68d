//! A ComPEFT vector file (`compeft.safetensors`: safetensors header, metadata and bit maps)
//! on arbitrary bytes, opened as smelt opens one. It must never panic, and what it accepts
//! has a finite, non-negative scale and bit maps sized for their shapes.
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use smelt::compeft::{Compressed, FILE_NAME};

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("smelt-fuzz-compeft-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    std::fs::write(d.join(FILE_NAME), data).unwrap();
    let Ok(c) = Compressed::open(&d) else {
        return;
    };
    assert!(c.scale.is_finite() && c.scale >= 0.0, "scale {}", c.scale);
    for (name, shape) in &c.shapes {
        let n: usize = shape.iter().product();
        assert!(c.has(name));
        let v = c.decompress(name).expect("an accepted tensor decompresses");
        assert_eq!(v.len(), n, "{name}");
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
    }
});
