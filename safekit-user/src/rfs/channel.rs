//! The replication channel: an authenticated, encrypted TCP stream keyed by
//! the cluster key.
//!
//! # Design
//!
//! The handshake is the Noise protocol `Noise_NNpsk0_25519_<cipher>_BLAKE2s`
//! (through `snow`): both sides mix a 32-byte pre-shared key into the very
//! first message, then exchange ephemeral X25519 keys. The transport cipher
//! ([`Cipher`]) is the initiator's choice: AES-256-GCM where the CPU has
//! AES-NI and it measured faster than ChaCha20-Poly1305 here (sealing a few
//! MiB with each, once per process), ChaCha20-Poly1305 otherwise. The choice
//! travels as one byte before the first handshake message; the responder
//! builds its handshake with that protocol name, which both sides hash into
//! the handshake: a byte altered on the way makes the handshake fail, never
//! a session on another cipher. The PSK is derived from
//! the cluster key with BLAKE3 in key-derivation mode under a context string of
//! its own, so the raw cluster key (also the heartbeat MAC key) is never used
//! for two purposes.
//!
//! Why Noise with a PSK rather than TLS 1.3 (rustls): the cluster's only
//! credential is a shared secret. rustls has no external-PSK mode, so TLS
//! would need certificates derived from the key, a pinning verifier and a C or
//! assembly crypto backend; `NNpsk0` is the exact shape "both ends know a
//! secret", is formally analysed and gives mutual authentication and forward
//! secrecy (ephemeral DH). The transport cipher is ring's assembly (snow's
//! `ring-accelerated`: twice the pure-Rust cipher's speed, the same protocol);
//! X25519 and BLAKE2s are pure Rust. The guarantees are those SPEC §9 asks of
//! TLS 1.3:
//!
//! - A peer without the key cannot connect: the responder cannot decrypt the
//!   first handshake message (its payload is sealed under a key that depends on
//!   the PSK) and closes; a responder without the key cannot produce a second
//!   message the initiator accepts. The initiator is proven live only by its
//!   first transport message, and the secondary acts on nothing before it (the
//!   [`Message::Hello`](super::proto::Message::Hello)).
//! - No injection, alteration, reordering or replay: every frame is sealed with
//!   ChaCha20-Poly1305 under the session's keys and an implicit per-direction
//!   counter nonce, so a changed, dropped-and-replayed or reordered frame fails
//!   to decrypt and the connection is dropped; frames from an older session
//!   fail too (fresh ephemeral keys).
//!
//! # Framing
//!
//! On the wire: `u16` big-endian length, then a Noise message (at most 65535
//! bytes: ciphertext and 16-byte tag). The plaintexts form one byte stream in
//! which each protocol message is a `u32` little-endian length then its
//! encoding ([`super::proto`]). Where the stream is cut into frames is the
//! sender's choice and means nothing to the receiver, which only
//! concatenates: a 1 MiB write spans 17 frames, and many small messages share
//! one. [`ChannelSender::queue`] seals and writes each frame as soon as it is
//! whole, so the peer decrypts one frame while the next is sealed (a large
//! message queued with [`ChannelSender::queue_encoded`] is sealed straight
//! from the caller's buffer); [`ChannelSender::flush`] sends the last, partial
//! frame and reports any write that failed meanwhile. Every frame is
//! authenticated on its own (nonce = its number in the direction), and a
//! message is decoded only once all of its bytes were, in order: a message
//! with a frame altered, dropped, replayed or reordered is never delivered.
//! [`ChannelReceiver::recv`] is resumable after a read timeout, so a caller
//! can poll with short timeouts.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, TcpStream},
    sync::Arc,
    time::Duration,
};

use snow::{
    StatelessTransportState,
    params::{CipherChoice, NoiseParams},
    resolvers::{CryptoResolver, RingResolver},
};
use thiserror::Error;

use super::proto::{self, DecodeError, Message};

/// A transport cipher of the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    /// ChaCha20-Poly1305.
    ChaChaPoly,
    /// AES-256-GCM.
    AesGcm,
}

impl Cipher {
    /// The Noise protocol name with this cipher.
    fn noise(self) -> &'static str {
        match self {
            Self::ChaChaPoly => "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s",
            Self::AesGcm => "Noise_NNpsk0_25519_AESGCM_BLAKE2s",
        }
    }

    /// Its byte on the wire.
    fn byte(self) -> u8 {
        match self {
            Self::ChaChaPoly => 1,
            Self::AesGcm => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::ChaChaPoly),
            2 => Some(Self::AesGcm),
            _ => None,
        }
    }

    /// The name shown in logs and status.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::ChaChaPoly => "ChaCha20-Poly1305",
            Self::AesGcm => "AES-256-GCM",
        }
    }

    /// The cipher this node proposes: AES-256-GCM when the CPU has AES-NI
    /// (and carry-less multiply) and sealing measured faster with it than
    /// with ChaCha20-Poly1305; ChaCha20-Poly1305 otherwise. Measured once
    /// per process (a few milliseconds).
    #[must_use]
    pub fn preferred() -> Self {
        static CHOICE: std::sync::OnceLock<Cipher> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| {
            if !aes_ni() {
                return Self::ChaChaPoly;
            }
            match (
                seal_time(CipherChoice::AESGCM),
                seal_time(CipherChoice::ChaChaPoly),
            ) {
                (Some(aes), Some(chacha)) if aes <= chacha => Self::AesGcm,
                _ => Self::ChaChaPoly,
            }
        })
    }
}

