//! Image formats: RAW is passed through; QCOW2 is recognised from its header so status
//! can show its virtual size, and its guest view is decoded through qcow2-rs (`qcow2.rs`).

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2(Qcow2Header),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub virtual_size: u64,
    pub cluster_bits: u32,
    pub has_backing_file: bool,
    pub incompatible_features: u64,
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

impl Format {
    /// Detects the format from the first bytes of an image.
    pub fn detect(head: &[u8]) -> Format {
        if head.len() >= 104 && &head[..4] == QCOW2_MAGIC {
            let be32 = |o: usize| u32::from_be_bytes(head[o..o + 4].try_into().unwrap());
            let be64 = |o: usize| u64::from_be_bytes(head[o..o + 8].try_into().unwrap());
            let version = be32(4);
            return Format::Qcow2(Qcow2Header {
                version,
                has_backing_file: be64(8) != 0,
                cluster_bits: be32(20),
                virtual_size: be64(24),
                incompatible_features: if version >= 3 { be64(72) } else { 0 },
            });
        }
        Format::Raw
    }

    pub fn name(&self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2(_) => "qcow2",
        }
    }

    pub fn virtual_size(&self) -> Option<u64> {
        match self {
            Format::Raw => None,
            Format::Qcow2(h) => Some(h.virtual_size),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_qcow2_magic_and_virtual_size() {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(QCOW2_MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        match Format::detect(&h) {
            Format::Qcow2(q) => {
                assert_eq!(q.virtual_size, 1 << 30);
                assert_eq!(q.cluster_bits, 16);
                assert!(!q.has_backing_file);
            }
            f => panic!("{f:?}"),
        }
        assert_eq!(Format::detect(&[0u8; 512]), Format::Raw);
    }
}
