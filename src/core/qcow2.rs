//! The guest view of a QCOW2 image (`<mnt>/.raw/<name>`), decoded by qcow2-rs from the
//! stored bytes as the lazy store serves them: a guest read fetches the header, the L1
//! and refcount tables, one L2 slice and the clusters that hold it, nothing more.
//!
//! - Threading: qcow2-rs's device is `!Sync` and its futures are `!Send`, so each image's
//!   decoder lives on a thread of its own (a current-thread runtime and a `LocalSet`),
//!   started by the first raw read and ended with the image (delete, shutdown). Readers
//!   send it requests over a channel and wait on a oneshot; every request runs as a
//!   local task, so a read waiting on the network does not hold up the others.
//! - Reads (`qcow2_read`): qcow2-rs maps guest clusters to stored bytes; allocated
//!   clusters are read from the lazy store straight into the reply, unallocated ones are
//!   zeros that fetch nothing, compressed ones are inflated by qcow2-rs.
//! - Caches: qcow2-rs keeps the whole L1 table and refcount table (read at open), L2
//!   tables in slices of 4 KiB (or one smaller cluster) in its own LRU bounded to 32 MiB
//!   per image (less when that maps the whole disk), and up to 256 KiB of refcount
//!   blocks (untouched by reads). Reply buffers come from the node's one pool.
//!   Compressed clusters are inflated on every read. That is bounded already, so no
//!   cache is added here.
//! - qcow2-rs quirks (FACTS.md §2): offsets and lengths must be 512-aligned (requests are
//!   widened and sliced); a read crossing the end of the virtual disk returns a wrong
//!   length, and a failed cluster in a multi-cluster read shows only as a short count
//!   (reads are clamped and counts checked); a missing backing file panics, and zstd or
//!   extended L2 images fail to open (refused up front by
//!   `Qcow2Header::raw_view_problem`). A panic ends the decoder, never the daemon: the
//!   raw view answers EIO from then on and status names the cause, while the stored
//!   bytes keep being served and the image is not failed.
//! - It knows no `Image`: the image is a `StoredBytes` to it (read what is present now,
//!   or fetch and read), and it owns only its `RawViewSlot`.

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::rc::Rc;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use futures::FutureExt;
use qcow2_rs::dev::{Qcow2Dev, Qcow2DevParams};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

use super::error::{Error, Result};
use super::format::Qcow2Header;
pub use super::qcow2_read::StoredBytes;
use super::qcow2_read::{decoder_error, Engine, Guest, LazyIo};
use super::readahead::ReadState;
use super::store::BufPool;

struct Request {
    offset: u64,
    len: u64,
    /// The reader's sequential detection over the stored bytes its guest reads cover
    /// (its open file's); None: the decoder's own.
    ra: Option<Arc<Mutex<ReadState>>>,
    reply: oneshot::Sender<Result<Bytes>>,
}

/// The raw-view decoder of one image: absent until the first raw read.
#[derive(Default)]
pub struct RawViewSlot {
    decoder: Arc<Mutex<Decoder>>,
}

#[derive(Default)]
enum Decoder {
    #[default]
    Idle,
    Running(mpsc::UnboundedSender<Request>),
    /// The raw view cannot be served (unsupported image, decoder panicked): the reason.
    Broken(Error),
}

impl RawViewSlot {
    fn broken(&self) -> Option<Error> {
        match &*self.decoder.lock().unwrap() {
            Decoder::Broken(e) => Some(e.clone()),
            _ => None,
        }
    }

    /// Why the raw view of this image does not work, once a raw read found out.
    pub fn error(&self) -> Option<String> {
        self.broken().map(|e| e.to_string())
    }

    /// Reads `len` bytes at `offset` of the guest view of the QCOW2 image `image`.
    pub async fn read(
        &self,
        image: Arc<dyn StoredBytes>,
        pool: &Arc<BufPool>,
        header: &Qcow2Header,
        offset: u64,
        len: u32,
        ra: Option<Arc<Mutex<ReadState>>>,
    ) -> Result<Bytes> {
        if offset >= header.virtual_size || len == 0 {
            return Ok(Bytes::new());
        }
        let (reply, rx) = oneshot::channel();
        let req = Request {
            offset,
            len: u64::from(len),
            ra,
            reply,
        };
        self.send(image, pool, header, req)?;
        match rx.await {
            Ok(r) => r,
            // The decoder dropped the request: it broke down, or the image is going away.
            Err(_) => Err(self.broken().unwrap_or(Error::ShuttingDown)),
        }
    }

