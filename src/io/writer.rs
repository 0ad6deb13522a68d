//! Streams merged tensors into safetensors shards.
//!
//! The plan knows every output tensor's name, dtype and shape before any data exists, so
//! each shard's header is written first and every tensor has a fixed byte range: tensors
//! are written with positioned writes in whatever order they finish. Everything goes into
//! a hidden temporary folder beside the target, which is renamed into place only after the
//! last byte is on disk. A failed or interrupted merge leaves no folder that looks finished.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::dtype::DType;
use crate::error::{Error, IoContext, Result};
use crate::io::fault::FileId;
use crate::io::model::{INDEX_NAME, SINGLE_NAME};

/// The files a merge reads, recorded in its journal so that `--resume` reuses nothing made
/// from other bytes: each file's identity as it was opened, and which of them each output
/// shard's tensors were merged from.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub files: Vec<FileId>,
    /// For each output shard, indices into `files`.
    pub reads: Vec<Vec<usize>>,
}

/// Where one output tensor lives.
#[derive(Clone, Debug)]
pub struct Slot {
    pub shard: usize,
    /// Absolute offset of the tensor's bytes within the shard file.
    pub offset: u64,
    pub len: u64,
}

#[derive(Clone, Debug)]
pub struct ShardLayout {
    pub file_name: String,
    pub header: Vec<u8>,
    pub file_len: u64,
    /// Indices (into the plan's tensor list) of the tensors in this shard.
    pub tensors: Vec<usize>,
}

/// The byte layout of every output file, computed from (name, dtype, shape) alone.
#[derive(Clone, Debug)]
pub struct Layout {
    pub shards: Vec<ShardLayout>,
    pub slots: Vec<Slot>,
    pub total_bytes: u64,
    /// tensor name -> shard file name, for the index.
    pub weight_map: BTreeMap<String, String>,
}

pub struct OutTensor<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
}

