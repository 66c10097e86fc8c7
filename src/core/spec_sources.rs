//! The source parameters of uploads, exports from a volume and compressed downloads:
//! what `ImageSpec::validate` checks for them, and how a spec names its volume.
//!
//! - `upload`: `sourceParameters: {size: BYTES}`. The size is part of the spec because
//!   the image (its data file, bitmap and checksum) exists before the first byte
//!   arrives; `bifs upload` sets it from the file. Longhorn's `{}` is refused with a
//!   message saying to use `bifs upload`.
//! - `export-from-volume`: `{volume-name: NAME}` or `{path: /abs/path}`, and
//!   `export-type: raw|qcow2`. A volume name maps to `<volumes dir>/<name>`, the
//!   volumes dir being `/dev/longhorn` (where a Longhorn host has its volumes' block
//!   devices) unless `bifs mount --volumes-dir` says otherwise.
//! - `download`: optional `compression` (gzip, xz, zstd, none) and optional `size` (the
//!   decompressed size, so a compressed image need not be read twice).

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use super::decompress::{self, Detected, Hints};
use super::error::{Error, Result};

/// A spec's `sourceParameters` (this module cannot name `ImageSpec`: `spec` calls it).
pub type Params = BTreeMap<String, String>;

pub const SIZE: &str = "size";
pub const VOLUME_NAME: &str = "volume-name";
pub const PATH: &str = "path";
pub const EXPORT_TYPE: &str = "export-type";
pub const COMPRESSION: &str = "compression";

/// Where a Longhorn host has its volumes' block devices.
pub const DEFAULT_VOLUMES_DIR: &str = "/dev/longhorn";

/// What an export from a volume produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExportType {
    Raw,
    Qcow2,
}

impl ExportType {
    pub fn parse(s: &str) -> Result<ExportType> {
        match s.trim().to_ascii_lowercase().as_str() {
            "raw" => Ok(ExportType::Raw),
            "qcow2" => Ok(ExportType::Qcow2),
            other => Err(Error::BadInput(format!(
                "invalid export-type {other:?}: an export from a volume is raw or qcow2"
            ))),
        }
    }
}

fn param<'a>(spec: &'a Params, key: &str) -> Option<&'a str> {
    spec.get(key).map(|s| s.trim()).filter(|s| !s.is_empty())
}

fn parse_size(spec: &Params) -> Result<Option<u64>> {
    match param(spec, SIZE) {
        None => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            Error::BadInput(format!(
                "invalid sourceParameters.size {v:?}: give the image's size in bytes, a whole number"
            ))
        }),
    }
}

/// The size an upload spec announces.
pub fn upload_size(spec: &Params) -> Result<u64> {
    parse_size(spec)?.ok_or_else(|| {
        Error::BadInput(
            "an upload image needs sourceParameters.size (its size in bytes); \
             `bifs upload NAME FILE` creates it with the file's size"
                .into(),
        )
    })
}

/// The decompressed size a download spec gives, if any.
pub fn given_size(spec: &Params) -> Result<Option<u64>> {
    parse_size(spec)
}

pub fn validate_upload(spec: &Params) -> Result<()> {
    upload_size(spec).map(|_| ())
}

pub fn validate_export(spec: &Params) -> Result<()> {
    export_type(spec)?;
    match (param(spec, VOLUME_NAME), param(spec, PATH)) {
        (Some(_), Some(_)) => Err(Error::BadInput(
            "an export from a volume names its volume once: give sourceParameters.volume-name or path, not both".into(),
        )),
        (None, None) => Err(Error::BadInput(
            "an export from a volume needs sourceParameters.volume-name (a volume under the volumes dir, /dev/longhorn by default) or path (a volume file or block device)".into(),
        )),
        (Some(name), None) => {
            if name.contains('/') || name == "." || name == ".." {
                return Err(Error::BadInput(format!(
                    "invalid volume-name {name:?}: a volume name has no '/'; give a path instead"
                )));
            }
            Ok(())
        }
        (None, Some(path)) if !Path::new(path).is_absolute() => Err(Error::BadInput(format!(
            "invalid volume path {path:?}: give an absolute path (the daemon resolves it, not the shell)"
        ))),
        (None, Some(_)) => Ok(()),
    }
}

pub fn validate_download_extras(spec: &Params) -> Result<()> {
    parse_size(spec)?;
    compression(spec, "").map(|_| ())
}

pub fn export_type(spec: &Params) -> Result<ExportType> {
    let t = param(spec, EXPORT_TYPE).ok_or_else(|| {
        Error::BadInput(
            "an export from a volume needs sourceParameters.export-type: raw or qcow2".into(),
        )
    })?;
    ExportType::parse(t)
}

/// The volume a spec names, resolved against the volumes dir.
pub fn volume_path(spec: &Params, volumes_dir: &Path) -> Result<PathBuf> {
    validate_export(spec)?;
    Ok(match (param(spec, VOLUME_NAME), param(spec, PATH)) {
        (Some(name), _) => volumes_dir.join(name),
        (_, Some(path)) => PathBuf::from(path),
        (None, None) => unreachable!("validate_export refuses a spec without a volume"),
    })
}

/// What the parameters alone say about the compression of a download's body from
/// `url` (the `compression` parameter, then the URL's suffix); the response's headers
/// are not known when sources are built.
pub fn compression(spec: &Params, url: &str) -> Result<Detected> {
    decompress::detect(&Hints {
        parameter: param(spec, COMPRESSION),
        content_encoding: None,
        content_type: None,
        url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::spec::ImageSpec;

    #[test]
    fn export_specs_need_one_volume_and_raw_or_qcow2() {
        ImageSpec::export_from_path("e", "/v/a", "raw", "")
            .validate()
            .unwrap();
        ImageSpec::export_from_path("e", "/v/a", "qcow2", "")
            .validate()
            .unwrap();
        let e = ImageSpec::export_from_path("e", "/v/a", "vmdk", "")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("raw or qcow2"), "{e}");
        let e = ImageSpec::export_from_path("e", "rel/a", "raw", "")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("absolute"), "{e}");
        let mut s = ImageSpec::export_from_path("e", "/v/a", "raw", "");
        s.source_parameters
            .insert(VOLUME_NAME.into(), "pvc-1".into());
        assert!(s.validate().unwrap_err().to_string().contains("not both"));
        s.source_parameters.remove(PATH);
        s.validate().unwrap();
        assert_eq!(
            volume_path(&s.source_parameters, Path::new("/dev/longhorn")).unwrap(),
            PathBuf::from("/dev/longhorn/pvc-1")
        );
        s.source_parameters
            .insert(VOLUME_NAME.into(), "../x".into());
        assert!(s.validate().is_err());
    }

    #[test]
    fn uploads_need_a_size_and_downloads_take_compression_and_size() {
        ImageSpec::upload("u", 1000, "").validate().unwrap();
        let mut s = ImageSpec::upload("u", 1000, "");
        s.source_parameters.clear();
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("bifs upload"), "{e}");
        let mut d = ImageSpec::download("d", "http://h/a.raw.zst", "");
        assert_eq!(
            compression(&d.source_parameters, d.url().unwrap()).unwrap(),
            Detected::Compressed(decompress::Compression::Zstd)
        );
        d.source_parameters.insert(COMPRESSION.into(), "lz4".into());
        assert!(d.validate().is_err());
        d.source_parameters
            .insert(COMPRESSION.into(), "none".into());
        d.source_parameters.insert(SIZE.into(), "12x".into());
        assert!(d.validate().unwrap_err().to_string().contains("size"));
    }
}
