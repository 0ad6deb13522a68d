//! Small merges whose expected values are worked out by hand in the comments: a few
//! elements, two or three models, chosen so that every rule of docs/ALGORITHMS.md §2-§6, §19 and
//! §0.4 decides the result (a wrong rule gives a different number, noted where useful).
//!
//! Every model here is one F32 tensor `w` (no layers, so its gradient position is t = 0),
//! written into a temporary folder next to the recipe.

use crate::common::*;
use smelt::backend::{Input, Job, Query, RankCut, Source};
use smelt::dtype::DType;
use smelt::recipe::Value1;

/// Writes the models, then merges `recipe` on `backend` and checks tensor `w`.
#[track_caller]
fn check(
    bname: &str,
    backend: &dyn Backend,
    models: &[(&str, &[f32])],
    recipe: &str,
    expected: &[f32],
    tol: Tol,
) {
    let tmp = tempfile::tempdir().unwrap();
    for (name, values) in models {
        write_vec_model(&tmp.path().join(name), values);
    }
    let got = merge_text(tmp.path(), recipe, backend);
    assert_eq!(got.len(), 1);
    let w = &got["w"];
    assert_eq!(w.shape, vec![expected.len()], "{bname}");
    assert_eq!(w.dtype, DType::F32, "{bname}");
    let first = recipe.lines().next().unwrap_or("");
    assert_close(
        &format!("{bname}: {first}: w"),
        &w.data,
        expected,
        DType::F32,
        tol,
    );
}

// ---- linear (§2) -------------------------------------------------------------------------

const LIN_A: [f32; 4] = [1.0, 2.0, -3.0, 4.0];
const LIN_B: [f32; 4] = [3.0, 0.0, 1.0, -4.0];
const LIN_C: [f32; 4] = [0.5, 2.0, 1.0, 8.0];

fn linear_recipe(normalize: Option<bool>) -> String {
    let mut r = String::from(
        "merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1.0}}\n  - {model: b, parameters: {weight: 0.5}}\n  - {model: c, parameters: {weight: 0.5}}\n",
    );
    if let Some(n) = normalize {
        r.push_str(&format!("parameters: {{normalize: {n}}}\n"));
    }
    r
}

fn linear_normalized(bname: &str, backend: &dyn Backend) {
    // Σ w·x = 1·a + 0.5·b + 0.5·c:
    //   [1 + 1.5 + 0.25, 2 + 0 + 1, -3 + 0.5 + 0.5, 4 - 2 + 4] = [2.75, 3, -2, 6]
    // normalize (the default): / (1 + 0.5 + 0.5) = / 2
    let want = [1.375, 1.5, -1.0, 3.0];
    let m: [(&str, &[f32]); 3] = [("a", &LIN_A), ("b", &LIN_B), ("c", &LIN_C)];
    check(
        bname,
        backend,
        &m,
        &linear_recipe(Some(true)),
        &want,
        Tol::EXACT,
    );
    check(bname, backend, &m, &linear_recipe(None), &want, Tol::EXACT);
}

backend_test!(linear_normalized);

fn linear_not_normalized(bname: &str, backend: &dyn Backend) {
    let m: [(&str, &[f32]); 3] = [("a", &LIN_A), ("b", &LIN_B), ("c", &LIN_C)];
    check(
        bname,
        backend,
        &m,
        &linear_recipe(Some(false)),
        &[2.75, 3.0, -2.0, 6.0],
        Tol::EXACT,
    );
}

backend_test!(linear_not_normalized);

fn linear_inexact_weights(bname: &str, backend: &dyn Backend) {
    // 0.3·[1, 10] + 0.7·[2, 20] = [1.7, 17], divided by 0.3 + 0.7 = 1
    check(
        bname,
        backend,
        &[("a", &[1.0, 10.0]), ("b", &[2.0, 20.0])],
        "merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 0.3}}\n  - {model: b, parameters: {weight: 0.7}}\n",
        &[1.7, 17.0],
        Tol::FIXTURE,
    );
}

backend_test!(linear_inexact_weights);

// ---- task arithmetic (§3) ----------------------------------------------------------------

const TA_BASE: [f32; 4] = [1.0, 1.0, 1.0, 1.0];
const TA_X1: [f32; 4] = [2.0, 0.0, 1.0, 3.0]; // d1 = [1, -1, 0, 2]
const TA_X2: [f32; 4] = [1.0, 3.0, -1.0, 1.0]; // d2 = [0, 2, -2, 0]

