//! Property tests of the parsers: safetensors headers, model.safetensors.index.json, recipes
//! and parameter gradients. None may panic on any input; what the writer produces must be
//! read back exactly.

use crate::common;

use std::path::Path;

use proptest::prelude::*;
use smelt::dtype::DType;
use smelt::io::model::ModelFolder;
use smelt::io::safetensors::{parse_header, Header};
use smelt::io::writer::{Layout, OutTensor};
use smelt::recipe::{Kind, Recipe, Scalar, Setting, Value1};

const ALL_DTYPES: [DType; 15] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F64,
    DType::I64,
    DType::I32,
    DType::I16,
    DType::I8,
    DType::U64,
    DType::U32,
    DType::U16,
    DType::U8,
    DType::Bool,
    DType::F8E4M3,
    DType::F8E5M2,
];

/// Invariants of any header the reader accepts.
fn check_accepted(h: &Header, file_len: u64) {
    let n = h.data_start as u64;
    assert!(n >= 8 && n <= file_len);
    let data_len = (file_len - n) as usize;
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for t in &h.tensors {
        assert!(
            t.begin <= t.end && t.end <= data_len,
            "{t:?} outside the data"
        );
        assert_eq!(t.end - t.begin, t.numel() * t.dtype.size(), "{t:?} size");
        if t.end > t.begin {
            ranges.push((t.begin, t.end));
        }
    }
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(w[1].0 >= w[0].1, "overlap accepted: {w:?}");
    }
}

// ---- safetensors headers -----------------------------------------------------------------

fn json_fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("F32".to_string()),
        Just("BF16".to_string()),
        Just("F16".to_string()),
        Just("I64".to_string()),
        Just("BOOL".to_string()),
        Just("Q4".to_string()),
        "[A-Z0-9_]{0,6}",
    ]
}

/// One header entry as JSON text, sometimes well-formed, sometimes not.
fn entry() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            "[a-z._]{1,8}",
            Just("__metadata__".to_string()),
            Just("a".to_string())
        ],
        json_fragment(),
        prop::collection::vec(
            prop_oneof![
                (0u64..6).prop_map(|d| d.to_string()),
                Just("-1".to_string()),
                Just("1.5".to_string()),
                Just("18446744073709551615".to_string()),
                Just("4294967296".to_string()),
            ],
            0..4,
        ),
        (0u64..120, 0u64..120),
        0u8..6,
    )
        .prop_map(|(name, dtype, shape, (b, e), variant)| {
            let shape = format!("[{}]", shape.join(","));
            let body = match variant {
                0 => format!("{{\"dtype\":\"{dtype}\",\"shape\":{shape},\"data_offsets\":[{b},{e}]}}"),
                1 => format!("{{\"dtype\":\"{dtype}\",\"shape\":{shape}}}"),
                2 => format!("{{\"format\":\"pt\",\"x\":\"{dtype}\"}}"),
                3 => format!("[{b},{e}]"),
                4 => format!("{{\"dtype\":\"{dtype}\",\"shape\":{shape},\"data_offsets\":[{b},{e}],\"extra\":1}}"),
                _ => format!("{{\"dtype\":{b},\"shape\":\"{dtype}\",\"data_offsets\":{shape}}}"),
            };
            format!("{:?}:{body}", name)
        })
}

/// A well-formed F32 entry whose byte range is likely to touch or overlap its neighbours'.
fn consistent_entry() -> impl Strategy<Value = String> {
    ("[a-e]{1,2}", 0u64..8, 0u64..16).prop_map(|(name, k, b)| {
        format!(
            "{name:?}:{{\"dtype\":\"F32\",\"shape\":[{k}],\"data_offsets\":[{},{}]}}",
            4 * b,
            4 * (b + k)
        )
    })
}

/// A file: 8-byte length (usually right, sometimes off), JSON header, some data bytes.
fn header_file() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(prop_oneof![entry(), consistent_entry()], 0..5),
        0usize..200,
        prop_oneof![Just(0i64), -3i64..3, Just(1i64 << 40)],
        0usize..3,
    )
        .prop_map(|(entries, data, len_delta, pad)| {
            let mut json = format!("{{{}}}", entries.join(","));
            json.push_str(&" ".repeat(pad));
            let len = (json.len() as i64 + len_delta).max(0) as u64;
            let mut f = len.to_le_bytes().to_vec();
            f.extend_from_slice(json.as_bytes());
            f.resize(f.len() + data, 0);
            f
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn header_parser_never_panics_on_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        extra in prop_oneof![Just(0u64), 0u64..1000, Just(u64::MAX - 8)],
    ) {
        for len in [bytes.len() as u64, (bytes.len() as u64).saturating_add(extra)] {
            if let Ok(h) = parse_header(&bytes, len) {
                check_accepted(&h, len);
            }
        }
    }

    #[test]
    fn header_parser_never_panics_on_near_headers(file in header_file()) {
        if let Ok(h) = parse_header(&file, file.len() as u64) {
            check_accepted(&h, file.len() as u64);
        }
    }
}

