//! The FUSE shell: inode numbers, attributes, xattrs and replies. Every decision about
//! bytes lives in the core; a read here is `image.read_view` answered from a tokio task,
//! so a slow fetch never blocks another reader.
//!
//! Inodes: 1 the root, 2 `.raw`, and per image instance `id`: `16 + 2*id` for the stored
//! bytes and `17 + 2*id` for the raw view. Ids are never reused in a process, so a deleted
//! and recreated image never shows a stale page cache.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use tracing::{debug, debug_span, warn, Instrument};

use crate::core::readahead::ReadState;
use crate::core::status::XATTRS;
use crate::core::view::{KernelCaps, OpenMode};
use crate::core::{Image, Node, View};

const RAW_DIR: u64 = 2;
/// The kernel's readahead window of this mount: 48 KiB.
///
/// Reads of the stored bytes while they arrive go to the daemon as asked
/// (FOPEN_DIRECT_IO, up to 1 MiB a request), whose own sequential detection grows its
/// window to 64 MiB; ready images are passthrough. So the window sizes only what
/// page-cached readers pull, and a page fault of an mmap reads the whole window around
/// it: at 1 MiB (the value before) an isolated 4 KiB fault of an image still arriving
/// fetched about 1 MiB from the origin (577-768 KiB per random 4 KiB mmap read, measured
/// by scripts/bench.sh). 48 KiB (12 pages) spans at most four 16 KiB blocks, so such a
/// fault fetches at most 64 KiB (64 KiB spans five when it straddles: 74 KiB on average).
/// Page-cached sequential readers (a qcow2's raw view, a ready image without passthrough)
/// send smaller requests, which the daemon's readahead serves from its cache.
pub const KERNEL_READAHEAD: u32 = 48 * 1024;
const TTL: Duration = Duration::from_secs(1);

struct Handle {
    ra: Arc<Mutex<ReadState>>,
    ino: u64,
    passthrough: bool,
}

/// Open files of one inode. The kernel refuses to mix cached and passthrough opens on
/// one inode, and wants every passthrough open of it to share one backing file.
#[derive(Default)]
struct InodeOpens {
    cached: u32,
    passthrough: u32,
    backing: Option<BackingId>,
}

pub struct BifsFs {
    node: Arc<Node>,
    rt: tokio::runtime::Handle,
    handles: Mutex<HashMap<u64, Handle>>,
    opens: Mutex<HashMap<u64, InodeOpens>>,
    next_fh: AtomicU64,
    /// What the kernel offered at init (the core decides the open mode from it).
    caps: KernelCaps,
    /// When the mount started: the times of the root and `.raw`.
    started: SystemTime,
}

pub fn ino_of(image: &Image, view: View) -> u64 {
    ino_for(image.id, view)
}

pub fn ino_for(id: u64, view: View) -> u64 {
    16 + 2 * id + u64::from(view == View::Raw)
}

/// Drops the kernel's caches of images that failed or went away, so that a failed image
/// serves no page it cached earlier and a deleted name disappears at once.
pub async fn invalidate_on_events(node: Arc<Node>, notifier: fuser::Notifier) {
    let mut rx = node.subscribe();
    loop {
        let ev = match rx.recv().await {
            Ok(ev) => ev,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        };
        let n = notifier.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let r = match &ev {
                crate::core::ImageEvent::Failed { id } | crate::core::ImageEvent::Ready { id } => {
                    [View::Stored, View::Raw]
                        .iter()
                        .try_for_each(|v| n.inval_inode(INodeNo(ino_for(*id, *v)), 0, 0))
                }
                crate::core::ImageEvent::Deleted { name, .. } => n
                    .inval_entry(INodeNo::ROOT, OsStr::new(name))
                    .and_then(|_| n.inval_entry(INodeNo(RAW_DIR), OsStr::new(name))),
            };
            // ENOENT: the kernel had nothing cached for it.
            if let Err(e) = r {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    debug!(event = ?ev, error = %e, "cache invalidation failed");
                }
            }
        })
        .await;
    }
}

/// How often a read that waits looks whether its caller was killed.
const KILLED_POLL: Duration = Duration::from_millis(200);

