//! Reliability: hostile input files, interruption and resume, a full disk, a GPU that
//! fails mid-merge, `smelt verify`, and output that does not depend on thread counts or tiles.
//!
//! Every bad input is made by the test in a temporary folder from copies of
//! tests/fixtures/mergekit/models and run through the real binary. Expected values come from
//! the input files (read here by hand, independently of the crate's reader) or from an
//! uninterrupted run, never from the code under test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use proptest::prelude::*;
use serde_json::Value;
use smelt::backend::cpu::Cpu;
use smelt::backend::gpu::{Gpu, GpuOptions};
use smelt::dtype::DType;

/// Three fine-tunes on a base: the recipe every broken input is fed through.
const GOOD: &str = "merge_method: ties
base_model: models/base
models:
  - model: models/ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: models/ft2
    parameters: {weight: 0.7, density: 0.6}
  - model: models/ft3
    parameters: {weight: 0.5, density: 0.4}
dtype: float32
";

const PARTIAL: &str = ".out.smelt-partial";
const JOURNAL: &str = "progress.json";
const MANIFEST: &str = "smelt-manifest.json";
const INDEX: &str = "model.safetensors.index.json";

/// What the reliability tests ask of the sandbox besides the common ones.
impl Setup {
    fn partial(&self) -> PathBuf {
        self.dir().join(PARTIAL)
    }
    /// Names in the temporary folder (the output, the partial folder or anything hidden
    /// would show here).
    fn entries(&self) -> BTreeSet<String> {
        names_in(self.dir())
    }
}

fn names_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect()
}

/// The result is a clean error: exit status 1 (not a panic's 101, not a signal).
#[track_caller]
fn assert_clean_failure(o: &Output, what: &str) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{what}: expected exit status 1, got {:?}\nstdout: {}\nstderr: {err}",
        o.status,
        stdout(o)
    );
    assert!(!err.contains("panicked"), "{what}: panicked:\n{err}");
}

// ---- safetensors files taken apart by hand -------------------------------------------------

/// A safetensors file as its header entries (in file order) and its data region, read here
/// without the crate's reader.
struct RawSt {
    entries: Vec<(String, Value)>,
    data: Vec<u8>,
}

impl RawSt {
    fn read(path: &Path) -> RawSt {
        let b = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let v: serde_json::Map<String, Value> = serde_json::from_slice(&b[8..8 + n]).unwrap();
        RawSt {
            entries: v.into_iter().collect(),
            data: b[8 + n..].to_vec(),
        }
    }
    fn entry(&mut self, name: &str) -> &mut Value {
        &mut self
            .entries
            .iter_mut()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
            .1
    }
    fn offsets(&self, name: &str) -> (usize, usize) {
        let e = &self.entries.iter().find(|(n, _)| n == name).unwrap().1;
        let o = e["data_offsets"].as_array().unwrap();
        (
            o[0].as_u64().unwrap() as usize,
            o[1].as_u64().unwrap() as usize,
        )
    }
    fn tensor_names(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| n != "__metadata__")
            .collect()
    }
    /// The header as JSON text, written entry by entry (so that duplicate names survive).
    fn header_text(&self) -> String {
        let parts: Vec<String> = self
            .entries
            .iter()
            .map(|(n, v)| format!("{}:{v}", serde_json::to_string(n).unwrap()))
            .collect();
        format!("{{{}}}", parts.join(","))
    }
    fn write(&self, path: &Path) {
        write_raw(path, self.header_text().as_bytes(), &self.data);
    }
    /// Sets element `i` of F32 tensor `name` to `x`.
    fn set_f32(&mut self, name: &str, i: usize, x: f32) {
        let (b, _) = self.offsets(name);
        self.data[b + 4 * i..b + 4 * i + 4].copy_from_slice(&x.to_le_bytes());
    }
}

/// 8-byte length, header bytes as given, data.
fn write_raw(path: &Path, header: &[u8], data: &[u8]) {
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header);
    f.extend_from_slice(data);
    std::fs::write(path, f).unwrap();
}

/// Rewrites a file's first 8 bytes (the header length).
fn set_header_len(path: &Path, n: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[..8].copy_from_slice(&n.to_le_bytes());
    std::fs::write(path, b).unwrap();
}

fn edit_st(path: &Path, f: impl FnOnce(&mut RawSt)) {
    let mut st = RawSt::read(path);
    f(&mut st);
    st.write(path);
}

/// Moves ft2's weights out to `models/x.safetensors` and writes ft2's index pointing at
/// `shard` for every tensor.
fn index_to(s: &Setup, shard: &str) {
    let outside = s.models.join("x.safetensors");
    std::fs::rename(s.st("ft2"), &outside).unwrap();
    let map: serde_json::Map<String, Value> = RawSt::read(&outside)
        .tensor_names()
        .into_iter()
        .map(|n| (n, Value::from(shard)))
        .collect();
    write_index(
        s,
        "ft2",
        &serde_json::json!({"metadata": {}, "weight_map": map}),
    );
}

fn write_index(s: &Setup, m: &str, v: &Value) {
    std::fs::write(
        s.model(m).join(INDEX),
        serde_json::to_string_pretty(v).unwrap(),
    )
    .unwrap();
}

// ---- the catalogue of bad inputs ---------------------------------------------------------

struct Bad {
    what: &'static str,
    /// Breaks the copied inputs and returns the recipe text to merge.
    make: fn(&Setup) -> String,
    /// Extra `merge` arguments.
    args: &'static [&'static str],
    /// Every one must appear in the error message.
    says: &'static [&'static str],
}

const Q_PROJ0: &str = "model.layers.0.self_attn.q_proj.weight";
const Q_PROJ1: &str = "model.layers.1.self_attn.q_proj.weight";
const UP0: &str = "model.layers.0.mlp.up_proj.weight";
const UP1: &str = "model.layers.1.mlp.up_proj.weight";
const NORM: &str = "model.norm.weight";

fn good(_: &Setup) -> String {
    GOOD.to_string()
}

