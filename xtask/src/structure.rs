// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `cargo xtask structure` (also a step of `cargo xtask test`): the shape of the source files.
//!
//! - **No import circle between files** of a crate: file A naming an item of file B (`use crate::b::..`,
//!   `crate::b::f()`, `super::..`, or an item the crate root re-exports from B) while B, directly
//!   or through other files, names one of A's. A module's own submodules are not counted (a parent
//!   declares them); anything else is.
//! - **No function over [`MAX_FN_LINES`] lines**, from its signature to its closing brace.
//! - **UNSAFE.md names every `unsafe`** by file and item, never by line number
//!   ([`crate::unsafe_index`]).
//!
//! The check reads the files as text (comments and string literals blanked first): a heuristic,
//! not a parser, exact enough for this workspace's code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::source_text::{blank, fn_name};

/// The crates checked: directory, and whether the crate root is `src/main.rs`.
const CRATES: &[(&str, &str)] = &[
    ("bitmap", "lib.rs"),
    ("memory-api", "lib.rs"),
    ("kvm-accel", "lib.rs"),
    ("kvm-accel/test-guest", "lib.rs"),
    ("migration", "lib.rs"),
    ("vmm-cli", "main.rs"),
    ("xtask", "main.rs"),
];

/// The longest function allowed, in lines.
pub const MAX_FN_LINES: usize = 100;

/// Functions allowed to be longer, and why (none: the engine's long functions were split with
/// the session rewrite).
const LONG_FN_EXCEPTIONS: &[(&str, &str)] = &[];

/// `cargo xtask structure`.
pub fn structure(root: &Path) -> Result<(), String> {
    let mut problems = Vec::new();
    for (dir, crate_root) in CRATES {
        let src = root.join(dir).join("src");
        let files = rust_files(&src).map_err(|e| format!("{}: {e}", src.display()))?;
        let mut sources = BTreeMap::new();
        for f in &files {
            let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
            let rel = f.strip_prefix(root).unwrap_or(f).display().to_string();
            for (name, line, len) in long_functions(&text) {
                if !LONG_FN_EXCEPTIONS.contains(&(rel.as_str(), name.as_str())) {
                    problems.push(format!(
                        "{rel}:{line}: fn {name} is {len} lines (at most {MAX_FN_LINES})"
                    ));
                }
            }
            sources.insert(module_path(&src, f, crate_root), blank(&text));
        }
        for cycle in import_cycles(&sources) {
            problems.push(format!(
                "{dir}: files import each other in a circle: {cycle}"
            ));
        }
    }
    let sites = crate::unsafe_index::sites(root)?;
    let unsafe_md = root.join("UNSAFE.md");
    let doc =
        std::fs::read_to_string(&unsafe_md).map_err(|e| format!("{}: {e}", unsafe_md.display()))?;
    problems.extend(crate::unsafe_index::check(&doc, &sites));
    if problems.is_empty() {
        println!(
            "structure: no import circle between files, no function over {MAX_FN_LINES} lines ({} known exceptions), UNSAFE.md names all {} unsafe sites by item",
            LONG_FN_EXCEPTIONS.len(),
            sites.len()
        );
        Ok(())
    } else {
        for p in &problems {
            eprintln!("structure: {p}");
        }
        Err(format!("{} structure problem(s)", problems.len()))
    }
}

fn rust_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(rust_files(&p)?);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// A file's module path (`["system", "topology"]`; the crate root is `[]`).
fn module_path(src: &Path, file: &Path, crate_root: &str) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    if parts.len() == 1 && parts[0] == crate_root.trim_end_matches(".rs") {
        parts.clear();
    }
    parts
}

