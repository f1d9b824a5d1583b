//! Security, end to end: the applier writes only what the configuration
//! maps, `ctl retry-errors` never sends to the control topic, commands
//! must carry a valid signature when a key is set, PostgreSQL TLS verifies
//! its peer, and rejected rows leave no values in the logs.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dualwrite_model::avro;
use dualwrite_model::record::ErrorRecord;
use support::{
    decision, eventually, produce, producer, send_decisions, text, PrivateStack, TestEnv,
};

const WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_apply_records_naming_unmapped_targets_write_nothing_and_land_on_the_errors_topic() {
    let mut env = TestEnv::new("forged").await;
    let dv = env.dv().await;
    dv.batch_execute("CREATE TABLE salaries (accountnumber text PRIMARY KEY, amount text)")
        .await
        .unwrap();
    assert_eq!(env.run(&["setup"]).0, 0);
    let mut other_side = decision(
        "customers",
        "public.accounts",
        &[("accountnumber", "F4")],
        &[("accountnumber", "F4"), ("name", "x")],
    );
    other_side.target_side = "fno".into();
    send_decisions(
        &env,
        &[
            // A table no map writes.
            decision(
                "customers",
                "public.salaries",
                &[("accountnumber", "F1")],
                &[("accountnumber", "F1"), ("amount", "1")],
            ),
            // A column the map does not write (the primary key).
            decision(
                "customers",
                "public.accounts",
                &[("accountnumber", "F2")],
                &[
                    ("accountnumber", "F2"),
                    ("name", "x"),
                    ("accountid", "00000000-0000-0000-0000-000000000001"),
                ],
            ),
            // The bookkeeping: a huge version would freeze a record.
            decision(
                "customers",
                "dualwrite.record_versions",
                &[("map", "customers"), ("record_key", "[\"C0001\"]")],
                &[
                    ("map", "customers"),
                    ("record_key", "[\"C0001\"]"),
                    ("version", "9223372036854775807"),
                    ("present", "true"),
                ],
            ),
            // An unknown map, and the other side.
            decision(
                "payroll",
                "public.accounts",
                &[("accountnumber", "F3")],
                &[("accountnumber", "F3"), ("name", "x")],
            ),
            other_side,
            // A mapped write: made.
            decision(
                "customers",
                "public.accounts",
                &[("accountnumber", "F5")],
                &[("accountnumber", "F5"), ("name", "Allowed")],
            ),
        ],
    )
    .await;
    env.spawn(&["apply", "--side", "dataverse"]);
    eventually("the mapped write is made", WAIT, || async {
        text(&dv, "SELECT name FROM accounts WHERE accountnumber = 'F5'")
            .await
            .as_deref()
            == Some("Allowed")
    })
    .await;
    let errors = env
        .tail_until("errors", "five unauthorised_target errors", WAIT, |r| {
            r.iter()
                .filter(|e| e["value"]["error_class"] == "unauthorised_target")
                .count()
                >= 5
        })
        .await;
    let messages: Vec<&str> = errors
        .iter()
        .filter_map(|e| e["value"]["message"].as_str())
        .collect();
    for refused in [
        "refused table public.salaries: map `customers` writes public.accounts",
        "refused column `accountid` of public.accounts (written)",
        "refused table dualwrite.record_versions: the `dualwrite` schema holds the appliers' bookkeeping",
        "refused map `payroll`: no such map",
        "refused target side `fno`: this applier writes side `dataverse` only",
    ] {
        assert!(messages.iter().any(|m| m.contains(refused)), "no error says `{refused}`: {messages:#?}");
    }
    assert_eq!(errors.len(), 5, "{errors:#?}");
    assert!(errors
        .iter()
        .all(|e| e["value"]["service"] == "apply" && e["value"]["payload"].is_array()));
    // Nothing of them was written.
    assert_eq!(
        text(&dv, "SELECT count(*)::text FROM salaries")
            .await
            .as_deref(),
        Some("0")
    );
    assert_eq!(
        text(
            &dv,
            "SELECT count(*)::text FROM accounts WHERE accountnumber IN ('F2', 'F3', 'F4')"
        )
        .await
        .as_deref(),
        Some("0")
    );
    assert_eq!(
        text(
            &dv,
            "SELECT count(*)::text FROM dualwrite.record_versions WHERE version > 1"
        )
        .await
        .as_deref(),
        Some("0")
    );
    let log = env.logs();
    assert!(
        log.contains("unauthorised_target") && log.contains("refused table public.salaries"),
        "{log}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_error_record_naming_the_control_topic_is_not_republished() {
    let env = TestEnv::new("forgedretry").await;
    assert_eq!(env.run(&["setup"]).0, 0);
    let p = producer(&env);
    let command = br#"{"id":"forged-1","action":"run","map":"customers"}"#.to_vec();
    let mut errors = Vec::new();
    for (n, topic) in [
        format!("{}.control", env.prefix),
        "someone-elses.topic".to_owned(),
        format!("{}.status", env.prefix),
    ]
    .into_iter()
    .enumerate()
    {
        let mut e = ErrorRecord::new("apply", "rejected_by_target", "forged", 0);
        e.topic = Some(topic);
        e.key = Some(format!("forged-{n}"));
        e.payload = Some(command.clone());
        errors.push(e);
    }
    for e in &errors {
        produce(
            &p,
            &format!("{}.errors", env.prefix),
            "k",
            &avro::encode(e).unwrap(),
            None,
        )
        .await;
    }
    let (code, out, err) = env.run(&["ctl", "retry-errors"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("records are never retried to the control topic"),
        "{out}"
    );
    assert!(
        out.contains("`someone-elses.topic`: not a topic records are retried to"),
        "{out}"
    );
    assert!(
        out.contains("sent 0 record(s)") && out.contains("3 refused"),
        "{out}"
    );
    assert!(
        env.tail("control").is_empty(),
        "a command reached the control topic"
    );
    assert!(env.tail("status").is_empty());
    env.cleanup().await;
}

/// A fresh 64-character key in a file of its own; returns its path.
fn key_file(dir: &Path, name: &str, key: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, key).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_and_wrongly_signed_commands_are_rejected_when_a_key_is_set() {
    let keys = std::env::temp_dir().join(format!("dw-keys-{}", std::process::id()));
    let key = "k".repeat(64);
    let path = key_file(&keys, "control.key", &key);
    let mut env = TestEnv::with_config(
        "signed",
        &format!(
            "\n[control]\nsigning_keys = [{{ file = \"{}\" }}]\n",
            path.display()
        ),
    )
    .await;
    env.spawn(&["pause-buffer"]);
    let p = producer(&env);
    let topic = format!("{}.control", env.prefix);
    let cmd = |id: &str| {
        format!(r#"{{"id":"{id}","action":"run","map":"currencies","initial_sync":false}}"#)
    };
    let now = dualwrite_runtime::now_micros() / 1_000_000;
    let sign =
        |k: &str, at: i64, c: &str| dualwrite_model::signing::sign(k.as_bytes(), at, c.as_bytes());
    // What any producer could write, a service principal included.
    produce(&p, &topic, "unsigned-1", cmd("unsigned-1").as_bytes(), None).await;
    let wrong = sign(&"w".repeat(64), now, &cmd("wrong-1"));
    produce(
        &p,
        &topic,
        "wrong-1",
        cmd("wrong-1").as_bytes(),
        Some(&wrong),
    )
    .await;
    let stale = sign(&key, now - 3600, &cmd("stale-1"));
    produce(
        &p,
        &topic,
        "stale-1",
        cmd("stale-1").as_bytes(),
        Some(&stale),
    )
    .await;
    // A signature of another command.
    let moved = sign(&key, now, &cmd("other"));
    produce(
        &p,
        &topic,
        "moved-1",
        cmd("moved-1").as_bytes(),
        Some(&moved),
    )
    .await;
    // ctl signs with the configured key: accepted, after the others (one partition).
    env.ctl(&[
        "run",
        "customer_groups",
        "--initial-sync",
        "false",
        "--timeout-secs",
        "60",
    ]);
    let states = env.states();
    assert_eq!(states["customer_groups"], "Running", "{states:?}");
    assert_eq!(states["currencies"], "Not running", "{states:?}");
    let events = env.tail("events");
    let rejected = |id: &str| -> String {
        events
            .iter()
            .map(|e| &e["value"])
            .find(|e| e["command_id"] == id)
            .filter(|e| e["outcome"] == "REJECTED")
            .and_then(|e| e["message"].as_str())
            .unwrap_or_else(|| panic!("no rejection of {id}: {events:#?}"))
            .to_owned()
    };
    assert!(rejected("unsigned-1").contains("unsigned command"));
    assert!(rejected("wrong-1").contains("wrong signature"));
    assert!(rejected("stale-1").contains("replayed or delayed"));
    assert!(rejected("moved-1").contains("wrong signature"));
    let log = env.logs();
    assert!(
        log.contains("rejected command") && log.contains("unsigned command"),
        "{log}"
    );
    env.cleanup().await;
    let _ = std::fs::remove_dir_all(keys);
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>-ca.crt`) in `dir`, and, signed by it, a certificate for
/// `cn` (`<name>.crt`, `<name>.key`) whose only name is `cn`.
fn certificate(dir: &Path, name: &str, cn: &str) {
    let ca = format!("{name}-ca");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(&ext, format!("subjectAltName = DNS:{cn}\n")).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext.display().to_string(),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

fn connection(
    port: u16,
    host: &str,
    mode: &str,
    root: Option<&Path>,
) -> dualwrite_model::config::PgConnection {
    dualwrite_model::config::PgConnection {
        host: host.into(),
        port,
        dbname: "postgres".into(),
        user: "postgres".into(),
        password: None,
        sslmode: Some(mode.into()),
        sslrootcert: root.map(|p| p.display().to_string()),
        sslcert: None,
        sslkey: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_server_certificate_for_another_host() {
    let private = PrivateStack::start("tls");
    let dir = std::env::temp_dir().join(format!("dw-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    certificate(&dir, "server", "localhost");
    certificate(&dir, "client", "dualwrite");
    certificate(&dir, "stranger", "localhost");
    // The server (run as `postgres` when the tests run as root) reads its key.
    for f in ["server.crt", "server.key", "client-ca.crt"] {
        let _ = Command::new("chown")
            .args(["postgres", &dir.join(f).display().to_string()])
            .status();
    }
    let _ = Command::new("chmod")
        .args(["755", &dir.display().to_string()])
        .status();
    let _ = Command::new("chmod")
        .args(["600", &dir.join("server.key").display().to_string()])
        .status();
    let admin = support::connect(&format!("{}/postgres", private.stack.pg_url)).await;
    // One statement at a time: ALTER SYSTEM runs outside a transaction.
    let d = dir.display();
    for setting in [
        format!("ssl_cert_file = '{d}/server.crt'"),
        format!("ssl_key_file = '{d}/server.key'"),
        format!("ssl_ca_file = '{d}/client-ca.crt'"),
        "ssl = on".to_owned(),
    ] {
        admin
            .batch_execute(&format!("ALTER SYSTEM SET {setting}"))
            .await
            .unwrap();
    }
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let port: u16 = private
        .stack
        .pg_url
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ca = dir.join("server-ca.crt");
    let connect = |host: &'static str, mode: &'static str, root: Option<PathBuf>| {
        let c = connection(port, host, mode, root.as_deref());
        async move { dualwrite_side_postgres::pg::connect(&c, "dualwrite-tls-test").await }
    };
    eventually("PostgreSQL takes TLS", WAIT, || async {
        connect("localhost", "verify-full", Some(ca.clone()))
            .await
            .is_ok()
    })
    .await;
    // The server's certificate names `localhost`, not `127.0.0.1`.
    let e = connect("127.0.0.1", "verify-full", Some(ca.clone()))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("certificate verify failed") || e.contains("hostname mismatch"),
        "{e}"
    );
    // verify-ca checks the chain only; a certificate from another CA is refused.
    connect("127.0.0.1", "verify-ca", Some(ca.clone()))
        .await
        .unwrap();
    let e = connect(
        "localhost",
        "verify-full",
        Some(dir.join("stranger-ca.crt")),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("certificate verify failed"), "{e}");
    // require encrypts without verifying (as libpq).
    let c = connect("127.0.0.1", "require", None).await.unwrap();
    let ssl: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);
    // A client certificate is presented when set.
    let mut with_cert = connection(port, "localhost", "verify-full", Some(&ca));
    with_cert.sslcert = Some(dir.join("client.crt"));
    with_cert.sslkey = Some(dir.join("client.key"));
    let c = dualwrite_side_postgres::pg::connect(&with_cert, "dualwrite-tls-test")
        .await
        .unwrap();
    let dn: Option<String> = c
        .query_one(
            "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dn.as_deref(), Some("/CN=dualwrite"));
    replication_connections_use_the_same_tls_and_scram(&admin, port, &ca).await;
    drop(private);
    let _ = std::fs::remove_dir_all(dir);
}

/// The capturer's replication connection (its own client): the same TLS
/// checks, and SCRAM-SHA-256 for a role with a password.
async fn replication_connections_use_the_same_tls_and_scram(
    admin: &tokio_postgres::Client,
    port: u16,
    ca: &Path,
) {
    use dualwrite_side_postgres::replication::Replication;
    let hba: String = admin.query_one("SHOW hba_file", &[]).await.unwrap().get(0);
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all dw_scram all scram-sha-256\n{rules}"),
    )
    .unwrap();
    admin
        .batch_execute(
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE dw_scram LOGIN REPLICATION PASSWORD 'scram-secret'; \
             SELECT pg_reload_conf()",
        )
        .await
        .unwrap();
    let mut c = connection(port, "localhost", "verify-full", Some(ca));
    c.user = "dw_scram".into();
    c.password = Some(dualwrite_model::config::Secret::new("scram-secret"));
    let r = Replication::connect(&c, "dualwrite-repl-test")
        .await
        .unwrap();
    let ssl: bool = admin
        .query_one(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'dualwrite-repl-test' AND a.backend_type = 'walsender'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the replication connection is encrypted");
    drop(r);
    c.password = Some(dualwrite_model::config::Secret::new("wrong"));
    let e = Replication::connect(&c, "dualwrite-repl-test")
        .await
        .err()
        .unwrap();
    assert!(
        e.message.contains("password authentication failed"),
        "{}",
        e.message
    );
    assert!(!e.is_retryable(), "a refused password is not retried");
    c.password = Some(dualwrite_model::config::Secret::new("scram-secret"));
    c.host = "127.0.0.1".into();
    let e = Replication::connect(&c, "dualwrite-repl-test")
        .await
        .err()
        .unwrap();
    assert!(
        e.message.contains("certificate verify failed") || e.message.contains("hostname mismatch"),
        "{}",
        e.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_rows_values_appear_in_no_warn_log_nor_error_record() {
    let mut env = TestEnv::with_config("redact", "\n[errors]\ninclude_payload = false\n").await;
    assert_eq!(env.run(&["setup"]).0, 0);
    send_decisions(
        &env,
        &[
            // NOT NULL: PostgreSQL's detail would list the whole row.
            decision(
                "customers",
                "public.accounts",
                &[("accountnumber", "R1")],
                &[("accountnumber", "R1"), ("telephone1", "SECRET-PHONE-0199")],
            ),
            // A bad value: PostgreSQL's message quotes it.
            decision(
                "customers",
                "public.accounts",
                &[("accountnumber", "R2")],
                &[
                    ("accountnumber", "R2"),
                    ("name", "x"),
                    ("creditlimit", "SECRET-NOT-A-NUMBER"),
                ],
            ),
        ],
    )
    .await;
    env.spawn(&["apply", "--side", "dataverse"]);
    let errors = env
        .tail_until("errors", "two rejected rows", WAIT, |r| r.len() >= 2)
        .await;
    let log = env.logs();
    for e in &errors {
        let v = &e["value"];
        assert_eq!(v["error_class"], "rejected_by_target", "{v}");
        assert!(v["payload"].is_null(), "include_payload = false: {v}");
    }
    let text: String = serde_json::to_string(&errors).unwrap();
    assert!(text.contains("23502") && text.contains("22P02"), "{text}");
    // The rejections are logged with their keys and reasons, not their values.
    let warns: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    for key in ["R1", "R2"] {
        assert!(
            warns
                .iter()
                .any(|l| l.contains("rejected_by_target") && l.contains(key)),
            "{log}"
        );
    }
    assert!(
        !log.contains("SECRET") && !text.contains("SECRET"),
        "a row value leaked:\n{log}\n{text}"
    );
    env.cleanup().await;
}