#[cfg(target_arch = "x86_64")]
fn aes_ni() -> bool {
    std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
}

#[cfg(not(target_arch = "x86_64"))]
fn aes_ni() -> bool {
    false
}

/// The best of three times to seal 64 frames of [`MAX_PLAIN`] bytes with
/// `choice` (ring's implementation, the one the channel uses).
fn seal_time(choice: CipherChoice) -> Option<Duration> {
    let mut cipher = RingResolver.resolve_cipher(&choice)?;
    cipher.set(&[0x5a; 32]);
    let plain = vec![0u8; MAX_PLAIN];
    let mut out = vec![0u8; MAX_FRAME];
    (0..3)
        .map(|_| {
            let t = std::time::Instant::now();
            for nonce in 0..64 {
                cipher.encrypt(nonce, &[], &plain, &mut out);
            }
            t.elapsed()
        })
        .min()
}
/// Bound into the handshake: both sides must speak this protocol.
const PROLOGUE: &[u8] = b"safekit rfs replication v1";
/// BLAKE3 derive-key context of the PSK.
const PSK_CONTEXT: &str = "safekit 2026 rfs replication channel psk v1";
/// Largest Noise message.
const MAX_FRAME: usize = 65535;
/// Authentication tag.
const TAG: usize = 16;
/// Largest plaintext in one frame.
const MAX_PLAIN: usize = MAX_FRAME - TAG;
/// Largest protocol message accepted: the largest write, two paths (a
/// rename's) and room for the other fields.
pub const MAX_MESSAGE: usize = proto::MAX_WRITE + 2 * proto::MAX_PATH + 64 * 1024;
/// Shortest cluster key accepted.
pub const MIN_KEY: usize = 32;

/// A replication channel failure.
#[derive(Debug, Error)]
pub enum ChannelError {
    /// The cluster key is shorter than [`MIN_KEY`].
    #[error("cluster key is {0} bytes; at least {MIN_KEY} are needed")]
    ShortKey(usize),
    /// A socket call failed.
    #[error("{op} on the replication connection")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The Noise handshake failed: the peer does not hold the cluster key, or
    /// is not a safekit replication endpoint.
    #[error("handshake refused ({0}): the peer does not hold the cluster key")]
    Handshake(String),
    /// The handshake did not complete in time: a slow or lossy link, or a
    /// peer that is not a safekit replication endpoint. Nothing says it
    /// lacks the key.
    #[error("no complete handshake within {0:?} (a slow or lossy link, or not a safekit peer)")]
    HandshakeTimeout(Duration),
    /// A frame failed authentication: tampered, replayed, reordered or forged.
    #[error("frame failed authentication (tampered, replayed or forged); connection dropped")]
    Tampered,
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    Closed,
    /// A read timeout elapsed; nothing is lost, [`ChannelReceiver::recv`] may
    /// be called again.
    #[error("no data within the read timeout")]
    Timeout,
    /// The peer announced a message larger than [`MAX_MESSAGE`].
    #[error("peer announced a {0}-byte message, above the limit")]
    TooLarge(usize),
    /// A message that does not decode.
    #[error("undecodable message")]
    Decode(#[from] DecodeError),
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> ChannelError {
    move |source| ChannelError::Io { op, source }
}

/// The channel's pre-shared key, derived from the cluster key.
#[derive(Clone)]
pub struct ChannelKey([u8; 32]);

impl std::fmt::Debug for ChannelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelKey(..)")
    }
}

impl ChannelKey {
    /// Derives the channel key from the cluster key (at least 32 bytes).
    pub fn from_cluster_key(cluster_key: &[u8]) -> Result<Self, ChannelError> {
        if cluster_key.len() < MIN_KEY {
            return Err(ChannelError::ShortKey(cluster_key.len()));
        }
        Ok(Self(blake3::derive_key(PSK_CONTEXT, cluster_key)))
    }
}

fn params(cipher: Cipher) -> NoiseParams {
    // A constant, valid protocol name: parsing cannot fail.
    cipher.noise().parse().expect("valid Noise protocol name")
}

#[expect(clippy::needless_pass_by_value, reason = "used as a map_err adapter")]
fn handshake_err(e: snow::Error) -> ChannelError {
    ChannelError::Handshake(e.to_string())
}

