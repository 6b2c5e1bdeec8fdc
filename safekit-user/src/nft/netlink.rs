//! The netfilter netlink socket: sends one transaction (an `nftnl` batch)
//! and checks the kernel's answer to every message of it; dumps named
//! counters.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::{CStr, CString, c_void},
    io,
    os::raw::c_char,
    ptr::NonNull,
    time::{Duration, Instant},
};

use nftnl::{Batch, MsgType, NlMsg, ProtoFamily};
use nftnl_sys as sys;

use super::NftError;

/// How long the kernel has to answer a transaction.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// After a refused message, how long to collect the answers still coming.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(100);
/// Receive buffer: larger than any netfilter message (`nft_nlmsg_maxsize`).
const RECV_BUF: usize = 128 * 1024;
/// `NLMSG_ERROR` (an error, or an ack when its code is 0).
const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE` (end of a dump).
const NLMSG_DONE: u16 = 3;
/// `NFNL_SUBSYS_NFTABLES`.
const SUBSYS_NFTABLES: u16 = 10;
/// `NFT_MSG_NEWOBJ` and `NFT_MSG_GETOBJ`.
const MSG_NEWOBJ: u16 = 18;
const MSG_GETOBJ: u16 = 19;

/// A receive buffer aligned for `nlmsghdr`, as libmnl and `mnl` require.
#[repr(C, align(8))]
struct RecvBuf([u8; RECV_BUF]);

/// One transaction being built: the batch and, for every message in it, a
/// label naming what it does (used in errors).
pub(crate) struct Tx {
    batch: Batch,
    labels: Vec<String>,
}

impl Tx {
    pub(crate) fn new() -> Self {
        Self {
            batch: Batch::new(),
            labels: Vec::new(),
        }
    }

    /// Appends a message.
    pub(crate) fn add<T: NlMsg>(&mut self, msg: &T, ty: MsgType, label: impl Into<String>) {
        self.batch.add(msg, ty);
        self.labels.push(label.into());
    }

    /// Appends the element messages of a set (additions or deletions).
    pub(crate) fn add_elems<K>(&mut self, set: &nftnl::set::Set<'_, K>, ty: MsgType, label: &str) {
        for m in set.elems_iter() {
            self.add(&m, ty, label);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// A libmnl netfilter socket, opened close-on-exec: the farm filter's table
/// is owned by this socket and lives as long as it is open, so no script or
/// service the daemon starts may inherit it (`mnl::Socket` opens without
/// `SOCK_CLOEXEC`, and setting the flag afterwards races with a fork).
struct Socket(NonNull<mnl::mnl_sys::mnl_socket>);

impl Socket {
    /// Opens and binds (automatic port id) a netfilter socket.
    fn netfilter() -> io::Result<Self> {
        use mnl::mnl_sys as m;
        // SAFETY: plain call; NULL (errno set) on failure.
        let raw = unsafe { m::mnl_socket_open2(libc::NETLINK_NETFILTER, libc::SOCK_CLOEXEC) };
        let sock = NonNull::new(raw)
            .map(Self)
            .ok_or_else(io::Error::last_os_error)?;
        // SAFETY: `sock` is a live socket (closed by its Drop on error).
        if unsafe { m::mnl_socket_bind(sock.0.as_ptr(), 0, m::MNL_SOCKET_AUTOPID) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    fn fd(&self) -> libc::c_int {
        // SAFETY: the socket is live for the lifetime of `self`.
        unsafe { mnl::mnl_sys::mnl_socket_get_fd(self.0.as_ptr()) }
    }

    fn portid(&self) -> u32 {
        // SAFETY: the socket is live for the lifetime of `self`.
        unsafe { mnl::mnl_sys::mnl_socket_get_portid(self.0.as_ptr()) }
    }

    fn send(&self, data: &[u8]) -> io::Result<usize> {
        // SAFETY: live socket; `data` is valid for `data.len()` bytes.
        let n = unsafe {
            mnl::mnl_sys::mnl_socket_sendto(self.0.as_ptr(), data.as_ptr().cast(), data.len())
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Sends every message of a batch, each whole.
    fn send_all<'a>(&self, msgs: impl IntoIterator<Item = &'a [u8]>) -> io::Result<()> {
        for m in msgs {
            if self.send(m)? < m.len() {
                return Err(io::Error::other("sendto did not send the whole message"));
            }
        }
        Ok(())
    }

    /// Receives into `buf` (aligned for `nlmsghdr`); the length received.
    fn recv_raw(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: live socket; `buf` is writable for `buf.len()` bytes.
        let n = unsafe {
            mnl::mnl_sys::mnl_socket_recvfrom(self.0.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: opened by mnl_socket_open2, closed once.
        unsafe { mnl::mnl_sys::mnl_socket_close(self.0.as_ptr()) };
    }
}

/// A netfilter netlink socket (one per filter or firewall operation).
pub(crate) struct Netlink {
    sock: Socket,
    buf: Box<RecvBuf>,
    dump_seq: u32,
}

// SAFETY: the libmnl socket is a file descriptor and a sockaddr owned by
// this value alone; every use goes through `&mut self` or `&self` on one
// thread at a time (the filter lives behind the daemon's mutex). Moving it
// to another thread is sound.
unsafe impl Send for Netlink {}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink")
            .field("portid", &self.sock.portid())
            .finish_non_exhaustive()
    }
}

/// Header fields of one netlink message.
struct Header {
    ty: u16,
    seq: u32,
}

fn header(msg: &[u8]) -> Option<Header> {
    let ty = u16::from_ne_bytes(msg.get(4..6)?.try_into().ok()?);
    let seq = u32::from_ne_bytes(msg.get(8..12)?.try_into().ok()?);
    Some(Header { ty, seq })
}

/// The code of an `NLMSG_ERROR` message (0 = ack, else `-errno`).
fn error_code(msg: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(msg.get(16..20)?.try_into().ok()?))
}

impl Netlink {
    /// Opens a socket on the netfilter bus, in the network namespace of the
    /// calling thread.
    pub(crate) fn open() -> Result<Self, NftError> {
        let sock = Socket::netfilter().map_err(NftError::Socket)?;
        Ok(Self {
            sock,
            // SAFETY: all-zero bytes are a valid byte array.
            buf: unsafe { Box::<RecvBuf>::new_zeroed().assume_init() },
            dump_seq: 0,
        })
    }

    /// Waits until the socket is readable, at most `timeout`.
    fn readable(&self, timeout: Duration) -> io::Result<bool> {
        let fd = self.sock.fd();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, its count, a bounded timeout.
        let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        match n {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
            0 => Ok(false),
            _ => Ok(true),
        }
    }

    /// Discards whatever an earlier, abandoned exchange left queued.
    fn drain(&mut self) {
        while matches!(self.readable(Duration::ZERO), Ok(true)) {
            if self.sock.recv_raw(&mut self.buf.0).is_err() {
                break;
            }
        }
    }

    /// Runs one transaction: sends the batch and checks the kernel's answer
    /// to each of its messages. All or nothing: on any refused message the
    /// kernel applies none of them.
    pub(crate) fn apply(&mut self, op: &'static str, tx: Tx) -> Result<(), NftError> {
        if tx.is_empty() {
            return Ok(());
        }
        self.drain();
        let Tx { batch, labels } = tx;
        let batch = batch.finalize();
        let seqs = batch.sequence_numbers();
        // Begin and end messages have sequence numbers (and acks) only on
        // kernels that ack them (6.10+): the labelled messages are the last
        // `labels.len()` before the end message.
        let with_ends = seqs.len() == labels.len() + 2;
        let first = seqs.start + u32::from(with_ends);
        let label_of = |seq: u32| -> String {
            seq.checked_sub(first)
                .and_then(|i| labels.get(i as usize))
                .cloned()
                .unwrap_or_else(|| format!("batch message {seq}"))
        };
        self.sock
            .send_all(&batch)
            .map_err(|source| NftError::Send { op, source })?;
        let mut pending: BTreeSet<u32> = seqs.clone().collect();
        let mut refused: Option<(u32, i32)> = None;
        let deadline = Instant::now() + ACK_TIMEOUT;
        while !pending.is_empty() {
            let now = Instant::now();
            let wait = if refused.is_some() {
                DRAIN_TIMEOUT
            } else if now >= deadline {
                break;
            } else {
                deadline - now
            };
            match self.readable(wait) {
                Ok(true) => {}
                Ok(false) => break,
                Err(source) => return Err(NftError::Recv { op, source }),
            }
            let n = self
                .sock
                .recv_raw(&mut self.buf.0)
                .map_err(|source| NftError::Recv { op, source })?;
            for msg in mnl::NlMessages::new(&self.buf.0[..n]) {
                let msg = msg.map_err(|source| NftError::Recv { op, source })?;
                let Some(h) = header(msg) else { continue };
                if h.ty != NLMSG_ERROR || !pending.remove(&h.seq) {
                    continue;
                }
                let code = error_code(msg).unwrap_or(0);
                if code != 0 && refused.is_none() {
                    refused = Some((h.seq, code));
                }
            }
        }
        if let Some((seq, code)) = refused {
            return Err(NftError::Refused {
                op,
                what: label_of(seq),
                source: io::Error::from_raw_os_error(-code),
            });
        }
        if let Some(seq) = pending.first() {
            return Err(NftError::NoAnswer {
                op,
                what: label_of(*seq),
            });
        }
        Ok(())
    }

    /// Packet counts of the named counters of a table.
    pub(crate) fn counters(
        &mut self,
        family: ProtoFamily,
        table: &CStr,
    ) -> Result<BTreeMap<String, u64>, NftError> {
        const OP: &str = "reading counters";
        self.drain();
        self.dump_seq = self.dump_seq.wrapping_add(1);
        let seq = self.dump_seq;
        let mut req = vec![0u8; 4096];
        let obj = Obj::counter(family, table, c"");
        // SAFETY: `req` is large enough for a header and a table name
        // (<= 256 bytes); the header and payload builders write inside it
        // and return the header they wrote, whose length field we read.
        let len = unsafe {
            let nlh = sys::nftnl_nlmsg_build_hdr(
                req.as_mut_ptr().cast::<c_char>(),
                MSG_GETOBJ,
                family as u16,
                u16::try_from(libc::NLM_F_DUMP).unwrap_or(0),
                seq,
            );
            sys::nftnl_obj_nlmsg_build_payload(nlh, obj.ptr.as_ptr());
            (*nlh).nlmsg_len as usize
        };
        self.sock
            .send(&req[..len])
            .map_err(|source| NftError::Send { op: OP, source })?;
        let mut out = BTreeMap::new();
        let deadline = Instant::now() + ACK_TIMEOUT;
        loop {
            let now = Instant::now();
            if now >= deadline
                || !self
                    .readable(deadline - now)
                    .map_err(|source| NftError::Recv { op: OP, source })?
            {
                return Err(NftError::NoAnswer {
                    op: OP,
                    what: "counter dump".to_owned(),
                });
            }
            let n = self
                .sock
                .recv_raw(&mut self.buf.0)
                .map_err(|source| NftError::Recv { op: OP, source })?;
            for msg in mnl::NlMessages::new(&self.buf.0[..n]) {
                let msg = msg.map_err(|source| NftError::Recv { op: OP, source })?;
                let Some(h) = header(msg) else { continue };
                if h.seq != seq {
                    continue;
                }
                match h.ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = error_code(msg).unwrap_or(0);
                        if code == 0 {
                            return Ok(out);
                        }
                        return Err(NftError::Refused {
                            op: OP,
                            what: format!("dump of {}", table.to_string_lossy()),
                            source: io::Error::from_raw_os_error(-code),
                        });
                    }
                    t if t == (SUBSYS_NFTABLES << 8) | MSG_NEWOBJ => {
                        if let Some((name, packets)) = parse_counter(msg) {
                            out.insert(name, packets);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Name and packet count of a `NEWOBJ` message holding a counter.
fn parse_counter(msg: &[u8]) -> Option<(String, u64)> {
    let obj = Obj::alloc();
    // SAFETY: `msg` is one whole netlink message (validated by
    // `NlMessages`: aligned, length within the buffer); libnftnl only reads
    // it. `obj` is a live object it fills.
    let rc = unsafe {
        sys::nftnl_obj_nlmsg_parse(msg.as_ptr().cast::<libc::nlmsghdr>(), obj.ptr.as_ptr())
    };
    if rc < 0 {
        return None;
    }
    // SAFETY: `obj` was filled by the parser; the getters return NULL or
    // a string owned by `obj`, copied before `obj` is freed.
    unsafe {
        let name = sys::nftnl_obj_get_str(obj.ptr.as_ptr(), attr16(sys::NFTNL_OBJ_NAME));
        if name.is_null() {
            return None;
        }
        let name = CStr::from_ptr(name).to_string_lossy().into_owned();
        let packets = sys::nftnl_obj_get_u64(obj.ptr.as_ptr(), attr16(sys::NFTNL_OBJ_CTR_PKTS));
        Some((name, packets))
    }
}

fn attr16(a: u32) -> u16 {
    u16::try_from(a).unwrap_or(u16::MAX)
}

/// A stateful object (here: a named counter).
pub(crate) struct Obj {
    ptr: NonNull<sys::nftnl_obj>,
    family: ProtoFamily,
}

impl Obj {
    fn alloc() -> Self {
        // SAFETY: plain allocation; NULL only when out of memory.
        let raw = unsafe { sys::nftnl_obj_alloc() };
        let Some(ptr) = NonNull::new(raw) else {
            std::process::abort();
        };
        Self {
            ptr,
            family: ProtoFamily::Unspec,
        }
    }

    /// A named counter `name` in `table` (empty name: any, for dumps).
    pub(crate) fn counter(family: ProtoFamily, table: &CStr, name: &CStr) -> Self {
        let mut o = Self::alloc();
        o.family = family;
        let p = o.ptr.as_ptr();
        // SAFETY: `p` is live; libnftnl copies the strings.
        unsafe {
            sys::nftnl_obj_set_u32(p, attr16(sys::NFTNL_OBJ_FAMILY), family as u32);
            sys::nftnl_obj_set_str(p, attr16(sys::NFTNL_OBJ_TABLE), table.as_ptr());
            sys::nftnl_obj_set_u32(p, attr16(sys::NFTNL_OBJ_TYPE), super::expr::OBJECT_COUNTER);
            if !name.is_empty() {
                sys::nftnl_obj_set_str(p, attr16(sys::NFTNL_OBJ_NAME), name.as_ptr());
            }
        }
        o
    }
}

impl Drop for Obj {
    fn drop(&mut self) {
        // SAFETY: allocated by nftnl_obj_alloc, freed once.
        unsafe { sys::nftnl_obj_free(self.ptr.as_ptr()) };
    }
}

/// Writes a netfilter message header of type `ty` (`NFT_MSG_*`) with
/// `flags` (`NLM_F_*`) into `buf`.
///
/// # Safety
/// `buf` must have room for one netfilter message.
unsafe fn build_hdr(
    buf: *mut c_void,
    ty: i32,
    family: ProtoFamily,
    flags: i32,
    seq: u32,
) -> *mut libc::nlmsghdr {
    // SAFETY: the caller guarantees the room.
    unsafe {
        sys::nftnl_nlmsg_build_hdr(
            buf.cast::<c_char>(),
            u16::try_from(ty).unwrap_or(0),
            family as u16,
            u16::try_from(flags).unwrap_or(0),
            seq,
        )
    }
}

// SAFETY: `write` builds one message into a buffer that the batch sized
// for the largest netfilter message, as nftnl's own `NlMsg` types do.
unsafe impl NlMsg for Obj {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let (ty, flags) = match msg_type {
            MsgType::Add => (libc::NFT_MSG_NEWOBJ, libc::NLM_F_CREATE | libc::NLM_F_ACK),
            MsgType::Del => (libc::NFT_MSG_DELOBJ, libc::NLM_F_ACK),
        };
        // SAFETY: the caller (nftnl's Batch) hands a buffer with room for
        // one message; `self.ptr` is live.
        unsafe {
            let nlh = build_hdr(buf, ty, self.family, flags, seq);
            sys::nftnl_obj_nlmsg_build_payload(nlh, self.ptr.as_ptr());
        }
    }
}

/// `NFT_TABLE_F_OWNER` (Linux 5.12): the table belongs to the netlink
/// socket that created it; only that socket may change it, and the kernel
/// removes it when that socket closes, also when its process is killed.
pub(crate) const TABLE_F_OWNER: u32 = 2;

/// A table message with explicit flags (nftnl's `Table` always sends 0).
pub(crate) struct TableMsg {
    ptr: NonNull<sys::nftnl_table>,
    family: ProtoFamily,
}

impl TableMsg {
    /// Table `name` of `family` with `flags` (`NFT_TABLE_F_*`).
    pub(crate) fn new(name: &CStr, family: ProtoFamily, flags: u32) -> Self {
        // SAFETY: plain allocation; NULL only when out of memory.
        let raw = unsafe { sys::nftnl_table_alloc() };
        let Some(ptr) = NonNull::new(raw) else {
            std::process::abort();
        };
        let p = ptr.as_ptr();
        // SAFETY: `p` is live; libnftnl copies the string.
        unsafe {
            sys::nftnl_table_set_u32(p, attr16(sys::NFTNL_TABLE_FAMILY), family as u32);
            sys::nftnl_table_set_str(p, attr16(sys::NFTNL_TABLE_NAME), name.as_ptr());
            sys::nftnl_table_set_u32(p, attr16(sys::NFTNL_TABLE_FLAGS), flags);
        }
        Self { ptr, family }
    }
}

impl Drop for TableMsg {
    fn drop(&mut self) {
        // SAFETY: allocated by nftnl_table_alloc, freed once.
        unsafe { sys::nftnl_table_free(self.ptr.as_ptr()) };
    }
}

// SAFETY: `write` builds one message into a buffer that the batch sized
// for the largest netfilter message, as nftnl's own `Table` does.
unsafe impl NlMsg for TableMsg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let (ty, flags) = match msg_type {
            MsgType::Add => (libc::NFT_MSG_NEWTABLE, libc::NLM_F_CREATE | libc::NLM_F_ACK),
            MsgType::Del => (libc::NFT_MSG_DELTABLE, libc::NLM_F_ACK),
        };
        // SAFETY: the caller (nftnl's Batch) hands a buffer with room for
        // one message; `self.ptr` is live.
        unsafe {
            let nlh = build_hdr(buf, ty, self.family, flags, seq);
            sys::nftnl_table_nlmsg_build_payload(nlh, self.ptr.as_ptr());
        }
    }
}

/// A C string from a Rust one that has no NUL (names we build ourselves).
pub(crate) fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}
