//! End-to-end: the entity map lifecycle through the control topic, with
//! the services as separate processes against the real broker and PostgreSQL.

mod support;

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use support::{eventually, stack, TestEnv, PAUSE_BUFFER};

const WAIT: Duration = Duration::from_secs(90);

async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// Total records on a map topic.
fn map_records(env: &TestEnv, map: &str) -> i64 {
    let cfg =
        dualwrite_model::Config::parse(&std::fs::read_to_string(&env.config).unwrap()).unwrap();
    dualwrite_runtime::kafka::watermarks(&cfg.kafka, &format!("{}.map.{map}", env.prefix))
        .unwrap()
        .iter()
        .map(|(_, lo, hi)| hi - lo)
        .sum()
}

/// 10,000 changes on customers: 5,000 inserts and 5,000 updates.
async fn write_10k(fno: &tokio_postgres::Client, tag: &str) {
    for chunk in 0..10 {
        let from = chunk * 500 + 1;
        let to = from + 499;
        fno.batch_execute(&format!(
            "INSERT INTO customers_v3 (customeraccount, organizationname, customergroupid, salescurrencycode)
               SELECT '{tag}' || lpad(i::text, 5, '0'), 'v1', 'G03', 'DKK' FROM generate_series({from}, {to}) i;
             UPDATE customers_v3 SET organizationname = 'v2 ' || customeraccount
               WHERE customeraccount BETWEEN '{tag}' || lpad('{from}', 5, '0') AND '{tag}' || lpad('{to}', 5, '0');"
        ))
        .await
        .unwrap();
    }
}

