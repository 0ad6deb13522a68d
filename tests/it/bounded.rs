//! Hostile inputs that used to hang, grow without bound, panic or pass NaN through: devices,
//! FIFOs and folders where files belong, huge recipes, huge ranks, non-finite adapters and
//! scales. Every case runs the real binary under a timeout and checks the message, the exit
//! code, that no input changed (every file's bytes, and the type of what is not a file), and
//! that no complete-looking output was left.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// Runs `c` with stdin closed, killing it (and failing the test) after `limit`: a hang is a
/// failure, not a stuck test run.
#[track_caller]
fn run_within(mut c: Command, limit: Duration) -> Output {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run smelt");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            let o = child.wait_with_output().unwrap();
            panic!(
                "smelt did not finish within {limit:?}; stderr so far:\n{}",
                stderr(&o)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const PROMPT: Duration = Duration::from_secs(20);

/// Every path under `dir` (recursively, not following links) with its content: a regular
/// file's bytes, a link's target, or the kind of anything else (a FIFO is never read).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    fn walk(p: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let m = std::fs::symlink_metadata(p).unwrap();
        let ft = m.file_type();
        let v = if ft.is_symlink() {
            format!("link -> {}", std::fs::read_link(p).unwrap().display())
        } else if ft.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                walk(&e.unwrap().path(), out);
            }
            "dir".to_string()
        } else if ft.is_file() {
            format!("file {}", blake3::hash(&std::fs::read(p).unwrap()).to_hex())
        } else {
            format!("special {ft:?}")
        };
        out.insert(p.to_path_buf(), v);
    }
    walk(dir, &mut out);
    out
}

/// Expects a failure with exit code 1 whose stderr holds every needle, and no panic.
#[track_caller]
fn expect_error(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit code 1; stdout: {}\nstderr: {err}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(!err.contains("panicked"), "a panic:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr does not mention {n:?}:\n{err}");
    }
    err
}

#[test]
fn dev_zero_as_a_recipe_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let before = snapshot(tmp.path());
    let out = tmp.path().join("out");
    let o = run_within(merge_cmd(Path::new("/dev/zero"), &out, &[], &[]), PROMPT);
    expect_error(&o, &["/dev/zero", "character device", "regular file"]);
    assert!(!out.exists());
    assert_eq!(snapshot(tmp.path()), before);
}

#[cfg(unix)]
fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().expect("mkfifo");
    assert!(st.success());
}

