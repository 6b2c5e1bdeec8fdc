//! The replication channel refuses peers without the cluster key and drops
//! tampered or replayed frames (no privilege needed).

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    thread,
    time::Duration,
};

use safekit::{
    config::AsyncMode,
    rfs::{
        ChannelError, ChannelKey, Cipher, SecondaryConfig, SecondaryEvent,
        channel::{accept, connect, connect_with},
        proto::{self, Message, Op, RelPath, Timestamp},
        serve,
    },
};

const KEY: [u8; 32] = [42; 32];
const T: Duration = Duration::from_secs(5);

fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut body).ok()?;
    let mut f = len.to_vec();
    f.extend_from_slice(&body);
    Some(f)
}

/// How the man in the middle treats the second transport frame from the
/// client.
#[derive(Clone, Copy)]
enum Mitm {
    Flip,
    Replay,
}

/// client → proxy → server; returns what the server received. The client
/// sends a hello, then an operation: small (one frame), or a 1 MiB write (17
/// frames, the proxy altering one in the middle).
fn through_mitm(mode: Mitm, big: bool) -> (Message, Result<Message, ChannelError>) {
    // Frame 0 is the handshake's, 1 the hello.
    let altered = if big { 6 } else { 2 };
    let server_l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy_l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server_addr = server_l.local_addr().expect("addr");
    let proxy_addr = proxy_l.local_addr().expect("addr");
    let proxy = thread::spawn(move || {
        let (mut c, _) = proxy_l.accept().expect("accept");
        let mut s = TcpStream::connect(server_addr).expect("connect");
        // Server → client: copied as is.
        let (mut s2, mut c2) = (s.try_clone().expect("clone"), c.try_clone().expect("clone"));
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s2.read(&mut buf) {
                if n == 0 || c2.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        // Client → server: handshake, frames before `altered` untouched,
        // `altered` flipped or replaced by the one before.
        let mut previous = None;
        for i in 0..=altered {
            let Some(mut f) = read_frame(&mut c) else {
                return;
            };
            if i + 1 == altered {
                previous = Some(f.clone());
            }
            if i == altered {
                match mode {
                    Mitm::Flip => {
                        let last = f.len() - 20;
                        f[last] ^= 0x01;
                    }
                    Mitm::Replay => f = previous.clone().expect("the frame before"),
                }
            }
            if s.write_all(&f).is_err() {
                return;
            }
        }
    });
    let key = ChannelKey::from_cluster_key(&KEY).expect("key");
    let k2 = key.clone();
    let server = thread::spawn(move || {
        let (s, _) = server_l.accept().expect("accept");
        let (_tx, mut rx) = accept(s, &k2, T).expect("handshake");
        let first = rx.recv().expect("first message");
        (first, rx.recv())
    });
    let c = TcpStream::connect(proxy_addr).expect("connect");
    let (mut tx, _rx) = connect(c, &key, T).expect("handshake through the proxy");
    tx.send(&Message::Hello {
        version: proto::VERSION,
        dir: "/data".into(),
    })
    .expect("send");
    let op = if big {
        Op::Write {
            path: RelPath::new("victim").expect("path"),
            offset: 0,
            data: vec![0x33; 1 << 20],
            mtime: Timestamp::default(),
        }
    } else {
        Op::Unlink {
            path: RelPath::new("victim").expect("path"),
            dir_mtime: Timestamp::default(),
        }
    };
    // The proxy closes after the altered frame: the rest may not be sent.
    let _ = tx.send(&Message::Op { seq: 1, op });
    let r = server.join().expect("server");
    let _ = proxy.join();
    r
}

#[test]
fn a_tampered_frame_is_rejected() {
    for big in [false, true] {
        let (first, second) = through_mitm(Mitm::Flip, big);
        assert!(matches!(first, Message::Hello { .. }));
        assert!(matches!(second, Err(ChannelError::Tampered)), "{second:?}");
    }
}

#[test]
fn a_replayed_frame_is_rejected() {
    for big in [false, true] {
        let (first, second) = through_mitm(Mitm::Replay, big);
        assert!(matches!(first, Message::Hello { .. }));
        assert!(matches!(second, Err(ChannelError::Tampered)), "{second:?}");
    }
}

#[test]
fn a_client_without_the_key_can_neither_connect_nor_inject() {
    let dir = std::env::temp_dir().join(format!("rfs-channel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("victim"), b"keep").expect("write");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
    rt.spawn(serve(
        listener,
        SecondaryConfig {
            dirs: vec![("/data".into(), dir.clone())],
            key: KEY.to_vec(),
            async_mode: AsyncMode::None,
            handshake_timeout: T,
        },
        Some(ev_tx),
    ));
    // A wrong key: the handshake fails on both sides.
    let wrong = ChannelKey::from_cluster_key(&[7; 32]).expect("key");
    let c = TcpStream::connect(addr).expect("connect");
    assert!(connect(c, &wrong, T).is_err());
    // Raw bytes that look like frames: refused, nothing applied.
    let mut c = TcpStream::connect(addr).expect("connect");
    let mut junk = vec![0u8, 48];
    junk.extend_from_slice(&[0x55; 48]);
    let _ = c.write_all(&junk);
    let mut buf = [0u8; 16];
    let _ = c.set_read_timeout(Some(T));
    assert!(
        matches!(c.read(&mut buf), Ok(0) | Err(_)),
        "server must close"
    );
    // Refused before authentication: counted and logged by the listener
    // (rate-limited), never an event for the daemon to act on.
    assert!(ev_rx.try_recv().is_err());
    assert_eq!(std::fs::read(dir.join("victim")).expect("read"), b"keep");
    // The right key, an unknown directory: refused with a reason.
    let key = ChannelKey::from_cluster_key(&KEY).expect("key");
    let c = TcpStream::connect(addr).expect("connect");
    let (mut tx, mut rx) = connect(c, &key, T).expect("handshake");
    tx.send(&Message::Hello {
        version: proto::VERSION,
        dir: "/elsewhere".into(),
    })
    .expect("send");
    rx.set_read_timeout(Some(T)).expect("timeout");
    assert!(matches!(rx.recv(), Ok(Message::Bye { .. })));
    // A key holder's refusal is an event.
    let ev = rt
        .block_on(async { tokio::time::timeout(T, ev_rx.recv()).await })
        .expect("event in time");
    assert!(matches!(ev, Some(SecondaryEvent::Refused { .. })), "{ev:?}");
    let _ = std::fs::remove_dir_all(PathBuf::from(&dir));
}

/// A server that accepts one connection and returns its first message.
fn one_message_server() -> (
    std::net::SocketAddr,
    thread::JoinHandle<Result<Message, ChannelError>>,
) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let server = thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        let key = ChannelKey::from_cluster_key(&KEY).expect("key");
        let (_tx, mut rx) = accept(s, &key, T)?;
        rx.set_read_timeout(Some(T))?;
        rx.recv()
    });
    (addr, server)
}

