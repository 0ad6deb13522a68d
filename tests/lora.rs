//! LoRA adapters against the PEFT 0.21.2 fixtures in tests/fixtures/peft (see its README):
//! applying (`merge_and_unload`), merging (`add_weighted_adapter`) and extracting, on every
//! backend.

mod common;

use std::path::PathBuf;

use common::*;
use smelt::dtype::DType;

fn peft() -> PathBuf {
    root().join("tests/fixtures/peft")
}

fn p(name: &str) -> String {
    peft().join(name).display().to_string()
}

/// `model: BASE+ADAPTER` through passthrough equals PEFT's merge_and_unload, on every
/// backend, for every apply fixture (plain, other scale, other rank and targets, rsLoRA,
/// embeddings with base_layer copies, rank/alpha patterns, modules_to_save).
#[test]
fn recipe_base_plus_adapter_matches_merge_and_unload() {
    let tmp = tempfile::tempdir().unwrap();
    let base = load_st(&peft().join("base/model.safetensors"));
    for case in ["a", "b", "c", "rs", "embed", "pattern", "mts"] {
        let expected = load_st(&peft().join(format!("apply_lora_{case}/model.safetensors")));
        let recipe = format!(
            "merge_method: passthrough\nmodels:\n  - model: {}+{}\n",
            p("base"),
            p(&format!("lora_{case}"))
        );
        let plan = plan_text(tmp.path(), &recipe, None);
        assert_eq!(plan.tasks.len(), expected.len(), "{case}: tensor count");
        let mut changed = 0;
        for (bname, backend) in backends() {
            let got = merge_plan(&plan, backend.as_ref());
            for (name, e) in &expected {
                let g = &got[name];
                assert_eq!(g.shape, e.shape, "{case} {name}");
                assert_eq!(g.dtype, DType::F32);
                // PEFT: f32 matmul, ×s, + W; smelt's CPU product is f64 rounded once.
                assert_close(
                    &format!("lora_{case} on {bname}: {name}"),
                    &g.data,
                    &e.data,
                    DType::F32,
                    Tol::FIXTURE,
                );
                if bname == "cpu" && g.data != base[name].data {
                    changed += 1;
                }
            }
        }
        assert!(changed > 0, "{case}: the adapter changed nothing");
    }
}

/// The expected-error fixture: an adapter made for hidden size 24 on a hidden-16 base.
#[test]
fn adapter_for_another_base_is_refused_naming_module_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = format!(
        "merge_method: passthrough\nmodels:\n  - model: {}+{}\n",
        p("base"),
        p("lora_other")
    );
    std::fs::write(tmp.path().join("r.yml"), recipe).unwrap();
    let r = smelt::recipe::Recipe::load(&tmp.path().join("r.yml")).unwrap();
    let e = smelt::plan::Plan::build(r, None)
        .err()
        .expect("must fail")
        .to_string();
    assert!(e.contains("q_proj"), "{e}");
    assert!(e.contains("[4, 24]"), "{e}");
    assert!(e.contains("[16, 16]"), "{e}");
}

/// `smelt lora apply` writes a normal output folder equal to merge_and_unload; a mismatched
/// adapter exits non-zero, names the module, and leaves no output folder behind.
#[test]
fn cli_apply_writes_model_and_refuses_mismatch() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("applied");
    let o = smelt()
        .args(["lora", "apply", &p("base"), &p("lora_embed"), "-o"])
        .arg(&out)
        .args(cpu_args())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let got = load_dir(&out);
    let expected = load_st(&peft().join("apply_lora_embed/model.safetensors"));
    assert_eq!(got.len(), expected.len());
    for (name, e) in &expected {
        assert_close(name, &got[name].data, &e.data, DType::F32, Tol::FIXTURE);
    }
    assert!(out.join("config.json").is_file());
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("lora_embed"), "{card}");

    let bad = tmp.path().join("bad");
    let o = smelt()
        .args(["lora", "apply", &p("base"), &p("lora_other"), "-o"])
        .arg(&bad)
        .args(cpu_args())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("model.layers.0.self_attn.q_proj") && e.contains("[4, 24]"),
        "{e}"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(left, vec!["applied".to_string()], "{left:?}");

    // Not an adapter folder at all.
    let o = smelt()
        .args(["lora", "apply", &p("base"), &p("base"), "-o"])
        .arg(tmp.path().join("x"))
        .args(cpu_args())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("adapter_config.json"), "{}", stderr(&o));
}
