//! The Debezium peers: Debezium's PostgreSQL connector (pgoutput, a slot
//! and a filtered publication of its own, no snapshot) on Kafka Connect
//! standalone, as a child JVM, alone (the capture hop) or with Debezium's
//! JDBC sink writing the other database (one direction end to end). Their
//! jars are fetched from Maven Central once, with `peers/debezium/pom.xml`
//! (the worker and the source, on its class path) and
//! `peers/debezium-jdbc/pom.xml` (the sink, a plugin with a class loader of
//! its own), into the cache; nothing of them is built or copied into the
//! project.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;

use crate::env::{Ctx, Service};
use crate::measure::wait_for;

/// What is fetched: Debezium's connector, Connect's runtime and JSON
/// converter, a log4j2 binding.
const POM: &str = include_str!("../peers/debezium/pom.xml");

/// Debezium's JDBC sink connector, without the Kafka artifacts.
const SINK_POM: &str = include_str!("../peers/debezium-jdbc/pom.xml");

/// A `<name>value</name>` property of a pom.
fn pom_property(pom: &'static str, name: &str) -> &'static str {
    let open = format!("<{name}>");
    pom.split_once(open.as_str())
        .and_then(|(_, rest)| rest.split_once('<'))
        .map_or("unknown", |(v, _)| v)
}

/// `Debezium 3.6.1.Final on Kafka Connect 4.1.1`, for the report.
pub fn describe() -> String {
    format!(
        "Debezium {} on Kafka Connect {}",
        pom_property(POM, "debezium.version"),
        pom_property(POM, "kafka.version")
    )
}

/// `Debezium's JDBC sink 3.5.0.Final`, for the report.
pub fn describe_sink() -> String {
    format!(
        "Debezium's JDBC sink {}",
        pom_property(SINK_POM, "debezium.version")
    )
}

/// The folder of the worker's and the source's jars, fetched with Maven on
/// first use. Blocking.
pub fn libs(cache: &Path) -> Result<PathBuf> {
    let home = cache.join(format!(
        "debezium-{}-connect-{}",
        pom_property(POM, "debezium.version"),
        pom_property(POM, "kafka.version")
    ));
    fetch(&home, POM, "libs", &[])
}

/// The worker's `plugin.path`: a folder holding one plugin, the JDBC
/// sink's jars (fetched with Maven on first use). Blocking.
pub fn sink_plugins(cache: &Path) -> Result<PathBuf> {
    let home = cache.join(format!(
        "debezium-jdbc-{}",
        pom_property(SINK_POM, "debezium.version")
    ));
    // The worker provides Connect's API and the Kafka client.
    fetch(
        &home,
        SINK_POM,
        "plugins/debezium-connector-jdbc",
        &["-DexcludeGroupIds=org.apache.kafka"],
    )?;
    Ok(home.join("plugins"))
}

/// Fetches the runtime dependencies of `pom` into `<home>/<into>` (through
/// a Maven repository of its own, removed afterwards: the cache holds only
/// the jars), unless they are there already.
fn fetch(home: &Path, pom: &'static str, into: &str, args: &[&str]) -> Result<PathBuf> {
    let libs = home.join(into);
    // `.complete` holds the pom the jars came from: a changed pom is
    // fetched again.
    if std::fs::read_to_string(libs.join(".complete")).is_ok_and(|s| s == pom) {
        return Ok(libs);
    }
    let tmp = home.join(format!("fetch.{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let pom_path = tmp.join("pom.xml");
    std::fs::write(&pom_path, pom)?;
    let log = tmp.join("mvn.log");
    let out = std::fs::File::create(&log)?;
    eprintln!(
        "bench: fetching {} from Maven Central into {} (first run only)",
        pom_property(pom, "artifactId"),
        libs.display()
    );
    let status = Command::new("mvn")
        .arg("-q")
        .arg("-B")
        .arg(format!("-Dmaven.repo.local={}", tmp.join("m2").display()))
        .arg("-f")
        .arg(&pom_path)
        .arg("dependency:copy-dependencies")
        .arg("-DincludeScope=runtime")
        .args(args)
        .arg(format!("-DoutputDirectory={}", tmp.join("libs").display()))
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .context("run mvn (Maven) to fetch a Debezium peer: is it installed?")?;
    if !status.success() {
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&tmp);
        bail!(
            "fetching {} with Maven failed ({status}):\n{out}",
            libs.display()
        );
    }
    let _ = std::fs::remove_dir_all(&libs);
    if let Some(parent) = libs.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::rename(tmp.join("libs"), &libs)?;
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::write(libs.join(".complete"), pom)?;
    Ok(libs)
}

/// The topic Debezium writes `bench_items` to under `topic_prefix` (which
/// must exist before the worker starts: the broker does not create topics
/// on use).
pub fn table_topic(topic_prefix: &str) -> String {
    format!("{topic_prefix}.public.bench_items")
}

/// A Kafka Connect standalone worker running Debezium's PostgreSQL
/// connector on one table, and in a pipeline Debezium's JDBC sink too.
pub struct Connect {
    service: Service,
    /// Its sources' replication slots (and publications).
    slots: Vec<String>,
    /// The topic of the (first) source's table: `<topic
    /// prefix>.public.bench_items`.
    pub topic: String,
}

/// One direction of a pipeline: Debezium's source on `from` (without
/// `arrived_at`, which the target fills in), its records on
/// `<topic_prefix>.public.bench_items`, and the JDBC sink upserting them
/// by key into `bench_items` of `to`.
pub struct Direction<'a> {
    pub from: &'a str,
    pub to: &'a str,
    pub topic_prefix: String,
    /// With both directions at once: the source publishes only the rows
    /// whose key starts with this (those made on its side), through a
    /// publication made beforehand with that row filter, so that what the
    /// other direction's sink writes is not sent back (PostgreSQL 15 has
    /// no `origin = none`; the native anchor filters the same way).
    pub own_keys: Option<&'static str>,
    /// Whether the source first copies the rows the table holds (a
    /// snapshot, of its own keys only with `own_keys`) before it streams.
    pub snapshot: bool,
}

impl Direction<'_> {
    /// The source's properties of this direction, before `extra`.
    fn source_properties(&self) -> String {
        let mut props = "column.exclude.list=public.bench_items.arrived_at\n".to_owned();
        if self.own_keys.is_some() {
            props.push_str("publication.autocreate.mode=disabled\n");
        }
        if self.snapshot {
            props.push_str("snapshot.mode=initial\n");
            if let Some(keys) = self.own_keys {
                props.push_str(&format!(
                    "snapshot.select.statement.overrides=public.bench_items\n\
                     snapshot.select.statement.overrides.public.bench_items=\
                     SELECT * FROM public.bench_items WHERE id LIKE '{keys}%'\n"
                ));
            }
        }
        props
    }
}