/// Resolves when the thread `tid` that sent a read has a fatal signal pending or is gone.
///
/// A killed reader of a stalled source must go away at once, but the kernel cannot drop
/// a request the daemon already took: the task waits, unkillable (D state), for the
/// answer. FUSE_INTERRUPT would tell us; fuser 0.18 answers it with ENOSYS (a TODO in its
/// request.rs), after which the kernel sends none. So a read that waits looks at its
/// caller instead: a SIGKILL, or any signal whose default action kills (the kernel
/// turns those into a SIGKILL pending on every thread of the process), shows in the
/// thread's `SigPnd` in /proc. One small read of /proc per `KILLED_POLL` and waiting read.
/// Never resolves when it cannot tell: pid 0 (a caller outside the daemon's pid
/// namespace, or the kernel itself) or no /proc.
async fn caller_killed(tid: u32) {
    // Looked at once: a stat of /proc per cold read would be on the read path.
    static HAVE_PROC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let have_proc = *HAVE_PROC.get_or_init(|| std::path::Path::new("/proc/self/status").exists());
    if tid == 0 || !have_proc {
        return futures::future::pending().await;
    }
    loop {
        tokio::time::sleep(KILLED_POLL).await;
        match std::fs::read_to_string(format!("/proc/{tid}/status")) {
            Ok(status) if kill_pending(&status) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return, // gone
            Err(_) => return futures::future::pending().await,
        }
    }
}

/// Whether a /proc/<tid>/status text shows SIGKILL pending (thread or process-wide).
fn kill_pending(status: &str) -> bool {
    let sigkill = 1u64 << (libc::SIGKILL - 1);
    status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("SigPnd:")
                .or_else(|| l.strip_prefix("ShdPnd:"))
        })
        .any(|mask| u64::from_str_radix(mask.trim(), 16).is_ok_and(|m| m & sigkill != 0))
}

/// How long the kernel may keep an image's attributes. The raw view's size is the stored
/// size until the first block tells the format (a qcow2's virtual size is in its header),
/// so until then its attributes are not kept: a `stat` right after `bifs create` must not
/// hold on to the wrong size for a second.
fn ttl_of(image: &Image, view: View) -> Duration {
    if view == View::Raw && image.format().is_none() {
        Duration::ZERO
    } else {
        TTL
    }
}

fn errno(e: &crate::core::Error) -> Errno {
    Errno::from_i32(e.errno())
}

impl BifsFs {
    pub fn new(node: Arc<Node>, rt: tokio::runtime::Handle) -> Self {
        Self {
            node,
            rt,
            handles: Mutex::new(HashMap::new()),
            opens: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            caps: KernelCaps::default(),
            started: SystemTime::now(),
        }
    }

    /// The flags of an open served by the daemon (the core chose the mode; see
    /// `core::view::open_mode` for why).
    fn open_flags(&self, image: &Image, view: View) -> FopenFlags {
        match image.open_mode(view, self.caps) {
            OpenMode::DirectIo => FopenFlags::FOPEN_DIRECT_IO,
            OpenMode::KeepCache | OpenMode::Passthrough => FopenFlags::FOPEN_KEEP_CACHE,
        }
    }

    fn image_of(&self, ino: u64) -> Option<(Arc<Image>, View)> {
        if ino < 16 {
            return None;
        }
        let view = if ino % 2 == 1 {
            View::Raw
        } else {
            View::Stored
        };
        self.node.get_by_id((ino - 16) / 2).map(|i| (i, view))
    }

