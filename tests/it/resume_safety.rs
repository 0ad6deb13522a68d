//! Resume safety (issue 16): `--resume` reuses nothing merged from other bytes (each input's
//! identity is recorded and compared), an input truncated while a merge reads it is a clear,
//! resumable error instead of a SIGBUS, and a full disk keeps the finished shards for
//! `--resume`.
//!
//! Every case runs the real binary on copies of the fixture models. Expected bytes come from
//! an uninterrupted run into a folder of the same name elsewhere; expected identities from
//! `std::fs::metadata` here; expected byte counts from the reference output's files.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;

const RECIPE: &str = "merge_method: ties
base_model: models/base
models:
  - model: models/ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: models/ft2
    parameters: {weight: 0.7, density: 0.6}
  - model: models/ft3
    parameters: {weight: 0.5, density: 0.4}
dtype: float32
";

const PARTIAL: &str = ".out.smelt-partial";
const JOURNAL: &str = "progress.json";
const MANIFEST: &str = "smelt-manifest.json";
/// Output shards of a few tensors each (the fixture models hold 216 KB of tensors).
const SHARDS: [&str; 4] = ["--out-shard-size", "40KB", "--seed", "7"];

fn partial(s: &Setup) -> PathBuf {
    s.dir().join(PARTIAL)
}

fn cmd(recipe: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Command {
    merge_cmd(recipe, out, &[&SHARDS[..], extra].concat(), env)
}

fn run(recipe: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    cmd(recipe, out, extra, env).output().unwrap()
}

/// Exit status 1 (not a panic, not a signal) with a one-line message.
#[track_caller]
fn assert_refused(o: &Output, what: &str) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{what}: expected exit status 1, got {:?}: {err}",
        o.status
    );
    assert!(!err.contains("panicked"), "{what}: {err}");
    err
}

/// The reference: the same merge, uninterrupted, into a folder also named `out`.
fn reference(recipe: &Path) -> (tempfile::TempDir, BTreeMap<String, Vec<u8>>) {
    let elsewhere = tempfile::tempdir().unwrap();
    let out = elsewhere.path().join("out");
    let o = run(recipe, &out, &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = dir_bytes(&out);
    assert!(
        bytes.keys().filter(|n| n.ends_with(".safetensors")).count() >= 5,
        "too few shards to interrupt in the middle: {:?}",
        bytes.keys()
    );
    (elsewhere, bytes)
}

#[track_caller]
fn assert_same_as(out: &Path, reference: &BTreeMap<String, Vec<u8>>) {
    let got = dir_bytes(out);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in reference {
        assert!(
            got[name] == *bytes,
            "{name} differs from the uninterrupted run"
        );
    }
}

fn journal(s: &Setup) -> Value {
    let text = std::fs::read_to_string(partial(s).join(JOURNAL)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The shard files the journal lists as finished (none while it is being replaced).
fn finished(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join(JOURNAL))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["shards"].as_object().map(|m| m.keys().cloned().collect()))
        .unwrap_or_default()
}

/// Every input file's bytes.
fn input_bytes(s: &Setup) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for m in ["base", "ft1", "ft2", "ft3"] {
        for (n, b) in dir_bytes(&s.model(m)) {
            out.insert(format!("{m}/{n}"), b);
        }
    }
    out
}