fn catalogue() -> Vec<Bad> {
    vec![
        Bad {
            what: "header length field absurd (1 TiB)",
            make: |s| {
                set_header_len(&s.st("ft1"), 1 << 40);
                good(s)
            },
            args: &[],
            says: &[
                "models/ft1/model.safetensors",
                "header length",
                "1099511627776",
                "limit",
            ],
        },
        Bad {
            what: "header length field past the end of the file",
            make: |s| {
                set_header_len(&s.st("ft1"), 50_000_000);
                good(s)
            },
            args: &[],
            says: &[
                "models/ft1/model.safetensors",
                "header length",
                "50000000",
                "truncated",
            ],
        },
        Bad {
            what: "overlapping data offsets",
            make: |s| {
                edit_st(&s.st("ft2"), |st| {
                    let (b, e) = st.offsets(Q_PROJ0);
                    st.entry(Q_PROJ1)["data_offsets"] = serde_json::json!([b, e]);
                });
                good(s)
            },
            args: &[],
            says: &["models/ft2/model.safetensors", "overlap", Q_PROJ0, Q_PROJ1],
        },
        Bad {
            what: "data offsets past the end of the file",
            make: |s| {
                edit_st(&s.st("ft2"), |st| {
                    let end = st.data.len() as u64;
                    st.entry(NORM)["data_offsets"] = serde_json::json!([end, end + 192]);
                });
                good(s)
            },
            args: &[],
            says: &["models/ft2/model.safetensors", NORM, "past the end"],
        },
        Bad {
            what: "dtype and byte range disagree",
            make: |s| {
                // 96 x 48 BF16 is 9216 bytes; the range still holds the F32 tensor's 18432
                edit_st(&s.st("ft3"), |st| st.entry(UP0)["dtype"] = "BF16".into());
                good(s)
            },
            args: &[],
            says: &["models/ft3/model.safetensors", UP0, "9216", "18432"],
        },
        Bad {
            what: "shape and byte range disagree",
            make: |s| {
                edit_st(&s.st("ft3"), |st| {
                    st.entry(UP1)["shape"] = serde_json::json!([96, 47])
                });
                good(s)
            },
            args: &[],
            says: &["models/ft3/model.safetensors", UP1, "18048", "18432"],
        },
        Bad {
            what: "a tensor name that is not UTF-8",
            make: |s| {
                let st = RawSt::read(&s.st("ft1"));
                let mut h = st.header_text().into_bytes();
                let at = find(&h, b"model.norm.weight").unwrap();
                h[at + 6] = 0xff; // the `n` of `norm`, inside the JSON string
                write_raw(&s.st("ft1"), &h, &st.data);
                good(s)
            },
            args: &[],
            says: &["models/ft1/model.safetensors", "UTF-8"],
        },
        Bad {
            what: "the same tensor name twice",
            make: |s| {
                edit_st(&s.st("ft2"), |st| {
                    let i = st.entries.iter().position(|(n, _)| n == Q_PROJ1).unwrap();
                    st.entries[i].0 = Q_PROJ0.to_string();
                });
                good(s)
            },
            args: &[],
            says: &["models/ft2/model.safetensors", Q_PROJ0, "twice"],
        },
        Bad {
            what: "an empty file",
            make: |s| {
                std::fs::write(s.st("ft3"), b"").unwrap();
                good(s)
            },
            args: &[],
            says: &["models/ft3/model.safetensors", "empty"],
        },
        Bad {
            what: "a file of 5 bytes",
            make: |s| {
                std::fs::write(s.st("ft3"), b"\x10\x00\x00\x00\x00").unwrap();
                good(s)
            },
            args: &[],
            says: &["models/ft3/model.safetensors", "5 bytes"],
        },
        Bad {
            what: "a header that is not a JSON object",
            make: |s| {
                let st = RawSt::read(&s.st("ft1"));
                write_raw(&s.st("ft1"), b"[1, 2, 3]", &st.data);
                good(s)
            },
            args: &[],
            says: &["models/ft1/model.safetensors", "JSON object"],
        },
        Bad {
            what: "a dtype smelt cannot merge",
            make: |s| {
                // I32 has F32's size, so the header itself is consistent
                edit_st(&s.st("ft2"), |st| st.entry(NORM)["dtype"] = "I32".into());
                good(s)
            },
            args: &[],
            says: &["models/ft2", NORM, "I32"],
        },
        Bad {
            what: "index shard ../x.safetensors",
            make: |s| {
                index_to(s, "../x.safetensors");
                good(s)
            },
            args: &[],
            says: &[
                "models/ft2/model.safetensors.index.json",
                "../x.safetensors",
                "escapes",
            ],
        },
        Bad {
            what: "index shard by absolute path",
            make: |s| {
                let abs = s.models.join("x.safetensors");
                index_to(s, abs.to_str().unwrap());
                good(s)
            },
            args: &[],
            says: &[
                "models/ft2/model.safetensors.index.json",
                "/x.safetensors",
                "escapes",
            ],
        },
        Bad {
            what: "index shard that is a symlink out of the folder",
            make: |s| {
                index_to(s, "shard.safetensors");
                std::os::unix::fs::symlink(
                    s.models.join("x.safetensors"),
                    s.model("ft2").join("shard.safetensors"),
                )
                .unwrap();
                good(s)
            },
            args: &[],
            says: &[
                "models/ft2",
                "shard.safetensors",
                "outside the model folder",
            ],
        },
        Bad {
            what: "index lists a tensor its shard lacks",
            make: |s| {
                let mut map: serde_json::Map<String, Value> = RawSt::read(&s.st("ft2"))
                    .tensor_names()
                    .into_iter()
                    .map(|n| (n, Value::from("model.safetensors")))
                    .collect();
                map.insert(
                    "model.layers.0.mlp.extra_proj.weight".into(),
                    "model.safetensors".into(),
                );
                write_index(s, "ft2", &serde_json::json!({"weight_map": map}));
                good(s)
            },
            args: &[],
            says: &[
                "models/ft2/model.safetensors",
                "model.layers.0.mlp.extra_proj.weight",
                "no such tensor",
            ],
        },
        Bad {
            what: "index lists a shard that does not exist",
            make: |s| {
                write_index(
                    s,
                    "ft2",
                    &serde_json::json!({"weight_map": {NORM: "model-00009-of-00009.safetensors"}}),
                );
                good(s)
            },
            args: &[],
            says: &[
                "models/ft2/model.safetensors.index.json",
                "model-00009-of-00009.safetensors",
            ],
        },
        Bad {
            what: "index that is not JSON",
            make: |s| {
                std::fs::write(s.model("ft2").join(INDEX), "{\"weight_map\": {oops").unwrap();
                good(s)
            },
            args: &[],
            says: &["models/ft2/model.safetensors.index.json", "JSON"],
        },
        Bad {
            what: "index without weight_map",
            make: |s| {
                write_index(
                    s,
                    "ft2",
                    &serde_json::json!({"metadata": {"total_size": 216000}}),
                );
                good(s)
            },
            args: &[],
            says: &["models/ft2/model.safetensors.index.json", "weight_map"],
        },
        Bad {
            what: "YAML nested 1000 deep",
            make: |_| {
                GOOD.replacen(
                    "weight: 1.0,",
                    &format!("weight: {}1.0{},", "[".repeat(1000), "]".repeat(1000)),
                    1,
                )
            },
            args: &[],
            says: &["recipe.yml", "line 5", "nested more than 64 deep"],
        },
        Bad {
            what: "a number too big for f64",
            make: |_| GOOD.replacen("weight: 1.0", "weight: 1e400", 1),
            args: &[],
            says: &["recipe.yml", "models[0]", "weight", "finite"],
        },
        Bad {
            what: "a NaN parameter",
            make: |_| GOOD.replacen("density: 0.6", "density: .nan", 1),
            args: &[],
            says: &["recipe.yml", "models[1]", "density", "NaN"],
        },
        Bad {
            what: "negative density",
            make: |_| GOOD.replacen("density: 0.4", "density: -0.25", 1),
            args: &[],
            says: &["recipe.yml", "models[2]", "density", "-0.25"],
        },
        Bad {
            what: "density above 1",
            make: |_| GOOD.replacen("density: 0.5", "density: [0.2, 1.5]", 1),
            args: &[],
            says: &["recipe.yml", "models[0]", "density", "1.5"],
        },
        Bad {
            what: "an unknown key",
            make: |_| format!("{GOOD}normalise_everything: true\n"),
            args: &[],
            says: &["recipe.yml", "normalise_everything"],
        },
        Bad {
            what: "an unknown method",
            make: |_| GOOD.replace("merge_method: ties", "merge_method: frobnicate"),
            args: &[],
            says: &["recipe.yml", "frobnicate", "dare_ties", "task_arithmetic"],
        },
        Bad {
            what: "an unknown parameter",
            make: |_| GOOD.replacen("density: 0.6", "densty: 0.6", 1),
            args: &[],
            says: &["recipe.yml", "densty", "density"],
        },
        Bad {
            what: "a parameter of the wrong type",
            make: |_| GOOD.replacen("weight: 0.7", "weight: heavy", 1),
            args: &[],
            says: &["recipe.yml", "models[1]", "weight", "heavy"],
        },
        Bad {
            what: "a key of the wrong type",
            make: |_| {
                "merge_method: ties\nbase_model: models/base\nmodels: 5\ndtype: float32\n".into()
            },
            args: &[],
            says: &["recipe.yml", "models", "wrong type"],
        },
        Bad {
            what: "config.json malformed",
            make: |s| {
                std::fs::write(s.model("ft1").join("config.json"), "{\"model_type\": ").unwrap();
                good(s)
            },
            args: &[],
            says: &["models/ft1/config.json", "JSON"],
        },
        Bad {
            what: "config.json not an object",
            make: |s| {
                std::fs::write(s.model("ft3").join("config.json"), "[1, 2, 3]").unwrap();
                good(s)
            },
            args: &[],
            says: &["models/ft3/config.json", "not a JSON object"],
        },
        Bad {
            what: "a model whose tensors skip a layer",
            make: |s| {
                // two layers' worth of tensors, numbered 0 and 2
                edit_st(&s.st("ft2"), |st| {
                    for (n, _) in st.entries.iter_mut() {
                        *n = n.replace("layers.1.", "layers.2.");
                    }
                });
                good(s)
            },
            args: &[],
            says: &["models/ft2", "layer 1"],
        },
        Bad {
            what: "a NaN inside an input tensor",
            make: |s| {
                edit_st(&s.st("ft1"), |st| st.set_f32(UP1, 77, f32::NAN));
                good(s)
            },
            args: &[],
            says: &["models/ft1", UP1, "NaN", "element 77", "--allow-nonfinite"],
        },
        Bad {
            what: "an infinity inside the base",
            make: |s| {
                edit_st(&s.st("base"), |st| st.set_f32(NORM, 5, f32::NEG_INFINITY));
                good(s)
            },
            args: &[],
            says: &[
                "models/base",
                NORM,
                "-inf",
                "element 5",
                "--allow-nonfinite",
            ],
        },
        Bad {
            what: "a float16 output that overflows",
            make: |_| {
                // finite in f32, beyond float16's largest value 65504 once written
                "merge_method: linear
models:
  - {model: models/ft1, parameters: {weight: 100000.0}}
  - {model: models/ft2, parameters: {weight: 100000.0}}
parameters: {normalize: false}
dtype: float32
out_dtype: float16
"
                .into()
            },
            args: &[],
            says: &["tensor", "inf", "float16", "65504"],
        },
        Bad {
            what: "a float32 merge that overflows",
            make: |_| {
                "merge_method: task_arithmetic
base_model: models/base
models:
  - {model: models/ft1, parameters: {weight: 1.0e38}}
  - {model: models/ft2, parameters: {weight: 1.0e38}}
  - {model: models/ft3, parameters: {weight: 1.0e38}}
parameters: {lambda: 1.0e38}
dtype: float32
"
                .into()
            },
            args: &[],
            says: &["tensor", "inf", "finite inputs"],
        },
    ]
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn catalogue_of_bad_inputs() {
    // The unbroken setup merges: every failure below is the breakage's doing.
    let s = Setup::new();
    let o = run_merge(&s.recipe(GOOD), &s.out(), &[]);
    assert!(o.status.success(), "the good recipe fails: {}", stderr(&o));

    let cases = catalogue();
    assert!(cases.len() >= 25, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let s = Setup::new();
        let recipe = s.recipe(&(case.make)(&s));
        let before = s.entries();
        let o = run_merge(&recipe, &s.out(), case.args);
        let err = stderr(&o);
        let mut problems = Vec::new();
        if o.status.code() != Some(1) {
            problems.push(format!("exit status {:?}, not 1", o.status));
        }
        if err.contains("panicked") {
            problems.push("panicked".into());
        }
        for n in case.says {
            if !err.contains(n) {
                problems.push(format!("the message does not mention {n:?}"));
            }
        }
        if s.out().exists() {
            problems.push("OUT exists".into());
        }
        if s.partial().exists() {
            problems.push(format!("{PARTIAL} exists"));
        }
        let after = s.entries();
        for extra in after.difference(&before) {
            problems.push(format!("left behind: {extra}"));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {}\n    stderr: {}",
                case.what,
                problems.join("; "),
                err.trim().replace('\n', "\n            ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad inputs were not handled:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
}

/// Non-finite inputs are refused by default (catalogue) and merged on request.
#[test]
fn allow_nonfinite_merges_what_is_refused_by_default() {
    let s = Setup::new();
    edit_st(&s.st("ft1"), |st| st.set_f32(UP1, 77, f32::NAN));
    edit_st(&s.st("ft2"), |st| st.set_f32(NORM, 3, f32::INFINITY));
    let recipe = s.recipe(GOOD);
    let o = run_merge(&recipe, &s.out(), &[]);
    assert_clean_failure(&o, "NaN input without --allow-nonfinite");
    assert!(!s.out().exists());

    let o = run_merge(&recipe, &s.out(), &["--allow-nonfinite"]);
    assert!(o.status.success(), "--allow-nonfinite: {}", stderr(&o));
    let merged = load_dir(&s.out());
    assert_eq!(merged.len(), 21);
    // tensors without a non-finite input come out finite
    for (name, t) in &merged {
        if name != UP1 && name != NORM {
            assert!(t.data.iter().all(|x| x.is_finite()), "{name} is not finite");
        }
    }
}

/// GTA merges on the CPU look for NaN and infinity while they merge instead of scanning the
/// inputs first: the error must still name the model, tensor and element for each way the
/// family sparsifies, and a delta that overflows from finite inputs must not be blamed on them.
#[test]
fn gta_merges_name_nonfinite_inputs_found_on_the_way() {
    for method in [
        "task_arithmetic",
        "ties",
        "dare_ties",
        "breadcrumbs_ties",
        "della",
    ] {
        let s = Setup::new();
        edit_st(&s.st("ft2"), |st| st.set_f32(UP1, 123, f32::INFINITY));
        let recipe =
            s.recipe(&GOOD.replace("merge_method: ties", &format!("merge_method: {method}")));
        let o = run_merge(&recipe, &s.out(), &[]);
        assert_clean_failure(&o, method);
        let e = stderr(&o);
        for n in ["models/ft2", UP1, "inf", "element 123", "--allow-nonfinite"] {
            assert!(
                e.contains(n),
                "{method}: the message does not mention {n:?}: {e}"
            );
        }
        assert!(!s.out().exists(), "{method}");
    }
    // finite inputs: 3e38 - (-3e38) overflows to a delta of +inf, and so does the merge
    let s = Setup::new();
    edit_st(&s.st("base"), |st| st.set_f32(NORM, 2, -3e38));
    edit_st(&s.st("ft1"), |st| st.set_f32(NORM, 2, 3e38));
    let recipe = s.recipe(&GOOD.replace("merge_method: ties", "merge_method: task_arithmetic"));
    let o = run_merge(&recipe, &s.out(), &[]);
    assert_clean_failure(&o, "overflowing delta");
    let e = stderr(&o);
    assert!(e.contains("from finite inputs") && e.contains(NORM), "{e}");
    assert!(!e.contains("models/ft1"), "finite inputs blamed: {e}");
    // finite inputs and deltas, a weight that takes one element past f32's range
    let s = Setup::new();
    edit_st(&s.st("ft1"), |st| st.set_f32(NORM, 4, 1e4));
    let text = GOOD
        .replace("merge_method: ties", "merge_method: task_arithmetic")
        .replace("weight: 1.0,", "weight: 1.0e+36,");
    let o = run_merge(&s.recipe(&text), &s.out(), &[]);
    assert_clean_failure(&o, "overflowing weight");
    let e = stderr(&o);
    assert!(e.contains("from finite inputs"), "{e}");
    assert!(!s.out().exists());
    // linear looks on the way too (no base: every input it reads is decoded)
    let linear = |w1: &str| {
        format!(
            "merge_method: linear\nmodels:\n  - model: models/ft1\n    parameters: {{weight: {w1}}}\n  - model: models/ft2\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
        )
    };
    let s = Setup::new();
    edit_st(&s.st("ft2"), |st| st.set_f32(UP1, 123, f32::NAN));
    let o = run_merge(&s.recipe(&linear("1.0")), &s.out(), &[]);
    assert_clean_failure(&o, "linear, NaN input");
    let e = stderr(&o);
    for n in ["models/ft2", UP1, "NaN", "element 123"] {
        assert!(
            e.contains(n),
            "linear: the message does not mention {n:?}: {e}"
        );
    }
    let s = Setup::new();
    edit_st(&s.st("ft1"), |st| st.set_f32(NORM, 4, 1e4));
    let o = run_merge(&s.recipe(&linear("1.0e+36")), &s.out(), &[]);
    assert_clean_failure(&o, "linear, overflowing weight");
    assert!(stderr(&o).contains("from finite inputs"), "{}", stderr(&o));
    assert!(!s.out().exists());
}

/// A recipe of a few hundred kilobytes must be refused as quickly as a small one: the YAML
/// reader may not take time quadratic in the nesting depth (found by hand while writing the
/// catalogue: 100,000 nested `[` took about 40 s, `{a: ` nesting about as long).
#[test]
fn deeply_nested_yaml_is_refused_quickly() {
    let s = Setup::new();
    for (what, text) in [
        (
            "[ x 100000",
            GOOD.replacen(
                "weight: 1.0,",
                &format!("weight: {}", "[".repeat(100_000)),
                1,
            ),
        ),
        (
            "{a: x 60000",
            GOOD.replacen(
                "weight: 1.0,",
                &format!("weight: {}1{},", "{a: ".repeat(60_000), "}".repeat(60_000)),
                1,
            ),
        ),
    ] {
        let recipe = s.recipe(&text);
        let o = run_with_deadline(
            merge_cmd(&recipe, &s.out(), &[], &[]),
            Duration::from_secs(5),
        );
        let Some(o) = o else {
            panic!("{what}: the recipe was still being read after 5 s");
        };
        assert_clean_failure(&o, what);
        assert!(stderr(&o).contains("recipe.yml"), "{what}: {}", stderr(&o));
        assert!(!s.out().exists());
    }
}

/// A tensor named with a layer number of usize::MAX must be an error, not a panic (found by
/// hand: `layer + 1` wraps and the layer check unwraps nothing).
#[test]
fn absurd_layer_number_is_an_error() {
    let s = Setup::new();
    for m in ["base", "ft1", "ft2", "ft3"] {
        edit_st(&s.st(m), |st| {
            let end = st.data.len();
            st.entries.push((
                format!("model.layers.{}.input_layernorm.weight", usize::MAX),
                serde_json::json!({"dtype": "F32", "shape": [48], "data_offsets": [end, end + 192]}),
            ));
            st.data.extend_from_slice(&[0u8; 192]);
        });
    }
    let o = run_merge(&s.recipe(GOOD), &s.out(), &[]);
    assert_clean_failure(&o, "layer usize::MAX");
    let e = stderr(&o);
    assert!(
        e.contains("/models/") && e.contains(&format!("layer number {}", usize::MAX)),
        "{e}"
    );
    assert!(!s.out().exists());
}

/// Runs a command, killing it if it is still running after `limit`.
fn run_with_deadline(mut c: Command, limit: Duration) -> Option<Output> {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- interruption and resume -------------------------------------------------------------

/// Output shards of a few tensors each (the fixture models hold 216 KB of tensors).
const SHARDS: [&str; 4] = ["--out-shard-size", "40KB", "--seed", "7"];

/// The shard files an interrupted run's journal lists as finished (none while it is being
/// replaced, or before it exists).
fn finished_shards(partial: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(partial.join(JOURNAL)) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<Value>(&text) else {
        return Vec::new();
    };
    v["shards"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Starts a throttled merge, waits until the journal lists at least `shards` finished shards,
/// sends `signal` and returns what the process did.
fn interrupt(mut c: Command, partial: &Path, shards: usize, signal: &str) -> Output {
    c.env("SMELT_THROTTLE_MS", "150");
    let mut child: Child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while finished_shards(partial).len() < shards {
        if let Some(st) = child.try_wait().unwrap() {
            let o = child.wait_with_output().unwrap();
            panic!(
                "the merge ended ({st}) before {shards} shards were finished: {}",
                stderr(&o)
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no {shards} finished shards after 60 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = child.id().to_string();
    let k = Command::new("kill")
        .args([signal, &pid])
        .status()
        .expect("run kill");
    assert!(k.success(), "kill {signal} {pid}");
    child.wait_with_output().unwrap()
}

/// An interrupted run leaves a partial folder that cannot be mistaken for output.
#[track_caller]
fn assert_stopped(s: &Setup, o: &Output, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(130),
        "{what}: exit status {:?}, stderr: {}",
        o.status,
        stderr(o)
    );
    assert!(
        stderr(o).contains("--resume"),
        "{what}: no hint: {}",
        stderr(o)
    );
    assert!(!s.out().exists(), "{what}: OUT exists after a stop");
    assert!(s.partial().is_dir(), "{what}: no partial folder kept");
    assert!(
        !s.partial().join(MANIFEST).exists(),
        "{what}: the partial folder has a manifest"
    );
    assert!(!s.partial().join(INDEX).exists());
}

/// Tensors in a shard file, from its header.
fn tensors_in(shard: &Path) -> usize {
    RawSt::read(shard).tensor_names().len()
}

#[test]
fn interrupted_merge_resumes_to_the_same_bytes() {
    let s = Setup::new();
    let recipe = s.recipe(GOOD);

    // The uninterrupted run, into a folder of the same name elsewhere (the model card holds
    // the folder's name).
    let elsewhere = tempfile::tempdir().unwrap();
    let ref_out = elsewhere.path().join("out");
    let o = run_merge(&recipe, &ref_out, &SHARDS);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = dir_bytes(&ref_out);
    let shard_files: Vec<&String> = reference
        .keys()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert!(
        shard_files.len() >= 5,
        "only {} shards: {shard_files:?}",
        shard_files.len()
    );

    // Ctrl-C once two shards are finished.
    let o = interrupt(
        merge_cmd(&recipe, &s.out(), &SHARDS, &[]),
        &s.partial(),
        2,
        "-INT",
    );
    assert_stopped(&s, &o, "SIGINT");
    let done = finished_shards(&s.partial());
    assert!(
        done.len() >= 2 && done.len() < shard_files.len(),
        "{done:?}"
    );
    let partial_before = dir_bytes(&s.partial());

    // What must not touch the partial folder: a fresh run, and a resume of another plan.
    let o = run_merge(&recipe, &s.out(), &SHARDS);
    assert_clean_failure(&o, "fresh run over a partial");
    for n in [PARTIAL, "--resume", "--force"] {
        assert!(stderr(&o).contains(n), "fresh run: no {n}: {}", stderr(&o));
    }
    let o = run_merge(
        &recipe,
        &s.out(),
        &["--out-shard-size", "40KB", "--seed", "8", "--resume"],
    );
    assert_clean_failure(&o, "resume with another seed");
    assert!(
        stderr(&o).contains("different") && stderr(&o).contains(PARTIAL),
        "{}",
        stderr(&o)
    );
    let other = s.recipe_named("other.yml", &GOOD.replace("weight: 0.7", "weight: 0.8"));
    let mut args = SHARDS.to_vec();
    args.push("--resume");
    let o = run_merge(&other, &s.out(), &args);
    assert_clean_failure(&o, "resume with another recipe");
    assert!(
        stderr(&o).contains("different") && stderr(&o).contains(PARTIAL),
        "{}",
        stderr(&o)
    );
    assert!(!s.out().exists());
    assert!(
        dir_bytes(&s.partial()) == partial_before,
        "a refused run changed the partial folder"
    );

    // Tamper with the first finished shard: it must be merged again.
    let tampered = &done[0];
    let p = s.partial().join(tampered);
    let mut bytes = std::fs::read(&p).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&p, bytes).unwrap();

    // Resume, and stop again (SIGTERM this time) once one more shard is finished.
    let o = interrupt(
        merge_cmd(&recipe, &s.out(), &args, &[]),
        &s.partial(),
        done.len() + 1,
        "-TERM",
    );
    assert_stopped(&s, &o, "SIGTERM during --resume");
    assert!(
        stderr(&o).contains(tampered.as_str()),
        "the tampered shard {tampered} was not reported: {}",
        stderr(&o)
    );
    let done2 = finished_shards(&s.partial());
    assert!(done2.contains(tampered), "{tampered} not merged again");
    assert!(done2.len() < shard_files.len(), "{done2:?}");
    let reused: usize = done2.iter().map(|f| tensors_in(&s.partial().join(f))).sum();

    // Resume to the end.
    let o = run_merge(&recipe, &s.out(), &args);
    assert!(o.status.success(), "--resume: {}", stderr(&o));
    assert!(
        stdout(&o).contains("resumed") && stdout(&o).contains(&reused.to_string()),
        "does not report {reused} reused tensors: {}",
        stdout(&o)
    );
    assert!(
        !s.partial().exists(),
        "the partial folder outlived the merge"
    );
    let got = dir_bytes(&s.out());
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &reference {
        assert!(
            got[name] == *bytes,
            "{name} differs from the uninterrupted run"
        );
    }
    assert_eq!(
        s.entries(),
        ["models", "other.yml", "out", "recipe.yml"]
            .map(String::from)
            .into()
    );
}

#[test]
fn resume_without_a_partial_folder_fails_clearly() {
    let s = Setup::new();
    let recipe = s.recipe(GOOD);
    let before = s.entries();
    let o = run_merge(&recipe, &s.out(), &["--resume"]);
    assert_clean_failure(&o, "--resume with nothing to resume");
    assert!(
        stderr(&o).contains("resume") && stderr(&o).contains(PARTIAL),
        "{}",
        stderr(&o)
    );
    assert_eq!(s.entries(), before);

    // and once the output is complete there is nothing to resume either
    assert!(run_merge(&recipe, &s.out(), &[]).status.success());
    let o = run_merge(&recipe, &s.out(), &["--resume"]);
    assert_clean_failure(&o, "--resume of a finished merge");
    assert!(stderr(&o).contains("exists"), "{}", stderr(&o));
}

// ---- disk full ---------------------------------------------------------------------------

fn hash_tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let h = blake3::hash(&std::fs::read(&p).unwrap());
                out.insert(p, h.to_hex().to_string());
            }
        }
    }
    out
}

#[test]
fn disk_full_fails_cleanly_and_leaves_the_inputs_alone() {
    let s = Setup::new();
    let recipe = s.recipe(GOOD);
    let inputs = hash_tree(&s.models);
    let before = s.entries();
    // byte sizes of the tensors the merge writes (F32, as the base holds them)
    let sizes: BTreeSet<usize> = {
        let st = RawSt::read(&s.st("base"));
        st.tensor_names()
            .iter()
            .map(|n| st.offsets(n))
            .map(|(b, e)| e - b)
            .collect()
    };
    // fails after the first few tensors, with shards already finished
    let o = merge_cmd(
        &recipe,
        &s.out(),
        &["--out-shard-size", "40KB"],
        &[("SMELT_FAULT_WRITE_LIMIT", "100000")],
    )
    .output()
    .unwrap();
    assert_clean_failure(&o, "disk full");
    let err = stderr(&o);
    let shard = format!("{}/model-", PARTIAL);
    assert!(
        err.contains(&shard) && err.contains(".safetensors"),
        "no shard path: {err}"
    );
    assert!(
        err.contains("No space left on device") || err.contains("disk full"),
        "{err}"
    );
    let n = number_before(&err, " bytes").unwrap_or_else(|| panic!("no byte count: {err}"));
    assert!(
        sizes.contains(&n),
        "{n} bytes is no tensor's size {sizes:?}: {err}"
    );
    assert!(!s.out().exists());
    // the finished shards stay, with their journal, for --resume (resume_safety resumes it)
    let mut with_partial = before.clone();
    with_partial.insert(PARTIAL.to_string());
    assert_eq!(
        s.entries(),
        with_partial,
        "something else was left beside OUT"
    );
    assert!(
        !finished_shards(&s.partial()).is_empty(),
        "no finished shard kept"
    );
    assert!(!s.partial().join(MANIFEST).exists());
    assert!(err.contains("--resume"), "{err}");
    assert_eq!(hash_tree(&s.models), inputs, "the inputs changed");
}

/// The number just before the first occurrence of `unit` in `text`.
fn number_before(text: &str, unit: &str) -> Option<usize> {
    let at = text.find(unit)?;
    let digits: String = text[..at]
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.chars().rev().collect::<String>().parse().ok()
}

// ---- GPU faults --------------------------------------------------------------------------

#[test]
fn gpu_lost_mid_merge_falls_back_to_the_cpu_under_auto() {
    if gpu_context().is_none() {
        return;
    }
    let s = Setup::new();
    let recipe = s.recipe(GOOD);
    let cpu_out = s.dir().join("cpu");
    let o = run_merge(&recipe, &cpu_out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    let fault = [("SMELT_FAULT_GPU_AFTER", "2")];
    let auto_out = s.dir().join("auto");
    let mut c = smelt();
    c.arg("merge")
        .arg(&recipe)
        .arg("-o")
        .arg(&auto_out)
        // auto passes over a software adapter (lavapipe in CI) unless it is named
        .args(["--device", "auto", "--adapter", "0"]);
    c.envs(fault);
    let o = c.output().unwrap();
    assert!(o.status.success(), "auto: {}", stderr(&o));
    let err = stderr(&o).to_lowercase();
    assert!(
        err.contains("gpu") && err.contains("device lost") && err.contains("cpu"),
        "no warning that the merge finished on the CPU: {err}"
    );
    assert!(stdout(&o).contains("on cpu"), "{}", stdout(&o));
    let (a, b) = (load_dir(&cpu_out), load_dir(&auto_out));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, t) in &a {
        assert_eq!(
            (t.dtype, &t.shape),
            (b[name].dtype, &b[name].shape),
            "{name}"
        );
        assert_close(name, &b[name].data, &t.data, t.dtype, Tol::ulps(1));
    }

    let gpu_out = s.dir().join("gpu");
    let before = s.entries();
    let mut c = smelt();
    c.arg("merge")
        .arg(&recipe)
        .arg("-o")
        .arg(&gpu_out)
        .args(["--device", "gpu"]);
    c.envs(fault);
    let o = c.output().unwrap();
    assert_clean_failure(&o, "--device gpu with a lost device");
    assert!(
        stderr(&o).contains("GPU") && stderr(&o).contains("device lost"),
        "{}",
        stderr(&o)
    );
    assert!(!gpu_out.exists());
    assert_eq!(s.entries(), before, "something was left beside the output");
}

// ---- smelt verify ------------------------------------------------------------------------

fn verify(dir: &Path) -> Output {
    smelt().arg("verify").arg(dir).output().unwrap()
}

#[test]
fn verify_catches_every_change() {
    let s = Setup::new();
    let recipe = s.recipe(GOOD);
    let good_out = s.out();
    let o = run_merge(&recipe, &good_out, &["--out-shard-size", "40KB"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = verify(&good_out);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("verified"), "{}", stdout(&o));
    let files = dir_bytes(&good_out);
    assert!(files.contains_key(INDEX) && files.contains_key(MANIFEST));
    let shard2 = "model-00002-of-";
    let shard2 = files
        .keys()
        .find(|n| n.starts_with(shard2))
        .unwrap()
        .clone();

    type Change = Box<dyn Fn(&Path)>;
    let s2 = shard2.clone();
    let changes: Vec<(&str, Change, String)> = vec![
        (
            "one byte flipped in a shard",
            Box::new(move |d: &Path| {
                let p = d.join(&s2);
                let mut b = std::fs::read(&p).unwrap();
                let i = b.len() / 2;
                b[i] ^= 1;
                std::fs::write(&p, b).unwrap();
            }),
            shard2.clone(),
        ),
        (
            "a file deleted",
            Box::new(|d: &Path| std::fs::remove_file(d.join("config.json")).unwrap()),
            "config.json".into(),
        ),
        (
            "a file added",
            Box::new(|d: &Path| std::fs::write(d.join("notes.txt"), b"hi").unwrap()),
            "notes.txt".into(),
        ),
        (
            "the index edited",
            Box::new(|d: &Path| {
                let p = d.join(INDEX);
                let mut v: Value =
                    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
                let map = v["weight_map"].as_object_mut().unwrap();
                let first = map.keys().next().unwrap().clone();
                map.remove(&first);
                std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
            }),
            INDEX.into(),
        ),
        (
            "the manifest deleted",
            Box::new(|d: &Path| std::fs::remove_file(d.join(MANIFEST)).unwrap()),
            MANIFEST.into(),
        ),
    ];
    for (what, change, names) in changes {
        let d = tempfile::tempdir().unwrap();
        let copy = d.path().join("out");
        copy_dir(&good_out, &copy);
        assert_eq!(verify(&copy).status.code(), Some(0), "{what}: the copy");
        change(&copy);
        let o = verify(&copy);
        assert_clean_failure(&o, what);
        assert!(
            stderr(&o).contains(&names),
            "{what}: the message does not name {names}: {}",
            stderr(&o)
        );
    }
}

// ---- determinism across threads, tiles and backends ----------------------------------------

#[derive(Clone, Debug)]
struct MergeCase {
    method: &'static str,
    /// (weight, density) per fine-tune.
    models: Vec<(f64, f64)>,
    /// Which magnitude band each fine-tune's deltas come from (a permutation of 0..n).
    bands: Vec<usize>,
    /// [rows, cols] of the big tensor, length of the odd one.
    rows: usize,
    cols: usize,
    odd: usize,
    out_dtype: &'static str,
    seed: u64,
    data_seed: u64,
}

fn merge_case() -> impl Strategy<Value = MergeCase> {
    (
        prop::sample::select(vec!["ties", "dare_ties", "breadcrumbs", "della"]),
        prop::collection::vec((0.5f64..1.0, 0.3f64..0.6), 2..=3),
        8usize..48,
        100usize..700,
        1usize..3000,
        prop::sample::select(vec!["float32", "float32", "bfloat16"]),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_flat_map(
            |(method, models, rows, cols, odd, out_dtype, seed, data_seed)| {
                let n = models.len();
                (
                    Just((method, models, rows, cols, odd, out_dtype, seed, data_seed)),
                    Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                )
            },
        )
        .prop_map(
            |((method, models, rows, cols, odd, out_dtype, seed, data_seed), bands)| MergeCase {
                method,
                models,
                bands,
                rows,
                cols,
                odd,
                out_dtype,
                seed,
                data_seed,
            },
        )
}

/// Writes base `b` and fine-tunes `m0..`: each fine-tune's deltas lie in a magnitude band of
/// its own, a factor of ten apart ([1, 1.5], [0.1, 0.15], [0.01, 0.015]), with random signs.
/// Whatever subset of deltas survives a trim or a drop, their weighted (and rescaled) sum is
/// dominated by the largest band, so it is never zero: an element differs from the base
/// exactly when some model's delta was selected there, on any backend.
fn write_case_models(dir: &Path, c: &MergeCase) -> Vec<(String, Vec<usize>)> {
    let shapes = vec![
        (
            "model.layers.0.mlp.up_proj.weight".to_string(),
            vec![c.rows, c.cols],
        ),
        ("model.layers.0.input_layernorm.weight".into(), vec![c.cols]),
        ("model.norm.weight".into(), vec![c.odd]),
    ];
    let mut rng = Lcg(c.data_seed);
    let base: Vec<T> = shapes
        .iter()
        .map(|(_, s)| T::f32(s, (0..s.iter().product()).map(|_| rng.sym()).collect()))
        .collect();
    let write = |name: &str, ts: &[T]| {
        let list: Vec<(&str, &T)> = shapes.iter().map(|(n, _)| n.as_str()).zip(ts).collect();
        write_model(&dir.join(name), 1, &list);
    };
    write("b", &base);
    for (i, &band) in c.bands.iter().enumerate() {
        let scale = [1.0f32, 0.1, 0.01][band];
        let ft: Vec<T> = base
            .iter()
            .map(|b| {
                let data = b
                    .data
                    .iter()
                    .map(|x| {
                        let mag = scale * (1.0 + 0.5 * (rng.sym() + 1.0) / 2.0);
                        if rng.next_u32() & 1 == 0 {
                            x + mag
                        } else {
                            x - mag
                        }
                    })
                    .collect();
                T::f32(&b.shape, data)
            })
            .collect();
        write(&format!("m{i}"), &ft);
    }
    shapes
}

fn case_recipe(c: &MergeCase) -> String {
    let mut r = format!("merge_method: {}\nbase_model: b\nmodels:\n", c.method);
    for (i, (w, d)) in c.models.iter().enumerate() {
        let extra = match c.method {
            "breadcrumbs" => ", gamma: 0.02",
            "della" => ", epsilon: 0.05",
            _ => "",
        };
        r.push_str(&format!(
            "  - {{model: m{i}, parameters: {{weight: {w}, density: {d}{extra}}}}}\n"
        ));
    }
    r.push_str(&format!(
        "dtype: float32\nout_dtype: {}\nseed: {}\n",
        c.out_dtype, c.seed
    ));
    r
}

/// Flat indices where a merged tensor differs from the base.
fn changed(out: &[u8], base: &[f32], dt: DType) -> Vec<usize> {
    let mut v = vec![0f32; base.len()];
    smelt::dtype::decode(dt, out, &mut v);
    (0..base.len()).filter(|&i| v[i] != base[i]).collect()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 6,
        max_shrink_iters: 8,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// The same bytes for 1, 2 and 3 CPU threads, the same bytes for whole, tiled and streamed
    /// GPU jobs, and the same selected elements on the CPU and the GPU.
    #[test]
    fn output_is_independent_of_threads_tiles_and_backend(c in merge_case()) {
        let tmp = tempfile::tempdir().unwrap();
        let shapes = write_case_models(tmp.path(), &c);
        let plan = plan_text(tmp.path(), &case_recipe(&c), None);
        assert_eq!(plan.tasks.len(), shapes.len());

        let runs: Vec<BTreeMap<String, Vec<u8>>> = [1, 2, 3]
            .into_iter()
            .map(|k| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(k)
                    .build()
                    .unwrap()
                    .install(|| merge_plan_bytes(&plan, &Cpu::new()))
            })
            .collect();
        for (k, r) in runs.iter().enumerate().skip(1) {
            prop_assert!(*r == runs[0], "{c:?}: {} CPU threads differ from 1", k + 1);
        }
        let cpu = &runs[0];

        let base = load_st(&tmp.path().join("b/model.safetensors"));
        let dt = DType::from_recipe_name(c.out_dtype).unwrap();
        // Selections are compared where the output holds every delta exactly enough.
        let selections = |out: &BTreeMap<String, Vec<u8>>| -> BTreeMap<String, Vec<usize>> {
            shapes
                .iter()
                .map(|(n, _)| (n.clone(), changed(&out[n], &base[n].data, dt)))
                .collect()
        };
        let cpu_sel = selections(cpu);
        if dt == DType::F32 {
            let big = &cpu_sel["model.layers.0.mlp.up_proj.weight"];
            let n = c.rows * c.cols;
            prop_assert!(!big.is_empty() && big.len() < n, "{c:?}: {} of {n} selected", big.len());
        }

        if let Some(ctx) = gpu_context() {
            let configs = [
                ("whole", GpuOptions::default()),
                ("tiled 4096", GpuOptions { tile_elems: Some(4096), ..Default::default() }),
                (
                    "streamed 1024",
                    GpuOptions { tile_elems: Some(1024), vram_budget: Some(1), ..Default::default() },
                ),
            ];
            let mut first: Option<BTreeMap<String, Vec<u8>>> = None;
            for (name, opts) in configs {
                let gpu = Gpu::with_context(ctx.clone(), &opts);
                let out = merge_plan_bytes(&plan, &gpu);
                if let Some(f) = &first {
                    prop_assert!(out == *f, "{c:?}: GPU {name} differs from GPU whole");
                }
                if dt == DType::F32 {
                    let sel = selections(&out);
                    for (t, s) in &cpu_sel {
                        prop_assert!(
                            sel[t] == *s,
                            "{c:?}: {t}: GPU {name} selects {} elements, the CPU {}",
                            sel[t].len(),
                            s.len()
                        );
                    }
                }
                first.get_or_insert(out);
            }
        }
    }
}