    /// Hands `req` to the image's decoder, starting one if there is none (or the last
    /// ended after an I/O error while opening).
    fn send(
        &self,
        image: Arc<dyn StoredBytes>,
        pool: &Arc<BufPool>,
        header: &Qcow2Header,
        mut req: Request,
    ) -> Result<()> {
        let mut decoder = self.decoder.lock().unwrap();
        match &*decoder {
            Decoder::Broken(e) => return Err(e.clone()),
            Decoder::Running(tx) => match tx.send(req) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(r)) => req = r,
            },
            Decoder::Idle => {}
        }
        if image.cancel_token().is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        if let Some(problem) = header.raw_view_problem(image.name()) {
            warn!(image = %image.name(), reason = %problem, "raw view unavailable");
            let e = Error::Unsupported(problem);
            *decoder = Decoder::Broken(e.clone());
            return Err(e);
        }
        let tx = start_decoder(image, self.decoder.clone(), pool.clone(), header)?;
        // The receiver lives until the thread has answered or failed what it holds.
        let _ = tx.send(req);
        *decoder = Decoder::Running(tx);
        Ok(())
    }
}

fn start_decoder(
    image: Arc<dyn StoredBytes>,
    slot: Arc<Mutex<Decoder>>,
    pool: Arc<BufPool>,
    header: &Qcow2Header,
) -> Result<mpsc::UnboundedSender<Request>> {
    // The decoder's engine fetches on the node's runtime: the one this read runs on.
    let rt = Handle::try_current().map_err(|e| {
        decoder_error(
            image.name(),
            format!("raw reads need the node's runtime: {e}"),
        )
    })?;
    let (tx, rx) = mpsc::unbounded_channel();
    let ctx = DecoderCtx {
        image: Arc::downgrade(&image),
        slot: Arc::downgrade(&slot),
        name: image.name().to_string(),
        disk: image.disk8().to_string(),
        header: header.clone(),
        rt,
        pool,
        cancel: image.cancel_token(),
    };
    std::thread::Builder::new()
        .name("bifs-qcow2".into())
        .spawn(move || ctx.run(rx))
        .map_err(|e| {
            decoder_error(
                image.name(),
                format!("cannot start the qcow2 decoder thread: {e}"),
            )
        })?;
    Ok(tx)
}

struct DecoderCtx {
    /// Weak: the image owns the decoder's channel, so a strong handle here would keep a
    /// deleted image (and its thread) alive for ever.
    image: Weak<dyn StoredBytes>,
    slot: Weak<Mutex<Decoder>>,
    name: String,
    disk: String,
    header: Qcow2Header,
    rt: Handle,
    pool: Arc<BufPool>,
    cancel: CancellationToken,
}

