//! One log per module (`/var/log/safekit/<AM>.log`): what the daemon decided,
//! script output, and `safekit printi/printe` lines, each stamped.

use std::{
    fs::OpenOptions,
    io::Write as _,
    path::{Path, PathBuf},
    time::SystemTime,
};

/// Severity letter written in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Information (`I`).
    Info,
    /// Error (`E`).
    Error,
}

/// Appends lines to a module log. Opening per line keeps the file usable by
/// several writers (daemon, scripts via `safekit printi`) with `O_APPEND`.
#[derive(Debug, Clone)]
pub struct ModuleLog {
    path: PathBuf,
}

impl ModuleLog {
    /// Log at `path` (created on first write).
    #[must_use]
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// Path of the file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one stamped line; a failure to log is reported on stderr and
    /// never stops the daemon.
    pub fn line(&self, level: Level, msg: &str) {
        if let Err(e) = append_line(&self.path, level, msg) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write module log");
        }
    }

    /// Information line.
    pub fn info(&self, msg: &str) {
        self.line(Level::Info, msg);
    }

    /// Error line.
    pub fn error(&self, msg: &str) {
        self.line(Level::Error, msg);
    }
}

/// Appends one stamped line to `path`, creating parents as needed.
pub fn append_line(path: &Path, level: Level, msg: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let stamp = humantime::format_rfc3339_millis(SystemTime::now());
    let letter = match level {
        Level::Info => 'I',
        Level::Error => 'E',
    };
    let mut text = String::new();
    for l in msg.lines() {
        use std::fmt::Write as _;
        let _ = writeln!(text, "{stamp} | {letter} | {l}");
    }
    if text.is_empty() {
        text = format!("{stamp} | {letter} |\n");
    }
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(text.as_bytes())
}
