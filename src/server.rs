//! The HTTP shell: the v1 control API for the CLI and programs, `/metrics`, `/healthz`.
//! Handlers translate JSON to core calls and core errors to status codes (`status`).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tracing::{info_span, Instrument};

use crate::core::peer::{NODE_HEADER, VERSION_HEADER};
use crate::core::range::ByteRange;
use crate::core::{CreateOptions, Error, ImageSpec, Node, SourceError};

#[derive(Clone)]
struct App {
    node: Arc<Node>,
    token: Option<Arc<str>>,
}

/// The body of `POST /v1/images`: a spec plus where and how to create it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateRequest {
    #[serde(flatten)]
    pub spec: ImageSpec,
    #[serde(default)]
    pub disk: Option<String>,
    #[serde(default)]
    pub no_fill: bool,
    /// Whatever no field above took. `deny_unknown_fields` does not work with `flatten`;
    /// serde hands a flattened struct the keys it knows and this map the rest, so a
    /// typo lands here and `check_unknown` refuses it, whatever fields the spec grows.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde::de::IgnoredAny>,
}

/// What a client sends to `POST /v1/images` (the CLI builds it, the server reads
/// `CreateRequest`): one definition of the wire shape.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateBody<'a> {
    #[serde(flatten)]
    pub spec: &'a ImageSpec,
    pub disk: Option<&'a str>,
    pub no_fill: bool,
}

/// Reads an API token file: the daemon's and the client's. Empty is refused: an empty
/// token would let every request in.
pub fn read_token_file(f: &std::path::Path) -> Result<String, String> {
    let token = std::fs::read_to_string(f)
        .map_err(|e| format!("cannot read the --token-file {}: {e}", f.display()))?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err(format!(
            "the --token-file {} is empty; write the API token into it (for example \
             `head -c 32 /dev/urandom | base64 > {}`), and give clients the same file",
            f.display(),
            f.display()
        ));
    }
    Ok(token)
}

/// A 400 naming the first unknown field of a request body, so that a typo never
/// silently does something else.
fn check_unknown(unknown: &BTreeMap<String, serde::de::IgnoredAny>) -> Result<(), Error> {
    match unknown.keys().next() {
        Some(field) => Err(Error::BadInput(format!(
            "unknown field {field:?} in the request; check its spelling (fields are camelCase)"
        ))),
        None => Ok(()),
    }
}

pub struct ApiError(Error);

/// One table from core errors to HTTP status codes. A fault of the request is a 4xx;
/// 5xx is left for what the server or the origin cannot do.
pub fn status(e: &Error) -> StatusCode {
    match e {
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::BadInput(_) => StatusCode::BAD_REQUEST,
        Error::Conflict { .. } | Error::Checksum { .. } | Error::Failed { .. } => {
            StatusCode::CONFLICT
        }
        Error::Source(SourceError::Changed { .. }) | Error::VolumeChanged { .. } => {
            StatusCode::CONFLICT
        }
        // The URL names nothing the origin will give (404, 410, 403...): the request's
        // fault, but well-formed input, so not a 400 (the CLI exits 1, not 2).
        Error::Source(SourceError::Status { status, .. }) if (400..500).contains(status) => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        Error::Source(_) => StatusCode::BAD_GATEWAY,
        Error::Io { errno, .. } if *errno == libc::ENOSPC => StatusCode::INSUFFICIENT_STORAGE,
        // A disk the request named that cannot take the image: the request can pick another.
        Error::Io { errno, .. } if *errno == libc::EROFS => StatusCode::CONFLICT,
        Error::Io { errno, .. } if *errno == libc::ENAMETOOLONG || *errno == libc::EINVAL => {
            StatusCode::BAD_REQUEST
        }
        Error::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        Error::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
        Error::NoSource { .. } | Error::ReadTimeout { .. } => StatusCode::BAD_GATEWAY,
        Error::Deleted(_) => StatusCode::NOT_FOUND,
        Error::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        Error::SpecDiffers { .. } | Error::Kept { .. } => StatusCode::CONFLICT,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_error(status(&self.0), &self.0.to_string())
    }
}

