//! Bucket assignment of a farm: which UP node owns each of the 256 buckets.
//!
//! Weighted rendezvous hashing (highest random weight): for bucket `b`, every
//! UP node `n` scores `power(n) / -ln(u(n, b))` with `u` a hash of (node name,
//! bucket) mapped into (0, 1); the highest score owns the bucket. So:
//! - every node computes the same owners from the same membership (a pure
//!   function of the member names and powers);
//! - a node leaving moves only its own buckets (each goes to that bucket's
//!   runner-up), and a node joining takes only buckets it now wins: no other
//!   bucket changes owner;
//! - expected shares are proportional to `power`.

use std::collections::BTreeMap;

use safekit_common::BUCKETS;

/// A farm member and its weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Node name.
    pub name: String,
    /// Relative weight (`power`), at least 1.
    pub power: u32,
}

/// Owner of every bucket (`None` when no node is UP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    owners: Vec<Option<String>>,
}

/// 64-bit FNV-1a then a `SplitMix64` finaliser: a stable hash, identical on
/// every node and across releases (std's `DefaultHasher` is not).
fn stable_hash(node: &str, bucket: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.as_bytes().iter().chain(&bucket.to_le_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn score(m: &Member, bucket: u32) -> f64 {
    // u in (0, 1): 53 random bits, never 0.
    #[expect(clippy::cast_precision_loss, reason = "53-bit value, exact in f64")]
    let u = ((stable_hash(&m.name, bucket) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(m.power.max(1)) / -u.ln()
}

impl Assignment {
    /// The assignment for this membership (order does not matter).
    #[must_use]
    pub fn compute(members: &[Member]) -> Self {
        let owners = (0..BUCKETS)
            .map(|b| {
                members
                    .iter()
                    .map(|m| (score(m, b), &m.name))
                    // Ties (practically impossible) break by name.
                    .max_by(|x, y| x.0.total_cmp(&y.0).then_with(|| y.1.cmp(x.1)))
                    .map(|(_, n)| n.clone())
            })
            .collect();
        Self { owners }
    }

    /// Owner of `bucket`.
    #[must_use]
    pub fn owner(&self, bucket: u32) -> Option<&str> {
        self.owners
            .get(usize::try_from(bucket).ok()?)
            .and_then(Option::as_deref)
    }

    /// Buckets owned by `node`, ascending.
    #[must_use]
    pub fn buckets_of(&self, node: &str) -> Vec<u32> {
        (0..BUCKETS)
            .filter(|b| self.owner(*b) == Some(node))
            .collect()
    }

    /// Number of buckets per owner.
    #[must_use]
    pub fn shares(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for o in self.owners.iter().flatten() {
            *out.entry(o.clone()).or_insert(0) += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> Vec<Member> {
        names
            .iter()
            .map(|n| Member {
                name: (*n).to_owned(),
                power: 1,
            })
            .collect()
    }

    #[test]
    fn every_bucket_has_exactly_one_owner_and_order_does_not_matter() {
        let a = Assignment::compute(&members(&["node1", "node2", "node3"]));
        let b = Assignment::compute(&members(&["node3", "node1", "node2"]));
        assert_eq!(a, b);
        assert_eq!(a.shares().values().sum::<usize>(), BUCKETS as usize);
        assert!(Assignment::compute(&[]).owner(0).is_none());
    }

    #[test]
    fn leaving_moves_only_the_leavers_buckets_and_joining_only_the_joiners() {
        for n in 2..=8 {
            let names: Vec<String> = (1..=n).map(|i| format!("node{i}")).collect();
            let all: Vec<&str> = names.iter().map(String::as_str).collect();
            let full = Assignment::compute(&members(&all));
            for gone in &all {
                let rest: Vec<&str> = all.iter().copied().filter(|x| x != gone).collect();
                let less = Assignment::compute(&members(&rest));
                for b in 0..BUCKETS {
                    if full.owner(b) == Some(gone) {
                        assert_ne!(less.owner(b), Some(*gone));
                    } else {
                        assert_eq!(
                            full.owner(b),
                            less.owner(b),
                            "bucket {b} moved without reason"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn shares_follow_power_and_three_equal_nodes_are_balanced() {
        let a = Assignment::compute(&members(&["node1", "node2", "node3"]));
        for (node, n) in a.shares() {
            // 256 / 3 = 85.3; the lab's 600-connection test needs 33 % ± 8.
            assert!((70..=101).contains(&n), "{node} owns {n}");
        }
        let weighted = Assignment::compute(&[
            Member {
                name: "big".into(),
                power: 3,
            },
            Member {
                name: "small".into(),
                power: 1,
            },
        ]);
        let s = weighted.shares();
        assert!(s["big"] > 2 * s["small"], "{s:?}");
    }
}
