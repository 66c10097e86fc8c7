//! The image spec as DESIGN.md defines it (`{name, sourceType, sourceParameters, checksum}`)
//! and the validation every shell runs before anything is created.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceType {
    Download,
    Upload,
    ExportFromVolume,
}

impl SourceType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Download => "download",
            Self::Upload => "upload",
            Self::ExportFromVolume => "export-from-volume",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    pub name: String,
    pub source_type: SourceType,
    #[serde(default)]
    pub source_parameters: BTreeMap<String, String>,
    /// SHA-512 as 128 lowercase hex digits, or empty: then the computed digest is recorded.
    #[serde(default)]
    pub checksum: String,
}

impl ImageSpec {
    pub fn download(name: &str, url: &str, checksum: &str) -> Self {
        let mut p = BTreeMap::new();
        p.insert("url".to_string(), url.to_string());
        Self {
            name: name.to_string(),
            source_type: SourceType::Download,
            source_parameters: p,
            checksum: checksum.to_ascii_lowercase(),
        }
    }

    pub fn url(&self) -> Option<&str> {
        self.source_parameters.get("url").map(String::as_str)
    }

    /// Checks everything that can be checked without touching the network.
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        validate_checksum(&self.checksum)?;
        match self.source_type {
            SourceType::Download => {
                let url = self.url().ok_or_else(|| {
                    Error::BadInput("a download image needs sourceParameters.url".into())
                })?;
                validate_url(url)
            }
            SourceType::Upload | SourceType::ExportFromVolume => Err(Error::Unsupported(format!(
                "sourceType {} is not supported by this version of bifs yet; use download",
                self.source_type.as_str()
            ))),
        }
    }

    /// The first field where `self` (existing) and `other` (asked) differ.
    pub fn conflict_with(&self, other: &ImageSpec) -> Option<Error> {
        let conflict = |field, have: String, want: String| Error::Conflict {
            name: self.name.clone(),
            field,
            have,
            want,
        };
        if self.source_type != other.source_type {
            return Some(conflict(
                "sourceType",
                self.source_type.as_str().into(),
                other.source_type.as_str().into(),
            ));
        }
        if self.source_parameters != other.source_parameters {
            return Some(conflict(
                "sourceParameters",
                format!("{:?}", self.source_parameters),
                format!("{:?}", other.source_parameters),
            ));
        }
        if !other.checksum.is_empty() && self.checksum != other.checksum {
            return Some(conflict(
                "checksum",
                self.checksum.clone(),
                other.checksum.clone(),
            ));
        }
        None
    }
}

/// DNS-1123 subdomain, as Kubernetes object names.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::BadInput(format!(
            "invalid image name {name:?}: {why}; a name is a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', \
             at most 253 characters, starting and ending with a letter or digit"
        )))
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 253 {
        return bad(&format!("it has {} characters", name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'))
    {
        return bad(&format!("it contains {c:?}"));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !alnum(name.chars().next()) || !alnum(name.chars().last()) {
        return bad("it must start and end with a letter or digit");
    }
    for label in name.split('.') {
        if label.is_empty() || label.starts_with('-') || label.ends_with('-') || label.len() > 63 {
            return bad(&format!(
                "its part {label:?} between dots is not a valid label"
            ));
        }
    }
    Ok(())
}

pub fn validate_checksum(sum: &str) -> Result<()> {
    if sum.is_empty() || (sum.len() == 128 && sum.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Ok(());
    }
    Err(Error::BadInput(format!(
        "invalid checksum {:?}: a checksum is a SHA-512 digest, 128 hex digits (as `sha512sum` prints), {} given",
        if sum.len() > 40 { format!("{}...", &sum[..40]) } else { sum.to_string() },
        if sum.bytes().all(|b| b.is_ascii_hexdigit()) { format!("{} digits", sum.len()) } else { "non-hex characters".into() }
    )))
}

pub fn validate_url(url: &str) -> Result<()> {
    let parsed = reqwest::Url::parse(url).map_err(|e| {
        Error::BadInput(format!(
            "invalid URL {url:?}: {e}; give an http:// or https:// URL"
        ))
    })?;
    if parsed.scheme() != "http" && parsed.scheme() != "https" {
        return Err(Error::BadInput(format!(
            "invalid URL {url:?}: scheme {:?} is not supported; give an http:// or https:// URL",
            parsed.scheme()
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(Error::BadInput(format!(
            "invalid URL {url:?}: it names no host"
        )));
    }
    Ok(())
}

/// A URL safe to log or show: credentials stripped.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if !u.username().is_empty() || u.password().is_some() {
                let _ = u.set_username("");
                let _ = u.set_password(None);
            }
            u.to_string()
        }
        Err(_) => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_1123() {
        for ok in ["parrot", "bi-download", "a", "a.b-c.d1", &"a".repeat(63)] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            "A",
            "../x",
            "x/y",
            "-a",
            "a-",
            "a..b",
            ".a",
            &"a".repeat(300),
            "a_b",
            "é",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn checksums_are_128_hex_digits_or_empty() {
        validate_checksum("").unwrap();
        validate_checksum(&"ab".repeat(64)).unwrap();
        let e = validate_checksum("abc").unwrap_err().to_string();
        assert!(
            e.contains("128 hex digits") && e.contains("3 digits"),
            "{e}"
        );
        assert!(validate_checksum(&"zz".repeat(64)).is_err());
    }

    #[test]
    fn urls_must_be_http() {
        validate_url("http://127.0.0.1:8080/x.raw").unwrap();
        validate_url("https://example.com/x").unwrap();
        for bad in ["ftp://x/y", "file:///etc/passwd", "not a url", "/tmp/x"] {
            assert!(validate_url(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn conflict_names_the_field() {
        let a = ImageSpec::download("x", "http://h/a", "");
        let b = ImageSpec::download("x", "http://h/b", "");
        let e = a.conflict_with(&b).unwrap().to_string();
        assert!(e.contains("sourceParameters"), "{e}");
        assert!(a.conflict_with(&a.clone()).is_none());
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(redact_url("http://u:p@h/x"), "http://h/x");
    }
}
