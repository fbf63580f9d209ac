//! The driver's modules import each other without a circle: each is built only on
//! those below it (leaves such as `outbox` and `io`, then the `registry`, the public
//! `handle`s, the application's `hooks`, and the loops on top), so a module can be
//! read, tested and changed knowing only what it imports.
//!
//! Read from the source: every `crate::module` path outside comments, between the
//! crate's top-level modules (a folder is one module).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// The top-level module each source file belongs to, and the source.
fn sources() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(&src).expect("under src");
                let first = relative.components().next().expect("a component");
                let name = first.as_os_str().to_string_lossy();
                let module = name.trim_end_matches(".rs").to_owned();
                files.push((module, fs::read_to_string(&path).expect("read")));
            }
        }
    }
    files
}

/// The modules `source` names as `crate::module`, comments left out.
fn imports(source: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `crate::Type` names a re-export of the crate's root, not a module.
            if name.starts_with(|c: char| c.is_ascii_lowercase()) {
                found.insert(name);
            }
        }
        // `use crate::{a, b::c}`: the modules listed in braces.
        if let Some(list) = code.trim().strip_prefix("use crate::{") {
            for item in list.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name.starts_with(|c: char| c.is_ascii_lowercase()) {
                    found.insert(name);
                }
            }
        }
    }
    found
}

/// A circle through `from`, if the graph has one.
fn circle(
    graph: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(start) = path.iter().position(|m| m == from) {
        let mut found = path[start..].to_vec();
        found.push(from.to_owned());
        return Some(found);
    }
    if done.contains(from) {
        return None;
    }
    path.push(from.to_owned());
    for next in graph.get(from).into_iter().flatten() {
        if let Some(found) = circle(graph, next, path, done) {
            return Some(found);
        }
    }
    path.pop();
    done.insert(from.to_owned());
    None
}

#[test]
fn the_modules_import_each_other_without_a_circle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, source) in sources() {
        // The crate root re-exports everything: it sits above every module.
        if module == "lib" {
            continue;
        }
        let edges = graph.entry(module.clone()).or_default();
        edges.extend(imports(&source).into_iter().filter(|m| *m != module));
    }
    assert!(graph.contains_key("registry") && graph.contains_key("hooks"));
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        if let Some(found) = circle(&graph, module, &mut Vec::new(), &mut done) {
            panic!("an import circle: {}", found.join(" -> "));
        }
    }
}

#[test]
fn the_reading_of_imports_finds_paths_and_lists() {
    let source = "use crate::registry::{Registry, lock};\nuse crate::{hooks, io::Io};\n// crate::server\nlet x = crate::outbox::Outbox::new(1); crate::RedisFailure";
    let found: Vec<String> = imports(source).into_iter().collect();
    assert_eq!(found, ["hooks", "io", "outbox", "registry"]);
}
