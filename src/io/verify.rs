//! `smelt verify OUT`: re-hash every file of a merged folder against the manifest written
//! last, and check the shards and the index against each other.

use crate::io::read::{read_string_capped, JSON_CAP};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::error::{Error, Result};
use crate::io::model::INDEX_NAME;
use crate::io::safetensors::SafetensorsFile;
use crate::io::writer::{hash_file, HashAlgo, MANIFEST};

#[derive(Debug)]
pub struct VerifyReport {
    pub files: usize,
    pub shards: usize,
    pub tensors: usize,
    pub bytes: u64,
}

/// One file's entry in a manifest: its size and hash.
#[derive(Debug)]
pub struct ManifestEntry {
    pub name: String,
    pub bytes: u64,
    pub algo: HashAlgo,
    pub hash: String,
}

/// Why a manifest entry cannot be used.
#[derive(Debug)]
pub enum EntryProblem {
    /// The name is not a plain file name of the folder (a path, or hidden).
    NotPlainName,
    /// The entry lacks `bytes` or a blake3/sha256 hash.
    NoHash,
}

/// How a file differs from its manifest entry.
#[derive(Debug)]
pub enum Mismatch {
    /// It cannot be found (or its metadata read).
    Missing(std::io::Error),
    /// It has this many bytes instead.
    Size(u64),
    /// Its hash is this instead.
    Hash(String),
    /// Reading it to hash it failed.
    Unreadable(Error),
}

impl ManifestEntry {
    pub fn parse(name: &str, entry: &serde_json::Value) -> std::result::Result<Self, EntryProblem> {
        if name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(EntryProblem::NotPlainName);
        }
        let bytes = entry.get("bytes").and_then(|b| b.as_u64());
        let hash = ["blake3", "sha256"].into_iter().find_map(|a| {
            entry
                .get(a)
                .and_then(|h| h.as_str())
                .map(|h| (HashAlgo::from_name(a).unwrap(), h.to_string()))
        });
        let (Some(bytes), Some((algo, hash))) = (bytes, hash) else {
            return Err(EntryProblem::NoHash);
        };
        Ok(ManifestEntry {
            name: name.to_string(),
            bytes,
            algo,
            hash,
        })
    }

    /// Compares the file in `dir` with the entry: the size first, then the whole file's hash.
    pub fn check(&self, dir: &Path) -> std::result::Result<(), Mismatch> {
        let p = dir.join(&self.name);
        let len = std::fs::metadata(&p).map_err(Mismatch::Missing)?.len();
        if len != self.bytes {
            return Err(Mismatch::Size(len));
        }
        match hash_file(&p, self.algo) {
            Ok(h) if h == self.hash => Ok(()),
            Ok(h) => Err(Mismatch::Hash(h)),
            Err(e) => Err(Mismatch::Unreadable(e)),
        }
    }
}