impl DecoderCtx {
    fn run(self, rx: mpsc::UnboundedReceiver<Request>) {
        let span = info_span!("image", name = %self.name, disk = %self.disk);
        let local_rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let err = decoder_error(&self.name, format!("cannot start its runtime: {e}"));
                self.fail_all(rx, err);
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&local_rt, self.serve(rx).instrument(span));
    }

    /// Marks the raw view broken, so waiting and later readers get `err`.
    fn break_view(&self, err: &Error) {
        error!(error = %err, "raw view broken; the stored image is still served");
        if let Some(slot) = self.slot.upgrade() {
            *slot.lock().unwrap() = Decoder::Broken(err.clone());
        }
    }

    fn fail_all(&self, mut rx: mpsc::UnboundedReceiver<Request>, err: Error) {
        rx.close();
        while let Ok(req) = rx.try_recv() {
            let _ = req.reply.send(Err(err.clone()));
        }
    }

    async fn serve(self, mut rx: mpsc::UnboundedReceiver<Request>) {
        let last_io_error = Rc::new(RefCell::new(None));
        let engine = Rc::new(Engine {
            image: self.image.clone(),
            rt: self.rt.clone(),
            data_ra: Default::default(),
            last_error: last_io_error.clone(),
        });
        let io = LazyIo(engine.clone());
        let dev = match AssertUnwindSafe(open(io, &self.name, &self.header))
            .catch_unwind()
            .await
        {
            Ok(Ok(dev)) => Rc::new(dev),
            Ok(Err(msg)) => {
                let err = match last_io_error.take() {
                    // Fetching failed (source down...): a later raw read opens afresh.
                    Some(io_err) => {
                        warn!(error = %io_err, "qcow2 metadata not readable; the next raw read retries");
                        io_err
                    }
                    None => {
                        let e = Error::Unsupported(format!(
                            "the raw view of qcow2 image {:?} is unsupported: qcow2-rs cannot open it: {msg}",
                            self.name
                        ));
                        self.break_view(&e);
                        e
                    }
                };
                self.fail_all(rx, err);
                return;
            }
            Err(panic) => {
                let e = decoder_error(
                    &self.name,
                    format!(
                        "the qcow2 decoder panicked opening the image ({}); {}",
                        panic_text(&*panic),
                        "the raw view is off until the daemon restarts"
                    ),
                );
                self.break_view(&e);
                self.fail_all(rx, e);
                return;
            }
        };
        info!(
            virtual_size = dev.info.virtual_size(),
            cluster_size = dev.info.cluster_size(),
            "qcow2 decoder started"
        );
        // Stops the loop after a panic: the device's state may be half-updated.
        let stop = self.cancel.child_token();
        let me = Rc::new(self);
        loop {
            let req = tokio::select! {
                r = rx.recv() => r,
                _ = stop.cancelled() => None,
            };
            let Some(req) = req else { break };
            let span = tracing::Span::current();
            let task = me
                .clone()
                .answer(dev.clone(), engine.clone(), req, stop.clone());
            tokio::task::spawn_local(task.instrument(span));
        }
        // Requests still queued or in flight drop their replies: their readers find the
        // broken view's reason, or that the image is going away.
        info!("qcow2 decoder stopped");
    }

    /// Reads one request's guest bytes and replies; a panic breaks the raw view.
    async fn answer(
        self: Rc<Self>,
        dev: Rc<Qcow2Dev<LazyIo>>,
        engine: Rc<Engine>,
        req: Request,
        stop: CancellationToken,
    ) {
        let guest = Guest {
            dev: &dev,
            engine: &engine,
            virtual_size: self.header.virtual_size,
            name: &self.name,
        };
        let read = guest.read(req.offset, req.len, &self.pool, req.ra.as_ref());
        let r = match AssertUnwindSafe(read).catch_unwind().await {
            Ok(r) => r,
            Err(panic) => {
                let e = decoder_error(
                    &self.name,
                    format!(
                        "the qcow2 decoder panicked reading guest bytes {}+{} ({}); {}",
                        req.offset,
                        req.len,
                        panic_text(&*panic),
                        "the raw view is off until the daemon restarts"
                    ),
                );
                self.break_view(&e);
                stop.cancel();
                Err(e)
            }
        };
        let _ = req.reply.send(r);
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// qcow2-rs's own cache sizing, except that a slice is at most one cluster: its default
/// 4 KiB slices break images with clusters under 4 KiB.
fn dev_params(header: &Qcow2Header) -> Qcow2DevParams {
    let cluster_bits = header.cluster_bits as u8;
    let slice_bits = cluster_bits.min(12);
    let l2_bytes = (header.virtual_size >> (cluster_bits - 3)).min(32 << 20) as usize;
    let l2 = (slice_bits, l2_bytes.max(2 << slice_bits));
    let rb = (slice_bits, (256usize << 10).max(2 << slice_bits));
    // 512-byte I/O unit, read-only, no O_DIRECT.
    Qcow2DevParams::new(9, Some(rb), Some(l2), true, false)
}

async fn open(
    io: LazyIo,
    name: &str,
    header: &Qcow2Header,
) -> std::result::Result<Qcow2Dev<LazyIo>, String> {
    let params = dev_params(header);
    let path = Path::new(".raw").join(name);
    let (dev, backing) = qcow2_rs::utils::qcow2_alloc_dev(&path, io, &params)
        .await
        .map_err(|e| e.to_string())?;
    if backing.is_some() {
        return Err("it names a backing file".into());
    }
    dev.qcow2_prep_io().await.map_err(|e| e.to_string())?;
    Ok(dev)
}
