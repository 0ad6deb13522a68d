//! smelt against mergekit's own outputs (tests/fixtures/mergekit, see its README).
//!
//! Exact cases: every element of all 21 tensors within 1e-7 abs + 1e-6 rel, same names,
//! shapes and dtypes, through the whole pipeline (plan, execute, writer, read back).
//! Statistical cases (DARE, DELLA): per-matrix change fraction and mean |merged - base|
//! against the fixture's; DELLA's keep masks must also be the same on every backend.
//! ties_bf16: documented gap, measured and bounded from below.

use std::collections::BTreeMap;

use crate::common::*;
use smelt::dtype::DType;

const TENSORS: usize = 21;

fn expected(case: &str) -> BTreeMap<String, T> {
    let e = load_st(&case_dir(case).join("expected.safetensors"));
    assert_eq!(
        e.len(),
        TENSORS,
        "{case}: fixture should hold {TENSORS} tensors"
    );
    e
}

/// Same names, dtypes and shapes; values within `tol`.
fn assert_same_model(case: &str, got: &BTreeMap<String, T>, exp: &BTreeMap<String, T>, tol: Tol) {
    let gn: Vec<&String> = got.keys().collect();
    let en: Vec<&String> = exp.keys().collect();
    assert_eq!(gn, en, "{case}: tensor names differ");
    for (name, e) in exp {
        let g = &got[name];
        assert_eq!(g.dtype, e.dtype, "{case}: {name} dtype");
        assert_eq!(g.shape, e.shape, "{case}: {name} shape");
        assert_close(&format!("{case}: {name}"), &g.data, &e.data, e.dtype, tol);
    }
}

fn exact_case(bname: &str, backend: &dyn Backend, case: &str) {
    let exp = expected(case);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let plan = plan_file(&case_dir(case).join("config.yml"), None);
    assert_eq!(plan.tasks.len(), TENSORS, "{case}: planned tensors");
    let report = execute_to(&plan, backend, &out, 5_000_000_000);
    assert_eq!(report.tensors, TENSORS);
    assert_eq!(report.shards, 1);
    let got = load_dir(&out);
    assert_same_model(&format!("{case} on {bname}"), &got, &exp, Tol::FIXTURE);
}

fn linear(bname: &str, backend: &dyn Backend) {
    exact_case(bname, backend, "linear");
}

backend_test!(linear);

fn task_arithmetic(bname: &str, backend: &dyn Backend) {
    exact_case(bname, backend, "task_arithmetic");
}

backend_test!(task_arithmetic);

fn ties(bname: &str, backend: &dyn Backend) {
    exact_case(bname, backend, "ties");
}

backend_test!(ties);

fn ties_d03_weights(bname: &str, backend: &dyn Backend) {
    exact_case(bname, backend, "ties_d03_weights");
}

backend_test!(ties_d03_weights);

fn breadcrumbs(bname: &str, backend: &dyn Backend) {
    exact_case(bname, backend, "breadcrumbs");
}

backend_test!(breadcrumbs);

fn breadcrumbs_ties(bname: &str, backend: &dyn Backend) {
    exact_case(bname, backend, "breadcrumbs_ties");
}

backend_test!(breadcrumbs_ties);

fn passthrough(bname: &str, backend: &dyn Backend) {
    exact_case(bname, backend, "passthrough");
}

backend_test!(passthrough);

fn sce(bname: &str, backend: &dyn Backend) {
    exact_case(bname, backend, "sce");
}

backend_test!(sce);

fn model_stock(bname: &str, backend: &dyn Backend) {
    exact_case(bname, backend, "model_stock");
}

backend_test!(model_stock);

fn slerp(bname: &str, backend: &dyn Backend) {
    exact_case(bname, backend, "slerp");
}

backend_test!(slerp);

fn nuslerp(bname: &str, backend: &dyn Backend) {
    exact_case(bname, backend, "nuslerp");
}

backend_test!(nuslerp);