fn out_tensors() -> impl Strategy<Value = Vec<(String, DType, Vec<usize>)>> {
    prop::collection::btree_map(
        "[a-zA-Z0-9_.\\- \"\\\\é/]{1,12}".prop_filter("reserved", |n| n != "__metadata__"),
        (
            0usize..ALL_DTYPES.len(),
            prop::collection::vec(0usize..7, 0..4),
        ),
        0..14,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|(n, (d, s))| (n, ALL_DTYPES[d], s))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn writer_layout_round_trips_through_the_reader(
        list in out_tensors(),
        max_shard in 1u64..600,
    ) {
        let ts: Vec<OutTensor> = list
            .iter()
            .map(|(n, d, s)| OutTensor { name: n, dtype: *d, shape: s })
            .collect();
        let layout = Layout::new(&ts, max_shard);
        let bytes = |i: usize| list[i].2.iter().product::<usize>() * list[i].1.size();
        let mut found = vec![0usize; list.len()];
        for (si, shard) in layout.shards.iter().enumerate() {
            let mut file = shard.header.clone();
            prop_assert!(file.len() as u64 <= shard.file_len);
            file.resize(shard.file_len as usize, 0);
            let h = parse_header(&file, shard.file_len)
                .map_err(|e| TestCaseError::fail(format!("shard {si}: {e}")))?;
            check_accepted(&h, shard.file_len);
            prop_assert_eq!(h.data_start % 8, 0);
            prop_assert_eq!(h.metadata.get("format").map(|s| s.as_str()), Some("pt"));
            prop_assert_eq!(h.tensors.len(), shard.tensors.len());
            for &i in &shard.tensors {
                let (name, dtype, shape) = &list[i];
                let t = h.tensors.iter().find(|t| &t.name == name);
                prop_assert!(t.is_some(), "{:?} missing from shard {}", name, si);
                let t = t.unwrap();
                prop_assert_eq!(t.dtype, *dtype);
                prop_assert_eq!(&t.shape, shape);
                let slot = &layout.slots[i];
                prop_assert_eq!(slot.shard, si);
                prop_assert_eq!(slot.offset, (h.data_start + t.begin) as u64);
                prop_assert_eq!(slot.len as usize, t.end - t.begin);
                prop_assert_eq!(slot.len as usize, bytes(i));
                prop_assert_eq!(slot.offset % dtype.size() as u64, 0, "{:?} misaligned", name);
                prop_assert_eq!(layout.weight_map.get(name), Some(&shard.file_name));
                found[i] += 1;
            }
            if layout.shards.len() == 1 {
                prop_assert_eq!(shard.file_name.as_str(), "model.safetensors");
            } else {
                let n = layout.shards.len();
                prop_assert_eq!(
                    shard.file_name.clone(),
                    format!("model-{:05}-of-{n:05}.safetensors", si + 1)
                );
                // a shard is over the limit only when one tensor alone is (zero-byte tensors
                // may sit beside it)
                let sum: usize = shard.tensors.iter().map(|&i| bytes(i)).sum();
                let nonempty = shard.tensors.iter().filter(|&&i| bytes(i) > 0).count();
                prop_assert!(sum as u64 <= max_shard || nonempty == 1);
            }
        }
        prop_assert!(found.iter().all(|&c| c == 1), "each tensor in exactly one shard");
        prop_assert_eq!(layout.weight_map.len(), list.len());
        let total: usize = (0..list.len()).map(bytes).sum();
        prop_assert_eq!(layout.total_bytes, total as u64);
    }
}

// ---- model.safetensors.index.json --------------------------------------------------------