fn task_arithmetic_with_lambda(bname: &str, backend: &dyn Backend) {
    // 0.5·d1 + 0.25·d2 = [0.5, -0.5, 0, 1] + [0, 0.5, -0.5, 0] = [0.5, 0, -0.5, 1]
    // × lambda 2 = [1, 0, -1, 2]; + base = [2, 1, 0, 3]
    // A density on a model changes nothing for task_arithmetic.
    let m: [(&str, &[f32]); 3] = [("base", &TA_BASE), ("x1", &TA_X1), ("x2", &TA_X2)];
    for density in ["", ", density: 0.1"] {
        let r = format!(
            "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - {{model: x1, parameters: {{weight: 0.5{density}}}}}\n  - {{model: x2, parameters: {{weight: 0.25}}}}\nparameters: {{lambda: 2.0}}\n"
        );
        check(bname, backend, &m, &r, &[2.0, 1.0, 0.0, 3.0], Tol::EXACT);
    }
}

backend_test!(task_arithmetic_with_lambda);

fn task_arithmetic_normalized(bname: &str, backend: &dyn Backend) {
    // [0.5, 0, -0.5, 1] / (0.5 + 0.25) = [2/3, 0, -2/3, 4/3]; × 2 = [4/3, 0, -4/3, 8/3];
    // + 1 = [7/3, 1, -1/3, 11/3]
    let m: [(&str, &[f32]); 3] = [("base", &TA_BASE), ("x1", &TA_X1), ("x2", &TA_X2)];
    check(
        bname,
        backend,
        &m,
        "merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - {model: x1, parameters: {weight: 0.5}}\n  - {model: x2, parameters: {weight: 0.25}}\nparameters: {lambda: 2.0, normalize: true}\n",
        &[7.0 / 3.0, 1.0, -1.0 / 3.0, 11.0 / 3.0],
        Tol::FIXTURE,
    );
}

backend_test!(task_arithmetic_normalized);

// ---- TIES (§4.1) -------------------------------------------------------------------------

/// 100 deltas whose magnitudes are 1..=100 (a permutation: 37 is prime to 100), every third
/// one negative. The base is 0, so the model's values are the deltas.
fn hundred() -> Vec<f32> {
    (0..100)
        .map(|i| {
            let m = ((i * 37) % 100 + 1) as f32;
            if i % 3 == 0 {
                -m
            } else {
                m
            }
        })
        .collect()
}

fn ties_trim_count_is_python_int_of_density_times_n(bname: &str, backend: &dyn Backend) {
    // One model, weight 0.5, normalize (default): its own sign always wins the election and
    // the division by its weight undoes the weighting, so out = delta where kept, else 0.
    // k = max(1, int(density * 100)) in f64:
    //   0.29 * 100 = 28.999999999999996 -> 28 (not 29)
    //   0.57 * 100 = 56.99999999999999  -> 56
    //   0.3  * 100 = 30.000000000000004 -> 30
    //   0.999* 100 = 99.9               -> 99
    //   0.001* 100 = 0.1 -> 0 -> max(1, 0) = 1
    // The k largest magnitudes are 101-k..=100.
    let d = hundred();
    let zeros = vec![0.0f32; 100];
    for (density, k) in [
        ("0.29", 28),
        ("0.57", 56),
        ("0.3", 30),
        ("0.999", 99),
        ("0.001", 1),
        ("1.0", 100),
    ] {
        let want: Vec<f32> = d
            .iter()
            .map(|v| if v.abs() > (100 - k) as f32 { *v } else { 0.0 })
            .collect();
        assert_eq!(want.iter().filter(|v| **v != 0.0).count(), k);
        let r = format!(
            "merge_method: ties\nbase_model: base\nmodels:\n  - {{model: a, parameters: {{weight: 0.5, density: {density}}}}}\n"
        );
        check(
            bname,
            backend,
            &[("base", &zeros), ("a", &d)],
            &r,
            &want,
            Tol::EXACT,
        );
    }
}

backend_test!(ties_trim_count_is_python_int_of_density_times_n);

