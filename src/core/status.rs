//! The status document of an image (`bifs status --json`, `GET /v1/images/{name}`) and
//! the extended attributes the mount shows from it. One place defines both, so that
//! `getfattr` and `bifs status` never disagree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::peer::CopyDoc;
use super::store::State;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub name: String,
    pub format: String,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<u64>,
    pub state: State,
    pub progress: u32,
    pub bytes_cached: u64,
    /// What the image's data file takes on disk (holes take nothing).
    #[serde(default)]
    pub bytes_allocated: u64,
    /// The checksum the spec asked for; when it asked none, the one computed once ready.
    pub checksum: String,
    /// What the hashing of this node's copy produced (empty until every byte is hashed).
    #[serde(default)]
    pub computed_checksum: String,
    /// `sha512` or `sha256`.
    #[serde(default)]
    pub checksum_algorithm: String,
    pub source: SourceDoc,
    pub disk: DiskDoc,
    pub path: String,
    pub raw_path: String,
    /// Why the image failed, or a condition it rides out (a source that cannot serve).
    pub error: String,
    pub fill: bool,
    pub block_size: u64,
    pub bytes_fetched: u64,
    /// How long the image's fill has paused for readers far ahead of a fill (of any image
    /// on the node), in ms, since the daemon opened the image: reads that never pause
    /// leave it 1% of the time, so an image gets ready later while a VM reads without
    /// pause, and this says why.
    #[serde(default)]
    pub fill_held_ms: u64,
    /// How long the node's hashing thread waited for readers (of any image still arriving)
    /// before hashing this image's next bytes, in ms: the same floor, and the same reason
    /// to get ready later.
    #[serde(default)]
    pub hash_held_ms: u64,
    /// Names this version of the image (peers serve each other only the same version).
    #[serde(default)]
    pub version: String,
    /// The ready copies the cluster keeps (0: the node default, `--min-copies`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_number_of_copies: u32,
    /// Stored as given; bifs does not place images by them (Kubernetes does).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selector: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_selector: Vec<String>,
    /// Handles open through this node's mount.
    #[serde(default)]
    pub open_handles: u32,
    /// The copies other nodes hold, as this node last heard from them.
    #[serde(default)]
    pub copies: Vec<CopyDoc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceDoc {
    #[serde(rename = "type")]
    pub kind: String,
    pub parameters: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskDoc {
    pub uuid: String,
    pub path: String,
    /// Images on a read-only disk are served, never completed or removed.
    #[serde(default)]
    pub read_only: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The extended attributes of every image file, in `listxattr` order.
pub const XATTRS: [&str; 7] = [
    "user.bifs.state",
    "user.bifs.progress",
    "user.bifs.format",
    "user.bifs.checksum",
    "user.bifs.computed-checksum",
    "user.bifs.source",
    "user.bifs.error",
];

impl Status {
    /// The value of extended attribute `name`, if the image has it.
    pub fn xattr(&self, name: &str) -> Option<String> {
        Some(match name {
            "user.bifs.state" => self.state.as_str().to_string(),
            "user.bifs.progress" => self.progress.to_string(),
            "user.bifs.format" => self.format.clone(),
            "user.bifs.checksum" => self.checksum.clone(),
            "user.bifs.computed-checksum" => self.computed_checksum.clone(),
            "user.bifs.source" => self
                .source
                .parameters
                .get("url")
                .cloned()
                .unwrap_or_else(|| self.source.kind.clone()),
            "user.bifs.error" => self.error.clone(),
            _ => return None,
        })
    }
}

/// `t` as `YYYY-MM-DD HH:MM:SS UTC`, for error lines a person reads.
pub(crate) fn humantime_utc(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
