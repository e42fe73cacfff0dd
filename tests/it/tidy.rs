//! The tidy test (rust-analyzer's `xtask/src/tidy.rs` habit): the structure cannot rot silently.
//!
//! - Every `.rs` file of the workspace opens with a `//!` paragraph saying what lives there.
//! - `src/` is layered (the table in [`LAYERS`], as in `ARCHITECTURE.md`): a module imports only
//!   from its own layer or those below it.
//! - No two modules import each other, directly or through others: the graph of `crate::` and
//!   `super::` references between the files of `src/` has no cycle (a parent module naming its
//!   own children — declaring or re-exporting them — is not an import).
//!
//! Imports are read from the source text: every `crate::a::b` and `super::a::b` path outside
//! comments (`super::` only before a file's `#[cfg(test)]` module, where it means the file).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers of `src/`, top to bottom: a module may import from its own row or any row below.
/// Two modules in one row may import each other in one direction only (the cycle check).
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["node"],
    &["api"],
    &["projection", "replication", "verify"],
    &["log"],
    &["scribe", "genesis", "hlc", "identity", "pb"],
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            files.push(path);
        }
    }
}

#[test]
fn every_file_opens_with_a_doc_paragraph() {
    let mut files = Vec::new();
    for dir in ["src", "projections", "tests", "benches", "examples"] {
        rust_files(&root().join(dir), &mut files);
    }
    assert!(files.len() > 50, "found only {} files", files.len());
    let missing: Vec<String> = files
        .iter()
        .filter(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            !text.trim_start().starts_with("//!")
        })
        .map(|path| path.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "these files have no `//!` paragraph at the top saying what lives there: {missing:?}"
    );
}

/// A module path of `src/` (`["log", "store"]`), from its file.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|part| part.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts
        .last()
        .is_some_and(|last| last == "mod" || last == "lib")
    {
        parts.pop();
    }
    parts
}

/// The code of a line, without its `//` comment (string literals holding `//` are rare enough in
/// import lines not to matter).
fn code(line: &str) -> &str {
    match line.find("//") {
        Some(at) => &line[..at],
        None => line,
    }
}

/// Every path a line names after `prefix` (`crate::` or `super::`), as segments; a braced group
/// (`crate::{a, b::c}`) gives one path per member.
fn paths_after(line: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().last();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `mycrate::`, not `crate::`
        }
        let mut prefix_segments = Vec::new();
        let mut tail = rest;
        loop {
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let segment = &tail[..end];
            if segment.is_empty() {
                break;
            }
            prefix_segments.push(segment.to_string());
            tail = &tail[end..];
            if let Some(next) = tail.strip_prefix("::") {
                tail = next;
            } else {
                break;
            }
        }
        if tail.starts_with('{') {
            let close = tail.find('}').unwrap_or(tail.len());
            for member in tail[1..close].split(',') {
                let mut path = prefix_segments.clone();
                path.extend(
                    member
                        .trim()
                        .split("::")
                        .map(|segment| segment.split_whitespace().next().unwrap_or("").to_string())
                        .filter(|segment| !segment.is_empty() && segment != "self"),
                );
                found.push(path);
            }
        } else if !prefix_segments.is_empty() {
            found.push(prefix_segments);
        }
    }
    found
}

/// The longest module of `modules` that `path` starts with.
fn resolve(modules: &BTreeSet<Vec<String>>, path: &[String]) -> Option<Vec<String>> {
    (1..=path.len())
        .rev()
        .map(|length| path[..length].to_vec())
        .find(|candidate| modules.contains(candidate))
}

/// Module → the modules it imports.
type Graph = BTreeMap<Vec<String>, BTreeSet<Vec<String>>>;

/// Module → the modules it imports (never itself or its own descendants).
fn import_graph() -> Graph {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.retain(|file| !file.starts_with(src.join("bin")));
    let modules: BTreeSet<Vec<String>> = files.iter().map(|file| module_of(&src, file)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        // `super` is the module above this one, for `x/y.rs` and `x/y/mod.rs` alike.
        let parent: Vec<String> = module[..module.len().saturating_sub(1)].to_vec();
        let text = std::fs::read_to_string(file).unwrap();
        let mut imports = BTreeSet::new();
        let mut in_tests = false;
        for line in text.lines() {
            // In the `#[cfg(test)]` module that ends a file, `super::` means the file itself.
            in_tests |= line.trim_start().starts_with("#[cfg(test)]");
            let line = code(line);
            let mut paths = paths_after(line, "crate::");
            if !in_tests {
                for relative in paths_after(line, "super::") {
                    let mut path = parent.clone();
                    path.extend(relative);
                    paths.push(path);
                }
            }
            for path in paths {
                if let Some(target) = resolve(&modules, &path) {
                    if target != module && !target.starts_with(&module) {
                        imports.insert(target);
                    }
                }
            }
        }
        graph.insert(module, imports);
    }
    graph
}

fn layer_of(module: &[String]) -> Option<usize> {
    let top = module.first()?;
    LAYERS.iter().position(|row| row.contains(&top.as_str()))
}

