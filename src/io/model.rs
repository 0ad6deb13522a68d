//! A Hugging Face model folder: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`, plus `config.json` and tokenizer files. A folder with no
//! safetensors but `pytorch_model.bin` (or `pytorch_model.bin.index.json`) is read through
//! `io::torch_zip`; safetensors win when both exist.

use crate::io::read::{read_string_capped, JSON_CAP};
use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use crate::dtype::DType;
use crate::error::{Error, IoContext, Result};
use crate::io::safetensors::{SafetensorsFile, TensorInfo};
use crate::io::torch_zip::{TORCH_INDEX_NAME, TORCH_SINGLE_NAME};

pub const INDEX_NAME: &str = "model.safetensors.index.json";
pub const SINGLE_NAME: &str = "model.safetensors";

/// Tokenizer files `transformers` may look for; whichever exist are copied to the output.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
];

/// A tensor of a model: its header entry and the file that holds it.
#[derive(Clone, Copy)]
pub struct TensorRef<'a> {
    pub file: &'a SafetensorsFile,
    pub info: &'a TensorInfo,
}

impl<'a> TensorRef<'a> {
    pub fn dtype(&self) -> DType {
        self.info.dtype
    }
    pub fn shape(&self) -> &'a [usize] {
        &self.info.shape
    }
    pub fn numel(&self) -> usize {
        self.info.numel()
    }
    pub fn bytes(&self) -> &'a [u8] {
        self.file.data(self.info)
    }
}

