//! PostgreSQL connections of a side.

use dualwrite_model::config::PgConnection;
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::config::SslMode;
use tokio_postgres::Client;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TLS setup for PostgreSQL failed: {0}")]
    Tls(#[from] openssl::error::ErrorStack),
    #[error("{}", describe(.0))]
    Pg(#[from] tokio_postgres::Error),
}

impl ConnectError {
    /// Whether trying again later may succeed: the server is away, starting,
    /// shutting down, full, or the database does not accept connections for
    /// now (`ALLOW_CONNECTIONS false` during maintenance, SQLSTATE 55000).
    /// Wrong credentials, an unknown database or TLS setup are not.
    pub fn is_transient(&self) -> bool {
        match self {
            ConnectError::Tls(_) => false,
            ConnectError::Pg(e) => is_transient(e) || e.code().is_some_and(|c| c.code() == "55000"),
        }
    }
}

/// Connects to a side's database. The connection runs on its own task; the
/// client errors out once it is closed.
pub async fn connect(conn: &PgConnection, application_name: &str) -> Result<Client, ConnectError> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&conn.host)
        .port(conn.port)
        .dbname(&conn.dbname)
        .user(&conn.user)
        .application_name(application_name)
        .connect_timeout(std::time::Duration::from_secs(10));
    if let Some(pw) = &conn.password {
        cfg.password(pw.expose());
    }
    let mode = match conn.sslmode.as_deref() {
        Some("require") => SslMode::Require,
        Some("prefer") => SslMode::Prefer,
        _ => SslMode::Disable,
    };
    cfg.ssl_mode(mode);
    let (client, connection) = if mode == SslMode::Disable {
        let (c, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!("postgres connection closed: {e}");
            }
        });
        return Ok(c);
    } else {
        let mut builder = SslConnector::builder(SslMethod::tls())?;
        // sslmode=require encrypts without verifying the server, as libpq does.
        builder.set_verify(SslVerifyMode::NONE);
        cfg.connect(MakeTlsConnector::new(builder.build())).await?
    };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("postgres connection closed: {e}");
        }
    });
    Ok(client)
}

/// Whether an error is worth retrying (connection lost, server shutting
/// down, serialization failure, deadlock, too many connections) rather than
/// a property of the data.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => true, // IO or protocol error: the connection is in doubt.
        Some(code) => {
            let c = code.code();
            c.starts_with("08") // connection exception
                || c.starts_with("53") // insufficient resources
                || c.starts_with("57") // operator intervention (shutdown, cancel)
                || c == "40001" // serialization_failure
                || c == "40P01" // deadlock_detected
                || c == "55P03" // lock_not_available
                || c == "55006" // object_in_use (e.g. replication origin still held)
        }
    }
}

/// Creates the replication origin if it does not exist, and returns its id.
pub async fn ensure_origin(client: &Client, origin: &str) -> Result<i64, tokio_postgres::Error> {
    loop {
        if let Some(row) = client
            .query_opt(
                "SELECT roident::int8 FROM pg_replication_origin WHERE roname = $1",
                &[&origin],
            )
            .await?
        {
            return Ok(row.get(0));
        }
        match client
            .execute("SELECT pg_replication_origin_create($1)", &[&origin])
            .await
        {
            Ok(_) => {}
            // Created meanwhile by the other service of this side.
            Err(e) if e.code().is_some_and(|c| c.code() == "23505") => {}
            Err(e) => return Err(e),
        }
    }
}

/// An error with the server's message, SQLSTATE and detail, for operators
/// (`tokio_postgres::Error`'s own text is only "db error" for those).
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; {d}"));
            }
            s
        }
        None => e.to_string(),
    }
}

/// `schema.table` (or `table`, in `public`) as a quoted identifier.
pub fn table_ident(entity: &str) -> String {
    use postgres_protocol::escape::escape_identifier;
    let (schema, table) = entity.split_once('.').unwrap_or(("public", entity));
    format!("{}.{}", escape_identifier(schema), escape_identifier(table))
}

/// SQL for the row `t` as a JSON object of every column's text value.
pub const ROW_AS_TEXT_JSON: &str =
    "(SELECT json_object_agg(e.key, e.value) FROM json_each_text(row_to_json(t)) AS e)::text";

/// A JSON object of fields (a later field of the same name wins), values as
/// strings or null: the parameter of `json_populate_record`, so each value
/// goes through its column type's own input function.
pub fn fields_json<'a>(fields: impl Iterator<Item = &'a dualwrite_model::record::Field>) -> String {
    let mut o = serde_json::Map::new();
    for f in fields {
        o.insert(
            f.name.clone(),
            f.value
                .clone()
                .map_or(serde_json::Value::Null, serde_json::Value::String),
        );
    }
    serde_json::Value::Object(o).to_string()
}

/// What the database says about a table (`schema.table`): its columns and
/// the column sets of its unique indexes (not partial, not on
/// expressions); `None` when there is no such table.
pub async fn describe_table(
    client: &Client,
    entity: &str,
) -> Result<Option<dualwrite_model::schema::TableInfo>, tokio_postgres::Error> {
    let (schema, table) = entity.split_once('.').unwrap_or(("public", entity));
    let cols = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
               FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&schema, &table],
        )
        .await?;
    if cols.is_empty() {
        return Ok(None);
    }
    let unique = client
        .query(
            "SELECT array_agg(a.attname::text)
               FROM pg_index i
               JOIN pg_class c ON c.oid = i.indrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (i.indkey)
              WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique
                AND i.indpred IS NULL AND i.indexprs IS NULL
              GROUP BY i.indexrelid",
            &[&schema, &table],
        )
        .await?;
    Ok(Some(dualwrite_model::schema::TableInfo {
        columns: cols.iter().map(|r| (r.get(0), r.get(1))).collect(),
        unique: unique.iter().map(|r| r.get(0)).collect(),
    }))
}

/// Checks a map's mapping against the tables of both sides (connecting to
/// each); the problems found, or why the databases could not be read.
pub async fn schema_problems(
    config: &dualwrite_model::Config,
    map: &dualwrite_model::config::MapConfig,
) -> Result<Vec<dualwrite_model::schema::SchemaProblem>, (bool, String)> {
    use dualwrite_model::config::SideId;
    let mut tables = Vec::new();
    for side in [SideId::Left, SideId::Right] {
        let name = &config.side(side).name;
        let client = connect(&config.side(side).connection, "dualwrite-schema-check")
            .await
            .map_err(|e| {
                (
                    e.is_transient(),
                    format!("side `{name}`: cannot connect: {e}"),
                )
            })?;
        let info = describe_table(&client, &map.entity(side).qualified())
            .await
            .map_err(|e| {
                (
                    is_transient(&e),
                    format!(
                        "side `{name}`: cannot read the table's description: {}",
                        describe(&e)
                    ),
                )
            })?;
        tables.push(info);
    }
    Ok(dualwrite_model::schema::check_map(
        config,
        map,
        tables[0].as_ref(),
        tables[1].as_ref(),
    ))
}