    fn dir_attr(&self, ino: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::Directory,
            perm: 0o555,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file_attr(&self, image: &Image, view: View) -> FileAttr {
        let t = UNIX_EPOCH + Duration::from_secs(image.created_unix());
        FileAttr {
            ino: INodeNo(ino_of(image, view)),
            size: image.view_size(view),
            // `du` of an image shows what is cached on this node. The raw view shows 0:
            // its bytes are the stored file's (RAW) or decoded from them (QCOW2), so
            // `du -s` of the mount counts the cache once.
            blocks: match view {
                View::Stored => image.bytes_cached().div_ceil(512),
                View::Raw => 0,
            },
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: FileType::RegularFile,
            perm: 0o444,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }

    /// The entries of directory `ino` with their attributes, or None if it is no directory.
    fn entries(&self, ino: u64) -> Option<Vec<(FileAttr, String)>> {
        let view = match ino {
            1 => View::Stored,
            RAW_DIR => View::Raw,
            _ => return None,
        };
        let mut entries = vec![
            (self.dir_attr(ino), ".".to_string()),
            (self.dir_attr(1), "..".to_string()),
        ];
        if ino == 1 {
            entries.push((self.dir_attr(RAW_DIR), ".raw".into()));
        }
        for image in self.node.list() {
            entries.push((self.file_attr(&image, view), image.name.clone()));
        }
        Some(entries)
    }

    fn xattr(&self, image: &Image, name: &str) -> Option<String> {
        if !XATTRS.contains(&name) {
            return None;
        }
        self.node.status(image).xattr(name)
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl fuser::Filesystem for BifsFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // See KERNEL_READAHEAD (the daemon also sets it through sysfs after mounting).
        let _ = config.set_max_readahead(KERNEL_READAHEAD);
        let _ = config.set_max_background(64);
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        // mmap of a FOPEN_DIRECT_IO open (an image still arriving) goes through the page
        // cache instead of failing with ENODEV (Linux >= 6.6). Older kernels keep the
        // page-cached opens, so mmap works everywhere.
        self.caps.direct_io_mmap = config
            .add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
            .is_ok();
        self.caps.passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok();
        debug!(
            passthrough = self.caps.passthrough,
            direct_io = self.caps.direct_io_mmap,
            "FUSE session initialised"
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_string_lossy();
        let found = match (parent.0, name.as_ref()) {
            (1, ".raw") => return reply.entry(&TTL, &self.dir_attr(RAW_DIR), Generation(0)),
            (1, n) => self.node.get(n).ok().map(|i| (i, View::Stored)),
            (RAW_DIR, n) => self.node.get(n).ok().map(|i| (i, View::Raw)),
            _ => None,
        };
        match found {
            Some((image, view)) => reply.entry(
                &ttl_of(&image, view),
                &self.file_attr(&image, view),
                Generation(0),
            ),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino.0 {
            1 | RAW_DIR => reply.attr(&TTL, &self.dir_attr(ino.0)),
            n => match self.image_of(n) {
                Some((image, view)) => {
                    reply.attr(&ttl_of(&image, view), &self.file_attr(&image, view))
                }
                None => reply.error(Errno::ENOENT),
            },
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some((image, view)) = self.image_of(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if image.is_failed() {
            warn!(image = %image.name, "open of a failed image refused");
            return reply.error(Errno::EIO);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        // In use from now on: delete and cleanup name this pid while the handle is open.
        image.opened(fh, req.pid());
        let mut opens = self.opens.lock().unwrap();
        let o = opens.entry(ino.0).or_default();
        // Ready images go to the kernel as the data file itself: local-file speed. The
        // kernel refuses to mix modes on one inode, so opens made before stay cached.
        if image.open_mode(view, self.caps) == OpenMode::Passthrough && o.cached == 0 {
            if o.backing.is_none() {
                let path = image.data_path();
                match File::open(&path).and_then(|f| reply.open_backing(&f)) {
                    Ok(id) => o.backing = Some(id),
                    Err(e) => {
                        warn!(image = %image.name, error = %e, "passthrough unavailable, serving reads in the daemon")
                    }
                }
            }
            if let Some(id) = &o.backing {
                o.passthrough += 1;
                let h = Handle {
                    ra: Default::default(),
                    ino: ino.0,
                    passthrough: true,
                };
                // Recorded before the kernel can release it. Lock order: `opens`, then
                // `handles`; release never holds `handles` while it takes `opens`.
                self.handles.lock().unwrap().insert(fh, h);
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id);
                return;
            }
        }
        if o.passthrough > 0 {
            // Cannot happen while ready is final; refuse rather than let the kernel fail it.
            image.closed(fh);
            return reply.error(Errno::EBUSY);
        }
        o.cached += 1;
        drop(opens);
        self.handles.lock().unwrap().insert(
            fh,
            Handle {
                ra: Default::default(),
                ino: ino.0,
                passthrough: false,
            },
        );
        reply.opened(FileHandle(fh), self.open_flags(&image, view));
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some((image, view)) = self.image_of(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let ra = self
            .handles
            .lock()
            .unwrap()
            .get(&fh.0)
            .map(|h| h.ra.clone());
        if image.view_is_stored_bytes(view) {
            let _rt = self.rt.enter();
            if let Some(r) = image.read_present(offset, size, ra.as_deref()) {
                return match r {
                    Ok(bytes) => reply.data(&bytes),
                    Err(e) => {
                        warn!(image = %image.name, offset, size, error = %e, "read failed");
                        reply.error(errno(&e))
                    }
                };
            }
        }
        let span = debug_span!("read", image = %image.name, offset, size);
        let caller = req.pid();
        self.rt.spawn(
            async move {
                tokio::select! {
                    r = image.read_view(view, offset, size, ra.as_ref()) => match r {
                        Ok(bytes) => reply.data(&bytes),
                        Err(e) => {
                            warn!(error = %e, "read failed");
                            reply.error(errno(&e))
                        }
                    },
                    () = caller_killed(caller) => {
                        debug!(caller, "the reader was killed while it waited; answering EINTR");
                        reply.error(Errno::EINTR)
                    }
                }
            }
            .instrument(span),
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Its own statement: the `handles` guard must be gone before `opens` is locked
        // (open takes `opens` first; holding both the other way round deadlocked the
        // FUSE threads when a file was closed while another was being opened).
        let handle = self.handles.lock().unwrap().remove(&fh.0);
        if let Some(h) = handle {
            if let Some((image, _)) = self.image_of(h.ino) {
                image.closed(fh.0);
            }
            let mut opens = self.opens.lock().unwrap();
            if let Some(o) = opens.get_mut(&h.ino) {
                if h.passthrough {
                    o.passthrough -= 1;
                } else {
                    o.cached -= 1;
                }
                if o.cached == 0 && o.passthrough == 0 {
                    opens.remove(&h.ino); // drops the backing id
                }
            }
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = self.entries(ino.0) else {
            return reply.error(Errno::ENOTDIR);
        };
        for (i, (attr, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(attr.ino, (i + 1) as u64, attr.kind, name) {
                break;
            }
        }
        reply.ok();
    }

    /// With READDIRPLUS an `ls -l` of a thousand images needs no LOOKUP per image.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let Some(entries) = self.entries(ino.0) else {
            return reply.error(Errno::ENOTDIR);
        };
        for (i, (attr, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            let ttl = self
                .image_of(attr.ino.0)
                .map_or(TTL, |(image, view)| ttl_of(&image, view));
            if reply.add(attr.ino, (i + 1) as u64, name, &ttl, &attr, Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    /// `df` shows the cache disks: their size and free space (each filesystem once), so a
    /// mount of read-only images never looks full to disk alerts. Inodes likewise.
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        const BSIZE: u64 = 4096;
        let mut seen = Vec::new();
        let (mut total, mut free, mut avail, mut files, mut ffree) = (0, 0, 0, 0, 0);
        for space in self.node.disks.iter().filter_map(|d| d.space()) {
            if seen.contains(&space.dev) {
                continue;
            }
            seen.push(space.dev);
            total += space.total_bytes / BSIZE;
            free += space.free_bytes / BSIZE;
            avail += space.avail_bytes / BSIZE;
            files += space.files;
            ffree += space.files_free;
        }
        reply.statfs(
            total,
            free,
            avail,
            files,
            ffree,
            BSIZE as u32,
            255,
            BSIZE as u32,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.to_string_lossy();
        // Only the user namespace exists here. EOPNOTSUPP (not ENODATA) for the others
        // tells `ls -l`, `cp -a` and friends that this filesystem has no security labels
        // and no ACLs, so they stop asking: ls caches that per device, and its first
        // listing of 1000 images makes 2 getxattr round trips instead of 2000.
        if !name.starts_with("user.") {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let Some((image, _)) = self.image_of(ino.0) else {
            return reply.error(Errno::ENODATA);
        };
        match self.xattr(&image, &name) {
            Some(v) => reply_xattr(reply, size, v.as_bytes()),
            None => reply.error(Errno::ENODATA),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if self.image_of(ino.0).is_none() {
            return reply_xattr(reply, size, b"");
        }
        let mut data = Vec::new();
        for n in XATTRS {
            data.extend_from_slice(n.as_bytes());
            data.push(0);
        }
        reply_xattr(reply, size, &data);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if mask.contains(fuser::AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use super::kill_pending;

    #[test]
    fn a_pending_sigkill_shows_in_either_mask() {
        let status = |sig: &str, shd: &str| {
            format!("Name:\tdd\nState:\tD (disk sleep)\nSigQ:\t1/94\nSigPnd:\t{sig}\nShdPnd:\t{shd}\nSigBlk:\t0000000000000000\n")
        };
        assert!(!kill_pending(&status(
            "0000000000000000",
            "0000000000000000"
        )));
        assert!(kill_pending(&status(
            "0000000000000100",
            "0000000000000000"
        )));
        assert!(kill_pending(&status(
            "0000000000000000",
            "0000000000000100"
        )));
        // SIGINT (bit 2) and SIGTERM (bit 15) pending alone are not a kill: the caller
        // may handle them, and its read must still be answered with the bytes.
        assert!(!kill_pending(&status(
            "0000000000004002",
            "0000000000000000"
        )));
        assert!(!kill_pending("Name:\tdd\n"));
    }
}
