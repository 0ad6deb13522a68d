//! Models named by Hugging Face Hub id: a cache the test builds in the standard layout
//! (blobs named by sha256, relative links from snapshots, refs), resolution rules (recipe
//! folder, current folder, Hub; ambiguity), revisions, offline mode, the link rule of the
//! cache, and downloads from a local server speaking the Hub's protocol (`hub_server`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

use crate::common::*;
use crate::hub_server::{ServedFile, Server};

pub fn assets(m: &str) -> PathBuf {
    root().join("assets/models").join(m)
}

pub fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// A made-up commit sha, distinct per `n`.
pub fn commit(n: u32) -> String {
    format!("{n:08x}{}", "c0ffee".repeat(6))
        .chars()
        .take(40)
        .collect()
}

/// A sandbox: `cache/` (HF_HUB_CACHE), `work/` (the current folder smelt runs in).
pub struct Hub {
    pub tmp: tempfile::TempDir,
}

impl Hub {
    pub fn new() -> Hub {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("cache")).unwrap();
        std::fs::create_dir_all(tmp.path().join("work")).unwrap();
        Hub { tmp }
    }
    pub fn cache(&self) -> PathBuf {
        self.tmp.path().join("cache")
    }
    pub fn work(&self) -> PathBuf {
        self.tmp.path().join("work")
    }
    pub fn repo(&self, id: &str) -> PathBuf {
        self.cache()
            .join(format!("models--{}", id.replace('/', "--")))
    }

    /// Puts every file of `src` into the cache as snapshot `sha` of `id`: each file's bytes
    /// in `blobs/<sha256>`, linked from `snapshots/<sha>/<name>` by `../../blobs/<sha256>`.
    pub fn add_snapshot(&self, id: &str, sha: &str, src: &Path) {
        let repo = self.repo(id);
        let blobs = repo.join("blobs");
        let snap = repo.join("snapshots").join(sha);
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::create_dir_all(&snap).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            if !e.file_type().unwrap().is_file() {
                continue;
            }
            let bytes = std::fs::read(e.path()).unwrap();
            let etag = sha256_hex(&bytes);
            let blob = blobs.join(&etag);
            if !blob.exists() {
                std::fs::write(&blob, &bytes).unwrap();
            }
            std::os::unix::fs::symlink(
                Path::new("../../blobs").join(&etag),
                snap.join(e.file_name()),
            )
            .unwrap();
        }
    }

    pub fn set_ref(&self, id: &str, name: &str, sha: &str) {
        let f = self.repo(id).join("refs").join(name);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, sha).unwrap();
    }

    /// `smelt ARGS` in `work/`, with the cache at `cache/`, no token, and an endpoint where
    /// nothing listens (a test that needs the network starts a server and sets its own).
    pub fn smelt(&self, args: &[&str]) -> Command {
        let mut c = smelt();
        c.current_dir(self.work())
            .env("HF_HUB_CACHE", self.cache())
            .env_remove("HF_HOME")
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_OFFLINE")
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .args(args);
        c
    }

    pub fn recipe(&self, name: &str, text: &str) -> PathBuf {
        let p = self.work().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `smelt merge RECIPE -o OUT` on the CPU with `env` added.
    pub fn merge(&self, recipe: &Path, out: &Path, env: &[(&str, &str)]) -> Output {
        let mut c = self.smelt(&["merge"]);
        c.arg(recipe).arg("-o").arg(out).args(cpu_args());
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }
}

pub fn linear(a: &str, b: &str) -> String {
    format!(
        "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n  - model: {b}\n    parameters: {{weight: 0.3}}\n"
    )
}

pub fn passthrough(a: &str) -> String {
    format!("merge_method: passthrough\nmodels:\n  - model: {a}\n")
}

/// Every file of a merge's output but the model card and the manifest (which quote the
/// recipe, and so the names the models were given by).
pub fn weights_and_side_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = dir_bytes(dir);
    assert!(
        m.remove("README.md").is_some(),
        "{} has no model card",
        dir.display()
    );
    assert!(
        m.remove("smelt-manifest.json").is_some(),
        "{} has no manifest",
        dir.display()
    );
    m
}

