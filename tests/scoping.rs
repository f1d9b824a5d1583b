//! End-to-end: composite alternate keys (company + account number), company
//! scoping of a map, and editing a running map's mapping.

mod support;

use std::time::Duration;

use support::{eventually, text, TestEnv};

const WAIT: Duration = Duration::from_secs(60);

/// Tables keyed by company and account number on both sides.
const LEFT_TABLE: &str = "CREATE TABLE custtable (
    dataareaid text NOT NULL,
    accountnum text NOT NULL,
    name       text,
    PRIMARY KEY (dataareaid, accountnum));
  ALTER TABLE custtable REPLICA IDENTITY FULL;";
const RIGHT_TABLE: &str = "CREATE TABLE companyaccounts (
    company       text NOT NULL,
    accountnumber text NOT NULL,
    name          text,
    UNIQUE (company, accountnumber));
  ALTER TABLE companyaccounts REPLICA IDENTITY FULL;";

/// The map over those tables, with `extra` settings (and entity options).
fn map(left_extra: &str, right_extra: &str, extra: &str) -> String {
    format!(
        r#"
[[map]]
name = "company_accounts"
left = {{ entity = "custtable", key = ["dataareaid", "accountnum"]{left_extra} }}
right = {{ entity = "companyaccounts", key = ["company", "accountnumber"]{right_extra} }}
{extra}
field = [
  {{ left = "dataareaid", right = "company" }},
  {{ left = "accountnum", right = "accountnumber" }},
  {{ left = "name", right = "name" }},
]
"#
    )
}

async fn setup(name: &str, extra: &str, left_rows: &str, right_rows: &str) -> TestEnv {
    let env = TestEnv::with_config(name, extra).await;
    let fno = env.fno().await;
    let dv = env.dv().await;
    fno.batch_execute(LEFT_TABLE).await.unwrap();
    dv.batch_execute(RIGHT_TABLE).await.unwrap();
    if !left_rows.is_empty() {
        fno.batch_execute(&format!("INSERT INTO custtable VALUES {left_rows}"))
            .await
            .unwrap();
    }
    if !right_rows.is_empty() {
        dv.batch_execute(&format!("INSERT INTO companyaccounts VALUES {right_rows}"))
            .await
            .unwrap();
    }
    env
}

/// `company/account=name;…` of a table, in key order.
async fn rows(c: &tokio_postgres::Client, table: &str, company: &str, acct: &str) -> String {
    text(
        c,
        &format!(
            "SELECT coalesce(string_agg({company} || '/' || {acct} || '=' || coalesce(name, '-'), ';' ORDER BY {company}, {acct}), '') FROM {table}"
        ),
    )
    .await
    .unwrap_or_default()
}

async fn left(env: &TestEnv) -> String {
    rows(&env.fno().await, "custtable", "dataareaid", "accountnum").await
}
async fn right(env: &TestEnv) -> String {
    rows(
        &env.dv().await,
        "companyaccounts",
        "company",
        "accountnumber",
    )
    .await
}

fn run_map(env: &TestEnv, map: &str) {
    let (code, out, err) = env.run(&["ctl", "run", map, "--timeout-secs", "60"]);
    assert_eq!(code, 0, "ctl run failed:\n{out}\n{err}\n{}", env.logs());
}

/// A record is identified by company + account number: the same account
/// number in two companies is two records; a change of either key field
/// is a delete of the old record and an upsert of the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_keys_sync_both_ways() {
    let mut env = setup(
        "compkey",
        &map("", "", ""),
        "('usmf', 'A1', 'US one'), ('demf', 'A1', 'DE one'), ('usmf', 'A2', 'US two')",
        "",
    )
    .await;
    env.start_all();
    env.wait_for_slots(2).await;
    run_map(&env, "company_accounts");
    // The initial write copied the rows (its cursor reads in composite key order).
    let initial = "demf/A1=DE one;usmf/A1=US one;usmf/A2=US two";
    assert_eq!(right(&env).await, initial);
    let fno = env.fno().await;
    let dv = env.dv().await;

    // Insert and update left → right, update right → left.
    fno.batch_execute(
        "INSERT INTO custtable VALUES ('demf', 'A2', 'DE two');
         UPDATE custtable SET name = 'US one b' WHERE dataareaid = 'usmf' AND accountnum = 'A1';",
    )
    .await
    .unwrap();
    dv.batch_execute(
        "UPDATE companyaccounts SET name = 'DE one b' WHERE company = 'demf' AND accountnumber = 'A1'",
    )
    .await
    .unwrap();
    let want = "demf/A1=DE one b;demf/A2=DE two;usmf/A1=US one b;usmf/A2=US two";
    eventually("inserts and updates sync both ways", WAIT, || async {
        left(&env).await == want && right(&env).await == want
    })
    .await;

    // Key changes: the company of one record (left), the account number of another (right).
    fno.batch_execute(
        "UPDATE custtable SET dataareaid = 'frrt' WHERE dataareaid = 'usmf' AND accountnum = 'A2'",
    )
    .await
    .unwrap();
    dv.batch_execute(
        "UPDATE companyaccounts SET accountnumber = 'A9' WHERE company = 'demf' AND accountnumber = 'A2'",
    )
    .await
    .unwrap();
    let want = "demf/A1=DE one b;demf/A9=DE two;frrt/A2=US two;usmf/A1=US one b";
    eventually(
        "key changes move the records on the other side",
        WAIT,
        || async { left(&env).await == want && right(&env).await == want },
    )
    .await;

    // Deletes both ways: only the record of that company goes.
    dv.batch_execute("DELETE FROM companyaccounts WHERE company = 'demf' AND accountnumber = 'A1'")
        .await
        .unwrap();
    fno.batch_execute("DELETE FROM custtable WHERE dataareaid = 'frrt'")
        .await
        .unwrap();
    let want = "demf/A9=DE two;usmf/A1=US one b";
    eventually("deletes sync both ways", WAIT, || async {
        left(&env).await == want && right(&env).await == want
    })
    .await;
    env.cleanup().await;
}

