//! Topic names. Every topic starts with the configured prefix.

/// The topics of one deployment.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Topics {
        Topics {
            prefix: prefix.into(),
        }
    }

    /// Changes captured from a side ([`crate::record::ChangeRecord`]).
    pub fn capture(&self, side: &str) -> String {
        format!("{}.capture.{side}", self.prefix)
    }

    /// Mapped changes of one map, both directions ([`crate::record::MappedChange`]).
    pub fn map(&self, map: &str) -> String {
        format!("{}.map.{map}", self.prefix)
    }

    /// Mapped changes released by the pause buffer for a target side.
    pub fn apply(&self, side: &str) -> String {
        format!("{}.apply.{side}", self.prefix)
    }

    /// The resolver's state of each record of a map, compacted
    /// ([`crate::record::ResolverState`]).
    pub fn resolver(&self, map: &str) -> String {
        format!("{}.resolver.{map}", self.prefix)
    }

    /// Records that could not be processed, with context ([`crate::record::ErrorRecord`]).
    pub fn errors(&self) -> String {
        format!("{}.errors", self.prefix)
    }

    /// Operator commands ([`crate::lifecycle::ControlCommand`], JSON or Avro).
    pub fn control(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// Map states, compacted, keyed by map ([`crate::lifecycle::MapStatus`]).
    pub fn status(&self) -> String {
        format!("{}.status", self.prefix)
    }

    /// Acknowledgements and state changes ([`crate::lifecycle::ControlEvent`]).
    pub fn events(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// Changes queued while a map was paused and set aside by a
    /// skip-to-live resume ([`crate::record::MappedChange`]).
    pub fn catchup_errors(&self) -> String {
        format!("{}.catchup-errors", self.prefix)
    }

    /// Rows the initial write of a map could not write, every one kept
    /// ([`crate::record::InitialSyncError`]).
    pub fn initial_sync_errors(&self) -> String {
        format!("{}.initial-sync-errors", self.prefix)
    }

    /// Consumer group of a service.
    pub fn group(&self, service: &str) -> String {
        format!("{}.{service}", self.prefix)
    }
}
