//! A minimal HTTP/1.1 server on 127.0.0.1 that answers as the Hugging Face Hub does, for
//! the download tests: `GET /api/models/{repo}/revision/{rev}` (the commit and the file
//! list), `HEAD`/`GET /{repo}/resolve/{rev}/{file}` (small files served directly with an
//! ETag; LFS files — `.safetensors`, `.bin` — redirected with 302 to `/cdn/{sha256}` with
//! `X-Linked-Etag`/`X-Linked-Size`, as the Hub redirects to its storage host), and
//! `/cdn/{sha256}` with `Range` support (`bytes=FROM-`, `bytes=FROM-TO`). Optionally the first
//! GET of each LFS file breaks
//! off after half its bytes. Every request is logged. One request per connection.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::hub::sha256_hex;

#[derive(Clone, Debug)]
pub struct ServedFile {
    pub name: String,
    pub bytes: Vec<u8>,
    /// Serve other bytes (same length) than the announced sha256 describes.
    pub corrupt: bool,
}

#[derive(Clone, Debug)]
#[allow(dead_code)] // printed in failure messages
pub struct Req {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub token: Option<String>,
}

#[derive(Default)]
struct Repo {
    refs: HashMap<String, String>,
    snaps: HashMap<String, Vec<ServedFile>>,
    token: Option<String>,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    log: Vec<Req>,
    broken: HashSet<String>,
    break_first: bool,
    /// Where LFS files are redirected: another server (another host), or this one.
    cdn: Option<String>,
    /// Body bytes sent, all requests together.
    served: usize,
}

pub struct Server {
    addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts the server; with `break_first`, the first GET of each LFS file ends mid-file.
    pub fn start(break_first: bool) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            break_first,
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, &st);
                });
            }
        });
        Server {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds snapshot `sha` of `repo`, named by the ref `branch` too.
    pub fn add(&self, repo: &str, branch: &str, sha: &str, files: Vec<ServedFile>) {
        let mut s = self.state.lock().unwrap();
        let r = s.repos.entry(repo.to_string()).or_default();
        r.refs.insert(branch.to_string(), sha.to_string());
        r.snaps.insert(sha.to_string(), files);
    }

    /// The API and resolve endpoints of `repo` answer 401 without `Bearer token`.
    pub fn require_token(&self, repo: &str, token: &str) {
        let mut s = self.state.lock().unwrap();
        s.repos.get_mut(repo).unwrap().token = Some(token.to_string());
    }

    /// Redirects LFS files to `endpoint`'s `/cdn/` (a storage host other than this one).
    pub fn redirect_lfs_to(&self, endpoint: &str) {
        self.state.lock().unwrap().cdn = Some(endpoint.to_string());
    }

    /// Body bytes sent so far, all requests together.
    pub fn bytes_served(&self) -> usize {
        self.state.lock().unwrap().served
    }

    pub fn log(&self) -> Vec<Req> {
        self.state.lock().unwrap().log.clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

fn is_lfs(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".bin")
}

struct Resp {
    status: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many body bytes, then close (Content-Length stays the full length).
    cut: Option<usize>,
}

fn resp(status: &'static str, body: Vec<u8>) -> Resp {
    Resp {
        status,
        headers: Vec::new(),
        body,
        cut: None,
    }
}

fn handle(mut conn: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk)?;
        if n == 0 || buf.len() > 65536 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let mut lines = text.split("\r\n");
    let first: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
    let (method, path) = (
        first[0].to_string(),
        first.get(1).unwrap_or(&"/").to_string(),
    );
    let mut range = None;
    let mut token = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_string()),
                "authorization" => token = v.trim().strip_prefix("Bearer ").map(str::to_string),
                _ => {}
            }
        }
    }
    let req = Req {
        method: method.clone(),
        path: path.clone(),
        range: range.clone(),
        token: token.clone(),
    };
    let r = {
        let mut s = state.lock().unwrap();
        s.log.push(req);
        route(&mut s, &method, &path, range.as_deref(), token.as_deref())
    };
    let len = r.body.len();
    let mut head = format!("HTTP/1.1 {}\r\n", r.status);
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {len}\r\nConnection: close\r\n\r\n"
    ));
    conn.write_all(head.as_bytes())?;
    if method != "HEAD" {
        let n = r.cut.unwrap_or(len);
        state.lock().unwrap().served += n;
        conn.write_all(&r.body[..n])?;
    }
    conn.flush()?;
    let _ = conn.shutdown(std::net::Shutdown::Both);
    Ok(())
}

