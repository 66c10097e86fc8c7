//! `bifs serve DIR`: a plain origin with Range support for air-gapped clusters and the demo.
//!
//! tower-http's `ServeDir` does the serving; `guard` first refuses what a file origin must
//! not answer: a path that resolves (through symlinks) outside DIR, a file asked for as a
//! directory (`/file/`), and a Range over a 0-byte file, which no range can satisfy (416).
//! The checks look at the path before `ServeDir` opens it: a symlink swapped in between is
//! not caught, which is fine for an origin of files the operator put there.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::services::ServeDir;

pub async fn run(dir: PathBuf, listen: SocketAddr) -> anyhow::Result<()> {
    if !dir.is_dir() {
        anyhow::bail!(
            "{} is not a directory; give the folder whose files to serve",
            dir.display()
        );
    }
    let root = dir
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("cannot resolve {}: {e}", dir.display()))?;
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {listen}: {e}; pick another --listen address")
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| anyhow::anyhow!("cannot read the listening address: {e}"))?;
    tracing::info!(dir = %root.display(), %addr, "serving files");
    let app = Router::new()
        .fallback_service(ServeDir::new(&root))
        .layer(middleware::from_fn_with_state(Arc::new(root), guard));
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| anyhow::anyhow!("serving stopped: {e}"))?;
    Ok(())
}

async fn guard(State(root): State<Arc<PathBuf>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    // Trailing slashes off: `/file/` must find the file to refuse it.
    let rel = Path::new(decoded.trim_matches('/'));
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) && !rel.as_os_str().is_empty() {
        return not_found();
    }
    let candidate = root.join(rel);
    let Ok(real) = candidate.canonicalize() else {
        return next.run(req).await; // ServeDir answers 404
    };
    if !real.starts_with(&*root) {
        tracing::warn!(
            path,
            "refused: a symlink leading outside the served directory"
        );
        return not_found();
    }
    let Ok(meta) = std::fs::metadata(&real) else {
        return not_found();
    };
    if meta.is_file() && path.ends_with('/') {
        return not_found();
    }
    if meta.is_file() && meta.len() == 0 && req.headers().contains_key(header::RANGE) {
        return (
            StatusCode::RANGE_NOT_SATISFIABLE,
            [(header::CONTENT_RANGE, "bytes */0")],
        )
            .into_response();
    }
    next.run(req).await
}

fn not_found() -> Response {
    StatusCode::NOT_FOUND.into_response()
}
