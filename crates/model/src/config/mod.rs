//! The configuration file: the two sides, the entity maps and the Kafka settings.
//!
//! One TOML file, loaded with [`Config::load`], overridden by a few
//! `DUALWRITE_*` environment variables (see [`ENV_OVERRIDES`]) and checked by
//! [`Config::validate`], whose errors name the file, the map and the field.
//! Secrets (database passwords, Kafka credentials) are never written in the
//! file: they are read from an environment variable or a file and kept in a
//! [`Secret`], whose `Debug` output is redacted.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

pub use crate::side::{Direction, SideId};
use crate::transform::{Convert, PerSide, TextValue, Transform, Unmapped};

mod field;
mod load;
#[cfg(test)]
mod tests;
mod validate;

pub use load::ConfigError;
pub use validate::Problem;

/// The demo configuration (`deploy/demo/dualwrite.toml`), for tests.
#[cfg(any(test, feature = "test-fixtures"))]
pub const DEMO_CONFIG: &str = include_str!("../../../../deploy/demo/dualwrite.toml");

/// Environment variables that override settings of the file, with the setting they replace.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("DUALWRITE_BOOTSTRAP_SERVERS", "kafka.bootstrap_servers"),
    ("DUALWRITE_TOPIC_PREFIX", "kafka.topic_prefix"),
];

/// Most instances of one side's applier.
pub const MAX_INSTANCES: usize = 16;

/// Prefix of environment variables that set Kafka client properties.
pub const KAFKA_ENV_PREFIX: &str = "DUALWRITE_KAFKA_";

/// Kafka client properties that carry secrets: they must come from `secret_properties`.
const SECRET_PROPERTY_HINTS: &[&str] = &["password", "secret", "sasl.oauthbearer.config"];