fn karcher(bname: &str, backend: &dyn Backend) {
    exact_case(bname, backend, "karcher");
}

backend_test!(karcher);

fn multislerp(bname: &str, backend: &dyn Backend) {
    exact_case(bname, backend, "multislerp");
}

backend_test!(multislerp);

/// The passthrough case is a pure copy: check it bit for bit as well, against the models it
/// names (layer 0 and the embeddings from ft1, layer 1, norm and lm_head from ft2).
fn passthrough_is_a_bit_copy_of_its_sources(bname: &str, backend: &dyn Backend) {
    let ft1 = load_st(&fixture_model("ft1").join("model.safetensors"));
    let ft2 = load_st(&fixture_model("ft2").join("model.safetensors"));
    let plan = plan_file(&case_dir("passthrough").join("config.yml"), None);
    let got = merge_plan(&plan, backend);
    for (name, g) in &got {
        let src = if name.contains("layers.0.") || name.contains("embed_tokens") {
            &ft1
        } else {
            &ft2
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&g.data),
            bits(&src[name].data),
            "{bname}: {name} is not a bit copy"
        );
    }
}

backend_test!(passthrough_is_a_bit_copy_of_its_sources);

/// Fraction of elements that differ from the base, and the mean |x - base|.
fn change_stats(x: &[f32], base: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let changed = x.iter().zip(base).filter(|(a, b)| a != b).count() as f64;
    let mean: f64 = x
        .iter()
        .zip(base)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum::<f64>();
    (changed / n, mean / n)
}

fn statistical_case(case: &str) {
    statistical_case_seeds(case, &[0, 42, 20240601]);
}

/// The statistics of `case` for each backend and seed; returns the merges, by backend (in
/// `backends()` order) then seed.
fn statistical_case_seeds(case: &str, seeds: &[u64]) -> Vec<(String, Vec<BTreeMap<String, T>>)> {
    assert!(case_dir(case).join("STATISTICAL").exists());
    let exp = expected(case);
    let base = load_st(&fixture_model("base").join("model.safetensors"));
    let mut all = Vec::new();
    for (bname, backend) in backends() {
        let mut runs = Vec::new();
        for &seed in seeds {
            let plan = plan_file(&case_dir(case).join("config.yml"), Some(seed));
            let got = merge_plan(&plan, backend.as_ref());
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                exp.keys().collect::<Vec<_>>()
            );
            let mut matrices = 0;
            for (name, e) in &exp {
                let g = &got[name];
                assert_eq!((g.dtype, &g.shape), (e.dtype, &e.shape), "{name}");
                if e.shape.len() != 2 {
                    continue;
                }
                matrices += 1;
                let b = &base[name].data;
                let (fg, mg) = change_stats(&g.data, b);
                let (fe, me) = change_stats(&e.data, b);
                let what = format!("{case} on {bname}, seed {seed}, {name}");
                assert!(
                    (fg - fe).abs() <= 0.05,
                    "{what}: fraction changed {fg:.4}, mergekit {fe:.4} (allowed ±0.05)"
                );
                assert!(
                    (mg - me).abs() <= 0.15 * me,
                    "{what}: mean |merged - base| {mg:.4e}, mergekit {me:.4e} (allowed ±15%)"
                );
            }
            assert_eq!(matrices, 16, "{case}: 2-D tensors compared");
            runs.push(got);
        }
        all.push((bname, runs));
    }
    all
}

#[test]
fn dare_linear_statistics() {
    statistical_case("dare_linear");
}

#[test]
fn dare_ties_statistics() {
    statistical_case("dare_ties");
}

