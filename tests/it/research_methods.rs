//! The research methods beyond mergekit (LiNeS, TSV-M, Fisher, ...) against the outputs of
//! their authors' code (tests/fixtures/reference, see its README), small hand-computed
//! cases, and their defining properties. Every math test runs on every backend.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::*;

/// The fixture README's bound: |got − expected| ≤ 1e-6 + 1e-5·|expected|.
const REF_TOL: Tol = Tol::abs_rel(1e-6, 1e-5);

fn reference() -> PathBuf {
    root().join("tests/fixtures/reference")
}

fn ref_model(name: &str) -> String {
    reference().join("models").join(name).display().to_string()
}

fn ref_expected(case: &str) -> BTreeMap<String, T> {
    let e = load_st(
        &reference()
            .join("cases")
            .join(case)
            .join("expected.safetensors"),
    );
    assert_eq!(e.len(), 30, "{case}: fixture should hold 30 tensors");
    e
}

/// A recipe over the fixture models: `base` (if any), then `models` in order, with
/// `extra` (indented YAML lines) appended at the top level.
fn ref_recipe(method: &str, base: Option<&str>, models: &[&str], extra: &str) -> String {
    let mut r = format!("merge_method: {method}\ndtype: float32\n");
    if let Some(b) = base {
        r += &format!("base_model: {}\n", ref_model(b));
    }
    r += "models:\n";
    for m in models {
        r += &format!("  - model: {}\n", ref_model(m));
    }
    r + extra
}

/// Merges `recipe` on `backend` and compares all 30 tensors with the fixture case.
fn ref_case(bname: &str, backend: &dyn Backend, case: &str, recipe: &str, tol: Tol) {
    let exp = ref_expected(case);
    let tmp = tempfile::tempdir().unwrap();
    let got = merge_text(tmp.path(), recipe, backend);
    let gn: Vec<&String> = got.keys().collect();
    let en: Vec<&String> = exp.keys().collect();
    assert_eq!(gn, en, "{case} on {bname}: tensor names");
    for (name, e) in &exp {
        let g = &got[name];
        assert_eq!(g.shape, e.shape, "{case} on {bname}: {name} shape");
        assert_close(
            &format!("{case} on {bname}: {name}"),
            &g.data,
            &e.data,
            e.dtype,
            tol,
        );
    }
}

/// A tiny model: embedding [2, 2], one [2] norm per layer, a final norm [2].
fn layered(dir: &Path, layers: usize, v: impl Fn(&str, usize) -> f32) {
    let mut names = vec!["model.embed_tokens.weight".to_string()];
    for l in 0..layers {
        names.push(format!("model.layers.{l}.input_layernorm.weight"));
    }
    names.push("model.norm.weight".to_string());
    let ts: Vec<(String, T)> = names
        .iter()
        .map(|n| {
            let len = if n.contains("embed") { 4 } else { 2 };
            let shape: Vec<usize> = if len == 4 { vec![2, 2] } else { vec![2] };
            (
                n.clone(),
                T::f32(&shape, (0..len).map(|i| v(n, i)).collect()),
            )
        })
        .collect();
    let refs: Vec<(&str, &T)> = ts.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_model(dir, layers, &refs);
}

// ---- LiNeS -------------------------------------------------------------------------------

fn lines_fixture_task_arithmetic(bname: &str, backend: &dyn Backend) {
    // α unset: 1/T = 1/3, the reference's computed α for task arithmetic
    let r = ref_recipe(
        "task_arithmetic",
        Some("base"),
        &["ft1", "ft2", "ft3"],
        "parameters:\n  weight: 1.0\n  lines_beta: 0.5\n",
    );
    ref_case(bname, backend, "lines", &r, REF_TOL);
}

backend_test!(lines_fixture_task_arithmetic);

fn lines_hand_computed_scales(bname: &str, backend: &dyn Backend) {
    // 5 layers: depth l/4; deltas 1 and 3 everywhere, weights 1: Σ = 4, scaled by
    // alpha + beta·l/4 = 0.2 + 0.4·l/4 → layer l gets 4·(0.2 + 0.1·l); embed/norm get 0.8.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    layered(&d.join("base"), 5, |_, i| i as f32);
    layered(&d.join("a"), 5, |_, i| i as f32 + 1.0);
    layered(&d.join("b"), 5, |_, i| i as f32 + 3.0);
    let recipe =
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: a\n  - model: b\n\
                  parameters:\n  weight: 1.0\n  lines_alpha: 0.2\n  lines_beta: 0.4\n";
    let got = merge_text(d, recipe, backend);
    for (name, t) in &got {
        let scale = match name.split('.').nth(2).and_then(|s| s.parse::<f32>().ok()) {
            Some(l) => 0.2 + 0.1 * l,
            None => 0.2,
        };
        let exp: Vec<f32> = (0..t.data.len()).map(|i| i as f32 + 4.0 * scale).collect();
        assert_close(
            &format!("{bname}: {name}"),
            &t.data,
            &exp,
            t.dtype,
            Tol::ulps(2),
        );
    }
}

backend_test!(lines_hand_computed_scales);

