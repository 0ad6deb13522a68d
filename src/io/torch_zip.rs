//! PyTorch checkpoints (`pytorch_model.bin`, `torch.save`'s zip format) read without
//! running any pickle code.
//!
//! The file is a zip whose entries are all STORED (torch never compresses them):
//! `<archive>/data.pkl` (the state dict, pickled, read by `io::pickle`),
//! `<archive>/data/<key>` (one entry per storage, raw little-endian elements),
//! `<archive>/byteorder` and `<archive>/version`. The zip is memory-mapped like a
//! safetensors file, and each tensor becomes a byte range inside its storage's entry, so a
//! tensor is read only when the merge touches it. Tensors that share a storage (tied
//! embeddings, slices of one buffer) point at the same bytes. A tensor that is not
//! contiguous row-major (a saved transpose, say) is copied once, at open, into an owned
//! buffer in row-major order; those copies together may not exceed the file's size.
//!
//! The result is a [`SafetensorsFile`] whose "data region" is the whole zip, so the rest of
//! smelt (plans, digests, read-ahead, merges) handles it exactly as a safetensors shard.

use std::collections::HashMap;
use std::path::Path;

use memmap2::Mmap;

use crate::error::{Error, IoContext, Result};
use crate::io::pickle::{load_state_dict, TensorDesc};
use crate::io::safetensors::{SafetensorsFile, TensorInfo};

/// The file name of a single-file PyTorch checkpoint in a model folder.
pub const TORCH_SINGLE_NAME: &str = "pytorch_model.bin";
/// The index of a sharded PyTorch checkpoint (the same JSON shape as the safetensors one).
pub const TORCH_INDEX_NAME: &str = "pytorch_model.bin.index.json";

/// Entries a zip may list (a state dict of 100k tensors has 100k + 4).
const MAX_ENTRIES: usize = 1 << 22;

/// One STORED entry of the zip: its name and where its bytes are in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZipEntry {
    pub name: String,
    pub start: usize,
    pub len: usize,
}

type R<T> = std::result::Result<T, String>;

fn le16(b: &[u8], at: usize) -> R<u16> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| {
            format!(
                "the zip structure at byte {at} runs past the end of the file (truncated file?)"
            )
        })
}
fn le32(b: &[u8], at: usize) -> R<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| {
            format!(
                "the zip structure at byte {at} runs past the end of the file (truncated file?)"
            )
        })
}
fn le64(b: &[u8], at: usize) -> R<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| {
            format!(
                "the zip structure at byte {at} runs past the end of the file (truncated file?)"
            )
        })
}
fn to_usize(v: u64, what: &str) -> R<usize> {
    usize::try_from(v).map_err(|_| format!("{what} {v} does not fit this machine"))
}

