//! End-to-end test support: the real local stack (started by
//! `scripts/stack.sh up` if it is not running), fresh databases and topic
//! names per test, the services as real child processes, and waiting on
//! conditions with a deadline.

#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dualwrite_model::avro;
use dualwrite_model::record::{ApplyWrite, ExpectKind, Expectation, Field, WriteOp};
use rand::Rng;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio_postgres::{Client, NoTls};

pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Indices of the services [`TestEnv::start_all`] starts.
pub const CAPTURE_FNO: usize = 0;
pub const CAPTURE_DV: usize = 1;
pub const ROUTER: usize = 2;
pub const PAUSE_BUFFER: usize = 3;
pub const APPLY_FNO: usize = 4;
pub const APPLY_DV: usize = 5;
pub const BIN: &str = env!("CARGO_BIN_EXE_dualwrite");
/// `pause_buffer.resolver_cache_records` in every test's configuration:
/// 16, so that every test that changes more records than that runs the
/// resolver through its spill file, unless `DUALWRITE_TEST_RESOLVER_CACHE`
/// says otherwise (`scripts/soak.sh huge` measures the default, 10,000).
pub fn resolver_cache() -> usize {
    std::env::var("DUALWRITE_TEST_RESOLVER_CACHE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

/// Endpoints of the local stack.
#[derive(Debug, Clone)]
pub struct Stack {
    pub bootstrap: String,
    pub pg_url: String,
}

/// Starts the stack if needed (idempotent, serialised across processes).
pub fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| stack_script("up", &[]))
}

/// Runs `scripts/stack.sh <command>` with `env`; `up` returns the endpoints.
fn stack_script(command: &str, env: &[(&str, String)]) -> Stack {
    let out = Command::new("bash")
        .arg(Path::new(ROOT).join("scripts/stack.sh"))
        .arg(command)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/stack.sh");
    assert!(out.status.success(), "scripts/stack.sh {command} failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let vars: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    Stack {
        bootstrap: vars
            .get("DUALWRITE_BOOTSTRAP_SERVERS")
            .copied()
            .unwrap_or_default()
            .to_owned(),
        pg_url: vars
            .get("DUALWRITE_PG_URL")
            .copied()
            .unwrap_or_default()
            .to_owned(),
    }
}

/// A stack of a test's own (its own PostgreSQL cluster and broker, on free
/// ports, in its own folder), for faults that would disturb other tests:
/// broker and database restarts. Stopped and removed when dropped.
pub struct PrivateStack {
    pub stack: Stack,
    env: Vec<(&'static str, String)>,
    dir: PathBuf,
}

impl PrivateStack {
    pub fn start(name: &str) -> PrivateStack {
        PrivateStack::start_with(name, "")
    }

    /// A private stack whose broker also takes `kafka_properties`
    /// (`name=value` settings separated by spaces, e.g. a short offsets
    /// retention).
    pub fn start_with(name: &str, kafka_properties: &str) -> PrivateStack {
        // Below Linux's ephemeral range (32768 and up), so that no outgoing
        // connection takes the port between now and the servers' start.
        let free_port = || loop {
            let port = rand::rng().random_range(21_000..32_000u16);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        };
        let base = std::env::var_os("DUALWRITE_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!(
            "dualwrite-stack-{name}-{}",
            rand::rng().random_range(0..1_000_000u32)
        ));
        let env = vec![
            ("DUALWRITE_STATE_DIR", dir.display().to_string()),
            ("DUALWRITE_STACK_PG_PORT", free_port().to_string()),
            ("DUALWRITE_STACK_KAFKA_PORT", free_port().to_string()),
            (
                "DUALWRITE_STACK_KAFKA_CONTROLLER_PORT",
                free_port().to_string(),
            ),
            (
                "DUALWRITE_STACK_KAFKA_PROPERTIES",
                kafka_properties.to_owned(),
            ),
        ];
        let stack = stack_script("up", &env);
        PrivateStack { stack, env, dir }
    }