fn lines_alpha_of_sparsifying_methods_comes_from_whole_model_norms(
    bname: &str,
    backend: &dyn Backend,
) {
    // The paper's α = (‖Σ τ_t‖₁ / ‖τ_MTL‖₁) / T: with β = 0 every tensor is scaled by α, so
    // the merged task vector's whole-model L1 norm becomes ‖Σ τ_t‖₁ / T (the unpruned sum).
    let load = |n: &str| load_dir(&reference().join("models").join(n));
    let base = load("base");
    let fts: Vec<_> = ["ft1", "ft2", "ft3"].iter().map(|n| load(n)).collect();
    let sum_l1: f64 = base
        .iter()
        .map(|(name, b)| {
            (0..b.data.len())
                .map(|e| {
                    fts.iter()
                        .map(|f| (f[name].data[e] - b.data[e]) as f64)
                        .sum::<f64>()
                        .abs()
                })
                .sum::<f64>()
        })
        .sum();
    let want = sum_l1 / 3.0;
    for (method, extra) in [
        ("ties", "  density: 0.4\n"),
        ("dare_ties", "  density: 0.5\n"),
        ("breadcrumbs", "  density: 0.6\n  gamma: 0.05\n"),
    ] {
        let r = ref_recipe(
            method,
            Some("base"),
            &["ft1", "ft2", "ft3"],
            &format!("parameters:\n  weight: 1.0\n  lines_beta: 0.0\n{extra}"),
        );
        let tmp = tempfile::tempdir().unwrap();
        let got = merge_text(tmp.path(), &r, backend);
        let l1: f64 = got
            .iter()
            .map(|(n, t)| {
                t.data
                    .iter()
                    .zip(&base[n].data)
                    .map(|(x, b)| (x - b).abs() as f64)
                    .sum::<f64>()
            })
            .sum();
        assert!(
            (l1 - want).abs() < 1e-5 * want,
            "{method} on {bname}: ‖τ‖₁ {l1} vs ‖Σ τ_t‖₁ / T {want}"
        );
    }
}

backend_test!(lines_alpha_of_sparsifying_methods_comes_from_whole_model_norms);

#[test]
fn lines_alpha_without_beta_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    layered(&d.join("base"), 2, |_, i| i as f32);
    layered(&d.join("a"), 2, |_, i| i as f32 + 1.0);
    std::fs::write(
        d.join("r.yml"),
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\nparameters:\n  weight: 1.0\n  lines_alpha: 0.3\n",
    )
    .unwrap();
    let r = smelt::recipe::Recipe::load(&d.join("r.yml")).unwrap();
    let e = smelt::plan::Plan::build(r, None)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("lines_alpha") && e.contains("lines_beta"), "{e}");
}

// ---- TSV-M -------------------------------------------------------------------------------

fn tsv_fixture(bname: &str, backend: &dyn Backend) {
    let r = ref_recipe("tsv", Some("base"), &["ft1", "ft2", "ft3"], "");
    ref_case(bname, backend, "tsvm", &r, REF_TOL);
}

backend_test!(tsv_fixture);

fn tsv_fixture_per_task_alpha(bname: &str, backend: &dyn Backend) {
    let mut r = format!(
        "merge_method: tsv\ndtype: float32\nbase_model: {}\nmodels:\n",
        ref_model("base")
    );
    for (m, w) in [("ft1", "1.0"), ("ft2", "0.5"), ("ft3", "0.25")] {
        r += &format!(
            "  - model: {}\n    parameters:\n      weight: {w}\n",
            ref_model(m)
        );
    }
    ref_case(bname, backend, "tsvm_alpha_list", &r, REF_TOL);
}

backend_test!(tsv_fixture_per_task_alpha);

/// Writes `base` and one model per task vector (each `rows × cols`, tensor `w`).
fn matrix_models(dir: &Path, base: &[f32], taus: &[Vec<f32>], shape: &[usize]) {
    write_model(
        &dir.join("base"),
        0,
        &[("w", &T::f32(shape, base.to_vec()))],
    );
    for (i, tau) in taus.iter().enumerate() {
        let x: Vec<f32> = base.iter().zip(tau).map(|(b, d)| b + d).collect();
        write_model(&dir.join(format!("m{i}")), 0, &[("w", &T::f32(shape, x))]);
    }
}

fn tsv_recipe(n: usize, extra: &str) -> String {
    let mut r = "merge_method: tsv\nbase_model: base\nmodels:\n".to_string();
    for i in 0..n {
        r += &format!("  - model: m{i}\n");
    }
    r + extra
}

fn tsv_orthogonal_low_rank_tasks_add_up_exactly(bname: &str, backend: &dyn Backend) {
    // 6×4, T = 2 → k = int(4·0.5) = 2. τ0 = 3·e0·f0ᵀ + 1·e1·f1ᵀ, τ1 = 2·e2·f2ᵀ + 0.5·e3·f3ᵀ: rank k with
    // mutually orthogonal singular vectors, so the polar factors change nothing and TSV-M is
    // exactly τ0 + τ1 (the interference it removes is zero), times alpha = 0.5.
    let (rows, cols) = (6, 4);
    let mut t0 = vec![0f32; rows * cols];
    let mut t1 = vec![0f32; rows * cols];
    t0[0] = 3.0; // (0, 0)
    t0[cols + 1] = 1.0; // (1, 1)
    t1[2 * cols + 2] = 2.0; // (2, 2)
    t1[3 * cols + 3] = 0.5; // (3, 3)
    let base: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5).collect();
    let tmp = tempfile::tempdir().unwrap();
    matrix_models(tmp.path(), &base, &[t0.clone(), t1.clone()], &[rows, cols]);
    let got = merge_text(
        tmp.path(),
        &tsv_recipe(2, "parameters:\n  alpha: 0.5\n"),
        backend,
    );
    let exp: Vec<f32> = (0..rows * cols)
        .map(|i| base[i] + 0.5 * (t0[i] + t1[i]))
        .collect();
    assert_close(
        bname,
        &got["w"].data,
        &exp,
        got["w"].dtype,
        Tol::abs_rel(1e-6, 1e-6),
    );
}