/// An error answer: `{"error": msg}` with `code`.
fn json_error(code: StatusCode, msg: &str) -> Response {
    (code, Json(serde_json::json!({ "error": msg }))).into_response()
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub fn router(node: Arc<Node>, token: Option<String>) -> Router {
    let app = App {
        node,
        token: token.map(Into::into),
    };
    Router::new()
        .route("/v1/images", get(list).post(create))
        .route("/v1/images/{name}", get(show).delete(delete))
        .route("/v1/images/{name}/fill", post(fill))
        .route("/v1/images/{name}/from-peers", post(from_peers))
        .route("/v1/images/{name}/cleanup", post(cleanup))
        .route("/v1/disks", get(disks))
        .route("/v1/orphans/cleanup", post(cleanup_orphans))
        .route("/v1/images/{name}/upload", axum::routing::put(upload))
        .route("/v1/images/{name}/blocks", get(blocks))
        .route("/v1/images/{name}/data", get(data))
        .route("/v1/images/{name}/manifest", get(manifest))
        .route("/metrics", get(metrics))
        .fallback(|| async { json_error(StatusCode::NOT_FOUND, "no such API path") })
        .method_not_allowed_fallback(|| async {
            json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this path",
            )
        })
        .layer(middleware::from_fn_with_state(app.clone(), auth))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(app)
}

async fn auth(State(app): State<App>, req: Request, next: Next) -> Response {
    if let Some(token) = &app.token {
        let ok = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| token_matches(t.as_bytes(), token.as_bytes()));
        if !ok {
            return (
                StatusCode::UNAUTHORIZED,
                Json(serde_json::json!({"error": "missing or wrong bearer token"})),
            )
                .into_response();
        }
    }
    let span = info_span!("http", method = %req.method(), path = %req.uri().path());
    next.run(req).instrument(span).await
}

/// Compares a presented token with ours in time that depends only on their lengths,
/// so response timing does not reveal how many leading bytes a guess got right.
fn token_matches(given: &[u8], want: &[u8]) -> bool {
    if given.len() != want.len() {
        return false;
    }
    let diff = given
        .iter()
        .zip(want)
        // black_box: keep the optimiser from turning the fold into an early-exit compare.
        .fold(0u8, |acc, (a, b)| std::hint::black_box(acc | (a ^ b)));
    diff == 0
}

async fn list(State(app): State<App>) -> Response {
    let list: Vec<crate::core::Status> =
        app.node.list().iter().map(|i| app.node.status(i)).collect();
    let mut resp = Json(list).into_response();
    // Names this daemon, so that a node finding itself among its peers skips itself.
    if let Some(p) = app.node.peers() {
        if let Ok(v) = HeaderValue::from_str(p.node_id()) {
            resp.headers_mut().insert(NODE_HEADER, v);
        }
    }
    resp
}

/// The image `name` if it holds the version a peer asks for (`x-bifs-version`).
fn peer_image(app: &App, name: &str, headers: &HeaderMap) -> ApiResult<Arc<crate::core::Image>> {
    let image = app.node.get(name)?;
    if let Some(want) = headers.get(VERSION_HEADER).and_then(|v| v.to_str().ok()) {
        if want != image.version() {
            return Err(Error::Conflict {
                name: name.to_string(),
                field: "version",
                have: image.version().to_string(),
                want: want.to_string(),
            }
            .into());
        }
    }
    Ok(image)
}

/// Creates an image as a peer holds it (spec from the peer, bytes from the peers).
async fn from_peers(State(app): State<App>, name: Name) -> ApiResult<impl IntoResponse> {
    let name = name_of(name)?;
    let image = app
        .node
        .create_from_peers(&name, CreateOptions::default())
        .await?;
    Ok((StatusCode::CREATED, Json(app.node.status(&image))))
}

/// Which blocks this node has (for peers).
async fn blocks(
    State(app): State<App>,
    name: Name,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    let name = name_of(name)?;
    use base64::Engine;
    let image = peer_image(&app, &name, &headers)?;
    let map = image.fetcher().map();
    let bitmap = map.to_bytes(0..map.word_count());
    let stored = image.stored();
    Ok(Json(serde_json::json!({
        "name": image.name,
        // Credentials in a URL stay on this node.
        "spec": stored.spec.redacted(),
        "identity": stored.identity,
        "version": image.version(),
        "state": image.state(),
        "size": image.size(),
        "blockSize": image.block_size(),
        "present": map.present_count(),
        "bitmap": base64::engine::general_purpose::STANDARD.encode(bitmap),
    })))
}