/// Functions longer than [`MAX_FN_LINES`]: name, first line, length.
fn long_functions(text: &str) -> Vec<(String, usize, usize)> {
    let blanked = blank(text);
    let lines: Vec<&str> = blanked.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = fn_name(line) else {
            continue;
        };
        let (mut depth, mut opened) = (0i64, false);
        for (j, l) in lines.iter().enumerate().skip(i) {
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    ';' if !opened && depth == 0 => break,
                    _ => {}
                }
            }
            if (!opened && l.trim_end().ends_with(';')) || (opened && depth <= 0) {
                let len = j - i + 1;
                if opened && len > MAX_FN_LINES {
                    out.push((name.clone(), i + 1, len));
                }
                break;
            }
        }
    }
    out
}

/// The names a module's file re-exports (`pub use module::{A, B}`), by the module they come from.
fn reexports(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stmt in text.split(';') {
        let t = stmt.trim();
        let Some(rest) = t
            .strip_prefix("pub use ")
            .or_else(|| t.strip_prefix("pub(crate) use "))
            .map(|r| r.trim_start_matches("self::"))
        else {
            continue;
        };
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        for item in items.trim_matches(|c| c == '{' || c == '}').split(',') {
            let name = item.rsplit(" as ").next().unwrap_or(item);
            let name = name.rsplit("::").next().unwrap_or(name).trim();
            if !name.is_empty() {
                out.insert(name.to_string(), module.trim().to_string());
            }
        }
    }
    out
}

/// Every `crate::a::b` / `super::a` path of a file (use groups expanded), as segments relative
/// to the crate root.
fn paths(module: &[String], text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let prefix = ["crate::", "super::"]
            .into_iter()
            .find(|p| rest.starts_with(p));
        let boundary = i == 0
            || !(bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b':');
        let Some(prefix) = prefix.filter(|_| boundary) else {
            i += 1;
            continue;
        };
        let mut base: Vec<String> = if prefix == "crate::" {
            Vec::new()
        } else {
            module[..module.len().saturating_sub(1)].to_vec()
        };
        let mut j = i + prefix.len();
        // `super::super::`
        while text[j..].starts_with("super::") {
            base.pop();
            j += "super::".len();
        }
        let (segs, end) = segments(&text[j..]);
        let mut p = base.clone();
        p.extend(segs.iter().cloned());
        let group = if text[j + end..].starts_with("::{") {
            Some(j + end + 3)
        } else {
            (end == 0 && text[j..].starts_with('{')).then_some(j + 1)
        };
        if let Some(group_start) = group {
            let group_end = matching_brace(&text[group_start - 1..])
                .map_or(text.len(), |e| group_start - 1 + e);
            for item in split_top(&text[group_start..group_end]) {
                let (more, _) = segments(item.trim());
                let mut q = p.clone();
                q.extend(more);
                out.push(q);
            }
            i = group_end;
        } else {
            i = j + end;
        }
        out.push(p);
    }
    out
}

