//! A memory-mapped safetensors reader that trusts nothing in the file.
//!
//! Layout: 8-byte little-endian header length N, N bytes of JSON, then the data region.
//! The header is checked before any tensor is touched: its length against the file, every
//! dtype and shape against its byte range, ranges against the data region and each other,
//! duplicate names. No allocation is sized from a number in the file before it was checked
//! against the file's real size.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::de::{Deserializer, MapAccess, Visitor};

use crate::dtype::DType;
use crate::error::{Error, IoContext, Result};

/// Header larger than this is refused outright (the `safetensors` crate uses the same bound).
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;

/// One tensor entry of a header, with offsets relative to the start of the data region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub begin: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed, validated header.
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// Tensors in the order the header lists them.
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    /// Offset of the data region from the start of the file.
    pub data_start: usize,
}

/// JSON object entries in document order, so that duplicate keys can be seen.
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, serde_json::Value>()? {
                    v.push((k, val));
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Validates a header given the first bytes of a file and the file's total length.
/// `prefix` must hold at least the 8 length bytes and the JSON (it may hold more).
pub fn parse_header(prefix: &[u8], file_len: u64) -> std::result::Result<Header, String> {
    if file_len < 8 || prefix.len() < 8 {
        return Err(format!(
            "the file is {file_len} bytes, too short for the 8-byte header length"
        ));
    }
    let n = u64::from_le_bytes(prefix[..8].try_into().unwrap());
    if n > MAX_HEADER_LEN {
        return Err(format!(
            "header length field says {n} bytes, more than the {MAX_HEADER_LEN}-byte limit"
        ));
    }
    if 8 + n > file_len {
        return Err(format!(
            "header length field says {n} bytes but the file has only {} bytes after it (truncated file?)",
            file_len - 8
        ));
    }
    let n = n as usize;
    if prefix.len() < 8 + n {
        return Err("header is cut short".into());
    }
    let json = &prefix[8..8 + n];
    let text = std::str::from_utf8(json).map_err(|e| format!("header is not valid UTF-8 ({e})"))?;
    let entries: Entries = serde_json::from_str(text.trim_end_matches(' '))
        .map_err(|e| format!("header is not a JSON object: {e}"))?;
    let data_len = file_len - 8 - n as u64;

    let mut seen: HashMap<&str, ()> = HashMap::new();
    let mut tensors = Vec::with_capacity(entries.0.len());
    let mut metadata = BTreeMap::new();
    for (name, value) in &entries.0 {
        if seen.insert(name.as_str(), ()).is_some() {
            return Err(format!("tensor name {name:?} appears twice in the header"));
        }
        if name == "__metadata__" {
            let obj = value.as_object().ok_or("__metadata__ is not an object")?;
            for (k, v) in obj {
                let s = v
                    .as_str()
                    .ok_or_else(|| format!("__metadata__ value for {k:?} is not a string"))?;
                metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        tensors.push(parse_entry(name, value, data_len)?);
    }

    // Byte ranges may not overlap (a zero-length tensor overlaps nothing).
    let mut order: Vec<&TensorInfo> = tensors.iter().filter(|t| t.end > t.begin).collect();
    order.sort_by_key(|t| (t.begin, t.end));
    for w in order.windows(2) {
        if w[1].begin < w[0].end {
            return Err(format!(
                "tensors {} (bytes {}..{}) and {} (bytes {}..{}) overlap",
                w[0].name, w[0].begin, w[0].end, w[1].name, w[1].begin, w[1].end
            ));
        }
    }
    Ok(Header {
        tensors,
        metadata,
        data_start: 8 + n,
    })
}

fn parse_entry(
    name: &str,
    v: &serde_json::Value,
    data_len: u64,
) -> std::result::Result<TensorInfo, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("entry for tensor {name} is not an object"))?;
    for k in obj.keys() {
        if !matches!(k.as_str(), "dtype" | "shape" | "data_offsets") {
            return Err(format!("tensor {name}: unknown header field {k:?}"));
        }
    }
    let dts = obj
        .get("dtype")
        .and_then(|d| d.as_str())
        .ok_or_else(|| format!("tensor {name}: missing or non-string \"dtype\""))?;
    let dtype =
        DType::from_st_name(dts).ok_or_else(|| format!("tensor {name}: unknown dtype {dts:?}"))?;
    let shape_v = obj
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or_else(|| format!("tensor {name}: missing or non-array \"shape\""))?;
    let mut shape = Vec::with_capacity(shape_v.len().min(64));
    if shape_v.len() > 64 {
        return Err(format!(
            "tensor {name}: {} dimensions is absurd",
            shape_v.len()
        ));
    }
    let mut numel: u64 = 1;
    for d in shape_v {
        let d = d.as_u64().ok_or_else(|| {
            format!("tensor {name}: shape entries must be non-negative integers, got {d}")
        })?;
        numel = numel
            .checked_mul(d)
            .ok_or_else(|| format!("tensor {name}: shape {shape_v:?} overflows"))?;
        shape.push(d as usize);
    }
    let offs = obj
        .get("data_offsets")
        .and_then(|s| s.as_array())
        .ok_or_else(|| format!("tensor {name}: missing or non-array \"data_offsets\""))?;
    if offs.len() != 2 {
        return Err(format!("tensor {name}: data_offsets must be [begin, end]"));
    }
    let begin = offs[0]
        .as_u64()
        .ok_or_else(|| format!("tensor {name}: data_offsets must be non-negative integers"))?;
    let end = offs[1]
        .as_u64()
        .ok_or_else(|| format!("tensor {name}: data_offsets must be non-negative integers"))?;
    if begin > end {
        return Err(format!(
            "tensor {name}: data_offsets [{begin}, {end}] run backwards"
        ));
    }
    if end > data_len {
        return Err(format!(
            "tensor {name}: data_offsets [{begin}, {end}] reach past the end of the data ({data_len} bytes; truncated file?)"
        ));
    }
    let want = numel
        .checked_mul(dtype.size() as u64)
        .ok_or_else(|| format!("tensor {name}: byte size overflows"))?;
    if end - begin != want {
        return Err(format!(
            "tensor {name}: dtype {dtype} and shape {shape:?} need {want} bytes but data_offsets [{begin}, {end}] hold {}",
            end - begin
        ));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        begin: begin as usize,
        end: end as usize,
    })
}

