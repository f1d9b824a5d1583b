//! The world of one measurement: fresh databases on the local PostgreSQL,
//! a fresh topic prefix on the broker, the dualwrite services as child
//! processes (the release binary), and the cleanup of all of it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dualwrite_model::config::SideId;
use dualwrite_model::Config;
use rand::Rng;
use tokio_postgres::{Client, NoTls};

use crate::rows;

/// What every measurement needs: where things are.
pub struct Ctx {
    /// The `dualwrite` binary (release build).
    pub bin: PathBuf,
    /// `postgres://user@host:port`, without a database.
    pub pg_url: String,
    pub pg_host: String,
    pub pg_port: u16,
    pub pg_user: String,
    pub bootstrap: String,
    /// Where configurations and service logs go.
    pub work: PathBuf,
    /// `kafka.partitions` of the deployments.
    pub partitions: i32,
    /// Keep the logs of every run (they are kept anyway when a run fails).
    pub keep_logs: bool,
    /// TOML appended to every deployment's configuration (settings to try).
    pub config_extra: String,
    /// Where the peers' jars are cached (`<cache>/debezium-…/libs`).
    pub peer_cache: PathBuf,
    /// Properties appended to the Debezium connector's configuration.
    pub debezium_extra: String,
    /// Properties appended to the JDBC sink's configuration.
    pub debezium_sink_extra: String,
    /// Whether the live, catch-up and initial-sync scenarios run the
    /// Debezium peer beside dualwrite (`--no-peer`: not).
    pub peer: bool,
}

impl Ctx {
    pub fn new(
        bin: PathBuf,
        pg_url: String,
        bootstrap: String,
        work: PathBuf,
        partitions: i32,
        keep_logs: bool,
        config_extra: String,
    ) -> Result<Ctx> {
        let rest = pg_url
            .strip_prefix("postgres://")
            .or_else(|| pg_url.strip_prefix("postgresql://"))
            .with_context(|| format!("{pg_url}: expected postgres://user@host:port"))?
            .trim_end_matches('/');
        let (user, hostport) = rest
            .split_once('@')
            .with_context(|| format!("{pg_url}: expected postgres://user@host:port"))?;
        if user.contains(':') {
            bail!("{pg_url}: a password in the URL is not supported (use trust or ~/.pgpass)");
        }
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().context("PostgreSQL port")?),
            None => (hostport.to_owned(), 5432),
        };
        std::fs::create_dir_all(&work)?;
        Ok(Ctx {
            bin,
            pg_url: format!("postgres://{user}@{host}:{port}"),
            pg_host: host,
            pg_port: port,
            pg_user: user.to_owned(),
            bootstrap,
            work,
            partitions,
            keep_logs,
            config_extra,
            peer_cache: PathBuf::new(),
            debezium_extra: String::new(),
            debezium_sink_extra: String::new(),
            peer: true,
        })
    }

    pub async fn connect(&self, db: &str) -> Result<Client> {
        let (client, conn) = tokio_postgres::connect(&format!("{}/{db}", self.pg_url), NoTls)
            .await
            .with_context(|| format!("connect to database {db}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// A libpq connection string for a database (native subscriptions).
    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host={} port={} user={} dbname={db}",
            self.pg_host, self.pg_port, self.pg_user
        )
    }

    /// A dualwrite configuration linking `left_db` and `right_db` by the
    /// benchmark map, with the product's default settings.
    pub fn config_text(
        &self,
        prefix: &str,
        left_db: &str,
        right_db: &str,
        partitions: i32,
    ) -> String {
        let side = |name: &str, db: &str| {
            format!(
                "name = \"{name}\"\nkind = \"postgres\"\n\
                 connection = {{ host = \"{}\", port = {}, dbname = \"{db}\", user = \"{}\" }}\n",
                self.pg_host, self.pg_port, self.pg_user
            )
        };
        format!(
            "# written by dualwrite-bench\n[kafka]\nbootstrap_servers = \"{}\"\n\
             topic_prefix = \"{prefix}\"\npartitions = {}\nreplication_factor = 1\n\n\
             [sides.left]\n{}\n[sides.right]\n{}\n{}\n{}\n",
            self.bootstrap,
            partitions,
            side("fno", left_db),
            side("dataverse", right_db),
            rows::map_toml(),
            self.config_extra,
        )
    }
}

