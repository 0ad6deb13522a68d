//! Tests driven by the method registry (`smelt::methods::all()`): every method smelt lists,
//! including one added tomorrow without a line here, is held to the same contract on every
//! backend. A generic recipe is built from the method's own description (base policy, model
//! counts, required parameters, side inputs) over the bundled tiny models, and the merge must
//! be deterministic, keep every tensor's shape, stay finite, and agree with the CPU's merge.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::*;
use smelt::methods::{self, BasePolicy, Default, Kind, MethodInfo};

/// The models the generic recipes merge, in order (the base is `base`).
const MODELS: [&str; 3] = ["math", "code", "chat"];

/// A recipe for `m` over the tiny models, from its registry entry alone: the base
/// when the method takes one, as many models as it accepts (up to three), and every required
/// parameter set (numbers 0.5, booleans true).
fn generic_recipe(m: &MethodInfo) -> String {
    let base = matches!(m.base, BasePolicy::Required | BasePolicy::Optional);
    let (lo, hi) = m.models;
    let count = 2usize.max(lo).min(hi.unwrap_or(MODELS.len()));
    let mut r = format!("merge_method: {}\n", m.name);
    if base {
        r.push_str("base_model: base\n");
    }
    r.push_str("models:\n");
    for name in &MODELS[..count] {
        r.push_str(&format!("  - model: {name}\n"));
    }
    let required: Vec<_> = m
        .params
        .iter()
        .filter(|p| p.default == Default::Required)
        .collect();
    if !required.is_empty() {
        r.push_str("parameters:\n");
        for p in required {
            let v = match p.kind {
                Kind::Float => "0.5",
                Kind::Bool => "true",
            };
            // a per-model parameter set at the top applies to every model (mergekit's rule)
            r.push_str(&format!("  {}: {v}\n", p.name));
        }
    }
    r.push_str("out_dtype: float32\nseed: 7\n");
    r
}

/// The tiny models copied into `dir`, each with the method's side file (e.g. a diagonal
/// Fisher) when it reads one: the same tensors, valued |x| + 0.25.
fn tiny_models(dir: &Path, m: &MethodInfo) {
    let assets = root().join("assets/models");
    for name in std::iter::once("base").chain(MODELS) {
        copy_dir(&assets.join(name), &dir.join(name));
        if let Some(side) = m.imp.side_input() {
            let t = load_dir(&dir.join(name));
            let side_t: Vec<(String, T)> = t
                .iter()
                .map(|(n, x)| {
                    let data = x.data.iter().map(|v| v.abs() + 0.25).collect();
                    (n.clone(), T::f32(&x.shape, data))
                })
                .collect();
            let refs: Vec<(&str, &T)> = side_t.iter().map(|(n, t)| (n.as_str(), t)).collect();
            write_st(&dir.join(name).join(side.file), &refs);
        }
    }
}

/// Every registered method's generic merge on `backend`.
fn merge_all(backend: &dyn Backend) -> BTreeMap<&'static str, BTreeMap<String, T>> {
    methods::all()
        .iter()
        .map(|m| {
            let tmp = tempfile::tempdir().unwrap();
            tiny_models(tmp.path(), m);
            let plan = plan_text(tmp.path(), &generic_recipe(m), None);
            (m.name, merge_plan(&plan, backend))
        })
        .collect()
}

#[test]
fn every_registered_method_has_a_generic_recipe_that_plans() {
    assert!(
        methods::all().len() >= 20,
        "the registry lists every method"
    );
    for m in methods::all() {
        let tmp = tempfile::tempdir().unwrap();
        tiny_models(tmp.path(), m);
        let text = generic_recipe(m);
        let p = tmp.path().join("recipe.yml");
        std::fs::write(&p, &text).unwrap();
        let r = smelt::recipe::Recipe::load(&p).unwrap_or_else(|e| panic!("{text}\n{e}"));
        let plan = smelt::plan::Plan::build(r, None).unwrap_or_else(|e| panic!("{text}\n{e}"));
        assert!(std::ptr::eq(plan.method, m), "{}", m.name);
        assert!(plan.tasks.iter().any(|t| !t.copy_only), "{}", m.name);
    }
}

/// The contract, on one backend: twice the same values, the base's shapes, finite values,
/// and (on the GPU) the CPU's values within 1e-6 + 1e-5·|x| (f32 output; the GPU reassociates
/// some sums, and its matrix products feed TSV-M's and OPCM's SVDs).
fn registered_methods_keep_the_contract(bname: &str, backend: &dyn Backend) {
    let base = load_st(&root().join("assets/models/base/model.safetensors"));
    let got = merge_all(backend);
    let again = merge_all(backend);
    let cpu = (bname != "cpu").then(|| merge_all(&smelt::backend::cpu::Cpu::new()));
    for m in methods::all() {
        let out = &got[m.name];
        assert_eq!(
            out.keys().collect::<Vec<_>>(),
            base.keys().collect::<Vec<_>>(),
            "{bname}: {} writes the base's tensors",
            m.name
        );
        for (name, t) in out {
            let what = format!("{bname}: {} {name}", m.name);
            assert_eq!(t.shape, base[name].shape, "{what}: shape");
            assert!(t.data.iter().all(|x| x.is_finite()), "{what}: not finite");
            assert_close(
                &format!("{what} (second run)"),
                &t.data,
                &again[m.name][name].data,
                t.dtype,
                Tol::EXACT,
            );
            if let Some(cpu) = &cpu {
                let tol = Tol::abs_rel(1e-6, 1e-5);
                assert_close(
                    &format!("{what} vs cpu"),
                    &t.data,
                    &cpu[m.name][name].data,
                    t.dtype,
                    tol,
                );
            }
        }
    }
}

backend_test!(registered_methods_keep_the_contract);
