//! `bifs serve DIR`: a plain origin with Range support for air-gapped clusters and the demo.

use std::net::SocketAddr;

use axum::Router;
use tower_http::services::ServeDir;

pub async fn run(dir: std::path::PathBuf, listen: SocketAddr) -> anyhow::Result<()> {
    if !dir.is_dir() {
        anyhow::bail!(
            "{} is not a directory; give the folder whose files to serve",
            dir.display()
        );
    }
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {listen}: {e}; pick another --listen address")
    })?;
    tracing::info!(dir = %dir.display(), addr = %listener.local_addr()?, "serving files");
    let app = Router::new().fallback_service(ServeDir::new(dir));
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
