//! End-to-end: both sides change the same records before sync catches up;
//! both end with the conflict master's values, with no ping-pong.

mod support;

use std::time::Duration;

use support::{all_drained, eventually, TestEnv};

const WAIT: Duration = Duration::from_secs(90);

/// (name, phone) of a customer on each side; None when absent.
async fn both(env: &TestEnv, acct: &str) -> (Option<(String, String)>, Option<(String, String)>) {
    let fno = env.fno().await;
    let dv = env.dv().await;
    let l = fno
        .query_opt("SELECT organizationname, coalesce(primaryphone, '') FROM customers_v3 WHERE customeraccount = $1", &[&acct])
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1)));
    let r = dv
        .query_opt(
            "SELECT name, coalesce(telephone1, '') FROM accounts WHERE accountnumber = $1",
            &[&acct],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1)));
    (l, r)
}

/// Makes concurrent edits while customers is paused (both directions queue), then resumes.
async fn conflicting_edits(env: &TestEnv, resume: &[&str]) {
    let fno = env.fno().await;
    let dv = env.dv().await;
    env.ctl(&["pause", "customers"]);
    fno.batch_execute(
        "UPDATE customers_v3 SET organizationname = 'L20' WHERE customeraccount = 'C0020';
         UPDATE customers_v3 SET organizationname = 'L21' WHERE customeraccount = 'C0021';
         DELETE FROM customers_v3 WHERE customeraccount = 'C0022';
         UPDATE customers_v3 SET organizationname = 'L23' WHERE customeraccount = 'C0023';
         INSERT INTO customers_v3 (customeraccount, organizationname) VALUES ('C7000', 'L7000');
         UPDATE customers_v3 SET primaryphone = 'L-phone' WHERE customeraccount = 'C0024';",
    )
    .await
    .unwrap();
    dv.batch_execute(
        "UPDATE accounts SET name = 'R20' WHERE accountnumber = 'C0020';
         DELETE FROM accounts WHERE accountnumber = 'C0021';
         UPDATE accounts SET name = 'R22' WHERE accountnumber = 'C0022';
         INSERT INTO accounts (accountnumber, name) VALUES ('C7000', 'R7000');
         UPDATE accounts SET name = 'R24' WHERE accountnumber = 'C0024';",
    )
    .await
    .unwrap();
    let mut args = vec!["run", "customers"];
    args.extend_from_slice(resume);
    env.ctl(&args);
}

async fn converge(env: &TestEnv, expect: &[(&str, Option<(&str, &str)>)]) {
    for (acct, want) in expect {
        let want = want.map(|(n, p)| (n.to_owned(), p.to_owned()));
        let mut last = (None, None);
        let ok = tokio::time::timeout(WAIT, async {
            loop {
                last = both(env, acct).await;
                if last.0 == want && last.1 == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            ok.is_ok(),
            "{acct}: want {want:?} on both sides, have fno {:?}, dataverse {:?}\n{}",
            last.0,
            last.1,
            env.logs()
        );
    }
}

/// Records on a topic (sum over partitions).
fn records(env: &TestEnv, topic: &str) -> i64 {
    let cfg =
        dualwrite_model::Config::parse(&std::fs::read_to_string(&env.config).unwrap()).unwrap();
    dualwrite_runtime::kafka::watermarks(&cfg.kafka, &format!("{}.{topic}", env.prefix))
        .unwrap()
        .iter()
        .map(|(_, lo, hi)| hi - lo)
        .sum()
}

/// After convergence nothing keeps flowing: a marker round trip leaves the
/// capture topics with exactly the marker's own change (left) and the
/// right applier's report of its write (right).
async fn no_ping_pong(env: &TestEnv) {
    all_drained(env).await;
    let (l, r) = (
        records(env, "capture.fno"),
        records(env, "capture.dataverse"),
    );
    env.fno()
        .await
        .batch_execute("UPDATE currencies SET symbol = 'marker' WHERE currencycode = 'JPY'")
        .await
        .unwrap();
    let dv = env.dv().await;
    eventually("marker arrives", WAIT, || async {
        dv.query_opt(
            "SELECT 1 FROM transactioncurrencies WHERE currencysymbol = 'marker'",
            &[],
        )
        .await
        .unwrap()
        .is_some()
    })
    .await;
    all_drained(env).await;
    assert_eq!(
        (
            records(env, "capture.fno"),
            records(env, "capture.dataverse")
        ),
        (l + 1, r + 1),
        "changes kept flowing after convergence"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_converge_to_the_default_master() {
    let mut env = TestEnv::new("conflict").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    conflicting_edits(&env, &[]).await;
    // The Dataverse-like side (right) is the default master.
    converge(
        &env,
        &[
            ("C0020", Some(("R20", "+45 10000020"))),
            ("C0021", None), // deleted on the master, updated on the other side
            ("C0022", Some(("R22", "+45 10000022"))), // updated on the master, deleted on the other side
            ("C0023", Some(("L23", "+45 10000023"))), // no conflict
            ("C7000", Some(("R7000", ""))),           // inserted on both sides
            ("C0024", Some(("R24", "+45 10000024"))), // different fields changed: the master's row wins whole
        ],
    )
    .await;
    no_ping_pong(&env).await;
    let (code, out, err) = env.run(&["ctl", "verify", "customers"]);
    assert_eq!(code, 0, "{out}{err}");

    // The checker finds a difference made while the map does not run.
    env.ctl(&["stop", "customers"]);
    env.dv()
        .await
        .batch_execute(
            "UPDATE accounts SET name = 'changed while stopped' WHERE accountnumber = 'C0030'",
        )
        .await
        .unwrap();
    let (code, out, _) = env.run(&["ctl", "verify", "customers", "--json"]);
    assert_eq!(code, 1, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report[0]["differing"][0]["key"], "[\"C0030\"]", "{out}");
    assert_eq!(
        report[0]["differing"][0]["right"], "changed while stopped",
        "{out}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_master_chosen_at_run_wins() {
    let mut env = TestEnv::new("master").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    conflicting_edits(&env, &["--conflict-master", "fno"]).await;
    converge(
        &env,
        &[
            ("C0020", Some(("L20", "+45 10000020"))),
            ("C0021", Some(("L21", "+45 10000021"))),
            ("C0022", None),
            ("C0023", Some(("L23", "+45 10000023"))),
            ("C7000", Some(("L7000", ""))),
            ("C0024", Some(("Customer 24 Ltd", "L-phone"))),
        ],
    )
    .await;
    no_ping_pong(&env).await;
    env.cleanup().await;
}
