//! The CLI shell: clap types, client calls to the daemon's API, exit codes
//! (0 success, 1 the operation failed, 2 bad usage or bad input).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::core::manifest::{self, Wanted};
use crate::core::spec::{validate_checksum, validate_name, validate_url};
use crate::core::{ImageConfig, State, Status};

#[derive(Parser)]
#[command(
    name = "bifs",
    version,
    about = "Backing-image filesystem: VM base images over FUSE, fetched lazily, verified"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// How a client command reaches the daemon. Every client subcommand flattens it in
/// (`#[command(flatten)] client: ClientArgs` and an arm in `Cmd::client`); `mount` and
/// `serve` do not, so their help lists only their own flags.
#[derive(Args, Clone, Debug)]
pub struct ClientArgs {
    /// The daemon's API
    #[arg(
        long,
        env = "BIFS_SERVER",
        default_value = "http://127.0.0.1:8090",
        value_name = "URL"
    )]
    pub server: String,
    /// A file holding the bearer token the daemon requires (its `mount --token-file`)
    #[arg(long, env = "BIFS_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the daemon: mount the images at MNT, cache them on the disks.
    Mount {
        /// Where the images appear: an empty directory (created if missing)
        #[arg(long, value_name = "MNT")]
        mountpoint: PathBuf,
        /// A cache directory; repeat for more disks. It must exist; an empty one becomes a new disk
        #[arg(long = "disk", required = true, value_name = "DIR")]
        disks: Vec<PathBuf>,
        /// Address of the HTTP API (control, peers, /metrics, /healthz)
        #[arg(long, default_value = "127.0.0.1:8090", value_name = "ADDR")]
        listen: SocketAddr,
        /// A file holding the bearer token this daemon's API requires (clients give the same file)
        #[arg(long, env = "BIFS_TOKEN_FILE", value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Reads wait until the image is verified (Longhorn's semantics)
        #[arg(long)]
        require_verified: bool,
        /// Presence granularity in KiB (4 to 4096)
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(4..=4096), value_name = "KIB")]
        block_kib: u64,
        /// How long a read of bytes not cached yet waits for them before it fails with EIO
        /// (0: wait for ever, as an NFS hard mount).
        #[arg(long, default_value = "120s", value_parser = parse_duration, value_name = "DURATION")]
        read_timeout: Duration,
        /// Another bifs daemon's API to fetch blocks from before the origin (repeatable).
        #[arg(long = "peer", value_name = "URL")]
        peers: Vec<String>,
        /// A DNS name whose every address is a peer (a Kubernetes headless Service),
        /// re-resolved every 10 s.
        #[arg(long, value_name = "NAME:PORT")]
        peers_dns: Option<String>,
        /// Apply every .yaml/.yml file in DIR at start and whenever DIR changes (a ConfigMap volume).
        #[arg(long, value_name = "DIR")]
        manifests: Option<PathBuf>,
        /// Serve the API on a non-loopback --listen without --token-file (anyone who can reach it controls the node).
        #[arg(long)]
        insecure_listen: bool,
        /// Remove a copy unused this long (0: at once), never below the copies the cluster keeps.
        #[arg(long, default_value = "60m", value_parser = parse_duration)]
        cleanup_wait: Duration,
        /// Ready copies the cluster keeps of an image whose spec sets no minNumberOfCopies.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        min_copies: u32,
        /// Where an export's `volume-name` is looked up (a Longhorn host's volumes).
        #[arg(long, value_name = "DIR", default_value = crate::core::spec_sources::DEFAULT_VOLUMES_DIR)]
        volumes_dir: PathBuf,
        /// Where a spec's `secretRef` is looked up (credentials of private origins).
        #[arg(long, value_name = "DIR", default_value = crate::core::credentials::DEFAULT_SECRETS_DIR)]
        secrets_dir: PathBuf,
        /// A PEM bundle of CA certificates to trust besides the system's (origins behind a private CA).
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
    },
    /// Create an image from a URL, export one from a volume (--from-volume), or (with
    /// neither) create it as a peer holds it.
    Create {
        /// The image's name (a DNS-1123 subdomain)
        name: String,
        /// Where to fetch it from (http:// or https://, with Range support); without it
        /// the spec and bytes come from a peer
        #[arg(long)]
        url: Option<String>,
        /// A volume file or block device to export (on the daemon's host)
        #[arg(
            long,
            value_name = "PATH",
            requires = "export_type",
            conflicts_with = "url"
        )]
        from_volume: Option<PathBuf>,
        /// What an export produces
        #[arg(long, value_parser = ["raw", "qcow2"], requires = "from_volume", value_name = "FORMAT")]
        export_type: Option<String>,
        /// SHA-512 of the image, 128 hex digits (empty: record the computed one)
        #[arg(
            long,
            default_value = "",
            hide_default_value = true,
            value_name = "HEX"
        )]
        checksum: String,
        /// The disk uuid (or its first characters) to put it on
        #[arg(long, value_name = "UUID")]
        disk: Option<String>,
        /// Fetch only what is read; `bifs fill NAME` starts the fill later
        #[arg(long)]
        no_fill: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Upload FILE as image NAME (resumes: run it again after an interruption).
    Upload {
        /// The image's name (a DNS-1123 subdomain)
        name: String,
        /// The file to upload
        file: PathBuf,
        /// SHA-512 of the file, 128 hex digits
        #[arg(
            long,
            default_value = "",
            hide_default_value = true,
            value_name = "HEX"
        )]
        checksum: String,
        /// At most this many bytes per second (e.g. 50M), as curl --limit-rate
        #[arg(long, value_name = "RATE", value_parser = crate::upload_client::parse_rate)]
        limit_rate: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the images.
    List {
        /// Print the status documents as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show an image's state; optionally wait for ready or failed.
    Status {
        /// The image's name
        name: String,
        /// Print the status document as JSON
        #[arg(long)]
        json: bool,
        /// Wait until the image settles; exit 0 only if it reaches this state
        #[arg(long, value_parser = ["ready", "failed"], value_name = "STATE")]
        wait: Option<String>,
        /// How long --wait waits (30s, 10m, 2h)
        #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
        timeout: Duration,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete an image and its cached blocks (refused while in use).
    Delete {
        /// The image's name
        name: String,
        /// Delete even while handles are open (they get EIO from then on)
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove this node's copy now (refused for a copy in use or one the cluster keeps).
    Cleanup {
        /// The image's name (or --orphans)
        #[arg(required_unless_present = "orphans")]
        name: Option<String>,
        /// Remove the image folders no image claims (`bifs disks` lists them).
        #[arg(long, conflicts_with = "name")]
        orphans: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show each disk: capacity, free, bytes used by images, orphan folders.
    Disks {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Start the fill of an image created with --no-fill, or retry one that failed for a cause that can pass.
    Fill {
        /// The image's name
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Serve the files of a directory over HTTP with Range support (a plain origin).
    Serve {
        /// The directory whose files to serve (symlinks leading out of it are not followed)
        dir: PathBuf,
        /// Address to listen on
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: SocketAddr,
    },
    /// Create or validate the images of Longhorn BackingImage manifests (several per file, `---` between).
    Apply {
        /// The YAML file; `-` reads standard input.
        #[arg(short = 'f', long = "filename", value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// StorageClass parameters (backingImage=..., backingImageDataSourceType=..., ...): create the image if missing, validate it if present.
    Ensure {
        /// A StorageClass parameter: backingImage, backingImageDataSourceType,
        /// backingImageDataSourceParameters (a JSON string) or backingImageChecksum
        #[arg(required = true, value_name = "KEY=VALUE")]
        params: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

impl Cmd {
    /// The client flags of a client command; None for `mount` and `serve`.
    pub fn client(&self) -> Option<&ClientArgs> {
        match self {
            Cmd::Create { client, .. }
            | Cmd::List { client, .. }
            | Cmd::Status { client, .. }
            | Cmd::Delete { client, .. }
            | Cmd::Cleanup { client, .. }
            | Cmd::Disks { client, .. }
            | Cmd::Fill { client, .. }
            | Cmd::Upload { client, .. }
            | Cmd::Apply { client, .. }
            | Cmd::Ensure { client, .. } => Some(client),
            Cmd::Mount { .. } | Cmd::Serve { .. } => None,
        }
    }
}

/// The longest duration an argument may give: 100 years.
const MAX_DURATION_SECS: u64 = 100 * 365 * 24 * 3600;

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: use e.g. 30s, 10m, 2h"))?;
    let secs = match unit {
        "" | "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "ms" => Some(n / 1000),
        _ => {
            return Err(format!(
                "invalid duration unit {unit:?} in {s:?}: use s, m or h"
            ))
        }
    };
    // Bounded so that `now + duration` cannot overflow anywhere (tests/hostile.rs found
    // `18446744073709551615h` panicking here).
    if secs.is_none_or(|secs| secs > MAX_DURATION_SECS) {
        return Err(format!("duration {s:?} is too long: at most 100 years"));
    }
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        _ => Duration::from_secs(secs.unwrap_or_default()),
    })
}

/// A failure with its exit code.
pub struct Exit(pub i32, pub String);

fn usage(msg: impl Into<String>) -> Exit {
    Exit(2, msg.into())
}

fn failed(msg: impl Into<String>) -> Exit {
    Exit(1, msg.into())
}

pub(crate) struct Client {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Client {
    fn new(args: &ClientArgs) -> Result<Client, Exit> {
        let token = match &args.token_file {
            Some(f) => Some(crate::server::read_token_file(f).map_err(usage)?),
            None => None,
        };
        match reqwest::Url::parse(&args.server) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => {
                return Err(usage(format!(
                "invalid --server {:?} (or BIFS_SERVER): give the daemon's API as http://HOST:PORT",
                args.server
            )))
            }
        }
        Ok(Client {
            base: args.server.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
            token,
        })
    }

    /// A request to the daemon's API, with the token when there is one.
    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Exit> {
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            failed(format!("cannot reach the bifs daemon at {}: {e}; is `bifs mount` running? (--server or BIFS_SERVER)", self.base))
        })?;
        reply(resp).await
    }

    async fn status(&self, name: &str) -> Result<Status, Exit> {
        let v = self
            .call(reqwest::Method::GET, &format!("/v1/images/{name}"), None)
            .await?;
        serde_json::from_value(v)
            .map_err(|e| failed(format!("unexpected reply from the daemon: {e}")))
    }
}

/// A reply of the daemon's API: its JSON, or its `{error}` as exit 2 (a 400: the request
/// was at fault) or exit 1.
pub(crate) async fn reply(resp: reqwest::Response) -> Result<Value, Exit> {
    let code = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let value: Value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    if code.is_success() {
        return Ok(value);
    }
    let msg = value
        .get("error")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| value.to_string());
    Err(if code.as_u16() == 400 {
        usage(msg)
    } else {
        failed(msg)
    })
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// A status line for a background task's pauses, its value in the column of the others
/// ("state:     ...").
fn paused_line(what: &str, ms: u64, whom: &str) -> String {
    let secs = ms as f64 / 1000.0;
    format!("{what:<11}paused {secs:.1} s for {whom} (it runs in their pauses)")
}

fn print_status(s: &Status) {
    println!("name:      {}", s.name);
    println!(
        "state:     {}{}",
        s.state,
        if s.fill || s.state == State::Ready {
            String::new()
        } else {
            " (fill off: `bifs fill` starts it)".into()
        }
    );
    println!(
        "progress:  {}% ({} of {} cached)",
        s.progress,
        human(s.bytes_cached),
        human(s.size)
    );
    let paused = [
        ("fill:", s.fill_held_ms, "readers far ahead"),
        ("hashing:", s.hash_held_ms, "readers"),
    ];
    for (what, ms, whom) in paused {
        if ms > 0 && s.state != State::Ready {
            println!("{}", paused_line(what, ms, whom));
        }
    }
    match s.virtual_size {
        Some(v) => println!("format:    {} (virtual size {})", s.format, human(v)),
        None => println!("format:    {}", s.format),
    }
    println!(
        "checksum:  {}",
        if s.checksum.is_empty() {
            "(computed once complete)"
        } else {
            &s.checksum
        }
    );
    println!(
        "source:    {} {}",
        s.source.kind,
        s.source.parameters.get("url").map_or("", String::as_str)
    );
    println!(
        "disk:      {} ({})",
        &s.disk.uuid[..8.min(s.disk.uuid.len())],
        s.disk.path
    );
    println!("path:      {}", s.path);
    println!("raw path:  {}", s.raw_path);
    if !s.error.is_empty() {
        println!("error:     {}", s.error);
    }
}

/// Exit 2 when the daemon refused its input (a missing disk, a non-empty mountpoint, an
/// empty token file), 1 for everything else.
fn daemon_exit(e: anyhow::Error) -> Exit {
    let bad_input = e
        .chain()
        .any(|c| matches!(c.downcast_ref(), Some(crate::core::Error::BadInput(_))));
    Exit(if bad_input { 2 } else { 1 }, format!("{e:#}"))
}

pub fn run(cli: Cli) -> Result<(), Exit> {
    match &cli.cmd {
        Cmd::Mount {
            mountpoint,
            disks,
            listen,
            token_file,
            require_verified,
            block_kib,
            read_timeout,
            peers,
            peers_dns,
            manifests,
            insecure_listen,
            cleanup_wait,
            min_copies,
            volumes_dir,
            secrets_dir,
            ca_file,
        } => {
            crate::daemon::check_listen(*listen, token_file.is_some(), *insecure_listen)
                .map_err(usage)?;
            let mut cfg = ImageConfig {
                require_verified: *require_verified,
                block_size: block_kib * 1024,
                ..ImageConfig::default()
            };
            cfg.fetch.read_timeout = (!read_timeout.is_zero()).then_some(*read_timeout);
            let args = crate::daemon::MountArgs {
                mountpoint: mountpoint.clone(),
                disks: disks.clone(),
                listen: *listen,
                token_file: token_file.clone(),
                manifests: manifests.clone(),
                cfg,
                peers: peers.clone(),
                peers_dns: peers_dns.clone(),
                lifecycle: crate::core::node::LifecycleConfig {
                    cleanup_wait: *cleanup_wait,
                    min_copies: *min_copies,
                },
                volumes_dir: volumes_dir.clone(),
                secrets_dir: secrets_dir.clone(),
                ca_file: ca_file.clone(),
            };
            return crate::daemon::run(args).map_err(daemon_exit);
        }
        Cmd::Serve { dir, listen } => {
            let rt = tokio::runtime::Runtime::new()
                .map_err(|e| failed(format!("cannot start the async runtime: {e}")))?;
            return rt
                .block_on(crate::serve::run(dir.clone(), *listen))
                .map_err(|e| failed(format!("{e:#}")));
        }
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(client(&cli))
}

async fn client(cli: &Cli) -> Result<(), Exit> {
    let c = Client::new(cli.cmd.client().expect("client commands have client flags"))?;
    match &cli.cmd {
        Cmd::Create {
            name,
            url,
            from_volume,
            export_type,
            checksum,
            disk,
            no_fill,
            ..
        } => {
            // Check locally first: bad input never reaches the daemon and creates nothing.
            validate_name(name).map_err(|e| usage(e.to_string()))?;
            validate_checksum(checksum).map_err(|e| usage(e.to_string()))?;
            let spec = match (url, from_volume) {
                (Some(url), _) => {
                    validate_url(url).map_err(|e| usage(e.to_string()))?;
                    Some(crate::core::ImageSpec::download(name, url, checksum))
                }
                (None, Some(path)) => {
                    let path = crate::upload_client::volume_arg(path).map_err(usage)?;
                    let t = export_type.as_deref().unwrap_or("raw");
                    let mut spec = crate::core::ImageSpec::download(name, "", checksum);
                    spec.source_type = crate::core::spec::SourceType::ExportFromVolume;
                    spec.source_parameters =
                        [("path".into(), path), ("export-type".into(), t.into())].into();
                    Some(spec)
                }
                // Neither: as a peer holds it.
                (None, None) => None,
            };
            let v = match spec {
                Some(spec) => {
                    let body = serde_json::to_value(crate::server::CreateBody {
                        spec: &spec,
                        disk: disk.as_deref(),
                        no_fill: *no_fill,
                    })
                    .map_err(|e| failed(e.to_string()))?;
                    c.call(reqwest::Method::POST, "/v1/images", Some(body))
                        .await?
                }
                None => {
                    let path = format!("/v1/images/{name}/from-peers");
                    c.call(reqwest::Method::POST, &path, None).await?
                }
            };
            let s: Status = serde_json::from_value(v).map_err(|e| failed(e.to_string()))?;
            println!(
                "{}: {} ({}, {}), {}",
                s.name,
                s.state,
                s.format,
                human(s.size),
                s.path
            );
            // Already failed (a checksum that cannot match, a source gone): say so now.
            if s.state == State::Failed {
                return Err(failed(format!("image {} failed: {}", s.name, s.error)));
            }
        }
        Cmd::List { json, .. } => {
            let v = c.call(reqwest::Method::GET, "/v1/images", None).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(());
            }
            let list: Vec<Status> = serde_json::from_value(v).map_err(|e| failed(e.to_string()))?;
            // As wide as the longest name (up to 253 characters), so columns stay aligned.
            let w = list.iter().map(|s| s.name.len()).max().unwrap_or(0).max(30);
            println!(
                "{:<w$} {:<12} {:>8} {:>10} {:<7} {:>6} DISK",
                "NAME", "STATE", "PROGRESS", "SIZE", "FORMAT", "COPIES"
            );
            for s in list {
                // Ready copies in the cluster (this node's and those its peers report),
                // out of the copies known.
                let ready = usize::from(s.state == State::Ready)
                    + s.copies.iter().filter(|c| c.state == "ready").count();
                let copies = format!("{ready}/{}", 1 + s.copies.len());
                println!(
                    "{:<w$} {:<12} {:>7}% {:>10} {:<7} {:>6} {}",
                    s.name,
                    s.state,
                    s.progress,
                    human(s.size),
                    s.format,
                    copies,
                    &s.disk.uuid[..8.min(s.disk.uuid.len())]
                );
            }
        }
        Cmd::Status {
            name,
            json,
            wait,
            timeout,
            ..
        } => {
            validate_name(name).map_err(|e| usage(e.to_string()))?;
            let mut s = c.status(name).await?;
            if let Some(want) = wait {
                s = wait_for(&c, name, want, *timeout, s).await?;
            }
            if *json {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            } else {
                print_status(&s);
            }
            // --wait: exit 0 only in the state asked for; the other final state is a failure.
            match wait.as_deref() {
                Some(want) if s.state.as_str() != want && s.state == State::Failed => {
                    return Err(failed(format!(
                        "image {name} failed, not {want}: {}",
                        s.error
                    )))
                }
                Some(want) if s.state.as_str() != want => {
                    return Err(failed(format!(
                        "image {name} is {}, not {want}",
                        s.state.as_str()
                    )))
                }
                _ => {}
            }
        }
        Cmd::Delete { name, force, .. } => {
            validate_name(name).map_err(|e| usage(e.to_string()))?;
            let path = format!("/v1/images/{name}?force={force}");
            c.call(reqwest::Method::DELETE, &path, None).await?;
            println!("{name}: deleted");
        }
        Cmd::Cleanup {
            name: Some(name), ..
        } => {
            validate_name(name).map_err(|e| usage(e.to_string()))?;
            let path = format!("/v1/images/{name}/cleanup");
            c.call(reqwest::Method::POST, &path, None).await?;
            println!("{name}: this node's copy removed");
        }
        Cmd::Cleanup { name: None, .. } => {
            let v = c
                .call(reqwest::Method::POST, "/v1/orphans/cleanup", None)
                .await?;
            let removed = v.as_array().map_or(0, Vec::len);
            for o in v.as_array().into_iter().flatten() {
                println!(
                    "removed {} ({})",
                    o["path"].as_str().unwrap_or("?"),
                    o["reason"].as_str().unwrap_or("")
                );
            }
            println!("{removed} orphan folder(s) removed");
        }
        Cmd::Disks { json, .. } => {
            let v = c.call(reqwest::Method::GET, "/v1/disks", None).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(());
            }
            println!(
                "{:<8} {:>10} {:>10} {:>10} {:>6} {:>7}  PATH",
                "DISK", "CAPACITY", "FREE", "IMAGES", "COUNT", "ORPHANS"
            );
            for d in v.as_array().into_iter().flatten() {
                let n = |k: &str| d[k].as_u64().unwrap_or(0);
                println!(
                    "{:<8} {:>10} {:>10} {:>10} {:>6} {:>7}  {}{}",
                    &d["uuid"].as_str().unwrap_or("")
                        [..8.min(d["uuid"].as_str().unwrap_or("").len())],
                    human(n("capacityBytes")),
                    human(n("freeBytes")),
                    human(n("usedByImagesBytes")),
                    n("images"),
                    d["orphans"].as_array().map_or(0, Vec::len),
                    d["path"].as_str().unwrap_or(""),
                    if d["readOnly"].as_bool() == Some(true) {
                        " (read-only)"
                    } else {
                        ""
                    }
                );
                for o in d["orphans"].as_array().into_iter().flatten() {
                    println!(
                        "  orphan: {} ({})",
                        o["path"].as_str().unwrap_or("?"),
                        o["reason"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Cmd::Fill { name, .. } => {
            validate_name(name).map_err(|e| usage(e.to_string()))?;
            let v = c
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/images/{name}/fill"),
                    None,
                )
                .await?;
            let s: Status = serde_json::from_value(v).map_err(|e| failed(e.to_string()))?;
            println!("{}: fill started ({}%)", s.name, s.progress);
        }
        Cmd::Upload {
            name,
            file,
            checksum,
            limit_rate,
            ..
        } => {
            validate_name(name).map_err(|e| usage(e.to_string()))?;
            validate_checksum(checksum).map_err(|e| usage(e.to_string()))?;
            let up = crate::upload_client::Upload {
                client: c,
                name: name.clone(),
                file: file.clone(),
                checksum: checksum.to_ascii_lowercase(),
                limit_rate: *limit_rate,
            };
            return up.run().await;
        }
        Cmd::Apply { file, .. } => return apply(&c, file).await,
        Cmd::Ensure { params, .. } => {
            let wanted = manifest::from_parameters(params).map_err(|e| usage(e.to_string()))?;
            println!("{}", ensure(&c, &wanted).await?);
        }
        Cmd::Mount { .. } | Cmd::Serve { .. } => unreachable!("handled in run"),
    }
    Ok(())
}

async fn wait_for(
    c: &Client,
    name: &str,
    want: &str,
    timeout: Duration,
    mut s: Status,
) -> Result<Status, Exit> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(100);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg:>12} [{bar:40}] {pos:>3}% {elapsed}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        b
    });
    let start = Instant::now();
    loop {
        if let Some(b) = &bar {
            b.set_position(s.progress as u64);
            b.set_message(s.state.as_str());
        }
        // Both final states end the wait; the caller tells them apart.
        if s.state.as_str() == want || s.state.is_final() {
            break;
        }
        if start.elapsed() > timeout {
            if let Some(b) = bar {
                b.abandon();
            }
            return Err(failed(format!(
                "timed out after {:?} waiting for {name} to be {want}: it is {} at {}%",
                timeout, s.state, s.progress
            )));
        }
        // Looks again soon at first, less often as the wait goes on: the state change is
        // seen within 2% of the time waited (20 ms to 200 ms), so that a script timing
        // `create` then `status --wait ready` measures the image, not the poll.
        let pause =
            (start.elapsed() / 50).clamp(Duration::from_millis(20), Duration::from_millis(200));
        tokio::time::sleep(pause).await;
        s = c.status(name).await?;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(s)
}

/// `bifs apply -f FILE`: every document is checked before any is sent, then each is
/// ensured in turn; the exit code is the worst of them.
async fn apply(c: &Client, file: &std::path::Path) -> Result<(), Exit> {
    use std::io::Read;
    let stdin = file.as_os_str() == "-";
    let shown = if stdin {
        "stdin".to_string()
    } else {
        file.display().to_string()
    };
    let mut text = String::new();
    let limit = manifest::MAX_INPUT_BYTES as u64 + 1;
    let read = if stdin {
        std::io::stdin().take(limit).read_to_string(&mut text)
    } else {
        std::fs::File::open(file).and_then(|f| f.take(limit).read_to_string(&mut text))
    };
    read.map_err(|e| usage(format!("cannot read {shown}: {e}")))?;
    let docs = manifest::parse(&text).map_err(|e| usage(format!("{shown}: {e}")))?;
    if docs.is_empty() {
        return Err(usage(format!(
            "{shown}: no documents; expected kind: BackingImage"
        )));
    }
    let mut worst: Option<Exit> = None;
    for doc in &docs {
        match ensure(c, &doc.wanted).await {
            Ok(line) => println!("{line}"),
            Err(Exit(code, msg)) => {
                eprintln!("bifs: {shown} line {}: {msg}", doc.line);
                if worst.as_ref().is_none_or(|w| code > w.0) {
                    worst = Some(Exit(
                        code,
                        format!("{shown}: not every document was applied"),
                    ));
                }
            }
        }
    }
    worst.map_or(Ok(()), Err)
}

/// Creates the image when it is missing; when present the daemon compares the specs
/// (Longhorn: "validate if the parameters match the existing one"): same is a no-op,
/// different is a 409 naming each field.
async fn ensure(c: &Client, wanted: &Wanted) -> Result<String, Exit> {
    let existing = c.find(wanted.name()).await?;
    match wanted {
        Wanted::Create(spec) => {
            let body = serde_json::to_value(spec).map_err(|e| failed(e.to_string()))?;
            let v = c
                .call(reqwest::Method::POST, "/v1/images", Some(body))
                .await?;
            let s: Status = serde_json::from_value(v).map_err(|e| failed(e.to_string()))?;
            let what = if existing.is_some() {
                "unchanged"
            } else {
                "created"
            };
            Ok(format!("{}: {what} ({}, {}%)", s.name, s.state, s.progress))
        }
        Wanted::Use { name, checksum } => {
            let Some(s) = existing else {
                return Err(failed(format!(
                    "backing image {name} does not exist; create it first, or give backingImageDataSourceType \
                     and backingImageDataSourceParameters so that it is created"
                )));
            };
            if !checksum.is_empty() && !s.checksum.is_empty() && s.checksum != *checksum {
                return Err(failed(format!(
                    "backing image {name} has a different checksum: checksum is {}, asked {checksum}",
                    s.checksum
                )));
            }
            Ok(format!("{name}: exists ({}, {}%)", s.state, s.progress))
        }
    }
}

impl Client {
    /// The image's status, or None when the daemon has no image of that name.
    async fn find(&self, name: &str) -> Result<Option<Status>, Exit> {
        let mut req = self.http.get(format!("{}/v1/images/{name}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        match req.send().await {
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => Ok(None),
            Ok(r) if r.status().is_success() => r
                .json()
                .await
                .map(Some)
                .map_err(|e| failed(format!("unexpected reply from the daemon: {e}"))),
            // Anything else (the daemon down, a bad token) the regular call reports.
            _ => self.status(name).await.map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::paused_line;

    #[test]
    fn pause_lines_keep_the_value_column_of_the_status() {
        let column = "state:     ready".find("ready").unwrap();
        for what in ["fill:", "hashing:"] {
            let line = paused_line(what, 1500, "readers");
            assert_eq!(line.find("paused"), Some(column), "{line:?}");
            assert!(line.contains("1.5 s"), "{line:?}");
        }
    }
}
