//! Core benchmarks: the block map, the block store, the fetch/read path over an in-memory
//! source, and the incremental verifier. Each group measures a baseline in the same run
//! (a plain `Vec<u64>`, a plain file, a plain copy, raw sha2), so a figure is always read
//! against the machine it ran on.
//!
//!     cargo bench --bench core                 # about two minutes on 2 cores
//!     cargo bench --bench core -- --quick      # faster, less precise
//!     cargo bench --bench core -- fetch        # one group
//!
//! Sizes: `BIFS_BENCH_MIB` (default 128) bytes for the store, fetch and verify groups.

use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bifs::core::bitmap::BlockMap;
use bifs::core::mem_source::MemSource;
use bifs::core::range::BlockRange;
use bifs::core::readahead::ReadState;
use bifs::core::source::Identity;
use bifs::core::store::{Disk, ImageFiles, StoredSpec};
use bifs::core::{CreateOptions, ImageConfig, ImageSpec, Node};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use sha2::{Digest, Sha512};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

fn data_len() -> u64 {
    std::env::var("BIFS_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128)
        * MIB
}

/// Seeded pseudo-random bytes (xorshift): incompressible, same every run.
fn random_bytes(len: u64) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v = Vec::with_capacity(len as usize);
    while (v.len() as u64) < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len as usize);
    v
}

fn bench_dir() -> tempfile::TempDir {
    // /var/tmp: a real disk, as the block cache would be (not a tmpfs /tmp).
    tempfile::Builder::new()
        .prefix("bifs-bench")
        .tempdir_in("/var/tmp")
        .expect("a temp dir under /var/tmp")
}

/// Bitmap over a 100 GiB image with 16 KiB blocks (6.5 M blocks, 800 KiB of words).
fn bitmap(c: &mut Criterion) {
    let blocks = 100 * GIB / (16 * KIB);
    let words = blocks.div_ceil(64) as usize;
    let mut g = c.benchmark_group("bitmap (100 GiB image, 16 KiB blocks)");
    g.sample_size(20).measurement_time(Duration::from_secs(3));

    // A 4 MiB request landing: 256 bits, the most common set_range.
    let map = BlockMap::new(blocks);
    g.throughput(Throughput::Elements(256));
    let mut at = 0u64;
    g.bench_function("set_range 256 blocks (one 4 MiB request)", |b| {
        b.iter(|| {
            at = (at + 7919 * 256) % (blocks - 256);
            black_box(map.set_range(BlockRange::new(at, at + 256)))
        })
    });
    let mut plain = vec![0u64; words];
    g.bench_function("baseline: OR 4 words of a Vec<u64>", |b| {
        b.iter(|| {
            at = (at + 7919 * 256) % (blocks - 256);
            let w = (at / 64) as usize;
            for x in &mut plain[w..w + 4] {
                *x |= u64::MAX;
            }
            black_box(&plain);
        })
    });

    // Whole map: the worst case scans (a complete map but for its last block).
    g.throughput(Throughput::Bytes(words as u64 * 8));
    let full = BlockMap::new(blocks);
    full.set_range(BlockRange::new(0, blocks - 1));
    g.bench_function(
        "first_missing over the whole map (last block absent)",
        |b| b.iter(|| black_box(full.first_missing(black_box(BlockRange::new(0, blocks))))),
    );
    let mut plain = vec![u64::MAX; words];
    *plain.last_mut().unwrap() = 0;
    g.bench_function(
        "baseline: position of first non-full word in a Vec<u64>",
        |b| b.iter(|| black_box(black_box(&plain).iter().position(|w| *w != u64::MAX))),
    );
    g.bench_function("set_range over the whole map", |b| {
        b.iter(|| black_box(full.set_range(black_box(BlockRange::new(0, blocks)))))
    });
    g.bench_function("baseline: fill a Vec<u64> with ones", |b| {
        b.iter(|| black_box(&mut plain).fill(u64::MAX))
    });
    g.bench_function("to_bytes of the whole map (a flush snapshot)", |b| {
        b.iter(|| black_box(full.to_bytes(0..full.word_count())))
    });
    g.finish();
}

fn stored_spec(name: &str, size: u64, block_size: u64) -> StoredSpec {
    StoredSpec {
        spec: ImageSpec::download(name, "http://127.0.0.1:1/bench.img", ""),
        identity: Identity {
            size,
            etag: Some("\"v1\"".into()),
            last_modified: None,
            ranges: true,
        },
        block_size,
        fill: false,
        created_unix: 0,
    }
}