impl Layout {
    /// Assigns tensors to shards in order, starting a new shard when the next tensor would
    /// push the current one past `max_shard_bytes` (a tensor larger than that gets a shard
    /// of its own). Inside a shard, wider dtypes come first so every tensor stays aligned.
    pub fn new(tensors: &[OutTensor<'_>], max_shard_bytes: u64) -> Layout {
        Layout::named(tensors, max_shard_bytes, SINGLE_NAME)
    }

    /// As [`Layout::new`], naming a lone shard `single_name` (e.g. `adapter_model.safetensors`).
    pub fn named(tensors: &[OutTensor<'_>], max_shard_bytes: u64, single_name: &str) -> Layout {
        Layout::with_metadata(
            tensors,
            max_shard_bytes,
            single_name,
            &BTreeMap::from([("format".to_string(), "pt".to_string())]),
        )
    }

    /// As [`Layout::named`], with `metadata` as every shard's `__metadata__`.
    pub fn with_metadata(
        tensors: &[OutTensor<'_>],
        max_shard_bytes: u64,
        single_name: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Layout {
        let nbytes =
            |t: &OutTensor| t.shape.iter().product::<usize>() as u64 * t.dtype.size() as u64;
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut cur = 0u64;
        for (i, t) in tensors.iter().enumerate() {
            let b = nbytes(t);
            if groups.is_empty() || (cur + b > max_shard_bytes && cur > 0) {
                groups.push(Vec::new());
                cur = 0;
            }
            groups.last_mut().unwrap().push(i);
            cur += b;
        }
        if groups.is_empty() {
            groups.push(Vec::new());
        }
        let n = groups.len();
        let mut slots = vec![
            Slot {
                shard: 0,
                offset: 0,
                len: 0
            };
            tensors.len()
        ];
        let mut shards = Vec::with_capacity(n);
        let mut weight_map = BTreeMap::new();
        let mut total = 0u64;
        for (si, mut g) in groups.into_iter().enumerate() {
            let file_name = if n == 1 {
                single_name.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", si + 1, n)
            };
            g.sort_by_key(|&i| std::cmp::Reverse(tensors[i].dtype.size()));
            let mut header = format!(
                "{{\"__metadata__\":{}",
                serde_json::to_string(metadata).unwrap()
            );
            let mut off = 0u64;
            let mut rel = Vec::with_capacity(g.len());
            for &i in &g {
                let t = &tensors[i];
                let b = nbytes(t);
                header.push_str(&format!(
                    ",{}:{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{},{}]}}",
                    serde_json::to_string(t.name).unwrap(),
                    t.dtype.st_name(),
                    serde_json::to_string(t.shape).unwrap(),
                    off,
                    off + b
                ));
                rel.push((i, off, b));
                off += b;
                weight_map.insert(t.name.to_string(), file_name.clone());
            }
            header.push('}');
            while (header.len() + 8) % 8 != 0 {
                header.push(' ');
            }
            let mut hbytes = (header.len() as u64).to_le_bytes().to_vec();
            hbytes.extend_from_slice(header.as_bytes());
            let data_start = hbytes.len() as u64;
            for (i, o, b) in rel {
                slots[i] = Slot {
                    shard: si,
                    offset: data_start + o,
                    len: b,
                };
            }
            total += off;
            shards.push(ShardLayout {
                file_name,
                file_len: data_start + off,
                header: hbytes,
                tensors: g,
            });
        }
        Layout {
            shards,
            slots,
            total_bytes: total,
            weight_map,
        }
    }

    pub fn index_json(&self) -> String {
        let v = serde_json::json!({
            "metadata": {"total_size": self.total_bytes},
            "weight_map": self.weight_map,
        });
        serde_json::to_string_pretty(&v).unwrap() + "\n"
    }

    pub fn file_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.file_len).sum()
    }
}

/// An output folder being written: the hidden folder `.NAME.smelt-partial` beside the target.
///
/// Each shard is hashed (SHA-256) once its last tensor is on disk, and the hash recorded in
/// a journal (`progress.json`, replaced atomically) with a fingerprint of the whole plan. An
/// interrupted merge keeps the folder ([`StagedOutput::keep`]); `--resume` reopens it and
/// reuses every shard whose hash still verifies. At the end a manifest of every file's hash
/// is written and the folder is renamed into place. Dropped otherwise, it is removed.
pub struct StagedOutput {
    pub final_dir: PathBuf,
    pub tmp_dir: PathBuf,
    files: Vec<File>,
    /// Each fresh shard mapped for writing tensors in place, where its blocks could be
    /// reserved up front (so that no write through the map can meet a full disk); None: its
    /// tensors arrive through [`StagedOutput::write_tensor`].
    maps: Vec<Option<memmap2::MmapRaw>>,
    layout: Layout,
    fingerprint: String,
    algo: HashAlgo,
    /// Hash of each finished shard.
    hashes: Vec<Option<String>>,
    /// Each unfinished shard hashed as it is written, while tensors arrive in file order:
    /// (hasher, the offset it has reached). None once a write comes out of order.
    running: std::sync::Mutex<Vec<Option<(Hasher, u64)>>>,
    committed: bool,
    keep: bool,
    /// Test hook: fail writes with "no space left" once this many tensor bytes are written.
    fault_limit: Option<u64>,
    written: std::sync::atomic::AtomicU64,
    /// fsync each shard when it is finished and the folder before it is renamed.
    durable: bool,
    /// What the merge reads ([`Inputs`]), and which of those files were found changed while
    /// being read (recorded in the journal: `--resume` then accepts them as restored, and
    /// merges again every shard that read them).
    inputs: Inputs,
    changed: Vec<bool>,
}

pub const JOURNAL: &str = "progress.json";
pub const MANIFEST: &str = "smelt-manifest.json";

/// Parses sizes such as `5GB`, `500MB`, `2GiB`, `1000000` (bytes).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 5GB, 500MB, 2GiB)"))?;
    let mul: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        u => {
            return Err(format!(
                "unknown size unit {u:?} in {s:?} (use B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let v = x * mul;
    if v.is_nan() || v < 1.0 {
        return Err(format!("size {s:?} must be at least one byte"));
    }
    Ok(v as u64)
}

/// `.NAME.SUFFIX` beside `final_dir` (the partial folder, the lock file).
pub(crate) fn sibling(final_dir: &Path, suffix: &str) -> PathBuf {
    let name = final_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let parent = final_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(format!(".{name}.{suffix}"))
}

/// The partial folder of an output (stable across runs, so `--resume` can find it).
pub fn partial_path_for(final_dir: &Path) -> PathBuf {
    sibling(final_dir, "smelt-partial")
}

/// Where `--force` parks the folder it replaces until the new one is in place.
fn aside_path_for(final_dir: &Path) -> PathBuf {
    sibling(final_dir, &format!("smelt-old-{}", std::process::id()))
}

/// The hash a manifest records. BLAKE3 by default: a cryptographic hash as strong as SHA-256
/// for detecting changes, and fast enough (GB/s, in parallel) not to dominate a merge; SHA-256
/// for tools that expect it (`sha256sum` checks it directly).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HashAlgo {
    #[default]
    Blake3,
    Sha256,
}

impl HashAlgo {
    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Blake3 => "blake3",
            HashAlgo::Sha256 => "sha256",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "blake3" => Some(HashAlgo::Blake3),
            "sha256" => Some(HashAlgo::Sha256),
            _ => None,
        }
    }
    pub fn hasher(self) -> Hasher {
        match self {
            HashAlgo::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
            HashAlgo::Sha256 => Hasher::Sha256(Box::default()),
        }
    }
}

/// An incremental hash of either kind.
pub enum Hasher {
    Blake3(Box<blake3::Hasher>),
    Sha256(Box<sha2::Sha256>),
}

impl Hasher {
    pub fn update(&mut self, b: &[u8]) {
        match self {
            // big buffers hash on every core
            Hasher::Blake3(h) if b.len() >= 1 << 20 => {
                h.update_rayon(b);
            }
            Hasher::Blake3(h) => {
                h.update(b);
            }
            Hasher::Sha256(h) => sha2::Digest::update(h.as_mut(), b),
        }
    }
    pub fn finish(self) -> String {
        match self {
            Hasher::Blake3(h) => h.finalize().to_hex().to_string(),
            Hasher::Sha256(h) => hex(&sha2::Digest::finalize(*h)),
        }
    }
}

/// The hash of a file, hex.
pub fn hash_file(path: &Path, algo: HashAlgo) -> Result<String> {
    use std::io::Read;
    let (mut f, _) = crate::io::read::open_regular(path, "file")?;
    let mut h = algo.hasher();
    let mut buf = vec![0u8; 16 << 20];
    loop {
        let n = f.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// How to open the output folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new merge; an existing output (or partial) is refused unless `force`.
    Fresh { force: bool },
    /// Continue an interrupted merge of the same plan.
    Resume,
}

impl StagedOutput {
    /// Opens the partial folder: a fresh one with every shard's header and final length, or,
    /// resuming, the existing one with the shards whose journal hashes still verify.
    pub fn create(
        final_dir: &Path,
        start: Start,
        layout: Layout,
        fingerprint: String,
        algo: HashAlgo,
    ) -> Result<Self> {
        Self::create_reading(
            final_dir,
            start,
            layout,
            fingerprint,
            algo,
            Inputs::default(),
        )
    }

    /// [`StagedOutput::create`] for a merge that reads `inputs`: they are recorded in the
    /// journal, and resuming refuses (naming the file) when one of them is not the file the
    /// interrupted merge read.
    pub fn create_reading(
        final_dir: &Path,
        start: Start,
        layout: Layout,
        fingerprint: String,
        algo: HashAlgo,
        inputs: Inputs,
    ) -> Result<Self> {
        let out_err = |msg: String| Error::Output {
            path: final_dir.to_path_buf(),
            msg,
        };
        let force = matches!(start, Start::Fresh { force: true });
        if final_dir.exists() && !final_dir.is_dir() {
            return Err(out_err("exists and is not a folder".into()));
        }
        if final_dir.exists() && !force {
            return Err(out_err(if start == Start::Resume {
                "already exists, so there is nothing to resume; pass --force to merge it again"
                    .into()
            } else {
                "already exists; pass --force to replace it".into()
            }));
        }
        let tmp_dir = partial_path_for(final_dir);
        let mut reuse: Vec<Option<String>> = vec![None; layout.shards.len()];
        match start {
            Start::Resume => {
                if !tmp_dir.is_dir() {
                    return Err(out_err(format!(
                        "no interrupted merge to resume ({} does not exist)",
                        tmp_dir.display()
                    )));
                }
                reuse = verified_shards(&tmp_dir, &layout, &fingerprint, algo, &inputs)?;
            }
            Start::Fresh { force } => {
                if tmp_dir.exists() {
                    if !force {
                        return Err(out_err(format!(
                            "an interrupted merge of it is in {}; pass --resume to continue it or --force to start over",
                            tmp_dir.display()
                        )));
                    }
                    std::fs::remove_dir_all(&tmp_dir).at(&tmp_dir)?;
                }
                std::fs::create_dir_all(&tmp_dir).at(&tmp_dir)?;
            }
        }
        let fault_limit = std::env::var("SMELT_FAULT_WRITE_LIMIT")
            .ok()
            .and_then(|v| v.parse().ok());
        let running = std::sync::Mutex::new(
            layout
                .shards
                .iter()
                .zip(&reuse)
                .map(|(sh, done)| {
                    done.is_none().then(|| {
                        let mut h = algo.hasher();
                        h.update(&sh.header);
                        (h, sh.header.len() as u64)
                    })
                })
                .collect(),
        );
        let mut staged = StagedOutput {
            final_dir: final_dir.to_path_buf(),
            tmp_dir,
            files: Vec::new(),
            maps: Vec::new(),
            layout,
            fingerprint,
            algo,
            running,
            hashes: reuse,
            committed: false,
            keep: false,
            fault_limit,
            written: Default::default(),
            durable: false,
            changed: vec![false; inputs.files.len()],
            inputs,
        };
        // a resumed merge never removes what the interrupted one left, even when it fails
        // here (a full disk while the unfinished shards are sized again)
        staged.keep = start == Start::Resume;
        if let Err(e) = staged.open_shards() {
            return Err(if e.is_disk_full() {
                staged.out_of_space(e)
            } else {
                e
            });
        }
        staged.keep = false;
        Ok(staged)
    }

    /// Opens every shard file: finished ones as they are, the others sized afresh with their
    /// header (and mapped where their blocks could be reserved); then writes the journal.
    fn open_shards(&mut self) -> Result<()> {
        let staged = self;
        for (si, s) in staged.layout.shards.iter().enumerate() {
            let p = staged.tmp_dir.join(&s.file_name);
            if staged.hashes[si].is_some() {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&p)
                    .at(&p)?;
                staged.files.push(f);
                staged.maps.push(None);
                continue;
            }
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)
                .at(&p)?;
            write_all_at(&f, &s.header, 0)
                .map_err(|e| write_error(&p, e, s.header.len() as u64))?;
            let reserved = reserve(&f, s.file_len).map_err(|e| write_error(&p, e, s.file_len))?;
            // the write-fault test hook needs every write to go through write_tensor
            let map = if reserved && staged.fault_limit.is_none() && s.file_len > 0 {
                memmap2::MmapOptions::new().map_raw(&f).ok()
            } else {
                None
            };
            staged.files.push(f);
            staged.maps.push(map);
        }
        staged.save_journal()
    }

