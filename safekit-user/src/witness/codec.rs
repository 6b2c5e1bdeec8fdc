//! Witness wire format (one UDP datagram each way).
//!
//! ```text
//! 0   magic "SKWT"            4
//! 4   version (1)             1
//! 5   kind                    1   1 request, 2 granted, 3 refused
//! 6   generation (BE)         8   the generation asked for (echoed)
//! 14  nonce (BE)              8   chosen by the asking node (echoed)
//! 22  held (BE)               8   answers: the holder's generation
//! 30  cluster len, module len, node len, holder len (1 byte each)
//! 34  cluster | module | node | holder
//! ..  MAC                     32  keyed BLAKE3 over every byte before it
//! ```
//!
//! Only the framing is read before the MAC matched (constant-time
//! comparison). An answer is taken only for the request it echoes (nonce,
//! cluster, module, node, generation), so a captured answer replayed later
//! matches no outstanding request.

const MAGIC: &[u8; 4] = b"SKWT";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 34;
const MAC_LEN: usize = 32;
/// Largest datagram sent or accepted.
pub const MAX_LEN: usize = 1200;

/// The witness MAC key, derived from the cluster key file's bytes.
#[derive(Clone)]
pub struct WitnessKey([u8; 32]);

impl WitnessKey {
    /// Derives the key (domain-separated from the heartbeat and replication
    /// keys made from the same cluster key).
    #[must_use]
    pub fn derive(cluster_key: &[u8]) -> Self {
        Self(blake3::derive_key(
            "safekit 2026 witness MAC v1",
            cluster_key,
        ))
    }
}

impl std::fmt::Debug for WitnessKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WitnessKey(..)")
    }
}

/// A node asks for the right to write `generation` of `module` without
/// its peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Cluster name.
    pub cluster: String,
    /// Mirror module.
    pub module: String,
    /// Asking node.
    pub node: String,
    /// The generation it would write.
    pub generation: u64,
    /// Random, echoed in the answer.
    pub nonce: u64,
}

/// The witness's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The asking node holds the grant.
    Granted,
    /// Another node holds it for this generation (or a later one).
    Refused,
}

/// An answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The request answered.
    pub request: Request,
    /// Granted or refused.
    pub verdict: Verdict,
    /// The node holding the grant now.
    pub holder: String,
    /// The generation it holds.
    pub held: u64,
}

/// A decoded, authenticated datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// From a node.
    Request(Request),
    /// From the witness.
    Answer(Answer),
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Too short, bad magic or version, lengths that do not add up.
    #[error("malformed witness datagram")]
    Malformed,
    /// The MAC does not match: not made with this cluster key, or altered.
    #[error("witness datagram not authenticated by the cluster key")]
    BadMac,
    /// Names that are not UTF-8, or an unknown kind.
    #[error("witness datagram with invalid contents")]
    Invalid,
}

/// A name too long for the format.
#[derive(Debug, thiserror::Error)]
#[error("witness field {field} is {len} bytes, at most 255 allowed")]
pub struct EncodeError {
    field: &'static str,
    len: usize,
}

fn len_u8(field: &'static str, s: &str) -> Result<u8, EncodeError> {
    u8::try_from(s.len()).map_err(|_| EncodeError {
        field,
        len: s.len(),
    })
}

fn encode(
    kind: u8,
    r: &Request,
    held: u64,
    holder: &str,
    key: &WitnessKey,
) -> Result<Vec<u8>, EncodeError> {
    let lens = [
        len_u8("cluster", &r.cluster)?,
        len_u8("module", &r.module)?,
        len_u8("node", &r.node)?,
        len_u8("holder", holder)?,
    ];
    let mut out = Vec::with_capacity(HEADER_LEN + 4 * 255 + MAC_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&r.generation.to_be_bytes());
    out.extend_from_slice(&r.nonce.to_be_bytes());
    out.extend_from_slice(&held.to_be_bytes());
    out.extend_from_slice(&lens);
    for s in [&r.cluster, &r.module, &r.node, holder] {
        out.extend_from_slice(s.as_bytes());
    }
    let mac = blake3::keyed_hash(&key.0, &out);
    out.extend_from_slice(mac.as_bytes());
    Ok(out)
}

