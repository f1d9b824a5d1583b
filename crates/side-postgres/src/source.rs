//! The change source of a PostgreSQL side: a logical replication slot
//! (wal2json), read with SQL.
//!
//! The slot is only *peeked*; it is advanced past a transaction
//! ([`ChangeSource::confirm`]) only after the capturer published every
//! record of it. A crash between the two reads those transactions again,
//! with the same positions: at least once, never lost. A peek's rows are
//! streamed and decoded one at a time, so no transaction, however large,
//! is held whole.
//!
//! Loop prevention: the appliers write under replication origins; the
//! source asks wal2json for each transaction's origin (`include-origin`)
//! and leaves out the rows of the appliers' transactions, keeping only
//! their reports (`dualwrite.ack` messages). The initial write's origin is
//! left out entirely (`filter-origins`).

use std::pin::Pin;
use std::sync::Arc;

use dualwrite_model::config::{Config, SideId};
use dualwrite_runtime::side::{ChangeSource, Class, Decoded, SideError};
use futures::TryStreamExt;
use tokio_postgres::{Client, RowStream};

use crate::pg::{self, setup_error, side_error};
use crate::wal2json::{self, format_lsn, parse_lsn, Context, Decoder, SlotRow};

/// A side's wal2json slot, with the connection that reads it.
pub struct PgSource {
    client: Client,
    slot: String,
    peek: String,
    ctx: Arc<Context>,
    /// The read under way: its rows and their decoder.
    read: Option<(Pin<Box<RowStream>>, Decoder)>,
    rows: u64,
    /// Empty reads since the last heartbeat.
    idle_reads: u32,
}

impl ChangeSource for PgSource {
    async fn open(config: &Config, side: SideId) -> Result<PgSource, SideError> {
        let side_cfg = config.side(side);
        let client = pg::connect(&side_cfg.connection, "dualwrite-capture").await?;
        let slot = config.slot_name(side);
        let mut origin_ids = prepare(&client, config, side, &slot).await?;
        // The last origin is the initial write's: left out entirely.
        let init = origin_ids.pop().into_iter().collect::<Vec<_>>();
        let ctx = Context {
            side: side_cfg.name.clone(),
            applier_origins: origin_ids.into_iter().collect(),
            keys: config.captured_entities(side),
            columns: dualwrite_model::columns::read_columns(config, side),
        };
        let tables: Vec<String> = config.captured_entities(side).into_keys().collect();
        Ok(PgSource {
            client,
            peek: peek_sql(&tables, &init),
            slot,
            ctx: Arc::new(ctx),
            read: None,
            rows: 0,
            idle_reads: 0,
        })
    }

    async fn start(&mut self, max_changes: i32) -> Result<(), SideError> {
        self.read = None;
        self.rows = 0;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&self.slot, &max_changes];
        let rows = self
            .client
            .query_raw(&self.peek, params)
            .await
            .map_err(|e| self.failed(&e))?;
        self.read = Some((Box::pin(rows), Decoder::new(self.ctx.clone())));
        Ok(())
    }

    async fn next(&mut self, out: &mut Decoded) -> Result<bool, SideError> {
        let Some((rows, decoder)) = self.read.as_mut() else {
            return Ok(false);
        };
        let row = match rows.try_next().await {
            Ok(Some(row)) => row,
            Ok(None) => {
                self.read = None;
                return Ok(false);
            }
            Err(e) => {
                self.read = None;
                return Err(self.failed(&e));
            }
        };
        self.rows += 1;
        let row = SlotRow {
            lsn: parse_lsn(row.get::<_, &str>(0)).unwrap_or(0),
            data: row.get::<_, String>(1),
        };
        decoder.push(&row, out);
        Ok(true)
    }

    fn read_so_far(&self) -> u64 {
        self.rows
    }

    async fn confirm(&mut self, lsn: u64) -> Result<(), SideError> {
        self.idle_reads = 0;
        self.client
            .execute(
                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                &[&self.slot, &format_lsn(lsn)],
            )
            .await
            .map(|_| ())
            .map_err(|e| side_error(&e).context(&format!("advancing slot {}", self.slot)))
    }

    async fn idle(&mut self) -> Result<(), SideError> {
        if self.rows > 0 {
            return Ok(());
        }
        self.idle_reads += 1;
        if self.idle_reads < HEARTBEAT_EVERY_IDLE_READS {
            return Ok(());
        }
        self.idle_reads = 0;
        heartbeat(&self.client, &self.slot)
            .await
            .map_err(|e| side_error(&e).context(&format!("heartbeat on slot {}", self.slot)))
    }
}

impl PgSource {
    /// A failed read: a connection's trouble is retried, anything else
    /// (the slot dropped, wal2json missing) stops the capturer.
    fn failed(&self, e: &tokio_postgres::Error) -> SideError {
        setup_error(e).context(&format!("reading slot {}", self.slot))
    }
}

/// Empty reads in a row after which a lagging slot gets a heartbeat. Every
/// empty read decodes the WAL since the slot's position again (e.g. the
/// appliers' writes, filtered out by origin), so the heartbeat comes soon:
/// with 20 (one a second), replaying a backlog onto this side kept each
/// capturer's backend at 16 % of a core re-decoding the same WAL.
const HEARTBEAT_EVERY_IDLE_READS: u32 = 2;

/// A side whose only changes are the appliers' own writes (left out by
/// origin) gives empty reads, and the slot, which advances only to a commit
/// it read, would stay behind: every read would decode the same WAL again
/// and the slot would hold it on disk. When the slot lags, a transactional
/// logical message (`pg_logical_emit_message`, ignored by the decoder) gives
/// the next read a commit of this database to advance to, through the same
/// path as any other commit.
async fn heartbeat(client: &Client, slot: &str) -> Result<(), tokio_postgres::Error> {
    let lagging: Option<bool> = client
        .query_opt(
            "SELECT pg_current_wal_lsn() - confirmed_flush_lsn > 65536 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .and_then(|r| r.get(0));
    if lagging == Some(true) {
        client
            .execute(
                "SELECT pg_logical_emit_message(true, 'dualwrite', 'heartbeat')",
                &[],
            )
            .await?;
    }
    Ok(())
}

fn peek_sql(tables: &[String], origin_ids: &[i64]) -> String {
    let add_tables = tables
        .iter()
        .map(|t| t.replace('\'', "''").replace(',', "\\,"))
        .collect::<Vec<_>>()
        .join(",");
    let mut opts = format!(
        "'format-version','2','include-lsn','true','include-timestamp','true',\
         'include-xids','true','include-pk','true','include-origin','true',\
         'add-msg-prefixes','{ack}','add-tables','{add_tables}'",
        ack = wal2json::ACK_PREFIX
    );
    if !origin_ids.is_empty() {
        let ids: Vec<String> = origin_ids.iter().map(i64::to_string).collect();
        opts.push_str(&format!(",'filter-origins','{}'", ids.join(",")));
    }
    format!("SELECT lsn::text, data FROM pg_logical_slot_peek_changes($1, NULL, $2, {opts})")
}

/// Checks the captured tables, creates the slot and the appliers'
/// replication origins if missing, and returns the origins' ids.
async fn prepare(
    client: &Client,
    config: &Config,
    side: SideId,
    slot: &str,
) -> Result<Vec<i64>, SideError> {
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
    Ok(ids)
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
