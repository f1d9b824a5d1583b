//! Kafka clients: one shared client context that routes librdkafka's logs
//! into `tracing`, producers and consumers configured for at-least-once
//! delivery, idempotent topic setup, and batch helpers. Calls that a real
//! broker answers with transient errors (leaders being elected, a
//! coordinator loading, a restart) are retried with a deadline ([`retry`]).

pub mod configs;
pub mod drain;
pub mod retry;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dualwrite_model::config::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, DeliveryResult, Message, OwnedMessage};
use rdkafka::producer::{
    BaseProducer, BaseRecord, FutureProducer, FutureRecord, Producer as _, ProducerContext,
};
use rdkafka::{Offset, TopicPartitionList};

pub use rdkafka;

/// The context shared by every client: librdkafka's logs and errors go to `tracing`.
#[derive(Clone, Default)]
pub struct DwContext;

impl ClientContext for DwContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility = fac, "{log_message}")
            }
        }
    }

    /// librdkafka statistics (every `statistics.interval.ms`): local queue
    /// size and average broker round-trip time, per client.
    fn stats(&self, stats: rdkafka::Statistics) {
        let up = stats.brokers.values().any(|b| b.state == "UP");
        crate::health::health().set(KAFKA_COMPONENT, up);
        let m = crate::metrics::metrics();
        m.kafka_queue
            .with_label_values(&[&stats.client_id])
            .set(stats.msg_cnt as i64);
        let rtts: Vec<i64> = stats
            .brokers
            .values()
            .filter_map(|b| b.rtt.as_ref())
            .map(|w| w.avg)
            .filter(|a| *a > 0)
            .collect();
        if !rtts.is_empty() {
            let avg = rtts.iter().sum::<i64>() as f64 / rtts.len() as f64 / 1e6;
            m.kafka_rtt.with_label_values(&[&stats.client_id]).set(avg);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", "kafka client error: {error}: {reason}");
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            crate::health::health().set(KAFKA_COMPONENT, false);
        }
    }
}

impl ConsumerContext for DwContext {}

/// The readiness component of the process's Kafka connection: not ready
/// when librdkafka reports every broker down or its statistics show no
/// broker up; ready when they show one up.
pub const KAFKA_COMPONENT: &str = "kafka";

pub type Producer = FutureProducer<DwContext>;
pub type KafkaConsumer = StreamConsumer<DwContext>;

/// Base client configuration: bootstrap servers, the configured properties
/// (e.g. security settings) and the secret ones.
pub fn client_config(cfg: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("client.id", client_id)
        .set("statistics.interval.ms", "5000")
        // TLS checks that the broker's certificate names the broker (as
        // librdkafka does by default; said here so that it stays so).
        // `ssl.endpoint.identification.algorithm = "none"` turns it off.
        .set("ssl.endpoint.identification.algorithm", "https")
        .set_log_level(RDKafkaLogLevel::Warning);
    for (k, v) in &cfg.properties {
        // `producer.X` / `consumer.X` apply to that kind of client only.
        if !k.starts_with("producer.") && !k.starts_with("consumer.") {
            c.set(k, v);
        }
    }
    for (k, v) in &cfg.secret_properties {
        c.set(k, v.expose());
    }
    c
}

/// Checks, without connecting, that librdkafka knows every configured
/// property; the error names the property and where it was set.
pub fn check_properties(cfg: &KafkaConfig) -> Result<(), String> {
    let names = cfg.properties.keys().chain(cfg.secret_properties.keys());
    for name in names {
        let plain = name
            .strip_prefix("producer.")
            .or_else(|| name.strip_prefix("consumer."))
            .unwrap_or(name);
        let value = cfg
            .properties
            .get(name)
            .cloned()
            .or_else(|| {
                cfg.secret_properties
                    .get(name)
                    .map(|s| s.expose().to_owned())
            })
            .unwrap_or_default();
        let probe: Result<rdkafka::consumer::BaseConsumer, _> =
            ClientConfig::new().set(plain, &value).create();
        if let Err(e) = probe {
            let source = match cfg.properties_from_env.get(name) {
                Some(var) => format!("environment variable {var}"),
                None => "kafka.properties in the configuration file".to_owned(),
            };
            return Err(format!(
                "Kafka property `{plain}` (from {source}) is not accepted: {e}"
            ));
        }
    }
    Ok(())
}

