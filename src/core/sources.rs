//! The sources beyond a plain download that `node::sources_with` builds from a spec:
//! an upload (`UploadSource`), an export from a volume (`VolumeSource`, shared per
//! volume so its qcow2 layout is built once) and a compressed download
//! (`CompressedSource`). Kept here so the factory's match stays a few lines per type.

use std::path::PathBuf;
use std::sync::Arc;

use super::compressed::CompressedSource;
use super::decompress::Detected;
use super::source::{http_client, Source};
use super::spec::{ImageSpec, SourceType};
use super::spec_sources::{self, export_type, upload_size, volume_path};
use super::upload::UploadSource;
use super::volume_source::VolumeSources;

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
