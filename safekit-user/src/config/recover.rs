//! Deserializes a TOML document into a raw serde struct while reporting
//! *every* unknown key and bad value, not just the first.
//!
//! serde stops at the first error. We parse the document once into a spanned
//! tree ([`DeTable`]); then deserialize; on an error, we find the innermost
//! key or array element whose span holds the error's span, report it under its
//! dotted path (computed on the original tree, so array indices stay those of
//! the file), remove it from a working copy and try again. Every bad entry is
//! reported once, and what is left deserializes.

use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::{
    Spanned,
    de::{DeArray, DeTable, DeValue, Deserializer},
};

use super::error::Diag;

/// Enough for any real file; guards against an error we cannot localise
/// twice in a row.
const MAX_ROUNDS: usize = 1000;

/// Deserializes `text` into `T`, recording every error in `diag`. Returns
/// `None` on a TOML syntax error (one error, with its line) or when an error
/// cannot be located.
pub(super) fn deserialize<T: DeserializeOwned>(text: &str, diag: &mut Diag) -> Option<T> {
    let original = match DeTable::parse(text) {
        Ok(t) => t,
        Err(e) => {
            let span = e.span();
            let key = span
                .as_ref()
                .map(|s| guess_key(text, s.start))
                .unwrap_or_default();
            diag.error(
                span.as_ref(),
                key,
                format!("TOML syntax error: {}", e.message().trim_end()),
            );
            return None;
        }
    };
    let mut work = original.clone();
    for _ in 0..MAX_ROUNDS {
        match T::deserialize(Deserializer::from(work.clone())) {
            Ok(v) => return Some(v),
            Err(e) => {
                let message = polish(e.message());
                let Some(span) = e.span() else {
                    diag.error(None, "", message);
                    return None;
                };
                let key = path_at(original.get_ref(), &span).unwrap_or_default();
                let message = if message.contains("invalid type: table, expected an array") {
                    format!("{message} (write [[{key}]] before each entry)")
                } else {
                    message
                };
                diag.error(Some(&span), key, message);
                if !remove_at(work.get_mut(), &span) {
                    return None;
                }
            }
        }
    }
    None
}

/// Makes serde's wording a little more about TOML.
fn polish(message: &str) -> String {
    let m = message.trim_end();
    let m = m.replace("invalid type: map,", "invalid type: table,");
    let m = m.replace("expected a sequence", "expected an array");
    let m = m.replace("expected a boolean", "expected true or false");
    if let Some(rest) = m.strip_prefix("unknown field ") {
        // "unknown field `x`, expected one of `a`, `b`" -> "unknown key ..., allowed keys: ..."
        return match rest.split_once(", expected ") {
            Some((field, allowed)) => format!(
                "unknown key {field}; allowed keys: {}",
                allowed.trim_start_matches("one of ")
            ),
            None => format!("unknown key {rest}"),
        };
    }
    if let Some(rest) = m.strip_prefix("unknown variant ") {
        return match rest.split_once(", expected ") {
            Some((value, allowed)) => format!(
                "unknown value {value}; allowed: {}",
                allowed.trim_start_matches("one of ")
            ),
            None => format!("unknown value {rest}"),
        };
    }
    m
}

fn holds(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end && outer.start < outer.end
}

/// A key as it would be written in a dotted path.
fn key_segment(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        k.to_owned()
    } else {
        format!("{k:?}")
    }
}

fn join(prefix: &str, segment: &str) -> String {
    if prefix.is_empty() {
        segment.to_owned()
    } else if segment.starts_with('[') {
        format!("{prefix}{segment}")
    } else {
        format!("{prefix}.{segment}")
    }
}

/// Dotted path of the innermost key or element of `table` holding `span`.
fn path_at(table: &DeTable<'_>, span: &Range<usize>) -> Option<String> {
    for (k, v) in table {
        let here = key_segment(k.get_ref());
        if holds(&k.span(), span) {
            return Some(here);
        }
        if let Some(deeper) = value_path_at(v, span) {
            return Some(join(&here, &deeper));
        }
        if holds(&v.span(), span) {
            return Some(here);
        }
    }
    None
}

