//! Entry points of the cargo-fuzz targets in `fuzz/` (feature `fuzzing`,
//! never in a release build): one function per decoder that a peer, a client
//! or a file on disk can feed ([`TARGETS`]). Each takes arbitrary bytes, must never panic,
//! hang or allocate without bound, and checks what should hold of whatever
//! decodes (encoding it again decodes to the same value).
//!
//! Decoders behind a MAC or a cipher are reached twice: with the raw bytes
//! (what an attacker without the key can send: rejected before any field is
//! read) and with the bytes authenticated by the harness (what a peer holding
//! the key, or a bug on our side, can send).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::Path,
    sync::{Arc, OnceLock},
};

use snow::StatelessTransportState;

use crate::{
    config::{self, ClusterConfig},
    control::Request,
    daemon::{
        engine::{parse_epoch, parse_persisted},
        mirror_core::{MState, View},
    },
    farm::membership,
    heartbeat::{self, HeartbeatKey, PeerEpochs, ReplayWindow},
    nft::arp_responder,
    rfs::{
        channel::{self, ChannelError, ChannelKey},
        journal, proto,
    },
};

/// A harness: takes any bytes, panics only on a bug.
pub type Harness = fn(&[u8]);

/// Every target: its name (a `fuzz/fuzz_targets/<name>.rs` and a
/// `fuzz/corpus/<name>/` seed corpus) and its harness.
pub const TARGETS: [(&str, Harness); 9] = [
    ("heartbeat", heartbeat),
    ("farm_view", farm_view),
    ("rfs_message", rfs_message),
    ("channel", channel),
    ("journal", journal),
    ("arp", arp),
    ("control", control),
    ("config", config),
    ("state_files", state_files),
];

/// The key every harness authenticates with.
const KEY: [u8; 32] = [0x5a; 32];

/// Heartbeat datagrams: the raw bytes, then the same bytes as an
/// authenticated body (length fixed up, MAC appended), then the payload as
/// a mirror view and as a farm view, and the replay window on its counters.
pub fn heartbeat(data: &[u8]) {
    static HB_KEY: OnceLock<HeartbeatKey> = OnceLock::new();
    let key = HB_KEY.get_or_init(|| HeartbeatKey::derive(&KEY));
    let _ = heartbeat::decode(data, key);
    let signed = heartbeat::codec::fuzzing::authenticate(data, key);
    let Ok(hb) = heartbeat::decode(&signed, key) else {
        return;
    };
    // What decodes encodes back to the same datagram.
    let again = heartbeat::encode(&hb, key).expect("a decoded heartbeat encodes");
    assert_eq!(again, signed, "heartbeat re-encoding differs");
    mirror_view(&hb.payload);
    farm_view(&hb.payload);
    let mut w = ReplayWindow::default();
    assert!(w.check_and_record(hb.epoch, hb.counter), "first is fresh");
    assert!(
        !w.check_and_record(hb.epoch, hb.counter),
        "second is a replay"
    );
    assert!(
        hb.epoch == 0 || !w.check_and_record(hb.epoch - 1, u64::MAX),
        "an older epoch is a replay"
    );
}

/// A mirror module's heartbeat payload.
fn mirror_view(payload: &[u8]) {
    if let Some(v) = View::decode(MState::Prim, payload) {
        assert_eq!(
            Some(v),
            View::decode(MState::Prim, &v.encode()),
            "view re-encoding differs"
        );
    }
}

/// A farm heartbeat's view, and the bucket ownership computed from it.
pub fn farm_view(payload: &[u8]) {
    let Some(peer) = membership::decode_view(payload) else {
        return;
    };
    let again = membership::decode_view(&membership::encode_view(&peer.view, &peer.powers))
        .expect("a re-encoded view decodes");
    assert_eq!(again.view, peer.view, "view re-encoding differs");
    for (name, power) in &peer.powers {
        assert_eq!(
            again.powers.get(name),
            Some(power),
            "power re-encoding differs"
        );
    }
    // The buckets owned against a peer with this view. A farm has a few
    // nodes; past 4 names the cost (256 rendezvous hashes per name, twice)
    // would only slow the fuzzer down: the decoding above is what is
    // fuzzed, the assignment has its own tests.
    if peer.view.len() > 4 {
        return;
    }
    let me = peer.view.iter().next().cloned().unwrap_or_default();
    let mut mine = peer.view.clone();
    mine.insert(me.clone());
    let owned = membership::owned(&me, &peer.powers, &mine, std::slice::from_ref(&peer));
    assert_eq!(owned.len(), safekit_common::BUCKETS as usize);
}

/// Replication protocol messages and operations (what the channel delivers
/// once decrypted).
pub fn rfs_message(data: &[u8]) {
    if let Ok(msg) = proto::decode(data) {
        let mut out = Vec::new();
        proto::encode(&mut out, &msg);
        assert_eq!(proto::decode(&out), Ok(msg), "message re-encoding differs");
    }
    if let Ok(op) = proto::decode_op(data) {
        let mut out = Vec::new();
        proto::encode_op(&mut out, &op);
        assert_eq!(proto::decode_op(&out), Ok(op), "op re-encoding differs");
        let _ = journal::changes_of(&proto::decode_op(&out).expect("decoded above"));
    }
}

/// Transport state of the two ends of one session (handshaken once).
fn session() -> &'static (StatelessTransportState, Arc<StatelessTransportState>) {
    static SESSION: OnceLock<(StatelessTransportState, Arc<StatelessTransportState>)> =
        OnceLock::new();
    SESSION.get_or_init(|| {
        let key = ChannelKey::from_cluster_key(&KEY).expect("a 32-byte key");
        let (i, r) = channel::fuzzing::transport_pair(&key).expect("in-memory handshake");
        (i, Arc::new(r))
    })
}

