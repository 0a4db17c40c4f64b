//! Configuration: the raw shape figment layers (built-in defaults < TOML file < `GATEWAY_*`
//! environment), and [`RawConfig::validate`], which turns it into the runtime [`Config`] with
//! errors that name the offending key.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use bill24::Config as UpstreamConfig;
use bill24::Secret;

/// Read when neither `--config` nor `$GATEWAY_CONFIG` names a file, if it exists.
pub const DEFAULT_CONFIG_PATH: &str = "config/default.toml";
/// Names the config file; it is not a config key.
pub const CONFIG_PATH_ENV: &str = "GATEWAY_CONFIG";
/// Environment variables `GATEWAY_<SECTION>__<KEY>` override the file.
pub const ENV_PREFIX: &str = "GATEWAY_";

/// The hex SHA-256 of a key, decoded.
pub type KeyHash = [u8; 32];

// ---------------------------------------------------------------------------------------------
// The raw, serde-facing shape. `Default` equals config/default.toml.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    pub server: RawServer,
    pub upstream: RawUpstream,
    pub cache: RawCache,
    pub log: RawLog,
    pub redis: RawRedis,
    pub jwt: RawJwt,
    pub callers: Vec<RawCaller>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawServer {
    pub listen: String,
    pub admin_listen: String,
    pub max_body_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub max_connections: u64,
    pub admin_key_sha256: String,
    pub worker_threads: u64,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    pub tls_client_ca_file: String,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            max_body_bytes: 8192,
            request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(20),
            drain_delay: Duration::ZERO,
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            admin_key_sha256: String::new(),
            worker_threads: 0,
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_client_ca_file: String::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawUpstream {
    pub base_url: String,
    pub merchant_token: Secret,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merchant_token_file: Option<PathBuf>,
    pub client_id: String,
    pub client_secret: Secret,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub max_in_flight: u64,
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub token_refresh_margin: Duration,
    pub retries: u32,
    pub retry_budget: f64,
    pub circuit_failures: u32,
    #[serde(with = "humantime_serde")]
    pub circuit_cooldown: Duration,
    pub fleet_max_rps: f64,
    pub fleet_circuit: bool,
    pub ca_file: String,
    pub client_cert_file: String,
    pub client_key_file: String,
    pub proxy: SecretUrl,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            base_url: "https://merchantapi-demo.bill24.io".into(),
            merchant_token: Secret::default(),
            merchant_token_file: None,
            client_id: String::new(),
            client_secret: Secret::default(),
            client_secret_file: None,
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            max_in_flight: 64,
            queue_timeout: Duration::from_secs(1),
            token_refresh_margin: Duration::from_secs(300),
            retries: 2,
            retry_budget: 0.2,
            circuit_failures: 5,
            circuit_cooldown: Duration::from_secs(5),
            fleet_max_rps: 0.0,
            fleet_circuit: true,
            ca_file: String::new(),
            client_cert_file: String::new(),
            client_key_file: String::new(),
            proxy: SecretUrl::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawCache {
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    pub max_entries: u64,
    pub max_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    #[serde(with = "humantime_serde")]
    pub refresh_ahead: Duration,
    pub ttl_jitter: f64,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            max_entries: 100_000,
            max_bytes: DEFAULT_CACHE_MAX_BYTES,
            negative_ttl: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            refresh_ahead: Duration::ZERO,
            ttl_jitter: 0.0,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawLog {
    pub format: LogFormat,
    pub level: String,
    pub access_sample: f64,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
            access_sample: 1.0,
        }
    }
}

/// `[redis]`: the fleet's shared tier (CONTRACT §10).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRedis {
    pub urls: Vec<SecretUrl>,
    pub cluster: bool,
    pub username: String,
    pub password: Secret,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    pub key_prefix: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RawRedis {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            cluster: false,
            username: String::new(),
            password: Secret::default(),
            password_file: None,
            key_prefix: "bill24gw".into(),
            timeout: Duration::from_millis(50),
        }
    }
}

/// `[jwt]`: callers identified by a JWT (CONTRACT §12), e.g. a Kubernetes projected
/// service-account token.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawJwt {
    pub issuer: String,
    pub audience: String,
    pub jwks_file: String,
    pub jwks_url: SecretUrl,
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for RawJwt {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audience: "bill24-gateway".into(),
            jwks_file: String::new(),
            jwks_url: SecretUrl::default(),
            leeway: Duration::from_secs(30),
        }
    }
}

/// A URL as written that may carry credentials (`redis.urls`, `upstream.proxy`), so it prints
/// (and serializes, for `--check-config`) with its password `[redacted]`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// The URL itself: for the one place that connects with it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `[redacted]` (and a lone user part, which a
    /// URL may use for a password, too).
    pub fn redacted(&self) -> String {
        let url = &self.0;
        let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
            return url.clone();
        };
        let rest = &url[scheme_end..];
        // A query may carry a token too.
        let (rest, query) = match rest.find('?') {
            Some(q) => (&rest[..q], format!("?{}", bill24::REDACTED)),
            None => (rest, String::new()),
        };
        let authority_end = rest.find(['/', '#']).unwrap_or(rest.len());
        let Some(at) = rest[..authority_end].rfind('@') else {
            return format!("{}{rest}{query}", &url[..scheme_end]);
        };
        let userinfo = &rest[..at];
        let shown = match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{}", bill24::REDACTED),
            None => bill24::REDACTED.to_string(),
        };
        format!("{}{shown}{}{query}", &url[..scheme_end], &rest[at..])
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCaller {
    pub name: String,
    #[serde(default = "KeyHashes::none")]
    pub key_sha256: KeyHashes,
    #[serde(default)]
    pub spiffe_id: String,
    #[serde(default)]
    pub jwt_subject: String,
    #[serde(default)]
    pub rate_limit_rps: f64,
    #[serde(default)]
    pub burst: u32,
    #[serde(default)]
    pub max_concurrent: u32,
    #[serde(default)]
    pub limit_scope: LimitScope,
}

/// The burst a `burst` setting means at `rps` per second: 0 is one second's worth, at least 1.
pub(crate) fn burst_at(rps: f64, burst: u32) -> u32 {
    if burst == 0 {
        rps.ceil().clamp(1.0, f64::from(u32::MAX)) as u32
    } else {
        burst
    }
}

/// Where a caller's `rate_limit_rps` / `burst` are counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitScope {
    /// On each replica alone.
    #[default]
    Replica,
    /// Over every replica of the fleet together (in Redis).
    Fleet,
}

/// One key hash, or several while a key is being rotated.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum KeyHashes {
    One(String),
    Many(Vec<String>),
}

impl KeyHashes {
    fn none() -> Self {
        KeyHashes::Many(Vec::new())
    }

    fn as_slice(&self) -> &[String] {
        match self {
            KeyHashes::One(one) => std::slice::from_ref(one),
            KeyHashes::Many(many) => many,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The runtime configuration: validated, typed, secrets resolved.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub cache: CacheConfig,
    pub log: LogConfig,
    /// The fleet's shared tier; `None` without `redis.urls`.
    pub redis: Option<RedisConfig>,
    /// JWT callers; `None` without `jwt.issuer`.
    pub jwt: Option<JwtConfig>,
    pub callers: Vec<CallerConfig>,
}

/// `[jwt]`, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct JwtConfig {
    pub issuer: String,
    pub audience: String,
    pub jwks: JwksSource,
    pub leeway: Duration,
}

/// Where the keys that sign callers' JWTs come from.
#[derive(Clone, Debug, PartialEq)]
pub enum JwksSource {
    /// A JWKS file, re-read when it changes.
    File(PathBuf),
    /// A JWKS served over HTTP(S), fetched at start and every 10 min, and on an unknown `kid`.
    Url(http::Uri),
}

/// TLS on the main listener (`server.tls_*`), validated: the files were readable and made a
/// usable certificate and key (and client CA) when the config was loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerTlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// With it, a client certificate is requested (not required) and verified against it.
    pub client_ca_file: Option<PathBuf>,
}

