//! `smelt merge --dry-run` on Hub models whose weights are not in the cache: the plan comes
//! from the safetensors headers alone, fetched with range requests from a local server that
//! speaks the Hub's protocol (`hub_server`); no weights are downloaded and nothing is
//! written to the cache. The real merge afterwards downloads and equals the local merge.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common::*;
use crate::hub::{
    assets, commit, fails_with, files_of, linear, ok, same, sharded_chat, weights_and_side_files,
    Hub,
};
use crate::hub_server::{ServedFile, Server};

/// Every file or link under `dir` (folders alone are listed by nobody).
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn is_weights(f: &ServedFile) -> bool {
    f.name.ends_with(".safetensors")
}

/// The length of a safetensors file's header, with its 8 length bytes.
fn header_len(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// The dry run's output without the lines that name where things are (the recipe's path)
/// or where they come from (the Hub lines).
fn plan_lines(o: &Output) -> Vec<String> {
    stdout(o)
        .lines()
        .filter(|l| !l.starts_with("recipe ") && !l.starts_with("hub "))
        .map(str::to_string)
        .collect()
}

fn dry_run(h: &Hub, recipe: &Path, out: &Path, env: &[(&str, &str)]) -> Output {
    let mut c = h.smelt(&["merge"]);
    c.arg(recipe).arg("-o").arg(out).arg("--dry-run");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// A linear merge of a single-file model and a sharded one, both only on the server: the
/// dry run prints the same plan as from local folders, says the weights are not downloaded
/// and how much a merge would fetch, gets only headers (range requests; bytes served below
/// headers + small files + slack, far below the weights), leaves the cache and the temporary
/// folder empty and writes no output. Then the real merge downloads and equals the local one.
#[test]
fn dry_run_reads_only_headers() {
    let h = Hub::new();
    let chat = h.tmp.path().join("chat-sharded");
    sharded_chat(&h, &chat);
    let base_files = files_of(&assets("base"));
    let chat_files = files_of(&chat);
    let server = Server::start(false);
    server.add("testorg/base", "main", &commit(51), base_files.clone());
    server.add("testorg/chat", "main", &commit(52), chat_files.clone());
    let endpoint = server.endpoint();

    let all: Vec<&ServedFile> = base_files.iter().chain(&chat_files).collect();
    let headers: usize = all
        .iter()
        .filter(|f| is_weights(f))
        .map(|f| header_len(&f.bytes))
        .sum();
    let weights: usize = all
        .iter()
        .filter(|f| is_weights(f))
        .map(|f| f.bytes.len())
        .sum();
    let small: usize = all
        .iter()
        .filter(|f| !is_weights(f))
        .map(|f| f.bytes.len())
        .sum();
    // the API answers (file lists) and nothing else
    let limit = headers + small + 4096;
    assert!(
        limit * 3 < weights,
        "the test models' weights ({weights} bytes) are too small to tell headers ({headers}) from weights"
    );
    let chat_shards = chat_files.iter().filter(|f| is_weights(f)).count();

    // the same recipe from local folders of the same names, in another sandbox
    let h2 = Hub::new();
    for (id, src) in [
        ("testorg/base", assets("base")),
        ("testorg/chat", chat.clone()),
    ] {
        let dest = h2.work().join(id);
        std::fs::create_dir_all(&dest).unwrap();
        for (name, bytes) in dir_bytes(&src) {
            std::fs::write(dest.join(name), bytes).unwrap();
        }
    }
    let text = linear("testorg/base", "testorg/chat");
    let r2 = h2.recipe("m.yml", &text);
    let local = dry_run(&h2, &r2, &h2.tmp.path().join("out"), &[]);
    ok(&local);

    let r = h.recipe("m.yml", &text);
    let out = h.tmp.path().join("out");
    let tmp = h.tmp.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let o = dry_run(
        &h,
        &r,
        &out,
        &[
            ("HF_ENDPOINT", &endpoint),
            ("TMPDIR", tmp.to_str().unwrap()),
        ],
    );
    ok(&o);
    let text_out = stdout(&o);
    assert_eq!(plan_lines(&o), plan_lines(&local), "{text_out}");
    assert!(text_out.contains("method      linear"), "{text_out}");
    for (id, sha, files) in [
        ("testorg/base", commit(51), "in 1 file)".to_string()),
        (
            "testorg/chat",
            commit(52),
            format!("in {chat_shards} files)"),
        ),
    ] {
        let line = text_out
            .lines()
            .find(|l| l.starts_with(&format!("hub         {id}@main (commit {sha})")))
            .unwrap_or_else(|| panic!("no Hub line for {id}: {text_out}"));
        assert!(
            line.contains("the weights are not downloaded") && line.ends_with(&files),
            "{line}"
        );
    }

    let served = server.bytes_served();
    assert!(
        served < limit,
        "served {served} bytes for a dry run; headers {headers} + small files {small} + 4096"
    );
    let log = server.log();
    for req in &log {
        if req.path.starts_with("/cdn/") {
            let range = req.range.as_deref().unwrap_or("");
            let closed = range
                .strip_prefix("bytes=")
                .and_then(|s| s.split_once('-'))
                .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty());
            assert!(closed, "a weights request without a closed Range: {req:?}");
        }
    }
    assert_eq!(
        log.iter().filter(|r| r.path.starts_with("/cdn/")).count(),
        2 * (chat_shards + 1),
        "expected two range requests per weights file: {log:?}"
    );
    assert_eq!(entries(&h.cache()), Vec::<PathBuf>::new(), "the cache");
    assert_eq!(entries(&tmp), Vec::<PathBuf>::new(), "stand-ins left");
    assert!(!out.exists());

    // the real merge downloads and equals the merge of the local folders
    let local_out = h.tmp.path().join("out-local");
    let lr = h.recipe(
        "local.yml",
        &linear(
            &assets("base").display().to_string(),
            &chat.display().to_string(),
        ),
    );
    ok(&h.merge(&lr, &local_out, &[]));
    ok(&h.merge(&r, &out, &[("HF_ENDPOINT", &endpoint)]));
    same(
        &weights_and_side_files(&local_out),
        &weights_and_side_files(&out),
        "downloaded after the dry run",
    );
    assert!(server.bytes_served() > weights, "the merge downloaded");
}

/// Offline, a dry run of an id the cache lacks is refused with the cache's path and the
/// offline setting named, without any request; nothing is written.
#[test]
fn dry_run_offline_uncached_is_refused() {
    let h = Hub::new();
    let server = Server::start(false);
    server.add(
        "testorg/base",
        "main",
        &commit(53),
        files_of(&assets("base")),
    );
    let r = h.recipe("m.yml", &crate::hub::passthrough("testorg/base"));
    let out = h.tmp.path().join("out");
    let o = dry_run(
        &h,
        &r,
        &out,
        &[("HF_ENDPOINT", &server.endpoint()), ("HF_HUB_OFFLINE", "1")],
    );
    let cache = h.repo("testorg/base").display().to_string();
    fails_with(
        &o,
        &[
            "testorg/base",
            "offline mode is on (HF_HUB_OFFLINE=1)",
            &cache,
        ],
    );
    assert!(server.log().is_empty(), "{:?}", server.log());
    assert_eq!(entries(&h.cache()), Vec::<PathBuf>::new());
    assert!(!out.exists());
}

/// A dry run of a repository the server does not have: exit 1, the id and the 404 named.
#[test]
fn dry_run_missing_repository() {
    let h = Hub::new();
    let server = Server::start(false);
    let r = h.recipe("m.yml", &crate::hub::passthrough("testorg/nothing"));
    let out = h.tmp.path().join("out");
    let o = dry_run(&h, &r, &out, &[("HF_ENDPOINT", &server.endpoint())]);
    fails_with(&o, &["testorg/nothing", "HTTP 404", "check the id"]);
    assert_eq!(entries(&h.cache()), Vec::<PathBuf>::new());
    assert!(!out.exists());
}
