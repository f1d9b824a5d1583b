//! A logical replication connection: PostgreSQL's streaming replication
//! protocol (`replication=database`), which tokio-postgres does not speak.
//!
//! One connection streams one slot: [`Replication::connect`] (TLS as
//! libpq's `sslmode`, through the same connector as every other
//! connection; password, MD5 or SCRAM-SHA-256), then
//! [`Replication::start`] (`START_REPLICATION … LOGICAL` with the output
//! plugin's options), then [`Replication::recv`] for the server's messages
//! and [`Replication::status`] for the client's standby status updates.
//! The messages are PostgreSQL's ("Streaming Replication Protocol" in its
//! manual): `XLogData` carries one output row of the plugin and the
//! position the server gives it (for a commit: the end of its record),
//! `Primary keepalive` the position the server has sent up to.

use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use dualwrite_model::config::PgConnection;
use dualwrite_runtime::side::{Class, SideError};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

use crate::pg;

/// A message of the server while streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// One output row of the plugin, at `lsn`.
    Data { lsn: u64, data: Bytes },
    /// Everything before `end` was sent (or left out by the plugin);
    /// `reply`: the server asks for a status update now.
    Keepalive { end: u64, reply: bool },
}

/// The longest the server stays silent on a live connection: it asks for
/// a status update every half `wal_sender_timeout` (60 s by default), so
/// silence this long means the connection is gone without a word.
const SILENCE: Duration = Duration::from_secs(180);

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A connection in replication mode.
pub struct Replication {
    stream: Box<dyn Stream>,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Replication {
    /// Connects and authenticates in replication mode.
    pub async fn connect(conn: &PgConnection, app: &str) -> Result<Replication, SideError> {
        let stream = tokio::time::timeout(Duration::from_secs(10), open(conn))
            .await
            .map_err(|_| SideError::new(Class::RetryLater, "cannot connect: timed out"))??;
        let mut r = Replication {
            stream,
            rbuf: BytesMut::with_capacity(64 << 10),
            wbuf: BytesMut::new(),
        };
        r.startup(conn, app).await?;
        Ok(r)
    }

    async fn startup(&mut self, conn: &PgConnection, app: &str) -> Result<(), SideError> {
        let params = [
            ("user", conn.user.as_str()),
            ("database", conn.dbname.as_str()),
            ("replication", "database"),
            ("application_name", app),
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(params, &mut self.wbuf).map_err(io_error)?;
        self.flush().await?;
        let mut scram = None;
        loop {
            let (tag, mut body) = self.frame().await?;
            match tag {
                b'R' => self.authenticate(conn, &mut body, &mut scram).await?,
                b'E' => return Err(server_error(&body, "authentication")),
                b'Z' => return Ok(()),
                _ => {} // parameter status, backend key, notices
            }
        }
    }

    /// Answers one authentication request.
    async fn authenticate(
        &mut self,
        conn: &PgConnection,
        body: &mut Bytes,
        scram: &mut Option<ScramSha256>,
    ) -> Result<(), SideError> {
        let password = || {
            conn.password
                .as_ref()
                .map(|p| p.expose().to_owned())
                .ok_or_else(|| {
                    SideError::new(
                        Class::Fatal,
                        "cannot connect: the server asks for a password and none is set",
                    )
                })
        };
        let w = &mut self.wbuf;
        if body.len() < 4 {
            return Err(protocol("authentication request too short"));
        }
        match body.get_i32() {
            0 => return Ok(()),
            3 => frontend::password_message(password()?.as_bytes(), w).map_err(io_error)?,
            5 => {
                let salt: [u8; 4] = body
                    .get(..4)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| protocol("MD5 request without its salt"))?;
                let hash = postgres_protocol::authentication::md5_hash(
                    conn.user.as_bytes(),
                    password()?.as_bytes(),
                    salt,
                );
                frontend::password_message(hash.as_bytes(), w).map_err(io_error)?;
            }
            10 => {
                if !offers_scram(body) {
                    return Err(SideError::new(
                        Class::Fatal,
                        format!("cannot connect: the server offers none of the SASL mechanisms supported ({SCRAM_SHA_256})"),
                    ));
                }
                let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), w).map_err(io_error)?;
                *scram = Some(s);
            }
            11 => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| protocol("SASL continue before start"))?;
                s.update(body).map_err(auth_error)?;
                frontend::sasl_response(s.message(), w).map_err(io_error)?;
            }
            12 => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| protocol("SASL final before start"))?;
                return s.finish(body).map_err(auth_error);
            }
            other => {
                return Err(SideError::new(
                    Class::Fatal,
                    format!("cannot connect: authentication method {other} is not supported"),
                ))
            }
        }
        self.flush().await
    }

    /// Starts streaming `slot` from its confirmed position, with the
    /// plugin's `options` (name, value).
    pub async fn start(&mut self, slot: &str, options: &[(&str, String)]) -> Result<(), SideError> {
        frontend::query(&start_command(slot, options), &mut self.wbuf).map_err(io_error)?;
        self.flush().await?;
        loop {
            let (tag, body) = self.frame().await?;
            match tag {
                b'W' => return Ok(()),
                b'E' => {
                    return Err(server_error(
                        &body,
                        &format!("starting to stream slot {slot}"),
                    ))
                }
                _ => {}
            }
        }
    }

    /// The next message of the stream. Cancel safe: a message partly read
    /// stays in the buffer for the next call.
    pub async fn recv(&mut self) -> Result<Event, SideError> {
        loop {
            let (tag, body) =
                tokio::time::timeout(SILENCE, self.frame())
                    .await
                    .map_err(|_| {
                        SideError::new(
                            Class::RetryLater,
                            "the server has been silent for 3 minutes",
                        )
                    })??;
            match tag {
                b'd' => return parse_copy_data(body),
                b'E' => return Err(server_error(&body, "streaming")),
                b'c' => {
                    return Err(SideError::new(
                        Class::RetryLater,
                        "the server ended the stream",
                    ))
                }
                _ => {}
            }
        }
    }

    /// Tells the server that everything before `flushed` is kept: the slot
    /// may move there.
    pub async fn status(&mut self, flushed: u64) -> Result<(), SideError> {
        let body = status_update(flushed, pg_now());
        frontend::CopyData::new(&body[..])
            .map_err(io_error)?
            .write(&mut self.wbuf);
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), SideError> {
        self.stream.write_all(&self.wbuf).await.map_err(io_error)?;
        self.wbuf.clear();
        self.stream.flush().await.map_err(io_error)
    }

    /// The next whole message: its tag and body.
    async fn frame(&mut self) -> Result<(u8, Bytes), SideError> {
        loop {
            if let Some(f) = split_frame(&mut self.rbuf) {
                return Ok(f);
            }
            if self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(io_error)?
                == 0
            {
                return Err(SideError::new(
                    Class::RetryLater,
                    "the server closed the connection",
                ));
            }
        }
    }
}

