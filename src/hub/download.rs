//! Downloads from the Hub (or any server speaking its protocol, `$HF_ENDPOINT`) into the
//! shared cache: the repository's file list from `/api/models/{repo}/revision/{revision}`,
//! then each needed file from `/{repo}/resolve/{sha}/{file}`, following redirects by hand so
//! that the Hub's `X-Repo-Commit`, `X-Linked-Etag` and `X-Linked-Size` headers (sent on the
//! redirect to the storage host) are seen. A file goes to `blobs/<etag>.incomplete`, resumed
//! with a `Range` request after a broken connection, is checked (size; sha256 for LFS
//! files, whose etag is their sha256) and only then renamed to `blobs/<etag>` and linked
//! from `snapshots/<sha>/<file>`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::{Error, Result};
use crate::hub::cache::{self, io_err};
use crate::hub::{is_sha, HubEnv, HubId};
use crate::io::model::{parse_index, INDEX_NAME, SINGLE_NAME, TOKENIZER_FILES};

/// Files besides the weights and the tokenizer files ([`TOKENIZER_FILES`]) that a merge reads:
/// the model's configs and a LoRA adapter's config.
const CONFIG_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "adapter_config.json",
];

pub(super) const BIN_INDEX: &str = "pytorch_model.bin.index.json";
/// Tries per file (the first and the resumed ones) before giving up.
const TRIES: u32 = 5;
const API_CAP: u64 = 16 << 20;

pub(super) fn hub_err(id: &HubId, msg: impl Into<String>) -> Error {
    Error::Hub {
        id: id.to_string(),
        msg: msg.into(),
    }
}

/// Downloads what the cache lacks of `id`'s revision (only the files a merge needs) and
/// returns its snapshot folder.
pub fn fetch(id: &HubId, env: &HubEnv) -> Result<PathBuf> {
    let agent = agent();
    let (sha, files) = revision_info(&agent, env, id)?;
    let repo = cache::repo_dir(&env.cache, &id.repo);
    let snap = repo.join("snapshots").join(&sha);

    let mut todo = wanted(&files);
    let mut i = 0;
    while i < todo.len() {
        let file = todo[i].clone();
        ensure_file(&agent, env, id, &repo, &sha, &file)?;
        if file == INDEX_NAME || file == BIN_INDEX {
            let path = snap.join(&file);
            let text =
                crate::io::read::read_string_capped(&path, crate::io::read::JSON_CAP, "index")?;
            let shards = parse_index(&text).map_err(|m| Error::BadModel {
                path: path.clone(),
                msg: m,
            })?;
            for s in shards.keys() {
                if !todo.contains(s) {
                    todo.insert(i + 1, s.clone());
                }
            }
        }
        i += 1;
    }
    cache::write_ref(&repo, id.revision(), &sha)?;
    Ok(snap)
}

/// The commit sha and file list of `id`'s revision, from `/api/models/{repo}/revision/{rev}`.
pub(super) fn revision_info(
    agent: &ureq::Agent,
    env: &HubEnv,
    id: &HubId,
) -> Result<(String, Vec<String>)> {
    let api = format!(
        "{}/api/models/{}/revision/{}",
        env.endpoint,
        id.repo,
        encode(id.revision(), true)
    );
    let (resp, _, _) = send(agent, env, false, &api, None).map_err(|e| {
        hub_err(
            id,
            format!(
                "could not reach {}: {e}; check the network, or set HF_HUB_OFFLINE=1 to use only the cache at {}",
                env.endpoint,
                env.cache.display()
            ),
        )
    })?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(hub_err(id, refusal(status, &api, env, id)));
    }
    let text = resp
        .into_body()
        .with_config()
        .limit(API_CAP)
        .read_to_string()
        .map_err(|e| hub_err(id, format!("reading {api}: {e}")))?;
    parse_info(&text).map_err(|m| hub_err(id, format!("{api}: {m}")))
}

