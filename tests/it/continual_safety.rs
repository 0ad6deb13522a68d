//! `smelt continual` checks the state it continues before any work: the state must belong to
//! the weights beside it (the digest of their manifest entries, every weight file re-hashed),
//! the new model must be none of the models already folded in, nor the merge, nor the base.
//! Each refusal exits 1 with a message naming the file and what to do, leaves every input
//! byte-identical and writes nothing. Also `--out-dtype`, and a stopped `continual` (which
//! has no `--resume`) never offers `--resume`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use smelt::dtype::DType;
use smelt::io::writer::partial_path_for;
use smelt::methods::opcm::STATE_NAME;

const MANIFEST: &str = "smelt-manifest.json";
const INDEX: &str = "model.safetensors.index.json";

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/reference/models").join(name)
}

fn opcm_recipe(names: &[&str], extra: &str) -> String {
    let mut r = format!(
        "merge_method: opcm\nbase_model: {}\nmodels:\n",
        fixture("base").display()
    );
    for n in names {
        r += &format!("  - model: {}\n", fixture(n).display());
    }
    r + extra
}

/// `smelt merge` of `text` into `d/name` (must succeed).
fn merge(d: &Path, name: &str, text: &str, extra: &[&str]) -> PathBuf {
    let r = d.join(format!("{name}.yml"));
    std::fs::write(&r, text).unwrap();
    let out = d.join(name);
    let o = run_merge(&r, &out, extra);
    assert!(o.status.success(), "merge {name}: {}", stderr(&o));
    out
}

