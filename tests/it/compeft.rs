//! ComPEFT (`smelt compress` and compressed task vectors as recipe inputs) against the
//! reference code's outputs (tests/fixtures/reference, cases compeft and compeft_k5_a2),
//! hand-computed cases, the properties that define it, and its errors. Every math test runs
//! on every backend.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::*;
use smelt::backend::Backend;
use smelt::compeft::{compress, Compressed, Report, Settings};
use smelt::io::model::ModelFolder;

/// The fixture README's bound: |got − expected| ≤ 1e-6 + 1e-5·|expected|.
const REF_TOL: Tol = Tol::abs_rel(1e-6, 1e-5);

fn reference() -> PathBuf {
    root().join("tests/fixtures/reference")
}

fn open(p: &Path) -> ModelFolder {
    ModelFolder::open(p, &p.display().to_string()).unwrap()
}

fn run_compress(
    model: &Path,
    base: &Path,
    density: f64,
    alpha: f64,
    backend: &dyn Backend,
    out: &Path,
) -> Report {
    compress(
        &open(model),
        &open(base),
        &Settings { density, alpha },
        backend,
        out,
        false,
        &|_| {},
        &|_| "card\n".to_string(),
    )
    .unwrap_or_else(|e| panic!("compress {}: {e}", model.display()))
}

fn case_json(case: &str) -> serde_json::Value {
    let p = reference().join("cases").join(case).join("case.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Compresses ft1 against base as the case says, on every backend; checks the statistics
/// against the reference's diagnostics, that every backend writes the same bytes, and that
/// `model: COMPRESSED` and `model: BASE+COMPRESSED` in a recipe give the reference's weights.
fn fixture_case(case: &str) {
    let c = case_json(case);
    let k = c["parameters"]["k"].as_f64().unwrap();
    let alpha = c["parameters"]["replace_factor"].as_f64().unwrap();
    let diag = &c["diagnostics"];
    let models = reference().join("models");
    let mut expected = load_st(
        &reference()
            .join("cases")
            .join(case)
            .join("expected.safetensors"),
    );
    assert_eq!(expected.len(), 30);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for (bname, backend) in backends() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("ft1-compeft");
        let r = run_compress(
            &models.join("ft1"),
            &models.join("base"),
            k / 100.0,
            alpha,
            backend.as_ref(),
            &out,
        );
        let what = format!("{case} on {bname}");
        assert_eq!(r.stats.total, diag["d"].as_u64().unwrap(), "{what}: d");
        assert_eq!(r.stats.kept, diag["kept"].as_u64().unwrap(), "{what}: kept");
        assert_eq!(r.nnz, r.stats.kept, "{what}: no kept zeros in this fixture");
        assert_eq!(
            r.stats.threshold,
            diag["threshold"].as_f64().unwrap() as f32,
            "{what}: threshold"
        );
        let std = diag["std"].as_f64().unwrap();
        assert!(
            ((r.stats.sigma - std) / std).abs() < 1e-6,
            "{what}: σ {} vs reference {std}",
            r.stats.sigma
        );
        let value = diag["value"].as_f64().unwrap();
        assert!(
            ((r.stats.scale as f64 - alpha * std) / value).abs() < 1e-6,
            "{what}: scale {} vs {}",
            r.stats.scale,
            alpha * std
        );
        // the bit maps and every metadata entry but σ's own digits (f64 sums in another
        // order) are the same on every backend
        let f = smelt::io::safetensors::SafetensorsFile::open(&out.join("compeft.safetensors"))
            .unwrap();
        let mut meta = f.header.metadata.clone();
        meta.remove("sigma");
        let mut bytes = f.data_region().to_vec();
        bytes.extend(format!("{meta:?}").into_bytes());
        files.push((bname.clone(), bytes));

        // the compressed folder in place of the model, alone and with its base named
        for model in [
            out.display().to_string(),
            format!("{}+{}", models.join("base").display(), out.display()),
        ] {
            let recipe =
                format!("merge_method: passthrough\ndtype: float32\nmodels:\n  - model: {model}\n");
            let got = merge_text(tmp.path(), &recipe, backend.as_ref());
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                expected.keys().collect::<Vec<_>>(),
                "{what}: names"
            );
            for (name, e) in &expected {
                assert_close(
                    &format!("{what} ({model}): {name}"),
                    &got[name].data,
                    &e.data,
                    e.dtype,
                    REF_TOL,
                );
            }
        }
    }
    for (b, f) in &files[1..] {
        assert!(
            f == &files[0].1,
            "{case}: {b} wrote other bytes than {}",
            files[0].0
        );
    }
    expected.clear();
}