/// A producer for at-least-once delivery in order: all replicas acknowledge,
/// and librdkafka's idempotence keeps order across its own retries.
pub fn producer(cfg: &KafkaConfig, client_id: &str) -> Result<Producer, KafkaError> {
    let mut c = client_config(cfg, client_id);
    // No linger: every service produces a batch and then waits for its
    // acknowledgement, so records queue behind the requests in flight
    // anyway, and a linger only adds its length to each hop.
    c.set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .set("message.timeout.ms", "120000");
    if cfg.max_record_bytes > 900_000 {
        // Room for the largest record the services may produce.
        c.set(
            "message.max.bytes",
            (cfg.max_record_bytes + 100_000).to_string(),
        );
    }
    apply_overrides(&mut c, cfg, "producer.");
    c.create_with_context(DwContext)
}

/// A consumer in `group` that stores offsets only when told to (after the
/// downstream write succeeded) and commits stored offsets in the background.
pub fn consumer(
    cfg: &KafkaConfig,
    client_id: &str,
    group: &str,
) -> Result<KafkaConsumer, KafkaError> {
    consumer_with(cfg, client_id, group, &[])
}

/// [`consumer`] with `settings` of its own (the configuration's
/// `consumer.*` properties still apply over them).
pub fn consumer_with(
    cfg: &KafkaConfig,
    client_id: &str,
    group: &str,
    settings: &[(&str, &str)],
) -> Result<KafkaConsumer, KafkaError> {
    let mut c = client_config(cfg, client_id);
    c.set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // The broker answers a fetch as soon as a record arrives; this only
        // bounds how long an idle fetch waits (librdkafka's default).
        .set("fetch.wait.max.ms", "500")
        // A partition whose prefetched records reach the queue's bounds
        // (`queued.max.messages.kbytes`, `queued.min.messages`) is fetched
        // again this long after, not librdkafka's 1 s: the pause buffer's
        // gates bound theirs to 8 MiB, which a catch-up drains in less,
        // and a gate then waited for records the broker had (about a
        // third of a replay; the replay 1.4× with this, BENCHMARKS.md).
        .set("fetch.queue.backoff.ms", "10")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "3000")
        .set("max.poll.interval.ms", "30000");
    for (k, v) in settings {
        c.set(*k, *v);
    }
    apply_overrides(&mut c, cfg, "consumer.");
    c.create_with_context(DwContext)
}

/// Properties named `producer.X` / `consumer.X` in the configuration apply
/// to that kind of client only, as `X`.
fn apply_overrides(c: &mut ClientConfig, cfg: &KafkaConfig, prefix: &str) {
    for (k, v) in &cfg.properties {
        if let Some(name) = k.strip_prefix(prefix) {
            c.set(name, v);
        }
    }
}

/// A topic the project needs.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub config: Vec<(String, String)>,
}

impl TopicSpec {
    pub fn new(name: impl Into<String>, partitions: i32) -> TopicSpec {
        TopicSpec {
            name: name.into(),
            partitions,
            config: Vec::new(),
        }
    }
}

