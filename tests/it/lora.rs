//! LoRA adapters against the PEFT 0.21.2 fixtures in tests/fixtures/peft (see its README):
//! applying (`merge_and_unload`), merging (`add_weighted_adapter`) and extracting, on every
//! backend.

use std::path::PathBuf;

use crate::common::*;
use smelt::dtype::DType;

fn peft() -> PathBuf {
    root().join("tests/fixtures/peft")
}

/// `smelt lora ARGS -o OUT` on the CPU.
fn lora_cli(args: &[&str], out: impl AsRef<std::ffi::OsStr>) -> std::process::Output {
    smelt()
        .arg("lora")
        .args(args)
        .arg("-o")
        .arg(out)
        .args(cpu_args())
        .output()
        .unwrap()
}

fn p(name: &str) -> String {
    peft().join(name).display().to_string()
}

/// `model: BASE+ADAPTER` through passthrough equals PEFT's merge_and_unload, on every
/// backend, for every apply fixture (plain, other scale, other rank and targets, rsLoRA,
/// embeddings with base_layer copies, rank/alpha patterns, modules_to_save).
fn recipe_base_plus_adapter_matches_merge_and_unload(bname: &str, backend: &dyn Backend) {
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
        let got = merge_plan(&plan, backend);
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
        // counted on the CPU only, as before the per-backend split
        if bname == "cpu" {
            assert!(changed > 0, "{case}: the adapter changed nothing");
        }
    }
}

backend_test!(recipe_base_plus_adapter_matches_merge_and_unload);

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
    let o = lora_cli(&["apply", &p("base"), &p("lora_embed")], &out);
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
    let o = lora_cli(&["apply", &p("base"), &p("lora_other")], &bad);
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
    let o = lora_cli(&["apply", &p("base"), &p("base")], tmp.path().join("x"));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("adapter_config.json"), "{}", stderr(&o));
}

// ---- lora merge ---------------------------------------------------------------------------

use smelt::lora::merge::{self, Combination, MajoritySign, MergeOptions, Part};
use smelt::lora::Adapter;

fn manifest() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(peft().join("manifest.json")).unwrap()).unwrap()
}