/// The output of a passthrough merge of the local folder `model`.
pub fn local_passthrough(h: &Hub, model: &Path) -> BTreeMap<String, Vec<u8>> {
    let name = model.file_name().unwrap().to_string_lossy().to_string();
    let r = h.recipe(
        &format!("local-{name}.yml"),
        &passthrough(&model.display().to_string()),
    );
    let out = h.tmp.path().join(format!("out-local-{name}"));
    ok(&h.merge(&r, &out, &[]));
    weights_and_side_files(&out)
}

/// Two outputs hold the same files with the same bytes; a difference is reported by name.
#[track_caller]
pub fn same(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>, what: &str) {
    let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(a), names(b), "{what}: different files");
    for (k, v) in a {
        if &b[k] != v {
            let show = |x: &[u8]| String::from_utf8_lossy(&x[..x.len().min(600)]).to_string();
            panic!("{what}: {k} differs:\n{}\n---\n{}", show(v), show(&b[k]));
        }
    }
}

pub fn ok(o: &Output) {
    assert!(o.status.success(), "smelt failed: {}", stderr(o));
}

/// A failed run: exit code 1, and the message holds each of `parts`.
pub fn fails_with(o: &Output, parts: &[&str]) -> String {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    for p in parts {
        assert!(e.contains(p), "message lacks {p:?}: {e}");
    }
    e
}

/// assets/models/chat written as shards (several `model-0000i-of-0000n.safetensors` and an
/// index) by a passthrough merge, in `dir`.
pub fn sharded_chat(h: &Hub, dir: &Path) {
    let r = h.recipe(
        "shard.yml",
        &passthrough(&assets("chat").display().to_string()),
    );
    let o = h
        .smelt(&["merge"])
        .arg(&r)
        .arg("-o")
        .arg(dir)
        .args(cpu_args())
        .args(["--out-shard-size", "100KB"])
        .output()
        .unwrap();
    ok(&o);
    let shards = std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            n.to_string_lossy().ends_with(".safetensors")
        })
        .count();
    assert!(shards >= 2, "expected several shards, got {shards}");
    assert!(dir.join("model.safetensors.index.json").is_file());
}

/// A merge through Hub ids (a single-file model and a sharded one, both only in the cache)
/// writes the same bytes as the same merge from local paths; the inputs in the cache are
/// untouched. The cache is used without any network (the endpoint is dead).
#[test]
fn cached_ids_merge_like_local_paths() {
    let h = Hub::new();
    let chat = h.tmp.path().join("chat-sharded");
    sharded_chat(&h, &chat);
    h.add_snapshot("testorg/base", &commit(1), &assets("base"));
    h.set_ref("testorg/base", "main", &commit(1));
    h.add_snapshot("testorg/chat", &commit(2), &chat);
    h.set_ref("testorg/chat", "main", &commit(2));
    let before = dir_bytes(&h.repo("testorg/chat").join("blobs"));

    let local = h.recipe(
        "local.yml",
        &linear(
            &assets("base").display().to_string(),
            &chat.display().to_string(),
        ),
    );
    let hub = h.recipe("hub.yml", &linear("testorg/base", "testorg/chat"));
    let (out_l, out_h) = (h.tmp.path().join("out-local"), h.tmp.path().join("out-hub"));
    ok(&h.merge(&local, &out_l, &[]));
    ok(&h.merge(&hub, &out_h, &[]));
    let (l, g) = (
        weights_and_side_files(&out_l),
        weights_and_side_files(&out_h),
    );
    assert!(l.contains_key("model.safetensors") && l.contains_key("tokenizer.json"));
    same(&l, &g, "Hub-id merge vs local");
    let card = std::fs::read_to_string(out_h.join("README.md")).unwrap();
    assert!(card.contains("`testorg/chat`"), "{card}");
    assert_eq!(before, dir_bytes(&h.repo("testorg/chat").join("blobs")));

    // the workaround: naming a sharded snapshot folder of the cache directly
    let snap = h.repo("testorg/chat").join("snapshots").join(commit(2));
    let direct = h.recipe(
        "direct.yml",
        &linear(
            &assets("base").display().to_string(),
            &snap.display().to_string(),
        ),
    );
    let out_d = h.tmp.path().join("out-direct");
    ok(&h.merge(&direct, &out_d, &[]));
    same(
        &l,
        &weights_and_side_files(&out_d),
        "snapshot folder vs local",
    );

    // `smelt inspect` takes an id too
    let o = h.smelt(&["inspect", "testorg/chat"]).output().unwrap();
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("testorg/chat:"));
}

