//! `bifs mount --manifests DIR`: every `.yaml`/`.yml` file in DIR is applied at start and
//! again whenever its content changes, through the same `Node::create` the API's
//! `POST /v1/images` uses (same spec: no-op; different: refused, naming each field).
//!
//! DIR is typically a Kubernetes ConfigMap volume: kubelet writes a new `..<timestamp>`
//! directory and swaps the `..data` symlink to it; the visible `name.yaml` entries are
//! symlinks through `..data`. So we poll (once a second: a handful of small files) and
//! compare what each visible file reads as, following symlinks, instead of watching
//! inodes: a swap changes what `name.yaml` reads without touching `name.yaml` itself.
//! Entries starting with `.` (kubelet's `..data`, `..2024_...`) are never read directly.
//!
//! A file that is invalid is logged once per version and skipped until it changes. A file
//! whose apply failed for a cause that can pass (origin unreachable, disk full) is tried
//! again after `RETRY`. Removing a file deletes nothing: images are deleted on purpose
//! (`bifs delete`), never because a ConfigMap lost a key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::core::error::FailureKind;
use crate::core::manifest::{self, Wanted};
use crate::core::{CreateOptions, Error, Node};

const POLL: Duration = Duration::from_secs(1);
const RETRY: Duration = Duration::from_secs(30);

/// What we last did with one file.
struct Seen {
    text: String,
    /// When to try again (a cause that can pass); None: done until the file changes.
    retry_at: Option<Instant>,
    /// The file could not be read last time (this error); applied again once it can.
    unreadable: Option<String>,
}

/// Applies DIR's manifests until `stop` is cancelled.
pub async fn watch(node: Arc<Node>, dir: PathBuf, stop: CancellationToken) {
    info!(dir = %dir.display(), "applying manifests from this folder and watching it for changes");
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let mut dir_missing_logged = false;
    let mut ignored_logged = std::collections::HashSet::new();
    loop {
        let d = dir.clone();
        match tokio::task::spawn_blocking(move || read_dir(&d)).await {
            Ok(Ok(listing)) => {
                dir_missing_logged = false;
                for name in listing.ignored {
                    if ignored_logged.insert(name.clone()) {
                        info!(file = %dir.join(&name).display(), "not a .yaml or .yml file; not applied");
                    }
                }
                sync(&node, &dir, listing.files, &mut seen).await;
            }
            Ok(Err(e)) if !dir_missing_logged => {
                warn!(dir = %dir.display(), error = %e, "cannot read the --manifests folder; trying again");
                dir_missing_logged = true;
            }
            Ok(Err(_)) => {}
            Err(e) => warn!(error = %e, "manifest reader task failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// What one look at DIR found.
struct Listing {
    /// The YAML files by name, each read (following symlinks) or its error.
    files: BTreeMap<String, Result<String, String>>,
    /// Visible files that are not read: their names do not end in .yaml or .yml.
    ignored: Vec<String>,
}

fn read_dir(dir: &Path) -> std::io::Result<Listing> {
    use std::io::Read;
    let mut out = BTreeMap::new();
    let mut ignored = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            ignored.push(name);
            continue;
        }
        let path = entry.path();
        // metadata follows the symlink: a ConfigMap key is a link to ..data/<key>.
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => continue,
            Err(e) => {
                out.insert(name, Err(e.to_string()));
                continue;
            }
        }
        let mut text = String::new();
        let read = std::fs::File::open(&path).and_then(|f| {
            f.take(manifest::MAX_INPUT_BYTES as u64 + 1)
                .read_to_string(&mut text)
        });
        out.insert(name, read.map(|_| text).map_err(|e| e.to_string()));
    }
    Ok(Listing {
        files: out,
        ignored,
    })
}

async fn sync(
    node: &Arc<Node>,
    dir: &Path,
    files: BTreeMap<String, Result<String, String>>,
    seen: &mut BTreeMap<String, Seen>,
) {
    let gone: Vec<String> = seen
        .keys()
        .filter(|k| !files.contains_key(*k))
        .cloned()
        .collect();
    for name in gone {
        seen.remove(&name);
        info!(file = %name, "manifest removed; its images stay (`bifs delete NAME` removes one)");
    }
    for (name, read) in files {
        let now = Instant::now();
        let text = match read {
            Ok(t) => t,
            Err(e) => {
                // A swap in progress can leave a dangling link for a moment: say so once
                // per distinct error, and read it again on the next poll.
                if seen
                    .get(&name)
                    .is_none_or(|s| s.unreadable.as_deref() != Some(e.as_str()))
                {
                    warn!(file = %dir.join(&name).display(), error = %e, "manifest not readable; trying again");
                }
                let text = seen.get(&name).map(|s| s.text.clone()).unwrap_or_default();
                seen.insert(
                    name,
                    Seen {
                        text,
                        retry_at: None,
                        unreadable: Some(e),
                    },
                );
                continue;
            }
        };
        if let Some(s) = seen.get(&name) {
            if s.unreadable.is_none() && s.text == text && s.retry_at.is_none_or(|t| now < t) {
                continue;
            }
        }
        let path = dir.join(&name);
        let retry_at = apply_file(node, &path, &text).await.then(|| now + RETRY);
        seen.insert(
            name,
            Seen {
                text,
                retry_at,
                unreadable: None,
            },
        );
    }
}

/// Applies one file's documents; true when something failed that a retry can cure.
async fn apply_file(node: &Arc<Node>, path: &Path, text: &str) -> bool {
    let file = path.display().to_string();
    let docs = match manifest::parse(text) {
        Ok(d) => d,
        Err(e) => {
            warn!(file, error = %e, "manifest not applied: fix the file; it is read again when it changes");
            return false;
        }
    };
    let mut retry = false;
    for doc in docs {
        let name = doc.wanted.name().to_string();
        let line = doc.line;
        match doc.wanted {
            Wanted::Create(spec) => {
                let existed = node.get(&name).is_ok();
                match node.create(spec, CreateOptions::default()).await {
                    Ok(_) if existed => {
                        debug!(file, line, image = %name, "manifest applied: unchanged")
                    }
                    Ok(_) => info!(file, line, image = %name, "manifest applied: image created"),
                    Err(e) => {
                        let passing = can_pass(&e);
                        retry |= passing;
                        warn!(file, line, image = %name, error = %e, will_retry = passing, "manifest not applied");
                    }
                }
            }
            Wanted::Use { .. } => {
                if node.get(&name).is_err() {
                    warn!(file, line, image = %name, "StorageClass names a backing image that does not exist and gives no source to create it");
                }
            }
        }
    }
    retry
}

/// Failures that can pass without the file changing: the core's failure kinds decide.
fn can_pass(e: &Error) -> bool {
    matches!(
        FailureKind::of(e),
        FailureKind::SourceUnreachable | FailureKind::DiskFull | FailureKind::DiskIo
    )
}