    /// The error for a full disk, saying what is kept and how much more space the unfinished
    /// shards need; for an input that changed while it was read, saying what is kept and to
    /// restore the file. Other errors are returned as they are.
    pub fn out_of_space(&self, e: Error) -> Error {
        let total = self.layout.shards.len();
        let done = (0..total).filter(|&s| self.shard_done(s)).count();
        let (path, msg) = match e {
            Error::DiskFull { path, msg } => (path, msg),
            Error::Io { path, source } if crate::error::is_no_space(&source) => {
                (path, format!("disk full: {source}"))
            }
            Error::InputChanged { path, msg } if self.keep => {
                return Error::InputChanged {
                    path,
                    msg: format!(
                        "{msg}; {done} of {total} shards are finished and kept in {}: put the file back as it was and run the same command with --resume",
                        self.tmp_dir.display()
                    ),
                }
            }
            other => return other,
        };
        let unfinished: Vec<usize> = (0..total).filter(|&s| !self.shard_done(s)).collect();
        let need: u64 = unfinished
            .iter()
            .map(|&s| self.layout.shards[s].file_len)
            .sum();
        let what = format!(
            "the {} unfinished shard{} need {need} bytes ({})",
            unfinished.len(),
            if unfinished.len() == 1 { "" } else { "s" },
            approx(need)
        );
        let msg = if self.keep {
            format!(
                "{msg}; {} of {total} shards are finished and kept in {}; {what}: free that much space on its filesystem and run the same command with --resume",
                total - unfinished.len(),
                self.tmp_dir.display()
            )
        } else {
            format!("{msg}; {what}: free that much space on its filesystem and run it again")
        };
        Error::DiskFull { path, msg }
    }