/// A model folder whose model.safetensors is a FIFO: merge, --dry-run and inspect return
/// at once naming it (they used to block on the open or the read forever).
#[cfg(unix)]
#[test]
fn fifo_named_model_safetensors_is_refused_promptly() {
    let s = Setup::new();
    let st = s.st("ft2");
    std::fs::remove_file(&st).unwrap();
    mkfifo(&st);
    let recipe = s.recipe(GOOD);
    let before = snapshot(s.dir());
    let shown = st.display().to_string();
    for extra in [&[][..], &["--dry-run"][..]] {
        let o = run_within(merge_cmd(&recipe, &s.out(), extra, &[]), PROMPT);
        expect_error(&o, &[&shown, "FIFO", "regular file"]);
        assert!(!s.out().exists(), "{extra:?}");
    }
    for target in [s.model("ft2"), st.clone()] {
        let mut c = smelt();
        c.arg("inspect").arg(&target);
        let o = run_within(c, PROMPT);
        expect_error(&o, &[&shown, "FIFO"]);
        assert!(
            o.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    assert_eq!(snapshot(s.dir()), before);
}

/// A folder named model.safetensors: named as a folder, not "No such device".
#[test]
fn folder_named_model_safetensors_is_refused() {
    let s = Setup::new();
    let st = s.st("ft1");
    std::fs::remove_file(&st).unwrap();
    std::fs::create_dir(&st).unwrap();
    let recipe = s.recipe(GOOD);
    let before = snapshot(s.dir());
    let o = run_within(merge_cmd(&recipe, &s.out(), &[], &[]), PROMPT);
    let err = expect_error(
        &o,
        &[&st.display().to_string(), "is a folder", "regular file"],
    );
    assert!(!err.contains("os error 19"), "{err}");
    assert!(!s.out().exists());
    let mut c = smelt();
    c.arg("inspect").arg(s.model("ft1"));
    let o = run_within(c, PROMPT);
    expect_error(&o, &[&st.display().to_string(), "is a folder"]);
    assert_eq!(snapshot(s.dir()), before);
}

/// A shard of a finished merge replaced by a link to /dev/zero: verify reports it at once
/// instead of hashing an endless stream.
#[cfg(unix)]
#[test]
fn verify_refuses_a_manifest_entry_linked_to_dev_zero() {
    let s = Setup::new();
    let o = run_within(merge_cmd(&s.recipe(GOOD), &s.out(), &[], &[]), PROMPT);
    assert!(o.status.success(), "{}", stderr(&o));
    let shard = s.out().join("model.safetensors");
    std::fs::remove_file(&shard).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &shard).unwrap();
    let before = snapshot(s.dir());
    let mut c = smelt();
    c.arg("verify").arg(s.out());
    let o = run_within(c, PROMPT);
    expect_error(&o, &["model.safetensors", "character device"]);
    assert_eq!(snapshot(s.dir()), before);
}

/// A recipe of just under the 1 MiB limit holding a 200 000-entry gradient is checked in
/// linear time: a bad last entry is found and named well within the timeout (each entry
/// used to re-validate every entry: minutes).
#[test]
fn a_200k_gradient_is_checked_in_linear_time() {
    let s = Setup::new();
    let n = 200_000;
    let mut grad = "0.5,".repeat(n - 1);
    grad.push_str("1.5");
    let text = GOOD.replace(
        "parameters: {weight: 1.0, density: 0.5}\n  - model: models/ft2",
        &format!("parameters: {{weight: 1.0, density: [{grad}]}}\n  - model: models/ft2"),
    );
    assert!(
        text.len() < 1 << 20 && text.len() > 800_000,
        "{}",
        text.len()
    );
    let recipe = s.recipe(&text);
    let before = snapshot(s.dir());
    let o = run_within(merge_cmd(&recipe, &s.out(), &["--dry-run"], &[]), PROMPT);
    expect_error(
        &o,
        &["recipe.yml", "density", "1.5", "fraction between 0 and 1"],
    );
    assert!(!s.out().exists());
    assert_eq!(snapshot(s.dir()), before);
    // and the same list with the bad entry fixed is accepted as quickly
    let good = text.replace(",1.5]", ",0.5]");
    let recipe = s.recipe(&good);
    let o = run_within(merge_cmd(&recipe, &s.out(), &["--dry-run"], &[]), PROMPT);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!s.out().exists(), "a dry run wrote output");
}

fn peft(name: &str) -> PathBuf {
    root().join("tests/fixtures/peft").join(name)
}

/// Copies two fixture adapters into a temp folder (so their bytes can be checked after).
fn adapters() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("lora_a");
    let b = tmp.path().join("lora_b");
    copy_dir(&peft("lora_a"), &a);
    copy_dir(&peft("lora_b"), &b);
    (tmp, a, b)
}

fn lora_merge(adapters: &[&Path], out: &Path, extra: &[&str]) -> Command {
    let mut c = smelt();
    c.arg("lora").arg("merge");
    c.args(adapters);
    c.arg("-o").arg(out);
    c.args(cpu_args());
    c.args(extra);
    c
}

/// `--svd-rank 100000000` used to allocate factors of 10⁸ rows (6 GB, a 48 GB file): it is
/// capped at min(rows, columns) of the largest module (16 here) with a warning, and the
/// result is the rank-16 merge.
#[test]
fn huge_svd_rank_is_capped_with_a_warning() {
    let (tmp, a, b) = adapters();
    let before = snapshot(tmp.path());
    let out = tmp.path().join("out");
    let o = run_within(
        lora_merge(
            &[&a, &b],
            &out,
            &["--method", "svd", "--svd-rank", "100000000"],
        ),
        PROMPT,
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("--svd-rank 100000000") && err.contains("using 16"),
        "{err}"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["r"], 16);
    let size = std::fs::metadata(out.join("adapter_model.safetensors"))
        .unwrap()
        .len();
    assert!(size < 1 << 20, "{size} bytes");
    // the same as asking for 16
    let out16 = tmp.path().join("out16");
    let o = run_within(
        lora_merge(&[&a, &b], &out16, &["--method", "svd", "--svd-rank", "16"]),
        PROMPT,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(out16.join("adapter_model.safetensors")).unwrap()
    );
    let mut after = snapshot(tmp.path());
    after.retain(|p, _| !p.starts_with(&out) && !p.starts_with(&out16));
    assert_eq!(after, before);
}

