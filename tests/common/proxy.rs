//! A peer that lies or dawdles: an HTTP proxy in front of a bifs daemon that flips a byte
//! in every `every`-th `/data` reply (and counts how many it corrupted), or waits before each. Everything else passes
//! through unchanged, so the daemon behind it looks like an honest peer otherwise.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

struct Inner {
    upstream: String,
    every: u64,
    delay: std::time::Duration,
    seen: AtomicU64,
    pub corrupted: AtomicU64,
    client: reqwest::Client,
}

pub struct LyingPeer {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LyingPeer {
    /// Corrupts every `every`-th data reply (0: none).
    pub fn start(upstream: &str, every: u64) -> LyingPeer {
        Self::start_with(upstream, every, std::time::Duration::ZERO)
    }

    /// As `start`, and waits `delay` before each data reply (a slow peer).
    pub fn start_with(upstream: &str, every: u64, delay: std::time::Duration) -> LyingPeer {
        let inner = Arc::new(Inner {
            upstream: upstream.trim_end_matches('/').to_string(),
            every,
            delay,
            seen: AtomicU64::new(0),
            corrupted: AtomicU64::new(0),
            client: reqwest::Client::new(),
        });
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
                let app = axum::Router::new().fallback(forward).with_state(state);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        LyingPeer {
            addr: arx.recv().unwrap(),
            inner,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn corrupted(&self) -> u64 {
        self.inner.corrupted.load(Ordering::Relaxed)
    }
}

impl Drop for LyingPeer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn forward(State(p): State<Arc<Inner>>, req: Request) -> Response {
    let path = req
        .uri()
        .path_and_query()
        .map(|x| x.as_str().to_string())
        .unwrap_or_default();
    let mut out = p.client.get(format!("{}{path}", p.upstream));
    for name in ["range", "authorization", "x-bifs-version"] {
        if let Some(v) = req.headers().get(name) {
            out = out.header(name, v.clone());
        }
    }
    let resp = match out.send().await {
        Ok(r) => r,
        Err(_) => {
            return Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Body::empty())
                .unwrap()
        }
    };
    let status = resp.status();
    let mut headers = HeaderMap::new();
    for (k, v) in resp.headers() {
        headers.insert(k.clone(), v.clone());
    }
    let mut body = resp.bytes().await.unwrap_or_default().to_vec();
    if path.contains("/data") {
        tokio::time::sleep(p.delay).await;
    }
    if path.contains("/data") && status.as_u16() == 206 && !body.is_empty() && p.every > 0 {
        let n = p.seen.fetch_add(1, Ordering::Relaxed);
        if n % p.every == 0 {
            let i = body.len() / 2;
            body[i] ^= 0x5a;
            p.corrupted.fetch_add(1, Ordering::Relaxed);
        }
    }
    let mut r = Response::builder().status(status);
    for (k, v) in headers.iter() {
        r = r.header(k, v);
    }
    r.body(Body::from(body)).unwrap()
}
