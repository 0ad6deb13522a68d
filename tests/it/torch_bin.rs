//! PyTorch checkpoints (`pytorch_model.bin`, sharded or not): the fixtures in
//! tests/fixtures/torch/ were written by torch.save (tests/fixtures/torch/make.py says how) from
//! subsets of assets/models. Each must read as the asset's tensors, merge byte-for-byte like its
//! safetensors twin (built here from the assets, independently of smelt's reader), and every
//! hostile, damaged or unsupported file must fail cleanly, naming the file, running nothing.

use crate::common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use proptest::prelude::*;
use smelt::io::model::ModelFolder;
use smelt::io::pickle::load_state_dict;
use smelt::io::torch_zip::{torch_tensors, zip_entries};

fn torch_dir() -> PathBuf {
    root().join("tests/fixtures/torch")
}

/// Raw tensors of an asset model (`assets/models/NAME/model.safetensors`), read with the
/// `safetensors` crate: name -> (dtype name, shape, bytes).
fn asset(name: &str) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(
        root()
            .join("assets/models")
            .join(name)
            .join("model.safetensors"),
    )
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                (
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                ),
            )
        })
        .collect()
}

const BF16_NAMES: [&str; 7] = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.norm.weight",
];
const F32_NAMES: [&str; 7] = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.norm.weight",
];

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Bf16,
    F32,
}

/// What a fixture of `kind` made from asset `name` must hold: name -> (dtype, shape, bytes).
/// bf16: the listed tensors as stored, plus lm_head = embed_tokens (tied in the fixture);
/// f32: the listed tensors widened exactly (a bf16 is the top half of an f32).
fn expected(kind: Kind, name: &str) -> BTreeMap<String, (&'static str, Vec<usize>, Vec<u8>)> {
    let a = asset(name);
    let mut out = BTreeMap::new();
    match kind {
        Kind::Bf16 => {
            for n in BF16_NAMES {
                let (dt, shape, bytes) = &a[n];
                assert_eq!(dt, "BF16");
                out.insert(n.to_string(), ("BF16", shape.clone(), bytes.clone()));
            }
            let e = out["model.embed_tokens.weight"].clone();
            out.insert("lm_head.weight".to_string(), e);
        }
        Kind::F32 => {
            for n in F32_NAMES {
                let (dt, shape, bytes) = &a[n];
                assert_eq!(dt, "BF16");
                let wide: Vec<u8> = bytes
                    .chunks_exact(2)
                    .flat_map(|h| ((u16::from_le_bytes([h[0], h[1]]) as u32) << 16).to_le_bytes())
                    .collect();
                out.insert(n.to_string(), ("F32", shape.clone(), wide));
            }
        }
    }
    out
}