/// `[redis]`, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct RedisConfig {
    /// One node (standalone), or the seed nodes of a Redis Cluster.
    pub urls: Vec<SecretUrl>,
    pub cluster: bool,
    /// The ACL user and password, when given here rather than in the URLs.
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub key_prefix: String,
    /// One round trip; past it the gateway goes on without Redis.
    pub timeout: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    pub drain_delay: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub admin_key_sha256: Option<KeyHash>,
    /// Runtime worker threads; 0 = one per CPU.
    pub worker_threads: usize,
    /// The main listener speaks TLS only when set.
    pub tls: Option<ListenerTlsConfig>,
}

/// `cache.max_bytes` by default: 128 MiB, room for the default 100 000 entries of ordinary
/// answers (about 800 bytes each with their bookkeeping), so that only unusually large answers
/// meet this bound first.
const DEFAULT_CACHE_MAX_BYTES: u64 = 128 << 20;
/// The smallest `cache.max_bytes`: room for 16 answers of the largest size that is cached.
const MIN_CACHE_MAX_BYTES: u64 = 1 << 20;

#[derive(Clone, Debug, PartialEq)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub max_entries: u64,
    /// What the cached entries may weigh together (answers, keys and bookkeeping).
    pub max_bytes: u64,
    pub negative_ttl: Duration,
    pub stale_if_error: Duration,
    pub refresh_ahead: Duration,
    pub ttl_jitter: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
    /// Share of successful requests that get an access line (errors always do).
    pub access_sample: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CallerConfig {
    pub name: Arc<str>,
    pub key_sha256: Vec<KeyHash>,
    /// Matched against a verified client certificate's URI SAN.
    pub spiffe_id: Option<Arc<str>>,
    /// Matched against a verified JWT's `sub`.
    pub jwt_subject: Option<Arc<str>>,
    pub rate_limit_rps: f64,
    pub burst: u32,
    pub max_concurrent: u32,
    pub limit_scope: LimitScope,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {} (named by {origin}) does not exist", path.display())]
    FileMissing { path: PathBuf, origin: &'static str },
    #[error("cannot read config file {}: {source}", path.display())]
    FileUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unknown config key `{key}`{source_note} (expected one of: {expected})")]
    UnknownKey {
        key: String,
        expected: String,
        source_note: String,
    },
    #[error("invalid config key `{key}`: {message}")]
    Invalid { key: String, message: String },
    /// Not about one key: the file does not parse (a TOML syntax error), or its top level is
    /// not a table.
    #[error("not valid TOML{source_note}: {message}")]
    Malformed {
        message: String,
        source_note: String,
    },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }

    fn from_figment(err: figment::Error) -> Self {
        let key = err.path.join(".");
        let source_note = match &err.metadata {
            Some(md) => match &md.source {
                Some(src) => format!(" in {src}"),
                None => format!(" in {}", md.name),
            },
            None => String::new(),
        };
        match &err.kind {
            figment::error::Kind::UnknownField(_, expected) => ConfigError::UnknownKey {
                key,
                expected: expected.join(", "),
                source_note,
            },
            kind if key.is_empty() => ConfigError::Malformed {
                message: one_line(&kind.to_string()),
                source_note,
            },
            kind => ConfigError::invalid(key, format!("{kind}{source_note}")),
        }
    }
}

/// A parser's message on one line: its text lines joined, the source excerpt it draws (lines
/// of `|` and `N |`) left out.
fn one_line(message: &str) -> String {
    let excerpt = |line: &str| {
        let t = line.trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ');
        t.starts_with('|')
    };
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !excerpt(l))
        .collect::<Vec<_>>()
        .join(": ")
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// The outcome of loading: the merged raw config (for `--check-config`), the validated config,
/// and the unknown `GATEWAY_*` variables to warn about once logging is up.
#[derive(Debug)]
pub struct Loaded {
    pub raw: RawConfig,
    pub config: Config,
    pub file: Option<PathBuf>,
    pub warnings: Vec<String>,
    /// Which of the keys whose emptiness a reload guards against were written out (in the file
    /// or the environment) rather than left to their defaults.
    pub explicit: Explicit,
}

/// Keys set explicitly, even to an empty value: the operator asked for that value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Explicit {
    /// `callers` (`[[callers]]` entries or `callers = []`, or `GATEWAY_CALLERS`).
    pub callers: bool,
    /// `server.admin_key_sha256` (or `GATEWAY_SERVER__ADMIN_KEY_SHA256`).
    pub admin_key: bool,
}

/// Loads the layered configuration: defaults < file < environment.
///
/// The file is `cli_path`, else `$GATEWAY_CONFIG`, else `config/default.toml` when present.
pub fn load(cli_path: Option<&Path>) -> Result<Loaded, ConfigError> {
    let file = resolve_file(cli_path)?;
    let mut figment = Figment::from(Serialized::defaults(RawConfig::default()));
    let mut explicit = Explicit {
        callers: std::env::var_os(format!("{ENV_PREFIX}CALLERS")).is_some(),
        admin_key: std::env::var_os(format!("{ENV_PREFIX}SERVER__ADMIN_KEY_SHA256")).is_some(),
    };
    if let Some(path) = &file {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::FileUnreadable {
            path: path.clone(),
            source,
        })?;
        // (A file that does not parse is reported by figment below, naming the problem.)
        if let Ok(top) = toml::from_str::<toml::Table>(&text) {
            explicit.callers |= top.contains_key("callers");
            explicit.admin_key |= top
                .get("server")
                .and_then(toml::Value::as_table)
                .is_some_and(|server| server.contains_key("admin_key_sha256"));
        }
        // The text just read, not the path again: a file swapped between two reads (a
        // ConfigMap's `..data` symlink) must not decide `explicit` from one version and the
        // values from another.
        figment = figment.merge(FileText {
            path: path.clone(),
            toml: Toml::string(&text),
        });
    }
    let env = EnvLayer::from_process();
    let warnings: Vec<String> = env
        .ignored
        .iter()
        .map(|var| format!("ignoring unknown environment variable {var}"))
        .collect();
    figment = figment.merge(env);
    let raw: RawConfig = figment.extract().map_err(ConfigError::from_figment)?;
    let config = raw.validate()?;
    Ok(Loaded {
        raw,
        config,
        file,
        warnings,
        explicit,
    })
}

/// A config file's text, read once, as a figment provider that names the file in errors.
struct FileText {
    path: PathBuf,
    toml: figment::providers::Data<Toml>,
}

impl Provider for FileText {
    fn metadata(&self) -> Metadata {
        Metadata::from("TOML file", self.path.as_path())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.toml.data()
    }
}

fn resolve_file(cli_path: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
    let (path, origin) = match cli_path {
        Some(p) => (p.to_path_buf(), "--config"),
        None => match std::env::var_os(CONFIG_PATH_ENV) {
            Some(p) if !p.is_empty() => (PathBuf::from(p), CONFIG_PATH_ENV),
            _ => {
                let default = Path::new(DEFAULT_CONFIG_PATH);
                return Ok(default.is_file().then(|| default.to_path_buf()));
            }
        },
    };
    if !path.exists() {
        return Err(ConfigError::FileMissing { path, origin });
    }
    Ok(Some(path))
}

/// The `GATEWAY_<SECTION>__<KEY>` variables that name a config key, as a figment provider.
///
/// Unknown variables are set aside (to be warned about), never an error: Kubernetes injects
/// `GATEWAY_PORT` and friends when a Service is named `gateway`. Keys whose default is a string
/// keep the variable's text as it is, so `GATEWAY_UPSTREAM__CLIENT_ID=007` stays `"007"`; the
/// others are parsed (numbers, booleans, `[{name="orders",…}]` lists).
struct EnvLayer {
    values: Vec<(String, Value)>,
    ignored: Vec<String>,
}

