//! `log`, `printi`, `printe`: module logs.

use super::EXIT_USAGE;
use crate::{modlog, paths::Paths};

/// `safekit log -m AM [-n N]`.
#[derive(clap::Args, Debug)]
pub struct LogArgs {
    /// Module name.
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
    /// Only the last N lines.
    #[arg(short = 'n', long)]
    pub lines: Option<usize>,
}

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
            for l in &lines[from..] {
                println!("{l}");
            }
            0
        }
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