fn route(
    s: &mut State,
    method: &str,
    path: &str,
    range: Option<&str>,
    token: Option<&str>,
) -> Resp {
    let parts: Vec<&str> = path.split('?').next().unwrap().split('/').collect();
    // /api/models/{org}/{name}/revision/{rev}
    if parts.len() == 7 && parts[1] == "api" && parts[2] == "models" && parts[5] == "revision" {
        let repo_id = format!("{}/{}", parts[3], parts[4]);
        let rev = decode(parts[6]);
        let Some(repo) = s.repos.get(&repo_id) else {
            return resp(
                "404 Not Found",
                b"{\"error\":\"Repository not found\"}".to_vec(),
            );
        };
        if repo.token.is_some() && repo.token.as_deref() != token {
            return resp(
                "401 Unauthorized",
                b"{\"error\":\"Invalid credentials\"}".to_vec(),
            );
        }
        let sha = repo.refs.get(&rev).cloned().unwrap_or(rev.clone());
        let Some(files) = repo.snaps.get(&sha) else {
            return resp(
                "404 Not Found",
                b"{\"error\":\"Revision not found\"}".to_vec(),
            );
        };
        let siblings: Vec<String> = files
            .iter()
            .map(|f| format!("{{\"rfilename\":\"{}\"}}", f.name))
            .collect();
        let body = format!(
            "{{\"id\":\"{repo_id}\",\"sha\":\"{sha}\",\"siblings\":[{}]}}",
            siblings.join(",")
        );
        return resp("200 OK", body.into_bytes());
    }
    // /{org}/{name}/resolve/{rev}/{file}
    if parts.len() >= 6 && parts[3] == "resolve" {
        let repo_id = format!("{}/{}", parts[1], parts[2]);
        let rev = decode(parts[4]);
        let file = decode(&parts[5..].join("/"));
        let Some(repo) = s.repos.get(&repo_id) else {
            return resp("404 Not Found", Vec::new());
        };
        if repo.token.is_some() && repo.token.as_deref() != token {
            return resp("401 Unauthorized", Vec::new());
        }
        let sha = repo.refs.get(&rev).cloned().unwrap_or(rev.clone());
        let Some(f) = repo
            .snaps
            .get(&sha)
            .and_then(|fs| fs.iter().find(|f| f.name == file))
        else {
            return resp("404 Not Found", Vec::new());
        };
        let digest = sha256_hex(&f.bytes);
        if is_lfs(&f.name) {
            let mut r = resp("302 Found", Vec::new());
            r.headers = vec![
                (
                    "Location".into(),
                    format!("{}/cdn/{digest}", s.cdn.as_deref().unwrap_or("")),
                ),
                ("X-Repo-Commit".into(), sha),
                ("X-Linked-Etag".into(), format!("\"{digest}\"")),
                ("X-Linked-Size".into(), f.bytes.len().to_string()),
                ("ETag".into(), format!("\"{digest}\"")),
            ];
            return r;
        }
        let mut r = resp("200 OK", f.bytes.clone());
        r.headers = vec![
            ("X-Repo-Commit".into(), sha),
            ("ETag".into(), format!("\"{}\"", &digest[..40])),
        ];
        return r;
    }
    // /cdn/{sha256}
    if parts.len() == 3 && parts[1] == "cdn" {
        let want = parts[2];
        let found = s
            .repos
            .values()
            .flat_map(|r| r.snaps.values())
            .flatten()
            .find(|f| sha256_hex(&f.bytes) == want)
            .cloned();
        let Some(f) = found else {
            return resp("404 Not Found", Vec::new());
        };
        let mut bytes = f.bytes.clone();
        if f.corrupt {
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
        }
        let total = bytes.len();
        // `bytes=FROM-` or `bytes=FROM-TO` (TO inclusive, cut to the file's end)
        let span = range.and_then(|r| r.strip_prefix("bytes="));
        let start = span
            .and_then(|r| r.split('-').next())
            .and_then(|n| n.parse::<usize>().ok());
        let end = span
            .and_then(|r| r.split('-').nth(1))
            .and_then(|n| n.parse::<usize>().ok())
            .map_or(total, |e| (e + 1).min(total));
        let mut r = match start {
            Some(st) if st < total && st < end => {
                let mut r = resp("206 Partial Content", bytes[st..end].to_vec());
                r.headers.push((
                    "Content-Range".into(),
                    format!("bytes {st}-{}/{total}", end - 1),
                ));
                r
            }
            Some(_) => resp("416 Range Not Satisfiable", Vec::new()),
            None => resp("200 OK", bytes),
        };
        r.headers.push(("ETag".into(), format!("\"{want}\"")));
        if method == "GET" && s.break_first && r.body.len() > 1 && s.broken.insert(path.to_string())
        {
            r.cut = Some(r.body.len() / 2);
        }
        return r;
    }
    resp("404 Not Found", Vec::new())
}
