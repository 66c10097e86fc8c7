//! A disk: a directory bifs caches images in, with its identity (`bifs-disk.json`) and
//! its lock (`bifs-disk.lock`). Opening one checks what an administrator gets wrong: a
//! path that does not exist (a typo must not start a new, empty cache), a disk another
//! daemon uses, the same disk given twice, a read-only disk (served as it is).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub uuid: String,
    /// The directory cannot be written (a read-only mount): its images are listed and
    /// served as they are; nothing on it is created, changed or cleaned up.
    pub read_only: bool,
    /// The disk's exclusive lock (`flock`), held while any copy of this `Disk` lives.
    _lock: Arc<File>,
}

#[derive(Serialize, Deserialize)]
struct DiskFile {
    uuid: String,
}

/// The lock file of a disk; it holds the pid of the daemon that has the disk.
const LOCK_FILE: &str = "bifs-disk.lock";

impl Disk {
    /// Opens a disk directory and takes its exclusive lock. The directory must exist: an
    /// existing directory without `bifs-disk.json` (an empty one, say) becomes a new disk,
    /// but a path that does not exist is refused, so that a typo in `--disk` never starts
    /// a new, empty cache beside the real one.
    pub fn open(path: &Path) -> Result<Disk> {
        match fs::metadata(path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::BadInput(format!(
                    "disk {} is not a directory; give a directory for the cache",
                    path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::BadInput(format!(
                    "disk directory {} does not exist; check the path for a typo, or create it \
                     (`mkdir -p {}`) to start a new, empty disk",
                    path.display(),
                    path.display()
                )))
            }
            Err(e) => return Err(Error::io_doing(path, "cannot open disk directory", e)),
        }
        let path = path
            .canonicalize()
            .map_err(|e| Error::io_doing(path, "cannot open disk directory", e))?;
        let read_only = !is_writable(&path);
        let lock = lock_disk(&path, read_only)?;
        if !read_only {
            let images = path.join("images");
            fs::create_dir_all(&images)
                .map_err(|e| Error::io_doing(&images, "cannot create the images folder", e))?;
            // Owner-only, also on disks made before this rule (specs may hold credentials).
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(&images, fs::Permissions::from_mode(0o700));
        }
        let meta = path.join("bifs-disk.json");
        let uuid = match fs::read(&meta) {
            Ok(bytes) => {
                let f: DiskFile = serde_json::from_slice(&bytes).map_err(|e| Error::Io {
                    path: meta.clone(),
                    msg: format!("unreadable disk file: {e}; restore it or remove it to give the disk a new identity"),
                    errno: libc::EIO,
                })?;
                f.uuid
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && read_only => {
                return Err(Error::Io {
                    path: path.clone(),
                    msg: "the disk is read-only and has no bifs-disk.json, so it is no bifs disk \
                          yet; make it writable once to initialise it"
                        .into(),
                    errno: libc::EROFS,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A new disk is root's alone: specs may hold URLs with credentials.
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
                    .map_err(|e| Error::io_doing(&path, "cannot make the disk private", e))?;
                let uuid = new_uuid();
                write_json_atomic(&meta, &DiskFile { uuid: uuid.clone() })?;
                uuid
            }
            Err(e) => return Err(Error::io_doing(&meta, "cannot read the disk's identity", e)),
        };
        Ok(Disk {
            path,
            uuid,
            read_only,
            _lock: lock,
        })
    }

    /// Opens every disk of a node; a disk given twice is refused.
    pub fn open_all(paths: &[PathBuf]) -> Result<Vec<Disk>> {
        check_distinct(paths)?;
        paths.iter().map(|p| Disk::open(p)).collect()
    }

    pub fn uuid8(&self) -> &str {
        &self.uuid[..8.min(self.uuid.len())]
    }

    pub fn image_dir(&self, name: &str) -> PathBuf {
        self.path.join("images").join(name)
    }

    /// Names of the images stored on this disk (complete directories only).
    pub fn image_names(&self) -> Result<Vec<String>> {
        let dir = self.path.join("images");
        let mut names = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            // A read-only disk initialised but never given an image.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.read_only => {
                return Ok(names)
            }
            Err(e) => return Err(Error::io_doing(&dir, "cannot list the images", e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io_doing(&dir, "cannot list the images", e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                // A create that died before its rename (`.creating-*`, or `.<name>.creating`
                // from older versions): nothing in it was ever served.
                if !self.read_only {
                    let _ = fs::remove_dir_all(entry.path());
                }
                continue;
            }
            names.push(name);
        }
        names.sort();
        Ok(names)
    }

    pub fn free_bytes(&self) -> u64 {
        self.space().map_or(0, |s| s.avail_bytes)
    }

    /// The size and free space of the filesystem the disk lives on.
    pub fn space(&self) -> Option<Space> {
        let c = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid C string.
        let s = unsafe {
            let mut s: libc::statvfs = std::mem::zeroed();
            if libc::statvfs(c.as_ptr(), &mut s) != 0 {
                return None;
            }
            s
        };
        let frsize = s.f_frsize as u64;
        Some(Space {
            dev: std::os::unix::fs::MetadataExt::dev(&fs::metadata(&self.path).ok()?),
            total_bytes: s.f_blocks as u64 * frsize,
            free_bytes: s.f_bfree as u64 * frsize,
            avail_bytes: s.f_bavail as u64 * frsize,
            files: s.f_files as u64,
            files_free: s.f_ffree as u64,
        })
    }
}

/// What `statvfs` says of a disk's filesystem; `dev` tells disks on one filesystem apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub dev: u64,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub avail_bytes: u64,
    pub files: u64,
    pub files_free: u64,
}

/// Whether this process may create files in `dir` (false on a read-only mount).
fn is_writable(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: access(2) reads the valid C string `c`.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// The disk locks this process holds, by the disk directory's (device, inode). `flock`
/// conflicts between two opens even within one process, so without this table a second
/// `Node` in one process (the core's crash-and-restart tests, while the first one's last
/// tasks wind down) would be refused its own disk. Process-wide, as the lock it mirrors.
/// A held lock: the directory's (device, inode) and the lock file while any `Disk` has it.
type HeldLock = ((u64, u64), Weak<File>);
static HELD: Mutex<Vec<HeldLock>> = Mutex::new(Vec::new());

/// The disk's exclusive lock, shared with any `Disk` of this process that holds it already.
fn lock_disk(dir: &Path, read_only: bool) -> Result<Arc<File>> {
    let m = fs::metadata(dir).map_err(|e| Error::io_doing(dir, "cannot open disk directory", e))?;
    let key = (m.dev(), m.ino());
    let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
    held.retain(|(_, w)| w.strong_count() > 0);
    if let Some(f) = held
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, w)| w.upgrade())
    {
        return Ok(f);
    }
    let f = Arc::new(take_lock(dir, read_only)?);
    held.push((key, Arc::downgrade(&f)));
    Ok(f)
}

/// Takes the disk's exclusive lock, so that two daemons never fill, flush or delete in
/// one disk directory. The lock is `flock` on `bifs-disk.lock` (on the directory itself
/// when the disk is read-only and has no lock file), released by the kernel when the
/// process dies, so a kill -9 leaves nothing to clean up. The holder writes its pid into
/// the file for the message a refused daemon prints.
fn take_lock(dir: &Path, read_only: bool) -> Result<File> {
    use std::os::fd::AsRawFd;
    let lock_path = dir.join(LOCK_FILE);
    let file = if read_only {
        File::open(&lock_path).or_else(|_| File::open(dir))
    } else {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
    }
    .map_err(|e| Error::io_doing(&lock_path, "cannot open the disk's lock file", e))?;
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(Error::io_doing(&lock_path, "cannot lock the disk", e));
        }
        let holder = fs::read_to_string(&lock_path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .map_or("pid unknown".to_string(), |pid| format!("pid {pid}"));
        return Err(Error::BadInput(format!(
            "disk {} is in use by another bifs ({holder}); stop it first, or give this daemon another --disk",
            dir.display()
        )));
    }
    if !read_only {
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|_| file.write_all_at(pid.as_bytes(), 0))
            .map_err(|e| Error::io_doing(&lock_path, "cannot write the disk's lock file", e))?;
    }
    Ok(file)
}

