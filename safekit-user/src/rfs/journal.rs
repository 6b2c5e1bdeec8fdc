//! What changed while the secondary was away: a crash-safe, append-only
//! record of changed paths and byte ranges, so a reintegration sends only
//! those.
//!
//! The pure part is [`RangeSet`] and [`DirtySet`] (merging, coverage); the
//! file part is [`Journal`]:
//!
//! - A record is appended only when it adds information (a range already
//!   covered costs nothing). Ranges are kept to [`FINE`] (4 KiB) boundaries
//!   for what a resynchronisation sends, and the durability that the
//!   application waits for is by [`CHUNK`] (1 MiB): only a change outside
//!   the chunks already recorded needs an fsync, so a sequential writer
//!   syncs the journal once per MiB, not once per write.
//! - The caller calls [`Journal::sync`] (fdatasync) before telling the
//!   application its operation is done: an acknowledged change is always in
//!   the journal on disk.
//! - Each record carries a checksum; on open, a torn or corrupt tail (a crash
//!   mid-append, never acknowledged) is cut off.
//! - When the file holds many more records than the merged set, it is
//!   compacted: the merged set is written to a temporary file, synced, and
//!   renamed over the journal. A resynchronisation's checkpoints replace
//!   the set the same way ([`Journal::reset_to`]) with what remains to send.
//! - [`Change::After`] keeps a subtree's walk short: "the entries of this
//!   directory after this name", so what remains of a tree of any size is
//!   a few records.
//!
//! File format: the 8-byte magic `SKRFSJ1\n`, then records `u32` LE length,
//! `u32` LE checksum (first 4 bytes of BLAKE3 of the payload), payload (kind
//! byte — 1 range, 2 entry, 3 subtree, 4 after —, path as varint-length
//! bytes, for a range start and end as varints).

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use thiserror::Error;

use super::proto::{self, RelPath};

/// Granularity of the durable envelope: a change outside the chunks already
/// recorded costs an fsync before the application's reply.
pub const CHUNK: u64 = 1 << 20;
/// Granularity of the ranges kept for the resynchronisation (what is sent).
pub const FINE: u64 = 4096;
const MAGIC: &[u8; 8] = b"SKRFSJ1\n";
const KIND_RANGE: u8 = 1;
const KIND_META: u8 = 2;
const KIND_TREE: u8 = 3;
const KIND_AFTER: u8 = 4;

/// A journal failure.
#[derive(Debug, Error)]
pub enum JournalError {
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The journal file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The file is not a journal of this format.
    #[error("{0} is not an rfs journal (bad magic)")]
    Magic(PathBuf),
}

/// What changed at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Bytes `[start, end)` of a file.
    Range {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// The entry itself: created, removed, size, mode, owner, times, xattrs.
    Meta,
    /// The entry and everything below it (renamed directories, unknown
    /// divergence).
    Tree,
    /// At `dir/name`: every entry of `dir` whose name sorts after `name`
    /// (bytewise), with everything below it; `dir/name` itself is not
    /// included. What remains of a subtree whose resynchronisation stopped
    /// after `name` was begun (its entries are sent in name order).
    After,
}

/// Disjoint, non-adjacent half-open ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet(BTreeMap<u64, u64>);

impl RangeSet {
    /// Adds `[start, end)`, merging with overlapping or adjacent ranges.
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // The range starting at or before `start` may touch it.
        if let Some((&s, &e)) = self.0.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
        }
        let absorbed: Vec<u64> = self.0.range(start..=end).map(|(&s, _)| s).collect();
        for s in absorbed {
            if let Some(e) = self.0.remove(&s) {
                end = end.max(e);
            }
        }
        self.0.insert(start, end);
    }

    /// Removes `[start, end)`.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let hit: Vec<(u64, u64)> = self
            .0
            .range(..end)
            .rev()
            .take_while(|&(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in hit {
            self.0.remove(&s);
            if s < start {
                self.0.insert(s, start);
            }
            if e > end {
                self.0.insert(end, e);
            }
        }
    }

    /// Whether `[start, end)` is entirely inside the set.
    #[must_use]
    pub fn covers(&self, start: u64, end: u64) -> bool {
        start >= end
            || self
                .0
                .range(..=start)
                .next_back()
                .is_some_and(|(_, &e)| e >= end)
    }

    /// The ranges in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|(&s, &e)| (s, e))
    }

    /// Whether no range is recorded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of ranges.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// Everything recorded about one path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathChanges {
    /// Changed byte ranges.
    pub ranges: RangeSet,
    /// The entry itself changed.
    pub meta: bool,
    /// The whole subtree changed.
    pub tree: bool,
    /// The entries of this directory sorting after this name changed, with
    /// their subtrees ([`Change::After`]).
    pub after: Option<Vec<u8>>,
}

