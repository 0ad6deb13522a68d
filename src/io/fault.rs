//! Input files that change while smelt reads them, or between an interrupted merge and its
//! `--resume`.
//!
//! Two tools:
//! * [`FileId`]: a file's identity (canonical path, device, inode, size, mtime and ctime in
//!   ns). Recorded in a merge's journal when it starts and compared on `--resume` and before
//!   each output shard is finished; any difference means the bytes read may not be the bytes
//!   recorded. The ctime cannot be set back by any user tool, so an in-place edit that keeps
//!   the size and restores the mtime still shows.
//! * A SIGBUS handler for memory-mapped inputs. A file truncated under its mapping makes the
//!   next read of a page past its new end fault with SIGBUS, which by default kills the
//!   process with no message. Every input mapping is registered here ([`register`]); the
//!   handler looks the fault address up in that table, maps a page of zeros over the faulting
//!   page (so that the interrupted load completes), notes the file as changed and returns.
//!   The merge asks [`Registration::faulted`] after each tensor and fails with a message
//!   naming the file before anything read from the zeros is kept. Only code that asks does
//!   so: faults are caught once [`catch_faults`] was called (the executor calls it). Before
//!   that, and for a fault anywhere else, SIGBUS gets the disposition it had before (the
//!   default: the process dies as it would have), so no reader can take zeros for data
//!   unawares.
//!
//! The handler only does what is async-signal-safe: atomic loads and stores on a static
//! table and one `mmap` call.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The identity of a file as it was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileId {
    /// Canonical path (symbolic links resolved).
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl FileId {
    /// The identity of an open file (the one actually read), under the name it was opened by.
    pub fn of_file(f: &std::fs::File, path: &Path) -> std::io::Result<FileId> {
        Ok(FileId::from_meta(canonical(path), &f.metadata()?))
    }

    /// The identity of whatever is at `path` now.
    pub fn of_path(path: &Path) -> std::io::Result<FileId> {
        Ok(FileId::from_meta(
            canonical(path),
            &std::fs::metadata(path)?,
        ))
    }

    #[cfg(unix)]
    fn from_meta(path: PathBuf, m: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            path,
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec(),
            ctime_ns: m.ctime().saturating_mul(1_000_000_000) + m.ctime_nsec(),
        }
    }

    #[cfg(not(unix))]
    fn from_meta(path: PathBuf, m: &std::fs::Metadata) -> FileId {
        let ns = |t: std::io::Result<std::time::SystemTime>| {
            t.ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as i64)
        };
        FileId {
            path,
            dev: 0,
            ino: 0,
            size: m.len(),
            mtime_ns: ns(m.modified()),
            ctime_ns: ns(m.created()),
        }
    }

    /// What differs between this identity and `now` of the same path, in words ("inode",
    /// "size", "mtime", "ctime"); empty when they agree.
    pub fn differences(&self, now: &FileId) -> Vec<&'static str> {
        let mut d = Vec::new();
        if self.dev != now.dev {
            d.push("device");
        }
        if self.ino != now.ino {
            d.push("inode");
        }
        if self.size != now.size {
            d.push("size");
        }
        if self.mtime_ns != now.mtime_ns {
            d.push("mtime");
        }
        if self.ctime_ns != now.ctime_ns {
            d.push("ctime");
        }
        d
    }

    /// How a change from this identity to what is at the path now reads in a message:
    /// `"(mtime, ctime)"`, `"(it is gone: …)"`; None when nothing changed.
    pub fn change_now(&self) -> Option<String> {
        match FileId::of_path(&self.path) {
            Err(e) => Some(format!("(it cannot be read any more: {e})")),
            Ok(now) => {
                let d = self.differences(&now);
                (!d.is_empty()).then(|| format!("({})", d.join(", ")))
            }
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.path.display().to_string(),
            "dev": self.dev,
            "ino": self.ino,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "ctime_ns": self.ctime_ns,
        })
    }

    pub fn from_json(v: &serde_json::Value) -> Option<FileId> {
        Some(FileId {
            path: PathBuf::from(v.get("path")?.as_str()?),
            dev: v.get("dev")?.as_u64()?,
            ino: v.get("ino")?.as_u64()?,
            size: v.get("size")?.as_u64()?,
            mtime_ns: v.get("mtime_ns")?.as_i64()?,
            ctime_ns: v.get("ctime_ns")?.as_i64()?,
        })
    }
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    })
}