impl EnvLayer {
    fn from_process() -> Self {
        let keys = known_keys();
        let mut values = Vec::new();
        let mut ignored = Vec::new();
        for (key, raw) in Env::prefixed(ENV_PREFIX).split("__").iter() {
            let key = key.as_str().to_ascii_lowercase();
            if key == "config" {
                continue;
            }
            match keys.get(&key) {
                Some(KeyKind::Text) => values.push((key, Value::from(raw))),
                Some(KeyKind::Parsed) => {
                    let value = raw.parse::<Value>().unwrap_or_else(|_| Value::from(raw));
                    values.push((key, value));
                }
                None => ignored.push(format!(
                    "{ENV_PREFIX}{}",
                    key.replace('.', "__").to_ascii_uppercase()
                )),
            }
        }
        Self { values, ignored }
    }
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("environment variables {ENV_PREFIX}*"))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, value) in &self.values {
            if let Some(nested) = figment::util::nest(key, value.clone()).into_dict() {
                for (k, v) in nested {
                    match (dict.remove(&k), v) {
                        (Some(Value::Dict(_, mut existing)), Value::Dict(_, new)) => {
                            existing.extend(new);
                            dict.insert(k, Value::from(existing));
                        }
                        (_, v) => {
                            dict.insert(k, v);
                        }
                    }
                }
            }
        }
        Ok(Profile::Default.collect(dict))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Text,
    Parsed,
}

/// Every settable key (`section.key`, or `callers`), derived from the defaults' own shape.
pub(crate) fn known_keys() -> BTreeMap<String, KeyKind> {
    let mut keys = BTreeMap::new();
    let kind_of = |v: &toml::Value| match v {
        toml::Value::String(_) => KeyKind::Text,
        _ => KeyKind::Parsed,
    };
    if let Ok(toml::Value::Table(top)) = toml::Value::try_from(RawConfig::default()) {
        for (section, value) in top {
            match value {
                toml::Value::Table(table) => {
                    for (key, v) in table {
                        keys.insert(format!("{section}.{key}"), kind_of(&v));
                    }
                }
                other => {
                    keys.insert(section, kind_of(&other));
                }
            }
        }
    }
    // Optional keys have no default, so they are absent from the serialized defaults.
    for optional in [
        "upstream.merchant_token_file",
        "upstream.client_secret_file",
        "redis.password_file",
    ] {
        keys.insert(optional.into(), KeyKind::Text);
    }
    keys
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

impl RawConfig {
    /// Checks every key and builds the runtime config; reads `*_file` secrets.
    ///
    /// Every section is taken apart field by field (no `..`) and every runtime struct is built
    /// field by field, so a key added to either side and forgotten on the other does not
    /// compile (or trips the unused-variable lint).
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let RawConfig {
            server,
            upstream,
            cache,
            log,
            redis,
            jwt,
            callers: raw_callers,
        } = self;

        let RawServer {
            listen,
            admin_listen,
            max_body_bytes,
            request_timeout,
            shutdown_grace,
            drain_delay,
            header_read_timeout,
            idle_timeout,
            max_connections,
            admin_key_sha256,
            worker_threads,
            tls_cert_file,
            tls_key_file,
            tls_client_ca_file,
        } = server;
        let server = ServerConfig {
            listen: socket_addr("server.listen", listen)?,
            admin_listen: socket_addr("server.admin_listen", admin_listen)?,
            max_body_bytes: positive("server.max_body_bytes", *max_body_bytes)?,
            request_timeout: nonzero("server.request_timeout", *request_timeout)?,
            shutdown_grace: *shutdown_grace,
            drain_delay: *drain_delay,
            header_read_timeout: nonzero("server.header_read_timeout", *header_read_timeout)?,
            idle_timeout: nonzero("server.idle_timeout", *idle_timeout)?,
            max_connections: positive("server.max_connections", *max_connections)?,
            admin_key_sha256: match admin_key_sha256.trim() {
                "" => None,
                hex => Some(key_hash("server.admin_key_sha256", hex)?),
            },
            worker_threads: usize::try_from(*worker_threads)
                .ok()
                .filter(|n| *n <= 1024)
                .ok_or_else(|| {
                    ConfigError::invalid("server.worker_threads", "must be 0 to 1024")
                })?,
            tls: listener_tls(tls_cert_file, tls_key_file, tls_client_ca_file)?,
        };

        let RawUpstream {
            base_url: raw_base_url,
            merchant_token,
            merchant_token_file,
            client_id,
            client_secret,
            client_secret_file,
            timeout,
            connect_timeout,
            max_in_flight,
            queue_timeout,
            token_refresh_margin,
            retries,
            retry_budget,
            circuit_failures,
            circuit_cooldown,
            fleet_max_rps,
            fleet_circuit,
            ca_file,
            client_cert_file,
            client_key_file,
            proxy,
        } = upstream;
        if !fleet_max_rps.is_finite() || *fleet_max_rps < 0.0 {
            return Err(ConfigError::invalid(
                "upstream.fleet_max_rps",
                "must be 0 (no ceiling) or a positive rate",
            ));
        }
        let upstream = UpstreamConfig {
            base_url: base_url("upstream.base_url", raw_base_url)?,
            merchant_token: secret(
                "upstream.merchant_token",
                merchant_token,
                merchant_token_file.as_deref(),
            )?,
            client_id: client_id.clone(),
            client_secret: secret(
                "upstream.client_secret",
                client_secret,
                client_secret_file.as_deref(),
            )?,
            timeout: nonzero("upstream.timeout", *timeout)?,
            connect_timeout: nonzero("upstream.connect_timeout", *connect_timeout)?,
            max_in_flight: positive("upstream.max_in_flight", *max_in_flight)?,
            queue_timeout: *queue_timeout,
            token_refresh_margin: *token_refresh_margin,
            retries: *retries,
            retry_budget: fraction("upstream.retry_budget", *retry_budget, 1000.0)?,
            circuit_failures: *circuit_failures,
            circuit_cooldown: nonzero("upstream.circuit_cooldown", *circuit_cooldown)?,
            fleet_max_rps: *fleet_max_rps,
            fleet_circuit: *fleet_circuit,
            tls: upstream_tls(ca_file, client_cert_file, client_key_file)?,
            proxy: proxy_url("upstream.proxy", proxy)?,
        };

        let RawCache {
            ttl,
            max_entries,
            max_bytes,
            negative_ttl,
            stale_if_error,
            refresh_ahead,
            ttl_jitter,
        } = cache;
        let ttl_jitter = fraction("cache.ttl_jitter", *ttl_jitter, 1.0)?;
        if ttl_jitter >= 1.0 {
            return Err(ConfigError::invalid(
                "cache.ttl_jitter",
                "must be below 1.0 (a fraction of cache.ttl)",
            ));
        }
        if *max_bytes < MIN_CACHE_MAX_BYTES {
            return Err(ConfigError::invalid(
                "cache.max_bytes",
                format!("must be at least {MIN_CACHE_MAX_BYTES} (1 MiB)"),
            ));
        }
        let cache = CacheConfig {
            ttl: *ttl,
            max_entries: *max_entries,
            max_bytes: *max_bytes,
            negative_ttl: *negative_ttl,
            stale_if_error: *stale_if_error,
            refresh_ahead: *refresh_ahead,
            ttl_jitter,
        };

        let RawLog {
            format,
            level,
            access_sample,
        } = log;
        if let Err(err) = tracing_subscriber::EnvFilter::builder().parse(level) {
            return Err(ConfigError::invalid(
                "log.level",
                format!("not a valid level or filter directive: {err}"),
            ));
        }
        let log = LogConfig {
            format: *format,
            level: level.clone(),
            access_sample: fraction("log.access_sample", *access_sample, 1.0)?,
        };

        let redis = redis_config(redis, &upstream.client_id)?;

        Ok(Config {
            server,
            upstream,
            cache,
            log,
            redis,
            jwt: jwt_config(jwt)?,
            callers: callers(raw_callers)?,
        })
    }
}