pub struct ModelFolder {
    /// The folder (or the single .safetensors file) as resolved on disk.
    pub path: PathBuf,
    /// How the user named it (recipe text), for messages.
    pub label: String,
    pub config: Option<serde_json::Value>,
    files: Vec<SafetensorsFile>,
    /// Tensor name -> (file index, tensor index within that file).
    tensors: HashMap<String, (usize, usize)>,
    /// Names in a stable, human order (layer numbers compared as numbers).
    names: Vec<String>,
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::BadModel {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Is `rel` a plain relative path that stays inside its folder?
fn is_contained(rel: &str) -> bool {
    let p = Path::new(rel);
    !rel.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

impl ModelFolder {
    pub fn open(path: &Path, label: &str) -> Result<Self> {
        if !path.exists() {
            return Err(bad(
                path,
                "not found; name a model folder, a .safetensors file, or a Hub id (org/name or org/name@revision)",
            ));
        }
        let (dir, files) = if path.is_file() {
            if path.extension().and_then(|e| e.to_str()) != Some("safetensors")
                && !crate::io::torch_zip::is_torch_path(path)
            {
                return Err(bad(
                    path,
                    "is a file but not a .safetensors file or a PyTorch checkpoint (.bin, .pt, .pth)",
                ));
            }
            (
                path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                vec![path.to_path_buf()],
            )
        } else if path.is_dir() {
            (path.to_path_buf(), Vec::new())
        } else {
            // A FIFO, device or socket: refused by the opened file's type, never read.
            return Err(match crate::io::read::open_regular(path, "model") {
                Err(e) => e,
                Ok(_) => bad(
                    path,
                    "changed from something else to a file while being opened",
                ),
            });
        };

        let mut model = ModelFolder {
            path: path.to_path_buf(),
            label: label.to_string(),
            config: None,
            files: Vec::new(),
            tensors: HashMap::new(),
            names: Vec::new(),
        };
        // a snapshot of the Hugging Face cache: every link must stay in its repository
        check_snapshot_links(&dir)?;
        let cfg_path = dir.join("config.json");
        if path.is_dir() && cfg_path.is_file() {
            let text = read_string_capped(&cfg_path, JSON_CAP, "config")?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| bad(&cfg_path, format!("config.json is not valid JSON: {e}")))?;
            if !v.is_object() {
                return Err(bad(&cfg_path, "config.json is not a JSON object"));
            }
            model.config = Some(v);
        }

        if !files.is_empty() {
            model.add_file(&files[0], None)?;
        } else if dir.join(INDEX_NAME).is_file() {
            model.open_index(&dir, INDEX_NAME)?;
        } else if dir.join(SINGLE_NAME).is_file() {
            model.add_file(&dir.join(SINGLE_NAME), None)?;
        } else {
            let mut st = Vec::new();
            let mut pickles = Vec::new();
            for e in std::fs::read_dir(&dir).at(&dir)? {
                let e = e.at(&dir)?;
                let name = e.file_name().to_string_lossy().to_string();
                if name.ends_with(".safetensors") {
                    st.push(name);
                } else if name.ends_with(".bin")
                    || name.ends_with(".pt")
                    || name.ends_with(".pth")
                    || name.ends_with(".ckpt")
                {
                    pickles.push(name);
                }
            }
            st.sort();
            match (st.len(), pickles.is_empty()) {
                (1, _) => model.add_file(&dir.join(&st[0]), None)?,
                // PyTorch weights only: read in place, no pickle code run (io::torch_zip).
                (0, false) if dir.join(TORCH_INDEX_NAME).is_file() => {
                    model.open_index(&dir, TORCH_INDEX_NAME)?
                }
                (0, false) if dir.join(TORCH_SINGLE_NAME).is_file() => {
                    model.add_file(&dir.join(TORCH_SINGLE_NAME), None)?
                }
                (0, false) => {
                    return Err(bad(
                        &dir,
                        format!(
                            "holds only PyTorch weights under names smelt does not look for ({}); smelt reads \
                             {TORCH_SINGLE_NAME} or {TORCH_INDEX_NAME} and safetensors: rename the file, or convert it, e.g. \
                             `python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{d}').save_pretrained('{d}-st', safe_serialization=True)\"`",
                            pickles.join(", "),
                            d = dir.display()
                        ),
                    ))
                }
                (0, true) => {
                    return Err(bad(
                        &dir,
                        format!("has no {SINGLE_NAME} and no {INDEX_NAME}"),
                    ))
                }
                _ => {
                    return Err(bad(
                        &dir,
                        format!(
                            "has several .safetensors files ({}) but no {INDEX_NAME} to say how they fit together",
                            st.join(", ")
                        ),
                    ))
                }
            }
        }
        model.names = model.tensors.keys().cloned().collect();
        model.names.sort_by(|a, b| natural_cmp(a, b));
        Ok(model)
    }

    fn open_index(&mut self, dir: &Path, index_name: &str) -> Result<()> {
        let ipath = dir.join(index_name);
        let text = read_string_capped(&ipath, JSON_CAP, "index")?;
        let shards = parse_index(&text).map_err(|m| bad(&ipath, m))?;
        // a cache snapshot's shards link into the repository's blobs/; a local folder's
        // must stay inside the folder
        let repo = cache_repo_of(dir);
        let canon_dir = match &repo {
            Some(r) => r.clone(),
            None => dir.canonicalize().at(dir)?,
        };
        for (shard, expected) in shards {
            let spath = dir.join(&shard);
            if !spath.is_file() {
                return Err(bad(
                    &ipath,
                    format!("lists shard {shard}, which does not exist"),
                ));
            }
            let canon = spath.canonicalize().at(&spath)?;
            if !canon.starts_with(&canon_dir) {
                return Err(bad(
                    &ipath,
                    match &repo {
                        Some(r) => format!("shard {shard} is a link to {}, outside the model's repository folder {} in the Hugging Face cache; refusing to read it", canon.display(), r.display()),
                        None => format!("shard {shard} is a link to {}, outside the model folder; refusing to read it", canon.display()),
                    },
                ));
            }
            self.add_file(&spath, Some(&expected))?;
        }
        Ok(())
    }

    /// Adds a file; with `only`, takes exactly those tensors (the index's view) and requires
    /// each to be present.
    fn add_file(&mut self, path: &Path, only: Option<&[String]>) -> Result<()> {
        let f = if crate::io::torch_zip::is_torch_path(path) {
            crate::io::torch_zip::open(path)?
        } else {
            SafetensorsFile::open(path)?
        };
        let fi = self.files.len();
        let add = |name: &str, ti: usize, this: &mut Self| -> Result<()> {
            if this.tensors.insert(name.to_string(), (fi, ti)).is_some() {
                return Err(bad(
                    path,
                    format!("tensor {name} is stored in more than one shard"),
                ));
            }
            Ok(())
        };
        match only {
            None => {
                for (ti, t) in f.tensors().iter().enumerate() {
                    add(&t.name, ti, self)?;
                }
            }
            Some(names) => {
                for name in names {
                    let ti = f.tensors().iter().position(|t| &t.name == name).ok_or_else(|| Error::BadFile {
                        path: path.to_path_buf(),
                        msg: format!("the index lists tensor {name} in this shard, but the shard has no such tensor"),
                    })?;
                    add(name, ti, self)?;
                }
            }
        }
        self.files.push(f);
        Ok(())
    }

    /// A tensor of this model, as stored.
    pub fn get(&self, name: &str) -> Option<TensorRef<'_>> {
        self.tensors.get(name).map(|&(fi, ti)| {
            let file = &self.files[fi];
            TensorRef {
                file,
                info: &file.tensors()[ti],
            }
        })
    }

    /// Tensor names in natural order (`layers.2` before `layers.10`).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// Folder that holds config and tokenizer files.
    pub fn dir(&self) -> &Path {
        if self.path.is_file() {
            self.path.parent().unwrap_or(Path::new("."))
        } else {
            &self.path
        }
    }

    pub fn config_usize(&self, keys: &[&str]) -> Option<usize> {
        let c = self.config.as_ref()?;
        for k in keys {
            if let Some(v) = c.get(*k).and_then(|v| v.as_u64()) {
                return Some(v as usize);
            }
            if let Some(v) = c
                .get("text_config")
                .and_then(|t| t.get(*k))
                .and_then(|v| v.as_u64())
            {
                return Some(v as usize);
            }
        }
        None
    }

    /// Whether the input and output embeddings are tied (transformers' default is true).
    pub fn tied_embeddings(&self) -> bool {
        self.config
            .as_ref()
            .and_then(|c| c.get("tie_word_embeddings"))
            .and_then(|v| v.as_bool())
            .unwrap_or(true)
    }

    pub fn total_bytes(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| f.tensors())
            .map(|t| (t.end - t.begin) as u64)
            .sum()
    }
}

