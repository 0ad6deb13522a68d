//! Bad input through the real binary: `smelt merge RECIPE -o OUT` must exit non-zero, say
//! what is wrong naming the culprit (file, model, tensor, key or shape), and leave neither
//! OUT nor a hidden `.OUT.smelt-tmp-*` folder behind. The bad files are made in a temporary
//! folder from copies of tests/fixtures/mergekit/models.

use std::path::Path;

use crate::common::*;

const GOOD: &str = "merge_method: ties
base_model: models/base
models:
  - model: models/ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: models/ft2
    parameters: {weight: 1.0, density: 0.5}
dtype: float32
";

/// No hidden staging folder (or old folder moved aside) is left beside OUT.
fn assert_no_leftovers(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(
            !name.starts_with(".out.smelt-tmp-") && !name.starts_with(".out."),
            "left behind: {}",
            dir.join(&name).display()
        );
    }
}

/// Runs the merge, expects failure with every needle in stderr, and a clean folder.
#[track_caller]
fn expect_failure(s: &Setup, recipe: &Path, extra: &[&str], needles: &[&str]) -> String {
    let o = run_merge(recipe, &s.out(), extra);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "expected a failure; stdout: {}\nstderr: {err}",
        String::from_utf8_lossy(&o.stdout)
    );
    for n in needles {
        assert!(err.contains(n), "stderr does not mention {n:?}:\n{err}");
    }
    assert!(
        !s.out().exists(),
        "{} exists after a failed merge",
        s.out().display()
    );
    assert_no_leftovers(s.dir());
    err
}