#[test]
fn every_top_level_module_has_a_layer() {
    let graph = import_graph();
    let unplaced: Vec<String> = graph
        .keys()
        .filter(|module| !module.is_empty() && layer_of(module).is_none())
        .map(|module| module.join("::"))
        .collect();
    assert!(
        unplaced.is_empty(),
        "add these modules to LAYERS in tests/it/tidy.rs (and to ARCHITECTURE.md): {unplaced:?}"
    );
}

#[test]
fn every_crate_path_names_a_module() {
    // An alias (`pub(crate) use x as y`) would hide an import from the checks: refuse it.
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let graph = import_graph();
    let top: BTreeSet<&str> = graph
        .keys()
        .filter_map(|module| module.first().map(String::as_str))
        .collect();
    let mut unknown = BTreeSet::new();
    for file in &files {
        for line in std::fs::read_to_string(file).unwrap().lines() {
            for path in paths_after(code(line), "crate::") {
                let first = path.first().map(String::as_str).unwrap_or("");
                if !top.contains(first) && first != "projection_api" {
                    unknown.insert(format!("{}: crate::{}", file.display(), path.join("::")));
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "paths through something that is not a module of src/ (an alias?): {unknown:#?}"
    );
}

/// Every import of `graph` from a higher layer, as "a imports b".
fn upward_imports(graph: &Graph) -> Vec<String> {
    let mut upward = Vec::new();
    for (module, imports) in graph {
        let Some(layer) = layer_of(module) else {
            continue;
        };
        for target in imports {
            if layer_of(target).is_some_and(|target_layer| target_layer < layer) {
                upward.push(format!(
                    "{} imports {}",
                    module.join("::"),
                    target.join("::")
                ));
            }
        }
    }
    upward
}

/// Every cycle a depth-first search of `graph` closes, as "a -> b -> a".
fn cycles(graph: &Graph) -> Vec<String> {
    fn visit(
        module: &Vec<String>,
        graph: &Graph,
        state: &mut BTreeMap<Vec<String>, u8>,
        stack: &mut Vec<Vec<String>>,
        cycles: &mut Vec<String>,
    ) {
        state.insert(module.clone(), 1);
        stack.push(module.clone());
        for next in graph.get(module).into_iter().flatten() {
            match state.get(next).copied().unwrap_or(0) {
                0 => visit(next, graph, state, stack, cycles),
                1 => {
                    let start = stack.iter().position(|entry| entry == next).unwrap();
                    let mut cycle: Vec<String> = stack[start..]
                        .iter()
                        .map(|entry| entry.join("::"))
                        .collect();
                    cycle.push(next.join("::"));
                    cycles.push(cycle.join(" -> "));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(module.clone(), 2);
    }
    let mut state = BTreeMap::new();
    let mut found = Vec::new();
    for module in graph.keys() {
        if state.get(module).copied().unwrap_or(0) == 0 {
            visit(module, graph, &mut state, &mut Vec::new(), &mut found);
        }
    }
    found
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let upward = upward_imports(&import_graph());
    assert!(
        upward.is_empty(),
        "imports from a higher layer (move the shared code down, or hand it in): {upward:#?}"
    );
}

#[test]
fn no_two_modules_import_each_other() {
    let found = cycles(&import_graph());
    assert!(found.is_empty(), "module cycles: {found:#?}");
}

#[test]
fn the_checks_catch_what_they_must() {
    let module = |path: &str| path.split("::").map(str::to_string).collect::<Vec<_>>();
    let graph: Graph = [
        ("log::store", vec!["api::status", "scribe"]),
        ("api::kv", vec!["api::served", "log"]),
        ("api::served", vec!["api::kv"]),
        ("scribe", vec![]),
    ]
    .into_iter()
    .map(|(from, to)| (module(from), to.into_iter().map(module).collect()))
    .collect();
    assert_eq!(
        upward_imports(&graph),
        vec!["log::store imports api::status"]
    );
    assert_eq!(cycles(&graph), vec!["api::kv -> api::served -> api::kv"]);
}

#[test]
fn the_import_reader_sees_what_it_must() {
    // The checks above are only as good as this reader: pin it on the shapes the code uses.
    assert_eq!(
        paths_after("use crate::log::{store::StoreError, Log};", "crate::"),
        vec![
            vec!["log".to_string(), "store".into(), "StoreError".into()],
            vec!["log".to_string(), "Log".into()]
        ]
    );
    assert_eq!(
        paths_after("    let x = crate::scribe::hash(&bytes);", "crate::"),
        vec![vec!["scribe".to_string(), "hash".into()]]
    );
    assert!(paths_after("use quire_projection_api::Kind;", "crate::").is_empty());
    assert!(paths_after("use mycrate::x;", "crate::").is_empty());
    let graph = import_graph();
    let api = graph
        .get(&vec!["api".to_string(), "router".into()])
        .unwrap();
    assert!(
        api.contains(&vec!["api".to_string(), "http".into()]),
        "the router imports the HTTP router: {api:?}"
    );
    let log = graph.get(&vec!["log".to_string()]).unwrap();
    assert!(
        log.contains(&vec!["scribe".to_string()]),
        "the log imports the scribe: {log:?}"
    );
}
