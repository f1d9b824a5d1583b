//! Fault injection, end to end: services killed with `kill -9` at random
//! moments, the broker and PostgreSQL killed and restarted, one side
//! unreachable for a while, instances re-sharded while a map is paused, a
//! pause held across a restart of everything. A workload writes on both
//! sides throughout; afterwards the checker (`ctl verify`) finds both sides
//! equal, every committed change is on the other side with each record's
//! last value (per-record order held), and every map is in its state.
//!
//! `DUALWRITE_FAULT_ROUNDS` (default 1) repeats the faults and lengthens
//! the workload: `scripts/soak.sh` runs these tests with more rounds.
//! `DUALWRITE_TEST_SEED` replays a run's random moments.

mod support;

use std::time::Duration;

use dualwrite_model::record::ExpectKind;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{
    all_drained, backlog, connect, decision, eventually, send_decisions, text, PrivateStack,
    TestEnv, APPLY_DV, APPLY_FNO, CAPTURE_DV, CAPTURE_FNO, PAUSE_BUFFER, ROUTER,
};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(120);
/// Records each writer updates every round.
const RECORDS: usize = 20;

fn fault_rounds() -> usize {
    std::env::var("DUALWRITE_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

fn rng(test: &str) -> StdRng {
    let seed = std::env::var("DUALWRITE_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("{test}: DUALWRITE_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

/// One side's writer: which table and columns, and its record prefix.
#[derive(Clone, Copy)]
struct Side {
    tag: &'static str,
    table: &'static str,
    key: &'static str,
    name: &'static str,
}

const LEFT: Side = Side {
    tag: "F",
    table: "customers_v3",
    key: "customeraccount",
    name: "organizationname",
};
const RIGHT: Side = Side {
    tag: "G",
    table: "accounts",
    key: "accountnumber",
    name: "name",
};

fn key(side: Side, k: usize) -> String {
    format!("{}{k:03}", side.tag)
}

/// Runs `sql` until it commits, reconnecting when the database is away:
/// only committed changes count.
async fn commit(url: &str, client: &mut Option<tokio_postgres::Client>, sql: &str) {
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            *client = match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    Some(c)
                }
                Err(_) => None,
            };
        }
        if let Some(c) = client.as_ref() {
            if c.batch_execute(sql).await.is_ok() {
                return;
            }
        }
        // The database is away (a fault under test): try again shortly.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates the side's records (before the maps run: the initial sync copies them).
async fn seed(env: &TestEnv, side: Side) {
    let c = if side.tag == "F" {
        env.fno().await
    } else {
        env.dv().await
    };
    let mut sql = String::new();
    for k in 0..RECORDS {
        sql.push_str(&format!(
            "INSERT INTO {} ({}, {}) VALUES ('{}', '{}-0');",
            side.table,
            side.key,
            side.name,
            key(side, k),
            key(side, k)
        ));
    }
    c.batch_execute(&sql).await.unwrap();
}

/// Writes `rounds` rounds on one side: every record gets the round's value
/// (one transaction per round), and a new record per round.
fn writer(url: String, side: Side, rounds: usize) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = None;
        for r in 1..=rounds {
            let mut sql = String::from("BEGIN;");
            for k in 0..RECORDS {
                sql.push_str(&format!(
                    "UPDATE {} SET {} = '{}-{r}' WHERE {} = '{}';",
                    side.table,
                    side.name,
                    key(side, k),
                    side.key,
                    key(side, k)
                ));
            }
            sql.push_str(&format!(
                "INSERT INTO {} ({}, {}) VALUES ('{}N{r:03}', 'new {r}') ON CONFLICT DO NOTHING; COMMIT;",
                side.table, side.key, side.name, side.tag
            ));
            commit(&url, &mut client, &sql).await;
            // Spread the rounds over time so that the faults land mid-stream.
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    })
}