// Sign election, 3 models with weights [3, 1, 1], no trimming (density 1), base 0.5.
// Per element, deltas [d0, d1, d2] -> weighted [3·d0, d1, d2]:
//   e0 [+1, -1, -1] -> [3, -1, -1], Σ = +1 -> +; agreeing {0}: 3/3 = 1
//      (an election on unweighted deltas would pick - and give -1)
//   e1 [+1, -1, -2] -> [3, -1, -2], Σ = 0 -> + (a tie elects +); agreeing {0}: 3/3 = 1
//      (electing - would give (-1 - 2)/2 = -1.5)
//   e2 [0, +1, -4]  -> Σ = -3 -> -; agreeing {2}: -4/1 = -4
//   e3 [0, +1, +1]  -> Σ = 2 -> +; agreeing {1, 2} (a zero never agrees): 2/2 = 1
//      (counting model 0 would divide by 5 and give 0.4)
//   e4 [0, 0, 0]    -> Σ = 0 -> +; nobody agrees, divisor 0 -> 1: 0
//   e5 [-1, +2, +2] -> [-3, 2, 2], Σ = 1 -> +; agreeing {1, 2}: 4/2 = 2
const EL_BASE: [f32; 6] = [0.5; 6];
const EL_X0: [f32; 6] = [1.5, 1.5, 0.5, 0.5, 0.5, -0.5];
const EL_X1: [f32; 6] = [-0.5, -0.5, 1.5, 1.5, 0.5, 2.5];
const EL_X2: [f32; 6] = [-0.5, -1.5, -3.5, 1.5, 0.5, 2.5];

fn election_models() -> [(&'static str, &'static [f32]); 4] {
    [
        ("base", &EL_BASE),
        ("x0", &EL_X0),
        ("x1", &EL_X1),
        ("x2", &EL_X2),
    ]
}

fn election_recipe(params: &str) -> String {
    format!(
        "merge_method: ties\nbase_model: base\nmodels:\n  - {{model: x0, parameters: {{weight: 3.0}}}}\n  - {{model: x1, parameters: {{weight: 1.0}}}}\n  - {{model: x2, parameters: {{weight: 1.0}}}}\n{params}"
    )
}

fn ties_sign_election_on_weighted_sum(bname: &str, backend: &dyn Backend) {
    // base 0.5 + [1, 1, -4, 1, 0, 2]
    check(
        bname,
        backend,
        &election_models(),
        &election_recipe(""),
        &[1.5, 1.5, -3.5, 1.5, 0.5, 2.5],
        Tol::EXACT,
    );
}

backend_test!(ties_sign_election_on_weighted_sum);

fn ties_without_normalize_with_lambda(bname: &str, backend: &dyn Backend) {
    // agreeing sums [3, 3, -4, 2, 0, 4] × 0.5 = [1.5, 1.5, -2, 1, 0, 2]; + 0.5
    check(
        bname,
        backend,
        &election_models(),
        &election_recipe("parameters: {normalize: false, lambda: 0.5}\n"),
        &[2.0, 2.0, -1.5, 1.5, 0.5, 2.5],
        Tol::EXACT,
    );
}

backend_test!(ties_without_normalize_with_lambda);

fn ties_trim_then_elect(bname: &str, backend: &dyn Backend) {
    // density 0.5 of 4 elements: k = 2 per model; base 0; weights [1, 0.5].
    //   a d = [4, -1, 3, -2]   -> kept [4, 0, 3, 0]
    //   b d = [-5, -0.5, 2, 1] -> kept [-5, 0, 2, 0] -> weighted [-2.5, 0, 1, 0]
    //   Σ = [1.5, 0, 4, 0]
    //   e0 +: {a} 4/1 = 4
    //   e1 Σ 0 -> +, both trimmed to 0, nobody agrees: 0 (untrimmed: -1 - 0.25 -> nonzero)
    //   e2 +: {a, b} (3 + 1)/(1 + 0.5) = 8/3
    //   e3 0
    let zeros = [0.0f32; 4];
    check(
        bname,
        backend,
        &[
            ("base", &zeros),
            ("a", &[4.0, -1.0, 3.0, -2.0]),
            ("b", &[-5.0, -0.5, 2.0, 1.0]),
        ],
        "merge_method: ties\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1.0, density: 0.5}}\n  - {model: b, parameters: {weight: 0.5, density: 0.5}}\n",
        &[4.0, 0.0, 8.0 / 3.0, 0.0],
        Tol::FIXTURE,
    );
}

backend_test!(ties_trim_then_elect);

// ---- the selection tie rule (§0.4) -------------------------------------------------------