    /// Notes in the journal that input `path` changed while it was read, so that `--resume`
    /// accepts it restored and merges again what was merged from it.
    pub fn mark_changed(&mut self, path: &Path) -> Result<()> {
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        for (k, f) in self.inputs.files.iter().enumerate() {
            if f.path == canon || f.path == path {
                self.changed[k] = true;
            }
        }
        self.save_journal()
    }

    /// Fails, naming the file, when an input shard `si` was merged from is no longer the file
    /// that was opened (rewritten or replaced while it was read).
    fn check_inputs_of(&self, si: usize) -> Result<()> {
        for &k in self.inputs.reads.get(si).into_iter().flatten() {
            let f = &self.inputs.files[k];
            if let Some(what) = f.change_now() {
                return Err(Error::InputChanged {
                    path: f.path.clone(),
                    msg: format!("changed or was truncated while smelt was reading it {what}"),
                });
            }
        }
        Ok(())
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Whether shard `si` was reused from an interrupted run.
    pub fn shard_done(&self, si: usize) -> bool {
        self.hashes[si].is_some()
    }

    /// Shard `si`'s hash once it is finished (what the manifest will record), and its kind.
    pub fn shard_hash(&self, si: usize) -> (HashAlgo, Option<&str>) {
        (self.algo, self.hashes[si].as_deref())
    }

    /// Flush every finished shard, and the folder, to disk before going on (`--fsync`).
    pub fn set_durable(&mut self, durable: bool) {
        self.durable = durable;
    }

    /// Keep the partial folder when dropped (an interrupted merge, to resume).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Where plan tensor `i` can be written in place: its slot in the mapped shard (zeros
    /// until written), or None when its shard is written with [`StagedOutput::write_tensor`].
    /// Once filled, the slot is handed over with [`StagedOutput::wrote_in_place`].
    pub fn slot(&self, i: usize) -> Option<MappedSlot> {
        let slot = &self.layout.slots[i];
        let map = self.maps.get(slot.shard)?.as_ref()?;
        let (off, len) = (slot.offset as usize, slot.len as usize);
        assert!(off + len <= map.len(), "slot past the end of its shard");
        // SAFETY: in bounds of the live mapping (checked above)
        Some(MappedSlot {
            ptr: unsafe { map.as_mut_ptr().add(off) },
            len,
            #[cfg(unix)]
            file: SlotFile {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.files[slot.shard]),
                offset: slot.offset,
                len: slot.len,
                path: self.tmp_dir.join(&self.layout.shards[slot.shard].file_name),
            },
        })
    }

