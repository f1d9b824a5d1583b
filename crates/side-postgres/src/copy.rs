//! The initial write on a PostgreSQL side: a `REPEATABLE READ` snapshot
//! read through a cursor in key order, and guarded writes on a second
//! connection under the initial write's replication origin.

use std::collections::HashMap;
use std::time::Duration;

use dualwrite_model::config::{Config, MapConfig, SideId};
use dualwrite_model::lifecycle::SideSnapshot;
use dualwrite_model::record::Field;
use dualwrite_model::schema::TableInfo;
use dualwrite_runtime::side::{
    Class, CopyOutcome, CopySide, CopyWrite, CopyWriter, SideError, SnapshotRow, WriteKind,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;

use crate::copy_sql as sql;
use crate::pg::{self, setup_error, side_error, table_ident};

/// Rows fetched from the cursor at a time.
const FETCH: usize = 1000;
const CURSOR: &str = "dualwrite_initial_sync";
/// How often the slot's position is read while waiting for it.
const POLL: Duration = Duration::from_millis(200);

/// One side of a copy: the snapshot reader.
pub struct PgCopy {
    key_len: usize,
    /// The columns each row has after its key, in order.
    columns: Vec<String>,
    reader: Client,
    snapshot: SideSnapshot,
    rows: i64,
    exhausted: bool,
}

/// One side of a copy: the writer, on a connection of its own.
pub struct PgCopyWriter {
    entity: String,
    writer: Client,
    /// The table's column types, by column, as casts name them.
    types: HashMap<String, String>,
    statements: pg::Prepared,
}

/// A failure of `what`: retried if it may pass, else the copy stops.
fn failed(what: &str) -> impl Fn(tokio_postgres::Error) -> SideError + '_ {
    move |e| setup_error(&e).context(what)
}

impl CopySide for PgCopy {
    type Writer = PgCopyWriter;

    async fn open(
        config: &Config,
        map: &MapConfig,
        side: SideId,
        after: Option<&[String]>,
    ) -> Result<(PgCopy, PgCopyWriter), SideError> {
        let conn = &config.side(side).connection;
        let name = &config.side(side).name;
        let in_side = |e: SideError| e.context(&format!("side `{name}`"));
        let reader = pg::connect(conn, "dualwrite-initial-sync")
            .await
            .map_err(|e| in_side(e.into()))?;
        let writer = pg::connect(conn, "dualwrite-initial-sync")
            .await
            .map_err(|e| in_side(e.into()))?;
        let origin = config.initial_sync_origin(side);
        let at_origin = format!("side `{name}`: replication origin {origin}");
        pg::ensure_origin(&writer, &origin)
            .await
            .map_err(failed(&at_origin))?;
        writer
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await
            .map_err(failed(&at_origin))?;
        let entity = map.entity(side);
        let reading = format!("side `{name}`: reading {}", entity.qualified());
        let (snapshot, rows, columns) =
            take_snapshot(&reader, &entity.qualified(), &entity.key, after)
                .await
                .map_err(failed(&reading))?;
        let snapshot = snapshot.map_err(|snap| {
            SideError::new(
                Class::Fatal,
                format!("side `{name}`: unreadable snapshot `{snap}`"),
            )
        })?;
        // One read of the table's columns serves both: the reader's
        // order, the writer's casts.
        let types = columns
            .iter()
            .map(|c| (c.name.clone(), c.type_name.clone()))
            .collect();
        let copy = PgCopy {
            key_len: entity.key.len(),
            columns: columns.into_iter().map(|c| c.name).collect(),
            reader,
            snapshot,
            rows,
            exhausted: false,
        };
        let writer = PgCopyWriter {
            entity: entity.qualified(),
            writer,
            types,
            statements: pg::Prepared::default(),
        };
        Ok((copy, writer))
    }

    fn snapshot(&self) -> &SideSnapshot {
        &self.snapshot
    }

    fn rows(&self) -> i64 {
        self.rows
    }

