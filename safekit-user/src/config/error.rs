//! Errors of the configuration. Each one names the file, the line, the dotted
//! key (`heart.pulse`, `vip.rule[0].proto`, `node[1].addrs.default`) and says
//! what is allowed; a file reports every error found, not just the first.

use std::{
    fmt,
    ops::Range,
    path::{Path, PathBuf},
};

/// One error in one configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, as given to [`super::load`] or the `parse_*` functions.
    pub file: PathBuf,
    /// 1-based line; `None` when the error is about the file as a whole
    /// (unreadable, a missing top-level key).
    pub line: Option<usize>,
    /// Dotted key path, e.g. `vip.rule[0].proto`; empty when the error is
    /// about the file as a whole.
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for ConfigError {
    /// `{file}:{line}: {key}: {message}`; the line and key are left out when
    /// there is none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every error found in a configuration (at least one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", one_per_line(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The errors, in file then line order.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    /// How many errors.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true for errors returned by this module.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

fn one_per_line(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Collects the errors of one file; turns byte offsets into lines.
#[derive(Debug)]
pub(super) struct Diag {
    file: PathBuf,
    line_starts: Vec<usize>,
    errors: Vec<ConfigError>,
}

impl Diag {
    pub(super) fn new(file: &Path, text: &str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            file: file.to_path_buf(),
            line_starts,
            errors: Vec::new(),
        }
    }

    /// 1-based line of a byte offset.
    pub(super) fn line(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&start| start <= offset)
    }

    /// Line of a span; `None` for the empty span toml gives the root table.
    pub(super) fn span_line(&self, span: &Range<usize>) -> Option<usize> {
        (span.end > 0).then(|| self.line(span.start))
    }

    /// Records an error at `span` (its first line).
    pub(super) fn error(
        &mut self,
        span: Option<&Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let line = span.and_then(|s| self.span_line(s));
        self.error_at_line(line, key, message);
    }

    pub(super) fn error_at_line(
        &mut self,
        line: Option<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line,
            key: key.into(),
            message: message.into(),
        });
    }

    /// Whether an error was already recorded at `key` or below it (a bad
    /// value removed during parsing must not also be reported as missing).
    pub(super) fn has_error_at(&self, key: &str) -> bool {
        self.errors.iter().any(|e| {
            e.key == key
                || e.key
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        })
    }

    /// Records "missing required key", at the line of the enclosing table,
    /// unless the key was present with a bad value.
    pub(super) fn missing(&mut self, table: Option<&Range<usize>>, key: &str, allowed: &str) {
        if !self.has_error_at(key) {
            self.error(table, key, format!("missing required key; {allowed}"));
        }
    }

    pub(super) fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    pub(super) fn into_errors(mut self) -> Vec<ConfigError> {
        self.errors.sort_by_key(|e| e.line.unwrap_or(0));
        self.errors
    }
}