    /// Records plan tensor `i`, written in place into its [`StagedOutput::slot`]: hashes it
    /// and lets go of its pages (they stay in the page cache, dirty, on their way to disk).
    pub fn wrote_in_place(&self, i: usize) {
        let s = self
            .slot(i)
            .expect("wrote_in_place on a shard that is not mapped");
        // SAFETY: the slot lies in the live mapping, and its writer is done with it
        let bytes = unsafe { std::slice::from_raw_parts(s.ptr, s.len) };
        self.note_written(i, bytes);
        #[cfg(unix)]
        {
            // only whole pages inside this slot: the neighbours may still be written
            // SAFETY: sysconf has no preconditions
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
            let start = (s.ptr as usize).div_ceil(page) * page;
            let end = (s.ptr as usize + s.len) / page * page;
            if end > start {
                // SAFETY: a page-aligned range inside the shared file mapping; dropping its
                // pages from this process keeps their contents (and dirtiness) in the file
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
                }
            }
        }
    }

    /// Writes the bytes of plan tensor `i`.
    pub fn write_tensor(&self, i: usize, bytes: &[u8]) -> Result<()> {
        let slot = &self.layout.slots[i];
        assert_eq!(
            slot.len,
            bytes.len() as u64,
            "tensor byte count differs from its slot"
        );
        let path = || self.tmp_dir.join(&self.layout.shards[slot.shard].file_name);
        if let Some(limit) = self.fault_limit {
            let before = self
                .written
                .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::SeqCst);
            if before + bytes.len() as u64 > limit {
                let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
                return Err(write_error(&path(), e, bytes.len() as u64));
            }
        }
        let f = &self.files[slot.shard];
        write_all_at(f, bytes, slot.offset)
            .map_err(|e| write_error(&path(), e, bytes.len() as u64))?;
        self.note_written(i, bytes);
        Ok(())
    }

    /// Folds tensor `i`'s bytes into its shard's running hash while they arrive in order.
    fn note_written(&self, i: usize, bytes: &[u8]) {
        let slot = &self.layout.slots[i];
        let mut running = self.running.lock().unwrap();
        let r = &mut running[slot.shard];
        match r {
            Some((h, at)) if *at == slot.offset => {
                h.update(bytes);
                *at += bytes.len() as u64;
            }
            _ => *r = None,
        }
    }

    /// Records that every tensor of shard `si` is written: flushes it to disk, hashes it,
    /// and notes the hash in the journal. Fails instead, keeping nothing of it, when an input
    /// the shard was merged from is no longer the file that was opened.
    pub fn finish_shard(&mut self, si: usize) -> Result<()> {
        self.check_inputs_of(si)?;
        let p = self.tmp_dir.join(&self.layout.shards[si].file_name);
        let len = self.layout.shards[si].file_len;
        if self.durable {
            self.files[si].sync_all().at(&p)?;
        }
        let running = self.running.lock().unwrap()[si].take();
        self.hashes[si] = Some(match running {
            Some((h, at)) if at == len => h.finish(),
            // written out of order (mixed dtypes in one shard): read it back
            _ => hash_file(&p, self.algo)?,
        });
        let saved = self.save_journal();
        if saved.is_err() {
            // not in the journal, so not finished
            self.hashes[si] = None;
        }
        saved
    }

    fn save_journal(&self) -> Result<()> {
        let shards: BTreeMap<&str, &str> = self
            .layout
            .shards
            .iter()
            .zip(&self.hashes)
            .filter_map(|(s, h)| h.as_deref().map(|h| (s.file_name.as_str(), h)))
            .collect();
        let inputs: Vec<serde_json::Value> = self
            .inputs
            .files
            .iter()
            .zip(&self.changed)
            .map(|(f, &changed)| {
                let mut v = f.to_json();
                if changed {
                    v["changed_while_read"] = true.into();
                }
                v
            })
            .collect();
        let v = serde_json::json!({
            "fingerprint": self.fingerprint,
            "hash": self.algo.name(),
            "shards": shards,
            "inputs": inputs,
        });
        let p = self.tmp_dir.join(JOURNAL);
        let tmp = self.tmp_dir.join(format!("{JOURNAL}.new"));
        let text = serde_json::to_string_pretty(&v).unwrap();
        std::fs::write(&tmp, text.as_bytes())
            .map_err(|e| write_error(&tmp, e, text.len() as u64))?;
        std::fs::rename(&tmp, &p).at(&p)
    }

    /// Writes an extra file (config, card, tokenizer) into the staged folder.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let p = self.tmp_dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| write_error(&p, e, bytes.len() as u64))
    }

    pub fn copy_file(&self, from: &Path, name: &str) -> Result<()> {
        let p = self.tmp_dir.join(name);
        // only a regular file is copied (a FIFO or device named like a tokenizer file would
        // block or never end); streamed, so no size cap is needed
        let (mut src, len) = crate::io::read::open_regular(from, "file to copy")?;
        let perms = src.metadata().at(from)?.permissions();
        let mut dst = File::create(&p).map_err(|e| write_error(&p, e, len))?;
        std::io::copy(&mut src, &mut dst).map_err(|e| write_error(&p, e, len))?;
        dst.set_permissions(perms).at(&p)?;
        Ok(())
    }

    /// Writes the index and the manifest (every file's size and SHA-256), and moves the
    /// folder into place.
    ///
    /// A full disk, or an input found changed, keeps the partial folder with its finished
    /// shards and journal (to `--resume`).
    pub fn commit(mut self) -> Result<PathBuf> {
        match self.commit_inner() {
            Ok(p) => Ok(p),
            Err(e) => {
                if e.is_disk_full() || matches!(e, Error::InputChanged { .. }) {
                    // a manifest cut short must not make the partial folder look finished
                    let _ = std::fs::remove_file(self.tmp_dir.join(MANIFEST));
                    self.keep = true;
                    if let Error::InputChanged { path, .. } = &e {
                        let _ = self.mark_changed(&path.clone());
                    }
                    return Err(self.out_of_space(e));
                }
                Err(e)
            }
        }
    }

    fn commit_inner(&mut self) -> Result<PathBuf> {
        if self.layout.shards.len() > 1 {
            let idx = self.layout.index_json();
            self.write_file(INDEX_NAME, idx.as_bytes())?;
        }
        for si in 0..self.layout.shards.len() {
            if self.hashes[si].is_none() {
                self.finish_shard(si)?;
            }
        }
        self.maps.clear();
        self.files.clear();
        let mut files = BTreeMap::new();
        // the journal stays until the manifest is written (a full disk there keeps the
        // finished shards resumable)
        let journal_new = format!("{JOURNAL}.new");
        let mut names: Vec<String> = std::fs::read_dir(&self.tmp_dir)
            .at(&self.tmp_dir)?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
            .filter(|n| n != JOURNAL && n != MANIFEST && *n != journal_new)
            .collect();
        names.sort();
        for name in names {
            let p = self.tmp_dir.join(&name);
            let shard = self.layout.shards.iter().position(|s| s.file_name == name);
            let digest = match shard {
                Some(si) => self.hashes[si].clone().unwrap(),
                None => hash_file(&p, self.algo)?,
            };
            let bytes = std::fs::metadata(&p).at(&p)?.len();
            let mut e = serde_json::Map::new();
            e.insert("bytes".into(), bytes.into());
            e.insert(self.algo.name().into(), digest.into());
            files.insert(name, serde_json::Value::Object(e));
        }
        let manifest = serde_json::json!({
            "format": "smelt-manifest/1",
            "smelt_version": env!("CARGO_PKG_VERSION"),
            "files": files,
        });
        self.write_file(
            MANIFEST,
            (serde_json::to_string_pretty(&manifest).unwrap() + "\n").as_bytes(),
        )?;
        let _ = std::fs::remove_file(self.tmp_dir.join(JOURNAL));
        let _ = std::fs::remove_file(self.tmp_dir.join(&journal_new));
        if self.durable {
            if let Ok(d) = File::open(&self.tmp_dir) {
                let _ = d.sync_all();
            }
        }
        if self.final_dir.exists() {
            // --force: move the old folder aside first so that a failure here loses nothing.
            let old = aside_path_for(&self.final_dir);
            if old.exists() {
                std::fs::remove_dir_all(&old).at(&old)?;
            }
            std::fs::rename(&self.final_dir, &old).at(&self.final_dir)?;
            std::fs::rename(&self.tmp_dir, &self.final_dir).at(&self.final_dir)?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.tmp_dir, &self.final_dir).at(&self.final_dir)?;
        }
        self.committed = true;
        Ok(self.final_dir.clone())
    }
}

