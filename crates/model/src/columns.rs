//! Which columns of each captured table the maps of a side read: the
//! alternate key, the scope's columns and the mapped fields. The capturer
//! publishes only these.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{Config, SideId};

/// The columns of one captured entity that the maps of a side read
/// ([`read_columns`]): the capturer leaves the others out of the
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

/// Per captured entity of a side, the columns its maps read: all that
/// the capturer publishes of a row (see [`ReadColumns`]).
pub fn read_columns(config: &Config, id: SideId) -> BTreeMap<String, ReadColumns> {
    let mut out: BTreeMap<String, ReadColumns> = BTreeMap::new();
    for m in &config.maps {
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
