//! Reads an image's files on a disk directly (not through the daemon) and checks the
//! durability rule: every block whose bit is set in `bitmap` holds the source's bytes.

use std::path::Path;

/// What one look at an image's files on disk found.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskCheck {
    /// Blocks whose bit is set (all of them for a ready image).
    pub present: u64,
    /// Blocks whose bit is not set but whose data already holds the source's bytes (the
    /// failpoint's window: data durable, bit not yet).
    pub unclaimed_written: u64,
    pub bytes_verified: u64,
    pub ready: bool,
    /// state.json says failed.
    pub failed: bool,
}

/// Reads `<disk>/images/<name>/{spec.json,state.json,bitmap,data}` directly and checks
/// every present block against `src`. None: the image's directory does not exist (yet).
pub fn check_on_disk(disk: &Path, name: &str, src: &[u8]) -> Option<DiskCheck> {
    let dir = disk.join("images").join(name);
    if !dir.exists() {
        return None;
    }
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("spec.json")).unwrap()).unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    let bs = spec["blockSize"].as_u64().unwrap() as usize;
    assert_eq!(spec["identity"]["size"].as_u64(), Some(src.len() as u64));
    let mut data = std::fs::read(dir.join("data")).unwrap();
    // After a power cut the data file may be shorter than the image: what is missing
    // reads as zeros (and must then have no bit set).
    assert!(
        data.len() <= src.len(),
        "{name}: the data file is not larger than the image"
    );
    data.resize(src.len(), 0);
    let bitmap = std::fs::read(dir.join("bitmap")).unwrap();
    let blocks = src.len().div_ceil(bs);
    assert!(
        bitmap.len() * 8 >= blocks,
        "{name}: the bitmap covers every block"
    );
    let ready = state["state"] == "ready";
    let mut c = DiskCheck {
        ready,
        failed: state["state"] == "failed",
        ..DiskCheck::default()
    };
    for b in 0..blocks {
        let bit = bitmap[b / 8] >> (b % 8) & 1 == 1;
        let r = b * bs..((b + 1) * bs).min(src.len());
        if bit || ready {
            assert!(
                data[r.clone()] == src[r.clone()],
                "{name}: block {b} is marked present (ready: {ready}) but its data differs from the source"
            );
            c.present += 1;
            c.bytes_verified += r.len() as u64;
        } else if data[r.clone()] == src[r.clone()] {
            c.unclaimed_written += 1;
        }
    }
    Some(c)
}
