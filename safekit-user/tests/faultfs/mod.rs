//! A fault-injecting FUSE filesystem for tests: one file, `disk.img`, backed
//! by a real file, whose reads, writes and syncs fail with EIO while
//! [`FaultFs::failing`] is set. A loop device over it carries an ext4
//! filesystem, so the ext4 above sees I/O errors on command — this kernel
//! has neither device-mapper nor the kernel's fault injection.

use std::{
    ffi::OsStr,
    fs::File,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, UNIX_EPOCH},
};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

/// The one file's node id.
const IMAGE: INodeNo = INodeNo(2);
/// Its name.
pub(crate) const IMAGE_NAME: &str = "disk.img";
const TTL: Duration = Duration::from_secs(1);

struct Fs {
    backing: File,
    failing: Arc<AtomicBool>,
}

impl Fs {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == IMAGE {
            let size = self.backing.metadata().map_or(0, |m| m.len());
            (FileType::RegularFile, 0o600, size, 1)
        } else {
            (FileType::Directory, 0o755, 0, 2)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn failing(&self) -> bool {
        self.failing.load(Ordering::SeqCst)
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == IMAGE_NAME {
            reply.entry(&TTL, &self.attr(IMAGE), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == IMAGE || ino == INodeNo::ROOT {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.attr(&TTL, &self.attr(ino));
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino == IMAGE {
            // Direct I/O: every read and write reaches us (no page cache
            // here to hide an error).
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if self.failing() {
            return reply.error(Errno::EIO);
        }
        let mut buf = vec![0u8; size as usize];
        match self.backing.read_at(&mut buf, offset) {
            Ok(n) => reply.data(&buf[..n]),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.failing() {
            return reply.error(Errno::EIO);
        }
        match self.backing.write_all_at(data, offset) {
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.failing() {
            return reply.error(Errno::EIO);
        }
        match self.backing.sync_data() {
            Ok(()) => reply.ok(),
            Err(_) => reply.error(Errno::EIO),
        }
    }
}

/// The mounted fault-injecting filesystem; unmounted on drop.
pub(crate) struct FaultFs {
    /// While set, every read, write and sync of the image fails with EIO.
    pub(crate) failing: Arc<AtomicBool>,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl FaultFs {
    /// Mounts the filesystem at `mountpoint`, its image backed by `backing`
    /// (created with `size` bytes).
    pub(crate) fn mount(mountpoint: &Path, backing: &Path, size: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(mountpoint)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(backing)?;
        file.set_len(size)?;
        let failing = Arc::new(AtomicBool::new(false));
        let fs = Fs {
            backing: file,
            failing: Arc::clone(&failing),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![fuser::MountOption::FSName("safekit-test-faultfs".into())];
        config.acl = fuser::SessionACL::All;
        let session = fuser::spawn_mount(fs, mountpoint, &config)?;
        Ok(Self {
            failing,
            mountpoint: mountpoint.to_path_buf(),
            session: Some(session),
        })
    }

    /// The image file, through the mount.
    #[must_use]
    pub(crate) fn image(&self) -> PathBuf {
        self.mountpoint.join(IMAGE_NAME)
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH);
        drop(self.session.take());
    }
}
