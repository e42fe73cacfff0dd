//! The tidy test (rust-analyzer's `xtask/src/tidy.rs` habit): the structure cannot rot silently.
//!
//! - Every `.rs` file of the workspace opens with a `//!` paragraph saying what lives there.
//! - `src/` is layered (the table in [`LAYERS`], as in `ARCHITECTURE.md`): a module imports only
//!   from its own layer or those below it.
//! - No two modules import each other, directly or through others: the graph of `crate::` and
//!   `super::` references between the files of `src/` has no cycle. A module and its own
//!   submodules are one part (a parent declares, re-exports and drives its children, which use
//!   its types), so references between them are not counted; references between siblings are.
//!
//! Imports are read from the source text with comments and literals blanked out: every
//! `crate::…` and `super::…` path tree, `use` groups of any depth and over any lines included
//! (`super::` inside a `#[cfg(test)] mod` means the file itself and is skipped).

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
    &[
        "scribe",
        "genesis",
        "membership",
        "hlc",
        "identity",
        "pb",
        "net",
        "fds",
    ],
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

/// The code of a file with its comments and string and char literals blanked out (newlines
/// kept, so positions and lines stay where they were).
fn strip(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                blank(&mut out, chars[i]);
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !chars[..i]
                .last()
                .is_some_and(|c| c.is_alphanumeric() || *c == '_')
        {
            // A raw string: r"…", r#"…"#, …
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            while j < chars.len() {
                if chars[j] == '"' && (1..=hashes).all(|k| chars.get(j + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for &skipped in &chars[i..j.min(chars.len())] {
                blank(&mut out, skipped);
            }
            i = j;
        } else if c == '"' {
            blank(&mut out, c);
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
                if i < chars.len() {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
            if i < chars.len() {
                blank(&mut out, chars[i]);
                i += 1;
            }
        } else if c == '\'' && (chars.get(i + 2) == Some(&'\'') || next == Some('\\')) {
            // A char literal ('x', '\n', '\u{..}'), not a lifetime.
            let mut j = i + 1;
            if chars.get(j) == Some(&'\\') {
                j += 2;
            } else {
                j += 1;
            }
            while j < chars.len() && chars[j] != '\'' {
                j += 1;
            }
            for &skipped in &chars[i..(j + 1).min(chars.len())] {
                blank(&mut out, skipped);
            }
            i = j + 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// The byte ranges of `code` (already [`strip`]ped) that are the bodies of `#[cfg(test)] mod …
/// { … }` modules: inside them `super::` means the file itself.
fn test_modules(code: &str) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find("#[cfg(test)]") {
        let start = from + at + "#[cfg(test)]".len();
        from = start;
        let rest = code[start..].trim_start();
        if !(rest.starts_with("mod ") || rest.starts_with("pub mod ")) {
            continue;
        }
        let Some(open) = code[start..].find('{').map(|offset| start + offset) else {
            break;
        };
        let mut depth = 0;
        for (offset, c) in code[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        ranges.push(open..open + offset);
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    ranges
}

/// Skips whitespace.
fn skip_space(code: &str, at: usize) -> usize {
    at + code[at..].len() - code[at..].trim_start().len()
}

/// Reads the path tree that starts at `at` (just after `crate::` or `super::`): segments joined
/// by `::`, where a `{ … }` group branches into one path per member, nested as deep as it goes.
/// Adds every path (prefixed by `prefix`) to `found`; returns where the tree ends.
fn read_tree(code: &str, mut at: usize, prefix: &[String], found: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix.to_vec();
    loop {
        at = skip_space(code, at);
        if code[at..].starts_with('{') {
            at += 1;
            loop {
                at = skip_space(code, at);
                if code[at..].starts_with('}') {
                    return at + 1;
                }
                if at >= code.len() {
                    return at;
                }
                at = read_tree(code, at, &path, found);
                at = skip_space(code, at);
                if code[at..].starts_with(',') {
                    at += 1;
                }
            }
        }
        let end = code[at..]
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .map_or(code.len(), |offset| at + offset);
        let segment = &code[at..end];
        if segment.is_empty() {
            // `*` (a glob) or the end: the path so far.
            if code[at..].starts_with('*') {
                at += 1;
            }
            found.push(path);
            return at;
        }
        if segment != "self" {
            path.push(segment.to_string());
        }
        at = skip_space(code, end);
        if code[at..].starts_with("::") {
            at += 2;
        } else {
            found.push(path);
            return at;
        }
    }
}

/// Every path `code` (already [`strip`]ped) names after `prefix` (`crate::` or `super::`), as
/// segments, with the position where it starts; a `use` group gives one path per member.
fn paths_after(code: &str, prefix: &str) -> Vec<(usize, Vec<String>)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(offset) = code[from..].find(prefix) {
        let at = from + offset;
        from = at + prefix.len();
        if code[..at]
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            continue; // `mycrate::`, not `crate::`
        }
        let mut paths = Vec::new();
        from = read_tree(code, from, &[], &mut paths).max(from);
        found.extend(paths.into_iter().map(|path| (at, path)));
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
        let code = strip(&std::fs::read_to_string(file).unwrap());
        let tests = test_modules(&code);
        let mut paths: Vec<Vec<String>> = paths_after(&code, "crate::")
            .into_iter()
            .map(|(_, path)| path)
            .collect();
        for (at, relative) in paths_after(&code, "super::") {
            if tests.iter().any(|range| range.contains(&at)) {
                continue;
            }
            let mut path = parent.clone();
            path.extend(relative);
            paths.push(path);
        }
        let mut imports = BTreeSet::new();
        for path in paths {
            if let Some(target) = resolve(&modules, &path) {
                if target != module && !target.starts_with(&module) {
                    imports.insert(target);
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
        let code = strip(&std::fs::read_to_string(file).unwrap());
        if code.contains("crate as ") {
            unknown.insert(format!("{}: an alias of `crate`", file.display()));
        }
        for (_, path) in paths_after(&code, "crate::") {
            let first = path.first().map(String::as_str).unwrap_or("");
            if !top.contains(first) && first != "projection_api" {
                unknown.insert(format!("{}: crate::{}", file.display(), path.join("::")));
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
    let read = |text: &str, prefix: &str| -> Vec<String> {
        paths_after(&strip(text), prefix)
            .into_iter()
            .map(|(_, path)| path.join("::"))
            .collect()
    };
    assert_eq!(
        read("use crate::log::{store::StoreError, Log};", "crate::"),
        ["log::store::StoreError", "log::Log"]
    );
    // rustfmt's multi-line groups, nested groups, `self` and globs.
    assert_eq!(
        read(
            "use crate::projection::{\n    runner::{self, X},\n    slot::*,\n};",
            "crate::"
        ),
        [
            "projection::runner",
            "projection::runner::X",
            "projection::slot"
        ]
    );
    assert_eq!(
        read(
            "use super::{\n    committer::Overlay,\n    Shared,\n};",
            "super::"
        ),
        ["committer::Overlay", "Shared"]
    );
    assert_eq!(
        read("    let x = crate::scribe::hash(&bytes);", "crate::"),
        ["scribe::hash"]
    );
    // A `//` inside a string does not hide what follows; comments and strings are not code.
    assert_eq!(
        read(
            r#"format!("http://{}", crate::api::x()); // crate::cli"#,
            "crate::"
        ),
        ["api::x"]
    );
    assert!(read("/* crate::cli::x */ let s = \"crate::cli\";", "crate::").is_empty());
    assert!(read("let s = r#\"crate::cli\"#;", "crate::").is_empty());
    assert!(read("use quire_projection_api::Kind;", "crate::").is_empty());
    assert!(read("use mycrate::x;", "crate::").is_empty());
    // `super::` in a test module means the file itself; elsewhere the parent.
    let code = strip("use super::a;\n#[cfg(test)]\nmod tests {\n    use super::*;\n}\n");
    let tests = test_modules(&code);
    let outside: Vec<usize> = paths_after(&code, "super::")
        .into_iter()
        .map(|(at, _)| at)
        .filter(|at| !tests.iter().any(|range| range.contains(at)))
        .collect();
    assert_eq!(
        outside,
        [4],
        "only the `use super::a` before the test module"
    );
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
