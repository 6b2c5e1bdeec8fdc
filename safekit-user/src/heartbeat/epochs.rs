//! The last epoch (incarnation) seen from each peer, kept across restarts
//! of this node (`var/lib/safekit/peer_epochs.json`).
//!
//! The replay windows live in memory: a node that restarts would take the
//! first authentic heartbeat it hears from a peer as fresh, including one
//! captured from an older incarnation of that peer and replayed while the
//! peer is silent. With the last epoch of each peer on disk, a heartbeat of
//! an epoch below it is a replay whatever the windows hold.

use std::collections::BTreeMap;

/// Highest epoch accepted from each peer node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerEpochs {
    seen: BTreeMap<String, u64>,
}

impl PeerEpochs {
    /// Decodes the file's content: a JSON object, node name → epoch.
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        Ok(Self {
            seen: serde_json::from_slice(bytes)?,
        })
    }

    /// The file's content.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(&self.seen).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Whether `epoch` is older than the last epoch accepted from `node`
    /// (a heartbeat of an incarnation that is over: a replay).
    #[must_use]
    pub fn is_older(&self, node: &str, epoch: u64) -> bool {
        self.seen.get(node).is_some_and(|&last| epoch < last)
    }

    /// Records that an authentic, fresh heartbeat of `epoch` came from
    /// `node`; true when that is a new epoch (to be persisted).
    pub fn record(&mut self, node: &str, epoch: u64) -> bool {
        match self.seen.get_mut(node) {
            Some(last) if *last >= epoch => false,
            Some(last) => {
                *last = epoch;
                true
            }
            None => {
                self.seen.insert(node.to_owned(), epoch);
                true
            }
        }
    }

    /// The last epoch accepted from `node`.
    #[must_use]
    pub fn last(&self, node: &str) -> Option<u64> {
        self.seen.get(node).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_incarnations_are_refused_after_a_round_trip_through_the_file() {
        let mut e = PeerEpochs::default();
        assert!(!e.is_older("node2", 1), "nothing known: nothing refused");
        assert!(e.record("node2", 5));
        assert!(!e.record("node2", 5), "same epoch: nothing to persist");
        assert!(!e.record("node2", 4), "never goes back");
        let e = PeerEpochs::parse(&e.encode()).unwrap();
        assert_eq!(e.last("node2"), Some(5));
        assert!(e.is_older("node2", 4));
        assert!(!e.is_older("node2", 5));
        assert!(!e.is_older("node2", 6));
        assert!(!e.is_older("node3", 0));
        assert!(PeerEpochs::parse(b"{\"node2\": -1}").is_err());
        assert!(PeerEpochs::parse(b"garbage").is_err());
    }
}
