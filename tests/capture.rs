//! End-to-end, the capturer's limits: a huge source transaction syncs with
//! the capturer in bounded memory; only the columns the maps read leave
//! the source database; a record too large for Kafka is recorded with its
//! key and position and `ctl retry-errors` brings it back once it fits.

mod support;

use std::time::{Duration, Instant};

use support::{eventually, text, TestEnv, APPLY_DV, CAPTURE_FNO, PAUSE_BUFFER};

const WAIT: Duration = Duration::from_secs(90);

/// Rows of the huge transactions: `DUALWRITE_HUGE_TXN_ROWS` (1,000,000
/// for the full measurement: `scripts/soak.sh huge`), 20,000 by default,
/// enough for a capturer that holds a transaction whole to pass the bound
/// several times over (it needed 7.5 KiB a row) and quick for CI.
fn huge_rows() -> u64 {
    std::env::var("DUALWRITE_HUGE_TXN_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// The capturer's peak resident set size, whatever the size of a
/// transaction (README, "Guarantees and how").
const CAPTURE_PEAK_RSS_MIB: u64 = 64;

/// The pause buffer's peak resident set size over the same transaction (a
/// million records in flight at once): its resolver keeps at most its
/// cache of states in memory and the rest in a spill file (README,
/// "Limits"); the memory goal of every service (BENCHMARKS.md).
const PAUSE_BUFFER_PEAK_RSS_MIB: u64 = 256;

/// Waits until `sql` (a count) gives `n`, polling once a second (the count
/// reads up to a million rows).
async fn wait_count(c: &tokio_postgres::Client, what: &str, sql: &str, n: u64, timeout: Duration) {
    let mut last: Option<Instant> = None;
    eventually(what, timeout, || {
        let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if due {
            last = Some(Instant::now());
        }
        async move {
            if !due {
                return false;
            }
            let got: i64 = c.query_one(sql, &[]).await.unwrap().get(0);
            got as u64 == n
        }
    })
    .await;
}

/// One transaction inserting `n` customers, then one updating all of them
/// (`REPLICA IDENTITY FULL`: old and new rows), both synced, with the
/// capturer's peak RSS under [`CAPTURE_PEAK_RSS_MIB`] and the pause
/// buffer's under [`PAUSE_BUFFER_PEAK_RSS_MIB`] throughout. Before
/// the capturer streamed transactions it held each whole (wal2json rows,
/// decoded records and Avro bytes at once): 100,000 rows took it past
/// that bound, a few hundred thousand past a Kubernetes memory limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_transaction_syncs_with_the_capturer_in_bounded_memory() {
    let n = huge_rows();
    let mut env = TestEnv::new("hugetxn").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let fno = env.fno().await;
    let dv = env.dv().await;
    let wait = WAIT + Duration::from_millis(n * 10);
    let t0 = Instant::now();
    fno.batch_execute(&format!(
        "INSERT INTO customers_v3 (customeraccount, organizationname)
           SELECT 'H' || lpad(i::text, 7, '0'), repeat('n', 190) || i FROM generate_series(1, {n}) i"
    ))
    .await
    .unwrap();
    wait_count(
        &dv,
        "the inserted rows reach the right side",
        "SELECT count(*) FROM accounts WHERE accountnumber >= 'H' AND accountnumber < 'I'",
        n,
        wait,
    )
    .await;
    let inserted = t0.elapsed();
    fno.batch_execute(
        "UPDATE customers_v3 SET organizationname = repeat('u', 190) || customeraccount
          WHERE customeraccount >= 'H' AND customeraccount < 'I'",
    )
    .await
    .unwrap();
    wait_count(
        &dv,
        "the updated rows reach the right side",
        "SELECT count(*) FROM accounts WHERE accountnumber >= 'H' AND accountnumber < 'I' AND name LIKE 'uuu%'",
        n,
        wait,
    )
    .await;
    let updated = t0.elapsed() - inserted;
    let peak = env
        .service(CAPTURE_FNO)
        .peak_rss()
        .expect("the capturer runs");
    // Every service's peak, for the record (BENCHMARKS.md, memory goal).
    let peaks: Vec<String> = (CAPTURE_FNO..=APPLY_DV)
        .map(|i| {
            let s = env.service(i);
            let mib = s.peak_rss().map_or(f64::NAN, |b| b as f64 / 1048576.0);
            format!("{}={mib:.1}", s.name)
        })
        .collect();
    println!(
        "huge-transaction rows={n} insert_synced_secs={:.1} update_synced_secs={:.1} capture_peak_rss_mib={:.1} peak_rss_mib: {}",
        inserted.as_secs_f64(),
        updated.as_secs_f64(),
        peak as f64 / 1048576.0,
        peaks.join(" ")
    );
    assert!(
        peak <= CAPTURE_PEAK_RSS_MIB << 20,
        "the capturer's peak RSS was {} MiB over a {n}-row transaction, above the {CAPTURE_PEAK_RSS_MIB} MiB bound",
        peak >> 20
    );
    let held = env
        .service(PAUSE_BUFFER)
        .peak_rss()
        .expect("the pause buffer runs");
    assert!(
        held <= PAUSE_BUFFER_PEAK_RSS_MIB << 20,
        "the pause buffer's peak RSS was {} MiB over a {n}-row transaction, above the {PAUSE_BUFFER_PEAK_RSS_MIB} MiB bound",
        held >> 20
    );
    env.cleanup().await;
}

/// `n` bytes of text that does not compress (stored out of line, TOASTed).
fn random_text(n: usize) -> String {
    format!("(SELECT left(string_agg(md5(i::text || random()::text), ''), {n}) FROM generate_series(1, {n} / 32 + 1) i)")
}

/// The bytes a JSON value (a record as `ctl tail` prints it) carries,
/// nested byte arrays (the errors' original records) included.
fn contains(v: &serde_json::Value, needle: &str) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains(needle),
        serde_json::Value::Array(a) if !a.is_empty() && a.iter().all(|x| x.is_u64()) => {
            let bytes: Vec<u8> = a.iter().map(|x| x.as_u64().unwrap_or(0) as u8).collect();
            String::from_utf8_lossy(&bytes).contains(needle)
        }
        serde_json::Value::Array(a) => a.iter().any(|x| contains(x, needle)),
        serde_json::Value::Object(o) => o
            .iter()
            .any(|(k, x)| k.contains(needle) || contains(x, needle)),
        _ => false,
    }
}