/// The message for a refused API call.
pub(super) fn refusal(status: u16, url: &str, env: &HubEnv, id: &HubId) -> String {
    match status {
        401 | 403 => format!(
            "{} refused access (HTTP {status}): the repository is private or gated; {}",
            env.endpoint,
            if env.token.is_some() {
                "the token in HF_TOKEN has no access to it"
            } else {
                "set HF_TOKEN to a token that has access"
            }
        ),
        404 => format!(
            "not found: {} has no model repository {} with revision {} (HTTP 404 from {url}); check the id and revision",
            env.endpoint,
            id.repo,
            id.revision()
        ),
        s => format!("{url} answered HTTP {s}"),
    }
}

/// The commit sha and the file list of a revision, from the Hub's API answer.
fn parse_info(text: &str) -> std::result::Result<(String, Vec<String>), String> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let sha = v
        .get("sha")
        .and_then(|s| s.as_str())
        .filter(|s| is_sha(s))
        .ok_or("no 40-hex commit `sha`")?
        .to_string();
    let mut files = Vec::new();
    for s in v
        .get("siblings")
        .and_then(|s| s.as_array())
        .ok_or("no `siblings` list")?
    {
        let name = s
            .get("rfilename")
            .and_then(|n| n.as_str())
            .ok_or("a sibling without `rfilename`")?;
        if !contained(name) {
            return Err(format!(
                "lists the file {name:?}, which would land outside the snapshot folder"
            ));
        }
        files.push(name.to_string());
    }
    Ok((sha, files))
}