/// The whole configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub sides: Sides,
    #[serde(default, rename = "map")]
    pub maps: Vec<MapConfig>,
    #[serde(default)]
    pub capture: CaptureSettings,
    #[serde(default)]
    pub apply: ApplySettings,
    #[serde(default)]
    pub pause_buffer: PauseBufferSettings,
    #[serde(default)]
    pub control: ControlSettings,
    #[serde(default)]
    pub errors: ErrorSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]` of the Kafka cluster.
    pub bootstrap_servers: String,
    /// Every topic the project uses starts with this prefix.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// Partitions of the topics the project creates.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of the topics the project creates.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// Largest record (key and value) the services produce. A larger one
    /// (a very large row) goes to the errors topic instead, with its key.
    /// Keep it below the broker's `message.max.bytes` and the topics'
    /// `max.message.bytes` (Kafka's defaults: about 1 MiB).
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// librdkafka properties given to every client (e.g. `security.protocol`).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties whose values are secrets (e.g. `sasl.password`).
    #[serde(default)]
    pub secret_properties: BTreeMap<String, Secret>,
    /// Properties set from the environment, with the variable that set each.
    #[serde(skip)]
    pub properties_from_env: BTreeMap<String, String>,
}

fn default_topic_prefix() -> String {
    "dualwrite".to_owned()
}
fn default_max_record_bytes() -> usize {
    900_000
}
fn default_partitions() -> i32 {
    3
}
fn default_replication_factor() -> i32 {
    1
}

/// The two systems of record. By convention `left` is the
/// finance-and-operations-like side and `right` the Dataverse-like side, which
/// is the default conflict master.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sides {
    pub left: SideConfig,
    pub right: SideConfig,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SideKind {
    Postgres,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SideConfig {
    /// Short name, used in topic names, records and metrics (`[a-z0-9_]`).
    pub name: String,
    pub kind: SideKind,
    pub connection: PgConnection,
    /// Logical replication slot the capturer reads (default `dualwrite_<prefix>_<name>`).
    #[serde(default)]
    pub slot: Option<String>,
    /// Replication origin the applier writes under, so that the capturer of
    /// this side skips the applier's own writes (default `dualwrite_<prefix>_<name>`).
    #[serde(default)]
    pub origin: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgConnection {
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    pub dbname: String,
    pub user: String,
    #[serde(default)]
    pub password: Option<Secret>,
    /// As libpq: `disable` (default), `prefer`, `require` (encrypt, no
    /// verification), `verify-ca` (the server's certificate chains to
    /// `sslrootcert`) or `verify-full` (and names `host`).
    #[serde(default)]
    pub sslmode: Option<String>,
    /// CA certificates (PEM file) for `verify-ca` and `verify-full`, or
    /// `system` for the system's trust store.
    #[serde(default)]
    pub sslrootcert: Option<String>,
    /// Client certificate (PEM file), for certificate authentication; with `sslkey`.
    #[serde(default)]
    pub sslcert: Option<PathBuf>,
    /// The client certificate's private key (PEM file).
    #[serde(default)]
    pub sslkey: Option<PathBuf>,
}

/// The `sslmode` values, as libpq names them.
pub const SSL_MODES: &[&str] = &["disable", "prefer", "require", "verify-ca", "verify-full"];

impl PgConnection {
    /// Problems of the TLS settings, as (setting, message).
    pub fn tls_problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mode = self.sslmode.as_deref().unwrap_or("disable");
        if !SSL_MODES.contains(&mode) {
            out.push((
                "sslmode",
                format!("`{mode}` is not one of {}", SSL_MODES.join(", ")),
            ));
        }
        let verifies = mode.starts_with("verify-");
        if verifies && self.sslrootcert.is_none() {
            out.push((
                "sslrootcert",
                format!("sslmode `{mode}` needs the CA certificates to verify the server with: a PEM file, or \"system\""),
            ));
        }
        if self.sslrootcert.is_some() && !verifies {
            out.push((
                "sslrootcert",
                format!("is used only by sslmode verify-ca or verify-full, not `{mode}`: set sslmode = \"verify-full\""),
            ));
        }
        if self.sslcert.is_some() != self.sslkey.is_some() {
            out.push(("sslcert", "sslcert and sslkey go together".to_owned()));
        }
        if self.sslcert.is_some() && mode == "disable" {
            out.push((
                "sslcert",
                "a client certificate needs TLS: set sslmode".to_owned(),
            ));
        }
        out
    }
}

fn default_pg_port() -> u16 {
    5432
}

/// The `[kafka]` and `[sides]` sections of a minimal configuration (two
/// PostgreSQL sides, `fno` and `dataverse`), for unit tests here and in
/// other crates: append `[[map]]` sections and [`Config::parse`] it.
#[doc(hidden)]
#[cfg(any(test, feature = "test-fixtures"))]
pub const TEST_SIDES: &str = r#"
[kafka]
bootstrap_servers = "k:9092"
[sides.left]
name = "fno"
kind = "postgres"
connection = { host = "h", dbname = "a", user = "u" }
[sides.right]
name = "dataverse"
kind = "postgres"
connection = { host = "h", dbname = "b", user = "u" }
"#;

/// One entity map: links one entity on each side.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapConfig {
    /// Map name (`[a-z0-9_]`), used in topic names.
    pub name: String,
    pub left: EntityRef,
    pub right: EntityRef,
    /// Field mappings. The key fields must be mapped to each other, both ways.
    #[serde(default, rename = "field")]
    pub fields: Vec<FieldMapping>,
    /// Maps this one needs running first (e.g. customers need customer groups).
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Side whose values win a conflict (a side name; default: the right side).
    #[serde(default)]
    pub conflict_master: Option<String>,
    /// Whether a run copies pre-existing rows first (default true).
    #[serde(default = "default_true")]
    pub initial_sync: bool,
    /// Overrides `[pause_buffer.auto_pause]` for this map.
    #[serde(default)]
    pub auto_pause: Option<AutoPause>,
    /// Company (legal entity) scoping: only records whose `company_field`
    /// (set on each side's entity) holds one of these companies sync
    /// (compared case-insensitively). Empty: every company.
    #[serde(default)]
    pub companies: Vec<String>,
    /// What a record that stops matching its side's scope (filter or
    /// companies) does to the other side: `keep` it (default) or `delete` it.
    #[serde(default)]
    pub on_filter_exit: FilterExit,
    /// Fingerprint of the map's mapping (see [`crate::version`]), set by [`Config::parse`].
    #[serde(skip)]
    pub version: String,
}

/// What happens on the other side when a record stops matching the scope
/// (filter or companies) of its side (see [`crate::filter`]).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FilterExit {
    /// The other side keeps its copy, which no longer receives changes.
    #[default]
    Keep,
    /// The other side's copy is deleted.
    Delete,
}

fn default_true() -> bool {
    true
}

/// An entity (table) on one side and its alternate key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityRef {
    /// `schema.table`, or `table` in schema `public`.
    pub entity: String,
    /// The alternate key fields that identify a record across both sides.
    pub key: Vec<String>,
    /// Only records for which this CEL expression over the side's columns
    /// is true sync from this side (see [`crate::filter`]).
    #[serde(default)]
    pub filter: Option<String>,
    /// The column holding the company (legal entity) of a record, for the
    /// map's `companies` scoping (e.g. `dataareaid`).
    #[serde(default)]
    pub company_field: Option<String>,
}

impl EntityRef {
    /// `schema.table` with the default schema filled in.
    pub fn qualified(&self) -> String {
        qualify(&self.entity)
    }
}

/// `schema.table` with the default schema (`public`) filled in.
pub fn qualify(entity: &str) -> String {
    if entity.contains('.') {
        entity.to_owned()
    } else {
        format!("public.{entity}")
    }
}

/// One field mapping: a column on each side, the direction it syncs in and
/// its transforms (see [`crate::transform`]). A field with a `constant`
/// names the target column only (the other name is empty) and syncs
/// towards it (its direction defaults accordingly).
#[derive(Debug, Deserialize, Clone)]
#[serde(from = "RawFieldMapping")]
pub struct FieldMapping {
    pub left: String,
    pub right: String,
    pub direction: Direction,
    pub transform: Transform,
}

/// A `[[map.field]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFieldMapping {
    #[serde(default)]
    left: Option<String>,
    #[serde(default)]
    right: Option<String>,
    #[serde(default)]
    direction: Option<Direction>,
    #[serde(default)]
    value_map: Option<BTreeMap<String, TextValue>>,
    #[serde(default)]
    unmapped: Option<Unmapped>,
    #[serde(default)]
    default: Option<PerSide>,
    #[serde(default)]
    constant: Option<TextValue>,
    #[serde(default)]
    convert: Option<Convert>,
}

impl From<RawFieldMapping> for FieldMapping {
    fn from(r: RawFieldMapping) -> FieldMapping {
        let (left, right) = (r.left.unwrap_or_default(), r.right.unwrap_or_default());
        // A constant flows towards the only column it names.
        let direction =
            r.direction
                .unwrap_or(match (&r.constant, left.is_empty(), right.is_empty()) {
                    (Some(_), true, false) => Direction::LeftToRight,
                    (Some(_), false, true) => Direction::RightToLeft,
                    _ => Direction::Both,
                });
        FieldMapping {
            left,
            right,
            direction,
            transform: Transform {
                value_map: r
                    .value_map
                    .map(|m| m.into_iter().map(|(k, v)| (k, v.0)).collect()),
                unmapped: r.unmapped,
                default: r.default,
                constant: r.constant.map(|c| c.0),
                convert: r.convert,
            },
        }
    }
}

/// Capturer settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureSettings {
    /// How long the capturer waits before polling again when nothing changed.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Most changes read from the slot at once (whole transactions are
    /// always read), and most records published at once: a larger read is
    /// published in chunks as it streams.
    #[serde(default = "default_capture_batch")]
    pub max_batch: i32,
}

