//! The change source of a PostgreSQL side: a logical replication slot
//! (wal2json), streamed over a replication connection ([`Replication`]).
//!
//! Reading the slot with `pg_logical_slot_peek_changes` decoded the WAL
//! again from the slot's restart position on every read (PostgreSQL moves
//! it only every running-transactions record, about 15 s), so each read
//! cost more the more the side wrote; streamed, the server decodes each
//! record once and sends a transaction as soon as it commits.
//!
//! # Why nothing is lost or skipped
//!
//! The slot's confirmed position is what the server resumes from: it never
//! streams a transaction whose commit ends at or before it again. Only two
//! things move it, both through [`Replication::status`], and both only to a
//! position everything before which the capturer has published:
//!
//! 1. [`ChangeSource::confirm`] with the commit the capturer saw Kafka
//!    acknowledge, together with every record before it (the position
//!    only grows, and is a fact about Kafka, not about the server).
//! 2. A keepalive's position (everything before it was sent or left out by
//!    wal2json: the server sends it after what precedes it) while *nothing
//!    received is unpublished*: no transaction open, and the last commit
//!    received at or before `confirmed`. The stream is in order, so every
//!    transaction committed before that position was received, hence
//!    published. This is what moves the slot on a side whose only writes
//!    are left out (the initial write's, under its origin).
//!
//! A read that did not end with everything it received confirmed (a
//! failed publish, a connection lost) makes the next read start a new
//! stream from the slot's position: what was not confirmed comes again,
//! at the same positions. The server keeps only the slot's position, so a
//! crash (even `kill -9`) gives the same: at least once, never lost. A
//! transaction is streamed whole, row by row, so none is held whole,
//! however large. [`Position`] keeps this bookkeeping; its tests run it
//! against a model of the server over random schedules of reads,
//! keepalives, publishes, failed publishes and crashes.
//!
//! Loop prevention: the appliers write under replication origins, their
//! rows under one ([`Config::rows_origin_names`]) and their reports
//! (`dualwrite.ack` messages) and commits under another
//! ([`Config::origin_names`]). The server leaves out the changes of the
//! rows origins and of the initial write's origin before it decodes them
//! (wal2json's `filter-origins`; each record carries its origin), so the
//! appliers' rows cost no decoding, no output and no reading here. The
//! source asks for each transaction's origin (`include-origin`) and takes
//! the reports only from the appliers' transactions; any row in one of
//! those (an applier from before the rows origins) is left out as well.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dualwrite_model::config::{Config, PgConnection, SideId};
use dualwrite_runtime::metrics::metrics;
use dualwrite_runtime::side::{ChangeSource, Class, Decoded, SideError};
use futures::FutureExt;
use tokio_postgres::Client;

use crate::pg::{self, setup_error};
use crate::position::Position;
use crate::replication::{Event, Replication};
use crate::wal2json::{self, parse_lsn, Context, Decoder, SlotRow};

/// A side's wal2json slot, streamed.
pub struct PgSource {
    conn: PgConnection,
    slot: String,
    options: Vec<(&'static str, String)>,
    ctx: Arc<Context>,
    stream: Option<Replication>,
    decoder: Decoder,
    /// What the server may be told (see the module's documentation).
    position: Position,
    /// Rows of the read under way, and the most it reads (then it ends at
    /// the next commit).
    rows: u64,
    budget: u64,
    /// Rows of the appliers' transactions received and left out: none
    /// while the server leaves the rows origins out (see the module docs).
    left_out: prometheus::IntCounter,
}

impl ChangeSource for PgSource {
    async fn open(config: &Config, side: SideId) -> Result<PgSource, SideError> {
        let side_cfg = config.side(side);
        let client = pg::connect(&side_cfg.connection, "dualwrite-capture").await?;
        let slot = config.slot_name(side);
        let origins = prepare(&client, config, side, &slot).await?;
        let confirmed = confirmed_position(&client, &slot).await?;
        let ctx = Arc::new(Context {
            side: side_cfg.name.clone(),
            applier_origins: origins.appliers.iter().copied().collect(),
            keys: config.captured_entities(side),
            columns: dualwrite_model::columns::read_columns(config, side),
        });
        let tables: Vec<String> = config.captured_entities(side).into_keys().collect();
        Ok(PgSource {
            conn: side_cfg.connection.clone(),
            options: plugin_options(&tables, &origins.left_out),
            slot,
            decoder: Decoder::new(ctx.clone()),
            ctx,
            stream: None,
            position: Position::new(confirmed),
            rows: 0,
            budget: 0,
            left_out: metrics()
                .skipped
                .with_label_values(&["capture", "applier_row"]),
        })
    }