/// DELLA by the README's statistics on every backend (one seed: lavapipe ranks rows
/// slowly). DELLA's random keep depends only on (seed, tensor, model, element), so every
/// backend must also change exactly the same elements of every tensor (the set where
/// merged != base) and agree on the values within the fixture tolerance; another seed
/// changes other elements.
#[test]
fn della_statistics_and_masks() {
    let seed = 42u64;
    let runs = statistical_case_seeds("della", &[seed]);
    let base = load_st(&fixture_model("base").join("model.safetensors"));
    let changed = |name: &str, x: &[f32]| -> Vec<usize> {
        let b = &base[name].data;
        (0..x.len()).filter(|&i| x[i] != b[i]).collect()
    };
    let (rname, rruns) = &runs[0];
    let reference = &rruns[0];
    let masks: BTreeMap<String, Vec<usize>> = reference
        .iter()
        .map(|(name, t)| (name.clone(), changed(name, &t.data)))
        .collect();
    for (name, m) in &masks {
        let n = reference[name].data.len();
        assert!(
            !m.is_empty() && m.len() < n,
            "{name}: {} of {n} elements changed on {rname}",
            m.len()
        );
    }
    for (bname, bruns) in &runs[1..] {
        for (name, r) in reference {
            let g = &bruns[0][name];
            let (cr, cg) = (&masks[name], changed(name, &g.data));
            assert!(
                *cr == cg,
                "{name}: {rname} changed {} elements, {bname} {}; first difference {:?}",
                cr.len(),
                cg.len(),
                cr.iter().zip(&cg).find(|(a, b)| a != b)
            );
            assert_close(
                &format!("della, {name}: {bname} against {rname}"),
                &g.data,
                &r.data,
                DType::F32,
                Tol::FIXTURE,
            );
        }
    }
    let plan = plan_file(&case_dir("della").join("config.yml"), Some(seed + 1));
    let other = merge_plan(&plan, &smelt::backend::cpu::Cpu::new());
    for (name, m) in &masks {
        assert!(
            *m != changed(name, &other[name].data),
            "{name}: seeds {seed} and {} change the same elements",
            seed + 1
        );
    }
}

/// A single-model dare_linear (weight 1, lambda 1, rescale true): every element of
/// out - base is 0 (dropped) or delta · Σ|delta| / Σ|kept delta| (kept), the L1 norm of the
/// delta is preserved, and each tensor keeps a fraction p of its elements within
/// 4·sqrt(p(1-p)/n). Base and delta magnitudes are chosen so that a kept element can never
/// round back to the base.
fn dare_rescale_invariant(bname: &str, backend: &dyn Backend) {
    let p = 0.3f64;
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Lcg(7);
    let shapes: [(&str, Vec<usize>); 3] = [
        ("a", vec![64, 64]),
        ("b", vec![16385]), // one past a CPU chunk
        ("c", vec![7]),
    ];
    let mut base = Vec::new();
    let mut ft = Vec::new();
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        let b: Vec<f32> = (0..n).map(|_| rng.sym() * 0.125).collect();
        let x: Vec<f32> = b
            .iter()
            .map(|b| {
                let m = 0.5 + 0.5 * rng.sym().abs();
                let s = if rng.next_u32() & 1 == 0 { 1.0 } else { -1.0 };
                b + s * m
            })
            .collect();
        base.push((*name, T::f32(shape, b)));
        ft.push((*name, T::f32(shape, x)));
    }
    for (dir, list) in [("base", &base), ("ft", &ft)] {
        let tensors: Vec<(&str, &T)> = list.iter().map(|(n, t)| (*n, t)).collect();
        write_model(&tmp.path().join(dir), 0, &tensors);
    }
    let recipe = format!(
        "merge_method: dare_linear\nbase_model: base\nmodels:\n  - model: ft\n    parameters: {{weight: 1.0, density: {p}}}\nparameters: {{lambda: 1.0, rescale: true}}\ndtype: float32\n"
    );
    for seed in [0u64, 1, 99] {
        let plan = plan_text(tmp.path(), &recipe, Some(seed));
        let got = merge_plan(&plan, backend);
        for ((name, bt), (_, xt)) in base.iter().zip(&ft) {
            let out = &got[*name].data;
            let n = out.len();
            // the delta in the compute dtype, as the engine forms it
            let d: Vec<f32> = xt.data.iter().zip(&bt.data).map(|(x, b)| x - b).collect();
            let kept: Vec<bool> = out.iter().zip(&bt.data).map(|(o, b)| o != b).collect();
            let k = kept.iter().filter(|k| **k).count();
            let full: f64 = d.iter().map(|v| v.abs() as f64).sum();
            let kept_l1: f64 = d
                .iter()
                .zip(&kept)
                .filter(|(_, k)| **k)
                .map(|(v, _)| v.abs() as f64)
                .sum();
            let what = format!("{bname}, seed {seed}, tensor {name}");
            assert!(k > 0, "{what}: nothing kept");
            let ratio = full / kept_l1;
            // out - base, for kept elements only, against delta * ratio
            let (mut g, mut e) = (Vec::new(), Vec::new());
            for i in 0..n {
                if kept[i] {
                    g.push((out[i] as f64 - bt.data[i] as f64) as f32);
                    e.push((d[i] as f64 * ratio) as f32);
                }
            }
            assert_close(
                &format!("{what}: kept elements"),
                &g,
                &e,
                DType::F32,
                Tol::abs_rel(0.0, 4.0 * f32::EPSILON as f64),
            );
            let out_l1: f64 = out
                .iter()
                .zip(&bt.data)
                .map(|(o, b)| (*o as f64 - *b as f64).abs())
                .sum();
            assert!(
                (out_l1 - full).abs() <= 1e-5 * full,
                "{what}: L1 {out_l1} vs delta L1 {full}"
            );
            let frac = k as f64 / n as f64;
            let bound = 4.0 * (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                (frac - p).abs() <= bound,
                "{what}: kept fraction {frac:.4}, expected {p} ± {bound:.4}"
            );
        }
    }
}

