//! The Hugging Face cache layout, shared with huggingface_hub and transformers:
//!
//! ```text
//! <cache>/models--org--name/
//!     refs/<branch or tag>          a file holding the commit sha
//!     blobs/<etag>                  file contents (etag: sha256 for LFS files)
//!     snapshots/<sha>/<file>        relative links to ../../blobs/<etag>
//! ```

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::hub::{is_sha, HubId};
use crate::io::model::{parse_index, INDEX_NAME, SINGLE_NAME};

/// The repository folder of `repo` (`org/name`) in the cache.
pub fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// The commit a ref names in the cache (`refs/<revision>`), if the cache records it.
pub fn read_ref(repo: &Path, revision: &str) -> Result<Option<String>> {
    let f = repo.join("refs").join(revision);
    if !f.is_file() {
        return Ok(None);
    }
    let text = crate::io::read::read_string_capped(&f, 4096, "cache ref")?;
    let sha = text.trim();
    if !is_sha(sha) {
        return Err(Error::BadModel {
            path: f.clone(),
            msg: format!(
                "the cache ref holds {sha:?}, not a 40-hex commit sha; delete the file to let smelt fetch it again"
            ),
        });
    }
    Ok(Some(sha.to_string()))
}

/// The cached snapshot folder of `id`'s revision: a commit sha names `snapshots/<sha>`
/// directly; a branch or tag is read from `refs/`.
pub fn snapshot(cache: &Path, id: &HubId) -> Result<Option<PathBuf>> {
    let repo = repo_dir(cache, &id.repo);
    let rev = id.revision();
    if is_sha(rev) {
        let s = repo.join("snapshots").join(rev);
        return Ok(s.is_dir().then_some(s));
    }
    Ok(read_ref(&repo, rev)?
        .map(|sha| repo.join("snapshots").join(sha))
        .filter(|s| s.is_dir()))
}

/// Does the snapshot hold a model's (or adapter's) weights: every shard its index lists, or
/// one weights file?
pub fn has_weights(snap: &Path) -> bool {
    let index = snap.join(INDEX_NAME);
    if index.is_file() {
        let Ok(text) =
            crate::io::read::read_string_capped(&index, crate::io::read::JSON_CAP, "index")
        else {
            return false;
        };
        return parse_index(&text)
            .map(|shards| shards.keys().all(|s| snap.join(s).is_file()))
            .unwrap_or(false);
    }
    [
        SINGLE_NAME,
        "adapter_model.safetensors",
        "pytorch_model.bin",
    ]
    .iter()
    .any(|f| snap.join(f).is_file())
}

/// Records that `revision` names `sha` (`refs/<revision>`), as huggingface_hub does.
pub fn write_ref(repo: &Path, revision: &str, sha: &str) -> Result<()> {
    if revision == sha {
        return Ok(());
    }
    let f = repo.join("refs").join(revision);
    if let Some(parent) = f.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    }
    std::fs::write(&f, sha).map_err(|e| io_err(&f, e))
}

/// Links `snapshots/<sha>/<file>` to `blobs/<etag>` with a relative link, replacing
/// whatever is there.
pub fn link(repo: &Path, sha: &str, file: &str, etag: &str) -> Result<PathBuf> {
    let dest = repo.join("snapshots").join(sha).join(file);
    let parent = dest.parent().unwrap_or(repo).to_path_buf();
    std::fs::create_dir_all(&parent).map_err(|e| io_err(&parent, e))?;
    // snapshots/<sha>/ plus one level per folder in `file`
    let ups = 2 + file.matches('/').count();
    let target = PathBuf::from("../".repeat(ups)).join("blobs").join(etag);
    if dest.is_symlink() || dest.exists() {
        std::fs::remove_file(&dest).map_err(|e| io_err(&dest, e))?;
    }
    #[cfg(unix)]
    std::os::unix::fs::symlink(&target, &dest).map_err(|e| io_err(&dest, e))?;
    #[cfg(not(unix))]
    std::fs::copy(repo.join("blobs").join(etag), &dest).map_err(|e| io_err(&dest, e))?;
    Ok(dest)
}

pub(crate) fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}
