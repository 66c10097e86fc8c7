//! A local volume to export: a regular file or a block device (a Longhorn volume is a
//! block device on its host). This module owns what "export from a volume" needs to
//! know about the volume itself, and nothing about images or the store:
//!
//! - `Volume::open` refuses, with a message that says what to give instead, a missing
//!   path, a directory, and anything that is neither a regular file nor a block device
//!   (character devices, FIFOs, sockets: a FIFO would block the daemon forever).
//! - the size: file metadata for files, `lseek(SEEK_END)` for block devices (what
//!   BLKGETSIZE64 answers, without an ioctl).
//! - the allocated extents: SEEK_DATA / SEEK_HOLE on files; a block device is all data
//!   (it has no holes to ask about; its zero ranges are found by reading).
//! - `read_at` returns the bytes (holes read as zeros) and says whether the range was a
//!   hole, all zeros, or data, so the store can keep a hole a hole instead of writing
//!   zeros and the qcow2 layout can leave zero clusters unallocated.
//! - the export reads a consistent view only if nobody writes the volume meanwhile; we
//!   cannot prevent writes, but a size change is detected (`check_unchanged`, and any
//!   read that meets an early end of file) and is an error that says so.
//!
//! Everything here is blocking `std::fs` work: callers run it in `spawn_blocking` or a
//! dedicated thread.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{Error, Result, SourceError};

/// What the volume is on its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeKind {
    File,
    BlockDevice,
}

/// What a range of the volume held, as `Volume::read_at` found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contents {
    /// Entirely inside a hole (SEEK_DATA found no data there): nothing was read.
    Hole,
    /// Allocated, but every byte read was zero.
    Zeros,
    /// At least one byte is not zero.
    Data,
}

impl Contents {
    /// The range reads as zeros: the store can leave it a hole.
    pub fn is_zero(self) -> bool {
        matches!(self, Contents::Hole | Contents::Zeros)
    }
}

/// An open volume. Cloning is cheap and shares the file descriptor (reads use `pread`,
/// so clones never disturb each other).
#[derive(Debug, Clone)]
pub struct Volume {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    file: File,
    kind: VolumeKind,
    size_bytes: u64,
}

