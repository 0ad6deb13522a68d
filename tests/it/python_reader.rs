//! The output folder read by the reference implementation: the Python `safetensors` package
//! (numpy API, tests/py/read_safetensors.py) must see exactly the tensors merged in-process on
//! the CPU: names, dtypes, shapes and bytes, in a single file and in several shards with an
//! index. Python 3 with numpy and safetensors is required: without it these tests fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use crate::common::*;
use smelt::backend::cpu::Cpu;
use smelt::dtype::DType;
use smelt::plan::Plan;

fn python() -> Command {
    let ok = Command::new("python3")
        .args(["-c", "import numpy, safetensors.numpy"])
        .output();
    match ok {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "python3 cannot import numpy and safetensors ({}); install them with \
             `python3 -m pip install numpy safetensors` — these tests check smelt's output \
             with the reference reader and must not be skipped",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "python3 is not runnable ({e}); install Python 3 with numpy and safetensors — \
             these tests check smelt's output with the reference reader and must not be skipped"
        ),
    }
    Command::new("python3")
}

fn read_with_python(dir: &Path) -> serde_json::Value {
    let o = python()
        .arg(root().join("tests/py/read_safetensors.py"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "read_safetensors.py failed on {}:\n{}",
        dir.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("the script prints JSON")
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2));
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn numpy_name(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "float32",
        DType::F16 => "float16",
        other => panic!("numpy has no {other}"),
    }
}

/// Merges `plan` on the CPU into `out` with the given shard size, reads it back with Python
/// and compares with the in-process result. Returns the script's JSON.
fn check_plan(plan: &Plan, out: &Path, shard: u64) -> serde_json::Value {
    let want = merge_plan_bytes(plan, &Cpu::new());
    execute_to(plan, &Cpu::new(), out, shard);
    let py = read_with_python(out);
    let tensors = py["tensors"].as_array().unwrap();
    let mut seen = BTreeMap::new();
    for t in tensors {
        let name = t["name"].as_str().unwrap().to_string();
        let task = plan
            .tasks
            .iter()
            .find(|x| x.name == name)
            .unwrap_or_else(|| panic!("python sees a tensor smelt did not plan: {name}"));
        assert_eq!(t["dtype"], numpy_name(task.out_dtype), "{name}: dtype");
        let shape: Vec<usize> = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape, task.shape, "{name}: shape");
        let bytes = unhex(t["hex"].as_str().unwrap());
        let exp = &want[&name];
        if bytes != *exp {
            let mut g = vec![0f32; task.numel()];
            let mut e = vec![0f32; task.numel()];
            smelt::dtype::decode(task.out_dtype, &bytes, &mut g);
            smelt::dtype::decode(task.out_dtype, exp, &mut e);
            assert_close(&name, &g, &e, task.out_dtype, Tol::EXACT);
            panic!("{name}: bytes differ (values equal up to ±0)");
        }
        let file = t["file"].as_str().unwrap().to_string();
        assert!(
            seen.insert(name.clone(), file).is_none(),
            "{name} is stored twice"
        );
    }
    assert_eq!(
        seen.len(),
        plan.tasks.len(),
        "python read a different tensor count"
    );
    py
}

#[test]
fn single_file_reads_back_in_python() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let plan = plan_file(&case_dir("ties").join("config.yml"), None);
    let py = check_plan(&plan, &out, 5_000_000_000);
    assert_eq!(py["files"], serde_json::json!(["model.safetensors"]));
    assert!(py["index"].is_null());
    assert!(!out.join("model.safetensors.index.json").exists());
}

#[test]
fn shards_and_index_read_back_in_python() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let plan = plan_file(&case_dir("task_arithmetic").join("config.yml"), None);
    let shard = 60_000u64;
    let py = check_plan(&plan, &out, shard);

    let files: Vec<String> = py["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect();
    let n = files.len();
    assert!(
        n >= 3,
        "expected several shards at {shard} bytes, got {files:?}"
    );
    let names: Vec<String> = (1..=n)
        .map(|k| format!("model-{k:05}-of-{n:05}.safetensors"))
        .collect();
    assert_eq!(files, names, "shard file names");
    assert!(!out.join("model.safetensors").exists());

    // the index: total_size and a weight_map naming every tensor once, with its real shard
    let index = &py["index"];
    let total: u64 = plan.out_bytes();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
    let map = index["weight_map"].as_object().unwrap();
    let planned: BTreeSet<&str> = plan.tasks.iter().map(|t| t.name.as_str()).collect();
    let mapped: BTreeSet<&str> = map.keys().map(|k| k.as_str()).collect();
    assert_eq!(mapped, planned, "weight_map keys");
    // the raw JSON must not list a tensor twice (a JSON object parser would hide it)
    let raw = std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap();
    for name in &planned {
        assert_eq!(
            raw.matches(&format!("\"{name}\"")).count(),
            1,
            "{name} in the index"
        );
    }
    for t in py["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        assert_eq!(
            map[name], t["file"],
            "{name}: weight_map vs the shard holding it"
        );
    }
    // shards respect the size limit unless one tensor alone exceeds it
    let mut per_file: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    for task in &plan.tasks {
        let f = map[&task.name].as_str().unwrap().to_string();
        let e = per_file.entry(f).or_default();
        e.0 += task.out_bytes();
        e.1 += 1;
    }
    for (f, (bytes, count)) in per_file {
        assert!(
            bytes <= shard || count == 1,
            "{f}: {bytes} bytes in {count} tensors, over {shard}"
        );
    }
}

#[test]
fn half_precision_output_reads_back_in_python() {
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(case_dir("breadcrumbs").join("config.yml")).unwrap();
    let models = fixtures().join("models");
    let text = text
        .replace("../../models", models.to_str().unwrap())
        .replace("out_dtype: float32", "out_dtype: float16");
    let plan = plan_text(tmp.path(), &text, None);
    assert!(plan.tasks.iter().all(|t| t.out_dtype == DType::F16));
    let out = tmp.path().join("out");
    check_plan(&plan, &out, 40_000);
}
