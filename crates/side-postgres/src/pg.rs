//! PostgreSQL connections of a side, and what its errors mean.

use dualwrite_model::config::PgConnection;
use dualwrite_runtime::side::{Class, SideError};
use openssl::error::ErrorStack;
use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::config::SslMode;
use tokio_postgres::Client;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TLS setup for PostgreSQL failed: {0}")]
    Tls(#[from] openssl::error::ErrorStack),
    #[error("TLS setup for PostgreSQL: cannot use {what} `{path}`: {source}")]
    TlsFile {
        what: &'static str,
        path: String,
        source: openssl::error::ErrorStack,
    },
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
            ConnectError::Tls(_) | ConnectError::TlsFile { .. } => false,
            ConnectError::Pg(e) => is_transient(e) || e.code().is_some_and(|c| c.code() == "55000"),
        }
    }
}

impl From<ConnectError> for SideError {
    /// A connection that may come later is retried; one refused for its
    /// settings (credentials, database, TLS) is fatal.
    fn from(e: ConnectError) -> SideError {
        let class = if e.is_transient() {
            Class::RetryLater
        } else {
            Class::Fatal
        };
        SideError::new(class, format!("cannot connect: {e}"))
    }
}

/// A PostgreSQL error in the services' classification: a clash of the
/// moment (serialization failure, deadlock, lock not available) is
/// retried at once, the rest of [`is_transient`] after a backoff, and any
/// other error is the data's (recorded; at setup, the caller makes it
/// fatal). Its message with and without the row's values, and whether a
/// foreign key found no parent (SQLSTATE 23503).
pub fn side_error(e: &tokio_postgres::Error) -> SideError {
    let code = e.code().map(|c| c.code());
    let class = match code {
        _ if !is_transient(e) => Class::Record,
        Some("40001" | "40P01" | "55P03") => Class::RetryNow,
        _ => Class::RetryLater,
    };
    SideError {
        class,
        message: describe(e),
        redacted: describe_redacted(e),
        missing_parent: code == Some("23503"),
        code: code.map(str::to_owned),
    }
}

/// A failure while preparing: fatal unless it may pass when tried again.
pub fn setup_error(e: &tokio_postgres::Error) -> SideError {
    let mut s = side_error(e);
    if s.class == Class::Record {
        s.class = Class::Fatal;
    }
    s
}

/// The statements prepared on one connection, by their text: each is
/// prepared once and used again for the life of the connection.
#[derive(Default)]
pub struct Prepared(std::collections::HashMap<String, tokio_postgres::Statement>);

impl Prepared {
    /// The statement `sql`, prepared on `client` the first time.
    pub async fn get(
        &mut self,
        client: &Client,
        sql: String,
    ) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        if let Some(s) = self.0.get(&sql) {
            return Ok(s.clone());
        }
        let s = client.prepare(&sql).await?;
        self.0.insert(sql, s.clone());
        Ok(s)
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
        Some("require" | "verify-ca" | "verify-full") => SslMode::Require,
        Some("prefer") => SslMode::Prefer,
        _ => SslMode::Disable,
    };
    cfg.ssl_mode(mode);
    warn_unverified(conn);
    let (client, connection) = if mode == SslMode::Disable {
        let (c, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!("postgres connection closed: {e}");
            }
        });
        return Ok(c);
    } else {
        cfg.connect(tls_connector(conn)?).await?
    };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("postgres connection closed: {e}");
        }
    });
    Ok(client)
}