#[test]
fn both_ciphers_connect_and_carry_messages() {
    let key = ChannelKey::from_cluster_key(&KEY).expect("key");
    let hello = Message::Hello {
        version: proto::VERSION,
        dir: "/data".into(),
    };
    println!("this machine proposes {}", Cipher::preferred().name());
    for cipher in [Cipher::ChaChaPoly, Cipher::AesGcm] {
        let (addr, server) = one_message_server();
        let c = TcpStream::connect(addr).expect("connect");
        let (mut tx, _rx) = connect_with(c, &key, T, cipher).expect("handshake");
        assert_eq!(tx.cipher(), cipher);
        tx.send(&hello).expect("send");
        let got = server.join().expect("server thread").expect("received");
        assert_eq!(got, hello, "{}", cipher.name());
    }
}

#[test]
fn an_altered_cipher_choice_fails_the_handshake() {
    // The proxy rewrites the initiator's cipher byte (AES-256-GCM →
    // ChaCha20-Poly1305): the server must not complete a handshake.
    let (server_addr, server) = one_message_server();
    let proxy_l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let proxy_addr = proxy_l.local_addr().expect("addr");
    let proxy = thread::spawn(move || {
        let (mut c, _) = proxy_l.accept().expect("accept");
        let mut s = TcpStream::connect(server_addr).expect("connect");
        let mut first = read_frame(&mut c).expect("first frame");
        assert_eq!(first[2], 2, "the client proposed AES-256-GCM");
        first[2] = 1;
        s.write_all(&first).expect("forward");
        // Whatever the server answers goes back (it should close).
        let mut buf = [0u8; 4096];
        let _ = s.set_read_timeout(Some(T));
        if let Ok(n) = s.read(&mut buf) {
            let _ = c.write_all(&buf[..n]);
        }
    });
    let key = ChannelKey::from_cluster_key(&KEY).expect("key");
    let c = TcpStream::connect(proxy_addr).expect("connect");
    let client = connect_with(c, &key, T, Cipher::AesGcm);
    assert!(client.is_err(), "the client completed a handshake");
    assert!(
        server.join().expect("server thread").is_err(),
        "the server completed a handshake on an altered cipher"
    );
    proxy.join().expect("proxy thread");
}