#[test]
fn the_good_recipe_succeeds() {
    // The baseline the other cases break: it must work as it is.
    let s = Setup::new();
    let o = run_merge(&s.recipe(GOOD), &s.out(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(s.out().join("model.safetensors").is_file());
    assert_no_leftovers(s.dir());
}

#[test]
fn malformed_yaml() {
    let s = Setup::new();
    let r = s.recipe(
        "merge_method: ties\nmodels: [\n  - model: models/ft1\n    parameters: {weight: 1\n",
    );
    expect_failure(&s, &r, &[], &["recipe.yml"]);
}

#[test]
fn unknown_method_lists_the_valid_ones() {
    let s = Setup::new();
    let r = s.recipe(&GOOD.replace("merge_method: ties", "merge_method: frobnicate"));
    expect_failure(
        &s,
        &r,
        &[],
        &["recipe.yml", "frobnicate", "task_arithmetic", "dare_ties"],
    );
}

#[test]
fn misspelt_method_gets_a_suggestion() {
    let s = Setup::new();
    let r = s.recipe(&GOOD.replace("merge_method: ties", "merge_method: dare-ties"));
    expect_failure(&s, &r, &[], &["dare-ties", "did you mean `dare_ties`"]);
}

#[test]
fn unknown_top_level_key() {
    let s = Setup::new();
    let r = s.recipe(&format!("{GOOD}normalise_everything: true\n"));
    expect_failure(&s, &r, &[], &["recipe.yml", "normalise_everything"]);
}

#[test]
fn unknown_parameter() {
    let s = Setup::new();
    let r = s.recipe(&GOOD.replacen("density: 0.5", "densty: 0.5", 1));
    expect_failure(&s, &r, &[], &["recipe.yml", "densty", "density"]);
}

#[test]
fn missing_model_folder() {
    let s = Setup::new();
    let r = s.recipe(&GOOD.replace("models/ft2", "models/ft9"));
    expect_failure(&s, &r, &[], &["ft9"]);
}

#[test]
fn missing_tensor_in_one_model() {
    let s = Setup::new();
    let gone = "model.layers.1.mlp.up_proj.weight";
    let ts = load_st(&s.st("ft2"));
    let keep: Vec<(&str, &T)> = ts
        .iter()
        .filter(|(n, _)| n.as_str() != gone)
        .map(|(n, t)| (n.as_str(), t))
        .collect();
    write_st(&s.st("ft2"), &keep);
    expect_failure(&s, &s.recipe(GOOD), &[], &[gone, "ft2"]);
}

#[test]
fn shape_mismatch() {
    let s = Setup::new();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let mut ts = load_st(&s.st("ft2"));
    let t = ts.get_mut(name).unwrap();
    t.shape = vec![47, 48];
    t.data.truncate(47 * 48);
    let list: Vec<(&str, &T)> = ts.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_st(&s.st("ft2"), &list);
    expect_failure(
        &s,
        &s.recipe(GOOD),
        &[],
        &[name, "ft2", "[47, 48]", "[48, 48]"],
    );
}

#[test]
fn truncated_safetensors_file() {
    let s = Setup::new();
    let bytes = std::fs::read(s.st("ft1")).unwrap();
    std::fs::write(s.st("ft1"), &bytes[..bytes.len() - 1000]).unwrap();
    expect_failure(&s, &s.recipe(GOOD), &[], &["ft1", "model.safetensors"]);
}

#[test]
fn header_length_beyond_the_file() {
    let s = Setup::new();
    let mut bytes = std::fs::read(s.st("ft1")).unwrap();
    let too_long = bytes.len() as u64 + 10;
    bytes[..8].copy_from_slice(&too_long.to_le_bytes());
    std::fs::write(s.st("ft1"), &bytes).unwrap();
    expect_failure(
        &s,
        &s.recipe(GOOD),
        &[],
        &["ft1", "model.safetensors", "header length"],
    );
}

#[test]
fn shard_path_escaping_the_folder() {
    let s = Setup::new();
    // The shard exists, one level up: it must be refused all the same.
    let outside = s.models.join("x.safetensors");
    std::fs::rename(s.st("ft2"), &outside).unwrap();
    let names: Vec<String> = load_st(&outside).keys().cloned().collect();
    let map: serde_json::Map<String, serde_json::Value> = names
        .into_iter()
        .map(|n| (n, serde_json::Value::from("../x.safetensors")))
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": 216000}, "weight_map": map});
    std::fs::write(
        s.models.join("ft2/model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    expect_failure(&s, &s.recipe(GOOD), &[], &["../x.safetensors", "ft2"]);
}

#[test]
fn folder_with_only_pytorch_bin() {
    let s = Setup::new();
    std::fs::remove_file(s.st("ft2")).unwrap();
    std::fs::write(
        s.models.join("ft2/pytorch_model.bin"),
        b"PK\x03\x04 not a real pickle",
    )
    .unwrap();
    expect_failure(&s, &s.recipe(GOOD), &[], &["ft2", "pytorch_model.bin"]);
}

#[test]
fn required_weight_missing() {
    let s = Setup::new();
    let r = s.recipe(&GOOD.replace(
        "  - model: models/ft2\n    parameters: {weight: 1.0, density: 0.5}",
        "  - model: models/ft2\n    parameters: {density: 0.5}",
    ));
    expect_failure(&s, &r, &[], &["weight", "ft2"]);
}

#[test]
fn failure_during_the_merge_leaves_nothing() {
    // Weights that sum to zero with normalize: only found when the first tensor is merged,
    // after the staging folder exists.
    let s = Setup::new();
    let r = s.recipe(
        "merge_method: linear
models:
  - {model: models/ft1, parameters: {weight: 1.0}}
  - {model: models/ft2, parameters: {weight: -1.0}}
",
    );
    expect_failure(&s, &r, &[], &["weights", "normalize"]);
}

#[test]
fn existing_output_needs_force() {
    let s = Setup::new();
    let r = s.recipe(GOOD);
    std::fs::create_dir(s.out()).unwrap();
    std::fs::write(s.out().join("keep-me.txt"), b"old").unwrap();

    let o = run_merge(&r, &s.out(), &[]);
    let err = stderr(&o);
    assert!(!o.status.success(), "merged over an existing folder");
    assert!(err.contains("out") && err.contains("--force"), "{err}");
    // the old folder is untouched
    assert_eq!(std::fs::read(s.out().join("keep-me.txt")).unwrap(), b"old");
    assert!(!s.out().join("model.safetensors").exists());
    assert_no_leftovers(s.dir());

    // a folder smelt did not write is not replaced, even with --force
    let o = run_merge(&r, &s.out(), &["--force"]);
    assert_eq!(o.status.code(), Some(1), "--force: {}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("keep-me.txt") && err.contains("only replaces its own outputs"),
        "{err}"
    );
    assert_eq!(std::fs::read(s.out().join("keep-me.txt")).unwrap(), b"old");
    assert_no_leftovers(s.dir());

    // an earlier smelt output is
    std::fs::remove_dir_all(s.out()).unwrap();
    assert!(run_merge(&r, &s.out(), &[]).status.success());
    std::fs::write(s.out().join("extra.txt"), b"x").unwrap();
    let o = run_merge(&r, &s.out(), &[]);
    assert!(!o.status.success(), "merged over an existing output");
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    let o = run_merge(&r, &s.out(), &["--force"]);
    assert!(o.status.success(), "--force: {}", stderr(&o));
    assert!(
        !s.out().join("extra.txt").exists(),
        "--force kept the old folder's files"
    );
    let merged = load_dir(&s.out());
    assert_eq!(merged.len(), 21);
    assert_no_leftovers(s.dir());
}

/// `--force` parks the old folder under a name of its own (it once used `.out.old`, and a
/// stale folder of that name made every later `--force` fail after the merge was done).
#[test]
fn force_is_not_blocked_by_stale_folders_beside_the_output() {
    let s = Setup::new();
    let r = s.recipe(GOOD);
    assert!(run_merge(&r, &s.out(), &[]).status.success());
    for stale in [".out.old", ".out.smelt-tmp-1.old"] {
        std::fs::create_dir(s.dir().join(stale)).unwrap();
        std::fs::write(s.dir().join(stale).join("f"), b"x").unwrap();
    }
    let o = run_merge(&r, &s.out(), &["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(s.out().join("model.safetensors").is_file());
}