impl Config {
    /// Things that are allowed but almost certainly not meant.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.callers.is_empty() {
            out.push("no [[callers]] configured: every request will be answered 401".into());
        }
        let mtls = self
            .server
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some());
        for c in &self.callers {
            if c.spiffe_id.is_some() && !mtls {
                out.push(format!(
                    "caller {:?} has a spiffe_id but server.tls_client_ca_file is not set: no \
                     client certificate will identify it",
                    c.name
                ));
            }
            if c.jwt_subject.is_some() && self.jwt.is_none() {
                out.push(format!(
                    "caller {:?} has a jwt_subject but jwt.issuer is not set: no JWT will \
                     identify it",
                    c.name
                ));
            }
        }
        let u = &self.upstream;
        for (key, missing) in [
            ("upstream.merchant_token", u.merchant_token.is_empty()),
            ("upstream.client_id", u.client_id.is_empty()),
            ("upstream.client_secret", u.client_secret.is_empty()),
        ] {
            if missing {
                out.push(format!(
                    "{key} is not set: Bill24 will refuse to issue an access token"
                ));
            }
        }
        out
    }

    /// A digest of the settings every replica of a fleet must agree on to act as one gateway
    /// (CONTRACT §13): `[cache]` but its size, `[[callers]]` (names, key hashes, limits; their
    /// order does not matter), how Bill24 is called (`[upstream]` without its secrets, TLS files
    /// and proxy), and `redis.key_prefix`. Not what may differ from one replica to the next:
    /// addresses, the admin key, logging, threads, the cache's size, Redis's URLs and
    /// credentials. 16 hex digits of a SHA-256, the same for the same settings on any machine.
    ///
    /// Every field is named (no `..`): a key added to the config does not compile until it is
    /// listed here as agreed or as the replica's own.
    pub fn fleet_digest(&self) -> String {
        let mut text = String::new();
        let mut put = |key: &str, value: &dyn std::fmt::Display| {
            text.push_str(key);
            text.push('=');
            text.push_str(&value.to_string());
            text.push('\n');
        };
        let nanos = |d: &Duration| d.as_nanos();
        let Config {
            server: _, // addresses, timeouts of the replica's own connections
            upstream,
            cache,
            log: _, // the replica's own
            redis,
            jwt,
            callers,
        } = self;
        // Which merchant, where, and how Bill24 is called; not the secrets (never in a
        // digest), nor where this replica finds its certificate files, nor its egress.
        let UpstreamConfig {
            client_id,
            base_url,
            retries,
            retry_budget,
            timeout,
            connect_timeout,
            token_refresh_margin,
            circuit_failures,
            circuit_cooldown,
            max_in_flight,
            queue_timeout,
            fleet_max_rps,
            fleet_circuit,
            merchant_token: _,
            client_secret: _,
            tls: _,
            proxy: _,
        } = upstream;
        put("upstream.client_id", client_id);
        put("upstream.base_url", base_url);
        put("upstream.retries", retries);
        put("upstream.retry_budget", retry_budget);
        put("upstream.timeout", &nanos(timeout));
        put("upstream.connect_timeout", &nanos(connect_timeout));
        put(
            "upstream.token_refresh_margin",
            &nanos(token_refresh_margin),
        );
        put("upstream.circuit_failures", circuit_failures);
        put("upstream.circuit_cooldown", &nanos(circuit_cooldown));
        put("upstream.max_in_flight", max_in_flight);
        put("upstream.queue_timeout", &nanos(queue_timeout));
        put("upstream.fleet_max_rps", fleet_max_rps);
        put("upstream.fleet_circuit", fleet_circuit);
        let CacheConfig {
            ttl,
            max_entries: _, // this replica's memory
            max_bytes: _,
            negative_ttl,
            stale_if_error,
            refresh_ahead,
            ttl_jitter,
        } = cache;
        put("cache.ttl", &nanos(ttl));
        put("cache.negative_ttl", &nanos(negative_ttl));
        put("cache.stale_if_error", &nanos(stale_if_error));
        put("cache.refresh_ahead", &nanos(refresh_ahead));
        put("cache.ttl_jitter", ttl_jitter);
        if let Some(RedisConfig {
            urls: _,
            cluster: _,
            username: _,
            password: _,
            key_prefix,
            timeout: _,
        }) = redis
        {
            put("redis.key_prefix", key_prefix);
        }
        // Who a JWT must come from and be meant for; not where this replica finds the keys.
        if let Some(JwtConfig {
            issuer,
            audience,
            jwks: _,
            leeway,
        }) = jwt
        {
            put("jwt.issuer", &format!("{issuer:?}"));
            put("jwt.audience", &format!("{audience:?}"));
            put("jwt.leeway", &nanos(leeway));
        }
        let mut callers: Vec<&CallerConfig> = callers.iter().collect();
        callers.sort_by(|a, b| a.name.cmp(&b.name));
        for caller in callers {
            let CallerConfig {
                name,
                spiffe_id,
                jwt_subject,
                max_concurrent,
                rate_limit_rps,
                burst,
                key_sha256,
                limit_scope,
            } = caller;
            let mut keys: Vec<String> = key_sha256.iter().map(hex::encode).collect();
            keys.sort();
            // Debug quoting: a name cannot pass for another caller's line.
            put("callers.name", &format!("{name:?}"));
            put("callers.key_sha256", &keys.join(","));
            put("callers.spiffe_id", &format!("{spiffe_id:?}"));
            put("callers.jwt_subject", &format!("{jwt_subject:?}"));
            put("callers.rate_limit_rps", rate_limit_rps);
            put("callers.burst", burst);
            put("callers.max_concurrent", max_concurrent);
            put("callers.limit_scope", &format!("{limit_scope:?}"));
        }
        let digest = Sha256::digest(text.as_bytes());
        hex::encode(&digest[..8])
    }
}

/// `[redis]`: `None` without URLs. Key names embed `key_prefix` and `upstream.client_id`, so
/// neither may hold a brace (a Redis Cluster hash tag would then put the whole fleet's keys in
/// one slot) or white space.
fn redis_config(raw: &RawRedis, client_id: &str) -> Result<Option<RedisConfig>, ConfigError> {
    let RawRedis {
        urls,
        cluster,
        username,
        password,
        password_file,
        key_prefix,
        timeout,
    } = raw;
    let password = secret("redis.password", password, password_file.as_deref())?;
    if urls.is_empty() {
        return Ok(None);
    }
    for (i, url) in urls.iter().enumerate() {
        let info = redis::IntoConnectionInfo::into_connection_info(url.expose()).map_err(|e| {
            ConfigError::invalid(
                format!("redis.urls[{i}]"),
                format!(
                    "{:?} is not a redis:// or rediss:// URL: {e}",
                    url.redacted()
                ),
            )
        })?;
        if !password.is_empty() && info.redis_settings().password().is_some() {
            return Err(ConfigError::invalid(
                format!("redis.urls[{i}]"),
                "has a password and redis.password is set too; give it in one place",
            ));
        }
    }
    let name_part = |key: &str, value: &str| {
        if value
            .chars()
            .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
        {
            Err(ConfigError::invalid(
                key,
                format!(
                    "{value:?} is part of every Redis key name: it must be without braces, \
                     spaces or control characters"
                ),
            ))
        } else {
            Ok(())
        }
    };
    if key_prefix.is_empty() {
        return Err(ConfigError::invalid(
            "redis.key_prefix",
            "must not be empty",
        ));
    }
    name_part("redis.key_prefix", key_prefix)?;
    // (An empty client id is warned about already: Bill24 would refuse it.)
    name_part("upstream.client_id", client_id)?;
    Ok(Some(RedisConfig {
        urls: urls.clone(),
        cluster: *cluster || urls.len() > 1,
        username: (!username.trim().is_empty()).then(|| username.trim().to_string()),
        password: (!password.is_empty()).then_some(password),
        key_prefix: key_prefix.clone(),
        timeout: nonzero("redis.timeout", *timeout)?,
    }))
}

fn socket_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.trim().parse().map_err(|_| {
        ConfigError::invalid(
            key,
            format!("{value:?} is not an IP:port socket address (e.g. \"0.0.0.0:8080\")"),
        )
    })
}

fn positive(key: &str, value: u64) -> Result<usize, ConfigError> {
    if value == 0 {
        return Err(ConfigError::invalid(key, "must be at least 1"));
    }
    usize::try_from(value).map_err(|_| ConfigError::invalid(key, "is too large"))
}

fn nonzero(key: &str, value: Duration) -> Result<Duration, ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::invalid(key, "must be above 0s"));
    }
    Ok(value)
}