/// Encodes a request.
pub fn encode_request(r: &Request, key: &WitnessKey) -> Result<Vec<u8>, EncodeError> {
    encode(1, r, 0, "", key)
}

/// Encodes an answer.
pub fn encode_answer(a: &Answer, key: &WitnessKey) -> Result<Vec<u8>, EncodeError> {
    let kind = match a.verdict {
        Verdict::Granted => 2,
        Verdict::Refused => 3,
    };
    encode(kind, &a.request, a.held, &a.holder, key)
}

fn be_u64(b: &[u8], at: usize) -> Result<u64, DecodeError> {
    let bytes: [u8; 8] = b
        .get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .ok_or(DecodeError::Malformed)?;
    Ok(u64::from_be_bytes(bytes))
}

/// Decodes and authenticates a datagram.
pub fn decode(buf: &[u8], key: &WitnessKey) -> Result<Message, DecodeError> {
    if buf.len() < HEADER_LEN + MAC_LEN || buf.len() > MAX_LEN {
        return Err(DecodeError::Malformed);
    }
    if &buf[..4] != MAGIC || buf[4] != VERSION {
        return Err(DecodeError::Malformed);
    }
    let lens = &buf[30..34];
    let names: usize = lens.iter().map(|l| usize::from(*l)).sum();
    if buf.len() != HEADER_LEN + names + MAC_LEN {
        return Err(DecodeError::Malformed);
    }
    let (body, mac) = buf.split_at(buf.len() - MAC_LEN);
    let expected = blake3::keyed_hash(&key.0, body);
    let mac: [u8; MAC_LEN] = mac.try_into().map_err(|_| DecodeError::Malformed)?;
    // blake3::Hash's PartialEq<[u8; 32]> is constant time.
    if expected != mac {
        return Err(DecodeError::BadMac);
    }
    let mut at = HEADER_LEN;
    let mut fields = Vec::with_capacity(4);
    for l in lens {
        let l = usize::from(*l);
        let s = std::str::from_utf8(&body[at..at + l]).map_err(|_| DecodeError::Invalid)?;
        fields.push(s.to_owned());
        at += l;
    }
    let holder = fields.pop().unwrap_or_default();
    let node = fields.pop().unwrap_or_default();
    let module = fields.pop().unwrap_or_default();
    let cluster = fields.pop().unwrap_or_default();
    let request = Request {
        cluster,
        module,
        node,
        generation: be_u64(body, 6)?,
        nonce: be_u64(body, 14)?,
    };
    let held = be_u64(body, 22)?;
    let verdict = match body[5] {
        1 if holder.is_empty() && held == 0 => return Ok(Message::Request(request)),
        2 => Verdict::Granted,
        3 => Verdict::Refused,
        _ => return Err(DecodeError::Invalid),
    };
    Ok(Message::Answer(Answer {
        request,
        verdict,
        holder,
        held,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> Request {
        Request {
            cluster: "lab".into(),
            module: "web".into(),
            node: "node1".into(),
            generation: 7,
            nonce: 0xdead_beef,
        }
    }

    #[test]
    fn request_and_answer_round_trip() {
        let k = WitnessKey::derive(&[7; 32]);
        let r = req();
        let b = encode_request(&r, &k).unwrap();
        assert_eq!(decode(&b, &k), Ok(Message::Request(r.clone())));
        let a = Answer {
            request: r,
            verdict: Verdict::Refused,
            holder: "node2".into(),
            held: 7,
        };
        let b = encode_answer(&a, &k).unwrap();
        assert_eq!(decode(&b, &k), Ok(Message::Answer(a)));
    }

    #[test]
    fn another_key_a_flipped_bit_or_a_truncation_is_rejected() {
        let k = WitnessKey::derive(&[7; 32]);
        let b = encode_request(&req(), &k).unwrap();
        assert_eq!(
            decode(&b, &WitnessKey::derive(&[8; 32])),
            Err(DecodeError::BadMac)
        );
        for i in 5..b.len() {
            let mut c = b.clone();
            c[i] ^= 1;
            assert!(decode(&c, &k).is_err(), "bit flipped at {i} accepted");
        }
        for n in 0..b.len() {
            assert!(decode(&b[..n], &k).is_err(), "truncated to {n} accepted");
        }
    }
}