/// `--rank 18446744073709551615` (lego) used to panic with "capacity overflow": capped at
/// the rank units there are, with a warning; no panic, a small file.
#[test]
fn max_u64_lego_rank_is_capped_without_a_panic() {
    let (tmp, a, b) = adapters();
    let before = snapshot(tmp.path());
    let out = tmp.path().join("out");
    let o = run_within(
        lora_merge(
            &[&a, &b],
            &out,
            &["--method", "lego", "--rank", "18446744073709551615"],
        ),
        PROMPT,
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("capacity overflow"),
        "{err}"
    );
    assert!(err.contains("--rank 18446744073709551615"), "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    let r = cfg["r"].as_u64().unwrap();
    assert!(r <= 64, "rank {r}");
    let mut after = snapshot(tmp.path());
    after.retain(|p, _| !p.starts_with(&out));
    assert_eq!(after, before);
}

/// Writes `dir`'s adapter back with `value` at element `at` of tensor `key`.
fn poison(dir: &Path, key: &str, at: usize, value: f32) {
    let path = dir.join("adapter_model.safetensors");
    let mut t = load_st(&path);
    t.get_mut(key).unwrap().data[at] = value;
    let list: Vec<(&str, &T)> = t.iter().map(|(k, v)| (k.as_str(), v)).collect();
    write_st(&path, &list);
}

/// A NaN (or infinity) in a LoRA factor is named, file, tensor and element, before any
/// merge: linear and cat used to write a NaN adapter with exit 0, the SVD methods blamed
/// the SVD.
#[test]
fn non_finite_adapter_factor_is_named() {
    let key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight";
    for (method, value) in [
        ("linear", f32::NAN),
        ("cat", f32::INFINITY),
        ("svd", f32::NAN),
        ("lego", f32::NEG_INFINITY),
    ] {
        let (tmp, a, b) = adapters();
        poison(&b, key, 5, value);
        let before = snapshot(tmp.path());
        let out = tmp.path().join("out");
        let o = run_within(lora_merge(&[&a, &b], &out, &["--method", method]), PROMPT);
        let file = b.join("adapter_model.safetensors").display().to_string();
        let err = expect_error(&o, &[&file, key, "element 5", &format!("{value}")]);
        assert!(
            !err.contains("SVD") && !err.contains("finite inputs"),
            "{err}"
        );
        assert!(!out.exists(), "{method}: output left");
        assert_eq!(snapshot(tmp.path()), before, "{method}");
    }
}

/// `compress --alpha 1e39` exits 0 writing `scale: inf`: refused, naming the flag.
#[test]
fn compress_alpha_that_overflows_f32_is_refused() {
    let s = Setup::new();
    let before = snapshot(s.dir());
    for alpha in ["1e39", "3.5e38"] {
        let mut c = smelt();
        c.arg("compress")
            .arg(s.model("ft1"))
            .arg("--base")
            .arg(s.model("base"))
            .arg("-o")
            .arg(s.out())
            .args(["--device", "cpu", "--alpha", alpha]);
        let o = run_within(c, PROMPT);
        expect_error(&o, &["--alpha", "f32"]);
        assert!(!s.out().exists(), "{alpha}");
    }
    assert_eq!(snapshot(s.dir()), before);
}

/// `smelt inspect … | head` ends quietly when the reader goes away: no "Broken pipe" error.
#[cfg(unix)]
#[test]
fn a_closed_stdout_pipe_is_silent() {
    let s = Setup::new();
    let before = snapshot(s.dir());
    // a pipe whose read end is closed before smelt starts, like `| head -c 0` (closing it
    // after the start would race a quick smelt that finishes into the pipe's buffer)
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = smelt()
        .arg("inspect")
        .arg("--all")
        .arg(s.model("ft1"))
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < PROMPT, "inspect hung on a closed pipe");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(
        !err.contains("Broken pipe") && !err.contains("panicked"),
        "{err}"
    );
    use std::os::unix::process::ExitStatusExt;
    // the Unix convention: ended by SIGPIPE (a shell shows 141)
    assert_eq!(o.status.signal(), Some(13), "{:?} {err}", o.status);
    assert_eq!(snapshot(s.dir()), before);
}