// ---- the registry of mapped inputs and the SIGBUS handler ---------------------------------

/// How many mappings can be watched at once (a mapping beyond that is read unwatched).
const SLOTS: usize = 4096;
/// How many distinct faulted mappings are remembered (beyond that, every mapping counts as
/// faulted: a wrong "changed" is safe, a missed one is not).
const LOG: usize = 256;

struct Region {
    claimed: AtomicBool,
    /// Start address; 0 while the slot is not published.
    start: AtomicUsize,
    len: AtomicUsize,
    /// The registration's id (never 0).
    id: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Region = Region {
    claimed: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    id: AtomicUsize::new(0),
};
static REGIONS: [Region; SLOTS] = [FREE; SLOTS];

#[allow(clippy::declare_interior_mutable_const)]
const NONE: AtomicUsize = AtomicUsize::new(0);
/// Ids of the registrations whose mapping faulted, in order; `FAULTS` counts them.
static FAULTED: [AtomicUsize; LOG] = [NONE; LOG];
static FAULTS: AtomicUsize = AtomicUsize::new(0);
static NEXT_ID: AtomicUsize = AtomicUsize::new(1);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: std::sync::Once = std::sync::Once::new();
/// Whether the handler is in place.
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// Whether a fault in a watched mapping is caught (see [`catch_faults`]).
static CATCH: AtomicBool = AtomicBool::new(false);

/// From now on, a read past the end of a watched input mapping reads zeros and is reported
/// by [`Registration::faulted`] instead of killing the process. Call it only where every read
/// of a mapping is followed by that check before its result is used.
pub fn catch_faults() {
    install();
    CATCH.store(true, Ordering::SeqCst);
}
/// SIGBUS's disposition before ours, put back for faults that are not ours.
#[cfg(target_os = "linux")]
static mut PREVIOUS_RAW: std::mem::MaybeUninit<libc::sigaction> = std::mem::MaybeUninit::uninit();

/// A mapping being watched; dropping it stops watching (drop it before the mapping goes).
#[derive(Debug)]
pub struct Registration {
    id: usize,
    slot: Option<usize>,
}

impl Registration {
    /// Whether a read of this mapping faulted (the file shrank under it), so that some of what
    /// was read from it were zeros standing in for the lost bytes.
    pub fn faulted(&self) -> bool {
        let n = FAULTS.load(Ordering::SeqCst);
        if n > LOG {
            return true;
        }
        FAULTED[..n]
            .iter()
            .any(|f| f.load(Ordering::SeqCst) == self.id)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            let r = &REGIONS[s];
            r.start.store(0, Ordering::SeqCst);
            r.len.store(0, Ordering::SeqCst);
            r.id.store(0, Ordering::SeqCst);
            r.claimed.store(false, Ordering::SeqCst);
        }
    }
}

/// Watches `len` bytes mapped at `ptr` (an input file's read-only mapping) for SIGBUS,
/// installing the handler on first use.
pub fn register(ptr: *const u8, len: usize) -> Registration {
    let id = NEXT_ID.fetch_add(1, Ordering::SeqCst);
    install();
    if ptr.is_null() || len == 0 || !INSTALLED.load(Ordering::SeqCst) {
        return Registration { id, slot: None };
    }
    for (s, r) in REGIONS.iter().enumerate() {
        if r.claimed
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            r.len.store(len, Ordering::SeqCst);
            r.id.store(id, Ordering::SeqCst);
            // published last: the handler reads start first
            r.start.store(ptr as usize, Ordering::SeqCst);
            return Registration { id, slot: Some(s) };
        }
    }
    log::debug!("more than {SLOTS} input mappings: this one is read unwatched");
    Registration { id, slot: None }
}

fn install() {
    INSTALL.call_once(|| {
        #[cfg(target_os = "linux")]
        // SAFETY: sysconf has no preconditions; the sigaction structs are fully initialised
        // (zeroed, then the fields set), and the handler is an extern "C" fn of the
        // SA_SIGINFO signature.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            if page > 0 {
                PAGE.store(page as usize, Ordering::SeqCst);
            }
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &sa, &mut old) == 0 {
                // written once, before the handler can run with it
                (*std::ptr::addr_of_mut!(PREVIOUS_RAW)).write(old);
                INSTALLED.store(true, Ordering::SeqCst);
            }
        }
    });
}

