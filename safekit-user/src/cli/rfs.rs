//! `safekit rfs verify -m AM`: both copies of each replicated directory
//! compared by content checksum, kind, mode, owner, size and mtime.

use std::time::Duration;

use crate::{
    control::{self, Request, Response},
    paths::Paths,
};

/// `safekit rfs ...`.
#[derive(clap::Subcommand, Debug)]
pub enum RfsCommand {
    /// Compare the primary's and the secondary's copies (run on the
    /// primary); exit 0 when equal, 1 when they differ.
    Verify(super::ModuleArg),
}

/// Hashing large trees takes time.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(3600);

pub(super) fn verify(paths: &Paths, module: String) -> i32 {
    let req = Request::RfsVerify { module };
    match control::call(&paths.control_socket(), &req, VERIFY_TIMEOUT) {
        Ok(Response::Verified { dirs }) => {
            let mut differ = false;
            for (dir, entries, diffs) in dirs {
                if diffs.is_empty() {
                    println!("{dir}: equal ({entries} entries compared)");
                } else {
                    differ = true;
                    println!("{dir}: {} difference(s)", diffs.len());
                    for d in diffs {
                        println!("  {d}");
                    }
                }
            }
            i32::from(differ)
        }
        Ok(Response::Error { error }) => {
            eprintln!("safekit: {error}");
            super::module_cmd::refused(paths, &req)
        }
        Ok(_) => {
            eprintln!("safekit: unexpected answer from safekitd");
            super::EXIT_DAEMON
        }
        Err(e) => {
            eprintln!("safekit: {e}");
            super::EXIT_DAEMON
        }
    }
}
