//! `bifs mount`: starts the node, the HTTP API and the FUSE session, and takes them down
//! cleanly on SIGTERM/SIGINT or when the mount is unmounted from outside.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fuser::{MountOption, SessionACL};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::core::fetch::ReadersOnFill;
use crate::core::node::sources_with;
use crate::core::peer::Peers;
use crate::core::source::HttpClients;
use crate::core::{ImageConfig, Node};

pub struct MountArgs {
    pub mountpoint: PathBuf,
    pub disks: Vec<PathBuf>,
    pub listen: SocketAddr,
    pub token_file: Option<PathBuf>,
    /// `--manifests DIR`: BackingImage YAML applied at start and on every change.
    pub manifests: Option<PathBuf>,
    pub cfg: ImageConfig,
    pub peers: Vec<String>,
    pub peers_dns: Option<String>,
    pub lifecycle: crate::core::node::LifecycleConfig,
    /// Where an export's `volume-name` is looked up.
    pub volumes_dir: PathBuf,
    pub secrets_dir: PathBuf,
    pub ca_file: Option<PathBuf>,
}

/// Without a token, anyone who reaches the API controls the node: only loopback,
/// unless the operator says otherwise.
pub fn check_listen(listen: SocketAddr, has_token: bool, insecure: bool) -> Result<(), String> {
    if listen.ip().is_loopback() || has_token || insecure {
        return Ok(());
    }
    Err(format!(
        "--listen {listen} is reachable from other hosts and there is no --token-file: \
         give --token-file F (clients use the same token), listen on 127.0.0.1, \
         or pass --insecure-listen to serve the API without a token"
    ))
}

/// Sets the mount's readahead window (`fs::KERNEL_READAHEAD`, which says why) through
/// its bdi in sysfs, besides the FUSE_INIT answer (`fs.rs`), so the window holds whatever
/// the kernel made of that answer.
fn set_kernel_readahead(mp: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(mp) else { return };
    let dev = m.dev();
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    let kib = crate::fs::KERNEL_READAHEAD / 1024;
    if let Err(e) = std::fs::write(&path, kib.to_string()) {
        warn!(path, error = %e, "cannot set read_ahead_kb to {kib}; a page fault of an mmapped image still arriving may fetch the kernel's default window");
    }
}

/// The CPU priority of the fill's threads (the hashing thread runs at 10 too), and theirs
/// while a reader waits on a fill job.
const FILL_NICE: libc::c_int = 10;
const FILL_NICE_RAISED: libc::c_int = 0;

/// The fill runtime's threads, at `FILL_NICE` unless readers wait on fill jobs
/// (`FetchConfig::fill_priority`): then at `FILL_NICE_RAISED`, so that a reader waiting
/// on a fill stream does not wait behind its niceness.
#[derive(Debug, Default)]
struct FillThreads {
    /// Thread ids, and how many readers wait on fill jobs now.
    inner: std::sync::Mutex<(Vec<libc::pid_t>, usize)>,
}

fn set_nice(tid: libc::pid_t, nice: libc::c_int) {
    // SAFETY: setpriority reads its integer arguments only; a tid that has exited fails
    // with ESRCH, harmlessly.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
}

impl FillThreads {
    /// The calling thread joins, at the priority of the moment.
    fn join(&self) {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        let mut g = self.inner.lock().unwrap();
        set_nice(tid, if g.1 > 0 { FILL_NICE_RAISED } else { FILL_NICE });
        g.0.push(tid);
    }

    fn part(&self) {
        // SAFETY: as in `join`.
        let tid = unsafe { libc::gettid() };
        self.inner.lock().unwrap().0.retain(|t| *t != tid);
    }

    /// Every thread at `nice` (under the lock: the last change wins, in order).
    fn set_all(threads: &[libc::pid_t], nice: libc::c_int) {
        for t in threads {
            set_nice(*t, nice);
        }
    }
}

impl ReadersOnFill for FillThreads {
    fn enter(&self) {
        let mut g = self.inner.lock().unwrap();
        g.1 += 1;
        if g.1 == 1 {
            Self::set_all(&g.0, FILL_NICE_RAISED);
        }
    }

    fn leave(&self) {
        let mut g = self.inner.lock().unwrap();
        g.1 -= 1;
        if g.1 == 0 {
            Self::set_all(&g.0, FILL_NICE);
        }
    }
}

/// The API token from `--token-file` (the one reader of token files, `server::read_token_file`).
fn read_token(f: &Path) -> anyhow::Result<String> {
    crate::server::read_token_file(f).map_err(|e| crate::core::Error::BadInput(e).into())
}

