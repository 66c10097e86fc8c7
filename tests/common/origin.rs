//! A real HTTP origin on 127.0.0.1 for tests: serves named files with Range support and
//! ETags, counts the bytes it sends, and injects faults: status codes with or without
//! Retry-After, bodies cut short, stalls before or inside a body, lying Content-Length,
//! bodies longer than announced, a reply that ignores Range, another ETag, corrupted
//! bytes under the same ETag, a redirect loop, bad Content-Range headers, and a server
//! that goes down (connections refused, open ones reset) and comes back (`set_down`).
//!
//! Faults queue up (`fault`) and each request to a file takes the next one, so a test
//! says "the next N requests suffer this" without caring which request that is.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;

#[derive(Debug, Clone)]
pub enum Fault {
    Status(u16),
    /// This status with `Retry-After: secs`.
    StatusRetryAfter(u16, u64),
    /// Send this many bytes of the body, then drop the connection (a reset mid-body).
    Truncate(usize),
    /// Wait this long before answering.
    Delay(Duration),
    /// Send `after` bytes of the body, then pause `pause` (a stall mid-body), then the rest.
    StallMidBody {
        after: usize,
        pause: Duration,
    },
    /// Announce a Content-Length this many bytes larger than the body sent.
    LengthOver(usize),
    /// Announce a Content-Length this many bytes smaller than the range asked (the
    /// server stops there: a short but cleanly ended body).
    LengthUnder(usize),
    /// Send this many bytes more than the Content-Range announces (Content-Length counts them).
    Oversize(usize),
    /// Answer 200 with the whole file (same ETag), as a server that ignores Range.
    IgnoreRange,
    /// Answer with another ETag for the same bytes.
    OtherEtag,
    /// Flip bytes in the body, same ETag.
    Corrupt,
    /// Redirect to a URL that redirects to itself for ever.
    RedirectLoop,
    /// Answer 206 with this Content-Range header (and the right bytes).
    ContentRange(String),
    /// No fault: serve this request as usual (to aim a later fault at a later request).
    Pass,
}

impl Fault {
    /// A short name, for counts in reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Status(_) => "status",
            Fault::StatusRetryAfter(..) => "status+retry-after",
            Fault::Truncate(_) => "reset-mid-body",
            Fault::Delay(_) => "stall-before-head",
            Fault::StallMidBody { .. } => "stall-mid-body",
            Fault::LengthOver(_) => "content-length-over",
            Fault::LengthUnder(_) => "content-length-under",
            Fault::Oversize(_) => "body-larger-than-announced",
            Fault::IgnoreRange => "range-ignored",
            Fault::OtherEtag => "other-etag",
            Fault::Corrupt => "corrupt-same-etag",
            Fault::RedirectLoop => "redirect-loop",
            Fault::ContentRange(_) => "bad-content-range",
            Fault::Pass => "none",
        }
    }
}

#[derive(Default)]
struct Inner {
    files: Mutex<HashMap<String, (Bytes, u64)>>,
    faults: Mutex<VecDeque<Fault>>,
    served: AtomicU64,
    requests: AtomicU64,
    no_ranges: AtomicBool,
    version: AtomicU64,
    /// The `Authorization` header every request must carry (None: no check).
    auth: Mutex<Option<String>>,
    /// Microseconds to wait before each 64 KiB piece of a body (a slow link).
    chunk_delay_us: AtomicU64,
    /// Faults taken off the queue so far.
    injected: AtomicU64,
    /// Set while the server is down: no listener (connections refused).
    down: AtomicBool,
    /// Bumped by every `set_down(true)`: connections opened before it fail on their next use.
    down_epoch: AtomicU64,
    /// Connections refused or reset by `set_down` (counted at accept and on use).
    resets: AtomicU64,
}

