//! dualwrite's shared model: no IO, used by every service.
//!
//! - [`config`]: the configuration file (sides, entity maps, Kafka) and its validation.
//! - [`record`]: the records that flow on the topics.
//! - [`avro`]: Avro encoding of those records (single-object encoding).
//! - [`lifecycle`]: map states, control commands, status and events.
//! - [`mapping`]: field mapping and key translation of a change for a map.
//! - [`topics`]: topic names.
//! - [`transform`]: per-field transforms (value maps, defaults, constants, type conversions).
//! - [`schema`]: a mapping checked against the tables of both databases.
//! - [`filter`]: per-side record filters and company scoping of a map.
//! - [`version`]: the fingerprint (mapping version) of a map's configuration.
//! - [`authorise`]: what a side's writer may write (the configured map's entity and columns).
//! - [`signing`]: signatures of control commands (HMAC-SHA256).

pub mod authorise;
pub mod avro;
pub mod columns;
pub mod config;
pub mod error;
pub mod filter;
pub mod lifecycle;
pub mod mapping;
pub mod plan;
pub mod record;
pub mod schema;
pub mod side;
pub mod signing;
pub mod topics;
pub mod transform;
pub mod version;

pub use config::{Config, ConfigError};