fn default_poll_interval_ms() -> u64 {
    50
}
fn default_capture_batch() -> i32 {
    5000
}

impl Default for CaptureSettings {
    fn default() -> Self {
        CaptureSettings {
            poll_interval_ms: default_poll_interval_ms(),
            max_batch: default_capture_batch(),
        }
    }
}

/// Applier settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplySettings {
    /// Most records written in one target transaction.
    #[serde(default = "default_apply_batch")]
    pub max_batch: usize,
    /// How long to wait for more records before writing a batch.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// How long a change whose related (parent) record is not on the target
    /// yet waits for it before it counts as an error, and how long the new
    /// key of a key change waits for the old key's row to be moved before
    /// it is written as a new row; 0: no wait.
    #[serde(default = "default_parent_wait")]
    pub parent_wait_secs: u64,
    /// How long the bookkeeping of a record the applier deleted is kept
    /// (`dualwrite.record_versions` on each target); 0: forever.
    #[serde(default = "default_bookkeeping_retention")]
    pub bookkeeping_retention_secs: u64,
}

fn default_bookkeeping_retention() -> u64 {
    7 * 24 * 3600
}

fn default_parent_wait() -> u64 {
    60
}

/// 2,000 rather than 500: live sync one way 1.35× and a catch-up's
/// replay 1.22× (BENCHMARKS.md, 2026-12-03), fewer, larger set-based
/// statements per record.
fn default_apply_batch() -> usize {
    2000
}
fn default_linger_ms() -> u64 {
    5
}