backend_test!(dare_rescale_invariant);

/// mergekit computed `ties_bf16` in bf16 throughout; smelt rounds the inputs to bf16, computes
/// in f32 and rounds once. The README measured 96% of elements within 1 bf16 ulp for that
/// approach; we require at least 90% and print what we got.
fn ties_bf16_documented_gap(bname: &str, backend: &dyn Backend) {
    let case = "ties_bf16";
    assert!(case_dir(case).join("BF16_COMPUTE").exists());
    let exp = expected(case);
    let plan = plan_file(&case_dir(case).join("config.yml"), None);
    let got = merge_plan(&plan, backend);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        exp.keys().collect::<Vec<_>>()
    );
    let (mut n, mut same, mut one, mut over8) = (0usize, 0usize, 0usize, 0usize);
    for (name, e) in &exp {
        let g = &got[name];
        assert_eq!(e.dtype, DType::BF16, "{name}: fixture dtype");
        assert_eq!(g.dtype, DType::BF16, "{name}: output dtype");
        assert_eq!(g.shape, e.shape, "{name}");
        n += e.data.len();
        same += e.data.len() - compare(&g.data, &e.data, DType::BF16, Tol::EXACT).failed;
        one += e.data.len() - compare(&g.data, &e.data, DType::BF16, Tol::ulps(1)).failed;
        over8 += compare(&g.data, &e.data, DType::BF16, Tol::ulps(8)).failed;
    }
    let (fs, f1, f8) = (
        same as f64 / n as f64,
        one as f64 / n as f64,
        over8 as f64 / n as f64,
    );
    println!(
        "ties_bf16 on {bname}: {n} elements, identical {:.2}%, within 1 bf16 ulp {:.2}%, more than 8 ulps {:.2}%",
        100.0 * fs,
        100.0 * f1,
        100.0 * f8
    );
    assert!(
        f1 >= 0.90,
        "{bname}: only {:.2}% within 1 bf16 ulp (README: ~96%)",
        100.0 * f1
    );
    assert!(fs >= 0.85, "{bname}: only {:.2}% identical", 100.0 * fs);
}

backend_test!(ties_bf16_documented_gap);