/// Creates the topics that do not exist yet and waits until the cluster's
/// metadata shows every partition of each with a leader, so that reads and
/// writes right after it succeed. Idempotent.
pub async fn ensure_topics(cfg: &KafkaConfig, topics: &[TopicSpec]) -> Result<(), KafkaError> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: Arc<AdminClient<DwContext>> =
        Arc::new(client_config(cfg, "dualwrite-admin").create_with_context(DwContext)?);
    retry::retrying("create topics", || create_missing(&admin, cfg, topics)).await?;
    let deadline = Instant::now() + retry::DEADLINE;
    let mut waiting: Vec<String> = topics.iter().map(|t| t.name.clone()).collect();
    loop {
        let (a, names) = (admin.clone(), waiting.clone());
        waiting = tokio::task::spawn_blocking(move || without_leaders(&a, &names))
            .await
            .map_err(|_| KafkaError::Canceled)?;
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let after = retry::DEADLINE;
            tracing::error!(topics = ?waiting, "partitions without a leader after {after:?}");
            return Err(KafkaError::AdminOp(RDKafkaErrorCode::LeaderNotAvailable));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One try at creating the topics; those that exist already are fine.
async fn create_missing(
    admin: &AdminClient<DwContext>,
    cfg: &KafkaConfig,
    topics: &[TopicSpec],
) -> Result<(), KafkaError> {
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            let mut n = NewTopic::new(
                &t.name,
                t.partitions,
                TopicReplication::Fixed(cfg.replication_factor),
            );
            for (k, v) in &t.config {
                n = n.set(k, v);
            }
            n
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(name) => tracing::info!(topic = %name, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                let e = KafkaError::AdminOp(code);
                if retry::classify(&e) == retry::Retry::No {
                    tracing::error!(topic = %name, "cannot create topic: {code}");
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The topics among `names` that the metadata does not show yet with a
/// leader for every partition (all of them when the metadata cannot be
/// read; blocking).
fn without_leaders(admin: &AdminClient<DwContext>, names: &[String]) -> Vec<String> {
    let ready = |name: &str| match admin
        .inner()
        .fetch_metadata(Some(name), Duration::from_secs(5))
    {
        Ok(md) => md.topics().iter().any(|t| {
            t.name() == name
                && t.error().is_none()
                && !t.partitions().is_empty()
                && t.partitions()
                    .iter()
                    .all(|p| p.error().is_none() && p.leader() >= 0)
        }),
        Err(e) => {
            tracing::debug!(topic = name, "metadata: {e}");
            false
        }
    };
    names.iter().filter(|n| !ready(n)).cloned().collect()
}

/// Deletes every topic whose name starts with `prefix` (e.g. a retired
/// deployment's `<topic_prefix>.`); returns how many there were.
pub async fn delete_topics_with_prefix(
    cfg: &KafkaConfig,
    prefix: &str,
) -> Result<usize, KafkaError> {
    let admin: Arc<AdminClient<DwContext>> =
        Arc::new(client_config(cfg, "dualwrite-admin").create_with_context(DwContext)?);
    let (a, p) = (admin.clone(), prefix.to_owned());
    let names: Vec<String> = tokio::task::spawn_blocking(move || {
        retry::blocking("list topics", || {
            let md = a.inner().fetch_metadata(None, Duration::from_secs(10))?;
            Ok(md
                .topics()
                .iter()
                .map(|t| t.name().to_owned())
                .filter(|n| n.starts_with(&p))
                .collect())
        })
    })
    .await
    .map_err(|_| KafkaError::Canceled)??;
    if names.is_empty() {
        return Ok(0);
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.delete_topics(&refs, &opts).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(names.len())
}

/// A record to produce.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
}

/// Produces every record, in order, and waits until the broker acknowledged
/// all of them. A full local queue is waited out and the same record sent
/// again; any delivery failure fails the whole call (the caller then does not
/// advance its source position, and the batch is sent again: at least once).
pub async fn send_all(producer: &Producer, records: &[Outgoing]) -> Result<(), KafkaError> {
    let mut pending = Vec::with_capacity(records.len());
    for r in records {
        loop {
            let rec = FutureRecord::to(&r.topic).key(&r.key).payload(&r.payload);
            match producer.send_result(rec) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    for f in pending {
        match f.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(e),
            Err(_) => return Err(KafkaError::Canceled),
        }
    }
    Ok(())
}

/// Produces every record and waits until the broker acknowledged all of
/// them, or `timeout` passed (blocking: for the operator commands). Every
/// delivery report is checked: a record the broker did not take fails the
/// call.
pub fn produce_blocking(
    cfg: &KafkaConfig,
    client_id: &str,
    records: &[Outgoing],
    timeout: Duration,
) -> Result<(), KafkaError> {
    produce_blocking_with_headers(cfg, client_id, records, &[], timeout)
}

/// As [`produce_blocking`], with a header `(name, value)` on the record of
/// the same index (e.g. a control command's signature).
pub fn produce_blocking_with_headers(
    cfg: &KafkaConfig,
    client_id: &str,
    records: &[Outgoing],
    headers: &[(&str, String)],
    timeout: Duration,
) -> Result<(), KafkaError> {
    use rdkafka::message::{Header, OwnedHeaders};
    let producer: BaseProducer<DeliveryCheck> = client_config(cfg, client_id)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", timeout.as_millis().to_string())
        .create_with_context(DeliveryCheck::default())?;
    for (i, r) in records.iter().enumerate() {
        let mut rec = BaseRecord::to(&r.topic).key(&r.key).payload(&r.payload);
        if let Some((key, value)) = headers.get(i) {
            rec = rec.headers(OwnedHeaders::new().insert(Header {
                key,
                value: Some(value.as_bytes()),
            }));
        }
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    producer.flush(timeout)?;
    let failed = producer.context().failed.lock().map(|mut f| f.take());
    match failed {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

/// A producer context that keeps the first failed delivery.
#[derive(Default)]
struct DeliveryCheck {
    failed: Mutex<Option<KafkaError>>,
}

impl ClientContext for DeliveryCheck {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        DwContext.log(level, fac, log_message)
    }
    fn stats(&self, stats: rdkafka::Statistics) {
        DwContext.stats(stats)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        DwContext.error(error, reason)
    }
}

impl ProducerContext for DeliveryCheck {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            if let Ok(mut f) = self.failed.lock() {
                f.get_or_insert_with(|| e.clone());
            }
        }
    }
}

/// A pause of the stream that ends a batch (see [`recv_more`]).
pub const BATCH_GAP: Duration = Duration::from_millis(1);

/// Given the first message of a batch, takes up to `max - 1` more that
/// arrive within `linger`, as long as they keep coming: those already
/// fetched come at once, and a pause of [`BATCH_GAP`] ends the batch, so
/// a trickle is passed on at once while a busy stream fills the batch.
/// Callers that must not lose messages when a `select!` cancels them
/// await the first `recv()` inside the select (it is cancel-safe) and
/// this outside.
pub async fn recv_more(
    consumer: &KafkaConsumer,
    first: OwnedMessage,
    max: usize,
    linger: Duration,
) -> Vec<OwnedMessage> {
    let mut out = vec![first];
    let until = tokio::time::Instant::now() + linger;
    while out.len() < max {
        let next = (tokio::time::Instant::now() + BATCH_GAP).min(until);
        match tokio::time::timeout_at(next, consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            Ok(Err(e)) => {
                tracing::warn!("kafka receive error: {e}");
                break;
            }
            Err(_) => break,
        }
    }
    out
}

/// Low and high watermarks of every partition of a topic (blocking: call
/// from a blocking task).
pub fn watermarks(cfg: &KafkaConfig, topic: &str) -> Result<Vec<(i32, i64, i64)>, KafkaError> {
    let consumer: BaseConsumer<DwContext> =
        client_config(cfg, "dualwrite-watermarks").create_with_context(DwContext)?;
    retry::blocking(&format!("watermarks of {topic}"), || {
        watermarks_once(&consumer, topic)
    })
}

/// Partition, low and high watermark, per partition.
pub type Watermarks = Vec<(i32, i64, i64)>;

/// [`watermarks`], or `None` when the topic does not exist (yet).
pub fn watermarks_if_exists(
    cfg: &KafkaConfig,
    topic: &str,
) -> Result<Option<Watermarks>, KafkaError> {
    let consumer: BaseConsumer<DwContext> =
        client_config(cfg, "dualwrite-watermarks").create_with_context(DwContext)?;
    retry::blocking(
        &format!("watermarks of {topic}"),
        || match watermarks_once(&consumer, topic) {
            Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition)) => Ok(None),
            other => other.map(Some),
        },
    )
}

fn watermarks_once(
    consumer: &BaseConsumer<DwContext>,
    topic: &str,
) -> Result<Vec<(i32, i64, i64)>, KafkaError> {
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut out = Vec::new();
    for t in md.topics() {
        if let Some(e) = t.error() {
            return Err(KafkaError::MetadataFetch(e.into()));
        }
        for p in t.partitions() {
            let (lo, hi) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            out.push((p.id(), lo, hi));
        }
    }
    out.sort();
    Ok(out)
}

/// Where `consumer`'s group left off on each partition of `topic`: the
/// committed offset, or the earliest available one (blocking: call from a
/// blocking task). For consumers that assign partitions themselves.
pub fn committed_positions(
    cfg: &KafkaConfig,
    consumer: &KafkaConsumer,
    topic: &str,
) -> Result<BTreeMap<i32, i64>, KafkaError> {
    positions_of(consumer, &watermarks(cfg, topic)?, topic)
}

/// Where consumer group `group` left off on each partition of `topic`, as
/// [`committed_positions`], without a consumer of the group at hand
/// (blocking).
pub fn group_positions(
    cfg: &KafkaConfig,
    group: &str,
    topic: &str,
) -> Result<BTreeMap<i32, i64>, KafkaError> {
    let consumer: BaseConsumer<DwContext> = client_config(cfg, "dualwrite-offsets")
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create_with_context(DwContext)?;
    positions_of(&consumer, &watermarks(cfg, topic)?, topic)
}

/// The committed offsets of a consumer's group on `topic` (the low
/// watermark where it has none), retrying while the coordinator moves.
fn positions_of<X: ConsumerContext, C: Consumer<X>>(
    consumer: &C,
    marks: &[(i32, i64, i64)],
    topic: &str,
) -> Result<BTreeMap<i32, i64>, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for (p, _, _) in marks {
        tpl.add_partition(topic, *p);
    }
    let committed = retry::blocking(&format!("committed offsets on {topic}"), || {
        consumer.committed_offsets(tpl.clone(), Duration::from_secs(10))
    })?;
    Ok(marks
        .iter()
        .map(|(p, lo, _)| {
            let c = match committed.find_partition(topic, *p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => *lo,
            };
            (*p, c.max(*lo))
        })
        .collect())
}

/// How often consumers that hold offsets renew them
/// ([`keep_offsets_alive`]): far within the broker's
/// `offsets.retention.minutes` (at least one minute).
pub const KEEPALIVE: Duration = Duration::from_secs(20);

/// Commits `positions` (the next offsets to read of `topic`'s partitions)
/// again, unchanged, in the background. A commit renews the offsets'
/// expiry: the broker drops the committed offsets of a group without
/// members `offsets.retention.minutes` (7 days by default) after their last
/// commit, and librdkafka's automatic commit sends only offsets that moved,
/// so a consumer that assigns its partitions itself and holds them (a
/// paused map) or has nothing to read would lose its place. Call it
/// periodically (well within the retention) with exactly the offsets
/// stored so far.
pub fn keep_offsets_alive(consumer: &KafkaConsumer, topic: &str, positions: &BTreeMap<i32, i64>) {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in positions {
        if tpl
            .add_partition_offset(topic, *p, Offset::Offset(*o))
            .is_err()
        {
            return;
        }
    }
    if tpl.count() == 0 {
        return;
    }
    if let Err(e) = consumer.commit(&tpl, rdkafka::consumer::CommitMode::Async) {
        tracing::warn!(%topic, "renewing the committed offsets failed: {e}");
    }
}

/// A consumer that reads every partition of `topics` from where `group`
/// left off (its committed offsets), assigning the partitions itself
/// instead of joining the group: no rebalance can stall it, e.g. after a
/// `kill -9` of its predecessor, on any broker. The group only keeps the
/// offsets, committed as they are stored.
pub async fn assigned_consumer(
    cfg: &KafkaConfig,
    client_id: &str,
    group: &str,
    topics: &[String],
    shard: Shard,
) -> Result<Arc<KafkaConsumer>, KafkaError> {
    let consumer = Arc::new(consumer(cfg, client_id, group)?);
    let (c, k, t) = (consumer.clone(), cfg.clone(), topics.to_vec());
    let tpl = tokio::task::spawn_blocking(move || {
        let mut tpl = TopicPartitionList::new();
        for topic in &t {
            for (p, o) in committed_positions(&k, &c, topic)? {
                if shard.owns(p) {
                    tpl.add_partition_offset(topic, p, Offset::Offset(o))?;
                }
            }
        }
        Ok::<_, KafkaError>(tpl)
    })
    .await
    .map_err(|_| KafkaError::Canceled)??;
    let owned: Vec<String> = tpl
        .elements()
        .iter()
        .map(|e| format!("{}[{}]", e.topic(), e.partition()))
        .collect();
    tracing::info!(instance = %shard, partitions = ?owned, "reading partitions");
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// Which share of the partitions one instance of a service reads: instance
/// `index` of `count` reads the partitions `p` with `p % count == index`.
/// A record's changes share one partition, so each stays with one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// The only instance: every partition.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    pub fn new(index: u32, count: u32) -> Result<Shard, String> {
        if count == 0 || index >= count {
            return Err(format!(
                "instance {index} of {count} does not exist: the index must be below the count (0 to {})",
                count.saturating_sub(1)
            ));
        }
        Ok(Shard { index, count })
    }

    pub fn owns(&self, partition: i32) -> bool {
        partition.rem_euclid(self.count as i32) as u32 == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Assigns every partition of `topic` at `positions`.
pub fn assign_at(
    consumer: &KafkaConsumer,
    topic: &str,
    positions: &BTreeMap<i32, i64>,
) -> Result<(), KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in positions {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))?;
    }
    consumer.assign(&tpl)
}

