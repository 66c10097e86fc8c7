//! Other bifs nodes as sources. `Peers` keeps the list of peer daemons (`--peer URL`,
//! and every address `--peers-dns NAME:PORT` resolves to, as a Kubernetes headless
//! Service lists a DaemonSet's pods) and what each last said about its images; a peer
//! that does not answer is `unknown` and asked again with backoff. `PeerSource` is one
//! image's view of them: a read goes to a peer holding that image's version (ready
//! copies first, the starting peer rotated to spread the load), and a peer that lacks
//! the bytes, fails or is slow passes the request on. Peer bytes are only ever landed
//! against piece digests of a verified copy (`needs_digests`), unless the spec names a
//! checksum (then unfinished copies share blocks and the whole-image check decides), and a peer whose bytes
//! failed them is avoided for a while.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::range::ByteRange;
use super::source::Identity;
use super::spec::ImageSpec;
use super::store::State;

/// How often peers are asked what they hold.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// How often `--peers-dns` is resolved again.
const RESOLVE_EVERY: Duration = Duration::from_secs(10);
/// How long a peer that sent a corrupt piece is avoided.
pub(super) const AVOID_BAD_PEER: Duration = Duration::from_secs(60);
/// The header that names the image version a request is about.
pub const VERSION_HEADER: &str = "x-bifs-version";
/// The header a daemon names itself with (so a node skips itself in DNS answers).
pub const NODE_HEADER: &str = "x-bifs-node";

/// What a peer said about one of its images.
#[derive(Debug, Clone)]
pub struct PeerImage {
    pub state: State,
    pub progress: u32,
    pub version: String,
    /// Handles are open on the peer's copy.
    pub in_use: bool,
    pub min_copies: u32,
}

/// A peer's block bitmap of an image this node fills (polled while it matters).
#[derive(Debug, Clone)]
pub(super) struct PeerBlocks {
    block_size: u64,
    bits: Vec<u8>,
    present: u64,
    /// When `present` last grew (or the peer became ready): is it making progress?
    pub(super) changed_at: Instant,
}

impl PeerBlocks {
    pub(super) fn has(&self, bytes: ByteRange) -> bool {
        if bytes.is_empty() {
            return true;
        }
        let first = bytes.start / self.block_size;
        let last = (bytes.end - 1) / self.block_size;
        (first..=last).all(|b| {
            self.bits
                .get((b / 8) as usize)
                .is_some_and(|byte| byte & (1 << (b % 8)) != 0)
        })
    }
}

/// How long an owner may go without landing a block before its share is taken over.
pub(super) const OWNER_STALL: Duration = Duration::from_secs(10);
/// The unit fills are shared in (the piece digests' size).
pub(super) const SHARE_UNIT: u64 = super::pieces::PIECE_SIZE;

/// One copy of an image on another node, as `bifs status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CopyDoc {
    pub node: String,
    /// The peer's state of the image, or `unknown` when the peer does not answer.
    pub state: String,
    pub progress: u32,
}

#[derive(Default)]
pub(super) struct PeerInner {
    /// None: never answered yet; Some(false): not answering now.
    pub(super) reachable: Option<bool>,
    pub(super) images: HashMap<String, PeerImage>,
    pub(super) failures: u32,
    pub(super) next_poll: Option<Instant>,
    pub(super) avoid_until: Option<Instant>,
    pub(super) is_self: bool,
    pub(super) node_id: Option<String>,
    pub(super) blocks: HashMap<String, PeerBlocks>,
}

pub struct Peer {
    pub url: String,
    pub(super) inner: Mutex<PeerInner>,
}

impl Peer {
    fn new(url: String) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            inner: Mutex::default(),
        }
    }

    pub(super) fn usable(&self, now: Instant) -> bool {
        let i = self.inner.lock().unwrap();
        !i.is_self && i.reachable != Some(false) && i.avoid_until.is_none_or(|t| t <= now)
    }

    pub(super) fn image(&self, name: &str) -> Option<PeerImage> {
        self.inner.lock().unwrap().images.get(name).cloned()
    }

    pub(super) fn mark_down(&self, why: &str) {
        let mut i = self.inner.lock().unwrap();
        if i.reachable != Some(false) {
            warn!(peer = %self.url, reason = why, "peer not answering; its copies are unknown until it does");
        }
        i.reachable = Some(false);
        i.failures = i.failures.saturating_add(1);
        let backoff = POLL_EVERY * 2u32.pow(i.failures.min(4));
        i.next_poll = Some(Instant::now() + backoff);
    }
}