/// Opens the socket, with TLS as `sslmode` asks.
async fn open(conn: &PgConnection) -> Result<Box<dyn Stream>, SideError> {
    if conn.host.starts_with('/') {
        let path = format!("{}/.s.PGSQL.{}", conn.host, conn.port);
        return Ok(Box::new(
            tokio::net::UnixStream::connect(path)
                .await
                .map_err(connect_error)?,
        ));
    }
    let mut tcp = TcpStream::connect((conn.host.as_str(), conn.port))
        .await
        .map_err(connect_error)?;
    tcp.set_nodelay(true).map_err(connect_error)?;
    let mode = conn.sslmode.as_deref().unwrap_or("disable");
    if matches!(mode, "disable" | "allow") {
        return Ok(Box::new(tcp));
    }
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await.map_err(connect_error)?;
    if tcp.read_u8().await.map_err(connect_error)? != b'S' {
        if mode == "prefer" {
            return Ok(Box::new(tcp));
        }
        return Err(SideError::new(
            Class::Fatal,
            "cannot connect: the server does not accept TLS",
        ));
    }
    let mut maker = pg::tls_connector(conn).map_err(SideError::from)?;
    let tls = MakeTlsConnect::<TcpStream>::make_tls_connect(&mut maker, &conn.host)
        .map_err(|e| SideError::new(Class::Fatal, format!("cannot connect: TLS: {e}")))?;
    let stream = tls
        .connect(tcp)
        .await
        .map_err(|e| SideError::new(Class::Fatal, format!("cannot connect: TLS: {e}")))?;
    Ok(Box::new(stream))
}

