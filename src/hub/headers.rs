//! `merge --dry-run` on a Hub model whose weights are not in the cache: the plan needs only
//! each safetensors file's header, so instead of downloading the weights smelt fetches the
//! file list, the small files (configs, tokenizer files, the index) and, for each weights
//! file, its first 8 bytes (the header length) and then the header, with HTTP `Range`
//! requests. From these it writes a stand-in folder in the system's temporary folder — each
//! weights file as its header followed by a hole up to the file's real length (a sparse
//! file: no disk space, zeros if read) — and plans from that folder. The Hugging Face cache
//! is left as it was: nothing is written there.
//!
//! Stand-in folders exist only while a [`PlanOnly`] guard is held (the dry run of `smelt
//! merge`, which reads no tensor data); dropping the guard deletes them.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::hub::cache::{self, io_err};
use crate::hub::download::{
    agent, contained, header, hub_err, refusal, resolve_url, revision_info, send, wanted, BIN_INDEX,
};
use crate::hub::{HubEnv, HubId};
use crate::io::model::{parse_index, INDEX_NAME};
use crate::io::safetensors::MAX_HEADER_LEN;

/// `crate::compeft::FILE_NAME` (named here to keep `hub` clear of `compeft`).
const COMPEFT_FILE: &str = "compeft.safetensors";

/// Largest small file (config, tokenizer, index) fetched whole for a stand-in.
const SMALL_CAP: u64 = 256 << 20;

static PLAN_ONLY: AtomicBool = AtomicBool::new(false);
static STAND_INS: Mutex<Vec<StandIn>> = Mutex::new(Vec::new());
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A stand-in folder made for one Hub model.
#[derive(Clone, Debug)]
pub struct StandIn {
    /// `org/name@revision`.
    pub id: String,
    pub sha: String,
    pub dir: PathBuf,
    /// Bytes of the weights files a real merge would download (those the cache lacks).
    pub weight_bytes: u64,
    pub weight_files: usize,
}

/// While held, Hub models whose weights are not cached are planned from their headers
/// ([`stand_in`]) instead of being downloaded. Hold it only where no tensor data is read.
pub struct PlanOnly(());

impl PlanOnly {
    pub fn enter() -> PlanOnly {
        PLAN_ONLY.store(true, Ordering::SeqCst);
        PlanOnly(())
    }