backend_test!(tsv_orthogonal_low_rank_tasks_add_up_exactly);

fn tsv_keeps_top_singular_directions_of_each_task(bname: &str, backend: &dyn Backend) {
    // One task, 5×3, k = 3: the whole task vector comes back. Two tasks of 5×3 (k = 1) with
    // overlapping subspaces: the result has rank ≤ 2, and its singular values are exactly
    // the two tasks' top singular values (polar factors are orthonormal).
    let mut rng = Lcg(11);
    let (rows, cols) = (5, 3);
    let base: Vec<f32> = (0..rows * cols).map(|_| rng.sym()).collect();
    let taus: Vec<Vec<f32>> = (0..2)
        .map(|_| (0..rows * cols).map(|_| rng.sym()).collect())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    matrix_models(tmp.path(), &base, &taus, &[rows, cols]);
    let one = tempfile::tempdir().unwrap();
    matrix_models(one.path(), &base, &taus[..1], &[rows, cols]);
    let top = |t: &[f32]| {
        let m = smelt::linalg::Mat {
            rows,
            cols,
            data: t.to_vec(),
        };
        smelt::linalg::svd(&m, None).unwrap().s[0]
    };
    let got = merge_text(one.path(), &tsv_recipe(1, ""), backend);
    let exp: Vec<f32> = base.iter().zip(&taus[0]).map(|(b, d)| b + d).collect();
    assert_close(
        &format!("{bname}: one task"),
        &got["w"].data,
        &exp,
        got["w"].dtype,
        Tol::abs_rel(1e-6, 1e-5),
    );

    let got = merge_text(tmp.path(), &tsv_recipe(2, ""), backend);
    let tau: Vec<f32> = got["w"]
        .data
        .iter()
        .zip(&base)
        .map(|(x, b)| x - b)
        .collect();
    let s = smelt::linalg::svd(
        &smelt::linalg::Mat {
            rows,
            cols,
            data: tau,
        },
        None,
    )
    .unwrap()
    .s;
    let mut want = [top(&taus[0]), top(&taus[1])];
    want.sort_by(|a, b| b.total_cmp(a));
    assert!(
        (s[0] - want[0]).abs() < 1e-5 && (s[1] - want[1]).abs() < 1e-5,
        "{bname}: {s:?} vs {want:?}"
    );
    assert!(s[2].abs() < 1e-5, "{bname}: rank > 2: {s:?}");
}

backend_test!(tsv_keeps_top_singular_directions_of_each_task);

fn tsv_more_tasks_than_rank_leaves_the_matrix_alone(bname: &str, backend: &dyn Backend) {
    // 2×2 with 3 tasks: k = int(2/3) = 0, no update (fusion_bench's behaviour); the 1-D
    // tensor is the mean of the task vectors.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mk = |name: &str, add: f32| {
        let w = T::f32(&[2, 2], vec![1.0 + add, 2.0, 3.0, 4.0 - add]);
        let n = T::f32(&[2], vec![add, 2.0 * add]);
        write_model(&d.join(name), 0, &[("w", &w), ("n", &n)]);
    };
    mk("base", 0.0);
    mk("m0", 1.0);
    mk("m1", 2.0);
    mk("m2", 6.0);
    let got = merge_text(d, &tsv_recipe(3, ""), backend);
    assert_close(
        &format!("{bname} w"),
        &got["w"].data,
        &[1.0, 2.0, 3.0, 4.0],
        got["w"].dtype,
        Tol::EXACT,
    );
    assert_close(
        &format!("{bname} n"),
        &got["n"].data,
        &[3.0, 6.0],
        got["n"].dtype,
        Tol::ulps(1),
    );
}

backend_test!(tsv_more_tasks_than_rank_leaves_the_matrix_alone);

// ---- Fisher ------------------------------------------------------------------------------

fn fisher_fixture(bname: &str, backend: &dyn Backend) {
    ref_case(
        bname,
        backend,
        "fisher",
        &ref_recipe("fisher", None, &["ft1", "ft2", "ft3"], ""),
        REF_TOL,
    );
}

backend_test!(fisher_fixture);

/// Two one-tensor models with their Fisher files.
fn fisher_models(dir: &Path, x: [&[f32]; 2], f: [&[f32]; 2]) {
    for i in 0..2 {
        let d = dir.join(format!("m{i}"));
        write_model(&d, 0, &[("w", &T::f32(&[x[i].len()], x[i].to_vec()))]);
        write_st(
            &d.join("fisher.safetensors"),
            &[("w", &T::f32(&[f[i].len()], f[i].to_vec()))],
        );
    }
}