fn writers(env: &TestEnv, rounds: usize) -> Vec<JoinHandle<()>> {
    let url = |db: &str| format!("{}/{db}", env.stack.pg_url);
    vec![
        writer(url(&env.fno_db), LEFT, rounds),
        writer(url(&env.dv_db), RIGHT, rounds),
    ]
}

/// The checker: each side's records reached the other side with their last
/// value, every new record is there, nothing is left in the pipeline, and
/// `ctl verify` finds both sides equal.
async fn converged(env: &TestEnv, rounds: usize) {
    for (side, other_url, table, key_col, name_col) in [
        (
            LEFT,
            format!("{}/{}", env.stack.pg_url, env.dv_db),
            "accounts",
            "accountnumber",
            "name",
        ),
        (
            RIGHT,
            format!("{}/{}", env.stack.pg_url, env.fno_db),
            "customers_v3",
            "customeraccount",
            "organizationname",
        ),
    ] {
        let other = connect(&other_url).await;
        let last = format!("-{rounds}");
        let sql = format!(
            "SELECT count(*) FILTER (WHERE {name_col} LIKE '%' || $2), count(*) FILTER (WHERE {key_col} LIKE $3)
               FROM {table} WHERE {key_col} LIKE $1"
        );
        let (prefix, new_prefix) = (format!("{}%", side.tag), format!("{}N%", side.tag));
        let what = format!(
            "{} records with their last value on the other side",
            side.tag
        );
        eventually(&what, WAIT, || async {
            let r = other
                .query_one(sql.as_str(), &[&prefix, &last, &new_prefix])
                .await
                .unwrap();
            (r.get::<_, i64>(0), r.get::<_, i64>(1)) == (RECORDS as i64, rounds as i64)
        })
        .await;
    }
    all_drained(env).await;
    let (code, out, err) = env.run(&["ctl", "verify"]);
    assert_eq!(
        code,
        0,
        "ctl verify found differences:\n{out}\n{err}\n{}",
        env.logs()
    );
    assert!(
        env.states().values().all(|s| s == "Running"),
        "{:?}",
        env.states()
    );
}

