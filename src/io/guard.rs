//! What every command that writes a folder checks before any work: that the output touches
//! none of its inputs, that `--force` replaces only smelt's own outputs, and that no other
//! smelt is writing the same output (an exclusive lock held for the whole run).
//!
//! The rules, in one place ([`claim_output`]):
//! * the output may not be, contain or lie inside any input (model folders, adapters,
//!   compressed task vectors, side files, state files), nor be or contain a protected folder
//!   (the recipe's), with or without `--force`; paths are compared canonicalized, and an
//!   output that does not exist yet is judged by its nearest existing ancestor plus the rest;
//! * an existing output is replaced (`--force`) only when it is empty or holds smelt's
//!   manifest; a partial folder is removed only when it is smelt's (its journal, manifest,
//!   or nothing but shards);
//! * `.NAME.smelt-lock` beside the output is locked (`flock`, exclusive, not waiting) for as
//!   long as the returned [`OutputLock`] lives, with the holder's pid written into it; a
//!   second writer is refused naming that pid. The kernel drops the lock when its process
//!   dies, so a file left by a killed run blocks nothing.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::writer::{partial_path_for, sibling, Start, JOURNAL, MANIFEST};

/// A path the output must keep clear of.
#[derive(Clone, Debug)]
pub struct Protected {
    /// What it is, for the message ("input model", "adapter", "the recipe's folder").
    pub what: String,
    pub path: PathBuf,
    /// The output may lie inside it (the recipe's folder); it may still not be it or hold it.
    pub may_hold_output: bool,
}

impl Protected {
    /// An input: the output may not be it, hold it or lie inside it.
    pub fn input(what: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Protected {
            what: what.into(),
            path: path.into(),
            may_hold_output: false,
        }
    }

    /// A folder the output may be written into but must not replace (the recipe's folder).
    pub fn folder(what: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Protected {
            what: what.into(),
            path: path.into(),
            may_hold_output: true,
        }
    }
}

/// The lock on an output, held while it is written. Dropping it removes the lock file (still
/// holding the lock, so that no one can take a lock on a file that is about to go) and
/// releases the lock.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    file: Option<File>,
}

impl OutputLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        if let Some(f) = self.file.take() {
            // the file is ours while we hold the lock: remove it, then let go
            let _ = std::fs::remove_file(&self.path);
            drop(f);
        }
    }
}

/// The lock file of an output: `.NAME.smelt-lock` beside it.
pub fn lock_path_for(out: &Path) -> PathBuf {
    sibling(out, "smelt-lock")
}

/// `path` made absolute with every symbolic link resolved: the nearest existing ancestor
/// canonicalized, and the rest (which cannot hold links, since it does not exist) appended
/// with `.` and `..` taken lexically.
pub fn resolve(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    // the longest prefix that exists
    let comps: Vec<Component> = abs.components().collect();
    let mut cut = comps.len();
    let mut base = None;
    while cut > 0 {
        let prefix: PathBuf = comps[..cut].iter().collect();
        if let Ok(p) = std::fs::canonicalize(&prefix) {
            base = Some(p);
            break;
        }
        cut -= 1;
    }
    let mut out = base.unwrap_or_else(|| PathBuf::from("/"));
    for c in &comps[cut..] {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// The first `n` names in a folder (sorted), and how many it holds.
fn first_entries(dir: &Path, n: usize) -> (Vec<String>, usize) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| {
                    let mut s = e.file_name().to_string_lossy().to_string();
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        s.push('/');
                    }
                    s
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let total = names.len();
    names.truncate(n);
    (names, total)
}

fn describe_entries(dir: &Path) -> String {
    let (names, total) = first_entries(dir, 5);
    let mut s = names.join(", ");
    if total > names.len() {
        s.push_str(&format!(" and {} more", total - names.len()));
    }
    s
}

/// Whether a folder is a finished smelt output: it holds smelt's manifest.
pub fn is_smelt_output(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

/// Whether a partial folder is smelt's: it holds the journal (or its replacement being
/// written), the manifest of a commit under way, or nothing but shards (a run stopped
/// before its first journal), or nothing at all.
fn is_smelt_partial(dir: &Path) -> bool {
    if dir.join(JOURNAL).is_file()
        || dir.join(format!("{JOURNAL}.new")).is_file()
        || dir.join(MANIFEST).is_file()
    {
        return true;
    }
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok()).all(|e| {
            e.file_type().is_ok_and(|t| t.is_file())
                && e.file_name().to_string_lossy().ends_with(".safetensors")
        })
    })
}

