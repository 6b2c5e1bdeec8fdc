//! `log`, `printi`, `printe`: module logs.

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
    if !paths.module_dir(&args.module).is_dir() {
        eprintln!(
            "safekit: no module {:?} (no {})",
            args.module,
            paths.module_dir(&args.module).display()
        );
        return 1;
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