fn continual(merged: &Path, new: &Path, out: &Path, extra: &[&str]) -> Output {
    smelt()
        .arg("continual")
        .arg(merged)
        .arg(new)
        .arg("-o")
        .arg(out)
        .args(["--device", "cpu"])
        .args(extra)
        .output()
        .unwrap()
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The weights digest as docs/ALGORITHMS.md defines it, from a folder's manifest: SHA-256
/// over `NAME\tBYTES\tKIND:HASH\n` of the `.safetensors` files and the index, by name.
fn manifest_weights_digest(dir: &Path) -> String {
    use sha2::Digest;
    let m = json(&dir.join(MANIFEST));
    let mut entries: Vec<(String, String)> = m["files"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(n, _)| n.ends_with(".safetensors") || *n == INDEX)
        .map(|(n, e)| {
            let (kind, hash) = ["blake3", "sha256"]
                .iter()
                .find_map(|k| e[*k].as_str().map(|h| (*k, h)))
                .unwrap();
            (n.clone(), format!("{n}\t{}\t{kind}:{hash}\n", e["bytes"]))
        })
        .collect();
    entries.sort();
    let mut h = sha2::Sha256::new();
    for (_, line) in entries {
        h.update(line.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Every file under the folders, for byte-identity checks.
fn snapshot(dirs: &[&Path]) -> Vec<BTreeMap<String, Vec<u8>>> {
    dirs.iter().map(|d| dir_bytes(d)).collect()
}

/// `smelt continual MERGED NEW -o OUT EXTRA` is refused: exit 1, every needle in the message,
/// MERGED, NEW and the base byte-identical afterwards, and nothing written beside OUT (not
/// OUT, nor its partial folder, nor a lock). Returns the message.
#[track_caller]
fn assert_refused(merged: &Path, new: &Path, extra: &[&str], needles: &[&str]) -> String {
    let outs = tempfile::tempdir().unwrap();
    let out = outs.path().join("out");
    let inputs = [merged, new, &fixture("base")];
    let before = snapshot(&inputs);
    let o = continual(merged, new, &out, extra);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "exit status {:?}: {e}", o.status);
    for n in needles {
        assert!(e.contains(n), "no `{n}` in: {e}");
    }
    assert!(
        !e.contains("--resume"),
        "continual has no --resume, yet: {e}"
    );
    assert_eq!(snapshot(&inputs), before, "an input changed: {e}");
    let left: Vec<_> = std::fs::read_dir(outs.path()).unwrap().collect();
    assert!(left.is_empty(), "left beside OUT: {left:?}");
    e
}

#[test]
fn the_state_records_the_digest_of_the_weights_beside_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let one = merge(d, "m12", &opcm_recipe(&["ft1", "ft2"], ""), &[]);
    let sharded = merge(
        d,
        "m12s",
        &opcm_recipe(&["ft1", "ft2"], ""),
        &["--out-shard-size", "20KB"],
    );
    assert!(sharded.join(INDEX).is_file(), "not sharded");
    let sha = merge(
        d,
        "m12sha",
        &opcm_recipe(&["ft1", "ft2"], ""),
        &["--out-shard-size", "20KB", "--hash", "sha256"],
    );
    assert!(json(&sha.join(MANIFEST))["files"][INDEX]["sha256"].is_string());
    for dir in [&one, &sharded, &sha] {
        let s = json(&dir.join(STATE_NAME));
        assert_eq!(s["version"], 2);
        assert_eq!(
            s["weights"]["digest"].as_str(),
            Some(manifest_weights_digest(dir).as_str()),
            "{}",
            dir.display()
        );
        for (i, m) in ["ft1", "ft2"].iter().enumerate() {
            assert!(s["models"][i]["path"].as_str().unwrap().ends_with(m), "{s}");
            assert!(!s["models"][i]["digest"].as_str().unwrap().is_empty());
        }
    }
    let listed = json(&sharded.join(STATE_NAME))["weights"]["files"].clone();
    assert!(
        listed.as_array().unwrap().iter().any(|f| f == INDEX),
        "{listed}"
    );
    // both continue, to the same tensors, and the new state is that of the new folder
    let c1 = d.join("c1");
    let cs = d.join("cs");
    let csha = d.join("csha");
    for (m, c) in [(&one, &c1), (&sharded, &cs), (&sha, &csha)] {
        let o = continual(m, &fixture("ft3"), c, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let s = json(&c.join(STATE_NAME));
        assert_eq!(
            s["weights"]["digest"].as_str(),
            Some(manifest_weights_digest(c).as_str())
        );
        assert_eq!(s["models"].as_array().unwrap().len(), 3, "{s}");
    }
    let a = load_dir(&c1);
    for other in [&cs, &csha] {
        let b = load_dir(other);
        assert_eq!(a.len(), b.len());
        for (n, t) in &a {
            assert_eq!(t.data, b[n].data, "{n}");
        }
    }
}

#[test]
fn a_state_from_another_merge_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let m12 = merge(d, "m12", &opcm_recipe(&["ft1", "ft2"], ""), &[]);
    let m13 = merge(d, "m13", &opcm_recipe(&["ft1", "ft3"], ""), &[]);
    std::fs::copy(m13.join(STATE_NAME), m12.join(STATE_NAME)).unwrap();
    let theirs = json(&m13.join(STATE_NAME))["weights"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let ours = manifest_weights_digest(&m12);
    assert_ne!(theirs, ours);
    let state = m12.join(STATE_NAME).display().to_string();
    assert_refused(
        &m12,
        &fixture("ft3"),
        &[],
        &[
            &state,
            "belongs to another merge",
            &theirs,
            &ours,
            "cannot continue this folder",
            "--base",
        ],
    );
}

#[test]
fn a_ties_output_with_a_copied_state_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let m12 = merge(d, "m12", &opcm_recipe(&["ft1", "ft2"], ""), &[]);
    let ties = format!(
        "merge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.5}}\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.5}}\n",
        fixture("base").display(),
        fixture("ft1").display(),
        fixture("ft2").display()
    );
    let t = merge(d, "ties", &ties, &[]);
    assert!(!t.join(STATE_NAME).exists());
    std::fs::copy(m12.join(STATE_NAME), t.join(STATE_NAME)).unwrap();
    let state = t.join(STATE_NAME).display().to_string();
    assert_refused(
        &t,
        &fixture("ft3"),
        &[],
        &[
            &state,
            "belongs to another merge",
            &manifest_weights_digest(&t),
        ],
    );
}

#[test]
fn a_model_already_folded_in_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let m12 = merge(d, "m12", &opcm_recipe(&["ft1", "ft2"], ""), &[]);
    let shown = m12.display().to_string();
    assert_refused(
        &m12,
        &fixture("ft1"),
        &[],
        &["is already folded into", &shown, "step 1 of 2", "twice"],
    );
    assert_refused(
        &m12,
        &fixture("ft2"),
        &[],
        &["is already folded into", "step 2 of 2"],
    );
    // the same weights in another folder are the same model
    let copy = d.join("ft2-copy");
    copy_dir(&fixture("ft2"), &copy);
    let e = assert_refused(&m12, &copy, &[], &["is already folded into", "step 2 of 2"]);
    assert!(e.contains(&copy.display().to_string()), "{e}");
    // and after a continual step, all three are recorded
    let c = d.join("c123");
    let o = continual(&m12, &fixture("ft3"), &c, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_refused(
        &c,
        &fixture("ft3"),
        &[],
        &["is already folded into", "step 3 of 3"],
    );
    assert_refused(&c, &fixture("ft1"), &[], &["step 1 of 3"]);
}

#[test]
fn the_merge_itself_or_the_base_is_refused_as_the_new_model() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let m12 = merge(d, "m12", &opcm_recipe(&["ft1", "ft2"], ""), &[]);
    let base = fixture("base");
    let base_s = base.display().to_string();
    assert_refused(&m12, &m12, &[], &["is the same model as"]);
    let copy = d.join("m12-copy");
    copy_dir(&m12, &copy);
    assert_refused(&m12, &copy, &[], &["is the same model as"]);
    assert_refused(&m12, &base, &[], &["is the base model", &base_s]);
    // a base copied elsewhere is still the base
    let bcopy = d.join("base-copy");
    copy_dir(&base, &bcopy);
    assert_refused(&m12, &bcopy, &[], &["is the base model"]);
    // starting from a first model: the same checks
    let b = ["--base", base.to_str().unwrap()];
    assert_refused(
        &fixture("ft1"),
        &fixture("ft1"),
        &b,
        &["is the same model as"],
    );
    assert_refused(&fixture("ft1"), &base, &b, &["is the base model"]);
}

#[test]
fn weights_changed_after_the_merge_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ft3 = fixture("ft3");
    // one byte of a tensor flipped in place, same size
    let m = merge(d, "flip", &opcm_recipe(&["ft1", "ft2"], ""), &[]);
    let shard = m.join("model.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();
    let shard_s = shard.display().to_string();
    assert_refused(
        &m,
        &ft3,
        &[],
        &[
            &shard_s,
            "changed after the merge",
            "blake3",
            "restore the file",
        ],
    );
    // bytes appended
    let m = merge(d, "grow", &opcm_recipe(&["ft1", "ft2"], ""), &[]);
    let shard = m.join("model.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes.extend_from_slice(&[0; 8]);
    std::fs::write(&shard, &bytes).unwrap();
    assert_refused(
        &m,
        &ft3,
        &[],
        &["changed after the merge", &format!("{} bytes", n + 8)],
    );
    // a weight file added after the merge (an index would take precedence over the shard)
    let m = merge(d, "added", &opcm_recipe(&["ft1", "ft2"], ""), &[]);
    let sharded = merge(
        d,
        "sh",
        &opcm_recipe(&["ft1", "ft2"], ""),
        &["--out-shard-size", "20KB"],
    );
    std::fs::copy(sharded.join(INDEX), m.join(INDEX)).unwrap();
    let idx = m.join(INDEX).display().to_string();
    assert_refused(
        &m,
        &ft3,
        &[],
        &[&idx, "is not in smelt-manifest.json", "move the file away"],
    );
    // the index of a sharded merge edited
    let idx = sharded.join(INDEX);
    let text = std::fs::read_to_string(&idx).unwrap();
    std::fs::write(&idx, text.replacen("\"metadata\"", "\"metadata\" ", 1)).unwrap();
    let idx_s = idx.display().to_string();
    assert_refused(&sharded, &ft3, &[], &[&idx_s, "changed after the merge"]);
}

#[test]
fn a_state_without_a_manifest_or_in_an_old_format_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ft3 = fixture("ft3");
    let m12 = merge(d, "m12", &opcm_recipe(&["ft1", "ft2"], ""), &[]);
    // a state put beside weights smelt did not write
    let plain = d.join("plain");
    copy_dir(&fixture("ft1"), &plain);
    std::fs::copy(m12.join(STATE_NAME), plain.join(STATE_NAME)).unwrap();
    assert_refused(
        &plain,
        &ft3,
        &[],
        &[STATE_NAME, "without smelt-manifest.json", "cannot continue"],
    );
    // the state of an earlier smelt (version 1, no `weights`)
    let sp = m12.join(STATE_NAME);
    let good = json(&sp);
    let mut v = good.clone();
    v["version"] = 1.into();
    v.as_object_mut().unwrap().remove("weights");
    std::fs::write(&sp, v.to_string()).unwrap();
    let sp_s = sp.display().to_string();
    assert_refused(
        &m12,
        &ft3,
        &[],
        &[&sp_s, "version 1", "`weights`", "redo the merge"],
    );
    // version 2 with a field missing
    let mut v = good.clone();
    v["weights"].as_object_mut().unwrap().remove("digest");
    std::fs::write(&sp, v.to_string()).unwrap();
    assert_refused(&m12, &ft3, &[], &[&sp_s, "`weights.digest`"]);
    let mut v = good.clone();
    v["models"][0].as_object_mut().unwrap().remove("digest");
    std::fs::write(&sp, v.to_string()).unwrap();
    assert_refused(&m12, &ft3, &[], &[&sp_s, "`models[0]`", "`digest`"]);
    let mut v = good.clone();
    v["models"].as_array_mut().unwrap().pop();
    std::fs::write(&sp, v.to_string()).unwrap();
    assert_refused(&m12, &ft3, &[], &[&sp_s, "`models` lists 1", "2 norms"]);
    // the state restored: it continues
    std::fs::write(&sp, good.to_string()).unwrap();
    let o = continual(&m12, &ft3, &d.join("ok"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn out_dtype_writes_that_dtype_as_a_recipe_with_out_dtype_does() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = fixture("base");
    let b = ["--base", base.to_str().unwrap()];
    let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    for (flag, recipe_key, dt) in [
        ("bf16", "out_dtype: bfloat16\n", DType::BF16),
        ("float16", "out_dtype: float16\n", DType::F16),
        ("", "", DType::F32),
    ] {
        let c = d.join(format!("c-{flag}"));
        let mut args = b.to_vec();
        if !flag.is_empty() {
            args.extend(["--out-dtype", flag]);
        }
        let o = continual(&fixture("ft1"), &fixture("ft2"), &c, &args);
        assert!(o.status.success(), "{flag}: {}", stderr(&o));
        let got = load_dir(&c);
        assert_eq!(got.len(), 30);
        assert!(
            got.values().all(|t| t.dtype == dt),
            "{flag}: dtypes {:?}",
            got.values().map(|t| t.dtype).collect::<Vec<_>>()
        );
        let r = merge(
            d,
            &format!("r-{flag}"),
            &opcm_recipe(&["ft1", "ft2"], recipe_key),
            &[],
        );
        assert!(
            weights(&c) == weights(&r),
            "{flag}: continual and the recipe differ"
        );
        assert_eq!(
            json(&c.join("config.json"))["dtype"],
            dt.torch_name(),
            "{flag}"
        );
    }
    // a bf16 merge continues
    let o = continual(&d.join("c-bf16"), &fixture("ft3"), &d.join("c3"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // an unknown dtype: refused by the argument parser, naming the valid ones
    let out = d.join("bad");
    let o = continual(
        &fixture("ft1"),
        &fixture("ft2"),
        &out,
        &["--base", base.to_str().unwrap(), "--out-dtype", "f8"],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown dtype `f8`") && stderr(&o).contains("bf16"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

/// Starts `continual` slowed down, waits for its partial folder, and sends SIGINT `times`
/// times 50 ms apart.
fn interrupt_continual(d: &Path, out: &Path, times: usize, throttle_ms: &str) -> Output {
    let base = fixture("base");
    let child = smelt()
        .arg("continual")
        .arg(fixture("ft1"))
        .arg(fixture("ft2"))
        .arg("-o")
        .arg(out)
        .args(["--base", base.to_str().unwrap(), "--device", "cpu"])
        .env("SMELT_THROTTLE_MS", throttle_ms)
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !partial_path_for(out).is_dir() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no partial folder"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..times {
        let k = std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(k.success());
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_stopped_continual_never_offers_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let inputs = [fixture("ft1"), fixture("ft2"), fixture("base")];
    let before = snapshot(&inputs.iter().map(|p| p.as_path()).collect::<Vec<_>>());
    // once: stops after the tensor in hand and removes what it wrote
    let out = d.join("once");
    let o = interrupt_continual(d, &out, 1, "150");
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{e}");
    assert!(
        e.contains("cannot resume") && !e.contains("--resume"),
        "{e}"
    );
    assert!(!out.exists() && !partial_path_for(&out).exists(), "{e}");
    // twice: ends at once; the hidden partial folder stays, and the message speaks of --force
    let out = d.join("twice");
    let o = interrupt_continual(d, &out, 2, "1000");
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{e}");
    assert!(
        e.contains("stopped at once") && e.contains("cannot resume") && !e.contains("resumable"),
        "{e}"
    );
    assert!(!e.contains("--resume"), "{e}");
    assert!(!out.exists());
    assert!(partial_path_for(&out).is_dir());
    // the next run says how to start over, without --resume
    let b = ["--base", inputs[2].to_str().unwrap()];
    let o = continual(&inputs[0], &inputs[1], &out, &b);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("--force") && e.contains("cannot resume") && !e.contains("--resume"),
        "{e}"
    );
    assert!(!out.exists());
    let mut args = b.to_vec();
    args.push("--force");
    let o = continual(&inputs[0], &inputs[1], &out, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!partial_path_for(&out).exists());
    assert_eq!(
        snapshot(&inputs.iter().map(|p| p.as_path()).collect::<Vec<_>>()),
        before
    );
}