/// The repository folder (`…/models--org--name`, canonical) when `dir` is a snapshot of the
/// Hugging Face cache (`…/models--org--name/snapshots/<commit>`).
pub fn cache_repo_of(dir: &Path) -> Option<PathBuf> {
    let c = dir.canonicalize().ok()?;
    let snaps = c.parent()?;
    let repo = snaps.parent()?;
    (snaps.file_name()? == "snapshots" && repo.file_name()?.to_str()?.starts_with("models--"))
        .then(|| repo.to_path_buf())
}

/// In a snapshot of the Hugging Face cache, every link (weights, index, config, tokenizer
/// files) must resolve inside the model's repository folder (`models--org--name`, where
/// `blobs/` is); a link out of it is refused, naming it. Links that resolve nowhere are left
/// to the reader of that file. Not a snapshot: nothing to check.
pub fn check_snapshot_links(dir: &Path) -> Result<()> {
    let Some(repo) = cache_repo_of(dir) else {
        return Ok(());
    };
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    let mut seen = 0usize;
    while let Some((d, depth)) = stack.pop() {
        for e in std::fs::read_dir(&d).at(&d)? {
            let p = e.at(&d)?.path();
            seen += 1;
            if seen > 100_000 {
                return Err(bad(
                    dir,
                    "holds more than 100000 files; not a model snapshot",
                ));
            }
            if p.is_symlink() {
                if let Ok(target) = p.canonicalize() {
                    if !target.starts_with(&repo) {
                        return Err(bad(
                            &p,
                            format!(
                                "is a link to {}, outside the model's repository folder {} in the Hugging Face cache; refusing to read it (delete the snapshot to fetch it again)",
                                target.display(),
                                repo.display()
                            ),
                        ));
                    }
                }
            } else if p.is_dir() && depth < 16 {
                stack.push((p, depth + 1));
            }
        }
    }
    Ok(())
}

