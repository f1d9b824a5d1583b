//! Loading the configuration: the file read and parsed, overridden from
//! the environment, then validated ([`super::validate`]).

use std::path::{Path, PathBuf};

use super::{Config, Problem, Secret, KAFKA_ENV_PREFIX, SECRET_PROPERTY_HINTS};

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
}