/// Writes the safetensors twin of a fixture into `dir/model.safetensors` with the
/// `safetensors` crate.
fn write_twin(kind: Kind, name: &str, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let t = expected(kind, name);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = t
        .iter()
        .map(|(n, (dt, shape, bytes))| {
            let dt = if *dt == "BF16" {
                safetensors::Dtype::BF16
            } else {
                safetensors::Dtype::F32
            };
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dt, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// Every fixture, by folder: (kind, asset it was made from).
const FIXTURES: [(&str, Kind, &str); 8] = [
    ("bf16/base", Kind::Bf16, "base"),
    ("bf16/chat", Kind::Bf16, "chat"),
    ("bf16/math", Kind::Bf16, "math"),
    ("bf16/chat-sharded", Kind::Bf16, "chat"),
    ("f32/base", Kind::F32, "base"),
    ("f32/chat", Kind::F32, "chat"),
    ("f32/math", Kind::F32, "math"),
    ("f32/math-sharded", Kind::F32, "math"),
];

#[test]
fn every_fixture_reads_as_the_tensors_torch_was_given() {
    for (dir, kind, src) in FIXTURES {
        let m = ModelFolder::open(&torch_dir().join(dir), dir).unwrap_or_else(|e| panic!("{e}"));
        let want = expected(kind, src);
        assert_eq!(
            m.names().to_vec(),
            {
                let mut v: Vec<String> = want.keys().cloned().collect();
                v.sort_by(|a, b| smelt::io::model::natural_cmp(a, b));
                v
            },
            "{dir}"
        );
        for (n, (dt, shape, bytes)) in &want {
            let t = m.get(n).unwrap();
            assert_eq!(t.dtype().st_name(), *dt, "{dir} {n}");
            assert_eq!(t.shape(), shape.as_slice(), "{dir} {n}");
            assert!(t.bytes() == bytes.as_slice(), "{dir} {n}: bytes differ");
        }
    }
    // The fixtures hold what make.py says: tied embeddings share one storage, chat's v_proj
    // sits at an offset into a fused kv storage, f32 base's o_proj is a transposed view.
    let z = std::fs::read(torch_dir().join("bf16/chat/pytorch_model.bin")).unwrap();
    let (infos, owned) = torch_tensors(&z).unwrap();
    assert!(owned.is_empty());
    let at = |n: &str| infos.iter().find(|t| t.name == n).unwrap().clone();
    assert_eq!(
        at("lm_head.weight").begin,
        at("model.embed_tokens.weight").begin
    );
    let (k, v) = (
        at("model.layers.0.self_attn.k_proj.weight"),
        at("model.layers.0.self_attn.v_proj.weight"),
    );
    assert_eq!(k.end, v.begin, "k and v are one storage");
    let z = std::fs::read(torch_dir().join("f32/base/pytorch_model.bin")).unwrap();
    let (_, owned) = torch_tensors(&z).unwrap();
    assert_eq!(
        owned.len(),
        64 * 64 * 4,
        "o_proj copied out of its strided view"
    );
}

/// A sandbox with `models/<name>` for each (fixture folder or twin) and a recipe.
struct Sandbox {
    tmp: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox {
            tmp: tempfile::tempdir().unwrap(),
        }
    }
    fn dir(&self) -> &Path {
        self.tmp.path()
    }
    fn bin(&self, fixture: &str, as_name: &str) -> PathBuf {
        let d = self.dir().join("models").join(as_name);
        copy_dir(&torch_dir().join(fixture), &d);
        d
    }
    fn twin(&self, kind: Kind, src: &str, as_name: &str) -> PathBuf {
        let d = self.dir().join("models").join(as_name);
        write_twin(kind, src, &d);
        d
    }
    fn merge(&self, recipe: &str, out: &str) -> (Output, PathBuf) {
        let r = self.dir().join(format!("{out}.yml"));
        std::fs::write(&r, recipe).unwrap();
        let o = self.dir().join(out);
        (run_merge(&r, &o, &[]), o)
    }
}

/// The merged weights of an output folder: every safetensors file and the index, by name.
fn weights(out: &Path) -> BTreeMap<String, Vec<u8>> {
    dir_bytes(out)
        .into_iter()
        .filter(|(n, _)| n.ends_with(".safetensors") || n.ends_with(".index.json"))
        .collect()
}

/// Merges `recipe` (naming models `A`, `B`, `C`) once over the .bin fixtures and once over
/// their safetensors twins, and requires byte-identical weights; the .bin inputs are
/// unchanged afterwards.
fn same_as_twins(recipe: &str, models: &[(&str, &str, Kind, &str)]) {
    let s = Sandbox::new();
    let mut bins = Vec::new();
    for (letter, fixture, kind, src) in models {
        bins.push(s.bin(fixture, &format!("bin-{letter}")));
        s.twin(*kind, src, &format!("st-{letter}"));
    }
    let before: Vec<_> = bins.iter().map(|d| dir_bytes(d)).collect();
    let r_bin = recipe.replace("models/", "models/bin-");
    let r_st = recipe.replace("models/", "models/st-");
    let (o1, out1) = s.merge(&r_bin, "out-bin");
    assert!(o1.status.success(), "{}", stderr(&o1));
    let (o2, out2) = s.merge(&r_st, "out-st");
    assert!(o2.status.success(), "{}", stderr(&o2));
    let (w1, w2) = (weights(&out1), weights(&out2));
    assert!(!w1.is_empty());
    assert_eq!(w1.keys().collect::<Vec<_>>(), w2.keys().collect::<Vec<_>>());
    for (n, b) in &w1 {
        assert!(
            *b == w2[n],
            "{n} differs between the .bin and safetensors merges"
        );
    }
    for (d, b) in bins.iter().zip(before) {
        assert_eq!(dir_bytes(d), b, "{} changed", d.display());
    }
}

#[test]
fn bf16_linear_single_and_sharded() {
    same_as_twins(
        "merge_method: linear\nmodels:\n  - model: models/A\n    parameters: {weight: 0.7}\n  - model: models/B\n    parameters: {weight: 0.3}\n",
        &[
            ("A", "bf16/base", Kind::Bf16, "base"),
            ("B", "bf16/chat-sharded", Kind::Bf16, "chat"),
        ],
    );
}

#[test]
fn bf16_ties_single_and_sharded() {
    same_as_twins(
        "merge_method: ties\nbase_model: models/A\nmodels:\n  - model: models/B\n    parameters: {weight: 1.0, density: 0.5}\n  - model: models/C\n    parameters: {weight: 0.5, density: 0.7}\n",
        &[
            ("A", "bf16/base", Kind::Bf16, "base"),
            ("B", "bf16/chat-sharded", Kind::Bf16, "chat"),
            ("C", "bf16/math", Kind::Bf16, "math"),
        ],
    );
}

#[test]
fn f32_linear_single_and_sharded() {
    same_as_twins(
        "merge_method: linear\nmodels:\n  - model: models/A\n    parameters: {weight: 0.25}\n  - model: models/B\n    parameters: {weight: 0.75}\n",
        &[
            ("A", "f32/base", Kind::F32, "base"),
            ("B", "f32/math-sharded", Kind::F32, "math"),
        ],
    );
}

#[test]
fn f32_ties_single_and_sharded() {
    same_as_twins(
        "merge_method: ties\nbase_model: models/A\nmodels:\n  - model: models/B\n    parameters: {weight: 1.0, density: 0.6}\n  - model: models/C\n    parameters: {weight: 1.0, density: 0.4}\ndtype: bfloat16\n",
        &[
            ("A", "f32/base", Kind::F32, "base"),
            ("B", "f32/chat", Kind::F32, "chat"),
            ("C", "f32/math-sharded", Kind::F32, "math"),
        ],
    );
}

#[test]
fn safetensors_win_over_bin_in_one_folder() {
    // A folder with both: the .bin (bf16 base) is ignored, the safetensors (chat) read.
    let s = Sandbox::new();
    let d = s.bin("bf16/base", "both");
    write_twin(Kind::Bf16, "chat", &d);
    let m = ModelFolder::open(&d, "both").unwrap();
    assert_eq!(m.files().len(), 1);
    assert!(m.files()[0].path.ends_with("model.safetensors"));
    let chat = expected(Kind::Bf16, "chat");
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert!(m.get(q).unwrap().bytes() == chat[q].2.as_slice());
}

#[test]
fn inspect_shows_a_bin_model() {
    let o = smelt()
        .arg("inspect")
        .arg(torch_dir().join("bf16/chat-sharded"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.contains("8 tensors in 2 files"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("lm_head.weight") && l.contains("BF16") && l.contains("[256, 64]")),
        "{out}"
    );
}

const MARKER: &str = "smelt-pickle-payload-ran";

/// The hostile fixtures are live: Python's own unpickler runs their payload. Skipped (with a
/// note) where no python3 is installed.
#[test]
fn hostile_fixture_payload_is_real() {
    let tmp = tempfile::tempdir().unwrap();
    let f = torch_dir().join("hostile-p2/pytorch_model.bin");
    let code = format!(
        "import pickle, zipfile; pickle.loads(zipfile.ZipFile({:?}).read('pytorch_model/data.pkl'))",
        f.to_str().unwrap()
    );
    match std::process::Command::new("python3")
        .arg("-c")
        .arg(code)
        .current_dir(tmp.path())
        .output()
    {
        Ok(o) => {
            assert!(o.status.success(), "{}", stderr(&o));
            assert!(
                tmp.path().join(MARKER).exists(),
                "the payload did not run under Python"
            );
        }
        Err(e) => eprintln!("note: python3 not runnable ({e}); payload check skipped"),
    }
}

#[test]
fn hostile_pickle_is_refused_by_name_and_never_runs() {
    for fixture in ["hostile-p2", "hostile-p4"] {
        let s = Sandbox::new();
        let evil = s.bin(fixture, "evil");
        s.twin(Kind::Bf16, "chat", "good");
        let before = dir_bytes(&evil);
        let r = s.dir().join("r.yml");
        std::fs::write(
            &r,
            "merge_method: linear\nmodels:\n  - model: models/good\n    parameters: {weight: 0.5}\n  - model: models/evil\n    parameters: {weight: 0.5}\n",
        )
        .unwrap();
        let out = s.dir().join("out");
        let o = smelt()
            .arg("merge")
            .arg(&r)
            .arg("-o")
            .arg(&out)
            .args(cpu_args())
            .current_dir(s.dir())
            .output()
            .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{fixture}: {err}");
        assert!(err.contains("`posix.system`"), "{fixture}: {err}");
        assert!(err.contains("evil/pytorch_model.bin"), "{fixture}: {err}");
        assert!(err.contains("safetensors"), "{fixture}: {err}");
        assert!(!out.exists(), "{fixture}: an output exists");
        assert!(!s.dir().join(MARKER).exists(), "{fixture}: the payload ran");
        assert_eq!(dir_bytes(&evil), before);
        // inspect refuses it too, from its own folder
        let o = smelt()
            .arg("inspect")
            .arg(&evil)
            .current_dir(&evil)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("`posix.system`"), "{}", stderr(&o));
        assert!(!evil.join(MARKER).exists());
    }
}

/// `smelt inspect` on a folder holding `bytes` as pytorch_model.bin: exit 1, a message naming
/// the file and containing `needle`, no panic.
fn inspect_fails(bytes: &[u8], needle: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("pytorch_model.bin"), bytes).unwrap();
    let o = smelt().arg("inspect").arg(&d).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{needle}: {err}");
    assert!(err.contains("m/pytorch_model.bin"), "{err}");
    assert!(err.contains(needle), "wanted {needle:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(std::fs::read(d.join("pytorch_model.bin")).unwrap(), bytes);
}

#[test]
fn unsupported_files_are_refused_with_what_to_do() {
    let read = |f: &str| std::fs::read(torch_dir().join(f).join("pytorch_model.bin")).unwrap();
    inspect_fails(&read("compressed"), "is compressed (zip method 8)");
    inspect_fails(&read("bigendian"), "little-endian");
    // torch's legacy (pre-1.6) format is not a zip
    inspect_fails(
        b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.",
        "not a zip file",
    );
}

#[test]
fn truncated_and_garbled_files_fail_cleanly() {
    let good = std::fs::read(torch_dir().join("bf16/base/pytorch_model.bin")).unwrap();
    for cut in [0, 10, 100, good.len() / 2, good.len() - 23, good.len() - 1] {
        let needle = if cut == 0 { "empty" } else { "truncated" };
        inspect_fails(&good[..cut], needle);
    }
    // data.pkl garbled: an opcode torch never writes, right after PROTO
    let e = zip_entries(&good).unwrap();
    let pkl = e.iter().find(|e| e.name.ends_with("/data.pkl")).unwrap();
    let mut g = good.clone();
    assert_eq!(g[pkl.start], 0x80, "data.pkl starts with PROTO");
    g[pkl.start + 2] = 0xff;
    inspect_fails(&g, "data.pkl uses pickle opcode 0xff");
    // the last directory record claims an entry far longer than the file
    let mut g = good.clone();
    let cd = (0..g.len() - 4)
        .rev()
        .find(|&i| g[i..i + 4] == [0x50, 0x4b, 0x01, 0x02])
        .unwrap();
    g[cd + 20..cd + 24].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
    g[cd + 24..cd + 28].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
    inspect_fails(&g, "reaches past the end of the file");
}

#[test]
fn a_damaged_bin_in_a_merge_leaves_no_output() {
    let s = Sandbox::new();
    let bad = s.bin("bf16/chat", "bad");
    let f = bad.join("pytorch_model.bin");
    let b = std::fs::read(&f).unwrap();
    std::fs::write(&f, &b[..b.len() * 2 / 3]).unwrap();
    s.bin("bf16/base", "good");
    let (o, out) = s.merge(
        "merge_method: linear\nmodels:\n  - model: models/good\n    parameters: {weight: 0.5}\n  - model: models/bad\n    parameters: {weight: 0.5}\n",
        "out",
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("bad/pytorch_model.bin") && err.contains("truncated"),
        "{err}"
    );
    assert!(!out.exists());
}

fn fixture_pickle() -> Vec<u8> {
    let z = std::fs::read(torch_dir().join("bf16/chat/pytorch_model.bin")).unwrap();
    let e = zip_entries(&z).unwrap();
    let p = e.iter().find(|e| e.name.ends_with("/data.pkl")).unwrap();
    z[p.start..p.start + p.len].to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Random bytes never panic the unpickler, and finish quickly.
    #[test]
    fn unpickler_survives_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let t = std::time::Instant::now();
        let _ = load_state_dict(&data);
        prop_assert!(t.elapsed().as_secs() < 2);
    }

    /// Mutations of a real data.pkl (bytes replaced, inserted, removed) never panic; what is
    /// accepted still names only tensors with dims and strides of equal length.
    #[test]
    fn unpickler_survives_mutations_of_a_real_pickle(
        edits in proptest::collection::vec((any::<u16>(), any::<u8>(), 0u8..3), 1..8)
    ) {
        let mut p = fixture_pickle();
        for (at, byte, op) in edits {
            let i = at as usize % (p.len() + 1);
            match op {
                0 if i < p.len() => p[i] = byte,
                1 => p.insert(i, byte),
                _ if i < p.len() => { p.remove(i); }
                _ => {}
            }
        }
        let t = std::time::Instant::now();
        if let Ok(ts) = load_state_dict(&p) {
            for (_, d) in ts {
                prop_assert_eq!(d.shape.len(), d.stride.len());
            }
        }
        prop_assert!(t.elapsed().as_secs() < 2);
    }

    /// Mutations of a whole checkpoint never panic the zip reader, and every range it hands
    /// out lies inside the file (or the owned copy).
    #[test]
    fn zip_reader_survives_mutations(
        edits in proptest::collection::vec((any::<u32>(), any::<u8>()), 1..6)
    ) {
        let mut z = std::fs::read(torch_dir().join("f32/base/pytorch_model.bin")).unwrap();
        for (at, byte) in edits {
            let i = at as usize % z.len();
            z[i] = byte;
        }
        if let Ok((infos, owned)) = torch_tensors(&z) {
            for t in infos {
                prop_assert!(t.begin <= t.end);
                prop_assert!(t.end <= z.len() || (t.begin >= z.len() && t.end - z.len() <= owned.len()));
                prop_assert_eq!(t.end - t.begin, t.numel() * t.dtype.size());
            }
        }
    }
}
