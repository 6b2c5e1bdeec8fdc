//! Farm membership and safe bucket ownership (pure).
//!
//! Each node advertises, in its farm heartbeats, its *view*: the set of
//! members it believes UP. A node owns bucket `b` only when it is `b`'s owner
//! under its own view **and** under the latest view of every UP peer. So when
//! membership changes, a bucket is released by its old owner (whose view
//! changed first, or who leaves) before the new owner takes it, once it has
//! seen the old owner's updated view: a bucket may be briefly unowned, never
//! owned twice.

use std::collections::{BTreeMap, BTreeSet};

use safekit_common::BUCKETS;

use super::assign::{Assignment, Member};

/// A set of member names.
pub type View = BTreeSet<String>;

/// A peer's membership as its heartbeats advertise it: its view and the
/// power it gives each member (so that while the nodes do not yet agree on
/// a `power` change, each is judged under the assignment it uses).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerView {
    /// Members it believes UP.
    pub view: View,
    /// Power of each member, as it weighs them (absent: the local value).
    pub powers: BTreeMap<String, u32>,
}

/// Heartbeat payload of a view: `name=power` entries, comma-separated.
#[must_use]
pub fn encode_view(view: &View, powers: &BTreeMap<String, u32>) -> Vec<u8> {
    view.iter()
        .map(|n| format!("{n}={}", powers.get(n).copied().unwrap_or(1)))
        .collect::<Vec<_>>()
        .join(",")
        .into_bytes()
}

/// The view in a heartbeat payload (`None` when not a view). Entries
/// without `=power` take the local power.
#[must_use]
pub fn decode_view(payload: &[u8]) -> Option<PeerView> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut out = PeerView::default();
    for entry in text.split(',').filter(|s| !s.is_empty()) {
        match entry.split_once('=') {
            Some((name, power)) => {
                let power = power.parse::<u32>().ok()?;
                out.powers.insert(name.to_owned(), power);
                out.view.insert(name.to_owned());
            }
            None => {
                out.view.insert(entry.to_owned());
            }
        }
    }
    Some(out)
}

/// The assignment of a view, members weighted by `powers` (default 1).
#[must_use]
pub fn assignment(view: &View, powers: &BTreeMap<String, u32>) -> Assignment {
    let members: Vec<Member> = view
        .iter()
        .map(|n| Member {
            name: n.clone(),
            power: powers.get(n).copied().unwrap_or(1),
        })
        .collect();
    Assignment::compute(&members)
}