fn ties_equal_magnitudes_lower_index_wins(bname: &str, backend: &dyn Backend) {
    // |d| = [2, 3, 2, 1, 2, 3, 2, 0.5]: two 3s (indices 1, 5), four 2s (0, 2, 4, 6).
    //   k = int(0.375·8) = 3: {1, 5} and the first 2 -> {0}
    //   k = int(0.5·8)   = 4: {1, 5} and {0, 2}
    //   k = int(0.75·8)  = 6: {1, 5} and all four 2s
    let d = [2.0f32, -3.0, 2.0, 1.0, -2.0, 3.0, 2.0, 0.5];
    let zeros = [0.0f32; 8];
    for (density, want) in [
        ("0.375", [2.0, -3.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0]),
        ("0.5", [2.0, -3.0, 2.0, 0.0, 0.0, 3.0, 0.0, 0.0]),
        ("0.75", [2.0, -3.0, 2.0, 0.0, -2.0, 3.0, 2.0, 0.0]),
    ] {
        let r = format!(
            "merge_method: ties\nbase_model: base\nmodels:\n  - {{model: a, parameters: {{weight: 1.0, density: {density}}}}}\n"
        );
        check(
            bname,
            backend,
            &[("base", &zeros), ("a", &d)],
            &r,
            &want,
            Tol::EXACT,
        );
    }
}

backend_test!(ties_equal_magnitudes_lower_index_wins);

/// The selection primitive itself, on every backend: ties broken by index across the CPU's
/// chunk boundary, +0 and -0 tied, kept counts exact.
fn select_tie_rule_on_backends(bname: &str, backend: &dyn Backend) {
    fn kept(cut: RankCut, mags: &[f32]) -> Vec<usize> {
        (0..mags.len())
            .filter(|&i| cut.below(mags[i].abs().to_bits(), i as u32))
            .collect()
    }
    // 32,778 elements of magnitude 1 (alternating sign) but two of magnitude 3 at 5 and
    // 20,000. k = 16,390 keeps both 3s and the 16,388 lowest-indexed 1s: 0..=16,388 minus 5.
    let n = 2 * 16384 + 10;
    let mut x: Vec<f32> = (0..n)
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    x[5] = 3.0;
    x[20000] = -3.0;
    let mut want: Vec<usize> = (0..=16388).collect();
    want.push(20000);
    // Deltas against a base: models[0] - base has the same magnitudes as x.
    let base: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let shifted: Vec<f32> = x.iter().zip(&base).map(|(a, b)| a + b).collect();
    // +0 / -0 ties: |y| = [0, 0, 0, 1, 0]; k = 3 keeps 3 and the zeros at 0 and 1.
    let y = [0.0f32, -0.0, 0.0, 1.0, -0.0];

    let xb = encode(DType::F32, &x);
    let bb = encode(DType::F32, &base);
    let sb = encode(DType::F32, &shifted);
    let yb = encode(DType::F32, &y);
    fn f32in(bytes: &[u8]) -> Input<'_> {
        Input {
            bytes,
            dtype: DType::F32,
        }
    }
    let job = Job::new(
        "sel.x",
        Some(f32in(&bb)),
        vec![f32in(&xb), f32in(&sb)],
        DType::F32,
        DType::F32,
    );
    let cuts = backend
        .select(
            &job,
            &[
                Query {
                    source: Source::Model(0),
                    k: 16390,
                },
                Query {
                    source: Source::Delta(1),
                    k: 16390,
                },
                Query {
                    source: Source::Model(0),
                    k: 0,
                },
                Query {
                    source: Source::Model(0),
                    k: n as u64,
                },
                Query {
                    source: Source::Model(0),
                    k: 2,
                },
            ],
        )
        .unwrap();
    backend.end_job(&job);
    assert_eq!(kept(cuts[0], &x), want, "{bname}: Model(0), k 16390");
    assert_eq!(kept(cuts[1], &x), want, "{bname}: Delta(1), k 16390");
    assert!(kept(cuts[2], &x).is_empty(), "{bname}: k 0");
    assert_eq!(kept(cuts[3], &x).len(), n, "{bname}: k n");
    assert_eq!(kept(cuts[4], &x), vec![5, 20000], "{bname}: k 2");

    let job = Job::new("sel.y", None, vec![f32in(&yb)], DType::F32, DType::F32);
    let cuts = backend
        .select(
            &job,
            &[
                Query {
                    source: Source::Model(0),
                    k: 3,
                },
                Query {
                    source: Source::Model(0),
                    k: 1,
                },
            ],
        )
        .unwrap();
    backend.end_job(&job);
    assert_eq!(kept(cuts[0], &y), vec![0, 1, 3], "{bname}: ±0 ties");
    assert_eq!(kept(cuts[1], &y), vec![3], "{bname}: k 1");
}