fn shard_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("model-00001-of-00002.safetensors".to_string()),
        Just("model-00002-of-00002.safetensors".to_string()),
        Just("../x.safetensors".to_string()),
        Just("/etc/passwd".to_string()),
        Just("sub/../../x.safetensors".to_string()),
        Just("".to_string()),
        Just("missing.safetensors".to_string()),
        "[a-z./]{1,10}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random indexes over two real shards: opening never panics, and a folder whose index
    /// names a shard outside it is never accepted.
    #[test]
    fn index_json_never_panics_or_escapes(
        entries in prop::collection::vec(("[a-c]", shard_name()), 0..6),
        garbage in prop_oneof![Just(None), "[{}\\[\\]\":a-z0-9,]{0,20}".prop_map(Some)],
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        std::fs::create_dir(&dir).unwrap();
        let a = common::T::f32(&[2], vec![1.0, 2.0]);
        common::write_st(&dir.join("model-00001-of-00002.safetensors"), &[("a", &a), ("b", &a)]);
        common::write_st(&dir.join("model-00002-of-00002.safetensors"), &[("c", &a)]);
        common::write_st(&tmp.path().join("x.safetensors"), &[("a", &a)]);
        // (a repeated tensor keeps its last shard, as in the JSON object written)
        let map: serde_json::Map<String, serde_json::Value> = entries
            .iter()
            .map(|(t, s)| (t.clone(), serde_json::Value::from(s.as_str())))
            .collect();
        let text = match &garbage {
            Some(g) => g.clone(),
            None => serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
        };
        std::fs::write(dir.join("model.safetensors.index.json"), &text).unwrap();
        if let Ok(m) = ModelFolder::open(&dir, "m") {
            prop_assert!(garbage.is_none());
            let escapes = map.values().map(|s| s.as_str().unwrap()).any(|s| {
                s.starts_with('/') || Path::new(s).components().any(|c| c.as_os_str() == "..")
            });
            prop_assert!(!escapes, "accepted an index that leaves the folder: {}", text);
            for n in m.names() {
                prop_assert!(m.get(n).is_some());
            }
        }
    }
}

// ---- recipes -----------------------------------------------------------------------------

fn fixture_recipes() -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(common::fixtures().join("cases")).unwrap() {
        let p = e.unwrap().path().join("config.yml");
        v.push(std::fs::read_to_string(p).unwrap());
    }
    v.sort();
    v
}

