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
    /// Bytes failed their piece digest: never landed; the request moves on and the
    /// source is avoided for a while.
    #[error("source {url} sent piece {piece} with the wrong digest")]
    Corrupt { url: String, piece: u64 },
    /// This source does not hold these bytes (a peer without the blocks, an upload that
    /// has not sent them): the request moves to the next source, nothing fails.
    #[error("source {url} does not have bytes {start}..{end}")]
    Absent { url: String, start: u64, end: u64 },
}

impl SourceError {
    /// Worth another try after a pause: the server may come back.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            Self::Unreachable { .. } | Self::Interrupted { .. } | Self::Corrupt { .. } => true,
            Self::Changed { .. } | Self::Protocol { .. } | Self::Absent { .. } => false,
        }
    }
}

/// Why an image failed, persisted in state.json: whether `bifs fill` may retry it is
/// decided by the kind, never by the words of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The whole image's digest differs from the spec's: the bytes cannot be trusted.
    Checksum,
    /// The source now holds another version: the cached blocks belong to the old one.
    SourceChanged,
    /// The source answered with a permanent error (404, 410, 403, a bad reply).
    SourceGone,
    /// The source kept failing with errors that may pass (unreachable, 5xx).
    SourceUnreachable,
    /// The cache disk is full.
    DiskFull,
    /// Reading or writing the cache disk failed.
    DiskIo,
    /// Anything else.
    Other,
}

impl FailureKind {
    pub fn of(e: &Error) -> Self {
        match e {
            Error::Checksum { .. } => Self::Checksum,
            Error::Source(SourceError::Changed { .. }) | Error::VolumeChanged { .. } => {
                Self::SourceChanged
            }
            Error::Source(s) if s.is_retryable() => Self::SourceUnreachable,
            Error::Source(_) => Self::SourceGone,
            Error::Io { errno, .. } if *errno == libc::ENOSPC => Self::DiskFull,
            Error::Io { .. } => Self::DiskIo,
            Error::NoSource { .. } | Error::ReadTimeout { .. } => Self::SourceUnreachable,
            Error::Failed { kind, .. } => *kind,
            Error::NotFound(_)
            | Error::BadInput(_)
            | Error::Conflict { .. }
            | Error::Unsupported(_)
            | Error::ShuttingDown
            | Error::Deleted(_)
            | Error::Kept { .. }
            | Error::SpecDiffers { .. } => Self::Other,
        }
    }

    /// Whether a retry (`bifs fill`) may clear the failure. A checksum mismatch or a
    /// changed source may not: the blocks on disk are of the wrong image.
    pub fn retry_allowed(self) -> bool {
        !matches!(self, Self::Checksum | Self::SourceChanged)
    }

    /// For state.json files written before kinds existed: the kind their message names.
    pub fn guess_from_message(msg: &str) -> Self {
        if msg.contains("checksum mismatch") {
            Self::Checksum
        } else if msg.contains("source changed") {
            Self::SourceChanged
        } else {
            Self::Other
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
    Failed {
        name: String,
        msg: String,
        kind: FailureKind,
    },
    /// No source of the image can serve absent blocks (a type this build cannot fetch
    /// from, an upload that stopped, peers without the blocks and no URL).
    #[error("image {name:?}: bytes {start}..{end} are not cached on this node and {reason}")]
    NoSource {
        name: String,
        start: u64,
        end: u64,
        reason: String,
    },
    #[error("image {name:?}: bytes {start}..{end} did not arrive within {secs} s ({reason}); the read gave up (--read-timeout)")]
    ReadTimeout {
        name: String,
        start: u64,
        end: u64,
        secs: u64,
        reason: String,
    },
    #[error("image {0:?} was deleted")]
    Deleted(String),
    /// A delete or cleanup refused: the copy is in use or the cluster needs it.
    #[error("image {name:?} stays: {why}{hint}")]
    Kept {
        name: String,
        why: String,
        hint: &'static str,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("volume {path} changed size during the export ({was_bytes} -> {now_bytes} bytes); a volume must not be written while it is exported: export from a snapshot, then recreate the image")]
    VolumeChanged {
        path: PathBuf,
        was_bytes: u64,
        now_bytes: u64,
    },
    /// Creating an image that exists with another spec: every differing field, both values.
    #[error("{}", describe_diffs(name, diffs))]
    SpecDiffers { name: String, diffs: Vec<FieldDiff> },
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

    /// As `io`, saying what bifs was doing: "cannot open disk directory".
    pub fn io_doing(path: impl Into<PathBuf>, doing: &str, e: io::Error) -> Self {
        match Self::io(path, e) {
            Self::Io { path, msg, errno } => Self::Io {
                path,
                msg: format!("{doing}: {msg}"),
                errno,
            },
            other => other,
        }
    }

    /// The errno a FUSE reader sees. One table, no catch-all arm.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NotFound(_) => libc::ENOENT,
            Self::BadInput(_) | Self::Conflict { .. } | Self::SpecDiffers { .. } => libc::EINVAL,
            Self::Unsupported(_) => libc::EIO,
            Self::Io { errno, .. } => *errno,
            Self::Checksum { .. }
            | Self::Source(_)
            | Self::Failed { .. }
            | Self::NoSource { .. }
            | Self::ReadTimeout { .. }
            | Self::ShuttingDown
            | Self::Deleted(_)
            | Self::VolumeChanged { .. } => libc::EIO,
            Self::Kept { .. } => libc::EBUSY,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One field where an existing image's spec differs from the one asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDiff {
    pub field: String,
    pub have: String,
    pub want: String,
}

impl std::fmt::Display for FieldDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &str| {
            if v.is_empty() {
                "(not set)".to_string()
            } else {
                v.to_string()
            }
        };
        write!(
            f,
            "{} is {}, asked {}",
            self.field,
            show(&self.have),
            show(&self.want)
        )
    }
}

fn describe_diffs(name: &str, diffs: &[FieldDiff]) -> String {
    let fields: Vec<String> = diffs.iter().map(ToString::to_string).collect();
    format!(
        "image {name} already exists with a different spec: {}; delete it first (`bifs delete {name}`) or use another name",
        fields.join("; ")
    )
}
