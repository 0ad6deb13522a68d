//! Safe with the user's files: no command writes over, into or around its inputs (with or
//! without --force), --force replaces only smelt's own outputs, and one writer at a time
//! holds an output (a lock beside it, naming its pid; a killed holder blocks nothing).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const RECIPE: &str = "merge_method: ties
base_model: models/base
models:
  - model: models/ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: models/ft2
    parameters: {weight: 0.7, density: 0.6}
dtype: float32
";

const MANIFEST: &str = "smelt-manifest.json";
const REFUSED_INPUT: &str = "smelt never writes over or into its inputs";

/// Every file under `dir` (relative path -> BLAKE3 of its bytes), folders included as
/// entries of their own, so that a new empty folder or a removed one shows too.
fn tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if p.is_dir() {
                out.insert(rel, "dir".into());
                stack.push(p);
            } else {
                let h = blake3::hash(&std::fs::read(&p).unwrap());
                out.insert(rel, h.to_hex().to_string());
            }
        }
    }
    out
}

/// Exit status 1, no panic, every `needle` in stderr.
#[track_caller]
fn assert_refused(o: &Output, what: &str, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{what}: expected exit status 1, got {:?}\nstdout: {}\nstderr: {err}",
        o.status,
        stdout(o)
    );
    assert!(!err.contains("panicked"), "{what}: panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{what}: no {n:?} in: {err}");
    }
}

/// The sandbox: fixture models in models/, the recipe beside them, and a PEFT base with two
/// adapters in peft/.
fn sandbox() -> (Setup, PathBuf) {
    let s = Setup::new();
    let recipe = s.recipe(RECIPE);
    let peft = root().join("tests/fixtures/peft");
    for m in ["base", "lora_a", "lora_b"] {
        copy_dir(&peft.join(m), &s.dir().join("peft").join(m));
    }
    (s, recipe)
}

fn merge_in(dir: &Path, recipe: &Path, out: &Path, extra: &[&str]) -> Output {
    smelt()
        .current_dir(dir)
        .arg("merge")
        .arg(recipe)
        .arg("-o")
        .arg(out)
        .args(cpu_args())
        .args(extra)
        .output()
        .unwrap()
}

fn smelt_in(dir: &Path, args: &[&str]) -> Output {
    smelt()
        .current_dir(dir)
        .args(args)
        .args(cpu_args())
        .output()
        .unwrap()
}

/// `-o` an input model, the folder holding the models, a folder inside a model, the
/// recipe's folder, the recipe itself and `.`: refused before any work, with and without
/// --force, and nothing in the sandbox changes (no output, no partial folder, no lock file).
#[test]
fn merge_refuses_an_output_over_or_inside_its_inputs() {
    let (s, recipe) = sandbox();
    let d = s.dir().to_path_buf();
    let before = tree(&d);
    let cases: [(PathBuf, &str); 8] = [
        (s.model("ft1"), "is input model"),
        (s.model("base"), "is input model"),
        (d.join("models"), "contains input model"),
        (s.model("ft2").join("merged"), "lies inside input model"),
        (d.join("models/ft3/../ft1"), "is input model"),
        (d.clone(), "contains input model"),
        (PathBuf::from("."), "contains input model"),
        (recipe.clone(), "is the recipe"),
    ];
    for (out, how) in &cases {
        for extra in [&[][..], &["--force"][..], &["--resume"][..]] {
            let what = format!("-o {} {extra:?}", out.display());
            let o = merge_in(&d, &recipe, out, extra);
            assert_refused(&o, &what, &[how, REFUSED_INPUT, &out.display().to_string()]);
            assert!(
                tree(&d) == before,
                "{what}: the sandbox changed after a refused merge"
            );
        }
    }
    // a dry run says so too
    let o = merge_in(&d, &recipe, &s.model("ft1"), &["--dry-run"]);
    assert_refused(&o, "--dry-run -o ft1", &[REFUSED_INPUT]);
    // a symbolic link to a model is the model
    #[cfg(unix)]
    {
        let link = d.join("elsewhere");
        std::os::unix::fs::symlink(s.model("ft1"), &link).unwrap();
        let before = tree(&d);
        let o = merge_in(&d, &recipe, &link, &["--force"]);
        assert_refused(&o, "-o a link to ft1", &["is input model", REFUSED_INPUT]);
        assert!(tree(&d) == before);
    }
}

