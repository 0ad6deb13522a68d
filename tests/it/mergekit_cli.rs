//! mergekit-yaml's command line and recipes as mergekit users write them (issue 17): the
//! positional output, mergekit's flags, `--out-shard-size` in mergekit's units, the
//! architecture check and `--allow-crimes`, parameters mergekit ignores, YAML merge keys,
//! mixed float16/bfloat16 inputs, a single-file output, `tokenizer_source: base` without a
//! tokenizer, extra tensors in one model, and mergekit's own example configs.
//!
//! Every run goes through the real binary on the CPU. Failures must exit 1, name the culprit,
//! leave the inputs byte-identical and write no output.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Output;

use crate::common::*;
use smelt::dtype::DType;

const LINEAR: &str = "merge_method: linear
models:
  - model: models/ft1
    parameters: {weight: 0.7}
  - model: models/ft2
    parameters: {weight: 0.3}
dtype: float32
";

const TIES: &str = "merge_method: ties
base_model: models/base
models:
  - model: models/ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: models/ft2
    parameters: {weight: 0.5, density: 0.7}
dtype: float32
";

/// `smelt merge ARGS... --device cpu` (the caller gives recipe and output as it wants).
fn merge(args: &[&OsStr]) -> Output {
    let mut c = smelt();
    c.arg("merge").args(args).args(cpu_args());
    c.output().expect("run smelt")
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

#[track_caller]
fn ok(o: &Output) -> String {
    let err = stderr(o);
    assert!(
        o.status.success(),
        "expected success; stdout: {}\nstderr: {err}",
        String::from_utf8_lossy(&o.stdout)
    );
    err
}

/// Exit code 1 and every needle in stderr.
#[track_caller]
fn fails(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit code 1; stdout: {}\nstderr: {err}",
        String::from_utf8_lossy(&o.stdout)
    );
    for n in needles {
        assert!(err.contains(n), "stderr does not mention {n:?}:\n{err}");
    }
    err
}

/// Every file under the model folders, for byte-identity of the inputs.
fn inputs(s: &Setup) -> BTreeMap<String, Vec<u8>> {
    let mut all = BTreeMap::new();
    for e in std::fs::read_dir(&s.models).unwrap() {
        let d = e.unwrap().path();
        for (k, v) in dir_bytes(&d) {
            all.insert(format!("{}/{k}", d.display()), v);
        }
    }
    all
}

/// Nothing but the recipes and the models in the sandbox: no output, no hidden folder.
#[track_caller]
fn nothing_written(s: &Setup) {
    for e in std::fs::read_dir(s.dir()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(
            name == "models" || name.ends_with(".yml"),
            "left behind: {}",
            s.dir().join(&name).display()
        );
    }
}

/// Lines of stderr that mention `needle`.
fn lines_with(err: &str, needle: &str) -> usize {
    err.lines().filter(|l| l.contains(needle)).count()
}

// ---- the command line -------------------------------------------------------------------

#[test]
fn positional_output_is_the_same_as_dash_o() {
    let s = Setup::new();
    let r = s.recipe(TIES);
    let (a, b) = (s.dir().join("a/out"), s.dir().join("b/out"));
    std::fs::create_dir_all(a.parent().unwrap()).unwrap();
    std::fs::create_dir_all(b.parent().unwrap()).unwrap();
    ok(&merge(&[r.as_os_str(), a.as_os_str()]));
    ok(&merge(&[r.as_os_str(), os("-o"), b.as_os_str()]));
    let (da, db) = (dir_bytes(&a), dir_bytes(&b));
    assert!(da.contains_key("model.safetensors") && da.contains_key("README.md"));
    assert_eq!(da.keys().collect::<Vec<_>>(), db.keys().collect::<Vec<_>>());
    for (k, v) in &da {
        assert!(v == &db[k], "{k} differs between OUT_PATH and -o OUT");
    }
}

#[test]
fn output_given_twice_or_not_at_all_is_refused() {
    let s = Setup::new();
    let r = s.recipe(TIES);
    let before = inputs(&s);
    let (a, b) = (s.dir().join("one"), s.dir().join("two"));
    let o = merge(&[r.as_os_str(), a.as_os_str(), os("-o"), b.as_os_str()]);
    fails(&o, &["given twice", "one", "two", "give one of them"]);
    let o = merge(&[r.as_os_str()]);
    fails(&o, &["no output", "-o OUT"]);
    assert_eq!(inputs(&s), before);
    nothing_written(&s);
}