/// The shards of an interrupted run that can be reused: every input the same file as the
/// interrupted run read (else refused, naming it), same plan fingerprint, and the shard file
/// still hashes to what the journal recorded. An input the interrupted run found changed
/// while reading it (and told the user to restore) is accepted, and every shard merged from
/// it is merged again: nothing here can prove the restored bytes are the ones read before.
fn verified_shards(
    dir: &Path,
    layout: &Layout,
    fingerprint: &str,
    algo: HashAlgo,
    inputs: &Inputs,
) -> Result<Vec<Option<String>>> {
    let out_err = |msg: String| Error::Output {
        path: dir.to_path_buf(),
        msg,
    };
    let jp = dir.join(JOURNAL);
    let text = crate::io::read::read_string_capped(&jp, crate::io::read::JSON_CAP, "journal")?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| out_err(format!("{}: not valid JSON: {e}", jp.display())))?;
    let restored = same_inputs(dir, &v, inputs)?;
    if v.get("fingerprint").and_then(|f| f.as_str()) != Some(fingerprint) {
        return Err(out_err(format!(
            "the interrupted merge in {} was made from a different recipe, seed, inputs or smelt version; pass --force to start over",
            dir.display()
        )));
    }
    let shards = v
        .get("shards")
        .and_then(|s| s.as_object())
        .cloned()
        .unwrap_or_default();
    let mut out = vec![None; layout.shards.len()];
    for (si, s) in layout.shards.iter().enumerate() {
        let Some(want) = shards.get(&s.file_name).and_then(|h| h.as_str()) else {
            continue;
        };
        let p = dir.join(&s.file_name);
        let from = inputs.reads.get(si).into_iter().flatten();
        if let Some(k) = from.into_iter().find(|&&k| restored[k]) {
            log::warn!(
                "{}: merged from {} before it changed; merging it again",
                p.display(),
                inputs.files[*k].path.display()
            );
            continue;
        }
        let ok = std::fs::metadata(&p)
            .map(|m| m.len() == s.file_len)
            .unwrap_or(false)
            && v.get("hash").and_then(|h| h.as_str()) == Some(algo.name())
            && hash_file(&p, algo).map(|h| h == want).unwrap_or(false);
        if ok {
            out[si] = Some(want.to_string());
        } else {
            log::warn!(
                "{}: does not match its recorded hash; merging it again",
                p.display()
            );
        }
    }
    Ok(out)
}

/// Checks that every input is the file the interrupted merge read, as its journal records
/// it (`v`), refusing with one line naming the first that is not. Returns, per input,
/// whether it was found changed while the interrupted merge read it and differs now (the
/// user restored it, as told).
fn same_inputs(dir: &Path, v: &serde_json::Value, inputs: &Inputs) -> Result<Vec<bool>> {
    let mut restored = vec![false; inputs.files.len()];
    if inputs.files.is_empty() {
        return Ok(restored);
    }
    let recorded: Vec<(FileId, bool)> = v
        .get("inputs")
        .and_then(|i| i.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    let changed = e.get("changed_while_read").and_then(|c| c.as_bool());
                    FileId::from_json(e).map(|id| (id, changed == Some(true)))
                })
                .collect()
        })
        .unwrap_or_default();
    if v.get("inputs").is_none() {
        return Err(Error::Output {
            path: dir.to_path_buf(),
            msg: "records no identity of the files it read (an older smelt made it), so nothing in it can be trusted: pass --force to start over".into(),
        });
    }
    let refuse = |path: &Path, why: String| {
        Error::InputChanged {
        path: path.to_path_buf(),
        msg: format!(
            "{why}; nothing from it can be reused, so the interrupted merge in {} is left as it is: pass --force to start over",
            dir.display()
        ),
    }
    };
    for (k, now) in inputs.files.iter().enumerate() {
        let Some((then, changed)) = recorded.iter().find(|(r, _)| r.path == now.path) else {
            return Err(refuse(
                &now.path,
                "was not read by the interrupted merge (it read other files)".into(),
            ));
        };
        let d = then.differences(now);
        if d.is_empty() {
            continue;
        }
        if *changed {
            restored[k] = true;
            continue;
        }
        return Err(refuse(
            &now.path,
            format!("changed since the interrupted merge ({})", d.join(", ")),
        ));
    }
    Ok(restored)
}

/// Bytes the unfinished shards of an interrupted merge of `final_dir` still need on disk:
/// the shards its journal does not list as finished, less what their files already hold
/// (they are sized again in place). What a `--resume` checks against the free space.
pub fn remaining_bytes(final_dir: &Path, layout: &Layout) -> u64 {
    let dir = partial_path_for(final_dir);
    let done: std::collections::BTreeSet<String> = crate::io::read::read_string_capped(
        &dir.join(JOURNAL),
        crate::io::read::JSON_CAP,
        "journal",
    )
    .ok()
    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    .and_then(|v| v.get("shards").and_then(|s| s.as_object()).cloned())
    .map(|m| m.keys().cloned().collect())
    .unwrap_or_default();
    layout
        .shards
        .iter()
        .filter(|s| !done.contains(&s.file_name))
        .map(|s| {
            let held = std::fs::metadata(dir.join(&s.file_name)).map_or(0, |m| allocated(&m));
            s.file_len.saturating_sub(held)
        })
        .sum()
}