/// The block store: `ImageFiles::write_chunks` / `read_data` in 4 MiB and 16 KiB pieces,
/// against a plain file written and read the same way.
fn store(c: &mut Criterion) {
    let len = data_len();
    let data = bytes::Bytes::from(random_bytes(len));
    let dir = bench_dir();
    let disk = Disk::open(dir.path()).expect("bench disk");
    let files =
        ImageFiles::create(&disk, &stored_spec("store", len, 16 * KIB)).expect("image files");
    let plain_path = dir.path().join("plain");
    let plain = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&plain_path)
        .expect("plain file");
    plain.set_len(len).unwrap();
    use std::os::unix::fs::FileExt;

    let mut g = c.benchmark_group(format!("store ({} MiB, page cache)", len / MIB));
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Bytes(len));
    for piece in [4 * MIB, 16 * KIB] {
        let label = if piece == 4 * MIB { "4 MiB" } else { "16 KiB" };
        g.bench_function(format!("ImageFiles::write_chunks, {label} pieces"), |b| {
            b.iter(|| {
                for i in 0..len / piece {
                    let chunk = data.slice((i * piece) as usize..((i + 1) * piece) as usize);
                    files.write_chunks(i * piece, &[chunk]).unwrap();
                }
            })
        });
        g.bench_function(
            format!("baseline: pwrite to a plain file, {label} pieces"),
            |b| {
                b.iter(|| {
                    for (i, chunk) in data.chunks(piece as usize).enumerate() {
                        plain.write_all_at(chunk, i as u64 * piece).unwrap();
                    }
                })
            },
        );
        let mut buf = vec![0u8; piece as usize];
        g.bench_function(format!("ImageFiles::read_data, {label} pieces"), |b| {
            b.iter(|| {
                for i in 0..len / piece {
                    files.read_data(i * piece, &mut buf).unwrap();
                }
                black_box(&buf);
            })
        });
        g.bench_function(
            format!("baseline: pread of a plain file, {label} pieces"),
            |b| {
                b.iter(|| {
                    for i in 0..len / piece {
                        plain.read_exact_at(&mut buf, i * piece).unwrap();
                    }
                    black_box(&buf);
                })
            },
        );
    }
    g.throughput(Throughput::Elements(1));
    let map = BlockMap::new(len / (16 * KIB));
    map.set_range(BlockRange::new(0, map.blocks()));
    g.bench_function("flush: fdatasync data + bitmap (after 4 MiB landed)", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i = (i + 1) % (len / (4 * MIB));
            files
                .write_chunks(i * 4 * MIB, &[data.slice(..(4 * MIB) as usize)])
                .unwrap();
            files.mark_dirty(i * 256);
            files.flush(&map).unwrap();
        })
    });
    g.finish();
}

/// A node on a temp disk with a multi-thread runtime, as `bifs mount` runs it.
struct Bench {
    rt: tokio::runtime::Runtime,
    node: Arc<Node>,
    _dir: tempfile::TempDir,
    n: u64,
}

impl Bench {
    fn new(cfg: ImageConfig) -> Bench {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let dir = bench_dir();
        let disk = dir.path().to_path_buf();
        let node = rt
            .block_on(Node::start(&[disk], cfg, "/bench".into()))
            .expect("node");
        Bench {
            rt,
            node,
            _dir: dir,
            n: 0,
        }
    }

    /// A fresh image over `data` (a fresh name, so nothing is cached).
    fn image(
        &mut self,
        data: &bytes::Bytes,
        fill: bool,
    ) -> (Arc<bifs::core::Image>, Arc<MemSource>) {
        self.n += 1;
        let name = format!("img-{}", self.n);
        let src = Arc::new(MemSource::new(data.clone()));
        let image = self
            .rt
            .block_on(self.node.create_with_source(
                ImageSpec::download(&name, "http://127.0.0.1:1/bench.img", ""),
                CreateOptions {
                    disk: None,
                    no_fill: !fill,
                },
                src.clone(),
            ))
            .expect("create");
        (image, src)
    }

    fn delete(&self, image: &bifs::core::Image) {
        self.rt
            .block_on(self.node.delete(&image.name, true))
            .expect("delete");
    }
}