fn open_adapter(name: &str) -> Adapter {
    Adapter::open(&peft().join(name), name).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The options of a merge fixture, from manifest.json's recorded call.
#[allow(clippy::type_complexity)]
fn fixture_call(
    case: &str,
) -> (
    Vec<String>,
    Combination,
    Vec<f64>,
    Option<f64>,
    MajoritySign,
    Option<usize>,
    Option<f64>,
) {
    let m = manifest();
    let call = &m["merges"][case]["add_weighted_adapter"];
    let names: Vec<String> = call["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let comb = Combination::from_name(call["combination_type"].as_str().unwrap()).unwrap();
    let weights = call["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let density = call.get("density").and_then(|d| d.as_f64());
    let maj = match call.get("majority_sign_method").and_then(|v| v.as_str()) {
        Some("frequency") => MajoritySign::Frequency,
        _ => MajoritySign::Total,
    };
    let svd_rank = call
        .get("svd_rank")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize);
    let svd_clamp = call.get("svd_clamp").and_then(|v| v.as_f64());
    (names, comb, weights, density, maj, svd_rank, svd_clamp)
}

/// Runs a fixture's merge on `backend`, with PEFT's stored DARE masks injected when `masks`.
fn run_fixture(
    case: &str,
    backend: &dyn smelt::backend::Backend,
    inject: bool,
) -> (merge::MergedAdapter, Vec<String>) {
    let (names, combination, weights, density, majority_sign, svd_rank, svd_clamp) =
        fixture_call(case);
    let adapters: Vec<Adapter> = names.iter().map(|n| open_adapter(n)).collect();
    let refs: Vec<&Adapter> = adapters.iter().collect();
    let mask_path = peft().join(case).join("masks.safetensors");
    // uint8 0/1 masks, one per factor (or ΔW) and adapter
    let stored = (inject && mask_path.exists())
        .then(|| smelt::io::safetensors::SafetensorsFile::open(&mask_path).unwrap());
    let lookup = |module: &str, part: Part, i: usize, n: usize| -> Option<Vec<bool>> {
        let f = stored.as_ref()?;
        let t = f.get(&format!("{module}.{}.{}", part.name(), names[i]))?;
        assert_eq!(t.dtype, DType::U8);
        let bytes = f.data(t);
        assert_eq!(bytes.len(), n, "mask size of {module}");
        Some(bytes.iter().map(|&x| x != 0).collect())
    };
    let merged = merge::merge(
        &refs,
        &MergeOptions {
            combination,
            weights,
            density,
            majority_sign,
            svd_rank,
            svd_clamp,
            seed: 7,
            masks: Some(&lookup),
        },
        backend,
    )
    .unwrap_or_else(|e| panic!("{case}: {e}"));
    (merged, names)
}

/// Every merge fixture: the merged ΔW (s'·B'·A', what PEFT applies) equals PEFT's
/// delta.safetensors; for the factor methods and cat, A' and B' equal PEFT's tensors too.
/// DARE fixtures run with PEFT's stored masks injected. All backends. (svd_clamp depends on
/// the SVD's signs: `svd_clamp_matches_peft` has its own comparison.)
fn merge_matches_add_weighted_adapter(bname: &str, backend: &dyn Backend) {
    let m = manifest();
    for (case, _) in m["merges"].as_object().unwrap() {
        if fixture_call(case).6.is_some() {
            continue;
        }
        let expected_delta = load_st(&peft().join(case).join("delta.safetensors"));
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(peft().join(case).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let (_, comb, ..) = fixture_call(case);
        let (merged, _) = run_fixture(case, backend, true);
        let what = format!("{case} on {bname}");
        assert_eq!(merged.config["r"], cfg["r"], "{what}: r");
        assert_eq!(
            merged.config["lora_alpha"], cfg["lora_alpha"],
            "{what}: lora_alpha"
        );
        assert_eq!(
            merged.config["use_rslora"], cfg["use_rslora"],
            "{what}: use_rslora"
        );
        let mut want_t: Vec<&str> = cfg["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let mut got_t: Vec<&str> = merged.config["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        want_t.sort();
        got_t.sort();
        assert_eq!(got_t, want_t, "{what}: target_modules");
        assert_eq!(
            merged.modules.len(),
            expected_delta.len(),
            "{what}: modules"
        );
        let svd = comb.is_svd() && !merged.modules.is_empty() && case != "merge_a_single_svd";
        let mut worst = 0f64;
        for module in &merged.modules {
            let d = merged.delta(module, backend).unwrap();
            let e = &expected_delta[&format!("{}.weight", module.name)];
            assert_eq!(vec![d.rows, d.cols], e.shape, "{what}: {}", module.name);
            let tol = if svd {
                Tol::abs_rel(2e-6, 1e-5)
            } else {
                Tol::FIXTURE
            };
            let c = compare(&d.data, &e.data, DType::F32, tol);
            worst = worst.max(c.max_abs_diff);
            assert_close(
                &format!("{what}: ΔW of {}", module.name),
                &d.data,
                &e.data,
                DType::F32,
                tol,
            );
        }
        if !svd {
            let got = merged.tensors();
            // PEFT's copies of the base's modules_to_save modules (merge_mts_a_cat):
            // equal to the base, and not written by smelt (the module loads as the base's)
            let base = load_st(&peft().join("base/model.safetensors"));
            let mut expected_ad = load_st(&peft().join(case).join("adapter_model.safetensors"));
            expected_ad.retain(|k, t| {
                let saved = !k.contains(".lora_") && !k.contains(".base_layer.");
                if saved {
                    let name = k.trim_start_matches("base_model.model.");
                    assert_eq!(t.data, base[name].data, "{what}: PEFT's {k} is the base's");
                }
                !saved
            });
            assert_eq!(got.len(), expected_ad.len(), "{what}: tensor count");
            for (k, shape, data) in got {
                let e = &expected_ad[&k];
                assert_eq!(shape, e.shape, "{what}: {k}");
                assert_close(
                    &format!("{what}: {k}"),
                    data,
                    &e.data,
                    DType::F32,
                    Tol::FIXTURE,
                );
            }
        }
        assert!(worst < 2e-6, "{what}: {worst:e}");
    }
}

backend_test!(merge_matches_add_weighted_adapter);

/// DARE with smelt's own random draws (PEFT's torch RNG cannot be matched): every element
/// of A' and B' is one of the 2^M sums of kept `w·x/density` terms, each adapter's recovered
/// keep-mask keeps a fraction within 4σ of the density, and over many seeds the mean of A'
/// and of B' tends to the `linear` merge's factors (E[mask/density] = 1).
#[test]
fn dare_linear_by_statistics() {
    let a = open_adapter("lora_a");
    let b = open_adapter("lora_b");
    let lin = load_st(&peft().join("merge_ab_linear/adapter_model.safetensors"));
    let cpu = smelt::backend::cpu::Cpu::new();
    let density = 0.5;
    let run = |seed: u64| {
        merge::merge(
            &[&a, &b],
            &MergeOptions {
                combination: Combination::DareLinear,
                weights: vec![0.7, 0.3],
                density: Some(density),
                majority_sign: MajoritySign::Total,
                svd_rank: None,
                svd_clamp: None,
                seed,
                masks: None,
            },
            &cpu,
        )
        .unwrap()
    };
    // Recover the masks of one draw.
    let m = run(1);
    let mut fractions = Vec::new();
    for module in &m.modules {
        for (part, got) in [("lora_A", &module.a), ("lora_B", &module.b)] {
            let key = |ad: &Adapter| {
                let lm = ad.module(&module.name).unwrap();
                (if part == "lora_A" { ad.a(lm) } else { ad.b(lm) }, lm.scale)
            };
            let (xa, sa) = key(&a);
            let (xb, sb) = key(&b);
            let (wa, wb) = ((0.7 * sa).sqrt() as f32, (0.3 * sb).sqrt() as f32);
            let (mut ka, mut kb) = (0usize, 0usize);
            for e in 0..got.data.len() {
                let ta = xa.data[e] * wa / density as f32;
                let tb = xb.data[e] * wb / density as f32;
                let options = [(0, 0, 0.0), (1, 0, ta), (0, 1, tb), (1, 1, ta + tb)];
                let (ia, ib, _) = options
                    .iter()
                    .copied()
                    .find(|(_, _, v)| (got.data[e] - v).abs() <= 1e-6 * (1.0 + v.abs()))
                    .unwrap_or_else(|| {
                        panic!(
                            "{} {part}[{e}] = {} is no sum of kept terms",
                            module.name, got.data[e]
                        )
                    });
                ka += ia;
                kb += ib;
            }
            let n = got.data.len() as f64;
            fractions.push(ka as f64 / n);
            fractions.push(kb as f64 / n);
        }
    }
    for f in &fractions {
        // ±4·√(p(1−p)/n) with n = 64
        assert!(
            (f - density).abs() <= 4.0 * (density * (1.0 - density) / 64.0).sqrt(),
            "{fractions:?}"
        );
    }
    let mean_all: f64 = fractions.iter().sum::<f64>() / fractions.len() as f64;
    assert!((mean_all - density).abs() < 0.05, "{mean_all}");

    // Expectation over seeds.
    let seeds = 1500;
    let mut sums: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for seed in 0..seeds {
        for (k, _, d) in run(seed).tensors() {
            let s = sums.entry(k).or_insert_with(|| vec![0.0; d.len()]);
            s.iter_mut().zip(d).for_each(|(s, x)| *s += *x as f64);
        }
    }
    for (k, s) in &sums {
        let l = &lin[k];
        // Var of one draw per element: Σ_i (w_i x_i)² (1/p − 1), w_i = √(w·s) of adapter i
        let module = k.trim_start_matches("base_model.model.");
        let (module, part_a) = match module.strip_suffix(".lora_A.weight") {
            Some(m) => (m, true),
            None => (module.strip_suffix(".lora_B.weight").unwrap(), false),
        };
        let mut var = vec![0f64; l.data.len()];
        for (ad, w) in [(&a, 0.7), (&b, 0.3)] {
            let lm = ad.module(module).unwrap();
            let x = if part_a { ad.a(lm) } else { ad.b(lm) };
            let wf = (w * lm.scale).sqrt();
            for (v, x) in var.iter_mut().zip(&x.data) {
                *v += (wf * *x as f64).powi(2) * (1.0 / density - 1.0);
            }
        }
        for (e, (s, x)) in s.iter().zip(&l.data).enumerate() {
            let mean = s / seeds as f64;
            let bound = 5.0 * (var[e] / seeds as f64).sqrt() + 1e-6;
            assert!(
                (mean - *x as f64).abs() <= bound,
                "{k}[{e}]: mean {mean} vs linear {x} (5σ = {bound})"
            );
        }
    }
}

/// PEFT's refusals, with smelt's clear messages: unequal ranks for the factor methods,
/// pruning without a density, weight count.
#[test]
fn merge_refuses_what_peft_refuses() {
    let a = open_adapter("lora_a");
    let c = open_adapter("lora_c");
    let cpu = smelt::backend::cpu::Cpu::new();
    let opts = |combination, density, weights: Vec<f64>| MergeOptions {
        combination,
        weights,
        density,
        majority_sign: MajoritySign::Total,
        svd_rank: None,
        svd_clamp: None,
        seed: 0,
        masks: None,
    };
    let e = merge::merge(
        &[&a, &c],
        &opts(Combination::Linear, None, vec![0.7, 0.3]),
        &cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("same rank") && e.contains("r=4") && e.contains("r=8"),
        "{e}"
    );
    let e = merge::merge(
        &[&a, &a],
        &opts(Combination::Ties, None, vec![0.7, 0.3]),
        &cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("--density"), "{e}");
    let e = merge::merge(&[&a, &c], &opts(Combination::Cat, None, vec![0.7]), &cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("1 weights for 2 adapters"), "{e}");
    // two adapters with a trained lm_head copy: PEFT's ValueError (manifest: errors)
    let mts = open_adapter("lora_mts");
    let e = merge::merge(
        &[&mts, &mts],
        &opts(Combination::Cat, None, vec![0.7, 0.3]),
        &cpu,
    )
    .err()
    .unwrap()
    .to_string();
    let peft_msg = manifest()["errors"]["mts_mts_shared_modules_to_save"]["message_first_line"]
        .as_str()
        .unwrap()
        .to_string();
    let core = peft_msg.split(", but found").next().unwrap();
    assert!(
        e.contains("module lm_head") && e.contains("modules_to_save") && e.contains(core),
        "{e}\nPEFT: {peft_msg}"
    );
}

/// `smelt lora merge` through the binary: the written folder holds PEFT's keys, shapes and
/// values (cat of a and c, with c-only up_proj zero-padded), a config with PEFT's r / alpha /
/// targets, and reads back as an adapter whose application equals base + PEFT's ΔW.
#[test]
fn cli_merge_writes_adapter_peft_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ac_cat");
    let o = lora_cli(
        &[
            "merge",
            &p("lora_a"),
            &p("lora_c"),
            "--method",
            "cat",
            "--weights",
            "0.7,0.3",
        ],
        &out,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = load_st(&out.join("adapter_model.safetensors"));
    let expected = load_st(&peft().join("merge_ac_cat/adapter_model.safetensors"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (k, e) in &expected {
        assert_eq!(got[k].shape, e.shape, "{k}");
        assert_close(k, &got[k].data, &e.data, DType::F32, Tol::FIXTURE);
    }
    let raw = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let hlen = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&raw[8..8 + hlen]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 12);
    assert_eq!(cfg["lora_alpha"], 12);
    let mut t: Vec<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    t.sort();
    assert_eq!(t, ["q_proj", "up_proj", "v_proj"]);
    // Every other field equals the config PEFT wrote for the same merge.
    let peft_cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(peft().join("merge_ac_cat/adapter_config.json")).unwrap(),
    )
    .unwrap();
    for (k, v) in peft_cfg.as_object().unwrap() {
        if k != "target_modules" {
            assert_eq!(&cfg[k], v, "adapter_config.json field {k}");
        }
    }
    assert_eq!(
        cfg.as_object().unwrap().len(),
        peft_cfg.as_object().unwrap().len()
    );

    // Applying the written adapter = base + PEFT's merged ΔW.
    let recipe = format!(
        "merge_method: passthrough\nmodels:\n  - model: {}+{}\n",
        p("base"),
        out.display()
    );
    let plan = plan_text(tmp.path(), &recipe, None);
    let applied = merge_plan(&plan, &smelt::backend::cpu::Cpu::new());
    let base = load_st(&peft().join("base/model.safetensors"));
    let delta = load_st(&peft().join("merge_ac_cat/delta.safetensors"));
    for (name, b) in &base {
        let want: Vec<f32> = match delta.get(name) {
            Some(d) => b.data.iter().zip(&d.data).map(|(x, y)| x + y).collect(),
            None => b.data.clone(),
        };
        assert_close(
            name,
            &applied[name].data,
            &want,
            DType::F32,
            Tol::abs_rel(2e-7, 1e-6),
        );
    }

    // Refusals exit non-zero and leave nothing.
    let bad = tmp.path().join("bad");
    let o = lora_cli(
        &[
            "merge",
            &p("lora_a"),
            &p("lora_c"),
            "--method",
            "ties",
            "--density",
            "0.5",
        ],
        &bad,
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("same rank"), "{}", stderr(&o));
    assert!(!bad.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        2,
        "only ac_cat and recipe.yml"
    );
}

// ---- lora extract -------------------------------------------------------------------------

fn open_model(name: &str) -> smelt::io::model::ModelFolder {
    smelt::io::model::ModelFolder::open(&peft().join(name), name).unwrap()
}

/// Extraction from PEFT's merged lora_c model (ΔW of rank 8 in q, v and up projections):
/// the Frobenius error of base + B·A against the tuned weights, measured here from the
/// factors, falls strictly with the rank and vanishes at rank 8; the reported retained
/// energy agrees with the measured error (err² = (1 − energy)·‖ΔW‖²). Every backend.
fn extraction_error_falls_with_rank(bname: &str, backend: &dyn Backend) {
    let base = open_model("base");
    let tuned = open_model("apply_lora_c");
    let bw = load_st(&peft().join("base/model.safetensors"));
    let tw = load_st(&peft().join("apply_lora_c/model.safetensors"));
    let mut last = f64::INFINITY;
    for rank in [1, 2, 4, 6, 8] {
        let ex = smelt::lora::extract::extract(&base, &tuned, rank, backend).unwrap();
        assert_eq!(ex.adapter.modules.len(), 6, "2 layers × q, v, up");
        assert!(ex.not_representable.is_empty());
        let mut err2 = 0f64;
        let mut norm2 = 0f64;
        for (m, rep) in ex.adapter.modules.iter().zip(&ex.modules) {
            assert_eq!((m.a.rows, m.b.cols), (rank, rank));
            let name = format!("{}.weight", m.name);
            assert_eq!(rep.tensor, name);
            let mut module_err2 = 0f64;
            for i in 0..m.b.rows {
                for j in 0..m.a.cols {
                    let ba: f64 = (0..rank)
                        .map(|k| m.b.at(i, k) as f64 * m.a.at(k, j) as f64)
                        .sum();
                    let e = j + i * m.a.cols;
                    let d = tw[&name].data[e] as f64 - bw[&name].data[e] as f64;
                    module_err2 += (d - ba).powi(2);
                    norm2 += d * d;
                }
            }
            let predicted = (1.0 - rep.energy) * rep.norm * rep.norm;
            assert!(
                (module_err2 - predicted).abs() <= 1e-4 * rep.norm * rep.norm,
                "{bname} r{rank} {name}: measured err² {module_err2:e}, from energy {predicted:e}"
            );
            err2 += module_err2;
        }
        let rel = (err2 / norm2).sqrt();
        assert!(
            rel < last,
            "{bname}: rank {rank} error {rel} is not below {last}"
        );
        last = rel;
        if rank == 8 {
            assert!(
                rel < 1e-5,
                "{bname}: rank 8 must reproduce a rank-8 ΔW ({rel})"
            );
        }
    }
}

backend_test!(extraction_error_falls_with_rank);

/// `smelt lora extract` writes an adapter that smelt (and PEFT's layout) reads back: at the
/// adapter's own rank, applying the extraction to the base reproduces PEFT's merged model,
/// embeddings (lora_embedding_A/B, transposed) included.
fn cli_extract_round_trips_through_apply(bname: &str, backend: &dyn Backend) {
    let tmp = tempfile::tempdir().unwrap();
    for case in ["embed", "c"] {
        let out = tmp.path().join(format!("ex_{case}"));
        let o = lora_cli(
            &[
                "extract",
                &p("base"),
                &p(&format!("apply_lora_{case}")),
                "--rank",
                "8",
            ],
            &out,
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(text.contains("retained 100.0000%"), "{text}");
        let ad = Adapter::open(&out, "x").unwrap();
        if case == "embed" {
            let m = ad.module("model.embed_tokens").unwrap();
            assert_eq!(m.kind, smelt::lora::ModuleKind::Embedding);
            assert_eq!(m.a_shape, [8, 40]);
        }
        let recipe = format!(
            "merge_method: passthrough\nmodels:\n  - model: {}+{}\n",
            p("base"),
            out.display()
        );
        let plan = plan_text(tmp.path(), &recipe, None);
        let expected = load_st(&peft().join(format!("apply_lora_{case}/model.safetensors")));
        let got = merge_plan(&plan, backend);
        for (name, e) in &expected {
            assert_close(
                &format!("{case} {bname} {name}"),
                &got[name].data,
                &e.data,
                DType::F32,
                Tol::abs_rel(2e-6, 1e-5),
            );
        }
    }
    let o = lora_cli(
        &["extract", &p("base"), &p("base"), "--rank", "4"],
        tmp.path().join("none"),
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nothing to extract"), "{}", stderr(&o));
    assert!(!tmp.path().join("none").exists());
}

backend_test!(cli_extract_round_trips_through_apply);

/// `BASE+ADAPTER` works with any method: a linear merge of two adapted models equals the
/// same merge of PEFT's two merged models, on every backend.
fn adapted_models_merge_with_any_method(bname: &str, backend: &dyn Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = format!(
        "merge_method: linear\nmodels:\n  - model: {b}+{a}\n    parameters: {{weight: 0.6}}\n  - model: {b}+{c}\n    parameters: {{weight: 0.4}}\n",
        b = p("base"),
        a = p("lora_a"),
        c = p("lora_c")
    );
    let plan = plan_text(tmp.path(), &recipe, None);
    let ea = load_st(&peft().join("apply_lora_a/model.safetensors"));
    let ec = load_st(&peft().join("apply_lora_c/model.safetensors"));
    let got = merge_plan(&plan, backend);
    for (name, x) in &ea {
        let want: Vec<f32> = x
            .data
            .iter()
            .zip(&ec[name].data)
            .map(|(x, y)| 0.6 * x + 0.4 * y)
            .collect();
        assert_close(
            &format!("{bname} {name}"),
            &got[name].data,
            &want,
            DType::F32,
            Tol::abs_rel(2e-7, 2e-6),
        );
    }
}

backend_test!(adapted_models_merge_with_any_method);

// ---- LoRA-LEGO ----------------------------------------------------------------------------

/// LEGO's exact cases on every backend: with k = every unit (4 + 8 ranks of a and c) each
/// unit is its own cluster and the result is PEFT's `cat` ΔW; an adapter merged with itself
/// at half weight each, k = its rank, pairs every unit with its twin and gives back the
/// adapter's own ΔW (what PEFT's merge_and_unload adds). A clustered merge (k < units) is
/// deterministic for a seed and agrees across backends.
fn lego_exact_cases_and_parity(bname: &str, backend: &dyn Backend) {
    let a = open_adapter("lora_a");
    let b = open_adapter("lora_b");
    let c = open_adapter("lora_c");
    let cat = load_st(&peft().join("merge_ac_cat/delta.safetensors"));
    let base = load_st(&peft().join("base/model.safetensors"));
    let applied = load_st(&peft().join("apply_lora_a/model.safetensors"));
    let bk = backend;
    let m = smelt::lora::lego::lego(&[&a, &c], &[0.7, 0.3], Some(12), 3, bk).unwrap();
    for module in &m.modules {
        let d = m.delta(module, bk).unwrap();
        let e = &cat[&format!("{}.weight", module.name)];
        assert_close(
            &format!("{bname} lego k=12 {}", module.name),
            &d.data,
            &e.data,
            DType::F32,
            Tol::abs_rel(2e-7, 1e-5),
        );
    }
    let m = smelt::lora::lego::lego(&[&a, &a], &[0.5, 0.5], Some(4), 3, bk).unwrap();
    assert_eq!(m.modules.len(), 4);
    for module in &m.modules {
        let d = m.delta(module, bk).unwrap();
        let name = format!("{}.weight", module.name);
        let want: Vec<f32> = applied[&name]
            .data
            .iter()
            .zip(&base[&name].data)
            .map(|(x, y)| x - y)
            .collect();
        assert_close(
            &format!("{bname} lego twins {name}"),
            &d.data,
            &want,
            DType::F32,
            Tol::abs_rel(2e-7, 1e-5),
        );
    }
    let run = || smelt::lora::lego::lego(&[&a, &b], &[0.7, 0.3], Some(4), 11, bk).unwrap();
    let (m1, m2) = (run(), run());
    let d1: Vec<Vec<f32>> = m1
        .modules
        .iter()
        .map(|x| m1.delta(x, bk).unwrap().data)
        .collect();
    let d2: Vec<Vec<f32>> = m2
        .modules
        .iter()
        .map(|x| m2.delta(x, bk).unwrap().data)
        .collect();
    assert_eq!(d1, d2, "{bname}: same seed, same result");
    assert_eq!(m1.config["r"], 4);
    // the other backends against the CPU's result
    if bname != "cpu" {
        let cpu = smelt::backend::cpu::Cpu::new();
        let mr = smelt::lora::lego::lego(&[&a, &b], &[0.7, 0.3], Some(4), 11, &cpu).unwrap();
        let r: Vec<Vec<f32>> = mr
            .modules
            .iter()
            .map(|x| mr.delta(x, &cpu).unwrap().data)
            .collect();
        for (x, y) in r.iter().zip(&d1) {
            assert_close(
                &format!("{bname} vs cpu lego"),
                y,
                x,
                DType::F32,
                Tol::abs_rel(1e-6, 1e-5),
            );
        }
    }
}

backend_test!(lego_exact_cases_and_parity);

/// `smelt lora merge --method lego` through the binary: at k = all units the written adapter
/// applies PEFT's exact cat sum.
#[test]
fn cli_lego_writes_loadable_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lego");
    let o = lora_cli(
        &[
            "merge",
            &p("lora_a"),
            &p("lora_c"),
            "--method",
            "lego",
            "--rank",
            "12",
            "--weights",
            "0.7,0.3",
        ],
        &out,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let recipe = format!(
        "merge_method: passthrough\nmodels:\n  - model: {}+{}\n",
        p("base"),
        out.display()
    );
    let applied = merge_plan(
        &plan_text(tmp.path(), &recipe, None),
        &smelt::backend::cpu::Cpu::new(),
    );
    let base = load_st(&peft().join("base/model.safetensors"));
    let delta = load_st(&peft().join("merge_ac_cat/delta.safetensors"));
    for (name, b) in &base {
        let want: Vec<f32> = match delta.get(name) {
            Some(d) => b.data.iter().zip(&d.data).map(|(x, y)| x + y).collect(),
            None => b.data.clone(),
        };
        assert_close(
            name,
            &applied[name].data,
            &want,
            DType::F32,
            Tol::abs_rel(3e-7, 1e-5),
        );
    }
    let o = lora_cli(
        &[
            "merge",
            &p("lora_a"),
            &p("lora_b"),
            "--method",
            "lego",
            "--density",
            "0.5",
        ],
        tmp.path().join("bad"),
    );
    assert!(!o.status.success());
    assert!(!tmp.path().join("bad").exists());
}

/// Bad adapters are refused with messages that name the file, key or tensor.
#[test]
fn bad_adapters_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let d = tmp.path().join(name);
        copy_dir(&peft().join("lora_a"), &d);
        d
    };
    let open_err =
        |d: &std::path::Path| Adapter::open(d, "x").err().expect("must fail").to_string();

    let d = copy("dora");
    let cfg = std::fs::read_to_string(d.join("adapter_config.json")).unwrap();
    std::fs::write(
        d.join("adapter_config.json"),
        cfg.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    let e = open_err(&d);
    assert!(
        e.contains("use_dora") && e.contains("adapter_config.json"),
        "{e}"
    );

    let d = copy("rank");
    let cfg = std::fs::read_to_string(d.join("adapter_config.json")).unwrap();
    std::fs::write(
        d.join("adapter_config.json"),
        cfg.replace("\"r\": 4", "\"r\": 8"),
    )
    .unwrap();
    let e = open_err(&d);
    assert!(e.contains("rank 4") && e.contains("r = 8"), "{e}");

    let d = copy("pickle");
    std::fs::rename(
        d.join("adapter_model.safetensors"),
        d.join("adapter_model.bin"),
    )
    .unwrap();
    let e = open_err(&d);
    assert!(
        e.contains("adapter_model.bin") && e.contains("safetensors"),
        "{e}"
    );

    // a lone A factor
    let d = copy("half");
    let t = load_st(&d.join("adapter_model.safetensors"));
    let keep: Vec<(&str, &T)> = t
        .iter()
        .filter(|(k, _)| {
            k.as_str() != "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        })
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    write_st(&d.join("adapter_model.safetensors"), &keep);
    let e = open_err(&d);
    assert!(
        e.contains("model.layers.0.self_attn.q_proj") && e.contains("no B factor"),
        "{e}"
    );

    // BASE+ADAPTER where the adapter folder does not exist
    std::fs::write(
        tmp.path().join("r.yml"),
        format!(
            "merge_method: passthrough\nmodels:\n  - model: {}+{}\n",
            p("base"),
            tmp.path().join("nope").display()
        ),
    )
    .unwrap();
    let e = smelt::recipe::Recipe::load(&tmp.path().join("r.yml"))
        .expect_err("must fail")
        .to_string();
    assert!(e.contains("adapter folder") && e.contains("nope"), "{e}");
}

// ---- `adapters:` lists in recipes ---------------------------------------------------------

/// s·B·A of every linear LoRA module of a fixture adapter, in f64, keyed by the base tensor
/// it adds to; computed here from the adapter's own files (s = lora_alpha / r from its
/// adapter_config.json, which for the adapters used here has no patterns and no rsLoRA).
fn hand_deltas(name: &str) -> std::collections::BTreeMap<String, Vec<f64>> {
    let dir = peft().join(name);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["use_rslora"], false, "{name}");
    assert!(
        cfg["rank_pattern"].as_object().unwrap().is_empty(),
        "{name}"
    );
    assert!(
        cfg["alpha_pattern"].as_object().unwrap().is_empty(),
        "{name}"
    );
    let s = cfg["lora_alpha"].as_f64().unwrap() / cfg["r"].as_f64().unwrap();
    let t = load_st(&dir.join("adapter_model.safetensors"));
    let mut out = std::collections::BTreeMap::new();
    for (k, a) in &t {
        let Some(m) = k
            .strip_prefix("base_model.model.")
            .and_then(|k| k.strip_suffix(".lora_A.weight"))
        else {
            continue;
        };
        let b = &t[&format!("base_model.model.{m}.lora_B.weight")];
        let (r, cols, rows) = (a.shape[0], a.shape[1], b.shape[0]);
        let mut d = vec![0f64; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                d[i * cols + j] = s
                    * (0..r)
                        .map(|k| b.data[i * r + k] as f64 * a.data[k * cols + j] as f64)
                        .sum::<f64>();
            }
        }
        out.insert(format!("{m}.weight"), d);
    }
    assert!(!out.is_empty(), "{name} has linear LoRA modules");
    out
}

/// base + Σ_k scale_k·ΔW_k, by hand in f64.
fn hand_applied(adapters: &[(&str, f64)]) -> std::collections::BTreeMap<String, Vec<f32>> {
    let base = load_st(&peft().join("base/model.safetensors"));
    let deltas: Vec<_> = adapters.iter().map(|(n, s)| (hand_deltas(n), *s)).collect();
    base.iter()
        .map(|(name, w)| {
            let v = w
                .data
                .iter()
                .enumerate()
                .map(|(e, x)| {
                    let mut y = *x as f64;
                    for (d, s) in &deltas {
                        if let Some(d) = d.get(name) {
                            y += s * d[e];
                        }
                    }
                    y as f32
                })
                .collect();
            (name.clone(), v)
        })
        .collect()
}

/// `adapters: [a, c]` stacks the adapters in order on every backend: it equals
/// W + s_a·B_a·A_a + s_c·B_c·A_c computed by hand from the fixture files (c has another rank
/// and also targets up_proj), `model: base+a` with `adapters: [c]` is the same model, a
/// `scale` multiplies its adapter's ΔW (negative too), and an adapted `base_model` is used as
/// the base. The GPU agrees with the CPU.
#[test]
fn recipe_adapter_list_stacks_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (b, a, c) = (p("base"), p("lora_a"), p("lora_c"));
    let cases: Vec<(String, Vec<(&str, f64)>)> = vec![
        (
            format!("merge_method: passthrough\nmodels:\n  - model: {b}\n    adapters: [{a}, {c}]\n"),
            vec![("lora_a", 1.0), ("lora_c", 1.0)],
        ),
        (
            format!("merge_method: passthrough\nmodels:\n  - model: {b}+{a}\n    adapters:\n      - {c}\n"),
            vec![("lora_a", 1.0), ("lora_c", 1.0)],
        ),
        (
            format!("merge_method: passthrough\nmodels:\n  - model: {b}\n    adapters:\n      - {a}\n      - {{path: {c}, scale: 0.5}}\n"),
            vec![("lora_a", 1.0), ("lora_c", 0.5)],
        ),
        (
            format!("merge_method: passthrough\nmodels:\n  - model: {b}\n    adapters: [{{path: {a}, scale: -1.5}}]\n"),
            vec![("lora_a", -1.5)],
        ),
        // base' = base + a; model = base + a + c; base' + 0.5·(model − base') = base + a + c/2
        (
            format!("merge_method: task_arithmetic\nbase_model:\n  model: {b}\n  adapters: [{a}]\nmodels:\n  - model: {b}\n    adapters: [{a}, {c}]\n    parameters: {{weight: 0.5}}\n"),
            vec![("lora_a", 1.0), ("lora_c", 0.5)],
        ),
    ];
    let base = load_st(&peft().join("base/model.safetensors"));
    for (recipe, stack) in &cases {
        let plan = plan_text(tmp.path(), recipe, None);
        let want = hand_applied(stack);
        let mut cpu = None;
        for (bname, backend) in backends() {
            let got = merge_plan(&plan, backend.as_ref());
            assert_eq!(got.len(), want.len());
            let mut changed = 0;
            for (name, w) in &want {
                assert_close(
                    &format!("{stack:?} on {bname}: {name}"),
                    &got[name].data,
                    w,
                    DType::F32,
                    Tol::abs_rel(1e-6, 1e-5),
                );
                changed += (got[name].data != base[name].data) as usize;
            }
            // a and c adapt q and v in 2 layers, c also up_proj
            let expect_changed = if stack.len() == 2 { 6 } else { 4 };
            assert_eq!(changed, expect_changed, "{stack:?} on {bname}");
            match &cpu {
                None => cpu = Some(got),
                Some(cpu) => {
                    for (name, t) in cpu {
                        assert_close(
                            &format!("{stack:?}: {bname} against cpu: {name}"),
                            &got[name].data,
                            &t.data,
                            DType::F32,
                            Tol::abs_rel(1e-7, 1e-6),
                        );
                    }
                }
            }
        }
    }
    // `slices:` sources take the list too
    let recipe = format!(
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: {b}\n        layer_range: [0, 2]\n        adapters: [{a}, {{path: {c}, scale: 0.5}}]\n"
    );
    let want = hand_applied(&[("lora_a", 1.0), ("lora_c", 0.5)]);
    let got = merge_plan(
        &plan_text(tmp.path(), &recipe, None),
        &smelt::backend::cpu::Cpu::new(),
    );
    assert!(got.contains_key("model.layers.1.mlp.up_proj.weight"));
    for (name, t) in &got {
        assert_close(
            &format!("slices: {name}"),
            &t.data,
            &want[name],
            DType::F32,
            Tol::abs_rel(1e-6, 1e-5),
        );
    }
    // The scale changes the result: 0.5·ΔW_c is not ΔW_c.
    let half = hand_applied(&[("lora_a", 1.0), ("lora_c", 0.5)]);
    let full = hand_applied(&[("lora_a", 1.0), ("lora_c", 1.0)]);
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert!(half[q]
        .iter()
        .zip(&full[q])
        .any(|(x, y)| (x - y).abs() > 1e-3));
}

/// `adapters: [a, c]` gives the same bytes as `smelt lora apply base a`, then
/// `smelt lora apply` of c onto that output (f32 model, CPU: the same additions in the same
/// order). The dry run lists both adapters with their scales, the model card lists them,
/// and the `--resume` fingerprint changes with the adapters, their order and their scales.
#[test]
fn recipe_adapter_list_equals_chained_apply_and_is_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let (b, a, c) = (p("base"), p("lora_a"), p("lora_c"));
    let step1 = tmp.path().join("step1");
    let step2 = tmp.path().join("step2");
    for (base, adapter, out) in [
        (b.clone(), &a, &step1),
        (step1.display().to_string(), &c, &step2),
    ] {
        let o = lora_cli(&["apply", &base, adapter], out);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let chained = load_dir(&step2);
    let recipe = tmp.path().join("stack.yml");
    std::fs::write(
        &recipe,
        format!("merge_method: passthrough\nmodels:\n  - model: {b}\n    adapters: [{a}, {c}]\n"),
    )
    .unwrap();
    let out = tmp.path().join("stacked");
    let o = run_merge(&recipe, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stacked = load_dir(&out);
    assert_eq!(stacked.len(), chained.len());
    for (name, t) in &chained {
        assert_close(name, &stacked[name].data, &t.data, DType::F32, Tol::EXACT);
    }
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("## LoRA adapters"), "{card}");
    let rows: Vec<&str> = card.lines().filter(|l| l.contains("lora_")).collect();
    assert!(
        rows.iter()
            .any(|l| l.contains("lora_a") && l.contains("| 1 |"))
            && rows
                .iter()
                .any(|l| l.contains("lora_c") && l.contains("| 1 |")),
        "{card}"
    );

    // dry run: both adapters under their model, with the scale
    let scaled = tmp.path().join("scaled.yml");
    std::fs::write(
        &scaled,
        format!("merge_method: passthrough\nmodels:\n  - model: {b}\n    adapters:\n      - {a}\n      - {{path: {c}, scale: 0.25}}\n"),
    )
    .unwrap();
    let o = run_merge(&scaled, &tmp.path().join("dry"), &["--dry-run"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("+ adapter")).collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("lora_a") && lines[0].contains("rank 4") && lines[0].ends_with("ΔW ×1"),
        "{text}"
    );
    assert!(
        lines[1].contains("lora_c")
            && lines[1].contains("rank 8")
            && lines[1].ends_with("ΔW ×0.25"),
        "{text}"
    );
    assert!(
        text.contains(&format!("model 0     {b} + {a} + {c} ×0.25:")),
        "{text}"
    );
    assert!(!tmp.path().join("dry").exists());

    // --resume's fingerprint covers every adapter, its place and its scale
    let fp = |adapters: &str| {
        let plan = plan_text(
            tmp.path(),
            &format!(
                "merge_method: passthrough\nmodels:\n  - model: {b}\n    adapters: {adapters}\n"
            ),
            None,
        );
        smelt::exec::fingerprint(&plan, &smelt::exec::layout(&plan, 1 << 30))
    };
    let prints = [
        fp(&format!("[{a}, {c}]")),
        fp(&format!("[{c}, {a}]")),
        fp(&format!("[{a}, {{path: {c}, scale: 0.5}}]")),
        fp(&format!("[{a}]")),
    ];
    for i in 0..prints.len() {
        for j in 0..i {
            assert_ne!(prints[i], prints[j], "fingerprints {j} and {i}");
        }
    }
    assert_eq!(prints[0], fp(&format!("[{a}, {c}]")));
}

/// Recipe errors name the key: a missing adapter folder, an unknown key in an adapter entry
/// or a model entry, a bad scale, a base_model mapping without `model`; and an adapter that
/// targets a tensor the model lacks, or was made for another base, is refused naming the
/// adapter, the module and the tensor.
#[test]
fn recipe_adapter_list_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (b, a) = (p("base"), p("lora_a"));
    let parse_err = |text: String| {
        let path = tmp.path().join("bad.yml");
        std::fs::write(&path, &text).unwrap();
        smelt::recipe::Recipe::load(&path)
            .err()
            .unwrap_or_else(|| panic!("must fail: {text}"))
            .to_string()
    };
    let nope = tmp.path().join("nope");
    let nope = nope.display();
    let pt = format!("merge_method: passthrough\nmodels:\n  - model: {b}\n");
    let ta = "merge_method: task_arithmetic";
    // (recipe, what its error must name)
    let cases: Vec<(String, &[&str])> = vec![
        (
            format!("{pt}    adapters: [{a}, {nope}]\n"),
            &["models[0].adapters[1]", "nope", "does not exist"],
        ),
        (
            format!("{pt}    adapters: [{{path: {a}, scal: 2}}]\n"),
            &["models[0].adapters[0]", "unknown key `scal`"],
        ),
        (
            format!("{pt}    adapter: [{a}]\n"),
            &["adapter", "adapters"],
        ),
        (
            format!("{pt}    adapters: [{{path: {a}, scale: .nan}}]\n"),
            &["adapters[0].scale"],
        ),
        (
            format!("{pt}    adapters: {a}\n"),
            &["models[0].adapters", "list"],
        ),
        (
            format!("{ta}\nbase_model: {{adapters: [{a}]}}\nmodels:\n  - model: {b}\n"),
            &["base_model", "no `model`"],
        ),
        (
            format!("{ta}\nbase_model: {{model: {b}, adapter: [{a}]}}\nmodels:\n  - model: {b}\n"),
            &["base_model", "unknown key `adapter`"],
        ),
    ];
    for (text, needles) in cases {
        let e = parse_err(text);
        assert!(needles.iter().all(|n| e.contains(n)), "{needles:?}: {e}");
    }

    // an adapter whose module is not in the model (second in the list)
    let odd = tmp.path().join("odd");
    copy_dir(&peft().join("lora_a"), &odd);
    let t = load_st(&odd.join("adapter_model.safetensors"));
    let renamed: Vec<(String, &T)> = t
        .iter()
        .map(|(k, v)| {
            (
                k.replace("layers.1.self_attn.v_proj", "layers.1.self_attn.x_proj"),
                v,
            )
        })
        .collect();
    let refs: Vec<(&str, &T)> = renamed.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    write_st(&odd.join("adapter_model.safetensors"), &refs);
    let plan_err = |text: String| {
        let path = tmp.path().join("r.yml");
        std::fs::write(&path, text).unwrap();
        let r = smelt::recipe::Recipe::load(&path).unwrap();
        smelt::plan::Plan::build(r, None)
            .err()
            .expect("must fail")
            .to_string()
    };
    let e = plan_err(format!(
        "merge_method: passthrough\nmodels:\n  - model: {b}\n    adapters: [{a}, {}]\n",
        odd.display()
    ));
    assert!(
        e.contains("odd")
            && e.contains("model.layers.1.self_attn.x_proj")
            && e.contains("does not have"),
        "{e}"
    );
    // made for another base (hidden 24)
    let e = plan_err(format!(
        "merge_method: passthrough\nmodels:\n  - model: {b}\n    adapters: [{a}, {}]\n",
        p("lora_other")
    ));
    assert!(
        e.contains("lora_other") && e.contains("q_proj") && e.contains("[4, 24]"),
        "{e}"
    );
}

// ---- svd_clamp ----------------------------------------------------------------------------

fn mat(t: &T) -> smelt::linalg::Mat {
    smelt::linalg::Mat {
        rows: t.shape[0],
        cols: t.shape[1],
        data: t.data.clone(),
    }
}

/// B·A in f64.
fn product(b: &smelt::linalg::Mat, a: &smelt::linalg::Mat) -> Vec<f32> {
    let mut out = vec![0f32; b.rows * a.cols];
    for i in 0..b.rows {
        for j in 0..a.cols {
            out[i * a.cols + j] = (0..a.rows)
                .map(|k| b.at(i, k) as f64 * a.at(k, j) as f64)
                .sum::<f64>() as f32;
        }
    }
    out
}

/// PEFT's svd_clamp (fixture merge_ab_svd_clamp: svd of a and b, q = 0.9).
///
/// 1. The clamp step on the factors PEFT handed to torch.quantile (pre_clamp.safetensors)
///    gives PEFT's quantile and PEFT's clamped A' and B' bit for bit, and clips values in
///    every module.
/// 2. End to end on every backend: PEFT's quantile is over signed values, so the result
///    depends on each rank's sign, which SVD implementations choose freely. Per module and
///    rank, PEFT's unclamped factors are flipped to the sign of smelt's own (unclamped) SVD
///    factors, which must be the same singular vectors (|cos| > 0.999); the clamp of those
///    must give smelt's clamped ΔW within the SVD fixtures' tolerance, and PEFT's own ΔW
///    where no sign differs. The clamped ΔW must differ from the unclamped one.
/// 3. The CLI takes --svd-clamp, records it in the card, and refuses it where it has no
///    meaning.
fn svd_clamp_matches_peft(bname: &str, backend: &dyn Backend) {
    let case = "merge_ab_svd_clamp";
    let dir = peft().join(case);
    let q = fixture_call(case).6.expect("the case has svd_clamp");
    let pre = load_st(&dir.join("pre_clamp.safetensors"));
    let ad = load_st(&dir.join("adapter_model.safetensors"));
    let peft_delta = load_st(&dir.join("delta.safetensors"));
    let modules: Vec<String> = pre
        .keys()
        .filter_map(|k| k.strip_suffix(".hi"))
        .map(str::to_string)
        .collect();
    assert_eq!(modules.len(), 4, "q and v of 2 layers");
    let pre_ab = |m: &str| {
        (
            mat(&pre[&format!("{m}.lora_A")]),
            mat(&pre[&format!("{m}.lora_B")]),
        )
    };
    for m in &modules {
        let (mut a, mut b) = pre_ab(m);
        let (a0, b0) = (a.data.clone(), b.data.clone());
        let r = a.rows;
        let hi = merge::clamp_factors(&mut a, &mut b, r, q);
        assert_eq!(
            hi.to_bits(),
            pre[&format!("{m}.hi")].data[0].to_bits(),
            "{m}: quantile {hi} vs torch's {}",
            pre[&format!("{m}.hi")].data[0]
        );
        let key = |f: &str| format!("base_model.model.{m}.{f}.weight");
        assert_close(
            &format!("{m} A'"),
            &a.data,
            &ad[&key("lora_A")].data,
            DType::F32,
            Tol::EXACT,
        );
        assert_close(
            &format!("{m} B'"),
            &b.data,
            &ad[&key("lora_B")].data,
            DType::F32,
            Tol::EXACT,
        );
        assert!(a.data != a0 && b.data != b0, "{m}: nothing clipped");
    }

    let (names, combination, weights, ..) = fixture_call(case);
    let adapters: Vec<Adapter> = names.iter().map(|n| open_adapter(n)).collect();
    let refs: Vec<&Adapter> = adapters.iter().collect();
    let run = |clamp: Option<f64>, backend: &dyn smelt::backend::Backend| {
        merge::merge(
            &refs,
            &MergeOptions {
                combination,
                weights: weights.clone(),
                density: None,
                majority_sign: MajoritySign::Total,
                svd_rank: None,
                svd_clamp: clamp,
                seed: 0,
                masks: None,
            },
            backend,
        )
        .unwrap()
    };
    let clamped = run(Some(q), backend);
    let plain = run(None, backend);
    assert_eq!(clamped.modules.len(), modules.len());
    let mut same_signs = 0;
    for (cm, pm) in clamped.modules.iter().zip(&plain.modules) {
        let what = format!("{bname} {}", cm.name);
        let (mut ea, mut eb) = pre_ab(&cm.name);
        let r = ea.rows;
        let mut flips = 0;
        for j in 0..r {
            let cos: f64 = (0..ea.cols)
                .map(|c| pm.a.at(j, c) as f64 * ea.at(j, c) as f64)
                .sum();
            assert!(cos.abs() > 0.999, "{what}: rank {j} cos {cos}");
            if cos < 0.0 {
                flips += 1;
                ea.data[j * ea.cols..(j + 1) * ea.cols]
                    .iter_mut()
                    .for_each(|x| *x = -*x);
                for i in 0..eb.rows {
                    eb.data[i * r + j] = -eb.data[i * r + j];
                }
            }
        }
        merge::clamp_factors(&mut ea, &mut eb, r, q);
        let want = product(&eb, &ea);
        let got = clamped.delta(cm, backend).unwrap();
        let tol = Tol::abs_rel(2e-6, 1e-5);
        assert_close(&what, &got.data, &want, DType::F32, tol);
        let unclamped = plain.delta(pm, backend).unwrap();
        assert!(
            got.data
                .iter()
                .zip(&unclamped.data)
                .any(|(x, y)| (x - y).abs() > 1e-3),
            "{what}: clamping changed nothing"
        );
        if flips == 0 {
            same_signs += 1;
            let e = &peft_delta[&format!("{}.weight", cm.name)];
            assert_close(
                &format!("{what} vs PEFT"),
                &got.data,
                &e.data,
                DType::F32,
                tol,
            );
        }
    }
    eprintln!(
        "svd_clamp on {bname}: {same_signs} of {} modules have PEFT's signs",
        modules.len()
    );

    // The rest does not depend on the backend under test: it runs once, in the cpu instance.
    if bname != "cpu" {
        return;
    }
    // The CLI: written adapter = the in-process CPU merge; the card records the quantile.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("clamped");
    let o = lora_cli(
        &[
            "merge",
            &p("lora_a"),
            &p("lora_b"),
            "--method",
            "svd",
            "--weights",
            "0.7,0.3",
            "--svd-clamp",
            "0.9",
        ],
        &out,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let cpu = run(Some(q), &smelt::backend::cpu::Cpu::new());
    let got = load_st(&out.join("adapter_model.safetensors"));
    for (k, _, data) in cpu.tensors() {
        assert_close(&k, &got[&k].data, data, DType::F32, Tol::EXACT);
    }
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("svd_clamp 0.9"), "{card}");
    for (args, msg) in [
        (vec!["--method", "svd", "--svd-clamp", "0"], "(0, 1]"),
        (vec!["--method", "svd", "--svd-clamp", "1.5"], "(0, 1]"),
        (
            vec!["--method", "cat", "--svd-clamp", "0.9"],
            "SVD methods only",
        ),
    ] {
        let bad = tmp.path().join("bad");
        let o = lora_cli(
            &[&["merge", &p("lora_a"), &p("lora_b")], &args[..]].concat(),
            &bad,
        );
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
        assert!(!bad.exists());
    }
    let e = merge::merge(
        &refs,
        &MergeOptions {
            combination: Combination::Linear,
            weights: weights.clone(),
            density: None,
            majority_sign: MajoritySign::Total,
            svd_rank: None,
            svd_clamp: Some(0.9),
            seed: 0,
            masks: None,
        },
        &smelt::backend::cpu::Cpu::new(),
    )
    .err()
    .expect("linear has no SVD to clamp")
    .to_string();
    assert!(e.contains("svd_clamp") && e.contains("linear"), "{e}");
}

backend_test!(svd_clamp_matches_peft);

// ---- modules_to_save through lora merge ---------------------------------------------------

/// PEFT 0.21.2 merges an adapter with modules_to_save (lora_mts: a trained lm_head) with
/// others, and drops the trained copy: merge_mts_a_cat holds a copy of the BASE's lm_head.
/// `smelt lora merge lora_mts lora_a` writes PEFT's LoRA factors, warns that the lm_head copy
/// is not carried, writes no lm_head and `modules_to_save: null`, and applied to the base it
/// gives the model PEFT's merged adapter gives: base + PEFT's ΔW, lm_head the base's (not
/// lora_mts's). The other order works the same; every backend.
fn merge_with_modules_to_save_follows_peft(bname: &str, backend: &dyn Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let base = load_st(&peft().join("base/model.safetensors"));
    let fixture = peft().join("merge_mts_a_cat");
    let peft_ad = load_st(&fixture.join("adapter_model.safetensors"));
    let peft_delta = load_st(&fixture.join("delta.safetensors"));
    let mts_lm = load_st(&peft().join("lora_mts/adapter_model.safetensors"))
        ["base_model.model.lm_head.weight"]
        .data
        .clone();
    assert_eq!(
        peft_ad["base_model.model.lm_head.weight"].data, base["lm_head.weight"].data,
        "PEFT's merged adapter holds the base's lm_head"
    );
    assert_ne!(mts_lm, base["lm_head.weight"].data);
    // base + PEFT's merged ΔW; lm_head stays the base's
    let expected: std::collections::BTreeMap<String, Vec<f32>> = base
        .iter()
        .map(|(k, t)| {
            let v = match peft_delta.get(k) {
                Some(d) => t.data.iter().zip(&d.data).map(|(x, y)| x + y).collect(),
                None => t.data.clone(),
            };
            (k.clone(), v)
        })
        .collect();
    for (first, second) in [("lora_mts", "lora_a"), ("lora_a", "lora_mts")] {
        let out = tmp.path().join(format!("{first}_{second}"));
        let (w1, w2) = if first == "lora_mts" {
            ("0.7", "0.3")
        } else {
            ("0.3", "0.7")
        };
        let o = lora_cli(
            &[
                "merge",
                &p(first),
                &p(second),
                "--method",
                "cat",
                "--weights",
                &format!("{w1},{w2}"),
            ],
            &out,
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains("modules_to_save (lm_head)") && e.contains("stay as in the base"),
            "{e}"
        );
        let got = load_st(&out.join("adapter_model.safetensors"));
        assert!(got.keys().all(|k| k.contains(".lora_")), "{:?}", got.keys());
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert!(cfg["modules_to_save"].is_null(), "{cfg}");
        if first == "lora_mts" {
            // PEFT's exact order: the factors are PEFT's
            for (k, t) in &got {
                assert_close(k, &t.data, &peft_ad[k].data, DType::F32, Tol::FIXTURE);
            }
        }
        let recipe = format!(
            "merge_method: passthrough\nmodels:\n  - model: {}+{}\n",
            p("base"),
            out.display()
        );
        let plan = plan_text(tmp.path(), &recipe, None);
        let applied = merge_plan(&plan, backend);
        for (k, want) in &expected {
            assert_close(
                &format!("{first}+{second} on {bname}: {k}"),
                &applied[k].data,
                want,
                DType::F32,
                Tol::abs_rel(2e-7, 2e-6),
            );
        }
    }
}

backend_test!(merge_with_modules_to_save_follows_peft);

// ---- extraction with the GPU's randomised SVD ---------------------------------------------

/// A larger extraction, where the GPU backend's `svd(ΔW, Some(R))` takes its randomised
/// path (min side 384 > 64 and 2·(R + 10) < 384: a uniform random sketch of R + 10
/// columns, two power iterations, then an exact SVD of the small projection), against the
/// CPU's exact SVD. ΔW of two 384x512 / 512x384 weights is a rank-16 signal with singular
/// values falling by 0.8 per rank, plus uniform noise N far below the signal's smallest
/// singular value. For each rank R in 4, 16, 24 and each backend:
/// * the Frobenius error ‖ΔW − B·A‖ falls strictly with R, and at R = 16 it is at most
///   ‖N‖ (Eckart–Young: the signal itself is a rank-16 candidate), with f32 slack;
/// * the reported retained energy agrees with the measured error;
///
/// And the GPU against the CPU (the CPU's truncated SVD is optimal):
/// * where R cuts the signal (R ≤ 16, a 20% gap between neighbouring singular values):
///   retained energy within 1e-5 (absolute, of a fraction), error at most 1e-3 above the
///   CPU's (relative), reconstructed ΔW (B·A) within 1e-4·‖ΔW‖;
/// * at R = 24, inside the flat noise spectrum, where a sketch with 10 extra columns is not
///   near-optimal: both keep all the signal and differ only in which noise directions they
///   keep, so the energies differ by at most ‖N‖²/‖ΔW‖², the GPU's error is at most ‖N‖
///   (with f32 slack) and the reconstructions differ by at most 2‖N‖;
/// * the GPU's factors are not the CPU's bit for bit (it did not fall back to the exact SVD).
///
/// Only the first GPU backend runs: the SVD's products are whole-matrix GPU products that do
/// not depend on the tile size, and lavapipe is slow (about 3 s for the GPU's half on an idle
/// 2-core machine).
#[test]
fn gpu_randomised_svd_extraction_agrees_with_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Lcg(0x5eed_1a2b);
    let shapes = [
        ("model.layers.0.self_attn.o_proj.weight", 384usize, 512usize),
        ("model.layers.0.mlp.up_proj.weight", 512, 384),
    ];
    let (signal_rank, noise) = (16, 1e-4f64);
    let mut base_t = Vec::new();
    let mut tuned_t = Vec::new();
    let mut truth = Vec::new(); // (ΔW as stored: tuned − base, ‖N‖)
    for (name, rows, cols) in shapes {
        let w: Vec<f32> = (0..rows * cols).map(|_| 0.02 * rng.sym()).collect();
        let mut d = vec![0f64; rows * cols];
        for i in 0..signal_rank {
            let sigma = 0.5 * 0.8f64.powi(i as i32);
            let x: Vec<f64> = (0..rows)
                .map(|_| rng.sym().signum() as f64 / (rows as f64).sqrt())
                .collect();
            let y: Vec<f64> = (0..cols)
                .map(|_| rng.sym().signum() as f64 / (cols as f64).sqrt())
                .collect();
            for r in 0..rows {
                for c in 0..cols {
                    d[r * cols + c] += sigma * x[r] * y[c];
                }
            }
        }
        let mut n2 = 0f64;
        for v in d.iter_mut() {
            let e = noise * rng.sym() as f64;
            n2 += e * e;
            *v += e;
        }
        let tuned: Vec<f32> = w.iter().zip(&d).map(|(a, b)| a + *b as f32).collect();
        let stored: Vec<f64> = tuned.iter().zip(&w).map(|(t, b)| (t - b) as f64).collect();
        base_t.push((name, T::f32(&[rows, cols], w)));
        tuned_t.push((name, T::f32(&[rows, cols], tuned)));
        truth.push((name, rows, cols, stored, n2.sqrt()));
    }
    let refs = |v: &[(&'static str, T)]| -> Vec<(&'static str, T)> {
        v.iter()
            .map(|(n, t)| (*n, T::f32(&t.shape, t.data.clone())))
            .collect()
    };
    let write = |dir: &str, v: &[(&'static str, T)]| {
        let owned = refs(v);
        let list: Vec<(&str, &T)> = owned.iter().map(|(n, t)| (*n, t)).collect();
        write_model(&tmp.path().join(dir), 1, &list);
        smelt::io::model::ModelFolder::open(&tmp.path().join(dir), dir).unwrap()
    };
    let base = write("base", &base_t);
    let tuned = write("tuned", &tuned_t);

    let mut backends = backends();
    backends.retain(|(n, _)| n != "gpu-streamed");
    if backends.len() == 1 {
        eprintln!("no GPU: only the CPU's half of this test ran");
    }
    // per backend, per rank: (energy, error, B·A, A) of each tensor
    type Run = Vec<(f64, f64, Vec<f64>, Vec<f32>)>;
    let mut runs: Vec<(String, Vec<Run>)> = Vec::new();
    let ranks = [4usize, 16, 24];
    for (bname, backend) in &backends {
        let t0 = std::time::Instant::now();
        let mut per_rank = Vec::new();
        let mut last = vec![f64::INFINITY; shapes.len()];
        for &rank in &ranks {
            let ex = smelt::lora::extract::extract(&base, &tuned, rank, backend.as_ref()).unwrap();
            assert_eq!(ex.modules.len(), shapes.len());
            let mut run: Run = Vec::new();
            for (k, (name, rows, cols, d, nn)) in truth.iter().enumerate() {
                let m = &ex.adapter.modules[ex
                    .adapter
                    .modules
                    .iter()
                    .position(|m| format!("{}.weight", m.name) == *name)
                    .unwrap()];
                let rep = ex.modules.iter().find(|r| r.tensor == *name).unwrap();
                let mut ba = vec![0f64; rows * cols];
                for i in 0..*rows {
                    for j in 0..*cols {
                        ba[i * cols + j] = (0..rank)
                            .map(|q| m.b.at(i, q) as f64 * m.a.at(q, j) as f64)
                            .sum();
                    }
                }
                let err = d
                    .iter()
                    .zip(&ba)
                    .map(|(x, y)| (x - y).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let norm = d.iter().map(|x| x * x).sum::<f64>().sqrt();
                let what = format!("{bname} {name} rank {rank}");
                assert!(err < last[k], "{what}: error {err} not below {}", last[k]);
                last[k] = err;
                let predicted = ((1.0 - rep.energy).max(0.0)).sqrt() * rep.norm;
                assert!(
                    (err - predicted).abs() <= 1e-3 * norm,
                    "{what}: measured error {err:e}, from the reported energy {predicted:e}"
                );
                if rank == signal_rank {
                    assert!(
                        err <= nn * (1.0 + 1e-3),
                        "{what}: error {err:e} above the noise ‖N‖ = {nn:e}"
                    );
                }
                run.push((rep.energy, err, ba, m.a.data.clone()));
            }
            per_rank.push(run);
        }
        eprintln!(
            "extraction at ranks {ranks:?} of 2 tensors 384x512 on {bname}: {:.2} s",
            t0.elapsed().as_secs_f64()
        );
        runs.push((bname.clone(), per_rank));
    }
    let (cpu, gpus) = runs.split_first().unwrap();
    assert_eq!(cpu.0, "cpu");
    for (bname, per_rank) in gpus {
        for (ri, &rank) in ranks.iter().enumerate() {
            for (k, (name, _, _, d, nn)) in truth.iter().enumerate() {
                let (ec, errc, bac, ac) = &cpu.1[ri][k];
                let (eg, errg, bag, ag) = &per_rank[ri][k];
                let norm = d.iter().map(|x| x * x).sum::<f64>().sqrt();
                let diff = bac
                    .iter()
                    .zip(bag)
                    .map(|(x, y)| (x - y).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let what = format!("{bname} vs cpu, {name} rank {rank}");
                eprintln!(
                    "{what}: energy {ec:.7} vs {eg:.7}, error {errc:.4e} vs {errg:.4e}, ‖BA_gpu − BA_cpu‖/‖ΔW‖ {:.2e}",
                    diff / norm
                );
                let in_signal = rank <= signal_rank;
                let de = if in_signal { 1e-5 } else { (nn / norm).powi(2) };
                assert!(
                    (ec - eg).abs() <= de,
                    "{what}: energy {ec} vs {eg} (bound {de:e})"
                );
                let max_err = if in_signal {
                    errc * (1.0 + 1e-3)
                } else {
                    nn * (1.0 + 1e-3)
                };
                assert!(
                    *errg <= max_err,
                    "{what}: error {errg:e} > {max_err:e} (cpu {errc:e})"
                );
                assert!(
                    *errc <= errg * (1.0 + 1e-5),
                    "{what}: cpu error {errc:e} above the gpu's {errg:e}"
                );
                let bound = if in_signal { 1e-4 * norm } else { 2.0 * nn };
                assert!(diff <= bound, "{what}: ‖ΔB·A‖ {diff:e} > {bound:e}");
                assert!(
                    ac != ag,
                    "{what}: the GPU's factors are the CPU's exact SVD"
                );
            }
        }
    }
}

/// `refactor` (the SVD methods of `lora merge`, extraction) fixes each singular pair's sign
/// (largest |entry| of each row of A' positive): B'·A' is the SVD's, and the factors from the
/// GPU's randomised SVD equal the CPU's exact ones up to the SVD's own accuracy, so
/// `--svd-clamp`'s quantile over signed values does not depend on the backend.
#[test]
fn refactored_factors_have_a_fixed_sign_on_every_backend() {
    use smelt::linalg::Mat;
    let (rows, cols, signal, r) = (384usize, 512usize, 16usize, 8usize);
    let mut rng = Lcg(0xfac7);
    let mut d = vec![0f64; rows * cols];
    for i in 0..signal {
        let sigma = 0.6f64.powi(i as i32);
        let x: Vec<f64> = (0..rows).map(|_| rng.sym() as f64).collect();
        let y: Vec<f64> = (0..cols).map(|_| rng.sym() as f64).collect();
        for a in 0..rows {
            for c in 0..cols {
                d[a * cols + c] += sigma * x[a] * y[c] / ((rows * cols) as f64).sqrt();
            }
        }
    }
    let dw = Mat {
        rows,
        cols,
        data: d.iter().map(|x| *x as f32).collect(),
    };
    let mut results = Vec::new();
    for (bname, backend) in backends() {
        let (a, b) = smelt::lora::merge::refactor(&dw, r, backend.as_ref()).unwrap();
        for j in 0..r {
            let row = &a.data[j * cols..(j + 1) * cols];
            let big = row
                .iter()
                .fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
            assert!(
                big > 0.0,
                "{bname}: row {j} of A' has its largest entry negative"
            );
        }
        results.push((bname, a, b));
    }
    let (_, a0, b0) = &results[0];
    for (bname, a, b) in &results[1..] {
        for (k, (x, y)) in a.data.iter().zip(&a0.data).enumerate() {
            assert!((x - y).abs() < 1e-3, "{bname}: A'[{k}] {x} vs cpu {y}");
        }
        let scale = b0.data.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (k, (x, y)) in b.data.iter().zip(&b0.data).enumerate() {
            assert!(
                (x - y).abs() < 1e-3 * scale,
                "{bname}: B'[{k}] {x} vs cpu {y}"
            );
        }
    }
}
