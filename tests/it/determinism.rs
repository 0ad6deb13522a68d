//! The same recipe and seed give byte-identical output folders: on repeated runs, and for
//! any number of threads. A different seed changes what DARE drops.
//!
//! The models here are made to exercise the CPU's chunking: two tensors of 60,000 elements
//! (four 16 Ki chunks) with many equal magnitudes across chunk boundaries, so selections
//! depend on the tie rule and reductions on the combination order.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::*;

const RECIPES: [(&str, &str); 3] = [
    (
        "ties",
        "merge_method: ties
base_model: base
models:
  - {model: a, parameters: {weight: 1.0, density: 0.3}}
  - {model: b, parameters: {weight: 0.5, density: 0.3}}
  - {model: c, parameters: {weight: 0.7, density: [0.2, 0.6]}}
dtype: float32
",
    ),
    (
        "dare_ties",
        "merge_method: dare_ties
base_model: base
models:
  - {model: a, parameters: {weight: 0.5, density: 0.5}}
  - {model: b, parameters: {weight: 0.5, density: 0.5}}
  - {model: c, parameters: {weight: 0.5, density: 0.3}}
dtype: float32
",
    ),
    (
        "breadcrumbs",
        "merge_method: breadcrumbs
base_model: base
models:
  - {model: a, parameters: {weight: 0.5, density: 0.8, gamma: 0.05}}
  - {model: b, parameters: {weight: 0.3, density: 0.8, gamma: 0.05}}
  - {model: c, parameters: {weight: 0.2, density: 0.7, gamma: 0.1}}
dtype: float32
",
    ),
];

fn shapes() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("model.embed_tokens.weight", vec![64, 40]),
        ("model.layers.0.input_layernorm.weight", vec![200]),
        ("model.layers.0.mlp.up_proj.weight", vec![300, 200]),
        ("model.layers.1.input_layernorm.weight", vec![200]),
        ("model.layers.1.mlp.up_proj.weight", vec![300, 200]),
        ("model.norm.weight", vec![200]),
    ]
}

/// base + three fine-tunes whose deltas take only 33 distinct magnitudes (many ties).
fn write_models(dir: &Path) {
    let mut rng = Lcg(2024);
    let base: Vec<T> = shapes()
        .iter()
        .map(|(_, s)| {
            let n = s.iter().product();
            T::f32(s, (0..n).map(|_| rng.sym()).collect())
        })
        .collect();
    let mut all = vec![("base", base.clone())];
    for m in ["a", "b", "c"] {
        let ft: Vec<T> = base
            .iter()
            .map(|b| {
                let data = b
                    .data
                    .iter()
                    .map(|x| x + ((rng.next_u32() % 33) as f32 - 16.0) / 512.0)
                    .collect();
                T::f32(&b.shape, data)
            })
            .collect();
        all.push((m, ft));
    }
    let names = shapes();
    for (m, ts) in &all {
        let list: Vec<(&str, &T)> = names.iter().map(|(n, _)| *n).zip(ts).collect();
        write_model(&dir.join(m), 2, &list);
    }
}

fn setup() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    write_models(tmp.path());
    for (name, text) in RECIPES {
        std::fs::write(tmp.path().join(format!("{name}.yml")), text).unwrap();
    }
    tmp
}

fn repeated_runs_are_byte_identical(bname: &str, backend: &dyn Backend) {
    let tmp = setup();
    for (name, _) in RECIPES {
        let recipe = tmp.path().join(format!("{name}.yml"));
        // each run writes a folder named `out` (the name goes into the model card)
        let runs: Vec<BTreeMap<String, Vec<u8>>> = (0..2)
            .map(|_| {
                let d = tempfile::tempdir().unwrap();
                let out = d.path().join("out");
                let plan = plan_file(&recipe, Some(11));
                execute_to(&plan, backend, &out, 5_000_000_000);
                dir_bytes(&out)
            })
            .collect();
        assert!(runs[0].contains_key("model.safetensors"));
        assert!(
            runs[0] == runs[1],
            "{bname}: {name}: two runs differ in {:?}",
            runs[0]
                .iter()
                .filter(|(k, v)| runs[1].get(*k) != Some(v))
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        );
    }
}

