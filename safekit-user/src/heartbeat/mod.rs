//! Heartbeats (SPEC §5, §9): authenticated UDP datagrams that tell every peer
//! the state of each module on this node.
//!
//! - [`codec`]: the wire format and its MAC (keyed BLAKE3 over cluster, node,
//!   module, state, epoch, counter and payload), checked in constant time
//!   before any other field is trusted;
//! - [`replay`]: the per-sender sliding replay window;
//! - [`epochs`]: the last epoch of each peer, persisted, so a restarted
//!   node still refuses heartbeats of a peer's older incarnations;
//! - [`Rejected`]: why a datagram was dropped, one metrics label each.

pub mod codec;
pub mod epochs;
pub mod replay;

pub use codec::{Heartbeat, HeartbeatKey, decode, encode};
pub use epochs::PeerEpochs;
pub use replay::ReplayWindow;

/// Why a received heartbeat was dropped. Each reason is counted separately
/// in `/metrics` (`safekit_heartbeats_rejected_total{reason=...}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
pub enum Rejected {
    /// Shorter than a heartbeat, or not the length its header declares.
    #[error("truncated datagram")]
    Truncated,
    /// Not a safekit heartbeat (magic) or an unknown wire version.
    #[error("not a safekit heartbeat of a known version")]
    BadVersion,
    /// The MAC does not match: forged (other key) or altered in transit.
    #[error("bad MAC (forged or altered)")]
    BadMac,
    /// Authentic but for another cluster name.
    #[error("other cluster")]
    WrongCluster,
    /// Authentic but from a node that is not in cluster.toml, or from this
    /// node's own name.
    #[error("unknown node")]
    UnknownNode,
    /// Authentic but its source address is not that node's address on the
    /// LAN it arrived on.
    #[error("source address is not the node's address on this LAN")]
    WrongSource,
    /// Authentic but for a module this node does not run.
    #[error("unknown module")]
    UnknownModule,
    /// A counter already seen, or too old for the replay window, or an epoch
    /// older than the sender's current one (as last seen by this node, even
    /// before it restarted).
    #[error("replayed")]
    Replay,
    /// Fields that authenticate but do not parse (names not UTF-8, unknown
    /// state code).
    #[error("malformed fields")]
    Malformed,
}

impl Rejected {
    /// Every reason, in metrics order.
    pub const ALL: [Rejected; 9] = [
        Rejected::Truncated,
        Rejected::BadVersion,
        Rejected::BadMac,
        Rejected::WrongCluster,
        Rejected::UnknownNode,
        Rejected::WrongSource,
        Rejected::UnknownModule,
        Rejected::Replay,
        Rejected::Malformed,
    ];

    /// Metrics label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Rejected::Truncated => "truncated",
            Rejected::BadVersion => "bad_version",
            Rejected::BadMac => "bad_mac",
            Rejected::WrongCluster => "wrong_cluster",
            Rejected::UnknownNode => "unknown_node",
            Rejected::WrongSource => "wrong_source",
            Rejected::UnknownModule => "unknown_module",
            Rejected::Replay => "replay",
            Rejected::Malformed => "malformed",
        }
    }
}
