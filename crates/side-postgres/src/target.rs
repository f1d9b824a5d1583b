//! The applier's writes to a PostgreSQL side: each step of the
//! compare-and-set is one statement over a run of writes of one shape
//! ([`target_sql`]), prepared once per connection; the reports are
//! transactional logical messages, which the side's source passes on.
//!
//! Two replication origins per applier: a transaction's rows and
//! bookkeeping are written under its rows origin, which the side's source
//! has the server leave out before decoding (each WAL record carries the
//! origin it was written under); at the commit, the session switches to
//! its reports' origin for the transaction's reports (kept until then)
//! and the commit record, whose transactions the source reads the reports
//! of. Nothing is written after the reports but the commit, and the switch
//! back comes before the next transaction begins (also after a failed
//! one), so no row is ever written under the reports' origin.

use std::collections::HashMap;

use dualwrite_model::config::{Config, SideId};
use dualwrite_model::record::{ApplyWrite, ExpectKind, WriteOp};
use dualwrite_runtime::kafka::Shard;
use dualwrite_runtime::side::{Decided, Outcome, RowState, SideError, Target, Version};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use crate::pg::{self, setup_error, side_error};
use crate::target_sql as sql;

/// A connection to the target with its prepared statements and the
/// column types of each table written in the current transaction.
///
/// The types are read again in each transaction: a value is cast to its
/// column's type, so a column whose type changed while the applier runs
/// (`integer` to `text`, say) gets its values cast to the new type from
/// the next transaction on, not to the old one (which would refuse them,
/// or compare `007` as `7`). One catalog query per table and transaction
/// of up to a few thousand writes. The statements are prepared by their
/// text, which names the types, so a changed type is a new statement.
pub struct PgTarget {
    client: Client,
    statements: pg::Prepared,
    types: HashMap<String, sql::ColumnTypes>,
    /// The origin of the rows, and of the reports and commits.
    rows_origin: String,
    reports_origin: String,
    /// The session is under the rows origin (false from the moment a
    /// switch to the reports' origin is tried).
    under_rows: bool,
    /// The reports of the transaction's writes, sent with its commit.
    reports: Vec<String>,
}

fn failed(e: tokio_postgres::Error) -> SideError {
    side_error(&e)
}