/// The JDBC sink connector's name on the worker (of the first direction;
/// the others' are suffixed).
const SINK_NAME: &str = "dualwrite-bench-jdbc-sink";

/// The source connector's name (likewise).
const SOURCE_NAME: &str = "dualwrite-bench-debezium";

/// The replication slot and publication of a source on `db`.
fn slot_of(db: &str) -> String {
    format!("{db}_dbz")
}

/// Makes the publication of a source on `db` that publishes only the rows
/// whose key starts with `keys` (see [`Direction::own_keys`]).
async fn own_publication(ctx: &Ctx, db: &str, keys: &str) -> Result<()> {
    let client = ctx.connect(db).await?;
    client
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE bench_items WHERE (id LIKE '{keys}%')",
            slot_of(db)
        ))
        .await
        .with_context(|| format!("create the publication of Debezium's source on {db}"))
}

/// The state of the first task in a connector's status
/// (`{"tasks":[{"id":0,"state":"PAUSED",…}],…}`).
fn task_state(status: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(status).ok()?;
    Some(v["tasks"][0]["state"].as_str()?.to_owned())
}

/// Log line of a task that failed for good (the worker itself goes on).
const TASK_FAILED: &str = "Task threw an uncaught and unrecoverable exception";

/// What a worker runs: its jars, its converters, its connectors.
struct Worker<'a> {
    libs: &'a Path,
    /// `plugin.path`, when a connector is a plugin.
    plugins: Option<&'a Path>,
    /// JSON with schemas (the JDBC sink needs them) or plain JSON.
    schemas: bool,
    /// (file name, properties) of each connector.
    connectors: Vec<(String, String)>,
}