backend_test!(select_tie_rule_on_backends);

// ---- Model Breadcrumbs (§6) --------------------------------------------------------------

/// 20 deltas with magnitudes 1..=20 (i·7 mod 20 + 1), odd indices negative; base 0.
fn twenty() -> Vec<f32> {
    (0..20)
        .map(|i| {
            let m = ((i * 7) % 20 + 1) as f32;
            if i % 2 == 1 {
                -m
            } else {
                m
            }
        })
        .collect()
}

fn band(d: &[f32], lo: f32, hi: f32, w: f32) -> Vec<f32> {
    d.iter()
        .map(|v| {
            if v.abs() >= lo && v.abs() <= hi {
                v * w
            } else {
                0.0
            }
        })
        .collect()
}

fn breadcrumbs_gamma_band(bname: &str, backend: &dyn Backend) {
    let d = twenty();
    let zeros = [0.0f32; 20];
    // (density, gamma, smallest kept magnitude, largest kept magnitude)
    //   0.5, 0.1: target int(10.0) = 10, n_top int(2.0) = 2, n_bot 20 - 10 - 2 = 8
    //             -> ascending ranks 8..18 -> magnitudes 9..=18
    //   0.95, 0.1: target 19, n_top 2, n_bot -1 -> n_top 1, n_bot 0 -> magnitudes 1..=19
    //   0.5, 0.0: target 10, n_top 0, n_bot 10 -> magnitudes 11..=20 (smelt's rule,
    //             docs/ALGORITHMS.md §6: keep int(density·n); mergekit 0.1.5's
    //             `indices[n_bot:-n_top]` would keep nothing when n_top == 0)
    //   1.0, 0.1: density >= 1 keeps everything, outliers included -> 1..=20
    for (density, gamma, lo, hi) in [
        ("0.5", "0.1", 9.0, 18.0),
        ("0.95", "0.1", 1.0, 19.0),
        ("0.5", "0.0", 11.0, 20.0),
        ("1.0", "0.1", 1.0, 20.0),
    ] {
        // weight 0.5, normalize false (default): out = 0.5 · kept delta
        let r = format!(
            "merge_method: breadcrumbs\nbase_model: base\nmodels:\n  - {{model: a, parameters: {{weight: 0.5, density: {density}, gamma: {gamma}}}}}\n"
        );
        check(
            bname,
            backend,
            &[("base", &zeros), ("a", &d)],
            &r,
            &band(&d, lo, hi, 0.5),
            Tol::EXACT,
        );
    }
}

backend_test!(breadcrumbs_gamma_band);

fn breadcrumbs_band_with_tied_magnitudes(bname: &str, backend: &dyn Backend) {
    // All |d| = 1. density 0.5, gamma 0.2 on 10: target 5, n_top 2, n_bot 3. In the order
    // (|d| descending, index ascending) the ranks are the indices; ascending ranks [3, 8) are
    // descending ranks [2, 7): indices 2..=6 survive.
    let d = [1.0f32, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0];
    let zeros = [0.0f32; 10];
    check(
        bname,
        backend,
        &[("base", &zeros), ("a", &d)],
        "merge_method: breadcrumbs\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 1.0, density: 0.5, gamma: 0.2}}\n",
        &[0.0, 0.0, 1.0, -1.0, 1.0, -1.0, 1.0, 0.0, 0.0, 0.0],
        Tol::EXACT,
    );
}

backend_test!(breadcrumbs_band_with_tied_magnitudes);

// Two models over base 1, density 0.6 and gamma 0.1 on 10 elements: target 6, n_top 1,
// n_bot 3 -> magnitudes ranked 4th..9th smallest survive; weights [1, 0.5].
//   a d = [1, -2, 3, -4, 5, -6, 7, -8, 9, -10] -> kept [0, 0, 0, -4, 5, -6, 7, -8, 9, 0]
//   b d = [-10, 9, -8, 7, 6, 5, -4, 3, -2, 1]  -> kept [0, 9, -8, 7, 6, 5, -4, 0, 0, 0]
//                                       weighted [0, 4.5, -4, 3.5, 3, 2.5, -2, 0, 0, 0]
//   Σ = [0, 4.5, -4, -0.5, 8, -3.5, 5, -8, 9, 0]
const BC_BASE: [f32; 10] = [1.0; 10];
const BC_A: [f32; 10] = [2.0, -1.0, 4.0, -3.0, 6.0, -5.0, 8.0, -7.0, 10.0, -9.0];
const BC_B: [f32; 10] = [-9.0, 10.0, -7.0, 8.0, 7.0, 6.0, -3.0, 4.0, -1.0, 2.0];