/// A column no map reads (here a national id) never reaches Kafka: not on
/// the capture topic, not in the original record an error carries; and a
/// row whose unmapped column is large updates like any other (before, the
/// old and new rows carried it twice: a 600 KB document made the update
/// `record_too_large`, and the update was lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_columns_maps_read_leave_the_source() {
    let mut env = TestEnv::new("columns").await;
    let fno = env.fno().await;
    let dv = env.dv().await;
    fno.batch_execute(
        "ALTER TABLE customers_v3 ADD COLUMN nationalid text, ADD COLUMN document text",
    )
    .await
    .unwrap();
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    fno.batch_execute(&format!(
        "INSERT INTO customers_v3 (customeraccount, organizationname, nationalid, document)
           VALUES ('S1', 'Secretive 1', 'NID-123-45-6789', {doc});
         UPDATE customers_v3 SET organizationname = 'Secretive 2', nationalid = 'NID-987-65-4321',
                document = {doc} WHERE customeraccount = 'S1';",
        doc = random_text(600_000)
    ))
    .await
    .unwrap();
    eventually(
        "the update of the row with a large document syncs",
        WAIT,
        || async {
            text(&dv, "SELECT name FROM accounts WHERE accountnumber = 'S1'")
                .await
                .as_deref()
                == Some("Secretive 2")
        },
    )
    .await;
    // A mapping error (a mapped column dropped) keeps the original record.
    fno.batch_execute(
        "ALTER TABLE customers_v3 DROP COLUMN primaryemail;
         UPDATE customers_v3 SET organizationname = 'Secretive 3' WHERE customeraccount = 'S1';",
    )
    .await
    .unwrap();
    let errors = env
        .tail_until("errors", "the mapping error is recorded", WAIT, |r| {
            r.iter().any(|e| e["value"]["error_class"] == "mapping")
        })
        .await;
    let captured = env.tail("capture:fno");
    let s1: Vec<&serde_json::Value> = captured
        .iter()
        .filter(|r| r["key"] == r#"["public.customers_v3","S1"]"#)
        .collect();
    assert_eq!(s1.len(), 3, "{s1:?}");
    for (what, records) in [
        ("capture", captured.iter().collect::<Vec<_>>()),
        ("errors", errors.iter().collect()),
    ] {
        for r in records {
            for unread in ["NID-", "nationalid", "document", "modifieddatetime"] {
                assert!(
                    !contains(r, unread),
                    "`{unread}` is on the {what} topic: {r}"
                );
            }
        }
    }
    // The update carries the new row and, of the old, only what mapping needs.
    let update = &s1[1]["value"];
    assert_eq!(update["op"], "UPDATE");
    let names = |image: &str| -> Vec<String> {
        update[image]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names("before"), ["customeraccount"], "{update}");
    assert!(
        names("after").contains(&"organizationname".to_owned()),
        "{update}"
    );
    env.cleanup().await;
}