fn fraction(key: &str, value: f64, max: f64) -> Result<f64, ConfigError> {
    if !value.is_finite() || value < 0.0 || value > max {
        return Err(ConfigError::invalid(
            key,
            format!("{value} is out of range (0 to {max})"),
        ));
    }
    Ok(value)
}

fn base_url(key: &str, value: &str) -> Result<String, ConfigError> {
    let trimmed = value.trim().trim_end_matches('/');
    let uri: http::Uri = trimmed
        .parse()
        .map_err(|e| ConfigError::invalid(key, format!("{value:?} is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(ConfigError::invalid(
                key,
                format!("{value:?} must start with https:// or http://"),
            ));
        }
    }
    if uri.authority().is_none() {
        return Err(ConfigError::invalid(key, format!("{value:?} has no host")));
    }
    if uri.query().is_some() {
        return Err(ConfigError::invalid(
            key,
            format!("{value:?} must not have a query string"),
        ));
    }
    Ok(trimmed.to_string())
}

fn read_file(key: &str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::invalid(key, format!("cannot read {path}: {e}")))
}

/// The CA certificates of the PEM file at `path` (config key `key`): at least one, each usable
/// as a trust anchor.
fn ca_file(key: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = bill24::tls::certificates(&read_file(key, path)?)
        .map_err(|e| ConfigError::invalid(key, format!("{path} {e}")))?;
    bill24::tls::check_roots(&certs)
        .map_err(|e| ConfigError::invalid(key, format!("{path}: {e}")))?;
    Ok(certs)
}

/// A certificate file and its key file, each given as (config key, path): set both or
/// neither, and the key must belong to the certificate. `None` when neither is set.
fn cert_and_key<'a>(
    (cert_key, cert_path): (&str, &'a str),
    (key_key, key_path): (&str, &'a str),
) -> Result<Option<(bill24::tls::ClientIdentity, &'a str, &'a str)>, ConfigError> {
    let (cert_path, key_path) = match (cert_path.trim(), key_path.trim()) {
        ("", "") => return Ok(None),
        (_, "") => {
            return Err(ConfigError::invalid(
                key_key,
                format!("is not set while {cert_key} is; set both or neither"),
            ));
        }
        ("", _) => {
            return Err(ConfigError::invalid(
                cert_key,
                format!("is not set while {key_key} is; set both or neither"),
            ));
        }
        pair => pair,
    };
    let cert = read_file(cert_key, cert_path)?;
    let key = read_file(key_key, key_path)?;
    let identity = bill24::tls::ClientIdentity::from_pem(&cert, &key).map_err(|e| match e {
        bill24::tls::IdentityError::Certificate(why) => {
            ConfigError::invalid(cert_key, format!("{cert_path} {why}"))
        }
        bill24::tls::IdentityError::Key(why) => {
            ConfigError::invalid(key_key, format!("{key_path} {why}"))
        }
        bill24::tls::IdentityError::Mismatch => ConfigError::invalid(
            key_key,
            format!("{key_path} does not belong to the certificate in {cert_path}"),
        ),
    })?;
    Ok(Some((identity, cert_path, key_path)))
}

/// `upstream.ca_file`, `upstream.client_cert_file` and `upstream.client_key_file`, read and
/// checked: a CA file must hold at least one usable certificate, the client certificate and
/// key come together and must belong together.
fn upstream_tls(
    ca_file_path: &str,
    client_cert_file: &str,
    client_key_file: &str,
) -> Result<bill24::tls::Tls, ConfigError> {
    let extra_roots = match ca_file_path.trim() {
        "" => Vec::new(),
        path => ca_file("upstream.ca_file", path)?,
    };
    let client_identity = cert_and_key(
        ("upstream.client_cert_file", client_cert_file),
        ("upstream.client_key_file", client_key_file),
    )?
    .map(|(identity, _, _)| identity);
    Ok(bill24::tls::Tls {
        extra_roots,
        client_identity,
    })
}

/// `server.tls_*`: TLS on the main listener when a certificate is set. The files are read and
/// checked here, so a gateway (or `--check-config`) refuses a pair that could not serve.
fn listener_tls(
    cert_file: &str,
    key_file: &str,
    client_ca_file: &str,
) -> Result<Option<ListenerTlsConfig>, ConfigError> {
    let Some((_, cert_path, key_path)) = cert_and_key(
        ("server.tls_cert_file", cert_file),
        ("server.tls_key_file", key_file),
    )?
    else {
        if !client_ca_file.trim().is_empty() {
            return Err(ConfigError::invalid(
                "server.tls_client_ca_file",
                "needs server.tls_cert_file and server.tls_key_file: client certificates \
                 are only asked for over TLS",
            ));
        }
        return Ok(None);
    };
    let client_ca_file = match client_ca_file.trim() {
        "" => None,
        path => {
            ca_file("server.tls_client_ca_file", path)?;
            Some(PathBuf::from(path))
        }
    };
    Ok(Some(ListenerTlsConfig {
        cert_file: PathBuf::from(cert_path),
        key_file: PathBuf::from(key_path),
        client_ca_file,
    }))
}

/// `[jwt]`: `None` without an issuer; otherwise exactly one JWKS source.
fn jwt_config(raw: &RawJwt) -> Result<Option<JwtConfig>, ConfigError> {
    let RawJwt {
        issuer,
        audience,
        jwks_file,
        jwks_url,
        leeway,
    } = raw;
    let issuer = issuer.trim();
    if issuer.is_empty() {
        return Ok(None);
    }
    if audience.trim().is_empty() {
        return Err(ConfigError::invalid(
            "jwt.audience",
            "must not be empty: a token meant for another service would be accepted",
        ));
    }
    if *leeway > Duration::from_secs(300) {
        return Err(ConfigError::invalid(
            "jwt.leeway",
            "must be at most 5m (it extends every token's life)",
        ));
    }
    let jwks_url = jwks_url.expose();
    let jwks = match (jwks_file.trim(), jwks_url.trim()) {
        ("", "") => {
            return Err(ConfigError::invalid(
                "jwt.jwks_file",
                "or jwt.jwks_url must be set when jwt.issuer is: the keys that sign the tokens",
            ));
        }
        (_, url) if !url.is_empty() && !jwks_file.trim().is_empty() => {
            return Err(ConfigError::invalid(
                "jwt.jwks_url",
                "is set and so is jwt.jwks_file; give one of them",
            ));
        }
        (file, "") => {
            std::fs::metadata(file).map_err(|e| {
                ConfigError::invalid("jwt.jwks_file", format!("cannot read {file}: {e}"))
            })?;
            JwksSource::File(PathBuf::from(file))
        }
        (_, url) => {
            let uri: http::Uri = url
                .parse()
                .map_err(|_| ConfigError::invalid("jwt.jwks_url", "is not a URL"))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(ConfigError::invalid(
                    "jwt.jwks_url",
                    "must be an http:// or https:// URL with a host",
                ));
            }
            JwksSource::Url(uri)
        }
    };
    Ok(Some(JwtConfig {
        issuer: issuer.to_string(),
        audience: audience.trim().to_string(),
        jwks,
        leeway: *leeway,
    }))
}