/// Target rows of the batch that have their final value.
async fn synced(dv: &tokio_postgres::Client, tag: &str) -> i64 {
    count(dv, &format!("SELECT count(*) FROM accounts WHERE accountnumber LIKE '{tag}%' AND name = 'v2 ' || accountnumber")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_changes_and_resume_catches_up() {
    let mut env = TestEnv::new("pause").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    assert!(
        env.states().values().all(|s| s == "Running"),
        "{:?}",
        env.states()
    );
    let fno = env.fno().await;
    let dv = env.dv().await;

    let out = env.ctl(&["pause", "customers"]);
    assert!(out.contains("COMPLETED"), "{out}");
    assert_eq!(env.states()["customers"], "Paused");

    let before = map_records(&env, "customers");
    write_10k(&fno, "Q").await;
    // Every change is queued on the map's topic …
    eventually("10,000 changes queued on the map topic", WAIT, || {
        let n = map_records(&env, "customers");
        async move { n >= before + 10_000 }
    })
    .await;
    // … and nothing reached the target.
    assert_eq!(
        count(
            &dv,
            "SELECT count(*) FROM accounts WHERE accountnumber LIKE 'Q%'"
        )
        .await,
        0
    );
    let backlog: Vec<serde_json::Value> =
        serde_json::from_str(&env.ctl(&["maps", "--json"])).unwrap();
    let customers = backlog.iter().find(|r| r["map"] == "customers").unwrap();
    assert!(
        customers["backlog"].as_i64().unwrap() >= 10_000,
        "{customers}"
    );
    // Other maps keep flowing while customers is paused.
    fno.batch_execute(
        "UPDATE currencies SET name = 'Euro (paused test)' WHERE currencycode = 'EUR'",
    )
    .await
    .unwrap();
    eventually("a running map still syncs", WAIT, || async {
        count(
            &dv,
            "SELECT count(*) FROM transactioncurrencies WHERE currencyname = 'Euro (paused test)'",
        )
        .await
            == 1
    })
    .await;

    let out = env.ctl(&["run", "customers", "--timeout-secs", "120"]);
    assert!(
        out.contains("Resuming") && out.contains("COMPLETED"),
        "{out}"
    );
    assert_eq!(env.states()["customers"], "Running");
    eventually("the target equals the source", WAIT, || async {
        synced(&dv, "Q").await == 5000
    })
    .await;

    // Resuming then Running on the events topic, for the resume command.
    let states: Vec<String> = env
        .tail("events")
        .iter()
        .filter(|e| e["value"]["map"] == "customers" && e["value"]["outcome"] == "STATE_CHANGED")
        .map(|e| e["value"]["state"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        states,
        ["Initializing", "Running", "Paused", "Resuming", "Running"]
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_survive_kill9_of_the_pause_buffer() {
    let mut env = TestEnv::new("pbkill").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let fno = env.fno().await;
    let dv = env.dv().await;

    // Related maps pause together: customers with its groups and currencies …
    let out = env.ctl(&["pause", "customers", "--include-related"]);
    assert!(out.contains("COMPLETED"), "{out}");
    let states = env.states();
    // … and contacts, which depends on customers.
    for m in ["customers", "customer_groups", "currencies", "contacts"] {
        assert_eq!(states[m], "Paused", "{states:?}");
    }

    let before = map_records(&env, "customers");
    write_10k(&fno, "R").await;
    fno.batch_execute("INSERT INTO customer_groups VALUES ('G99', 'Paused group', 'Net7')")
        .await
        .unwrap();

    // kill -9 while paused: the pause holds across the restart.
    env.service(PAUSE_BUFFER).kill9();
    env.service(PAUSE_BUFFER).restart();
    eventually("changes queued", WAIT, || {
        let n = map_records(&env, "customers");
        async move { n >= before + 10_000 }
    })
    .await;
    assert_eq!(env.states()["customers"], "Paused");
    // The restarted pause buffer is up (it answers commands) and still holds everything back.
    // (An explicit id skips ctl's own check of the state, so the command
    // goes to the controller.)
    let (_, out, _) = env.run(&["ctl", "pause", "contacts", "--id", "probe-while-paused"]);
    assert!(
        out.contains("REJECTED") && out.contains("while the map is Paused"),
        "{out}"
    );
    assert_eq!(
        count(
            &dv,
            "SELECT count(*) FROM accounts WHERE accountnumber LIKE 'R%'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &dv,
            "SELECT count(*) FROM msdyn_customergroups WHERE msdyn_groupid = 'G99'"
        )
        .await,
        0
    );

    // Resume the related maps together, and kill -9 the pause buffer mid-catch-up.
    let out = env.ctl(&["run", "customers", "--include-related", "--no-wait"]);
    assert!(
        out.contains("related maps of customers: customer_groups, currencies"),
        "{out}"
    );
    eventually("resume began", WAIT, || {
        let s = env.states();
        async move { s["customers"] == "Resuming" || s["customers"] == "Running" }
    })
    .await;
    env.service(PAUSE_BUFFER).kill9();
    env.service(PAUSE_BUFFER).restart();
    eventually("catch-up finishes after the restart", WAIT, || {
        let s = env.states();
        async move {
            ["customers", "customer_groups", "currencies"]
                .iter()
                .all(|m| s[*m] == "Running")
        }
    })
    .await;
    eventually("the target equals the source", WAIT, || async {
        synced(&dv, "R").await == 5000
    })
    .await;
    assert_eq!(
        count(
            &dv,
            "SELECT count(*) FROM msdyn_customergroups WHERE msdyn_groupid = 'G99'"
        )
        .await,
        1
    );
    // contacts stayed paused through all of it.
    assert_eq!(env.states()["contacts"], "Paused");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unavailable_commands_are_rejected_with_reasons() {
    let mut env = TestEnv::new("cmds").await;
    env.spawn(&["pause-buffer"]);
    // Wait until it takes commands: a valid run completes.
    eventually("pause buffer takes commands", WAIT, || {
        let (code, _, _) = env.run(&["ctl", "run", "currencies", "--timeout-secs", "5"]);
        async move { code == 0 }
    })
    .await;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &stack().bootstrap)
        .create()
        .unwrap();
    let topic = format!("{}.control", env.prefix);
    let send = |key: &'static str, value: Vec<u8>| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&topic).key(key).payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad-json", b"{\"id\": \"x\", \"action\": ".to_vec(), "invalid JSON command"),
        ("unknown-map", br#"{"id":"c-unknown-map","action":"run","map":"suppliers"}"#.to_vec(), "unknown map `suppliers`"),
        ("unknown-action", br#"{"id":"c-unknown-action","action":"explode","map":"customers"}"#.to_vec(), "unknown variant `explode`"),
        ("not-allowed", br#"{"id":"c-not-allowed","action":"pause","map":"customers"}"#.to_vec(), "Pause is not available while the map is Not running (available: Run)"),
        ("bad-order", br#"{"id":"c-bad-order","action":"run","map":"customers","include_related":true,"order":["customers","currencies","customer_groups"]}"#.to_vec(), "inconsistent order"),
        ("bad-type", br#"{"id":"c-bad-type","action":"run","map":"customers","include_related":"yes"}"#.to_vec(), "invalid type"),
        ("oversized", vec![b' '; 70_000], "more than the 65536 allowed"),
        ("empty-id", br#"{"id":"","action":"run","map":"customers"}"#.to_vec(), "command id"),
    ];
    for (key, value, _) in &cases {
        send(key, value.clone()).await;
    }
    // A valid command sent eight days ago (the events topic keeps seven):
    // whether it was applied can no longer be told from the events.
    let eight_days_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 8 * 24 * 3_600_000;
    producer
        .send(
            FutureRecord::to(&topic)
                .key("too-old")
                .payload(br#"{"id":"c-too-old","action":"run","map":"customers"}"#)
                .timestamp(eight_days_ago),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    // A command applied twice: the second changes nothing.
    send(
        "dup",
        br#"{"id":"c-dup","action":"stop","map":"currencies"}"#.to_vec(),
    )
    .await;
    send(
        "dup",
        br#"{"id":"c-dup","action":"stop","map":"currencies"}"#.to_vec(),
    )
    .await;

    let events = env
        .tail_until("events", "every command acknowledged", WAIT, |r| {
            let dup_done = r
                .iter()
                .filter(|e| e["key"] == "c-dup" && e["value"]["outcome"] == "COMPLETED")
                .count()
                == 2;
            let rejected = r
                .iter()
                .filter(|e| e["value"]["outcome"] == "REJECTED")
                .count();
            dup_done && rejected >= 9
        })
        .await;
    for (key, _, reason) in &cases {
        let ev = events
            .iter()
            .find(|e| {
                e["value"]["outcome"] == "REJECTED"
                    && (e["key"].as_str() == Some(key)
                        || e["key"].as_str().is_some_and(|k| k == format!("c-{key}")))
            })
            .unwrap_or_else(|| panic!("no rejection for {key} in {events:#?}"));
        let msg = ev["value"]["message"].as_str().unwrap();
        assert!(msg.contains(reason), "{key}: {msg}");
    }
    let too_old = events
        .iter()
        .find(|e| e["key"] == "too-old")
        .unwrap_or_else(|| panic!("no event for the old command in {events:#?}"));
    assert_eq!(too_old["value"]["outcome"], "REJECTED", "{too_old}");
    assert!(
        too_old["value"]["message"]
            .as_str()
            .unwrap()
            .contains("sent 192 h ago, longer than the events topic keeps"),
        "{too_old}"
    );
    let dup: Vec<&serde_json::Value> = events.iter().filter(|e| e["key"] == "c-dup").collect();
    assert_eq!(
        dup.iter()
            .filter(|e| e["value"]["outcome"] == "ACCEPTED")
            .count(),
        1,
        "{dup:#?}"
    );
    assert!(dup.last().unwrap()["value"]["message"]
        .as_str()
        .unwrap()
        .contains("duplicate"));
    // Rejections changed nothing; the duplicate stop applied once.
    let states = env.states();
    assert_eq!(states["customers"], "Not running");
    assert_eq!(states["currencies"], "Not running");
    env.cleanup().await;
}

async fn name_on_dv(dv: &tokio_postgres::Client, acct: &str) -> String {
    dv.query_one(
        "SELECT name FROM accounts WHERE accountnumber = $1",
        &[&acct],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_policies_discard_and_skip_to_live_with_retry() {
    let mut env = TestEnv::new("policy").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let fno = env.fno().await;
    let dv = env.dv().await;
    let queue = |sql: &'static str| {
        let env = &env;
        let fno = &fno;
        async move {
            env.ctl(&["pause", "customers"]);
            let before = map_records(env, "customers");
            fno.batch_execute(sql).await.unwrap();
            eventually("change queued", WAIT, || {
                let n = map_records(env, "customers");
                async move { n > before }
            })
            .await;
        }
    };

    // Discard: the queued change is dropped, later ones flow.
    queue("UPDATE customers_v3 SET organizationname = 'queued-discard' WHERE customeraccount = 'C0010'").await;
    env.ctl(&["run", "customers", "--resume-policy", "discard"]);
    fno.batch_execute("UPDATE customers_v3 SET organizationname = 'after-discard' WHERE customeraccount = 'C0011'").await.unwrap();
    eventually("live change after discard", WAIT, || async {
        name_on_dv(&dv, "C0011").await == "after-discard"
    })
    .await;
    support::drained(&env, "customers", "dataverse").await;
    assert_eq!(name_on_dv(&dv, "C0010").await, "Customer 10 Ltd");

    // Skip to live: the queued change is set aside on the catch-up errors topic.
    queue(
        "UPDATE customers_v3 SET organizationname = 'queued-skip' WHERE customeraccount = 'C0012'",
    )
    .await;
    env.ctl(&["run", "customers", "--resume-policy", "skip_to_live"]);
    fno.batch_execute(
        "UPDATE customers_v3 SET organizationname = 'after-skip' WHERE customeraccount = 'C0013'",
    )
    .await
    .unwrap();
    eventually("live change after skip", WAIT, || async {
        name_on_dv(&dv, "C0013").await == "after-skip"
    })
    .await;
    support::drained(&env, "customers", "dataverse").await;
    assert_eq!(name_on_dv(&dv, "C0012").await, "Customer 12 Ltd");
    let aside = env.tail("catchup-errors");
    assert_eq!(aside.len(), 1, "{aside:#?}");
    assert_eq!(aside[0]["key"], "[\"C0012\"]");

    // Retry it: now it applies.
    let out = env.ctl(&["retry-catchup", "customers", "--key", "[\"C0012\"]"]);
    assert!(out.contains("sent 1 queued change"), "{out}");
    eventually("retried change applied", WAIT, || async {
        name_on_dv(&dv, "C0012").await == "queued-skip"
    })
    .await;

    // A newer change, then the same retry again: the old change is skipped, never regressing the record.
    fno.batch_execute(
        "UPDATE customers_v3 SET organizationname = 'newest' WHERE customeraccount = 'C0012'",
    )
    .await
    .unwrap();
    eventually("newest change applied", WAIT, || async {
        name_on_dv(&dv, "C0012").await == "newest"
    })
    .await;
    env.ctl(&["retry-catchup", "customers"]);
    support::drained(&env, "customers", "dataverse").await;
    assert_eq!(
        name_on_dv(&dv, "C0012").await,
        "newest",
        "a replayed older change regressed the record"
    );
    env.cleanup().await;
}

/// A pause is quiet: its COMPLETED comes only once nothing of the map is
/// on the way to the target. With the target's applier stopped, 10,000
/// changes are released to its apply topic; the pause is then not
/// completed while they wait there, and when the applier is back and has
/// written them, the COMPLETED comes, after which the target does not
/// change any more. Before, COMPLETED came when the command was processed
/// and the target kept gaining rows after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_completes_only_when_nothing_of_the_map_is_in_flight() {
    let mut env = TestEnv::new("quietpause").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let (fno, dv) = (env.fno().await, env.dv().await);
    let p = env.prefix.clone();
    let (group, topic) = (
        format!("{p}.apply.dataverse"),
        format!("{p}.apply.dataverse"),
    );
    env.service(5).stop();
    write_10k(&fno, "W").await;
    eventually("the changes wait in the apply topic", WAIT, || {
        let gate = support::group_lag(
            &env,
            &format!("{p}.pause-buffer.customers"),
            &format!("{p}.map.customers"),
        );
        let apply = support::group_lag(&env, &group, &topic);
        async move { gate == 0 && apply >= 5_000 }
    })
    .await;

    let (code, out, err) = env.run(&["ctl", "pause", "customers", "--timeout-secs", "5"]);
    assert_ne!(
        code, 0,
        "the pause completed with writes in flight:\n{out}\n{err}"
    );
    assert!(!out.contains("COMPLETED"), "{out}");
    assert_eq!(env.states()["customers"], "Paused");
    assert!(synced(&dv, "W").await < 5_000);

    env.service(5).restart();
    let completed = |events: &[serde_json::Value]| {
        events.iter().any(|e| {
            let v = &e["value"];
            v["map"] == "customers" && v["outcome"] == "COMPLETED" && v["state"] == "Paused"
        })
    };
    env.tail_until("events", "the pause completes", WAIT, completed)
        .await;
    // Everything released before the pause was written by then …
    assert_eq!(synced(&dv, "W").await, 5_000);
    // … and what is written after it waits for the map to run again.
    fno.batch_execute(
        "UPDATE customers_v3 SET organizationname = 'after' WHERE customeraccount = 'W00001'",
    )
    .await
    .unwrap();
    eventually("the change is queued", WAIT, || {
        let n = support::backlog(&env, "customers");
        async move { n >= 1 }
    })
    .await;
    assert_eq!(synced(&dv, "W").await, 5_000);
    env.cleanup().await;
}

/// Parent rows queued on the `customer_groups` map, then customers
/// referring to the last of them.
const QUEUED_PARENTS: u32 = 40_000;

/// Related maps catch up parents first. `pause --include-related` of a
/// parent map pauses the maps that depend on it too; a related run then
/// lets a child map's catch-up wait while a parent map catches up, so no
/// child is written before its parent (with `parent_wait_secs = 5`, a
/// child that overtook its parents' backlog of 40,000 would fail to the
/// errors topic). Before, every map of a related run caught up at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn related_maps_catch_up_parents_first() {
    let mut env = TestEnv::with_config("parentsfirst", "\n[apply]\nparent_wait_secs = 5\n").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let (fno, dv) = (env.fno().await, env.dv().await);
    env.ctl(&["pause", "customer_groups", "--include-related"]);
    let states = env.states();
    for m in ["customer_groups", "customers", "contacts"] {
        assert_eq!(states[m], "Paused", "{m}: {states:?}");
    }
    assert_eq!(states["currencies"], "Running");

    let n = QUEUED_PARENTS;
    fno.batch_execute(&format!(
        "INSERT INTO customer_groups SELECT 'PG' || lpad(i::text, 6, '0'), 'queued parent ' || i, 'Net30'
           FROM generate_series(1, {n}) i;
         INSERT INTO customers_v3 (customeraccount, organizationname, customergroupid)
           SELECT 'PC' || lpad(i::text, 4, '0'), 'child ' || i, 'PG' || lpad(({n} - i + 1)::text, 6, '0')
             FROM generate_series(1, 200) i;"
    ))
    .await
    .unwrap();
    eventually("parents and children queued", WAIT, || {
        let (p, c) = (
            support::backlog(&env, "customer_groups"),
            support::backlog(&env, "customers"),
        );
        async move { p >= n as i64 && c >= 200 }
    })
    .await;

    env.ctl(&[
        "run",
        "contacts",
        "--include-related",
        "--timeout-secs",
        "300",
    ]);
    assert!(env.states().values().all(|s| s == "Running"));
    eventually("every child reached the target with its parent", WAIT, || async {
        count(&dv, "SELECT count(*) FROM accounts WHERE accountnumber LIKE 'PC%' AND msdyn_customergroupid IS NOT NULL").await == 200
    })
    .await;
    let failed: Vec<serde_json::Value> = env
        .tail("errors")
        .into_iter()
        .filter(|e| e["value"]["map"] == "customers")
        .collect();
    assert!(failed.is_empty(), "children failed: {failed:?}");
    env.cleanup().await;
}

/// `ctl` refuses at once, with the controller's reason, a command the
/// configuration or the map's recorded state does not allow (nothing is
/// sent); with no pause buffer running it says so and gives the map's last
/// recorded state; its stderr holds no progress lines unless `-v`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_refuses_what_cannot_be_done_and_says_when_nobody_answers() {
    let env = TestEnv::new("ctlcheck").await;
    // No service has started yet, so no map topic exists: `ctl maps` names
    // the topic, the broker and the prefix (it said UnknownTopicOrPartition).
    let (code, _, err) = env.run(&["ctl", "maps"]);
    assert_ne!(code, 0);
    assert!(
        err.contains(".map.customer_groups does not exist on ") && err.contains("topic_prefix"),
        "{err}"
    );
    // The first command creates the control and events topics: said with -v.
    let (code, _, err) = env.run(&["-v", "ctl", "run", "currencies", "--timeout-secs", "2"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("INFO") && err.contains("created topic"),
        "{err}"
    );
    let refused = [
        (vec!["run", "nosuchmap"], "not sent: unknown map `nosuchmap` (configured: customer_groups, currencies, customers, contacts)"),
        (vec!["pause", "customers"], "not sent: map `customers`: Pause is not available while the map is Not running (available: Run)"),
        (vec!["run", "customers", "--conflict-master", "nobody"], "not sent: conflict master `nobody` is not a side"),
    ];
    for (args, reason) in &refused {
        let started = std::time::Instant::now();
        let mut all = vec!["ctl"];
        all.extend(args.iter().copied());
        let (code, out, err) = env.run(&all);
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(err.contains(reason), "{args:?}: {err}");
        assert!(!err.contains("INFO"), "{args:?}: {err}");
        // At once: the default wait for an answer is 60 s.
        assert!(started.elapsed() < Duration::from_secs(30), "{args:?}");
    }
    let (code, _, err) = env.run(&["ctl", "run", "customers", "--timeout-secs", "2"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no pause buffer answered within 2 s")
            && err.contains("map `customers` was last recorded Not running (no status recorded)"),
        "{err}"
    );
    assert!(!err.contains("INFO"), "{err}");
    // Only the two commands that were not refused reached the control topic.
    let sent: Vec<String> = env
        .tail("control")
        .iter()
        .map(|r| r["value"]["map"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(sent, ["currencies", "customers"], "{sent:?}");
    env.cleanup().await;
}