/// The merged changes by path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtySet {
    paths: BTreeMap<RelPath, PathChanges>,
}

impl DirtySet {
    /// Whether `change` at `path` is already implied by the set (an ancestor
    /// or the path itself marked `Tree`, or below a directory's `After`
    /// cursor; the entry marked, the range covered).
    #[must_use]
    pub fn covers(&self, path: &RelPath, change: Change) -> bool {
        if change == Change::After {
            let Ok((dir, name)) = path.split() else {
                return self.implied(path);
            };
            let dir = RelPath::new(dir.to_vec()).unwrap_or_default();
            return self.implied(&dir)
                || self
                    .paths
                    .get(&dir)
                    .and_then(|c| c.after.as_deref())
                    .is_some_and(|a| a <= name);
        }
        if self.implied(path) {
            return true;
        }
        let Some(c) = self.paths.get(path) else {
            return false;
        };
        match change {
            Change::Tree | Change::After => false,
            Change::Meta => c.meta,
            Change::Range { start, end } => c.ranges.covers(start, end),
        }
    }

    /// Whether the whole subtree at `path` is implied: the path or an
    /// ancestor marked `Tree`, or the path or an ancestor sorting after its
    /// parent's `After` cursor.
    fn implied(&self, path: &RelPath) -> bool {
        // One copy, shortened in place: linear in the path's length,
        // whatever its depth.
        let mut anc = path.clone();
        loop {
            if self.paths.get(&anc).is_some_and(|c| c.tree) {
                return true;
            }
            let Some(name) = anc.split().ok().map(|(_, n)| n.to_vec()) else {
                return false;
            };
            if !anc.pop() {
                return false;
            }
            if self
                .paths
                .get(&anc)
                .and_then(|c| c.after.as_deref())
                .is_some_and(|a| name.as_slice() > a)
            {
                return true;
            }
        }
    }

    /// Merges `change` at `path`; returns whether it added information.
    pub fn record(&mut self, path: &RelPath, change: Change) -> bool {
        if change == Change::After && path.is_root() {
            // Meaningless at the root (no parent): the whole tree.
            return self.record(path, Change::Tree);
        }
        if self.covers(path, change) {
            return false;
        }
        match change {
            Change::Range { start, end } => {
                self.paths
                    .entry(path.clone())
                    .or_default()
                    .ranges
                    .insert(start, end);
            }
            Change::Meta => self.paths.entry(path.clone()).or_default().meta = true,
            Change::Tree => {
                let c = self.paths.entry(path.clone()).or_default();
                c.tree = true;
                c.ranges = RangeSet::default();
                c.after = None;
                // Descendants are now implied.
                self.remove_below(path, None);
            }
            Change::After => {
                let Ok((dir, name)) = path.split() else {
                    return false;
                };
                let dir = RelPath::new(dir.to_vec()).unwrap_or_default();
                let name = name.to_vec();
                let c = self.paths.entry(dir.clone()).or_default();
                match &mut c.after {
                    Some(a) if *a <= name => {}
                    a => *a = Some(name.clone()),
                }
                // Entries below the names after the cursor are implied.
                self.remove_below(&dir, Some(&name));
            }
        }
        true
    }

    /// Forgets what is recorded below `dir` (below its entries sorting after
    /// `after`, if given).
    fn remove_below(&mut self, dir: &RelPath, after: Option<&[u8]>) {
        let mut prefix = dir.as_bytes().to_vec();
        if !prefix.is_empty() {
            prefix.push(b'/');
        }
        let below: Vec<RelPath> = self
            .paths
            .range::<[u8], _>((
                std::ops::Bound::Included(&prefix[..]),
                std::ops::Bound::Unbounded,
            ))
            .map(|(p, _)| p)
            .take_while(|p| p.as_bytes().starts_with(&prefix))
            .filter(|p| !p.is_root())
            .filter(|p| {
                after.is_none_or(|a| {
                    let rest = &p.as_bytes()[prefix.len()..];
                    let first = rest.split(|&b| b == b'/').next().unwrap_or(rest);
                    first > a
                })
            })
            .cloned()
            .collect();
        for p in below {
            self.paths.remove(&p);
        }
    }