fn write_frame(stream: &mut TcpStream, msg: &[u8]) -> Result<(), ChannelError> {
    let len = u16::try_from(msg.len()).map_err(|_| ChannelError::TooLarge(msg.len()))?;
    let mut buf = Vec::with_capacity(2 + msg.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(msg);
    stream.write_all(&buf).map_err(io_err("handshake write"))
}

fn read_frame(stream: &mut TcpStream, timeout: Duration) -> Result<Vec<u8>, ChannelError> {
    let mut len = [0u8; 2];
    read_exact(stream, &mut len, timeout)?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    read_exact(stream, &mut msg, timeout)?;
    Ok(msg)
}

fn read_exact(
    stream: &mut TcpStream,
    buf: &mut [u8],
    timeout: Duration,
) -> Result<(), ChannelError> {
    stream.read_exact(buf).map_err(|e| handshake_io(e, timeout))
}

/// A socket error during the handshake.
fn handshake_io(e: io::Error, timeout: Duration) -> ChannelError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => ChannelError::Closed,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            ChannelError::HandshakeTimeout(timeout)
        }
        _ => ChannelError::Io {
            op: "handshake read",
            source: e,
        },
    }
}

/// Runs the initiator's side of the handshake on a connected stream, with
/// this node's [`Cipher::preferred`].
pub fn connect(
    stream: TcpStream,
    key: &ChannelKey,
    timeout: Duration,
) -> Result<(ChannelSender, ChannelReceiver), ChannelError> {
    connect_with(stream, key, timeout, Cipher::preferred())
}

/// Runs the initiator's side of the handshake proposing `cipher`.
pub fn connect_with(
    stream: TcpStream,
    key: &ChannelKey,
    timeout: Duration,
    cipher: Cipher,
) -> Result<(ChannelSender, ChannelReceiver), ChannelError> {
    handshake(stream, key, timeout, Some(cipher))
}

/// Connects to `peer` (bounded by `timeout`), runs the initiator's side of
/// the handshake and sends `first` (a hello or a verification request).
pub fn dial(
    peer: std::net::SocketAddr,
    key: &ChannelKey,
    timeout: Duration,
    first: &Message,
) -> Result<(ChannelSender, ChannelReceiver), ChannelError> {
    let stream = TcpStream::connect_timeout(&peer, timeout).map_err(|source| ChannelError::Io {
        op: "connect",
        source,
    })?;
    let (mut tx, rx) = connect(stream, key, timeout)?;
    tx.send(first)?;
    Ok((tx, rx))
}

/// Runs the responder's side of the handshake on an accepted stream.
pub fn accept(
    stream: TcpStream,
    key: &ChannelKey,
    timeout: Duration,
) -> Result<(ChannelSender, ChannelReceiver), ChannelError> {
    handshake(stream, key, timeout, None)
}