fn fisher_hand_computed(bname: &str, backend: &dyn Backend) {
    // F0 = (1, 3, 0), F1 = (3, 1, 0), θ0 = (0, 0, 2), θ1 = (4, 8, 6), floor 1e-6 → the third
    // element has equal weights (the floor) and averages.
    // Unnormalised, c = (1/2, 1/2): (1·0 + 3·4)/4 = 3, (3·0 + 1·8)/4 = 2, 4.
    // Normalised: g0 = g1 = ‖(1, 3, 0)‖ = √10, so c stays equal: the same numbers.
    // Weights 3 and 1, unnormalised: (3·1·0 + 1·3·4)/(3 + 3) = 2, (3·3·0 + 8)/(9 + 1) = 0.8, 3.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fisher_models(
        d,
        [&[0.0, 0.0, 2.0], &[4.0, 8.0, 6.0]],
        [&[1.0, 3.0, 0.0], &[3.0, 1.0, 0.0]],
    );
    let base = "merge_method: fisher\nmodels:\n  - model: m0\n  - model: m1\n";
    let weighted = "merge_method: fisher\nmodels:\n  - model: m0\n    parameters:\n      weight: 3\n  - model: m1\n    parameters:\n      weight: 1\nparameters:\n  normalize_fisher_weight: false\n";
    for (recipe, exp) in [
        (base.to_string(), [3.0, 2.0, 4.0]),
        (
            format!("{base}parameters:\n  normalize_fisher_weight: false\n"),
            [3.0, 2.0, 4.0],
        ),
        (weighted.to_string(), [2.0, 0.8, 3.0]),
    ] {
        let got = merge_text(d, &recipe, backend);
        assert_close(
            &format!("{bname}: {recipe}"),
            &got["w"].data,
            &exp,
            got["w"].dtype,
            Tol::abs_rel(1e-6, 1e-6),
        );
    }
}

backend_test!(fisher_hand_computed);

fn fisher_normalisation_uses_whole_model_norms(bname: &str, backend: &dyn Backend) {
    // Model 1's Fisher is 10× model 0's everywhere: normalised, both get the same effective
    // weight (c_i ∝ 1/g_i cancels the factor), so the result is the plain mean; unnormalised
    // it leans 10:1 toward model 1.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fisher_models(d, [&[0.0, 1.0], &[11.0, 12.0]], [&[0.5, 2.0], &[5.0, 20.0]]);
    let got = merge_text(
        d,
        "merge_method: fisher\nmodels:\n  - model: m0\n  - model: m1\n",
        backend,
    );
    assert_close(
        &format!("{bname} normalised"),
        &got["w"].data,
        &[5.5, 6.5],
        got["w"].dtype,
        Tol::abs_rel(1e-5, 1e-5),
    );
    let got = merge_text(
        d,
        "merge_method: fisher\nmodels:\n  - model: m0\n  - model: m1\nparameters:\n  normalize_fisher_weight: false\n",
        backend,
    );
    assert_close(
        &format!("{bname} raw"),
        &got["w"].data,
        &[10.0, 11.0],
        got["w"].dtype,
        Tol::abs_rel(1e-5, 1e-5),
    );
}

backend_test!(fisher_normalisation_uses_whole_model_norms);

#[test]
fn fisher_primitive_cpu_gpu_parity() {
    use smelt::backend::{Input, Job};
    use smelt::dtype::DType;
    let n = 65_537;
    let mut rng = Lcg(5);
    let xs: Vec<Vec<u8>> = (0..3)
        .map(|_| encode(DType::BF16, &(0..n).map(|_| rng.sym()).collect::<Vec<_>>()))
        .collect();
    let fs: Vec<Vec<u8>> = (0..3)
        .map(|_| {
            encode(
                DType::F32,
                &(0..n).map(|_| rng.sym().abs() * 1e-3).collect::<Vec<_>>(),
            )
        })
        .collect();
    let mut inputs: Vec<Input> = xs
        .iter()
        .map(|b| Input {
            bytes: b,
            dtype: DType::BF16,
        })
        .collect();
    inputs.extend(fs.iter().map(|b| Input {
        bytes: b,
        dtype: DType::F32,
    }));
    let coefs = [0.2f32, 0.5, 0.3];
    let mut outs = Vec::new();
    for (bname, backend) in backends() {
        let job = Job::new("p.w", None, inputs.clone(), DType::F32, DType::F32);
        let mut out = vec![0u8; n * 4];
        backend.fisher(&job, &coefs, 1e-6, &mut out).unwrap();
        backend.end_job(&job);
        let mut v = vec![0f32; n];
        smelt::dtype::decode(DType::F32, &out, &mut v);
        outs.push((bname, v));
    }
    for (bname, v) in &outs[1..] {
        assert_close(
            &format!("{bname} vs cpu"),
            v,
            &outs[0].1,
            DType::F32,
            Tol::ulps(4),
        );
    }
}