/// A relative path with only plain components (no `..`, no root, no backslash).
pub(super) fn contained(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\\')
        && !name.starts_with('/')
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// The files a merge needs, of those the repository has: the safetensors index (its shards
/// are added once it is read) or the one weights file, never `.bin` weights when
/// safetensors exist; configs and tokenizer files.
pub(super) fn wanted(files: &[String]) -> Vec<String> {
    let has = |f: &str| files.iter().any(|x| x == f);
    let top_st: Vec<&String> = files
        .iter()
        .filter(|f| !f.contains('/') && f.ends_with(".safetensors"))
        .collect();
    let mut out: Vec<String> = Vec::new();
    if has(INDEX_NAME) {
        out.push(INDEX_NAME.into());
    } else if has(SINGLE_NAME) {
        out.push(SINGLE_NAME.into());
    } else if has("adapter_model.safetensors") {
        out.push("adapter_model.safetensors".into());
    } else if !top_st.is_empty() {
        out.extend(top_st.into_iter().cloned());
    } else if has(BIN_INDEX) {
        out.push(BIN_INDEX.into());
    } else if has("pytorch_model.bin") {
        out.push("pytorch_model.bin".into());
    }
    out.extend(
        CONFIG_FILES
            .iter()
            .chain(TOKENIZER_FILES)
            .filter(|f| has(f))
            .map(|f| f.to_string()),
    );
    out
}

/// The Hub's address of one file of a repository at a commit.
pub(super) fn resolve_url(env: &HubEnv, id: &HubId, sha: &str, file: &str) -> String {
    format!(
        "{}/{}/resolve/{sha}/{}",
        env.endpoint,
        id.repo,
        encode(file, false)
    )
}

pub(super) fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(120)))
        .user_agent(concat!("smelt/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// What the Hub says about a file, gathered over the redirects.
#[derive(Default, Debug)]
pub(super) struct Meta {
    pub(super) commit: Option<String>,
    pub(super) etag: Option<String>,
    pub(super) size: Option<u64>,
}

pub(super) fn header<'a>(r: &'a ureq::http::Response<ureq::Body>, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

/// One request, with redirects followed by hand (at most 10): the token goes only to the
/// endpoint's host; `Range` (bytes `from`, to byte `to` inclusive or to the end) to every
/// hop.
pub(super) fn send(
    agent: &ureq::Agent,
    env: &HubEnv,
    head: bool,
    url: &str,
    range: Option<(u64, Option<u64>)>,
) -> std::result::Result<(ureq::http::Response<ureq::Body>, Meta, String), String> {
    let mut url = url.to_string();
    let mut meta = Meta::default();
    let home = host(&env.endpoint).to_string();
    for _ in 0..=10 {
        let mut req = if head {
            agent.head(&url)
        } else {
            agent.get(&url)
        };
        if let Some(t) = &env.token {
            if host(&url) == home {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
        }
        if let Some((from, to)) = range {
            let to = to.map(|t| t.to_string()).unwrap_or_default();
            req = req.header("Range", format!("bytes={from}-{to}"));
        }
        let resp = req.call().map_err(|e| format!("{url}: {e}"))?;
        if meta.commit.is_none() {
            meta.commit = header(&resp, "x-repo-commit").map(str::to_string);
        }
        if meta.etag.is_none() {
            meta.etag = header(&resp, "x-linked-etag")
                .or_else(|| header(&resp, "etag"))
                .map(str::to_string);
        }
        if meta.size.is_none() {
            meta.size = header(&resp, "x-linked-size").and_then(|s| s.trim().parse().ok());
        }
        let status = resp.status().as_u16();
        if (300..400).contains(&status) {
            if let Some(loc) = header(&resp, "location") {
                // HEAD asks for metadata: like huggingface_hub it follows only redirects on
                // the same host (a renamed repository), not the one to the storage host,
                // whose signed URLs may refuse HEAD; the Hub's headers are on this answer
                let relative = loc.starts_with('/') && !loc.starts_with("//");
                if !head || relative || meta.etag.is_none() || meta.size.is_none() {
                    url = join(&url, loc);
                    continue;
                }
            }
        }
        if meta.size.is_none() && status == 200 {
            meta.size = header(&resp, "content-length").and_then(|s| s.trim().parse().ok());
        }
        return Ok((resp, meta, url));
    }
    Err(format!("{url}: more than 10 redirects"))
}

/// `scheme://host[:port]` of a URL's host part.
fn host(url: &str) -> &str {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    &url[start..end]
}

/// A redirect's `Location` against the URL it came from.
fn join(base: &str, loc: &str) -> String {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return loc.to_string();
    }
    let scheme = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme..].find('/').map_or(base.len(), |i| scheme + i);
    if let Some(rest) = loc.strip_prefix("//") {
        format!("{}{rest}", &base[..scheme])
    } else if loc.starts_with('/') {
        format!("{}{loc}", &base[..host_end])
    } else {
        let path = base.split(['?', '#']).next().unwrap_or(base);
        let dir = &path[..path
            .rfind('/')
            .filter(|&i| i >= host_end)
            .map_or(path.len(), |i| i + 1)];
        format!("{dir}{loc}")
    }
}

/// Percent-encodes a path part (`/` kept unless `slash`).
pub(super) fn encode(s: &str, slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (b == b'/' && !slash)
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An etag as a blob file name: without `W/` and quotes; letters, digits, `-` and `_` only.
fn blob_name(etag: &str) -> Option<String> {
    let e = etag.trim().trim_start_matches("W/").trim_matches('"');
    (!e.is_empty()
        && e.len() <= 128
        && e.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    .then(|| e.to_string())
}

/// Makes `snapshots/<sha>/<file>` present: linked to its blob, downloaded first unless the
/// blob is already in the cache (another revision may share it).
fn ensure_file(
    agent: &ureq::Agent,
    env: &HubEnv,
    id: &HubId,
    repo: &Path,
    sha: &str,
    file: &str,
) -> Result<()> {
    if !contained(file) {
        return Err(hub_err(
            id,
            format!(
                "the index names the file {file:?}, which would land outside the snapshot folder"
            ),
        ));
    }
    let dest = repo.join("snapshots").join(sha).join(file);
    if dest.is_file() {
        return Ok(());
    }
    let url = resolve_url(env, id, sha, file);
    let (resp, meta, _) =
        send(agent, env, true, &url, None).map_err(|e| hub_err(id, format!("{file}: {e}")))?;
    let status = resp.status().as_u16();
    if status != 200 && !(300..400).contains(&status) {
        return Err(hub_err(
            id,
            format!("{file}: {}", refusal(status, &url, env, id)),
        ));
    }
    if let Some(c) = &meta.commit {
        if c != sha {
            return Err(hub_err(
                id,
                format!("{file}: the server sent commit {c} for a request of commit {sha}"),
            ));
        }
    }
    let etag = meta.etag.as_deref().and_then(blob_name).ok_or_else(|| {
        hub_err(
            id,
            format!(
                "{file}: the server sent no usable ETag ({:?}) for {url}",
                meta.etag
            ),
        )
    })?;
    let size = meta
        .size
        .ok_or_else(|| hub_err(id, format!("{file}: the server sent no size for {url}")))?;
    let blob = repo.join("blobs").join(&etag);
    if !blob.is_file() {
        // one download of a blob at a time (huggingface_hub's lock folder): a second smelt
        // waits here, then finds the blob in place
        let _lock = lock_blob(&env.cache, repo, &etag)?;
        if !blob.is_file() {
            fetch_blob(agent, env, id, &url, &blob, &etag, size, file)?;
        }
    }
    cache::link(repo, sha, file, &etag)?;
    Ok(())
}

/// Holds `<cache>/.locks/models--org--name/<etag>.lock` locked (exclusive, waiting) until
/// dropped.
fn lock_blob(cache_root: &Path, repo: &Path, etag: &str) -> Result<std::fs::File> {
    let dir = cache_root
        .join(".locks")
        .join(repo.file_name().unwrap_or_default());
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let path = dir.join(format!("{etag}.lock"));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns; the lock ends with the file.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err(&path, std::io::Error::last_os_error()));
        }
    }
    Ok(f)
}