/// Path below `v` (relative to it) of what holds `span`; `None` if nothing
/// below `v` holds it.
fn value_path_at(v: &Spanned<DeValue<'_>>, span: &Range<usize>) -> Option<String> {
    match v.get_ref() {
        DeValue::Table(t) => path_at(t, span),
        DeValue::Array(a) => a.iter().enumerate().find_map(|(i, el)| {
            let here = format!("[{i}]");
            if let Some(deeper) = value_path_at(el, span) {
                Some(join(&here, &deeper))
            } else if holds(&el.span(), span) {
                Some(here)
            } else {
                None
            }
        }),
        _ => None,
    }
}

/// Removes the innermost key or element of `table` holding `span`.
fn remove_at(table: &mut DeTable<'_>, span: &Range<usize>) -> bool {
    let mut target = None;
    for (k, v) in table.iter_mut() {
        if holds(&k.span(), span) {
            target = Some(k.get_ref().to_string());
            break;
        }
        if remove_in_value(v, span) {
            return true;
        }
        if holds(&v.span(), span) {
            target = Some(k.get_ref().to_string());
            break;
        }
    }
    match target {
        Some(k) => table.remove(k.as_str()).is_some(),
        None => false,
    }
}

fn remove_in_value(v: &mut Spanned<DeValue<'_>>, span: &Range<usize>) -> bool {
    match v.get_mut() {
        DeValue::Table(t) => remove_at(t, span),
        DeValue::Array(a) => {
            let mut drop = None;
            for (i, el) in a.iter_mut().enumerate() {
                if remove_in_value(el, span) {
                    return true;
                }
                if holds(&el.span(), span) {
                    drop = Some(i);
                    break;
                }
            }
            let Some(i) = drop else { return false };
            let kept: DeArray<'_> = std::mem::replace(a, DeArray::new())
                .into_iter()
                .enumerate()
                .filter_map(|(j, el)| (j != i).then_some(el))
                .collect();
            *a = kept;
            true
        }
        _ => false,
    }
}

/// Best guess of the dotted key on the line of a syntax error: the last
/// `[table]` or `[[array]]` header above it and the key before `=`.
fn guess_key(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    if !text.is_char_boundary(offset) {
        return String::new();
    }
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = text[line_start..line_end].trim();
    let mut table = String::new();
    // Next index of each array of tables.
    let mut counts: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for l in text[..line_start].lines().map(str::trim) {
        if let Some(h) = l.strip_prefix("[[").and_then(|h| h.split_once("]]")) {
            let name = h.0.trim().to_owned();
            let next = counts.entry(name.clone()).or_insert(0);
            table = format!("{name}[{next}]");
            *next += 1;
        } else if let Some(h) = l.strip_prefix('[').and_then(|h| h.split_once(']')) {
            h.0.trim().clone_into(&mut table);
        }
    }
    let key = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| {
        !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.\"' ".contains(&b))
    });
    match key {
        Some(k) => join(&table, k),
        None => table,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[expect(dead_code, reason = "only deserialized")]
    struct Doc {
        a: Option<u32>,
        list: Option<Vec<u32>>,
        t: Option<Vec<Inner>>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[expect(dead_code, reason = "only deserialized")]
    struct Inner {
        x: Option<String>,
    }

    #[test]
    fn every_bad_entry_is_reported_with_its_original_path() {
        let text =
            "a = 'x'\nlist = [1, 'a', 2, 'b']\nzzz = 1\n[[t]]\nx = 1\n[[t]]\ny = 2\nx = 'ok'\n";
        let mut diag = Diag::new(Path::new("f.toml"), text);
        let doc: Option<Doc> = deserialize(text, &mut diag);
        assert!(doc.is_some());
        let errs = diag.into_errors();
        let got: Vec<(Option<usize>, &str)> =
            errs.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (Some(1), "a"),
                (Some(2), "list[1]"),
                (Some(2), "list[3]"),
                (Some(3), "zzz"),
                (Some(5), "t[0].x"),
                (Some(7), "t[1].y"),
            ],
            "{errs:?}"
        );
        assert!(
            errs[3].message.contains("allowed keys"),
            "{}",
            errs[3].message
        );
    }

    #[test]
    fn syntax_error_names_line_and_key() {
        let text = "[heart]\npulse = 700ms\n";
        let mut diag = Diag::new(Path::new("f.toml"), text);
        assert!(deserialize::<Doc>(text, &mut diag).is_none());
        let errs = diag.into_errors();
        assert_eq!(errs.len(), 1);
        assert_eq!(
            (errs[0].line, errs[0].key.as_str()),
            (Some(2), "heart.pulse")
        );
    }
}
