//! Longhorn's ways of describing a backing image, read as its documentation writes them:
//! `kind: BackingImage` documents (`longhorn.io/v1beta1` or `v1beta2`, several per file
//! separated by `---`) and StorageClass parameters (`backingImage`,
//! `backingImageDataSourceType`, `backingImageDataSourceParameters` as a JSON string,
//! `backingImageChecksum`), given as `KEY=VALUE`s or inside a `kind: StorageClass` document.
//!
//! Pure: text in, `ImageSpec`s out; the CLI and the `--manifests` watcher do the I/O.
//! Every error names the field (`spec.sourceType`, `parameters.backingImageDataSourceParameters`)
//! and, in YAML, its line, so a person can fix the file without guessing.
//! YAML is read by `core::yaml` into a tree that keeps lines and bounds alias expansion.

use std::collections::BTreeMap;
use std::rc::Rc;

use super::yaml::{bad, entries, join, load, only, required, tags, text, Node};
pub use super::yaml::{MAX_DEPTH, MAX_INPUT_BYTES, MAX_NODES};

use super::error::{Error, Result};
use super::spec::{validate_checksum, validate_name, validate_url, ImageSpec, SourceType};

/// What a document or a StorageClass asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    /// Create the image when it is missing; when present, it must match.
    Create(ImageSpec),
    /// A StorageClass that names only `backingImage`: the image must exist (with this
    /// checksum, when one is given); nothing is created.
    Use { name: String, checksum: String },
}

impl Wanted {
    pub fn name(&self) -> &str {
        match self {
            Self::Create(spec) => &spec.name,
            Self::Use { name, .. } => name,
        }
    }
}

/// One document of a manifest file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The line its document starts on (1-based).
    pub line: usize,
    /// `BackingImage` or `StorageClass`.
    pub kind: &'static str,
    pub wanted: Wanted,
}

/// Parses every document of a manifest file. Nothing is returned unless all are valid,
/// so a file with one bad document applies nothing.
pub fn parse(text: &str) -> Result<Vec<Document>> {
    if text.len() > MAX_INPUT_BYTES {
        return Err(Error::BadInput(format!(
            "the manifest is {} bytes; bifs reads at most {MAX_INPUT_BYTES} bytes per file: split it",
            text.len()
        )));
    }
    load(text)?.iter().map(document).collect()
}

/// Reads StorageClass parameters given as `KEY=VALUE` (as `bifs ensure` takes them).
/// Parameters that do not start with `backingImage` belong to Longhorn's volumes
/// (`numberOfReplicas`, ...) and are ignored.
pub fn from_parameters(pairs: &[String]) -> Result<Wanted> {
    let mut params = Vec::new();
    for pair in pairs {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(Error::BadInput(format!(
                "{pair:?} is not KEY=VALUE; give StorageClass parameters such as backingImage=bi-download"
            )));
        };
        params.push((k.trim().to_string(), v.to_string(), None));
    }
    storage_class(&params)
}

const BACKING_IMAGE_API: [&str; 2] = ["longhorn.io/v1beta1", "longhorn.io/v1beta2"];
const TOP_FIELDS: [&str; 5] = ["apiVersion", "kind", "metadata", "spec", "status"];
const META_FIELDS: [&str; 14] = [
    "name",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "finalizers",
    "managedFields",
    "ownerReferences",
    "generateName",
];
const SPEC_FIELDS: [&str; 6] = [
    "sourceType",
    "sourceParameters",
    "checksum",
    "minNumberOfCopies",
    "nodeSelector",
    "diskSelector",
];
const STORAGE_CLASS_FIELDS: [&str; 10] = [
    "apiVersion",
    "kind",
    "metadata",
    "provisioner",
    "parameters",
    "allowVolumeExpansion",
    "reclaimPolicy",
    "volumeBindingMode",
    "mountOptions",
    "allowedTopologies",
];