fn bc_recipe(method: &str, params: &str) -> String {
    format!(
        "merge_method: {method}\nbase_model: base\nmodels:\n  - {{model: a, parameters: {{weight: 1.0, density: 0.6, gamma: 0.1}}}}\n  - {{model: b, parameters: {{weight: 0.5, density: 0.6, gamma: 0.1}}}}\n{params}"
    )
}

fn breadcrumbs_two_models(bname: &str, backend: &dyn Backend) {
    // no election: base + Σ
    check(
        bname,
        backend,
        &[("base", &BC_BASE), ("a", &BC_A), ("b", &BC_B)],
        &bc_recipe("breadcrumbs", ""),
        &[1.0, 5.5, -3.0, 0.5, 9.0, -2.5, 6.0, -7.0, 10.0, 1.0],
        Tol::EXACT,
    );
}

backend_test!(breadcrumbs_two_models);

fn breadcrumbs_ties_two_models(bname: &str, backend: &dyn Backend) {
    // election on Σ, agreeing sums (normalize false by default):
    //   e0 0 | e1 + {b} 4.5 | e2 - {b} -4 | e3 - {a} -4 | e4 + {a, b} 8 | e5 - {a} -6
    //   e6 + {a} 7 | e7 -8 | e8 9 | e9 0
    check(
        bname,
        backend,
        &[("base", &BC_BASE), ("a", &BC_A), ("b", &BC_B)],
        &bc_recipe("breadcrumbs_ties", ""),
        &[1.0, 5.5, -3.0, -3.0, 9.0, -5.0, 8.0, -7.0, 10.0, 1.0],
        Tol::EXACT,
    );
    // normalize true divides by the agreeing weights:
    //   e1 4.5/0.5 = 9 | e2 -4/0.5 = -8 | e3 -4 | e4 8/1.5 | e5 -6 | e6 7 | e7 -8 | e8 9
    check(
        bname,
        backend,
        &[("base", &BC_BASE), ("a", &BC_A), ("b", &BC_B)],
        &bc_recipe("breadcrumbs_ties", "parameters: {normalize: true}\n"),
        &[
            1.0,
            10.0,
            -7.0,
            -3.0,
            1.0 + 8.0 / 1.5,
            -5.0,
            8.0,
            -7.0,
            10.0,
            1.0,
        ],
        Tol::FIXTURE,
    );
}

backend_test!(breadcrumbs_ties_two_models);

// ---- DARE (§5) ---------------------------------------------------------------------------

const DA_BASE: [f32; 4] = [1.0, 2.0, 3.0, 4.0];
const DA_X1: [f32; 4] = [2.0, 0.0, 3.0, 8.0]; // d1 = [1, -2, 0, 4]
const DA_X2: [f32; 4] = [0.0, 2.0, 5.0, 4.0]; // d2 = [-1, 0, 2, 0]

fn dare_recipe(method: &str, density: &str) -> String {
    format!(
        "merge_method: {method}\nbase_model: base\nmodels:\n  - {{model: x1, parameters: {{weight: 0.5, density: {density}}}}}\n  - {{model: x2, parameters: {{weight: 0.25, density: {density}}}}}\n"
    )
}

fn dare_density_one_keeps_everything(bname: &str, backend: &dyn Backend) {
    let m: [(&str, &[f32]); 3] = [("base", &DA_BASE), ("x1", &DA_X1), ("x2", &DA_X2)];
    // dare_linear: 0.5·d1 + 0.25·d2 = [0.5, -1, 0, 2] + [-0.25, 0, 0.5, 0] = [0.25, -1, 0.5, 2]
    check(
        bname,
        backend,
        &m,
        &dare_recipe("dare_linear", "1.0"),
        &[1.25, 1.0, 3.5, 6.0],
        Tol::EXACT,
    );
    // dare_ties: Σ = [0.25, -1, 0.5, 2] -> [+, -, +, +]; agreeing: e0 {x1} 0.5, e1 {x1} -1,
    // e2 {x2} 0.5, e3 {x1} 2; normalize false -> base + [0.5, -1, 0.5, 2]
    check(
        bname,
        backend,
        &m,
        &dare_recipe("dare_ties", "1.0"),
        &[1.5, 1.0, 3.5, 6.0],
        Tol::EXACT,
    );
}