/// Checks `dir`; every problem found is listed in the error.
pub fn verify(dir: &Path) -> Result<VerifyReport> {
    let mut problems: Vec<String> = Vec::new();
    let mp = dir.join(MANIFEST);
    let text = read_string_capped(&mp, JSON_CAP, "manifest").map_err(|e| Error::Output {
        path: dir.to_path_buf(),
        msg: format!("has no readable {MANIFEST} ({e}); was it written by smelt, and completely?"),
    })?;
    let manifest: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Output {
        path: mp.clone(),
        msg: format!("is not valid JSON: {e}"),
    })?;
    let listed = manifest
        .get("files")
        .and_then(|f| f.as_object())
        .cloned()
        .ok_or_else(|| Error::Output {
            path: mp.clone(),
            msg: "has no \"files\" object".into(),
        })?;

    let mut bytes = 0u64;
    for (name, entry) in &listed {
        let e = match ManifestEntry::parse(name, entry) {
            Ok(e) => e,
            Err(EntryProblem::NotPlainName) => {
                problems.push(format!("{name}: not a plain file name"));
                continue;
            }
            Err(EntryProblem::NoHash) => {
                problems.push(format!(
                    "{name}: manifest entry lacks bytes or a blake3/sha256 hash"
                ));
                continue;
            }
        };
        match e.check(dir) {
            Ok(()) => bytes += e.bytes,
            Err(Mismatch::Missing(err)) => problems.push(format!("{name}: {err}")),
            Err(Mismatch::Size(len)) => problems.push(format!(
                "{name}: {len} bytes, the manifest says {}",
                e.bytes
            )),
            Err(Mismatch::Hash(h)) => {
                bytes += e.bytes;
                problems.push(format!(
                    "{name}: {} {h} differs from the manifest's {}",
                    e.algo.name(),
                    e.hash
                ))
            }
            Err(Mismatch::Unreadable(err)) => {
                bytes += e.bytes;
                problems.push(format!("{name}: {err}"))
            }
        }
    }
    let present: BTreeSet<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
        .filter(|n| n != MANIFEST)
        .collect();
    for extra in present.iter().filter(|n| !listed.contains_key(*n)) {
        problems.push(format!(
            "{extra}: not in the manifest (added after the merge?)"
        ));
    }

    // The shards parse, and the index (when there is one) matches them exactly.
    let shard_names: Vec<&String> = listed
        .keys()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    let mut tensors: BTreeMap<String, String> = BTreeMap::new();
    let mut tensor_bytes = 0u64;
    for name in &shard_names {
        match SafetensorsFile::open(&dir.join(name)) {
            Err(e) => problems.push(e.to_string()),
            Ok(f) => {
                for t in f.tensors() {
                    tensor_bytes += (t.end - t.begin) as u64;
                    if let Some(other) = tensors.insert(t.name.clone(), name.to_string()) {
                        problems.push(format!("tensor {} is in both {other} and {name}", t.name));
                    }
                }
            }
        }
    }
    if listed.contains_key(INDEX_NAME) {
        let ip = dir.join(INDEX_NAME);
        match read_string_capped(&ip, JSON_CAP, "index")
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).map_err(|e| e.to_string()))
        {
            Err(e) => problems.push(format!("{INDEX_NAME}: {e}")),
            Ok(v) => {
                let map = v
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .cloned()
                    .unwrap_or_default();
                for (t, shard) in &map {
                    match (tensors.get(t), shard.as_str()) {
                        (Some(actual), Some(s)) if actual == s => {}
                        (Some(actual), s) => problems.push(format!(
                            "{INDEX_NAME}: {t} is in {actual}, the index says {s:?}"
                        )),
                        (None, _) => {
                            problems.push(format!("{INDEX_NAME}: lists {t}, which no shard holds"))
                        }
                    }
                }
                for t in tensors.keys().filter(|t| !map.contains_key(*t)) {
                    problems.push(format!("{INDEX_NAME}: does not list tensor {t}"));
                }
                let total = v
                    .get("metadata")
                    .and_then(|m| m.get("total_size"))
                    .and_then(|t| t.as_u64());
                if total != Some(tensor_bytes) {
                    problems.push(format!("{INDEX_NAME}: total_size {total:?} but the tensors hold {tensor_bytes} bytes"));
                }
            }
        }
    } else if shard_names.len() > 1 {
        // one file of any name is a whole output (model.safetensors, an adapter's
        // adapter_model.safetensors, compeft.safetensors); several need the index
        problems.push(format!(
            "{} safetensors files without a {INDEX_NAME}",
            shard_names.len()
        ));
    }
    if !problems.is_empty() {
        return Err(Error::Output {
            path: dir.to_path_buf(),
            msg: format!("failed verification:\n  {}", problems.join("\n  ")),
        });
    }
    Ok(VerifyReport {
        files: listed.len(),
        shards: shard_names.len(),
        tensors: tensors.len(),
        bytes,
    })
}