#[test]
fn mergekit_yaml_flags_run_and_change_only_what_they_say() {
    let s = Setup::new();
    let r = s.recipe(TIES);
    let plain = s.dir().join("plain");
    ok(&merge(&[
        r.as_os_str(),
        os("-o"),
        plain.as_os_str(),
        os("--seed"),
        os("3"),
        os("--threads"),
        os("2"),
    ]));
    let mk = s.dir().join("mk");
    let err = ok(&merge(&[
        r.as_os_str(),
        mk.as_os_str(),
        os("--allow-crimes"),
        os("--lazy-unpickle"),
        os("--no-copy-tokenizer"),
        os("--random-seed"),
        os("3"),
        os("-j"),
        os("2"),
        os("--no-write-model-card"),
        os("--out-shard-size"),
        os("1B"),
        os("--trust-remote-code"),
        os("--quiet"),
    ]));
    // one line for each flag that does nothing here, and none for those that do something
    assert_eq!(
        lines_with(&err, "--lazy-unpickle has no effect"),
        1,
        "{err}"
    );
    assert_eq!(
        lines_with(&err, "--trust-remote-code has no effect"),
        1,
        "{err}"
    );
    for f in [
        "--allow-crimes",
        "--no-copy-tokenizer",
        "--random-seed",
        "--quiet",
    ] {
        assert_eq!(lines_with(&err, f), 0, "{f}: {err}");
    }
    let (p, m) = (dir_bytes(&plain), dir_bytes(&mk));
    assert!(
        !m.contains_key("README.md"),
        "--no-write-model-card wrote a card"
    );
    assert!(p.contains_key("README.md"));
    // 1B is mergekit's billion bytes: the tiny model stays in one shard
    assert!(m.contains_key("model.safetensors") && !m.contains_key("model.safetensors.index.json"));
    assert!(
        m["model.safetensors"] == p["model.safetensors"],
        "--random-seed/-j differ from --seed/--threads"
    );
}