/// How an output relates to a protected path, if it touches it.
fn overlap(out: &Path, p: &Protected) -> Option<&'static str> {
    let prot = resolve(&p.path);
    if out == prot {
        Some("is")
    } else if prot.starts_with(out) {
        Some("contains")
    } else if !p.may_hold_output && out.starts_with(&prot) {
        Some("lies inside")
    } else {
        None
    }
}

/// The first rule alone: the output touches no protected path (also checked by
/// [`claim_output`]; `--dry-run` uses it to say so before a real run would).
pub fn check_clear_of(out: &Path, protected: &[Protected]) -> Result<()> {
    let real = resolve(out);
    for p in protected {
        if let Some(how) = overlap(&real, p) {
            let same = real == resolve(&p.path);
            return Err(Error::Output {
                path: out.to_path_buf(),
                msg: format!(
                    "{how} {} {}{}; smelt never writes over or into its inputs, with or without --force: choose an output folder outside them",
                    p.what,
                    p.path.display(),
                    if same {
                        String::new()
                    } else {
                        format!(" (resolved: {} and {})", real.display(), resolve(&p.path).display())
                    }
                ),
            });
        }
    }
    if !matches!(out.components().next_back(), Some(Component::Normal(_))) {
        return Err(Error::Output {
            path: out.to_path_buf(),
            msg: format!(
                "does not end in a folder name; name the output folder itself (e.g. {})",
                real.display()
            ),
        });
    }
    Ok(())
}

/// Checks an output before any work and takes its lock: see the module's rules. `resumable`
/// says whether the command has `--resume` (only then do messages offer it).
pub fn claim_output(
    out: &Path,
    protected: &[Protected],
    start: Start,
    resumable: bool,
) -> Result<OutputLock> {
    check_clear_of(out, protected)?;
    let err = |msg: String| Error::Output {
        path: out.to_path_buf(),
        msg,
    };
    let lock = lock(out)?;
    let partial = partial_path_for(out);
    if out.exists() {
        if !out.is_dir() {
            return Err(err(
                "exists and is not a folder; smelt writes a folder there: choose another name"
                    .into(),
            ));
        }
        let empty = first_entries(out, 1).1 == 0;
        let ours = is_smelt_output(out);
        if !ours && !empty {
            return Err(err(format!(
                "exists and was not written by smelt (it holds {}; no {MANIFEST}); smelt only replaces its own outputs, even with --force: choose another folder, or move this one away yourself",
                describe_entries(out)
            )));
        }
        match start {
            Start::Resume => {
                return Err(err(
                    "already exists, so there is nothing to resume; pass --force instead of --resume to merge it again".into(),
                ))
            }
            Start::Fresh { force: false } => {
                return Err(err(if ours {
                    "already exists (a smelt output); pass --force to replace it".into()
                } else {
                    "already exists (an empty folder); pass --force to write into it".into()
                }))
            }
            Start::Fresh { force: true } => {}
        }
    }
    if partial.exists() || partial.is_symlink() {
        if !partial.is_dir() || partial.is_symlink() || !is_smelt_partial(&partial) {
            return Err(err(format!(
                "{} is where smelt stages this output, but it is not a partial folder smelt left (it holds {}); smelt only removes its own files: move it away",
                partial.display(),
                describe_entries(&partial)
            )));
        }
        if start == (Start::Fresh { force: false }) {
            return Err(err(if resumable {
                format!(
                    "an interrupted run of it is in {}; pass --resume to continue it or --force to start over",
                    partial.display()
                )
            } else {
                format!(
                    "an interrupted run of it is in {}; pass --force to start over (this command cannot resume)",
                    partial.display()
                )
            }));
        }
    } else if start == Start::Resume {
        return Err(err(format!(
            "no interrupted merge to resume ({} does not exist)",
            partial.display()
        )));
    }
    Ok(lock)
}

