//! The crate's layering, checked: no import cycle between top-level modules, and `io` at the
//! bottom (it may use `dtype` and `error` only). docs/ARCHITECTURE.md draws the picture.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module name -> the `.rs` files that make it up.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        // the binary's own modules are not part of the library
        if name == "main" || name == "lib" || name == "cli" {
            continue;
        }
        let mut files = Vec::new();
        if p.is_dir() {
            walk(&p, &mut files);
        } else if p.extension().is_some_and(|x| x == "rs") {
            files.push(p);
        } else {
            continue;
        }
        m.entry(name).or_insert_with(Vec::new).extend(files);
    }
    m
}

/// Code without `//` comments (doc links name modules without depending on them).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a piece of code names as `crate::x` or inside `crate::{x, y::z}`.
fn named(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(inner) = rest.strip_prefix('{') {
            // a braced group: the first identifier of each top-level item
            let (mut depth, mut start, mut end) = (0usize, 0usize, inner.len());
            for (k, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        end = k;
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(inner[start..k].trim_start()));
                        start = k + 1;
                    }
                    _ => {}
                }
            }
            out.insert(ident(inner[start..end].trim_start()));
        } else {
            out.insert(ident(rest));
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    mods.iter()
        .map(|(m, files)| {
            let deps = files
                .iter()
                .flat_map(|f| named(&code(&std::fs::read_to_string(f).unwrap())))
                .filter(|d| d != m && mods.contains_key(d))
                .collect();
            (m.clone(), deps)
        })
        .collect()
}

/// A cycle through `start`, if there is one.
fn cycle(g: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn dfs(
        g: &BTreeMap<String, BTreeSet<String>>,
        at: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for d in &g[at] {
            if d == start {
                path.push(d.clone());
                return true;
            }
            if seen.insert(d.clone()) {
                path.push(d.clone());
                if dfs(g, d, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    dfs(g, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn the_parser_sees_paths_and_groups() {
    let c = code("use crate::io::model::X; // crate::plan\nuse crate::{dtype::DType, error::{Error, Result}};\nlet x = crate::rng::Stream::new();");
    let n: Vec<String> = named(&c).into_iter().collect();
    assert_eq!(n, ["dtype", "error", "io", "rng"]);
}

#[test]
fn no_cycle_between_top_level_modules() {
    let g = graph();
    assert!(g.contains_key("io") && g.contains_key("methods") && g.contains_key("plan"));
    for m in g.keys() {
        if let Some(c) = cycle(&g, m) {
            panic!("import cycle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn io_is_at_the_bottom() {
    let g = graph();
    let above: Vec<&String> = g["io"]
        .iter()
        .filter(|d| !["dtype", "error"].contains(&d.as_str()))
        .collect();
    assert!(above.is_empty(), "io uses {above:?}");
}