/// `START_REPLICATION SLOT … LOGICAL 0/0 (…)`: from the slot's confirmed
/// position (the server never streams from before it).
fn start_command(slot: &str, options: &[(&str, String)]) -> String {
    let opts: Vec<String> = options
        .iter()
        .map(|(k, v)| format!("\"{}\" '{}'", k.replace('"', "\"\""), v.replace('\'', "''")))
        .collect();
    format!(
        "START_REPLICATION SLOT \"{}\" LOGICAL 0/0 ({})",
        slot.replace('"', "\"\""),
        opts.join(", ")
    )
}

/// Takes one whole message (tag, length, body) off the front of `buf`.
fn split_frame(buf: &mut BytesMut) -> Option<(u8, Bytes)> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 1 + len {
        buf.reserve(1 + len - buf.len());
        return None;
    }
    let mut frame = buf.split_to(1 + len).freeze();
    let tag = frame.get_u8();
    frame.advance(4);
    Some((tag, frame))
}

/// A `CopyData` message of the stream: `XLogData` or a keepalive.
fn parse_copy_data(mut body: Bytes) -> Result<Event, SideError> {
    let short = || protocol("a replication message is too short");
    match body.first() {
        Some(b'w') if body.len() >= 25 => {
            body.advance(1);
            let lsn = body.get_u64();
            body.advance(16); // the server's end of WAL, its clock
            Ok(Event::Data { lsn, data: body })
        }
        Some(b'k') if body.len() >= 18 => {
            body.advance(1);
            let end = body.get_u64();
            body.advance(8);
            Ok(Event::Keepalive {
                end,
                reply: body.get_u8() == 1,
            })
        }
        Some(b'w' | b'k') => Err(short()),
        other => Err(protocol(&format!("unknown replication message {other:?}"))),
    }
}

/// A standby status update: written, flushed and applied all at `flushed`.
fn status_update(flushed: u64, now: i64) -> Vec<u8> {
    let mut b = Vec::with_capacity(34);
    b.push(b'r');
    for _ in 0..3 {
        b.extend_from_slice(&flushed.to_be_bytes());
    }
    b.extend_from_slice(&now.to_be_bytes());
    b.push(0);
    b
}

/// Microseconds since 2000-01-01, PostgreSQL's clock.
fn pg_now() -> i64 {
    const PG_EPOCH: u64 = 946_684_800;
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    since.as_micros() as i64 - (PG_EPOCH * 1_000_000) as i64
}

/// An `ErrorResponse`: its SQLSTATE (`C`) and message (`M`), classified
/// like every other PostgreSQL error.
fn server_error(body: &[u8], doing: &str) -> SideError {
    let (mut code, mut message) = (String::new(), String::new());
    let mut fields = body.split(|b| *b == 0);
    while let Some(f) = fields.next().filter(|f| !f.is_empty()) {
        let text = String::from_utf8_lossy(&f[1..]).into_owned();
        match f[0] {
            b'C' => code = text,
            b'M' => message = text,
            _ => {}
        }
    }
    let class = if pg::is_transient_code(&code) {
        Class::RetryLater
    } else {
        Class::Fatal
    };
    let mut e = SideError::new(class, format!("{doing}: {message} (SQLSTATE {code})"));
    e.code = Some(code);
    e
}

