//! `logview` (alias `log`), `printi`, `printe`: module logs.

use std::{
    io::{BufRead as _, Read as _, Seek as _, Write as _},
    os::unix::fs::MetadataExt as _,
    path::Path,
    time::Duration,
};

use super::EXIT_USAGE;
use crate::{modlog, paths::Paths};

/// `safekit logview -m AM [-n N] [-f]`.
#[derive(clap::Args, Debug)]
pub struct LogArgs {
    /// Module name.
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
    /// Only the last N lines.
    #[arg(short = 'n', long)]
    pub lines: Option<usize>,
    /// Then follow the log: print lines as they are written, until
    /// interrupted (a rotated log is followed into its new file).
    #[arg(short = 'f', long)]
    pub follow: bool,
}

/// How often `-f` looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// `safekit printi|printe -m AM MESSAGE...`.
#[derive(clap::Args, Debug)]
pub struct PrintArgs {
    /// Module name.
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
    /// The message.
    #[arg(required = true)]
    pub message: Vec<String>,
}

pub(super) fn show(paths: &Paths, args: &LogArgs) -> i32 {
    if let Err(code) = configured(paths, &args.module) {
        return code;
    }
    let path = paths.module_log(&args.module);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let from = args.lines.map_or(0, |n| lines.len().saturating_sub(n));
            let mut out = std::io::stdout().lock();
            for l in &lines[from..] {
                if writeln!(out, "{l}").is_err() {
                    return 0;
                }
            }
            let _ = out.flush();
            drop(out);
            if args.follow {
                return follow(&path, text.len() as u64);
            }
            0
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && args.follow => follow(&path, 0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "safekit: module {:?} has logged nothing yet ({})",
                args.module,
                path.display()
            );
            0
        }
        Err(e) => {
            eprintln!(
                "safekit: cannot read the log of module {:?} ({}): {e}",
                args.module,
                path.display()
            );
            1
        }
    }
}

/// Prints what is appended to `path` after byte `from`, forever (until
/// interrupted or stdout closes). When the file is replaced (rotated:
/// another inode at that path) the rest of the old one is printed, then the
/// new one from its start; when it is truncated, from its new start.
fn follow(path: &Path, from: u64) -> i32 {
    let mut out = std::io::stdout().lock();
    let mut current: Option<(std::io::BufReader<std::fs::File>, u64)> = None;
    let mut pos = from;
    let mut partial = String::new();
    loop {
        if current.is_none()
            && let Ok(f) = std::fs::File::open(path)
        {
            let ino = f.metadata().map_or(0, |m| m.ino());
            let mut r = std::io::BufReader::new(f);
            if r.seek(std::io::SeekFrom::Start(pos)).is_err() {
                pos = 0;
            }
            current = Some((r, ino));
        }
        if let Some((reader, ino)) = current.as_mut() {
            // Everything up to the end of this file (also the last lines
            // of a file just rotated away).
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        pos += n as u64;
                        partial.push_str(&line);
                        if partial.ends_with('\n') {
                            if out.write_all(partial.as_bytes()).is_err() {
                                return 0;
                            }
                            partial.clear();
                        }
                    }
                }
            }
            if out.flush().is_err() {
                return 0;
            }
            match std::fs::metadata(path) {
                // Rotated: read the new file from its start.
                Ok(m) if m.ino() != *ino => {
                    let mut rest = String::new();
                    let _ = reader.read_to_string(&mut rest);
                    partial.push_str(&rest);
                    current = None;
                    pos = 0;
                }
                // Truncated in place.
                Ok(m) if m.len() < pos => {
                    current = None;
                    pos = 0;
                }
                // Removed and not yet recreated: wait for the new file.
                Err(_) => {
                    current = None;
                    pos = 0;
                }
                Ok(_) => {}
            }
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

pub(super) fn print(paths: &Paths, args: &PrintArgs, level: modlog::Level) -> i32 {
    if let Err(code) = configured(paths, &args.module) {
        return code;
    }
    match modlog::append_line(
        &paths.module_log(&args.module),
        level,
        &args.message.join(" "),
    ) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!(
                "safekit: cannot write the log of module {:?}: {e}",
                args.module
            );
            1
        }
    }
}

/// `Ok` when `module` is configured on this node (its `module.toml`
/// exists), else prints why and gives the exit code [`EXIT_USAGE`]. The log
/// is a file of the node: this works without safekitd.
fn configured(paths: &Paths, module: &str) -> Result<(), i32> {
    let valid = (1..=32).contains(&module.len())
        && module
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        eprintln!(
            "safekit: {module:?} is not a module name (1 to 32 ASCII letters, digits, '-' or '_')"
        );
        return Err(EXIT_USAGE);
    }
    let file = paths.module_dir(module).join("module.toml");
    if file.is_file() {
        Ok(())
    } else {
        eprintln!(
            "safekit: no module {module:?} on this node (no {})",
            file.display()
        );
        Err(EXIT_USAGE)
    }
}