    async fn fetch(&mut self) -> Result<Vec<SnapshotRow>, SideError> {
        if self.exhausted {
            return Ok(Vec::new());
        }
        let rows = self
            .reader
            .query(&format!("FETCH {FETCH} FROM {CURSOR}"), &[])
            .await
            .map_err(failed("reading rows"))?;
        if rows.len() < FETCH {
            self.exhausted = true;
        }
        let row = |r| snapshot_row(r, self.key_len, &self.columns);
        Ok(rows.iter().map(row).collect())
    }

    async fn finish(&mut self) -> Result<(), SideError> {
        self.reader
            .batch_execute("COMMIT")
            .await
            .map_err(failed("ending the snapshot"))
    }

    async fn wait_captured(
        config: &Config,
        side: SideId,
        cancel: &CancellationToken,
    ) -> Result<bool, SideError> {
        let s = config.side(side);
        let client = pg::connect(&s.connection, "dualwrite-initial-sync")
            .await
            .map_err(|e| SideError::from(e).context(&format!("side `{}`", s.name)))?;
        let waiting = format!("side `{}`: waiting for its capturer", s.name);
        let marker: String = client
            .query_one(
                "SELECT pg_logical_emit_message(true, 'dualwrite', 'heartbeat')::text",
                &[],
            )
            .await
            .map_err(failed(&waiting))?
            .get(0);
        let slot = config.slot_name(side);
        let mut logged = false;
        loop {
            if passed(&client, &slot, &marker)
                .await
                .map_err(failed(&waiting))?
            {
                return Ok(true);
            }
            if !logged {
                tracing::info!(side = %s.name, %slot, "initial sync: waiting for the capturer to pass the snapshot");
                logged = true;
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(false),
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    async fn describe_table(
        config: &Config,
        side: SideId,
        entity: &str,
    ) -> Result<Option<TableInfo>, SideError> {
        let name = &config.side(side).name;
        let client = pg::connect(&config.side(side).connection, "dualwrite-schema-check")
            .await
            .map_err(|e| SideError::from(e).context(&format!("side `{name}`")))?;
        pg::describe_table(&client, entity)
            .await
            .map_err(failed(&format!(
                "side `{name}`: cannot read the table's description"
            )))
    }
}

impl CopyWriter for PgCopyWriter {
    async fn write(&mut self, writes: &[&CopyWrite]) -> Result<Vec<CopyOutcome>, SideError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let all = async {
            self.writer.batch_execute("BEGIN").await?;
            self.exec_all(writes).await
        }
        .await;
        match all {
            Ok(out) => {
                self.commit().await?;
                return Ok(out);
            }
            Err(e) if pg::is_transient(&e) => return Err(failed("writing")(e)),
            Err(_) => self.rollback().await?,
        }
        // One of them was rejected: again, each under a savepoint.
        self.simple("BEGIN").await?;
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            self.simple("SAVEPOINT w").await?;
            match self.exec(w).await {
                Ok(o) => {
                    self.simple("RELEASE SAVEPOINT w").await?;
                    out.push(o);
                }
                Err(e) if pg::is_transient(&e) => return Err(failed("writing")(e)),
                Err(e) => {
                    self.simple("ROLLBACK TO SAVEPOINT w").await?;
                    out.push(CopyOutcome::Rejected(side_error(&e)));
                }
            }
        }
        self.commit().await?;
        Ok(out)
    }
}

/// What a snapshot sees, how many rows after the checkpoint it holds, and
/// the columns its cursor reads.
type Opened = (Result<SideSnapshot, String>, i64, Vec<pg::Column>);

/// Opens the snapshot: what it sees, and how many rows after `after` it
/// holds; declares the cursor that reads them in key order.
async fn take_snapshot(
    reader: &Client,
    entity: &str,
    key: &[String],
    after: Option<&[String]>,
) -> Result<Opened, tokio_postgres::Error> {
    reader
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?;
    // The first statement takes the snapshot; the insert position read
    // with it bounds every commit the snapshot can see.
    let row = reader
        .query_one(
            "SELECT pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text",
            &[],
        )
        .await?;
    let (snap, lsn): (String, String) = (row.get(0), row.get(1));
    let lsn = dualwrite_model::record::parse_lsn(&lsn).unwrap_or(0) as i64;
    let rows: i64 = reader
        .query_one(&sql::count(entity, key, after), &[])
        .await?
        .get(0);
    let table = table_ident(entity);
    let columns = pg::columns(reader, &table).await?;
    reader
        .batch_execute(&sql::declare_cursor(CURSOR, entity, key, &columns, after))
        .await?;
    Ok((SideSnapshot::parse(&snap, lsn).ok_or(snap), rows, columns))
}

/// A cursor's row: the key values, then each column's text.
fn snapshot_row(r: &tokio_postgres::Row, key_len: usize, columns: &[String]) -> SnapshotRow {
    let key: Vec<Option<String>> = (0..key_len).map(|i| r.get(i)).collect();
    let fields = columns
        .iter()
        .enumerate()
        .map(|(i, name)| Field {
            name: name.clone(),
            value: r.get(key_len + i),
        })
        .collect();
    (key, fields)
}

impl PgCopyWriter {
    async fn simple(&mut self, sql: &str) -> Result<(), SideError> {
        self.writer
            .batch_execute(sql)
            .await
            .map_err(failed("writing"))
    }