#[test]
fn fixture_k20_alpha1() {
    fixture_case("compeft");
}

#[test]
fn fixture_k5_alpha2() {
    fixture_case("compeft_k5_a2");
}

/// Writes base (zeros) and model (`tau`) as one-tensor models in `dir`.
fn vec_pair(dir: &Path, tau: &[f32]) -> (PathBuf, PathBuf) {
    let (b, m) = (dir.join("base"), dir.join("model"));
    write_vec_model(&b, &vec![0.0; tau.len()]);
    write_vec_model(&m, tau);
    (b, m)
}

fn hand_computed_threshold_ties_and_scale(bname: &str, backend: &dyn Backend) {
    // d = 8, density 0.25: int(8·0.25) = 2, the threshold is the 8 − 2 = 6th smallest |τ|
    // of [0, 0.25, 0.5, 1, 2, 2, 3, 4] = 2, so both 2s are kept: 4 entries, one over 2 + 1.
    let tau = [0.5f32, -3.0, 2.0, 0.0, -1.0, 4.0, 0.25, -2.0];
    // unbiased std, by hand: mean 0.09375, Σx² 34.3125, var (34.3125 − 8·0.09375²)/7
    let sigma = ((34.3125f64 - 8.0 * 0.09375 * 0.09375) / 7.0).sqrt();
    let tmp = tempfile::tempdir().unwrap();
    let (b, m) = vec_pair(tmp.path(), &tau);
    let out = tmp.path().join("c");
    let r = run_compress(&m, &b, 0.25, 1.5, backend, &out);
    assert_eq!(r.stats.kept, 4, "{bname}");
    assert_eq!(r.nnz, 4, "{bname}");
    assert_eq!(r.stats.threshold, 2.0, "{bname}");
    assert!(
        (r.stats.sigma - sigma).abs() < 1e-12,
        "{bname}: σ {}",
        r.stats.sigma
    );
    let s = (sigma as f32) * 1.5;
    assert_eq!(r.stats.scale, s, "{bname}");
    let c = Compressed::open(&out).unwrap();
    assert_eq!(
        c.decompress("w").unwrap(),
        vec![0.0, -s, s, 0.0, 0.0, s, 0.0, -s],
        "{bname}"
    );
}

backend_test!(hand_computed_threshold_ties_and_scale);

#[test]
fn kept_exact_zeros_stay_zero() {
    // 6 of 8 entries are 0: density 0.5 keeps int(4) + 1 = 5, so the threshold is 0 and
    // every entry is "kept"; sign(0) = 0, so only the two non-zeros are stored.
    let tau = [0.0f32, 0.0, 0.0, 1.0, 0.0, 0.0, -1.0, 0.0];
    let tmp = tempfile::tempdir().unwrap();
    let (b, m) = vec_pair(tmp.path(), &tau);
    let out = tmp.path().join("c");
    let r = run_compress(&m, &b, 0.5, 1.0, &smelt::backend::cpu::Cpu::new(), &out);
    assert_eq!((r.stats.kept, r.nnz), (8, 2));
    let s = r.stats.scale;
    let c = Compressed::open(&out).unwrap();
    assert_eq!(
        c.decompress("w").unwrap(),
        vec![0.0, 0.0, 0.0, s, 0.0, 0.0, -s, 0.0]
    );
}