/// Values (text arrays, or texts) as a statement's parameters, in order.
fn params<T: ToSql + Sync>(values: &[T]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

impl PgTarget {
    async fn prepared(&mut self, sql: String) -> Result<Statement, SideError> {
        self.statements.get(&self.client, sql).await.map_err(failed)
    }

    async fn simple(&mut self, sql: &str) -> Result<(), SideError> {
        self.client.batch_execute(sql).await.map_err(failed)
    }

    /// The column types of the target table `entity` (see [`PgTarget`]).
    async fn types(&mut self, entity: &str) -> Result<sql::ColumnTypes, SideError> {
        if let Some(t) = self.types.get(entity) {
            return Ok(t.clone());
        }
        let table = sql::table_ident(entity);
        let columns = pg::columns(&self.client, &table)
            .await
            .map_err(|e| failed(e).context(&format!("reading the columns of {table}")))?;
        let t = sql::ColumnTypes::new(columns.into_iter().map(|c| (c.name, c.type_name)));
        self.types.insert(entity.to_owned(), t.clone());
        Ok(t)
    }

    async fn query(
        &mut self,
        sql: String,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, SideError> {
        let stmt = self.prepared(sql).await?;
        self.client.query(&stmt, params).await.map_err(failed)
    }
}

impl Target for PgTarget {
    async fn connect(config: &Config, side: SideId, shard: Shard) -> Result<PgTarget, SideError> {
        let client = pg::connect(&config.side(side).connection, "dualwrite-apply").await?;
        // One session holds an origin at a time: each instance has its own.
        let origins = config.origin_names(side);
        let origin = if shard.count > 1 {
            origins[1 + shard.index as usize].clone()
        } else {
            origins[0].clone()
        };
        let rows_origin = dualwrite_model::config::rows_origin(&origin);
        let setup = |e: tokio_postgres::Error| setup_error(&e);
        for o in [&origin, &rows_origin] {
            pg::ensure_origin(&client, o).await.map_err(setup)?;
        }
        client
            .batch_execute(sql::VERSIONS_DDL)
            .await
            .map_err(setup)?;
        client.batch_execute(sql::SESSION).await.map_err(setup)?;
        Ok(PgTarget {
            client,
            statements: pg::Prepared::default(),
            types: HashMap::new(),
            rows_origin,
            reports_origin: origin,
            under_rows: false,
            reports: Vec::new(),
        })
    }

    async fn begin(&mut self) -> Result<(), SideError> {
        self.types.clear();
        self.reports.clear();
        if !self.under_rows {
            self.simple(&sql::use_origin(&self.rows_origin)).await?;
            self.under_rows = true;
        }
        self.simple("BEGIN").await
    }

    /// Sends the transaction's reports under the reports' origin, then
    /// commits (see the module docs).
    async fn commit(&mut self) -> Result<(), SideError> {
        let reports = std::mem::take(&mut self.reports);
        if !reports.is_empty() {
            self.under_rows = false;
            // Deferred triggers fire first, their writes under the rows origin.
            let switch = sql::use_origin(&self.reports_origin);
            self.simple(&format!("SET CONSTRAINTS ALL IMMEDIATE;\n{switch}"))
                .await?;
            self.query(sql::REPORT.to_owned(), &[&reports]).await?;
        }
        self.simple("COMMIT").await
    }

    async fn rollback(&mut self) -> Result<(), SideError> {
        self.reports.clear();
        self.simple("ROLLBACK").await
    }

    async fn versions(
        &mut self,
        map: &str,
        keys: &[String],
    ) -> Result<HashMap<String, Version>, SideError> {
        let rows = self.query(sql::VERSIONS.to_owned(), &[&map, &keys]).await?;
        Ok(rows
            .iter()
            .map(|r| {
                let v = Version {
                    version: r.get(1),
                    row_version: r.get(2),
                    present: r.get(3),
                    decided: r.get(4),
                };
                (r.get::<_, String>(0), v)
            })
            .collect())
    }

    async fn rows(&mut self, writes: &[&ApplyWrite]) -> Result<Vec<Option<RowState>>, SideError> {
        let compare = writes
            .iter()
            .find(|w| w.expect.kind == ExpectKind::Row)
            .map(|w| sql::names(&w.expect.values))
            .unwrap_or_default();
        let names = sql::check_names(writes[0], &compare);
        let types = self.types(&writes[0].target_entity).await?;
        let arrays = sql::arrays(writes, &names, |w| w.key.iter().chain(&w.expect.values));
        let sql = sql::rows_check(writes[0], &compare, &types);
        let rows = self.query(sql, &params(&arrays)).await?;
        let mut out: Vec<Option<RowState>> = vec![None; writes.len()];
        for r in rows {
            let at = usize::try_from(r.get::<_, i64>(0) - 1).unwrap_or(usize::MAX);
            if let Some(slot) = out.get_mut(at) {
                *slot = Some(RowState {
                    row_version: r.get(1),
                    same: r.get::<_, Option<bool>>(2).unwrap_or(false),
                });
            }
        }
        Ok(out)
    }

    async fn write(&mut self, writes: &[&ApplyWrite]) -> Result<(), SideError> {
        let Some(first) = writes.first() else {
            return Ok(());
        };
        let names = sql::write_names(first);
        let types = self.types(&first.target_entity).await?;
        let stmt = self.prepared(sql::statement_many(first, &types)).await?;
        let arrays = sql::arrays(writes, &names, |w| w.key.iter().chain(&w.values));
        self.client
            .execute(&stmt, &params(&arrays))
            .await
            .map(|_| ())
            .map_err(failed)
    }

    async fn other_key_taken(&mut self, w: &ApplyWrite) -> Result<bool, SideError> {
        let types = self.types(&w.target_entity).await?;
        let other = sql::moved_values(w);
        let rows = self
            .query(sql::key_exists(w, &types), &params(&other))
            .await?;
        Ok(rows.first().is_some_and(|r| r.get::<_, bool>(0)))
    }

    async fn move_row(&mut self, w: &ApplyWrite) -> Result<Option<String>, SideError> {
        let types = self.types(&w.target_entity).await?;
        let mut keys = sql::key_values(w);
        keys.extend(sql::moved_values(w));
        let rows = self.query(sql::move_row(w, &types), &params(&keys)).await?;
        Ok(rows.first().map(|r| r.get::<_, String>(0)))
    }

    async fn record_and_report(
        &mut self,
        map: &str,
        decided: &[Decided<'_>],
    ) -> Result<(), SideError> {
        // Every write made or superseded is reported (a redelivery is not).
        let acks: Vec<String> = decided
            .iter()
            .filter(|d| d.outcome != Outcome::Stale)
            .map(|d| match d.moved_to {
                Some(row) => sql::ack_moved(d.write, row),
                None => sql::ack(d.write, d.outcome == Outcome::Written),
            })
            .collect();
        if acks.is_empty() {
            return Ok(());
        }
        let of = |o: Outcome| {
            decided
                .iter()
                .filter(move |d| d.outcome == o)
                .map(|d| d.write)
        };
        let ks: Vec<String> = of(Outcome::Written).map(|w| w.kafka_key()).collect();
        let vs: Vec<i64> = of(Outcome::Written).map(|w| w.version).collect();
        let ps: Vec<bool> = of(Outcome::Written)
            .map(|w| w.op == WriteOp::Upsert)
            .collect();
        let sk: Vec<String> = of(Outcome::Superseded).map(|w| w.kafka_key()).collect();
        let sv: Vec<i64> = of(Outcome::Superseded).map(|w| w.version).collect();
        self.query(sql::RECORD.to_owned(), &[&map, &ks, &vs, &ps, &sk, &sv])
            .await?;
        self.reports.extend(acks);
        Ok(())
    }

    async fn prune(config: &Config, side: SideId, retention_secs: u64) -> Result<u64, SideError> {
        let client = pg::connect(&config.side(side).connection, "dualwrite-apply-prune").await?;
        let secs = retention_secs as f64;
        let mut total = 0;
        loop {
            let n = client
                .execute(sql::PRUNE, &[&secs, &sql::PRUNE_BATCH])
                .await
                .map_err(failed)?;
            total += n;
            if n < sql::PRUNE_BATCH as u64 {
                return Ok(total);
            }
        }
    }
}
