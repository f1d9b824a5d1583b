//! Consumers and topics on a real Apache Kafka broker: the offsets a paused
//! map holds outlive the broker's offsets retention, the router and the
//! appliers change their number of instances under load without losing a
//! change, and the topics' settings hold on the broker (the status topic
//! compacts, a map topic's real retention is what the pause buffer warns
//! against, the initial-sync errors are kept forever), and a consumer
//! with a bounded prefetch reads on without waiting for its fetches.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{
    all_drained, backlog, commit_once, committed, drained, eventually, PrivateStack, TestEnv,
    PAUSE_BUFFER,
};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(120);

/// The broker drops a member-less group's offsets one minute (the least
/// it allows) after their last commit, and looks every second.
const SHORT_RETENTION: &str =
    "offsets.retention.minutes=1 offsets.retention.check.interval.ms=1000";

/// Creates customers `<tag>001` … on the left side, one transaction.
async fn insert(fno: &Client, tag: &str, n: usize) {
    fno.batch_execute(&format!(
        "INSERT INTO customers_v3 (customeraccount, organizationname)
         SELECT '{tag}' || lpad(i::text, 3, '0'), '{tag} ' || i FROM generate_series(1, {n}) i"
    ))
    .await
    .unwrap();
}

/// Waits until the right side has the `n` customers `<tag>…`.
async fn arrived(dv: &Client, tag: &str, n: i64) {
    let sql = format!("SELECT count(*) FROM accounts WHERE accountnumber LIKE '{tag}%'");
    eventually(&format!("{n} {tag} accounts arrived"), WAIT, || async {
        dv.query_one(sql.as_str(), &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == n
    })
    .await;
}

/// How many upserts of map `customers` each key got on an apply topic.
fn upserts_per_key(records: &[serde_json::Value]) -> BTreeMap<String, usize> {
    let mut n = BTreeMap::new();
    for r in records {
        if r["value"]["map"] == "customers" && r["value"]["op"] == "UPSERT" {
            *n.entry(r["key"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
    }
    n
}

/// The offsets `group` has committed on `topic` (partition, offset);
/// panics when it has none.
fn held_offsets(env: &TestEnv, group: &str, topic: &str) -> Vec<(i32, i64)> {
    let all = committed(env, group, topic);
    let held: Vec<(i32, i64)> = all.iter().filter_map(|(p, o)| Some((*p, (*o)?))).collect();
    assert!(
        !held.is_empty(),
        "{group} committed nothing on {topic}: {all:?}"
    );
    held
}

/// Panics unless `group` still has exactly the offsets `held` on `topic`.
fn still_held(env: &TestEnv, group: &str, topic: &str, held: &[(i32, i64)]) {
    let now = committed(env, group, topic);
    for (p, o) in held {
        assert!(
            now.contains(&(*p, Some(*o))),
            "{group}'s offsets on {topic} were dropped or moved: {held:?} -> {now:?}"
        );
    }
}

/// Kafka drops the committed offsets of a group without members
/// `offsets.retention.minutes` after their last commit, and the pause
/// buffer's gates hold their partitions without joining a group. A map
/// paused for longer must still resume from exactly where it stopped:
/// nothing queued lost, nothing from before the pause sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_paused_past_the_offsets_retention_resumes_where_it_stopped() {
    let stack = PrivateStack::start_with("retention", SHORT_RETENTION);
    let mut env = TestEnv::on(stack.stack.clone(), "retention", "").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let (fno, dv) = (env.fno().await, env.dv().await);
    insert(&fno, "P", 10).await;
    arrived(&dv, "P", 10).await;
    drained(&env, "customers", "dataverse").await;

    env.ctl(&["pause", "customers", "--timeout-secs", "60"]);
    insert(&fno, "Q", 10).await;
    eventually("the changes queue on the paused map", WAIT, || async {
        backlog(&env, "customers") >= 10
    })
    .await;
    let (group, topic) = (
        format!("{}.pause-buffer.customers", env.prefix),
        format!("{}.map.customers", env.prefix),
    );
    let held = held_offsets(&env, &group, &topic);
    let queued = backlog(&env, "customers");
    // The router has nothing to read meanwhile either.
    let router = (
        format!("{}.router", env.prefix),
        format!("{}.capture.fno", env.prefix),
    );
    let router_held = held_offsets(&env, &router.0, &router.1);

    // A witness group commits once, now, after the gate's last move, and
    // never again: when the broker has dropped its offsets, it has dropped
    // any offsets not renewed since.
    let witness = format!("{}.witness", env.prefix);
    commit_once(&env, &witness, &topic, &held);
    eventually(
        "the broker drops the witness group's offsets",
        Duration::from_secs(180),
        || {
            let gone = committed(&env, &witness, &topic)
                .iter()
                .all(|(_, o)| o.is_none());
            async move { gone }
        },
    )
    .await;
    still_held(&env, &group, &topic, &held);
    still_held(&env, &router.0, &router.1, &router_held);

    env.service(PAUSE_BUFFER).stop();
    env.service(PAUSE_BUFFER).restart();
    assert_eq!(env.states()["customers"], "Paused");
    assert_eq!(backlog(&env, "customers"), queued);
    env.ctl(&["run", "customers", "--timeout-secs", "60"]);
    arrived(&dv, "Q", 10).await;
    drained(&env, "customers", "dataverse").await;
    let upserts = upserts_per_key(&env.tail("apply:dataverse"));
    for tag in ["P", "Q"] {
        for i in 1..=10 {
            let key = format!("[\"{tag}{i:03}\"]");
            assert_eq!(
                upserts.get(&key),
                Some(&1),
                "{key} not released exactly once: {upserts:?}"
            );
        }
    }
    env.cleanup().await;
}

/// One side's table as the load writes it.
#[derive(Clone, Copy)]
struct Table {
    tag: &'static str,
    table: &'static str,
    key: &'static str,
    name: &'static str,
}

const LEFT: Table = Table {
    tag: "L",
    table: "customers_v3",
    key: "customeraccount",
    name: "organizationname",
};
const RIGHT: Table = Table {
    tag: "M",
    table: "accounts",
    key: "accountnumber",
    name: "name",
};
/// Records every tick of the load updates one of.
const HOT: u64 = 20;

fn now_micros() -> i64 {
    dualwrite_runtime::now_micros()
}

/// The load on one side until `stop`: every 10 ms one transaction that
/// creates a record named with its write time (µs) and updates one of the
/// side's hot records with the tick. Returns the ticks written.
fn load(c: Client, t: Table, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let mut tick = 0;
        while !stop.load(Ordering::Relaxed) {
            tick += 1;
            c.batch_execute(&format!(
                "BEGIN;
                 INSERT INTO {tb} ({k}, {n}) VALUES ('{tag}{tick:06}',
                   (extract(epoch from clock_timestamp()) * 1000000)::bigint::text);
                 UPDATE {tb} SET {n} = '{tick}' WHERE {k} = '{tag}H{h:02}';
                 COMMIT;",
                tb = t.table,
                k = t.key,
                n = t.name,
                tag = t.tag,
                h = tick % HOT
            ))
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tick
    })
}

/// When each record of the load arrived on the other side: (written µs,
/// arrived µs), polled every 100 ms until `stop`.
fn arrivals(
    c: Client,
    from: Table,
    to: Table,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Vec<(i64, i64)>> {
    let sql = format!(
        "SELECT {k}, {n} FROM {tb} WHERE {k} LIKE '{tag}0%'",
        k = to.key,
        n = to.name,
        tb = to.table,
        tag = from.tag
    );
    tokio::spawn(async move {
        let (mut seen, mut out) = (HashSet::new(), Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let now = now_micros();
            for r in c.query(sql.as_str(), &[]).await.unwrap() {
                let key: String = r.get(0);
                let written: Option<String> = r.get(1);
                if let Some(w) = written.and_then(|w| w.parse::<i64>().ok()) {
                    if seen.insert(key) {
                        out.push((w, now));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        out
    })
}

/// The router's and both appliers' instances for `n` shards.
fn spawn_shards(env: &mut TestEnv, n: u32) -> Vec<usize> {
    let count = n.to_string();
    let mut started = Vec::new();
    for i in 0..n {
        let index = i.to_string();
        let shard = ["--instance-index", &index, "--instances", &count];
        started.push(env.spawn(&[&["router"][..], &shard].concat()));
        for side in ["fno", "dataverse"] {
            started.push(env.spawn(&[&["apply", "--side", side][..], &shard].concat()));
        }
    }
    started
}

/// A phase of the load: (name, start µs, end µs).
type Phase = (String, i64, i64);

/// Latency (ms) of the changes written within each phase: count, p50, p99,
/// max, and the longest time without any arrival.
fn report(arrived: &mut [(i64, i64)], phases: &[Phase]) -> String {
    arrived.sort();
    let mut out =
        String::from("phase                  changes  p50 ms  p99 ms  max ms  longest gap ms\n");
    for (name, from, to) in phases {
        let mut lat: Vec<i64> = arrived
            .iter()
            .filter(|(w, _)| w >= from && w < to)
            .map(|(w, a)| (a - w) / 1000)
            .collect();
        lat.sort();
        let mut at: Vec<i64> = arrived
            .iter()
            .filter(|(_, a)| a >= from && a < to)
            .map(|(_, a)| *a)
            .collect();
        at.sort();
        let gap = at
            .windows(2)
            .map(|w| (w[1] - w[0]) / 1000)
            .max()
            .unwrap_or(0);
        let q = |f: f64| {
            lat.get(((lat.len() as f64 - 1.0) * f) as usize)
                .copied()
                .unwrap_or(0)
        };
        out.push_str(&format!(
            "{name:<22} {:>7} {:>7} {:>7} {:>7} {gap:>15}\n",
            lat.len(),
            q(0.5),
            q(0.99),
            lat.last().copied().unwrap_or(0)
        ));
    }
    out
}

/// Waits until the other side has every record of the load and each hot
/// record's last value.
async fn load_arrived(other: &Client, from: Table, to: Table, ticks: u64) {
    let sql = format!(
        "SELECT count(*) FILTER (WHERE {k} LIKE '{tag}0%'),
                count(*) FILTER (WHERE {k} LIKE '{tag}H%' AND {n} = ANY($1))
           FROM {tb}",
        k = to.key,
        n = to.name,
        tb = to.table,
        tag = from.tag
    );
    // The last tick that touched each hot record.
    let last: Vec<String> = (ticks.saturating_sub(HOT - 1)..=ticks)
        .map(|t| t.to_string())
        .collect();
    let what = format!("all {ticks} {} changes on the other side", from.tag);
    eventually(&what, WAIT, || async {
        let r = other.query_one(sql.as_str(), &[&last]).await.unwrap();
        (r.get::<_, i64>(0), r.get::<_, i64>(1)) == (ticks as i64, HOT as i64)
    })
    .await;
}

/// The router and both appliers go from 2 to 3 to 1 instances while both
/// sides write 100 changes a second each: every instance is stopped
/// (SIGTERM, offsets committed) and the new ones started with the new
/// count. Every change arrives, each record ends with its last value, and
/// the changes' latency through each step is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_appliers_rescale_2_3_1_under_load_without_losing_a_change() {
    let mut env = TestEnv::new("rescale").await;
    let (fno, dv) = (env.fno().await, env.dv().await);
    for (c, t) in [(&fno, LEFT), (&dv, RIGHT)] {
        c.batch_execute(&format!(
            "INSERT INTO {} ({}, {}) SELECT '{}H' || lpad(i::text, 2, '0'), 'hot' FROM generate_series(0, {}) i",
            t.table, t.key, t.name, t.tag, HOT - 1
        ))
        .await
        .unwrap();
    }
    for args in [
        &["capture", "--side", "fno"][..],
        &["capture", "--side", "dataverse"],
        &["pause-buffer"],
    ] {
        env.spawn(args);
    }
    let mut shards = spawn_shards(&mut env, 2);
    env.wait_for_slots(2).await;
    env.run_all_maps();

    let stop = Arc::new(AtomicBool::new(false));
    let polled = Arc::new(AtomicBool::new(false));
    let loads = [
        load(env.fno().await, LEFT, stop.clone()),
        load(env.dv().await, RIGHT, stop.clone()),
    ];
    let watch = [
        arrivals(env.dv().await, LEFT, RIGHT, polled.clone()),
        arrivals(env.fno().await, RIGHT, LEFT, polled.clone()),
    ];
    let steady = Duration::from_secs(8);
    let mut phases: Vec<Phase> = Vec::new();
    for (was, n) in [(2, 3), (3, 1)] {
        let from = now_micros();
        tokio::time::sleep(steady).await;
        let begin = now_micros();
        phases.push((format!("{was} instances"), from, begin));
        let t = Instant::now();
        env.stop_many(&shards);
        shards = spawn_shards(&mut env, n);
        eprintln!(
            "rescale {was} -> {n}: old instances stopped and new ones started in {:?}",
            t.elapsed()
        );
        // The load goes on while the new instances take over.
        tokio::time::sleep(steady).await;
        phases.push((
            format!("{was} -> {n}, {} s", steady.as_secs()),
            begin,
            now_micros(),
        ));
    }
    let from = now_micros();
    tokio::time::sleep(steady).await;
    stop.store(true, Ordering::Relaxed);
    phases.push(("1 instance".to_owned(), from, now_micros()));
    let [l, r] = loads;
    let (left_ticks, right_ticks) = (l.await.unwrap(), r.await.unwrap());
    load_arrived(&dv, LEFT, RIGHT, left_ticks).await;
    load_arrived(&fno, RIGHT, LEFT, right_ticks).await;
    polled.store(true, Ordering::Relaxed);
    let mut arrived = Vec::new();
    for w in watch {
        arrived.extend(w.await.unwrap());
    }
    eprintln!("{}", report(&mut arrived, &phases));
    all_drained(&env).await;
    let (code, out, err) = env.run(&["ctl", "verify"]);
    assert_eq!(code, 0, "ctl verify found differences:\n{out}\n{err}");
    env.cleanup().await;
}

/// The records of `topic` whose key is `key`, decoded as map statuses.
fn statuses_of(cfg: &dualwrite_model::Config, topic: &str, key: &str) -> Vec<String> {
    use rdkafka::Message;
    dualwrite_runtime::kafka::read_to_end(&cfg.kafka, topic)
        .unwrap()
        .iter()
        .filter(|m| m.key() == Some(key.as_bytes()))
        .filter_map(|m| m.payload())
        .filter_map(|p| {
            dualwrite_model::avro::decode::<dualwrite_model::lifecycle::MapStatus>(p).ok()
        })
        .map(|s| s.state.to_string())
        .collect()
}

/// The topics' settings, on the broker: the map topic's `retention.ms` as
/// the broker has it is what the pause buffer reports and warns against
/// (a topic made beforehand with one hour, where the configuration assumes
/// seven days); the initial-sync errors topic keeps everything; the status
/// topic is compacted, and with small segments the broker's cleaner
/// really drops a map's older statuses and keeps its latest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_settings_hold_on_the_broker() {
    use rdkafka::admin::{
        AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
    };
    use support::{http_get, sample};
    let mut env = TestEnv::new("topicsettings").await;
    let cfg =
        dualwrite_model::Config::parse(&std::fs::read_to_string(&env.config).unwrap()).unwrap();
    let admin: AdminClient<_> = dualwrite_runtime::kafka::client_config(&cfg.kafka, "test-admin")
        .create()
        .unwrap();
    let p = env.prefix.clone();
    let map_topic = format!("{p}.map.currencies");
    let made = admin
        .create_topics(
            &[
                NewTopic::new(&map_topic, cfg.kafka.partitions, TopicReplication::Fixed(1))
                    .set("retention.ms", "3600000"),
            ],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    assert!(made.iter().all(|r| r.is_ok()), "{made:?}");
    env.start_all_with(&["--metrics-addr", "127.0.0.1:0"]);
    env.wait_for_slots(2).await;
    env.run_all_maps();

    let pb = env.metrics_addr(PAUSE_BUFFER).await;
    let gauge = |text: &str, map: &str| {
        sample(
            text,
            &format!("dualwrite_map_topic_retention_seconds{{map=\"{map}\"}}"),
        )
    };
    eventually("the broker's retention reported", WAIT, || {
        let text = http_get(&pb, "/metrics").1;
        let (one, other) = (gauge(&text, "currencies"), gauge(&text, "customers"));
        async move { one == 3600.0 && other == 604_800.0 }
    })
    .await;
    let configs = |topic: String| {
        let kafka = &cfg.kafka;
        async move {
            dualwrite_runtime::kafka::configs::topic_configs(kafka, &topic)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        configs(format!("{p}.initial-sync-errors")).await["retention.ms"],
        "-1"
    );
    let status_topic = format!("{p}.status");
    assert_eq!(
        configs(status_topic.clone()).await["cleanup.policy"],
        "compact"
    );

    // Small segments and an eager cleaner, then many statuses of one map.
    let small = AlterConfig::new(ResourceSpecifier::Topic(&status_topic))
        .set("cleanup.policy", "compact")
        .set("segment.ms", "100")
        .set("min.cleanable.dirty.ratio", "0.01")
        .set("min.compaction.lag.ms", "0");
    let altered = admin
        .alter_configs([&small], &AdminOptions::new())
        .await
        .unwrap();
    assert!(altered.iter().all(|r| r.is_ok()), "{altered:?}");
    for _ in 0..10 {
        env.ctl(&["pause", "currencies"]);
        env.ctl(&["run", "currencies"]);
    }
    // Each status written has its event (the events topic is not compacted).
    let written = env
        .tail("events")
        .iter()
        .filter(|e| e["value"]["map"] == "currencies" && e["value"]["outcome"] == "STATE_CHANGED")
        .count();
    assert!(written >= 30, "{written} statuses of currencies");
    eventually("the broker compacted the status topic", WAIT, || {
        let kept = statuses_of(&cfg, &status_topic, "currencies");
        if kept.len() >= written / 2 {
            // A status written now rolls the segment, so the older ones can be cleaned.
            env.ctl(&["pause", "currencies"]);
            env.ctl(&["run", "currencies"]);
        }
        async move {
            kept.len() < written / 2 && kept.last().map(String::as_str) == Some("Running")
        }
    })
    .await;
    assert_eq!(env.states()["currencies"], "Running");
    env.cleanup().await;
}

/// A consumer whose prefetch is bounded (a gate's is 8 MiB) reads a topic
/// many times that size without waiting at each refill: librdkafka waits
/// `fetch.queue.backoff.ms` (1 s by default) before fetching again once
/// the queue was full, and a gate drained its queue long before that,
/// then waited for records the broker had (a third of a catch-up). With
/// the default this test saw 9 waits of 0.83–0.90 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_prefetch_is_refilled_without_a_pause() {
    use dualwrite_runtime::kafka::{self, Outgoing, TopicSpec};
    let env = TestEnv::new("prefetch").await;
    let cfg =
        dualwrite_model::Config::parse(&std::fs::read_to_string(&env.config).unwrap()).unwrap();
    let topic = format!("{}.prefetch", env.prefix);
    kafka::ensure_topics(&cfg.kafka, &[TopicSpec::new(topic.clone(), 1)])
        .await
        .unwrap();
    // 16 MiB in 1 KiB records: 16 refills of a 1 MiB queue.
    const RECORDS: usize = 16 * 1024;
    let producer = kafka::producer(&cfg.kafka, "prefetch-test").unwrap();
    let records: Vec<Outgoing> = (0..RECORDS)
        .map(|i| Outgoing {
            topic: topic.clone(),
            key: i.to_string(),
            payload: vec![b'x'; 1024],
        })
        .collect();
    for chunk in records.chunks(2048) {
        kafka::send_all(&producer, chunk).await.unwrap();
    }
    let group = format!("{}.prefetch-test", env.prefix);
    let bounded = [("queued.max.messages.kbytes", "1024")];
    let consumer = kafka::consumer_with(&cfg.kafka, "prefetch-test", &group, &bounded).unwrap();
    kafka::assign_at(&consumer, &topic, &BTreeMap::from([(0, 0)])).unwrap();
    let mut pauses = Vec::new();
    for n in 0..RECORDS {
        if n % 256 == 0 && n > 0 {
            // A batch's work, as a gate folds one: the fetcher decides on
            // its next fetch meanwhile, with the queue still full.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let asked = Instant::now();
        let m = tokio::time::timeout(WAIT, consumer.recv()).await;
        assert!(
            matches!(m, Ok(Ok(_))),
            "record {n} of {RECORDS} not read: {m:?}"
        );
        if n > 0 && asked.elapsed() >= PAUSE {
            pauses.push((n, asked.elapsed()));
        }
    }
    assert!(
        pauses.len() <= 1,
        "the consumer waited {} times for a record the broker had (record, wait): {pauses:?}",
        pauses.len()
    );
    env.cleanup().await;
}

/// A wait for the next record of a full topic that only a fetch postponed
/// by its backoff explains.
const PAUSE: Duration = Duration::from_millis(600);
