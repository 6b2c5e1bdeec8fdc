//! The embedded eBPF object (`safekit-ebpf`, built by build.rs), its
//! loader, and the reader of its `aya-log` records ([`EbpfLog`]).

use std::sync::{
    Arc, Mutex, PoisonError,
    atomic::{AtomicU64, Ordering},
};

/// The eBPF object bytes, aligned for aya's ELF parser.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/safekit-ebpf"));

/// Name of the XDP farm filter program in the object.
pub const FARM_PROGRAM: &str = "safekit_farm";

/// Benchmark baseline program (passes everything).
pub const NOOP_PROGRAM: &str = "safekit_noop";

/// Benchmark traffic generator (`XDP_TX` under live-frames test runs).
pub const BENCH_TX_PROGRAM: &str = "safekit_bench_tx";

/// Loads the object into the kernel's BPF subsystem (maps created, programs
/// not yet verified or attached).
pub fn load() -> Result<aya::Ebpf, aya::EbpfError> {
    aya::Ebpf::load(OBJECT)
}

/// The eBPF programs' `aya-log` records, forwarded to the daemon's
/// `tracing` output (target `safekit_ebpf`) by a thread of their own.
///
/// The kernel side logs rare events (a malformed IPv4 header to a VIP) into
/// the object's `AYA_LOGS` ring buffer; this reader drains it as soon as it
/// is readable. The network can trigger those events, so at most
/// [`LOG_BURST`] lines per second are written, and the number suppressed is
/// reported once the second is over. Dropping the value stops the thread.
pub struct EbpfLog {
    /// Closing it (on drop) wakes and stops the reader thread.
    stop: Option<std::io::PipeWriter>,
    thread: Option<std::thread::JoinHandle<()>>,
    seen: Arc<Seen>,
}

/// Lines written per second at most (the rest are counted, not written).
pub const LOG_BURST: u32 = 10;

/// Errors starting the log reader.
#[derive(Debug, thiserror::Error)]
pub enum EbpfLogError {
    /// The object has no log ring buffer, or it cannot be opened.
    #[error("eBPF log reader of {program}: {source}")]
    Init {
        /// Whose logs.
        program: String,
        /// Cause.
        #[source]
        source: aya_log::Error,
    },
    /// The stop pipe or the thread could not be created.
    #[error("eBPF log reader of {program}: {source}")]
    Start {
        /// Whose logs.
        program: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What the reader saw, for [`EbpfLog::records`] and [`EbpfLog::last`].
#[derive(Default)]
struct Seen {
    records: AtomicU64,
    last: Mutex<Option<String>>,
}

/// Per-second budget of written lines.
struct Budget {
    window: std::time::Instant,
    written: u32,
    suppressed: u64,
}

/// The `log::Log` that aya-log writes to: counts, rate-limits, forwards.
struct Forward {
    program: String,
    seen: Arc<Seen>,
    budget: Mutex<Budget>,
}

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        self.seen.records.fetch_add(1, Ordering::Relaxed);
        *self
            .seen
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(text.clone());
        let now = std::time::Instant::now();
        let mut b = self.budget.lock().unwrap_or_else(PoisonError::into_inner);
        if now.duration_since(b.window) >= std::time::Duration::from_secs(1) {
            if b.suppressed > 0 {
                tracing::warn!(
                    target: "safekit_ebpf",
                    program = %self.program,
                    "{} eBPF log lines suppressed (more than {LOG_BURST} per second)",
                    b.suppressed
                );
            }
            *b = Budget {
                window: now,
                written: 0,
                suppressed: 0,
            };
        }
        if b.written >= LOG_BURST {
            b.suppressed += 1;
            return;
        }
        b.written += 1;
        drop(b);
        let program = &self.program;
        match record.level() {
            log::Level::Error => tracing::error!(target: "safekit_ebpf", %program, "{text}"),
            log::Level::Warn => tracing::warn!(target: "safekit_ebpf", %program, "{text}"),
            log::Level::Info => tracing::info!(target: "safekit_ebpf", %program, "{text}"),
            log::Level::Debug => tracing::debug!(target: "safekit_ebpf", %program, "{text}"),
            log::Level::Trace => tracing::trace!(target: "safekit_ebpf", %program, "{text}"),
        }
    }

    fn flush(&self) {}
}

impl EbpfLog {
    /// Takes the log ring buffer of `bpf` (a loaded object) and starts
    /// reading it; `program` names the source in every line (e.g. the
    /// interface the filter is attached to).
    pub fn start(bpf: &mut aya::Ebpf, program: &str) -> Result<Self, EbpfLogError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let seen = Arc::new(Seen::default());
        let forward = Forward {
            program: program.to_owned(),
            seen: Arc::clone(&seen),
            budget: Mutex::new(Budget {
                window: std::time::Instant::now(),
                written: 0,
                suppressed: 0,
            }),
        };
        let mut logger = aya_log::EbpfLogger::init_with_logger(bpf, forward).map_err(|source| {
            EbpfLogError::Init {
                program: program.to_owned(),
                source,
            }
        })?;
        let start_err = |source| EbpfLogError::Start {
            program: program.to_owned(),
            source,
        };
        let (stop_rx, stop_tx) = std::io::pipe().map_err(start_err)?;
        let thread = std::thread::Builder::new()
            .name("safekit-ebpf-log".into())
            .spawn(move || {
                loop {
                    let mut fds = [
                        libc::pollfd {
                            fd: logger.as_fd().as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: stop_rx.as_fd().as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    // SAFETY: two valid pollfds (both fds are owned by this
                    // thread's values, alive across the call) and their count.
                    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                    if n < 0
                        && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                    {
                        break;
                    }
                    logger.flush();
                    if fds[1].revents != 0 {
                        break;
                    }
                }
            })
            .map_err(start_err)?;
        Ok(Self {
            stop: Some(stop_tx),
            thread: Some(thread),
            seen,
        })
    }

    /// Records read from the kernel so far (written or suppressed).
    #[must_use]
    pub fn records(&self) -> u64 {
        self.seen.records.load(Ordering::Relaxed)
    }

    /// The text of the last record read.
    #[must_use]
    pub fn last(&self) -> Option<String> {
        self.seen
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl std::fmt::Debug for EbpfLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfLog")
            .field("records", &self.records())
            .finish_non_exhaustive()
    }
}

impl Drop for EbpfLog {
    fn drop(&mut self) {
        // Closing the write end makes the read end readable (end of file):
        // the thread flushes once more and returns.
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
