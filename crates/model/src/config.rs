//! The configuration file: the two sides, the entity maps and the Kafka settings.
//!
//! One TOML file, loaded with [`Config::load`], overridden by a few
//! `DUALWRITE_*` environment variables (see [`ENV_OVERRIDES`]) and checked by
//! [`Config::validate`], whose errors name the file, the map and the field.
//! Secrets (database passwords, Kafka credentials) are never written in the
//! file: they are read from an environment variable or a file and kept in a
//! [`Secret`], whose `Debug` output is redacted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize};

use crate::transform::{Convert, PerSide, TextValue, Transform, Unmapped};

/// The demo configuration (`deploy/demo/dualwrite.toml`), also used by tests.
pub const DEMO_CONFIG: &str = include_str!("../../../deploy/demo/dualwrite.toml");

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

/// Which of the two sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SideId {
    Left,
    Right,
}

impl SideId {
    pub fn other(self) -> SideId {
        match self {
            SideId::Left => SideId::Right,
            SideId::Right => SideId::Left,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            SideId::Left => "left",
            SideId::Right => "right",
        }
    }
}

impl fmt::Display for SideId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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

#[derive(Debug, Deserialize)]
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

/// Direction in which a field (or a map) syncs.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    #[default]
    Both,
    LeftToRight,
    RightToLeft,
}

impl Direction {
    /// Whether a change coming from `source` flows through a field of this direction.
    pub fn carries_from(self, source: SideId) -> bool {
        matches!(
            (self, source),
            (Direction::Both, _)
                | (Direction::LeftToRight, SideId::Left)
                | (Direction::RightToLeft, SideId::Right)
        )
    }
}

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

/// The columns of one captured entity that the maps of a side read
/// ([`Config::read_columns`]): the capturer leaves the others out of the
/// rows it publishes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadColumns {
    /// The alternate key and the scope's columns (filter, company): what
    /// the old row of a change must carry.
    pub identity: BTreeSet<String>,
    /// Every column some map reads: `identity` and the columns of the
    /// mapped fields on the side, whichever way they sync.
    pub all: BTreeSet<String>,
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

fn default_apply_batch() -> usize {
    500
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
        }
    }
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

/// One problem found in the configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: e.g. `map "customers": field[2].right`.
    pub location: String,
    pub message: String,
}

/// The configuration could not be used. Lists every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("configuration file {} is invalid:{}", path.display(), render_problems(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("\n  - {}: {}", p.location, p.message))
        .collect()
}

