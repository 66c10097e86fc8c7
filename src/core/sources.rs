//! Which sources an image gets (`SourceFactory`, `sources_with`): peers first when there
//! are any, then the origin of its spec; and the sources beyond a plain download:
//! an upload (`UploadSource`), an export from a volume (`VolumeSource`, shared per
//! volume so its qcow2 layout is built once) and a compressed download
//! (`CompressedSource`). Kept here so the factory's match stays a few lines per type.

use std::path::PathBuf;
use std::sync::Arc;

use super::error::{Error, Result, SourceError};
use super::peer::Peers;
use super::peer_source::PeerSource;
use super::source::{FillPolicy, HttpClients, HttpSource, Identity, Sources};

use super::compressed::CompressedSource;
use super::decompress::Detected;
use super::source::{http_client, Source};
use super::spec::{ImageSpec, SourceType};
use super::spec_sources::{self, export_type, upload_size, volume_path};
use super::upload::UploadSource;
use super::volume_source::VolumeSources;

/// Builds the sources of an image from its stored spec (the identity tells whether the
/// origin served ranges when it was probed).
pub type SourceFactory = Arc<dyn Fn(&ImageSpec, &Identity) -> Sources + Send + Sync>;

/// The sources this build can fetch from for `spec`: other nodes first (when there are
/// peers), then the URL of a download. Images without a URL come from peers only; with
/// no peer either, they have no source and say why, and still serve what they have.
pub fn http_sources(clients: HttpClients, peers: Option<Arc<Peers>>) -> SourceFactory {
    let volumes = PathBuf::from(super::spec_sources::DEFAULT_VOLUMES_DIR);
    let secrets = PathBuf::from(super::credentials::DEFAULT_SECRETS_DIR);
    sources_with(clients, peers, volumes, secrets)
}

/// As `http_sources`, with the directory a spec's `volume-name` is looked up in.
/// Uploads, volume exports and compressed downloads: see `source_for` (sources.rs).
pub fn sources_with(
    clients: HttpClients,
    peers: Option<Arc<Peers>>,
    volumes_dir: PathBuf,
    secrets_dir: PathBuf,
) -> SourceFactory {
    let more = Arc::new(super::sources::MoreSources::new(volumes_dir));
    Arc::new(move |spec: &ImageSpec, id: &Identity| {
        let mut list: Vec<Arc<dyn Source>> = Vec::new();
        let mut fill_policy: Option<Arc<dyn FillPolicy>> = None;
        let mut when_absent = None;
        if let Some(p) = &peers {
            let version = id.version_tag(spec);
            let peer = Arc::new(PeerSource::new(spec, version, p.clone()));
            fill_policy = Some(peer.clone());
            list.push(peer);
        }
        match (spec.source_type, spec.url()) {
            (SourceType::Download, Some(url)) if more.is_compressed(spec) => {
                list.push(more.compressed(spec, url, id.size));
            }
            (SourceType::Download, Some(url)) => {
                // Credentials: the URL's user:pass@ (HttpSource::new) and the spec's secretRef.
                let creds = match super::credentials::of_secret_ref(
                    &spec.source_parameters,
                    &secrets_dir,
                ) {
                    Ok(c) => c,
                    Err(why) => return Sources::none(why),
                };
                let origin =
                    HttpSource::new(url, clients.clone(), id.ranges).with_credentials(creds);
                list.push(Arc::new(origin));
            }
            (SourceType::Upload | SourceType::ExportFromVolume, _) => match more.source_for(spec) {
                Ok(s) => {
                    if spec.source_type == SourceType::Upload && !list.is_empty() {
                        when_absent = Some(
                            "no reachable node holds them and no upload to this node is in \
                             progress: the image cannot be recovered until a node with a copy \
                             is back or the file is uploaded again"
                                .to_string(),
                        );
                    }
                    list.push(s)
                }
                Err(why) if list.is_empty() => return Sources::none(why),
                // Another node's volume or upload: peers only.
                Err(why) => when_absent = Some(why),
            },
            _ if !list.is_empty() => {
                when_absent = Some(
                    "no reachable node holds them and the image has no URL: it cannot be \
                     recovered until a node with a copy is back"
                        .to_string(),
                );
            }
            (SourceType::Download, None) => {
                return Sources::none("its spec names no URL to fetch the rest from")
            }
        }
        Sources {
            list,
            unavailable: None,
            fill_policy,
            when_absent,
        }
    })
}