pub struct Origin {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Origin {
    pub fn start() -> Origin {
        let inner = Arc::new(Inner::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (atx, arx) = std::sync::mpsc::channel();
        let state = inner.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                atx.send(addr).unwrap();
                let listener = Downable {
                    listener: Some(listener),
                    addr,
                    state: state.clone(),
                };
                let app = axum::Router::new()
                    .route("/{name}", axum::routing::get(serve))
                    .route("/moved/{name}", axum::routing::get(moved))
                    .route("/loop/{name}", axum::routing::get(redirect_loop))
                    .with_state(state);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Origin {
            addr: arx.recv().unwrap(),
            inner,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    /// Publishes (or replaces, with a new ETag) a file.
    pub fn put(&self, name: &str, data: impl Into<Bytes>) {
        let v = self.inner.version.fetch_add(1, Ordering::SeqCst) + 1;
        self.inner
            .files
            .lock()
            .unwrap()
            .insert(name.to_string(), (data.into(), v));
    }

    pub fn remove(&self, name: &str) {
        self.inner.files.lock().unwrap().remove(name);
    }

    pub fn fault(&self, f: Fault) {
        self.inner.faults.lock().unwrap().push_back(f);
    }

    /// `f`, for the next `n` requests.
    pub fn fault_n(&self, f: Fault, n: usize) {
        let mut q = self.inner.faults.lock().unwrap();
        for _ in 0..n {
            q.push_back(f.clone());
        }
    }

    pub fn clear_faults(&self) {
        self.inner.faults.lock().unwrap().clear();
    }

    /// Faults still queued.
    pub fn faults_left(&self) -> usize {
        self.inner.faults.lock().unwrap().len()
    }

    /// Faults injected so far (taken off the queue by a request).
    pub fn injected(&self) -> u64 {
        self.inner.injected.load(Ordering::SeqCst)
    }

    /// Takes the server down (`true`: the listener closes, so connections are refused,
    /// and open connections fail on their next read or write) or brings it back on the
    /// same address.
    pub fn set_down(&self, down: bool) {
        if down {
            self.inner.down_epoch.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.down.store(down, Ordering::SeqCst);
    }

    /// Connections refused or reset because the server was down.
    pub fn resets(&self) -> u64 {
        self.inner.resets.load(Ordering::SeqCst)
    }

    pub fn set_no_ranges(&self, on: bool) {
        self.inner.no_ranges.store(on, Ordering::SeqCst);
    }

    /// Slows every body down: `d` before each 64 KiB piece.
    pub fn set_chunk_delay(&self, d: Duration) {
        self.inner
            .chunk_delay_us
            .store(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// Body bytes sent so far.
    /// Every request must carry `Authorization: <value>` from now on (401 without, 403 wrong).
    pub fn require_auth(&self, value: &str) {
        *self.inner.auth.lock().unwrap() = Some(value.to_string());
    }

    pub fn served(&self) -> u64 {
        self.inner.served.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `/moved/NAME` redirects to `/NAME`, as object stores and CDNs do.
async fn moved(Path(name): Path<String>) -> Response {
    Response::builder()
        .status(302)
        .header("location", format!("/{name}"))
        .body(Body::empty())
        .unwrap()
}

/// `/loop/NAME` redirects to itself: a client must give up, not follow it for ever.
async fn redirect_loop(Path(name): Path<String>) -> Response {
    Response::builder()
        .status(302)
        .header("location", format!("/loop/{name}"))
        .body(Body::empty())
        .unwrap()
}

fn parse_range(h: &HeaderMap, len: u64) -> Option<(u64, u64)> {
    let v = h.get("range")?.to_str().ok()?.strip_prefix("bytes=")?;
    let (a, b) = v.split_once('-')?;
    let a: u64 = a.parse().ok()?;
    let b: u64 = if b.is_empty() {
        len - 1
    } else {
        b.parse::<u64>().ok()?.min(len - 1)
    };
    Some((a, b))
}

async fn serve(
    State(s): State<Arc<Inner>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    s.requests.fetch_add(1, Ordering::SeqCst);
    let want = s.auth.lock().unwrap().clone();
    if let Some(want) = want {
        let given = headers.get("authorization").and_then(|v| v.to_str().ok());
        if given != Some(want.as_str()) {
            return Response::builder()
                .status(if given.is_some() { 403 } else { 401 })
                .body(Body::from("no"))
                .unwrap();
        }
    }
    let fault = s.faults.lock().unwrap().pop_front();
    if fault.as_ref().is_some_and(|f| !matches!(f, Fault::Pass)) {
        s.injected.fetch_add(1, Ordering::SeqCst);
    }
    match &fault {
        Some(Fault::Status(code)) => {
            return Response::builder()
                .status(*code)
                .body(Body::from("injected fault"))
                .unwrap();
        }
        Some(Fault::StatusRetryAfter(code, secs)) => {
            return Response::builder()
                .status(*code)
                .header("retry-after", secs.to_string())
                .body(Body::from("injected fault, retry later"))
                .unwrap();
        }
        Some(Fault::RedirectLoop) => {
            return Response::builder()
                .status(302)
                .header("location", format!("/loop/{name}"))
                .body(Body::empty())
                .unwrap();
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(*d).await,
        _ => {}
    }
    let Some((data, version)) = s.files.lock().unwrap().get(&name).cloned() else {
        return Response::builder()
            .status(404)
            .body(Body::from("not found"))
            .unwrap();
    };
    let etag = format!("\"v{version}\"");
    let len = data.len() as u64;
    let ranges = !s.no_ranges.load(Ordering::SeqCst) && !matches!(fault, Some(Fault::IgnoreRange));
    let if_range_ok = headers
        .get("if-range")
        .is_none_or(|v| v.to_str().ok() == Some(etag.as_str()));
    let (status, body, content_range) =
        match parse_range(&headers, len).filter(|_| ranges && if_range_ok && len > 0) {
            Some((a, b)) if a < len && a <= b => (
                StatusCode::PARTIAL_CONTENT,
                data.slice(a as usize..=b as usize),
                Some(format!("bytes {a}-{b}/{len}")),
            ),
            Some(_) => {
                return Response::builder()
                    .status(416)
                    .header("content-range", format!("bytes */{len}"))
                    .body(Body::empty())
                    .unwrap()
            }
            None => (StatusCode::OK, data, None),
        };
    let etag = match fault {
        Some(Fault::OtherEtag) => format!("\"v{version}-other\""),
        _ => etag,
    };
    let mut body = body;
    let mut announced = body.len();
    let mut content_range = content_range;
    match &fault {
        Some(Fault::Corrupt) if !body.is_empty() => {
            let mut v = body.to_vec();
            for i in (0..v.len()).step_by(4096) {
                v[i] ^= 0x5a;
            }
            body = v.into();
            announced = body.len();
        }
        Some(Fault::Oversize(n)) => {
            let mut v = body.to_vec();
            v.extend(std::iter::repeat_n(0xeeu8, *n));
            body = v.into();
            announced = body.len();
        }
        Some(Fault::LengthOver(n)) => announced = body.len() + n,
        Some(Fault::LengthUnder(n)) => {
            announced = body.len().saturating_sub(*n);
            body = body.slice(..announced);
        }
        Some(Fault::ContentRange(cr)) => content_range = Some(cr.clone()),
        _ => {}
    }
    let mut resp = Response::builder()
        .status(status)
        .header("etag", etag.clone());
    if let Some(cr) = content_range {
        resp = resp.header("content-range", cr);
    }
    let counter = s.clone();
    if let Some(Fault::Truncate(n)) = fault {
        let n = n.min(body.len());
        counter.served.fetch_add(n as u64, Ordering::SeqCst);
        let first = body.slice(..n);
        let stream = futures::stream::iter(vec![
            Ok::<Bytes, std::io::Error>(first),
            Err(std::io::Error::other("injected connection reset")),
        ]);
        return resp
            .header("content-length", body.len())
            .body(Body::from_stream(stream))
            .unwrap();
    }
    let stall = match fault {
        Some(Fault::StallMidBody { after, pause }) => Some((after, pause)),
        _ => None,
    };
    // Stream in 64 KiB pieces (cut at a stall point) and count what is actually sent.
    let total = body.len();
    let mut cuts: Vec<usize> = (0..total).step_by(65536).collect();
    if let Some((after, _)) = stall {
        if after < total && !cuts.contains(&after) {
            cuts.push(after);
            cuts.sort_unstable();
        }
    }
    let chunks: Vec<(usize, Bytes)> = cuts
        .iter()
        .enumerate()
        .map(|(i, &o)| {
            let end = cuts.get(i + 1).copied().unwrap_or(total);
            (o, body.slice(o..end))
        })
        .collect();
    let stream = futures::stream::iter(chunks).then(move |(at, c)| {
        let counter = counter.clone();
        async move {
            if let Some((after, pause)) = stall {
                if at == after {
                    tokio::time::sleep(pause).await;
                }
            }
            let d = counter.chunk_delay_us.load(Ordering::SeqCst);
            if d > 0 {
                tokio::time::sleep(Duration::from_micros(d)).await;
            }
            counter.served.fetch_add(c.len() as u64, Ordering::SeqCst);
            Ok::<Bytes, std::io::Error>(c)
        }
    });
    resp.header("content-length", announced)
        .body(Body::from_stream(stream))
        .unwrap()
}

/// The origin's listener: while the origin is down it holds no socket (connections are
/// refused) and connections accepted before fail on their next use; then it binds the
/// same address again.
struct Downable {
    listener: Option<tokio::net::TcpListener>,
    addr: SocketAddr,
    state: Arc<Inner>,
}

impl axum::serve::Listener for Downable {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            if self.state.down.load(Ordering::SeqCst) {
                self.listener = None;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            if self.listener.is_none() {
                match tokio::net::TcpListener::bind(self.addr).await {
                    Ok(l) => self.listener = Some(l),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                }
            }
            let l = self.listener.as_ref().unwrap();
            // Wake up now and then to notice `set_down`.
            if let Ok(Ok((io, addr))) =
                tokio::time::timeout(Duration::from_millis(20), l.accept()).await
            {
                let epoch = self.state.down_epoch.load(Ordering::SeqCst);
                return (
                    Conn {
                        io,
                        epoch,
                        state: self.state.clone(),
                    },
                    addr,
                );
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// A connection that breaks once the origin went down after it was accepted.
struct Conn {
    io: tokio::net::TcpStream,
    epoch: u64,
    state: Arc<Inner>,
}

impl Conn {
    fn broken(&self) -> Option<std::io::Error> {
        (self.state.down_epoch.load(Ordering::SeqCst) != self.epoch).then(|| {
            self.state.resets.fetch_add(1, Ordering::SeqCst);
            std::io::Error::from(std::io::ErrorKind::ConnectionReset)
        })
    }
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(e) = self.broken() {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(e) = self.broken() {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

use futures::StreamExt;