impl Connect {
    /// Starts a worker capturing `bench_items` of `db` into
    /// `<topic_prefix>.public.bench_items` (which must exist: the broker
    /// does not create topics on use). `extra` is appended to the
    /// connector's properties. Returns once its slot is being read.
    pub async fn start(
        ctx: &Ctx,
        libs: &Path,
        dir: &Path,
        db: &str,
        topic_prefix: &str,
        extra: &str,
    ) -> Result<Connect> {
        let worker = Worker {
            libs,
            plugins: None,
            schemas: false,
            connectors: vec![(
                "connect-debezium".into(),
                source(ctx, SOURCE_NAME, db, topic_prefix, extra),
            )],
        };
        Self::launch(
            ctx,
            dir,
            worker,
            vec![slot_of(db)],
            table_topic(topic_prefix),
        )
        .await
    }

    /// Starts a worker running each of `directions` end to end (one
    /// source and one JDBC sink each); `extra` is appended to each
    /// source's properties. Returns once every source reads its slot (at
    /// once for those taking a snapshot first).
    pub async fn start_pipeline(
        ctx: &Ctx,
        (libs, plugins): (&Path, &Path),
        dir: &Path,
        directions: &[Direction<'_>],
        extra: &str,
    ) -> Result<Connect> {
        let mut connectors = Vec::new();
        for (i, d) in directions.iter().enumerate() {
            let suffix = if i == 0 {
                String::new()
            } else {
                format!("-{i}")
            };
            if let Some(keys) = d.own_keys {
                own_publication(ctx, d.from, keys).await?;
            }
            let props = format!("{}{extra}", d.source_properties());
            let (source_name, sink_name) = (
                format!("{SOURCE_NAME}{suffix}"),
                format!("{SINK_NAME}{suffix}"),
            );
            let topic = table_topic(&d.topic_prefix);
            connectors.push((
                format!("connect-debezium{suffix}"),
                source(ctx, &source_name, d.from, &d.topic_prefix, &props),
            ));
            connectors.push((
                format!("connect-jdbc-sink{suffix}"),
                jdbc_sink(ctx, &sink_name, d.to, &topic),
            ));
        }
        let worker = Worker {
            libs,
            plugins: Some(plugins),
            schemas: true,
            connectors,
        };
        // A source taking a snapshot reads its slot only after it.
        let slots = directions
            .iter()
            .filter(|d| !d.snapshot)
            .map(|d| slot_of(d.from))
            .collect();
        let topic = table_topic(&directions[0].topic_prefix);
        Self::launch(ctx, dir, worker, slots, topic).await
    }

    async fn launch(
        ctx: &Ctx,
        dir: &Path,
        worker: Worker<'_>,
        slots: Vec<String>,
        topic: String,
    ) -> Result<Connect> {
        let mut files = vec![write(
            dir,
            "connect-worker",
            &worker_properties(ctx, dir, &worker),
        )?];
        for (name, text) in &worker.connectors {
            files.push(write(dir, name, text)?);
        }
        let log4j_path = write(dir, "connect-log4j2", LOG4J)?;
        let java = match std::env::var_os("JAVA_HOME") {
            Some(h) => PathBuf::from(h).join("bin/java"),
            None => PathBuf::from("java"),
        };
        let log4j = format!("-Dlog4j2.configurationFile={}", log4j_path.display());
        let classpath = format!("{}/*", worker.libs.display());
        let recipe = Box::new(move || {
            let mut cmd = Command::new(&java);
            cmd.args([
                "-Xmx512m",
                "-Xms128m",
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
            ])
            .arg(&log4j)
            .arg("-cp")
            .arg(&classpath)
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .args(&files);
            cmd
        });
        let c = Connect {
            service: Service::start("debezium-connect", dir, recipe)?,
            slots,
            topic,
        };
        let admin = ctx.connect("postgres").await?;
        for slot in &c.slots {
            c.wait_streaming(&admin, slot).await?;
        }
        Ok(c)
    }

    /// Waits until a source reads its slot (rows committed from then on
    /// are captured).
    async fn wait_streaming(&self, admin: &Client, slot: &str) -> Result<()> {
        wait_for(
            &format!("Debezium reading its slot {slot}"),
            Duration::from_secs(180),
            Duration::from_millis(200),
            || async {
                self.check_alive()?;
                let active: Option<bool> = admin
                    .query_opt(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                        &[&slot],
                    )
                    .await?
                    .map(|r| r.get(0));
                Ok(active == Some(true))
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}; log:\n{}", self.service.log_tail(40)))
    }

    /// An error when the worker exited or its task failed, with its log.
    pub fn check_alive(&self) -> Result<()> {
        if let Some(status) = self.service.exited() {
            bail!(
                "Kafka Connect exited ({status}); log:\n{}",
                self.service.log_tail(40)
            );
        }
        let log = std::fs::read_to_string(&self.service.log).unwrap_or_default();
        if let Some(at) = log.find(TASK_FAILED) {
            let end = (at + 4000).min(log.len());
            let end = (end..log.len())
                .find(|&i| log.is_char_boundary(i))
                .unwrap_or(log.len());
            bail!("the Debezium task failed:\n{}", &log[at..end]);
        }
        Ok(())
    }

    /// The worker's REST address, from its log line `REST server
    /// listening at http://<addr>/` (it listens on a port of its choosing).
    fn rest_addr(&self) -> Result<String> {
        let log = std::fs::read_to_string(&self.service.log).unwrap_or_default();
        log.split("REST server listening at http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("the worker's log names no REST address yet"))
    }

    /// Pauses or resumes the JDBC sink through the worker's REST API, as
    /// an operator would, and waits until its task says so (a paused
    /// sink reads nothing: what the source captures waits on the topic).
    pub async fn set_sink_paused(&self, paused: bool) -> Result<()> {
        let (verb, want) = if paused {
            ("pause", "PAUSED")
        } else {
            ("resume", "RUNNING")
        };
        let addr = self.rest_addr()?;
        let path = format!("/connectors/{SINK_NAME}/{verb}");
        let (code, body) = {
            let (a, p) = (addr.clone(), path.clone());
            tokio::task::spawn_blocking(move || crate::env::http(&a, "PUT", &p)).await?
        };
        if code != 202 {
            bail!("PUT {path} on Kafka Connect answered {code}: {body}");
        }
        let status = format!("/connectors/{SINK_NAME}/status");
        wait_for(
            &format!("the JDBC sink's task {want}"),
            Duration::from_secs(60),
            Duration::from_millis(100),
            || async {
                self.check_alive()?;
                let (a, p) = (addr.clone(), status.clone());
                let (_, body) =
                    tokio::task::spawn_blocking(move || crate::env::http(&a, "GET", &p)).await?;
                Ok(task_state(&body).as_deref() == Some(want))
            },
        )
        .await
    }

    /// The worker's process (for its memory and CPU time).
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// Stops the worker (SIGTERM, then SIGKILL after 30 s); its slot stays
    /// until the database is dropped.
    pub fn stop(&self) {
        self.service.stop();
    }
}

const LOG4J: &str = "status = warn\n\
     appender.out.type = Console\n\
     appender.out.name = out\n\
     appender.out.layout.type = PatternLayout\n\
     appender.out.layout.pattern = [%d] %p %m (%c)%n\n\
     rootLogger.level = info\n\
     rootLogger.appenderRef.out.ref = out\n";

/// Writes `<dir>/<name>.properties`.
fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.properties"));
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

fn worker_properties(ctx: &Ctx, dir: &Path, w: &Worker<'_>) -> String {
    let plugins = w
        .plugins
        .map(|p| format!("plugin.path={}\n", p.display()))
        .unwrap_or_default();
    format!(
        "# written by dualwrite-bench\n\
         bootstrap.servers={}\n\
         key.converter=org.apache.kafka.connect.json.JsonConverter\n\
         value.converter=org.apache.kafka.connect.json.JsonConverter\n\
         key.converter.schemas.enable={schemas}\n\
         value.converter.schemas.enable={schemas}\n\
         offset.storage.file.filename={}\n\
         offset.flush.interval.ms=10000\n\
         listeners=http://127.0.0.1:0\n\
         {plugins}",
        ctx.bootstrap,
        dir.join("connect.offsets").display(),
        schemas = w.schemas,
    )
}

/// Debezium's PostgreSQL connector on `bench_items` of `db`, slot and
/// publication `<db>_dbz`.
fn source(ctx: &Ctx, name: &str, db: &str, topic_prefix: &str, extra: &str) -> String {
    format!(
        "# written by dualwrite-bench\n\
         name={name}\n\
         connector.class=io.debezium.connector.postgresql.PostgresConnector\n\
         tasks.max=1\n\
         database.hostname={}\n\
         database.port={}\n\
         database.user={}\n\
         database.dbname={db}\n\
         topic.prefix={topic_prefix}\n\
         plugin.name=pgoutput\n\
         slot.name={db}_dbz\n\
         publication.name={db}_dbz\n\
         publication.autocreate.mode=filtered\n\
         table.include.list=public.bench_items\n\
         snapshot.mode=no_data\n\
         {extra}\n",
        ctx.pg_host, ctx.pg_port, ctx.pg_user
    )
}

/// Debezium's JDBC sink: the records of `topic` upserted by key into
/// `bench_items` of `db`, deletes off, the table as it is; then
/// `--debezium-sink-extra`, where `{db}` stands for `db` (so that
/// `connection.url` can be given again with parameters).
fn jdbc_sink(ctx: &Ctx, name: &str, db: &str, topic: &str) -> String {
    format!(
        "# written by dualwrite-bench\n\
         name={name}\n\
         connector.class=io.debezium.connector.jdbc.JdbcSinkConnector\n\
         tasks.max=1\n\
         topics={topic}\n\
         connection.url=jdbc:postgresql://{}:{}/{db}\n\
         connection.username={}\n\
         connection.password=\n\
         insert.mode=upsert\n\
         primary.key.mode=record_key\n\
         delete.enabled=false\n\
         schema.evolution=none\n\
         collection.name.format=bench_items\n\
         {}\n",
        ctx.pg_host,
        ctx.pg_port,
        ctx.pg_user,
        ctx.debezium_sink_extra.replace("{db}", db)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_of_both_ways_publishes_and_copies_its_own_keys_only() {
        let d = Direction {
            from: "a",
            to: "b",
            topic_prefix: "p".into(),
            own_keys: Some("R"),
            snapshot: true,
        };
        let props = d.source_properties();
        assert!(
            props.contains("publication.autocreate.mode=disabled\n"),
            "{props}"
        );
        assert!(props.contains("snapshot.mode=initial\n"), "{props}");
        assert!(
            props.contains("snapshot.select.statement.overrides.public.bench_items=SELECT * FROM public.bench_items WHERE id LIKE 'R%'\n"),
            "{props}"
        );
        let one_way = Direction {
            own_keys: None,
            snapshot: false,
            ..d
        };
        assert_eq!(
            one_way.source_properties(),
            "column.exclude.list=public.bench_items.arrived_at\n"
        );
    }

    #[test]
    fn a_connectors_task_state_is_read_from_its_status() {
        let status = r#"{"name":"dualwrite-bench-jdbc-sink","connector":{"state":"PAUSED","worker_id":"127.0.0.1:8083"},"tasks":[{"id":0,"state":"PAUSED","worker_id":"127.0.0.1:8083"}],"type":"sink"}"#;
        assert_eq!(task_state(status).as_deref(), Some("PAUSED"));
        let starting = r#"{"name":"x","connector":{"state":"RUNNING"},"tasks":[],"type":"sink"}"#;
        assert_eq!(task_state(starting), None);
        assert_eq!(task_state("<html>404</html>"), None);
    }
}