backend_test!(dare_density_one_keeps_everything);

fn dare_density_zero_keeps_nothing(bname: &str, backend: &dyn Backend) {
    let m: [(&str, &[f32]); 3] = [("base", &DA_BASE), ("x1", &DA_X1), ("x2", &DA_X2)];
    for method in ["dare_linear", "dare_ties"] {
        check(
            bname,
            backend,
            &m,
            &dare_recipe(method, "0.0"),
            &DA_BASE,
            Tol::EXACT,
        );
    }
}

backend_test!(dare_density_zero_keeps_nothing);

// ---- passthrough (§19) -------------------------------------------------------------------

fn passthrough_scale(bname: &str, backend: &dyn Backend) {
    let x = [1.0f32, -2.0, 3.5, 0.25];
    check(
        bname,
        backend,
        &[("a", &x)],
        "merge_method: passthrough\nmodels:\n  - {model: a, parameters: {scale: 2.0}}\n",
        &[2.0, -4.0, 7.0, 0.5],
        Tol::EXACT,
    );
    // scale given through a filter that matches `w`
    check(
        bname,
        backend,
        &[("a", &x)],
        "merge_method: passthrough\nmodels:\n  - model: a\n    parameters:\n      scale: [{filter: w, value: 0.5}]\n",
        &[0.5, -1.0, 1.75, 0.125],
        Tol::EXACT,
    );
    // a filter that matches nothing leaves scale unset: a plain copy
    check(
        bname,
        backend,
        &[("a", &x)],
        "merge_method: passthrough\nmodels:\n  - model: a\n    parameters:\n      scale: [{filter: mlp, value: 0.5}]\n",
        &x,
        Tol::EXACT,
    );
}

backend_test!(passthrough_scale);

fn passthrough_copy_is_bit_exact(bname: &str, backend: &dyn Backend) {
    // -0, a subnormal, the largest f32 and an infinity survive a copy bit for bit.
    let x = [-0.0f32, 1.0e-45, f32::MAX, f32::NEG_INFINITY, 0.1];
    let tmp = tempfile::tempdir().unwrap();
    write_vec_model(&tmp.path().join("a"), &x);
    let got = merge_text(
        tmp.path(),
        "merge_method: passthrough\nmodels:\n  - model: a\n",
        backend,
    );
    let bits: Vec<u32> = got["w"].data.iter().map(|v| v.to_bits()).collect();
    let want: Vec<u32> = x.iter().map(|v| v.to_bits()).collect();
    assert_eq!(bits, want, "{bname}");
}

backend_test!(passthrough_copy_is_bit_exact);

// ---- gradients and filters through the plan (§1.2) ---------------------------------------

/// A 3-layer model: embeddings, per layer an mlp and an attention tensor of 100 elements,
/// final norm and lm_head. Values are `f(tensor index, element)`.
fn layered_model(dir: &std::path::Path, f: &dyn Fn(usize, usize) -> f32) {
    let names = layered_names();
    let ts: Vec<T> = names
        .iter()
        .enumerate()
        .map(|(ti, (_, n))| T::f32(&[*n], (0..*n).map(|e| f(ti, e)).collect()))
        .collect();
    let list: Vec<(&str, &T)> = names.iter().map(|(n, _)| n.as_str()).zip(&ts).collect();
    write_model(dir, 3, &list);
}

fn layered_names() -> Vec<(String, usize)> {
    let mut v = vec![("model.embed_tokens.weight".to_string(), 4)];
    for l in 0..3 {
        v.push((format!("model.layers.{l}.mlp.up_proj.weight"), 100));
        v.push((format!("model.layers.{l}.self_attn.q_proj.weight"), 100));
    }
    v.push(("model.norm.weight".to_string(), 4));
    v.push(("lm_head.weight".to_string(), 4));
    v
}

#[test]
fn gradients_and_filters_resolve_per_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    for m in ["base", "a", "b"] {
        layered_model(&tmp.path().join(m), &|t, e| (t * 1000 + e) as f32);
    }
    let recipe = "merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight:
        - {filter: mlp, value: 0.7}
        - {filter: self_attn, value: [1.0, 0.0]}
        - {value: 0.4}
      density: [0.2, 0.8]
  - model: b
    parameters:
      weight: [{filter: mlp, value: 0.9}]