/// `upstream.proxy`: empty (the environment decides), or `http://[user:pass@]host:port`.
fn proxy_url(key: &str, url: &SecretUrl) -> Result<Option<Secret>, ConfigError> {
    let text = url.expose().trim();
    if text.is_empty() {
        return Ok(None);
    }
    let shown = url.redacted();
    let uri: http::Uri = text
        .parse()
        .map_err(|_| ConfigError::invalid(key, format!("{shown:?} is not a URL")))?;
    if uri.scheme_str() != Some("http") {
        return Err(ConfigError::invalid(
            key,
            format!("{shown:?} must be http://[user:pass@]host:port (an HTTP CONNECT proxy)"),
        ));
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let has_port = uri.port_u16().is_some();
    if host_port.is_empty() || !has_port {
        return Err(ConfigError::invalid(
            key,
            format!("{shown:?} must name a host and a port: http://[user:pass@]host:port"),
        ));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(ConfigError::invalid(
            key,
            format!("{shown:?} must not have a path or query"),
        ));
    }
    Ok(Some(Secret::new(text)))
}

/// A secret given inline or as `<key>_file` (one trailing newline trimmed), never both.
fn secret(key: &str, inline: &Secret, file: Option<&Path>) -> Result<Secret, ConfigError> {
    match file {
        None => Ok(inline.clone()),
        Some(_) if !inline.is_empty() => Err(ConfigError::invalid(
            format!("{key}` and `{key}_file"),
            "both are set; set only one of them",
        )),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::invalid(
                    format!("{key}_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            Ok(Secret::new(trim_one_newline(&text)))
        }
    }
}

/// `value` without one trailing `\n` (or `\r\n`), as `echo` and most secret stores write it.
pub fn trim_one_newline(value: &str) -> &str {
    let value = value.strip_suffix('\n').unwrap_or(value);
    value.strip_suffix('\r').unwrap_or(value)
}

/// Decodes a 64-digit hex SHA-256.
pub fn key_hash(key: &str, hex_digest: &str) -> Result<KeyHash, ConfigError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digest.trim(), &mut out).map_err(|_| {
        ConfigError::invalid(
            key,
            "must be the 64-digit hex SHA-256 of the key (see `bill24-gateway hash-key`)",
        )
    })?;
    Ok(out)
}

fn callers(raw: &[RawCaller]) -> Result<Vec<CallerConfig>, ConfigError> {
    let mut names = BTreeSet::new();
    let mut hashes: BTreeMap<KeyHash, String> = BTreeMap::new();
    let mut spiffe_ids: BTreeMap<String, String> = BTreeMap::new();
    let mut subjects: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, caller) in raw.iter().enumerate() {
        let RawCaller {
            name,
            key_sha256,
            spiffe_id,
            jwt_subject,
            rate_limit_rps,
            burst,
            max_concurrent,
            limit_scope,
        } = caller;
        let name = name.trim();
        if name.is_empty() {
            return Err(ConfigError::invalid(
                format!("callers[{i}].name"),
                "must not be empty",
            ));
        }
        if !names.insert(name.to_string()) {
            return Err(ConfigError::invalid(
                format!("callers[{i}].name"),
                format!("{name:?} is used by another caller"),
            ));
        }
        let listed = key_sha256.as_slice();
        let spiffe_id = spiffe_id.trim();
        let jwt_subject = jwt_subject.trim();
        if listed.is_empty() && spiffe_id.is_empty() && jwt_subject.is_empty() {
            return Err(ConfigError::invalid(
                format!("callers[{i}].key_sha256"),
                "needs at least one key hash, or a spiffe_id or jwt_subject to identify the \
                 caller by",
            ));
        }
        if !spiffe_id.is_empty() {
            let key = format!("callers[{i}].spiffe_id");
            let well_formed = spiffe_id
                .strip_prefix("spiffe://")
                .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
                && !spiffe_id
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control());
            if !well_formed {
                return Err(ConfigError::invalid(
                    key,
                    format!("{spiffe_id:?} is not a SPIFFE ID (spiffe://<trust domain>/<path>)"),
                ));
            }
            if let Some(other) = spiffe_ids.insert(spiffe_id.to_string(), name.to_string()) {
                return Err(ConfigError::invalid(
                    key,
                    format!("{spiffe_id:?} is also the spiffe_id of caller {other:?}"),
                ));
            }
        }
        if !jwt_subject.is_empty() {
            let key = format!("callers[{i}].jwt_subject");
            if jwt_subject.chars().any(char::is_control) {
                return Err(ConfigError::invalid(
                    key,
                    "must not hold control characters",
                ));
            }
            if let Some(other) = subjects.insert(jwt_subject.to_string(), name.to_string()) {
                return Err(ConfigError::invalid(
                    key,
                    format!("{jwt_subject:?} is also the jwt_subject of caller {other:?}"),
                ));
            }
        }
        let mut keys = Vec::with_capacity(listed.len());
        for (j, hex_digest) in listed.iter().enumerate() {
            let key = if matches!(key_sha256, KeyHashes::One(_)) {
                format!("callers[{i}].key_sha256")
            } else {
                format!("callers[{i}].key_sha256[{j}]")
            };
            let hash = key_hash(&key, hex_digest)?;
            if let Some(other) = hashes.insert(hash, name.to_string())
                && other != name
            {
                return Err(ConfigError::invalid(
                    key,
                    format!("the same key is also configured for caller {other:?}"),
                ));
            }
            keys.push(hash);
        }
        if !rate_limit_rps.is_finite() || *rate_limit_rps < 0.0 {
            return Err(ConfigError::invalid(
                format!("callers[{i}].rate_limit_rps"),
                "must be 0 (unlimited) or a positive rate",
            ));
        }
        out.push(CallerConfig {
            name: Arc::from(name),
            key_sha256: keys,
            spiffe_id: (!spiffe_id.is_empty()).then(|| Arc::from(spiffe_id)),
            jwt_subject: (!jwt_subject.is_empty()).then(|| Arc::from(jwt_subject)),
            rate_limit_rps: *rate_limit_rps,
            burst: *burst,
            max_concurrent: *max_concurrent,
            limit_scope: *limit_scope,
        });
    }
    Ok(out)
}

/// The effective configuration as TOML, every secret shown as `[redacted]`.
pub fn to_redacted_toml(raw: &RawConfig) -> Result<String, toml::ser::Error> {
    toml::to_string_pretty(raw)
}

