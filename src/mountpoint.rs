//! What `bifs mount` checks of its mountpoint before it mounts: a stale mount left by a
//! killed daemon is detached; a live bifs mount and a directory with files in it are
//! refused, because mounting over them would hide the first daemon's images or the files.
//! There is no override: give an empty directory (a missing one is created).

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tracing::warn;

use crate::core::Error;

/// Makes `mp` ready to mount on, or says why it is not.
pub fn prepare(mp: &Path) -> anyhow::Result<()> {
    let mut stale = match std::fs::metadata(mp) {
        Ok(m) if m.is_dir() => false,
        Ok(_) => {
            return Err(usage(format!(
                "mountpoint {} is not a directory",
                mp.display()
            )))
        }
        Err(e) if is_disconnected(&e) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return std::fs::create_dir_all(mp)
                .with_context(|| format!("cannot create the mountpoint {}", mp.display()));
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot look at the mountpoint {}", mp.display()))
        }
    };
    let resolved = resolve(mp);
    // A bifs mount is there: live if its daemon answers. statfs always asks the daemon
    // (a stat may be answered from the kernel's attribute cache of a dead mount).
    // Mounts stacked by older versions are detached one by one.
    for _ in 0..16 {
        if !stale {
            let Some(fstype) = bifs_mount_at(&resolved) else {
                break;
            };
            match statfs(&resolved) {
                Ok(()) => {
                    return Err(usage(format!(
                        "{} is already mounted by a running bifs ({fstype}); stop that daemon \
                         first, or give this one another --mountpoint",
                        resolved.display()
                    )))
                }
                Err(e) if is_disconnected(&e) => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot look at the mount at {}", resolved.display())
                    })
                }
            }
        }
        warn!(mountpoint = %resolved.display(), "stale mount from a previous daemon; detaching it");
        detach(&resolved).with_context(|| {
            format!(
                "cannot detach the stale mount at {}; run `umount -l {}` as root",
                resolved.display(),
                resolved.display()
            )
        })?;
        stale = false;
    }
    let entries: Vec<String> = std::fs::read_dir(&resolved)
        .with_context(|| format!("cannot list the mountpoint {}", resolved.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .take(4)
        .collect();
    if !entries.is_empty() {
        return Err(usage(format!(
            "mountpoint {} is not empty (it holds {}): the mount would hide those files; \
             give an empty directory",
            resolved.display(),
            entries
                .iter()
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>()
                .join(", ")
                + if entries.len() == 4 { ", ..." } else { "" }
        )));
    }
    Ok(())
}

/// A dead FUSE mount answers ENOTCONN (ECONNABORTED on some kernels).
fn is_disconnected(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
    )
}

/// `mp` made absolute with its parent's symlinks resolved, without touching `mp` itself
/// (a dead mount there cannot be resolved).
fn resolve(mp: &Path) -> PathBuf {
    let abs = std::path::absolute(mp).unwrap_or_else(|_| mp.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => parent.canonicalize().map(|p| p.join(name)).unwrap_or(abs),
        _ => abs,
    }
}

fn statfs(mp: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(mp.as_os_str().as_bytes())?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid C string.
    let rc = unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        libc::statvfs(c.as_ptr(), &mut s)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Lazily detaches the mount at `mp` (umount -l).
pub fn detach(mp: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(mp.as_os_str().as_bytes())?;
    // SAFETY: umount2 takes a valid C path and flags; no memory is shared.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn usage(msg: String) -> anyhow::Error {
    Error::BadInput(msg).into()
}

/// The fstype of a bifs FUSE mount at `mp`, if one is mounted there (`/proc/self/mountinfo`:
/// the source is "bifs", as `FSName` sets it).
fn bifs_mount_at(mp: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let point = unescape(left.split(' ').nth(4)?);
        let mut right = right.split(' ');
        let (fstype, source) = (right.next()?, right.next()?);
        (point == mp && source == "bifs" && fstype.starts_with("fuse")).then(|| fstype.to_string())
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/tmp/a\\040b"), PathBuf::from("/tmp/a b"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn a_non_empty_directory_is_refused_and_an_empty_one_is_fine() {
        let t = tempfile::tempdir().unwrap();
        prepare(t.path()).unwrap();
        std::fs::write(t.path().join("keep.txt"), b"x").unwrap();
        let e = format!("{:#}", prepare(t.path()).unwrap_err());
        assert!(e.contains("not empty") && e.contains("keep.txt"), "{e}");
    }
}
