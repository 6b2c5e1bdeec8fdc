//! Heartbeat wire format.
//!
//! ```text
//! 0   magic "SKHB"            4
//! 4   version (1)             1
//! 5   state code              1
//! 6   total length (BE)       2   whole datagram, MAC included
//! 8   epoch (BE)              8   sender's incarnation, persisted, bumped at each start
//! 16  counter (BE)            8   per (sender, module, epoch), +1 each datagram
//! 24  cluster len, node len, module len (1 byte each), payload len (BE, 2)
//! 29  cluster | node | module | payload
//! ..  MAC                     32  keyed BLAKE3 over every byte before it
//! ```
//!
//! Decoding checks only the framing (magic, version, declared length) before
//! the MAC; the MAC is compared in constant time, and nothing else in the
//! datagram is read before it matched.

use super::Rejected;

const MAGIC: &[u8; 4] = b"SKHB";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 29;
const MAC_LEN: usize = 32;
/// Smallest possible datagram (empty names and payload).
pub const MIN_LEN: usize = HEADER_LEN + MAC_LEN;
/// Largest datagram we send or accept.
pub const MAX_LEN: usize = 1400;

/// The heartbeat MAC key, derived from the cluster key file's bytes.
#[derive(Clone)]
pub struct HeartbeatKey([u8; 32]);

impl HeartbeatKey {
    /// Derives the heartbeat key from the cluster key (domain-separated, so
    /// the same cluster key can also key replication).
    #[must_use]
    pub fn derive(cluster_key: &[u8]) -> Self {
        Self(blake3::derive_key(
            "safekit 2026 heartbeat MAC v1",
            cluster_key,
        ))
    }
}

impl std::fmt::Debug for HeartbeatKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeartbeatKey(..)")
    }
}

/// One heartbeat, decoded and authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// Cluster name.
    pub cluster: String,
    /// Sending node.
    pub node: String,
    /// Module the heartbeat is about.
    pub module: String,
    /// The sender's module state code (see `crate::module::StateCode`).
    pub state: u8,
    /// Sender incarnation.
    pub epoch: u64,
    /// Sequence number within (sender, module, epoch).
    pub counter: u64,
    /// Module-specific data (e.g. a mirror node's data generation).
    pub payload: Vec<u8>,
}

/// Errors when building a heartbeat (names too long for the format).
#[derive(Debug, thiserror::Error)]
#[error("heartbeat field {field} is {len} bytes, at most {max} allowed")]
pub struct EncodeError {
    field: &'static str,
    len: usize,
    max: usize,
}

fn len_u8(field: &'static str, s: &[u8]) -> Result<u8, EncodeError> {
    u8::try_from(s.len()).map_err(|_| EncodeError {
        field,
        len: s.len(),
        max: 255,
    })
}