/// Channel frames. First byte even: the rest is the raw wire (what anyone
/// can send to TCP 5600 after a handshake: fails authentication). Odd: the
/// rest is cut into plaintext frames (`u16` length, bytes), each sealed
/// with the session's keys in order, so the receiver decrypts them and
/// reassembles and decodes the message stream inside.
pub fn channel(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (sealer, opener) = session();
    let wire = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let mut wire = Vec::new();
        let mut rest = rest;
        let mut nonce = 0;
        while let Some((len, tail)) = rest.split_first_chunk::<2>() {
            let len = usize::from(u16::from_le_bytes(*len)).min(tail.len());
            let (plain, tail) = tail.split_at(len.min(channel::fuzzing::MAX_PLAIN));
            channel::fuzzing::seal(sealer, nonce, plain, &mut wire).expect("seal");
            nonce += 1;
            rest = tail;
        }
        wire
    };
    let mut rx = channel::fuzzing::receiver(Arc::clone(opener), &wire);
    // Every message costs at least its 4-byte length: the loop ends.
    for _ in 0..=wire.len() / 4 {
        match rx.recv() {
            Ok(msg) => {
                let mut out = Vec::new();
                proto::encode(&mut out, &msg);
                assert!(
                    out.len() <= channel::MAX_MESSAGE,
                    "delivered above the limit"
                );
            }
            Err(ChannelError::Decode(_)) => {}
            Err(_) => return,
        }
    }
}

/// Journal and activity-log records (the same format): a file left on disk.
pub fn journal(data: &[u8]) {
    let (records, valid) = journal::decode_records(data);
    assert!(valid <= data.len());
    // The valid prefix is exactly the records, encoded again.
    let mut out = Vec::new();
    for (path, change) in &records {
        journal::encode_record(&mut out, path, *change);
    }
    assert_eq!(out[..], data[..valid], "journal re-encoding differs");
    let mut set = journal::DirtySet::default();
    for (path, change) in &records {
        set.record(path, *change);
    }
    let _ = set.range_bytes();
}

/// Ethernet frames into the nftables backend's ARP responder.
pub fn arp(data: &[u8]) {
    let vip = Ipv4Addr::new(10, 0, 0, 100);
    let vmac = [0x5a, 0xfe, 10, 0, 0, 100];
    let ifmac = [2, 0, 0, 0, 0, 1];
    let vips = BTreeMap::from([(vip, vmac)]);
    if let Some(out) = arp_responder::reply(data, ifmac, &vips) {
        // Only a request for the VIP is answered: the virtual MAC for it,
        // from the interface's own MAC, to the asker.
        assert_eq!(data[12..14], [0x08, 0x06]);
        assert_eq!(data[38..42], vip.octets());
        assert_eq!(out[6..12], ifmac);
        assert_eq!(out[22..28], vmac);
        assert_eq!(out[0..6], data[22..28]);
    }
}

/// Control socket requests (one JSON line each, as the daemon decodes
/// them).
pub fn control(data: &[u8]) {
    if let Ok(req) = crate::control::decode_request(data) {
        let text = serde_json::to_string(&req).expect("a request serialises");
        assert_eq!(
            serde_json::from_str::<Request>(&text).ok(),
            Some(req),
            "request re-encoding differs"
        );
    }
}

/// A valid cluster the module harness validates against.
fn cluster() -> &'static ClusterConfig {
    static CLUSTER: OnceLock<ClusterConfig> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        config::parse_cluster(
            Path::new("/etc/safekit/cluster.toml"),
            include_str!("../../conf/cluster.toml"),
        )
        .expect("the shipped cluster.toml is valid")
    })
}

/// Config files: the text as `cluster.toml`, and as a `module.toml`
/// against a valid cluster.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = config::parse_cluster(Path::new("/etc/safekit/cluster.toml"), text);
    let _ = config::parse_module(
        Path::new("/etc/safekit/modules/fz/module.toml"),
        "fz",
        text,
        cluster(),
    );
}

/// The node's own state files: `mirror.json`, `epoch`, `peer_epochs.json`.
pub fn state_files(data: &[u8]) {
    if let Ok(p) = parse_persisted(data) {
        let text = serde_json::to_vec(&p).expect("a record serialises");
        assert_eq!(
            parse_persisted(&text).ok(),
            Some(p),
            "record re-encoding differs"
        );
    }
    if let Ok(e) = parse_epoch(data) {
        assert_eq!(parse_epoch(format!("{e}\n").as_bytes()), Ok(e));
    }
    if let Ok(p) = PeerEpochs::parse(data) {
        assert_eq!(PeerEpochs::parse(&p.encode()).ok(), Some(p));
    }
}

#[cfg(test)]
mod tests {
    use super::TARGETS;

    /// Every input of the seed corpus (`fuzz/corpus/<target>/`) and every
    /// input that once crashed a target (`fuzz/regressions/<target>/`) runs
    /// through its harness here too, on the stable toolchain.
    #[test]
    fn seed_corpus_and_past_crashes_pass_their_harness() {
        let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        for (name, harness) in TARGETS {
            let mut seeds = 0;
            for dir in ["corpus", "regressions"] {
                let Ok(rd) = std::fs::read_dir(fuzz.join(dir).join(name)) else {
                    continue;
                };
                for e in rd {
                    let path = e.expect("corpus entry").path();
                    let data = std::fs::read(&path).expect("corpus file");
                    harness(&data);
                    seeds += 1;
                }
            }
            assert!(seeds > 0, "no seed corpus for fuzz target {name}");
        }
    }
}
