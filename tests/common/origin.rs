//! A real HTTP origin on 127.0.0.1 for tests: serves named files with Range support and
//! ETags, counts the bytes it sends, and injects faults (status codes, bodies cut short,
//! slow replies, a server without ranges, content replaced under a new ETag).

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
    /// Send this many bytes of the body, then drop the connection.
    Truncate(usize),
    /// Wait this long before answering.
    Delay(Duration),
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
                atx.send(listener.local_addr().unwrap()).unwrap();
                let app = axum::Router::new()
                    .route("/{name}", axum::routing::get(serve))
                    .route("/moved/{name}", axum::routing::get(moved))
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

    pub fn clear_faults(&self) {
        self.inner.faults.lock().unwrap().clear();
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
    let mut truncate = None;
    match fault {
        Some(Fault::Status(code)) => {
            return Response::builder()
                .status(code)
                .body(Body::from("injected fault"))
                .unwrap();
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::Truncate(n)) => truncate = Some(n),
        None => {}
    }
    let Some((data, version)) = s.files.lock().unwrap().get(&name).cloned() else {
        return Response::builder()
            .status(404)
            .body(Body::from("not found"))
            .unwrap();
    };
    let etag = format!("\"v{version}\"");
    let len = data.len() as u64;
    let ranges = !s.no_ranges.load(Ordering::SeqCst);
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
    let mut resp = Response::builder()
        .status(status)
        .header("etag", etag.clone());
    if let Some(cr) = content_range {
        resp = resp.header("content-range", cr);
    }
    let counter = s.clone();
    match truncate {
        Some(n) => {
            let n = n.min(body.len());
            counter.served.fetch_add(n as u64, Ordering::SeqCst);
            let first = body.slice(..n);
            let stream = futures::stream::iter(vec![
                Ok::<Bytes, std::io::Error>(first),
                Err(std::io::Error::other("injected connection reset")),
            ]);
            resp.header("content-length", body.len())
                .body(Body::from_stream(stream))
                .unwrap()
        }
        None => {
            // Stream in 64 KiB pieces and count what is actually sent.
            let total = body.len();
            let chunks: Vec<Bytes> = (0..total)
                .step_by(65536)
                .map(|o| body.slice(o..(o + 65536).min(total)))
                .collect();
            let stream = futures::stream::iter(chunks).then(move |c| {
                let counter = counter.clone();
                async move {
                    let d = counter.chunk_delay_us.load(Ordering::SeqCst);
                    if d > 0 {
                        tokio::time::sleep(Duration::from_micros(d)).await;
                    }
                    counter.served.fetch_add(c.len() as u64, Ordering::SeqCst);
                    Ok::<Bytes, std::io::Error>(c)
                }
            });
            resp.header("content-length", total)
                .body(Body::from_stream(stream))
                .unwrap()
        }
    }
}

use futures::StreamExt;