/// A byte count in words ("12.3 MB", "4.1 GB"), for messages (io stays below `units`).
fn approx(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1} GB", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        n => format!("{:.1} KB", n as f64 / 1e3),
    }
}

/// Bytes a file occupies on disk.
fn allocated(m: &std::fs::Metadata) -> u64 {
    #[cfg(unix)]
    {
        std::os::unix::fs::MetadataExt::blocks(m) * 512
    }
    #[cfg(not(unix))]
    {
        m.len()
    }
}

impl Drop for StagedOutput {
    fn drop(&mut self) {
        if !self.committed && !self.keep {
            self.maps.clear();
            self.files.clear();
            let _ = std::fs::remove_dir_all(&self.tmp_dir);
        }
    }
}

fn write_error(path: &Path, e: std::io::Error, bytes: u64) -> Error {
    if crate::error::is_no_space(&e) {
        return Error::DiskFull {
            path: path.to_path_buf(),
            msg: format!("disk full while writing {bytes} bytes: {e}"),
        };
    }
    Error::Output {
        path: path.to_path_buf(),
        msg: format!("write of {bytes} bytes failed: {e}"),
    }
}

/// Sizes a new shard to `len` bytes with its blocks allocated up front where the filesystem
/// can (`fallocate`), else as a sparse file. Reserving the blocks makes a full disk fail here,
/// before any merging, instead of halfway through; and on ext4 it makes the writes that
/// follow ~2.5x cheaper than filling a sparse file (measured in `bench/README.md`), because
/// delayed allocation no longer has to map every page as it is written.
/// Returns whether the blocks were reserved.
fn reserve(f: &File, len: u64) -> std::io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let n = libc::off_t::try_from(len).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        // SAFETY: a valid open file descriptor; mode 0 allocates and extends the file.
        if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, n) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // not supported by this filesystem: a sparse file it is
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {}
            _ => return Err(e),
        }
    }
    f.set_len(len).map(|()| false)
}

/// A tensor's place in a mapped shard ([`StagedOutput::slot`]).
pub struct MappedSlot {
    ptr: *mut u8,
    len: usize,
    #[cfg(unix)]
    file: SlotFile,
}

/// A mapped slot's place in its shard file, for writing it with `pwrite` instead of through
/// the mapping (see [`SlotFile::write_at`]).
#[cfg(unix)]
#[derive(Clone, Debug)]
pub struct SlotFile {
    fd: std::os::fd::RawFd,
    offset: u64,
    len: u64,
    /// The shard file, for error messages.
    path: PathBuf,
}

#[cfg(unix)]
impl SlotFile {
    /// Writes `bytes` at byte `at` of the slot through the file. The pages are the same
    /// page-cache pages the mapping shows (a shared mapping and `pwrite` agree), but a whole
    /// page written this way is not zero-filled first, as a page first touched through the
    /// mapping is.
    ///
    /// # Safety
    /// The [`StagedOutput`] the slot came from must still be alive (it owns the file), and
    /// the range must not be written by anyone else at the same time.
    pub unsafe fn write_at(&self, at: u64, bytes: &[u8]) -> Result<()> {
        assert!(
            at + bytes.len() as u64 <= self.len,
            "write past the end of its slot"
        );
        use std::os::fd::FromRawFd;
        // SAFETY: the fd belongs to the live StagedOutput (the caller's promise); wrapped
        // without taking ownership, so it is not closed here
        let f = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(self.fd) });
        write_all_at(&f, bytes, self.offset + at)
            .map_err(|e| write_error(&self.path, e, bytes.len() as u64))
    }
}

impl MappedSlot {
    /// The slot's place in its file, for [`SlotFile::write_at`].
    #[cfg(unix)]
    pub fn file(&self) -> SlotFile {
        self.file.clone()
    }

    /// The slot's bytes, to fill.
    ///
    /// # Safety
    /// The [`StagedOutput`] it came from must outlive the slice, and nothing else may touch
    /// this slot until the slice is dropped and the slot handed over with
    /// [`StagedOutput::wrote_in_place`].
    pub unsafe fn bytes<'a>(&self) -> &'a mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

#[cfg(unix)]
fn write_all_at(f: &File, buf: &[u8], off: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, buf, off)
}

#[cfg(windows)]
fn write_all_at(f: &File, mut buf: &[u8], mut off: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = f.seek_write(buf, off)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
        off += n as u64;
    }
    Ok(())
}

