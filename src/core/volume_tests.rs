use super::*;
use std::io::Write;
use std::process::Command;

use rand::RngCore;

pub(crate) const MIB: u64 = 1 << 20;

/// A sparse volume file and what was written where (the rest is holes).
pub(crate) struct Fixture {
    pub _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub size: u64,
    pub writes: Vec<(u64, Vec<u8>)>,
}

/// Writes `writes` into a new sparse file of `size` bytes.
pub(crate) fn sparse_volume(size: u64, writes: Vec<(u64, Vec<u8>)>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("volume.img");
    let f = File::create(&path).unwrap();
    f.set_len(size).unwrap();
    for (at, bytes) in &writes {
        f.write_all_at(bytes, *at).unwrap();
    }
    f.sync_all().unwrap();
    Fixture {
        _dir: dir,
        path,
        size,
        writes,
    }
}

pub(crate) fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

/// 256 MiB less 40000 bytes (neither a multiple of 64 KiB nor of 512): random data at a
/// few offsets, some unaligned, one 64 KiB cluster of zeros written explicitly at 64 MiB,
/// and data in the partial last cluster.
pub(crate) fn standard_volume() -> Fixture {
    let size = 256 * MIB - 40_000;
    sparse_volume(
        size,
        vec![
            (0, random(4096)),
            (MIB + 100, random(70_000)),
            (64 * MIB, vec![0u8; 64 << 10]),
            (100 * MIB, random(3 * MIB as usize)),
            (200 * MIB + 65_536 * 3 + 7, random(10)),
            (size - 3000, random(3000)),
        ],
    )
}

fn bad_input(r: Result<Volume>) -> String {
    match r {
        Err(Error::BadInput(m)) => m,
        other => panic!("expected BadInput, got {other:?}"),
    }
}

#[test]
fn raw_reads_equal_the_file_and_holes_are_reported() {
    let fx = standard_volume();
    let vol = Volume::open(&fx.path).unwrap();
    assert_eq!(vol.kind(), VolumeKind::File);
    assert_eq!(vol.size_bytes(), fx.size);

    // Extents cover every write, and not much more (ext4 allocates in 4 KiB blocks).
    let extents = vol.data_extents(0..fx.size).unwrap();
    for (at, bytes) in &fx.writes {
        let end = at + bytes.len() as u64;
        assert!(
            extents.iter().any(|e| e.start <= *at && end <= e.end),
            "write {at}..{end} not inside one extent of {extents:?}"
        );
    }
    let allocated: u64 = extents.iter().map(|e| e.end - e.start).sum();
    let written: u64 = fx.writes.iter().map(|(_, b)| b.len() as u64).sum();
    assert!(
        allocated >= written && allocated < written + MIB,
        "{allocated} vs {written}"
    );
    // Clipping to a window.
    assert_eq!(
        vol.data_extents(100 * MIB + 10..100 * MIB + 20).unwrap(),
        vec![100 * MIB + 10..100 * MIB + 20]
    );
    assert!(vol.data_extents(150 * MIB..160 * MIB).unwrap().is_empty());

    // Whole volume, 3 MiB + 1 at a time (chunks straddle holes and data), equals the file.
    let want = std::fs::read(&fx.path).unwrap();
    let mut got = vec![0xAAu8; fx.size as usize];
    let step = 3 * MIB as usize + 1;
    for (i, chunk) in got.chunks_mut(step).enumerate() {
        vol.read_at((i * step) as u64, chunk).unwrap();
    }
    assert!(got == want, "raw read differs from the file");

    let mut buf = vec![0xAAu8; 64 << 10];
    assert_eq!(vol.read_at(150 * MIB, &mut buf).unwrap(), Contents::Hole);
    assert!(is_all_zero(&buf), "a hole reads as zeros");
    assert_eq!(vol.read_at(64 * MIB, &mut buf).unwrap(), Contents::Zeros);
    assert_eq!(vol.read_at(100 * MIB, &mut buf).unwrap(), Contents::Data);
    // Half hole, half data.
    assert_eq!(
        vol.read_at(100 * MIB - 32768, &mut buf).unwrap(),
        Contents::Data
    );
    assert_eq!(&buf[32768..], &fx.writes[3].1[..32768]);
    // Just before the last write, outside its 4 KiB filesystem block: a hole.
    let mut tail = vec![0xAAu8; 1000];
    assert_eq!(
        vol.read_at(fx.size - 12_000, &mut tail).unwrap(),
        Contents::Hole
    );

    let mut past = vec![0u8; 10];
    let m = match vol.read_at(fx.size - 5, &mut past) {
        Err(Error::BadInput(m)) => m,
        other => panic!("expected BadInput, got {other:?}"),
    };
    assert!(m.contains("past the end"), "{m}");
    vol.check_unchanged().unwrap();
}

