//! `safekit config check`: validate without touching anything running.

use crate::{config, paths::Paths};

pub(super) fn run(paths: &Paths) -> i32 {
    match config::load(&paths.etc()) {
        Ok(cfg) => {
            println!(
                "configuration OK: cluster {:?}, {} nodes, modules: {}",
                cfg.cluster.name,
                cfg.cluster.nodes.len(),
                if cfg.modules.is_empty() {
                    "none".to_owned()
                } else {
                    cfg.modules.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            );
            0
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("configuration has {} error(s)", errors.0.len());
            1
        }
    }
}