impl Config {
    /// Reads, overrides from the environment, and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        config.apply_env_overrides(|name| std::env::var(name).ok());
        config.apply_kafka_env(std::env::vars().filter(|(k, _)| k.starts_with(KAFKA_ENV_PREFIX)));
        config.validate().map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })?;
        Ok(config)
    }

    /// Parses TOML text (no validation).
    pub fn parse(text: &str) -> Result<Config, String> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        crate::version::stamp(&mut config, text);
        Ok(config)
    }

    /// Kafka client properties from `DUALWRITE_KAFKA_<NAME>` environment
    /// variables (`DUALWRITE_KAFKA_SECURITY_PROTOCOL=sasl_ssl` sets
    /// `security.protocol`), given as (variable, value) pairs. They override
    /// the file's properties; values of secret properties become secrets.
    pub fn apply_kafka_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) {
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix(KAFKA_ENV_PREFIX) else {
                continue;
            };
            if rest.is_empty() {
                continue;
            }
            let property = rest.to_ascii_lowercase().replace('_', ".");
            self.kafka
                .properties_from_env
                .insert(property.clone(), name.clone());
            if SECRET_PROPERTY_HINTS.iter().any(|h| property.contains(h)) {
                self.kafka.properties.remove(&property);
                self.kafka
                    .secret_properties
                    .insert(property, Secret::new(value));
            } else {
                self.kafka.properties.insert(property, value);
            }
        }
    }

    /// Applies [`ENV_OVERRIDES`] read through `lookup`.
    pub fn apply_env_overrides(&mut self, lookup: impl Fn(&str) -> Option<String>) {
        if let Some(v) = lookup("DUALWRITE_BOOTSTRAP_SERVERS").filter(|v| !v.is_empty()) {
            self.kafka.bootstrap_servers = v;
        }
        if let Some(v) = lookup("DUALWRITE_TOPIC_PREFIX").filter(|v| !v.is_empty()) {
            self.kafka.topic_prefix = v;
        }
    }

    /// Checks everything that can be checked without connecting anywhere.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        let mut bad =
            |location: String, message: String| problems.push(Problem { location, message });

        let k = &self.kafka;
        if k.bootstrap_servers.trim().is_empty() {
            bad("kafka.bootstrap_servers".into(), "must not be empty".into());
        }
        if !is_topic_safe(&k.topic_prefix) {
            bad(
                "kafka.topic_prefix".into(),
                format!(
                    "`{}` is not a valid topic prefix: use letters, digits, `.`, `_` or `-`",
                    k.topic_prefix
                ),
            );
        }
        if !(10_000..=100_000_000).contains(&k.max_record_bytes) {
            bad(
                "kafka.max_record_bytes".into(),
                format!("{} is out of range: 10000 to 100000000", k.max_record_bytes),
            );
        }
        if k.partitions < 1 {
            bad("kafka.partitions".into(), "must be at least 1".into());
        }
        if k.replication_factor < 1 {
            bad(
                "kafka.replication_factor".into(),
                "must be at least 1".into(),
            );
        }
        for name in k.properties.keys() {
            if SECRET_PROPERTY_HINTS.iter().any(|h| name.contains(h)) {
                bad(
                    format!("kafka.properties.\"{name}\""),
                    "holds a secret: move it to [kafka.secret_properties] as { env = \"VAR\" } or { file = \"/path\" }".into(),
                );
            }
        }

        for (id, side) in [
            (SideId::Left, &self.sides.left),
            (SideId::Right, &self.sides.right),
        ] {
            if !is_name(&side.name) {
                bad(
                    format!("sides.{id}.name"),
                    format!("`{}` must be lowercase letters, digits or `_`", side.name),
                );
            }
            for (setting, message) in side.connection.tls_problems() {
                bad(format!("sides.{id}.connection.{setting}"), message);
            }
        }
        if self.sides.left.name == self.sides.right.name {
            bad(
                "sides.right.name".into(),
                format!(
                    "both sides are named `{}`: names must differ",
                    self.sides.left.name
                ),
            );
        }
        // The capture topic is partitioned by an entity's alternate key, so
        // that a record's writes and the applier's reports about it share a
        // partition: every map of an entity must link it by the same key.
        for id in [SideId::Left, SideId::Right] {
            let mut keys: BTreeMap<String, (&str, &[String])> = BTreeMap::new();
            for m in &self.maps {
                let e = m.entity(id);
                match keys.get(&e.qualified()) {
                    Some((other, k)) if *k != e.key.as_slice() => bad(
                        format!("map {}.{id}.key", m.name),
                        format!(
                            "{} is linked by [{}] here and by [{}] in map {other}: every map of an entity must use the same key",
                            e.qualified(),
                            e.key.join(", "),
                            k.join(", ")
                        ),
                    ),
                    Some(_) => {}
                    None => {
                        keys.insert(e.qualified(), (&m.name, &e.key));
                    }
                }
            }
        }
        if self.apply.max_batch == 0 {
            bad("apply.max_batch".into(), "must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.pause_buffer.backlog_warn_ratio) {
            bad(
                "pause_buffer.backlog_warn_ratio".into(),
                "must be between 0 and 1".into(),
            );
        }
        let d = &self.pause_buffer.drift;
        if d.interval_secs == 0 || d.chunk_rows == 0 {
            bad(
                "pause_buffer.drift".into(),
                "interval_secs and chunk_rows must be at least 1".into(),
            );
        }
        if self.pause_buffer.map_topic_retention_ms < 1 {
            bad(
                "pause_buffer.map_topic_retention_ms".into(),
                "must be positive".into(),
            );
        }
        if self.capture.max_batch < 1 {
            bad("capture.max_batch".into(), "must be at least 1".into());
        }
        for (setting, message) in self.control.problems() {
            bad(format!("control.{setting}"), message);
        }

        let mut seen = BTreeSet::new();
        for (i, map) in self.maps.iter().enumerate() {
            let at = format!("map \"{}\"", map.name);
            if !is_name(&map.name) {
                bad(
                    format!("map[{i}].name"),
                    format!("`{}` must be lowercase letters, digits or `_`", map.name),
                );
            }
            if !seen.insert(map.name.as_str()) {
                bad(format!("{at}: name"), "is used by another map".into());
            }
            for (side, e) in [("left", &map.left), ("right", &map.right)] {
                if !is_entity(&e.entity) {
                    bad(
                        format!("{at}: {side}.entity"),
                        format!("`{}` is not `table` or `schema.table`", e.entity),
                    );
                }
                if crate::authorise::is_bookkeeping(&e.entity) {
                    bad(
                        format!("{at}: {side}.entity"),
                        format!(
                            "`{}` is in the `{}` schema, which holds the appliers' bookkeeping and is never a target",
                            e.entity,
                            crate::authorise::BOOKKEEPING_SCHEMA
                        ),
                    );
                }
                if e.key.is_empty() {
                    bad(
                        format!("{at}: {side}.key"),
                        "an alternate key is required: without one the map cannot link records"
                            .into(),
                    );
                }
            }
            if map.left.key.len() != map.right.key.len() {
                bad(
                    format!("{at}: key"),
                    format!(
                        "left.key has {} fields and right.key {}: they must pair up",
                        map.left.key.len(),
                        map.right.key.len()
                    ),
                );
            }
            let mut left_seen = HashMap::new();
            let mut right_seen = HashMap::new();
            for (j, f) in map.fields.iter().enumerate() {
                if !f.left.is_empty() {
                    if let Some(prev) = left_seen.insert(f.left.as_str(), j) {
                        bad(
                            format!("{at}: field[{j}].left"),
                            format!("`{}` is already mapped by field[{prev}]", f.left),
                        );
                    }
                }
                if !f.right.is_empty() {
                    if let Some(prev) = right_seen.insert(f.right.as_str(), j) {
                        bad(
                            format!("{at}: field[{j}].right"),
                            format!("`{}` is already mapped by field[{prev}]", f.right),
                        );
                    }
                }
                for (what, message) in f.problems(map) {
                    bad(format!("{at}: field[{j}].{what}"), message);
                }
            }
            for (field, message) in map.key_problems() {
                bad(format!("{at}: {field}"), message);
            }
            for (field, message) in crate::filter::problems(map) {
                bad(format!("{at}: {field}"), message);
            }
            if let Some(m) = &map.conflict_master {
                if m != &self.sides.left.name && m != &self.sides.right.name {
                    bad(
                        format!("{at}: conflict_master"),
                        format!(
                            "`{m}` is not a side: use `{}` or `{}`",
                            self.sides.left.name, self.sides.right.name
                        ),
                    );
                }
            }
            for dep in &map.depends_on {
                if dep == &map.name {
                    bad(
                        format!("{at}: depends_on"),
                        "a map cannot depend on itself".into(),
                    );
                } else if !self.maps.iter().any(|m| &m.name == dep) {
                    bad(
                        format!("{at}: depends_on"),
                        format!("`{dep}` is not a map in this file"),
                    );
                }
            }
        }
        if let Some(cycle) = self.dependency_cycle() {
            bad(
                "map depends_on".into(),
                format!("dependencies form a cycle: {}", cycle.join(" → ")),
            );
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// A dependency cycle among maps, if any, as the list of map names.
    fn dependency_cycle(&self) -> Option<Vec<String>> {
        fn visit<'a>(
            cfg: &'a Config,
            name: &'a str,
            stack: &mut Vec<&'a str>,
            done: &mut BTreeSet<&'a str>,
        ) -> Option<Vec<String>> {
            if let Some(pos) = stack.iter().position(|n| *n == name) {
                let mut cycle: Vec<String> = stack[pos..].iter().map(|s| s.to_string()).collect();
                cycle.push(name.to_owned());
                return Some(cycle);
            }
            if done.contains(name) {
                return None;
            }
            stack.push(name);
            if let Some(map) = cfg.map(name) {
                for dep in &map.depends_on {
                    if let Some(c) = visit(cfg, dep, stack, done) {
                        return Some(c);
                    }
                }
            }
            stack.pop();
            done.insert(name);
            None
        }
        let mut done = BTreeSet::new();
        for m in &self.maps {
            if let Some(c) = visit(self, &m.name, &mut Vec::new(), &mut done) {
                return Some(c);
            }
        }
        None
    }

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

    /// Per captured entity of a side, the columns its maps read: all that
    /// the capturer publishes of a row (see [`ReadColumns`]).
    pub fn read_columns(&self, id: SideId) -> BTreeMap<String, ReadColumns> {
        let mut out: BTreeMap<String, ReadColumns> = BTreeMap::new();
        for m in &self.maps {
            let e = m.entity(id);
            let r = out.entry(e.qualified()).or_default();
            r.identity.extend(e.key.iter().cloned());
            r.identity.extend(crate::filter::scope_columns(m, id));
            let mapped = m.fields.iter().filter(|f| f.has_column(id));
            r.all.extend(mapped.map(|f| f.name(id).to_owned()));
        }
        for r in out.values_mut() {
            r.all.extend(r.identity.iter().cloned());
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

    /// The conflict master of a map (default: the right side).
    pub fn conflict_master(&self, map: &MapConfig) -> SideId {
        map.conflict_master
            .as_deref()
            .and_then(|m| self.side_id(m))
            .unwrap_or(SideId::Right)
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

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn is_topic_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 120
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
}

fn is_entity(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    (1..=2).contains(&parts.len()) && parts.iter().all(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[kafka]
bootstrap_servers = "127.0.0.1:9092"

[sides.left]
name = "fno"
kind = "postgres"
connection = { host = "127.0.0.1", dbname = "fno", user = "postgres" }

[sides.right]
name = "dataverse"
kind = "postgres"
connection = { host = "127.0.0.1", dbname = "dv", user = "postgres" }

[[map]]
name = "customer_groups"
left = { entity = "customer_groups", key = ["customergroupid"] }
right = { entity = "msdyn_customergroups", key = ["msdyn_groupid"] }
field = [
  { left = "customergroupid", right = "msdyn_groupid" },
  { left = "description", right = "msdyn_description", direction = "left_to_right" },
]

[[map]]
name = "customers"
left = { entity = "public.customers_v3", key = ["customeraccount"] }
right = { entity = "accounts", key = ["accountnumber"] }
depends_on = ["customer_groups"]
conflict_master = "fno"
field = [
  { left = "customeraccount", right = "accountnumber" },
  { left = "name", right = "name" },
]
"#;

    fn problems(text: &str) -> Vec<Problem> {
        Config::parse(text).unwrap().validate().unwrap_err()
    }

    #[test]
    fn security_settings_are_checked() {
        let text = GOOD
            .replace(
                "dbname = \"fno\", user = \"postgres\" }",
                "dbname = \"fno\", user = \"postgres\", sslmode = \"verify-full\" }",
            )
            .replace(
                "dbname = \"dv\", user = \"postgres\" }",
                "dbname = \"dv\", user = \"postgres\", sslmode = \"require\", sslrootcert = \"/ca.pem\", sslcert = \"/c.pem\" }",
            )
            .replace("entity = \"accounts\"", "entity = \"dualwrite.record_versions\"")
            + "[control]\nsigning_keys = [{ env = \"A\" }, { env = \"B\" }, { file = \"/c\" }]\n";
        let found: Vec<String> = problems(&text)
            .iter()
            .map(|p| format!("{}: {}", p.location, p.message))
            .collect();
        let has = |s: &str| found.iter().any(|f| f.contains(s));
        assert!(has("sides.left.connection.sslrootcert: sslmode `verify-full` needs the CA certificates"), "{found:#?}");
        assert!(has("sides.right.connection.sslrootcert: is used only by sslmode verify-ca or verify-full"), "{found:#?}");
        assert!(
            has("sides.right.connection.sslcert: sslcert and sslkey go together"),
            "{found:#?}"
        );
        assert!(
            has("right.entity: `dualwrite.record_versions` is in the `dualwrite` schema"),
            "{found:#?}"
        );
        assert!(has("control.signing_keys: at most two keys"), "{found:#?}");
        assert_eq!(found.len(), 5, "{found:#?}");
        let e = problems(&GOOD.replace(
            "user = \"postgres\" }",
            "user = \"postgres\", sslmode = \"verify\" }",
        ));
        assert!(
            e[0].message
                .contains("not one of disable, prefer, require, verify-ca, verify-full"),
            "{e:?}"
        );
        // Keys are read when used, and must be long enough.
        let c = Config::parse(
            &(GOOD.to_owned() + "[control]\nsigning_keys = [{ env = \"DW_TEST_UNSET_KEY\" }]\n"),
        )
        .unwrap();
        c.validate().unwrap();
        assert!(c
            .control
            .keys()
            .unwrap_err()
            .contains("`DW_TEST_UNSET_KEY` is not set"));
        assert!(c.errors.include_payload && !c.errors.log_values);
        // ctl reads only the first key; a short key is refused.
        let dir = std::env::temp_dir().join(format!("dw-key-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (good, short) = (dir.join("good"), dir.join("short"));
        std::fs::write(&good, "k".repeat(64) + "\n").unwrap();
        std::fs::write(&short, "short").unwrap();
        let with = |keys: &str| {
            Config::parse(&format!("{GOOD}[control]\nsigning_keys = [{keys}]\n")).unwrap()
        };
        let c = with(&format!(
            "{{ file = \"{}\" }}, {{ env = \"DW_TEST_UNSET_KEY\" }}",
            good.display()
        ));
        assert_eq!(
            c.control.signing_key().unwrap().unwrap().expose(),
            "k".repeat(64)
        );
        assert!(c.control.keys().is_err());
        let c = with(&format!("{{ file = \"{}\" }}", short.display()));
        assert!(c
            .control
            .signing_key()
            .unwrap_err()
            .contains("at least 32 bytes"));
        assert!(with("").control.signing_key().unwrap().is_none());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn good_config_validates() {
        let c = Config::parse(GOOD).unwrap();
        c.validate().unwrap();
        assert_eq!(c.maps.len(), 2);
        assert_eq!(c.kafka.topic_prefix, "dualwrite");
        assert_eq!(c.conflict_master(&c.maps[0]), SideId::Right);
        assert_eq!(c.conflict_master(&c.maps[1]), SideId::Left);
        assert_eq!(
            c.captured_entities(SideId::Left).keys().collect::<Vec<_>>(),
            ["public.customer_groups", "public.customers_v3"]
        );
        assert_eq!(c.slot_name(SideId::Left), "dualwrite_dualwrite_fno");
    }

    #[test]
    fn read_columns_are_keys_scope_and_mapped_fields_of_every_map() {
        let c = Config::parse(&format!(
            r#"{TEST_SIDES}
[[map]]
name = "a"
companies = ["dat"]
left = {{ entity = "custtable", key = ["accountnum"], company_field = "dataareaid", filter = "blocked == 'f'" }}
right = {{ entity = "accounts", key = ["accountnumber"], company_field = "company" }}
field = [
  {{ left = "accountnum", right = "accountnumber" }},
  {{ left = "name", right = "name", direction = "right_to_left" }},
  {{ right = "source", constant = "fno" }},
]
[[map]]
name = "b"
left = {{ entity = "custtable", key = ["accountnum"] }}
right = {{ entity = "others", key = ["code"] }}
field = [{{ left = "accountnum", right = "code" }}, {{ left = "phone", right = "tel" }}]
"#
        ))
        .unwrap();
        let left = c.read_columns(SideId::Left);
        let t = &left["public.custtable"];
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(t.identity, set(&["accountnum", "blocked", "dataareaid"]));
        assert_eq!(
            t.all,
            set(&["accountnum", "blocked", "dataareaid", "name", "phone"])
        );
        let right = c.read_columns(SideId::Right);
        assert_eq!(
            right["public.accounts"].all,
            set(&["accountnumber", "company", "name", "source"])
        );
        assert_eq!(right["public.others"].all, set(&["code", "tel"]));
    }

    #[test]
    fn unmapped_key_names_map_and_field() {
        let text = GOOD.replace(
            "{ left = \"customeraccount\", right = \"accountnumber\" },",
            "",
        );
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].location, "map \"customers\": left.key");
        assert!(p[0].message.contains("customeraccount"), "{}", p[0].message);
    }

    #[test]
    fn an_entity_linked_by_two_keys_is_rejected() {
        let text = format!(
            "{GOOD}\n[[map]]\nname = \"groups_by_name\"\nleft = {{ entity = \"customer_groups\", key = [\"description\"] }}\nright = {{ entity = \"other_groups\", key = [\"name\"] }}\nfield = [ {{ left = \"description\", right = \"name\" }} ]\n"
        );
        let p = problems(&text);
        let p: Vec<&Problem> = p
            .iter()
            .filter(|p| p.location.ends_with(".left.key"))
            .collect();
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].location, "map groups_by_name.left.key");
        assert!(
            p[0].message.contains("in map customer_groups"),
            "{}",
            p[0].message
        );
    }

    #[test]
    fn one_way_key_is_rejected() {
        let text = GOOD.replace(
            "{ left = \"customergroupid\", right = \"msdyn_groupid\" }",
            "{ left = \"customergroupid\", right = \"msdyn_groupid\", direction = \"right_to_left\" }",
        );
        let p = problems(&text);
        assert_eq!(p[0].location, "map \"customer_groups\": field[0].direction");
    }

    #[test]
    fn unknown_dependency_and_master_are_named() {
        let text = GOOD
            .replace(
                "depends_on = [\"customer_groups\"]",
                "depends_on = [\"currencies\"]",
            )
            .replace("conflict_master = \"fno\"", "conflict_master = \"crm\"");
        let p = problems(&text);
        let locations: Vec<_> = p.iter().map(|p| p.location.as_str()).collect();
        assert!(
            locations.contains(&"map \"customers\": depends_on"),
            "{p:?}"
        );
        assert!(
            locations.contains(&"map \"customers\": conflict_master"),
            "{p:?}"
        );
    }

    #[test]
    fn dependency_cycle_is_rejected() {
        let text = GOOD.replace(
            "name = \"customer_groups\"",
            "name = \"customer_groups\"\ndepends_on = [\"customers\"]",
        );
        let p = problems(&text);
        assert!(p.iter().any(|p| p.message.contains("cycle")), "{p:?}");
    }

    #[test]
    fn unknown_field_is_a_parse_error_with_position() {
        let text = GOOD.replace(
            "name = \"fno\"\nkind",
            "name = \"fno\"\ncolour = \"red\"\nkind",
        );
        let err = Config::parse(&text).unwrap_err();
        assert!(err.contains("unknown field `colour`"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn literal_secret_property_is_rejected() {
        let text = GOOD.replace(
            "bootstrap_servers = \"127.0.0.1:9092\"",
            "bootstrap_servers = \"127.0.0.1:9092\"\nproperties = { \"sasl.password\" = \"hunter2\" }",
        );
        let p = problems(&text);
        assert_eq!(p[0].location, "kafka.properties.\"sasl.password\"");
    }

    #[test]
    fn secrets_come_from_env_and_never_show_in_debug() {
        std::env::set_var("DUALWRITE_TEST_SECRET_A", "hunter2");
        let text = GOOD.replace(
            "connection = { host = \"127.0.0.1\", dbname = \"fno\", user = \"postgres\" }",
            "connection = { host = \"127.0.0.1\", dbname = \"fno\", user = \"postgres\", password = { env = \"DUALWRITE_TEST_SECRET_A\" } }",
        );
        let c = Config::parse(&text).unwrap();
        let pw = c.sides.left.connection.password.as_ref().unwrap();
        assert_eq!(pw.expose(), "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
        let missing = text.replace("DUALWRITE_TEST_SECRET_A", "DUALWRITE_TEST_SECRET_UNSET");
        let err = Config::parse(&missing).unwrap_err();
        assert!(err.contains("DUALWRITE_TEST_SECRET_UNSET"), "{err}");
    }

    #[test]
    fn env_overrides_apply() {
        let mut c = Config::parse(GOOD).unwrap();
        c.apply_env_overrides(|k| match k {
            "DUALWRITE_BOOTSTRAP_SERVERS" => Some("kafka:9093".into()),
            "DUALWRITE_TOPIC_PREFIX" => Some("t1".into()),
            _ => None,
        });
        assert_eq!(c.kafka.bootstrap_servers, "kafka:9093");
        assert_eq!(c.kafka.topic_prefix, "t1");
    }

    proptest::proptest! {
        /// Any text, and any single-line corruption of a good file, gives a
        /// result or an error, never a panic.
        #[test]
        fn arbitrary_config_text_never_panics(text in ".{0,400}", line in 0usize..40, junk in ".{0,40}") {
            if let Ok(c) = Config::parse(&text) {
                let _ = c.validate();
            }
            let mut lines: Vec<&str> = GOOD.lines().collect();
            let at = line % lines.len();
            lines[at] = &junk;
            if let Ok(c) = Config::parse(&lines.join("\n")) {
                let _ = c.validate();
            }
        }
    }

    #[test]
    fn kafka_properties_from_the_environment() {
        let mut c = Config::parse(GOOD).unwrap();
        c.apply_kafka_env([
            (
                "DUALWRITE_KAFKA_SECURITY_PROTOCOL".to_owned(),
                "sasl_ssl".to_owned(),
            ),
            (
                "DUALWRITE_KAFKA_SASL_MECHANISMS".to_owned(),
                "SCRAM-SHA-512".to_owned(),
            ),
            (
                "DUALWRITE_KAFKA_SASL_PASSWORD".to_owned(),
                "hunter2".to_owned(),
            ),
            ("OTHER".to_owned(), "x".to_owned()),
        ]);
        assert_eq!(c.kafka.properties["security.protocol"], "sasl_ssl");
        assert_eq!(c.kafka.properties["sasl.mechanisms"], "SCRAM-SHA-512");
        assert_eq!(
            c.kafka.secret_properties["sasl.password"].expose(),
            "hunter2"
        );
        assert!(!format!("{c:?}").contains("hunter2"));
        c.validate().unwrap();
    }

    #[test]
    fn load_error_names_the_file() {
        let dir = std::env::temp_dir().join(format!("dw-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(
            &path,
            GOOD.replace("conflict_master = \"fno\"", "conflict_master = \"x\""),
        )
        .unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("bad.toml"), "{err}");
        assert!(err.contains("map \"customers\": conflict_master"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod transform_config_tests {
    use super::*;

    fn problems_of(fields: &str) -> Vec<Problem> {
        let text = format!(
            r#"{TEST_SIDES}[[map]]
name = "customers"
left = {{ entity = "customers_v3", key = ["account"] }}
right = {{ entity = "accounts", key = ["number"] }}
field = [
  {{ left = "account", right = "number" }},
  {fields}
]
"#
        );
        match Config::parse(&text).unwrap().validate() {
            Ok(()) => Vec::new(),
            Err(p) => p,
        }
    }

    fn one(fields: &str) -> Problem {
        let p = problems_of(fields);
        assert_eq!(p.len(), 1, "{p:?}");
        p.into_iter().next().unwrap()
    }

    #[test]
    fn transforms_parse_and_validate() {
        assert_eq!(
            problems_of(
                r#"{ left = "status", right = "statecode", value_map = { Active = 0, "On hold" = "2", Closed = 1 }, unmapped = { right = "9", left = "Closed" } },
  { left = "onhold", right = "creditonhold", convert = { left = "bool", right = "int" } },
  { left = "note", right = "description", default = "n/a" },
  { left = "origin", constant = "crm" },"#
            ),
            vec![]
        );
    }

    #[test]
    fn a_value_map_that_does_not_invert_is_named() {
        let p = one(
            r#"{ left = "status", right = "statecode", value_map = { Active = "0", Open = "0" } },"#,
        );
        assert_eq!(p.location, "map \"customers\": field[1].value_map");
        assert!(
            p.message
                .contains("right value `0` is mapped from both `Active` and `Open`"),
            "{p:?}"
        );
        // One way, left to right, it need not invert.
        assert!(problems_of(
            r#"{ left = "status", right = "statecode", direction = "left_to_right", value_map = { Active = "0", Open = "0" } },"#
        )
        .is_empty());
    }

    #[test]
    fn an_unknown_conversion_type_is_named() {
        let p =
            one(r#"{ left = "a", right = "b", convert = { left = "text", right = "money" } },"#);
        assert_eq!(p.location, "map \"customers\": field[1].convert");
        assert!(
            p.message.contains("right type `money` is not one of"),
            "{p:?}"
        );
        let p = one(
            r#"{ left = "a", right = "b", convert = { left = "uuid", right = "date" }, direction = "left_to_right" },"#,
        );
        assert!(
            p.message.contains("no conversion from uuid to date"),
            "{p:?}"
        );
    }

    #[test]
    fn constants_name_their_target_only() {
        let p = one(r#"{ left = "a", right = "b", constant = "x" },"#);
        assert_eq!(p.location, "map \"customers\": field[1].constant");
        let p = one(r#"{ right = "b", constant = "x", direction = "both" },"#);
        assert_eq!(p.location, "map \"customers\": field[1].direction");
        let p = one(r#"{ right = "b" },"#);
        assert_eq!(p.location, "map \"customers\": field[1].left");
        assert!(p.message.contains("`left` is required"), "{p:?}");
        let p = one(r#"{ right = "b", constant = "x", default = "y" },"#);
        assert_eq!(p.location, "map \"customers\": field[1].constant");
    }

    #[test]
    fn key_fields_take_no_transform() {
        let text = r#"{ left = "x", right = "y" },"#;
        assert!(problems_of(text).is_empty());
        let p = problems_of("").len();
        assert_eq!(p, 0);
        let c = Config::parse(
            &DEMO_CONFIG.replace(
                "{ left = \"customeraccount\", right = \"accountnumber\" }",
                "{ left = \"customeraccount\", right = \"accountnumber\", convert = { left = \"text\", right = \"text\" } }",
            ),
        )
        .unwrap();
        let p = c.validate().unwrap_err();
        assert!(
            p.iter().any(|p| p
                .message
                .contains("key field `customeraccount` ↔ `accountnumber` cannot have a transform")),
            "{p:?}"
        );
    }

    #[test]
    fn transform_syntax_errors_are_parse_errors() {
        let text = DEMO_CONFIG.replace(
            "{ left = \"customeraccount\", right = \"accountnumber\" }",
            "{ left = \"customeraccount\", right = \"accountnumber\", unmapped = \"ignore\" }",
        );
        assert!(Config::parse(&text).is_err());
        let text = DEMO_CONFIG.replace(
            "{ left = \"customeraccount\", right = \"accountnumber\" }",
            "{ left = \"customeraccount\", right = \"accountnumber\", valuemap = {} }",
        );
        let e = Config::parse(&text).unwrap_err();
        assert!(e.contains("valuemap"), "{e}");
    }
}
