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

/// Heartbeat payload of a view: the names, comma-separated.
#[must_use]
pub fn encode_view(view: &View) -> Vec<u8> {
    view.iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(",")
        .into_bytes()
}

/// The view in a heartbeat payload (`None` when not a view).
#[must_use]
pub fn decode_view(payload: &[u8]) -> Option<View> {
    let text = std::str::from_utf8(payload).ok()?;
    Some(
        text.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    )
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

/// Buckets `me` may accept: owner under its own view and under every UP
/// peer's view.
#[must_use]
pub fn owned(
    me: &str,
    powers: &BTreeMap<String, u32>,
    my_view: &View,
    peer_views: &[View],
) -> Vec<bool> {
    if !my_view.contains(me) {
        return vec![false; BUCKETS as usize];
    }
    let mine = assignment(my_view, powers);
    let theirs: Vec<Assignment> = peer_views.iter().map(|v| assignment(v, powers)).collect();
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

    #[test]
    fn views_round_trip() {
        let v = view(&["node1", "node3"]);
        assert_eq!(decode_view(&encode_view(&v)), Some(v));
        assert_eq!(decode_view(b""), Some(View::new()));
    }

    #[test]
    fn stable_membership_owns_every_bucket_exactly_once() {
        let p = BTreeMap::new();
        let all = view(&["node1", "node2", "node3"]);
        let owners: Vec<Vec<bool>> = ["node1", "node2", "node3"]
            .iter()
            .map(|me| {
                let peers: Vec<View> = (0..2).map(|_| all.clone()).collect();
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
        let n3 = owned("node3", &p, &new, &[old.clone(), old.clone()]);
        assert_eq!(count(&n3), 0);
        // node1 still owns its old share meanwhile: no bucket has two owners.
        let n1 = owned("node1", &p, &old, std::slice::from_ref(&old));
        let n2 = owned("node2", &p, &old, std::slice::from_ref(&old));
        assert_eq!(count(&n1) + count(&n2), BUCKETS as usize);
        // node1 sees node3 first: it releases, node3 still waits for node2.
        let n1 = owned("node1", &p, &new, &[old.clone(), new.clone()]);
        let n3 = owned("node3", &p, &new, &[new.clone(), old.clone()]);
        let n2 = owned("node2", &p, &old, std::slice::from_ref(&new));
        for b in 0..BUCKETS as usize {
            assert!(
                u8::from(n1[b]) + u8::from(n2[b]) + u8::from(n3[b]) <= 1,
                "bucket {b}"
            );
        }
        // Everyone agrees: full coverage again.
        let n3 = owned("node3", &p, &new, &[new.clone(), new.clone()]);
        assert!(count(&n3) > 60);
    }
}
