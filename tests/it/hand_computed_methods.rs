//! The rest of mergekit's methods on small inputs whose results are worked out by hand in
//! the comments (docs/ALGORITHMS.md §7-§10, mergekit 0.1.5's semantics): DELLA, SCE, Model Stock,
//! SLERP, NuSLERP, Multi-SLERP, Karcher, NearSwap; then their edge cases (parallel and
//! antiparallel vectors, zero deltas and zero vectors, a variance selection that keeps
//! nothing, one model, DELLA's density 0 and 1 and its epsilon range).
//!
//! Every model is one F32 tensor `w` (no layers), written into a temporary folder next to
//! the recipe. Expected values are closed forms in f64, compared after rounding to f32.
//! DELLA is random: its test checks statistics and the deterministic L1 rescale instead.

use std::path::Path;

use crate::common::*;
use smelt::dtype::DType;

/// The fixture tolerance without its absolute part, for results far below 1e-7 in size.
const REL: Tol = Tol::abs_rel(0.0, 1e-6);

/// Writes the models (tensor `w` of `shape`), then merges `recipe` on `backend` and checks
/// `w` against `expected`.
#[track_caller]
fn check_shaped(
    bname: &str,
    backend: &dyn Backend,
    shape: &[usize],
    models: &[(&str, &[f32])],
    recipe: &str,
    expected: &[f64],
    tol: Tol,
) {
    let tmp = tempfile::tempdir().unwrap();
    for (name, values) in models {
        let t = T::f32(shape, values.to_vec());
        write_model(&tmp.path().join(name), 0, &[("w", &t)]);
    }
    let want: Vec<f32> = expected.iter().map(|x| *x as f32).collect();
    let got = merge_text(tmp.path(), recipe, backend);
    assert_eq!(got.len(), 1, "{bname}");
    let w = &got["w"];
    assert_eq!(w.shape, shape.to_vec(), "{bname}");
    assert_eq!(w.dtype, DType::F32, "{bname}");
    assert!(
        w.data.iter().all(|x| x.is_finite()),
        "{bname}: non-finite values {:?}",
        w.data
    );
    let first = recipe.lines().next().unwrap_or("");
    assert_close(
        &format!("{bname}: {first}: w"),
        &w.data,
        &want,
        DType::F32,
        tol,
    );
}

/// [`check_shaped`] for 1-D tensors.
#[track_caller]
fn check(
    bname: &str,
    backend: &dyn Backend,
    models: &[(&str, &[f32])],
    recipe: &str,
    expected: &[f64],
    tol: Tol,
) {
    let n = models[0].1.len();
    check_shaped(bname, backend, &[n], models, recipe, expected, tol);
}

fn add(a: &[f32], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| *x as f64 + y).collect()
}

fn f64s(a: &[f32]) -> Vec<f64> {
    a.iter().map(|x| *x as f64).collect()
}