#[test]
fn fisher_missing_or_misshapen_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    fisher_models(
        d,
        [&[0.0, 1.0], &[1.0, 2.0]],
        [&[1.0, 1.0], &[1.0, 1.0, 1.0]],
    );
    let plan_err = |text: &str| {
        std::fs::write(d.join("r.yml"), text).unwrap();
        let r = smelt::recipe::Recipe::load(&d.join("r.yml")).unwrap();
        smelt::plan::Plan::build(r, None)
            .err()
            .expect("refused")
            .to_string()
    };
    let e = plan_err("merge_method: fisher\nmodels:\n  - model: m0\n  - model: m1\n");
    assert!(
        e.contains("m1") && e.contains("[3]") && e.contains("[2]") && e.contains('w'),
        "{e}"
    );
    std::fs::remove_file(d.join("m0/fisher.safetensors")).unwrap();
    let e = plan_err("merge_method: fisher\nmodels:\n  - model: m0\n  - model: m1\n");
    assert!(e.contains("m0") && e.contains("fisher.safetensors"), "{e}");
}

// ---- WIDEN -------------------------------------------------------------------------------

fn widen_fixture_defaults(bname: &str, backend: &dyn Backend) {
    let r = ref_recipe("widen", Some("base"), &["pt1", "ft1", "ft2"], "");
    ref_case(bname, backend, "widen", &r, REF_TOL);
}

backend_test!(widen_fixture_defaults);

fn widen_fixture_t15_s05(bname: &str, backend: &dyn Backend) {
    let r = ref_recipe(
        "widen",
        Some("base"),
        &["pt1", "ft1", "ft2"],
        "parameters:\n  above_average_value_ratio: 1.5\n  score_calibration_value: 0.5\n",
    );
    ref_case(bname, backend, "widen_t1.5_s0.5", &r, REF_TOL);
}

backend_test!(widen_fixture_t15_s05);

fn three_models(dir: &Path, name: &str, shape: &[usize], base: &[f32], a: &[f32], b: &[f32]) {
    for (m, v) in [("base", base), ("a", a), ("b", b)] {
        write_model(&dir.join(m), 0, &[(name, &T::f32(shape, v.to_vec()))]);
    }
}

const WIDEN_AB: &str =
    "merge_method: widen\nbase_model: base\nmodels:\n  - model: a\n  - model: b\n";

fn widen_hand_computed_columns_and_tokens(bname: &str, backend: &dyn Backend) {
    // W0 = I (columns are input units). a = [[3, 0], [0, 1.25]]: column 0 grows by 2 (dM 2,
    // dD 0), column 1 by 0.25 (dM 0.25, dD 0): ranks dM (0.5, 0), dD (0, 0.5) (tie: stable).
    // b = [[1, 0], [1, 1]]: column 0 turns by 45° (dM √2−1, dD 1−1/√2), column 1 unchanged:
    // ranks dM (0.5, 0), dD (0.5, 0). Threshold t·mean = 0.25: rank 0.5 is calibrated to s=1.
    // score(dM): col 0 (1, 1), col 1 softmax(0, 0) = (½, ½).
    // score(dD): col 0 a = softmax(0, 0.5)_a = q = 1/(1 + e^0.5), b = 1; col 1 a = 1, b = q.
    // weights: col 0 a = ½(1 + q), b = 1; col 1 a = ¾, b = ½(½ + q).
    // δa = [[2, 0], [0, 0.25]], δb = [[0, 0], [1, 0]]:
    // W = [[1 + (1 + q), 0], [1, 1 + ¾·0.25]].
    let q = (1.0 / (1.0 + 0.5f64.exp())) as f32;
    let exp = [2.0 + q, 0.0, 1.0, 1.1875];
    let (base, a, b) = (
        [1.0, 0.0, 0.0, 1.0],
        [3.0, 0.0, 0.0, 1.25],
        [1.0, 0.0, 1.0, 1.0],
    );
    let tmp = tempfile::tempdir().unwrap();
    three_models(tmp.path(), "w", &[2, 2], &base, &a, &b);
    // the same numbers as an input embedding are stored transposed (tokens are rows)
    let tr = |m: &[f32; 4]| [m[0], m[2], m[1], m[3]];
    let emb = tempfile::tempdir().unwrap();
    three_models(
        emb.path(),
        "model.embed_tokens.weight",
        &[2, 2],
        &tr(&base),
        &tr(&a),
        &tr(&b),
    );
    let got = merge_text(tmp.path(), WIDEN_AB, backend);
    assert_close(
        &format!("{bname}: linear"),
        &got["w"].data,
        &exp,
        got["w"].dtype,
        Tol::abs_rel(1e-6, 1e-6),
    );
    let got = merge_text(emb.path(), WIDEN_AB, backend);
    let e = &got["model.embed_tokens.weight"];
    assert_close(
        &format!("{bname}: embedding"),
        &e.data,
        &tr(&exp),
        e.dtype,
        Tol::abs_rel(1e-6, 1e-6),
    );
}

backend_test!(widen_hand_computed_columns_and_tokens);

fn widen_hand_computed_1d(bname: &str, backend: &dyn Backend) {
    // δa = (1, 1), δb = (0.5, 3); G = |δ|, means 1 and 1.75 (t = 1): only b's second element
    // is above its mean (→ s = 0.5). Element 0: softmax(1, 0.5); element 1: a gets
    // softmax(1, 3)_a = 1/(1 + e²), b gets s.
    let p = 1.0 / (1.0 + (-0.5f64).exp());
    let e0 = p * 1.0 + (1.0 - p) * 0.5;
    let e1 = 1.0 / (1.0 + 2f64.exp()) + 0.5 * 3.0;
    let tmp = tempfile::tempdir().unwrap();
    three_models(tmp.path(), "n", &[2], &[1.0, 2.0], &[2.0, 3.0], &[1.5, 5.0]);
    let recipe = format!("{WIDEN_AB}parameters:\n  score_calibration_value: 0.5\n");
    let got = merge_text(tmp.path(), &recipe, backend);
    let exp = [(1.0 + e0) as f32, (2.0 + e1) as f32];
    assert_close(
        bname,
        &got["n"].data,
        &exp,
        got["n"].dtype,
        Tol::abs_rel(1e-6, 1e-6),
    );
}

