// Copyright The clearlog authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Rust source read as text, for the checks of [`crate::structure`] and [`crate::unsafe_index`]:
//! comments and literals blanked, function declarations found. A heuristic, not a parser, exact
//! enough for this workspace's code.

/// `text` with comments, string and char literals replaced by spaces (lines kept).
pub(crate) fn blank(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    out.extend(b"  ");
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    out.extend(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(if b[i] == b'\n' { b'\n' } else { b' ' });
                    i += 1;
                }
            }
        } else if let Some(len) = raw_string_len(rest) {
            out.extend(
                rest[..len]
                    .iter()
                    .map(|&c| if c == b'\n' { b'\n' } else { b' ' }),
            );
            i += len;
        } else if b[i] == b'"' {
            out.push(b'"');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                let n = if b[i] == b'\\' { 2 } else { 1 };
                for k in 0..n.min(b.len() - i) {
                    out.push(if b[i + k] == b'\n' { b'\n' } else { b' ' });
                }
                i += n;
            }
            out.push(b'"');
            i += 1;
        } else if b[i] == b'\'' && char_literal_len(rest).is_some() {
            let len = char_literal_len(rest).unwrap_or(1);
            out.extend(std::iter::repeat_n(b' ', len));
            i += len;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The length of a raw string literal (`r"..."`, `r#"..."#`, `br"..."`) at the start of `s`.
fn raw_string_len(s: &[u8]) -> Option<usize> {
    let start = if s.starts_with(b"br") {
        2
    } else if s.starts_with(b"r") {
        1
    } else {
        return None;
    };
    let hashes = s[start..].iter().take_while(|&&c| c == b'#').count();
    if s.get(start + hashes) != Some(&b'"') {
        return None;
    }
    let close: Vec<u8> = std::iter::once(b'"')
        .chain(std::iter::repeat_n(b'#', hashes))
        .collect();
    let body = start + hashes + 1;
    s[body..]
        .windows(close.len())
        .position(|w| w == close.as_slice())
        .map(|p| body + p + close.len())
}

/// The length of a char literal (`'a'`, `'\n'`, `'\''`) at the start of `s` (not a lifetime).
fn char_literal_len(s: &[u8]) -> Option<usize> {
    match s.get(1)? {
        b'\\' => s.iter().skip(2).position(|&c| c == b'\'').map(|p| p + 3),
        _ => {
            let ch = std::str::from_utf8(&s[1..s.len().min(6)])
                .ok()
                .or_else(|| {
                    (2..6)
                        .rev()
                        .find_map(|n| std::str::from_utf8(s.get(1..n)?).ok())
                })?;
            let c = ch.chars().next()?;
            let after = 1 + c.len_utf8();
            (s.get(after) == Some(&b'\'')).then_some(after + 1)
        }
    }
}

/// The function a line declares, if it does (`pub(crate) unsafe fn name`, `const fn`, ...).
pub(crate) fn fn_name(line: &str) -> Option<String> {
    let mut words = line.split_whitespace().peekable();
    while let Some(w) = words.next() {
        let w = w.split('(').next().unwrap_or(w);
        match w {
            "pub" | "const" | "unsafe" | "async" | "extern" | "default" => continue,
            // `extern "C"`, whose literal is blanked to quotes around spaces.
            _ if w.starts_with("pub(") || w.chars().all(|c| c == '"') || w == "\"C\"" => continue,
            "fn" => {
                let name: String = words
                    .next()?
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                return (!name.is_empty()).then_some(name);
            }
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blanking_keeps_lines_and_drops_literals() {
        let b = blank("let a = 'x'; // crate::b\nlet s = r#\"crate::c\"#; /* crate::d */ let l: &'static str;\n");
        assert!(!b.contains("crate::"), "{b}");
        assert!(b.contains("&'static str"));
        assert_eq!(b.lines().count(), 2);
    }
}