impl Default for ApplySettings {
    fn default() -> Self {
        ApplySettings {
            max_batch: default_apply_batch(),
            linger_ms: default_linger_ms(),
            parent_wait_secs: default_parent_wait(),
            bookkeeping_retention_secs: default_bookkeeping_retention(),
        }
    }
}

/// Pause buffer settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseBufferSettings {
    /// Retention of the map topics (`retention.ms`): a paused map's queued
    /// changes older than this are lost. Default: Kafka's, 7 days.
    #[serde(default = "default_retention_ms")]
    pub map_topic_retention_ms: i64,
    /// Warn when a pause has lasted this share of the retention.
    #[serde(default = "default_warn_ratio")]
    pub backlog_warn_ratio: f64,
    /// Pause a map automatically when its errors reach a count within a
    /// window (maps may override it).
    #[serde(default)]
    pub auto_pause: AutoPause,
    /// The drift detector: compares each running map's two sides.
    #[serde(default)]
    pub drift: DriftSettings,
    /// Records' resolver states each map keeps in memory, about (plus
    /// those changed since the last save, up to 14,000); the others are in
    /// a spill file. Default 10,000 (about 30–60 MiB, with the rows of
    /// records in flight).
    #[serde(default = "default_resolver_cache")]
    pub resolver_cache_records: usize,
    /// Where the spill files go (one per map, created empty at each start
    /// and removed at the end; size: about 1 KiB per record changed since
    /// the map was run). Default: the system's temporary directory
    /// (`TMPDIR`, else `/tmp`).
    #[serde(default)]
    pub state_dir: Option<std::path::PathBuf>,
}

/// The drift detector compares both sides of every running map every
/// `interval_secs`, reading `chunk_rows` rows of each side at a time and
/// at most `rows_per_second` rows per side (0: no limit). A difference is
/// reported only when it is still there, unchanged, `confirm_secs` later
/// and the resolver has no write of the record on its way (set it above
/// the map's usual lag).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DriftSettings {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_drift_interval")]
    pub interval_secs: u64,
    #[serde(default = "default_drift_confirm")]
    pub confirm_secs: u64,
    #[serde(default = "default_drift_chunk")]
    pub chunk_rows: u32,
    #[serde(default = "default_drift_rate")]
    pub rows_per_second: u32,
}

fn default_drift_interval() -> u64 {
    300
}
fn default_drift_confirm() -> u64 {
    30
}
fn default_drift_chunk() -> u32 {
    1000
}
fn default_drift_rate() -> u32 {
    10_000
}

impl Default for DriftSettings {
    fn default() -> Self {
        DriftSettings {
            enabled: true,
            interval_secs: default_drift_interval(),
            confirm_secs: default_drift_confirm(),
            chunk_rows: default_drift_chunk(),
            rows_per_second: default_drift_rate(),
        }
    }
}

/// Automatic pause on errors: `errors` error records of a map within
/// `window_secs` pause it, with the reason on its status. `errors = 0` turns it off.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AutoPause {
    pub errors: u32,
    #[serde(default = "default_auto_pause_window")]
    pub window_secs: u64,
}