    /// The writes in one go: the creates of the same fields as one
    /// statement over a JSON array of rows, the updates one by one.
    async fn exec_all(
        &mut self,
        writes: &[&CopyWrite],
    ) -> Result<Vec<CopyOutcome>, tokio_postgres::Error> {
        let mut out: Vec<CopyOutcome> = writes.iter().map(|_| CopyOutcome::Unchanged).collect();
        let mut creates: HashMap<Vec<&str>, Vec<usize>> = HashMap::new();
        for (i, w) in writes.iter().enumerate() {
            match w.kind {
                WriteKind::Create => creates
                    .entry(w.new.iter().map(|f| f.name.as_str()).collect())
                    .or_default()
                    .push(i),
                WriteKind::Update => out[i] = self.exec(w).await?,
            }
        }
        for group in creates.values() {
            let group_writes: Vec<&CopyWrite> = group.iter().map(|i| writes[*i]).collect();
            let sql = sql::create_many(&self.entity, group_writes[0], &self.types);
            let stmt = self.statement(sql).await?;
            let columns = sql::columns(&group_writes);
            let params: Vec<&(dyn ToSql + Sync)> =
                columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
            let created = self.writer.execute(&stmt, &params).await? as usize;
            // Counted, not told apart: a row not created appeared meanwhile.
            for i in group.iter().take(created) {
                out[*i] = CopyOutcome::Written;
            }
        }
        Ok(out)
    }

    async fn statement(&mut self, sql: String) -> Result<Statement, tokio_postgres::Error> {
        self.statements.get(&self.writer, sql).await
    }

    async fn exec(&mut self, w: &CopyWrite) -> Result<CopyOutcome, tokio_postgres::Error> {
        let sql = sql::statement(&self.entity, w, &self.types);
        let stmt = self.statement(sql).await?;
        let (new, old) = sql::parameters(w);
        let n = match w.kind {
            WriteKind::Create => self.writer.execute(&stmt, &[&new]).await?,
            WriteKind::Update => self.writer.execute(&stmt, &[&new, &old]).await?,
        };
        Ok(if n > 0 {
            CopyOutcome::Written
        } else {
            CopyOutcome::Unchanged
        })
    }

    async fn commit(&mut self) -> Result<(), SideError> {
        // A deferred constraint fails at commit: the chunk cannot be written.
        self.writer
            .batch_execute("COMMIT")
            .await
            .map_err(failed("committing"))
    }

    async fn rollback(&mut self) -> Result<(), SideError> {
        self.writer
            .batch_execute("ROLLBACK")
            .await
            .map_err(failed("rolling back"))
    }
}

/// Whether `slot` was advanced past `lsn`. A side without the slot passes:
/// no capturer has read it yet, and the slot it creates starts after
/// every transaction committed before, so none of them is ever captured.
async fn passed(client: &Client, slot: &str, lsn: &str) -> Result<bool, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &lsn],
        )
        .await?;
    Ok(match row {
        None => true,
        Some(r) => r.get::<_, Option<bool>>(0).unwrap_or(false),
    })
}