#[test]
fn num_threads_long_form_and_cuda_device_name_are_accepted() {
    let s = Setup::new();
    let r = s.recipe(LINEAR);
    let out = s.dir().join("out");
    let o = smelt()
        .arg("merge")
        .arg(&r)
        .arg(&out)
        .args(["--num-threads", "1", "--dry-run"])
        .output()
        .unwrap();
    ok(&o);
    // `--device cuda` is mergekit's spelling of --device gpu; --cuda says the same, and
    // both refuse --device cpu beside them
    let o = smelt()
        .arg("merge")
        .arg(&r)
        .arg(&out)
        .args(["--device", "cuda", "--dry-run"])
        .output()
        .unwrap();
    ok(&o);
    let o = smelt()
        .arg("merge")
        .arg(&r)
        .arg(&out)
        .args(["--cuda", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--cuda"), "{}", stderr(&o));
    assert!(!out.exists());
}

#[test]
fn cuda_means_the_gpu() {
    // with a GPU the merge runs there; without one it fails as --device gpu does
    let s = Setup::new();
    let r = s.recipe(LINEAR);
    let out = s.dir().join("out");
    let o = smelt()
        .arg("merge")
        .arg(&r)
        .arg(&out)
        .arg("--cuda")
        .output()
        .unwrap();
    if o.status.success() {
        let said = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(!said.contains("on cpu"), "--cuda ran on the CPU: {said}");
    } else {
        fails(&o, &["--device gpu"]);
        assert!(!out.exists());
    }
}

#[test]
fn out_shard_size_reads_mergekit_units() {
    let s = Setup::new();
    let r = s.recipe(TIES);
    let dry = |size: &str| {
        let o = merge(&[
            r.as_os_str(),
            os("out"),
            os("--dry-run"),
            os("--out-shard-size"),
            os(size),
        ]);
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        ok(&o);
        out.lines()
            .find(|l| l.starts_with("output"))
            .unwrap()
            .to_string()
    };
    assert!(dry("1B").ends_with("in 1 shard"), "{}", dry("1B"));
    assert!(dry("5B").ends_with("in 1 shard"));
    // a plain number is bytes: every tensor of the tiny model in its own shard
    assert!(dry("1").ends_with("in 21 shards"), "{}", dry("1"));
    let o = merge(&[r.as_os_str(), os("out"), os("--out-shard-size"), os("0B")]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("0B"), "{}", stderr(&o));
}

// ---- architectures ----------------------------------------------------------------------

#[test]
fn different_architectures_need_allow_crimes() {
    let s = Setup::new();
    let cfg = s.model("ft2").join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let other = text
        .replace("LlamaForCausalLM", "MistralForCausalLM")
        .replace("\"llama\"", "\"mistral\"");
    assert_ne!(text, other);
    std::fs::write(&cfg, other).unwrap();
    let r = s.recipe(TIES);
    let before = inputs(&s);
    let out = s.out();
    let o = merge(&[r.as_os_str(), out.as_os_str()]);
    let err = fails(
        &o,
        &[
            "ft2",
            "MistralForCausalLM",
            "LlamaForCausalLM",
            "--allow-crimes",
        ],
    );
    assert!(err.contains("config.json"), "{err}");
    assert_eq!(inputs(&s), before);
    nothing_written(&s);
    // with it, the weights are those of the same merge between same-architecture models
    let crimes = s.dir().join("crimes");
    ok(&merge(&[
        r.as_os_str(),
        crimes.as_os_str(),
        os("--allow-crimes"),
    ]));
    std::fs::write(&cfg, text).unwrap();
    let same = s.dir().join("same");
    ok(&merge(&[r.as_os_str(), same.as_os_str()]));
    assert!(
        std::fs::read(crimes.join("model.safetensors")).unwrap()
            == std::fs::read(same.join("model.safetensors")).unwrap()
    );
}

// ---- tokenizer and model card -----------------------------------------------------------

/// A sandbox with the asset models (base has tokenizer files, the others have none).
fn asset_setup() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    for m in ["base", "chat", "math"] {
        copy_dir(
            &root().join("assets/models").join(m),
            &tmp.path().join("models").join(m),
        );
    }
    let r = tmp.path().join("r.yml");
    std::fs::write(
        &r,
        "merge_method: task_arithmetic\nbase_model: models/base\nmodels:\n  - model: models/chat\n    parameters: {weight: 0.5}\n  - model: models/math\n    parameters: {weight: 0.5}\n",
    )
    .unwrap();
    (tmp, r)
}

#[test]
fn copy_tokenizer_flags() {
    let (tmp, r) = asset_setup();
    let with = tmp.path().join("with");
    ok(&merge(&[
        r.as_os_str(),
        with.as_os_str(),
        os("--copy-tokenizer"),
    ]));
    assert!(with.join("tokenizer.json").is_file());
    let without = tmp.path().join("without");
    ok(&merge(&[
        r.as_os_str(),
        without.as_os_str(),
        os("--no-copy-tokenizer"),
    ]));
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        assert!(
            !without.join(f).exists(),
            "{f} copied with --no-copy-tokenizer"
        );
    }
    assert!(without.join("config.json").is_file());
    assert!(
        std::fs::read(with.join("model.safetensors")).unwrap()
            == std::fs::read(without.join("model.safetensors")).unwrap()
    );
    // a tokenizer the recipe names is written anyway, as mergekit does
    let text = std::fs::read_to_string(&r).unwrap() + "tokenizer_source: base\n";
    let r2 = tmp.path().join("r2.yml");
    std::fs::write(&r2, text).unwrap();
    let named = tmp.path().join("named");
    ok(&merge(&[
        r2.as_os_str(),
        named.as_os_str(),
        os("--no-copy-tokenizer"),
    ]));
    assert!(named.join("tokenizer.json").is_file());
}

#[test]
fn tokenizer_source_base_without_a_tokenizer_is_an_error() {
    let s = Setup::new();
    let r = s.recipe(&format!("{TIES}tokenizer_source: base\n"));
    let before = inputs(&s);
    let out = s.out();
    let o = merge(&[r.as_os_str(), out.as_os_str()]);
    fails(
        &o,
        &[
            "recipe.yml",
            "tokenizer_source",
            "models/base",
            "no tokenizer files",
        ],
    );
    assert_eq!(inputs(&s), before);
    nothing_written(&s);
    // and without a base_model to take it from
    let r = s.recipe(&format!("{LINEAR}tokenizer_source: base\n"));
    let o = merge(&[r.as_os_str(), out.as_os_str()]);
    fails(
        &o,
        &["recipe.yml", "tokenizer_source: base", "no `base_model`"],
    );
    nothing_written(&s);
}