fn default_auto_pause_window() -> u64 {
    300
}

impl Default for AutoPause {
    fn default() -> Self {
        AutoPause {
            errors: 100,
            window_secs: default_auto_pause_window(),
        }
    }
}

fn default_retention_ms() -> i64 {
    7 * 24 * 3600 * 1000
}
fn default_warn_ratio() -> f64 {
    0.8
}

impl Default for PauseBufferSettings {
    fn default() -> Self {
        PauseBufferSettings {
            map_topic_retention_ms: default_retention_ms(),
            backlog_warn_ratio: default_warn_ratio(),
            auto_pause: AutoPause::default(),
            drift: DriftSettings::default(),
            resolver_cache_records: default_resolver_cache(),
            state_dir: None,
        }
    }
}

fn default_resolver_cache() -> usize {
    10_000
}

/// Control commands (`[control]`): an optional shared-secret signature.
/// With `signing_keys` set, the pause buffer takes only commands signed
/// (HMAC-SHA256, see [`crate::signing`]) with one of them, at most
/// `max_age_secs` old; `dualwrite ctl` signs with the first. Two keys
/// allow a rotation: add the new one first, move every operator, then
/// drop the old one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSettings {
    /// At most two keys, each `{ env = "VAR" }` or `{ file = "/path" }`,
    /// read when used (only the pause buffer and `ctl` need them).
    #[serde(default)]
    pub signing_keys: Vec<KeySource>,
    /// Oldest signature accepted, seconds (a replayed command is refused after it).
    #[serde(default = "default_signature_age")]
    pub max_age_secs: u64,
}

fn default_signature_age() -> u64 {
    900
}

impl Default for ControlSettings {
    fn default() -> Self {
        ControlSettings {
            signing_keys: Vec::new(),
            max_age_secs: default_signature_age(),
        }
    }
}

impl ControlSettings {
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.signing_keys.len() > 2 {
            out.push((
                "signing_keys",
                "at most two keys (the current one and the one being retired)".to_owned(),
            ));
        }
        if self.max_age_secs == 0 {
            out.push(("max_age_secs", "must be at least 1".to_owned()));
        }
        out
    }

    /// Every signing key's value (the pause buffer checks with each), or
    /// why one cannot be read.
    pub fn keys(&self) -> Result<Vec<Secret>, String> {
        (0..self.signing_keys.len()).map(|i| self.key(i)).collect()
    }

    /// The key commands are signed with (the first), if any: `ctl` needs
    /// only this one.
    pub fn signing_key(&self) -> Result<Option<Secret>, String> {
        (!self.signing_keys.is_empty())
            .then(|| self.key(0))
            .transpose()
    }

    fn key(&self, i: usize) -> Result<Secret, String> {
        let s = self.signing_keys[i]
            .read()
            .map_err(|e| format!("control.signing_keys[{i}]: {e}"))?;
        if s.expose().len() < 32 {
            return Err(format!(
                "control.signing_keys[{i}]: a key must be at least 32 bytes (e.g. `openssl rand -hex 32`)"
            ));
        }
        Ok(s)
    }
}

/// What error records and logs may carry (`[errors]`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorSettings {
    /// Keep the original record's bytes on the errors topic (default true;
    /// false keeps row values off it, and `ctl retry-errors` then has
    /// nothing to resend).
    #[serde(default = "default_true")]
    pub include_payload: bool,
    /// Log rejected rows' values (the database's detail) at DEBUG
    /// (default false: logs carry keys, names and SQLSTATEs only).
    #[serde(default)]
    pub log_values: bool,
}

impl Default for ErrorSettings {
    fn default() -> Self {
        ErrorSettings {
            include_payload: true,
            log_values: false,
        }
    }
}

/// Where a secret is read from, when it is used rather than when the file
/// is loaded: `{ env = "VAR" }` or `{ file = "/path" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "SecretSource")]
pub enum KeySource {
    Env(String),
    File(PathBuf),
}