/// Starts a throttled merge and returns it once its journal lists `shards` finished shards.
fn start_until(mut c: Command, dir: &Path, shards: usize) -> Child {
    c.env("SMELT_THROTTLE_MS", "150");
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while finished(dir).len() < shards {
        if let Some(st) = child.try_wait().unwrap() {
            let o = child.wait_with_output().unwrap();
            panic!("the merge ended ({st}) too early: {}", stderr(&o));
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no progress in 60 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// A merge stopped with SIGINT once two shards are finished.
fn interrupted(s: &Setup, recipe: &Path) {
    let child = start_until(cmd(recipe, &s.out(), &[], &[]), &partial(s), 2);
    let k = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(k.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(partial(s).is_dir());
}

fn canonical(p: &Path) -> String {
    std::fs::canonicalize(p).unwrap().display().to_string()
}

// ---- resume only from the same inputs -----------------------------------------------------

/// The journal records every input file with its device, inode, size, mtime and ctime; an
/// untouched resume reuses the finished shards and ends byte-identical.
#[test]
fn the_journal_records_each_input_and_an_untouched_resume_is_identical() {
    let s = Setup::new();
    let recipe = s.recipe(RECIPE);
    let (_keep, reference) = reference(&recipe);
    let inputs = input_bytes(&s);
    interrupted(&s, &recipe);
    let j = journal(&s);
    let recorded = j["inputs"].as_array().expect("no inputs in the journal");
    assert_eq!(recorded.len(), 4, "{recorded:?}");
    for m in ["base", "ft1", "ft2", "ft3"] {
        let p = s.st(m);
        let meta = std::fs::metadata(&p).unwrap();
        let e = recorded
            .iter()
            .find(|e| e["path"] == canonical(&p))
            .unwrap_or_else(|| panic!("{m} not recorded: {recorded:?}"));
        assert_eq!(e["dev"], meta.dev());
        assert_eq!(e["ino"], meta.ino());
        assert_eq!(e["size"], meta.size());
        assert_eq!(
            e["mtime_ns"].as_i64(),
            Some(meta.mtime() * 1_000_000_000 + meta.mtime_nsec())
        );
        assert_eq!(
            e["ctime_ns"].as_i64(),
            Some(meta.ctime() * 1_000_000_000 + meta.ctime_nsec())
        );
    }
    let done = finished(&partial(&s));
    let o = run(&recipe, &s.out(), &["--resume"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("resumed"),
        "{} finished shards were not reused",
        done.len()
    );
    assert_same_as(&s.out(), &reference);
    assert!(!partial(&s).exists());
    assert_eq!(input_bytes(&s), inputs);
}

/// Edited in place with the same size and its mtime put back: only the ctime shows it, and
/// `--resume` refuses, naming the file, leaving the partial folder as it was.
#[test]
fn resume_refuses_an_input_edited_in_place_with_its_mtime_restored() {
    let s = Setup::new();
    let recipe = s.recipe(RECIPE);
    interrupted(&s, &recipe);
    let before = dir_bytes(&partial(&s));
    let p = s.st("ft2");
    let meta = std::fs::metadata(&p).unwrap();
    let (ino, mtime) = (meta.ino(), meta.modified().unwrap());
    std::thread::sleep(Duration::from_millis(20));
    // one byte of the last tensor's data, changed through the same inode
    let mut bytes = std::fs::read(&p).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x10;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.seek(SeekFrom::Start(last as u64)).unwrap();
        f.write_all(&bytes[last..last + 1]).unwrap();
        f.set_modified(mtime).unwrap();
    }
    let now = std::fs::metadata(&p).unwrap();
    assert_eq!((now.ino(), now.len()), (ino, meta.len()));
    assert_eq!(now.modified().unwrap(), mtime, "the mtime was not put back");
    let edited = input_bytes(&s);

    let o = run(&recipe, &s.out(), &["--resume"], &[]);
    let err = assert_refused(&o, "resume after an in-place edit");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(&canonical(&p)), "the file is not named: {err}");
    assert!(
        err.contains("changed since the interrupted merge") && err.contains("ctime"),
        "{err}"
    );
    assert!(!err.contains("size") && !err.contains("inode"), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert!(!s.out().exists(), "an output appeared");
    assert!(
        dir_bytes(&partial(&s)) == before,
        "the partial folder changed"
    );
    assert_eq!(input_bytes(&s), edited, "an input changed");
}

/// Replaced by another file (a copy of itself, renamed over it: same bytes, new inode):
/// refused too, and `--force` then starts over into the right bytes.
#[test]
fn resume_refuses_an_input_replaced_by_another_file() {
    let s = Setup::new();
    let recipe = s.recipe(RECIPE);
    let (_keep, reference) = reference(&recipe);
    interrupted(&s, &recipe);
    let before = dir_bytes(&partial(&s));
    let p = s.st("ft3");
    let ino = std::fs::metadata(&p).unwrap().ino();
    let copy = s.model("ft3").join("copy.tmp");
    std::fs::copy(&p, &copy).unwrap();
    std::fs::rename(&copy, &p).unwrap();
    assert_ne!(std::fs::metadata(&p).unwrap().ino(), ino);
    let inputs = input_bytes(&s);

    let o = run(&recipe, &s.out(), &["--resume"], &[]);
    let err = assert_refused(&o, "resume after a replacement");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains(&canonical(&p)) && err.contains("inode") && err.contains("--force"),
        "{err}"
    );
    assert!(!s.out().exists());
    assert!(
        dir_bytes(&partial(&s)) == before,
        "the partial folder changed"
    );

    let o = run(&recipe, &s.out(), &["--force"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_as(&s.out(), &reference);
    assert_eq!(input_bytes(&s), inputs);
}

// ---- an input that changes while the merge reads it ---------------------------------------

/// ft1 cut to its first page mid-merge: exit 1 naming it (no SIGBUS), the finished shards
/// and journal kept; once the file is put back, `--resume` ends byte-identical.
#[test]
fn an_input_truncated_mid_merge_is_a_clear_resumable_error() {
    let s = Setup::new();
    let recipe = s.recipe(RECIPE);
    let (_keep, reference) = reference(&recipe);
    let inputs = input_bytes(&s);
    let p = s.st("ft1");
    let original = std::fs::read(&p).unwrap();

    let child = start_until(cmd(&recipe, &s.out(), &[], &[]), &partial(&s), 1);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let err = assert_refused(&o, "input truncated mid-merge");
    assert!(err.contains(&canonical(&p)), "the file is not named: {err}");
    assert!(
        err.contains("changed or was truncated while smelt was reading it")
            && err.contains("--resume")
            && err.contains(PARTIAL),
        "{err}"
    );
    assert!(!s.out().exists(), "an output appeared");
    assert!(partial(&s).is_dir(), "the partial folder is gone");
    assert!(!partial(&s).join(MANIFEST).exists());
    let j = journal(&s);
    let kept = finished(&partial(&s));
    assert!(!kept.is_empty(), "no finished shard kept");
    for f in &kept {
        let h = j["shards"][f].as_str().unwrap();
        assert_eq!(
            blake3::hash(&std::fs::read(partial(&s).join(f)).unwrap())
                .to_hex()
                .as_str(),
            h,
            "{f} does not hash to its journal entry"
        );
    }
    let flagged: Vec<&Value> = j["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["changed_while_read"] == true)
        .collect();
    assert_eq!(flagged.len(), 1, "{j}");
    assert_eq!(flagged[0]["path"], canonical(&p));
    let mut others = input_bytes(&s);
    others.remove("ft1/model.safetensors");
    let mut others_before = inputs.clone();
    others_before.remove("ft1/model.safetensors");
    assert_eq!(others, others_before, "another input changed");

    // a resume before the file is back reads a different file: refused by the fingerprint
    let o = run(&recipe, &s.out(), &["--resume"], &[]);
    assert_refused(&o, "resume with the file still cut");
    assert!(!s.out().exists());

    // put back (written into the same inode: only a new ctime tells) and resume
    std::fs::write(&p, &original).unwrap();
    let o = run(&recipe, &s.out(), &["--resume"], &[]);
    assert!(o.status.success(), "resume after restoring: {}", stderr(&o));
    assert_same_as(&s.out(), &reference);
    assert!(!partial(&s).exists());
    assert_eq!(input_bytes(&s), inputs);
}

/// An input rewritten in place (same size, new bytes) while the merge runs does not fault;
/// its identity shows it before the next shard is finished.
#[test]
fn an_input_rewritten_mid_merge_is_refused_before_a_shard_is_kept() {
    let s = Setup::new();
    let recipe = s.recipe(RECIPE);
    let p = s.st("ft2");
    let original = std::fs::read(&p).unwrap();
    let child = start_until(cmd(&recipe, &s.out(), &[], &[]), &partial(&s), 1);
    let before: BTreeSet<String> = finished(&partial(&s)).into_iter().collect();
    let mut changed = original.clone();
    let n = changed.len();
    for b in &mut changed[n - 4096..] {
        *b ^= 0x01;
    }
    std::fs::write(&p, &changed).unwrap();
    let o = child.wait_with_output().unwrap();
    let err = assert_refused(&o, "input rewritten mid-merge");
    assert!(
        err.contains(&canonical(&p)) && err.contains("changed or was truncated"),
        "{err}"
    );
    assert!(!s.out().exists());
    // what was finished after the rewrite was merged from mixed bytes: nothing of that kind
    // is kept (the journal lists at most the shard being finished when it happened)
    let after: BTreeSet<String> = finished(&partial(&s)).into_iter().collect();
    assert!(after.is_superset(&before), "{before:?} -> {after:?}");
    assert!(after.len() <= before.len() + 1, "{before:?} -> {after:?}");
}

// ---- a full disk --------------------------------------------------------------------------

/// The shard files of the reference output not yet finished, and their total size.
fn still_needed(reference: &BTreeMap<String, Vec<u8>>, done: &[String]) -> u64 {
    reference
        .iter()
        .filter(|(n, _)| n.ends_with(".safetensors") && !done.contains(n))
        .map(|(_, b)| b.len() as u64)
        .sum()
}

/// An injected "no space left" mid-merge keeps the verified finished shards and says how many
/// bytes the rest needs; `--resume` with space again ends byte-identical.
#[test]
fn disk_full_keeps_finished_shards_and_resume_completes() {
    let s = Setup::new();
    let recipe = s.recipe(RECIPE);
    let (_keep, reference) = reference(&recipe);
    let inputs = input_bytes(&s);
    let o = run(
        &recipe,
        &s.out(),
        &[],
        &[("SMELT_FAULT_WRITE_LIMIT", "100000")],
    );
    let err = assert_refused(&o, "disk full");
    assert!(err.contains("disk full"), "{err}");
    let done = finished(&partial(&s));
    assert!(!done.is_empty(), "no finished shard kept: {err}");
    for f in &done {
        assert!(
            std::fs::read(partial(&s).join(f)).unwrap() == reference[f],
            "kept shard {f} differs from the uninterrupted run"
        );
    }
    let need = still_needed(&reference, &done);
    assert!(
        err.contains(&format!("need {need} bytes")),
        "the message does not say {need} bytes are needed: {err}"
    );
    assert!(
        err.contains(&format!("{} of", done.len())) && err.contains(PARTIAL),
        "{err}"
    );
    assert!(err.contains("--resume"), "{err}");
    assert!(!s.out().exists());
    assert!(!partial(&s).join(MANIFEST).exists());

    let o = run(&recipe, &s.out(), &["--resume"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("resumed"));
    assert_same_as(&s.out(), &reference);
    assert!(!partial(&s).exists());
    assert_eq!(input_bytes(&s), inputs);
}

/// A tmpfs mounted for the test (root only); unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("tmpfs")
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn free(&self) -> u64 {
        let c = std::ffi::CString::new(self.path().as_os_str().to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path and a zeroed out-parameter of the right type
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Fills a filesystem: a file written until "no space left".
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0xa5u8; 4096];
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    let _ = f.sync_all();
}

/// A real full disk (a small tmpfs filled mid-merge): the finished shards and journal stay;
/// with just enough room for the unfinished shards (less than a whole merge needs), a fresh
/// run is refused before it starts and `--resume` completes byte-identical.
#[test]
fn a_real_full_tmpfs_keeps_finished_shards_and_resume_counts_only_what_remains() {
    let s = Setup::new();
    let recipe = s.recipe(RECIPE);
    let fs = match Tmpfs::mount(8 << 20) {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("skipped: a tmpfs cannot be mounted here ({why})");
            return;
        }
    };
    let (_keep, reference) = reference(&recipe);
    let inputs = input_bytes(&s);
    let out = fs.path().join("out");
    let part = fs.path().join(PARTIAL);
    let filler = fs.path().join("filler");

    let child = start_until(cmd(&recipe, &out, &[], &[]), &part, 2);
    fill(&filler);
    let o = child.wait_with_output().unwrap();
    let err = assert_refused(&o, "a full tmpfs");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("--resume") && err.contains(PARTIAL), "{err}");
    assert!(!out.exists());
    assert!(!part.join(MANIFEST).exists());
    let done = finished(&part);
    assert!(done.len() >= 2, "{done:?}");
    for f in &done {
        assert!(
            std::fs::read(part.join(f)).unwrap() == reference[f],
            "kept shard {f} differs"
        );
    }
    let need = still_needed(&reference, &done);
    assert!(err.contains(&format!("need {need} bytes")), "{need}: {err}");

    // room for the unfinished shards (and smelt's 1 MiB margin), not for a whole merge
    std::fs::remove_file(&filler).unwrap();
    let whole: u64 = reference
        .iter()
        .filter(|(n, _)| n.ends_with(".safetensors"))
        .map(|(_, b)| b.len() as u64)
        .sum();
    // what the unfinished shard files hold now counts as room (they are sized again)
    let held: u64 = std::fs::read_dir(&part)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.ends_with(".safetensors") && !done.contains(&n)
        })
        .map(|e| e.metadata().unwrap().blocks() * 512)
        .sum();
    let target = (1 << 20) + need + (whole - need) / 2 + 8192;
    let free = fs.free() + held;
    assert!(free > target, "the tmpfs is too small: {free} <= {target}");
    std::fs::write(&filler, vec![0u8; (fs.free() - (target - held)) as usize]).unwrap();
    assert!(fs.free() + held < (1 << 20) + whole);
    assert!(fs.free() + held >= (1 << 20) + need);

    let before = dir_bytes(&part);
    let o = run(&recipe, &out, &["--force"], &[]);
    let err = assert_refused(&o, "a fresh run without room for a whole merge");
    assert!(err.contains("free on its filesystem"), "{err}");
    assert!(
        dir_bytes(&part) == before,
        "the refused run changed the partial folder"
    );

    let o = run(&recipe, &out, &["--resume"], &[]);
    assert!(o.status.success(), "resume: {}", stderr(&o));
    assert_same_as(&out, &reference);
    assert!(!part.exists());
    assert_eq!(input_bytes(&s), inputs);
}

/// Inputs are every file the plan reads: a LoRA adapter edited in place since the
/// interruption (its size and mtime kept) is refused by name like a model file.
#[test]
fn resume_refuses_an_adapter_edited_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let peft = root().join("tests/fixtures/peft");
    copy_dir(&peft.join("base"), &d.join("base"));
    copy_dir(&peft.join("lora_a"), &d.join("lora_a"));
    let recipe = d.join("recipe.yml");
    std::fs::write(
        &recipe,
        "merge_method: passthrough\nmodels:\n  - model: base\n    adapters: [lora_a]\n",
    )
    .unwrap();
    let out = d.join("out");
    let part = d.join(PARTIAL);
    let mut c = smelt();
    c.arg("merge").arg(&recipe).arg("-o").arg(&out);
    c.args(cpu_args()).args(["--out-shard-size", "3KB"]);
    let child = start_until(c, &part, 1);
    let k = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(k.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let adapter = d.join("lora_a/adapter_model.safetensors");
    let text = std::fs::read_to_string(part.join(JOURNAL)).unwrap();
    assert!(
        text.contains(&canonical(&adapter)),
        "adapter not recorded: {text}"
    );
    let before = dir_bytes(&part);

    let mtime = std::fs::metadata(&adapter).unwrap().modified().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let mut bytes = std::fs::read(&adapter).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0x08;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&adapter)
            .unwrap();
        f.seek(SeekFrom::Start(n as u64 - 2)).unwrap();
        f.write_all(&bytes[n - 2..n - 1]).unwrap();
        f.set_modified(mtime).unwrap();
    }
    let mut c = smelt();
    c.arg("merge").arg(&recipe).arg("-o").arg(&out);
    c.args(cpu_args())
        .args(["--out-shard-size", "3KB", "--resume"]);
    let o = c.output().unwrap();
    let err = assert_refused(&o, "resume after the adapter was edited");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains(&canonical(&adapter)) && err.contains("ctime") && err.contains("--force"),
        "{err}"
    );
    assert!(!out.exists());
    assert!(dir_bytes(&part) == before, "the partial folder changed");
    assert!(
        std::fs::read(&adapter).unwrap() == bytes,
        "the adapter changed"
    );
}