backend_test!(widen_hand_computed_1d);

fn widen_uncalibrated_weights_of_a_column_sum_to_one(bname: &str, backend: &dyn Backend) {
    // With t so large that nothing is calibrated, each column's weights are two softmaxes
    // averaged: they sum to 1. With δb = 3·δa the merged column is base + r_c·δa with
    // r_c = w_a + 3·w_b ∈ (1, 3), the same r_c for every row of the column.
    let (rows, cols) = (5, 7);
    let mut rng = Lcg(3);
    let base: Vec<f32> = (0..rows * cols).map(|_| rng.sym()).collect();
    let da: Vec<f32> = (0..rows * cols).map(|_| 0.25 * rng.sym()).collect();
    let a: Vec<f32> = base.iter().zip(&da).map(|(b, d)| b + d).collect();
    let b: Vec<f32> = base.iter().zip(&da).map(|(b, d)| b + 3.0 * d).collect();
    let tmp = tempfile::tempdir().unwrap();
    three_models(tmp.path(), "w", &[rows, cols], &base, &a, &b);
    let recipe = format!("{WIDEN_AB}parameters:\n  above_average_value_ratio: 1000\n");
    let got = merge_text(tmp.path(), &recipe, backend);
    for c in 0..cols {
        let r: Vec<f64> = (0..rows)
            .map(|i| {
                let e = i * cols + c;
                // from the f32 output: (merged − base)/δa
                ((got["w"].data[e] as f64) - base[e] as f64) / (a[e] as f64 - base[e] as f64)
            })
            .collect();
        assert!(
            r.iter().all(|x| *x > 1.0 - 1e-4 && *x < 3.0 + 1e-4),
            "{bname} col {c}: {r:?}"
        );
        assert!(
            r.iter().all(|x| (x - r[0]).abs() < 1e-3),
            "{bname} col {c}: {r:?}"
        );
    }
}

backend_test!(widen_uncalibrated_weights_of_a_column_sum_to_one);

// ---- PCB ---------------------------------------------------------------------------------

fn pcb_fixture(bname: &str, backend: &dyn Backend) {
    let r = ref_recipe("pcb", Some("base"), &["ft1", "ft2", "ft3"], "");
    ref_case(bname, backend, "pcb", &r, REF_TOL);
}

backend_test!(pcb_fixture);

fn pcb_fixture_ratio_005(bname: &str, backend: &dyn Backend) {
    let r = ref_recipe(
        "pcb",
        Some("base"),
        &["ft1", "ft2", "ft3"],
        "parameters:\n  pcb_ratio: 0.05\n",
    );
    ref_case(bname, backend, "pcb_r0.05", &r, REF_TOL);
}

backend_test!(pcb_fixture_ratio_005);

/// PCB_merge written out in f64 over the flattened model (rows = tasks), with sorts for the
/// order statistics: the fixture README's semantics.
fn pcb_f64(taus: &[Vec<f64>], r: f64) -> Vec<f64> {
    let (n, d) = (taus.len(), taus[0].len());
    let sorted = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        s
    };
    let sum: Vec<f64> = (0..d).map(|e| taus.iter().map(|t| t[e]).sum()).collect();
    let (mut num, mut den) = (vec![0.0; d], vec![0.0; d]);
    for t in taus {
        let mag: Vec<f64> = t.iter().map(|x| x.abs()).collect();
        let s = sorted(&mag);
        let (lo, hi) = (
            s[(d as f64 * 1e-4) as usize],
            s[(d as f64 * (1.0 - 1e-4) - 1.0) as usize],
        );
        let a: Vec<f64> = mag.iter().map(|x| x.clamp(lo, hi)).collect();
        let beta: Vec<f64> = (0..d)
            .map(|e| (n as f64 * ((a[e] - lo) / (hi - lo)).powi(2)).exp() * (t[e] * sum[e]).tanh())
            .collect();
        let sb = sorted(&beta);
        let (q, bmax) = (sb[(d as f64 * (1.0 - r)) as usize], sb[d - 1]);
        for e in 0..d {
            let sc = (beta[e].clamp(q, bmax) - q) / (bmax - q);
            num[e] += t[e].signum() * a[e] * sc;
            den[e] += sc;
        }
    }
    (0..d).map(|e| num[e] / den[e].max(1e-12)).collect()
}

