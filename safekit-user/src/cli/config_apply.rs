//! `safekit config apply [-m AM]` and `safekit config rollback`: asks the
//! local safekitd, which sends the configuration to every node; prints one
//! line per node (applied, unchanged, refused with the error, unreachable).
//! Exits 0 when every node applied it or had it already.

use std::time::Duration;

use crate::{
    control::{self, ApplyOutcome, Request, Response},
    paths::Paths,
};

/// Each node answers within 10 s; a little more for the whole.
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) fn run(paths: &Paths, module: Option<String>, rollback: bool) -> i32 {
    let req = Request::ConfigApply { module, rollback };
    match control::call(&paths.control_socket(), &req, APPLY_TIMEOUT) {
        Ok(Response::Applied { nodes }) => {
            let mut ok = true;
            for (node, outcome) in &nodes {
                match outcome {
                    ApplyOutcome::Applied { notes } => {
                        println!("{node}: applied");
                        for n in notes {
                            println!("  {n}");
                        }
                    }
                    ApplyOutcome::Unchanged => println!("{node}: unchanged"),
                    ApplyOutcome::Refused { error } => {
                        ok = false;
                        println!("{node}: refused: {error}");
                    }
                    ApplyOutcome::Unreachable { error } => {
                        ok = false;
                        println!("{node}: unreachable: {error}");
                    }
                }
            }
            i32::from(!ok)
        }
        Ok(Response::Error { error }) => {
            eprintln!("safekit: {error}");
            1
        }
        Ok(other) => {
            eprintln!("safekit: unexpected answer {other:?}");
            1
        }
        Err(e) => {
            eprintln!("safekit: {e}");
            super::EXIT_DAEMON
        }
    }
}