/// The TLS client of a connection, as libpq's `sslmode`: `prefer` and
/// `require` encrypt without verifying the server; `verify-ca` checks that
/// its certificate chains to `sslrootcert`; `verify-full` also that it
/// names the host connected to. A client certificate is sent when set.
pub(crate) fn tls_connector(conn: &PgConnection) -> Result<MakeTlsConnector, ConnectError> {
    fn file(what: &'static str, path: &str) -> impl FnOnce(ErrorStack) -> ConnectError {
        let path = path.to_owned();
        move |source| ConnectError::TlsFile { what, path, source }
    }
    let mode = conn.sslmode.as_deref().unwrap_or("disable");
    let verify = mode.starts_with("verify-");
    let mut b = SslConnector::builder(SslMethod::tls())?;
    if verify {
        match conn.sslrootcert.as_deref() {
            Some("system") | None => b.set_default_verify_paths()?,
            Some(path) => b
                .set_ca_file(path)
                .map_err(file("the CA certificates (sslrootcert)", path))?,
        }
        b.set_verify(SslVerifyMode::PEER);
    } else {
        b.set_verify(SslVerifyMode::NONE);
    }
    if let (Some(cert), Some(key)) = (&conn.sslcert, &conn.sslkey) {
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        b.set_certificate_chain_file(&cert)
            .map_err(file("the client certificate (sslcert)", &cert))?;
        b.set_private_key_file(&key, SslFiletype::PEM)
            .map_err(file("the client key (sslkey)", &key))?;
        b.check_private_key().map_err(file(
            "the client key (sslkey), which does not match sslcert,",
            &key,
        ))?;
    }
    let mut c = MakeTlsConnector::new(b.build());
    // The host name is checked by default; verify-ca checks the chain only.
    let full = mode == "verify-full";
    c.set_callback(move |config, _host| {
        config.set_verify_hostname(full);
        Ok(())
    });
    Ok(c)
}

/// Warns once per host when a connection to another machine does not
/// verify the server (anyone on the path could pose as it).
fn warn_unverified(conn: &PgConnection) {
    use std::sync::Mutex;
    static WARNED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mode = conn.sslmode.as_deref().unwrap_or("disable");
    if mode.starts_with("verify-") || is_local(&conn.host) {
        return;
    }
    let Ok(mut warned) = WARNED.lock() else {
        return;
    };
    if warned.contains(&conn.host) {
        return;
    }
    warned.push(conn.host.clone());
    tracing::warn!(
        host = %conn.host,
        sslmode = mode,
        "the connection to PostgreSQL on another host does not verify the server: set sslmode = \"verify-full\" with sslrootcert"
    );
}

/// A loopback address, `localhost` or a Unix socket folder.
pub fn is_local(host: &str) -> bool {
    host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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
        Some(code) => is_transient_code(code.code()),
    }
}

/// Whether a SQLSTATE is one of [`is_transient`]'s.
pub fn is_transient_code(c: &str) -> bool {
    c.starts_with("08") // connection exception
        || c.starts_with("53") // insufficient resources
        || c.starts_with("57") // operator intervention (shutdown, cancel)
        || c == "40001" // serialization_failure
        || c == "40P01" // deadlock_detected
        || c == "55P03" // lock_not_available
        || c == "55006" // object_in_use (e.g. replication origin or slot still held)
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
        None => with_causes(e),
    }
}

