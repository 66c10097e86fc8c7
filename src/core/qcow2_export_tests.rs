use super::*;
use crate::core::volume::tests::{random, sparse_volume, standard_volume, LoopDevice, MIB};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use rand::seq::SliceRandom;

/// Reads the whole qcow2 from `layout` in `chunk`-byte pieces, in random order, into `out`.
fn export_shuffled(layout: &Qcow2Layout, out: &Path, chunk: u64) {
    let f = File::create(out).unwrap();
    let mut offsets: Vec<u64> = (0..layout.len().div_ceil(chunk))
        .map(|i| i * chunk)
        .collect();
    offsets.shuffle(&mut rand::rng());
    let mut buf = vec![0u8; chunk as usize];
    for off in offsets {
        let n = layout.read_at(off, &mut buf).unwrap();
        assert_eq!(
            n as u64,
            chunk.min(layout.len() - off),
            "short read at {off}"
        );
        f.write_all_at(&buf[..n], off).unwrap();
    }
    // Past the end: nothing.
    assert_eq!(layout.read_at(layout.len(), &mut buf).unwrap(), 0);
    assert_eq!(f.metadata().unwrap().len(), layout.len());
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img (qemu-utils)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// `qemu-img check` is clean and `qemu-img compare` says identical to the raw volume.
fn assert_valid_and_identical(qcow2: &Path, volume: &Path) {
    let (q, v) = (qcow2.to_str().unwrap(), volume.to_str().unwrap());
    let (ok, text) = qemu_img(&["check", "-f", "qcow2", q]);
    assert!(
        ok && text.contains("No errors were found"),
        "qemu-img check: {text}"
    );
    let (ok, text) = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", q, v]);
    assert!(
        ok && text.contains("Images are identical"),
        "qemu-img compare: {text}"
    );
}

fn virtual_size(path: &Path, format: &str) -> u64 {
    let (ok, text) = qemu_img(&[
        "info",
        "--output=json",
        "-f",
        format,
        path.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// Clusters that some write put a non-zero byte into.
fn nonzero_clusters(writes: &[(u64, Vec<u8>)], cluster: u64) -> std::collections::BTreeSet<u64> {
    let mut set = std::collections::BTreeSet::new();
    for (at, bytes) in writes {
        for (i, b) in bytes.iter().enumerate() {
            if *b != 0 {
                set.insert((at + i as u64) / cluster);
            }
        }
    }
    set
}

#[test]
fn qcow2_of_sparse_volume_is_clean_identical_and_holds_only_data_clusters() {
    let fx = standard_volume();
    let vol = Volume::open(&fx.path).unwrap();
    let layout = Qcow2Layout::build(&vol, DEFAULT_CLUSTER_BITS).unwrap();

    let want = nonzero_clusters(&fx.writes, 65536);
    assert_eq!(layout.data_clusters(), want.len() as u64);
    assert!(
        !layout.is_allocated(64 * MIB / 65536),
        "the zero cluster written explicitly stays unallocated"
    );
    for g in &want {
        assert!(layout.is_allocated(*g), "cluster {g} holds data");
    }
    // header, refcount table, one refcount block, L1, one L2 table (256 MiB < 512 MiB).
    assert_eq!(layout.metadata_bytes(), 5 * 65536);
    assert_eq!(layout.len(), (5 + want.len() as u64) * 65536);

    let out = fx.path.with_file_name("export.qcow2");
    export_shuffled(&layout, &out, 100_003);
    assert_valid_and_identical(&out, &fx.path);
    assert_eq!(virtual_size(&out, "qcow2"), virtual_size(&fx.path, "raw"));
    assert_eq!(layout.virtual_size(), fx.size.div_ceil(512) * 512);

    // As compact as qemu-img convert's own output of the same volume.
    let theirs = fx.path.with_file_name("qemu.qcow2");
    let (ok, text) = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        fx.path.to_str().unwrap(),
        theirs.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let theirs_len = std::fs::metadata(&theirs).unwrap().len();
    assert!(
        layout.len() <= theirs_len,
        "ours {} > qemu-img's {theirs_len}",
        layout.len()
    );

    // Any range equals the same range of the assembled file.
    let whole = std::fs::read(&out).unwrap();
    for (off, len) in [
        (0u64, 200usize),
        (65_000, 70_000),
        (5 * 65536 - 3, 10),
        (layout.len() - 100, 100),
    ] {
        let mut buf = vec![0u8; len];
        assert_eq!(layout.read_at(off, &mut buf).unwrap(), len);
        assert_eq!(
            &buf[..],
            &whole[off as usize..off as usize + len],
            "range at {off}"
        );
    }
}

#[test]
fn odd_sizes_and_cluster_sizes_convert_like_qemu() {
    let cases: &[(u64, u32)] = &[
        (1, 16),
        (511, 16),
        (513, 9),
        (65_535, 16),
        (65_537, 12),
        (1_000_000, 16),
        (3 * MIB + 1, 21),
        (4 * MIB + 77, 9), // 8193 clusters: 33 refcount blocks, 129 L2 tables, 3 L1 clusters
    ];
    for &(size, cb) in cases {
        // Data in every third 512-byte sector, and in the very last byte.
        let mut writes: Vec<(u64, Vec<u8>)> = (0..size.div_ceil(512))
            .step_by(3)
            .map(|s| (s * 512, random((512).min(size - s * 512) as usize)))
            .collect();
        writes.push((size - 1, vec![0x5a]));
        let fx = sparse_volume(size, writes);
        let vol = Volume::open(&fx.path).unwrap();
        let layout = Qcow2Layout::build(&vol, cb).unwrap();
        let want = nonzero_clusters(&fx.writes, 1 << cb);
        assert_eq!(
            layout.data_clusters(),
            want.len() as u64,
            "size {size}, cluster_bits {cb}"
        );
        let out = fx.path.with_file_name("export.qcow2");
        export_shuffled(&layout, &out, 7 * 4096 + 5);
        assert_valid_and_identical(&out, &fx.path);
        assert_eq!(
            virtual_size(&out, "qcow2"),
            virtual_size(&fx.path, "raw"),
            "size {size}, cluster_bits {cb}"
        );
    }
}

#[test]
fn cluster_bits_out_of_range_is_bad_input() {
    let fx = sparse_volume(MIB, vec![(0, random(10))]);
    let vol = Volume::open(&fx.path).unwrap();
    for cb in [8, 22] {
        match Qcow2Layout::build(&vol, cb) {
            Err(Error::BadInput(m)) => assert!(m.contains("cluster_bits"), "{m}"),
            other => panic!("cluster_bits {cb}: {other:?}"),
        }
    }
}

#[test]
fn volume_that_shrinks_after_layout_fails_the_read() {
    let fx = sparse_volume(8 * MIB, vec![(0, random(8 * MIB as usize))]);
    let vol = Volume::open(&fx.path).unwrap();
    let layout = Qcow2Layout::build(&vol, DEFAULT_CLUSTER_BITS).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.path)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    let mut buf = vec![0u8; MIB as usize];
    // Metadata still reads (it comes from the map)...
    layout.read_at(0, &mut buf).unwrap();
    // ...but the data clusters past the new end cannot.
    let e = layout.read_at(layout.len() - MIB, &mut buf).unwrap_err();
    assert!(matches!(e, Error::VolumeChanged { .. }), "{e:?}");
}

#[test]
fn qcow2_of_a_block_device_leaves_its_zero_clusters_out() {
    let fx = sparse_volume(
        16 * MIB,
        vec![(0, random(4096)), (9 * MIB + 1, random(200_000))],
    );
    let dev = LoopDevice::attach(&fx.path);
    let vol = Volume::open(&dev.0).unwrap();
    let layout = Qcow2Layout::build(&vol, DEFAULT_CLUSTER_BITS).unwrap();
    assert_eq!(
        layout.data_clusters(),
        nonzero_clusters(&fx.writes, 65536).len() as u64
    );
    let out = fx.path.with_file_name("export.qcow2");
    export_shuffled(&layout, &out, MIB);
    assert_valid_and_identical(&out, &fx.path);
}

#[test]
fn mostly_empty_100_gib_volume_exports_to_a_small_qcow2() {
    let gib = 1u64 << 30;
    let size = 100 * gib;
    let fx = sparse_volume(
        size,
        vec![
            (0, random(65536)),
            (gib + 12345, random(100_000)), // across a scan window boundary below
            (2 * gib - 10, random(20)),
            (size - 4096, random(4096)),
        ],
    );
    let vol = Volume::open(&fx.path).unwrap();
    let layout = Qcow2Layout::build(&vol, DEFAULT_CLUSTER_BITS).unwrap();
    assert_eq!(
        layout.data_clusters(),
        nonzero_clusters(&fx.writes, 65536).len() as u64
    );
    // Header, refcount table and block, one L1 cluster (200 entries), and five L2
    // tables (the 20 bytes at 2 GiB - 10 reach into the fifth 512 MiB span).
    assert_eq!(layout.metadata_bytes(), 9 * 65536);
    assert!(layout.len() < 2 * MIB, "{}", layout.len());
    let out = fx.path.with_file_name("export.qcow2");
    export_shuffled(&layout, &out, 300_001);
    assert_valid_and_identical(&out, &fx.path);
}

#[test]
fn layout_and_volume_can_be_shared_across_threads() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<Qcow2Layout>();
    shareable::<Volume>();
}

#[test]
fn extents_only_scan_stores_allocated_zero_clusters() {
    let fx = standard_volume();
    let vol = Volume::open(&fx.path).unwrap();
    let mut seen = Vec::new();
    let layout = Qcow2Layout::build_with(
        &vol,
        DEFAULT_CLUSTER_BITS,
        ZeroScan::ExtentsOnly,
        &mut |p| seen.push(p),
    )
    .unwrap();
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]) && *seen.last().unwrap() == fx.size,
        "{seen:?}"
    );
    // The explicitly written zero cluster is allocated on disk, so it is stored.
    assert!(layout.is_allocated(64 * MIB / 65536));
    let full = Qcow2Layout::build(&vol, DEFAULT_CLUSTER_BITS).unwrap();
    assert_eq!(layout.data_clusters(), full.data_clusters() + 1);
    let out = fx.path.with_file_name("export.qcow2");
    export_shuffled(&layout, &out, MIB + 1);
    assert_valid_and_identical(&out, &fx.path);
}

#[test]
fn volume_too_big_for_the_cluster_size_is_bad_input() {
    // 512-byte clusters: each L1 entry covers 32 KiB, so 200 GiB needs a 50 MiB L1.
    let fx = sparse_volume(200 << 30, vec![(0, random(10))]);
    let vol = Volume::open(&fx.path).unwrap();
    match Qcow2Layout::build(&vol, 9) {
        Err(Error::BadInput(m)) => {
            assert!(m.contains("32 MiB") && m.contains("larger clusters"), "{m}")
        }
        other => panic!("{other:?}"),
    }
}