/// Lists the entries of a zip held in `b`, every offset and length checked against `b`.
/// Only STORED (uncompressed), unencrypted entries are accepted.
pub fn zip_entries(b: &[u8]) -> R<Vec<ZipEntry>> {
    const EOCD: u32 = 0x0605_4b50;
    if b.len() >= 4 && !b.starts_with(b"PK\x03\x04") {
        return Err(
            "it is not a zip file; smelt reads PyTorch checkpoints in torch.save's zip format \
             (PyTorch 1.6 and later), not the older format"
                .into(),
        );
    }
    if b.len() < 22 {
        return Err(format!(
            "the file is {} bytes, too short to be a zip (truncated file?)",
            b.len()
        ));
    }
    // The end-of-central-directory record is within the last 22 + 65535 bytes.
    let lo = b.len().saturating_sub(22 + 0xFFFF);
    let eocd = (lo..=b.len() - 22)
        .rev()
        .find(|&i| le32(b, i) == Ok(EOCD))
        .ok_or("it has no zip directory at its end (truncated file?)")?;
    let mut count = le16(b, eocd + 10)? as u64;
    let mut cd_size = le32(b, eocd + 12)? as u64;
    let mut cd_off = le32(b, eocd + 16)? as u64;
    if count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_off == 0xFFFF_FFFF {
        // zip64: a locator just before the record points at the zip64 record.
        let loc = eocd
            .checked_sub(20)
            .filter(|&l| le32(b, l) == Ok(0x0706_4b50))
            .ok_or("its zip directory says zip64 but has no zip64 locator")?;
        let rec = to_usize(le64(b, loc + 8)?, "zip64 record offset")?;
        if le32(b, rec) != Ok(0x0606_4b50) {
            return Err("its zip64 directory record is missing or damaged".into());
        }
        count = le64(b, rec + 32)?;
        cd_size = le64(b, rec + 40)?;
        cd_off = le64(b, rec + 48)?;
    }
    let cd_off = to_usize(cd_off, "directory offset")?;
    let cd_end = to_usize(cd_size, "directory size")?
        .checked_add(cd_off)
        .filter(|&e| e <= b.len())
        .ok_or("its zip directory reaches past the end of the file (truncated file?)")?;
    // Each directory record is at least 46 bytes: a count beyond that is a lie.
    if count > ((cd_end - cd_off) / 46) as u64 || count as usize > MAX_ENTRIES {
        return Err(format!(
            "its zip directory claims {count} entries, more than it has room for"
        ));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut at = cd_off;
    for _ in 0..count {
        if at + 46 > cd_end || le32(b, at)? != 0x0201_4b50 {
            return Err(format!("its zip directory is damaged at byte {at}"));
        }
        let flags = le16(b, at + 8)?;
        let method = le16(b, at + 10)?;
        let mut csize = le32(b, at + 20)? as u64;
        let mut usize_ = le32(b, at + 24)? as u64;
        let nlen = le16(b, at + 28)? as usize;
        let xlen = le16(b, at + 30)? as usize;
        let clen = le16(b, at + 32)? as usize;
        let mut local = le32(b, at + 42)? as u64;
        let name_at = at + 46;
        let rec_end = name_at + nlen + xlen + clen;
        if rec_end > cd_end {
            return Err(format!("its zip directory is damaged at byte {at}"));
        }
        let name = String::from_utf8_lossy(&b[name_at..name_at + nlen]).into_owned();
        // zip64 sizes and offset, in this order, for the fields that are all ones.
        let mut x = name_at + nlen;
        let x_end = x + xlen;
        while x + 4 <= x_end {
            let id = le16(b, x)?;
            let n = le16(b, x + 2)? as usize;
            let body = x + 4;
            if body + n > x_end {
                break;
            }
            if id == 1 {
                let mut p = body;
                for f in [&mut usize_, &mut csize, &mut local] {
                    if *f == 0xFFFF_FFFF {
                        if p + 8 > body + n {
                            return Err(format!("entry {name}: its zip64 field is too short"));
                        }
                        *f = le64(b, p)?;
                        p += 8;
                    }
                }
            }
            x = body + n;
        }
        if flags & 1 != 0 {
            return Err(format!("entry {name} is encrypted"));
        }
        if method != 0 {
            return Err(format!(
                "entry {name} is compressed (zip method {method}); torch.save stores entries \
                 uncompressed and smelt maps them in place: re-save the checkpoint with torch.save, \
                 or convert it to safetensors"
            ));
        }
        if csize != usize_ {
            return Err(format!(
                "entry {name} is stored but its sizes disagree ({csize} vs {usize_})"
            ));
        }
        let local = to_usize(local, "entry offset")?;
        if le32(b, local) != Ok(0x0403_4b50) {
            return Err(format!(
                "entry {name}: its local header is missing or damaged"
            ));
        }
        let start = local + 30 + le16(b, local + 26)? as usize + le16(b, local + 28)? as usize;
        let len = to_usize(usize_, "entry size")?;
        if start.checked_add(len).is_none_or(|e| e > b.len()) {
            return Err(format!(
                "entry {name} ({len} bytes at byte {start}) reaches past the end of the file (truncated file?)"
            ));
        }
        out.push(ZipEntry { name, start, len });
        at = rec_end;
    }
    Ok(out)
}

/// The tensors of a torch.save zip in `b`: each as a [`TensorInfo`] whose offsets are
/// absolute in `b` (contiguous tensors) or, past `b.len()`, in the returned owned buffer
/// (tensors copied into row-major order). Errors are sentences without the path.
pub fn torch_tensors(b: &[u8]) -> R<(Vec<TensorInfo>, Vec<u8>)> {
    let entries = zip_entries(b)?;
    let pkl: Vec<&ZipEntry> = entries
        .iter()
        .filter(|e| {
            e.name.ends_with("/data.pkl") && e.name.matches('/').count() == 1
                || e.name == "data.pkl"
        })
        .collect();
    let pkl = match pkl.as_slice() {
        [one] => *one,
        [] => return Err("it is a zip but has no data.pkl: not a torch.save checkpoint".into()),
        _ => return Err("it has several data.pkl entries: not a torch.save checkpoint".into()),
    };
    let prefix = &pkl.name[..pkl.name.len() - "data.pkl".len()];
    let by_name: HashMap<&str, &ZipEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let bytes_of = |e: &ZipEntry| &b[e.start..e.start + e.len];
    if let Some(bo) = by_name.get(format!("{prefix}byteorder").as_str()) {
        let order = bytes_of(bo);
        if order != b"little" {
            return Err(format!(
                "it was saved in {} byte order; smelt reads little-endian checkpoints only: \
                 load and re-save it on a little-endian machine, or convert it to safetensors",
                String::from_utf8_lossy(&order[..order.len().min(16)])
            ));
        }
    }
    let descs = load_state_dict(bytes_of(pkl))?;
    let mut owned: Vec<u8> = Vec::new();
    let mut out = Vec::with_capacity(descs.len());
    for (name, d) in descs {
        let entry_name = format!("{prefix}data/{}", d.storage);
        let e = by_name.get(entry_name.as_str()).ok_or_else(|| {
            format!(
                "tensor {name} refers to storage {}, but the zip has no entry {entry_name}",
                d.storage
            )
        })?;
        let (begin, end) = locate(&name, &d, e, b, &mut owned)?;
        out.push(TensorInfo {
            name,
            dtype: d.dtype,
            shape: d.shape.iter().map(|&x| x as usize).collect(),
            begin,
            end,
        });
    }
    Ok((out, owned))
}

/// Where tensor `d`'s bytes are: a range of `b` when it is contiguous, else a copy appended
/// to `owned` (returned as a range past `b.len()`).
fn locate(
    name: &str,
    d: &TensorDesc,
    e: &ZipEntry,
    b: &[u8],
    owned: &mut Vec<u8>,
) -> R<(usize, usize)> {
    let es = d.dtype.size() as u64;
    let overflow = || format!("tensor {name}: its shape {:?} overflows", d.shape);
    let mut numel: u64 = 1;
    for &s in &d.shape {
        numel = numel.checked_mul(s).ok_or_else(overflow)?;
    }
    let nbytes = numel.checked_mul(es).ok_or_else(overflow)?;
    let cap = e.len as u64 / es;
    if numel == 0 {
        let at = e.start as u64 + (d.offset.min(cap)) * es;
        return Ok((at as usize, at as usize));
    }
    // The last element the view touches must lie inside the storage.
    let mut last = d.offset;
    for (&s, &st) in d.shape.iter().zip(&d.stride) {
        last = (s - 1)
            .checked_mul(st)
            .and_then(|x| x.checked_add(last))
            .ok_or_else(overflow)?;
    }
    if last >= cap {
        return Err(format!(
            "tensor {name} (offset {}, shape {:?}, stride {:?}) reaches element {last} of storage {}, which holds only {cap} {} elements (truncated or damaged file?)",
            d.offset, d.shape, d.stride, d.storage, d.dtype
        ));
    }
    let mut want = 1u64;
    let mut contiguous = true;
    for (&s, &st) in d.shape.iter().zip(&d.stride).rev() {
        if s != 1 && st != want {
            contiguous = false;
        }
        want = want.saturating_mul(s);
    }
    let base = e.start as u64 + d.offset * es;
    if contiguous {
        return Ok((base as usize, (base + nbytes) as usize));
    }
    // A strided view: gather it into row-major order once.
    if owned.len() as u64 + nbytes > b.len() as u64 {
        return Err(format!(
            "tensor {name} is a strided view (shape {:?}, stride {:?}) whose copy, with the others, would be larger than the file itself; \
             save it with .contiguous() or convert the file to safetensors",
            d.shape, d.stride
        ));
    }
    let start = b.len() + owned.len();
    owned.reserve(nbytes as usize);
    let es = es as usize;
    let nd = d.shape.len();
    let mut idx = vec![0u64; nd];
    for _ in 0..numel {
        let el: u64 = idx.iter().zip(&d.stride).map(|(i, s)| i * s).sum::<u64>() + d.offset;
        let at = e.start + el as usize * es;
        owned.extend_from_slice(&b[at..at + es]);
        for k in (0..nd).rev() {
            idx[k] += 1;
            if idx[k] < d.shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    Ok((start, start + nbytes as usize))
}

/// Opens a torch.save checkpoint as a file of tensors, mapped like a safetensors file.
pub fn open(path: &Path) -> Result<SafetensorsFile> {
    let bad = |msg: String| Error::BadTorchFile {
        path: path.to_path_buf(),
        msg,
    };
    let (file, len) = crate::io::read::open_regular(path, "PyTorch checkpoint")?;
    if len == 0 {
        return Err(bad("the file is empty".into()));
    }
    let id = crate::io::fault::FileId::of_file(&file, path).at(path)?;
    // SAFETY: read-only map, the same caveat as for safetensors files (see there).
    let mmap = unsafe { Mmap::map(&file) }.at(path)?;
    let (tensors, owned) = torch_tensors(&mmap).map_err(bad)?;
    Ok(SafetensorsFile::from_mapped(
        path.to_path_buf(),
        id,
        mmap,
        tensors,
        owned,
    ))
}

/// Whether `path` names a PyTorch checkpoint by its extension.
pub fn is_torch_path(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("bin" | "pt" | "pth")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_a_zip_and_truncated() {
        assert!(zip_entries(b"").unwrap_err().contains("too short"));
        let e = zip_entries(&[b'x'; 100]).unwrap_err();
        assert!(e.contains("not a zip"), "{e}");
        let mut z = b"PK\x03\x04".to_vec();
        z.resize(100, 0);
        let e = zip_entries(&z).unwrap_err();
        assert!(e.contains("no zip directory"), "{e}");
    }
}
