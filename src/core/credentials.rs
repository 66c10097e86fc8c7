//! Credentials for private origins, kept out of specs: `sourceParameters.secretRef: NAME`
//! names a secret under `--secrets-dir` (default /etc/bifs/secrets), and `user:pass@` in a
//! URL works too. A secret is either a Kubernetes Secret mounted as a folder (one file per
//! key: `username` and `password`, or `token`, and optionally `headers`, one `Name: value`
//! per line), or a plain file of `key=value` lines with the same keys (`header=Name: value`
//! for each extra header).
//!
//! Nothing here is ever shown: `Debug` prints the kinds of credential, never a value;
//! statuses, logs, metrics and errors show the secret's name and the redacted URL only.

use std::fmt;
use std::path::Path;

/// The default folder secrets are read from.
pub const DEFAULT_SECRETS_DIR: &str = "/etc/bifs/secrets";
/// The source parameter that names a secret.
pub const SECRET_REF: &str = "secretRef";

#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    basic: Option<(String, String)>,
    bearer: Option<String>,
    headers: Vec<(String, String)>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("basic", &self.basic.is_some())
            .field("bearer", &self.bearer.is_some())
            .field("headers", &self.headers.len())
            .finish()
    }
}

impl Credentials {
    pub fn is_empty(&self) -> bool {
        self.basic.is_none() && self.bearer.is_none() && self.headers.is_empty()
    }

    /// The credentials of a URL's `user:pass@` part, and the URL without them.
    pub fn from_url(url: &str) -> (Self, String) {
        let Ok(mut u) = reqwest::Url::parse(url) else {
            return (Self::default(), url.to_string());
        };
        if u.username().is_empty() && u.password().is_none() {
            return (Self::default(), url.to_string());
        }
        let decode = percent_decode;
        let creds = Self {
            basic: Some((
                decode(u.username()),
                decode(u.password().unwrap_or_default()),
            )),
            ..Self::default()
        };
        let _ = u.set_username("");
        let _ = u.set_password(None);
        (creds, u.to_string())
    }

    /// Loads secret `name` from `dir`. Errors name the secret and the file, never a value.
    pub fn load(dir: &Path, name: &str) -> Result<Self, String> {
        super::spec::validate_name(name).map_err(|_| {
            format!("secretRef {name:?} is not a valid secret name (a DNS-1123 name)")
        })?;
        let path = dir.join(name);
        let meta = std::fs::metadata(&path).map_err(|e| {
            format!(
                "secretRef {name:?}: cannot read {}: {e}; put the secret there (a folder of \
                 files, as a Kubernetes Secret volume, or a file of key=value lines) or set \
                 --secrets-dir",
                path.display()
            )
        })?;
        let mut c = Self::default();
        let mut pairs: Vec<(String, String)> = Vec::new();
        if meta.is_dir() {
            for key in ["username", "password", "token", "headers"] {
                let f = path.join(key);
                if let Ok(v) = std::fs::read_to_string(&f) {
                    pairs.push((
                        key.to_string(),
                        v.trim_end_matches(['\n', '\r']).to_string(),
                    ));
                }
            }
        } else {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("secretRef {name:?}: cannot read {}: {e}", path.display()))?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (k, v) = line.split_once('=').ok_or_else(|| {
                    format!(
                        "secretRef {name:?}: line {} of {} is not key=value",
                        i + 1,
                        path.display()
                    )
                })?;
                pairs.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let mut user = None;
        let mut pass = None;
        for (k, v) in pairs {
            match k.as_str() {
                "username" => user = Some(v),
                "password" => pass = Some(v),
                "token" => c.bearer = Some(v),
                "headers" => {
                    for l in v.lines().filter(|l| !l.trim().is_empty()) {
                        c.headers.push(parse_header(name, l)?);
                    }
                }
                "header" => c.headers.push(parse_header(name, &v)?),
                other => {
                    return Err(format!(
                        "secretRef {name:?}: unknown key {other:?}; use username and password, \
                         token, or header"
                    ))
                }
            }
        }
        match (user, pass) {
            (Some(u), p) => c.basic = Some((u, p.unwrap_or_default())),
            (None, Some(_)) => {
                return Err(format!("secretRef {name:?}: a password without a username"))
            }
            (None, None) => {}
        }
        if c.is_empty() {
            return Err(format!(
                "secretRef {name:?}: {} holds no username, token or header",
                path.display()
            ));
        }
        Ok(c)
    }

    /// Merges `other` in (a secret's credentials over a URL's).
    pub fn or(self, other: Self) -> Self {
        Self {
            basic: other.basic.or(self.basic),
            bearer: other.bearer.or(self.bearer),
            headers: [self.headers, other.headers].concat(),
        }
    }

    /// Adds the credentials to a request.
    pub fn apply(&self, mut req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        if let Some((u, p)) = &self.basic {
            req = req.basic_auth(u, Some(p));
        }
        if let Some(t) = &self.bearer {
            req = req.bearer_auth(t);
        }
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        req
    }
}

fn parse_header(secret: &str, line: &str) -> Result<(String, String), String> {
    let (k, v) = line
        .split_once(':')
        .ok_or_else(|| format!("secretRef {secret:?}: a header line is not `Name: value`"))?;
    let k = k.trim();
    if k.is_empty()
        || !k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "secretRef {secret:?}: header name {k:?} is not valid"
        ));
    }
    Ok((k.to_string(), v.trim().to_string()))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The credentials of a spec's `secretRef`, if it names one (a URL's own `user:pass@`
/// is taken by `HttpSource::new`).
pub fn of_secret_ref(
    params: &std::collections::BTreeMap<String, String>,
    secrets_dir: &Path,
) -> Result<Credentials, String> {
    match params.get(SECRET_REF) {
        Some(name) => Credentials::load(secrets_dir, name),
        None => Ok(Credentials::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_load_from_files_and_folders_and_never_print() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("basic"),
            "# a comment\nusername=alice\npassword=s3cr3t\nheader=X-Extra: yes\n",
        )
        .unwrap();
        std::fs::create_dir(d.path().join("tok")).unwrap();
        std::fs::write(d.path().join("tok/token"), "abc123\n").unwrap();
        let b = Credentials::load(d.path(), "basic").unwrap();
        assert_eq!(b.basic, Some(("alice".into(), "s3cr3t".into())));
        assert_eq!(b.headers, vec![("X-Extra".to_string(), "yes".to_string())]);
        assert!(!format!("{b:?}").contains("s3cr3t"));
        let t = Credentials::load(d.path(), "tok").unwrap();
        assert_eq!(t.bearer.as_deref(), Some("abc123"));
        let e = Credentials::load(d.path(), "missing").unwrap_err();
        assert!(e.contains("missing") && e.contains("--secrets-dir"), "{e}");
        let e = Credentials::load(d.path(), "../etc").unwrap_err();
        assert!(e.contains("not a valid secret name"), "{e}");
        std::fs::write(d.path().join("bad"), "password=x\n").unwrap();
        assert!(Credentials::load(d.path(), "bad")
            .unwrap_err()
            .contains("without a username"));
    }

    #[test]
    fn url_credentials_become_basic_auth_and_leave_the_url() {
        let (c, url) = Credentials::from_url("http://bob:p%40ss@h:8/x.img");
        assert_eq!(c.basic, Some(("bob".into(), "p@ss".into())));
        assert_eq!(url, "http://h:8/x.img");
        let (c, url) = Credentials::from_url("http://h/x");
        assert!(c.is_empty());
        assert_eq!(url, "http://h/x");
    }
}