#[cfg(test)]
// figment's `Jail` closures return its (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    const HASH_A: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";
    const HASH_B: &str = "fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9";

    fn load_in_jail(path: Option<&str>) -> Result<Loaded, String> {
        load(path.map(Path::new)).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_equal_config_default_toml() {
        let text = include_str!("../config/default.toml");
        let parsed: RawConfig = Figment::from(Toml::string(text))
            .extract()
            .expect("config/default.toml parses");
        assert_eq!(parsed, RawConfig::default());
    }

    #[test]
    fn built_in_defaults_validate() {
        Jail::expect_with(|_| {
            let loaded = load_in_jail(None)?;
            let c = &loaded.config;
            assert_eq!(c.server.listen, "0.0.0.0:8080".parse().expect("addr"));
            assert_eq!(
                c.server.admin_listen,
                "127.0.0.1:9090".parse().expect("addr")
            );
            assert_eq!(c.server.max_body_bytes, 8192);
            assert_eq!(c.server.request_timeout, Duration::from_secs(10));
            assert_eq!(c.upstream.base_url, "https://merchantapi-demo.bill24.io");
            assert_eq!(c.upstream.token_refresh_margin, Duration::from_secs(300));
            assert_eq!(c.cache.ttl, Duration::from_secs(10));
            assert_eq!(c.log.format, LogFormat::Json);
            assert!(loaded.file.is_none());
            assert!(c.warnings().iter().any(|w| w.contains("no [[callers]]")));
            Ok(())
        });
    }

    #[test]
    fn layers_defaults_then_file_then_env() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "gw.toml",
                r#"
                [server]
                listen = "127.0.0.1:1234"
                request_timeout = "500ms"
                [cache]
                ttl = "5m"
                negative_ttl = "2s"
                [upstream]
                client_id = "from-file"
                "#,
            )?;
            jail.set_env("GATEWAY_CACHE__TTL", "1s");
            jail.set_env("GATEWAY_UPSTREAM__CLIENT_SECRET", "s3cr3t");
            jail.set_env("GATEWAY_UPSTREAM__MAX_IN_FLIGHT", "7");
            let loaded = load_in_jail(Some("gw.toml"))?;
            let c = loaded.config;
            assert_eq!(c.server.listen.port(), 1234);
            assert_eq!(c.server.request_timeout, Duration::from_millis(500));
            assert_eq!(c.cache.ttl, Duration::from_secs(1), "env wins over file");
            assert_eq!(c.cache.negative_ttl, Duration::from_secs(2));
            assert_eq!(c.upstream.client_id, "from-file");
            assert_eq!(c.upstream.client_secret.expose(), "s3cr3t");
            assert_eq!(c.upstream.max_in_flight, 7);
            assert_eq!(
                c.server.max_body_bytes, 8192,
                "untouched keys keep defaults"
            );
            Ok(())
        });
    }

    #[test]
    fn gateway_config_env_names_the_file_and_default_toml_is_read_when_present() {
        Jail::expect_with(|jail| {
            jail.create_dir("config")?;
            jail.create_file("config/default.toml", "[cache]\nttl = \"3s\"\n")?;
            assert_eq!(load_in_jail(None)?.config.cache.ttl, Duration::from_secs(3));

            jail.create_file("other.toml", "[cache]\nttl = \"4s\"\n")?;
            jail.set_env("GATEWAY_CONFIG", "other.toml");
            assert_eq!(load_in_jail(None)?.config.cache.ttl, Duration::from_secs(4));

            jail.create_file("cli.toml", "[cache]\nttl = \"6s\"\n")?;
            let loaded = load_in_jail(Some("cli.toml"))?;
            assert_eq!(
                loaded.config.cache.ttl,
                Duration::from_secs(6),
                "--config wins"
            );
            assert!(
                loaded
                    .warnings
                    .iter()
                    .all(|w| !w.contains("GATEWAY_CONFIG")),
                "GATEWAY_CONFIG is not an unknown variable: {:?}",
                loaded.warnings
            );
            Ok(())
        });
    }

    #[test]
    fn missing_named_file_is_an_error_but_missing_default_is_not() {
        Jail::expect_with(|jail| {
            let err = load_in_jail(Some("nope.toml")).expect_err("missing --config file");
            assert!(
                err.contains("nope.toml") && err.contains("does not exist"),
                "{err}"
            );
            jail.set_env("GATEWAY_CONFIG", "gone.toml");
            let err = load_in_jail(None).expect_err("missing $GATEWAY_CONFIG file");
            assert!(
                err.contains("gone.toml") && err.contains("GATEWAY_CONFIG"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_file_keys_are_errors_naming_the_key() {
        Jail::expect_with(|jail| {
            jail.create_file("a.toml", "[server]\nlisten_addr = \"x\"\n")?;
            let err = load_in_jail(Some("a.toml")).expect_err("unknown key");
            assert!(err.contains("`server.listen_addr`"), "{err}");
            jail.create_file("b.toml", "[serverz]\n")?;
            let err = load_in_jail(Some("b.toml")).expect_err("unknown section");
            assert!(err.contains("`serverz`"), "{err}");
            jail.create_file(
                "c.toml",
                &format!("[[callers]]\nname = \"a\"\nkey_sha256 = \"{HASH_A}\"\nrole = \"x\"\n"),
            )?;
            let err = load_in_jail(Some("c.toml")).expect_err("unknown caller key");
            assert!(err.contains("callers.0.role"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_env_vars_are_warnings_not_errors() {
        Jail::expect_with(|jail| {
            jail.set_env("GATEWAY_PORT", "tcp://10.0.0.1:8080");
            jail.set_env("GATEWAY_SERVICE_HOST", "10.0.0.1");
            jail.set_env("GATEWAY_SERVER__NOPE", "1");
            let loaded = load_in_jail(None)?;
            for var in [
                "GATEWAY_PORT",
                "GATEWAY_SERVICE_HOST",
                "GATEWAY_SERVER__NOPE",
            ] {
                assert!(
                    loaded.warnings.iter().any(|w| w.contains(var)),
                    "{var} warned: {:?}",
                    loaded.warnings
                );
            }
            Ok(())
        });
    }

    #[test]
    fn env_text_keys_stay_text_and_callers_parse_from_env() {
        Jail::expect_with(|jail| {
            jail.set_env("GATEWAY_UPSTREAM__CLIENT_ID", "007");
            jail.set_env("GATEWAY_UPSTREAM__MERCHANT_TOKEN", "12345");
            jail.set_env(
                "GATEWAY_CALLERS",
                format!(
                    "[{{name=\"orders\",key_sha256=\"{HASH_A}\"}},{{name=\"billing\",key_sha256=[\"{HASH_B}\"],rate_limit_rps=5}}]"
                ),
            );
            jail.create_file(
                "gw.toml",
                &format!("[[callers]]\nname = \"file-caller\"\nkey_sha256 = \"{HASH_B}\"\n"),
            )?;
            let c = load_in_jail(Some("gw.toml"))?.config;
            assert_eq!(c.upstream.client_id, "007");
            assert_eq!(c.upstream.merchant_token.expose(), "12345");
            let names: Vec<&str> = c.callers.iter().map(|c| &*c.name).collect();
            assert_eq!(names, ["orders", "billing"], "env list replaces the file's");
            assert_eq!(c.callers[1].rate_limit_rps, 5.0);
            Ok(())
        });
    }

    #[test]
    fn durations_are_humantime_strings() {
        Jail::expect_with(|jail| {
            jail.create_file("a.toml", "[upstream]\ntimeout = 5\n")?;
            let err = load_in_jail(Some("a.toml")).expect_err("bare number");
            assert!(err.contains("upstream.timeout"), "{err}");
            jail.set_env("GATEWAY_UPSTREAM__TIMEOUT", "soon");
            let err = load_in_jail(None).expect_err("not a duration");
            assert!(err.contains("upstream.timeout"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn cache_max_bytes_is_a_whole_number_of_at_least_one_mib() {
        Jail::expect_with(|jail| {
            assert_eq!(load_in_jail(None)?.config.cache.max_bytes, 128 << 20);
            jail.create_file("a.toml", "[cache]\nmax_bytes = 1048576\n")?;
            assert_eq!(
                load_in_jail(Some("a.toml"))?.config.cache.max_bytes,
                1 << 20
            );
            jail.set_env("GATEWAY_CACHE__MAX_BYTES", "268435456");
            assert_eq!(
                load_in_jail(Some("a.toml"))?.config.cache.max_bytes,
                256 << 20
            );
            for bad in ["lots", "1e9", "-5", "1048575"] {
                jail.set_env("GATEWAY_CACHE__MAX_BYTES", bad);
                let err = load_in_jail(None).expect_err(bad);
                assert!(err.contains("cache.max_bytes"), "{bad}: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn validation_names_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[server]\nlisten = \"nope\"\n", "server.listen"),
            ("[server]\nmax_body_bytes = 0\n", "server.max_body_bytes"),
            (
                "[server]\nrequest_timeout = \"0s\"\n",
                "server.request_timeout",
            ),
            (
                "[server]\nadmin_key_sha256 = \"abc\"\n",
                "server.admin_key_sha256",
            ),
            ("[upstream]\nbase_url = \"ftp://x\"\n", "upstream.base_url"),
            (
                "[upstream]\nbase_url = \"not a url\"\n",
                "upstream.base_url",
            ),
            ("[upstream]\nmax_in_flight = 0\n", "upstream.max_in_flight"),
            ("[upstream]\nretry_budget = -1.0\n", "upstream.retry_budget"),
            ("[cache]\nttl_jitter = 1.0\n", "cache.ttl_jitter"),
            ("[cache]\nmax_bytes = 1048575\n", "cache.max_bytes"),
            ("[cache]\nmax_bytes = 0\n", "cache.max_bytes"),
            ("[cache]\nmax_bytes = -1\n", "cache.max_bytes"),
            ("[cache]\nmax_bytes = 1.5\n", "cache.max_bytes"),
            ("[cache]\nmax_bytes = \"128MiB\"\n", "cache.max_bytes"),
            ("[log]\nformat = \"xml\"\n", "log.format"),
            ("[log]\nlevel = \"info,[\"\n", "log.level"),
            ("[log]\naccess_sample = 1.5\n", "log.access_sample"),
            (
                "[[callers]]\nname = \"a\"\nkey_sha256 = \"zz\"\n",
                "callers[0].key_sha256",
            ),
            ("[[callers]]\nkey_sha256 = \"zz\"\n", "callers.0"),
            (
                &format!(
                    "[[callers]]\nname = \"a\"\nkey_sha256 = \"{HASH_A}\"\n[[callers]]\nname = \"a\"\nkey_sha256 = \"{HASH_B}\"\n"
                ),
                "callers[1].name",
            ),
            (
                &format!(
                    "[[callers]]\nname = \"a\"\nkey_sha256 = \"{HASH_A}\"\n[[callers]]\nname = \"b\"\nkey_sha256 = [\"{HASH_B}\", \"{HASH_A}\"]\n"
                ),
                "callers[1].key_sha256[1]",
            ),
        ];
        for (toml, key) in cases {
            Jail::expect_with(|jail| {
                jail.create_file("c.toml", toml)?;
                let err = load_in_jail(Some("c.toml")).expect_err(toml);
                assert!(err.contains(key), "{toml:?}: {err:?} should name {key}");
                Ok(())
            });
        }
    }

    #[test]
    fn secrets_from_files_trim_one_newline_and_both_forms_is_an_error() {
        Jail::expect_with(|jail| {
            jail.create_file("token", "tok-en\n\n")?;
            jail.create_file("secret", "s3cr3t\r\n")?;
            jail.create_file(
                "gw.toml",
                "[upstream]\nmerchant_token_file = \"token\"\nclient_secret_file = \"secret\"\n",
            )?;
            let c = load_in_jail(Some("gw.toml"))?.config;
            assert_eq!(c.upstream.merchant_token.expose(), "tok-en\n");
            assert_eq!(c.upstream.client_secret.expose(), "s3cr3t");

            jail.set_env("GATEWAY_UPSTREAM__MERCHANT_TOKEN", "inline");
            let err = load_in_jail(Some("gw.toml")).expect_err("both forms");
            assert!(
                err.contains("upstream.merchant_token`")
                    && err.contains("upstream.merchant_token_file"),
                "{err}"
            );

            jail.create_file("g2.toml", "[upstream]\nclient_secret_file = \"missing\"\n")?;
            let err = load_in_jail(Some("g2.toml")).expect_err("unreadable");
            assert!(err.contains("upstream.client_secret_file"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn redacted_toml_hides_every_secret() {
        Jail::expect_with(|jail| {
            jail.create_file("tok", "file-token-value")?;
            jail.set_env("GATEWAY_UPSTREAM__CLIENT_SECRET", "very-secret-value");
            jail.set_env("GATEWAY_UPSTREAM__MERCHANT_TOKEN_FILE", "tok");
            let loaded = load_in_jail(None)?;
            // The file's secret is in the validated config, where it is used...
            assert_eq!(
                loaded.config.upstream.merchant_token.expose(),
                "file-token-value"
            );
            // ...and shows in none of the ways a config is printed.
            let text = to_redacted_toml(&loaded.raw).map_err(|e| e.to_string())?;
            let debug = format!("{loaded:?}");
            for printed in [&text, &debug] {
                assert!(!printed.contains("very-secret-value"), "{printed}");
                assert!(!printed.contains("file-token-value"), "{printed}");
            }
            assert!(text.contains("client_secret = \"[redacted]\""), "{text}");
            assert!(text.contains("merchant_token_file = \"tok\""), "{text}");
            // The printed TOML is itself a valid config.
            let again: RawConfig = Figment::from(Toml::string(&text))
                .extract()
                .map_err(|e| e.to_string())?;
            assert_eq!(again.server, loaded.raw.server);
            Ok(())
        });
    }

    #[test]
    fn keys_written_out_are_told_from_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file("none.toml", "[cache]\nttl = \"1s\"\n")?;
            assert_eq!(
                load_in_jail(Some("none.toml"))?.explicit,
                Explicit::default()
            );
            jail.create_file(
                "both.toml",
                "callers = []\n[server]\nadmin_key_sha256 = \"\"\n",
            )?;
            let loaded = load_in_jail(Some("both.toml"))?;
            assert!(loaded.config.callers.is_empty());
            assert_eq!(
                loaded.explicit,
                Explicit {
                    callers: true,
                    admin_key: true
                }
            );
            jail.set_env("GATEWAY_CALLERS", "[]");
            assert!(load_in_jail(Some("none.toml"))?.explicit.callers);
            Ok(())
        });
    }

    #[test]
    fn known_keys_cover_every_field() {
        let keys = known_keys();
        for key in [
            "server.listen",
            "server.admin_key_sha256",
            "upstream.client_secret",
            "upstream.client_secret_file",
            "upstream.retry_budget",
            "cache.ttl_jitter",
            "log.level",
            "callers",
        ] {
            assert!(keys.contains_key(key), "{key}");
        }
        assert_eq!(keys["upstream.client_id"], KeyKind::Text);
        assert_eq!(keys["upstream.max_in_flight"], KeyKind::Parsed);
        assert_eq!(keys["callers"], KeyKind::Parsed);
    }

    fn validated(toml: &str) -> Config {
        let raw: RawConfig = Figment::from(Serialized::defaults(RawConfig::default()))
            .merge(Toml::string(toml))
            .extract()
            .expect("parses");
        raw.validate().expect("valid")
    }

    /// `[[callers]]` tables: (name, key hash, more keys).
    fn callers_toml(callers: &[(&str, &str, &str)]) -> String {
        callers
            .iter()
            .map(|(name, hash, more)| {
                format!("[[callers]]\nname = \"{name}\"\nkey_sha256 = \"{hash}\"\n{more}\n")
            })
            .collect()
    }

    /// A shared tier and `callers`, with more `[upstream]` and `[cache]` keys.
    fn fleet_config(upstream: &str, cache: &str, callers: &[(&str, &str, &str)]) -> Config {
        validated(&format!(
            "[upstream]\nclient_id = \"c\"\n{upstream}\n[cache]\n{cache}\n\
             [redis]\nurls = [\"redis://127.0.0.1:1\"]\n{}",
            callers_toml(callers)
        ))
    }

    #[test]
    fn fleet_digest_covers_what_a_fleet_must_agree_on() {
        let two = [("a", HASH_A, ""), ("b", HASH_B, "")];
        let base = fleet_config("", "", &two).fleet_digest();
        assert_eq!(base.len(), 16);
        assert!(base.bytes().all(|b| b.is_ascii_hexdigit()), "{base}");
        assert_eq!(base, fleet_config("", "", &two).fleet_digest(), "stable");

        // What the replicas must agree on changes it.
        let upstream = |toml: &str| fleet_config(toml, "", &two);
        let cache = |toml: &str| fleet_config("", toml, &two);
        let callers = |callers: &[(&str, &str, &str)]| fleet_config("", "", callers);
        let mut prefix = fleet_config("", "", &two);
        if let Some(redis) = &mut prefix.redis {
            redis.key_prefix = "other".into();
        }
        for (what, config) in [
            ("cache.ttl", cache("ttl = \"11s\"")),
            ("cache.negative_ttl", cache("negative_ttl = \"1s\"")),
            ("cache.stale_if_error", cache("stale_if_error = \"1m\"")),
            ("upstream.base_url", upstream("base_url = \"http://h:1\"")),
            ("upstream.retries", upstream("retries = 0")),
            (
                "upstream.circuit_cooldown",
                upstream("circuit_cooldown = \"9s\""),
            ),
            ("upstream.max_in_flight", upstream("max_in_flight = 3")),
            ("a caller less", callers(&two[..1])),
            (
                "a caller's key",
                callers(&[("a", HASH_B, ""), ("b", HASH_A, "")]),
            ),
            (
                "a caller's limit",
                callers(&[("a", HASH_A, "burst = 5"), two[1]]),
            ),
            ("redis.key_prefix", prefix),
        ] {
            assert_ne!(config.fleet_digest(), base, "{what}");
        }

        // What is each replica's own does not; nor does the order of the callers.
        let mut own = fleet_config(
            "merchant_token = \"m\"\nclient_secret = \"s\"",
            "max_entries = 7",
            &[two[1], two[0]],
        );
        own.server.listen = "127.0.0.1:1".parse().expect("addr");
        own.server.admin_listen = "127.0.0.1:2".parse().expect("addr");
        own.server.worker_threads = 3;
        own.server.admin_key_sha256 = Some([7; 32]);
        own.log.level = "debug".into();
        own.log.format = LogFormat::Text;
        if let Some(redis) = &mut own.redis {
            redis.urls = vec![SecretUrl::new("redis://10.0.0.1:6379")];
            redis.timeout = Duration::from_secs(1);
        }
        assert_eq!(own.fleet_digest(), base);
    }
}
