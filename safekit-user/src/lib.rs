//! safekit user space: the `safekitd` daemon and the `safekit` CLI share this
//! library.
//!
//! The daemon's main loop ([`daemon::run`]): load and validate the config
//! ([`config::load`]), find which node this host is, bind one heartbeat socket
//! per LAN, the control socket and HTTP, then hand everything to the engine
//! ([`daemon::engine`]), which waits for a datagram, a command or its next
//! deadline, updates the modules, sends the heartbeats that are due and
//! publishes a [`status::NodeStatus`] that `safekit state`, `ready.txt` and
//! `/metrics` read.

pub mod auth;
pub mod certs;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod ebpf;
pub mod farm;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod heartbeat;
pub mod metrics;
pub mod modlog;
pub mod nft;
pub mod paths;
pub mod rfs;
pub mod script;
pub mod snapshot;
pub mod status;
pub mod sys;
pub mod witness;
