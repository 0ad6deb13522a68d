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
use crate::io::model::{INDEX_NAME, SINGLE_NAME};

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
                SINGLE_NAME.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", si + 1, n)
            };
            g.sort_by_key(|&i| std::cmp::Reverse(tensors[i].dtype.size()));
            let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
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

/// An output folder being written. Dropping it without [`StagedOutput::commit`] removes the
/// temporary folder.
pub struct StagedOutput {
    pub final_dir: PathBuf,
    pub tmp_dir: PathBuf,
    files: Vec<File>,
    layout: Layout,
    committed: bool,
}

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

fn tmp_path_for(final_dir: &Path) -> PathBuf {
    let name = final_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let parent = final_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(format!(".{name}.smelt-tmp-{}", std::process::id()))
}

/// Where `--force` parks the folder it replaces until the new one is in place.
fn aside_path_for(final_dir: &Path) -> PathBuf {
    let mut p = tmp_path_for(final_dir).into_os_string();
    p.push(".old");
    PathBuf::from(p)
}

impl StagedOutput {
    /// Creates the temporary folder and every shard with its header and final length.
    pub fn create(final_dir: &Path, force: bool, layout: Layout) -> Result<Self> {
        let out_err = |msg: String| Error::Output {
            path: final_dir.to_path_buf(),
            msg,
        };
        if final_dir.exists() && !force {
            return Err(out_err("already exists; pass --force to replace it".into()));
        }
        if final_dir.exists() && !final_dir.is_dir() {
            return Err(out_err("exists and is not a folder".into()));
        }
        let tmp_dir = tmp_path_for(final_dir);
        if tmp_dir.exists() {
            std::fs::remove_dir_all(&tmp_dir).at(&tmp_dir)?;
        }
        std::fs::create_dir_all(&tmp_dir).at(&tmp_dir)?;
        let mut staged = StagedOutput {
            final_dir: final_dir.to_path_buf(),
            tmp_dir,
            files: Vec::new(),
            layout,
            committed: false,
        };
        for s in &staged.layout.shards {
            let p = staged.tmp_dir.join(&s.file_name);
            let f = File::create(&p).at(&p)?;
            write_all_at(&f, &s.header, 0)
                .map_err(|e| write_error(&p, e, s.header.len() as u64))?;
            f.set_len(s.file_len)
                .map_err(|e| write_error(&p, e, s.file_len))?;
            staged.files.push(f);
        }
        Ok(staged)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Writes the bytes of plan tensor `i`.
    pub fn write_tensor(&self, i: usize, bytes: &[u8]) -> Result<()> {
        let slot = &self.layout.slots[i];
        assert_eq!(
            slot.len,
            bytes.len() as u64,
            "tensor byte count differs from its slot"
        );
        let f = &self.files[slot.shard];
        write_all_at(f, bytes, slot.offset).map_err(|e| {
            write_error(
                &self.tmp_dir.join(&self.layout.shards[slot.shard].file_name),
                e,
                bytes.len() as u64,
            )
        })
    }

    /// Writes an extra file (config, card, tokenizer) into the staged folder.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let p = self.tmp_dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| write_error(&p, e, bytes.len() as u64))
    }

    pub fn copy_file(&self, from: &Path, name: &str) -> Result<()> {
        let p = self.tmp_dir.join(name);
        std::fs::copy(from, &p).map_err(|e| write_error(&p, e, 0))?;
        Ok(())
    }

    /// Flushes everything, writes the index, and moves the folder into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.layout.shards.len() > 1 {
            let idx = self.layout.index_json();
            self.write_file(INDEX_NAME, idx.as_bytes())?;
        }
        for (f, s) in self.files.iter().zip(&self.layout.shards) {
            f.sync_all().at(self.tmp_dir.join(&s.file_name))?;
        }
        self.files.clear();
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

impl Drop for StagedOutput {
    fn drop(&mut self) {
        if !self.committed {
            self.files.clear();
            let _ = std::fs::remove_dir_all(&self.tmp_dir);
        }
    }
}

fn write_error(path: &Path, e: std::io::Error, bytes: u64) -> Error {
    let msg = if e.raw_os_error() == Some(libc::ENOSPC) {
        format!("disk full while writing {bytes} bytes: {e}")
    } else {
        format!("write of {bytes} bytes failed: {e}")
    };
    Error::Output {
        path: path.to_path_buf(),
        msg,
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
        let ts = [
            OutTensor {
                name: "a",
                dtype: DType::F32,
                shape: &s1,
            },
            OutTensor {
                name: "b",
                dtype: DType::BF16,
                shape: &s2,
            },
            OutTensor {
                name: "c",
                dtype: DType::F32,
                shape: &s1,
            },
        ];
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
}
