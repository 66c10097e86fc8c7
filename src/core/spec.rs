//! The image spec as DESIGN.md defines it (`{name, sourceType, sourceParameters, checksum}`,
//! plus Longhorn's newer `minNumberOfCopies`, `nodeSelector`, `diskSelector`) and the
//! validation every shell runs before anything is created.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::{Error, FieldDiff, Result};

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
    /// SHA-512 as 128 lowercase hex digits, `sha256:` and 64 hex digits, or empty: then
    /// the computed digest is recorded.
    #[serde(default)]
    pub checksum: String,
    /// Longhorn's `minNumberOfCopies`; 0 when not given. Stored and shown (acted on by the
    /// lifecycle work). Skipped when empty so spec.json files and API bodies of older
    /// versions read and compare the same.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_number_of_copies: u32,
    /// Longhorn's node tags (`spec.nodeSelector`), sorted and without duplicates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selector: Vec<String>,
    /// Longhorn's disk tags (`spec.diskSelector`), sorted and without duplicates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_selector: Vec<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The digest a checksum names: Longhorn's SHA-512, or `sha256:<hex>` (Longhorn #10715).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumAlgorithm {
    Sha512,
    Sha256,
}

impl ChecksumAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sha512 => "sha512",
            Self::Sha256 => "sha256",
        }
    }

    /// Splits a valid checksum into its algorithm and its hex digits (a `sha256:` or
    /// `sha512:` prefix removed).
    pub fn split(sum: &str) -> (Self, &str) {
        match sum.strip_prefix("sha256:") {
            Some(hex) => (Self::Sha256, hex),
            None => (Self::Sha512, sum.strip_prefix("sha512:").unwrap_or(sum)),
        }
    }
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
            min_number_of_copies: 0,
            node_selector: Vec::new(),
            disk_selector: Vec::new(),
        }
    }

    /// The algorithm of `checksum` (SHA-512 when the checksum is empty: that is what
    /// is computed and recorded then).
    pub fn checksum_algorithm(&self) -> ChecksumAlgorithm {
        ChecksumAlgorithm::split(&self.checksum).0
    }

    /// The hex digits of `checksum`, without an algorithm prefix.
    pub fn checksum_hex(&self) -> &str {
        ChecksumAlgorithm::split(&self.checksum).1
    }

    /// The spec as others may see it: a URL's `user:pass@` removed (peers compare specs
    /// in this form; credentials stay on the node that has them).
    pub fn redacted(&self) -> ImageSpec {
        let mut s = self.clone();
        if let Some(u) = s.source_parameters.get_mut("url") {
            *u = redact_url(u);
        }
        s
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
            SourceType::Upload => super::spec_sources::validate_upload(&self.source_parameters),
            SourceType::ExportFromVolume => {
                super::spec_sources::validate_export(&self.source_parameters)
            }
        }?;
        if self.source_type == SourceType::Download {
            super::spec_sources::validate_download_extras(&self.source_parameters)?;
        }
        Ok(())
    }

    /// Every field where `self` (existing) and `other` (asked) differ, with both values,
    /// as one error; None when `other` asks for what exists. Fields `other` leaves empty
    /// (checksum, minNumberOfCopies, selectors) ask for nothing and match any value, as a
    /// StorageClass that names no checksum uses any existing image of that name.
    pub fn conflict_with(&self, other: &ImageSpec) -> Option<Error> {
        let mut diffs = Vec::new();
        let mut differ =
            |field: String, have: String, want: String| diffs.push(FieldDiff { field, have, want });
        if self.source_type != other.source_type {
            differ(
                "sourceType".into(),
                self.source_type.as_str().into(),
                other.source_type.as_str().into(),
            );
        }
        let keys: std::collections::BTreeSet<&String> = self
            .source_parameters
            .keys()
            .chain(other.source_parameters.keys())
            .collect();
        for key in keys {
            let (have, want) = (
                self.source_parameters.get(key),
                other.source_parameters.get(key),
            );
            if have != want {
                // URLs may carry credentials: never echo them.
                let show = |v: Option<&String>| v.map_or_else(String::new, |v| redact_url(v));
                differ(format!("sourceParameters.{key}"), show(have), show(want));
            }
        }
        if !other.checksum.is_empty() && self.checksum != other.checksum {
            differ(
                "checksum".into(),
                self.checksum.clone(),
                other.checksum.clone(),
            );
        }
        if other.min_number_of_copies != 0
            && self.min_number_of_copies != other.min_number_of_copies
        {
            let show = |n: u32| if n == 0 { String::new() } else { n.to_string() };
            differ(
                "minNumberOfCopies".into(),
                show(self.min_number_of_copies),
                show(other.min_number_of_copies),
            );
        }
        for (field, have, want) in [
            ("nodeSelector", &self.node_selector, &other.node_selector),
            ("diskSelector", &self.disk_selector, &other.disk_selector),
        ] {
            if !want.is_empty() && have != want {
                differ(field.into(), have.join(", "), want.join(", "));
            }
        }
        (!diffs.is_empty()).then(|| Error::SpecDiffers {
            name: self.name.clone(),
            diffs,
        })
    }
}