/// Takes the output's lock, creating the lock file (and the output's parent folder) when
/// needed; refused, naming the holder, when another process holds it.
fn lock(out: &Path) -> Result<OutputLock> {
    let path = lock_path_for(out);
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::create_dir_all(parent).map_err(|e| Error::Output {
                path: out.to_path_buf(),
                msg: format!("cannot create its folder {}: {e}", parent.display()),
            })?;
        }
    }
    let fail = |what: &str, e: std::io::Error| Error::Output {
        path: out.to_path_buf(),
        msg: format!("cannot {what} its lock file {}: {e}", path.display()),
    };
    // A file removed by its holder between our open and our lock is not the lock any more:
    // try again on the new one.
    for _ in 0..100 {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| fail("open", e))?;
        if !try_lock(&file).map_err(|e| fail("lock", e))? {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            return Err(Error::Output {
                path: out.to_path_buf(),
                msg: format!(
                    "another smelt is writing it ({}, lock {}); wait for it to finish or stop it, then run this again",
                    if holder.is_empty() {
                        "pid not yet recorded".to_string()
                    } else {
                        format!("pid {holder}")
                    },
                    path.display()
                ),
            });
        }
        if !same_file(&file, &path) {
            continue;
        }
        use std::io::{Seek, Write};
        file.set_len(0).map_err(|e| fail("write", e))?;
        file.seek(std::io::SeekFrom::Start(0))
            .map_err(|e| fail("write", e))?;
        writeln!(file, "{}", std::process::id()).map_err(|e| fail("write", e))?;
        return Ok(OutputLock {
            path,
            file: Some(file),
        });
    }
    Err(fail(
        "keep",
        std::io::Error::other("it kept being replaced"),
    ))
}

/// An exclusive lock without waiting: Ok(false) when someone else holds it.
#[cfg(unix)]
fn try_lock(f: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open file descriptor
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(not(unix))]
fn try_lock(f: &File) -> std::io::Result<bool> {
    match f.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Whether the open file is still the one at `path`.
#[cfg(unix)]
fn same_file(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_f: &File, path: &Path) -> bool {
    path.exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("smelt-guard-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn resolve_judges_a_missing_path_by_its_existing_ancestor() {
        let d = tmp("resolve");
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        let real = std::fs::canonicalize(&d).unwrap();
        assert_eq!(resolve(&d.join("a/b/../x/y")), real.join("a/x/y"));
        assert_eq!(resolve(&d.join("a/./b")), real.join("a/b"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn overlaps_in_every_direction_are_refused() {
        let d = tmp("overlap");
        let m = d.join("models/ft1");
        std::fs::create_dir_all(&m).unwrap();
        let prot = [
            Protected::input("input model", &m),
            Protected::folder("the recipe's folder", &d),
        ];
        for out in [
            m.clone(),
            d.join("models"),
            m.join("sub/out"),
            d.join("models/ft1/../ft1"),
            d.clone(),
        ] {
            let e = check_clear_of(&out, &prot).unwrap_err().to_string();
            assert!(e.contains("never writes over or into its inputs"), "{e}");
        }
        let e = check_clear_of(&m, &prot).unwrap_err().to_string();
        assert!(e.contains("is input model"), "{e}");
        let e = check_clear_of(&d.join("models"), &prot)
            .unwrap_err()
            .to_string();
        assert!(e.contains("contains input model"), "{e}");
        // inside the recipe's folder, beside the models: fine
        check_clear_of(&d.join("out"), &prot).unwrap();
        check_clear_of(&d.join("models/merged"), &prot).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn one_lock_at_a_time_and_none_left_behind() {
        let d = tmp("lock");
        let out = d.join("out");
        let a = claim_output(&out, &[], Start::Fresh { force: false }, true).unwrap();
        let text = std::fs::read_to_string(a.path()).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        // flock locks belong to the open file: a second open in this process conflicts too
        let e = claim_output(&out, &[], Start::Fresh { force: true }, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("another smelt") && e.contains(&std::process::id().to_string()),
            "{e}"
        );
        let lp = a.path().to_path_buf();
        drop(a);
        assert!(!lp.exists(), "the lock file outlived its lock");
        let b = claim_output(&out, &[], Start::Fresh { force: false }, true).unwrap();
        drop(b);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
