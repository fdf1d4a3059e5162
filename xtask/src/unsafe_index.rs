// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! UNSAFE.md against the code (a step of `cargo xtask structure`): every `unsafe` of the
//! repository (block, `unsafe fn`, `unsafe impl`, `unsafe trait`) has a row in UNSAFE.md that names
//! its file and its item (the function around a block, the `unsafe fn` itself, `impl Send for
//! RawGuestRam`), and no row is keyed by a line number (they drift). A row names an item in
//! backticks: `` `read` ``, `` `Thing::read` `` or `` `unsafe impl Send for W` ``.
//!
//! `cargo xtask unsafe-sites` prints the sites, one `path item` per line.

use std::path::{Path, PathBuf};

use crate::source_text::{blank, fn_name};

/// Directories never searched.
const SKIP_DIRS: [&str; 3] = ["target", ".git", "node_modules"];

/// One `unsafe` of the code: its file (relative to the workspace root) and item.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Site {
    pub(crate) path: String,
    pub(crate) item: String,
}

/// Every `unsafe` site of the `.rs` files under `root`.
pub(crate) fn sites(root: &Path) -> Result<Vec<Site>, String> {
    let mut out = Vec::new();
    for f in rs_files(root).map_err(|e| format!("{}: {e}", root.display()))? {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        let path = f.strip_prefix(root).unwrap_or(&f).display().to_string();
        for item in file_sites(&text) {
            out.push(Site {
                path: path.clone(),
                item,
            });
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn rs_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        if p.is_dir() {
            if !name.is_some_and(|n| SKIP_DIRS.contains(&n.as_str())) {
                out.extend(rs_files(&p)?);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// The items of one file's `unsafe` sites (comments and literals do not count).
fn file_sites(text: &str) -> Vec<String> {
    let blanked = blank(text);
    // The functions open around the current line: name and the brace depth inside them.
    let mut open: Vec<(String, i64)> = Vec::new();
    let mut pending_fn: Option<String> = None;
    let mut depth = 0i64;
    let mut out = Vec::new();
    for line in blanked.lines() {
        if let Some(name) = fn_name(line) {
            pending_fn = Some(name);
        }
        if has_unsafe(line) {
            out.push(item_of(line, pending_fn.as_deref(), &open));
        }
        for c in line.chars() {
            match c {
                '{' => {
                    depth += 1;
                    if let Some(name) = pending_fn.take() {
                        open.push((name, depth));
                    }
                }
                '}' => {
                    if open.last().is_some_and(|(_, d)| *d == depth) {
                        open.pop();
                    }
                    depth -= 1;
                }
                // A declaration without a body (`unsafe fn f();` in a trait).
                ';' if pending_fn.is_some() && !line.contains('{') => pending_fn = None,
                _ => {}
            }
        }
    }
    out
}

/// Does the line hold the keyword `unsafe` (not `unsafe_code`, `unsafe_op_in_unsafe_fn`)?
fn has_unsafe(line: &str) -> bool {
    let b = line.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    line.match_indices("unsafe")
        .any(|(i, _)| (i == 0 || !word(b[i - 1])) && b.get(i + 6).is_none_or(|&c| !word(c)))
}

/// The item an `unsafe` on `line` belongs to.
fn item_of(line: &str, declared_fn: Option<&str>, open: &[(String, i64)]) -> String {
    let t = line.trim_start();
    let t = t
        .strip_prefix("pub(crate) ")
        .or_else(|| t.strip_prefix("pub "))
        .unwrap_or(t);
    if let Some(rest) = t.strip_prefix("unsafe impl") {
        // `unsafe impl<T> Send for X<T> {` -> `impl Send for X<T>`
        let rest = rest.trim_start();
        let rest = match rest.strip_prefix('<') {
            Some(r) => r.split_once('>').map_or(r, |(_, after)| after),
            None => rest,
        };
        return format!("impl {}", rest.split('{').next().unwrap_or(rest).trim());
    }
    if let Some(rest) = t.strip_prefix("unsafe trait ") {
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        return format!("trait {name}");
    }
    if let (true, Some(name)) = (t.contains("unsafe fn "), declared_fn) {
        return name.to_string();
    }
    match open.last() {
        Some((name, _)) => name.clone(),
        None => "(file scope)".to_string(),
    }
}

/// Problems of UNSAFE.md (`doc`) against `sites`: a site no row names, a row keyed by a line
/// number.
pub(crate) fn check(doc: &str, sites: &[Site]) -> Vec<String> {
    let mut problems = Vec::new();
    for (n, line) in doc.lines().enumerate() {
        if has_line_number(line) {
            problems.push(format!(
                "UNSAFE.md:{}: a location keyed by a line number (name the item instead)",
                n + 1
            ));
        }
    }
    for s in sites {
        let named = doc.lines().any(|l| {
            l.starts_with('|')
                && l.contains(&s.path)
                && [
                    format!("`{}`", s.item),
                    format!("::{}`", s.item),
                    format!(" {}`", s.item),
                ]
                .iter()
                .any(|key| l.contains(key))
        });
        if !named {
            problems.push(format!(
                "{}: `unsafe` in `{}` has no row in UNSAFE.md naming `{}` and `{}`",
                s.path, s.item, s.path, s.item
            ));
        }
    }
    problems
}

/// `foo.rs:12` or `foo.rs:12,30`.
fn has_line_number(line: &str) -> bool {
    line.match_indices(".rs:").any(|(i, _)| {
        line[i + 4..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CODE: &str = r#"
unsafe trait Pod {}
unsafe impl Pod for u64 {}
unsafe impl<T: Send> Send for Wrapper<T> {}
/// `unsafe` in a comment does not count.
#[deny(unsafe_op_in_unsafe_fn)]
pub(crate) unsafe fn raw(p: *const u8) -> u8 {
    // SAFETY: the caller's.
    unsafe { *p }
}
impl Thing {
    fn read(&self) -> u8 {
        let s = "unsafe";
        if true {
            // SAFETY: fine.
            unsafe { raw(self.p) }
        } else {
            0
        }
    }
    fn after(&self) {}
}
fn outer() {
    let x = unsafe { f() };
}
"#;

    #[test]
    fn finds_every_site_and_its_item() {
        assert_eq!(
            file_sites(CODE),
            [
                "trait Pod",
                "impl Pod for u64",
                "impl Send for Wrapper<T>",
                "raw",
                "raw",
                "read",
                "outer"
            ]
        );
    }

    #[test]
    fn unsafe_md_rows_name_file_and_item() {
        let sites = [
            Site {
                path: "a/src/x.rs".into(),
                item: "read".into(),
            },
            Site {
                path: "a/src/x.rs".into(),
                item: "impl Send for W".into(),
            },
        ];
        let doc = "| 1 | `a/src/x.rs` (`Thing::read`, `impl Send for W`) | block | ... |\n";
        assert!(check(doc, &sites).is_empty());
        let stale = "| 1 | `a/src/x.rs:12` (`Thing::read`) | block | ... |\n";
        let problems = check(stale, &sites);
        assert_eq!(problems.len(), 2, "{problems:?}"); // a line number, and no `impl Send for W`
    }
}