/// Serialises and authenticates a heartbeat.
pub fn encode(hb: &Heartbeat, key: &HeartbeatKey) -> Result<Vec<u8>, EncodeError> {
    let total = MIN_LEN + hb.cluster.len() + hb.node.len() + hb.module.len() + hb.payload.len();
    if total > MAX_LEN {
        return Err(EncodeError {
            field: "datagram",
            len: total,
            max: MAX_LEN,
        });
    }
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(hb.state);
    // total <= MAX_LEN fits in u16.
    out.extend_from_slice(&u16::try_from(total).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(&hb.epoch.to_be_bytes());
    out.extend_from_slice(&hb.counter.to_be_bytes());
    out.push(len_u8("cluster", hb.cluster.as_bytes())?);
    out.push(len_u8("node", hb.node.as_bytes())?);
    out.push(len_u8("module", hb.module.as_bytes())?);
    out.extend_from_slice(
        &u16::try_from(hb.payload.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(hb.cluster.as_bytes());
    out.extend_from_slice(hb.node.as_bytes());
    out.extend_from_slice(hb.module.as_bytes());
    out.extend_from_slice(&hb.payload);
    let mac = blake3::keyed_hash(&key.0, &out);
    out.extend_from_slice(mac.as_bytes());
    Ok(out)
}

/// Authenticates and decodes a datagram. The MAC is verified (in constant
/// time) before any field other than the framing is read.
pub fn decode(buf: &[u8], key: &HeartbeatKey) -> Result<Heartbeat, Rejected> {
    if buf.len() < MIN_LEN || buf.len() > MAX_LEN {
        return Err(Rejected::Truncated);
    }
    if &buf[0..4] != MAGIC || buf[4] != VERSION {
        return Err(Rejected::BadVersion);
    }
    let declared = usize::from(u16::from_be_bytes([buf[6], buf[7]]));
    if declared != buf.len() {
        return Err(Rejected::Truncated);
    }
    let (body, mac) = buf.split_at(buf.len() - MAC_LEN);
    let expected = blake3::keyed_hash(&key.0, body);
    let mut got = [0u8; MAC_LEN];
    got.copy_from_slice(mac);
    // blake3::Hash's PartialEq<[u8; 32]> is constant time.
    if expected != got {
        return Err(Rejected::BadMac);
    }
    // Authentic from here on; the lengths still have to be consistent.
    let epoch = u64::from_be_bytes(body[8..16].try_into().map_err(|_| Rejected::Malformed)?);
    let counter = u64::from_be_bytes(body[16..24].try_into().map_err(|_| Rejected::Malformed)?);
    let (cl, nl, ml) = (
        usize::from(body[24]),
        usize::from(body[25]),
        usize::from(body[26]),
    );
    let pl = usize::from(u16::from_be_bytes([body[27], body[28]]));
    if HEADER_LEN + cl + nl + ml + pl != body.len() {
        return Err(Rejected::Malformed);
    }
    let mut at = HEADER_LEN;
    let mut take = |n: usize| {
        let s = &body[at..at + n];
        at += n;
        s
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| Rejected::Malformed);
    let cluster = text(take(cl))?;
    let node = text(take(nl))?;
    let module = text(take(ml))?;
    let payload = take(pl).to_vec();
    Ok(Heartbeat {
        cluster,
        node,
        module,
        state: body[5],
        epoch,
        counter,
        payload,
    })
}

/// For the fuzz targets (`fuzz/`): datagrams a key holder could send.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod fuzzing {
    use super::{HeartbeatKey, MAC_LEN, MAGIC, VERSION};

    /// `body` made a datagram that passes the framing and MAC checks: magic
    /// and version set, the declared length fixed up, the MAC appended.
    /// The fields after the MAC check are left as they are.
    pub(crate) fn authenticate(body: &[u8], key: &HeartbeatKey) -> Vec<u8> {
        let mut out = body.to_vec();
        if out.len() >= 8 {
            out[..4].copy_from_slice(MAGIC);
            out[4] = VERSION;
            let total = u16::try_from(out.len() + MAC_LEN).unwrap_or(u16::MAX);
            out[6..8].copy_from_slice(&total.to_be_bytes());
        }
        let mac = blake3::keyed_hash(&key.0, &out);
        out.extend_from_slice(mac.as_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Heartbeat {
        Heartbeat {
            cluster: "lab".into(),
            node: "node1".into(),
            module: "web".into(),
            state: 3,
            epoch: 7,
            counter: 42,
            payload: vec![1, 2, 3],
        }
    }

    #[test]
    fn round_trip() {
        let key = HeartbeatKey::derive(&[9; 32]);
        let bytes = encode(&sample(), &key).unwrap();
        assert_eq!(decode(&bytes, &key).unwrap(), sample());
    }

    #[test]
    fn other_key_is_bad_mac() {
        let bytes = encode(&sample(), &HeartbeatKey::derive(&[1; 32])).unwrap();
        assert_eq!(
            decode(&bytes, &HeartbeatKey::derive(&[2; 32])),
            Err(Rejected::BadMac)
        );
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let key = HeartbeatKey::derive(&[9; 32]);
        let bytes = encode(&sample(), &key).unwrap();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(decode(&b, &key).is_err(), "bit {i} flipped was accepted");
        }
    }

    #[test]
    fn every_truncation_is_rejected_as_truncated() {
        let key = HeartbeatKey::derive(&[9; 32]);
        let bytes = encode(&sample(), &key).unwrap();
        for n in 0..bytes.len() {
            assert_eq!(
                decode(&bytes[..n], &key),
                Err(Rejected::Truncated),
                "len {n}"
            );
        }
    }

    #[test]
    fn datagrams_longer_than_sent_are_refused() {
        // A 1401-byte datagram declaring its own length and correctly
        // MACed: encode never makes one, decode refuses it.
        let key = HeartbeatKey::derive(&[9; 32]);
        let mut body = vec![0u8; MAX_LEN + 1 - MAC_LEN];
        body[..4].copy_from_slice(MAGIC);
        body[4] = VERSION;
        body[6..8].copy_from_slice(&u16::try_from(MAX_LEN + 1).unwrap().to_be_bytes());
        let pl = u16::try_from(body.len() - HEADER_LEN).unwrap();
        body[27..29].copy_from_slice(&pl.to_be_bytes());
        let mac = blake3::keyed_hash(&key.0, &body);
        body.extend_from_slice(mac.as_bytes());
        assert_eq!(decode(&body, &key), Err(Rejected::Truncated));
        body.truncate(body.len() - MAC_LEN - 1);
        body[6..8].copy_from_slice(&u16::try_from(MAX_LEN).unwrap().to_be_bytes());
        body[27..29].copy_from_slice(&(pl - 1).to_be_bytes());
        let mac = blake3::keyed_hash(&key.0, &body);
        body.extend_from_slice(mac.as_bytes());
        assert_eq!(
            decode(&body, &key).map(|h| h.payload.len()),
            Ok(usize::from(pl - 1))
        );
    }

    #[test]
    fn too_long_names_are_refused() {
        let mut hb = sample();
        hb.payload = vec![0; MAX_LEN];
        assert!(encode(&hb, &HeartbeatKey::derive(&[0; 32])).is_err());
    }
}