/// Parses a single `bytes=A-B` (or `A-`) range of an image of `size` bytes.
fn parse_range(v: &str, size: u64) -> Option<ByteRange> {
    let (a, b) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => size,
        b => b.parse::<u64>().ok()?.checked_add(1)?.min(size),
    };
    (start < end).then_some(ByteRange::new(start, end))
}

/// Byte ranges over present blocks (for peers): 416 for a range touching an absent block,
/// never zeros in its place.
async fn data(State(app): State<App>, name: Name, headers: HeaderMap) -> ApiResult<Response> {
    let name = name_of(name)?;
    let image = peer_image(&app, &name, &headers)?;
    image.touch(); // a peer fetching from this copy keeps it in use
    let size = image.size();
    let range = match headers.get(axum::http::header::RANGE) {
        Some(v) => v.to_str().ok().and_then(|v| parse_range(v, size)),
        None => Some(ByteRange::new(0, size)),
    };
    let geo = image.geometry();
    let Some(range) =
        range.filter(|r| !image.is_failed() && image.fetcher().map().all_set(geo.blocks_of(*r)))
    else {
        let mut resp = (
            StatusCode::RANGE_NOT_SATISFIABLE,
            Json(serde_json::json!({"error": "this node does not have (all of) those bytes"})),
        )
            .into_response();
        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
            resp.headers_mut()
                .insert(axum::http::header::CONTENT_RANGE, v);
        }
        return Ok(resp);
    };
    const PIECE: u64 = 1024 * 1024;
    let fetcher = image.fetcher().clone();
    let stream = futures::stream::unfold(range.start, move |at| {
        let fetcher = fetcher.clone();
        async move {
            if at >= range.end {
                return None;
            }
            let end = (at + PIECE).min(range.end);
            let r = fetcher
                .read_present_async(ByteRange::new(at, end))
                .await
                .map_err(std::io::Error::other);
            Some((r, end))
        }
    });
    let mut resp = Response::new(axum::body::Body::from_stream(stream));
    *resp.status_mut() = if headers.contains_key(axum::http::header::RANGE) {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let h = resp.headers_mut();
    h.insert(
        axum::http::header::CONTENT_LENGTH,
        HeaderValue::from(range.len()),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", range.start, range.end - 1))
    {
        h.insert(axum::http::header::CONTENT_RANGE, v);
    }
    if let Ok(v) = HeaderValue::from_str(image.version()) {
        h.insert(VERSION_HEADER, v);
    }
    Ok(resp)
}

/// Per-piece digests, only from a verified (ready) copy.
async fn manifest(State(app): State<App>, name: Name, headers: HeaderMap) -> ApiResult<Response> {
    let name = name_of(name)?;
    let image = peer_image(&app, &name, &headers)?;
    let pieces = image.piece_digests().await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        pieces.to_bytes(),
    )
        .into_response())
}

async fn create(
    State(app): State<App>,
    body: Result<Json<CreateRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(req) =
        body.map_err(|e| Error::BadInput(format!("bad request body: {}", e.body_text())))?;
    check_unknown(&req.unknown)?;
    let opts = CreateOptions {
        disk: req.disk,
        no_fill: req.no_fill,
    };
    let image = app.node.create(req.spec, opts).await?;
    Ok((StatusCode::CREATED, Json(app.node.status(&image))))
}

