//! OPCM continual merging one model at a time (`smelt continual` and the state file an OPCM
//! merge leaves): folding models in separate steps gives the reference's weights and the
//! same weights and state as one recipe with all of them; the state's norms are the task
//! vectors' norms; each step opens only the base, the previous merge and the new model.

use std::path::{Path, PathBuf};

use crate::common::*;
use smelt::methods::opcm::STATE_NAME;
use smelt::workflows::continual::continual_plan;

/// The fixture README's bound: |got − expected| ≤ 1e-6 + 1e-5·|expected|.
const REF_TOL: Tol = Tol::abs_rel(1e-6, 1e-5);

fn models() -> PathBuf {
    root().join("tests/fixtures/reference/models")
}

fn opcm_recipe(names: &[&str]) -> String {
    let mut r = format!(
        "merge_method: opcm\nbase_model: {}\nmodels:\n",
        models().join("base").display()
    );
    for n in names {
        r += &format!("  - model: {}\n", models().join(n).display());
    }
    r
}

fn state(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(STATE_NAME)).unwrap()).unwrap()
}

fn norm_of_task_vector(name: &str) -> f64 {
    let b = load_dir(&models().join("base"));
    let m = load_dir(&models().join(name));
    b.iter()
        .map(|(n, t)| {
            t.data
                .iter()
                .zip(&m[n].data)
                .map(|(x, y)| ((y - x) as f64).powi(2))
                .sum::<f64>()
        })
        .sum::<f64>()
        .sqrt()
}