fn document(root: &Rc<Node>) -> Result<Document> {
    let top = entries(root, "")?;
    let (kind_line, kind) = required(&top, "", "kind", root.line)?;
    let (api_line, api) = required(&top, "", "apiVersion", root.line)?;
    let (kind, wanted) = match kind.as_str() {
        "BackingImage" => {
            if !BACKING_IMAGE_API.contains(&api.as_str()) {
                return Err(bad(
                    api_line,
                    "apiVersion",
                    format!("{api:?} is not a BackingImage version bifs reads; use longhorn.io/v1beta2 (or v1beta1)"),
                ));
            }
            ("BackingImage", backing_image(root, &top)?)
        }
        "StorageClass" => {
            if !api.starts_with("storage.k8s.io/") {
                return Err(bad(
                    api_line,
                    "apiVersion",
                    format!("{api:?}: a StorageClass is storage.k8s.io/v1"),
                ));
            }
            only(&top, "", &STORAGE_CLASS_FIELDS, "a StorageClass")?;
            let Some((_, params)) = top.get("parameters") else {
                return Err(bad(root.line, "parameters", "is missing; a StorageClass for bifs names backingImage"));
            };
            let mut list = Vec::new();
            for (k, (kl, v)) in entries(params, "parameters")? {
                let field = join("parameters", &k);
                list.push((k, text(v, &field)?.unwrap_or_default(), Some(kl)));
            }
            list.sort_by_key(|p| p.2);
            ("StorageClass", storage_class(&list)?)
        }
        other => {
            return Err(bad(
                kind_line,
                "kind",
                format!("{other:?} is not a kind bifs applies; use BackingImage (apiVersion longhorn.io/v1beta2 or v1beta1) or StorageClass"),
            ))
        }
    };
    Ok(Document {
        line: root.line,
        kind,
        wanted,
    })
}

fn backing_image(root: &Node, top: &BTreeMap<String, (usize, &Node)>) -> Result<Wanted> {
    only(top, "", &TOP_FIELDS, "a BackingImage")?;
    let Some((_, meta)) = top.get("metadata") else {
        return Err(bad(root.line, "metadata.name", "is missing"));
    };
    let meta = entries(meta, "metadata")?;
    only(&meta, "metadata", &META_FIELDS, "metadata")?;
    let (name_line, name) = required(&meta, "metadata", "name", root.line)?;
    validate_name(&name).map_err(|e| bad(name_line, "metadata.name", e))?;
    let Some((spec_line, spec)) = top.get("spec") else {
        return Err(bad(
            root.line,
            "spec",
            "is missing; give spec.sourceType and spec.sourceParameters",
        ));
    };
    let spec = entries(spec, "spec")?;
    only(&spec, "spec", &SPEC_FIELDS, "spec")?;
    let (type_line, source_type) = required(&spec, "spec", "sourceType", *spec_line)?;
    let source_type = source_type_of(&source_type).ok_or_else(|| {
        bad(
            type_line,
            "spec.sourceType",
            unknown_source_type(&source_type),
        )
    })?;
    let mut source_parameters = BTreeMap::new();
    let mut params_line = type_line;
    if let Some((line, params)) = spec.get("sourceParameters") {
        params_line = *line;
        if !params.is_null() {
            for (k, (kl, v)) in entries(params, "spec.sourceParameters")? {
                let field = join("spec.sourceParameters", &k);
                let v = text(v, &field)?.unwrap_or_default();
                source_parameters.insert(k, (v, Some(kl)));
            }
        }
    }
    let source_parameters = check_source(source_type, source_parameters).map_err(|p| {
        bad(
            p.line.unwrap_or(params_line),
            &join("spec.sourceParameters", &p.key),
            p.msg,
        )
    })?;
    let mut checksum = String::new();
    if let Some((line, v)) = spec.get("checksum") {
        checksum = text(v, "spec.checksum")?
            .unwrap_or_default()
            .to_ascii_lowercase();
        validate_checksum(&checksum).map_err(|e| bad(*line, "spec.checksum", e))?;
    }
    let mut min_number_of_copies = 0;
    if let Some((line, v)) = spec.get("minNumberOfCopies") {
        if let Some(n) = text(v, "spec.minNumberOfCopies")? {
            min_number_of_copies = n.parse().map_err(|_| {
                bad(
                    *line,
                    "spec.minNumberOfCopies",
                    format!("{n:?} is not a whole number"),
                )
            })?;
        }
    }
    let selector = |key: &str| match spec.get(key) {
        Some((_, v)) => tags(v, &join("spec", key)),
        None => Ok(Vec::new()),
    };
    Ok(Wanted::Create(ImageSpec {
        name,
        source_type,
        source_parameters,
        checksum,
        min_number_of_copies,
        node_selector: selector("nodeSelector")?,
        disk_selector: selector("diskSelector")?,
    }))
}

