//! `smelt bench` end to end at a tiny size: every primitive (the linear-algebra ones included)
//! and every listed method gets a row per backend with a positive time, and the JSON report
//! carries the machine description users share.

use crate::common;

use std::collections::BTreeSet;

#[test]
fn bench_reports_every_primitive_and_method_on_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let o = common::smelt()
        .args(["bench", "--elements", "8192", "--repeats", "1", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(v["memcpy_gbps"].as_f64().unwrap() > 0.0);
    assert!(!v["git_hash"].as_str().unwrap().is_empty());
    let rows = v["rows"].as_array().unwrap();
    let backends: BTreeSet<&str> = rows
        .iter()
        .map(|r| r["backend"].as_str().unwrap())
        .collect();
    let want_backends = if common::gpu_context().is_some() {
        2
    } else {
        1
    };
    assert_eq!(backends.len(), want_backends, "{backends:?}");
    let listed = common::smelt().arg("methods").output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    let methods: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.split_once(" — ").map(|(m, _)| m.trim()))
        .collect();
    assert!(methods.len() >= 20, "{methods:?}");
    for b in &backends {
        let of = |kind: &str| -> Vec<&str> {
            rows.iter()
                .filter(|r| r["backend"] == *b && r["kind"] == kind)
                .map(|r| {
                    assert!(r["seconds"].as_f64().unwrap() > 0.0, "{r}");
                    r["name"].as_str().unwrap()
                })
                .collect()
        };
        let prims = of("primitive");
        for p in [
            "convert",
            "weighted_sum",
            "select",
            "gta",
            "dots",
            "combine",
            "matmul",
            "svd",
        ] {
            assert!(
                prims.iter().any(|n| n.starts_with(p)),
                "{b}: no {p} row in {prims:?}"
            );
        }
        let ms = of("method");
        for m in &methods {
            assert!(ms.contains(m), "{b}: method {m} missing from the bench");
            assert!(table.contains(m));
        }
    }
}