/// Two snapshots with different weights: `@main` and a bare id read the ref `main`, `@v2`
/// the ref `v2`, `@<sha>` the snapshot itself; each merge equals the local one of the
/// weights that snapshot holds.
#[test]
fn revisions_by_branch_and_sha() {
    let h = Hub::new();
    let (s1, s2) = (commit(11), commit(12));
    h.add_snapshot("testorg/m", &s1, &assets("base"));
    h.add_snapshot("testorg/m", &s2, &assets("math"));
    h.set_ref("testorg/m", "main", &s1);
    h.set_ref("testorg/m", "v2", &s2);

    let local = h.recipe(
        "local.yml",
        &linear(
            &assets("base").display().to_string(),
            &assets("math").display().to_string(),
        ),
    );
    let out_l = h.tmp.path().join("out-local");
    ok(&h.merge(&local, &out_l, &[]));
    let want = weights_and_side_files(&out_l);
    for (i, (a, b)) in [
        ("testorg/m".to_string(), "testorg/m@v2".to_string()),
        ("testorg/m@main".to_string(), format!("testorg/m@{s2}")),
        (format!("testorg/m@{s1}"), "testorg/m@v2".to_string()),
    ]
    .iter()
    .enumerate()
    {
        let r = h.recipe(&format!("r{i}.yml"), &linear(a, b));
        let out = h.tmp.path().join(format!("out{i}"));
        ok(&h.merge(&r, &out, &[]));
        same(&want, &weights_and_side_files(&out), &format!("{a} + {b}"));
    }
    // the other order of the same snapshots gives another merge: the revision matters
    let r = h.recipe("swap.yml", &linear("testorg/m@v2", "testorg/m@main"));
    let out = h.tmp.path().join("out-swap");
    ok(&h.merge(&r, &out, &[]));
    assert_ne!(want, weights_and_side_files(&out));

    // an unknown revision, offline: named with the cache folder
    let r = h.recipe("v3.yml", &passthrough("testorg/m@v3"));
    let out = h.tmp.path().join("out-v3");
    let o = h.merge(&r, &out, &[("HF_HUB_OFFLINE", "1")]);
    let repo = h.repo("testorg/m").display().to_string();
    fails_with(&o, &["testorg/m@v3", &repo, "offline"]);
    assert!(!out.exists());
}