#[cfg(target_os = "linux")]
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; SIGBUS fills in
    // si_addr
    let addr = unsafe { (*info).si_addr() } as usize;
    let mut hit = 0;
    for r in REGIONS.iter() {
        let start = r.start.load(Ordering::SeqCst);
        if start != 0 && addr >= start && addr - start < r.len.load(Ordering::SeqCst) {
            hit = r.id.load(Ordering::SeqCst);
            break;
        }
    }
    if hit != 0 && CATCH.load(Ordering::SeqCst) {
        let page = PAGE.load(Ordering::SeqCst);
        let at = addr & !(page - 1);
        // SAFETY: the page lies inside a registered read-only input mapping (still mapped:
        // it is unregistered before it is unmapped); replacing it with a private page of
        // zeros changes nothing else. mmap is async-signal-safe (a plain system call).
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            note_fault(hit);
            return;
        }
    }
    // Not ours (or the zero page could not be mapped): put back the disposition SIGBUS had
    // before and return; the faulting instruction runs again and gets it.
    // SAFETY: PREVIOUS_RAW was written before this handler was installed; sigaction is
    // async-signal-safe
    unsafe {
        libc::sigaction(
            libc::SIGBUS,
            (*std::ptr::addr_of!(PREVIOUS_RAW)).as_ptr(),
            std::ptr::null_mut(),
        );
    }
}

/// Records that registration `id` faulted (once).
fn note_fault(id: usize) {
    let n = FAULTS.load(Ordering::SeqCst).min(LOG);
    if FAULTED[..n].iter().any(|f| f.load(Ordering::SeqCst) == id) {
        return;
    }
    let k = FAULTS.fetch_add(1, Ordering::SeqCst);
    if k < LOG {
        FAULTED[k].store(id, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("smelt-fault-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A mapped file cut to one page: reading past the cut gives zeros instead of killing
    /// the process, and only that mapping's registration reports the fault.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_truncated_mapping_reads_zeros_and_is_reported() {
        let dir = temp("trunc");
        let p = dir.join("f.bin");
        let page = PAGE.load(Ordering::SeqCst).max(4096);
        std::fs::write(&p, vec![7u8; 4 * page]).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        // SAFETY: a read-only map of a file this test owns
        let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        catch_faults();
        let reg = register(map.as_ptr(), map.len());
        let other = std::fs::File::open(&p).unwrap();
        // SAFETY: as above
        let other_map = unsafe { memmap2::Mmap::map(&other) }.unwrap();
        let other_reg = register(other_map.as_ptr(), other_map.len());
        assert_eq!(map[0], 7);
        assert!(!reg.faulted());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(page as u64)
            .unwrap();
        // the bytes past the cut read as zeros (volatile: the load must really happen)
        let tail = std::hint::black_box(&map[2 * page..3 * page]);
        let sum: u64 = tail
            .iter()
            .map(|x| unsafe { std::ptr::read_volatile(x) } as u64)
            .sum();
        assert_eq!(sum, 0);
        assert_eq!(map[0], 7, "the part still in the file reads as before");
        assert!(reg.faulted());
        assert!(
            !other_reg.faulted(),
            "another mapping of the file was not read"
        );
        drop(reg);
        drop(other_reg);
        drop(map);
        drop(other_map);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn identity_sees_an_edit_that_keeps_size_and_mtime() {
        let dir = temp("id");
        let p = dir.join("f.bin");
        std::fs::write(&p, b"0123456789").unwrap();
        let before = FileId::of_path(&p).unwrap();
        assert_eq!(before.change_now(), None);
        assert_eq!(FileId::from_json(&before.to_json()).as_ref(), Some(&before));
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all(b"X").unwrap();
        drop(f);
        // the mtime put back by hand
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(before.mtime_ns as u64);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let now = FileId::of_path(&p).unwrap();
        assert_eq!(now.mtime_ns, before.mtime_ns);
        assert_eq!(before.differences(&now), vec!["ctime"]);
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"0123456789").unwrap();
        let d = before.change_now().unwrap();
        assert!(d.contains("ctime"), "{d}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
