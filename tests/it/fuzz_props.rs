//! The properties of three fuzz targets (fuzz/fuzz_targets/{adapter_config,compeft_header,
//! opcm_state}.rs), checked here on every test run with proptest: random bytes and mutations of
//! a valid file (byte flips, truncation, spliced bytes) go through the same parser the
//! target drives, which must not panic, and whatever it accepts must keep the target's
//! invariant. cargo-fuzz explores further by coverage (fuzz/run.sh); these keep the
//! invariants from regressing in CI.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use smelt::compeft::{Compressed, FILE_NAME};
use smelt::lora::AdapterConfig;
use smelt::methods::opcm::parse_state;

use crate::common::*;

/// One edit of a byte string.
#[derive(Clone, Debug)]
enum Edit {
    /// Set the byte at (position mod length).
    Set(usize, u8),
    /// Keep only the first (position mod length) bytes.
    Truncate(usize),
    /// Insert bytes at (position mod length).
    Insert(usize, Vec<u8>),
    /// Remove up to n bytes at (position mod length).
    Remove(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        2 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Edit::Insert(i, b)),
        2 => (any::<usize>(), 1usize..32).prop_map(|(i, n)| Edit::Remove(i, n)),
    ]
}

fn apply(mut v: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
        match e {
            Edit::Set(i, b) => {
                if !v.is_empty() {
                    let k = at(*i, v.len());
                    v[k] = *b;
                }
            }
            Edit::Truncate(i) => {
                let k = at(*i, v.len());
                v.truncate(k);
            }
            Edit::Insert(i, b) => {
                let k = at(*i, v.len() + 1);
                v.splice(k..k, b.iter().copied());
            }
            Edit::Remove(i, n) => {
                if !v.is_empty() {
                    let k = at(*i, v.len());
                    let end = (k + n).min(v.len());
                    v.drain(k..end);
                }
            }
        }
    }
    v
}

/// JSON-aware edits: replace a value's text by another token, so that mutations reach the
/// parser's field checks rather than stopping at the JSON syntax.
fn token() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "0",
        "-1",
        "1e309",
        "-0",
        "1.5",
        "18446744073709551616",
        "null",
        "true",
        "\"\"",
        "[]",
        "{}",
        "\"x\"",
        "NaN",
        "2",
    ])
}

fn swap_number(text: &str, which: usize, tok: &str) -> String {
    // the `which`-th run of digits (mod their count) becomes `tok`
    let runs: Vec<(usize, usize)> = {
        let b = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i].is_ascii_digit() {
                let s = i;
                while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                    i += 1;
                }
                out.push((s, i));
            } else {
                i += 1;
            }
        }
        out
    };
    if runs.is_empty() {
        return text.to_string();
    }
    let (s, e) = runs[which % runs.len()];
    format!("{}{}{}", &text[..s], tok, &text[e..])
}

// ---- adapter_config.json --------------------------------------------------------------------

fn adapter_seeds() -> &'static Vec<Vec<u8>> {
    static S: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    S.get_or_init(|| {
        let peft = root().join("tests/fixtures/peft");
        let mut v: Vec<Vec<u8>> = std::fs::read_dir(&peft)
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("adapter_config.json")).ok())
            .collect();
        v.sort();
        assert!(
            v.len() >= 3,
            "too few adapter configs under {}",
            peft.display()
        );
        v
    })
}

fn adapter_property(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = AdapterConfig::parse(text, Path::new("prop")) {
        assert!(cfg.max_rank() > 0, "a rank-0 adapter config was accepted");
    }
}

// ---- compeft.safetensors --------------------------------------------------------------------

fn compeft_seed() -> &'static Vec<u8> {
    static S: OnceLock<Vec<u8>> = OnceLock::new();
    S.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("c");
        let m = root().join("assets/models");
        let o = smelt()
            .arg("compress")
            .arg(m.join("math"))
            .arg("--base")
            .arg(m.join("base"))
            .arg("-o")
            .arg(&out)
            .args(["--device", "cpu"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(out.join(FILE_NAME)).unwrap()
    })
}

fn compeft_dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("smelt-prop-compeft-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fn compeft_property(data: &[u8]) {
    // proptest runs cases one after another in this thread; one file per thread keeps
    // parallel test threads apart
    let d =
        compeft_dir().join(format!("{:?}", std::thread::current().id()).replace(['(', ')'], ""));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(FILE_NAME), data).unwrap();
    let Ok(c) = Compressed::open(&d) else {
        return;
    };
    assert!(c.scale.is_finite() && c.scale >= 0.0, "scale {}", c.scale);
    for (name, shape) in &c.shapes {
        let n: usize = shape.iter().product();
        assert!(c.has(name), "{name}");
        let v = c.decompress(name).expect("an accepted tensor decompresses");
        assert_eq!(v.len(), n, "{name}");
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
    }
}

// ---- opcm-state.json ------------------------------------------------------------------------

fn state_seed() -> Vec<u8> {
    std::fs::read(root().join("fuzz/seeds/opcm_state/state-v2.json")).unwrap()
}

fn state_property(data: &[u8]) {
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
    assert_eq!(s.models.len(), s.prior.norms.len());
    assert!(s.weights.len() == 64 && s.weights.bytes().all(|c| c.is_ascii_hexdigit()));
}

#[test]
fn the_seeds_are_accepted() {
    // the mutations start from files the parsers accept, so they probe near valid input
    for s in adapter_seeds() {
        let text = std::str::from_utf8(s).unwrap();
        AdapterConfig::parse(text, Path::new("seed")).unwrap();
    }
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join(FILE_NAME), compeft_seed()).unwrap();
    let c = Compressed::open(d.path()).unwrap();
    assert!(!c.shapes.is_empty());
    let v: serde_json::Value = serde_json::from_slice(&state_seed()).unwrap();
    parse_state(&v).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn adapter_config_on_random_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        adapter_property(&data);
    }

    #[test]
    fn adapter_config_on_mutated_configs(
        k in any::<usize>(),
        edits in prop::collection::vec(edit(), 1..6),
        which in any::<usize>(),
        tok in token(),
    ) {
        let seeds = adapter_seeds();
        let seed = &seeds[k % seeds.len()];
        adapter_property(&apply(seed.clone(), &edits));
        let text = String::from_utf8(seed.clone()).unwrap();
        adapter_property(swap_number(&text, which, tok).as_bytes());
    }

    #[test]
    fn compeft_header_on_mutated_files(edits in prop::collection::vec(edit(), 1..6)) {
        compeft_property(&apply(compeft_seed().clone(), &edits));
    }

    #[test]
    fn compeft_header_with_numbers_swapped(which in any::<usize>(), tok in token()) {
        // numbers inside the JSON header (offsets, shapes, metadata), the length prefix kept
        let seed = compeft_seed();
        let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&seed[8..8 + n]).unwrap();
        let h = swap_number(header, which, tok);
        let mut f = (h.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(h.as_bytes());
        f.extend_from_slice(&seed[8 + n..]);
        compeft_property(&f);
    }

    #[test]
    fn opcm_state_on_mutated_states(
        edits in prop::collection::vec(edit(), 1..6),
        which in any::<usize>(),
        tok in token(),
    ) {
        let seed = state_seed();
        state_property(&apply(seed.clone(), &edits));
        let text = String::from_utf8(seed).unwrap();
        state_property(swap_number(&text, which, tok).as_bytes());
    }
}