/// A record larger than `kafka.max_record_bytes` is recorded with its key
/// and source position; `ctl retry-errors` touches the row on its side (a
/// no-op update, captured as a real write at a real position): while the
/// row is still too large it is recorded again, and once the limit is
/// raised it syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_large_record_comes_back_through_retry_errors() {
    let mut env = TestEnv::new("toolarge").await;
    let limit = |env: &TestEnv, bytes: u32| {
        let text = std::fs::read_to_string(&env.config).unwrap();
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with("max_record_bytes"))
            .map(str::to_owned)
            .collect();
        let at = lines.iter().position(|l| l == "[kafka]").unwrap();
        lines.insert(at + 1, format!("max_record_bytes = {bytes}"));
        std::fs::write(&env.config, lines.join("\n")).unwrap();
    };
    limit(&env, 100_000);
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let fno = env.fno().await;
    let dv = env.dv().await;
    fno.batch_execute(&format!(
        "INSERT INTO customers_v3 (customeraccount, organizationname) VALUES ('B1', {});
         INSERT INTO customers_v3 (customeraccount, organizationname) VALUES ('B2', 'After the large row');",
        random_text(150_000)
    ))
    .await
    .unwrap();
    eventually("the row after the large one syncs", WAIT, || async {
        text(&dv, "SELECT name FROM accounts WHERE accountnumber = 'B2'")
            .await
            .is_some()
    })
    .await;
    let too_large = |records: &[serde_json::Value]| -> Vec<serde_json::Value> {
        records
            .iter()
            .map(|r| r["value"].clone())
            .filter(|e| e["error_class"] == "record_too_large")
            .collect()
    };
    let errors = env
        .tail_until("errors", "the large row is recorded", WAIT, |r| {
            !too_large(r).is_empty()
        })
        .await;
    let e = &too_large(&errors)[0];
    assert_eq!(e["service"], "capture", "{e}");
    assert_eq!(e["source_side"], "fno", "{e}");
    assert_eq!(e["key"], r#"["public.customers_v3","B1"]"#, "{e}");
    assert!(e["source_lsn"].as_i64().is_some_and(|l| l > 0), "{e}");
    let first_lsn = e["source_lsn"].as_i64().unwrap();

    // Still too large: the touch is captured and recorded again, later in the WAL.
    let out = env.ctl(&["retry-errors", "--class", "record_too_large"]);
    assert!(out.contains("touched 1 row"), "{out}");
    let errors = env
        .tail_until("errors", "the touched row is recorded again", WAIT, |r| {
            too_large(r).len() >= 2
        })
        .await;
    let again = &too_large(&errors)[1];
    assert_eq!(again["key"], r#"["public.customers_v3","B1"]"#, "{again}");
    assert!(again["source_lsn"].as_i64().unwrap() > first_lsn, "{again}");
    assert!(
        text(&dv, "SELECT name FROM accounts WHERE accountnumber = 'B1'")
            .await
            .is_none()
    );

    // The limit raised (and the services restarted, as after any edit): it syncs.
    for i in 0..6 {
        env.service(i).stop();
    }
    limit(&env, 900_000);
    for i in 0..6 {
        env.service(i).restart();
    }
    let out = env.ctl(&["retry-errors", "--class", "record_too_large"]);
    assert!(
        out.contains("touched 1 row"),
        "one touch per row, however many errors: {out}"
    );
    eventually("the large row syncs after the retry", WAIT, || async {
        text(
            &dv,
            "SELECT length(name)::text FROM accounts WHERE accountnumber = 'B1'",
        )
        .await
        .as_deref()
            == Some("150000")
    })
    .await;
    env.cleanup().await;
}