    /// Sets what is recorded at `path`, as is: for entries known not to
    /// overlap the rest of the set (the items of a snapshot of a set).
    pub fn insert_changes(&mut self, path: RelPath, changes: PathChanges) {
        self.paths.insert(path, changes);
    }

    /// Whether nothing is recorded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Merges every change of `other`.
    pub fn merge(&mut self, other: &DirtySet) {
        for (p, c) in other.records() {
            self.record(&p, c);
        }
    }

    /// Every change, as records.
    #[must_use]
    pub fn to_records(&self) -> Vec<(RelPath, Change)> {
        self.records()
    }

    /// Bytes of the recorded ranges (an upper bound of what a
    /// resynchronisation of them sends, trees excluded).
    #[must_use]
    pub fn range_bytes(&self) -> u64 {
        self.paths
            .values()
            .flat_map(|c| c.ranges.iter())
            .map(|(s, e)| e.saturating_sub(s).min(1 << 40))
            .sum()
    }

    /// Number of paths recorded.
    #[must_use]
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Paths and their changes, in path order (parents before children).
    pub fn iter(&self) -> impl Iterator<Item = (&RelPath, &PathChanges)> {
        self.paths.iter()
    }

    /// The records that rebuild this set.
    fn records(&self) -> Vec<(RelPath, Change)> {
        let mut out = Vec::new();
        for (p, c) in &self.paths {
            if c.tree {
                out.push((p.clone(), Change::Tree));
                continue;
            }
            if c.meta {
                out.push((p.clone(), Change::Meta));
            }
            if let Some(a) = &c.after {
                // A name taken from a valid path joins again; else the
                // whole subtree, which implies it.
                match p.join(a) {
                    Ok(at) => out.push((at, Change::After)),
                    Err(_) => out.push((p.clone(), Change::Tree)),
                }
            }
            for (start, end) in c.ranges.iter() {
                out.push((p.clone(), Change::Range { start, end }));
            }
        }
        out
    }

    /// Number of records that rebuild this set.
    fn record_count(&self) -> usize {
        self.paths
            .values()
            .map(|c| {
                if c.tree {
                    1
                } else {
                    usize::from(c.meta) + usize::from(c.after.is_some()) + c.ranges.len()
                }
            })
            .sum()
    }
}

/// Widens a range to [`CHUNK`] boundaries.
#[must_use]
pub fn widen(start: u64, end: u64) -> (u64, u64) {
    widen_to(start, end, CHUNK)
}

/// Widens a range to multiples of `g`.
#[must_use]
pub fn widen_to(start: u64, end: u64, g: u64) -> (u64, u64) {
    let s = start - start % g;
    let e = end.div_ceil(g).saturating_mul(g);
    (s, e.max(s))
}

/// `change` with its range widened to multiples of `g`.
fn widened(change: Change, g: u64) -> Change {
    match change {
        Change::Range { start, end } => {
            let (start, end) = widen_to(start, end, g);
            Change::Range { start, end }
        }
        c => c,
    }
}

pub(crate) fn encode_record(out: &mut Vec<u8>, path: &RelPath, change: Change) {
    let mut payload = Vec::with_capacity(path.as_bytes().len() + 24);
    match change {
        Change::Range { start, end } => {
            payload.push(KIND_RANGE);
            proto::put_bytes(&mut payload, path.as_bytes());
            proto::put_u64(&mut payload, start);
            proto::put_u64(&mut payload, end);
        }
        Change::Meta => {
            payload.push(KIND_META);
            proto::put_bytes(&mut payload, path.as_bytes());
        }
        Change::Tree => {
            payload.push(KIND_TREE);
            proto::put_bytes(&mut payload, path.as_bytes());
        }
        Change::After => {
            payload.push(KIND_AFTER);
            proto::put_bytes(&mut payload, path.as_bytes());
        }
    }
    // Records are a few bytes plus a path of at most `proto::MAX_PATH`.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&blake3::hash(&payload).as_bytes()[..4]);
    out.extend_from_slice(&payload);
}

