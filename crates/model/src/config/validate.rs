//! Checking a configuration without connecting anywhere: every problem
//! found, each named with where it is (the file, the map, the field).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{Config, MapConfig, SideId, SECRET_PROPERTY_HINTS};

/// One problem found in the configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: e.g. `map "customers": field[2].right`.
    pub location: String,
    pub message: String,
}

/// The problems found so far.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn bad(&mut self, location: String, message: String) {
        self.0.push(Problem { location, message });
    }
}

impl Config {
    /// Checks everything that can be checked without connecting anywhere.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut p = Problems::default();
        self.validate_kafka(&mut p);
        self.validate_sides(&mut p);
        self.validate_settings(&mut p);
        let mut seen = BTreeSet::new();
        for (i, map) in self.maps.iter().enumerate() {
            if !seen.insert(map.name.as_str()) {
                p.bad(
                    format!("map \"{}\": name", map.name),
                    "is used by another map".into(),
                );
            }
            self.validate_map(i, map, &mut p);
        }
        if let Some(cycle) = self.dependency_cycle() {
            p.bad(
                "map depends_on".into(),
                format!("dependencies form a cycle: {}", cycle.join(" → ")),
            );
        }
        if p.0.is_empty() {
            Ok(())
        } else {
            Err(p.0)
        }
    }

    fn validate_kafka(&self, p: &mut Problems) {
        let k = &self.kafka;
        if k.bootstrap_servers.trim().is_empty() {
            p.bad("kafka.bootstrap_servers".into(), "must not be empty".into());
        }
        if !is_topic_safe(&k.topic_prefix) {
            p.bad(
                "kafka.topic_prefix".into(),
                format!(
                    "`{}` is not a valid topic prefix: use letters, digits, `.`, `_` or `-`",
                    k.topic_prefix
                ),
            );
        }
        if !(10_000..=100_000_000).contains(&k.max_record_bytes) {
            p.bad(
                "kafka.max_record_bytes".into(),
                format!("{} is out of range: 10000 to 100000000", k.max_record_bytes),
            );
        }
        if k.partitions < 1 {
            p.bad("kafka.partitions".into(), "must be at least 1".into());
        }
        if k.replication_factor < 1 {
            p.bad(
                "kafka.replication_factor".into(),
                "must be at least 1".into(),
            );
        }
        for name in k.properties.keys() {
            if SECRET_PROPERTY_HINTS.iter().any(|h| name.contains(h)) {
                p.bad(
                    format!("kafka.properties.\"{name}\""),
                    "holds a secret: move it to [kafka.secret_properties] as { env = \"VAR\" } or { file = \"/path\" }".into(),
                );
            }
        }
    }

    fn validate_sides(&self, p: &mut Problems) {
        for (id, side) in [
            (SideId::Left, &self.sides.left),
            (SideId::Right, &self.sides.right),
        ] {
            if !is_name(&side.name) {
                p.bad(
                    format!("sides.{id}.name"),
                    format!("`{}` must be lowercase letters, digits or `_`", side.name),
                );
            }
            for (setting, message) in side.connection.tls_problems() {
                p.bad(format!("sides.{id}.connection.{setting}"), message);
            }
        }
        if self.sides.left.name == self.sides.right.name {
            p.bad(
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
                    Some((other, k)) if *k != e.key.as_slice() => p.bad(
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
    }

    /// The services' settings.
    fn validate_settings(&self, p: &mut Problems) {
        if self.apply.max_batch == 0 {
            p.bad("apply.max_batch".into(), "must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.pause_buffer.backlog_warn_ratio) {
            p.bad(
                "pause_buffer.backlog_warn_ratio".into(),
                "must be between 0 and 1".into(),
            );
        }
        if self.pause_buffer.resolver_cache_records == 0 {
            p.bad(
                "pause_buffer.resolver_cache_records".into(),
                "must be at least 1".into(),
            );
        }
        let d = &self.pause_buffer.drift;
        if d.interval_secs == 0 || d.chunk_rows == 0 {
            p.bad(
                "pause_buffer.drift".into(),
                "interval_secs and chunk_rows must be at least 1".into(),
            );
        }
        if self.pause_buffer.map_topic_retention_ms < 1 {
            p.bad(
                "pause_buffer.map_topic_retention_ms".into(),
                "must be positive".into(),
            );
        }
        if self.capture.max_batch < 1 {
            p.bad("capture.max_batch".into(), "must be at least 1".into());
        }
        for (setting, message) in self.control.problems() {
            p.bad(format!("control.{setting}"), message);
        }
    }

    /// One map's name, entities and keys; then its fields and references.
    fn validate_map(&self, i: usize, map: &MapConfig, p: &mut Problems) {
        let at = format!("map \"{}\"", map.name);
        if !is_name(&map.name) {
            p.bad(
                format!("map[{i}].name"),
                format!("`{}` must be lowercase letters, digits or `_`", map.name),
            );
        }
        for (side, e) in [("left", &map.left), ("right", &map.right)] {
            if !is_entity(&e.entity) {
                p.bad(
                    format!("{at}: {side}.entity"),
                    format!("`{}` is not `table` or `schema.table`", e.entity),
                );
            }
            if crate::authorise::is_bookkeeping(&e.entity) {
                p.bad(
                    format!("{at}: {side}.entity"),
                    format!(
                        "`{}` is in the `{}` schema, which holds the appliers' bookkeeping and is never a target",
                        e.entity,
                        crate::authorise::BOOKKEEPING_SCHEMA
                    ),
                );
            }
            if e.key.is_empty() {
                p.bad(
                    format!("{at}: {side}.key"),
                    "an alternate key is required: without one the map cannot link records".into(),
                );
            }
        }
        if map.left.key.len() != map.right.key.len() {
            p.bad(
                format!("{at}: key"),
                format!(
                    "left.key has {} fields and right.key {}: they must pair up",
                    map.left.key.len(),
                    map.right.key.len()
                ),
            );
        }
        self.validate_fields(&at, map, p);
    }

    /// A map's fields, filters, conflict master and dependencies.
    fn validate_fields(&self, at: &str, map: &MapConfig, p: &mut Problems) {
        let mut left_seen = HashMap::new();
        let mut right_seen = HashMap::new();
        for (j, f) in map.fields.iter().enumerate() {
            if !f.left.is_empty() {
                if let Some(prev) = left_seen.insert(f.left.as_str(), j) {
                    p.bad(
                        format!("{at}: field[{j}].left"),
                        format!("`{}` is already mapped by field[{prev}]", f.left),
                    );
                }
            }
            if !f.right.is_empty() {
                if let Some(prev) = right_seen.insert(f.right.as_str(), j) {
                    p.bad(
                        format!("{at}: field[{j}].right"),
                        format!("`{}` is already mapped by field[{prev}]", f.right),
                    );
                }
            }
            for (what, message) in f.problems(map) {
                p.bad(format!("{at}: field[{j}].{what}"), message);
            }
        }
        for (field, message) in map.key_problems() {
            p.bad(format!("{at}: {field}"), message);
        }
        for (field, message) in crate::filter::problems(map) {
            p.bad(format!("{at}: {field}"), message);
        }
        if let Some(m) = &map.conflict_master {
            if m != &self.sides.left.name && m != &self.sides.right.name {
                p.bad(
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
                p.bad(
                    format!("{at}: depends_on"),
                    "a map cannot depend on itself".into(),
                );
            } else if !self.maps.iter().any(|m| &m.name == dep) {
                p.bad(
                    format!("{at}: depends_on"),
                    format!("`{dep}` is not a map in this file"),
                );
            }
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
