//! The input contracts of the rest of mergekit's methods, through the real binary: recipes
//! that break them fail with a message naming the method and what is wrong, and leave no
//! output behind; `smelt methods` lists every method with its parameters and defaults.

use std::path::PathBuf;

use crate::common::*;

struct Setup {
    tmp: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        copy_fixture_models(tmp.path());
        Setup { tmp }
    }
    fn recipe(&self, text: &str) -> PathBuf {
        let p = self.tmp.path().join("recipe.yml");
        std::fs::write(&p, format!("{text}dtype: float32\n")).unwrap();
        p
    }
    fn out(&self) -> PathBuf {
        self.tmp.path().join("out")
    }
}

/// Runs `smelt merge` on `text`; expects a failure whose stderr holds every needle, and no
/// output folder (nor a hidden staging folder) afterwards.
#[track_caller]
fn expect_failure(text: &str, needles: &[&str]) {
    let s = Setup::new();
    let o = run_merge(&s.recipe(text), &s.out(), &[]);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "expected a failure for:\n{text}\nstdout: {}\nstderr: {err}",
        String::from_utf8_lossy(&o.stdout)
    );
    for n in needles {
        assert!(err.contains(n), "stderr does not mention {n:?}:\n{err}");
    }
    assert!(!s.out().exists(), "output written by a failed merge");
    let left: Vec<String> = std::fs::read_dir(s.tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".out"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The same kind of recipe with the contract respected merges fine (so the failures above
/// come from the contract, not from the setup).
#[track_caller]
fn expect_success(text: &str) {
    let s = Setup::new();
    let o = run_merge(&s.recipe(text), &s.out(), &[]);
    assert!(
        o.status.success(),
        "expected success for:\n{text}\nstderr: {}",
        stderr(&o)
    );
    assert_eq!(load_dir(&s.out()).len(), 21);
}

#[test]
fn slerp_takes_a_base_and_exactly_one_other_model() {
    // a base and two other models
    expect_failure(
        "merge_method: slerp\nbase_model: models/base\nmodels:\n  - model: models/base\n  - model: models/ft1\n  - model: models/ft2\nparameters: {t: 0.5}\n",
        &["slerp", "exactly 1 model besides the base", "has 2"],
    );
    // two models and no base
    expect_failure(
        "merge_method: slerp\nmodels:\n  - model: models/ft1\n  - model: models/ft2\nparameters: {t: 0.5}\n",
        &["slerp needs a `base_model`"],
    );
    // t is required
    expect_failure(
        "merge_method: slerp\nbase_model: models/base\nmodels:\n  - model: models/base\n  - model: models/ft1\n",
        &["required parameter `t`"],
    );
    expect_success(
        "merge_method: slerp\nbase_model: models/base\nmodels:\n  - model: models/base\n  - model: models/ft1\nparameters: {t: 0.5}\n",
    );
}

#[test]
fn nearswap_needs_a_base() {
    expect_failure(
        "merge_method: nearswap\nmodels:\n  - model: models/ft1\n  - model: models/ft2\nparameters: {t: 0.001}\n",
        &["nearswap needs a `base_model`"],
    );
    expect_success(
        "merge_method: nearswap\nbase_model: models/base\nmodels:\n  - model: models/ft1\nparameters: {t: 0.001}\n",
    );
}

#[test]
fn model_stock_needs_two_fine_tunes() {
    expect_failure(
        "merge_method: model_stock\nbase_model: models/base\nmodels:\n  - model: models/ft1\n",
        &["model_stock", "at least 2 models besides the base", "has 1"],
    );
    expect_success(
        "merge_method: model_stock\nbase_model: models/base\nmodels:\n  - model: models/ft1\n  - model: models/ft2\n",
    );
}

#[test]
fn nuslerp_merges_exactly_two_models() {
    expect_failure(
        "merge_method: nuslerp\nmodels:\n  - {model: models/ft1, parameters: {weight: 1.0}}\n  - {model: models/ft2, parameters: {weight: 1.0}}\n  - {model: models/ft3, parameters: {weight: 1.0}}\n",
        &["nuslerp", "exactly 2 models", "has 3"],
    );
    // three besides a base as well
    expect_failure(
        "merge_method: nuslerp\nbase_model: models/base\nmodels:\n  - {model: models/ft1, parameters: {weight: 1.0}}\n  - {model: models/ft2, parameters: {weight: 1.0}}\n  - {model: models/ft3, parameters: {weight: 1.0}}\n",
        &["nuslerp", "exactly 2 models besides the base", "has 3"],
    );
    expect_success(
        "merge_method: nuslerp\nmodels:\n  - {model: models/ft1, parameters: {weight: 1.0}}\n  - {model: models/ft2, parameters: {weight: 1.0}}\n",
    );
}

#[test]
fn karcher_max_iter_is_a_whole_number() {
    expect_failure(
        "merge_method: karcher\nmodels:\n  - model: models/ft1\n  - model: models/ft2\nparameters: {max_iter: 2.5}\n",
        &["max_iter", "2.5", "whole number"],
    );
    expect_success(
        "merge_method: karcher\nmodels:\n  - model: models/ft1\n  - model: models/ft2\nparameters: {max_iter: 3}\n",
    );
}

#[test]
fn della_epsilon_range_is_checked_before_merging() {
    expect_failure(
        "merge_method: della\nbase_model: models/base\nmodels:\n  - {model: models/ft1, parameters: {weight: 1.0, density: 0.9}}\n",
        &["density 0.9", "epsilon 0.15", "(0, 1)"],
    );
    expect_success(
        "merge_method: della\nbase_model: models/base\nmodels:\n  - {model: models/ft1, parameters: {weight: 1.0, density: 0.8}}\n",
    );
}

// ---- smelt methods -----------------------------------------------------------------------

/// One parameter line of `smelt methods`: name, kind, scope, default ("required" or the
/// value after "default").
#[derive(Debug)]
struct Listed {
    name: String,
    kind: String,
    scope: String,
    default: String,
}

/// `smelt methods` parsed: for each method its base-model line and its parameters.
fn listing() -> Vec<(String, String, Vec<Listed>)> {
    let o = smelt().arg("methods").output().expect("run smelt methods");
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    let mut out: Vec<(String, String, Vec<Listed>)> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(' ') {
            let name = line.split(" — ").next().unwrap().to_string();
            out.push((name, String::new(), Vec::new()));
            continue;
        }
        let cur = out.last_mut().expect("a method line first");
        if let Some(b) = line.trim().strip_prefix("base model: ") {
            cur.1 = b.to_string();
        } else if line.starts_with("    ") {
            let t: Vec<&str> = line.split_whitespace().collect();
            let at = t
                .iter()
                .position(|w| ["required", "default", "unset"].contains(w))
                .unwrap_or_else(|| panic!("no default in {line:?}"));
            cur.2.push(Listed {
                name: t[0].to_string(),
                kind: t[1].to_string(),
                scope: t[2..at].join(" "),
                default: if t[at] == "default" {
                    t[at + 1].to_string()
                } else {
                    t[at].to_string()
                },
            });
        }
    }
    out
}

#[test]
fn methods_lists_the_new_methods_with_parameters_and_defaults() {
    const PER_MODEL: &str = "per model (not the base)";
    // mergekit 0.1.5's parameters and defaults (docs/ALGORITHMS.md §1.3): (name, kind, scope,
    // default); a default is "required", "true"/"false" or a number.
    type Param = (&'static str, &'static str, &'static str, &'static str);
    let gta = |normalize: &'static str| -> Vec<Param> {
        vec![
            ("weight", "number", PER_MODEL, "required"),
            ("density", "number", PER_MODEL, "1"),
            ("epsilon", "number", PER_MODEL, "0.15"),
            ("normalize", "boolean", "global", normalize),
            ("rescale", "boolean", "global", "true"),
            ("lambda", "number", "global", "1"),
            ("int8_mask", "boolean", "global", "false"),
            // LiNeS, an option of every task-vector method: off unless lines_beta is set
            ("lines_beta", "number", "global", "unset"),
            ("lines_alpha", "number", "global", "unset"),
        ]
    };
    let want: Vec<(&str, &str, Vec<Param>)> = vec![
        ("della", "required", gta("true")),
        ("della_linear", "required", gta("false")),
        (
            "sce",
            "required",
            vec![
                ("select_topk", "number", "global", "1"),
                ("int8_mask", "boolean", "global", "false"),
            ],
        ),
        (
            "model_stock",
            "required",
            vec![("filter_wise", "boolean", "global", "false")],
        ),
        (
            "slerp",
            "required",
            vec![("t", "number", "global", "required")],
        ),
        (
            "nuslerp",
            "optional",
            vec![
                ("weight", "number", PER_MODEL, "required"),
                ("nuslerp_row_wise", "boolean", "global", "false"),
                ("nuslerp_flatten", "boolean", "global", "true"),
            ],
        ),
        (
            "multislerp",
            "optional",
            vec![
                ("weight", "number", PER_MODEL, "required"),
                ("normalize_weights", "boolean", "global", "true"),
                ("eps", "number", "global", "1e-8"),
            ],
        ),
        (
            "karcher",
            "not used",
            vec![
                ("max_iter", "number", "global", "10"),
                ("tol", "number", "global", "1e-5"),
            ],
        ),
        (
            "nearswap",
            "required",
            vec![("t", "number", "global", "required")],
        ),
    ];
    let got = listing();
    for (method, base, params) in &want {
        let (_, gbase, gparams) = got
            .iter()
            .find(|(n, _, _)| n == method)
            .unwrap_or_else(|| panic!("`smelt methods` does not list {method}"));
        assert!(
            gbase.starts_with(base),
            "{method}: base model {gbase:?}, want {base:?}"
        );
        let mut names: Vec<&str> = gparams.iter().map(|p| p.name.as_str()).collect();
        names.sort();
        let mut want_names: Vec<&str> = params.iter().map(|p| p.0).collect();
        want_names.sort();
        assert_eq!(names, want_names, "{method}: parameters");
        for (name, kind, scope, default) in params {
            let p = gparams.iter().find(|p| p.name == *name).unwrap();
            assert_eq!(
                (p.kind.as_str(), p.scope.as_str()),
                (*kind, *scope),
                "{method}.{name}"
            );
            let same = match (p.default.parse::<f64>(), default.parse::<f64>()) {
                (Ok(a), Ok(b)) => a == b,
                _ => p.default == *default,
            };
            assert!(
                same,
                "{method}.{name}: default {:?}, want {default:?}",
                p.default
            );
        }
    }
    // one method by name prints just that one
    let o = smelt().args(["methods", "karcher"]).output().unwrap();
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.starts_with("karcher — "), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| !l.starts_with(' ') && !l.is_empty())
            .count(),
        1
    );
}