pub fn run(args: MountArgs) -> anyhow::Result<()> {
    // Fewer malloc arenas: with one per thread, buffers freed on other threads than they
    // were allocated on left the daemon's RSS growing with the transfer rate.
    // SAFETY: mallopt only tunes glibc's allocator; called before any other thread exists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bifs")
        .build()
        .context("cannot start the async runtime (threads)")?;
    // Fill jobs run apart, at nice 10 (see `FetchConfig::fill_runtime`): on two cores a
    // fill at line rate otherwise holds both workers when a reader's request arrives.
    // Raised while a reader waits on a fill job (`FillThreads`).
    let fill_threads = Arc::new(FillThreads::default());
    let (joins, parts) = (fill_threads.clone(), fill_threads.clone());
    let fill_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("bifs-fill")
        .on_thread_start(move || joins.join())
        .on_thread_stop(move || parts.part())
        .build()
        .context("cannot start the fill's async runtime (threads)")?;
    let mut cfg = args.cfg.clone();
    cfg.fetch.fill_runtime = Some(fill_rt.handle().clone());
    cfg.fetch.fill_priority = Some(fill_threads);
    let token = match &args.token_file {
        Some(f) => Some(read_token(f)?),
        None => None,
    };
    crate::mountpoint::prepare(&args.mountpoint)?;
    let mp = args.mountpoint.canonicalize().with_context(|| {
        format!(
            "cannot resolve the mountpoint {}",
            args.mountpoint.display()
        )
    })?;
    let mp_str = mp.display().to_string();
    for p in &args.peers {
        crate::core::spec::validate_url(p).map_err(|e| anyhow::anyhow!("--peer: {e}"))?;
    }
    let peers = (!args.peers.is_empty() || args.peers_dns.is_some()).then(|| {
        let node_id = hex::encode(rand::random::<[u8; 8]>());
        Peers::new(
            args.peers.clone(),
            args.peers_dns.clone(),
            token.clone(),
            node_id,
        )
    });
    let clients = match &args.ca_file {
        Some(f) => HttpClients::with_ca(f).map_err(|e| anyhow::anyhow!(e))?,
        None => HttpClients::default(),
    };
    let sources = sources_with(
        clients,
        peers.clone(),
        args.volumes_dir.clone(),
        args.secrets_dir.clone(),
    );
    let node = rt.block_on(Node::start_with(&args.disks, cfg, mp_str.clone(), sources))?;
    {
        let _rt = rt.enter();
        if let Some(p) = peers {
            node.attach_peers(p);
        }
        node.start_lifecycle(args.lifecycle.clone());
    }
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(args.listen))
        .with_context(|| {
            format!(
                "cannot listen on {}; is another bifs running? pick another --listen",
                args.listen
            )
        })?;
    let api_addr = listener
        .local_addr()
        .context("cannot read the API socket's address")?;
    let stop = tokio_util::sync::CancellationToken::new();
    let server = {
        let (node, stop) = (node.clone(), stop.clone());
        rt.spawn(async move {
            crate::server::run(listener, node, token, async move { stop.cancelled().await }).await
        })
    };

    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        MountOption::RO,
        MountOption::FSName("bifs".into()),
        MountOption::DefaultPermissions,
    ];
    cfg.acl = SessionACL::All;
    cfg.n_threads = Some(2);
    let fs = crate::fs::BifsFs::new(node.clone(), rt.handle().clone());
    let session = fuser::spawn_mount(fs, &mp, &cfg)
        .with_context(|| format!("cannot mount FUSE at {mp_str}"))?;
    set_kernel_readahead(&mp);
    rt.spawn(crate::fs::invalidate_on_events(
        node.clone(),
        session.notifier(),
    ));
    info!(mountpoint = %mp_str, api = %api_addr, images = node.list().len(), "bifs mounted");
    if let Some(dir) = &args.manifests {
        rt.spawn(crate::manifests::watch(
            node.clone(),
            dir.clone(),
            stop.clone(),
        ));
    }

    let external_unmount = rt.block_on(async {
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        loop {
            tokio::select! {
                _ = term.recv() => return Ok::<bool, anyhow::Error>(false),
                _ = int.recv() => return Ok(false),
                _ = tick.tick() => if session.guard.is_finished() { return Ok(true) },
            }
        }
    })?;
    info!("shutting down");
    stop.cancel();
    rt.block_on(node.shutdown());
    if external_unmount {
        let _ = session.join();
    } else if let Err(e) = session.umount_and_join() {
        warn!(error = %e, "unmount failed (files still open?); detaching lazily");
        let _ = crate::mountpoint::detach(&mp);
    }
    let _ = rt.block_on(server);
    rt.shutdown_timeout(Duration::from_secs(2));
    fill_rt.shutdown_timeout(Duration::from_secs(1));
    info!("bye");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_of(tid: libc::pid_t) -> libc::c_int {
        // SAFETY: getpriority reads its integer arguments only.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) }
    }

    /// The fill's threads run at nice 10 and at 0 while any reader waits on a fill job,
    /// back at 10 when the last one is served; a thread that joins meanwhile starts raised.
    /// Raising needs root (CAP_SYS_NICE), as the daemon runs.
    #[test]
    fn fill_threads_are_raised_while_readers_wait_on_fill_jobs() {
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: raising a thread's priority needs root");
            return;
        }
        let threads = Arc::new(FillThreads::default());
        let spawn = |t: Arc<FillThreads>| {
            let (tx, rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
            let h = std::thread::spawn(move || {
                t.join();
                // SAFETY: as in `FillThreads::join`.
                tx.send(unsafe { libc::gettid() }).unwrap();
                let _ = stop_rx.recv();
                t.part();
            });
            (rx.recv().unwrap(), stop_tx, h)
        };
        let (a, stop_a, ha) = spawn(threads.clone());
        assert_eq!(nice_of(a), FILL_NICE);
        threads.enter();
        threads.enter();
        assert_eq!(nice_of(a), FILL_NICE_RAISED, "raised while readers wait");
        let (b, stop_b, hb) = spawn(threads.clone());
        assert_eq!(nice_of(b), FILL_NICE_RAISED, "a thread joining meanwhile");
        threads.leave();
        assert_eq!(nice_of(a), FILL_NICE_RAISED, "one reader still waits");
        threads.leave();
        assert_eq!(
            (nice_of(a), nice_of(b)),
            (FILL_NICE, FILL_NICE),
            "the last one served"
        );
        for (stop, h) in [(stop_a, ha), (stop_b, hb)] {
            stop.send(()).unwrap();
            h.join().unwrap();
        }
        assert!(
            threads.inner.lock().unwrap().0.is_empty(),
            "parted threads are forgotten"
        );
    }
}