fn bar(size: u64, file: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:30!} {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap(),
    );
    pb.set_message(file.to_string());
    pb
}

/// Downloads one blob through `<blob>.incomplete`, resuming after a broken connection, and
/// checks its size and (LFS files) sha256 before renaming it into place.
#[allow(clippy::too_many_arguments)]
fn fetch_blob(
    agent: &ureq::Agent,
    env: &HubEnv,
    id: &HubId,
    url: &str,
    blob: &Path,
    etag: &str,
    size: u64,
    file: &str,
) -> Result<()> {
    let dir = blob.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let part = dir.join(format!("{etag}.incomplete"));
    let pb = bar(size, file);
    let mut last = String::new();
    for attempt in 0..TRIES {
        let mut have = part.metadata().map(|m| m.len()).unwrap_or(0);
        if have > size {
            std::fs::remove_file(&part).map_err(|e| io_err(&part, e))?;
            have = 0;
        }
        if have == size && part.exists() {
            break;
        }
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(200 * attempt as u64));
            log::info!("{file}: resuming the download at byte {have} of {size}");
        }
        pb.set_position(have);
        let (resp, _, _) = match send(agent, env, false, url, (have > 0).then_some((have, None))) {
            Ok(r) => r,
            Err(e) => {
                last = e;
                continue;
            }
        };
        let status = resp.status().as_u16();
        let start = match status {
            206 => content_range_start(header(&resp, "content-range")),
            200 => Some(0),
            416 => None,
            s => return Err(hub_err(id, format!("{file}: {}", refusal(s, url, env, id)))),
        };
        let mut f = match start {
            Some(s) if s == have && have > 0 => std::fs::OpenOptions::new()
                .append(true)
                .open(&part)
                .map_err(|e| io_err(&part, e))?,
            Some(0) => std::fs::File::create(&part).map_err(|e| io_err(&part, e))?,
            _ => {
                // a range the server did not honour as asked: start over
                let _ = std::fs::remove_file(&part);
                last = format!("{url}: the server answered the range request with HTTP {status}");
                continue;
            }
        };
        let mut at = start.unwrap_or(0);
        pb.set_position(at);
        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if at + n as u64 > size {
                        drop(f);
                        let _ = std::fs::remove_file(&part);
                        return Err(hub_err(
                            id,
                            format!("{file}: the server sent more than the {size} bytes it announced; the partial file was deleted"),
                        ));
                    }
                    f.write_all(&buf[..n]).map_err(|e| io_err(&part, e))?;
                    at += n as u64;
                    pb.set_position(at);
                }
                Err(e) => {
                    last = format!("the connection broke at byte {at} of {size}: {e}");
                    break;
                }
            }
        }
        f.flush().map_err(|e| io_err(&part, e))?;
        if at == size {
            break;
        }
        if last.is_empty() {
            last = format!("the connection ended at byte {at} of {size}");
        }
    }
    pb.finish_and_clear();
    let got = part.metadata().map(|m| m.len()).unwrap_or(0);
    if got != size || !part.exists() {
        return Err(hub_err(
            id,
            format!(
                "{file}: download incomplete after {TRIES} tries ({got} of {size} bytes; {last}); run again to resume from {}",
                part.display()
            ),
        ));
    }
    if etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        let digest = crate::io::writer::hash_file(&part, crate::io::writer::HashAlgo::Sha256)?;
        if !digest.eq_ignore_ascii_case(etag) {
            let _ = std::fs::remove_file(&part);
            return Err(hub_err(
                id,
                format!(
                    "{file}: the downloaded content has sha256 {digest}, but the Hub says {etag}; the download was deleted (run again to retry)"
                ),
            ));
        }
    }
    std::fs::rename(&part, blob).map_err(|e| io_err(blob, e))?;
    Ok(())
}