fn pcb_small_model_against_f64_formulas(bname: &str, backend: &dyn Backend) {
    // Two tensors (d = 3 + 4 = 7), three models: the order statistics are over both tensors.
    // d = 7: lo = smallest |τ|, hi = 2nd largest, q at ascending position int(7·0.5) = 3.
    let mut rng = Lcg(21);
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base: Vec<f32> = (0..7).map(|_| rng.sym()).collect();
    let taus: Vec<Vec<f32>> = (0..3)
        .map(|_| (0..7).map(|_| 0.5 * rng.sym()).collect())
        .collect();
    let save = |name: &str, v: &[f32]| {
        let a = T::f32(&[3], v[..3].to_vec());
        let b = T::f32(&[2, 2], v[3..].to_vec());
        write_model(&d.join(name), 0, &[("a", &a), ("b", &b)]);
    };
    save("base", &base);
    let mut recipe =
        "merge_method: pcb\nbase_model: base\nparameters:\n  pcb_ratio: 0.5\nmodels:\n".to_string();
    let mut t64 = Vec::new();
    for (i, t) in taus.iter().enumerate() {
        let x: Vec<f32> = base.iter().zip(t).map(|(b, d)| b + d).collect();
        t64.push(
            x.iter()
                .zip(&base)
                .map(|(x, b)| (x - b) as f64)
                .collect::<Vec<f64>>(),
        );
        save(&format!("m{i}"), &x);
        recipe += &format!("  - model: m{i}\n");
    }
    let merged = pcb_f64(&t64, 0.5);
    let exp: Vec<f32> = (0..7)
        .map(|e| (base[e] as f64 + merged[e]) as f32)
        .collect();
    let got = merge_text(d, &recipe, backend);
    let mut all = got["a"].data.clone();
    all.extend_from_slice(&got["b"].data);
    assert_close(bname, &all, &exp, got["a"].dtype, Tol::abs_rel(1e-6, 1e-5));
}

backend_test!(pcb_small_model_against_f64_formulas);

#[test]
fn pcb_ratio_must_be_a_fraction_and_whole_model() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    layered(&d.join("base"), 2, |_, i| i as f32);
    layered(&d.join("a"), 2, |_, i| i as f32 * 1.5 + 1.0);
    let plan_err = |params: &str| {
        std::fs::write(
            d.join("r.yml"),
            format!(
                "merge_method: pcb\nbase_model: base\nmodels:\n  - model: a\nparameters:\n{params}"
            ),
        )
        .unwrap();
        let r = smelt::recipe::Recipe::load(&d.join("r.yml")).unwrap();
        match smelt::plan::Plan::build(r, None) {
            Err(e) => e.to_string(),
            Ok(plan) => {
                let backend = smelt::backend::cpu::Cpu::new();
                match smelt::exec::whole_model_sums(&plan, &backend) {
                    Err(e) => e.to_string(),
                    Ok(_) => panic!("accepted"),
                }
            }
        }
    };
    let e = plan_err("  pcb_ratio: 1.5\n");
    assert!(e.contains("pcb_ratio") && e.contains("1.5"), "{e}");
    let e = plan_err("  pcb_ratio:\n    - filter: norm\n      value: 0.3\n    - value: 0.1\n");
    assert!(e.contains("pcb_ratio") && e.contains("whole model"), "{e}");
}

#[test]
fn pcb_primitive_cpu_gpu_parity() {
    use smelt::backend::{Input, Job, PcbSpec};
    use smelt::dtype::DType;
    let n = 65_537;
    let mut rng = Lcg(8);
    let base = encode(DType::BF16, &(0..n).map(|_| rng.sym()).collect::<Vec<_>>());
    let xs: Vec<Vec<u8>> = (0..3)
        .map(|_| encode(DType::BF16, &(0..n).map(|_| rng.sym()).collect::<Vec<_>>()))
        .collect();
    let inputs: Vec<Input> = xs
        .iter()
        .map(|b| Input {
            bytes: b,
            dtype: DType::BF16,
        })
        .collect();
    let spec = PcbSpec {
        lo: vec![0.01, 0.02, 0.0],
        hi: vec![1.5, 1.2, 1.9],
        q: vec![-0.5, 0.1, 0.3],
        bmax: vec![3.0, 9.0, 20.0],
        weights: vec![1.0, 0.5, 2.0],
    };
    let mut outs = Vec::new();
    for (bname, backend) in backends() {
        let mut got = Vec::new();
        for beta_of in [None, Some(0), Some(2)] {
            let job = Job::new(
                "p.w",
                Some(Input {
                    bytes: &base,
                    dtype: DType::BF16,
                }),
                inputs.clone(),
                DType::F32,
                DType::F32,
            );
            let mut out = vec![0u8; n * 4];
            backend.pcb(&job, &spec, beta_of, &mut out).unwrap();
            backend.end_job(&job);
            let mut v = vec![0f32; n];
            smelt::dtype::decode(DType::F32, &out, &mut v);
            got.push(v);
        }
        outs.push((bname, got));
    }
    // β (outputs 1, 2) within a few ulp of exp; the merge (output 0) divides by sums of
    // S = (β − q)/(bmax − q), whose cancellation near the cut amplifies those ulps (measured
    // on lavapipe: max 9.3e-6 absolute on values ~0.1), hence the looser bound there.
    for (bname, got) in &outs[1..] {
        for (k, v) in got.iter().enumerate() {
            let tol = if k == 0 {
                Tol::abs_rel(2e-5, 1e-4)
            } else {
                Tol::abs_rel(1e-6, 1e-5)
            };
            assert_close(
                &format!("{bname} vs cpu, output {k}"),
                v,
                &outs[0].1[k],
                DType::F32,
                tol,
            );
        }
    }
}