impl ImageSpec {
    /// An image exported from the volume at `path`, as `export` (raw or qcow2).
    pub fn export_from_path(name: &str, path: &str, export: &str, checksum: &str) -> Self {
        let mut s = ImageSpec::download(name, "", checksum);
        s.source_type = SourceType::ExportFromVolume;
        s.source_parameters.clear();
        s.source_parameters
            .insert(super::spec_sources::PATH.into(), path.into());
        s.source_parameters
            .insert(super::spec_sources::EXPORT_TYPE.into(), export.into());
        s
    }

    /// An image filled by `bifs upload`, of `size` bytes.
    pub fn upload(name: &str, size: u64, checksum: &str) -> Self {
        let mut s = ImageSpec::download(name, "", checksum);
        s.source_type = SourceType::Upload;
        s.source_parameters.clear();
        s.source_parameters
            .insert(super::spec_sources::SIZE.into(), size.to_string());
        s
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
        if label.len() > 63 {
            return bad(&format!(
                "its part {}... between dots has {} characters, more than the 63 a DNS label may have",
                &label[..20],
                label.len()
            ));
        }
        if label.is_empty() || label.starts_with('-') || label.ends_with('-') {
            return bad(&format!(
                "its part {label:?} between dots is not a valid label"
            ));
        }
    }
    Ok(())
}

/// A checksum is empty, 128 hex digits (SHA-512, as Longhorn), or `sha256:` and 64 hex digits.
pub fn validate_checksum(sum: &str) -> Result<()> {
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    let shown = || {
        if sum.len() > 40 {
            format!("{}...", sum.get(..40).unwrap_or(sum))
        } else {
            sum.to_string()
        }
    };
    if let Some(digits) = sum
        .strip_prefix("sha256:")
        .or_else(|| sum.strip_prefix("SHA256:"))
    {
        if digits.len() == 64 && hex(digits) {
            return Ok(());
        }
        return Err(Error::BadInput(format!(
            "invalid checksum {:?}: a sha256: checksum is `sha256:` and 64 hex digits (as `sha256sum` prints), {} given",
            shown(),
            if hex(digits) { format!("{} digits", digits.len()) } else { "non-hex characters".into() }
        )));
    }
    let digits = sum
        .strip_prefix("sha512:")
        .or_else(|| sum.strip_prefix("SHA512:"))
        .unwrap_or(sum);
    if sum.is_empty() || (digits.len() == 128 && hex(digits)) {
        return Ok(());
    }
    Err(Error::BadInput(format!(
        "invalid checksum {:?}: a checksum is a SHA-512 digest, 128 hex digits (as `sha512sum` prints), \
         or `sha256:` and 64 hex digits; {} given",
        shown(),
        if hex(digits) { format!("{} digits", digits.len()) } else { "non-hex characters".into() }
    )))
}