backend_test!(repeated_runs_are_byte_identical);

#[test]
fn thread_count_does_not_change_the_output() {
    let tmp = setup();
    for (name, _) in RECIPES {
        let recipe = tmp.path().join(format!("{name}.yml"));
        let mut results: Vec<(String, BTreeMap<String, Vec<u8>>)> = Vec::new();
        for threads in [None, Some("1"), Some("3")] {
            let d = tempfile::tempdir().unwrap();
            let out = d.path().join("out");
            let mut extra = vec!["--seed", "5"];
            if let Some(t) = threads {
                extra.extend(["--threads", t]);
            }
            let o = run_merge(&recipe, &out, &extra);
            assert!(o.status.success(), "{name} {threads:?}: {}", stderr(&o));
            results.push((format!("{threads:?}"), dir_bytes(&out)));
        }
        for (label, files) in &results[1..] {
            assert!(
                *files == results[0].1,
                "{name}: --threads {label} differs from the default thread count"
            );
        }
        // and the binary agrees with the library run in-process (same seed)
        let plan = plan_file(&recipe, Some(5));
        let want = merge_plan(&plan, &smelt::backend::cpu::Cpu::new());
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        for (f, bytes) in &results[0].1 {
            std::fs::write(out.join(f), bytes).unwrap();
        }
        let got = load_dir(&out);
        assert_eq!(got.len(), want.len());
        for (n, t) in &want {
            assert_close(
                &format!("{name}: binary vs library, {n}"),
                &got[n].data,
                &t.data,
                t.dtype,
                Tol::EXACT,
            );
        }
    }
}

fn seed_changes_dare_and_only_dare(bname: &str, backend: &dyn Backend) {
    let tmp = setup();
    let run = |recipe: &str, seed: Option<u64>| {
        merge_plan_bytes(&plan_file(&tmp.path().join(recipe), seed), backend)
    };
    let one = run("dare_ties.yml", Some(1));
    let one_again = run("dare_ties.yml", Some(1));
    let two = run("dare_ties.yml", Some(2));
    assert!(one == one_again, "{bname}: same seed, different output");
    for (name, bytes) in &one {
        assert_ne!(
            *bytes, two[name],
            "{bname}: {name} is the same for seeds 1 and 2"
        );
    }
    // deterministic methods ignore the seed
    for recipe in ["ties.yml", "breadcrumbs.yml"] {
        assert!(
            run(recipe, Some(1)) == run(recipe, Some(2)),
            "{bname}: {recipe} depends on the seed"
        );
    }
    // the recipe's `seed:` key is the same as --seed; the default seed is 0
    let with_key = tmp.path().join("dare_keyed.yml");
    std::fs::write(&with_key, format!("{}seed: 2\n", RECIPES[1].1)).unwrap();
    let run =
        |recipe: &Path, seed: Option<u64>| merge_plan_bytes(&plan_file(recipe, seed), backend);
    let plain = tmp.path().join("dare_ties.yml");
    assert!(
        run(&with_key, None) == run(&plain, Some(2)),
        "{bname}: `seed: 2` differs from --seed 2"
    );
    assert!(
        run(&with_key, Some(3)) == run(&plain, Some(3)),
        "{bname}: --seed does not override the recipe's seed"
    );
    assert!(
        run(&plain, None) == run(&plain, Some(0)),
        "{bname}: the default seed is not 0"
    );
}

backend_test!(seed_changes_dare_and_only_dare);

#[test]
fn seed_flag_changes_the_binarys_dare_output() {
    let tmp = setup();
    let recipe = tmp.path().join("dare_ties.yml");
    let run = |seed: &str| {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let o = run_merge(&recipe, &out, &["--seed", seed]);
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read(out.join("model.safetensors")).unwrap()
    };
    let a = run("1");
    assert!(a == run("1"), "--seed 1 twice gave different files");
    assert!(a != run("2"), "--seed 1 and --seed 2 gave the same file");
}