/// The recipe's folder may hold the output (the usual case), and a folder beside the models
/// inside models/ is fine too: the same merge succeeds there.
#[test]
fn an_output_beside_the_inputs_is_fine() {
    let (s, recipe) = sandbox();
    let o = merge_in(s.dir(), &recipe, Path::new("out"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(s.out().join(MANIFEST).is_file());
    let o = merge_in(s.dir(), &recipe, &s.models.join("merged"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(s.models.join("merged").join(MANIFEST).is_file());
    // no lock file stays behind a finished run
    let hidden: Vec<String> = std::fs::read_dir(s.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "left beside the output: {hidden:?}");
}

/// The other commands that write a folder keep clear of their inputs the same way: lora
/// apply / merge / extract, compress and continual.
#[test]
fn every_writing_command_refuses_its_inputs_as_output() {
    let (s, _) = sandbox();
    let d = s.dir().to_path_buf();
    let before = tree(&d);
    let p = |x: &str| d.join(x).display().to_string();
    let cases: Vec<(Vec<String>, String, &str)> = vec![
        (
            vec![
                "lora".into(),
                "apply".into(),
                p("peft/base"),
                p("peft/lora_a"),
            ],
            p("peft/lora_a"),
            "is adapter",
        ),
        (
            vec![
                "lora".into(),
                "apply".into(),
                p("peft/base"),
                p("peft/lora_a"),
            ],
            p("peft/base"),
            "is input model",
        ),
        (
            vec![
                "lora".into(),
                "apply".into(),
                p("peft/base"),
                p("peft/lora_a"),
            ],
            p("peft"),
            "contains input model",
        ),
        (
            vec![
                "lora".into(),
                "merge".into(),
                p("peft/lora_a"),
                p("peft/lora_b"),
                "--method".into(),
                "cat".into(),
            ],
            p("peft/lora_b"),
            "is adapter",
        ),
        (
            vec![
                "lora".into(),
                "extract".into(),
                p("models/base"),
                p("models/ft1"),
                "--rank".into(),
                "2".into(),
            ],
            p("models/ft1"),
            "is the fine-tuned model",
        ),
        (
            vec![
                "compress".into(),
                p("models/ft1"),
                "--base".into(),
                p("models/base"),
            ],
            p("models"),
            "contains the model",
        ),
        (
            vec![
                "continual".into(),
                p("models/ft1"),
                p("models/ft2"),
                "--base".into(),
                p("models/base"),
            ],
            p("models/ft2"),
            "is input model",
        ),
    ];
    for (args, out, how) in &cases {
        for force in [false, true] {
            let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
            a.extend(["-o", out]);
            if force {
                a.push("--force");
            }
            let what = a.join(" ");
            let o = smelt_in(&d, &a);
            assert_refused(&o, &what, &[how, REFUSED_INPUT, out]);
            assert!(tree(&d) == before, "{what}: the sandbox changed");
        }
    }
}

/// --force replaces an empty folder and an earlier smelt output (byte for byte what a fresh
/// merge writes), and nothing else: a folder of the user's is refused, naming what is in it.
#[test]
fn force_replaces_only_smelt_outputs() {
    let (s, recipe) = sandbox();
    let d = s.dir().to_path_buf();
    // the reference: a fresh merge into a folder of the same name elsewhere
    let elsewhere = tempfile::tempdir().unwrap();
    let reference = elsewhere.path().join("out");
    let o = merge_in(&d, &recipe, &reference, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = dir_bytes(&reference);

    // a folder of the user's
    let mine = d.join("out");
    std::fs::create_dir_all(mine.join("checkpoints")).unwrap();
    std::fs::write(mine.join("notes.txt"), "mine").unwrap();
    std::fs::write(mine.join("checkpoints/a.bin"), "mine too").unwrap();
    let before = tree(&d);
    for extra in [&[][..], &["--force"][..]] {
        let o = merge_in(&d, &recipe, &mine, extra);
        assert_refused(
            &o,
            &format!("a user's folder {extra:?}"),
            &[
                "not written by smelt",
                "notes.txt",
                "checkpoints/",
                "only replaces its own outputs",
                &mine.display().to_string(),
            ],
        );
        assert!(tree(&d) == before, "{extra:?}: the sandbox changed");
    }
    // the other commands say the same
    let p = |x: &str| d.join(x).display().to_string();
    let o = smelt_in(
        &d,
        &[
            "lora",
            "apply",
            &p("peft/base"),
            &p("peft/lora_a"),
            "-o",
            &p("out"),
            "--force",
        ],
    );
    assert_refused(
        &o,
        "lora apply --force",
        &["not written by smelt", "notes.txt"],
    );
    assert!(tree(&d) == before);
    std::fs::remove_dir_all(&mine).unwrap();

    // an empty folder: without --force refused, with it written
    std::fs::create_dir(&mine).unwrap();
    let o = merge_in(&d, &recipe, &mine, &[]);
    assert_refused(&o, "an empty folder", &["--force"]);
    let o = merge_in(&d, &recipe, &mine, &["--force"]);
    assert!(o.status.success(), "empty folder --force: {}", stderr(&o));
    assert!(dir_bytes(&mine) == reference, "differs from a fresh merge");

    // an earlier smelt output: replaced by the new merge
    let other = s.recipe_named("other.yml", &RECIPE.replace("weight: 0.7", "weight: 0.3"));
    let o = merge_in(&d, &other, &mine, &["--force"]);
    assert!(o.status.success(), "smelt output --force: {}", stderr(&o));
    assert!(dir_bytes(&mine) != reference, "not replaced");
    let o = merge_in(&d, &recipe, &mine, &["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(dir_bytes(&mine) == reference, "differs from a fresh merge");
    let o = smelt().arg("verify").arg(d.join("out")).output().unwrap();
    assert!(o.status.success(), "verify: {}", stderr(&o));
}

/// A folder where smelt stages the output that smelt did not make is not removed by
/// --force; a smelt partial folder is, and only merge offers --resume for one.
#[test]
fn partial_folders_and_resume_hints() {
    let (s, recipe) = sandbox();
    let d = s.dir().to_path_buf();
    let partial = d.join(".out.smelt-partial");
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(partial.join("diary.txt"), "mine").unwrap();
    let before = tree(&d);
    let o = merge_in(&d, &recipe, &s.out(), &["--force"]);
    assert_refused(
        &o,
        "a user's folder as the partial folder",
        &["diary.txt", ".out.smelt-partial", "move it away"],
    );
    assert!(tree(&d) == before);
    std::fs::remove_dir_all(&partial).unwrap();

    // a partial folder smelt left (its journal): merge offers --resume, the others do not
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(
        partial.join("progress.json"),
        r#"{"fingerprint": "x", "hash": "blake3", "shards": {}}"#,
    )
    .unwrap();
    let before = tree(&d);
    let o = merge_in(&d, &recipe, &s.out(), &[]);
    assert_refused(&o, "merge over a partial", &["--resume", "--force"]);
    let p = |x: &str| d.join(x).display().to_string();
    let others: [Vec<String>; 3] = [
        vec![
            "lora".into(),
            "apply".into(),
            p("peft/base"),
            p("peft/lora_a"),
        ],
        vec![
            "compress".into(),
            p("models/ft1"),
            "--base".into(),
            p("models/base"),
        ],
        vec![
            "lora".into(),
            "merge".into(),
            p("peft/lora_a"),
            p("peft/lora_b"),
            "--method".into(),
            "cat".into(),
        ],
    ];
    for args in &others {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = p("out");
        a.extend(["-o", &out]);
        let o = smelt_in(&d, &a);
        let what = a.join(" ");
        assert_refused(&o, &what, &["--force", "cannot resume"]);
        assert!(
            !stderr(&o).contains("--resume"),
            "{what} offers --resume: {}",
            stderr(&o)
        );
        assert!(tree(&d) == before, "{what}: the sandbox changed");
    }
    // and --force starts over, removing smelt's partial folder
    let o = smelt_in(
        &d,
        &[
            "lora",
            "apply",
            &p("peft/base"),
            &p("peft/lora_a"),
            "-o",
            &p("out"),
            "--force",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!partial.exists());
    assert!(s.out().join(MANIFEST).is_file());
}

/// Waits until the lock file beside OUT names the child's pid and its partial folder has a
/// journal (the merge is under way).
fn wait_for_lock(lock: &Path, child: &mut Child) {
    let pid = child.id().to_string();
    let journal = lock
        .with_file_name(".out.smelt-partial")
        .join("progress.json");
    let start = Instant::now();
    loop {
        if std::fs::read_to_string(lock).is_ok_and(|t| t.trim() == pid) && journal.is_file() {
            return;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the first merge ended ({st}) before it held the lock");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no lock after 60 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A slow merge into OUT (tensors small shards, each tensor followed by a pause).
fn slow_merge(d: &Path, recipe: &Path, out: &Path) -> Child {
    let mut c: Command = smelt();
    c.current_dir(d)
        .arg("merge")
        .arg(recipe)
        .arg("-o")
        .arg(out)
        .args(cpu_args())
        .args(["--out-shard-size", "40KB"])
        .env("SMELT_THROTTLE_MS", "400")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c.spawn().unwrap()
}

/// While a merge runs, a second merge, --force or --resume into the same output is refused
/// naming the running one's pid, and touches nothing; the first finishes with its own
/// weights and a manifest that verifies.
#[test]
fn a_second_writer_is_refused_while_the_first_runs() {
    let (s, recipe) = sandbox();
    let d = s.dir().to_path_buf();
    let elsewhere = tempfile::tempdir().unwrap();
    let reference = elsewhere.path().join("out");
    let o = merge_in(&d, &recipe, &reference, &["--out-shard-size", "40KB"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = dir_bytes(&reference);

    let lock = d.join(".out.smelt-lock");
    let mut first = slow_merge(&d, &recipe, &s.out());
    wait_for_lock(&lock, &mut first);
    let pid = first.id().to_string();
    let other = s.recipe_named("other.yml", &RECIPE.replace("weight: 0.7", "weight: 0.3"));
    let partial = d.join(".out.smelt-partial");
    for extra in [&[][..], &["--force"][..], &["--resume"][..]] {
        let what = format!("second merge {extra:?}");
        let o = merge_in(&d, &other, &s.out(), extra);
        assert_refused(
            &o,
            &what,
            &[
                "another smelt is writing it",
                &format!("pid {pid}"),
                ".out.smelt-lock",
            ],
        );
        assert!(
            partial.is_dir(),
            "{what}: the running merge's partial folder is gone"
        );
    }
    // the other commands too
    let p = |x: &str| d.join(x).display().to_string();
    let o = smelt_in(
        &d,
        &[
            "lora",
            "apply",
            &p("peft/base"),
            &p("peft/lora_a"),
            "-o",
            &p("out"),
            "--force",
        ],
    );
    assert_refused(&o, "lora apply --force", &[&format!("pid {pid}")]);
    let o = first.wait_with_output().unwrap();
    assert!(o.status.success(), "the first merge: {}", stderr(&o));
    assert!(
        dir_bytes(&s.out()) == reference,
        "the first merge's output is not its own"
    );
    let o = smelt().arg("verify").arg(d.join("out")).output().unwrap();
    assert!(o.status.success(), "verify: {}", stderr(&o));
    assert!(!lock.exists(), "the lock file outlived the merge");
}

/// A lock held by another process (here the test itself, with flock on the same file) is
/// honoured and named; once released, the file left behind blocks nothing.
#[cfg(unix)]
#[test]
fn a_held_lock_refuses_and_a_released_one_does_not() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let (s, recipe) = sandbox();
    let d = s.dir().to_path_buf();
    let lock = d.join(".out.smelt-lock");
    let mut f = std::fs::File::create(&lock).unwrap();
    writeln!(f, "424242").unwrap();
    // SAFETY: a valid open file descriptor
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(r, 0, "flock");
    let before = tree(&d);
    let o = merge_in(&d, &recipe, &s.out(), &["--force"]);
    assert_refused(&o, "a held lock", &["pid 424242", "another smelt"]);
    assert!(tree(&d) == before);
    drop(f);
    let o = merge_in(&d, &recipe, &s.out(), &[]);
    assert!(o.status.success(), "after release: {}", stderr(&o));
    assert!(!lock.exists());
}

/// A merge killed with SIGKILL leaves its lock file (and partial folder) behind; neither
/// blocks the next run: --resume finishes it to the bytes of an uninterrupted merge.
#[cfg(unix)]
#[test]
fn a_lock_left_by_a_killed_merge_does_not_block() {
    let (s, recipe) = sandbox();
    let d = s.dir().to_path_buf();
    let elsewhere = tempfile::tempdir().unwrap();
    let reference = elsewhere.path().join("out");
    let o = merge_in(&d, &recipe, &reference, &["--out-shard-size", "40KB"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = dir_bytes(&reference);

    let lock = d.join(".out.smelt-lock");
    let mut first = slow_merge(&d, &recipe, &s.out());
    wait_for_lock(&lock, &mut first);
    let pid = first.id().to_string();
    let k = Command::new("kill").args(["-9", &pid]).status().unwrap();
    assert!(k.success());
    let st = first.wait().unwrap();
    assert!(!st.success());
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap().trim(),
        pid,
        "the killed merge's lock file"
    );
    let o = merge_in(
        &d,
        &recipe,
        &s.out(),
        &["--out-shard-size", "40KB", "--resume"],
    );
    assert!(o.status.success(), "--resume after kill -9: {}", stderr(&o));
    assert!(
        dir_bytes(&s.out()) == reference,
        "differs from an uninterrupted merge"
    );
    assert!(!lock.exists(), "the stale lock file outlived the next run");
}

/// A command without --resume that is stopped (Ctrl-C) removes its partial folder, says it
/// cannot resume, exits 130 and leaves nothing beside the output.
#[cfg(unix)]
#[test]
fn a_stopped_command_without_resume_cleans_up() {
    let (s, _) = sandbox();
    let d = s.dir().to_path_buf();
    let before = tree(&d);
    let lock = d.join(".out.smelt-lock");
    let p = |x: &str| d.join(x).display().to_string();
    let mut child = smelt()
        .current_dir(&d)
        .args([
            "lora",
            "apply",
            &p("peft/base"),
            &p("peft/lora_a"),
            "-o",
            &p("out"),
        ])
        .args(["--out-shard-size", "1KB"])
        .args(cpu_args())
        .env("SMELT_THROTTLE_MS", "400")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_lock(&lock, &mut child);
    let k = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(k.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("cannot resume"), "{err}");
    assert!(!err.contains("--resume"), "offers --resume: {err}");
    assert!(tree(&d) == before, "the stopped run left something behind");
}