fn content_range_start(v: Option<&str>) -> Option<u64> {
    let v = v?.trim().strip_prefix("bytes ")?;
    v.split('-').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(join("http://a:1/x/y/z", "/cdn/q"), "http://a:1/cdn/q");
        assert_eq!(join("http://a:1/x/y/z", "https://b/c"), "https://b/c");
        assert_eq!(join("https://a/x/y/z", "//b/c"), "https://b/c");
        assert_eq!(join("http://a/x/y/z?q=1", "w"), "http://a/x/y/w");
        assert_eq!(host("http://127.0.0.1:80/a"), "127.0.0.1:80");
        assert_eq!(encode("refs/pr/1", true), "refs%2Fpr%2F1");
        assert_eq!(encode("a b/c.json", false), "a%20b/c.json");
    }

    #[test]
    fn etags() {
        assert_eq!(blob_name("\"abc123\"").as_deref(), Some("abc123"));
        assert_eq!(blob_name("W/\"abc\"").as_deref(), Some("abc"));
        assert_eq!(blob_name("\"../../x\""), None);
        assert_eq!(blob_name("\"\""), None);
    }

    #[test]
    fn selection() {
        let f = |v: &[&str]| wanted(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            f(&[
                "model.safetensors",
                "pytorch_model.bin",
                "config.json",
                "README.md"
            ]),
            ["model.safetensors", "config.json"]
        );
        assert_eq!(
            f(&[INDEX_NAME, "a.safetensors", BIN_INDEX, "tokenizer.json"]),
            [INDEX_NAME, "tokenizer.json"]
        );
        assert_eq!(
            f(&["pytorch_model.bin", "config.json"]),
            ["pytorch_model.bin", "config.json"]
        );
        assert!(parse_info(r#"{"sha":"x","siblings":[]}"#).is_err());
        let sha = "a".repeat(40);
        assert!(parse_info(&format!(
            r#"{{"sha":"{sha}","siblings":[{{"rfilename":"../x"}}]}}"#
        ))
        .is_err());
    }
}