pub fn validate_url(url: &str) -> Result<()> {
    // A URL never holds a backslash; one left over is an escape from StorageClass JSON
    // (`https:\/\/...` or a doubled `\\`). The URL parser would read it as '/', so catch it first.
    if let Some(at) = url.find('\\') {
        return Err(Error::BadInput(format!(
            "invalid URL '{}': it holds a backslash at character {}, left over from escaping; \
             remove every '\\' from the URL (in a StorageClass write the parameters in single quotes, \
             '{{\"url\": \"https://host/path\"}}', with no escapes)",
            strip_userinfo(url),
            url[..at].chars().count() + 1
        )));
    }
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

/// `url` as written (not normalised by a parser), with any `user:pass@` cut out.
fn strip_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '\\', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}{}", &url[..scheme_end], &rest[at + 1..]),
        None => url.to_string(),
    }
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
    fn a_long_label_says_so_and_253_characters_pass() {
        let e = validate_name(&"a".repeat(64)).unwrap_err().to_string();
        assert!(e.contains("64 characters") && e.contains("63"), "{e}");
        let longest = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(61));
        assert_eq!(longest.len(), 253);
        validate_name(&longest).unwrap();
    }

    #[test]
    fn checksums_are_sha512_hex_sha256_prefixed_or_empty() {
        validate_checksum("").unwrap();
        validate_checksum(&"ab".repeat(64)).unwrap();
        validate_checksum(&format!("sha256:{}", "cd".repeat(32))).unwrap();
        validate_checksum(&format!("sha512:{}", "ab".repeat(64))).unwrap();
        let e = validate_checksum("abc").unwrap_err().to_string();
        assert!(
            e.contains("128 hex digits") && e.contains("3 digits"),
            "{e}"
        );
        assert!(validate_checksum(&"zz".repeat(64)).is_err());
        let e = validate_checksum(&format!("sha256:{}", "cd".repeat(64)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("64 hex digits") && e.contains("128 digits"),
            "{e}"
        );
        assert!(validate_checksum(&format!("md5:{}", "cd".repeat(16))).is_err());
    }

    #[test]
    fn checksum_algorithm_follows_the_prefix() {
        let mut s = ImageSpec::download("x", "http://h/a", &"ab".repeat(64));
        assert_eq!(s.checksum_algorithm(), ChecksumAlgorithm::Sha512);
        assert_eq!(s.checksum_hex(), "ab".repeat(64));
        s.checksum = format!("sha256:{}", "cd".repeat(32));
        assert_eq!(s.checksum_algorithm(), ChecksumAlgorithm::Sha256);
        assert_eq!(s.checksum_hex(), "cd".repeat(32));
        assert_eq!(s.checksum_algorithm().as_str(), "sha256");
        s.checksum = format!("sha512:{}", "ab".repeat(64));
        assert_eq!(s.checksum_algorithm(), ChecksumAlgorithm::Sha512);
        assert_eq!(s.checksum_hex(), "ab".repeat(64));
    }

    #[test]
    fn a_stray_backslash_in_a_url_says_what_to_fix() {
        for bad in [
            r"https:\/\/h/x.raw",
            r"http://h/a\b",
            r"http://u:secret@h\x",
        ] {
            let e = validate_url(bad).unwrap_err().to_string();
            assert!(e.contains("backslash") && e.contains("remove every"), "{e}");
            assert!(!e.contains("secret"), "credentials shown: {e}");
        }
    }

    #[test]
    fn specs_without_the_new_fields_read_and_write_as_before() {
        let old = r#"{"name":"x","sourceType":"download","sourceParameters":{"url":"http://h/a"},"checksum":""}"#;
        let s: ImageSpec = serde_json::from_str(old).unwrap();
        assert_eq!(s, ImageSpec::download("x", "http://h/a", ""));
        assert_eq!(serde_json::to_string(&s).unwrap(), old);
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
    fn conflict_names_every_differing_field_with_both_values() {
        let a = ImageSpec::download("x", "http://h/a", &"ab".repeat(64));
        let mut b = ImageSpec::download("x", "http://u:pw@h/b", &"cd".repeat(64));
        b.node_selector = vec!["ssd".into()];
        let e = a.conflict_with(&b).unwrap().to_string();
        for part in [
            "sourceParameters.url is http://h/a, asked http://h/b",
            &format!("checksum is {}, asked {}", "ab".repeat(64), "cd".repeat(64)),
            "nodeSelector is (not set), asked ssd",
        ] {
            assert!(e.contains(part), "{part:?} missing in {e}");
        }
        assert!(
            !e.contains("pw") && !e.contains('{') && !e.contains("\\\""),
            "{e}"
        );
        assert!(a.conflict_with(&a.clone()).is_none());
    }

    #[test]
    fn fields_left_empty_ask_for_nothing() {
        let mut have = ImageSpec::download("x", "http://h/a", &"ab".repeat(64));
        have.min_number_of_copies = 2;
        have.disk_selector = vec!["fast".into()];
        assert!(have
            .conflict_with(&ImageSpec::download("x", "http://h/a", ""))
            .is_none());
        let mut want = have.clone();
        want.min_number_of_copies = 3;
        let e = have.conflict_with(&want).unwrap().to_string();
        assert!(e.contains("minNumberOfCopies is 2, asked 3"), "{e}");
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(redact_url("http://u:p@h/x"), "http://h/x");
    }
}
