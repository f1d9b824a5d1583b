//! dualwrite's shared model: no IO, used by every service.
//!
//! - [`config`]: the configuration file (sides, entity maps, Kafka) and its validation.
//! - [`record`]: the records that flow on the topics.
//! - [`avro`]: Avro encoding of those records (single-object encoding).
//! - [`lifecycle`]: map states, control commands, status and events.
//! - [`mapping`]: field mapping and key translation of a change for a map.
//! - [`topics`]: topic names.
//! - [`schema`]: a mapping checked against the tables of both databases.

pub mod avro;
pub mod config;
pub mod lifecycle;
pub mod mapping;
pub mod record;
pub mod schema;
pub mod topics;

pub use config::{Config, ConfigError};