// ---- parameters mergekit ignores ---------------------------------------------------------

#[test]
fn parameters_another_method_takes_are_ignored_with_one_warning_each() {
    let s = Setup::new();
    let plain = s.dir().join("plain");
    ok(&merge(&[s.recipe(LINEAR).as_os_str(), plain.as_os_str()]));
    let noisy = LINEAR.replace("{weight: 0.7}", "{weight: 0.7, density: 0.5}")
        + "parameters:\n  int8_mask: true\n  normalize: false\n";
    let r = s.recipe_named("noisy.yml", &noisy);
    let out = s.dir().join("noisy");
    let err = ok(&merge(&[r.as_os_str(), out.as_os_str()]));
    assert_eq!(lines_with(&err, "int8_mask"), 1, "{err}");
    assert_eq!(lines_with(&err, "density"), 1, "{err}");
    assert!(err.contains("models[0].parameters.density"), "{err}");
    assert!(
        err.contains("linear does not use `int8_mask`") && err.contains("ignored"),
        "{err}"
    );
    // linear's own `normalize` is used, so it warns about nothing
    assert_eq!(lines_with(&err, "`normalize`"), 0, "{err}");
    assert!(
        std::fs::read(out.join("model.safetensors")).unwrap()
            == std::fs::read(plain.join("model.safetensors")).unwrap()
    );
    // `weight` on a slerp entry: mergekit's gradient-slerp examples carry it
    let slerp = "merge_method: slerp\nbase_model: models/ft1\nmodels:\n  - model: models/ft1\n    parameters: {weight: 1.0}\n  - model: models/ft2\n    parameters: {weight: 0.5}\nparameters: {t: 0.3}\ndtype: float32\n";
    let r = s.recipe_named("slerp.yml", slerp);
    let out = s.dir().join("slerp");
    let err = ok(&merge(&[r.as_os_str(), out.as_os_str()]));
    assert_eq!(lines_with(&err, "slerp does not use `weight`"), 2, "{err}");
}

#[test]
fn a_parameter_no_method_takes_is_still_an_error_with_a_hint() {
    let s = Setup::new();
    let before = inputs(&s);
    let r = s.recipe(&TIES.replacen("density: 0.5", "densty: 0.5", 1));
    let out = s.out();
    let o = merge(&[r.as_os_str(), out.as_os_str()]);
    fails(
        &o,
        &[
            "recipe.yml",
            "models[0].parameters",
            "`densty`",
            "did you mean `density`?",
        ],
    );
    let r = s.recipe(&LINEAR.replacen("weight: 0.7", "wieght: 0.7", 1));
    let o = merge(&[r.as_os_str(), out.as_os_str()]);
    fails(&o, &["`wieght`", "did you mean `weight`?"]);
    assert_eq!(inputs(&s), before);
    nothing_written(&s);
}

#[test]
fn a_misspelt_parameter_of_another_method_warns_with_the_hint() {
    // `gamma` is breadcrumbs' parameter; on ties it is ignored, as mergekit ignores it
    let s = Setup::new();
    let r = s.recipe(&TIES.replacen("density: 0.5", "density: 0.5, gamma: 0.1", 1));
    let out = s.out();
    let err = ok(&merge(&[r.as_os_str(), out.as_os_str()]));
    assert_eq!(lines_with(&err, "ties does not use `gamma`"), 1, "{err}");
}

// ---- YAML merge keys ---------------------------------------------------------------------

