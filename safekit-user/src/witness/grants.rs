//! The witness's grants, a pure state machine: per (cluster, module) the
//! node that may write without its peer, and the generation it was granted.
//!
//! Rule for a request (node N, generation G) against the grant held
//! (holder H, generation g):
//! - no grant yet: granted;
//! - N is H: granted again (a retry, or a later loss of the same node),
//!   the held generation becomes max(g, G);
//! - G > g: granted to N — its data is newer than anything granted (it was
//!   in sync with H after H's grant, and the pair moved on since);
//! - else refused: H may have written generation g without N, so N's copy
//!   lacks it.
//!
//! A grant never expires: a node that got it may have written, and the other
//! copy must then never be granted the same generation (a time-limited
//! lease would let the stale copy start once it ran out).

use serde::{Deserialize, Serialize};

use super::codec::{Request, Verdict};

/// One module's grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Cluster name.
    pub cluster: String,
    /// Mirror module.
    pub module: String,
    /// The node that may write without its peer.
    pub node: String,
    /// The generation granted.
    pub generation: u64,
}

/// Every grant (what the witness persists).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    /// One per (cluster, module).
    pub grants: Vec<Grant>,
}

/// The outcome of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Granted or refused.
    pub verdict: Verdict,
    /// The holder after the decision.
    pub holder: String,
    /// Its generation.
    pub held: u64,
    /// The grants changed: persist before answering.
    pub changed: bool,
}

impl Grants {
    /// Decides a request (see the module doc).
    pub fn decide(&mut self, r: &Request) -> Decision {
        let found = self
            .grants
            .iter_mut()
            .find(|g| g.cluster == r.cluster && g.module == r.module);
        let Some(g) = found else {
            self.grants.push(Grant {
                cluster: r.cluster.clone(),
                module: r.module.clone(),
                node: r.node.clone(),
                generation: r.generation,
            });
            return Decision {
                verdict: Verdict::Granted,
                holder: r.node.clone(),
                held: r.generation,
                changed: true,
            };
        };
        let before = g.clone();
        let verdict = if g.node == r.node {
            g.generation = g.generation.max(r.generation);
            Verdict::Granted
        } else if r.generation > g.generation {
            g.node.clone_from(&r.node);
            g.generation = r.generation;
            Verdict::Granted
        } else {
            Verdict::Refused
        };
        Decision {
            verdict,
            holder: g.node.clone(),
            held: g.generation,
            changed: *g != before,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(g: &mut Grants, node: &str, generation: u64) -> Verdict {
        g.decide(&Request {
            cluster: "lab".into(),
            module: "web".into(),
            node: node.into(),
            generation,
            nonce: 1,
        })
        .verdict
    }

    #[test]
    fn one_node_per_generation_then_either_at_a_newer_one() {
        let mut g = Grants::default();
        assert_eq!(ask(&mut g, "node2", 5), Verdict::Granted);
        assert_eq!(ask(&mut g, "node1", 5), Verdict::Refused);
        assert_eq!(ask(&mut g, "node1", 4), Verdict::Refused);
        // A retry of the holder.
        assert_eq!(ask(&mut g, "node2", 5), Verdict::Granted);
        // Back in sync, later loss: a newer generation.
        assert_eq!(ask(&mut g, "node1", 6), Verdict::Granted);
        assert_eq!(ask(&mut g, "node2", 6), Verdict::Refused);
        // Another module is independent.
        let other = g.decide(&Request {
            cluster: "lab".into(),
            module: "db".into(),
            node: "node2".into(),
            generation: 1,
            nonce: 2,
        });
        assert_eq!(other.verdict, Verdict::Granted);
        assert!(other.changed);
    }

    #[test]
    fn a_retry_changes_nothing_to_persist() {
        let mut g = Grants::default();
        assert!(
            g.decide(&Request {
                cluster: "c".into(),
                module: "m".into(),
                node: "a".into(),
                generation: 3,
                nonce: 0,
            })
            .changed
        );
        let again = g.decide(&Request {
            cluster: "c".into(),
            module: "m".into(),
            node: "a".into(),
            generation: 3,
            nonce: 9,
        });
        assert_eq!((again.verdict, again.changed), (Verdict::Granted, false));
    }
}
