//! End-to-end: the services as separate processes against the real broker
//! and PostgreSQL, with fresh databases and topics per test.

mod support;

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use support::{eventually, stack, text, TestEnv};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_sync_both_ways_without_echo() {
    let mut env = TestEnv::new("sync").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let fno = env.fno().await;
    let dv = env.dv().await;

    // Insert on the left: an account appears on the right, mapped field by field.
    fno.batch_execute(
        "INSERT INTO customers_v3 (customeraccount, organizationname, customergroupid, salescurrencycode, creditlimit, primaryphone, onhold)
         VALUES ('C9001', 'Fabrikam ''Nordic'' A/S', 'G01', 'EUR', 25000.50, '+45 1', true)",
    )
    .await
    .unwrap();
    let q = "SELECT concat_ws('|', name, msdyn_customergroupid, transactioncurrencycode, creditlimit::text, telephone1, creditonhold::text)
             FROM accounts WHERE accountnumber = 'C9001'";
    eventually("insert reaches the right side", WAIT, || async {
        text(&dv, q).await.as_deref() == Some("Fabrikam 'Nordic' A/S|G01|EUR|25000.50|+45 1|true")
    })
    .await;

    // Updates, and a multi-row transaction.
    fno.batch_execute(
        "BEGIN;
         UPDATE customers_v3 SET organizationname = 'Fabrikam Renamed' WHERE customeraccount = 'C9001';
         INSERT INTO customers_v3 (customeraccount, organizationname, customergroupid, salescurrencycode)
           SELECT 'C8' || lpad(i::text, 3, '0'), 'Bulk ' || i, 'G02', 'USD' FROM generate_series(1, 50) i;
         COMMIT;",
    )
    .await
    .unwrap();
    eventually(
        "update and bulk insert reach the right side",
        WAIT,
        || async {
            let n = dv
                .query_one(
                    "SELECT count(*) FROM accounts WHERE accountnumber LIKE 'C8%'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0);
            n == 50
                && text(
                    &dv,
                    "SELECT name FROM accounts WHERE accountnumber = 'C9001'",
                )
                .await
                .as_deref()
                    == Some("Fabrikam Renamed")
        },
    )
    .await;

    // Right to left. creditlimit syncs left-to-right only: its change on the
    // right must not reach the left, while the phone in the same update does.
    dv.batch_execute(
        "UPDATE accounts SET telephone1 = '+45 777', creditlimit = 1 WHERE accountnumber = 'C0002'",
    )
    .await
    .unwrap();
    eventually("right-side update reaches the left side", WAIT, || async {
        text(
            &fno,
            "SELECT primaryphone FROM customers_v3 WHERE customeraccount = 'C0002'",
        )
        .await
        .as_deref()
            == Some("+45 777")
    })
    .await;
    assert_eq!(
        text(
            &fno,
            "SELECT creditlimit::text FROM customers_v3 WHERE customeraccount = 'C0002'"
        )
        .await
        .as_deref(),
        Some("2000.00"),
        "a left_to_right field was synced right to left"
    );

    // Delete on the left (contacts of the customer cascade on both sides).
    fno.batch_execute("DELETE FROM customers_v3 WHERE customeraccount = 'C0003'")
        .await
        .unwrap();
    eventually("delete reaches the right side", WAIT, || async {
        dv.query_opt("SELECT 1 FROM accounts WHERE accountnumber = 'C0003'", &[])
            .await
            .unwrap()
            .is_none()
            && dv
                .query_opt(
                    "SELECT 1 FROM contacts WHERE msdyn_contactpersonid = 'P0003'",
                    &[],
                )
                .await
                .unwrap()
                .is_none()
    })
    .await;

    // A last change on the right, after every applier write above: once it
    // reached the left, anything the right-side capturer took from the
    // appliers would be on its topic before it.
    dv.batch_execute(
        "UPDATE accounts SET emailaddress1 = 'marker@example.com' WHERE accountnumber = 'C0004'",
    )
    .await
    .unwrap();
    eventually("marker reaches the left side", WAIT, || async {
        text(
            &fno,
            "SELECT primaryemail FROM customers_v3 WHERE customeraccount = 'C0004'",
        )
        .await
        .as_deref()
            == Some("marker@example.com")
    })
    .await;
    let captured = env.tail("capture:dataverse");
    // The appliers' writes come back only as reports of what they wrote,
    // never as changes of the side.
    let (reports, captured): (Vec<_>, Vec<_>) = captured
        .into_iter()
        .partition(|r| r["value"]["op"] == "APPLIED");
    assert!(
        !reports.is_empty()
            && reports
                .iter()
                .all(|r| r["value"]["after"].is_null() && r["value"]["applied"].is_object()),
        "the applier's writes on the right are reported, without their rows: {reports:?}"
    );
    let mut keys: Vec<String> = captured
        .iter()
        .map(|r| {
            let after = r["value"]["after"]
                .as_array()
                .expect("update has new values");
            after.iter().find(|f| f["name"] == "accountnumber").unwrap()["value"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        ["C0002", "C0004"],
        "the right side's topic holds only changes made on the right: applied writes echoed"
    );

    // Nothing failed on the way.
    assert!(
        env.tail("errors").is_empty(),
        "unexpected error records:\n{}",
        env.logs()
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capturer_killed_with_sigkill_loses_no_change() {
    let mut env = TestEnv::new("kill").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let capture = support::CAPTURE_FNO;
    let fno = env.fno().await;
    let dv = env.dv().await;

    const N: i32 = 300;
    let writer = {
        let fno = env.fno().await;
        tokio::spawn(async move {
            for i in 0..N {
                // One transaction per row: an insert and an update of it.
                fno.batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO customers_v3 (customeraccount, organizationname) VALUES ('K{i:04}', 'k{i}');
                     UPDATE customers_v3 SET primaryphone = 'p{i}' WHERE customeraccount = 'K{i:04}';
                     COMMIT;"
                ))
                .await
                .unwrap();
            }
        })
    };
    // Kill the capturer mid-stream three times, at different points.
    for at in [40i64, 130, 220] {
        eventually("writer progress", WAIT, || async {
            fno.query_one(
                "SELECT count(*) FROM customers_v3 WHERE customeraccount LIKE 'K%'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
                >= at
        })
        .await;
        env.service(capture).kill9();
        env.service(capture).restart();
    }
    writer.await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(90), async {
        eventually("every change reaches the right side", Duration::from_secs(90), || async {
            dv.query_one(
                "SELECT count(*) FROM accounts
                 WHERE accountnumber LIKE 'K%' AND telephone1 = 'p' || substr(accountnumber, 2)::int",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
                == N as i64
        })
        .await
    })
    .await;
    if result.is_err() {
        panic!("not every change arrived:\n{}", env.logs());
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_go_to_the_errors_topic_and_the_rest_flows() {
    let mut env = TestEnv::new("errors").await;
    let dv = env.dv().await;
    dv.batch_execute(
        "ALTER TABLE accounts ADD CONSTRAINT credit_within_policy CHECK (creditlimit < 1000000)",
    )
    .await
    .unwrap();
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let fno = env.fno().await;

    // Garbage on the capture topic, from a foreign producer.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &stack().bootstrap)
        .create()
        .unwrap();
    let topic = format!("{}.capture.fno", env.prefix);
    producer
        .send(
            FutureRecord::to(&topic)
                .key("junk")
                .payload(&b"\x00\x01 not avro"[..]),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();

    // A value the target rejects, then a good change.
    fno.batch_execute(
        "INSERT INTO customers_v3 (customeraccount, organizationname, creditlimit) VALUES ('C9100', 'Too much credit', 5000000);
         INSERT INTO customers_v3 (customeraccount, organizationname, creditlimit) VALUES ('C9101', 'Fine', 100);",
    )
    .await
    .unwrap();
    eventually("the good change arrives", WAIT, || async {
        text(
            &dv,
            "SELECT name FROM accounts WHERE accountnumber = 'C9101'",
        )
        .await
        .as_deref()
            == Some("Fine")
    })
    .await;

    let errors = env
        .tail_until("errors", "two error records", WAIT, |r| r.len() >= 2)
        .await;
    let by_class = |class: &str| {
        errors
            .iter()
            .find(|e| e["value"]["error_class"] == class)
            .unwrap_or_else(|| panic!("no {class} error in {errors:?}"))
            .clone()
    };
    let malformed = by_class("malformed_record")["value"].clone();
    assert_eq!(malformed["service"], "router");
    assert_eq!(malformed["topic"], topic.as_str());
    assert_eq!(malformed["key"], "junk");
    assert!(
        malformed["payload"].is_array(),
        "original bytes are kept: {malformed}"
    );
    let rejected = by_class("rejected_by_target")["value"].clone();
    assert_eq!(rejected["map"], "customers");
    assert_eq!(rejected["target_side"], "dataverse");
    assert_eq!(rejected["key"], "[\"C9100\"]");
    let msg = rejected["message"].as_str().unwrap();
    assert!(
        msg.contains("credit_within_policy") && msg.contains("23514"),
        "{msg}"
    );
    assert!(text(
        &dv,
        "SELECT name FROM accounts WHERE accountnumber = 'C9100'"
    )
    .await
    .is_none());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_auto_pause_the_map_at_the_threshold_and_retry_once_fixed() {
    let mut env = TestEnv::with_config(
        "autopause",
        "\n[pause_buffer.auto_pause]\nerrors = 3\nwindow_secs = 120\n",
    )
    .await;
    let dv = env.dv().await;
    dv.batch_execute(
        "ALTER TABLE accounts ADD CONSTRAINT credit_within_policy CHECK (creditlimit < 1000000)",
    )
    .await
    .unwrap();
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let fno = env.fno().await;
    let reason = |env: &TestEnv| -> (String, String) {
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&env.ctl(&["maps", "--json"])).unwrap();
        let c = rows.iter().find(|r| r["map"] == "customers").unwrap();
        (
            c["state"].as_str().unwrap().to_owned(),
            c["reason"].as_str().unwrap_or("").to_owned(),
        )
    };

    // Two rejections: below the threshold, the map keeps running.
    fno.batch_execute(
        "INSERT INTO customers_v3 (customeraccount, organizationname, creditlimit) VALUES ('C9200', 'Poison 1', 5000000);
         INSERT INTO customers_v3 (customeraccount, organizationname, creditlimit) VALUES ('C9201', 'Poison 2', 6000000);
         INSERT INTO customers_v3 (customeraccount, organizationname, creditlimit) VALUES ('C9202', 'Good 1', 10);",
    )
    .await
    .unwrap();
    eventually("later records still sync", WAIT, || async {
        text(
            &dv,
            "SELECT name FROM accounts WHERE accountnumber = 'C9202'",
        )
        .await
        .as_deref()
            == Some("Good 1")
    })
    .await;
    eventually("two errors recorded", WAIT, || {
        let n = env.tail("errors").len();
        async move { n == 2 }
    })
    .await;
    assert_eq!(reason(&env).0, "Running");

    // The third reaches the threshold: the map pauses itself, with the reason.
    fno.batch_execute("INSERT INTO customers_v3 (customeraccount, organizationname, creditlimit) VALUES ('C9203', 'Poison 3', 7000000)")
        .await
        .unwrap();
    eventually("auto-pause", WAIT, || {
        let (state, why) = reason(&env);
        async move {
            state == "Paused" && why.starts_with("auto-paused: 3 errors within 120 s (threshold 3)")
        }
    })
    .await;
    // Paused: a good change now queues.
    fno.batch_execute("INSERT INTO customers_v3 (customeraccount, organizationname, creditlimit) VALUES ('C9204', 'Good 2', 10)")
        .await
        .unwrap();

    // Fix the cause, retry the errors, run the map again.
    dv.batch_execute("ALTER TABLE accounts DROP CONSTRAINT credit_within_policy")
        .await
        .unwrap();
    let out = env.ctl(&[
        "retry-errors",
        "--map",
        "customers",
        "--class",
        "rejected_by_target",
    ]);
    assert!(out.contains("sent 3 record(s)"), "{out}");
    eventually("retried records applied", WAIT, || async {
        dv.query_one(
            "SELECT count(*) FROM accounts WHERE accountnumber IN ('C9200', 'C9201', 'C9203')",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 3
    })
    .await;
    assert!(
        text(
            &dv,
            "SELECT name FROM accounts WHERE accountnumber = 'C9204'"
        )
        .await
        .is_none(),
        "a paused map wrote to its target"
    );
    env.ctl(&["run", "customers"]);
    eventually("queued change after resume", WAIT, || async {
        text(
            &dv,
            "SELECT name FROM accounts WHERE accountnumber = 'C9204'",
        )
        .await
        .as_deref()
            == Some("Good 2")
    })
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_waits_for_its_parent_for_a_bounded_time() {
    let mut env = TestEnv::with_config("parent", "\n[apply]\nparent_wait_secs = 8\n").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let fno = env.fno().await;
    let dv = env.dv().await;
    let p = env.prefix.clone();

    // The group's map is paused, so the customer arrives before its group
    // (accounts.msdyn_customergroupid references the groups on the right).
    env.ctl(&["pause", "customer_groups"]);
    fno.batch_execute(
        "INSERT INTO customer_groups VALUES ('G50', 'New group', 'Net30');
         INSERT INTO customers_v3 (customeraccount, organizationname, customergroupid) VALUES ('C9300', 'Child', 'G50');",
    )
    .await
    .unwrap();
    eventually("the customer reached the applier", WAIT, || {
        let lag = support::group_lag(
            &env,
            &format!("{p}.pause-buffer.customers"),
            &format!("{p}.map.customers"),
        );
        async move { lag == 0 }
    })
    .await;
    env.ctl(&["run", "customer_groups"]);
    eventually(
        "the child is applied once its parent arrived",
        WAIT,
        || async {
            text(
                &dv,
                "SELECT msdyn_customergroupid FROM accounts WHERE accountnumber = 'C9300'",
            )
            .await
            .as_deref()
                == Some("G50")
        },
    )
    .await;
    assert!(
        env.tail("errors").is_empty(),
        "a waiting child counted as an error"
    );

    // A parent that does not come within the wait: the child becomes an error.
    env.ctl(&["pause", "customer_groups"]);
    fno.batch_execute(
        "INSERT INTO customer_groups VALUES ('G51', 'Late group', 'Net30');
         INSERT INTO customers_v3 (customeraccount, organizationname, customergroupid) VALUES ('C9301', 'Orphan', 'G51');",
    )
    .await
    .unwrap();
    let errors = env
        .tail_until("errors", "the orphan is reported", WAIT, |r| r.len() == 1)
        .await;
    let e = &errors[0]["value"];
    assert_eq!(e["error_class"], "rejected_by_target");
    assert_eq!(e["key"], "[\"C9301\"]");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("missing related record after waiting 8 s"),
        "{e}"
    );
    // Later changes kept flowing meanwhile, and the fix is a retry.
    env.ctl(&["run", "customer_groups"]);
    env.ctl(&["retry-errors", "--map", "customers"]);
    eventually("the orphan applies after the retry", WAIT, || async {
        text(
            &dv,
            "SELECT name FROM accounts WHERE accountnumber = 'C9301'",
        )
        .await
        .as_deref()
            == Some("Orphan")
    })
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_appliers_split_partitions_across_instances() {
    let mut env = TestEnv::new("shards").await;
    for args in [
        &["capture", "--side", "fno"][..],
        &["capture", "--side", "dataverse"],
        &["pause-buffer"],
        &["router", "--instance-index", "0", "--instances", "2"],
        &["router", "--instance-index", "1", "--instances", "2"],
        &[
            "apply",
            "--side",
            "dataverse",
            "--instance-index",
            "0",
            "--instances",
            "2",
        ],
        &[
            "apply",
            "--side",
            "dataverse",
            "--instance-index",
            "1",
            "--instances",
            "2",
        ],
        &["apply", "--side", "fno"],
    ] {
        env.spawn(args);
    }
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let fno = env.fno().await;
    let dv = env.dv().await;
    fno.batch_execute(
        "INSERT INTO customers_v3 (customeraccount, organizationname)
         SELECT 'S' || lpad(i::text, 3, '0'), 'shard ' || i FROM generate_series(1, 60) i",
    )
    .await
    .unwrap();
    dv.batch_execute("UPDATE accounts SET telephone1 = 'from-dv' WHERE accountnumber <= 'C0020'")
        .await
        .unwrap();
    let arrived = tokio::time::timeout(WAIT, async {
        loop {
            let a: i64 = dv
                .query_one(
                    "SELECT count(*) FROM accounts WHERE accountnumber LIKE 'S%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            let b: i64 = fno
                .query_one(
                    "SELECT count(*) FROM customers_v3 WHERE primaryphone = 'from-dv'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if a == 60 && b == 20 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        arrived.is_ok(),
        "both directions did not arrive:\n{}",
        env.logs()
    );
    // Each instance read its own partitions; together all of them.
    let logs = env.logs();
    let mut routers: Vec<Vec<String>> = ["instance=0/2", "instance=1/2"]
        .iter()
        .map(|i| {
            logs.lines()
                .filter(|l| {
                    l.contains("reading partitions") && l.contains(i) && l.contains(".capture.")
                })
                .flat_map(|l| {
                    l.split('"')
                        .filter(|p| p.contains(".capture."))
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .collect();
    routers.iter_mut().for_each(|v| v.sort());
    assert!(
        !routers[0].is_empty() && !routers[1].is_empty(),
        "{routers:?}"
    );
    assert!(
        routers[0].iter().all(|p| !routers[1].contains(p)),
        "overlap: {routers:?}"
    );
    assert_eq!(routers[0].len() + routers[1].len(), 6, "{routers:?}");
    // No applier instance's writes echoed back.
    support::all_drained(&env).await;
    let echoed: Vec<serde_json::Value> = env
        .tail("capture:dataverse")
        .into_iter()
        .filter(|r| r.to_string().contains("shard "))
        .collect();
    assert!(echoed.is_empty(), "{echoed:?}");
    env.cleanup().await;
}

/// A side that only receives (its only changes are the applier's own
/// writes, left out by origin) still moves its slot forward, so the slot
/// neither holds the WAL on disk nor makes every read decode it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_side_moves_its_slot_forward() {
    let mut env = TestEnv::new("idleslot").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let fno = env.fno().await;
    let dv = env.dv().await;
    fno.batch_execute(
        "INSERT INTO customers_v3 (customeraccount, organizationname)
           SELECT 'I' || i, 'Idle ' || i FROM generate_series(1, 2000) i",
    )
    .await
    .unwrap();
    eventually("the rows reach the right side", WAIT, || async {
        dv.query_one(
            "SELECT count(*) FROM accounts WHERE accountnumber LIKE 'I%'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            == 2000
    })
    .await;
    // Everything the right side has written so far is behind its slot soon.
    let end: String = dv
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let db = env.dv_db.clone();
    eventually("the right side's slot passes the WAL end", WAIT, || async {
        dv.query_one(
            "SELECT bool_and(confirmed_flush_lsn >= $1::text::pg_lsn) FROM pg_replication_slots WHERE database = $2",
            &[&end, &db],
        )
        .await
        .unwrap()
        .get::<_, Option<bool>>(0)
            == Some(true)
    })
    .await;
    env.cleanup().await;
}

/// Issue 16.8: the appliers' bookkeeping of a record they deleted is
/// forgotten after `apply.bookkeeping_retention_secs`, and the record can
/// be created again and changed from either side afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bookkeeping_of_deleted_records_is_forgotten_and_sync_goes_on() {
    let mut env =
        TestEnv::with_config("prune", "\n[apply]\nbookkeeping_retention_secs = 1\n").await;
    let fno = env.fno().await;
    let dv = env.dv().await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let on_dv = "SELECT name FROM accounts WHERE accountnumber = 'P0001'";
    fno.batch_execute(
        "INSERT INTO customers_v3 (customeraccount, organizationname, customergroupid, salescurrencycode)
           VALUES ('P0001', 'First', 'G01', 'EUR')",
    )
    .await
    .unwrap();
    eventually("created on dataverse", WAIT, || async {
        text(&dv, on_dv).await.as_deref() == Some("First")
    })
    .await;
    fno.batch_execute("DELETE FROM customers_v3 WHERE customeraccount = 'P0001'")
        .await
        .unwrap();
    eventually("deleted on dataverse", WAIT, || async {
        text(&dv, on_dv).await.is_none()
    })
    .await;
    let kept = "SELECT count(*)::text FROM dualwrite.record_versions WHERE map = 'customers' AND record_key LIKE '%P0001%'";
    eventually(
        "the deleted record's bookkeeping forgotten",
        WAIT,
        || async { text(&dv, kept).await.as_deref() == Some("0") },
    )
    .await;
    // The same key again, then a change from the other side.
    fno.batch_execute(
        "INSERT INTO customers_v3 (customeraccount, organizationname, customergroupid, salescurrencycode)
           VALUES ('P0001', 'Second', 'G01', 'EUR')",
    )
    .await
    .unwrap();
    eventually("created again on dataverse", WAIT, || async {
        text(&dv, on_dv).await.as_deref() == Some("Second")
    })
    .await;
    dv.batch_execute("UPDATE accounts SET name = 'Third' WHERE accountnumber = 'P0001'")
        .await
        .unwrap();
    eventually("changed back on fno", WAIT, || async {
        text(
            &fno,
            "SELECT organizationname FROM customers_v3 WHERE customeraccount = 'P0001'",
        )
        .await
        .as_deref()
            == Some("Third")
    })
    .await;
    support::all_drained(&env).await;
    let (code, out, _) = env.run(&["ctl", "verify"]);
    assert_eq!(code, 0, "{out}");
    env.cleanup().await;
}

/// The applier reads a batch's bookkeeping by one index probe per key,
/// however many records the table holds: over 200,000 records, a batch
/// of 2,000 keys was read by a sequential scan of the whole table when
/// the statement matched the keys with `= ANY($2)` or joined them (30-47
/// ms a batch, growing with the table, against 10-25 ms; BENCHMARKS.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bookkeeping_of_a_batch_is_read_by_index() {
    use dualwrite_side_postgres::target_sql::{VERSIONS, VERSIONS_DDL};
    let env = TestEnv::new("plan").await;
    let dv = env.dv().await;
    dv.batch_execute(VERSIONS_DDL).await.unwrap();
    dv.batch_execute(
        "INSERT INTO dualwrite.record_versions (map, record_key, version, row_xmin, present, decided)
         SELECT 'customers', '[\"K' || i || '\"]', i, '1', true, i FROM generate_series(1, 200000) i;
         ANALYZE dualwrite.record_versions",
    )
    .await
    .unwrap();
    let keys: Vec<String> = (1..=2000).map(|i| format!("[\"K{}\"]", i * 97)).collect();
    let plan: Vec<String> = dv
        .query(&format!("EXPLAIN {VERSIONS}"), &[&"customers", &keys])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan using record_versions_pkey") && !plan.contains("Seq Scan"),
        "{plan}"
    );
    let rows = dv.query(VERSIONS, &[&"customers", &keys]).await.unwrap();
    assert_eq!(rows.len(), 2000, "every key's bookkeeping");
    env.cleanup().await;
}

/// Issue 16.7: an update of the alternate key moves the record's row on the
/// other side instead of deleting it and creating another: the row keeps
/// what that side owns (its own id, the fields flowing only from it), and
/// no second row appears, even with another unique constraint that a new
/// row of the new key would break while the old row is still there.
/// Before: new ids on dataverse, `creditlimit` (fno's own) lost on fno.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_moves_the_record_and_keeps_what_the_target_owns() {
    let mut env = TestEnv::new("keychange").await;
    let fno = env.fno().await;
    let dv = env.dv().await;
    // Records without contacts (whose foreign keys refuse a key change on
    // either side), and a second unique constraint on each side.
    fno.batch_execute(
        "DELETE FROM contacts WHERE customeraccount <= 'C0020';
         CREATE UNIQUE INDEX customers_phone ON customers_v3 (primaryphone);",
    )
    .await
    .unwrap();
    dv.batch_execute(
        "DELETE FROM contacts WHERE parentcustomernumber <= 'C0020';
         CREATE UNIQUE INDEX accounts_phone ON accounts (telephone1);",
    )
    .await
    .unwrap();
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    eventually("maps running", WAIT, || async {
        env.states().get("customers").map(String::as_str) == Some("Running")
    })
    .await;
    let ids = "SELECT string_agg(substr(accountnumber, 2) || '=' || accountid::text, ',' ORDER BY substr(accountnumber, 2)) FROM accounts WHERE substr(accountnumber, 2) <= '0010'";
    let limits = "SELECT string_agg(substr(customeraccount, 2) || '=' || coalesce(creditlimit::text, '-'), ',' ORDER BY substr(customeraccount, 2)) FROM customers_v3 WHERE substr(customeraccount, 2) BETWEEN '0011' AND '0020'";
    let (ids_before, limits_before) = (text(&dv, ids).await, text(&fno, limits).await);
    fno.batch_execute(
        "UPDATE customers_v3 SET customeraccount = 'K' || substr(customeraccount, 2),
                organizationname = organizationname || ' renamed'
          WHERE customeraccount <= 'C0010'",
    )
    .await
    .unwrap();
    dv.batch_execute(
        "UPDATE accounts SET accountnumber = 'R' || substr(accountnumber, 2), name = name || ' moved'
          WHERE accountnumber BETWEEN 'C0011' AND 'C0020'",
    )
    .await
    .unwrap();
    let renamed = |table: &str, key: &str, name: &str| {
        format!(
            "SELECT count(*) FILTER (WHERE {key} LIKE 'K%' AND {name} LIKE '% renamed')
                 || '/' || count(*) FILTER (WHERE {key} LIKE 'R%' AND {name} LIKE '% moved')
                 || '/' || count(*) FILTER (WHERE {key} LIKE 'C%' AND substr({key}, 2) <= '0020')
               FROM {table}"
        )
    };
    let on_fno = renamed("customers_v3", "customeraccount", "organizationname");
    let on_dv = renamed("accounts", "accountnumber", "name");
    eventually("the key changes reach the other side", WAIT, || async {
        text(&fno, &on_fno).await.as_deref() == Some("10/10/0")
            && text(&dv, &on_dv).await.as_deref() == Some("10/10/0")
    })
    .await;
    assert_eq!(
        text(&dv, ids).await,
        ids_before,
        "dataverse's own ids of the records renamed on fno"
    );
    assert_eq!(
        text(&fno, limits).await,
        limits_before,
        "fno's own credit limits of the records renamed on dataverse"
    );
    support::all_drained(&env).await;
    let (code, out, _) = env.run(&["ctl", "verify"]);
    assert_eq!(code, 0, "{out}");
    env.cleanup().await;
}

/// A target column's type changed while the appliers run (text to
/// bigint): the next writes take the new type. The applier casts each
/// value's text to its column's type, read in each transaction: with the
/// types read once per connection, the writes cast to the old type were
/// refused by the database and went to the errors topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_whose_type_changes_while_the_appliers_run_takes_the_next_writes() {
    let mut env = TestEnv::new("coltype").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let fno = env.fno().await;
    let dv = env.dv().await;
    let phones = "SELECT string_agg(telephone1::text, ',' ORDER BY accountnumber) FROM accounts \
                  WHERE accountnumber IN ('C0001', 'C0002')";
    fno.batch_execute(
        "UPDATE customers_v3 SET primaryphone = '451' WHERE customeraccount = 'C0001'",
    )
    .await
    .unwrap();
    eventually("the first phone reaches the right side", WAIT, || async {
        text(&dv, phones).await.as_deref() == Some("451,+45 10000002")
    })
    .await;
    dv.batch_execute(
        "ALTER TABLE accounts ALTER COLUMN telephone1 TYPE bigint
           USING regexp_replace(telephone1, '\\D', '', 'g')::bigint",
    )
    .await
    .unwrap();
    fno.batch_execute(
        "UPDATE customers_v3 SET primaryphone = '452' WHERE customeraccount = 'C0001';
         UPDATE customers_v3 SET primaryphone = '453' WHERE customeraccount = 'C0002'",
    )
    .await
    .unwrap();
    eventually("the next phones reach the bigint column", WAIT, || async {
        text(&dv, phones).await.as_deref() == Some("452,453")
    })
    .await;
    assert_eq!(env.tail("errors"), Vec::<serde_json::Value>::new());
    env.cleanup().await;
}

/// The applier's check and delete of a run probe the key's index once
/// per key (its session: `SESSION`), whatever the table's size: matched
/// with a run's 2,000 keys as text arrays, a table of 50,000 rows was read
/// by a sequential scan for a hash join, each batch (BENCHMARKS.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_check_and_delete_of_a_run_probe_the_key_index() {
    use dualwrite_model::record::{ExpectKind, WriteOp};
    use dualwrite_side_postgres::target_sql::{self as sql, ColumnTypes};
    let env = TestEnv::new("plan2").await;
    let dv = env.dv().await;
    dv.batch_execute(&format!(
        "CREATE TABLE plan_items (id text PRIMARY KEY, name text, qty integer);
         INSERT INTO plan_items SELECT 'K' || i, 'n' || i, i FROM generate_series(1, 50000) i;
         ANALYZE plan_items; {}",
        sql::SESSION
    ))
    .await
    .unwrap();
    let types = ColumnTypes::new([
        ("id".to_owned(), "text".to_owned()),
        ("name".to_owned(), "text".to_owned()),
        ("qty".to_owned(), "integer".to_owned()),
    ]);
    let writes: Vec<_> = (1..=2000)
        .map(|i| {
            let key = format!("K{}", i * 23);
            let mut w = support::decision("m", "plan_items", &[("id", &key)], &[]);
            w.expect.kind = ExpectKind::Row;
            w.expect.values = vec![dualwrite_model::record::Field::new("qty", Some("5"))];
            w
        })
        .collect();
    let refs: Vec<_> = writes.iter().collect();
    let compare = ["qty".to_owned()];
    let names = sql::check_names(refs[0], &compare);
    let arrays = sql::arrays(&refs, &names, |w| w.key.iter().chain(&w.expect.values));
    let check = explain(&dv, &sql::rows_check(refs[0], &compare, &types), &arrays).await;
    assert!(
        check.contains("Index Scan using plan_items_pkey") && !check.contains("Seq Scan"),
        "{check}"
    );
    let mut delete = writes[0].clone();
    delete.op = WriteOp::Delete;
    let keys = sql::arrays(&refs, &["id"], |w| w.key.iter());
    let delete = explain(&dv, &sql::statement_many(&delete, &types), &keys).await;
    assert!(
        delete.contains("Index Scan using plan_items_pkey") && !delete.contains("Seq Scan"),
        "{delete}"
    );
    env.cleanup().await;
}

/// The plan of `sql` with text arrays as its parameters.
async fn explain(c: &tokio_postgres::Client, sql: &str, arrays: &[Vec<Option<&str>>]) -> String {
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        arrays.iter().map(|a| a as _).collect();
    let rows = c.query(&format!("EXPLAIN {sql}"), &params).await.unwrap();
    let lines: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    lines.join("\n")
}

/// The appliers' rows and bookkeeping are written under their rows
/// origins, which the side's capturer has the server leave out before it
/// decodes them: the right side's capturer receives the reports of the
/// applier's transactions and none of their rows. Before, each row the
/// applier wrote and its bookkeeping were decoded and formatted by the
/// side's walsender, sent, then dropped by the capturer (about a third of
/// PostgreSQL's CPU in a catch-up: BENCHMARKS.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_leaves_the_appliers_rows_out_before_decoding() {
    const ROWS: i64 = 400;
    let mut env = TestEnv::new("rowsorigin").await;
    env.start_all_with(&["--metrics-addr", "127.0.0.1:0"]);
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let fno = env.fno().await;
    let dv = env.dv().await;
    fno.batch_execute(&format!(
        "INSERT INTO customers_v3 (customeraccount, organizationname)
           SELECT 'R' || lpad(i::text, 5, '0'), 'n' || i FROM generate_series(1, {ROWS}) i"
    ))
    .await
    .unwrap();
    let count = "SELECT count(*)::text FROM accounts WHERE accountnumber LIKE 'R%'";
    eventually("the rows reach the right side", WAIT, || async {
        text(&dv, count).await.as_deref() == Some(&ROWS.to_string())
    })
    .await;
    let addr = env.metrics_addr(support::CAPTURE_DV).await;
    // The right side writes nothing of its own: what its capturer
    // publishes are the applier's reports.
    let reports = r#"dualwrite_records_captured_total{side="dataverse"}"#;
    let left_out = r#"dualwrite_records_skipped_total{reason="applier_row",service="capture"}"#;
    eventually("the right capturer passes the reports on", WAIT, || {
        let published = support::sample(&support::http_get(&addr, "/metrics").1, reports);
        async move { published >= ROWS as f64 }
    })
    .await;
    let text_now = support::http_get(&addr, "/metrics").1;
    assert_eq!(support::sample(&text_now, left_out), 0.0, "{text_now}");
    assert_eq!(env.tail("errors"), Vec::<serde_json::Value>::new());
    env.cleanup().await;
}