impl TryFrom<SecretSource> for KeySource {
    type Error = String;
    fn try_from(s: SecretSource) -> Result<KeySource, String> {
        match (s.env, s.file) {
            (Some(v), None) => Ok(KeySource::Env(v)),
            (None, Some(p)) => Ok(KeySource::File(p)),
            _ => Err("give exactly one of `env = \"VAR\"` or `file = \"/path\"`".to_owned()),
        }
    }
}

impl KeySource {
    /// Reads the secret now.
    pub fn read(&self) -> Result<Secret, String> {
        match self {
            KeySource::Env(var) => std::env::var(var)
                .map(|v| Secret(SecretString::from(v), Some(var.clone())))
                .map_err(|_| format!("environment variable `{var}` is not set (or not UTF-8)")),
            KeySource::File(path) => std::fs::read_to_string(path)
                .map(|s| Secret::new(s.trim_end_matches(['\n', '\r'])))
                .map_err(|e| format!("cannot read file `{}`: {e}", path.display())),
        }
    }
}

/// A secret value read from an environment variable or a file, never from
/// the configuration file itself. `Debug` prints `[REDACTED]`.
#[derive(Clone)]
pub struct Secret(SecretString, Option<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(SecretString::from(value.into()), None)
    }
    /// The environment variable the secret was read from, if any.
    pub fn env_var(&self) -> Option<&str> {
        self.1.as_deref()
    }
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretSource {
    env: Option<String>,
    file: Option<PathBuf>,
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let src = SecretSource::deserialize(d)?;
        match (src.env, src.file) {
            (Some(var), None) => std::env::var(&var)
                .map(|v| Secret(SecretString::from(v), Some(var.clone())))
                .map_err(|_| {
                    D::Error::custom(format!(
                        "secret: environment variable `{var}` is not set (or not UTF-8)"
                    ))
                }),
            (None, Some(path)) => std::fs::read_to_string(&path)
                .map(|s| Secret::new(s.trim_end_matches(['\n', '\r'])))
                .map_err(|e| {
                    D::Error::custom(format!(
                        "secret: cannot read file `{}`: {e}",
                        path.display()
                    ))
                }),
            _ => Err(D::Error::custom(
                "secret: give exactly one of `env = \"VAR\"` or `file = \"/path\"`",
            )),
        }
    }
}

/// The replication origin an applier reporting under `origin` writes its
/// rows under (see [`Config::rows_origin_names`]).
pub fn rows_origin(origin: &str) -> String {
    format!("{origin}_rows")
}

impl Config {
    pub fn map(&self, name: &str) -> Option<&MapConfig> {
        self.maps.iter().find(|m| m.name == name)
    }

    pub fn side(&self, id: SideId) -> &SideConfig {
        match id {
            SideId::Left => &self.sides.left,
            SideId::Right => &self.sides.right,
        }
    }

    /// The side with this name.
    pub fn side_id(&self, name: &str) -> Option<SideId> {
        if self.sides.left.name == name {
            Some(SideId::Left)
        } else if self.sides.right.name == name {
            Some(SideId::Right)
        } else {
            None
        }
    }

    /// `dualwrite_<prefix>_<side>`, the default name of a side's slot and origin.
    fn default_pg_name(&self, id: SideId) -> String {
        let prefix: String = self
            .kafka
            .topic_prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("dualwrite_{prefix}_{}", self.side(id).name)
    }

    /// The replication slot of a side.
    pub fn slot_name(&self, id: SideId) -> String {
        self.side(id)
            .slot
            .clone()
            .unwrap_or_else(|| self.default_pg_name(id))
    }

    /// The replication origins appliers of a side write under: the base
    /// name (`origin`, default unique per deployment and side: origins are
    /// cluster-wide) for a single applier, then `<base>_<i>` for instance i
    /// of several (one session holds an origin at a time). The capturer
    /// leaves out changes of all of them.
    pub fn origin_names(&self, id: SideId) -> Vec<String> {
        let base = self
            .side(id)
            .origin
            .clone()
            .unwrap_or_else(|| self.default_pg_name(id));
        let mut v = vec![base.clone()];
        v.extend((0..MAX_INSTANCES).map(|i| format!("{base}_{i}")));
        v.push(format!("{base}_init"));
        v
    }