/// The `a::b::c` identifiers at the start of `s`, and where they end.
fn segments(s: &str) -> (Vec<String>, usize) {
    let mut segs = Vec::new();
    let mut i = 0;
    loop {
        let ident: String = s[i..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if ident.is_empty() {
            break;
        }
        i += ident.len();
        segs.push(ident);
        if s[i..].starts_with("::")
            && s[i + 2..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
        {
            i += 2;
        } else {
            break;
        }
    }
    (segs, i)
}

/// The index of the brace closing the one `s` starts with.
fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// `s` split at the commas outside braces.
fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// The file (module) a path names: the longest module prefix, or the module a re-export of the
/// next segment comes from.
fn resolve(
    path: &[String],
    modules: &BTreeSet<Vec<String>>,
    reexports: &BTreeMap<Vec<String>, BTreeMap<String, String>>,
) -> Vec<String> {
    let mut cur: Vec<String> = Vec::new();
    for seg in path {
        let mut next = cur.clone();
        next.push(seg.clone());
        if modules.contains(&next) {
            cur = next;
            continue;
        }
        if let Some(from) = reexports.get(&cur).and_then(|r| r.get(seg)) {
            let mut target = cur.clone();
            target.push(from.clone());
            if modules.contains(&target) {
                return target;
            }
        }
        break;
    }
    cur
}

/// The import circles between the files of one crate, each as `a -> b -> a`.
fn import_cycles(sources: &BTreeMap<Vec<String>, String>) -> Vec<String> {
    let modules: BTreeSet<Vec<String>> = sources.keys().cloned().collect();
    let reexports: BTreeMap<Vec<String>, BTreeMap<String, String>> = sources
        .iter()
        .map(|(m, t)| (m.clone(), reexports(t)))
        .collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (m, text) in sources {
        let targets = edges.entry(m.clone()).or_default();
        for p in paths(m, text) {
            let t = resolve(&p, &modules, &reexports);
            // The crate root and a module's own submodules are no import of it.
            if t.is_empty() || t == *m || t.starts_with(m) {
                continue;
            }
            targets.insert(t);
        }
    }
    strongly_connected(&edges)
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|c| {
            let names: Vec<String> = c.iter().map(|m| m.join("/")).collect();
            format!("{} -> {}", names.join(" -> "), names[0])
        })
        .collect()
}

/// Tarjan's strongly connected components.
fn strongly_connected(
    edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
) -> Vec<Vec<Vec<String>>> {
    struct T<'a> {
        edges: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        on: BTreeSet<&'a Vec<String>>,
        out: Vec<Vec<Vec<String>>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a Vec<String>) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        for w in t.edges.get(v).into_iter().flatten() {
            if !t.edges.contains_key(w) {
                continue;
            }
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            comp.reverse();
            t.out.push(comp);
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_of(files: &[(&str, &str)]) -> BTreeMap<Vec<String>, String> {
        files
            .iter()
            .map(|(m, t)| {
                let path = if m.is_empty() {
                    Vec::new()
                } else {
                    m.split('/').map(String::from).collect()
                };
                (path, blank(t))
            })
            .collect()
    }

    #[test]
    fn a_circle_through_a_reexport_is_found_and_a_parent_child_pair_is_not() {
        let files = crate_of(&[
            (
                "",
                "mod a; mod b; mod c; pub use a::Thing; pub use c::{Other, More};",
            ),
            ("a", "use crate::b::helper; pub struct Thing;"),
            ("b", "pub fn helper() { let _ = crate::Other; }"),
            ("c", "use crate::Thing; pub struct Other; pub struct More;"),
            ("d", "mod e; use e::X;"),
            ("d/e", "use super::super::b; pub struct X;"),
        ]);
        let cycles = import_cycles(&files);
        assert_eq!(cycles, ["a -> b -> c -> a"], "{cycles:?}");
        let one_way = crate_of(&[
            ("", "mod a; mod b;"),
            ("a", "use crate::b::f;"),
            ("b", "pub fn f() {}"),
        ]);
        assert!(import_cycles(&one_way).is_empty());
        let groups = crate_of(&[
            ("", "mod a; mod b;"),
            ("a", "use crate::{b::{f, g}, x};"),
            ("b", "// use crate::a::nothing;\nconst S: &str = \"crate::a::no\"; pub fn f() { super::a::h() }"),
        ]);
        assert_eq!(
            import_cycles(&groups).len(),
            1,
            "super:: counts, comments and strings do not"
        );
    }

    #[test]
    fn long_functions_are_measured_from_signature_to_brace() {
        let mut text = String::from("pub(crate) fn long(\n    a: u32,\n) -> u32 {\n");
        text += &"    let _ = \"}\";\n".repeat(MAX_FN_LINES);
        text += "    a\n}\nfn short() {}\ntrait T { fn decl(&self); }\n";
        assert_eq!(
            long_functions(&text),
            [("long".to_string(), 1, MAX_FN_LINES + 5)]
        );
        assert_eq!(
            fn_name("    pub unsafe fn set_memslot<'a>("),
            Some("set_memslot".into())
        );
        assert_eq!(fn_name("let fn_name = 3;"), None);
        assert_eq!(
            fn_name("extern \"C\" fn kick(_: i32) {"),
            Some("kick".into())
        );
    }
}