/// Parses records from `buf`; returns them and the length of the valid prefix.
pub(crate) fn decode_records(buf: &[u8]) -> (Vec<(RelPath, Change)>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(hdr) = buf.get(pos..pos + 8) {
        let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        let Some(payload) = buf.get(pos + 8..pos + 8 + len) else {
            break;
        };
        if blake3::hash(payload).as_bytes()[..4] != hdr[4..8] {
            break;
        }
        let mut r = proto::Reader::new(payload);
        let parsed = (|| {
            let kind = r.u8("kind").ok()?;
            let path = r.path("path").ok()?;
            let change = match kind {
                KIND_RANGE => Change::Range {
                    start: r.u64("start").ok()?,
                    end: r.u64("end").ok()?,
                },
                KIND_META => Change::Meta,
                KIND_TREE => Change::Tree,
                KIND_AFTER => Change::After,
                _ => return None,
            };
            (r.remaining() == 0).then_some((path, change))
        })();
        let Some(rec) = parsed else { break };
        out.push(rec);
        pos += 8 + len;
    }
    (out, pos)
}

/// What an operation received by a secondary may change, for its activity
/// log (the secondary's copy may hold these if it crashes before it
/// applied them, or diverge from the primary's).
#[must_use]
pub fn changes_of(op: &proto::Op) -> Vec<(RelPath, Change)> {
    use proto::Op;
    match op {
        Op::Write {
            path, offset, data, ..
        } => vec![(
            path.clone(),
            Change::Range {
                start: *offset,
                end: offset.saturating_add(data.len() as u64),
            },
        )],
        Op::Hole { path, offset, len } => vec![(
            path.clone(),
            Change::Range {
                start: *offset,
                end: offset.saturating_add(*len),
            },
        )],
        Op::Truncate { path, size, .. } => vec![
            (path.clone(), Change::Meta),
            (
                path.clone(),
                Change::Range {
                    start: *size,
                    end: u64::MAX,
                },
            ),
        ],
        Op::Mknod { path, .. }
        | Op::Mkdir { path, .. }
        | Op::Symlink { path, .. }
        | Op::Link { path, .. }
        | Op::Remove { path }
        | Op::Prune { path, .. } => vec![(path.clone(), Change::Tree)],
        Op::Unlink { path, .. }
        | Op::Rmdir { path, .. }
        | Op::SetAttr { path, .. }
        | Op::SetXattr { path, .. }
        | Op::RemoveXattr { path, .. }
        | Op::Put { path, .. } => vec![(path.clone(), Change::Meta)],
        Op::Rename { from, to, .. } => {
            vec![(from.clone(), Change::Tree), (to.clone(), Change::Tree)]
        }
        Op::Fsync { .. } | Op::InSync { .. } | Op::FullSync { .. } => vec![],
    }
}

/// The journal file of one replicated directory.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// What changed, ranges to [`FINE`] granularity (what a resync sends).
    set: DirtySet,
    /// The same to [`CHUNK`] granularity: what the synced records cover.
    coarse: DirtySet,
    records: usize,
    unsynced: bool,
}

