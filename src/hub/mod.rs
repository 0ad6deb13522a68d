//! Models named by Hugging Face Hub id (`org/name`, `org/name@revision`): where a model
//! name points (a local folder or a Hub repository), the shared Hugging Face cache in its
//! standard layout ([`cache`]), and downloads of what the cache lacks ([`download`]).
//!
//! This layer sits above `io` (it uses the index parser and the link rule of
//! [`crate::io::model`]); the recipe and the command line call it to turn a model name into
//! a folder on disk.

pub mod cache;
pub mod download;
pub mod headers;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A Hub repository id with an optional revision (branch, tag or 40-hex commit sha).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    /// `org/name`.
    pub repo: String,
    pub revision: Option<String>,
}

/// Is `s` a commit sha (40 lowercase hex digits)?
pub fn is_sha(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The Hub's rules for one part of a repository id: letters, digits, `-`, `_`, `.`; not
/// starting or ending with `-` or `.`; no `--` or `..`; at most 96 characters.
fn valid_part(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 96
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !p.starts_with(['-', '.'])
        && !p.ends_with(['-', '.'])
        && !p.contains("--")
        && !p.contains("..")
}

/// A revision that can name a file under `refs/` safely: no empty, `.` or `..` component,
/// no backslash, whitespace or control character.
fn valid_revision(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 256
        && !r
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
        && r.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

impl HubId {
    /// `org/name` or `org/name@revision`; None for anything else.
    pub fn parse(s: &str) -> Option<HubId> {
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) => (r, Some(rev)),
            None => (s, None),
        };
        let (org, name) = repo.split_once('/')?;
        if !valid_part(org) || !valid_part(name) {
            return None;
        }
        if let Some(rev) = revision {
            if !valid_revision(rev) {
                return None;
            }
        }
        Some(HubId {
            repo: repo.to_string(),
            revision: revision.map(str::to_string),
        })
    }

    /// The revision asked for; `main` by default.
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision())
    }
}

/// Where the Hub and its cache are, from the environment variables huggingface_hub reads.
#[derive(Clone, Debug)]
pub struct HubEnv {
    /// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache: PathBuf,
    /// `HF_HUB_OFFLINE` set to 1/true/yes/on: the cache alone, no network.
    pub offline: bool,
    /// `$HF_ENDPOINT`, default `https://huggingface.co`, without a trailing `/`.
    pub endpoint: String,
    /// `$HF_TOKEN`, sent as `Authorization: Bearer`.
    pub token: Option<String>,
}

impl HubEnv {
    pub fn from_env() -> HubEnv {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let cache = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .unwrap_or_else(|| {
                let home = var("HOME").unwrap_or_else(|| ".".into());
                PathBuf::from(home).join(".cache/huggingface/hub")
            });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        let endpoint = var("HF_ENDPOINT")
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim_end_matches('/')
            .to_string();
        HubEnv {
            cache,
            offline,
            endpoint,
            token: var("HF_TOKEN").map(|t| t.trim().to_string()),
        }
    }

    /// What a message says about the cache: its folder for `id`, and whether offline.
    fn cache_note(&self, id: &HubId) -> String {
        format!(
            "the Hugging Face cache has no {} at {}{}",
            id,
            cache::repo_dir(&self.cache, &id.repo).display(),
            if self.offline {
                " and offline mode is on (HF_HUB_OFFLINE=1), so nothing is downloaded"
            } else {
                ""
            }
        )
    }
}

/// Where a model name points, before anything is downloaded.
#[derive(Clone, Debug)]
pub enum Found {
    /// A path on disk (an absolute path is taken as given, existing or not).
    Local(PathBuf),
    /// A Hub repository, with its cached snapshot folder when the cache has the revision,
    /// and where smelt looked for a local folder first (for messages).
    Hub(HubId, Option<PathBuf>, String),
}

/// Where a relative model name was looked for, for the message when it is found nowhere.
#[derive(Clone, Debug)]
pub struct NotFound {
    pub msg: String,
    /// The name exists in two places (not: exists nowhere).
    pub ambiguous: bool,
}

impl Found {
    /// Is there something at this name now, or a Hub id to fetch (an absolute path that
    /// does not exist is not)?
    pub fn present(&self) -> bool {
        match self {
            Found::Local(p) => p.exists(),
            Found::Hub(..) => true,
        }
    }
}

