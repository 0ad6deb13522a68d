//! The binary's device switch: `--device gpu` on the bundled example gives what `--device cpu`
//! gives (within a bf16 ulp; in practice bit for bit), `auto` falls back to the CPU with one
//! line saying so, and `gpu` without an adapter is an error that says why.

use crate::common;

use std::path::Path;

use crate::common::{assert_close, load_dir, smelt, stderr, Tol};

fn merge(recipe: &str, out: &Path, device: &str, env: &[(&str, &str)]) -> std::process::Output {
    let mut c = smelt();
    c.args(["merge", recipe, "-o"])
        .arg(out)
        .args(["--device", device]);
    c.env("RUST_LOG", "smelt=info");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run smelt")
}

#[test]
fn gpu_matches_cpu_on_the_bundled_example() {
    if common::gpu_context().is_none() {
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let tmp = tempfile::tempdir().unwrap();
    for recipe in [
        "ties",
        "dare_ties",
        "task_arithmetic",
        "breadcrumbs",
        "linear",
        "layer_swap",
    ] {
        let path = format!("{root}/assets/recipes/{recipe}.yml");
        let (c, g) = (
            tmp.path().join(format!("{recipe}-cpu")),
            tmp.path().join(format!("{recipe}-gpu")),
        );
        let oc = merge(&path, &c, "cpu", &[]);
        assert!(oc.status.success(), "{recipe} on cpu: {}", stderr(&oc));
        let og = merge(&path, &g, "gpu", &[]);
        assert!(og.status.success(), "{recipe} on gpu: {}", stderr(&og));
        assert!(
            stderr(&og).contains("on gpu:"),
            "{recipe}: did not run on the GPU: {}",
            stderr(&og)
        );
        let (a, b) = (load_dir(&c), load_dir(&g));
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{recipe}"
        );
        for (name, t) in &a {
            let u = &b[name];
            assert_eq!((t.dtype, &t.shape), (u.dtype, &u.shape), "{recipe} {name}");
            assert_close(
                &format!("{recipe} {name}"),
                &u.data,
                &t.data,
                t.dtype,
                Tol::ulps(1),
            );
        }
    }
}

#[test]
fn auto_falls_back_to_the_cpu_and_gpu_refuses_without_an_adapter() {
    let root = env!("CARGO_MANIFEST_DIR");
    let recipe = format!("{root}/assets/recipes/linear.yml");
    let tmp = tempfile::tempdir().unwrap();
    // No adapter: ask wgpu for a backend this machine does not have.
    let none = [(
        "WGPU_BACKEND",
        if cfg!(target_os = "macos") {
            "dx12"
        } else {
            "metal"
        },
    )];
    let o = merge(&recipe, &tmp.path().join("auto"), "auto", &none);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("running on the CPU"), "{err}");
    assert_eq!(err.matches("running on the CPU").count(), 1, "{err}");

    let out = tmp.path().join("gpu");
    let o = merge(&recipe, &out, "gpu", &none);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("--device gpu") && err.contains("no GPU adapter"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn auto_passes_over_a_software_renderer_unless_it_is_named() {
    let Some(ctx) = common::gpu_context() else {
        return;
    };
    let root = env!("CARGO_MANIFEST_DIR");
    let recipe = format!("{root}/assets/recipes/linear.yml");
    let tmp = tempfile::tempdir().unwrap();
    let o = merge(&recipe, &tmp.path().join("auto"), "auto", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    if ctx.info.device_type == "Cpu" {
        // lavapipe (CI): the CPU path is faster, and auto says why it did not use the adapter
        assert!(out.contains("on cpu"), "{out}");
        assert!(stderr(&o).contains("software renderer"), "{}", stderr(&o));
        // named, it is used
        let mut c = smelt();
        c.args(["merge", &recipe, "-o"])
            .arg(tmp.path().join("named"))
            .args(["--device", "auto", "--adapter", "0"]);
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("on gpu"));
    } else {
        assert!(out.contains("on gpu"), "{out}");
    }
}