/// The offsets a consumer's partitions were assigned at (by
/// [`assigned_consumer`] or [`assign_at`]), per topic: where a consumer
/// that has stored nothing yet holds its partitions.
pub fn assigned_positions(
    consumer: &KafkaConsumer,
) -> Result<BTreeMap<String, BTreeMap<i32, i64>>, KafkaError> {
    let mut out: BTreeMap<String, BTreeMap<i32, i64>> = BTreeMap::new();
    for e in consumer.assignment()?.elements() {
        if let Offset::Offset(o) = e.offset() {
            out.entry(e.topic().to_owned())
                .or_default()
                .insert(e.partition(), o);
        }
    }
    Ok(out)
}

/// Every message of a topic from the beginning up to its end at the time of
/// the call (blocking: call from a blocking task).
pub fn read_to_end(cfg: &KafkaConfig, topic: &str) -> Result<Vec<OwnedMessage>, KafkaError> {
    let mut out = Vec::new();
    for_each_until_end(cfg, topic, &BTreeMap::new(), |m| out.push(m.detach()))?;
    Ok(out)
}

/// Calls `f` with every message of `topic` from `from` (per partition; the
/// beginning where absent) up to the end at the time of the call, in offset
/// order per partition, holding none of them (blocking: call from a
/// blocking task).
pub fn for_each_until_end(
    cfg: &KafkaConfig,
    topic: &str,
    from: &BTreeMap<i32, i64>,
    mut f: impl FnMut(&BorrowedMessage<'_>),
) -> Result<(), KafkaError> {
    let marks = watermarks(cfg, topic)?;
    let consumer: BaseConsumer<DwContext> = client_config(cfg, "dualwrite-reader")
        .set("group.id", "dualwrite-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create_with_context(DwContext)?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining: HashMap<i32, i64> = HashMap::new();
    for (p, lo, hi) in &marks {
        let start = from.get(p).copied().unwrap_or(*lo).max(*lo);
        if *hi > start {
            tpl.add_partition_offset(topic, *p, Offset::Offset(start))?;
            remaining.insert(*p, *hi);
        }
    }
    if remaining.is_empty() {
        return Ok(());
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + retry::DEADLINE;
    while !remaining.is_empty() {
        if Instant::now() > deadline {
            return Err(KafkaError::MessageConsumption(
                RDKafkaErrorCode::OperationTimedOut,
            ));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {
                // Compaction may have removed the records just before the end.
                let pos = consumer.position()?;
                remaining.retain(|p, hi| {
                    !matches!(pos.find_partition(topic, *p).map(|e| e.offset()), Some(Offset::Offset(o)) if o >= *hi)
                });
            }
            // The client finds the new leader by itself; wait for it.
            Some(Err(e)) if retry::classify(&e) != retry::Retry::No => {
                tracing::debug!(%topic, "reading: {e}; retrying")
            }
            Some(Err(e)) => return Err(e),
            Some(Ok(m)) => {
                let (p, o) = (m.partition(), m.offset());
                if let Some(hi) = remaining.get(&p) {
                    if o < *hi {
                        f(&m);
                    }
                    if o + 1 >= *hi {
                        remaining.remove(&p);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Stores the offsets after these messages, to be committed: call only once
/// everything they caused was written downstream.
pub fn store_offsets(
    consumer: &KafkaConsumer,
    messages: &[OwnedMessage],
) -> Result<(), KafkaError> {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for m in messages {
        let e = next.entry((m.topic(), m.partition())).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    }
    match consumer.store_offsets(&tpl) {
        // The partition was revoked meanwhile: its new owner re-reads these.
        Err(KafkaError::StoreOffset(RDKafkaErrorCode::UnknownPartition)) => Ok(()),
        other => other,
    }
}

/// Stores these next offsets of `topic`'s partitions, to be committed.
pub fn store_positions(
    consumer: &KafkaConsumer,
    topic: &str,
    next: &BTreeMap<i32, i64>,
) -> Result<(), KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in next {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))?;
    }
    match consumer.store_offsets(&tpl) {
        Err(KafkaError::StoreOffset(RDKafkaErrorCode::UnknownPartition)) => Ok(()),
        other => other,
    }
}

/// Commits the stored offsets now (on shutdown).
pub fn commit_now(consumer: &KafkaConsumer) {
    match consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!("final offset commit failed: {e}"),
    }
}

/// The key of a message as text (lossy), for error context.
pub fn key_text(m: &impl Message) -> Option<String> {
    m.key().map(|k| String::from_utf8_lossy(k).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_partitions_without_overlap() {
        let shards: Vec<Shard> = (0..3).map(|i| Shard::new(i, 3).unwrap()).collect();
        for p in 0..12 {
            assert_eq!(shards.iter().filter(|s| s.owns(p)).count(), 1);
        }
        assert!(Shard::ALL.owns(7));
        assert!(Shard::new(3, 3).unwrap_err().contains("instance 3 of 3"));
        assert!(Shard::new(0, 0).is_err());
    }

    #[test]
    fn security_settings_reach_every_client() {
        let mut cfg = dualwrite_model::Config::parse(dualwrite_model::config::DEMO_CONFIG).unwrap();
        cfg.apply_kafka_env([
            (
                "DUALWRITE_KAFKA_SECURITY_PROTOCOL".to_owned(),
                "sasl_ssl".to_owned(),
            ),
            (
                "DUALWRITE_KAFKA_SASL_MECHANISM".to_owned(),
                "SCRAM-SHA-256".to_owned(),
            ),
            (
                "DUALWRITE_KAFKA_SASL_USERNAME".to_owned(),
                "dualwrite".to_owned(),
            ),
            (
                "DUALWRITE_KAFKA_SASL_PASSWORD".to_owned(),
                "s3cret".to_owned(),
            ),
            (
                "DUALWRITE_KAFKA_CONSUMER_FETCH_MIN_BYTES".to_owned(),
                "1".to_owned(),
            ),
        ]);
        let c = client_config(&cfg.kafka, "t");
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-256"));
        assert_eq!(c.get("sasl.password"), Some("s3cret"));
        // librdkafka accepts the combination (SCRAM needs the ssl feature built in).
        let p: Result<rdkafka::producer::BaseProducer, _> = c.create();
        assert!(p.is_ok(), "{:?}", p.err());
    }
}
