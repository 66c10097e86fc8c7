//! Typed errors of the core. Each shell maps them once: `errno()` for FUSE,
//! `server::status` for HTTP, `cli` for exit codes. Messages name the thing that
//! went wrong and what a person can do about it.

use std::io;
use std::path::PathBuf;

/// What a source (origin URL, peer, local volume) can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    #[error("source {url} answered HTTP {status}{hint}")]
    Status {
        url: String,
        status: u16,
        hint: &'static str,
    },
    #[error("cannot reach source {url}: {reason}; check the URL and that the server is up")]
    Unreachable { url: String, reason: String },
    #[error("source {url} broke off mid-transfer: {reason}")]
    Interrupted { url: String, reason: String },
    #[error("source changed ({what}: {was} -> {now}); the cached blocks belong to the old version: delete and recreate the image")]
    Changed {
        what: &'static str,
        was: String,
        now: String,
    },
    #[error("source {url} sent a bad reply: {reason}")]
    Protocol { url: String, reason: String },
}

impl SourceError {
    /// Worth another try after a pause: the server may come back.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            Self::Unreachable { .. } | Self::Interrupted { .. } => true,
            Self::Changed { .. } | Self::Protocol { .. } => false,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("no image named {0:?}; `bifs list` shows the images this node has")]
    NotFound(String),
    #[error("{0}")]
    BadInput(String),
    #[error("image {name:?} already exists with a different {field} ({have:?}, asked {want:?}); delete it first or use another name")]
    Conflict {
        name: String,
        field: &'static str,
        have: String,
        want: String,
    },
    #[error("checksum mismatch: expected {want}, computed {got}; the source does not hold the image the checksum describes")]
    Checksum { want: String, got: String },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{path}: {msg}")]
    Io {
        path: PathBuf,
        msg: String,
        errno: i32,
    },
    #[error("image {name:?} failed: {msg}")]
    Failed { name: String, msg: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, e: io::Error) -> Self {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        let mut msg = e.to_string();
        if errno == libc::ENOSPC {
            msg.push_str("; free space on the cache disk or add another --disk");
        }
        Self::Io {
            path: path.into(),
            msg,
            errno,
        }
    }

    /// The errno a FUSE reader sees. One table, no catch-all arm.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NotFound(_) => libc::ENOENT,
            Self::BadInput(_) | Self::Conflict { .. } => libc::EINVAL,
            Self::Unsupported(_) => libc::EIO,
            Self::Io { errno, .. } => *errno,
            Self::Checksum { .. } | Self::Source(_) | Self::Failed { .. } | Self::ShuttingDown => {
                libc::EIO
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