// ---- OPCM --------------------------------------------------------------------------------

fn opcm_fixture(bname: &str, backend: &dyn Backend) {
    let r = ref_recipe("opcm", Some("base"), &["ft1", "ft2", "ft3"], "");
    ref_case(bname, backend, "opcm", &r, REF_TOL);
}

backend_test!(opcm_fixture);

fn opcm_projection_and_norm(bname: &str, backend: &dyn Backend) {
    // One 6×5 matrix, two models: the merge is c·(τ1 + U P Vᵀ) with P = Uᵀ τ2 V less its
    // diagonal and r × r top-left block (U, V of τ1): so uⱼᵀ (merged/c − τ1) vₗ = 0 there,
    // and the merged task vector's norm is the mean of ‖τ1‖ and ‖τ2‖.
    let (rows, cols) = (6, 5);
    let mut rng = Lcg(17);
    let base: Vec<f32> = (0..rows * cols).map(|_| rng.sym()).collect();
    let taus: Vec<Vec<f32>> = (0..2)
        .map(|_| (0..rows * cols).map(|_| 0.3 * rng.sym()).collect())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    matrix_models(tmp.path(), &base, &taus, &[rows, cols]);
    let m = |v: &[f32]| smelt::linalg::Mat {
        rows,
        cols,
        data: v.to_vec(),
    };
    let d = smelt::linalg::svd(&m(&taus[0]), None).unwrap();
    let total: f64 = d.s.iter().map(|x| *x as f64).sum();
    let mut cum = 0.0;
    let r =
        d.s.iter()
            .position(|s| {
                cum += *s as f64;
                cum / total > 0.5
            })
            .unwrap();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let mean = (norm(&taus[0]) + norm(&taus[1])) / 2.0;
    let proj = |x: &[f32], j: usize, l: usize| -> f64 {
        (0..rows)
            .flat_map(|a| (0..cols).map(move |c| (a, c)))
            .map(|(a, c)| d.u.at(a, j) as f64 * x[a * cols + c] as f64 * d.vt.at(l, c) as f64)
            .sum()
    };
    let recipe = "merge_method: opcm\nbase_model: base\nmodels:\n  - model: m0\n  - model: m1\n";
    let got = merge_text(tmp.path(), recipe, backend);
    let tau: Vec<f32> = got["w"]
        .data
        .iter()
        .zip(&base)
        .map(|(x, b)| x - b)
        .collect();
    assert!(
        (norm(&tau) - mean).abs() < 1e-5 * mean,
        "{bname}: {} vs {mean}",
        norm(&tau)
    );
    let c = proj(&tau, 0, 0) / d.s[0] as f64;
    let upd: Vec<f32> = tau
        .iter()
        .zip(&taus[0])
        .map(|(t, t1)| (*t as f64 / c - *t1 as f64) as f32)
        .collect();
    for j in 0..5 {
        for l in 0..5 {
            if j == l || (j < r && l < r) {
                assert!(
                    proj(&upd, j, l).abs() < 1e-5,
                    "{bname}: ({j}, {l}) = {}",
                    proj(&upd, j, l)
                );
            }
        }
    }
    // and the rest of τ2 went in: off the zeroed set the update is τ2's projection
    assert!(
        (proj(&upd, 4, 0) - proj(&taus[1], 4, 0)).abs() < 1e-5,
        "{bname}"
    );
}

backend_test!(opcm_projection_and_norm);

// ---- the linear algebra's share of a merge -------------------------------------------------

#[test]
fn merges_report_their_svd_time() {
    // TSV-M of three models: every 2-D tensor takes T SVDs of the task matrices and two of
    // the concatenated bases (T + 2), each counted once; `smelt merge` prints the share.
    let tmp = tempfile::tempdir().unwrap();
    let r = ref_recipe("tsv", Some("base"), &["ft1", "ft2", "ft3"], "");
    let plan = plan_text(tmp.path(), &r, None);
    let matrices = plan.tasks.iter().filter(|t| t.shape.len() == 2).count() as u64;
    assert!(matrices > 0);
    let report = execute_to(
        &plan,
        &smelt::backend::cpu::Cpu::new(),
        &tmp.path().join("o"),
        u64::MAX,
    );
    // other tests of this binary may add to the process-wide counters at the same time
    assert!(
        report.linalg.svd_calls >= 5 * matrices,
        "{:?} for {matrices} matrices",
        report.linalg
    );
    assert!(report.linalg.svd_seconds > 0.0);
    std::fs::write(tmp.path().join("r.yml"), &r).unwrap();
    let o = run_merge(&tmp.path().join("r.yml"), &tmp.path().join("cli"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("linear algebra:"))
        .unwrap_or_else(|| panic!("no linear algebra line in {text}"));
    assert!(line.contains(&format!("{} SVDs", 5 * matrices)), "{line}");
    // a linear merge does no linear algebra and prints no such line
    let lin = ref_recipe(
        "linear",
        None,
        &["ft1", "ft2"],
        "parameters:\n  weight: 1.0\n",
    );
    std::fs::write(tmp.path().join("l.yml"), lin).unwrap();
    let o = run_merge(&tmp.path().join("l.yml"), &tmp.path().join("lin"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("linear algebra"));
}
