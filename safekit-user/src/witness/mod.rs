//! The arbitrating witness (`safekit witness`, SPEC §5 "Split brain"): a
//! small daemon on a third machine that grants the right to be primary
//! without the peer to at most one node per module and data generation.
//!
//! - [`codec`] — the UDP wire format of requests and answers, authenticated
//!   with a key derived from the cluster key (keyed BLAKE3, as heartbeats);
//! - [`grants`] — the pure grant state machine, persisted by the daemon
//!   before any answer that changed it;
//! - [`server`] — the daemon's loop (the I/O edge): receive, decide,
//!   persist, answer.
//!
//! A mirror node that lost its peer asks for the generation it would write
//! without it (a SECOND: its generation + 1, the one its takeover creates; a
//! primary: the one it moved to when it lost its secondary). Both sides of a
//! cut ask for the same generation, so exactly one is granted; the grant is
//! kept (a grant is not time-limited: a node that got it may have written,
//! so the other's copy must never be granted that generation again). Once
//! the pair is back in sync at a higher generation, the next loss asks for
//! a higher one, which either node may get.

pub mod codec;
pub mod grants;
pub mod server;

/// Default UDP port of `safekit witness`.
pub const DEFAULT_PORT: u16 = 8889;
