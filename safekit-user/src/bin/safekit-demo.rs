//! `safekit-demo`: the lab's demo service. Answers every TCP connection on
//! the given addresses with one line of text (as an HTTP response, so curl
//! and plain TCP clients both read it). Started and stopped by the demo
//! modules' scripts; the pidfile is written once every address listens, so
//! a script can wait for it.
//!
//! By default it answers once and closes (HTTP/1.0). With `--keepalive N`
//! it speaks HTTP/1.1 keep-alive: up to N requests per connection (the last
//! answered with `Connection: close`, as nginx's `keepalive_requests`), a
//! request with `Connection: close` (or HTTP/1.0 without keep-alive) ends
//! it too; it closes by sending FIN
//! and reading until the client closes (a lingering close, so a request
//! racing the close never draws a reset).

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::Duration,
};

use clap::Parser;

/// Demo TCP/HTTP service for the safekit lab.
#[derive(Parser)]
struct Args {
    /// Address to listen on (repeatable), e.g. 0.0.0.0:80.
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// Text of every answer (e.g. the node name).
    #[arg(long)]
    text: String,
    /// Write the pid here once listening.
    #[arg(long)]
    pidfile: Option<PathBuf>,
    /// HTTP/1.1 keep-alive, at most this many requests per connection.
    #[arg(long)]
    keepalive: Option<u32>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let body = format!("{}\n", args.text);
    let listeners = args
        .listen
        .iter()
        .map(TcpListener::bind)
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(p) = &args.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))?;
    }
    let mut threads = Vec::new();
    for listener in listeners {
        let body = body.clone();
        let keepalive = args.keepalive;
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(s) = stream else { continue };
                let body = body.clone();
                std::thread::spawn(move || match keepalive {
                    None => answer_once(s, &body),
                    Some(max) => serve_keepalive(s, &body, max),
                });
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn answer_once(mut s: TcpStream, body: &str) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    // Read what the client sent first (an HTTP request), if anything, so
    // the answer does not reset the connection.
    let mut buf = [0u8; 2048];
    let _ = s.read(&mut buf);
    let _ = write!(
        s,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn serve_keepalive(mut s: TcpStream, body: &str, max: u32) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    let mut served = 0u32;
    'conn: loop {
        // One request: headers up to the blank line (no request bodies).
        let end = loop {
            if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break 'conn,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
            if pending.len() > 64 * 1024 {
                break 'conn;
            }
        };
        let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
        pending.drain(..end);
        served += 1;
        // HTTP/1.0 closes unless asked to keep the connection.
        let http10 = head.lines().next().is_some_and(|l| l.ends_with("http/1.0"));
        let close = served >= max
            || head.contains("connection: close")
            || (http10 && !head.contains("connection: keep-alive"));
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if close { "close" } else { "keep-alive" }
        );
        if s.write_all(reply.as_bytes()).is_err() {
            return;
        }
        if close {
            break;
        }
    }
    // Lingering close: FIN first, then read (and discard) until the client
    // closes, so nothing unread is left to turn the close into a reset.
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}