#[derive(Clone, Debug)]
enum Mutation {
    Delete(usize, usize),
    Insert(usize, String),
    DupLine(usize),
    SwapLines(usize, usize),
    Number(usize, String),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let junk = prop_oneof![
        "[ -~\\n\\t]{0,12}",
        Just(": ".to_string()),
        Just("- ".to_string()),
        Just("{".to_string()),
        Just("[".to_string()),
        Just("\n  ".to_string()),
        Just("&a ".to_string()),
        Just("*a".to_string()),
        Just("!!binary ".to_string()),
        Just("parameters: {weight: [{filter: x, value: [1, 2]}]}\n".to_string()),
    ];
    let number = prop_oneof![
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("1e308".to_string()),
        Just("-1e400".to_string()),
        Just(".nan".to_string()),
        Just(".inf".to_string()),
        Just("[]".to_string()),
        Just("[0.1, .nan, 3]".to_string()),
        Just("~".to_string()),
        Just("18446744073709551616".to_string()),
        any::<f64>().prop_map(|x| format!("{x}")),
    ];
    prop_oneof![
        (any::<usize>(), 0usize..20).prop_map(|(a, n)| Mutation::Delete(a, n)),
        (any::<usize>(), junk).prop_map(|(a, s)| Mutation::Insert(a, s)),
        any::<usize>().prop_map(Mutation::DupLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        (any::<usize>(), number).prop_map(|(a, s)| Mutation::Number(a, s)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn char_floor(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(text: &str, m: &Mutation) -> String {
    let len = text.len().max(1);
    match m {
        Mutation::Delete(a, n) => {
            let a = char_floor(text, a % len);
            let b = char_floor(text, a + n);
            format!("{}{}", &text[..a], &text[b..])
        }
        Mutation::Insert(a, s) => {
            let a = char_floor(text, a % len);
            format!("{}{s}{}", &text[..a], &text[a..])
        }
        Mutation::DupLine(a) => {
            let mut lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                let i = a % lines.len();
                lines.insert(i, lines[i]);
            }
            lines.join("\n")
        }
        Mutation::SwapLines(a, b) => {
            let mut lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                let n = lines.len();
                lines.swap(a % n, b % n);
            }
            lines.join("\n")
        }
        Mutation::Number(a, s) => {
            // replace the a-th number-looking token
            let spans: Vec<(usize, usize)> = {
                let b = text.as_bytes();
                let mut v = Vec::new();
                let mut i = 0;
                while i < b.len() {
                    if b[i].is_ascii_digit() {
                        let st = i;
                        while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                            i += 1;
                        }
                        v.push((st, i));
                    } else {
                        i += 1;
                    }
                }
                v
            };
            if spans.is_empty() {
                return text.to_string();
            }
            let (st, en) = spans[a % spans.len()];
            format!("{}{s}{}", &text[..st], &text[en..])
        }
        Mutation::Truncate(a) => text[..char_floor(text, a % len)].to_string(),
    }
}

#[test]
fn foundation_fixture_recipes_parse() {
    for case in [
        "linear",
        "task_arithmetic",
        "ties",
        "ties_d03_weights",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "passthrough",
        "ties_bf16",
    ] {
        let p = common::case_dir(case).join("config.yml");
        let text = std::fs::read_to_string(&p).unwrap();
        if let Err(e) = Recipe::parse(&text, &p) {
            panic!("{case}: {e}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn recipe_parser_never_panics_on_strings(text in "\\PC{0,200}") {
        let _ = Recipe::parse(&text, Path::new("/nonexistent/recipe.yml"));
    }

    #[test]
    fn recipe_parser_never_panics_on_mutated_fixtures(
        which in any::<prop::sample::Index>(),
        muts in prop::collection::vec(mutation(), 1..4),
    ) {
        let recipes = fixture_recipes();
        let mut text = recipes[which.index(recipes.len())].clone();
        for m in &muts {
            text = apply(&text, m);
        }
        let _ = Recipe::parse(&text, Path::new("/nonexistent/cases/x/config.yml"));
    }
}

// ---- parameter gradients -----------------------------------------------------------------

fn eval_f(s: &Setting, t: f64) -> f64 {
    match s.eval("model.layers.3.mlp.up_proj.weight", t, Kind::Float) {
        Ok(Some(Value1::Float(x))) => x,
        other => panic!("gradient did not evaluate to a number: {other:?}"),
    }
}

/// `x` lies in [lo, hi] give or take 2 ulps. The slack is needed: the interpolation is
/// mergekit's `(1 - f)·v[i0] + f·v[i1]`, which rounds outside its entries by an ulp for some
/// f, e.g. `[0.3, 0.3]` at layer 3 of 8 (t = 3/7) gives 0.29999999999999993.
fn within(x: f64, lo: f64, hi: f64) -> bool {
    let slack = 2.0 * f64::EPSILON * lo.abs().max(hi.abs());
    x >= lo - slack && x <= hi + slack
}

/// Gradient lists: random entries, constant lists, and lists with repeated neighbours.
fn gradient() -> impl Strategy<Value = Vec<f64>> {
    prop_oneof![
        prop::collection::vec(-1.0e3f64..1.0e3, 1..9),
        ((-2.0f64..2.0), 1usize..9).prop_map(|(v, n)| vec![v; n]),
        prop::collection::vec(-1.0f64..1.0, 1..5)
            .prop_map(|v| v.into_iter().flat_map(|x| [x, x]).collect()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    /// A gradient evaluates inside [min, max] of its list, in fact between the two entries
    /// it interpolates, and hits its ends exactly at t = 0 and t = 1.
    #[test]
    fn gradients_stay_within_their_list(
        vals in gradient(),
        t in 0.0f64..=1.0,
        layers in 2usize..64,
        layer in any::<prop::sample::Index>(),
    ) {
        let s = Setting::List(vals.iter().map(|v| Scalar::Num(*v)).collect());
        let yaml = format!(
            "[{}]",
            vals.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(", ")
        );
        let parsed = Setting::from_yaml(&serde_norway::from_str(&yaml).unwrap()).unwrap().unwrap();
        prop_assert_eq!(&parsed, &s);

        let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        // t in [0, 1] at random, and the positions a model's layers really use
        let l = layer.index(layers);
        for t in [t, l as f64 / (layers - 1) as f64] {
            let x = eval_f(&s, t);
            prop_assert!(within(x, lo, hi), "{:?} at t {}: {} outside [{}, {}]", vals, t, x, lo, hi);
            let pos = t * (vals.len() - 1) as f64;
            let i0 = (pos as usize).min(vals.len() - 1);
            let i1 = (i0 + 1).min(vals.len() - 1);
            let (a, b) = (vals[i0].min(vals[i1]), vals[i0].max(vals[i1]));
            prop_assert!(within(x, a, b), "{:?} at t {}: {} not between entries {} and {}", vals, t, x, i0, i1);
        }
        prop_assert_eq!(eval_f(&s, 0.0), vals[0]);
        prop_assert_eq!(eval_f(&s, 1.0), *vals.last().unwrap());
    }

    /// Filters select by substring, first match first; inside, gradients behave the same.
    #[test]
    fn filtered_gradients_stay_within_their_list(
        vals in prop::collection::vec(-10.0f64..10.0, 1..5),
        fallback in -10.0f64..10.0,
        t in 0.0f64..=1.0,
    ) {
        let list = vals.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(", ");
        let yaml = format!("[{{filter: mlp, value: [{list}]}}, {{value: {fallback:?}}}]");
        let s = Setting::from_yaml(&serde_norway::from_str(&yaml).unwrap()).unwrap().unwrap();
        let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let x = eval_f(&s, t);
        prop_assert!(within(x, lo, hi), "{} at {}: {}", yaml, t, x);
        let other = s.eval("model.norm.weight", t, Kind::Float).unwrap();
        prop_assert_eq!(other, Some(Value1::Float(fallback)));
    }
}