/// Refuses a disk given twice: two paths to one directory (a symlink, `..`, a bind mount).
pub fn check_distinct(paths: &[PathBuf]) -> Result<()> {
    let mut seen: Vec<((u64, u64), &PathBuf)> = Vec::new();
    for p in paths {
        let Ok(m) = fs::metadata(p) else { continue }; // Disk::open says what is wrong
        let key = (m.dev(), m.ino());
        if let Some((_, first)) = seen.iter().find(|(k, _)| *k == key) {
            return Err(Error::BadInput(format!(
                "disk {} is given twice ({} is the same directory); give each disk once",
                p.display(),
                first.display()
            )));
        }
        seen.push((key, p));
    }
    Ok(())
}

fn new_uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Replaces `path` with `value` as JSON, atomically (a temporary file, fsync, rename): the
/// write every metadata file of a disk uses (identity, spec, state).
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(value).expect("our types serialize");
    // Owner-only: a spec may hold a URL with credentials.
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
    }
    .map_err(|e| Error::io_doing(&tmp, "cannot create", e))?;
    f.write_all(&body)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io_doing(&tmp, "cannot write", e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io_doing(path, "cannot replace", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_keeps_its_uuid() {
        let t = tempfile::tempdir().unwrap();
        let a = Disk::open(t.path()).unwrap();
        let uuid = a.uuid.clone();
        assert_eq!(a.uuid8().len(), 8);
        drop(a); // releases the lock
        let b = Disk::open(t.path()).unwrap();
        assert_eq!(uuid, b.uuid);
    }

    #[test]
    fn a_disk_is_locked_while_open_and_a_missing_one_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let a = Disk::open(t.path()).unwrap();
        // A second open in this process shares the hold (another process is refused:
        // tests/admin_mount.rs); two paths to one disk are refused up front.
        assert_eq!(Disk::open(t.path()).unwrap().uuid, a.uuid);
        let twice = [t.path().to_path_buf(), t.path().join(".")];
        let e = Disk::open_all(&twice).unwrap_err().to_string();
        assert!(e.contains("given twice"), "{e}");
        drop(a);
        Disk::open(t.path()).unwrap();
        let e = Disk::open(&t.path().join("typo")).unwrap_err().to_string();
        assert!(
            e.contains("does not exist") && e.contains("mkdir -p"),
            "{e}"
        );
        assert!(!t.path().join("typo").exists());
    }
}