/// A short random id for database, topic and slot names.
pub fn new_id() -> String {
    let mut r = rand::rng();
    (0..8)
        .map(|_| (b'a' + r.random_range(0..26)) as char)
        .collect()
}

/// Two fresh databases, each with the benchmark table.
pub struct DbPair {
    pub left: String,
    pub right: String,
}

impl DbPair {
    pub async fn create(ctx: &Ctx, id: &str) -> Result<DbPair> {
        let pair = DbPair {
            left: format!("dwb_{id}_fno"),
            right: format!("dwb_{id}_dv"),
        };
        let admin = ctx.connect("postgres").await?;
        for db in [&pair.left, &pair.right] {
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .await
                .with_context(|| format!("create database {db}"))?;
            ctx.connect(db)
                .await?
                .batch_execute(&rows::ddl("bench_items"))
                .await?;
        }
        Ok(pair)
    }

    /// Drops the replication slots of both databases and the databases.
    pub async fn drop(&self, ctx: &Ctx) {
        let Ok(admin) = ctx.connect("postgres").await else {
            return;
        };
        for db in [&self.left, &self.right] {
            drop_slots(&admin, db).await;
            if let Err(e) = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .await
            {
                eprintln!("bench: cannot drop database {db}: {e}");
            }
        }
    }
}

