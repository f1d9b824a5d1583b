//! A gate's resolver: folds each record's events of the map topic into the
//! record's state ([`dualwrite_resolve`]) and turns the decisions into
//! writes for the appliers. The states live in a bounded memory over a
//! spill file ([`crate::states`]) and, for restarts, on the compacted
//! topic `<prefix>.resolver.<map>`: a batch's states are
//! written there after its writes were acknowledged and before its offsets
//! are stored, so a restart reads states that include every event below
//! the committed offset (events already folded in, read again, change
//! nothing: each side's position is in the state).

use std::collections::{BTreeMap, BTreeSet};

use dualwrite_model::avro;
use dualwrite_model::config::{Config, SideId};
use dualwrite_model::record::{ApplyWrite, MappedChange, ResolverState};
use dualwrite_model::topics::Topics;
use dualwrite_resolve::changelog::encode_state;
use dualwrite_resolve::records::{apply_write, event, version, NotAnEvent};
use dualwrite_resolve::{apply, Shape};
use dualwrite_runtime::kafka::rdkafka::error::KafkaError;
use dualwrite_runtime::kafka::rdkafka::message::{BorrowedMessage, Message};
use dualwrite_runtime::kafka::{self, Outgoing, Producer, TopicSpec};
use dualwrite_runtime::metrics::metrics;

use crate::states::States;

/// Largest state record: a record's state holds its row up to about four
/// times (the content for each side, what a side is known to hold, the
/// expectation of a write on its way), so it may exceed the records the
/// rest of the pipeline allows.
const MAX_STATE_BYTES: usize = 64 << 20;

/// The changelog topic of a map's resolver.
pub fn changelog_topic(config: &Config, map: &str) -> TopicSpec {
    let t = Topics::new(&config.kafka.topic_prefix);
    let mut spec = TopicSpec::new(t.resolver(map), config.kafka.partitions);
    spec.config
        .push(("cleanup.policy".into(), "compact".into()));
    spec.config
        .push(("max.message.bytes".into(), MAX_STATE_BYTES.to_string()));
    spec
}

/// The producer of the states: room for the largest, compressed.
pub fn changelog_producer(config: &Config) -> Result<Producer, KafkaError> {
    kafka::client_config(&config.kafka, "dualwrite-resolver")
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("message.max.bytes", (MAX_STATE_BYTES + 100_000).to_string())
        .set("message.timeout.ms", "120000")
        .create_with_context(kafka::DwContext)
}

/// The resolver of one map.
pub struct Resolving {
    map: String,
    topic: String,
    generation: i64,
    run: i64,
    states: States,
    dirty: BTreeSet<String>,
}

/// Changelog records loaded into the spill file per write.
const LOAD_CHUNK: usize = 10_000;

impl Resolving {
    /// Reads the map's states back (blocking: call from a blocking task);
    /// only those of `generation` and initial-sync `run` count.
    pub fn load(
        config: &Config,
        map: &str,
        generation: i64,
        run: i64,
    ) -> Result<Resolving, KafkaError> {
        let topic = changelog_topic(config, map).name;
        let pb = &config.pause_buffer;
        let mut states = States::new(pb.state_dir.as_deref(), pb.resolver_cache_records)
            .unwrap_or_else(|e| {
                let dir = pb.state_dir.clone().unwrap_or_else(std::env::temp_dir);
                crate::states::fatal(&format!("be created under {}", dir.display()), e)
            });
        let mut chunk: Vec<(String, Option<Vec<u8>>)> = Vec::with_capacity(LOAD_CHUNK);
        let flush = |states: &mut States, chunk: &mut Vec<(String, Option<Vec<u8>>)>| {
            states.load(chunk.iter().map(|(k, v)| (k.as_str(), v.as_deref())));
            chunk.clear();
        };
        kafka::for_each_until_end(&config.kafka, &topic, &BTreeMap::new(), |m| {
            if let Some(entry) = loaded(map, m, generation, run) {
                chunk.push(entry);
            }
            if chunk.len() >= LOAD_CHUNK {
                flush(&mut states, &mut chunk);
            }
        })?;
        flush(&mut states, &mut chunk);
        let records = states.spilled();
        tracing::info!(%map, records, generation, run, "resolver states loaded");
        Ok(Resolving {
            map: map.to_owned(),
            topic,
            generation,
            run,
            states,
            dirty: BTreeSet::new(),
        })
    }