/// What `GET /v1/images/{name}/blocks` says (the fields a peer needs).
#[derive(Deserialize)]
pub(super) struct BlocksDoc {
    pub(super) spec: ImageSpec,
    pub(super) identity: Identity,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListedImage {
    name: String,
    state: State,
    progress: u32,
    #[serde(default)]
    version: String,
    #[serde(default)]
    open_handles: u32,
    #[serde(default)]
    min_number_of_copies: u32,
}

pub struct Peers {
    /// Images this node fills: their peers' bitmaps are polled too.
    pub(super) interest: Mutex<std::collections::HashSet<String>>,
    static_urls: Vec<String>,
    dns: Option<String>,
    pub(super) node_id: String,
    pub(super) list: RwLock<Vec<Arc<Peer>>>,
    client: reqwest::Client,
    token: Option<String>,
}

impl Peers {
    /// `node_id` names this daemon (its responses carry it), so it skips itself.
    pub fn new(
        urls: Vec<String>,
        dns: Option<String>,
        token: Option<String>,
        node_id: String,
    ) -> Arc<Self> {
        let list = urls
            .iter()
            .map(|u| Arc::new(Peer::new(u.clone())))
            .collect();
        Arc::new(Self {
            interest: Mutex::default(),
            static_urls: urls,
            dns,
            node_id,
            list: RwLock::new(list),
            client: super::source::http_client(),
            token,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub(super) fn request(&self, url: String) -> reqwest::RequestBuilder {
        let req = self.client.get(url);
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Every known copy of `name` on other nodes.
    pub fn copies(&self, name: &str) -> Vec<CopyDoc> {
        self.list
            .read()
            .unwrap()
            .iter()
            .filter_map(|p| {
                let i = p.inner.lock().unwrap();
                if i.is_self {
                    return None;
                }
                match (i.reachable, i.images.get(name)) {
                    (Some(true), Some(img)) => Some(CopyDoc {
                        node: p.url.clone(),
                        state: img.state.as_str().into(),
                        progress: img.progress,
                    }),
                    (Some(true), None) => None,
                    _ => Some(CopyDoc {
                        node: p.url.clone(),
                        state: "unknown".into(),
                        progress: 0,
                    }),
                }
            })
            .collect()
    }

    /// Peers holding `version` of `name`: ready copies first, then unfinished ones,
    /// each group rotated by `turn` so load spreads over the peers.
    pub(super) fn candidates(&self, name: &str, version: &str, turn: usize) -> Vec<Arc<Peer>> {
        let now = Instant::now();
        let mut ready = Vec::new();
        let mut partial = Vec::new();
        for p in self.list.read().unwrap().iter() {
            if !p.usable(now) {
                continue;
            }
            match p.image(name) {
                Some(img) if img.version == version && img.state == State::Ready => {
                    ready.push(p.clone())
                }
                Some(img) if img.version == version && img.state != State::Failed => {
                    partial.push(p.clone())
                }
                _ => {}
            }
        }
        for group in [&mut ready, &mut partial] {
            if !group.is_empty() {
                let k = turn % group.len();
                group.rotate_left(k);
            }
        }
        ready.extend(partial);
        ready
    }

    /// Polls the peers (and re-resolves `--peers-dns`) until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut last_resolve: Option<Instant> = None;
        loop {
            if self.dns.is_some() && last_resolve.is_none_or(|t| t.elapsed() >= RESOLVE_EVERY) {
                self.resolve().await;
                last_resolve = Some(Instant::now());
            }
            let due: Vec<Arc<Peer>> = {
                let now = Instant::now();
                self.list
                    .read()
                    .unwrap()
                    .iter()
                    .filter(|p| {
                        let i = p.inner.lock().unwrap();
                        !i.is_self && i.next_poll.is_none_or(|t| t <= now)
                    })
                    .cloned()
                    .collect()
            };
            futures::future::join_all(due.iter().map(|p| self.poll(p))).await;
            tokio::select! {
                _ = tokio::time::sleep(POLL_EVERY) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// The spec of image `name` as a peer holding a copy has it (ready copies first).
    pub async fn find_spec(&self, name: &str) -> Option<ImageSpec> {
        self.poll_all().await;
        let mut holders: Vec<(bool, Arc<Peer>)> = self
            .list
            .read()
            .unwrap()
            .iter()
            .filter(|p| p.usable(Instant::now()))
            .filter_map(|p| {
                let img = p.image(name)?;
                (img.state != State::Failed).then(|| (img.state != State::Ready, p.clone()))
            })
            .collect();
        holders.sort_by_key(|(not_ready, _)| *not_ready);
        for (_, peer) in holders {
            let url = format!("{}/v1/images/{name}/blocks", peer.url);
            let Ok(resp) = self.request(url).send().await else {
                continue;
            };
            if let Ok(doc) = resp.json::<BlocksDoc>().await {
                return Some(doc.spec);
            }
        }
        None
    }

    /// Asks every peer now (a new image: learn at once who else holds it).
    pub async fn poll_all(&self) {
        let all: Vec<Arc<Peer>> = self.list.read().unwrap().clone();
        futures::future::join_all(all.iter().map(|p| self.poll(p))).await;
    }

    /// Asks the peers that never answered yet (a create right after start-up must not
    /// miss a copy the first poll has not seen).
    pub async fn poll_unknown(&self) {
        let unknown: Vec<Arc<Peer>> = self
            .list
            .read()
            .unwrap()
            .iter()
            .filter(|p| p.inner.lock().unwrap().reachable.is_none())
            .cloned()
            .collect();
        futures::future::join_all(unknown.iter().map(|p| self.poll(p))).await;
    }

    async fn resolve(&self) {
        let Some(dns) = &self.dns else { return };
        let addrs: Vec<String> = match tokio::net::lookup_host(dns.as_str()).await {
            Ok(a) => a.map(|a| format!("http://{a}")).collect(),
            Err(e) => {
                warn!(peers_dns = %dns, error = %e, "cannot resolve --peers-dns; keeping the peers known");
                return;
            }
        };
        let mut list = self.list.write().unwrap();
        let mut urls: Vec<String> = self.static_urls.clone();
        urls.extend(addrs);
        urls.sort();
        urls.dedup();
        let kept: Vec<Arc<Peer>> = list
            .iter()
            .filter(|p| urls.contains(&p.url))
            .cloned()
            .collect();
        let mut next = kept;
        for u in urls {
            if !next.iter().any(|p| p.url == u) {
                info!(peer = %u, "peer found");
                next.push(Arc::new(Peer::new(u)));
            }
        }
        *list = next;
    }

    async fn poll(&self, peer: &Peer) {
        let resp = self
            .request(format!("{}/v1/images", peer.url))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let resp = match resp {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => return peer.mark_down(&format!("HTTP {}", r.status())),
            Err(e) => return peer.mark_down(&e.to_string()),
        };
        let peer_id = resp
            .headers()
            .get(NODE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let is_self = peer_id.as_deref() == Some(self.node_id.as_str());
        let listed: Vec<ListedImage> = match resp.json().await {
            Ok(l) => l,
            Err(e) => return peer.mark_down(&format!("unreadable image list: {e}")),
        };
        let wanted: Vec<String> = {
            let mut i = peer.inner.lock().unwrap();
            if i.reachable != Some(true) && !is_self {
                info!(peer = %peer.url, images = listed.len(), "peer answering");
            }
            i.is_self = is_self;
            i.node_id = peer_id;
            i.reachable = Some(true);
            i.failures = 0;
            i.next_poll = None;
            i.images = listed
                .into_iter()
                .map(|l| {
                    let img = PeerImage {
                        state: l.state,
                        progress: l.progress,
                        version: l.version,
                        in_use: l.open_handles > 0,
                        min_copies: l.min_number_of_copies,
                    };
                    (l.name, img)
                })
                .collect();
            let interest = self.interest.lock().unwrap();
            i.images
                .iter()
                .filter(|(n, img)| interest.contains(*n) && img.state == State::InProgress)
                .map(|(n, _)| n.clone())
                .collect()
        };
        for name in wanted {
            self.poll_blocks(peer, &name).await;
        }
    }

    /// Fetches a peer's bitmap of `name` (for sharing a fill).
    async fn poll_blocks(&self, peer: &Peer, name: &str) {
        use base64::Engine;
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Doc {
            block_size: u64,
            present: u64,
            bitmap: String,
        }
        let url = format!("{}/v1/images/{name}/blocks", peer.url);
        let Ok(resp) = self
            .request(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
        else {
            return;
        };
        let Ok(doc) = resp.json::<Doc>().await else {
            return;
        };
        let Ok(bits) = base64::engine::general_purpose::STANDARD.decode(doc.bitmap) else {
            return;
        };
        let mut i = peer.inner.lock().unwrap();
        let changed_at = match i.blocks.get(name) {
            Some(old) if old.present >= doc.present => old.changed_at,
            _ => Instant::now(),
        };
        i.blocks.insert(
            name.to_string(),
            PeerBlocks {
                block_size: doc.block_size.max(1),
                bits,
                present: doc.present,
                changed_at,
            },
        );
    }

    /// Images the reachable peers hold: name -> (ready copies, minNumberOfCopies, the node
    /// ids of reachable peers that hold no copy of it).
    pub fn cluster_images(&self) -> HashMap<String, (usize, u32, Vec<String>)> {
        let now = Instant::now();
        let peers: Vec<Arc<Peer>> = self.list.read().unwrap().clone();
        let mut out: HashMap<String, (usize, u32, Vec<String>)> = HashMap::new();
        let mut answering: Vec<(String, Vec<String>)> = Vec::new();
        for p in &peers {
            if !p.usable(now) {
                continue;
            }
            let i = p.inner.lock().unwrap();
            if i.reachable != Some(true) {
                continue;
            }
            let Some(id) = i.node_id.clone() else {
                continue;
            };
            answering.push((id, i.images.keys().cloned().collect()));
            for (name, img) in &i.images {
                let e = out.entry(name.clone()).or_default();
                if img.state == State::Ready {
                    e.0 += 1;
                }
                e.1 = e.1.max(img.min_copies);
            }
        }
        for (name, e) in out.iter_mut() {
            e.2 = answering
                .iter()
                .filter(|(_, names)| !names.contains(name))
                .map(|(id, _)| id.clone())
                .collect();
        }
        out
    }

    /// The peers holding a ready copy of `version` of `name`: node id, copy in use.
    pub fn ready_elsewhere(&self, name: &str, version: &str) -> Vec<(String, bool)> {
        let now = Instant::now();
        self.list
            .read()
            .unwrap()
            .iter()
            .filter(|p| p.usable(now))
            .filter_map(|p| {
                let i = p.inner.lock().unwrap();
                let img = i.images.get(name)?;
                if img.version == version && img.state == State::Ready {
                    Some((i.node_id.clone()?, img.in_use))
                } else {
                    None
                }
            })
            .collect()
    }

    /// The nodes holding `version` of `name`, this one included (None), by node id.
    pub(super) fn holders(&self, name: &str, version: &str) -> Vec<(String, Option<Arc<Peer>>)> {
        let now = Instant::now();
        let mut out = vec![(self.node_id.clone(), None)];
        for p in self.list.read().unwrap().iter() {
            if !p.usable(now) {
                continue;
            }
            let i = p.inner.lock().unwrap();
            let holds = i
                .images
                .get(name)
                .is_some_and(|img| img.version == version && img.state != State::Failed);
            if let (true, Some(id)) = (holds, i.node_id.clone()) {
                out.push((id, Some(p.clone())));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}