/// Free bytes on the filesystem that holds `path` (or its nearest existing ancestor).
pub fn free_space(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        let mut p = path.to_path_buf();
        while !p.exists() {
            p = p.parent()?.to_path_buf();
            if p.as_os_str().is_empty() {
                p = PathBuf::from(".");
            }
        }
        let c = std::ffi::CString::new(p.as_os_str().to_string_lossy().as_bytes()).ok()?;
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: c is a valid NUL-terminated path and s a properly sized out-parameter.
        let r = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
        if r != 0 {
            return None;
        }
        Some(s.f_bavail as u64 * s.f_frsize as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tensors a (f32, shape `s1`), b (bf16, shape `s2`) and c (f32, shape `s1`).
    fn abc<'a>(s1: &'a [usize], s2: &'a [usize]) -> [OutTensor<'a>; 3] {
        let t = |name, dtype, shape| OutTensor { name, dtype, shape };
        [
            t("a", DType::F32, s1),
            t("b", DType::BF16, s2),
            t("c", DType::F32, s1),
        ]
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("1.5 MB").unwrap(), 1_500_000);
        assert!(parse_size("abc").is_err());
        assert!(parse_size("5XB").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn layout_shards_and_offsets() {
        let s1 = [4usize, 4];
        let s2 = [10usize];
        let ts = abc(&s1, &s2);
        let l = Layout::new(&ts, 90);
        assert_eq!(l.shards.len(), 2);
        assert_eq!(l.shards[0].file_name, "model-00001-of-00002.safetensors");
        assert_eq!(l.shards[0].tensors, vec![0, 1]);
        assert_eq!(l.slots[1].offset - l.slots[0].offset, 64);
        assert_eq!(l.total_bytes, 64 + 20 + 64);
        let one = Layout::new(&ts, 1 << 30);
        assert_eq!(one.shards[0].file_name, "model.safetensors");
        // header length is a multiple of 8
        assert_eq!(one.shards[0].header.len() % 8, 0);
        // the header parses with our own reader
        let mut file = one.shards[0].header.clone();
        file.resize(one.shards[0].file_len as usize, 0);
        let h = crate::io::safetensors::parse_header(&file, file.len() as u64).unwrap();
        assert_eq!(h.tensors.len(), 3);
    }

    /// Tensors written in place through the map, through the slot's file (`pwrite`, in
    /// pieces, mixed with the map) and through `write_tensor`, in and out of file order, end
    /// up as the same file bytes and manifest hashes as the data written by hand; a slot
    /// reads as zeros before it is written.
    #[test]
    fn in_place_and_pwrite_give_the_same_shards() {
        let shape_a = [3usize, 1500];
        let shape_b = [5000usize];
        let ts = abc(&shape_a, &shape_b);
        let data: Vec<Vec<u8>> = [18000usize, 10000, 18000]
            .iter()
            .enumerate()
            .map(|(t, &n)| (0..n).map(|k| (k * 7 + t * 13 + k / 251) as u8).collect())
            .collect();
        let dir = std::env::temp_dir().join(format!("smelt-writer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut manifests = Vec::new();
        // (order of tensors, how each is written: 0 through the map, 1 by write_tensor, 2
        // through the slot's file and the map)
        for (k, (order, how)) in [
            ([0, 1, 2], [0, 0, 0]),
            ([2, 0, 1], [0, 1, 0]),
            ([1, 2, 0], [1, 1, 1]),
            ([2, 1, 0], [2, 0, 2]),
        ]
        .into_iter()
        .enumerate()
        {
            let out = dir.join(format!("out{k}"));
            let layout = Layout::new(&ts, 30_000);
            assert_eq!(layout.shards.len(), 2);
            let st = StagedOutput::create(
                &out,
                Start::Fresh { force: false },
                layout,
                "fp".into(),
                HashAlgo::Blake3,
            )
            .unwrap();
            for i in order {
                match st.slot(i) {
                    Some(slot) if how[i] == 0 => {
                        // SAFETY: the staged output lives on, and nothing else uses slot i
                        let b = unsafe { slot.bytes() };
                        assert!(b.iter().all(|&x| x == 0), "a fresh slot reads as zeros");
                        b.copy_from_slice(&data[i]);
                        st.wrote_in_place(i);
                    }
                    #[cfg(unix)]
                    Some(slot) if how[i] == 2 => {
                        // the back half by pwrite (from its end), the first 100 bytes
                        // through the map, the rest by pwrite; the map shows it all
                        let (f, d) = (slot.file(), &data[i]);
                        let half = d.len() / 2;
                        // SAFETY: as above, and one writer at a time
                        unsafe {
                            f.write_at(half as u64 + 7, &d[half + 7..]).unwrap();
                            f.write_at(half as u64, &d[half..half + 7]).unwrap();
                            slot.bytes()[..100].copy_from_slice(&d[..100]);
                            f.write_at(100, &d[100..half]).unwrap();
                            assert_eq!(slot.bytes(), &d[..], "the map shows the file's bytes");
                        }
                        st.wrote_in_place(i);
                    }
                    _ => st.write_tensor(i, &data[i]).unwrap(),
                }
            }
            let dir_out = st.commit().unwrap();
            let layout = Layout::new(&ts, 30_000);
            for sh in &layout.shards {
                let bytes = std::fs::read(dir_out.join(&sh.file_name)).unwrap();
                assert_eq!(bytes.len() as u64, sh.file_len);
                assert_eq!(&bytes[..sh.header.len()], &sh.header[..]);
                for &i in &sh.tensors {
                    let slot = &layout.slots[i];
                    let at = slot.offset as usize;
                    assert_eq!(&bytes[at..at + data[i].len()], &data[i][..], "tensor {i}");
                }
            }
            manifests.push(std::fs::read_to_string(dir_out.join(MANIFEST)).unwrap());
        }
        assert!(manifests.windows(2).all(|w| w[0] == w[1]));
        // the manifest's hashes are those of the files (also when written out of order)
        let m: serde_json::Value = serde_json::from_str(&manifests[0]).unwrap();
        for (name, e) in m["files"].as_object().unwrap() {
            let h = hash_file(&dir.join("out1").join(name), HashAlgo::Blake3).unwrap();
            assert_eq!(e["blake3"].as_str().unwrap(), h, "{name}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