#[test]
fn yaml_merge_keys_expand_as_in_mergekit() {
    let s = Setup::new();
    let plain = s.dir().join("plain");
    ok(&merge(&[s.recipe(TIES).as_os_str(), plain.as_os_str()]));
    let anchored = "merge_method: ties
base_model: models/base
models:
  - model: models/ft1
    parameters: &common {weight: 1.0, density: 0.5}
  - model: models/ft2
    parameters:
      <<: *common
      weight: 0.5
      density: 0.7
dtype: float32
";
    let r = s.recipe_named("anchored.yml", anchored);
    let out = s.dir().join("anchored");
    ok(&merge(&[r.as_os_str(), out.as_os_str()]));
    assert!(
        std::fs::read(out.join("model.safetensors")).unwrap()
            == std::fs::read(plain.join("model.safetensors")).unwrap()
    );
    // a merge key whose value is not a mapping is named
    let bad = anchored.replace("<<: *common", "<<: 3");
    let r = s.recipe_named("bad.yml", &bad);
    let out = s.dir().join("bad");
    let o = merge(&[r.as_os_str(), out.as_os_str()]);
    fails(&o, &["bad.yml", "`<<`"]);
    assert!(!out.exists());
}

// ---- dtypes ------------------------------------------------------------------------------

/// Rewrites a model's tensors in `dt`.
fn convert(s: &Setup, m: &str, dt: DType) {
    let ts = load_st(&s.st(m));
    let conv: Vec<(String, T)> = ts
        .into_iter()
        .map(|(n, mut t)| {
            t.dtype = dt;
            (n, t)
        })
        .collect();
    let list: Vec<(&str, &T)> = conv.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_st(&s.st(m), &list);
}

#[test]
fn mixed_float16_and_bfloat16_inputs_write_float32() {
    let s = Setup::new();
    convert(&s, "ft1", DType::F16);
    convert(&s, "ft2", DType::BF16);
    let text = LINEAR.replace("dtype: float32\n", "");
    let r = s.recipe(&text);
    let out = s.out();
    let err = ok(&merge(&[r.as_os_str(), out.as_os_str()]));
    assert_eq!(
        lines_with(&err, "float16 in some models and bfloat16 in others"),
        1,
        "{err}"
    );
    assert!(
        err.contains("21 tensors") && err.contains("float32"),
        "{err}"
    );
    let got = load_dir(&out);
    assert_eq!(got.len(), 21);
    assert!(got.values().all(|t| t.dtype == DType::F32));
    // the values are the float32 merge of the inputs as stored
    let (a, b) = (load_st(&s.st("ft1")), load_st(&s.st("ft2")));
    for (name, t) in &got {
        for (i, x) in t.data.iter().enumerate() {
            let want = 0.7 * a[name].data[i] + 0.3 * b[name].data[i];
            assert!((x - want).abs() <= 1e-6 * (1.0 + want.abs()), "{name}[{i}]");
        }
    }
    let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(cfg.contains("\"float32\""), "{cfg}");
    // a recipe dtype decides, silently
    let r = s.recipe_named("bf.yml", &format!("{text}dtype: bfloat16\n"));
    let out = s.dir().join("bf");
    let err = ok(&merge(&[r.as_os_str(), out.as_os_str()]));
    assert_eq!(lines_with(&err, "bfloat16 in others"), 0, "{err}");
    assert!(load_dir(&out).values().all(|t| t.dtype == DType::BF16));
}

#[test]
fn one_half_dtype_keeps_its_dtype() {
    // float16 + float32 is not the mixed case: the reference's dtype, as before
    let s = Setup::new();
    convert(&s, "ft1", DType::F16);
    let r = s.recipe(&LINEAR.replace("dtype: float32\n", ""));
    let out = s.out();
    let err = ok(&merge(&[r.as_os_str(), out.as_os_str()]));
    assert_eq!(lines_with(&err, "bfloat16"), 0, "{err}");
    assert!(load_dir(&out).values().all(|t| t.dtype == DType::F16));
}

// ---- a single-file output ---------------------------------------------------------------