/// Reads `model.safetensors.index.json`: shard file name -> the tensors it should hold.
/// Shard paths that would leave the model folder are refused here, before any is opened.
pub fn parse_index(text: &str) -> std::result::Result<BTreeMap<String, Vec<String>>, String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or("has no \"weight_map\" object")?;
    let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| format!("weight_map entry for {tensor} is not a string"))?;
        if !is_contained(shard) {
            return Err(format!(
                "shard path {shard:?} (for {tensor}) escapes the model folder; refusing to read it"
            ));
        }
        shards
            .entry(shard.to_string())
            .or_default()
            .push(tensor.clone());
    }
    Ok(shards)
}

/// Compares strings with runs of digits compared by value.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, _) => return std::cmp::Ordering::Less,
            (_, None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (&a[..na], &b[..nb]);
                let ta = trim_zeros(da);
                let tb = trim_zeros(db);
                let ord = ta.len().cmp(&tb.len()).then(ta.cmp(tb)).then(na.cmp(&nb));
                if ord != std::cmp::Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|&&c| c == b'0').count();
    &d[n.min(d.len().saturating_sub(1))..]
}

/// SHA-256 over `prefix`, then each file's header and 16 samples of 64 KiB spread over its
/// data: tells inputs apart (fine-tunes share a header layout) without reading their
/// gigabytes again. The first 16 hex digits.
pub fn sampled_digest<'a>(
    prefix: &[Vec<u8>],
    files: impl Iterator<Item = &'a SafetensorsFile>,
) -> String {
    use sha2::{Digest, Sha256};
    const SAMPLES: usize = 16;
    const SAMPLE: usize = 64 * 1024;
    let mut h = Sha256::new();
    for p in prefix {
        h.update(p);
    }
    for f in files {
        for t in f.tensors() {
            h.update(t.name.as_bytes());
            h.update(t.dtype.st_name().as_bytes());
            for d in &t.shape {
                h.update(d.to_le_bytes());
            }
            h.update(t.begin.to_le_bytes());
            h.update(t.end.to_le_bytes());
        }
        let data = f.data_region();
        if data.len() <= SAMPLES * SAMPLE {
            h.update(data);
        } else {
            for k in 0..SAMPLES {
                let at = (data.len() - SAMPLE) / (SAMPLES - 1) * k;
                h.update(&data[at..at + SAMPLE]);
            }
        }
    }
    let d = h.finalize();
    d.iter().map(|b| format!("{b:02x}")).collect::<String>()[..16].to_string()
}

impl ModelFolder {
    /// [`sampled_digest`] of this folder's files.
    pub fn digest(&self) -> String {
        sampled_digest(&[], self.files.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec![
            "layers.10.a",
            "layers.2.a",
            "layers.1.b",
            "embed",
            "layers.1.a",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            [
                "embed",
                "layers.1.a",
                "layers.1.b",
                "layers.2.a",
                "layers.10.a"
            ]
        );
    }

    #[test]
    fn containment() {
        assert!(is_contained("model-00001-of-00002.safetensors"));
        assert!(is_contained("sub/x.safetensors"));
        assert!(!is_contained("../x.safetensors"));
        assert!(!is_contained("/etc/passwd"));
        assert!(!is_contained("a/../../x"));
        assert!(!is_contained(""));
    }
}