    /// A new generation (a run) or initial sync forgets every state: the
    /// sides were reconciled (or not synced) outside the resolver.
    pub fn align(&mut self, generation: i64, run: i64) {
        if (generation, run) != (self.generation, self.run) {
            tracing::info!(map = %self.map, generation, run, "resolver states start afresh");
            self.states.clear();
            self.dirty.clear();
            self.generation = generation;
            self.run = run;
        }
    }

    /// Folds one map topic record (its offset names the event) and returns
    /// the writes it decided, for the apply topics.
    pub fn fold(
        &mut self,
        config: &Config,
        master: SideId,
        offset: i64,
        key: &str,
        mc: &MappedChange,
    ) -> Result<Vec<Outgoing>, String> {
        let map = config
            .map(&self.map)
            .ok_or_else(|| format!("map `{}` is not configured", self.map))?;
        let ev = match event(config, mc) {
            Ok(ev) => ev,
            Err(NotAnEvent::Obsolete) => return Ok(Vec::new()),
            Err(NotAnEvent::UnknownSide(s)) => {
                return Err(format!(
                    "map record from side `{s}`, which is not configured"
                ))
            }
        };
        let shape = Shape::of(map, master);
        let state = self.states.get_mut(key);
        let writes = apply(state, &shape, version(self.generation, offset), &ev);
        self.dirty.insert(key.to_owned());
        let t = Topics::new(&config.kafka.topic_prefix);
        let mut out = Vec::with_capacity(writes.len());
        for w in &writes {
            let rec: ApplyWrite = apply_write(config, map, mc, w);
            metrics()
                .decisions
                .with_label_values(&[&self.map, &rec.target_side])
                .inc();
            let payload = avro::encode(&rec).map_err(|e| e.to_string())?;
            out.push(Outgoing {
                topic: t.apply(&rec.target_side),
                key: key.to_owned(),
                payload,
            });
        }
        Ok(out)
    }

    /// How many records' states changed since the last [`Resolving::changelog`].
    pub fn changed(&self) -> usize {
        self.dirty.len()
    }

    /// The changelog records of the states changed since the last call,
    /// which are spilled too ([`States::spill`]).
    pub fn changelog(&mut self) -> Vec<Outgoing> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut out = Vec::with_capacity(dirty.len());
        let mut failed = Vec::new();
        for key in dirty {
            let Some(s) = self.states.get(&key) else {
                continue;
            };
            match encode_state(&self.map, self.generation, self.run, &s) {
                Ok(payload) => out.push(Outgoing {
                    topic: self.topic.clone(),
                    key,
                    payload,
                }),
                Err(e) => {
                    tracing::error!(map = %self.map, %key, "cannot encode the resolver state: {e}");
                    failed.push(key);
                }
            }
        }
        // A state that could not be encoded stays changed, and in memory.
        self.dirty.extend(failed);
        let records = out.iter().map(|o| (o.key.as_str(), o.payload.as_slice()));
        self.states.spill(records, self.dirty.is_empty());
        let m = metrics();
        m.resolver_records
            .with_label_values(&[&self.map])
            .set(self.states.spilled() as i64);
        m.resolver_in_memory
            .with_label_values(&[&self.map])
            .set(self.states.in_memory() as i64);
        out
    }

    /// Whether the record's writes have all landed and both sides hold
    /// its agreed content (no state: nothing is known to be in flight).
    pub fn settled(&self, config: &Config, master: SideId, key: &str) -> bool {
        let Some(map) = config.map(&self.map) else {
            return true;
        };
        self.states
            .get(key)
            .is_none_or(|s| s.settled(&Shape::of(map, master)))
    }
}

/// A changelog record as loaded: the key and its state's bytes, or `None`
/// to forget the key (a tombstone, or a state of another generation or
/// run); nothing for a record without a key.
fn loaded(
    map: &str,
    m: &BorrowedMessage<'_>,
    generation: i64,
    run: i64,
) -> Option<(String, Option<Vec<u8>>)> {
    let key = kafka::key_text(m)?;
    let bytes = match m.payload().map(|p| (p, avro::decode::<ResolverState>(p))) {
        Some((p, Ok(r))) if r.generation == generation && r.run == run => Some(p.to_vec()),
        Some((_, Ok(_))) | None => None,
        Some((_, Err(e))) => {
            tracing::warn!(%map, %key, "unreadable resolver state, left out: {e}");
            return None;
        }
    };
    Some((key, bytes))
}
