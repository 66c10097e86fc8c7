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

/// Incompatible feature bits of a v3 header (qcow2 spec, "incompatible_features").
const INCOMPAT_NAMES: [&str; 5] = [
    "the dirty bit (refcounts may be stale: run `qemu-img check -r all` on the source)",
    "the corrupt bit (the image is damaged: repair it with `qemu-img check -r all`)",
    "an external data file",
    "zstd compression (qcow2-rs decodes zlib only: convert with `-o compression_type=zlib`)",
    "extended L2 entries (subclusters: convert without `-o extended_l2=on`)",
];

impl Qcow2Header {
    /// Why qcow2-rs cannot decode this image's guest view, if it cannot: checked before
    /// the decoder opens it, because qcow2-rs panics on a missing backing file and a
    /// backing image must not reach out to other files anyway.
    pub fn raw_view_problem(&self, name: &str) -> Option<String> {
        if self.has_backing_file {
            return Some(format!(
                "qcow2 image {name:?} has a backing file of its own; a backing image must be self-contained"
            ));
        }
        if self.version < 2 {
            return Some(format!(
                "qcow2 image {name:?} is version {}, which is unsupported for the raw view",
                self.version
            ));
        }
        // qcow2-rs reads clusters of 512 bytes to 2 MiB.
        if !(9..=21).contains(&self.cluster_bits) {
            return Some(format!(
                "qcow2 image {name:?} has {}-bit clusters, which is unsupported for the raw view",
                self.cluster_bits
            ));
        }
        if self.incompatible_features != 0 {
            let what: Vec<String> = (0..64)
                .filter(|bit| self.incompatible_features & (1 << bit) != 0)
                .map(|bit| match INCOMPAT_NAMES.get(bit) {
                    Some(n) => n.to_string(),
                    None => format!("incompatible feature bit {bit}"),
                })
                .collect();
            return Some(format!(
                "qcow2 image {name:?} uses {}, which is unsupported for the raw view; \
                 the stored image itself stays readable",
                what.join(" and ")
            ));
        }
        None
    }
}

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

    fn header(version: u32, incompat: u64, backing: bool) -> Qcow2Header {
        Qcow2Header {
            version,
            virtual_size: 1 << 30,
            cluster_bits: 16,
            has_backing_file: backing,
            incompatible_features: incompat,
        }
    }

    #[test]
    fn raw_view_problems_name_the_feature() {
        assert_eq!(header(3, 0, false).raw_view_problem("a"), None);
        assert_eq!(header(2, 0, false).raw_view_problem("a"), None);
        let zstd = header(3, 1 << 3, false).raw_view_problem("z").unwrap();
        assert!(
            zstd.contains("zstd") && zstd.contains("unsupported for the raw view"),
            "{zstd}"
        );
        let ext = header(3, 1 << 4, false).raw_view_problem("e").unwrap();
        assert!(ext.contains("extended L2"), "{ext}");
        let both = header(3, (1 << 3) | (1 << 40), false)
            .raw_view_problem("b")
            .unwrap();
        assert!(both.contains("zstd") && both.contains("bit 40"), "{both}");
        let back = header(3, 0, true).raw_view_problem("o").unwrap();
        assert_eq!(
            back,
            "qcow2 image \"o\" has a backing file of its own; a backing image must be self-contained"
        );
        let mut big = header(3, 0, false);
        big.cluster_bits = 22;
        assert!(big
            .raw_view_problem("c")
            .unwrap()
            .contains("22-bit clusters"));
    }
}