/// `proposed`: the initiator's cipher (`None`: the responder, which takes
/// the initiator's).
fn handshake(
    mut stream: TcpStream,
    key: &ChannelKey,
    timeout: Duration,
    proposed: Option<Cipher>,
) -> Result<(ChannelSender, ChannelReceiver), ChannelError> {
    stream
        .set_nodelay(true)
        .map_err(io_err("set TCP_NODELAY"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(io_err("set read timeout"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(io_err("set write timeout"))?;
    let builder = |cipher| {
        snow::Builder::new(params(cipher))
            .psk(0, &key.0)
            .and_then(|b| b.prologue(PROLOGUE))
            .map_err(handshake_err)
    };
    let mut buf = vec![0u8; MAX_FRAME];
    // The first frame: the cipher's byte, then the first Noise message.
    let (hs, cipher) = if let Some(cipher) = proposed {
        let mut hs = builder(cipher)?.build_initiator().map_err(handshake_err)?;
        buf[0] = cipher.byte();
        let n = hs
            .write_message(&[], &mut buf[1..])
            .map_err(handshake_err)?;
        write_frame(&mut stream, &buf[..=n])?;
        let reply = read_frame(&mut stream, timeout)?;
        hs.read_message(&reply, &mut buf).map_err(handshake_err)?;
        (hs, cipher)
    } else {
        let first = read_frame(&mut stream, timeout)?;
        let (&byte, msg) = first
            .split_first()
            .ok_or_else(|| ChannelError::Handshake("empty first message".into()))?;
        let cipher = Cipher::from_byte(byte)
            .ok_or_else(|| ChannelError::Handshake(format!("unknown cipher {byte}")))?;
        let mut hs = builder(cipher)?.build_responder().map_err(handshake_err)?;
        if let Err(e) = hs.read_message(msg, &mut buf) {
            // Dropping the stream closes it: the peer learns nothing more.
            return Err(handshake_err(e));
        }
        let n = hs.write_message(&[], &mut buf).map_err(handshake_err)?;
        write_frame(&mut stream, &buf[..n])?;
        (hs, cipher)
    };
    let noise = hs.into_stateless_transport_mode().map_err(handshake_err)?;
    established(stream, noise, cipher, &[])
}

/// The channel over a stream whose handshake is done with `cipher`;
/// `already_read` is wire data read past the handshake (whole frames),
/// delivered first.
fn established(
    stream: TcpStream,
    noise: StatelessTransportState,
    cipher: Cipher,
    already_read: &[u8],
) -> Result<(ChannelSender, ChannelReceiver), ChannelError> {
    let noise = Arc::new(noise);
    stream
        .set_nodelay(true)
        .map_err(io_err("set TCP_NODELAY"))?;
    stream
        .set_read_timeout(None)
        .map_err(io_err("set read timeout"))?;
    stream
        .set_write_timeout(None)
        .map_err(io_err("set write timeout"))?;
    let rx = stream.try_clone().map_err(io_err("clone socket"))?;
    let mut receiver = ChannelReceiver::new(rx, Arc::clone(&noise));
    receiver.raw[..already_read.len()].copy_from_slice(already_read);
    receiver.raw_end = already_read.len();
    Ok((
        ChannelSender {
            cipher,
            sealer: Sealer {
                stream,
                noise,
                nonce: 0,
                frame: vec![0u8; 2 + MAX_FRAME],
                failed: None,
                dead: false,
            },
            pending: Vec::new(),
        },
        receiver,
    ))
}

/// Largest frame a peer may send before it proved it holds the key: the
/// handshake's first message, and the first transport frame (a hello with
/// a path of at most 4 KiB).
const MAX_UNAUTHENTICATED_FRAME: usize = 8192;

/// Reads one frame (length, then the Noise message) from a connection
/// that has not authenticated yet.
async fn read_frame_async(stream: &mut tokio::net::TcpStream) -> Result<Vec<u8>, ChannelError> {
    use tokio::io::AsyncReadExt as _;
    let eof = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => ChannelError::Closed,
        _ => ChannelError::Io {
            op: "handshake read",
            source: e,
        },
    };
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(eof)?;
    let len = usize::from(u16::from_be_bytes(len));
    if len > MAX_UNAUTHENTICATED_FRAME {
        return Err(ChannelError::Handshake(format!(
            "a {len}-byte frame before authentication"
        )));
    }
    let mut msg = vec![0u8; len];
    stream.read_exact(&mut msg).await.map_err(eof)?;
    Ok(msg)
}

/// Runs the responder's side of the handshake on an accepted connection
/// without a thread, within `deadline` in all (not per read), and waits
/// for the initiator's first transport frame — the first proof that it
/// holds the key, since a replayed first handshake message cannot produce
/// it. Only then does the connection become a (blocking) channel, that
/// frame delivered first. So a peer without the key, or one that stalls,
/// costs a task and a few KiB for at most `deadline`, never a thread.
pub async fn accept_async(
    mut stream: tokio::net::TcpStream,
    key: &ChannelKey,
    deadline: Duration,
) -> Result<(ChannelSender, ChannelReceiver), ChannelError> {
    use tokio::io::AsyncWriteExt as _;
    let run = async {
        // The first frame: the initiator's cipher byte, then its first
        // Noise message.
        let first = read_frame_async(&mut stream).await?;
        let (&byte, msg) = first
            .split_first()
            .ok_or_else(|| ChannelError::Handshake("empty first message".into()))?;
        let cipher = Cipher::from_byte(byte)
            .ok_or_else(|| ChannelError::Handshake(format!("unknown cipher {byte}")))?;
        let mut hs = snow::Builder::new(params(cipher))
            .psk(0, &key.0)
            .and_then(|b| b.prologue(PROLOGUE))
            .and_then(snow::Builder::build_responder)
            .map_err(handshake_err)?;
        let mut buf = vec![0u8; MAX_UNAUTHENTICATED_FRAME + 2];
        hs.read_message(msg, &mut buf).map_err(handshake_err)?;
        let n = hs
            .write_message(&[], &mut buf[2..])
            .map_err(handshake_err)?;
        let len = u16::try_from(n).map_err(|_| ChannelError::TooLarge(n))?;
        buf[..2].copy_from_slice(&len.to_be_bytes());
        stream
            .write_all(&buf[..2 + n])
            .await
            .map_err(io_err("handshake write"))?;
        let noise = hs.into_stateless_transport_mode().map_err(handshake_err)?;
        let frame = read_frame_async(&mut stream).await?;
        noise
            .read_message(0, &frame, &mut buf)
            .map_err(|_| ChannelError::Tampered)?;
        Ok::<_, ChannelError>((noise, frame, cipher))
    };
    let (noise, frame, cipher) = tokio::time::timeout(deadline, run)
        .await
        .map_err(|_| ChannelError::HandshakeTimeout(deadline))??;
    let stream = stream.into_std().map_err(io_err("detach socket"))?;
    stream
        .set_nonblocking(false)
        .map_err(io_err("set blocking"))?;
    let len = u16::try_from(frame.len()).map_err(|_| ChannelError::TooLarge(frame.len()))?;
    let mut wire = len.to_be_bytes().to_vec();
    wire.extend_from_slice(&frame);
    established(stream, noise, cipher, &wire)
}

/// The sending half of a channel.
pub struct ChannelSender {
    /// The transport cipher negotiated.
    cipher: Cipher,
    sealer: Sealer,
    /// Plaintext stream not yet sealed: less than a frame between calls.
    pending: Vec<u8>,
}

/// Seals frames and writes each at once.
struct Sealer {
    stream: TcpStream,
    noise: Arc<StatelessTransportState>,
    nonce: u64,
    /// One frame on the wire: length, then the Noise message.
    frame: Vec<u8>,
    /// A write failed while queueing: reported by the next flush, and
    /// nothing more is sent.
    failed: Option<ChannelError>,
    /// The failure was reported; later flushes report the connection closed.
    dead: bool,
}

impl Sealer {
    /// Seals `plain` (at most [`MAX_PLAIN`] bytes) into one frame and writes
    /// it; after a failure, drops it.
    fn send(&mut self, plain: &[u8]) {
        if self.failed.is_some() || self.dead {
            return;
        }
        let sealed = self
            .noise
            .write_message(self.nonce, plain, &mut self.frame[2..])
            .map_err(|e| ChannelError::Handshake(format!("seal: {e}")));
        let n = match sealed {
            Ok(n) => n,
            Err(e) => {
                self.failed = Some(e);
                return;
            }
        };
        self.nonce += 1;
        // n <= MAX_FRAME, which fits u16.
        let len = u16::try_from(n).unwrap_or(u16::MAX);
        self.frame[..2].copy_from_slice(&len.to_be_bytes());
        if let Err(e) = self.stream.write_all(&self.frame[..2 + n]) {
            self.failed = Some(match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ChannelError::Closed,
                _ => ChannelError::Io {
                    op: "send",
                    source: e,
                },
            });
        }
    }

    /// The failure met since the last call, if any.
    fn result(&mut self) -> Result<(), ChannelError> {
        if let Some(e) = self.failed.take() {
            self.dead = true;
            return Err(e);
        }
        if self.dead {
            return Err(ChannelError::Closed);
        }
        Ok(())
    }
}

impl std::fmt::Debug for ChannelSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSender")
            .field("nonce", &self.sealer.nonce)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl ChannelSender {
    /// The transport cipher of this connection.
    #[must_use]
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Appends a message to the stream. Every whole frame is sealed and
    /// written at once (blocking); the rest waits for [`flush`](Self::flush),
    /// which also reports a write that failed here.
    pub fn queue(&mut self, msg: &Message) {
        let start = self.pending.len();
        self.pending.extend_from_slice(&[0; 4]);
        proto::encode(&mut self.pending, msg);
        self.seal_length(start);
        self.send_whole_frames();
    }

    /// Appends an already encoded message (see [`proto::encode`]), like
    /// [`queue`](Self::queue). The frames that lie wholly within `encoded`
    /// are sealed straight from it: a large message is not copied first.
    pub fn queue_encoded(&mut self, encoded: &[u8]) {
        // Messages are bounded far below 4 GiB by the FUSE side.
        let len = u32::try_from(encoded.len()).unwrap_or(u32::MAX);
        self.pending.extend_from_slice(&len.to_le_bytes());
        self.send_whole_frames();
        let mut rest = encoded;
        // Complete the partial frame first.
        while !rest.is_empty() && !self.pending.is_empty() {
            let take = MAX_PLAIN.saturating_sub(self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            self.send_whole_frames();
        }
        let whole = rest.len() - rest.len() % MAX_PLAIN;
        for chunk in rest[..whole].chunks(MAX_PLAIN) {
            self.sealer.send(chunk);
        }
        self.pending.extend_from_slice(&rest[whole..]);
    }

    fn seal_length(&mut self, start: usize) {
        let len = self.pending.len() - start - 4;
        // Messages are bounded far below 4 GiB by the FUSE side.
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        self.pending[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// Seals and writes every whole frame of `pending`, keeping the rest.
    fn send_whole_frames(&mut self) {
        let whole = self.pending.len() - self.pending.len() % MAX_PLAIN;
        if whole == 0 {
            return;
        }
        for chunk in self.pending[..whole].chunks(MAX_PLAIN) {
            self.sealer.send(chunk);
        }
        self.pending.drain(..whole);
    }

    /// Bytes queued and not yet sent (less than one frame).
    #[must_use]
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Seals and writes what is queued (blocking); reports any write that
    /// failed since the last flush, after which nothing more is sent.
    pub fn flush(&mut self) -> Result<(), ChannelError> {
        self.send_whole_frames();
        if !self.pending.is_empty() {
            self.sealer.send(&self.pending);
            self.pending.clear();
        }
        self.sealer.result()
    }

    /// Queues and flushes one message.
    pub fn send(&mut self, msg: &Message) -> Result<(), ChannelError> {
        self.queue(msg);
        self.flush()
    }

    /// Bounds how long a blocked write may wait.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> Result<(), ChannelError> {
        self.sealer
            .stream
            .set_write_timeout(t)
            .map_err(io_err("set write timeout"))
    }

    /// A handle that can shut the connection down from another thread,
    /// unblocking both halves.
    pub fn shutdown_handle(&self) -> Result<ShutdownHandle, ChannelError> {
        Ok(ShutdownHandle(
            self.sealer
                .stream
                .try_clone()
                .map_err(io_err("clone socket"))?,
        ))
    }
}

/// Shuts a channel's socket down (both directions).
#[derive(Debug)]
pub struct ShutdownHandle(TcpStream);

impl ShutdownHandle {
    /// Shuts the socket down; blocked reads and writes return.
    pub fn shutdown(&self) {
        // Already shut down or closed: nothing left to do.
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

/// Ciphertext read buffer: room for a few frames per `read`.
const RAW_BUF: usize = 4 * (2 + MAX_FRAME);

/// The receiving half of a channel. `S` is the byte stream it reads: the
/// TCP connection, or (fuzzing) a byte slice.
pub struct ChannelReceiver<S = TcpStream> {
    stream: S,
    noise: Arc<StatelessTransportState>,
    nonce: u64,
    /// Ciphertext read; `raw[raw_start..raw_end]` is not yet decrypted.
    /// Allocated (and zeroed) once.
    raw: Vec<u8>,
    raw_start: usize,
    raw_end: usize,
    /// Decrypted stream; `plain[pos..end]` is not yet consumed. Frames are
    /// decrypted straight into it; it only grows (to the largest message
    /// seen plus a frame), so nothing is zeroed again.
    plain: Vec<u8>,
    pos: usize,
    end: usize,
}

impl<S> std::fmt::Debug for ChannelReceiver<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelReceiver")
            .field("nonce", &self.nonce)
            .finish_non_exhaustive()
    }
}

impl ChannelReceiver {
    /// Sets the read timeout: [`recv`](Self::recv) then returns
    /// [`ChannelError::Timeout`] when nothing arrives in time.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<(), ChannelError> {
        self.stream
            .set_read_timeout(t)
            .map_err(io_err("set read timeout"))
    }
}

impl<S: Read> ChannelReceiver<S> {
    fn new(stream: S, noise: Arc<StatelessTransportState>) -> Self {
        Self {
            stream,
            noise,
            nonce: 0,
            raw: vec![0u8; RAW_BUF],
            raw_start: 0,
            raw_end: 0,
            plain: Vec::new(),
            pos: 0,
            end: 0,
        }
    }

    /// Whether a whole message is already decrypted (the next
    /// [`recv`](Self::recv) will not block).
    #[must_use]
    pub fn has_buffered(&self) -> bool {
        self.whole_message().is_some()
    }

    fn whole_message(&self) -> Option<usize> {
        let avail = &self.plain[self.pos..self.end];
        let len = u32::from_le_bytes(avail.get(..4)?.try_into().ok()?) as usize;
        (avail.len() >= 4 + len).then_some(len)
    }

    /// Receives the next message (blocking, up to the read timeout).
    pub fn recv(&mut self) -> Result<Message, ChannelError> {
        let len = loop {
            if let Some(len) = self.whole_message() {
                break len;
            }
            if let Some(avail) = self.plain[self.pos..self.end].get(..4) {
                let len = u32::from_le_bytes(avail.try_into().unwrap_or([0; 4])) as usize;
                if len > MAX_MESSAGE {
                    return Err(ChannelError::TooLarge(len));
                }
            }
            self.read_frame()?;
        };
        let start = self.pos + 4;
        let msg = proto::decode(&self.plain[start..start + len]);
        self.pos = start + len;
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        }
        Ok(msg?)
    }

    /// Reads until one more frame is decrypted into `plain`.
    fn read_frame(&mut self) -> Result<(), ChannelError> {
        loop {
            let have = &self.raw[self.raw_start..self.raw_end];
            if let Some(head) = have.get(..2) {
                let len = usize::from(u16::from_be_bytes([head[0], head[1]]));
                if have.len() >= 2 + len {
                    self.decrypt(len)?;
                    return Ok(());
                }
            }
            if self.raw.len() - self.raw_end < 2 + MAX_FRAME {
                // Too little room for a whole frame: move the partial one
                // to the front.
                self.raw.copy_within(self.raw_start..self.raw_end, 0);
                self.raw_end -= self.raw_start;
                self.raw_start = 0;
            }
            match self.stream.read(&mut self.raw[self.raw_end..]) {
                Ok(0) => return Err(ChannelError::Closed),
                Ok(n) => self.raw_end += n,
                Err(e) => {
                    return Err(match e.kind() {
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                            ChannelError::Timeout
                        }
                        io::ErrorKind::Interrupted => continue,
                        io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected => {
                            ChannelError::Closed
                        }
                        _ => ChannelError::Io {
                            op: "receive",
                            source: e,
                        },
                    });
                }
            }
        }
    }

    /// Decrypts the whole frame (`len` bytes after its length) at
    /// `raw_start` onto the end of `plain`.
    fn decrypt(&mut self, len: usize) -> Result<(), ChannelError> {
        if self.pos > 0 {
            // What is left of a message: at most a frame or so.
            self.plain.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        // Room for the whole ciphertext, tag included: ring opens in place
        // only then (else it allocates a copy).
        if self.plain.len() < self.end + len {
            self.plain.resize(self.end + len, 0);
        }
        let body = self.raw_start + 2;
        let n = self
            .noise
            .read_message(
                self.nonce,
                &self.raw[body..body + len],
                &mut self.plain[self.end..self.end + len],
            )
            .map_err(|_| ChannelError::Tampered)?;
        self.nonce += 1;
        self.end += n;
        self.raw_start = body + len;
        if self.raw_start == self.raw_end {
            self.raw_start = 0;
            self.raw_end = 0;
        }
        Ok(())
    }
}

/// For the fuzz targets (`fuzz/`): a channel's two ends without sockets.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod fuzzing {
    use super::{
        Arc, ChannelError, ChannelKey, ChannelReceiver, MAX_FRAME, PROLOGUE,
        StatelessTransportState, handshake_err, params,
    };

    /// Largest plaintext in one frame.
    pub(crate) const MAX_PLAIN: usize = super::MAX_PLAIN;

    /// The initiator's and the responder's transport states after a
    /// handshake run in memory.
    pub(crate) fn transport_pair(
        key: &ChannelKey,
    ) -> Result<(StatelessTransportState, StatelessTransportState), ChannelError> {
        let builder = || {
            snow::Builder::new(params(super::Cipher::preferred()))
                .psk(0, &key.0)
                .and_then(|b| b.prologue(PROLOGUE))
                .map_err(handshake_err)
        };
        let mut initiator = builder()?.build_initiator().map_err(handshake_err)?;
        let mut responder = builder()?.build_responder().map_err(handshake_err)?;
        let (mut wire, mut payload) = (vec![0u8; MAX_FRAME], vec![0u8; MAX_FRAME]);
        let n = initiator
            .write_message(&[], &mut wire)
            .map_err(handshake_err)?;
        responder
            .read_message(&wire[..n], &mut payload)
            .map_err(handshake_err)?;
        let n = responder
            .write_message(&[], &mut wire)
            .map_err(handshake_err)?;
        initiator
            .read_message(&wire[..n], &mut payload)
            .map_err(handshake_err)?;
        Ok((
            initiator
                .into_stateless_transport_mode()
                .map_err(handshake_err)?,
            responder
                .into_stateless_transport_mode()
                .map_err(handshake_err)?,
        ))
    }

    /// Appends `plain` (at most a frame's plaintext) sealed as frame number
    /// `nonce`, with its length, as a sender puts it on the wire.
    pub(crate) fn seal(
        noise: &StatelessTransportState,
        nonce: u64,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ChannelError> {
        let mut frame = vec![0u8; MAX_FRAME];
        let n = noise
            .write_message(nonce, plain, &mut frame)
            .map_err(|e| ChannelError::Handshake(format!("seal: {e}")))?;
        let len = u16::try_from(n).map_err(|_| ChannelError::TooLarge(n))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&frame[..n]);
        Ok(())
    }

    /// A receiver reading the wire bytes `stream` with the responder's
    /// transport state.
    pub(crate) fn receiver(
        noise: Arc<StatelessTransportState>,
        stream: &[u8],
    ) -> ChannelReceiver<&[u8]> {
        ChannelReceiver::new(stream, noise)
    }
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, thread};

    use super::*;

    type End = Result<(ChannelSender, ChannelReceiver), ChannelError>;

    fn pair(client_key: &[u8], server_key: &[u8]) -> (End, End) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let sk = ChannelKey::from_cluster_key(server_key).expect("key");
        let server = thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            accept(s, &sk, Duration::from_secs(5))
        });
        let ck = ChannelKey::from_cluster_key(client_key).expect("key");
        let c = TcpStream::connect(addr).expect("connect");
        let client = connect(c, &ck, Duration::from_secs(5));
        (client, server.join().expect("server thread"))
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(matches!(
            ChannelKey::from_cluster_key(&[1; 31]),
            Err(ChannelError::ShortKey(31))
        ));
    }

    #[test]
    fn messages_cross_in_both_directions_big_and_small() {
        let (c, s) = pair(&[7; 32], &[7; 32]);
        let (mut ctx, mut crx) = c.expect("client");
        let (mut stx, mut srx) = s.expect("server");
        let big = Message::Op {
            seq: 1,
            op: proto::Op::Write {
                path: proto::RelPath::new("f").expect("path"),
                offset: 0,
                data: (0..(1u32 << 20) + 3)
                    .map(|i| u8::try_from(i % 251).unwrap_or(0))
                    .collect(),
                mtime: proto::Timestamp::default(),
            },
        };
        ctx.queue(&big);
        for seq in 2..100 {
            ctx.queue(&Message::Ack { seq });
        }
        ctx.flush().expect("flush");
        assert_eq!(srx.recv().expect("recv"), big);
        for seq in 2..100 {
            assert_eq!(srx.recv().expect("recv"), Message::Ack { seq });
        }
        assert!(!srx.has_buffered());
        stx.send(&Message::Welcome {
            sync_id: 1,
            suspects: vec![],
            resume_id: 0,
        })
        .expect("send");
        assert_eq!(
            crx.recv().expect("recv"),
            Message::Welcome {
                sync_id: 1,
                suspects: vec![],
                resume_id: 0,
            }
        );
        // A read timeout loses nothing.
        crx.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        assert!(matches!(crx.recv(), Err(ChannelError::Timeout)));
        stx.send(&Message::Ack { seq: 5 }).expect("send");
        assert_eq!(crx.recv().expect("recv"), Message::Ack { seq: 5 });
    }

    fn write_of(len: usize, seed: u32) -> Message {
        Message::Op {
            seq: u64::from(seed),
            op: proto::Op::Write {
                path: proto::RelPath::new("f").expect("path"),
                offset: 0,
                data: (0..len)
                    .map(|i| u8::try_from((i + seed as usize) % 251).unwrap_or(0))
                    .collect(),
                mtime: proto::Timestamp::default(),
            },
        }
    }

    fn encoded(msg: &Message) -> Vec<u8> {
        let mut v = Vec::new();
        proto::encode(&mut v, msg);
        v
    }

    #[test]
    fn frames_cut_anywhere_in_the_stream_deliver_every_message() {
        let (c, s) = pair(&[7; 32], &[7; 32]);
        let (mut tx, _crx) = c.expect("client");
        let (_stx, mut rx) = s.expect("server");
        // Partial frames before large messages, large messages back to
        // back, sizes around frame multiples, through both queue paths.
        let mut sent = Vec::new();
        for (i, len) in [
            0,
            1,
            MAX_PLAIN - 60,
            MAX_PLAIN,
            3 * MAX_PLAIN + 7,
            1 << 20,
            5,
            2 * MAX_PLAIN - 61,
        ]
        .into_iter()
        .enumerate()
        {
            let seed = u32::try_from(i).unwrap_or(0);
            let msg = write_of(len, seed);
            if i % 2 == 0 {
                tx.queue_encoded(&encoded(&msg));
            } else {
                tx.queue(&msg);
            }
            assert!(tx.pending() < MAX_PLAIN, "whole frames leave at once");
            tx.queue(&Message::Ack {
                seq: 1000 + u64::from(seed),
            });
            sent.push(msg);
            sent.push(Message::Ack {
                seq: 1000 + u64::from(seed),
            });
        }
        let reader = thread::spawn(move || {
            let got: Vec<Message> = (0..sent.len()).map(|_| rx.recv().expect("recv")).collect();
            assert!(!rx.has_buffered());
            (sent, got)
        });
        tx.flush().expect("flush");
        let (sent, got) = reader.join().expect("reader");
        assert_eq!(got.len(), sent.len());
        for (g, s) in got.iter().zip(&sent) {
            assert!(g == s, "a message changed in transit");
        }
    }

    #[test]
    fn a_write_failing_while_queueing_is_reported_by_flush() {
        let (c, s) = pair(&[7; 32], &[7; 32]);
        let (mut tx, _crx) = c.expect("client");
        drop(s);
        let big = encoded(&write_of(1 << 20, 1));
        // The first writes may still land in the socket buffer; the peer's
        // reset then fails one.
        let mut failed = false;
        for _ in 0..64 {
            tx.queue_encoded(&big);
            if tx.flush().is_err() {
                failed = true;
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        assert!(failed, "writes to a closed peer must fail");
        tx.queue_encoded(&big);
        assert!(matches!(tx.flush(), Err(ChannelError::Closed)));
        assert_eq!(tx.pending(), 0);
    }

    #[test]
    fn wrong_key_cannot_connect_either_way() {
        let (c, s) = pair(&[1; 32], &[2; 32]);
        assert!(c.is_err());
        assert!(matches!(s, Err(ChannelError::Handshake(_))), "{s:?}");
    }
}