/// An error's text followed by its causes' (e.g. why a TLS handshake
/// failed: the certificate's verification and its reason).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// A row's rejection for logs and error records, without the row's
/// values: the server's message and SQLSTATE with the table, column and
/// constraint it names, but not its detail (`Failing row contains (…)`,
/// `Key (…)=(…)`), and for data exceptions (class 22, whose messages quote
/// the value: `invalid input syntax for type integer: "x"`) every quoted
/// text that is not one of those names replaced by `"…"`. The full text is
/// [`describe`].
pub fn describe_redacted(e: &tokio_postgres::Error) -> String {
    let Some(db) = e.as_db_error() else {
        return e.to_string();
    };
    let names: Vec<&str> = [
        db.schema(),
        db.table(),
        db.column(),
        db.constraint(),
        db.datatype(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let code = db.code().code();
    let message = if code.starts_with("22") {
        redact_quoted(db.message(), &names)
    } else {
        db.message().to_owned()
    };
    let mut s = format!("{message} (SQLSTATE {code})");
    let parts: Vec<String> = [
        ("table", db.table()),
        ("column", db.column()),
        ("constraint", db.constraint()),
    ]
    .into_iter()
    .filter_map(|(what, v)| v.map(|v| format!("{what} {v}")))
    .collect();
    if !parts.is_empty() {
        s.push_str(&format!(" [{}]", parts.join(", ")));
    }
    s
}

/// `text` with each `"…"`-quoted part that is not one of `keep` replaced by `"…"`.
fn redact_quoted(text: &str, keep: &[&str]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut parts = text.split('"');
    out.push_str(parts.next().unwrap_or_default());
    let mut inside = true;
    for part in parts {
        out.push('"');
        if inside && !keep.contains(&part) {
            out.push('…');
        } else {
            out.push_str(part);
        }
        inside = !inside;
    }
    out
}

/// `schema.table` (or `table`, in `public`) as a quoted identifier.
pub fn table_ident(entity: &str) -> String {
    use postgres_protocol::escape::escape_identifier;
    let (schema, table) = entity.split_once('.').unwrap_or(("public", entity));
    format!("{}.{}", escape_identifier(schema), escape_identifier(table))
}

/// A column of a table, as the copy and the appliers cast values to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// Its type as casts name it, without a modifier (`character
    /// varying`, `numeric`, `"bit"`), so that an insert applies the
    /// modifier as it does to any value (a text too long for its column
    /// is refused, not cut).
    pub type_name: String,
    /// Whether the type is json or jsonb, or a domain over one.
    pub json: bool,
}

/// A table's columns in order (`$1`: the table's quoted name).
const COLUMNS: &str = "SELECT a.attname::text, format_type(a.atttypid, -1), \
     (CASE ty.typtype WHEN 'd' THEN ty.typbasetype ELSE ty.oid END) IN ('json'::regtype, 'jsonb'::regtype) \
     FROM pg_attribute AS a JOIN pg_type AS ty ON ty.oid = a.atttypid \
     WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
     ORDER BY a.attnum";

/// The columns of `table` (its quoted name), in order.
pub async fn columns(client: &Client, table: &str) -> Result<Vec<Column>, tokio_postgres::Error> {
    Ok(client
        .query(COLUMNS, &[&table])
        .await?
        .iter()
        .map(|r| Column {
            name: r.get(0),
            type_name: r.get(1),
            json: r.get(2),
        })
        .collect())
}

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

/// What the database says about a table (`schema.table`): its columns, the
/// column sets of its unique indexes (not partial, not on expressions) and
/// the foreign keys that refer to it; `None` when there is no such table.
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
    let refs = client
        .query(
            "SELECT con.conname::text, cn.nspname || '.' || cc.relname, con.confdeltype::text
               FROM pg_constraint con
               JOIN pg_class pc ON pc.oid = con.confrelid
               JOIN pg_namespace pn ON pn.oid = pc.relnamespace
               JOIN pg_class cc ON cc.oid = con.conrelid
               JOIN pg_namespace cn ON cn.oid = cc.relnamespace
              WHERE con.contype = 'f' AND pn.nspname = $1 AND pc.relname = $2",
            &[&schema, &table],
        )
        .await?;
    Ok(Some(dualwrite_model::schema::TableInfo {
        columns: cols.iter().map(|r| (r.get(0), r.get(1))).collect(),
        unique: unique.iter().map(|r| r.get(0)).collect(),
        referenced_by: refs
            .iter()
            .map(|r| dualwrite_model::schema::Reference {
                constraint: r.get(0),
                child: r.get(1),
                on_delete: r.get::<_, String>(2).chars().next().unwrap_or('a'),
            })
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_are_redacted_and_names_kept() {
        assert_eq!(
            redact_quoted(
                r#"invalid input syntax for type integer: "Ann O'Neil""#,
                &[]
            ),
            r#"invalid input syntax for type integer: "…""#
        );
        assert_eq!(
            redact_quoted(r#"value "x" for column "age" and "y""#, &["age"]),
            r#"value "…" for column "age" and "…""#
        );
        assert_eq!(
            redact_quoted("numeric field overflow", &[]),
            "numeric field overflow"
        );
    }

    #[test]
    fn loopback_hosts_are_local() {
        for h in ["127.0.0.1", "::1", "localhost", "/var/run/postgresql"] {
            assert!(is_local(h), "{h}");
        }
        for h in ["db1", "10.0.0.5", "db.example.com"] {
            assert!(!is_local(h), "{h}");
        }
    }
}