    async fn start(&mut self, max_changes: i32) -> Result<(), SideError> {
        if self.stream.is_none() || !self.position.settled() {
            self.restart().await?;
        }
        self.rows = 0;
        self.budget = max_changes.max(1) as u64;
        Ok(())
    }

    /// Gives the next row. A read ends at a commit: when its budget is
    /// spent, or when no more rows have arrived (so that what it read is
    /// published at once); a read with nothing yet waits for the server.
    async fn next(&mut self, out: &mut Decoded) -> Result<bool, SideError> {
        loop {
            let open = self.decoder.in_transaction();
            if !open && self.rows >= self.budget {
                return Ok(false);
            }
            let stream = self.stream.as_mut().ok_or_else(not_started)?;
            let event = if open || self.rows == 0 {
                stream.recv().await?
            } else {
                match stream.recv().now_or_never() {
                    Some(event) => event?,
                    None => return Ok(false),
                }
            };
            match event {
                Event::Data { lsn, data } => {
                    self.take(lsn, data, out);
                    return Ok(true);
                }
                Event::Keepalive { end, reply } => self.keepalive(end, reply).await?,
            }
        }
    }

    fn read_so_far(&self) -> u64 {
        self.rows
    }

    async fn confirm(&mut self, lsn: u64) -> Result<(), SideError> {
        let Some(lsn) = self.position.published(lsn) else {
            return Ok(());
        };
        let stream = self.stream.as_mut().ok_or_else(not_started)?;
        stream
            .status(lsn)
            .await
            .map_err(|e| e.context(&format!("confirming slot {}", self.slot)))
    }

    /// Nothing to do: keepalives move the slot of a quiet side.
    async fn idle(&mut self) -> Result<(), SideError> {
        Ok(())
    }
}

impl PgSource {
    /// Decodes one row of the plugin.
    fn take(&mut self, lsn: u64, data: bytes::Bytes, out: &mut Decoded) {
        self.rows += 1;
        // An applier's rows, should the server send them: skipped unread.
        if self.decoder.leaves_out(&data) {
            self.left_out.inc();
            return;
        }
        let was_open = self.decoder.in_transaction();
        let data = String::from_utf8(data.into())
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        self.decoder.push(&SlotRow { lsn, data }, out);
        match (was_open, self.decoder.in_transaction()) {
            (false, true) => self.position.begin(),
            (true, false) => self.position.commit(lsn),
            _ => {}
        }
    }

    /// A keepalive: moves the slot to its position when nothing received
    /// is unpublished, and answers when asked.
    async fn keepalive(&mut self, end: u64, reply: bool) -> Result<(), SideError> {
        let moved = self.position.keepalive(end);
        if moved.is_some() || reply {
            let stream = self.stream.as_mut().ok_or_else(not_started)?;
            stream.status(self.position.confirmed()).await?;
        }
        Ok(())
    }