/// Offline: a cached id works with no server anywhere; an uncached one fails naming where
/// smelt looked (recipe folder, current folder, the cache folder) and that offline mode is
/// on, and writes nothing.
#[test]
fn offline_uses_the_cache_alone() {
    let h = Hub::new();
    h.add_snapshot("testorg/base", &commit(1), &assets("base"));
    h.set_ref("testorg/base", "main", &commit(1));
    let r = h.recipe("r.yml", &passthrough("testorg/base"));
    let out = h.tmp.path().join("out");
    ok(&h.merge(&r, &out, &[("HF_HUB_OFFLINE", "1")]));
    same(
        &local_passthrough(&h, &assets("base")),
        &weights_and_side_files(&out),
        "offline",
    );

    let sub = h.work().join("recipes");
    std::fs::create_dir_all(&sub).unwrap();
    let r = sub.join("r.yml");
    std::fs::write(&r, passthrough("testorg/absent")).unwrap();
    let before = std::fs::read(&r).unwrap();
    let out = h.tmp.path().join("out-absent");
    let o = h.merge(&r, &out, &[("HF_HUB_OFFLINE", "1")]);
    let cache_repo = h.repo("testorg/absent").display().to_string();
    let in_recipe = sub.join("testorg/absent").display().to_string();
    let in_cwd = h.work().join("testorg/absent").display().to_string();
    fails_with(
        &o,
        &[
            "models[0]",
            &in_recipe,
            &in_cwd,
            &cache_repo,
            "HF_HUB_OFFLINE=1",
        ],
    );
    assert!(!out.exists());
    assert_eq!(before, std::fs::read(&r).unwrap());

    // a name that is no Hub id: where it looked, and that it is not an id
    std::fs::write(&r, passthrough("absent")).unwrap();
    let o = h.merge(&r, &out, &[]);
    fails_with(
        &o,
        &["`absent` not found", "current folder", "not a Hub id"],
    );
    assert!(!out.exists());

    // the command line: current folder, then the cache
    let o = h
        .smelt(&["inspect", "testorg/absent"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    fails_with(&o, &["the model", &cache_repo, "offline"]);
}

/// A relative name that exists in two places is refused, naming both: a folder `org/name`
/// in the current folder and the cached id; a folder in the recipe's folder and in the
/// current folder. Nothing is written.
#[test]
fn ambiguous_names_are_refused() {
    let h = Hub::new();
    h.add_snapshot("testorg/base", &commit(1), &assets("base"));
    h.set_ref("testorg/base", "main", &commit(1));
    let local = h.work().join("testorg/base");
    copy_dir(&assets("base"), &local);
    let r = h.recipe("r.yml", &passthrough("testorg/base"));
    let out = h.tmp.path().join("out");
    let o = h.merge(&r, &out, &[]);
    let snap = h
        .repo("testorg/base")
        .join("snapshots")
        .join(commit(1))
        .display()
        .to_string();
    fails_with(
        &o,
        &[
            "ambiguous",
            &local.display().to_string(),
            &snap,
            "testorg/base@main",
        ],
    );
    assert!(!out.exists());
    let o = h.smelt(&["inspect", "testorg/base"]).output().unwrap();
    fails_with(&o, &["ambiguous", &local.display().to_string(), &snap]);

    // what the message offers works: `@main` for the Hub, an absolute path for the folder
    for (i, name) in ["testorg/base@main".to_string(), local.display().to_string()]
        .iter()
        .enumerate()
    {
        let r = h.recipe(&format!("r{i}.yml"), &passthrough(name));
        let out = h.tmp.path().join(format!("out{i}"));
        ok(&h.merge(&r, &out, &[]));
    }

    // recipe folder and current folder both hold `m`
    let sub = h.work().join("recipes");
    copy_dir(&assets("base"), &sub.join("m"));
    copy_dir(&assets("math"), &h.work().join("m"));
    let r = sub.join("r.yml");
    std::fs::write(&r, passthrough("m")).unwrap();
    let o = h.merge(&r, &out, &[]);
    fails_with(
        &o,
        &[
            "ambiguous",
            &sub.join("m").display().to_string(),
            &h.work().join("m").display().to_string(),
        ],
    );
    assert!(!out.exists());
    // a recipe in the current folder: one folder, no ambiguity; mergekit's habit of paths
    // from the current folder works for a recipe elsewhere
    std::fs::remove_dir_all(sub.join("m")).unwrap();
    ok(&h.merge(&r, &out, &[]));
    same(
        &local_passthrough(&h, &assets("math")),
        &weights_and_side_files(&out),
        "the folder in the current folder",
    );
}

/// Links in a cache snapshot may point anywhere inside the model's repository folder
/// (`models--org--name`), not outside it: a weights file, a shard or a config linked to a
/// file elsewhere is refused, naming the link; nothing is written.
#[test]
fn cache_links_must_stay_in_the_repository() {
    let h = Hub::new();
    let outside = h.tmp.path().join("outside");
    copy_dir(&assets("base"), &outside);
    let chat = h.tmp.path().join("chat-sharded");
    sharded_chat(&h, &chat);
    let shard = std::fs::read_dir(&chat)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .find(|n| n.starts_with("model-0000") && n.ends_with(".safetensors"))
        .unwrap();
    for (id, file, src) in [
        ("testorg/evil1", "model.safetensors", assets("base")),
        ("testorg/evil2", shard.as_str(), chat.clone()),
        ("testorg/evil3", "config.json", assets("base")),
    ] {
        h.add_snapshot(id, &commit(5), &src);
        h.set_ref(id, "main", &commit(5));
        let link = h.repo(id).join("snapshots").join(commit(5)).join(file);
        let target = if file == "config.json" {
            outside.join("config.json")
        } else {
            outside.join("model.safetensors")
        };
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let r = h.recipe("r.yml", &passthrough(id));
        let out = h.tmp.path().join("out");
        let o = h.merge(&r, &out, &[]);
        fails_with(
            &o,
            &[
                file,
                &target.display().to_string(),
                "outside the model's repository folder",
            ],
        );
        assert!(!out.exists(), "{id}");
    }
}

/// `BASE+ADAPTER` and `adapters:` with Hub ids on either side merge like local paths, and
/// so do `lora apply` and `lora extract` given ids.
#[test]
fn adapters_by_hub_id() {
    let h = Hub::new();
    let peft = root().join("tests/fixtures/peft");
    h.add_snapshot("testorg/peft-base", &commit(7), &peft.join("base"));
    h.set_ref("testorg/peft-base", "main", &commit(7));
    h.add_snapshot("testorg/lora-a", &commit(8), &peft.join("lora_a"));
    h.set_ref("testorg/lora-a", "main", &commit(8));
    let (b, a) = (peft.join("base"), peft.join("lora_a"));
    let local = h.recipe(
        "local.yml",
        &passthrough(&format!("{}+{}", b.display(), a.display())),
    );
    let out_l = h.tmp.path().join("out-local");
    ok(&h.merge(&local, &out_l, &[]));
    let want = weights_and_side_files(&out_l);
    let recipes = [
        passthrough("testorg/peft-base+testorg/lora-a"),
        passthrough(&format!("testorg/peft-base+{}", a.display())),
        format!(
            "{}    adapters: [testorg/lora-a]\n",
            passthrough("testorg/peft-base@main")
        ),
    ];
    for (i, text) in recipes.iter().enumerate() {
        let r = h.recipe(&format!("r{i}.yml"), text);
        let out = h.tmp.path().join(format!("out{i}"));
        ok(&h.merge(&r, &out, &[]));
        same(&want, &weights_and_side_files(&out), text);
    }
    // the command line: `lora apply BASE ADAPTER` and `lora extract BASE TUNED` by id
    let out = h.tmp.path().join("out-apply");
    let o = h
        .smelt(&["lora", "apply", "testorg/peft-base", "testorg/lora-a", "-o"])
        .arg(&out)
        .args(cpu_args())
        .output()
        .unwrap();
    ok(&o);
    same(&want, &weights_and_side_files(&out), "lora apply by id");
    h.add_snapshot("testorg/peft-tuned", &commit(9), &out);
    h.set_ref("testorg/peft-tuned", "main", &commit(9));
    let mut extracted = Vec::new();
    for (i, (b, t)) in [
        (
            "testorg/peft-base".to_string(),
            "testorg/peft-tuned".to_string(),
        ),
        (
            peft.join("base").display().to_string(),
            out.display().to_string(),
        ),
    ]
    .iter()
    .enumerate()
    {
        let dir = h.tmp.path().join(format!("extract{i}"));
        let o = h
            .smelt(&["lora", "extract", b, t, "--rank", "4", "-o"])
            .arg(&dir)
            .args(cpu_args())
            .output()
            .unwrap();
        ok(&o);
        extracted.push(std::fs::read(dir.join("adapter_model.safetensors")).unwrap());
    }
    assert!(
        extracted[0] == extracted[1],
        "lora extract by id differs from local paths"
    );

    // an adapter id that is nowhere, offline
    let r = h.recipe("bad.yml", &passthrough("testorg/peft-base+testorg/lora-z"));
    let out = h.tmp.path().join("out-bad");
    let o = h.merge(&r, &out, &[("HF_HUB_OFFLINE", "1")]);
    fails_with(&o, &["MODEL+LORA_ADAPTER", "testorg/lora-z", "offline"]);
    assert!(!out.exists());
}

// ---- downloads ---------------------------------------------------------------------------

pub fn files_of(dir: &Path) -> Vec<ServedFile> {
    let mut v: Vec<ServedFile> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| ServedFile {
            name: e.file_name().to_string_lossy().to_string(),
            bytes: std::fs::read(e.path()).unwrap(),
            corrupt: false,
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Downloads from a server speaking the Hub's protocol, whose first answer for every
/// weights file breaks off mid-file: the merge resumes them with Range requests, its output
/// equals the local merge, the cache holds byte-identical blobs in the standard layout
/// (no `.incomplete` left, relative links, refs/main), `.bin` weights beside safetensors are
/// never fetched, and afterwards the same merge runs offline from the cache.
#[test]
fn downloads_resume_and_fill_the_cache() {
    let h = Hub::new();
    let chat = h.tmp.path().join("chat-sharded");
    sharded_chat(&h, &chat);
    let mut base_files = files_of(&assets("base"));
    base_files.push(ServedFile {
        name: "pytorch_model.bin".into(),
        bytes: vec![7u8; 1000],
        corrupt: false,
    });
    let server = Server::start(true);
    server.add("testorg/base", "main", &commit(21), base_files);
    server.add("testorg/chat", "main", &commit(22), files_of(&chat));
    let endpoint = server.endpoint();

    let local = h.recipe(
        "local.yml",
        &linear(
            &assets("base").display().to_string(),
            &chat.display().to_string(),
        ),
    );
    let out_l = h.tmp.path().join("out-local");
    ok(&h.merge(&local, &out_l, &[]));
    let want = weights_and_side_files(&out_l);

    let hub = h.recipe("hub.yml", &linear("testorg/base", "testorg/chat"));
    let out = h.tmp.path().join("out-hub");
    ok(&h.merge(&hub, &out, &[("HF_ENDPOINT", &endpoint)]));
    same(&want, &weights_and_side_files(&out), "downloaded");

    let log = server.log();
    assert!(
        !log.iter().any(|r| r.path.ends_with(".bin")),
        "fetched .bin: {log:?}"
    );
    assert!(
        log.iter().any(|r| r.range.is_some()),
        "no request resumed with Range: {log:?}"
    );
    assert!(
        log.iter().any(|r| r.path.starts_with("/cdn/")),
        "no redirect followed"
    );

    // the cache, in the standard layout, byte for byte
    for (id, sha, src) in [
        ("testorg/base", commit(21), assets("base")),
        ("testorg/chat", commit(22), chat.clone()),
    ] {
        let repo = h.repo(id);
        assert_eq!(
            std::fs::read_to_string(repo.join("refs/main")).unwrap(),
            sha
        );
        let snap = repo.join("snapshots").join(&sha);
        for f in files_of(&src) {
            let link = snap.join(&f.name);
            if f.name == "README.md" || f.name == "smelt-manifest.json" {
                // not needed by a merge: never fetched
                assert!(
                    !link.exists() && !link.is_symlink(),
                    "{id}: fetched {}",
                    f.name
                );
                continue;
            }
            let target = std::fs::read_link(&link).unwrap();
            assert!(
                target.is_relative() && target.starts_with("../../blobs"),
                "{target:?}"
            );
            assert_eq!(std::fs::read(&link).unwrap(), f.bytes, "{id} {}", f.name);
            if f.name.ends_with(".safetensors") {
                assert_eq!(
                    target.file_name().unwrap().to_string_lossy(),
                    sha256_hex(&f.bytes)
                );
            }
        }
        let leftovers: Vec<_> = std::fs::read_dir(repo.join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".incomplete"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
    assert!(!h
        .repo("testorg/base")
        .join("snapshots")
        .join(commit(21))
        .join("pytorch_model.bin")
        .exists());

    // offline afterwards, with the server gone: the same output
    drop(server);
    let out2 = h.tmp.path().join("out-offline");
    ok(&h.merge(
        &hub,
        &out2,
        &[("HF_HUB_OFFLINE", "1"), ("HF_ENDPOINT", &endpoint)],
    ));
    same(&want, &weights_and_side_files(&out2), "offline");
}

/// A file whose content does not match the sha256 the Hub announces is refused, naming the
/// file; the download is deleted, nothing is linked and no output is written.
#[test]
fn wrong_sha256_is_refused() {
    let h = Hub::new();
    let mut files = files_of(&assets("base"));
    for f in &mut files {
        if f.name == "model.safetensors" {
            f.corrupt = true;
        }
    }
    let server = Server::start(false);
    server.add("testorg/bad", "main", &commit(31), files);
    let r = h.recipe("r.yml", &passthrough("testorg/bad"));
    let out = h.tmp.path().join("out");
    let o = h.merge(&r, &out, &[("HF_ENDPOINT", &server.endpoint())]);
    fails_with(
        &o,
        &["testorg/bad", "model.safetensors", "sha256", "deleted"],
    );
    assert!(!out.exists());
    let blobs = h.repo("testorg/bad").join("blobs");
    let names: Vec<String> = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    let good = sha256_hex(&std::fs::read(assets("base").join("model.safetensors")).unwrap());
    assert!(
        !names.iter().any(|n| n.starts_with(&good)),
        "the bad download was kept: {names:?}"
    );
    assert!(!h
        .repo("testorg/bad")
        .join("snapshots")
        .join(commit(31))
        .join("model.safetensors")
        .exists());
    // refs/main is not written for a failed download
    assert!(!h.repo("testorg/bad").join("refs/main").exists());
}

/// A repository the server does not have, and a private one without and with HF_TOKEN
/// (whose weights are redirected to another host, which never sees the token).
#[test]
fn missing_and_private_repositories() {
    let h = Hub::new();
    let server = Server::start(false);
    server.add(
        "testorg/base",
        "main",
        &commit(41),
        files_of(&assets("base")),
    );
    server.require_token("testorg/base", "sekrit");
    // the weights live on another host, as the Hub's do
    let cdn = Server::start(false);
    cdn.add("storage/x", "main", &commit(41), files_of(&assets("base")));
    server.redirect_lfs_to(&cdn.endpoint());
    let ep = server.endpoint();
    let out = h.tmp.path().join("out");

    let r = h.recipe("r.yml", &passthrough("testorg/nope"));
    let o = h.merge(&r, &out, &[("HF_ENDPOINT", &ep)]);
    fails_with(&o, &["testorg/nope", "HTTP 404", &ep]);
    assert!(!out.exists());

    let r = h.recipe("p.yml", &passthrough("testorg/base"));
    let o = h.merge(&r, &out, &[("HF_ENDPOINT", &ep)]);
    fails_with(&o, &["testorg/base", "HTTP 401", "HF_TOKEN"]);
    assert!(!out.exists());
    ok(&h.merge(&r, &out, &[("HF_ENDPOINT", &ep), ("HF_TOKEN", "sekrit")]));
    same(
        &local_passthrough(&h, &assets("base")),
        &weights_and_side_files(&out),
        "with a token",
    );
    // the token goes to the endpoint's host only, never to the storage host
    assert!(server
        .log()
        .iter()
        .any(|r| r.token.as_deref() == Some("sekrit")));
    let stored = cdn.log();
    assert!(
        stored.iter().any(|r| r.path.starts_with("/cdn/")),
        "{stored:?}"
    );
    assert!(stored.iter().all(|r| r.token.is_none()), "{stored:?}");
}