/// The read path over a `MemSource`: planner, single flight, readahead, store.
fn fetch(c: &mut Criterion) {
    let len = data_len();
    let data = bytes::Bytes::from(random_bytes(len));
    let mut bench = Bench::new(ImageConfig::default());
    let mut g = c.benchmark_group(format!("read path ({} MiB, MemSource)", len / MIB));
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(len));

    // Cold sequential: 1 MiB reads (what FUSE sends with read_ahead_kb=1024) with the
    // readahead state a FUSE file handle carries; no fill, so only the reader fetches.
    let requests = std::cell::Cell::new(0u64);
    g.bench_function("cold sequential image.read, 1 MiB reads, readahead", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (image, src) = bench.image(&data, false);
                let ra = Mutex::new(ReadState::default());
                let t = Instant::now();
                bench.rt.block_on(async {
                    let mut off = 0;
                    while off < len {
                        let b = image.read(off, MIB as u32, Some(&ra)).await.expect("read");
                        off += b.len() as u64;
                    }
                });
                total += t.elapsed();
                requests.set(src.requests.load(Ordering::Relaxed));
                bench.delete(&image);
            }
            total
        })
    });
    eprintln!(
        "    (source requests for one cold sequential pass: {}, mean {} KiB)",
        requests.get(),
        len / KIB / requests.get().max(1)
    );
    // Warm: every block present, so this is map checks, a spawn_blocking and a pread.
    let (warm, _) = bench.image(&data, true);
    bench.rt.block_on(warm.wait_ready()).expect("ready");
    g.bench_function("warm image.read, 1 MiB reads", |b| {
        b.iter(|| {
            bench.rt.block_on(async {
                let mut off = 0;
                while off < len {
                    off += warm.read(off, MIB as u32, None).await.expect("read").len() as u64;
                }
            })
        })
    });
    let mut buf = vec![0u8; MIB as usize];
    g.bench_function("baseline: ImageFiles::read_data, 1 MiB pieces", |b| {
        b.iter(|| {
            for i in 0..len / MIB {
                warm.fetcher().files().read_data(i * MIB, &mut buf).unwrap();
            }
            black_box(&buf);
        })
    });
    g.bench_function("baseline: copy the bytes from memory, 1 MiB pieces", |b| {
        b.iter(|| {
            for chunk in data.chunks(MIB as usize) {
                buf.copy_from_slice(chunk);
                black_box(&buf);
            }
        })
    });

    // Cold 4 KiB random reads: the planner's cost per isolated miss, with no network.
    let n_reads = 2000u64;
    g.throughput(Throughput::Elements(n_reads));
    let offsets: Vec<u64> = {
        let mut x: u64 = 42;
        (0..n_reads)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 11) % (len / 4096) * 4096
            })
            .collect()
    };
    let amplification = std::cell::Cell::new(0.0f64);
    g.bench_function("cold 4 KiB random image.read (2000 reads)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (image, src) = bench.image(&data, false);
                let served0 = src.served.load(Ordering::Relaxed);
                let t = Instant::now();
                bench.rt.block_on(async {
                    for &o in &offsets {
                        black_box(image.read(o, 4096, None).await.expect("read"));
                    }
                });
                total += t.elapsed();
                let served = src.served.load(Ordering::Relaxed) - served0;
                amplification.set(served as f64 / (n_reads * 4096) as f64);
                bench.delete(&image);
            }
            total
        })
    });
    eprintln!(
        "    (origin amplification of those reads: {:.2}x)",
        amplification.get()
    );
    g.bench_function(
        "baseline: 4 KiB pread of present blocks (2000 reads)",
        |b| {
            let mut buf = [0u8; 4096];
            b.iter(|| {
                for &o in &offsets {
                    warm.fetcher().files().read_data(o, &mut buf).unwrap();
                }
                black_box(&buf);
            })
        },
    );
    g.finish();
    bench.delete(&warm);
}

/// create -> ready over a `MemSource`: fill, store, incremental SHA-512, flush; against
/// raw sha2 over the same bytes. The verifier should be the only thing that costs.
fn verify(c: &mut Criterion) {
    let len = data_len();
    let data = bytes::Bytes::from(random_bytes(len));
    let mut bench = Bench::new(ImageConfig::default());
    let mut g = c.benchmark_group(format!("verify ({} MiB)", len / MIB));
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(len));
    g.bench_function(
        "create -> ready (fill + incremental SHA-512 + flush)",
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let (image, _) = bench.image(&data, true);
                    bench.rt.block_on(image.wait_ready()).expect("ready");
                    total += t.elapsed();
                    bench.delete(&image);
                }
                total
            })
        },
    );
    g.bench_function("baseline: sha2 Sha512 over the bytes in memory", |b| {
        b.iter(|| {
            let mut h = Sha512::new();
            h.update(&data);
            black_box(h.finalize())
        })
    });
    g.bench_function(
        "baseline: sha2 Sha512 in 8 MiB pieces read from a file",
        |b| {
            let dir = bench_dir();
            let path = dir.path().join("plain");
            std::fs::write(&path, &data).unwrap();
            let mut buf = vec![0u8; 8 * MIB as usize];
            b.iter(|| {
                read_and_hash(&path, &mut buf);
            })
        },
    );
    g.finish();
}

fn read_and_hash(path: &Path, buf: &mut [u8]) {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha512::new();
    loop {
        let n = f.read(buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    black_box(h.finalize());
}

criterion_group!(benches, bitmap, store, fetch, verify);
criterion_main!(benches);