#[test]
fn a_safetensors_path_writes_one_file() {
    let s = Setup::new();
    let r = s.recipe(TIES);
    let folder = s.dir().join("folder");
    ok(&merge(&[r.as_os_str(), folder.as_os_str()]));
    let file = s.dir().join("merged.safetensors");
    let err = ok(&merge(&[
        r.as_os_str(),
        os("-o"),
        file.as_os_str(),
        os("--out-shard-size"),
        os("1000"),
    ]));
    assert!(file.is_file(), "{} is not a file", file.display());
    assert!(
        std::fs::read(&file).unwrap() == std::fs::read(folder.join("model.safetensors")).unwrap(),
        "the single file differs from the folder's model.safetensors"
    );
    assert_eq!(
        lines_with(&err, "no config.json, tokenizer or model card"),
        1,
        "{err}"
    );
    // nothing else beside it
    let names: Vec<String> = std::fs::read_dir(s.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        names.iter().all(|n| ["models", "recipe.yml", "folder", "merged.safetensors"].contains(&n.as_str())),
        "{names:?}"
    );
    // an existing file is never replaced, with or without --force
    let before = std::fs::read(&file).unwrap();
    for extra in [&[][..], &["--force"][..]] {
        let mut args = vec![r.as_os_str(), file.as_os_str()];
        args.extend(extra.iter().map(|a| os(a)));
        let o = merge(&args);
        fails(
            &o,
            &["merged.safetensors", "already exists", "remove it yourself"],
        );
        assert!(std::fs::read(&file).unwrap() == before);
    }
}

// ---- tensors only some models have --------------------------------------------------------

/// Adds tensors to a model's file.
fn add_tensors(s: &Setup, m: &str, extra: &[(&str, T)]) {
    let mut ts = load_st(&s.st(m));
    for (n, t) in extra {
        ts.insert(n.to_string(), t.clone());
    }
    let list: Vec<(&str, &T)> = ts.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_st(&s.st(m), &list);
}

fn inv_freq(seed: f32) -> T {
    T::f32(&[6], (0..6).map(|i| seed / (i as f32 + 1.0)).collect())
}

#[test]
fn a_buffer_only_some_models_have_is_copied_from_the_first_that_has_it() {
    const ROPE: &str = "model.rotary_emb.inv_freq";
    const LAYER_ROPE: &str = "model.layers.1.self_attn.rotary_emb.inv_freq";
    for holder in ["ft1", "ft2"] {
        let s = Setup::new();
        let r = s.recipe(TIES);
        let plain = s.dir().join("plain");
        ok(&merge(&[r.as_os_str(), plain.as_os_str()]));
        add_tensors(
            &s,
            holder,
            &[(ROPE, inv_freq(1.0)), (LAYER_ROPE, inv_freq(2.0))],
        );
        let before = inputs(&s);
        let out = s.out();
        let err = ok(&merge(&[r.as_os_str(), out.as_os_str()]));
        assert_eq!(inputs(&s), before);
        // one line for the buffers copied from one model
        let line: Vec<&str> = err.lines().filter(|l| l.contains(ROPE)).collect();
        assert_eq!(line.len(), 1, "{err}");
        assert!(
            line[0].contains(LAYER_ROPE)
                && line[0].contains(&format!("copied unmerged from models/{holder}"))
                && line[0].contains("models/base"),
            "{err}"
        );
        let got = load_dir(&out);
        let want = load_dir(&plain);
        assert_eq!(got.len(), want.len() + 2, "{holder}");
        assert_eq!(got[ROPE], inv_freq(1.0), "{holder}");
        assert_eq!(got[LAYER_ROPE], inv_freq(2.0), "{holder}");
        for (n, t) in &want {
            assert_eq!(&got[n], t, "{holder}: {n} changed by the extra buffers");
        }
    }
}

#[test]
fn a_weight_only_a_later_model_has_is_an_error_naming_both() {
    let s = Setup::new();
    let w = T::f32(&[2, 48], vec![0.5; 96]);
    add_tensors(&s, "ft2", &[("score.weight", w)]);
    let before = inputs(&s);
    let r = s.recipe(LINEAR);
    let out = s.out();
    let o = merge(&[r.as_os_str(), out.as_os_str()]);
    fails(
        &o,
        &[
            "score.weight",
            "missing from model models/ft1",
            "models/ft2 has it",
        ],
    );
    assert_eq!(inputs(&s), before);
    nothing_written(&s);
}

// ---- mergekit's own example configs ------------------------------------------------------

/// One of mergekit's example configs (tests/fixtures/mergekit-examples, see its README).
pub struct Example {
    pub name: String,
    pub path: PathBuf,
    pub text: String,
    pub method: String,
    /// Whether smelt implements its merge method.
    pub supported: bool,
}