fn source_type_of(s: &str) -> Option<SourceType> {
    match s {
        "download" => Some(SourceType::Download),
        "upload" => Some(SourceType::Upload),
        "export-from-volume" => Some(SourceType::ExportFromVolume),
        _ => None,
    }
}

fn unknown_source_type(s: &str) -> String {
    format!("{s:?} is not a source type; use download, upload or export-from-volume")
}

/// A source parameter that is wrong: its key, its own line (YAML only) and why.
struct SourceProblem {
    key: String,
    line: Option<usize>,
    msg: String,
}

/// Checks the parameters a source type needs (`url` for download; `volume-name` or
/// `path` and `export-type` for export-from-volume; none for upload). Each parameter
/// carries its line when it comes from YAML.
fn check_source(
    source_type: SourceType,
    params: BTreeMap<String, (String, Option<usize>)>,
) -> Result<BTreeMap<String, String>, SourceProblem> {
    let err = |key: &str, line: Option<usize>, msg: String| SourceProblem {
        key: key.to_string(),
        line,
        msg,
    };
    let known: &[&str] = match source_type {
        SourceType::Download => &["url", "compression", "size", "secretRef"],
        SourceType::Upload => &["size"],
        SourceType::ExportFromVolume => &["volume-name", "path", "export-type"],
    };
    for (k, (_, at)) in &params {
        if !known.contains(&k.as_str()) {
            return Err(err(
                k,
                *at,
                format!(
                    "unknown parameter for sourceType {}; it takes {}",
                    source_type.as_str(),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
    }
    match source_type {
        SourceType::Download => match params.get("url") {
            Some((url, at)) if !url.is_empty() => {
                validate_url(url).map_err(|e| err("url", *at, e.to_string()))?
            }
            Some((_, at)) => {
                return Err(err(
                    "url",
                    *at,
                    "is empty; a download image needs the URL of its file".into(),
                ))
            }
            None => {
                return Err(err(
                    "url",
                    None,
                    "is missing; a download image needs the URL of its file".into(),
                ))
            }
        },
        SourceType::ExportFromVolume => {
            if !params.contains_key("volume-name") && !params.contains_key("path") {
                return Err(err(
                    "volume-name",
                    None,
                    "is missing; export-from-volume needs volume-name (or path)".into(),
                ));
            }
            match params.get("export-type") {
                Some((t, _)) if t == "raw" || t == "qcow2" => {}
                Some((t, at)) => {
                    return Err(err(
                        "export-type",
                        *at,
                        format!("{t:?} is not an export type; use raw or qcow2"),
                    ))
                }
                None => {
                    return Err(err(
                        "export-type",
                        None,
                        "is missing; use raw or qcow2".into(),
                    ))
                }
            }
        }
        SourceType::Upload => {}
    }
    Ok(params.into_iter().map(|(k, (v, _))| (k, v)).collect())
}

const SC_IMAGE: &str = "backingImage";
const SC_TYPE: &str = "backingImageDataSourceType";
const SC_PARAMS: &str = "backingImageDataSourceParameters";
const SC_CHECKSUM: &str = "backingImageChecksum";

/// StorageClass parameters (key, value, line in a YAML file if any) to what they ask for.
fn storage_class(params: &[(String, String, Option<usize>)]) -> Result<Wanted> {
    let field = |key: &str, line: Option<usize>| match line {
        Some(_) => format!("parameters.{key}"),
        None => key.to_string(),
    };
    let err = |key: &str, line: Option<usize>, msg: String| match line {
        Some(l) => bad(l, &field(key, line), msg),
        None => Error::BadInput(format!("{key}: {msg}")),
    };
    let mut got: BTreeMap<&str, (&str, Option<usize>)> = BTreeMap::new();
    for (k, v, line) in params {
        if k.starts_with("backingImage") {
            if ![SC_IMAGE, SC_TYPE, SC_PARAMS, SC_CHECKSUM].contains(&k.as_str()) {
                return Err(err(
                    k,
                    *line,
                    format!("unknown backing image parameter; use {SC_IMAGE}, {SC_TYPE}, {SC_PARAMS}, {SC_CHECKSUM}"),
                ));
            }
            if got.insert(k, (v, *line)).is_some() {
                return Err(err(k, *line, "given twice".into()));
            }
        }
    }
    let Some(&(name, name_line)) = got.get(SC_IMAGE).filter(|(v, _)| !v.is_empty()) else {
        let line = params.first().and_then(|p| p.2);
        return Err(err(
            SC_IMAGE,
            line,
            "is missing; it names the backing image".into(),
        ));
    };
    validate_name(name).map_err(|e| err(SC_IMAGE, name_line, e.to_string()))?;
    let checksum = match got.get(SC_CHECKSUM) {
        Some((sum, line)) => {
            let sum = sum.trim().to_ascii_lowercase();
            validate_checksum(&sum).map_err(|e| err(SC_CHECKSUM, *line, e.to_string()))?;
            sum
        }
        None => String::new(),
    };
    let Some(&(kind, kind_line)) = got.get(SC_TYPE).filter(|(v, _)| !v.is_empty()) else {
        if let Some((_, line)) = got.get(SC_PARAMS) {
            return Err(err(
                SC_TYPE,
                *line,
                format!("is missing; {SC_PARAMS} needs it"),
            ));
        }
        return Ok(Wanted::Use {
            name: name.to_string(),
            checksum,
        });
    };
    let source_type =
        source_type_of(kind).ok_or_else(|| err(SC_TYPE, kind_line, unknown_source_type(kind)))?;
    let (json, json_line) = got.get(SC_PARAMS).copied().unwrap_or(("{}", kind_line));
    let parsed: serde_json::Value = serde_json::from_str(json).map_err(|e| {
        err(
            SC_PARAMS,
            json_line,
            format!(
                "not JSON ({e}); give a JSON object in single quotes, such as '{{\"url\": \"https://host/image.raw\"}}'"
            ),
        )
    })?;
    let serde_json::Value::Object(obj) = parsed else {
        return Err(err(
            SC_PARAMS,
            json_line,
            "must be a JSON object, such as '{\"url\": \"https://host/image.raw\"}'".into(),
        ));
    };
    let mut source = BTreeMap::new();
    for (k, v) in obj {
        let serde_json::Value::String(v) = v else {
            return Err(err(
                SC_PARAMS,
                json_line,
                format!("the value of {k:?} must be a JSON string"),
            ));
        };
        source.insert(k, (v, None));
    }
    // Name the parameter the user wrote, then the key inside its JSON.
    let source_parameters = check_source(source_type, source).map_err(|p| {
        let sep = if p.msg.starts_with("is ") { " " } else { ": " };
        err(SC_PARAMS, json_line, format!("{}{sep}{}", p.key, p.msg))
    })?;
    Ok(Wanted::Create(ImageSpec {
        name: name.to_string(),
        source_type,
        source_parameters,
        checksum,
        min_number_of_copies: 0,
        node_selector: Vec::new(),
        disk_selector: Vec::new(),
    }))
}

#[cfg(test)]
#[path = "manifest_tests.rs"]
mod tests;