/// A map scoped to companies usmf and demf: only their records sync, the
/// initial write copies only them, a record leaving the scope is deleted on
/// the other side (`on_filter_exit = "delete"`), one entering it is created,
/// and `ctl verify` compares the records in scope only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn company_scope_limits_what_syncs() {
    let mut env = setup(
        "companies",
        &map(
            ", company_field = \"dataareaid\"",
            ", company_field = \"company\", filter = \"name == null || !name.startsWith('internal')\"",
            "companies = [\"usmf\", \"DEMF\"]\non_filter_exit = \"delete\"",
        ),
        "('usmf', 'A1', 'US one'), ('demf', 'A2', 'DE two'), ('frrt', 'A3', 'FR three')",
        "('usmf', 'B1', 'US b'), ('gbsi', 'B2', 'GB b'), ('usmf', 'B3', 'internal b')",
    )
    .await;
    env.start_all();
    env.wait_for_slots(2).await;
    run_map(&env, "company_accounts");
    // Initial write: only rows in scope were copied, each way.
    assert_eq!(
        left(&env).await,
        "demf/A2=DE two;frrt/A3=FR three;usmf/A1=US one;usmf/B1=US b"
    );
    assert_eq!(
        right(&env).await,
        "demf/A2=DE two;gbsi/B2=GB b;usmf/A1=US one;usmf/B1=US b;usmf/B3=internal b"
    );
    let fno = env.fno().await;
    let dv = env.dv().await;

    fno.batch_execute(
        "INSERT INTO custtable VALUES ('frrt', 'A4', 'FR four'), ('demf', 'A5', 'DE five');
         UPDATE custtable SET name = 'FR three b' WHERE accountnum = 'A3';
         UPDATE custtable SET dataareaid = 'frrt' WHERE accountnum = 'A1';",
    )
    .await
    .unwrap();
    dv.batch_execute(
        "UPDATE companyaccounts SET company = 'usmf' WHERE accountnumber = 'B2';
         UPDATE companyaccounts SET name = 'public b' WHERE accountnumber = 'B3';",
    )
    .await
    .unwrap();
    eventually("only records in scope sync; leaving deletes, entering creates", WAIT, || async {
        left(&env).await
            == "demf/A2=DE two;demf/A5=DE five;frrt/A1=US one;frrt/A3=FR three b;frrt/A4=FR four;usmf/B1=US b;usmf/B2=GB b;usmf/B3=public b"
            && right(&env).await
                == "demf/A2=DE two;demf/A5=DE five;usmf/B1=US b;usmf/B2=GB b;usmf/B3=public b"
    })
    .await;

    // A record that enters the scope by a non-key change (the right filter).
    dv.batch_execute("UPDATE companyaccounts SET name = 'internal x' WHERE accountnumber = 'B1'")
        .await
        .unwrap();
    fno.batch_execute("UPDATE custtable SET dataareaid = 'usmf' WHERE accountnum = 'A3'")
        .await
        .unwrap();
    eventually(
        "a filter exit deletes, a company entry creates",
        WAIT,
        || async {
            text(&fno, "SELECT count(*)::text FROM custtable WHERE accountnum = 'B1'")
            .await
            .as_deref()
            == Some("0")
            && text(
                &dv,
                "SELECT name FROM companyaccounts WHERE company = 'usmf' AND accountnumber = 'A3'",
            )
            .await
            .as_deref()
                == Some("FR three b")
        },
    )
    .await;

    // verify compares the records in scope only: the two sides agree.
    let (code, out, err) = env.run(&["ctl", "verify", "company_accounts"]);
    assert_eq!(code, 0, "verify:\n{out}\n{err}");
    env.cleanup().await;
}