/// mergekit's example configs, by file name, each with its method and whether smelt has it.
pub fn mergekit_examples() -> Vec<Example> {
    let dir = root().join("tests/fixtures/mergekit-examples");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().and_then(|x| x.to_str()) != Some("yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_norway::Value = serde_norway::from_str(&text).unwrap();
        let method = v["merge_method"].as_str().unwrap().to_string();
        out.push(Example {
            name: path.file_name().unwrap().to_string_lossy().to_string(),
            supported: smelt::methods::find(&method).is_some(),
            path,
            text,
            method,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[test]
fn mergekit_examples_parse_where_smelt_has_the_method() {
    use smelt::recipe::{Recipe, Setting};
    let all = mergekit_examples();
    let names: Vec<&str> = all.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "arcee_fusion.yml",
            "bio-merge.yml",
            "gradient-slerp.yml",
            "linear.yml",
            "orcamini-platy-44layer.yml",
            "ties.yml"
        ]
    );
    let unsupported: Vec<&str> = all
        .iter()
        .filter(|e| !e.supported)
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(unsupported, ["arcee_fusion.yml"]);
    for e in all.iter().filter(|e| !e.supported) {
        let err = Recipe::parse(&e.text, &e.path).unwrap_err().to_string();
        assert!(
            err.contains(&format!("unknown merge_method `{}`", e.method)),
            "{}: {err}",
            e.name
        );
    }
    // what each supported example says, as mergekit reads it (its Hub ids from a test cache)
    let (_hub, env) = crate::mergekit_examples::all_models_cache();
    let parse = |name: &str| {
        let e = all.iter().find(|e| e.name == name).unwrap();
        let r = Recipe::parse_with_hub(&e.text, &e.path, &env)
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(r.method.name, e.method, "{name}");
        assert!(r.warnings.is_empty(), "{name}: {:?}", r.warnings);
        r
    };
    let r = parse("ties.yml");
    assert_eq!(r.slices[0].sources.len(), 3);
    assert_eq!(r.base_model.unwrap().raw, "TheBloke/Llama-2-13B-fp16");
    assert_eq!(r.dtype, Some(DType::F16));
    assert!(r.parameters.contains_key("normalize") && r.parameters.contains_key("int8_mask"));
    let ft = &r.slices[0].sources;
    assert!(matches!(ft[0].parameters["density"], Setting::List(ref l) if l.len() == 3));
    assert!(matches!(ft[1].parameters["weight"], Setting::List(ref l) if l.len() == 4));
    assert!(matches!(ft[2].parameters["weight"], Setting::Cond(ref c) if c.len() == 2));
    let r = parse("bio-merge.yml");
    assert_eq!(r.slices[0].sources.len(), 2);
    assert_eq!(r.base_model.unwrap().raw, "mistralai/Mistral-7B-v0.1");
    let r = parse("gradient-slerp.yml");
    assert!(!r.from_models);
    assert_eq!(r.slices[0].sources[1].layer_range, Some((0, 40)));
    assert!(matches!(r.parameters["t"], Setting::Cond(ref c) if c.len() == 3));
    let r = parse("linear.yml");
    assert_eq!(r.slices[0].sources.len(), 3);
    let r = parse("orcamini-platy-44layer.yml");
    assert_eq!(r.slices.len(), 2);
    assert_eq!(r.slices[1].sources[0].layer_range, Some((20, 40)));
}

#[test]
fn a_shard_size_that_makes_over_1000_shards_is_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    let ts: Vec<(String, T)> = (0..1001)
        .map(|i| (format!("w{i}"), T::f32(&[1], vec![i as f32])))
        .collect();
    let list: Vec<(&str, &T)> = ts.iter().map(|(n, t)| (n.as_str(), t)).collect();
    for m in ["a", "b"] {
        write_model(&tmp.path().join(m), 0, &list);
    }
    let r = tmp.path().join("r.yml");
    std::fs::write(
        &r,
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n    parameters: {weight: 1}\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let dry = |size: &str| {
        let o = merge(&[
            r.as_os_str(),
            out.as_os_str(),
            os("--dry-run"),
            os("--out-shard-size"),
            os(size),
        ]);
        ok(&o)
    };
    let err = dry("1");
    assert_eq!(lines_with(&err, "makes 1001 shards"), 1, "{err}");
    assert!(err.contains("5B = 5e9 bytes"), "{err}");
    let err = dry("1B");
    assert_eq!(lines_with(&err, "shards"), 0, "{err}");
    assert!(!out.exists());
}