    /// `kill -9` of the broker.
    pub fn kill_broker(&self) {
        stack_script("kill-kafka", &self.env);
    }

    /// Immediate shutdown of PostgreSQL (as after a crash: recovery on start).
    pub fn kill_postgres(&self) {
        stack_script("kill-postgres", &self.env);
    }

    /// Starts what is not running.
    pub fn up(&self) {
        stack_script("up", &self.env);
    }
}

impl Drop for PrivateStack {
    fn drop(&mut self) {
        stack_script("down", &self.env);
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.dir.with_extension("lock"));
    }
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// The first column of the first row of `sql` as text; `None` without a row.
pub async fn text(c: &Client, sql: &str) -> Option<String> {
    c.query_opt(sql, &[])
        .await
        .unwrap()
        .map(|r| r.get::<_, String>(0))
}

/// Waits until `check` returns true, polling every 50 ms, or panics after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One test's world: two fresh databases with the demo schema and data, a
/// config file with a fresh topic prefix, and a folder for logs.
pub struct TestEnv {
    pub id: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub fno_db: String,
    pub dv_db: String,
    pub prefix: String,
    pub stack: Stack,
    services: Vec<Service>,
}

impl TestEnv {
    pub async fn new(name: &str) -> TestEnv {
        TestEnv::with_config(name, "").await
    }

    /// A test world whose config file ends with `extra` (TOML sections).
    pub async fn with_config(name: &str, extra: &str) -> TestEnv {
        TestEnv::on(stack().clone(), name, extra).await
    }

