//! The Debezium peer of the capture hop: Debezium's PostgreSQL connector
//! (pgoutput, a slot and a filtered publication of its own, no snapshot)
//! on Kafka Connect standalone, as a child JVM. Its jars are fetched from
//! Maven Central once, with `peers/debezium/pom.xml`, into the cache
//! (`<cache>/peers/debezium-<version>-connect-<version>/libs`); nothing of
//! it is built or copied into the project.

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

/// A `<name>value</name>` property of [`POM`].
fn pom_property(name: &str) -> &'static str {
    let open = format!("<{name}>");
    POM.split_once(open.as_str())
        .and_then(|(_, rest)| rest.split_once('<'))
        .map_or("unknown", |(v, _)| v)
}

/// `Debezium 3.6.1.Final on Kafka Connect 4.1.1`, for the report.
pub fn describe() -> String {
    format!(
        "Debezium {} on Kafka Connect {}",
        pom_property("debezium.version"),
        pom_property("kafka.version")
    )
}

/// The folder of the peer's jars, fetched with Maven on first use (through
/// a Maven repository of its own, removed afterwards: the cache holds only
/// the jars). Blocking.
pub fn libs(cache: &Path) -> Result<PathBuf> {
    let home = cache.join(format!(
        "debezium-{}-connect-{}",
        pom_property("debezium.version"),
        pom_property("kafka.version")
    ));
    let libs = home.join("libs");
    if libs.join(".complete").is_file() {
        return Ok(libs);
    }
    let tmp = home.join(format!("fetch.{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let pom = tmp.join("pom.xml");
    std::fs::write(&pom, POM)?;
    let log = tmp.join("mvn.log");
    let out = std::fs::File::create(&log)?;
    eprintln!(
        "bench: fetching {} from Maven Central into {} (first run only)",
        describe(),
        libs.display()
    );
    let status = Command::new("mvn")
        .arg("-q")
        .arg("-B")
        .arg(format!("-Dmaven.repo.local={}", tmp.join("m2").display()))
        .arg("-f")
        .arg(&pom)
        .arg("dependency:copy-dependencies")
        .arg("-DincludeScope=runtime")
        .arg(format!("-DoutputDirectory={}", tmp.join("libs").display()))
        .stdout(out.try_clone()?)
        .stderr(out)
        .status()
        .context("run mvn (Maven) to fetch the Debezium peer: is it installed?")?;
    if !status.success() {
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&tmp);
        bail!(
            "fetching {} with Maven failed ({status}):\n{out}",
            describe()
        );
    }
    let _ = std::fs::remove_dir_all(&libs);
    std::fs::rename(tmp.join("libs"), &libs)?;
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::write(libs.join(".complete"), "")?;
    Ok(libs)
}

/// A Kafka Connect standalone worker running Debezium's PostgreSQL
/// connector on one table.
pub struct Connect {
    service: Service,
    /// Its replication slot (and publication).
    pub slot: String,
    /// The topic of the table: `<topic prefix>.public.bench_items`.
    pub topic: String,
}

/// Log line of a task that failed for good (the worker itself goes on).
const TASK_FAILED: &str = "Task threw an uncaught and unrecoverable exception";

impl Connect {
    /// Writes the worker's and the connector's properties into `dir` and
    /// starts the worker, capturing `bench_items` of `db` into
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
        let slot = format!("{db}_dbz");
        let offsets = dir.join("connect.offsets");
        let worker = format!(
            "# written by dualwrite-bench\n\
             bootstrap.servers={}\n\
             key.converter=org.apache.kafka.connect.json.JsonConverter\n\
             value.converter=org.apache.kafka.connect.json.JsonConverter\n\
             key.converter.schemas.enable=false\n\
             value.converter.schemas.enable=false\n\
             offset.storage.file.filename={}\n\
             offset.flush.interval.ms=10000\n\
             listeners=http://127.0.0.1:0\n",
            ctx.bootstrap,
            offsets.display()
        );
        let connector = format!(
            "# written by dualwrite-bench\n\
             name=dualwrite-bench-debezium\n\
             connector.class=io.debezium.connector.postgresql.PostgresConnector\n\
             tasks.max=1\n\
             database.hostname={}\n\
             database.port={}\n\
             database.user={}\n\
             database.dbname={db}\n\
             topic.prefix={topic_prefix}\n\
             plugin.name=pgoutput\n\
             slot.name={slot}\n\
             publication.name={slot}\n\
             publication.autocreate.mode=filtered\n\
             table.include.list=public.bench_items\n\
             snapshot.mode=no_data\n\
             {extra}\n",
            ctx.pg_host, ctx.pg_port, ctx.pg_user
        );
        let log4j = "status = warn\n\
             appender.out.type = Console\n\
             appender.out.name = out\n\
             appender.out.layout.type = PatternLayout\n\
             appender.out.layout.pattern = [%d] %p %m (%c)%n\n\
             rootLogger.level = info\n\
             rootLogger.appenderRef.out.ref = out\n";
        let worker_path = dir.join("connect-worker.properties");
        let connector_path = dir.join("connect-debezium.properties");
        let log4j_path = dir.join("connect-log4j2.properties");
        std::fs::write(&worker_path, worker)?;
        std::fs::write(&connector_path, connector)?;
        std::fs::write(&log4j_path, log4j)?;

        let java = match std::env::var_os("JAVA_HOME") {
            Some(h) => PathBuf::from(h).join("bin/java"),
            None => PathBuf::from("java"),
        };
        let log4j = format!("-Dlog4j2.configurationFile={}", log4j_path.display());
        let classpath = format!("{}/*", libs.display());
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
            .arg(&worker_path)
            .arg(&connector_path);
            cmd
        });
        let c = Connect {
            service: Service::start("debezium-connect", dir, recipe)?,
            slot,
            topic: format!("{topic_prefix}.public.bench_items"),
        };
        let admin = ctx.connect("postgres").await?;
        c.wait_streaming(&admin).await?;
        Ok(c)
    }

    /// Waits until the connector reads its slot (rows committed from then
    /// on are captured).
    async fn wait_streaming(&self, admin: &Client) -> Result<()> {
        wait_for(
            &format!("Debezium reading its slot {}", self.slot),
            Duration::from_secs(180),
            Duration::from_millis(200),
            || async {
                self.check_alive()?;
                let active: Option<bool> = admin
                    .query_opt(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                        &[&self.slot],
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
