//! `start`, `stop`, `shutdown`, the mirror commands: one request, print the
//! answer.

use super::EXIT_USAGE;
use crate::{control::Request, control::Response, paths::Paths};

pub(super) fn simple(paths: &Paths, req: &Request) -> i32 {
    match super::call(paths, req) {
        Ok(Response::Ok { message }) => {
            println!("{message}");
            0
        }
        Ok(Response::Error { error }) => {
            eprintln!("safekit: {error}");
            refused(paths, req)
        }
        Ok(_) => {
            eprintln!("safekit: unexpected answer from safekitd");
            1
        }
        Err(e) => {
            eprintln!("safekit: {e}");
            1
        }
    }
}

/// Exit code of a refused request: [`EXIT_USAGE`] when it names a module
/// the daemon does not run, else 1.
pub(super) fn refused(paths: &Paths, req: &Request) -> i32 {
    if module_unknown(paths, req) {
        EXIT_USAGE
    } else {
        1
    }
}

/// True when the request names a module the daemon does not run (asked
/// after a refusal, so that the exit code tells "no such module" apart).
fn module_unknown(paths: &Paths, req: &Request) -> bool {
    let module = match req {
        Request::Start { module }
        | Request::Stop { module }
        | Request::Mirror { module, .. }
        | Request::SetResource { module, .. }
        | Request::FarmWhich { module, .. }
        | Request::RfsVerify { module } => module,
        Request::State | Request::Shutdown | Request::ConfigApply { .. } => return false,
    };
    matches!(
        super::call(paths, &Request::State),
        Ok(Response::State { status }) if status.module(module).is_none()
    )
}
