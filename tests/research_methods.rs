//! The research methods beyond mergekit (LiNeS, TSV-M, Fisher, ...) against the outputs of
//! their authors' code (tests/fixtures/reference, see its README), small hand-computed
//! cases, and their defining properties. Every math test runs on every backend.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;

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

/// Merges `recipe` on every backend and compares all 30 tensors with the fixture case.
fn ref_case(case: &str, recipe: &str, tol: Tol) {
    let exp = ref_expected(case);
    for (bname, backend) in backends() {
        let tmp = tempfile::tempdir().unwrap();
        let got = merge_text(tmp.path(), recipe, backend.as_ref());
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

#[test]
fn lines_fixture_task_arithmetic() {
    // α unset: 1/T = 1/3, the reference's computed α for task arithmetic
    let r = ref_recipe(
        "task_arithmetic",
        Some("base"),
        &["ft1", "ft2", "ft3"],
        "parameters:\n  weight: 1.0\n  lines_beta: 0.5\n",
    );
    ref_case("lines", &r, REF_TOL);
}

#[test]
fn lines_hand_computed_scales() {
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
    for (bname, backend) in backends() {
        let got = merge_text(d, recipe, backend.as_ref());
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
}

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