async fn started(env: &mut TestEnv) {
    seed(env, LEFT).await;
    seed(env, RIGHT).await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_killed_at_random_moments_during_live_sync() {
    let mut env = TestEnv::new("kill9").await;
    started(&mut env).await;
    let mut rng = rng("kill9");
    let rounds = 40 * fault_rounds();
    let writing = writers(&env, rounds);
    for _ in 0..fault_rounds() {
        let mut order = vec![
            CAPTURE_FNO,
            CAPTURE_DV,
            ROUTER,
            PAUSE_BUFFER,
            APPLY_FNO,
            APPLY_DV,
        ];
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        for s in order {
            // A random moment of the workload.
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
            env.service(s).kill9();
            env.service(s).restart();
        }
    }
    for w in writing {
        w.await.unwrap();
    }
    converged(&env, rounds).await;
    env.cleanup().await;
}

/// Live sync on a stack of its own while `fault` hits it, then 3 s down
/// and `up` again, every round.
async fn restarted_during_live_sync(name: &str, fault: fn(&PrivateStack)) {
    let stack = PrivateStack::start(name);
    let mut env = TestEnv::on(stack.stack.clone(), name, "").await;
    started(&mut env).await;
    let rounds = 30 * fault_rounds();
    let writing = writers(&env, rounds);
    for _ in 0..fault_rounds() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        fault(&stack);
        // The outage under test.
        tokio::time::sleep(Duration::from_secs(3)).await;
        stack.up();
    }
    for w in writing {
        w.await.unwrap();
    }
    converged(&env, rounds).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_and_restarted_during_live_sync() {
    restarted_during_live_sync("broker", PrivateStack::kill_broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_and_restarted_during_live_sync() {
    restarted_during_live_sync("postgres", PrivateStack::kill_postgres).await;
}

/// With the broker down, SIGTERM stops every service within its grace
/// (`shutdown::GRACE`, after which it exits as `kill -9` would), and
/// started again with the broker back, what was written meanwhile arrives.
/// Before, the pause buffer waited on the broker for more than 40 s, and
/// the router and the appliers 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_stops_within_its_grace_while_the_broker_is_down() {
    let stack = PrivateStack::start("stopdown");
    let mut env = TestEnv::on(stack.stack.clone(), "stopdown", "").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let fno = env.fno().await;
    let dv = env.dv().await;
    let insert = |prefix: &str| {
        format!(
            "INSERT INTO customers_v3 (customeraccount, organizationname)
               SELECT '{prefix}' || i, 'n' || i FROM generate_series(1, 200) i"
        )
    };
    let arrived = |prefix: &'static str| {
        let dv = &dv;
        move || async move {
            let q =
                format!("SELECT count(*)::text FROM accounts WHERE accountnumber LIKE '{prefix}%'");
            text(dv, &q).await.as_deref() == Some("200")
        }
    };
    fno.batch_execute(&insert("Q")).await.unwrap();
    eventually("the first rows arrive", WAIT, arrived("Q")).await;
    stack.kill_broker();
    fno.batch_execute(&insert("P")).await.unwrap();
    let limit = dualwrite_runtime::shutdown::GRACE + Duration::from_secs(5);
    let stopped = env.stop_all_within(limit);
    assert!(stopped.iter().all(|(_, exited, _)| *exited), "{stopped:?}");
    stack.up();
    for i in 0..6 {
        env.service(i).restart();
    }
    eventually(
        "the rows written while the broker was down arrive",
        WAIT,
        arrived("P"),
    )
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_side_unreachable_for_a_while() {
    let mut env = TestEnv::new("outage").await;
    started(&mut env).await;
    let admin = connect(&format!("{}/postgres", env.stack.pg_url)).await;
    let rounds = 30 * fault_rounds();
    let writing = writers(&env, rounds);
    for _ in 0..fault_rounds() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The right side goes away: every session is cut, none may connect.
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {db} ALLOW_CONNECTIONS false;
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}';",
                db = env.dv_db
            ))
            .await
            .unwrap();
        // The outage under test.
        tokio::time::sleep(Duration::from_secs(3)).await;
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {} ALLOW_CONNECTIONS true",
                env.dv_db
            ))
            .await
            .unwrap();
    }
    for w in writing {
        w.await.unwrap();
    }
    converged(&env, rounds).await;
    env.cleanup().await;
}