/// Drops every replication slot of a database, waiting (a little) for
/// their readers to let go.
pub async fn drop_slots(admin: &Client, db: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = admin
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                 WHERE database = $1 AND active_pid IS NOT NULL",
                &[&db],
            )
            .await;
        let r = admin
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1",
                &[&db],
            )
            .await;
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE database = $1",
                &[&db],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if left == 0 {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("bench: replication slots of {db} not dropped: {r:?}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A service running as a child process: the harness the end-to-end
/// tests use too.
pub use dualwrite_process::{cpu_secs, Process as Service};

/// Starts the `dualwrite` service `args` of a deployment.
fn start_service(ctx: &Ctx, config: &Path, dir: &Path, args: &[&str]) -> Result<Service> {
    let name = args.join("-").replace("--side-", "");
    let (bin, config) = (ctx.bin.clone(), config.to_owned());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let recipe = Box::new(move || {
        let mut cmd = Command::new(&bin);
        cmd.args(&args)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .env("DUALWRITE_CONFIG", &config)
            .env_remove("DUALWRITE_TOPIC_PREFIX")
            .env_remove("DUALWRITE_BOOTSTRAP_SERVERS")
            .env_remove("DUALWRITE_METRICS_ADDR")
            .env_remove("DUALWRITE_INSTANCES")
            .env_remove("DUALWRITE_INSTANCE_INDEX")
            .env("RUST_LOG", "info");
        cmd
    });
    Service::start(&name, dir, recipe).with_context(|| format!("start {name}"))
}

/// `http://ADDR` of a service's metrics and health endpoints, from its log.
fn metrics_addr(s: &Service) -> Option<String> {
    let text = std::fs::read_to_string(&s.log).ok()?;
    text.split("metrics on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .map(str::to_owned)
}

/// The services of one deployment, in this order.
pub const SERVICES: &[&[&str]] = &[
    &["capture", "--side", "fno"],
    &["capture", "--side", "dataverse"],
    &["router"],
    &["pause-buffer"],
    &["apply", "--side", "fno"],
    &["apply", "--side", "dataverse"],
];

/// The services of one deployment with the router and each side's applier
/// as `instances` instances (`--instance-index i --instances N`).
pub fn scaled_services(instances: u32) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for args in SERVICES {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if !matches!(args[0].as_str(), "router" | "apply") || instances == 1 {
            out.push(args);
            continue;
        }
        for i in 0..instances {
            let mut a = args.clone();
            a.extend([
                "--instance-index".to_owned(),
                i.to_string(),
                "--instances".to_owned(),
                instances.to_string(),
            ]);
            out.push(a);
        }
    }
    out
}

/// A dualwrite deployment: two fresh databases, a configuration with a
/// fresh topic prefix, and (once started) every service as its own process.
pub struct Deployment {
    pub dbs: DbPair,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config: Arc<Config>,
    services: Vec<Service>,
    failed: bool,
}

impl Deployment {
    pub async fn create(ctx: &Ctx, scenario: &str) -> Result<Deployment> {
        Self::create_with(ctx, scenario, ctx.partitions).await
    }

    /// A deployment whose topics have `partitions` partitions.
    pub async fn create_with(ctx: &Ctx, scenario: &str, partitions: i32) -> Result<Deployment> {
        let id = new_id();
        let dbs = DbPair::create(ctx, &id).await?;
        let prefix = format!("bench-{scenario}-{id}");
        let dir = ctx.work.join(&prefix);
        std::fs::create_dir_all(&dir)?;
        let text = ctx.config_text(&prefix, &dbs.left, &dbs.right, partitions);
        let config_path = dir.join("dualwrite.toml");
        std::fs::write(&config_path, &text)?;
        let config = Arc::new(Config::parse(&text).map_err(anyhow::Error::msg)?);
        config
            .validate()
            .map_err(|p| anyhow::anyhow!("benchmark configuration is invalid: {p:?}"))?;
        Ok(Deployment {
            dbs,
            dir,
            config_path,
            config,
            services: Vec::new(),
            failed: false,
        })
    }

    /// Starts every service and waits until each says it is ready.
    pub async fn start(&mut self, ctx: &Ctx) -> Result<()> {
        self.start_some(ctx, SERVICES).await
    }

    /// Starts the given services only (e.g. one capturer) and waits until
    /// each says it is ready.
    pub async fn start_some<A: AsRef<[S]>, S: AsRef<str>>(
        &mut self,
        ctx: &Ctx,
        services: &[A],
    ) -> Result<()> {
        for args in services {
            let args: Vec<&str> = args.as_ref().iter().map(AsRef::as_ref).collect();
            let s = start_service(ctx, &self.config_path, &self.dir, &args)?;
            self.services.push(s);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        for i in 0..self.services.len() {
            loop {
                self.check_alive()?;
                let s = &self.services[i];
                if let Some(addr) = metrics_addr(s) {
                    let ready = tokio::task::spawn_blocking(move || http_status(&addr, "/readyz"))
                        .await
                        .unwrap_or(0);
                    if ready == 200 {
                        break;
                    }
                }
                if Instant::now() > deadline {
                    self.failed = true;
                    bail!("{} not ready after 120 s; log:\n{}", s.name, s.log_tail(30));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// Each running service's name and process.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.services
            .iter()
            .filter_map(|s| Some((s.name.clone(), s.pid()?)))
            .collect()
    }

    /// Every service's busy seconds so far, by `service/phase` (see
    /// [`busy_seconds`]).
    pub async fn busy(&self) -> BTreeMap<String, f64> {
        let addrs: Vec<String> = self.services.iter().filter_map(metrics_addr).collect();
        tokio::task::spawn_blocking(move || {
            let pages = addrs.iter().map(|a| http_get(a, "/metrics").1);
            pages.flat_map(|p| busy_seconds(&p)).collect()
        })
        .await
        .unwrap_or_default()
    }

    /// A running service by name (e.g. `capture-fno`).
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// An error naming the first service that exited, with its log.
    pub fn check_alive(&self) -> Result<()> {
        for s in &self.services {
            if let Some(status) = s.exited() {
                bail!("{} exited ({status}); log:\n{}", s.name, s.log_tail(30));
            }
        }
        Ok(())
    }

    /// Marks the deployment failed: its logs are kept.
    pub fn mark_failed(&mut self) {
        self.failed = true;
    }

    pub async fn left(&self, ctx: &Ctx) -> Result<Client> {
        ctx.connect(&self.dbs.left).await
    }

    pub async fn right(&self, ctx: &Ctx) -> Result<Client> {
        ctx.connect(&self.dbs.right).await
    }

    /// `dualwrite ctl <args>` to completion; its stdout, or an error with its output.
    pub async fn ctl(&self, ctx: &Ctx, args: &[&str]) -> Result<String> {
        let out = tokio::process::Command::new(&ctx.bin)
            .arg("ctl")
            .args(args)
            .env("DUALWRITE_CONFIG", &self.config_path)
            .env_remove("DUALWRITE_TOPIC_PREFIX")
            .env_remove("DUALWRITE_BOOTSTRAP_SERVERS")
            .env("RUST_LOG", "warn")
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "dualwrite ctl {} failed ({}):\n{stdout}\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }

    /// The map's state and backlog (records on its topic the pause buffer
    /// has not released), as `ctl maps` computes them.
    pub async fn map_row(&self) -> Result<(String, i64)> {
        let cfg = self.config.clone();
        let rows = tokio::task::spawn_blocking(move || dualwrite_ctl::map_rows(&cfg))
            .await?
            .map_err(|e| anyhow::anyhow!("ctl maps: {e}"))?;
        let r = rows
            .into_iter()
            .find(|r| r.map == "items")
            .context("map items not listed")?;
        Ok((r.state, r.backlog))
    }

    /// Stops every service; returns each one's peak resident memory (MiB),
    /// read just before it was stopped.
    pub fn stop(&mut self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        for s in &self.services {
            if let Some(kib) = s.peak_rss().map(|b| b / 1024) {
                out.push((s.name.clone(), kib as f64 / 1024.0));
            }
        }
        for s in &self.services {
            s.stop();
        }
        out
    }

    /// Stops what still runs and removes what the deployment made: its
    /// topics, and in PostgreSQL its slots, databases and replication
    /// origins (cluster-wide); and its folder unless it failed or logs are
    /// kept.
    pub async fn cleanup(mut self, ctx: &Ctx) {
        self.stop();
        let prefix = format!("{}.", self.config.kafka.topic_prefix);
        if let Err(e) =
            dualwrite_runtime::kafka::delete_topics_with_prefix(&self.config.kafka, &prefix).await
        {
            eprintln!("bench: the topics {prefix}* were not deleted: {e}");
        }
        self.dbs.drop(ctx).await;
        if let Ok(admin) = ctx.connect("postgres").await {
            for side in [SideId::Left, SideId::Right] {
                for origin in (self.config.origin_names(side).into_iter())
                    .chain(self.config.rows_origin_names(side))
                {
                    let _ = admin
                        .execute(
                            "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = $1",
                            &[&origin],
                        )
                        .await;
                }
            }
        }
        if self.failed || ctx.keep_logs {
            eprintln!("bench: logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Status code and body of a plain HTTP/1.0 GET on loopback (0 and
/// nothing when unreachable).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    http(addr, "GET", path)
}

/// Status code and body of a plain HTTP/1.0 request without a body on
/// loopback (0 and nothing when unreachable).
pub fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    if s.write_all(head.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok());
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code.unwrap_or(0), body.to_owned())
}

fn http_status(addr: &str, path: &str) -> u16 {
    http_get(addr, path).0
}

/// The busy seconds (`dualwrite_busy_seconds_total`) a metrics page
/// gives, by `service/phase`.
pub fn busy_seconds(metrics: &str) -> BTreeMap<String, f64> {
    let label = |l: &str, k: &str| -> Option<String> {
        let v = l.split(&format!("{k}=\"")).nth(1)?;
        Some(v.split('"').next()?.to_owned())
    };
    metrics
        .lines()
        .filter(|l| l.starts_with("dualwrite_busy_seconds_total{"))
        .filter_map(|l| {
            let (labels, v) = l.rsplit_once(' ')?;
            let key = format!("{}/{}", label(labels, "service")?, label(labels, "phase")?);
            Some((key, v.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_seconds_are_read_by_service_and_phase() {
        let page = "# HELP dualwrite_busy_seconds_total x\n\
            dualwrite_busy_seconds_total{phase=\"fold\",service=\"pause-buffer\"} 1.5\n\
            dualwrite_busy_seconds_total{phase=\"write\",service=\"apply-dataverse\"} 2\n\
            dualwrite_records_forwarded_total{map=\"items\"} 7\n";
        let b = busy_seconds(page);
        assert_eq!(b.len(), 2, "{b:?}");
        assert_eq!(b["pause-buffer/fold"], 1.5);
        assert_eq!(b["apply-dataverse/write"], 2.0);
    }
}