    /// A new stream from the slot's position. The server may still hold
    /// the slot for a stream just dropped (its process ends when it sees
    /// the connection closed): that is waited for, a while.
    async fn restart(&mut self) -> Result<(), SideError> {
        self.stream = None;
        self.decoder = Decoder::new(self.ctx.clone());
        self.position.restart();
        let deadline = Instant::now() + SLOT_RELEASE_WAIT;
        loop {
            let mut r = Replication::connect(&self.conn, "dualwrite-capture").await?;
            match r.start(&self.slot, &self.options).await {
                Ok(()) => {
                    self.stream = Some(r);
                    return Ok(());
                }
                Err(e) if e.code.as_deref() == Some("55006") && Instant::now() < deadline => {
                    tracing::debug!("{e}; trying again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// How long a new stream waits for the server to release the slot.
const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(10);

fn not_started() -> SideError {
    SideError::new(Class::RetryLater, "the slot is not being streamed")
}

/// The slot's confirmed position: where the server resumes.
async fn confirmed_position(client: &Client, slot: &str) -> Result<u64, SideError> {
    let row = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| setup_error(&e).context("reading the slot's position"))?;
    Ok(row
        .get::<_, Option<&str>>(0)
        .and_then(parse_lsn)
        .unwrap_or(0))
}

/// wal2json's options: format 2 with every transaction's position, time,
/// id and origin, the keys, the appliers' reports, the captured tables
/// only; the changes under the origins `left_out` (the initial write's,
/// the appliers' rows) left out before they are decoded.
fn plugin_options(tables: &[String], origin_ids: &[i64]) -> Vec<(&'static str, String)> {
    let add_tables = tables
        .iter()
        .map(|t| t.replace(',', "\\,"))
        .collect::<Vec<_>>()
        .join(",");
    let mut opts: Vec<(&'static str, String)> = [
        ("format-version", "2"),
        ("include-lsn", "true"),
        ("include-timestamp", "true"),
        ("include-xids", "true"),
        ("include-pk", "true"),
        ("include-origin", "true"),
        ("add-msg-prefixes", wal2json::ACK_PREFIX),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_owned()))
    .collect();
    opts.push(("add-tables", add_tables));
    if !origin_ids.is_empty() {
        let ids: Vec<String> = origin_ids.iter().map(i64::to_string).collect();
        opts.push(("filter-origins", ids.join(",")));
    }
    opts
}

/// The ids of a side's replication origins, as the capturer treats them.
struct Origins {
    /// The appliers' reports and commits: their reports are taken.
    appliers: Vec<i64>,
    /// The appliers' rows and the initial write: left out by the server.
    left_out: Vec<i64>,
}

/// Checks the captured tables, creates the slot and the appliers'
/// replication origins if missing, and returns the origins' ids.
async fn prepare(
    client: &Client,
    config: &Config,
    side: SideId,
    slot: &str,
) -> Result<Origins, SideError> {
    let setup = |e: tokio_postgres::Error| setup_error(&e).context("setup");
    client
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .map_err(setup)?;
    let problems = replica_identity_problems(client, config, side)
        .await
        .map_err(setup)?;
    if !problems.is_empty() {
        return Err(SideError::new(Class::Fatal, problems.join("; ")));
    }
    ensure_slot(client, slot).await?;
    // Created here, before the first read, so that no applier can write
    // under an origin this capturer does not leave out yet.
    let mut ids = Vec::new();
    for o in config.origin_names(side) {
        ids.push(pg::ensure_origin(client, &o).await.map_err(setup)?);
    }
    // The last origin is the initial write's.
    let mut left_out: Vec<i64> = ids.pop().into_iter().collect();
    for o in config.rows_origin_names(side) {
        left_out.push(pg::ensure_origin(client, &o).await.map_err(setup)?);
    }
    Ok(Origins {
        appliers: ids,
        left_out,
    })
}

/// The captured tables whose deletes would not carry their alternate key.
async fn replica_identity_problems(
    client: &Client,
    config: &Config,
    side: SideId,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut problems = Vec::new();
    for (entity, key) in config.captured_entities(side) {
        let (schema, table) = entity.split_once('.').unwrap_or(("public", &entity));
        let row = client
            .query_opt(
                "SELECT c.relreplident::text, \
                   ARRAY(SELECT a.attname::text FROM pg_index i \
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                         WHERE i.indrelid = c.oid AND ((c.relreplident = 'd' AND i.indisprimary) \
                               OR (c.relreplident = 'i' AND i.indisreplident))) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&schema, &table],
            )
            .await?;
        let Some(row) = row else {
            problems.push(format!("table {entity} does not exist"));
            continue;
        };
        let ident: String = row.get(0);
        let cols: Vec<String> = row.get(1);
        let covered = ident == "f" || (ident != "n" && key.iter().all(|k| cols.contains(k)));
        if !covered {
            problems.push(format!(
                "table {entity}: its replica identity does not include the alternate key ({}), so deletes could not be linked; run `ALTER TABLE {entity} REPLICA IDENTITY FULL`",
                key.join(", ")
            ));
        }
    }
    Ok(problems)
}

/// Creates the slot if missing; one of another plugin is refused.
async fn ensure_slot(client: &Client, slot: &str) -> Result<(), SideError> {
    let setup = |e: tokio_postgres::Error| setup_error(&e).context("setup");
    let exists = client
        .query_opt(
            "SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(setup)?;
    match exists {
        Some(row) => {
            let plugin: String = row.get(0);
            if plugin != "wal2json" {
                return Err(SideError::new(
                    Class::Fatal,
                    format!("replication slot {slot} uses plugin {plugin}, not wal2json; drop it or configure another slot name"),
                ));
            }
        }
        None => {
            client
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, 'wal2json')",
                    &[&slot],
                )
                .await
                .map_err(setup)?;
            tracing::info!(%slot, "created replication slot: changes from now on are captured");
        }
    }
    Ok(())
}