fn random_model_has_exactly_k_nonzeros_with_the_stated_scale(bname: &str, backend: &dyn Backend) {
    // A multi-tensor model with distinct random deltas (no ties): the decompressed task
    // vector has int(d·density) + 1 non-zeros, each ±scale with τ's sign, and they are the
    // largest |τ| of the whole model.
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Lcg(7);
    let shapes: [(&str, Vec<usize>); 3] = [
        ("model.embed_tokens.weight", vec![61, 16]),
        ("model.layers.0.mlp.up_proj.weight", vec![37, 16]),
        ("model.norm.weight", vec![16]),
    ];
    let mut base = Vec::new();
    let mut tuned = Vec::new();
    for (n, s) in &shapes {
        let len: usize = s.iter().product();
        let b: Vec<f32> = (0..len).map(|_| rng.sym()).collect();
        // deltas of varying spread per tensor, so the global threshold is not per-tensor
        let spread = 0.01 * (1.0 + n.len() as f32 / 10.0);
        let t: Vec<f32> = b.iter().map(|x| x + spread * rng.sym()).collect();
        base.push((n.to_string(), T::f32(s, b)));
        tuned.push((n.to_string(), T::f32(s, t)));
    }
    let refs = |v: &Vec<(String, T)>| -> Vec<(String, T)> {
        v.iter()
            .map(|(n, t)| (n.clone(), T::f32(&t.shape, t.data.clone())))
            .collect()
    };
    let write = |dir: &Path, v: &Vec<(String, T)>| {
        let r: Vec<(&str, &T)> = v.iter().map(|(n, t)| (n.as_str(), t)).collect();
        write_model(dir, 1, &r);
    };
    write(&tmp.path().join("base"), &refs(&base));
    write(&tmp.path().join("ft"), &refs(&tuned));
    // τ as the reference computes it (f32 subtraction), all tensors together
    let mut all: Vec<(f32, String, usize)> = Vec::new();
    let mut tau: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for ((n, b), (_, t)) in base.iter().zip(&tuned) {
        let d: Vec<f32> = t.data.iter().zip(&b.data).map(|(x, y)| x - y).collect();
        for (i, v) in d.iter().enumerate() {
            all.push((v.abs(), n.clone(), i));
        }
        tau.insert(n.clone(), d);
    }
    let d = all.len();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let density = 0.137;
    let k = (d as f64 * density) as usize + 1;
    assert!(
        all[k - 1].0 > all[k].0,
        "test data has a tie at the threshold"
    );
    let out = tmp.path().join(format!("c-{bname}"));
    let r = run_compress(
        &tmp.path().join("ft"),
        &tmp.path().join("base"),
        density,
        0.8,
        backend,
        &out,
    );
    assert_eq!(r.nnz as usize, k, "{bname}");
    let c = Compressed::open(&out).unwrap();
    let mut nonzeros = 0;
    for (n, d) in &tau {
        let got = c.decompress(n).unwrap();
        for (i, (g, t)) in got.iter().zip(d).enumerate() {
            if *g != 0.0 {
                nonzeros += 1;
                assert_eq!(g.abs(), r.stats.scale, "{bname}: {n}[{i}]");
                assert_eq!(g.signum(), t.signum(), "{bname}: {n}[{i}] sign");
                assert!(
                    t.abs() >= all[k - 1].0,
                    "{bname}: {n}[{i}] is not a top entry"
                );
            }
        }
    }
    assert_eq!(nonzeros, k, "{bname}");
}

backend_test!(random_model_has_exactly_k_nonzeros_with_the_stated_scale);

fn compressed_vector_merges_like_a_model(bname: &str, backend: &dyn Backend) {
    // task_arithmetic of a compressed ft1 with ft2 equals task_arithmetic of the decompressed
    // model (written out as a plain folder) with ft2.
    let models = reference().join("models");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("c");
    let cpu = smelt::backend::cpu::Cpu::new();
    run_compress(
        &models.join("ft1"),
        &models.join("base"),
        0.3,
        2.0,
        &cpu,
        &out,
    );
    let c = Compressed::open(&out).unwrap();
    let base = load_dir(&models.join("base"));
    let plain: Vec<(String, T)> = base
        .iter()
        .map(|(n, t)| {
            let tau = c.decompress(n).unwrap();
            let v: Vec<f32> = t.data.iter().zip(&tau).map(|(b, d)| b + d).collect();
            (n.clone(), T::f32(&t.shape, v))
        })
        .collect();
    let r: Vec<(&str, &T)> = plain.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_model(&tmp.path().join("plain"), 3, &r);
    let recipe = |m: &str| {
        format!(
            "merge_method: task_arithmetic\ndtype: float32\nbase_model: {}\nmodels:\n  - model: {m}\n    parameters: {{weight: 0.7}}\n  - model: {}\n    parameters: {{weight: 0.4}}\n",
            models.join("base").display(),
            models.join("ft2").display()
        )
    };
    let want = merge_text(
        tmp.path(),
        &recipe(&tmp.path().join("plain").display().to_string()),
        &cpu,
    );
    let got = merge_text(tmp.path(), &recipe(&out.display().to_string()), backend);
    for (n, w) in &want {
        assert_close(
            &format!("{bname}: {n}"),
            &got[n].data,
            &w.data,
            w.dtype,
            Tol::ulps(2),
        );
    }
}

backend_test!(compressed_vector_merges_like_a_model);

// ---- errors ------------------------------------------------------------------------------