/// One piece of an upload (`Content-Range: bytes A-B/TOTAL`), landed as it arrives.
async fn upload(
    State(app): State<App>,
    name: Name,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<impl IntoResponse> {
    let name = name_of(name)?;
    let image = app.node.get(&name)?;
    let range = headers
        .get(axum::http::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok());
    let receipt = crate::core::upload::receive(&image, range, body.into_data_stream()).await?;
    Ok(Json(receipt))
}

/// The `{name}` of a path; a bad one (invalid UTF-8) is a JSON 400 like any bad input.
type Name = Result<Path<String>, axum::extract::rejection::PathRejection>;

fn name_of(name: Name) -> Result<String, ApiError> {
    name.map(|Path(n)| n).map_err(|e| {
        ApiError(Error::BadInput(format!(
            "bad image name in the path: {}",
            e.body_text()
        )))
    })
}

async fn show(State(app): State<App>, name: Name) -> ApiResult<impl IntoResponse> {
    let name = name_of(name)?;
    let image = app.node.get(&name)?;
    Ok(Json(app.node.status(&image)))
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete(
    State(app): State<App>,
    name: Name,
    q: Result<axum::extract::Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let name = name_of(name)?;
    let axum::extract::Query(q) =
        q.map_err(|e| Error::BadInput(format!("bad query: {}; use ?force=true", e.body_text())))?;
    app.node.delete(&name, q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Each disk: capacity, free, used by images, orphan folders.
async fn disks(State(app): State<App>) -> impl IntoResponse {
    Json(app.node.disks_report())
}

/// Removes the image folders no image claims.
async fn cleanup_orphans(State(app): State<App>) -> ApiResult<impl IntoResponse> {
    Ok(Json(app.node.remove_orphans().await?))
}

/// Removes this node's copy now; refused for a copy in use or one the cluster needs.
async fn cleanup(State(app): State<App>, name: Name) -> ApiResult<impl IntoResponse> {
    let name = name_of(name)?;
    app.node.cleanup(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn fill(State(app): State<App>, name: Name) -> ApiResult<impl IntoResponse> {
    let name = name_of(name)?;
    let image = app.node.fill(&name)?;
    Ok(Json(app.node.status(&image)))
}

async fn metrics(State(app): State<App>) -> String {
    let mut out = String::new();
    let mut gauges: BTreeMap<&str, (&str, Vec<String>)> = BTreeMap::new();
    let images = app.node.list();
    for image in &images {
        let st = app.node.status(image);
        let l = format!("name=\"{}\",disk=\"{}\"", st.name, image.disk.uuid8());
        let mut add = |m: &'static str, help: &'static str, v: String| {
            gauges.entry(m).or_insert((help, Vec::new())).1.push(v);
        };
        add(
            "bifs_image_size_bytes",
            "image size in bytes",
            format!("{{{l}}} {}", st.size),
        );
        add(
            "bifs_image_cached_bytes",
            "bytes present on this node",
            format!("{{{l}}} {}", st.bytes_cached),
        );
        add(
            "bifs_image_fetched_bytes_total",
            "bytes fetched from sources",
            format!("{{{l}}} {}", st.bytes_fetched),
        );
        add(
            "bifs_image_fill_held_seconds_total",
            "time the image's fill paused for readers far ahead of a fill",
            format!("{{{l}}} {:.3}", st.fill_held_ms as f64 / 1000.0),
        );
        add(
            "bifs_image_hash_held_seconds_total",
            "time the hashing of the image waited for readers of images still arriving",
            format!("{{{l}}} {:.3}", st.hash_held_ms as f64 / 1000.0),
        );
        add(
            "bifs_image_progress_percent",
            "progress in percent",
            format!("{{{l}}} {}", st.progress),
        );
        let copies = st.copies.iter().filter(|c| c.state == "ready").count()
            + usize::from(st.state == crate::core::State::Ready);
        add(
            "bifs_image_ready_copies",
            "ready copies in the cluster (this node and the peers it hears from)",
            format!("{{{l}}} {copies}"),
        );
        for s in ["pending", "in-progress", "ready", "failed"] {
            add(
                "bifs_image_state",
                "1 for the image's current state",
                format!("{{{l},state=\"{s}\"}} {}", u8::from(st.state.as_str() == s)),
            );
        }
    }
    out.push_str(&format!(
        "# HELP bifs_images images on this node\n# TYPE bifs_images gauge\nbifs_images {}\n",
        images.len()
    ));
    node_metrics(&app.node, &mut out);
    for (name, (help, samples)) in gauges {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {}\n",
            if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            }
        ));
        for s in samples {
            out.push_str(&format!("{name}{s}\n"));
        }
    }
    out
}

/// The node-wide counters: sources by kind, reads, verification, cleanup, disks.
fn node_metrics(node: &Node, out: &mut String) {
    use crate::core::metrics::{Metrics, SOURCE_KINDS, TTFB_BUCKETS};
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let m: &Metrics = node.metrics();
    fn family(out: &mut String, name: &str, kind: &str, help: &str) {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    }
    type Counter = fn(&crate::core::metrics::KindCounters) -> u64;
    let by_kind: [(&str, &str, Counter); 2] = [
        (
            "bifs_source_bytes_total",
            "bytes landed from sources, by kind",
            |c| c.bytes.load(Relaxed),
        ),
        (
            "bifs_source_requests_total",
            "requests to sources, by kind",
            |c| c.requests.load(Relaxed),
        ),
    ];
    for (name, help, get) in by_kind {
        family(out, name, "counter", help);
        for k in SOURCE_KINDS {
            let _ = writeln!(out, "{name}{{kind=\"{k}\"}} {}", get(m.kind(k)));
        }
    }
    family(
        out,
        "bifs_source_first_byte_seconds",
        "histogram",
        "time from a source request to its first byte",
    );
    for k in SOURCE_KINDS {
        let c = m.kind(k);
        for (i, le) in TTFB_BUCKETS.iter().enumerate() {
            let le = if le.is_infinite() {
                "+Inf".to_string()
            } else {
                le.to_string()
            };
            let v = c.ttfb_buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "bifs_source_first_byte_seconds_bucket{{kind=\"{k}\",le=\"{le}\"}} {v}"
            );
        }
        let sum = c.ttfb_sum_us.load(Relaxed) as f64 / 1e6;
        let count = c.requests.load(Relaxed);
        let _ = writeln!(
            out,
            "bifs_source_first_byte_seconds_sum{{kind=\"{k}\"}} {sum}"
        );
        let _ = writeln!(
            out,
            "bifs_source_first_byte_seconds_count{{kind=\"{k}\"}} {count}"
        );
    }
    let by_label = [
        (
            "bifs_reads_total",
            "reads through the mount: from cached blocks (hit) or waiting on a fetch (miss)",
            "result",
            [("hit", &m.cache_hits), ("miss", &m.cache_misses)],
        ),
        (
            "bifs_hashed_bytes_total",
            "bytes verification hashed, from the buffers they arrived in or read back from the data file",
            "from",
            [("received", &m.hashed_received), ("data_file", &m.hashed_read_back)],
        ),
    ];
    for (name, help, label, values) in by_label {
        family(out, name, "counter", help);
        for (v, c) in values {
            let _ = writeln!(out, "{name}{{{label}=\"{v}\"}} {}", c.load(Relaxed));
        }
    }
    for (name, help, v) in [
        (
            "bifs_verify_failures_total",
            "images whose whole checksum did not match",
            &m.verify_failures,
        ),
        (
            "bifs_corrupt_pieces_total",
            "pieces refused because they failed their digest",
            &m.corrupt_pieces,
        ),
        (
            "bifs_copies_removed_total",
            "unused copies removed by the cleanup",
            &m.copies_removed,
        ),
        (
            "bifs_evictions_total",
            "copies evicted to make room for a new image",
            &m.evictions,
        ),
    ] {
        family(out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", v.load(Relaxed));
    }
    family(
        out,
        "bifs_hash_held_seconds_total",
        "counter",
        "time the hashing thread waited for readers of images still arriving",
    );
    let _ = writeln!(
        out,
        "bifs_hash_held_seconds_total {:.3}",
        node.hash_held().as_secs_f64()
    );
    family(
        out,
        "bifs_disk_bytes",
        "gauge",
        "each cache disk: capacity, free, and used by image data",
    );
    for disk in &node.disks {
        let (total, free) = disk
            .space()
            .map_or((0, 0), |s| (s.total_bytes, s.avail_bytes));
        let used: u64 = node
            .list()
            .iter()
            .filter(|i| i.disk.uuid == disk.uuid)
            .map(|i| i.allocated_bytes())
            .sum();
        let d = disk.uuid8();
        let _ = writeln!(
            out,
            "bifs_disk_bytes{{disk=\"{d}\",kind=\"total\"}} {total}"
        );
        let _ = writeln!(out, "bifs_disk_bytes{{disk=\"{d}\",kind=\"free\"}} {free}");
        let _ = writeln!(out, "bifs_disk_bytes{{disk=\"{d}\",kind=\"used\"}} {used}");
    }
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn run(
    listener: tokio::net::TcpListener,
    node: Arc<Node>,
    token: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(node, token))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod token_tests {
    use super::token_matches;

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(token_matches(b"s3cret", b"s3cret"));
        for other in [&b"s3creT"[..], b"s3cre", b"s3cret!", b"", b"x3cret"] {
            assert!(!token_matches(other, b"s3cret"), "{other:?}");
        }
    }
}