/// An open, validated, memory-mapped safetensors file.
pub struct SafetensorsFile {
    pub path: PathBuf,
    pub header: Header,
    by_name: HashMap<String, usize>,
    /// The file as it was opened (what the mapping shows), for noticing later changes.
    pub id: crate::io::fault::FileId,
    /// The mapping watched for faults (declared before `mmap`: dropped first).
    watch: crate::io::fault::Registration,
    mmap: Mmap,
    /// Bytes not in the map: tensors of a PyTorch checkpoint copied into row-major order
    /// (`io::torch_zip`); their offsets start at the map's length. Empty for safetensors.
    owned: Vec<u8>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::BadFile {
            path: path.to_path_buf(),
            msg,
        };
        let (file, len) = crate::io::read::open_regular(path, "safetensors file")?;
        if len == 0 {
            return Err(bad("the file is empty".into()));
        }
        let id = crate::io::fault::FileId::of_file(&file, path).at(path)?;
        // SAFETY: the map is read-only. A file changed underneath us by another process
        // cannot be prevented; a truncation is caught (the mapping is watched: a read past
        // the new end reads zeros and is reported by `changed_under_map`, not a SIGBUS), and
        // other changes show in the file's identity (`id`), checked before output is kept.
        let mmap = unsafe { Mmap::map(&file) }.at(path)?;
        let watch = crate::io::fault::register(mmap.as_ptr(), mmap.len());
        let header = parse_header(&mmap, len).map_err(bad)?;
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            header,
            by_name,
            id,
            watch,
            mmap,
            owned: Vec::new(),
        })
    }

    /// A file of another format whose tensors `io::torch_zip` located: offsets are absolute
    /// in `mmap`, or past its end into `owned`. The caller has checked every range.
    pub(crate) fn from_mapped(
        path: PathBuf,
        id: crate::io::fault::FileId,
        mmap: Mmap,
        tensors: Vec<TensorInfo>,
        owned: Vec<u8>,
    ) -> Self {
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let watch = crate::io::fault::register(mmap.as_ptr(), mmap.len());
        SafetensorsFile {
            path,
            header: Header {
                tensors,
                metadata: BTreeMap::new(),
                data_start: 0,
            },
            by_name,
            id,
            watch,
            mmap,
            owned,
        }
    }

    /// Whether a read of this file's mapping met a page the file no longer has (it was
    /// truncated while being read): what was read there were zeros.
    pub fn changed_under_map(&self) -> bool {
        self.watch.faulted()
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.header.tensors[i])
    }

    /// The raw little-endian bytes of a tensor of this file.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let m = &self.mmap;
        let s = self.header.data_start;
        let mapped = m.len() - s;
        if t.begin >= mapped && !self.owned.is_empty() {
            return &self.owned[t.begin - mapped..t.end - mapped];
        }
        &m[s + t.begin..s + t.end]
    }

    /// Every byte after the header.
    pub fn data_region(&self) -> &[u8] {
        &self.mmap[self.header.data_start..]
    }

    /// Tells the kernel which bytes will be read soon (read-ahead) or are done with.
    pub fn advise(&self, t: &TensorInfo, will_need: bool) {
        #[cfg(unix)]
        {
            let m = &self.mmap;
            let off = self.header.data_start + t.begin;
            let len = t.end - t.begin;
            if len == 0 || off + len > m.len() {
                return;
            }
            // madvise wants page-aligned starts.
            let page = 4096usize;
            let start = off / page * page;
            let len = len + (off - start);
            let adv = if will_need {
                memmap2::Advice::WillNeed
            } else {
                memmap2::Advice::Normal
            };
            let _ = m.advise_range(adv, start, len);
            if !will_need {
                // Drop our mapping of pages we are done with; the page cache keeps them.
                // SAFETY: read-only file-backed mapping: the pages are re-read from the file
                // if touched again, so no data is lost.
                let _ = unsafe {
                    m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data_len: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.resize(v.len() + data_len, 0);
        v
    }

    #[test]
    fn good_header() {
        let f = file(
            r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}}"#,
            22,
        );
        let h = parse_header(&f, f.len() as u64).unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[1].dtype, DType::BF16);
        assert_eq!(h.metadata["format"], "pt");
    }

    #[test]
    fn rejects() {
        let cases: &[(&str, usize, &str)] = &[
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}}"#,
                16,
                "need 8 bytes",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                4,
                "reach past the end",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
                16,
                "appears twice",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                16,
                "overlap",
            ),
            (
                r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#,
                8,
                "unknown dtype",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#,
                8,
                "non-negative",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}}"#,
                8,
                "overflows",
            ),
            (r#"[1,2]"#, 0, "not a JSON object"),
        ];
        for (json, dl, want) in cases {
            let f = file(json, *dl);
            let e = parse_header(&f, f.len() as u64).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
        let mut f = file(r#"{}"#, 0);
        f[..8].copy_from_slice(&1000u64.to_le_bytes());
        assert!(parse_header(&f, f.len() as u64)
            .unwrap_err()
            .contains("truncated"));
        assert!(parse_header(&[1, 2], 2).unwrap_err().contains("too short"));
    }
}