/// Whether a SASL request's list of mechanisms (NUL-terminated names,
/// ending with an empty one) holds SCRAM-SHA-256.
fn offers_scram(body: &[u8]) -> bool {
    body.split(|&b| b == 0)
        .take_while(|m| !m.is_empty())
        .any(|m| m == SCRAM_SHA_256.as_bytes())
}

fn io_error(e: io::Error) -> SideError {
    SideError::new(Class::RetryLater, format!("replication connection: {e}"))
}

fn connect_error(e: io::Error) -> SideError {
    SideError::new(Class::RetryLater, format!("cannot connect: {e}"))
}

fn auth_error(e: io::Error) -> SideError {
    SideError::new(
        Class::Fatal,
        format!("cannot connect: SCRAM authentication: {e}"),
    )
}

fn protocol(what: &str) -> SideError {
    SideError::new(Class::RetryLater, format!("replication protocol: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut f = vec![tag];
        f.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn sasl_is_used_only_when_scram_is_offered() {
        assert!(offers_scram(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"));
        assert!(!offers_scram(b"SCRAM-SHA-256-PLUS\0\0"));
        assert!(!offers_scram(b"\0SCRAM-SHA-256\0"));
        assert!(!offers_scram(b""));
    }

    #[test]
    fn frames_are_taken_whole_whatever_the_reads_cut() {
        let mut all = frame(b'd', b"abc");
        all.extend(frame(b'Z', b"I"));
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in all {
            buf.extend_from_slice(&[byte]);
            while let Some(f) = split_frame(&mut buf) {
                got.push(f);
            }
        }
        assert_eq!(
            got,
            [
                (b'd', Bytes::from_static(b"abc")),
                (b'Z', Bytes::from_static(b"I"))
            ]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn xlogdata_and_keepalives_are_read() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&0x1_0000_0010u64.to_be_bytes());
        w.extend_from_slice(&[9; 16]);
        w.extend_from_slice(b"{\"action\":\"B\"}");
        assert_eq!(
            parse_copy_data(Bytes::from(w)).unwrap(),
            Event::Data {
                lsn: 0x1_0000_0010,
                data: Bytes::from_static(b"{\"action\":\"B\"}")
            }
        );
        let mut k = vec![b'k'];
        k.extend_from_slice(&77u64.to_be_bytes());
        k.extend_from_slice(&[0; 8]);
        k.push(1);
        assert_eq!(
            parse_copy_data(Bytes::from(k)).unwrap(),
            Event::Keepalive {
                end: 77,
                reply: true
            }
        );
        assert!(parse_copy_data(Bytes::from_static(b"k123")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"x")).is_err());
    }

    #[test]
    fn a_status_update_reports_the_flushed_position_thrice() {
        let b = status_update(0xAB, 5);
        assert_eq!(b.len(), 34);
        assert_eq!(b[0], b'r');
        for i in 0..3 {
            assert_eq!(&b[1 + 8 * i..9 + 8 * i], &0xABu64.to_be_bytes());
        }
        assert_eq!(&b[25..33], &5i64.to_be_bytes());
        assert_eq!(b[33], 0);
    }

    #[test]
    fn the_start_command_quotes_names_and_values() {
        let cmd = start_command("s\"1", &[("add-tables", "public.it's".into())]);
        assert_eq!(
            cmd,
            "START_REPLICATION SLOT \"s\"\"1\" LOGICAL 0/0 (\"add-tables\" 'public.it''s')"
        );
    }

    #[test]
    fn server_errors_keep_their_code_and_class() {
        let body = b"SERROR\0C55006\0Mreplication slot \"s\" is active for PID 7\0\0";
        let e = server_error(body, "starting");
        assert_eq!(e.class, Class::RetryLater);
        assert_eq!(e.code.as_deref(), Some("55006"));
        assert!(e.message.contains("is active for PID 7"), "{}", e.message);
        let e = server_error(
            b"C42704\0Mreplication slot \"x\" does not exist\0\0",
            "starting",
        );
        assert_eq!(e.class, Class::Fatal);
    }
}
