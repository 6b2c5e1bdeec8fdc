//! What a node keeps on disk for one replicated directory, outside it
//! (`var/lib/safekit/<AM>/rfs/<dir>/`):
//!
//! - `journal`: what changed while the secondary was away (see
//!   [`super::journal`]); fsynced before the application is answered.
//! - `al`: the activity log — changes this node applied but whose fate on
//!   the peer is unknown (sent and not yet acknowledged on a primary,
//!   received and not yet written on a secondary). Appended without fsync
//!   (it covers a crash of the daemon, whose page cache survives), reset
//!   when nothing is in flight. After a crash its entries are resynchronised
//!   from whichever node becomes the primary.
//! - `sync_id`: the last synchronisation point both copies reached. A
//!   returning secondary with the same id gets only what the journal
//!   records; any other id means a full resynchronisation.
//! - `resume_sent` (primary) and `resume_received` (secondary): the id of
//!   the full resynchronisation under way ([`super::proto::Op::FullSync`]).
//!   When the primary's `resume_sent` equals the returning secondary's
//!   `resume_received`, the full resynchronisation resumes from what the
//!   primary's journal says remains. Each is forgotten once the copies are
//!   in sync, and as soon as the node takes the other role (a primary
//!   forgets what it received, a secondary what it sent).

use std::{
    io,
    path::{Path, PathBuf},
};

/// The state directory of one replicated directory.
#[derive(Debug, Clone)]
pub struct DirState {
    dir: PathBuf,
}

impl DirState {
    /// State kept in `dir` (created when first written).
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory.
    pub fn create(&self) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)
    }

    /// The journal file.
    #[must_use]
    pub fn journal(&self) -> PathBuf {
        self.dir.join("journal")
    }

    /// The activity log file.
    #[must_use]
    pub fn al(&self) -> PathBuf {
        self.dir.join("al")
    }

    /// The last synchronisation point (0: none or unreadable).
    #[must_use]
    pub fn sync_id(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("sync_id"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Records the synchronisation point durably (write, fsync, rename,
    /// fsync the directory).
    pub fn set_sync_id(&self, id: u64) -> io::Result<()> {
        crate::paths::write_durably(&self.dir.join("sync_id"), format!("{id}\n").as_bytes())
    }
}

/// Which side of a full resynchronisation an id was recorded on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Sent as primary (`resume_sent`).
    Sent,
    /// Received as secondary (`resume_received`).
    Received,
}

impl DirState {
    fn resume_file(&self, side: Side) -> PathBuf {
        self.dir.join(match side {
            Side::Sent => "resume_sent",
            Side::Received => "resume_received",
        })
    }

    /// The full resynchronisation recorded on `side` (0: none or
    /// unreadable).
    #[must_use]
    pub fn resume_id(&self, side: Side) -> u64 {
        std::fs::read_to_string(self.resume_file(side))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Records the full resynchronisation `id` on `side`, durably.
    pub fn set_resume_id(&self, side: Side, id: u64) -> io::Result<()> {
        self.create()?;
        crate::paths::write_durably(&self.resume_file(side), format!("{id}\n").as_bytes())
    }

    /// Forgets the full resynchronisation recorded on `side` (durably: a
    /// forgotten id never comes back after a crash).
    pub fn forget_resume(&self, side: Side) -> io::Result<()> {
        let f = self.resume_file(side);
        match std::fs::remove_file(&f) {
            Ok(()) => std::fs::File::open(&self.dir)?.sync_all(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A fresh, non-zero synchronisation id.
#[must_use]
pub fn new_sync_id() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // Time and pid: unique enough for a sync point if the RNG fails.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        #[expect(clippy::cast_possible_truncation, reason = "low bits")]
        return (t as u64) ^ u64::from(std::process::id()) | 1;
    }
    u64::from_le_bytes(b) | 1
}