    /// The replication origins appliers of a side write their rows under,
    /// one for each of [`Config::origin_names`] but the initial write's
    /// ([`rows_origin`] of it). An applier writes a transaction's rows and
    /// bookkeeping under its rows origin, then its reports and the commit
    /// under its origin: the capturer has the server leave the rows
    /// origins' changes out before it decodes them, and takes the reports.
    pub fn rows_origin_names(&self, id: SideId) -> Vec<String> {
        let mut v = self.origin_names(id);
        v.pop();
        v.iter().map(|o| rows_origin(o)).collect()
    }

    /// The replication origin the initial write uses on a side (last of
    /// [`Config::origin_names`]), so its writes are not captured back.
    pub fn initial_sync_origin(&self, id: SideId) -> String {
        self.origin_names(id).pop().unwrap_or_default()
    }

    /// Qualified tables of a side that some map reads, with their key fields.
    pub fn captured_entities(&self, id: SideId) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for m in &self.maps {
            let e = match id {
                SideId::Left => &m.left,
                SideId::Right => &m.right,
            };
            out.entry(e.qualified()).or_insert_with(|| e.key.clone());
        }
        out
    }

    /// Environment variables this configuration reads secrets from.
    pub fn secret_env_vars(&self) -> Vec<String> {
        let mut out: Vec<String> = [&self.sides.left, &self.sides.right]
            .iter()
            .filter_map(|s| {
                s.connection
                    .password
                    .as_ref()
                    .and_then(|p| p.env_var())
                    .map(str::to_owned)
            })
            .chain(
                self.kafka
                    .secret_properties
                    .values()
                    .filter_map(|p| p.env_var())
                    .map(str::to_owned),
            )
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The automatic pause rule of a map.
    pub fn auto_pause(&self, map: &MapConfig) -> AutoPause {
        map.auto_pause.unwrap_or(self.pause_buffer.auto_pause)
    }

    /// The conflict master of a map as configured (default: the right side).
    pub fn conflict_master(&self, map: &MapConfig) -> SideId {
        map.conflict_master
            .as_deref()
            .and_then(|m| self.side_id(m))
            .unwrap_or(SideId::Right)
    }

    /// The conflict master a map runs with: `chosen` (the side named by
    /// the command that ran it, kept in its status) else the configured
    /// one. The resolver, repairs and the drift check all use this.
    pub fn run_master(&self, map: &MapConfig, chosen: Option<&str>) -> SideId {
        chosen
            .and_then(|m| self.side_id(m))
            .unwrap_or_else(|| self.conflict_master(map))
    }
}

impl MapConfig {
    /// Problems with the alternate key mapping, as (field, message): each
    /// key field must be mapped, both ways, to the other side's key field in
    /// the same position. A map with such problems cannot run.
    pub fn key_problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (l, r) in self.left.key.iter().zip(&self.right.key) {
            match self.fields.iter().position(|f| &f.left == l) {
                None => out.push((
                    "left.key".to_owned(),
                    format!(
                        "key field `{l}` is not mapped: add a [[map.field]] with left = \"{l}\", right = \"{r}\""
                    ),
                )),
                Some(j) if self.fields[j].right != *r => out.push((
                    format!("field[{j}]"),
                    format!(
                        "key field `{l}` is mapped to `{}` but the right key field in that position is `{r}`",
                        self.fields[j].right
                    ),
                )),
                Some(j) if self.fields[j].direction != Direction::Both => out.push((
                    format!("field[{j}].direction"),
                    format!("key field `{l}` ↔ `{r}` must sync both ways (direction = \"both\")"),
                )),
                Some(_) => {}
            }
        }
        out
    }

    pub fn entity(&self, id: SideId) -> &EntityRef {
        match id {
            SideId::Left => &self.left,
            SideId::Right => &self.right,
        }
    }
}

impl FieldMapping {
    pub fn name(&self, id: SideId) -> &str {
        match id {
            SideId::Left => &self.left,
            SideId::Right => &self.right,
        }
    }
}