/// Editing the mapping of a running map and restarting the services: the
/// map keeps its version, turns Failed with the reason and holds its
/// changes, until it is stopped and run again, which adopts the new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_a_running_map_holds_it_until_it_is_run_again() {
    let mut env = setup("mapversion", &map("", "", ""), "('usmf', 'A1', 'one')", "").await;
    env.start_all();
    env.wait_for_slots(2).await;
    run_map(&env, "company_accounts");
    let row = |env: &TestEnv| {
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&env.ctl(&["maps", "--json"])).unwrap();
        rows.into_iter()
            .find(|r| r["map"] == "company_accounts")
            .unwrap()
    };
    let r = row(&env);
    let v1 = r["mapping_version"].as_str().unwrap().to_owned();
    assert_eq!(r["configured_version"], v1.as_str());

    // Edit the mapping (name syncs left to right only) and restart every service.
    for i in 0..6 {
        env.service(i).stop();
    }
    let text_before = std::fs::read_to_string(&env.config).unwrap();
    let edited = text_before.replace(
        "{ left = \"name\", right = \"name\" }",
        "{ left = \"name\", right = \"name\", direction = \"left_to_right\" }",
    );
    assert_ne!(edited, text_before);
    std::fs::write(&env.config, edited).unwrap();
    for i in 0..6 {
        env.service(i).restart();
    }
    eventually("the edited map is held (Failed)", WAIT, || async {
        env.states().get("company_accounts").map(String::as_str) == Some("Failed")
    })
    .await;
    let r = row(&env);
    let v2 = r["configured_version"].as_str().unwrap().to_owned();
    assert_ne!(v1, v2);
    assert_eq!(r["mapping_version"], v1.as_str(), "{r}");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains("mapping edited") && reason.contains(&format!("{v1} → {v2}")),
        "{reason}"
    );
    let table = env.ctl(&["maps"]);
    assert!(table.contains(&format!("{v1}→{v2}")), "{table}");

    // Stop, then run: the new version is adopted and changes flow again.
    env.ctl(&["stop", "company_accounts", "--timeout-secs", "60"]);
    run_map(&env, "company_accounts");
    let r = row(&env);
    assert_eq!(r["state"], "Running");
    assert_eq!(r["mapping_version"], v2.as_str());
    env.fno()
        .await
        .batch_execute("UPDATE custtable SET name = 'one b' WHERE accountnum = 'A1'")
        .await
        .unwrap();
    eventually("changes flow with the new mapping", WAIT, || async {
        right(&env).await == "usmf/A1=one b"
    })
    .await;
    env.cleanup().await;
}

/// A record that leaves its side's scope, is edited there while out of it
/// and comes back carries its current values to the other side, whichever
/// side is the conflict master (issue: the master's stale copy used to be
/// re-asserted over the newer values, reverting them on their own side).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_re_entering_its_scope_keeps_its_newer_values() {
    for (exit, master) in [
        ("keep", "dataverse"),
        ("delete", "dataverse"),
        ("keep", "fno"),
    ] {
        let mut env = setup(
            &format!("reentry-{exit}-{master}"),
            &map(
                ", filter = \"name == null || !name.startsWith('hold')\"",
                "",
                &format!("on_filter_exit = \"{exit}\"\nconflict_master = \"{master}\""),
            ),
            "('usmf', 'A1', 'one'), ('usmf', 'A2', 'two')",
            "",
        )
        .await;
        env.start_all();
        env.wait_for_slots(2).await;
        run_map(&env, "company_accounts");
        let fno = env.fno().await;
        // Edited on the master side first, so the master has a change of its own.
        if master == "dataverse" {
            env.dv()
                .await
                .batch_execute(
                    "UPDATE companyaccounts SET name = 'one b' WHERE accountnumber = 'A1'",
                )
                .await
                .unwrap();
            eventually("the master's edit syncs", WAIT, || async {
                left(&env).await == "usmf/A1=one b;usmf/A2=two"
            })
            .await;
        }
        // Out of scope, edited while out, back in scope.
        for name in ["hold x", "hold y", "three"] {
            fno.batch_execute(&format!(
                "UPDATE custtable SET name = '{name}' WHERE accountnum = 'A1'"
            ))
            .await
            .unwrap();
        }
        let want = "usmf/A1=three;usmf/A2=two";
        eventually(
            &format!("re-entry carries the newer values ({exit}, master {master})"),
            WAIT,
            || async { left(&env).await == want && right(&env).await == want },
        )
        .await;
        env.cleanup().await;
    }
}