    /// A test world on the given stack.
    pub async fn on(stack: Stack, name: &str, extra: &str) -> TestEnv {
        let s = &stack;
        let id: String = {
            let mut r = rand::rng();
            (0..8)
                .map(|_| (b'a' + r.random_range(0..26)) as char)
                .collect()
        };
        let fno_db = format!("dw_{id}_fno");
        let dv_db = format!("dw_{id}_dv");
        let admin = connect(&format!("{}/postgres", s.pg_url)).await;
        for db in [&fno_db, &dv_db] {
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .await
                .unwrap();
        }
        let fno = connect(&format!("{}/{fno_db}", s.pg_url)).await;
        fno.batch_execute(
            &std::fs::read_to_string(Path::new(ROOT).join("deploy/demo/fno.sql")).unwrap(),
        )
        .await
        .unwrap();
        let dv = connect(&format!("{}/{dv_db}", s.pg_url)).await;
        dv.batch_execute(
            &std::fs::read_to_string(Path::new(ROOT).join("deploy/demo/dataverse.sql")).unwrap(),
        )
        .await
        .unwrap();

        // Under the stack's state folder when there is one (CI gives each run its own).
        let base = std::env::var_os("DUALWRITE_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("dualwrite-test-{name}-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let prefix = format!("t-{name}-{id}");
        let port = s.pg_url.rsplit(':').next().unwrap().to_owned();
        let config_text =
            std::fs::read_to_string(Path::new(ROOT).join("deploy/demo/dualwrite.toml"))
                .unwrap()
                .replace(
                    "bootstrap_servers = \"127.0.0.1:19092\"",
                    &format!("bootstrap_servers = \"{}\"", s.bootstrap),
                )
                .replace(
                    "topic_prefix = \"dualwrite\"",
                    &format!("topic_prefix = \"{prefix}\""),
                )
                .replace("port = 55432", &format!("port = {port}"))
                .replace(
                    "dbname = \"dualwrite_fno\"",
                    &format!("dbname = \"{fno_db}\""),
                )
                .replace(
                    "dbname = \"dualwrite_dataverse\"",
                    &format!("dbname = \"{dv_db}\""),
                )
                + &format!(
                    "\n[pause_buffer]\nresolver_cache_records = {}\nstate_dir = \"{}\"\n",
                    resolver_cache(),
                    dir.join("spill").display()
                )
                + "\n[capture]\npoll_interval_ms = 20\n"
                + extra;
        let config = dir.join("dualwrite.toml");
        std::fs::write(&config, config_text).unwrap();
        TestEnv {
            id,
            dir,
            config,
            fno_db,
            dv_db,
            prefix,
            stack,
            services: Vec::new(),
        }
    }

    pub async fn fno(&self) -> Client {
        connect(&format!("{}/{}", self.stack.pg_url, self.fno_db)).await
    }

    pub async fn dv(&self) -> Client {
        connect(&format!("{}/{}", self.stack.pg_url, self.dv_db)).await
    }

    /// Starts `dualwrite <args>` as a child process with this env's config.
    pub fn spawn(&mut self, args: &[&str]) -> usize {
        let svc = Service::start(&self.config, &self.dir, args);
        self.services.push(svc);
        self.services.len() - 1
    }

    pub fn service(&mut self, i: usize) -> &mut Service {
        &mut self.services[i]
    }

    /// Stops every service at once (SIGTERM, as an orchestrator does),
    /// each given `within` to exit: (name, exited in time, how long).
    pub fn stop_all_within(&self, within: Duration) -> Vec<(String, bool, Duration)> {
        std::thread::scope(|scope| {
            let stopping: Vec<_> = self
                .services
                .iter()
                .map(|svc| {
                    scope.spawn(move || {
                        let t = std::time::Instant::now();
                        let exited = svc.stop_within(within);
                        (svc.name.clone(), exited, t.elapsed())
                    })
                })
                .collect();
            stopping.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Runs `dualwrite <args>` to completion: (exit code, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .env("DUALWRITE_CONFIG", &self.config)
            // The test's configuration file is the truth (scripts/test.sh
            // exports the shared stack's endpoints, which would override it).
            .env_remove("DUALWRITE_BOOTSTRAP_SERVERS")
            .env_remove("DUALWRITE_TOPIC_PREFIX")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The records of a topic (`errors`, `capture:<side>`, …) as JSON values, via `dualwrite ctl tail`.
    pub fn tail(&self, which: &str) -> Vec<serde_json::Value> {
        let (code, out, err) =
            self.run(&["ctl", "tail", which, "--max", "100000", "--idle-secs", "1"]);
        assert_eq!(code, 0, "ctl tail {which} failed: {err}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l}: {e}")))
            .collect()
    }

    /// Reads a topic (as [`TestEnv::tail`]) until `done` holds for its
    /// records, or panics after `timeout` naming `what`; returns them.
    pub async fn tail_until(
        &self,
        which: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let mut records = Vec::new();
        eventually(what, timeout, || {
            records = self.tail(which);
            let ok = done(&records);
            async move { ok }
        })
        .await;
        records
    }

    /// Starts every service as its own process: both capturers, the
    /// router, the pause buffer, both appliers (indices 0 to 5, in that order).
    pub fn start_all(&mut self) {
        self.start_all_with(&[]);
    }

    /// [`TestEnv::start_all`], with `extra` arguments for every service.
    pub fn start_all_with(&mut self, extra: &[&str]) {
        for args in [
            &["capture", "--side", "fno"][..],
            &["capture", "--side", "dataverse"],
            &["router"],
            &["pause-buffer"],
            &["apply", "--side", "fno"],
            &["apply", "--side", "dataverse"],
        ] {
            let mut a = args.to_vec();
            a.extend_from_slice(extra);
            self.spawn(&a);
        }
    }

    /// Runs every map (contacts with its related maps, dependencies first)
    /// and waits until they all run.
    pub fn run_all_maps(&self) {
        let (code, out, err) = self.run(&[
            "ctl",
            "run",
            "contacts",
            "--include-related",
            "--timeout-secs",
            "60",
        ]);
        assert_eq!(code, 0, "ctl run failed:\n{out}\n{err}\n{}", self.logs());
    }

    /// `dualwrite ctl <args>`; panics unless it exits 0. Returns stdout.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut all = vec!["ctl"];
        all.extend_from_slice(args);
        let (code, out, err) = self.run(&all);
        assert_eq!(
            code,
            0,
            "ctl {args:?} failed:\n{out}\n{err}\n{}",
            self.logs()
        );
        out
    }

    /// Each map's state, from `ctl maps --json`.
    pub fn states(&self) -> HashMap<String, String> {
        let out = self.ctl(&["maps", "--json"]);
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        rows.iter()
            .map(|r| {
                (
                    r["map"].as_str().unwrap().to_owned(),
                    r["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// Waits until both capturers created their slots (changes from then on
    /// are captured). A slot is listed while it is being created, until the
    /// transactions running then have ended (seconds on a busy cluster);
    /// it has a confirmed position once created.
    pub async fn wait_for_slots(&self, n: i64) {
        let admin = connect(&format!("{}/postgres", self.stack.pg_url)).await;
        let dbs = [self.fno_db.clone(), self.dv_db.clone()];
        eventually(
            "replication slots created",
            Duration::from_secs(60),
            || async {
                let row = admin
                    .query_one(
                        "SELECT count(*) FROM pg_replication_slots
                          WHERE database = ANY($1) AND confirmed_flush_lsn IS NOT NULL",
                        &[&dbs.as_slice()],
                    )
                    .await
                    .unwrap();
                row.get::<_, i64>(0) >= n
            },
        )
        .await;
    }

    /// Stops the services, deletes the topics, drops the slots and the databases.
    pub async fn cleanup(mut self) {
        for s in &mut self.services {
            s.stop();
        }
        // Fewer partitions for the shared broker to keep (a failed test keeps
        // its topics, like its logs).
        if let Ok(cfg) = dualwrite_model::Config::parse(
            &std::fs::read_to_string(&self.config).unwrap_or_default(),
        ) {
            let prefix = format!("{}.", self.prefix);
            let _ = dualwrite_runtime::kafka::delete_topics_with_prefix(&cfg.kafka, &prefix).await;
        }
        let admin = connect(&format!("{}/postgres", self.stack.pg_url)).await;
        for db in [&self.fno_db, &self.dv_db] {
            drop_slots(&admin, db).await;
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .await;
        }
        // Replication origins are cluster-wide, and every one that was used
        // holds one of max_replication_slots' state slots until dropped.
        if let Ok(cfg) = dualwrite_model::Config::parse(
            &std::fs::read_to_string(&self.config).unwrap_or_default(),
        ) {
            for side in [
                dualwrite_model::config::SideId::Left,
                dualwrite_model::config::SideId::Right,
            ] {
                for origin in cfg
                    .origin_names(side)
                    .into_iter()
                    .chain(cfg.rows_origin_names(side))
                {
                    let _ = admin
                        .execute("SELECT pg_replication_origin_drop($1)", &[&origin])
                        .await;
                }
            }
        }
        // DUALWRITE_TEST_KEEP=1 keeps the services' logs of passing tests too.
        if std::env::var_os("DUALWRITE_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// SIGTERM to the services `indices` at once, then waits until each
    /// exited (as [`Service::stop`]).
    pub fn stop_many(&mut self, indices: &[usize]) {
        for &i in indices {
            self.services[i].terminate();
        }
        for &i in indices {
            self.services[i].stop();
        }
    }

    /// The last `lines` lines of each service's log, for failure messages.
    pub fn logs_tail(&self, lines: usize) -> String {
        self.services
            .iter()
            .map(|s| {
                let text = std::fs::read_to_string(&s.log).unwrap_or_default();
                let all: Vec<&str> = text.lines().collect();
                let tail = all[all.len().saturating_sub(lines)..].join("\n");
                format!("--- {} (last {lines} lines) ---\n{tail}\n", s.name)
            })
            .collect()
    }

    /// The services' logs, for failure messages.
    pub fn logs(&self) -> String {
        self.services
            .iter()
            .map(|s| {
                format!(
                    "--- {} ---\n{}",
                    s.name,
                    std::fs::read_to_string(&s.log).unwrap_or_default()
                )
            })
            .collect()
    }
}

/// A service running as a child process of the shared harness
/// ([`dualwrite_process::Process`]); killed when dropped.
pub struct Service(dualwrite_process::Process);

impl std::ops::Deref for Service {
    type Target = dualwrite_process::Process;
    fn deref(&self) -> &dualwrite_process::Process {
        &self.0
    }
}

impl Service {
    fn start(config: &Path, dir: &Path, args: &[&str]) -> Service {
        let name = args.join("-").replace("--", "");
        let config = config.to_owned();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let recipe = Box::new(move || {
            let mut c = Command::new(BIN);
            c.args(&args)
                .env("DUALWRITE_CONFIG", &config)
                .env_remove("DUALWRITE_BOOTSTRAP_SERVERS")
                .env_remove("DUALWRITE_TOPIC_PREFIX")
                .env("RUST_LOG", "info");
            c
        });
        Service(dualwrite_process::Process::start(&name, dir, recipe).expect("start a service"))
    }

    /// Starts the process again (appending to its log).
    pub fn restart(&self) {
        self.0.restart().expect("restart a service");
    }
}

/// Records of `topic` that consumer group `group` has not committed yet.
pub fn group_lag(env: &TestEnv, group: &str, topic: &str) -> i64 {
    let cfg =
        dualwrite_model::Config::parse(&std::fs::read_to_string(&env.config).unwrap()).unwrap();
    let marks = dualwrite_runtime::kafka::watermarks(&cfg.kafka, topic)
        .unwrap_or_else(|e| panic!("watermarks of {topic}: {e}"));
    let committed = dualwrite_runtime::kafka::group_positions(&cfg.kafka, group, topic)
        .unwrap_or_else(|e| panic!("offsets of group {group} on {topic}: {e}"));
    marks
        .iter()
        .map(|(p, lo, hi)| hi - committed.get(p).copied().unwrap_or(*lo))
        .sum()
}

/// The offsets consumer group `group` committed on each partition of
/// `topic` (`None`: nothing committed, or the broker dropped it).
pub fn committed(env: &TestEnv, group: &str, topic: &str) -> Vec<(i32, Option<i64>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let cfg =
        dualwrite_model::Config::parse(&std::fs::read_to_string(&env.config).unwrap()).unwrap();
    let marks = dualwrite_runtime::kafka::watermarks(&cfg.kafka, topic).unwrap();
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.stack.bootstrap)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for (p, _, _) in &marks {
        tpl.add_partition(topic, *p);
    }
    let got = dualwrite_runtime::kafka::retry::blocking("committed offsets", || {
        consumer.committed_offsets(tpl.clone(), Duration::from_secs(10))
    })
    .unwrap();
    marks
        .iter()
        .map(|(p, _, _)| {
            let o = match got.find_partition(topic, *p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            };
            (*p, o)
        })
        .collect()
}

/// Commits `offsets` (partition, next offset) of `topic` for consumer
/// group `group`, once, as a consumer that never joins the group.
pub fn commit_once(env: &TestEnv, group: &str, topic: &str, offsets: &[(i32, i64)]) {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.stack.bootstrap)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for (p, o) in offsets {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
            .unwrap();
    }
    dualwrite_runtime::kafka::retry::blocking("commit", || consumer.commit(&tpl, CommitMode::Sync))
        .unwrap();
}

/// Records of `map`'s topic not yet released by the pause buffer, from `ctl maps`.
pub fn backlog(env: &TestEnv, map: &str) -> i64 {
    let rows: Vec<serde_json::Value> = serde_json::from_str(&env.ctl(&["maps", "--json"])).unwrap();
    rows.iter()
        .find(|r| r["map"] == map)
        .and_then(|r| r["backlog"].as_i64())
        .unwrap_or(0)
}

/// Waits until every record on the way to `side` was applied: the pause
/// buffer released everything of `map` and the applier committed all it read.
pub async fn drained(env: &TestEnv, map: &str, side: &str) {
    let p = env.prefix.clone();
    eventually("pipeline drained", Duration::from_secs(60), || {
        let lag = group_lag(
            env,
            &format!("{p}.pause-buffer.{map}"),
            &format!("{p}.map.{map}"),
        ) + group_lag(
            env,
            &format!("{p}.apply.{side}"),
            &format!("{p}.apply.{side}"),
        );
        async move { lag == 0 }
    })
    .await;
}

/// Waits until nothing is in flight anywhere: the router, every map's gate
/// and both appliers committed everything on their topics.
pub async fn all_drained(env: &TestEnv) {
    let p = env.prefix.clone();
    let maps = ["customer_groups", "currencies", "customers", "contacts"];
    let mut pairs = Vec::new();
    for side in ["fno", "dataverse"] {
        pairs.push((format!("{p}.router"), format!("{p}.capture.{side}")));
        pairs.push((format!("{p}.apply.{side}"), format!("{p}.apply.{side}")));
    }
    for m in maps {
        pairs.push((format!("{p}.pause-buffer.{m}"), format!("{p}.map.{m}")));
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let lags: Vec<(String, i64)> = pairs
            .iter()
            .map(|(g, t)| (format!("{g} on {t}"), group_lag(env, g, t)))
            .filter(|(_, l)| *l != 0)
            .collect();
        if lags.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pipeline not drained after 90 s: {lags:?}\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plain HTTP/1.0 GET on loopback: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A sample's value in Prometheus text output (0 when absent).
pub fn sample(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

impl TestEnv {
    /// The address a service serves its metrics on (started with
    /// `--metrics-addr 127.0.0.1:0`), read from its log.
    pub async fn metrics_addr(&mut self, i: usize) -> String {
        let log = self.services[i].log.clone();
        let mut addr = None;
        eventually(
            "metrics endpoint announced",
            Duration::from_secs(60),
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                addr = text
                    .split("metrics on http://")
                    .nth(1)
                    .and_then(|rest| rest.split('/').next())
                    .map(str::to_owned);
                let found = addr.is_some();
                async move { found }
            },
        )
        .await;
        addr.unwrap()
    }
}

// Records forged for the services' topics.

pub fn producer(env: &TestEnv) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &env.stack.bootstrap)
        .create()
        .unwrap()
}

/// Produces a record (with a header, if given) and waits for the broker.
pub async fn produce(
    p: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
    header: Option<&str>,
) {
    let mut r = FutureRecord::to(topic).key(key).payload(payload);
    if let Some(h) = header {
        r = r.headers(OwnedHeaders::new().insert(Header {
            key: dualwrite_model::signing::HEADER,
            value: Some(h),
        }));
    }
    p.send(r, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// A decision (version 1) for the dataverse side that would be written at once
/// (expecting nothing): `entity`, key and values as given.
pub fn decision(
    map: &str,
    entity: &str,
    key: &[(&str, &str)],
    values: &[(&str, &str)],
) -> ApplyWrite {
    let fields = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| Field::new(*k, Some(*v))).collect();
    ApplyWrite {
        map: map.into(),
        source_side: "fno".into(),
        target_side: "dataverse".into(),
        target_entity: entity.into(),
        key: fields(key),
        version: 1,
        op: WriteOp::Upsert,
        values: fields(values),
        expect: Expectation {
            kind: ExpectKind::Nothing,
            version: 0,
            present: false,
            values: Vec::new(),
        },
        moved: Vec::new(),
        source_lsn: 0,
        commit_time: 0,
    }
}

pub async fn send_decisions(env: &TestEnv, writes: &[ApplyWrite]) {
    let p = producer(env);
    let topic = format!("{}.apply.dataverse", env.prefix);
    for w in writes {
        produce(&p, &topic, &w.kafka_key(), &avro::encode(w).unwrap(), None).await;
    }
}

/// Drops the slots of database `db`. A slot is held by the server's
/// process streaming it until that process sees its capturer gone: ended
/// first, then dropped.
async fn drop_slots(admin: &tokio_postgres::Client, db: &str) {
    let _ = admin
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = $1 AND active_pid IS NOT NULL",
            &[&db],
        )
        .await;
    eventually("replication slots dropped", Duration::from_secs(30), || async {
        admin
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1",
                &[&db],
            )
            .await
            .is_ok()
    })
    .await;
}