impl Journal {
    /// Opens (or creates) the journal at `path`, replaying what it holds and
    /// cutting off a torn tail.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let err = |op| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { op, path, source }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(err("open"))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf).map_err(err("read"))?;
        let mut set = DirtySet::default();
        let mut coarse = DirtySet::default();
        let mut records = 0;
        if buf.len() < MAGIC.len() {
            file.set_len(0).map_err(err("truncate"))?;
            file.seek(SeekFrom::Start(0)).map_err(err("seek"))?;
            file.write_all(MAGIC).map_err(err("write"))?;
            file.sync_all().map_err(err("fsync"))?;
            sync_parent(path).map_err(err("fsync directory of"))?;
        } else {
            if &buf[..MAGIC.len()] != MAGIC {
                return Err(JournalError::Magic(path.to_path_buf()));
            }
            let (recs, valid) = decode_records(&buf[MAGIC.len()..]);
            for (p, c) in &recs {
                set.record(p, *c);
                coarse.record(p, widened(*c, CHUNK));
            }
            records = recs.len();
            let end = (MAGIC.len() + valid) as u64;
            if end < buf.len() as u64 {
                file.set_len(end).map_err(err("truncate torn tail of"))?;
                file.sync_data().map_err(err("fsync"))?;
            }
            file.seek(SeekFrom::Start(end)).map_err(err("seek"))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            set,
            coarse,
            records,
            unsynced: false,
        })
    }

    fn io(&self, op: &'static str) -> impl FnOnce(io::Error) -> JournalError + use<> {
        let path = self.path.clone();
        move |source| JournalError::Io { op, path, source }
    }

    /// The merged changes recorded.
    #[must_use]
    pub fn dirty(&self) -> &DirtySet {
        &self.set
    }

    /// Records a change (appended, not yet synced) if it adds information.
    ///
    /// Two granularities: the set keeps ranges to [`FINE`] (what a resync
    /// will send), and a change outside the [`CHUNK`]s already recorded
    /// appends its chunk-wide record and needs the next [`Journal::sync`]. A
    /// change inside a recorded chunk appends its fine record without
    /// needing a sync: after a crash, the synced chunk still covers it (a
    /// resync then sends the whole chunk).
    pub fn record(&mut self, path: &RelPath, change: Change) -> Result<(), JournalError> {
        let fine = widened(change, FINE);
        let coarse = widened(change, CHUNK);
        let new_coarse = self.coarse.record(path, coarse);
        let new_fine = self.set.record(path, fine);
        let written = if new_coarse {
            coarse
        } else if new_fine {
            fine
        } else {
            return Ok(());
        };
        let mut buf = Vec::new();
        encode_record(&mut buf, path, written);
        self.file.write_all(&buf).map_err(self.io("append to"))?;
        self.records += 1;
        if new_coarse {
            self.unsynced = true;
        }
        Ok(())
    }

    /// Makes every recorded change durable (fdatasync), compacting first when
    /// the file has grown well past the merged set.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        if !self.unsynced {
            return Ok(());
        }
        if self.records > 1024 && self.records > 4 * self.set.record_count() {
            return self.compact();
        }
        self.file.sync_data().map_err(self.io("fsync"))?;
        self.unsynced = false;
        Ok(())
    }

    /// Rewrites the journal as the merged set (crash-safe: temp file, fsync,
    /// rename, fsync of the directory).
    pub fn compact(&mut self) -> Result<(), JournalError> {
        let mut buf = MAGIC.to_vec();
        let mut n = 0;
        for (p, c) in self.set.records() {
            encode_record(&mut buf, &p, c);
            n += 1;
        }
        self.replace(&buf)?;
        self.records = n;
        Ok(())
    }

    /// Replaces the recorded set with `set` (crash-safe rewrite): after a
    /// resynchronisation round, what changed during it.
    pub fn reset_to(&mut self, set: DirtySet) -> Result<(), JournalError> {
        let mut buf = MAGIC.to_vec();
        let records = set.records();
        for (p, c) in &records {
            encode_record(&mut buf, p, *c);
        }
        let n = records.len();
        self.replace(&buf)?;
        self.coarse = DirtySet::default();
        for (p, c) in records {
            self.coarse.record(&p, widened(c, CHUNK));
        }
        self.set = set;
        self.records = n;
        self.unsynced = false;
        Ok(())
    }

    /// Forgets everything quickly, without syncing (an activity log, whose
    /// entries matter after a crash of the process, not of the machine).
    pub fn reset_fast(&mut self) -> Result<(), JournalError> {
        self.file
            .set_len(MAGIC.len() as u64)
            .map_err(self.io("truncate"))?;
        self.file
            .seek(SeekFrom::Start(MAGIC.len() as u64))
            .map_err(self.io("seek"))?;
        self.set = DirtySet::default();
        self.coarse = DirtySet::default();
        self.records = 0;
        self.unsynced = false;
        Ok(())
    }

    /// Number of records in the file.
    #[must_use]
    pub fn records(&self) -> usize {
        self.records
    }

    /// Forgets everything (after a completed resynchronisation).
    pub fn clear(&mut self) -> Result<(), JournalError> {
        self.replace(MAGIC)?;
        self.set = DirtySet::default();
        self.coarse = DirtySet::default();
        self.records = 0;
        Ok(())
    }

    fn replace(&mut self, content: &[u8]) -> Result<(), JournalError> {
        let tmp = self.path.with_extension("compact");
        let mut f = File::create(&tmp).map_err(self.io("create temporary for"))?;
        f.write_all(content)
            .map_err(self.io("write temporary for"))?;
        f.sync_all().map_err(self.io("fsync temporary for"))?;
        std::fs::rename(&tmp, &self.path).map_err(self.io("rename over"))?;
        sync_parent(&self.path).map_err(self.io("fsync directory of"))?;
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(self.io("reopen"))?;
        f.seek(SeekFrom::End(0)).map_err(self.io("seek"))?;
        self.file = f;
        self.unsynced = false;
        Ok(())
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).expect("path")
    }

    #[test]
    fn ranges_merge_and_cover() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        assert_eq!(r.len(), 2);
        assert!(r.covers(12, 18) && r.covers(30, 40) && !r.covers(15, 35));
        r.insert(20, 30); // adjacent on both sides
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(10, 40)]);
        r.insert(5, 12);
        r.insert(39, 50);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(5, 50)]);
        r.insert(100, 100); // empty: ignored
        r.insert(60, 70);
        r.insert(0, 200); // swallows everything
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(0, 200)]);
        assert!(r.covers(7, 7));
    }

    #[test]
    fn ranges_match_a_bitmap_model() {
        // Deterministic pseudo-random inserts compared with a byte map.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200 {
            let mut r = RangeSet::default();
            let mut model = [false; 256];
            for _ in 0..12 {
                let a = next() % 256;
                let b = (a + next() % 40).min(256);
                r.insert(a, b);
                for i in a..b {
                    model[usize::try_from(i).expect("small")] = true;
                }
            }
            let mut rebuilt = [false; 256];
            let mut last_end = None;
            for (s, e) in r.iter() {
                assert!(s < e);
                if let Some(le) = last_end {
                    assert!(s > le, "ranges must be disjoint and non-adjacent");
                }
                last_end = Some(e);
                for i in s..e {
                    rebuilt[usize::try_from(i).expect("small")] = true;
                }
            }
            assert_eq!(model, rebuilt);
        }
    }

    #[test]
    fn dirty_set_merges_and_tree_implies_descendants() {
        let mut d = DirtySet::default();
        assert!(d.record(&p("a/f"), Change::Range { start: 0, end: 10 }));
        assert!(!d.record(&p("a/f"), Change::Range { start: 2, end: 8 }));
        assert!(d.record(&p("a/f"), Change::Meta));
        assert!(d.record(&p("ab"), Change::Meta));
        assert!(d.record(&p("a"), Change::Tree));
        assert!(d.covers(&p("a/f/g"), Change::Meta));
        assert!(!d.record(&p("a/x"), Change::Range { start: 0, end: 1 }));
        // "ab" is not below "a".
        assert_eq!(
            d.iter().map(|(p, _)| p.to_string()).collect::<Vec<_>>(),
            ["a", "ab"]
        );
        assert!(d.record(&RelPath::root(), Change::Tree));
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn ranges_remove_cuts_and_splits() {
        let mut r = RangeSet::default();
        r.insert(0, 100);
        r.insert(200, 300);
        r.remove(50, 60);
        r.remove(90, 250);
        r.remove(1000, 2000);
        assert_eq!(
            r.iter().collect::<Vec<_>>(),
            vec![(0, 50), (60, 90), (250, 300)]
        );
        r.remove(0, u64::MAX);
        assert!(r.is_empty());
    }

    #[test]
    fn after_covers_the_later_entries_of_a_directory_and_their_subtrees() {
        let mut d = DirtySet::default();
        d.record(&p("top/x/deep"), Change::Meta);
        d.record(&p("top/b/f"), Change::Range { start: 0, end: 10 });
        d.record(&p("top/a"), Change::Meta);
        assert!(d.record(&p("top/b"), Change::After));
        // Below the names after "b": implied, and forgotten.
        assert!(d.covers(&p("top/c"), Change::Tree));
        assert!(d.covers(&p("top/x/deep/er"), Change::Range { start: 0, end: 1 }));
        assert!(!d.record(&p("top/c/new"), Change::Meta));
        assert!(!d.iter().any(|(p, _)| p.as_bytes() == b"top/x/deep"));
        // "b" itself and what sorts before it are not.
        assert!(!d.covers(&p("top/b"), Change::Meta));
        assert!(d.covers(&p("top/b/f"), Change::Range { start: 0, end: 10 }));
        assert!(!d.covers(&p("top/a"), Change::Tree));
        assert!(d.covers(&p("top/a"), Change::Meta));
        assert!(!d.covers(&p("top"), Change::Meta));
        assert!(!d.covers(&p("topx"), Change::Meta));
        // A later cursor adds nothing, an earlier one widens it.
        assert!(!d.record(&p("top/c"), Change::After));
        assert!(d.record(&p("top/a"), Change::After));
        assert!(!d.iter().any(|(p, _)| p.as_bytes() == b"top/b/f"));
        assert_eq!(
            d.iter()
                .find(|(p, _)| p.as_bytes() == b"top")
                .map(|(_, c)| c.after.clone()),
            Some(Some(b"a".to_vec()))
        );
        // The records rebuild the set; a tree above swallows the cursor.
        let mut again = DirtySet::default();
        for (path, c) in d.to_records() {
            again.record(&path, c);
        }
        assert_eq!(again, d);
        assert!(d.record(&RelPath::root(), Change::Tree));
        assert_eq!(d.len(), 1);
        // At the root (no parent) it means the whole tree.
        let mut r = DirtySet::default();
        r.record(&RelPath::root(), Change::After);
        assert!(r.covers(&p("any/thing"), Change::Meta));
    }

    #[test]
    fn paths_deeper_than_path_max_are_recorded_and_read_back() {
        let name = vec![b'n'; 200];
        let names: Vec<&[u8]> = (0..45).map(|_| name.as_slice()).collect();
        let deep = RelPath::from_names_upwards(&names).expect("deep");
        let file = deep.join(b"f").expect("join");
        let mid = RelPath::from_names_upwards(&names[..20]).expect("mid");
        let mut d = DirtySet::default();
        assert!(d.record(
            &file,
            Change::Range {
                start: 0,
                end: 4096
            }
        ));
        assert!(d.record(&mid, Change::Tree));
        assert!(d.covers(&file, Change::Meta), "below a recorded subtree");
        assert_eq!(d.len(), 1);
        let mut buf = Vec::new();
        encode_record(&mut buf, &file, Change::Meta);
        let (recs, valid) = decode_records(&buf);
        assert_eq!(valid, buf.len());
        assert_eq!(recs, vec![(file, Change::Meta)]);
    }

    #[test]
    fn widening_rounds_to_chunks() {
        assert_eq!(widen(0, 1), (0, CHUNK));
        assert_eq!(widen(CHUNK + 1, 2 * CHUNK + 1), (CHUNK, 3 * CHUNK));
        assert_eq!(widen(CHUNK, 2 * CHUNK), (CHUNK, 2 * CHUNK));
    }

    #[test]
    fn journal_survives_reopen_torn_tail_and_compaction() {
        let dir = std::env::temp_dir().join(format!("rfs-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("j");
        {
            let mut j = Journal::open(&path).expect("open");
            for i in 0..3000u64 {
                j.record(
                    &p("big"),
                    Change::Range {
                        start: i * CHUNK * 2,
                        end: i * CHUNK * 2 + 1,
                    },
                )
                .expect("record");
            }
            j.record(&p("gone"), Change::Meta).expect("record");
            j.record(&p("d"), Change::Tree).expect("record");
            j.record(&p("e/m"), Change::After).expect("record");
            j.sync().expect("sync");
        }
        // A torn record at the end: never acknowledged, cut off on open.
        let mut raw = std::fs::read(&path).expect("read");
        let before = raw.len();
        raw.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 9, 9]);
        std::fs::write(&path, &raw).expect("write");
        let mut j = Journal::open(&path).expect("reopen");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), before as u64);
        assert_eq!(j.dirty().len(), 4);
        assert!(j.dirty().covers(&p("e/n/o"), Change::Meta));
        assert!(
            j.dirty()
                .covers(&p("big"), Change::Range { start: 0, end: 1 })
        );
        assert!(j.dirty().covers(&p("d/x"), Change::Meta));
        let set = j.dirty().clone();
        j.compact().expect("compact");
        drop(j);
        let mut j = Journal::open(&path).expect("reopen");
        assert_eq!(j.dirty(), &set);
        j.clear().expect("clear");
        drop(j);
        assert!(Journal::open(&path).expect("reopen").dirty().is_empty());
        std::fs::write(&path, b"garbage!garbage").expect("write");
        assert!(matches!(Journal::open(&path), Err(JournalError::Magic(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