/// Asks the origin (the last source) for the image's size and version; when it cannot
/// be reached (or there is none), a ready copy on another node answers instead.
pub async fn probe(sources: &Sources) -> Result<Identity> {
    // A busy or briefly unreachable origin (503, 429, refused) is asked again a few times
    // (0.5 + 1 + 2 s) before the create gives up; anything else answers at once.
    let mut pause = std::time::Duration::from_millis(500);
    for round in 0..4 {
        let mut first_err = None;
        for s in sources.list.iter().rev() {
            match s.probe().await {
                Ok(id) => return Ok(id),
                Err(e) if first_err.is_none() => first_err = Some(e),
                Err(_) => {}
            }
            if !first_err.as_ref().is_some_and(SourceError::is_retryable) {
                break;
            }
        }
        match first_err {
            Some(e) if e.is_retryable() && round < 3 => {
                tracing::warn!(error = %e, "source busy or unreachable at create; asking again");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            Some(e) => return Err(Error::Source(e)),
            None => break,
        }
    }
    Err(Error::Unsupported(
        "the image has no source to create it from".into(),
    ))
}

pub struct MoreSources {
    volumes: VolumeSources,
    client: reqwest::Client,
}

impl MoreSources {
    pub fn new(volumes_dir: PathBuf) -> Self {
        Self {
            volumes: VolumeSources::new(volumes_dir),
            client: http_client(),
        }
    }

    /// Whether a download's body is compressed, as far as its spec tells (the
    /// `compression` parameter, then the URL's suffix).
    pub fn is_compressed(&self, spec: &ImageSpec) -> bool {
        let url = spec.url().unwrap_or_default();
        matches!(
            spec_sources::compression(&spec.source_parameters, url),
            Ok(Detected::Compressed(_))
        )
    }

    /// `pinned`: the size the image was created with (0 before its first probe), so that
    /// a restart's check of the source does not read the whole body again.
    pub fn compressed(&self, spec: &ImageSpec, url: &str, pinned: u64) -> Arc<dyn Source> {
        let codec = match spec_sources::compression(&spec.source_parameters, url) {
            Ok(Detected::Compressed(c)) => c,
            _ => unreachable!("is_compressed said so"),
        };
        let size = spec_sources::given_size(&spec.source_parameters)
            .ok()
            .flatten()
            .or((pinned > 0).then_some(pinned));
        Arc::new(CompressedSource::new(url, codec, size, self.client.clone()))
    }

    /// The source of an upload or an export; Err: why this node has none.
    pub fn source_for(&self, spec: &ImageSpec) -> Result<Arc<dyn Source>, String> {
        match spec.source_type {
            SourceType::Upload => {
                let size = upload_size(&spec.source_parameters).map_err(|e| e.to_string())?;
                Ok(Arc::new(UploadSource::new(&spec.name, size)))
            }
            SourceType::ExportFromVolume => {
                let path = volume_path(&spec.source_parameters, self.volumes.volumes_dir())
                    .map_err(|e| e.to_string())?;
                let export = export_type(&spec.source_parameters).map_err(|e| e.to_string())?;
                if std::fs::symlink_metadata(&path).is_err() {
                    return Err(format!(
                        "volume {} does not exist on this node; give the path of a volume file or \
                         block device (on other nodes an exported image comes from peers only)",
                        path.display()
                    ));
                }
                Ok(self.volumes.get(path, export))
            }
            SourceType::Download => Err("a download is built by the factory itself".into()),
        }
    }
}