/// Pauses customers, lets the writers queue changes, checks nothing
/// reached the targets; returns the writers' rounds.
async fn paused_with_a_backlog(env: &TestEnv) -> usize {
    env.ctl(&["pause", "customers", "--timeout-secs", "60"]);
    let rounds = 20 * fault_rounds();
    for w in writers(env, rounds) {
        w.await.unwrap();
    }
    // Every round's changes are on the map topic (both sides' updates and new records).
    let want = (rounds * (RECORDS + 1) * 2) as i64;
    eventually(
        "the changes queue on the paused map's topic",
        WAIT,
        || async { backlog(env, "customers") >= want },
    )
    .await;
    let dv = env.dv().await;
    let name: String = dv
        .query_one(
            "SELECT name FROM accounts WHERE accountnumber = 'F000'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        name, "F000-0",
        "a change reached the target of a paused map"
    );
    rounds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_resharded_while_a_map_is_paused() {
    let mut env = TestEnv::new("reshard").await;
    started(&mut env).await;
    let rounds = paused_with_a_backlog(&env).await;
    // The router and the appliers go from one instance to two: every
    // partition changes hands while the map is paused.
    for s in [ROUTER, APPLY_FNO, APPLY_DV] {
        env.service(s).stop();
    }
    for i in ["0", "1"] {
        env.spawn(&["router", "--instance-index", i, "--instances", "2"]);
        for side in ["fno", "dataverse"] {
            env.spawn(&[
                "apply",
                "--side",
                side,
                "--instance-index",
                i,
                "--instances",
                "2",
            ]);
        }
    }
    assert_eq!(env.states()["customers"], "Paused");
    assert!(backlog(&env, "customers") > 0);
    env.ctl(&["run", "customers", "--timeout-secs", "90"]);
    converged(&env, rounds).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_holds_across_a_restart_of_everything_and_catch_up_survives_kills() {
    let mut env = TestEnv::new("restartall").await;
    started(&mut env).await;
    let rounds = paused_with_a_backlog(&env).await;
    let queued = backlog(&env, "customers");
    let all = [
        CAPTURE_FNO,
        CAPTURE_DV,
        ROUTER,
        PAUSE_BUFFER,
        APPLY_FNO,
        APPLY_DV,
    ];
    for s in all {
        env.service(s).kill9();
    }
    for s in all {
        env.service(s).restart();
    }
    // Back in its state, the backlog still queued, the target untouched.
    assert_eq!(env.states()["customers"], "Paused");
    assert!(backlog(&env, "customers") >= queued);
    let dv = env.dv().await;
    let name: String = dv
        .query_one(
            "SELECT name FROM accounts WHERE accountnumber = 'F000'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "F000-0");
    // Resume, and kill the pause buffer and an applier during the catch-up.
    env.ctl(&["run", "customers", "--no-wait"]);
    eventually("the catch-up has begun", WAIT, || async {
        env.states()["customers"] != "Paused"
    })
    .await;
    for s in [PAUSE_BUFFER, APPLY_DV] {
        env.service(s).kill9();
        env.service(s).restart();
    }
    converged(&env, rounds).await;
    env.cleanup().await;
}

/// A decision the applier found superseded, delivered again once the
/// target is back in the state it expected (an applier restarted from an
/// older offset, a resolver from its last save), is not written: it was
/// decided once, and the resolver took its report and moved on. Written, it
/// would put content on the side that no decision in flight accounts for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_decision_delivered_again_is_not_written() {
    let mut env = TestEnv::new("redeliver").await;
    let dv = env.dv().await;
    assert_eq!(env.run(&["setup"]).0, 0);
    dv.batch_execute("INSERT INTO accounts (accountnumber, name) VALUES ('R1', 'Local')")
        .await
        .unwrap();
    let key = [("accountnumber", "R1")];
    // Insert R1, expecting it absent: superseded (the side inserted it).
    let mut first = decision(
        "customers",
        "public.accounts",
        &key,
        &[("accountnumber", "R1"), ("name", "Decided")],
    );
    first.version = 1000;
    first.expect.kind = ExpectKind::Row;
    send_decisions(&env, std::slice::from_ref(&first)).await;
    env.spawn(&["apply", "--side", "dataverse"]);
    let table = "SELECT (to_regclass('dualwrite.record_versions') IS NOT NULL)::text";
    eventually("the applier made its bookkeeping", WAIT, || async {
        text(&dv, table).await.as_deref() == Some("true")
    })
    .await;
    let decided = "SELECT coalesce(decided, 0)::text FROM dualwrite.record_versions \
                   WHERE record_key LIKE '%R1%'";
    eventually("the insert is found superseded", WAIT, || async {
        text(&dv, decided).await.as_deref() == Some("1000")
    })
    .await;
    // The side deletes R1: absent, as the insert expected. The insert comes
    // again, then a decision that holds only if the insert was written.
    dv.batch_execute("DELETE FROM accounts WHERE accountnumber = 'R1'")
        .await
        .unwrap();
    let mut next = decision("customers", "public.accounts", &key, &[("name", "After")]);
    next.version = 1001;
    next.expect.kind = ExpectKind::Row;
    next.expect.present = true;
    next.expect.values = first.values.clone();
    send_decisions(&env, &[first, next]).await;
    eventually("the next decision is found superseded", WAIT, || async {
        text(&dv, decided).await.as_deref() == Some("1001")
    })
    .await;
    assert_eq!(
        text(
            &dv,
            "SELECT count(*)::text FROM accounts WHERE accountnumber = 'R1'"
        )
        .await
        .as_deref(),
        Some("0"),
        "the insert delivered again was written"
    );
    env.cleanup().await;
}