fn merge_err(dir: &Path, recipe: &str) -> String {
    std::fs::write(dir.join("r.yml"), recipe).unwrap();
    let r = smelt::recipe::Recipe::load(&dir.join("r.yml")).unwrap();
    match smelt::plan::Plan::build(r, None) {
        Ok(_) => panic!("planned a recipe that should fail:\n{recipe}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn refuses_another_base_and_a_missing_one() {
    let models = reference().join("models");
    let tmp = tempfile::tempdir().unwrap();
    // a base that exists only while compressing
    let gone = tmp.path().join("base-copy");
    copy_dir(&models.join("base"), &gone);
    let out = tmp.path().join("c");
    run_compress(
        &models.join("ft1"),
        &gone,
        0.2,
        1.0,
        &smelt::backend::cpu::Cpu::new(),
        &out,
    );
    // another base named explicitly: ft2 has other contents
    let e = merge_err(
        tmp.path(),
        &format!(
            "merge_method: passthrough\nmodels:\n  - model: {}+{}\n",
            models.join("ft2").display(),
            out.display()
        ),
    );
    assert!(e.contains("digest") && e.contains("made against"), "{e}");
    std::fs::remove_dir_all(&gone).unwrap();
    let e = merge_err(
        tmp.path(),
        &format!(
            "merge_method: passthrough\nmodels:\n  - model: {}\n",
            out.display()
        ),
    );
    assert!(e.contains("does not exist") && e.contains("BASE+"), "{e}");
    // the same base under another path is fine: its digest matches
    let ok = format!(
        "merge_method: passthrough\nmodels:\n  - model: {}+{}\n",
        models.join("base").display(),
        out.display()
    );
    std::fs::write(tmp.path().join("ok.yml"), ok).unwrap();
    plan_file(&tmp.path().join("ok.yml"), None);
}

#[test]
fn refuses_damaged_files() {
    let models = reference().join("models");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("c");
    run_compress(
        &models.join("ft1"),
        &models.join("base"),
        0.2,
        1.0,
        &smelt::backend::cpu::Cpu::new(),
        &out,
    );
    let file = out.join("compeft.safetensors");
    let good = std::fs::read(&file).unwrap();
    // same-length edits of the header: another version, a sign map that does not fit
    let edit = |from: &str, to: &str| {
        assert_eq!(from.len(), to.len());
        let at = good
            .windows(from.len())
            .position(|w| w == from.as_bytes())
            .unwrap_or_else(|| panic!("header holds {from}"));
        let mut b = good.clone();
        b[at..at + from.len()].copy_from_slice(to.as_bytes());
        std::fs::write(&file, b).unwrap();
        match Compressed::open(&out) {
            Ok(_) => panic!("opened a file with {to}"),
            Err(e) => e.to_string(),
        }
    };
    let e = edit("\"version\":\"1\"", "\"version\":\"7\"");
    assert!(
        e.contains("version 7") && e.contains("compeft.safetensors"),
        "{e}"
    );
    let e = edit(
        "\"format\":\"smelt-compeft\"",
        "\"format\":\"smelt-compefx\"",
    );
    assert!(e.contains("format"), "{e}");
    std::fs::write(&file, &good).unwrap();
    Compressed::open(&out).unwrap();
}

/// `smelt compress MODEL --base BASE -o OUT --device cpu EXTRA...`
fn compress_cli(model: &Path, base: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    smelt()
        .arg("compress")
        .arg(model)
        .arg("--base")
        .arg(base)
        .arg("-o")
        .arg(out)
        .args(["--device", "cpu"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn cli_compress_reports_the_ratio_and_verifies() {
    let models = reference().join("models");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ft1-c");
    let o = compress_cli(
        &models.join("ft1"),
        &models.join("base"),
        &out,
        &["--density", "0.2"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("kept 2173 of 10864") && text.contains("x smaller"),
        "{text}"
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("compression ratio")
            && card.contains("| kept (at or above the threshold) | 2173 |"),
        "{card}"
    );
    let v = smelt().arg("verify").arg(&out).output().unwrap();
    assert!(v.status.success(), "{}", stderr(&v));
    // bad settings: non-zero exit, a message naming the flag, no folder
    for (flag, val) in [("--density", "1"), ("--density", "0"), ("--alpha", "-1")] {
        let bad = tmp.path().join(format!("bad{val}"));
        let setting = format!("{flag}={val}");
        let o = compress_cli(&models.join("ft1"), &models.join("base"), &bad, &[&setting]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(flag), "{}", stderr(&o));
        assert!(!bad.exists());
    }
    // a model of another architecture
    let o = compress_cli(
        &models.join("ft1"),
        &fixture_model("base"),
        &tmp.path().join("x"),
        &[],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("tensor"), "{}", stderr(&o));
}
