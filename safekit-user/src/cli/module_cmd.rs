//! `start`, `stop`, `shutdown`: one request, print the answer.

use crate::{control::Request, control::Response, paths::Paths};

pub(super) fn simple(paths: &Paths, req: &Request) -> i32 {
    match super::call(paths, req) {
        Ok(Response::Ok { message }) => {
            println!("{message}");
            0
        }
        Ok(Response::Error { error }) => {
            eprintln!("safekit: {error}");
            1
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