parameters:
  weight: 0.25
  density: 0.6
  lambda: [1.0, 2.0, 4.0]
";
    let plan = plan_text(tmp.path(), recipe, None);
    assert_eq!(plan.tasks.len(), 9);
    for task in &plan.tasks {
        let name = task.name.as_str();
        let layer = task.layer;
        // t = layer / (3 - 1); embeddings and post-layer tensors use t = 0.
        let t = layer.map(|l| l as f64 / 2.0).unwrap_or(0.0);
        assert!((task.t - t).abs() < 1e-12, "{name}: t {}", task.t);
        assert_eq!(
            task.params.per_input.len(),
            2,
            "{name}: inputs besides the base"
        );
        // density of a: [0.2, 0.8] at t -> 0.2, 0.5, 0.8
        let want_density_a = [0.2, 0.5, 0.8][layer.unwrap_or(0)];
        // weight of a: mlp 0.7; self_attn [1, 0] at t -> 1, 0.5, 0; anything else 0.4
        let want_weight_a = if name.contains("mlp") {
            0.7
        } else if name.contains("self_attn") {
            [1.0, 0.5, 0.0][layer.unwrap()]
        } else {
            0.4
        };
        // b: its filter covers mlp only; elsewhere the top-level 0.25 applies
        let want_weight_b = if name.contains("mlp") { 0.9 } else { 0.25 };
        // lambda [1, 2, 4] at t -> 1, 2, 4
        let want_lambda = [1.0, 2.0, 4.0][layer.unwrap_or(0)];
        let p = &task.params;
        let close = |got: Option<f64>, want: f64, what: &str| {
            let got = got.unwrap_or_else(|| panic!("{name}: {what} not resolved"));
            assert!(
                (got - want).abs() < 1e-12,
                "{name}: {what} {got}, want {want}"
            );
        };
        close(p.input_f(0, "density"), want_density_a, "density of a");
        close(p.input_f(1, "density"), 0.6, "density of b");
        close(p.input_f(0, "weight"), want_weight_a, "weight of a");
        close(p.input_f(1, "weight"), want_weight_b, "weight of b");
        close(Some(p.shared_f("lambda")), want_lambda, "lambda");
        assert_eq!(
            p.shared
                .iter()
                .find(|(n, _)| *n == "lambda")
                .map(|(_, v)| *v),
            Some(Some(Value1::Float(want_lambda))),
            "{name}: lambda as a resolved value"
        );
        assert!(
            p.shared_b("normalize"),
            "{name}: ties normalizes by default"
        );
    }
}

fn density_gradient_changes_kept_counts(bname: &str, backend: &dyn Backend) {
    // One model over a zero base, ties with density [0.2, 0.8]: per tensor of 100 elements
    // k = int(density·100): layer 0 -> 20, layer 1 -> 50, layer 2 -> 80; the 4-element
    // embeddings, norm and lm_head use t = 0: int(0.2·4) = 0 -> max(1, 0) = 1.
    let tmp = tempfile::tempdir().unwrap();
    layered_model(&tmp.path().join("base"), &|_, _| 0.0);
    // distinct magnitudes per tensor: (e·37 mod n) + 1, alternating sign
    layered_model(&tmp.path().join("a"), &|t, e| {
        let n = if layered_names()[t].1 == 100 { 100 } else { 4 };
        let m = ((e * 37) % n + 1) as f32;
        if e % 2 == 0 {
            m
        } else {
            -m
        }
    });
    let recipe = "merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 1.0, density: [0.2, 0.8]}
";
    let got = merge_text(tmp.path(), recipe, backend);
    assert_eq!(got.len(), 9);
    for (name, t) in &got {
        let want = match smelt::plan::layer_of(name).map(|l| l.2) {
            Some(0) => 20,
            Some(1) => 50,
            Some(2) => 80,
            _ => 1,
        };
        let kept: Vec<f32> = t.data.iter().filter(|v| **v != 0.0).copied().collect();
        assert_eq!(kept.len(), want, "{bname}: {name} kept count");
        // the kept ones are the largest magnitudes: n - k + 1 ..= n
        let n = t.data.len();
        assert!(
            kept.iter().all(|v| v.abs() as usize > n - want),
            "{bname}: {name} kept the wrong elements"
        );
    }
}

backend_test!(density_gradient_changes_kept_counts);
