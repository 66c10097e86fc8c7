//! One image's peers as a source (`PeerSource`): a read goes to a peer holding that
//! image's version (ready copies first, the starting peer rotated to spread the load),
//! and a peer that lacks the bytes, fails or is slow passes the request on. Peer bytes
//! land only against piece digests of a verified copy (`needs_digests`), unless the spec
//! names a checksum (then unfinished copies share blocks and the whole-image check
//! decides); a peer whose bytes failed their digest is avoided for a while. It is also
//! the image's `FillPolicy`: nodes filling one image at once share the work.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tracing::{debug, warn};

use super::error::SourceError;
use super::peer::{
    BlocksDoc, Peer, Peers, AVOID_BAD_PEER, OWNER_STALL, SHARE_UNIT, VERSION_HEADER,
};
use super::range::ByteRange;
use super::source::{ByteStream, FillPolicy, Identity, Priority, Source};
use super::spec::ImageSpec;
use super::store::State;

/// One image's view of them.
pub struct PeerSource {
    name: String,
    spec: ImageSpec,
    version: String,
    peers: Arc<Peers>,
    turn: AtomicUsize,
    /// Which peer served the request that started at a byte offset (for `report_corrupt`).
    served_by: Mutex<HashMap<u64, Arc<Peer>>>,
}

impl PeerSource {
    pub fn new(spec: &ImageSpec, version: String, peers: Arc<Peers>) -> Self {
        peers.interest.lock().unwrap().insert(spec.name.clone());
        Self {
            name: spec.name.clone(),
            spec: spec.clone(),
            version,
            peers,
            turn: AtomicUsize::new(0),
            served_by: Mutex::default(),
        }
    }

    fn absent(&self, range: ByteRange) -> SourceError {
        SourceError::Absent {
            url: self.describe(),
            start: range.start,
            end: range.end,
        }
    }
}

#[async_trait]
impl Source for PeerSource {
    fn describe(&self) -> String {
        "peers".into()
    }

    fn ranges(&self) -> bool {
        true
    }

    /// Peer bytes land unchecked only when the spec names a checksum: the whole-image
    /// check then still decides. Without one, only against piece digests of a verified copy.
    fn needs_digests(&self) -> bool {
        self.spec.checksum.is_empty()
    }

    fn offers_digests(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "peer"
    }

    fn report_corrupt(&self, range: ByteRange) {
        if let Some(p) = self.served_by.lock().unwrap().remove(&range.start) {
            warn!(peer = %p.url, image = %self.name, "peer sent a corrupt piece; avoiding it for a while");
            p.inner.lock().unwrap().avoid_until = Some(Instant::now() + AVOID_BAD_PEER);
        }
    }

    async fn piece_digests(&self, _pin: &Identity) -> Option<Bytes> {
        for peer in self.peers.candidates(&self.name, &self.version, 0) {
            if peer
                .image(&self.name)
                .is_none_or(|i| i.state != State::Ready)
            {
                continue;
            }
            let url = format!("{}/v1/images/{}/manifest", peer.url, self.name);
            let resp = self
                .peers
                .request(url)
                .header(VERSION_HEADER, &self.version)
                .send()
                .await;
            match resp {
                Ok(r) if r.status().is_success() => {
                    if let Ok(b) = r.bytes().await {
                        return Some(b);
                    }
                }
                Ok(r) => debug!(peer = %peer.url, status = %r.status(), "no piece digests"),
                Err(e) => peer.mark_down(&e.to_string()),
            }
        }
        None
    }

    /// The version a ready peer holds of an image with this spec (when the origin cannot
    /// be asked, or there is none).
    async fn probe(&self) -> Result<Identity, SourceError> {
        self.peers.poll_unknown().await;
        let peers: Vec<Arc<Peer>> = self.peers.list.read().unwrap().clone();
        let now = Instant::now();
        for peer in peers {
            let ready = peer
                .image(&self.name)
                .is_some_and(|i| i.state == State::Ready);
            if !ready || !peer.usable(now) {
                continue;
            }
            let url = format!("{}/v1/images/{}/blocks", peer.url, self.name);
            let Ok(resp) = self.peers.request(url).send().await else {
                continue;
            };
            let Ok(doc) = resp.json::<BlocksDoc>().await else {
                continue;
            };
            if doc.spec.conflict_with(&self.spec.redacted()).is_none() {
                return Ok(doc.identity);
            }
        }
        Err(SourceError::Absent {
            url: self.describe(),
            start: 0,
            end: 0,
        })
    }

    async fn read(
        &self,
        range: ByteRange,
        _pin: &Identity,
        _prio: Priority,
    ) -> Result<ByteStream, SourceError> {
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        for peer in self.peers.candidates(&self.name, &self.version, turn) {
            let url = format!("{}/v1/images/{}/data", peer.url, self.name);
            let resp = self
                .peers
                .request(url)
                .header(VERSION_HEADER, &self.version)
                .header(
                    reqwest::header::RANGE,
                    format!("bytes={}-{}", range.start, range.end - 1),
                )
                .send()
                .await;
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    peer.mark_down(&e.to_string());
                    continue;
                }
            };
            if resp.status().as_u16() != 206 {
                debug!(peer = %peer.url, status = %resp.status(), ?range, "peer cannot serve");
                continue;
            }
            let mut served = self.served_by.lock().unwrap();
            if served.len() > 4096 {
                served.clear();
            }
            served.insert(range.start, peer.clone());
            drop(served);
            let url = peer.url.clone();
            return Ok(resp
                .bytes_stream()
                .map(move |r| {
                    r.map_err(|e| SourceError::Interrupted {
                        url: url.clone(),
                        reason: e.to_string(),
                    })
                })
                .boxed());
        }
        Err(self.absent(range))
    }
}

impl FillPolicy for PeerSource {
    fn first_unit(&self, units: u64) -> u64 {
        use sha2::Digest;
        let h = sha2::Sha256::digest(format!("{}/{}", self.peers.node_id, self.name));
        u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) % units.max(1)
    }

    fn unit_bytes(&self) -> Option<u64> {
        (self.peers.holders(&self.name, &self.version).len() > 1).then_some(SHARE_UNIT)
    }

    /// Unit `u` is owned by holder `u mod n` (holders sorted by node id, this node among
    /// them). Another owner's unit is left to it while it lacks the unit and is making
    /// progress; once it has the unit, or stalls, this node fetches it (peers first).
    fn defer(&self, bytes: ByteRange) -> bool {
        let holders = self.peers.holders(&self.name, &self.version);
        if holders.len() <= 1 {
            return false;
        }
        let unit = bytes.start / SHARE_UNIT;
        let (_, owner) = &holders[(unit % holders.len() as u64) as usize];
        let Some(owner) = owner else {
            return false; // this node's own share
        };
        let i = owner.inner.lock().unwrap();
        let ready = i
            .images
            .get(&self.name)
            .is_some_and(|img| img.state == State::Ready);
        match i.blocks.get(&self.name) {
            _ if ready => false,
            Some(b) => !b.has(bytes) && b.changed_at.elapsed() < OWNER_STALL,
            // Not polled yet: give the owner a moment.
            None => true,
        }
    }
}