/// A recipe far over the 1 MiB limit is refused from the opened file's size, before
/// anything is read or allocated.
#[test]
fn oversized_recipe_is_refused_before_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tmp.path().join("recipe.yml");
    // sparse: 64 MiB of nothing
    std::fs::File::create(&recipe)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let before = snapshot(tmp.path());
    let out = tmp.path().join("out");
    let o = run_within(merge_cmd(&recipe, &out, &["--dry-run"], &[]), PROMPT);
    expect_error(
        &o,
        &[
            &recipe.display().to_string(),
            "67108864 bytes",
            "at most 1048576",
        ],
    );
    assert!(!out.exists());
    assert_eq!(snapshot(tmp.path()), before);
}

/// An adapter whose adapter_config.json is a FIFO: refused at once, named.
#[cfg(unix)]
#[test]
fn fifo_adapter_config_is_refused_promptly() {
    let (tmp, a, b) = adapters();
    let cfg = b.join("adapter_config.json");
    std::fs::remove_file(&cfg).unwrap();
    mkfifo(&cfg);
    let before = snapshot(tmp.path());
    let out = tmp.path().join("out");
    let o = run_within(lora_merge(&[&a, &b], &out, &["--method", "cat"]), PROMPT);
    expect_error(&o, &[&cfg.display().to_string(), "FIFO", "regular file"]);
    assert!(!out.exists());
    assert_eq!(snapshot(tmp.path()), before);
}

/// `lora extract --rank 100000000`: capped at what the largest weight can hold, with a
/// warning, instead of allocating 10⁸-row factors.
#[test]
fn huge_extract_rank_is_capped_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let tuned = tmp.path().join("tuned");
    copy_dir(&peft("base"), &base);
    copy_dir(&peft("apply_lora_c"), &tuned);
    let before = snapshot(tmp.path());
    let out = tmp.path().join("out");
    let mut c = smelt();
    c.args(["lora", "extract"])
        .arg(&base)
        .arg(&tuned)
        .args(["--rank", "100000000", "-o"])
        .arg(&out)
        .args(cpu_args());
    let o = run_within(c, PROMPT);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("--rank 100000000") && err.contains("using"),
        "{err}"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    let r = cfg["r"].as_u64().unwrap();
    assert!((1..=64).contains(&r), "rank {r}");
    let size = std::fs::metadata(out.join("adapter_model.safetensors"))
        .unwrap()
        .len();
    assert!(size < 1 << 20, "{size} bytes");
    let mut after = snapshot(tmp.path());
    after.retain(|p, _| !p.starts_with(&out));
    assert_eq!(after, before);
}

/// A ComPEFT vector whose recorded `total` does not match its shapes is refused, naming
/// the file and both counts.
#[test]
fn compeft_counts_must_match() {
    let s = Setup::new();
    let cv = s.dir().join("cv");
    let mut c = smelt();
    c.arg("compress")
        .arg(s.model("ft1"))
        .arg("--base")
        .arg(s.model("base"))
        .arg("-o")
        .arg(&cv)
        .args(["--device", "cpu", "--density", "0.5"]);
    let o = run_within(c, PROMPT);
    assert!(o.status.success(), "{}", stderr(&o));
    let file = cv.join("compeft.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let key = b"\"total\":\"";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the header records total")
        + key.len();
    // same length: bump the first digit
    bytes[at] = if bytes[at] == b'9' {
        b'1'
    } else {
        bytes[at] + 1
    };
    std::fs::write(&file, &bytes).unwrap();
    let recipe = s.recipe(&format!(
        "merge_method: passthrough\nmodels:\n  - model: {}+{}\n",
        s.model("base").display(),
        cv.display()
    ));
    let before = snapshot(s.dir());
    let o = run_within(merge_cmd(&recipe, &s.out(), &[], &[]), PROMPT);
    expect_error(
        &o,
        &[&file.display().to_string(), "`total`", "compress again"],
    );
    assert!(!s.out().exists());
    assert_eq!(snapshot(s.dir()), before);
}