#[test]
fn volume_that_shrinks_after_open_is_an_error_that_says_so() {
    // Data everywhere: the short read path.
    let fx = sparse_volume(8 * MIB, vec![(0, random(8 * MIB as usize))]);
    let vol = Volume::open(&fx.path).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.path)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let mut buf = vec![0u8; 65536];
    vol.read_at(0, &mut buf).unwrap();
    let e = vol.read_at(6 * MIB, &mut buf).unwrap_err();
    assert!(
        matches!(e, Error::VolumeChanged { was_bytes, now_bytes, .. } if was_bytes == 8 * MIB && now_bytes == 4 * MIB),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("changed size during the export") && msg.contains("snapshot"),
        "{msg}"
    );
    assert!(matches!(
        vol.check_unchanged(),
        Err(Error::VolumeChanged { .. })
    ));

    // A hole past the new end: SEEK_DATA's ENXIO must not pass for "all hole".
    let fx = sparse_volume(8 * MIB, vec![(0, random(4096))]);
    let vol = Volume::open(&fx.path).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.path)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let e = vol.read_at(6 * MIB, &mut buf).unwrap_err();
    assert!(matches!(e, Error::VolumeChanged { .. }), "{e:?}");

    // Growing is a change too.
    let fx = sparse_volume(MIB, vec![(0, random(4096))]);
    let vol = Volume::open(&fx.path).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&fx.path)
        .unwrap();
    f.write_all(b"more").unwrap();
    assert!(
        matches!(vol.check_unchanged(), Err(Error::VolumeChanged { now_bytes, .. }) if now_bytes == MIB + 4)
    );
}

#[test]
fn missing_path_directory_and_other_files_are_clear_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let m = bad_input(Volume::open(dir.path().join("nope.img")));
    assert!(
        m.contains("does not exist") && m.contains("nope.img"),
        "{m}"
    );
    let m = bad_input(Volume::open(dir.path()));
    assert!(m.contains("is a directory"), "{m}");
    let m = bad_input(Volume::open("/dev/null"));
    assert!(m.contains("character device"), "{m}");
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let m = bad_input(Volume::open(&fifo));
    assert!(m.contains("a FIFO"), "{m}");
    let empty = dir.path().join("empty.img");
    File::create(&empty).unwrap();
    let m = bad_input(Volume::open(&empty));
    assert!(m.contains("empty"), "{m}");
    // The errno and HTTP mapping of bad input: EINVAL.
    assert_eq!(Error::BadInput(m).errno(), libc::EINVAL);
}

/// A loop device over a file, detached on drop even when the test fails.
pub(crate) struct LoopDevice(pub PathBuf);

impl LoopDevice {
    pub(crate) fn attach(file: &Path) -> LoopDevice {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup -f --show failed (needs root and a free /dev/loopN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn loop_device_is_a_block_device_volume() {
    let fx = sparse_volume(
        16 * MIB,
        vec![
            (0, random(4096)),
            (5 * MIB + 3, random(100_000)),
            (16 * MIB - 512, random(512)),
        ],
    );
    let dev = LoopDevice::attach(&fx.path);
    let vol = Volume::open(&dev.0).unwrap();
    assert_eq!(vol.kind(), VolumeKind::BlockDevice);
    assert_eq!(vol.size_bytes(), 16 * MIB);
    assert_eq!(vol.data_extents(0..16 * MIB).unwrap(), vec![0..16 * MIB]);
    let mut got = vec![0u8; 16 * MIB as usize];
    assert_eq!(vol.read_at(0, &mut got).unwrap(), Contents::Data);
    assert!(
        got == std::fs::read(&fx.path).unwrap(),
        "block device read differs from its file"
    );
    // A block device has no holes, but its zero ranges are still found by reading.
    let mut buf = vec![0u8; 65536];
    assert_eq!(vol.read_at(10 * MIB, &mut buf).unwrap(), Contents::Zeros);
    vol.check_unchanged().unwrap();
}