/// Where the model name `raw` points. An absolute path is taken as given. A relative one is
/// looked for in `recipe_dir` (when given), then in the current folder, then — when it reads
/// as `org/name[@revision]` — in the Hub cache; when two of these exist the name is
/// ambiguous and the error names both. A Hub id found nowhere is still returned (to
/// download), unless offline.
pub fn locate(
    raw: &str,
    recipe_dir: Option<&Path>,
    env: &HubEnv,
) -> std::result::Result<Found, NotFound> {
    let p = Path::new(raw);
    if p.is_absolute() {
        return Ok(Found::Local(p.to_path_buf()));
    }
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let mut places: Vec<(&str, PathBuf)> = Vec::new();
    if let Some(d) = recipe_dir {
        places.push(("the recipe's folder", d.join(p)));
    }
    places.push(("the current folder", cwd.join(p)));
    // (description, path) of each place where the name exists; one entry per real folder
    let mut hits: Vec<(String, PathBuf)> = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();
    for (what, path) in &places {
        if path.exists() || path.is_symlink() {
            let canon = path.canonicalize().unwrap_or_else(|_| path.clone());
            if !seen.contains(&canon) {
                seen.push(canon);
                hits.push((format!("{} in {what}", path.display()), path.clone()));
            }
        }
    }
    let id = HubId::parse(raw);
    let cached = id
        .as_ref()
        .and_then(|id| cache::snapshot(&env.cache, id).ok().flatten());
    if let (Some(id), Some(snap)) = (&id, &cached) {
        hits.push((
            format!("the Hub model {id} in the cache ({})", snap.display()),
            snap.clone(),
        ));
    }
    if hits.len() > 1 {
        return Err(NotFound {
            msg: format!(
                "`{raw}` is ambiguous: it names both {} and {}; use an absolute path for a local folder{}",
                hits[0].0,
                hits[1].0,
                if id.is_some() && id.as_ref().unwrap().revision.is_none() {
                    format!(", or `{raw}@main` for the Hub model")
                } else {
                    String::new()
                }
            ),
            ambiguous: true,
        });
    }
    if let Some(id) = id {
        if cached.is_some() {
            return Ok(Found::Hub(id, cached, looked(&places)));
        }
        if hits.is_empty() {
            if env.offline {
                return Err(NotFound {
                    msg: format!(
                        "`{raw}` not found: {}, and {}",
                        looked(&places),
                        env.cache_note(&id)
                    ),
                    ambiguous: false,
                });
            }
            return Ok(Found::Hub(id, None, looked(&places)));
        }
    }
    match hits.pop() {
        Some((_, path)) => Ok(Found::Local(path)),
        None => Err(NotFound {
            msg: format!(
                "`{raw}` not found: {}, and it is not a Hub id (org/name or org/name@revision)",
                looked(&places)
            ),
            ambiguous: false,
        }),
    }
}

fn looked(places: &[(&str, PathBuf)]) -> String {
    places
        .iter()
        .map(|(what, p)| format!("no {} in {what}", p.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The folder on disk for what [`locate`] found: a local path as is; a Hub model's cached
/// snapshot when it holds weights (or when offline), else the snapshot after downloading
/// what it lacks — or, while a [`headers::PlanOnly`] guard is held (a dry run), a stand-in
/// folder made from the safetensors headers alone. A Hub snapshot's links are checked to
/// stay inside its repository folder.
pub fn materialize(found: Found, env: &HubEnv) -> Result<PathBuf> {
    match found {
        Found::Local(p) => Ok(p),
        Found::Hub(id, cached, looked) => {
            let snap = match cached {
                Some(s) if env.offline || cache::has_weights(&s) => s,
                _ if env.offline => {
                    return Err(Error::Hub {
                        id: id.to_string(),
                        msg: format!("not found: {looked}, and {}", env.cache_note(&id)),
                    })
                }
                _ => {
                    let noted = |e| match e {
                        Error::Hub { id, msg } => Error::Hub {
                            id,
                            msg: format!("{msg} (smelt looked for a local folder first: {looked})"),
                        },
                        e => e,
                    };
                    // a dry run plans from the headers: no weights are downloaded
                    if headers::plan_only() {
                        if let Some(dir) = headers::stand_in(&id, env).map_err(noted)? {
                            return Ok(dir);
                        }
                    }
                    download::fetch(&id, env).map_err(noted)?
                }
            };
            crate::io::model::check_snapshot_links(&snap)?;
            Ok(snap)
        }
    }
}

/// A model named on the command line: an absolute path as given; a relative one from the
/// current folder, else as a Hub id (cache, then download). Both existing is an error.
pub fn resolve_arg(arg: &Path, what: &str) -> Result<PathBuf> {
    let env = HubEnv::from_env();
    let Some(raw) = arg.to_str() else {
        return Ok(arg.to_path_buf());
    };
    let found = locate(raw, None, &env).map_err(|e| Error::Other(format!("{what}: {}", e.msg)))?;
    match found {
        // as given: messages keep naming it as the user wrote it
        Found::Local(_) => Ok(arg.to_path_buf()),
        hub => materialize(hub, &env).map_err(|e| Error::Other(format!("{what}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        let id = HubId::parse("org/name").unwrap();
        assert_eq!((id.repo.as_str(), id.revision()), ("org/name", "main"));
        let id = HubId::parse("Org-1/na_me.v2@refs/pr/3").unwrap();
        assert_eq!(id.revision.as_deref(), Some("refs/pr/3"));
        for bad in [
            "name",
            "a/b/c",
            "./x",
            "../x/y",
            "/abs/path",
            "org/",
            "org/na me",
            "org/-x",
            "org/x.",
            "org/a--b",
            "org/x@",
            "org/x@../../etc",
            "org/x@a//b",
            "org/x@a b",
        ] {
            assert!(HubId::parse(bad).is_none(), "{bad}");
        }
        assert!(is_sha(&"a".repeat(40)));
        assert!(!is_sha(&"A".repeat(40)));
        assert!(!is_sha(&"a".repeat(39)));
    }
}
