//! The node's side of the arbitrating witness (`[check.splitbrain]
//! arbiter`): asks every arbiter over UDP for the right to write a
//! generation without the peer, retrying until the check's timeout, and
//! reports whether a majority granted it. The decision is the witness's
//! ([`crate::witness::grants`]); only I/O here.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use crate::witness::codec::{self, Answer, Message, Request, Verdict, WitnessKey};

/// How often a request is sent again while no answer came.
const RETRY: Duration = Duration::from_millis(200);

/// What the arbiters said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Outcome {
    /// Granted by a majority of the arbiters.
    pub(super) granted: bool,
    /// For the log: one line per arbiter.
    pub(super) detail: String,
}

/// Asks `arbiters` for `request` (its nonce is chosen here); false unless a
/// majority grants it within `timeout`.
pub(super) async fn ask(
    arbiters: &[SocketAddr],
    mut request: Request,
    key: &WitnessKey,
    timeout: Duration,
) -> Outcome {
    let mut nonce = [0u8; 8];
    if getrandom::fill(&mut nonce).is_err() {
        return Outcome {
            granted: false,
            detail: "no randomness for the request's nonce".into(),
        };
    }
    request.nonce = u64::from_be_bytes(nonce);
    let deadline = tokio::time::Instant::now() + timeout;
    let asks = arbiters
        .iter()
        .map(|a| ask_one(*a, &request, key, deadline));
    let answers = futures_util::future::join_all(asks).await;
    let granted = answers
        .iter()
        .filter(|r| matches!(r, Ok(a) if a.verdict == Verdict::Granted))
        .count();
    let detail = arbiters
        .iter()
        .zip(&answers)
        .map(|(addr, r)| match r {
            Ok(a) if a.verdict == Verdict::Granted => format!("{addr}: granted"),
            Ok(a) => format!("{addr}: refused ({} holds generation {})", a.holder, a.held),
            Err(e) => format!("{addr}: {e}"),
        })
        .collect::<Vec<_>>()
        .join("; ");
    Outcome {
        granted: granted * 2 > arbiters.len(),
        detail: format!(
            "generation {} asked of {} arbiter(s): {detail}",
            request.generation,
            arbiters.len()
        ),
    }
}

async fn ask_one(
    addr: SocketAddr,
    request: &Request,
    key: &WitnessKey,
    deadline: tokio::time::Instant,
) -> Result<Answer, String> {
    let bytes = codec::encode_request(request, key).map_err(|e| e.to_string())?;
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(local)
        .await
        .map_err(|e| format!("socket: {e}"))?;
    let mut buf = [0u8; codec::MAX_LEN + 1];
    let mut last_error = "no answer".to_owned();
    loop {
        if let Err(e) = sock.send_to(&bytes, addr).await {
            last_error = format!("no answer (send: {e})");
        }
        let wait = tokio::time::Instant::now() + RETRY;
        loop {
            let until = wait.min(deadline);
            match tokio::time::timeout_at(until, sock.recv_from(&mut buf)).await {
                Err(_) => break,
                Ok(Err(e)) => {
                    last_error = format!("no answer (receive: {e})");
                    // An ICMP error (port unreachable) comes back as a
                    // receive error: wait for the next retry.
                    tokio::time::sleep_until(until).await;
                    break;
                }
                Ok(Ok((n, from))) => {
                    if from != addr {
                        continue;
                    }
                    // Anything else (not authenticated, another request's
                    // answer, a replay) is ignored.
                    if let Ok(Message::Answer(a)) = codec::decode(&buf[..n], key)
                        && a.request == *request
                    {
                        return Ok(a);
                    }
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(last_error);
        }
    }
}