fn folding_one_at_a_time_equals_one_recipe_and_the_reference(bname: &str, backend: &dyn Backend) {
    let expected =
        load_st(&root().join("tests/fixtures/reference/cases/opcm/expected.safetensors"));
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // all three in one recipe
    let all = plan_text(d, &opcm_recipe(&["ft1", "ft2", "ft3"]), None);
    execute_to(&all, backend, &d.join("m123"), u64::MAX);
    // ft1 + ft2 in a recipe, then ft3 folded in
    let two = plan_text(d, &opcm_recipe(&["ft1", "ft2"]), None);
    execute_to(&two, backend, &d.join("m12"), u64::MAX);
    let step = continual_plan(&d.join("m12"), &models().join("ft3"), None, None, None).unwrap();
    assert_eq!(
        step.models.len(),
        3,
        "{bname}: base, the merge and the new model only"
    );
    execute_to(&step, backend, &d.join("c123"), u64::MAX);
    // from ft1 alone: two continual steps
    let s1 = continual_plan(
        &models().join("ft1"),
        &models().join("ft2"),
        Some(&models().join("base")),
        None,
        None,
    )
    .unwrap();
    execute_to(&s1, backend, &d.join("s12"), u64::MAX);
    let s2 = continual_plan(&d.join("s12"), &models().join("ft3"), None, None, None).unwrap();
    assert_eq!(s2.models.len(), 3);
    execute_to(&s2, backend, &d.join("s123"), u64::MAX);

    let one = load_dir(&d.join("m123"));
    for out in ["c123", "s123"] {
        let got = load_dir(&d.join(out));
        assert_eq!(got.len(), 30);
        for (n, e) in &expected {
            assert_close(
                &format!("{bname} {out}: {n}"),
                &got[n].data,
                &e.data,
                e.dtype,
                REF_TOL,
            );
            // the intermediate merge is stored in f32, as the recipe keeps it: the
            // steps differ from the one recipe only by the SVDs of the stored merge
            assert_close(
                &format!("{bname} {out} vs one recipe: {n}"),
                &got[n].data,
                &one[n].data,
                e.dtype,
                Tol::abs_rel(1e-6, 1e-5),
            );
        }
        let (a, b) = (state(&d.join("m123")), state(&d.join(out)));
        let lam = |s: &serde_json::Value| s["lambda"].as_f64().unwrap();
        assert!(
            (lam(&a) - lam(&b)).abs() < 1e-6 * lam(&a),
            "{bname} {out}: λ {a} vs {b}"
        );
        let norms = |s: &serde_json::Value| -> Vec<f64> {
            s["norms"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let want: Vec<f64> = ["ft1", "ft2", "ft3"]
            .iter()
            .map(|m| norm_of_task_vector(m))
            .collect();
        for (g, w) in norms(&b).iter().zip(&want) {
            assert!(
                (g - w).abs() < 1e-6 * w,
                "{bname} {out}: norms {:?} vs {want:?}",
                norms(&b)
            );
        }
        assert_eq!(norms(&b).len(), 3);
        let listed: Vec<&str> = b["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["path"].as_str().unwrap())
            .collect();
        assert_eq!(listed.len(), 3, "{bname} {out}: {listed:?}");
        assert!(
            listed[2].ends_with("ft3") && listed[1].ends_with("ft2"),
            "{listed:?}"
        );
    }
}

backend_test!(folding_one_at_a_time_equals_one_recipe_and_the_reference);

#[test]
fn a_single_model_state_starts_at_lambda_one() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = plan_text(tmp.path(), &opcm_recipe(&["ft2"]), None);
    execute_to(
        &plan,
        &smelt::backend::cpu::Cpu::new(),
        &tmp.path().join("m"),
        u64::MAX,
    );
    let s = state(&tmp.path().join("m"));
    assert_eq!(s["lambda"].as_f64(), Some(1.0));
    let n = s["norms"][0].as_f64().unwrap();
    let want = norm_of_task_vector("ft2");
    assert!((n - want).abs() < 1e-6 * want, "{n} vs {want}");
}

#[test]
fn errors_name_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let cpu = smelt::backend::cpu::Cpu::new();
    let err = |r: smelt::Result<smelt::plan::Plan>| match r {
        Ok(_) => panic!("planned a continual step that should fail"),
        Err(e) => e.to_string(),
    };
    // no state, no base
    let e = err(continual_plan(
        &models().join("ft1"),
        &models().join("ft2"),
        None,
        None,
        None,
    ));
    assert!(e.contains(STATE_NAME) && e.contains("--base"), "{e}");
    let plan = plan_text(d, &opcm_recipe(&["ft1", "ft2"]), None);
    execute_to(&plan, &cpu, &d.join("m"), u64::MAX);
    // another base than the state's
    let e = err(continual_plan(
        &d.join("m"),
        &models().join("ft3"),
        Some(&models().join("ft2")),
        None,
        None,
    ));
    assert!(e.contains("is not the base") && e.contains("digest"), "{e}");
    // a damaged state file
    let sp = d.join("m").join(STATE_NAME);
    let text = std::fs::read_to_string(&sp).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["lambda"] = serde_json::json!("fast");
    std::fs::write(&sp, v.to_string()).unwrap();
    let e = err(continual_plan(
        &d.join("m"),
        &models().join("ft3"),
        None,
        None,
        None,
    ));
    assert!(e.contains("lambda") && e.contains(STATE_NAME), "{e}");
    v["lambda"] = serde_json::json!(1.0);
    v["version"] = serde_json::json!(9);
    std::fs::write(&sp, v.to_string()).unwrap();
    let e = err(continual_plan(
        &d.join("m"),
        &models().join("ft3"),
        None,
        None,
        None,
    ));
    assert!(e.contains("version"), "{e}");
}

#[test]
fn cli_continual_writes_a_verifiable_folder_with_its_state() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let r = d.join("r.yml");
    std::fs::write(&r, opcm_recipe(&["ft1", "ft2"])).unwrap();
    let o = run_merge(&r, &d.join("m12"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = smelt()
        .arg("continual")
        .arg(d.join("m12"))
        .arg(models().join("ft3"))
        .arg("-o")
        .arg(d.join("m123"))
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("3 models merged so far"), "{text}");
    assert!(d.join("m123").join(STATE_NAME).is_file());
    let v = smelt().arg("verify").arg(d.join("m123")).output().unwrap();
    assert!(v.status.success(), "{}", stderr(&v));
    // the first model without --base: refused, non-zero, nothing written
    let o = smelt()
        .arg("continual")
        .arg(models().join("ft1"))
        .arg(models().join("ft3"))
        .arg("-o")
        .arg(d.join("x"))
        .args(["--device", "cpu"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--base"), "{}", stderr(&o));
    assert!(!d.join("x").exists());
}
