//! `safekit-demo`: the lab's demo service. Answers every TCP connection on
//! the given addresses with one line of text (as an HTTP/1.0 response, so
//! curl and plain TCP clients both read it), then closes. Started and
//! stopped by the demo modules' scripts.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
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
    /// Write the pid here.
    #[arg(long)]
    pidfile: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(p) = &args.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))?;
    }
    let body = format!("{}\n", args.text);
    let mut threads = Vec::new();
    for addr in &args.listen {
        let listener = TcpListener::bind(addr)?;
        let body = body.clone();
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let body = body.clone();
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                    // Read what the client sent first (an HTTP request), if
                    // anything, so the answer does not reset the connection.
                    let mut buf = [0u8; 2048];
                    let _ = s.read(&mut buf);
                    let _ = write!(
                        s,
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