/// Plans `text` (written as `dir/recipe.yml`) and returns the planning error's message.
fn plan_error(dir: &Path, text: &str) -> String {
    let p = dir.join("recipe.yml");
    std::fs::write(&p, text).unwrap();
    let recipe = smelt::recipe::Recipe::load(&p).unwrap_or_else(|e| panic!("{e}"));
    match smelt::plan::Plan::build(recipe, None) {
        Ok(_) => panic!("expected a planning error for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

// ---- DELLA (§7) --------------------------------------------------------------------------

// Two models over base 1, weights [2, 1], density 1 (DELLA keeps everything then, nothing is
// random and nothing is rescaled):
//   d0 = [1, -1, 2, 0], d1 = [-1, 3, 2, -4]; weighted [2, -2, 4, 0] and [-1, 3, 2, -4]
//   Σ weighted = [1, 1, 6, -4] -> elected signs [+, +, +, -]
const DE_BASE: [f32; 4] = [1.0; 4];
const DE_X0: [f32; 4] = [2.0, 0.0, 3.0, 1.0];
const DE_X1: [f32; 4] = [0.0, 4.0, 3.0, -3.0];

fn della_recipe(method: &str, d0: &str, d1: &str, params: &str) -> String {
    format!(
        "merge_method: {method}\nbase_model: base\nmodels:\n  - {{model: x0, parameters: {{weight: 2.0, density: {d0}, epsilon: 0.1}}}}\n  - {{model: x1, parameters: {{weight: 1.0, density: {d1}, epsilon: 0.1}}}}\n{params}"
    )
}

fn della_models() -> [(&'static str, &'static [f32]); 3] {
    [("base", &DE_BASE), ("x0", &DE_X0), ("x1", &DE_X1)]
}

fn della_density_one_is_ties_without_trim(bname: &str, backend: &dyn Backend) {
    // della (sum election, normalize true): the weighted mean of the agreeing deltas
    //   e0 + : {x0} 2/2 = 1      e1 + : {x1} 3/1 = 3
    //   e2 + : {x0, x1} (4 + 2)/(2 + 1) = 2      e3 - : {x1} -4/1 = -4
    //   base 1 + [1, 3, 2, -4] = [2, 4, 3, -3]
    check(
        bname,
        backend,
        &della_models(),
        &della_recipe("della", "1.0", "1.0", ""),
        &[2.0, 4.0, 3.0, -3.0],
        Tol::FIXTURE,
    );
    // lambda 0.5 scales the merged delta: 1 + [0.5, 1.5, 1, -2]
    check(
        bname,
        backend,
        &della_models(),
        &della_recipe("della", "1.0", "1.0", "parameters: {lambda: 0.5}\n"),
        &[1.5, 2.5, 2.0, -1.0],
        Tol::FIXTURE,
    );
}

backend_test!(della_density_one_is_ties_without_trim);

fn della_linear_density_one_is_a_weighted_sum(bname: &str, backend: &dyn Backend) {
    // della_linear (no election, normalize false): 1 + Σ w·d = 1 + [1, 1, 6, -4]
    check(
        bname,
        backend,
        &della_models(),
        &della_recipe("della_linear", "1.0", "1.0", ""),
        &[2.0, 2.0, 7.0, -3.0],
        Tol::FIXTURE,
    );
    // normalize true divides by Σ w = 3: 1 + [1/3, 1/3, 2, -4/3]
    check(
        bname,
        backend,
        &della_models(),
        &della_recipe(
            "della_linear",
            "1.0",
            "1.0",
            "parameters: {normalize: true}\n",
        ),
        &[4.0 / 3.0, 4.0 / 3.0, 3.0, -1.0 / 3.0],
        Tol::FIXTURE,
    );
}

backend_test!(della_linear_density_one_is_a_weighted_sum);

fn della_density_zero_drops_the_model(bname: &str, backend: &dyn Backend) {
    // density 0 drops every element of that model, whatever epsilon says
    for method in ["della", "della_linear"] {
        // both at 0: the base
        check(
            bname,
            backend,
            &della_models(),
            &della_recipe(method, "0.0", "0.0", ""),
            &f64s(&DE_BASE),
            Tol::EXACT,
        );
        // x0 dropped, x1 kept whole: della 1 + d1·1/1, della_linear 1 + 1·d1 -> x1
        check(
            bname,
            backend,
            &della_models(),
            &della_recipe(method, "0.0", "1.0", ""),
            &f64s(&DE_X1),
            Tol::FIXTURE,
        );
    }
}

backend_test!(della_density_zero_drops_the_model);

/// A tensor for DELLA's statistics: rows of `len` whose |delta| ranks are known. In row i the
/// element at column j has ascending rank r = (a_i·j + b_i) mod len and |delta| =
/// (r + 1)·2^(i mod 4)/16 (distinct in the row; rows differ in scale by up to 8×, so a
/// whole-tensor ranking would give the small-scale rows low keep probabilities). Bases are
/// multiples of 1/8 in [-1/4, 1/4]; every value is exact, so x - base is the delta exactly.
struct Ranked {
    name: &'static str,
    shape: Vec<usize>,
    len: usize,
    base: Vec<f32>,
    x: Vec<f32>,
    delta: Vec<f32>,
    rank: Vec<usize>,
    /// log2 of the row's scale
    group: Vec<usize>,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn ranked(name: &'static str, shape: &[usize], rng: &mut Lcg) -> Ranked {
    let len = *shape.last().unwrap();
    let rows = shape.iter().product::<usize>() / len;
    let mut t = Ranked {
        name,
        shape: shape.to_vec(),
        len,
        base: Vec::new(),
        x: Vec::new(),
        delta: Vec::new(),
        rank: Vec::new(),
        group: Vec::new(),
    };
    for i in 0..rows {
        let mut a = (2 * i + 3) % len;
        while gcd(a, len) != 1 {
            a += 1;
        }
        let b = (i * 7919) % len;
        let g = i % 4;
        for j in 0..len {
            let r = (a * j + b) % len;
            let sign = if rng.next_u32() & 1 == 0 { 1.0 } else { -1.0 };
            let d = sign * (r + 1) as f32 * (1 << g) as f32 / 16.0;
            let base = ((i * len + j) % 5) as f32 / 8.0 - 0.25;
            let x = base + d;
            assert_eq!(x - base, d, "test data must be exact");
            t.base.push(base);
            t.x.push(x);
            t.delta.push(d);
            t.rank.push(r);
            t.group.push(g);
        }
    }
    t
}

/// Kept count against its expectation: within 4 standard deviations of Σ p.
#[track_caller]
fn assert_kept(what: &str, kept: usize, probs: &[f64]) {
    let mean: f64 = probs.iter().sum();
    let sd = probs.iter().map(|p| p * (1.0 - p)).sum::<f64>().sqrt();
    let n = probs.len() as f64;
    assert!(
        (kept as f64 - mean).abs() <= 4.0 * sd,
        "{what}: kept {kept} of {n} ({:.4}), expected {:.4} ± {:.4}",
        kept as f64 / n,
        mean / n,
        4.0 * sd / n
    );
}

/// della_linear, one model, weight 1, density 0.5, epsilon 0.25: an element of ascending
/// |delta| rank r in a row of c is kept with p = 0.25 + 0.5·r/(c - 1) (for c = 257 and
/// c = 4097, r/(c - 1) is a multiple of a power of two: every p is exact in f32). Checked:
///   * kept fraction per rank decile (rank within its row) within 4 sd of the mean p there
///     (0.275 for the lowest decile ... 0.725 for the highest);
///   * kept fraction of the rows of each scale within 4 sd of 0.5 (ranks are per row: a
///     per-tensor or per-column ranking fails this);
///   * every kept element is delta × Σ|delta| / Σ|kept delta| (the L1 rescale over the whole
///     tensor), and the L1 norm of the delta is preserved;
///   * every backend keeps the same elements.
///
/// Tensors: [64, 257] (rows of dimension 1), [40, 256] (whole rows in 1024-element GPU
/// tiles) and [4097] (1-D: one row).
fn della_keep_rates_by_rank_and_l1_rescale(bname: &str, backend: &dyn Backend) {
    let (density, epsilon) = (0.5f64, 0.25f64);
    let mut rng = Lcg(11);
    let tensors = [
        ranked("a", &[64, 257], &mut rng),
        ranked("b", &[40, 256], &mut rng),
        ranked("c", &[4097], &mut rng),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let bt: Vec<T> = tensors
        .iter()
        .map(|t| T::f32(&t.shape, t.base.clone()))
        .collect();
    let xt: Vec<T> = tensors
        .iter()
        .map(|t| T::f32(&t.shape, t.x.clone()))
        .collect();
    let named = |ts: &'_ [T]| -> Vec<(&'static str, T)> {
        tensors
            .iter()
            .map(|t| t.name)
            .zip(ts.iter().cloned())
            .collect()
    };
    for (dir, list) in [("base", named(&bt)), ("ft", named(&xt))] {
        let refs: Vec<(&str, &T)> = list.iter().map(|(n, t)| (*n, t)).collect();
        write_model(&tmp.path().join(dir), 0, &refs);
    }
    let recipe = format!(
        "merge_method: della_linear\nbase_model: base\nmodels:\n  - {{model: ft, parameters: {{weight: 1.0, density: {density}, epsilon: {epsilon}}}}}\ndtype: float32\n"
    );
    // the kept masks of the first backend: every other one must keep the same elements
    let mut first: Vec<Vec<bool>> = Vec::new();
    let plan = plan_text(tmp.path(), &recipe, Some(7));
    let got = merge_plan(&plan, backend);
    for (ti, t) in tensors.iter().enumerate() {
        let out = &got[t.name].data;
        let what = format!("{bname}, tensor {} {:?}", t.name, t.shape);
        let kept: Vec<bool> = out.iter().zip(&t.base).map(|(o, b)| o != b).collect();
        if first.len() == ti {
            first.push(kept.clone());
        } else {
            let diff = (0..kept.len()).find(|&i| kept[i] != first[ti][i]);
            assert!(
                diff.is_none(),
                "{what}: keeps other elements than the first backend, e.g. {diff:?}"
            );
        }
        let prob = |r: usize| (density - epsilon) + 2.0 * epsilon * r as f64 / (t.len - 1) as f64;

        for dec in 0..10 {
            let idx: Vec<usize> = (0..out.len())
                .filter(|&i| t.rank[i] * 10 / t.len == dec)
                .collect();
            let probs: Vec<f64> = idx.iter().map(|&i| prob(t.rank[i])).collect();
            let k = idx.iter().filter(|&&i| kept[i]).count();
            assert_kept(&format!("{what}, rank decile {dec}"), k, &probs);
        }
        if t.shape.len() == 2 {
            for g in 0..4 {
                let idx: Vec<usize> = (0..out.len()).filter(|&i| t.group[i] == g).collect();
                let probs: Vec<f64> = idx.iter().map(|&i| prob(t.rank[i])).collect();
                let mean = probs.iter().sum::<f64>() / probs.len() as f64;
                assert!((mean - 0.5).abs() < 1e-12);
                let k = idx.iter().filter(|&&i| kept[i]).count();
                assert_kept(&format!("{what}, rows of scale 2^{g}"), k, &probs);
            }
        }

        let full: f64 = t.delta.iter().map(|d| d.abs() as f64).sum();
        let kept_l1: f64 = t
            .delta
            .iter()
            .zip(&kept)
            .filter(|(_, k)| **k)
            .map(|(d, _)| d.abs() as f64)
            .sum();
        let ratio = full / kept_l1;
        let (mut g, mut e) = (Vec::new(), Vec::new());
        for i in 0..out.len() {
            if kept[i] {
                g.push((out[i] as f64 - t.base[i] as f64) as f32);
                e.push((t.delta[i] as f64 * ratio) as f32);
            }
        }
        assert_close(
            &format!("{what}: kept elements against delta·{ratio:.6}"),
            &g,
            &e,
            DType::F32,
            Tol::abs_rel(0.0, 6.0 * f32::EPSILON as f64),
        );
        let out_l1: f64 = out
            .iter()
            .zip(&t.base)
            .map(|(o, b)| (*o as f64 - *b as f64).abs())
            .sum();
        assert!(
            (out_l1 - full).abs() <= 1e-5 * full,
            "{what}: L1 {out_l1} vs delta L1 {full}"
        );
    }
}

backend_test!(della_keep_rates_by_rank_and_l1_rescale);

#[test]
fn della_epsilon_must_keep_probabilities_inside_zero_one() {
    let tmp = tempfile::tempdir().unwrap();
    for m in ["base", "x0"] {
        write_vec_model(&tmp.path().join(m), &[1.0, 2.0, 3.0, 4.0]);
    }
    let recipe = |method: &str, density: &str, epsilon: Option<&str>| {
        let eps = epsilon
            .map(|e| format!(", epsilon: {e}"))
            .unwrap_or_default();
        format!(
            "merge_method: {method}\nbase_model: base\nmodels:\n  - {{model: x0, parameters: {{weight: 1.0, density: {density}{eps}}}}}\n"
        )
    };
    // density - epsilon <= 0 or density + epsilon >= 1 is refused while planning
    for (method, d, e) in [
        ("della", "0.5", Some("0.5")),        // 0 and 1
        ("della", "0.2", Some("0.2")),        // 0
        ("della_linear", "0.9", None),        // 0.9 + 0.15 (the default) = 1.05
        ("della_linear", "0.7", Some("0.3")), // 1.0
        ("della", "0.1", Some("0.15")),       // -0.05
    ] {
        let msg = plan_error(tmp.path(), &recipe(method, d, e));
        for needle in ["tensor w", "density", "epsilon", "(0, 1)"] {
            assert!(
                msg.contains(needle),
                "{method} density {d} epsilon {e:?}: {needle:?} not in {msg:?}"
            );
        }
    }
    // inside the range, and density 0 or 1 (which never draw), plan fine
    for (d, e) in [
        ("0.5", "0.49"),
        ("1.0", "0.5"),
        ("0.0", "0.5"),
        ("0.5", "0.0"),
    ] {
        plan_text(tmp.path(), &recipe("della", d, Some(e)), None);
    }
}

// ---- SCE (§8) ----------------------------------------------------------------------------

// Three models over base 1, six elements. Deltas (x - 1) per element e0..e5:
//   e0 [4, 4, 4]     population variance 0
//   e1 [3, -1, -1]   mean 1/3, var ((8/3)² + 2·(4/3)²)/3 = 96/27 ≈ 3.56
//   e2 [1, -1, 0]    var 2/3
//   e3 [3, 1, -4]    var 26/3 ≈ 8.67
//   e4 [0.5, 0, 0]   var 1/18
//   e5 [-2, 1, 1]    var 2
const SC_BASE: [f32; 6] = [1.0; 6];
const SC_X0: [f32; 6] = [5.0, 4.0, 2.0, 4.0, 1.5, -1.0];
const SC_X1: [f32; 6] = [5.0, 0.0, 0.0, 2.0, 1.0, 2.0];
const SC_X2: [f32; 6] = [5.0, 0.0, 1.0, -3.0, 1.0, 2.0];

fn sce_models() -> [(&'static str, &'static [f32]); 4] {
    [
        ("base", &SC_BASE),
        ("x0", &SC_X0),
        ("x1", &SC_X1),
        ("x2", &SC_X2),
    ]
}

fn sce_recipe(params: &str) -> String {
    format!("merge_method: sce\nbase_model: base\nmodels:\n  - model: x0\n  - model: x1\n  - model: x2\n{params}")
}

fn sce_variance_selection_weights_and_unweighted_election(bname: &str, backend: &dyn Backend) {
    // select_topk 0.5: 5 elements have nonzero variance -> k = int(5 · 0.5) = 2 (counting
    // e0 would give 3 and keep e5): the two largest variances, e3 and e1. Masked deltas:
    //   T0 = [0, 3, 0, 3, 0, 0], T1 = [0, -1, 0, 1, 0, 0], T2 = [0, -1, 0, -4, 0, 0]
    // weights = mean of T² over the 6 elements: [18/6, 2/6, 17/6] -> / (37/6) = [18, 2, 17]/37
    // (from the unmasked deltas they would be ∝ [39.25, 20, 34]).
    //   e1: ΣT = 1 -> +; agreeing {0}: 3
    //   e3: ΣT = 0 -> + (unweighted; the weighted sum 54 + 2 - 68 < 0 would elect -, -4);
    //       agreeing {0, 1}: (18·3 + 2·1)/(18 + 2) = 2.8
    //   the rest: every T is 0, nobody agrees, 0 / max(0, 1e-6) = 0
    check(
        bname,
        backend,
        &sce_models(),
        &sce_recipe("parameters: {select_topk: 0.5}\n"),
        &[1.0, 4.0, 1.0, 3.8, 1.0, 1.0],
        Tol::FIXTURE,
    );
}

backend_test!(sce_variance_selection_weights_and_unweighted_election);

fn sce_without_selection(bname: &str, backend: &dyn Backend) {
    // select_topk 1 (the default) keeps every element; weights ∝ mean squares of the deltas:
    //   Σd0² = 16 + 9 + 1 + 9 + 0.25 + 4 = 39.25, Σd1² = 20, Σd2² = 34
    //   e0 [4, 4, 4] all agree: 4          e1 [3, -1, -1] + {0}: 3
    //   e2 [1, -1, 0] Σ 0 -> + {0}: 1      e3 [3, 1, -4] Σ 0 -> + {0, 1}: (39.25·3 + 20)/59.25
    //   e4 [0.5, 0, 0] {0}: 0.5            e5 [-2, 1, 1] Σ 0 -> + {1, 2}: (20 + 34)/54 = 1
    let want = add(&SC_BASE, &[4.0, 3.0, 1.0, 137.75 / 59.25, 0.5, 1.0]);
    check(
        bname,
        backend,
        &sce_models(),
        &sce_recipe(""),
        &want,
        Tol::FIXTURE,
    );
    check(
        bname,
        backend,
        &sce_models(),
        &sce_recipe("parameters: {select_topk: 1.0}\n"),
        &want,
        Tol::FIXTURE,
    );
    // select_topk 0 keeps nothing: the base
    check(
        bname,
        backend,
        &sce_models(),
        &sce_recipe("parameters: {select_topk: 0.0}\n"),
        &f64s(&SC_BASE),
        Tol::EXACT,
    );
}

backend_test!(sce_without_selection);

fn sce_uniform_weights_below_the_absolute_threshold(bname: &str, backend: &dyn Backend) {
    // Base 0, a = 2^-12: d0 = [a, a], d1 = [3a, -a]. Mean squares a² and 5a², sum
    // 6·2^-24 ≈ 3.6e-7 < 1e-6 -> uniform weights [1/2, 1/2]:
    //   e0 both +: (a/2 + 3a/2) / 1 = 2a (by mean squares it would be 8a/3)
    //   e1 Σ 0 -> +, {0}: a
    let a = 2f32.powi(-12);
    let zeros = [0.0f32; 2];
    let r = "merge_method: sce\nbase_model: base\nmodels:\n  - model: x0\n  - model: x1\n";
    check(
        bname,
        backend,
        &[("base", &zeros), ("x0", &[a, a]), ("x1", &[3.0 * a, -a])],
        r,
        &[2.0 * a as f64, a as f64],
        REL,
    );
    // The same deltas × 64 (a = 2^-6): sum 6·2^-12 ≥ 1e-6 -> weights [1/6, 5/6]:
    //   e0 (a/6 + 3a·5/6) / 1 = 8a/3;  e1 a
    let a = 2f32.powi(-6);
    check(
        bname,
        backend,
        &[("base", &zeros), ("x0", &[a, a]), ("x1", &[3.0 * a, -a])],
        r,
        &[8.0 * a as f64 / 3.0, a as f64],
        REL,
    );
}

backend_test!(sce_uniform_weights_below_the_absolute_threshold);

fn sce_divisor_is_clamped_at_1e_minus_6(bname: &str, backend: &dyn Backend) {
    // Base 0: d0 = [1024, -2^-10], d1 = [0, 2^-9]. Mean squares (f32): (2^20 + 2^-20)/2 -> 2^19
    // and 2^-18/2 = 2^-19; their sum rounds to 2^19 -> weights [1, 2^-38].
    //   e0: only d0 is nonzero: 1024
    //   e1: Σ = 2^-10 > 0 -> +, only model 1 agrees: (2^-38 · 2^-9) / max(2^-38, 1e-6)
    //       = 2^-47 / 1e-6 ≈ 7.1e-9 (without the clamp: 2^-9)
    let zeros = [0.0f32; 2];
    check(
        bname,
        backend,
        &[
            ("base", &zeros),
            ("x0", &[1024.0, -(2f32.powi(-10))]),
            ("x1", &[0.0, 2f32.powi(-9)]),
        ],
        "merge_method: sce\nbase_model: base\nmodels:\n  - model: x0\n  - model: x1\n",
        &[1024.0, 2f64.powi(-47) / 1e-6],
        REL,
    );
}

backend_test!(sce_divisor_is_clamped_at_1e_minus_6);

// ---- Model Stock (§9) --------------------------------------------------------------------

const MS_BASE: [f32; 4] = [1.0, 2.0, 3.0, 4.0];

fn ms_recipe(n: usize, params: &str) -> String {
    let mut r = String::from("merge_method: model_stock\nbase_model: base\nmodels:\n");
    for i in 0..n {
        r.push_str(&format!("  - model: x{i}\n"));
    }
    r.push_str(params);
    r
}

fn model_stock_two_fine_tunes(bname: &str, backend: &dyn Backend) {
    // d0 = [1, 1, 0, 0], d1 = [1, 0, 1, 0]: cos = 1/(√2·√2) = 1/2, t = 2·(1/2)/(1 + 1/2) = 2/3
    // out = t·mean(x) + (1 - t)·base = base + t·mean(d) = base + (2/3)·[1, 1/2, 1/2, 0]
    check(
        bname,
        backend,
        &[
            ("base", &MS_BASE),
            ("x0", &[2.0, 3.0, 3.0, 4.0]),
            ("x1", &[2.0, 2.0, 4.0, 4.0]),
        ],
        &ms_recipe(2, ""),
        &[5.0 / 3.0, 7.0 / 3.0, 10.0 / 3.0, 4.0],
        Tol::FIXTURE,
    );
    // d0 = [1, 1, 0, 0], d1 = [-1, 0, 1, 0]: cos = -1/2, t = -1/(1/2) = -2 (not clamped)
    // base - 2·[0, 1/2, 1/2, 0]
    check(
        bname,
        backend,
        &[
            ("base", &MS_BASE),
            ("x0", &[2.0, 3.0, 3.0, 4.0]),
            ("x1", &[0.0, 2.0, 4.0, 4.0]),
        ],
        &ms_recipe(2, ""),
        &[1.0, 1.0, 2.0, 4.0],
        Tol::FIXTURE,
    );
}

backend_test!(model_stock_two_fine_tunes);

fn model_stock_three_fine_tunes(bname: &str, backend: &dyn Backend) {
    // d0 = [2, 0, 0, 0], d1 = [1, 0, 0, 0], d2 = [0, 3, 0, 0]
    // pairwise cos: (0,1) 1, (0,2) 0, (1,2) 0 -> mean 1/3; t = 3·(1/3)/(1 + 2·(1/3)) = 3/5
    // mean(d) = [1, 1, 0, 0] -> base + [0.6, 0.6, 0, 0]
    check(
        bname,
        backend,
        &[
            ("base", &MS_BASE),
            ("x0", &[3.0, 2.0, 3.0, 4.0]),
            ("x1", &[2.0, 2.0, 3.0, 4.0]),
            ("x2", &[1.0, 5.0, 3.0, 4.0]),
        ],
        &ms_recipe(3, ""),
        &[1.6, 2.6, 3.0, 4.0],
        Tol::FIXTURE,
    );
}

backend_test!(model_stock_three_fine_tunes);

fn model_stock_filter_wise_rows(bname: &str, backend: &dyn Backend) {
    // A [2, 4] tensor. Row 0: d0 = [1, 1, 0, 0], d1 = [1, 0, 1, 0] -> cos 1/2, t = 2/3.
    // Row 1: d0 = [1, 0, 0, 0], d1 = [3, 0, 0, 0] -> cos 1, t = 2/2 = 1: the mean of the models.
    let base = [1.0f32, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -4.0];
    let x0 = [2.0f32, 3.0, 3.0, 4.0, 0.0, -2.0, -3.0, -4.0];
    let x1 = [2.0f32, 2.0, 4.0, 4.0, 2.0, -2.0, -3.0, -4.0];
    let models: [(&str, &[f32]); 3] = [("base", &base), ("x0", &x0), ("x1", &x1)];
    // filter_wise: row 0 base + (2/3)·[1, 1/2, 1/2, 0]; row 1 base + [2, 0, 0, 0]
    check_shaped(
        bname,
        backend,
        &[2, 4],
        &models,
        &ms_recipe(2, "parameters: {filter_wise: true}\n"),
        &[5.0 / 3.0, 7.0 / 3.0, 10.0 / 3.0, 4.0, 1.0, -2.0, -3.0, -4.0],
        Tol::FIXTURE,
    );
    // whole tensor: d0·d1 = 1 + 3 = 4, |d0|² = 3, |d1|² = 11 -> cos = 4/√33 ≈ 0.6963,
    // t = 2cos/(1 + cos) ≈ 0.8210; mean(d) = [1, 1/2, 1/2, 0, 2, 0, 0, 0]
    let c = 4.0 / 33f64.sqrt();
    let t = 2.0 * c / (1.0 + c);
    let mean_d = [1.0, 0.5, 0.5, 0.0, 2.0, 0.0, 0.0, 0.0];
    let want: Vec<f64> = (0..8).map(|i| base[i] as f64 + t * mean_d[i]).collect();
    check_shaped(
        bname,
        backend,
        &[2, 4],
        &models,
        &ms_recipe(2, ""),
        &want,
        Tol::FIXTURE,
    );
    check_shaped(
        bname,
        backend,
        &[2, 4],
        &models,
        &ms_recipe(2, "parameters: {filter_wise: false}\n"),
        &want,
        Tol::FIXTURE,
    );
}

backend_test!(model_stock_filter_wise_rows);

// ---- SLERP (§10.1) -----------------------------------------------------------------------

fn slerp_recipe(t: &str) -> String {
    format!("merge_method: slerp\nbase_model: v0\nmodels:\n  - model: v0\n  - model: v1\nparameters: {{t: {t}}}\n")
}

fn slerp_endpoints_are_exact(bname: &str, backend: &dyn Backend) {
    // Not parallel (spherical branch): coefficients sin(θ)/sin(θ) = 1 and sin(0) = 0.
    let v0 = [3.0f32, -1.0, 0.5, 2.0];
    let v1 = [0.25f32, 4.0, -2.0, 1.0];
    let m: [(&str, &[f32]); 2] = [("v0", &v0), ("v1", &v1)];
    check(
        bname,
        backend,
        &m,
        &slerp_recipe("0.0"),
        &f64s(&v0),
        Tol::EXACT,
    );
    check(
        bname,
        backend,
        &m,
        &slerp_recipe("1.0"),
        &f64s(&v1),
        Tol::EXACT,
    );
}

backend_test!(slerp_endpoints_are_exact);

fn slerp_orthogonal_vectors(bname: &str, backend: &dyn Backend) {
    // v0 = [3, 0, 0, 4] (norm 5), v1 = [0, 2, 0, 0] (norm 2): cos 0, θ = π/2, sin θ = 1.
    // t = 0.5: both coefficients sin(π/4) = √2/2 -> [3√2/2, √2, 0, 2√2] (lerp: [1.5, 1, 0, 2])
    let v0 = [3.0f32, 0.0, 0.0, 4.0];
    let v1 = [0.0f32, 2.0, 0.0, 0.0];
    let m: [(&str, &[f32]); 2] = [("v0", &v0), ("v1", &v1)];
    let h = 2f64.sqrt() / 2.0;
    check(
        bname,
        backend,
        &m,
        &slerp_recipe("0.5"),
        &[3.0 * h, 2.0 * h, 0.0, 4.0 * h],
        Tol::FIXTURE,
    );
    // t = 0.25: sin(3π/8) ≈ 0.92388 on v0, sin(π/8) ≈ 0.38268 on v1
    let (a, b) = (
        (3.0 * std::f64::consts::PI / 8.0).sin(),
        (std::f64::consts::PI / 8.0).sin(),
    );
    check(
        bname,
        backend,
        &m,
        &slerp_recipe("0.25"),
        &[3.0 * a, 2.0 * b, 0.0, 4.0 * a],
        Tol::FIXTURE,
    );
}

backend_test!(slerp_orthogonal_vectors);

fn slerp_sixty_degrees(bname: &str, backend: &dyn Backend) {
    // v0 = [1, 1, 0, 0], v1 = [1, 0, 1, 0]: cos 1/2, θ = π/3; t = 0.5: both coefficients
    // sin(π/6)/sin(π/3) = 1/√3 -> [2, 1, 1, 0]/√3
    let s = 1.0 / 3f64.sqrt();
    check(
        bname,
        backend,
        &[("v0", &[1.0, 1.0, 0.0, 0.0]), ("v1", &[1.0, 0.0, 1.0, 0.0])],
        &slerp_recipe("0.5"),
        &[2.0 * s, s, s, 0.0],
        Tol::FIXTURE,
    );
}

backend_test!(slerp_sixty_degrees);

fn slerp_linear_branch_above_the_dot_threshold(bname: &str, backend: &dyn Backend) {
    // v0 = [1, 0], v1 = [1, y]: cos = 1/√(1 + y²), θ = atan(y).
    // y = 0.028: cos ≈ 0.999608 > 0.9995 -> linear: (v0 + v1)/2 = [1, 0.014]
    //   (spherical would be (v0 + v1)/(2cos(θ/2)), 1e-4 larger)
    let y = 0.028f32;
    check(
        bname,
        backend,
        &[("v0", &[1.0, 0.0]), ("v1", &[1.0, y])],
        &slerp_recipe("0.5"),
        &[1.0, y as f64 / 2.0],
        Tol::FIXTURE,
    );
    // y = 0.032: cos ≈ 0.999489 < 0.9995 -> spherical: (v0 + v1)/(2cos(θ/2)) ≈ [1.000128, 0.016002]
    let y = 0.032f32;
    let k = 1.0 / (2.0 * ((y as f64).atan() / 2.0).cos());
    check(
        bname,
        backend,
        &[("v0", &[1.0, 0.0]), ("v1", &[1.0, y])],
        &slerp_recipe("0.5"),
        &[2.0 * k, y as f64 * k],
        Tol::FIXTURE,
    );
}

backend_test!(slerp_linear_branch_above_the_dot_threshold);

// ---- NuSLERP (§10.2) ---------------------------------------------------------------------

fn nuslerp_recipe(base: bool, w0: &str, w1: &str, params: &str) -> String {
    let b = if base { "base_model: base\n" } else { "" };
    format!(
        "merge_method: nuslerp\n{b}models:\n  - {{model: x0, parameters: {{weight: {w0}}}}}\n  - {{model: x1, parameters: {{weight: {w1}}}}}\n{params}"
    )
}

fn nuslerp_flattened_with_and_without_base(bname: &str, backend: &dyn Backend) {
    let r3 = 3f64.sqrt();
    // No base: x0 = [2, 0, 0, 0], x1 = [0, 0, 4, 0] orthogonal (θ = π/2, sin θ = 1).
    // Weights [2, 1] -> t = 1/3: sin(2π/6) = √3/2 on x0, sin(π/6) = 1/2 on x1 -> [√3, 0, 2, 0]
    let x0 = [2.0f32, 0.0, 0.0, 0.0];
    let x1 = [0.0f32, 0.0, 4.0, 0.0];
    check(
        bname,
        backend,
        &[("x0", &x0), ("x1", &x1)],
        &nuslerp_recipe(false, "2.0", "1.0", ""),
        &[r3, 0.0, 2.0, 0.0],
        Tol::FIXTURE,
    );
    // Weights [1, -1] sum to 0 -> t = 0.5: √2/2 on each -> [√2, 0, 2√2, 0]
    let s2 = 2f64.sqrt();
    check(
        bname,
        backend,
        &[("x0", &x0), ("x1", &x1)],
        &nuslerp_recipe(false, "1.0", "-1.0", ""),
        &[s2, 0.0, 2.0 * s2, 0.0],
        Tol::FIXTURE,
    );
    // With base [1, 1, 1, 1] and the same deltas: base + [√3, 0, 2, 0]. (Interpolating the
    // models themselves, [3, 1, 1, 1] and [1, 1, 5, 1], would give something else.)
    let base = [1.0f32; 4];
    check(
        bname,
        backend,
        &[
            ("base", &base),
            ("x0", &[3.0, 1.0, 1.0, 1.0]),
            ("x1", &[1.0, 1.0, 5.0, 1.0]),
        ],
        &nuslerp_recipe(true, "2.0", "1.0", ""),
        &[1.0 + r3, 1.0, 3.0, 1.0],
        Tol::FIXTURE,
    );
}

backend_test!(nuslerp_flattened_with_and_without_base);

fn nuslerp_rows_and_columns(bname: &str, backend: &dyn Backend) {
    let r3 = 3f64.sqrt();
    // t = 1/3 throughout (weights [2, 1]). For a pair of orthogonal vectors a (norm 2) and
    // b (norm 4) along different axes: (√3/2)·a + (1/2)·b; for parallel or antiparallel
    // vectors (colinear, linear branch): (2/3)·a + (1/3)·b.
    //
    // nuslerp_flatten false, row_wise false: vectors are the rows (last dimension) of [2, 2]:
    //   row 0: [2, 0] and [0, 4] orthogonal -> [√3, 2]
    //   row 1: [1, 0] and [3, 0] parallel  -> [2/3 + 1, 0] = [5/3, 0]
    // (flattened, [2, 0, 1, 0] and [0, 4, 3, 0] have cos 3/(√5·5): a different result)
    check_shaped(
        bname,
        backend,
        &[2, 2],
        &[("x0", &[2.0, 0.0, 1.0, 0.0]), ("x1", &[0.0, 4.0, 3.0, 0.0])],
        &nuslerp_recipe(
            false,
            "2.0",
            "1.0",
            "parameters: {nuslerp_flatten: false}\n",
        ),
        &[r3, 2.0, 5.0 / 3.0, 0.0],
        Tol::FIXTURE,
    );
    // row_wise true: vectors are the columns (dimension 0) of [2, 3]:
    //   x0 = [[2, 1, 0], [0, 0, 1]], x1 = [[0, 3, 0], [4, 0, -1]]
    //   col 0: [2, 0] and [0, 4] orthogonal    -> [√3, 2]
    //   col 1: [1, 0] and [3, 0] parallel      -> [5/3, 0]
    //   col 2: [0, 1] and [0, -1] antiparallel -> [0, 2/3 - 1/3] = [0, 1/3]
    // row-major: [[√3, 5/3, 0], [2, 0, 1/3]]
    check_shaped(
        bname,
        backend,
        &[2, 3],
        &[
            ("x0", &[2.0, 1.0, 0.0, 0.0, 0.0, 1.0]),
            ("x1", &[0.0, 3.0, 0.0, 4.0, 0.0, -1.0]),
        ],
        &nuslerp_recipe(
            false,
            "2.0",
            "1.0",
            "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n",
        ),
        &[r3, 5.0 / 3.0, 0.0, 2.0, 0.0, 1.0 / 3.0],
        Tol::FIXTURE,
    );
    // the same with a base: every vector is a delta, the base is added back
    let base = [0.5f32, -1.0, 2.0, 0.25, 1.0, -0.5];
    let plus = |d: [f32; 6]| -> Vec<f32> { base.iter().zip(d).map(|(b, d)| b + d).collect() };
    let x0 = plus([2.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
    let x1 = plus([0.0, 3.0, 0.0, 4.0, 0.0, -1.0]);
    check_shaped(
        bname,
        backend,
        &[2, 3],
        &[("base", &base), ("x0", &x0), ("x1", &x1)],
        &nuslerp_recipe(
            true,
            "2.0",
            "1.0",
            "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n",
        ),
        &add(&base, &[r3, 5.0 / 3.0, 0.0, 2.0, 0.0, 1.0 / 3.0]),
        Tol::FIXTURE,
    );
}

backend_test!(nuslerp_rows_and_columns);

// ---- Multi-SLERP (§10.3) -----------------------------------------------------------------

// With U_i = V_i/|V_i| and m = Σ w_i U_i, the tangent vectors T_i = U_i - (U_i·m̂)m̂ sum
// (weighted) to m - |m|·m̂ = 0, so the exponential map returns m̂ itself:
//   result = m̂ · Σ w_i |V_i|   (the eps terms change it by ~1e-9 relative)

fn multislerp_recipe(base: bool, weights: &[&str], params: &str) -> String {
    let mut r = String::from("merge_method: multislerp\n");
    if base {
        r.push_str("base_model: base\n");
    }
    r.push_str("models:\n");
    for (i, w) in weights.iter().enumerate() {
        r.push_str(&format!(
            "  - {{model: x{i}, parameters: {{weight: {w}}}}}\n"
        ));
    }
    r.push_str(params);
    r
}

fn multislerp_two_models(bname: &str, backend: &dyn Backend) {
    let v0 = [3.0f32, 0.0, 0.0];
    let v1 = [0.0f32, 4.0, 0.0];
    let m: [(&str, &[f32]); 2] = [("x0", &v0), ("x1", &v1)];
    // equal weights -> [1/2, 1/2]: m̂ = [1, 1, 0]/√2, Σ w|V| = 3.5 -> 3.5/√2 · [1, 1, 0]
    // (the linear average would be [1.5, 2, 0])
    let k = 3.5 / 2f64.sqrt();
    check(
        bname,
        backend,
        &m,
        &multislerp_recipe(false, &["1.0", "1.0"], ""),
        &[k, k, 0.0],
        Tol::FIXTURE,
    );
    // weights [3, 1] -> [0.75, 0.25]: m = [0.75, 0.25, 0], |m| = √0.625, Σ w|V| = 3.25
    let k = 3.25 / 0.625f64.sqrt();
    check(
        bname,
        backend,
        &m,
        &multislerp_recipe(false, &["3.0", "1.0"], ""),
        &[0.75 * k, 0.25 * k, 0.0],
        Tol::FIXTURE,
    );
    // not normalised: m = [3, 1, 0], |m| = √10, Σ w|V| = 9 + 4 = 13
    let k = 13.0 / 10f64.sqrt();
    check(
        bname,
        backend,
        &m,
        &multislerp_recipe(
            false,
            &["3.0", "1.0"],
            "parameters: {normalize_weights: false}\n",
        ),
        &[3.0 * k, k, 0.0],
        Tol::FIXTURE,
    );
}

backend_test!(multislerp_two_models);

fn multislerp_three_models_with_and_without_base(bname: &str, backend: &dyn Backend) {
    // V0 = [2, 0, 0, 0], V1 = [0, 2, 0, 0], V2 = [0, 0, 3, 4] (norm 5); weights 0.5/0.3/0.2
    // m = [0.5, 0.3, 0.2·0.6, 0.2·0.8] = [0.5, 0.3, 0.12, 0.16], |m|² = 0.38
    // Σ w|V| = 1 + 0.6 + 1 = 2.6 -> 2.6/√0.38 · m
    let k = 2.6 / 0.38f64.sqrt();
    let want = [0.5 * k, 0.3 * k, 0.12 * k, 0.16 * k];
    let v: [[f32; 4]; 3] = [
        [2.0, 0.0, 0.0, 0.0],
        [0.0, 2.0, 0.0, 0.0],
        [0.0, 0.0, 3.0, 4.0],
    ];
    let w = ["0.5", "0.3", "0.2"];
    check(
        bname,
        backend,
        &[("x0", &v[0]), ("x1", &v[1]), ("x2", &v[2])],
        &multislerp_recipe(false, &w, ""),
        &want,
        Tol::FIXTURE,
    );
    // with a base the V_i are deltas and the base is added back
    let base = [1.0f32, -1.0, 0.5, 2.0];
    let x: Vec<Vec<f32>> = v
        .iter()
        .map(|d| base.iter().zip(d).map(|(b, d)| b + d).collect())
        .collect();
    check(
        bname,
        backend,
        &[("base", &base), ("x0", &x[0]), ("x1", &x[1]), ("x2", &x[2])],
        &multislerp_recipe(true, &w, ""),
        &add(&base, &want),
        Tol::FIXTURE,
    );
}

backend_test!(multislerp_three_models_with_and_without_base);

// ---- Karcher mean (§10.4) ----------------------------------------------------------------

fn karcher_recipe(n: usize, params: &str) -> String {
    let mut r = String::from("merge_method: karcher\nmodels:\n");
    for i in 0..n {
        r.push_str(&format!("  - model: x{i}\n"));
    }
    r.push_str(params);
    r
}

fn karcher_two_models_is_the_midpoint_direction(bname: &str, backend: &dyn Backend) {
    // Two unit vectors: the Karcher mean is the geodesic midpoint, normalize(U0 + U1); the
    // scale is the mean norm.
    // X0 = [3, 0, 0], X1 = [0, 5, 0]: [1, 1, 0]/√2 · 4
    let k = 4.0 / 2f64.sqrt();
    check(
        bname,
        backend,
        &[("x0", &[3.0, 0.0, 0.0]), ("x1", &[0.0, 5.0, 0.0])],
        &karcher_recipe(2, ""),
        &[k, k, 0.0],
        Tol::FIXTURE,
    );
    // X0 = [2, 0], X1 = [3, 3]: directions at 0 and π/4 -> [cos π/8, sin π/8] · (2 + 3√2)/2
    let s = (2.0 + 3.0 * 2f64.sqrt()) / 2.0;
    let a = std::f64::consts::PI / 8.0;
    check(
        bname,
        backend,
        &[("x0", &[2.0, 0.0]), ("x1", &[3.0, 3.0])],
        &karcher_recipe(2, ""),
        &[s * a.cos(), s * a.sin()],
        Tol::FIXTURE,
    );
}

backend_test!(karcher_two_models_is_the_midpoint_direction);

fn karcher_three_symmetric_models(bname: &str, backend: &dyn Backend) {
    // [1, 0, 0], [0, 2, 0], [0, 0, 3]: by symmetry the mean direction is [1, 1, 1]/√3; the
    // scale is (1 + 2 + 3)/3 = 2
    let k = 2.0 / 3f64.sqrt();
    check(
        bname,
        backend,
        &[
            ("x0", &[1.0, 0.0, 0.0]),
            ("x1", &[0.0, 2.0, 0.0]),
            ("x2", &[0.0, 0.0, 3.0]),
        ],
        &karcher_recipe(3, ""),
        &[k, k, k],
        Tol::FIXTURE,
    );
}

backend_test!(karcher_three_symmetric_models);

fn karcher_antipodal_models(bname: &str, backend: &dyn Backend) {
    // X1 = -2·X0: the mean of the unit vectors is 0 (< tol), so the first direction is
    // taken; X1 is at θ = π from it, where U1 - cos θ·u = -U0 + U0 = 0 adds no tangent.
    // scale (|X0| + 2|X0|)/2 -> 1.5·X0
    let x0 = [1.0f32, -2.0, 2.0];
    let x1 = [-2.0f32, 4.0, -4.0];
    check(
        bname,
        backend,
        &[("x0", &x0), ("x1", &x1)],
        &karcher_recipe(2, ""),
        &[1.5, -3.0, 3.0],
        Tol::FIXTURE,
    );
}

backend_test!(karcher_antipodal_models);

fn karcher_zero_norm_input(bname: &str, backend: &dyn Backend) {
    // X0 = 0 has no direction and is left out of the mean, but still counts in the scale:
    // direction [3, 4]/5, scale (0 + 5)/2 = 2.5 -> [1.5, 2]
    check(
        bname,
        backend,
        &[("x0", &[0.0, 0.0, 0.0]), ("x1", &[3.0, 4.0, 0.0])],
        &karcher_recipe(2, ""),
        &[1.5, 2.0, 0.0],
        Tol::FIXTURE,
    );
    // every input zero: zeros
    check(
        bname,
        backend,
        &[("x0", &[0.0, 0.0]), ("x1", &[0.0, 0.0])],
        &karcher_recipe(2, ""),
        &[0.0, 0.0],
        Tol::EXACT,
    );
}

backend_test!(karcher_zero_norm_input);

// ---- NearSwap (§10.5) --------------------------------------------------------------------

fn nearswap_by_distance(bname: &str, backend: &dyn Backend) {
    // base [1, 1, 1, 1, 1], x = [1.5, 3, -3, 1, 0.9]: |base - x| = [0.5, 2, 4, 0, 0.1]
    // t = 1: w = clamp(1/|diff|, 0, 1) = [1, 0.5, 0.25, 1 (0 -> 1e-6), 1]
    //   out = w·x + (1 - w)·base = [1.5, 2, 0.25·(-3) + 0.75 = 0, 1, 0.9]
    //   (with the roles swapped e2 would be -2)
    let base = [1.0f32; 5];
    let x = [1.5f32, 3.0, -3.0, 1.0, 0.9];
    let r = |t: &str| {
        format!("merge_method: nearswap\nbase_model: base\nmodels:\n  - model: x\nparameters: {{t: {t}}}\n")
    };
    let m: [(&str, &[f32]); 2] = [("base", &base), ("x", &x)];
    check(
        bname,
        backend,
        &m,
        &r("1.0"),
        &[1.5, 2.0, 0.0, 1.0, 0.9],
        Tol::FIXTURE,
    );
    // t = 0.5: w = [1, 0.25, 0.125, 1, 1] -> [1.5, 0.75 + 0.75 = 1.5, 0.875 - 0.375 = 0.5, 1, 0.9]
    check(
        bname,
        backend,
        &m,
        &r("0.5"),
        &[1.5, 1.5, 0.5, 1.0, 0.9],
        Tol::FIXTURE,
    );
    // t = 0: w = 0 everywhere -> the base
    check(bname, backend, &m, &r("0.0"), &f64s(&base), Tol::EXACT);
}

backend_test!(nearswap_by_distance);

// ---- edge cases --------------------------------------------------------------------------

fn slerp_parallel_and_antiparallel_take_the_linear_branch(bname: &str, backend: &dyn Backend) {
    let v0 = [1.0f32, 2.0, -3.0, 0.5];
    // parallel, v1 = 2·v0: cos 1 -> 0.75·v0 + 0.25·v1 = 1.25·v0
    let v1: Vec<f32> = v0.iter().map(|x| 2.0 * x).collect();
    check(
        bname,
        backend,
        &[("v0", &v0), ("v1", &v1)],
        &slerp_recipe("0.25"),
        &v0.iter().map(|x| 1.25 * *x as f64).collect::<Vec<_>>(),
        Tol::FIXTURE,
    );
    // antiparallel, v1 = -2·v0: cos -1 -> 0.75·v0 - 0.5·v0 = 0.25·v0
    let v1: Vec<f32> = v0.iter().map(|x| -2.0 * x).collect();
    check(
        bname,
        backend,
        &[("v0", &v0), ("v1", &v1)],
        &slerp_recipe("0.25"),
        &v0.iter().map(|x| 0.25 * *x as f64).collect::<Vec<_>>(),
        Tol::FIXTURE,
    );
}

backend_test!(slerp_parallel_and_antiparallel_take_the_linear_branch);

fn slerp_zero_vectors(bname: &str, backend: &dyn Backend) {
    // v0 = 0: its norm (0 <= eps) is taken as 1, so its unit vector is 0 and cos = 0: the
    // spherical branch with θ = π/2 gives sin(t·π/2)·v1; t = 1/3 -> v1/2
    let v1 = [2.0f32, -4.0, 6.0, 0.0];
    check(
        bname,
        backend,
        &[("v0", &[0.0; 4]), ("v1", &v1)],
        &slerp_recipe("0.3333333333333333"),
        &[1.0, -2.0, 3.0, 0.0],
        Tol::FIXTURE,
    );
    // both zero: zeros
    check(
        bname,
        backend,
        &[("v0", &[0.0; 3]), ("v1", &[0.0; 3])],
        &slerp_recipe("0.5"),
        &[0.0; 3],
        Tol::EXACT,
    );
}

backend_test!(slerp_zero_vectors);

fn multislerp_antipodal_inputs(bname: &str, backend: &dyn Backend) {
    // V1 = -2·V0: the unit vectors cancel, m = 0 (< eps) -> with two models mergekit falls
    // back to the linear combination 0.5·V0 + 0.5·V1 = -0.5·V0
    let v0 = [1.0f32, 2.0, 2.0];
    let v1 = [-2.0f32, -4.0, -4.0];
    check(
        bname,
        backend,
        &[("x0", &v0), ("x1", &v1)],
        &multislerp_recipe(false, &["1.0", "1.0"], ""),
        &[-0.5, -1.0, -1.0],
        Tol::FIXTURE,
    );
    // the same norms (V1 = -V0): 0
    let v1 = [-1.0f32, -2.0, -2.0];
    check(
        bname,
        backend,
        &[("x0", &v0), ("x1", &v1)],
        &multislerp_recipe(false, &["1.0", "1.0"], ""),
        &[0.0, 0.0, 0.0],
        Tol::FIXTURE,
    );
    // three models whose weighted unit vectors cancel have no fallback: an error naming the
    // tensor, not NaN
    let tmp = tempfile::tempdir().unwrap();
    for (m, v) in [
        ("x0", &v0[..]),
        ("x1", &v1[..]),
        ("x2", &[0.0, 1.0, 0.0][..]),
    ] {
        write_vec_model(&tmp.path().join(m), v);
    }
    let plan = plan_text(
        tmp.path(),
        &multislerp_recipe(false, &["1.0", "1.0", "0.0"], ""),
        None,
    );
    let task = &plan.tasks[0];
    let mut out = vec![0u8; task.out_bytes() as usize];
    let r = smelt::exec::merge_tensor(&plan, backend, task, &mut out);
    let msg = r
        .expect_err("cancelling unit vectors must fail")
        .to_string();
    assert!(
        msg.contains("tensor w") && msg.contains("zero"),
        "{bname}: {msg}"
    );
}

backend_test!(multislerp_antipodal_inputs);

fn multislerp_nearly_antipodal_inputs(bname: &str, backend: &dyn Backend) {
    // V0 = [1, 0], V1 = [-1, y]: m = (U0 + U1)/2 ≈ [0, y/2].
    // y = 2e-9: |m| = 1e-9 < eps = 1e-8 -> the linear fallback: (V0 + V1)/2 = [0, 1e-9]
    check(
        bname,
        backend,
        &[("x0", &[1.0, 0.0]), ("x1", &[-1.0, 2e-9])],
        &multislerp_recipe(false, &["1.0", "1.0"], ""),
        &[0.0, 1e-9],
        Tol::abs_rel(1e-15, 1e-6),
    );
    // y = 1e-3: |m| = 5e-4 -> spherical: m̂ = [sin a, cos a] with tan a = (1 - 1/|V1|)/y ≈ 5e-4,
    // the tangents cancel, the norm is (1 + |V1|)/2 ≈ 1: ≈ [5e-4, 1]. The first element is
    // ill-conditioned (mergekit gives 4.77e-4 in float32 and 5.00e-4 in float64), so it
    // only has to be within 5e-5 of 5e-4, not ±1e-3 of garbage from cancelling terms.
    let y = 1e-3f32 as f64;
    let n1 = (1.0 + y * y).sqrt();
    let a = ((1.0 - 1.0 / n1) / (y / n1)).atan();
    let scale = (1.0 + n1) / 2.0;
    check(
        bname,
        backend,
        &[("x0", &[1.0, 0.0]), ("x1", &[-1.0, 1e-3])],
        &multislerp_recipe(false, &["1.0", "1.0"], ""),
        &[scale * a.sin(), scale * a.cos()],
        Tol::abs_rel(5e-5, 1e-6),
    );
}

backend_test!(multislerp_nearly_antipodal_inputs);

// A fine-tune identical to the base (zero delta) next to one with delta [1, -2, 0.5, 0]:
// the zero delta never agrees in a sign election and carries no weight, so every method
// that elects gives the other fine-tune (base where its delta is 0 too); no NaN anywhere.
const ZD_BASE: [f32; 4] = [1.0, 2.0, 3.0, 4.0];
const ZD_X: [f32; 4] = [2.0, 0.0, 3.5, 4.0];

fn zero_delta_models() -> [(&'static str, &'static [f32]); 3] {
    [("base", &ZD_BASE), ("same", &ZD_BASE), ("x", &ZD_X)]
}

fn zero_deltas_in_elections(bname: &str, backend: &dyn Backend) {
    // ties / della: the zero delta is trimmed or dropped at random, the L1 rescale of an all-zero
    // delta is skipped (norm < 1e-7); x, kept whole (density 1), wins every element alone
    for (method, extra) in [
        ("ties", ""),
        ("della", ", epsilon: 0.1"),
        ("della_linear", ", epsilon: 0.1"),
    ] {
        let r = format!(
            "merge_method: {method}\nbase_model: base\nmodels:\n  - {{model: same, parameters: {{weight: 1.0, density: 0.5{extra}}}}}\n  - {{model: x, parameters: {{weight: 1.0, density: 1.0{extra}}}}}\n"
        );
        check(
            bname,
            backend,
            &zero_delta_models(),
            &r,
            &f64s(&ZD_X),
            Tol::FIXTURE,
        );
    }
    // sce, select_topk 1: weights = mean squares [0, (1 + 4 + 0.25)/4] -> [0, 1]; x alone
    let sce = "merge_method: sce\nbase_model: base\nmodels:\n  - model: same\n  - model: x\n";
    check(
        bname,
        backend,
        &zero_delta_models(),
        sce,
        &f64s(&ZD_X),
        Tol::FIXTURE,
    );
    // select_topk 0.5: variances d²/4 = [0.25, 1, 0.0625, 0], 3 nonzero -> k = int(1.5) = 1:
    // only e1 (delta -2) survives -> base + [0, -2, 0, 0]
    check(
        bname,
        backend,
        &zero_delta_models(),
        &format!("{sce}parameters: {{select_topk: 0.5}}\n"),
        &[1.0, 0.0, 3.0, 4.0],
        Tol::FIXTURE,
    );
}

backend_test!(zero_deltas_in_elections);

fn model_stock_degenerate_angles(bname: &str, backend: &dyn Backend) {
    // zero delta: cos = 0/max(0, 1e-6) = 0 -> t = 0 -> the base
    check(
        bname,
        backend,
        &zero_delta_models(),
        &ms_recipe_named(&["same", "x"]),
        &f64s(&ZD_BASE),
        Tol::EXACT,
    );
    // every fine-tune equal to the base: the base
    check(
        bname,
        backend,
        &[("base", &ZD_BASE), ("same", &ZD_BASE), ("x", &ZD_BASE)],
        &ms_recipe_named(&["same", "x"]),
        &f64s(&ZD_BASE),
        Tol::EXACT,
    );
    // antiparallel deltas, d1 = -d0: cos -1, 1 + (2 - 1)·cos = 0 -> singular: t = 0, the base
    check(
        bname,
        backend,
        &[
            ("base", &ZD_BASE),
            ("same", &[0.0, 4.0, 2.5, 4.0]),
            ("x", &ZD_X),
        ],
        &ms_recipe_named(&["same", "x"]),
        &f64s(&ZD_BASE),
        Tol::EXACT,
    );
}

backend_test!(model_stock_degenerate_angles);

fn ms_recipe_named(models: &[&str]) -> String {
    let mut r = String::from("merge_method: model_stock\nbase_model: base\nmodels:\n");
    for m in models {
        r.push_str(&format!("  - model: {m}\n"));
    }
    r
}

fn sce_when_every_variance_is_zero(bname: &str, backend: &dyn Backend) {
    // Two fine-tunes equal to each other (delta [1, -2, 0.5, 0]): every variance is 0, so
    // select_topk 0.5 keeps int(0 · 0.5) = 0 elements -> the base
    let m: [(&str, &[f32]); 3] = [("base", &ZD_BASE), ("x0", &ZD_X), ("x1", &ZD_X)];
    let r = "merge_method: sce\nbase_model: base\nmodels:\n  - model: x0\n  - model: x1\n";
    check(
        bname,
        backend,
        &m,
        &format!("{r}parameters: {{select_topk: 0.5}}\n"),
        &f64s(&ZD_BASE),
        Tol::EXACT,
    );
    // without selection both agree wherever the delta is nonzero: (c·d + c·d)/(2c) = d -> x
    check(bname, backend, &m, r, &f64s(&ZD_X), Tol::FIXTURE);
}

backend_test!(sce_when_every_variance_is_zero);

fn one_model(bname: &str, backend: &dyn Backend) {
    let x = [2.0f32, -1.0, 0.5, 3.0];
    // multislerp and karcher return a single model as it is (multislerp even with a base: it
    // returns the model, not base + anything)
    check(
        bname,
        backend,
        &[("x0", &x)],
        &multislerp_recipe(false, &["0.3"], ""),
        &f64s(&x),
        Tol::EXACT,
    );
    check(
        bname,
        backend,
        &[("base", &ZD_BASE), ("x0", &x)],
        &multislerp_recipe(true, &["0.3"], ""),
        &f64s(&x),
        Tol::EXACT,
    );
    check(
        bname,
        backend,
        &[("x0", &x)],
        &karcher_recipe(1, ""),
        &f64s(&x),
        Tol::EXACT,
    );
    // sce with one model, select_topk 1: its own sign always wins, weight c/c -> x
    let sce = "merge_method: sce\nbase_model: base\nmodels:\n  - model: x0\n";
    let m: [(&str, &[f32]); 2] = [("base", &ZD_BASE), ("x0", &x)];
    check(bname, backend, &m, sce, &f64s(&x), Tol::FIXTURE);
    // select_topk 0.5: the variance over one model is 0 everywhere -> k = 0 -> the base
    check(
        bname,
        backend,
        &m,
        &format!("{sce}parameters: {{select_topk: 0.5}}\n"),
        &f64s(&ZD_BASE),
        Tol::EXACT,
    );
    // della / della_linear with one model kept whole: x (its random keep is tested above)
    for method in ["della", "della_linear"] {
        let r = format!(
            "merge_method: {method}\nbase_model: base\nmodels:\n  - {{model: x0, parameters: {{weight: 0.5, density: 1.0}}}}\n"
        );
        // della: (0.5·d)/0.5 = d; della_linear: base + 0.5·d
        let want = if method == "della" {
            f64s(&x)
        } else {
            (0..4)
                .map(|i| ZD_BASE[i] as f64 + 0.5 * (x[i] - ZD_BASE[i]) as f64)
                .collect()
        };
        check(bname, backend, &m, &r, &want, Tol::FIXTURE);
    }
}

backend_test!(one_model);