/// 64 KiB of zeros: comparing against it is a `memcmp`, fast even in debug builds.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Every byte of `buf` is zero.
pub fn is_all_zero(buf: &[u8]) -> bool {
    buf.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

impl Volume {
    /// Opens `path` read-only and records its size.
    pub fn open(path: impl AsRef<Path>) -> Result<Volume> {
        let path = path.as_ref();
        // Look before opening: opening a FIFO read-only would block until a writer came.
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::BadInput(format!(
                "volume {} does not exist; give the path of a volume file or block device",
                path.display()
            )),
            _ => Error::io(path, e),
        })?;
        let kind = volume_kind(path, &meta.file_type())?;
        let file = OpenOptions::new()
            .read(true)
            // No effect on files and block devices; keeps a FIFO swapped in since the
            // check above from blocking the open.
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        // Judge what was opened, not what the path named a moment ago.
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let kind_opened = volume_kind(path, &meta.file_type())?;
        if kind_opened != kind {
            return Err(Error::BadInput(format!(
                "volume {} was replaced while it was opened; try again",
                path.display()
            )));
        }
        let size_bytes = size_of(&file, kind, &meta).map_err(|e| Error::io(path, e))?;
        if size_bytes == 0 {
            return Err(Error::BadInput(format!(
                "volume {} is empty (0 bytes); there is nothing to export",
                path.display()
            )));
        }
        Ok(Volume {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                file,
                kind,
                size_bytes,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn kind(&self) -> VolumeKind {
        self.inner.kind
    }

    /// The size when the volume was opened: the size of the exported image.
    pub fn size_bytes(&self) -> u64 {
        self.inner.size_bytes
    }

    /// The size now (files: fstat; block devices: seek to the end).
    pub fn current_size(&self) -> Result<u64> {
        let i = &self.inner;
        let meta = i.file.metadata().map_err(|e| Error::io(&i.path, e))?;
        size_of(&i.file, i.kind, &meta).map_err(|e| Error::io(&i.path, e))
    }

    /// The size is still the one seen at `open`; otherwise `Error::VolumeChanged`.
    /// Call it once the last byte is read, so that an export that raced with a resize
    /// fails instead of producing an image of neither size.
    pub fn check_unchanged(&self) -> Result<()> {
        let now_bytes = self.current_size()?;
        if now_bytes != self.inner.size_bytes {
            return Err(self.changed(now_bytes));
        }
        Ok(())
    }

    fn changed(&self, now_bytes: u64) -> Error {
        Error::VolumeChanged {
            path: self.inner.path.clone(),
            was_bytes: self.inner.size_bytes,
            now_bytes,
        }
    }

    /// The allocated (data) extents that overlap `range`, clipped to it, in order.
    /// A block device is all data; so is a file on a filesystem without SEEK_DATA
    /// (the kernel's generic answer).
    pub fn data_extents(&self, range: Range<u64>) -> Result<Vec<Range<u64>>> {
        let end = range.end.min(self.inner.size_bytes);
        let mut out = Vec::new();
        if range.start >= end {
            return Ok(out);
        }
        if self.inner.kind == VolumeKind::BlockDevice {
            out.push(range.start..end);
            return Ok(out);
        }
        let mut pos = range.start;
        while pos < end {
            let Some(data) = self.seek(pos, libc::SEEK_DATA)? else {
                break;
            };
            if data >= end {
                break;
            }
            // SEEK_HOLE always finds one: the end of the file counts as a hole. ENXIO here
            // means the file shrank under us; the range then ends where it ends now.
            let hole = self.seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            if hole <= data {
                break;
            }
            out.push(data..hole);
            pos = hole;
        }
        Ok(out)
    }

    /// Reads `buf.len()` bytes at `offset` (holes read as zeros) and says what they were.
    /// The range must lie inside the size seen at `open`. A volume that ended early (it
    /// shrank since `open`) is `Error::VolumeChanged`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<Contents> {
        let i = &self.inner;
        let end = offset.saturating_add(buf.len() as u64);
        if end > i.size_bytes {
            return Err(Error::BadInput(format!(
                "read of {}..{end} is past the end of volume {} ({} bytes)",
                offset,
                i.path.display(),
                i.size_bytes
            )));
        }
        if buf.is_empty() {
            return Ok(Contents::Hole);
        }
        if i.kind == VolumeKind::File {
            let next_data = self.seek(offset, libc::SEEK_DATA)?;
            let in_hole = match next_data {
                Some(d) => d >= end,
                // ENXIO: no data at or after `offset`, or the file ends before it now.
                None => {
                    self.check_unchanged()?;
                    true
                }
            };
            if in_hole {
                buf.fill(0);
                return Ok(Contents::Hole);
            }
        }
        let mut done = 0usize;
        while done < buf.len() {
            match i.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    let now = self.current_size()?;
                    return Err(if now != i.size_bytes {
                        self.changed(now)
                    } else {
                        Error::io(
                            &i.path,
                            io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!("unexpected end of data at byte {}", offset + done as u64),
                            ),
                        )
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&i.path, e)),
            }
        }
        Ok(if is_all_zero(buf) {
            Contents::Zeros
        } else {
            Contents::Data
        })
    }

    /// `lseek(fd, pos, whence)`; `None` for ENXIO (no data / no hole past `pos`, or
    /// `pos` at or past the end of the file).
    fn seek(&self, pos: u64, whence: libc::c_int) -> Result<Option<u64>> {
        let i = &self.inner;
        // SAFETY: lseek only reads its integer arguments; the fd is open for our lifetime.
        // It moves the shared file position, which nothing here uses (reads are pread).
        let r = unsafe { libc::lseek(i.file.as_raw_fd(), pos as libc::off_t, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(Error::io(&i.path, e));
        }
        Ok(Some(r as u64))
    }
}

/// What a `Source` over a volume reports for a read error (`Source::read` speaks
/// `SourceError`): a size change is `Changed` (the image fails and cannot be retried:
/// recreate it), an I/O error may pass (`Interrupted`, retried), anything else is
/// permanent.
pub fn to_source_error(e: Error) -> SourceError {
    match e {
        Error::VolumeChanged {
            was_bytes,
            now_bytes,
            ..
        } => SourceError::Changed {
            what: "volume size (a volume must not be written while it is exported)",
            was: was_bytes.to_string(),
            now: now_bytes.to_string(),
        },
        Error::Io { path, msg, .. } => SourceError::Interrupted {
            url: path.display().to_string(),
            reason: msg,
        },
        Error::Source(s) => s,
        other => SourceError::Protocol {
            url: "volume".into(),
            reason: other.to_string(),
        },
    }
}

fn volume_kind(path: &Path, ft: &std::fs::FileType) -> Result<VolumeKind> {
    if ft.is_file() {
        return Ok(VolumeKind::File);
    }
    if ft.is_block_device() {
        return Ok(VolumeKind::BlockDevice);
    }
    let what = if ft.is_dir() {
        "a directory"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "neither a regular file nor a block device"
    };
    Err(Error::BadInput(format!(
        "{} is {what}, not a volume; give a volume file or a block device (e.g. /dev/longhorn/NAME)",
        path.display()
    )))
}

fn size_of(file: &File, kind: VolumeKind, meta: &std::fs::Metadata) -> io::Result<u64> {
    match kind {
        VolumeKind::File => Ok(meta.len()),
        // st_size of a block device node is 0; its end is where lseek(SEEK_END) lands.
        VolumeKind::BlockDevice => {
            let mut f = file;
            f.seek(SeekFrom::End(0))
        }
    }
}

#[cfg(test)]
#[path = "volume_tests.rs"]
pub(crate) mod tests;