    /// The stand-ins made so far.
    pub fn stand_ins(&self) -> Vec<StandIn> {
        STAND_INS.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for PlanOnly {
    fn drop(&mut self) {
        PLAN_ONLY.store(false, Ordering::SeqCst);
        let mut list = STAND_INS.lock().unwrap_or_else(|e| e.into_inner());
        for s in list.drain(..) {
            let _ = std::fs::remove_dir_all(&s.dir);
        }
    }
}

/// Is a [`PlanOnly`] guard held?
pub fn plan_only() -> bool {
    PLAN_ONLY.load(Ordering::SeqCst)
}

/// Makes a stand-in folder for `id` (see the module's text) and returns it; None when the
/// model's weights are PyTorch checkpoints, whose contents cannot be listed from a header,
/// or a compressed task vector, whose bit maps the plan reads (the caller downloads those).
pub fn stand_in(id: &HubId, env: &HubEnv) -> Result<Option<PathBuf>> {
    let agent = agent();
    let (sha, files) = revision_info(&agent, env, id)?;
    let mut todo = wanted(&files);
    if todo.iter().any(|f| f == BIN_INDEX || f.ends_with(".bin")) {
        log::warn!(
            "{id}: the weights are PyTorch checkpoints, which have no header to read by range; downloading them for the plan"
        );
        return Ok(None);
    }
    // a compressed task vector's bit maps are read (checked) while planning
    if todo.iter().any(|f| f == COMPEFT_FILE) {
        log::warn!(
            "{id}: a compressed task vector is checked in full while planning; downloading it for the plan"
        );
        return Ok(None);
    }
    let root = std::env::temp_dir();
    let dir = root.join(format!(
        "smelt-plan-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    // a leftover of an earlier process with this id is removed; a new folder is made (never
    // one that appears meanwhile, in a temporary folder others can write)
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(|e| io_err(&dir, e))?;
    let at = {
        let mut list = STAND_INS.lock().unwrap_or_else(|e| e.into_inner());
        list.push(StandIn {
            id: id.to_string(),
            sha: sha.clone(),
            dir: dir.clone(),
            weight_bytes: 0,
            weight_files: 0,
        });
        list.len() - 1
    };
    let snap = cache::repo_dir(&env.cache, &id.repo)
        .join("snapshots")
        .join(&sha);
    let (mut bytes, mut count) = (0u64, 0usize);
    let mut i = 0;
    while i < todo.len() {
        let file = todo[i].clone();
        if !contained(&file) {
            return Err(hub_err(
                id,
                format!("the index names the file {file:?}, which would land outside the snapshot folder"),
            ));
        }
        let dest = dir.join(&file);
        if let Some(p) = dest.parent() {
            std::fs::create_dir_all(p).map_err(|e| io_err(p, e))?;
        }
        let cached = snap.join(&file);
        if file.ends_with(".safetensors") {
            let (prefix, size) = if cached.is_file() {
                local_header(&cached)?
            } else {
                let (p, s) = remote_header(&agent, env, id, &sha, &file)?;
                bytes += s;
                count += 1;
                (p, s)
            };
            let f = std::fs::File::create(&dest).map_err(|e| io_err(&dest, e))?;
            std::io::Write::write_all(&mut &f, &prefix).map_err(|e| io_err(&dest, e))?;
            f.set_len(size).map_err(|e| io_err(&dest, e))?;
        } else {
            let content = if cached.is_file() {
                std::fs::read(&cached).map_err(|e| io_err(&cached, e))?
            } else {
                small_file(&agent, env, id, &sha, &file)?
            };
            std::fs::write(&dest, &content).map_err(|e| io_err(&dest, e))?;
            if file == INDEX_NAME {
                let text = String::from_utf8_lossy(&content);
                let shards = parse_index(&text).map_err(|m| Error::BadModel {
                    path: dest.clone(),
                    msg: format!("{m} (the index of the Hub model {id})"),
                })?;
                for s in shards.keys() {
                    if !todo.contains(s) {
                        todo.insert(i + 1, s.clone());
                    }
                }
            }
        }
        i += 1;
    }
    {
        let mut list = STAND_INS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = list.get_mut(at) {
            s.weight_bytes = bytes;
            s.weight_files = count;
        }
    }
    log::info!(
        "{id}: planning from the safetensors headers in {} (the weights are not downloaded)",
        dir.display()
    );
    Ok(Some(dir))
}

/// The 8 length bytes and the header of a cached safetensors file, and its length.
fn local_header(path: &Path) -> Result<(Vec<u8>, u64)> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let size = f.metadata().map_err(|e| io_err(path, e))?.len();
    let bad = |msg: String| Error::BadModel {
        path: path.to_path_buf(),
        msg,
    };
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8).map_err(|_| {
        bad(format!(
            "is {size} bytes, too short for a safetensors header"
        ))
    })?;
    let n = u64::from_le_bytes(len8);
    if n > MAX_HEADER_LEN || 8 + n > size {
        return Err(bad(format!(
            "its header length field says {n} bytes, which does not fit the {size}-byte file"
        )));
    }
    let mut out = len8.to_vec();
    f.take(n)
        .read_to_end(&mut out)
        .map_err(|e| io_err(path, e))?;
    Ok((out, size))
}

/// The 8 length bytes and the header of a safetensors file on the Hub (two range
/// requests), and the file's length.
fn remote_header(
    agent: &ureq::Agent,
    env: &HubEnv,
    id: &HubId,
    sha: &str,
    file: &str,
) -> Result<(Vec<u8>, u64)> {
    let url = resolve_url(env, id, sha, file);
    let (mut out, size) = range(agent, env, id, &url, file, sha, 0, 8)?;
    let n = u64::from_le_bytes(out[..8].try_into().unwrap());
    if n > MAX_HEADER_LEN || 8 + n > size {
        return Err(hub_err(
            id,
            format!(
                "{file}: not a safetensors file: its header length field says {n} bytes, which does not fit the {size}-byte file ({url})"
            ),
        ));
    }
    if n > 0 {
        let (json, _) = range(agent, env, id, &url, file, sha, 8, n)?;
        out.extend_from_slice(&json);
    }
    Ok((out, size))
}

/// Bytes `from..from + len` of a file and the file's length, by a `Range` request. A server
/// that ignores the range answers 200 with the whole file: only the bytes needed are read.
#[allow(clippy::too_many_arguments)]
fn range(
    agent: &ureq::Agent,
    env: &HubEnv,
    id: &HubId,
    url: &str,
    file: &str,
    sha: &str,
    from: u64,
    len: u64,
) -> Result<(Vec<u8>, u64)> {
    let (resp, meta, _) = send(agent, env, false, url, Some((from, Some(from + len - 1))))
        .map_err(|e| hub_err(id, format!("{file}: {e}")))?;
    if let Some(c) = &meta.commit {
        if c != sha {
            return Err(hub_err(
                id,
                format!("{file}: the server sent commit {c} for a request of commit {sha}"),
            ));
        }
    }
    let status = resp.status().as_u16();
    let (skip, total) = match status {
        206 => {
            let cr = header(&resp, "content-range")
                .unwrap_or("")
                .trim()
                .to_string();
            let (start, total) = cr
                .strip_prefix("bytes ")
                .and_then(|r| r.split_once('/'))
                .and_then(|(span, total)| {
                    Some((
                        span.split('-').next()?.trim().parse::<u64>().ok()?,
                        total.trim().parse::<u64>().ok(),
                    ))
                })
                .ok_or_else(|| {
                    hub_err(
                        id,
                        format!("{file}: the server answered a range request with an unusable Content-Range {cr:?} ({url})"),
                    )
                })?;
            if start != from {
                return Err(hub_err(
                    id,
                    format!("{file}: asked for bytes from {from}, the server sent bytes from {start} ({url})"),
                ));
            }
            (0, total)
        }
        200 => (from, None),
        s => return Err(hub_err(id, format!("{file}: {}", refusal(s, url, env, id)))),
    };
    let size = meta
        .size
        .or(total)
        .ok_or_else(|| hub_err(id, format!("{file}: the server sent no size for {url}")))?;
    let mut body = Vec::new();
    resp.into_body()
        .into_reader()
        .take(skip + len)
        .read_to_end(&mut body)
        .map_err(|e| hub_err(id, format!("{file}: reading the header from {url}: {e}")))?;
    if body.len() as u64 != skip + len {
        return Err(hub_err(
            id,
            format!(
                "{file}: the server sent {} of the {len} header bytes asked for ({url}); run again",
                (body.len() as u64).saturating_sub(skip)
            ),
        ));
    }
    Ok((body.split_off(skip as usize), size))
}

/// A small file (config, tokenizer, index), whole.
fn small_file(
    agent: &ureq::Agent,
    env: &HubEnv,
    id: &HubId,
    sha: &str,
    file: &str,
) -> Result<Vec<u8>> {
    let url = resolve_url(env, id, sha, file);
    let (resp, _, _) =
        send(agent, env, false, &url, None).map_err(|e| hub_err(id, format!("{file}: {e}")))?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(hub_err(
            id,
            format!("{file}: {}", refusal(status, &url, env, id)),
        ));
    }
    resp.into_body()
        .with_config()
        .limit(SMALL_CAP)
        .read_to_vec()
        .map_err(|e| hub_err(id, format!("{file}: reading {url}: {e}")))
}