/// Buckets `me` may accept: owner under its own view and powers and under
/// every UP peer's view and powers.
#[must_use]
pub fn owned(
    me: &str,
    powers: &BTreeMap<String, u32>,
    my_view: &View,
    peer_views: &[PeerView],
) -> Vec<bool> {
    if !my_view.contains(me) {
        return vec![false; BUCKETS as usize];
    }
    let mine = assignment(my_view, powers);
    let theirs: Vec<Assignment> = peer_views
        .iter()
        .map(|p| {
            let mut weights = powers.clone();
            weights.extend(p.powers.iter().map(|(n, w)| (n.clone(), *w)));
            assignment(&p.view, &weights)
        })
        .collect();
    (0..BUCKETS)
        .map(|b| mine.owner(b) == Some(me) && theirs.iter().all(|a| a.owner(b) == Some(me)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(names: &[&str]) -> View {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn count(v: &[bool]) -> usize {
        v.iter().filter(|x| **x).count()
    }

    fn pv(names: &[&str]) -> PeerView {
        PeerView {
            view: view(names),
            powers: BTreeMap::new(),
        }
    }

    #[test]
    fn views_round_trip() {
        let v = view(&["node1", "node3"]);
        let powers: BTreeMap<String, u32> = [("node1".to_owned(), 3)].into();
        let back = decode_view(&encode_view(&v, &powers)).unwrap();
        assert_eq!(back.view, v);
        assert_eq!(back.powers.get("node1"), Some(&3));
        assert_eq!(back.powers.get("node3"), Some(&1));
        assert_eq!(decode_view(b"").unwrap().view, View::new());
        assert_eq!(
            decode_view(b"node1,node2").unwrap().view,
            view(&["node1", "node2"])
        );
        assert_eq!(decode_view(b"node1=x"), None);
    }

    #[test]
    fn a_power_change_never_gives_a_bucket_two_owners() {
        let all = view(&["node1", "node2", "node3"]);
        let old: BTreeMap<String, u32> = BTreeMap::new();
        let new: BTreeMap<String, u32> = [("node1".to_owned(), 3)].into();
        let peer = |powers: &BTreeMap<String, u32>| PeerView {
            view: all.clone(),
            powers: all
                .iter()
                .map(|n| (n.clone(), powers.get(n).copied().unwrap_or(1)))
                .collect(),
        };
        // Every combination of who already applied the new powers.
        for mask in 0u8..8 {
            let p = |i: u8| if mask & (1 << i) != 0 { &new } else { &old };
            let owners: Vec<Vec<bool>> = (0..3u8)
                .map(|i| {
                    let me = format!("node{}", i + 1);
                    let peers: Vec<PeerView> =
                        (0..3u8).filter(|j| *j != i).map(|j| peer(p(j))).collect();
                    owned(&me, p(i), &all, &peers)
                })
                .collect();
            for b in 0..BUCKETS as usize {
                let n = owners.iter().filter(|o| o[b]).count();
                assert!(n <= 1, "mask {mask}: bucket {b} has {n} owners");
                if mask == 0 || mask == 7 {
                    assert_eq!(n, 1, "mask {mask}: bucket {b} unowned once all agree");
                }
            }
        }
    }

    #[test]
    fn stable_membership_owns_every_bucket_exactly_once() {
        let p = BTreeMap::new();
        let all = view(&["node1", "node2", "node3"]);
        let owners: Vec<Vec<bool>> = ["node1", "node2", "node3"]
            .iter()
            .map(|me| {
                let peers: Vec<PeerView> =
                    (0..2).map(|_| pv(&["node1", "node2", "node3"])).collect();
                owned(me, &p, &all, &peers)
            })
            .collect();
        for b in 0..BUCKETS as usize {
            assert_eq!(owners.iter().filter(|o| o[b]).count(), 1, "bucket {b}");
        }
    }

    #[test]
    fn a_joiner_takes_nothing_until_the_others_see_it() {
        let p = BTreeMap::new();
        let old = view(&["node1", "node2"]);
        let new = view(&["node1", "node2", "node3"]);
        // node3 sees everyone; node1 and node2 do not see node3 yet.
        let o = pv(&["node1", "node2"]);
        let n = pv(&["node1", "node2", "node3"]);
        let n3 = owned("node3", &p, &new, &[o.clone(), o.clone()]);
        assert_eq!(count(&n3), 0);
        // node1 still owns its old share meanwhile: no bucket has two owners.
        let n1 = owned("node1", &p, &old, std::slice::from_ref(&o));
        let n2 = owned("node2", &p, &old, std::slice::from_ref(&o));
        assert_eq!(count(&n1) + count(&n2), BUCKETS as usize);
        // node1 sees node3 first: it releases, node3 still waits for node2.
        let n1 = owned("node1", &p, &new, &[o.clone(), n.clone()]);
        let n3 = owned("node3", &p, &new, &[n.clone(), o.clone()]);
        let n2 = owned("node2", &p, &old, std::slice::from_ref(&n));
        for b in 0..BUCKETS as usize {
            assert!(
                u8::from(n1[b]) + u8::from(n2[b]) + u8::from(n3[b]) <= 1,
                "bucket {b}"
            );
        }
        // Everyone agrees: full coverage again.
        let n3 = owned("node3", &p, &new, &[n.clone(), n]);
        assert!(count(&n3) > 60);
    }
}
