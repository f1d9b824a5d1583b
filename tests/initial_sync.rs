//! End-to-end: the initial write of pre-existing rows when maps are run,
//! against the real broker and PostgreSQL.

mod support;

use std::time::Duration;

use support::{eventually, text, TestEnv};

const WAIT: Duration = Duration::from_secs(90);

fn details(env: &TestEnv, map: &str) -> serde_json::Value {
    serde_json::from_str(&env.ctl(&["initial-sync", map, "--json"])).unwrap()
}

fn counts(d: &serde_json::Value) -> (i64, i64, i64, i64) {
    let p = &d["progress"];
    (
        p["created"].as_i64().unwrap(),
        p["updated"].as_i64().unwrap(),
        p["unchanged"].as_i64().unwrap(),
        p["failed"].as_i64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_reconciles_pre_existing_rows_in_dependency_order() {
    let mut env = TestEnv::new("initsync").await;
    let fno = env.fno().await;
    let dv = env.dv().await;
    // Rows that exist before the maps run: some on one side only (with a
    // customer group on that side only, so parents must be copied first),
    // some on both with different values, one the left side will reject.
    fno.batch_execute(
        "INSERT INTO customer_groups VALUES ('G90', 'Left-only group', 'Net30');
         INSERT INTO customers_v3 (customeraccount, organizationname, customergroupid, salescurrencycode, creditlimit)
           VALUES ('C9100', 'Left only', 'G90', 'EUR', 100);
         UPDATE customers_v3 SET organizationname = 'Left name' WHERE customeraccount = 'C0001';
         UPDATE customers_v3 SET creditlimit = 5 WHERE customeraccount = 'C0002';
         ALTER TABLE customers_v3 ADD CONSTRAINT no_rejects CHECK (organizationname <> 'REJECT ME');",
    )
    .await
    .unwrap();
    dv.batch_execute(
        "INSERT INTO msdyn_customergroups (msdyn_groupid, msdyn_description, msdyn_paymentterm) VALUES ('G91', 'Right-only group', 'Net60');
         INSERT INTO accounts (accountnumber, name, msdyn_customergroupid, transactioncurrencycode)
           VALUES ('C9200', 'Right only', 'G91', 'USD'), ('C9300', 'REJECT ME', 'G01', 'USD');
         UPDATE accounts SET name = 'Right name' WHERE accountnumber = 'C0001';
         UPDATE accounts SET creditlimit = 7 WHERE accountnumber = 'C0002';",
    )
    .await
    .unwrap();

    env.start_all();
    env.wait_for_slots(2).await;
    // Waits until every map completed: the initial writes are done.
    env.run_all_maps();
    assert!(
        env.states().values().all(|s| s == "Running"),
        "{:?}",
        env.states()
    );

    // Rows on one side only were created on the other, parents first.
    assert_eq!(
        text(
            &dv,
            "SELECT name FROM accounts WHERE accountnumber = 'C9100'"
        )
        .await
        .as_deref(),
        Some("Left only")
    );
    assert_eq!(
        text(
            &dv,
            "SELECT msdyn_description FROM msdyn_customergroups WHERE msdyn_groupid = 'G90'"
        )
        .await
        .as_deref(),
        Some("Left-only group")
    );
    assert_eq!(
        text(&fno, "SELECT organizationname || '|' || customergroupid FROM customers_v3 WHERE customeraccount = 'C9200'").await.as_deref(),
        Some("Right only|G91")
    );
    // Rows on both: the master (dataverse, the default) wins the fields that
    // sync both ways; the left-to-right credit limit comes from the left.
    assert_eq!(
        text(
            &fno,
            "SELECT organizationname FROM customers_v3 WHERE customeraccount = 'C0001'"
        )
        .await
        .as_deref(),
        Some("Right name")
    );
    assert_eq!(
        text(
            &dv,
            "SELECT creditlimit::text FROM accounts WHERE accountnumber = 'C0002'"
        )
        .await
        .as_deref(),
        Some("5.00")
    );
    let groups = details(&env, "customer_groups");
    let customers = details(&env, "customers");
    assert_eq!(groups["progress"]["phase"], "done");
    assert!(
        groups["progress"]["finished_at"].as_i64().unwrap()
            <= customers["progress"]["started_at"].as_i64().unwrap(),
        "customers copied before its customer groups finished: {groups} {customers}"
    );
    // Counts: 300 demo customers and 4 extra rows. C9100 and C9200 created,
    // C0001 and C0002 updated, the rejected row failed, the rest unchanged.
    assert_eq!(counts(&customers), (2, 2, 298, 1), "{customers}");
    let p = &customers["progress"];
    assert_eq!(p["rows_done"], p["rows_total"]);
    assert_eq!(p["rows_total"].as_i64().unwrap(), 301 + 302);
    // The failed row is recorded with its run, side, key and error.
    let failed = customers["failed_rows"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{customers}");
    assert_eq!(failed[0]["key"], "[\"C9300\"]");
    assert_eq!(failed[0]["target_side"], "fno");
    assert_eq!(failed[0]["run"], 1);
    assert!(
        failed[0]["message"]
            .as_str()
            .unwrap()
            .contains("no_rejects"),
        "{}",
        failed[0]
    );
    let table = env.ctl(&["maps"]);
    assert!(table.contains("done, 1 failed"), "{table}");
    let text_out = env.ctl(&["initial-sync", "customers"]);
    assert!(
        text_out.contains("2 created, 2 updated, 298 unchanged, 1 failed")
            && text_out.contains("C9300"),
        "{text_out}"
    );
    // The initial write's own writes do not come back as changes.
    let (code, out, _) = env.run(&["ctl", "verify", "customers"]);
    assert_eq!(code, 1, "only the rejected row differs:\n{out}");
    assert!(out.contains("C9300"), "{out}");

    // Fix the data, rerun: only the failed row is written.
    fno.batch_execute("ALTER TABLE customers_v3 DROP CONSTRAINT no_rejects")
        .await
        .unwrap();
    env.ctl(&["rerun-initial-sync", "customers", "--timeout-secs", "60"]);
    let again = details(&env, "customers");
    assert_eq!(again["run"], 2);
    assert_eq!(counts(&again), (1, 0, 302, 0), "{again}");
    assert!(again["failed_rows"].as_array().unwrap().is_empty());
    assert_eq!(
        text(
            &fno,
            "SELECT organizationname FROM customers_v3 WHERE customeraccount = 'C9300'"
        )
        .await
        .as_deref(),
        Some("REJECT ME")
    );
    // Live sync goes on after the rerun.
    dv.batch_execute("UPDATE accounts SET name = 'Live again' WHERE accountnumber = 'C9300'")
        .await
        .unwrap();
    eventually("live change after the rerun", WAIT, || async {
        text(
            &fno,
            "SELECT organizationname FROM customers_v3 WHERE customeraccount = 'C9300'",
        )
        .await
        .as_deref()
            == Some("Live again")
    })
    .await;
    let (code, out, _) = env.run(&["ctl", "verify"]);
    assert_eq!(code, 0, "{out}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_chosen_at_run_and_initial_sync_off() {
    let mut env = TestEnv::new("initmaster").await;
    let fno = env.fno().await;
    let dv = env.dv().await;
    fno.batch_execute(
        "UPDATE customers_v3 SET organizationname = 'Left name' WHERE customeraccount = 'C0001';
         INSERT INTO contacts VALUES ('P9100', 'C0001', 'Pre', 'Existing', 'pre@example.com');",
    )
    .await
    .unwrap();
    dv.batch_execute("UPDATE accounts SET name = 'Right name' WHERE accountnumber = 'C0001'")
        .await
        .unwrap();
    env.start_all();
    env.wait_for_slots(2).await;
    // The run names the left side master: its values win the copy.
    env.ctl(&[
        "run",
        "customers",
        "--include-related",
        "--conflict-master",
        "fno",
        "--timeout-secs",
        "60",
    ]);
    assert_eq!(
        text(
            &dv,
            "SELECT name FROM accounts WHERE accountnumber = 'C0001'"
        )
        .await
        .as_deref(),
        Some("Left name")
    );
    assert_eq!(
        text(
            &fno,
            "SELECT organizationname FROM customers_v3 WHERE customeraccount = 'C0001'"
        )
        .await
        .as_deref(),
        Some("Left name")
    );
    assert_eq!(counts(&details(&env, "customers")).1, 1);

    // Initial sync off: live sync of later changes only.
    env.ctl(&[
        "run",
        "contacts",
        "--initial-sync",
        "false",
        "--timeout-secs",
        "60",
    ]);
    assert_eq!(env.states()["contacts"], "Running");
    assert!(details(&env, "contacts")["run"].is_null());
    fno.batch_execute(
        "INSERT INTO contacts VALUES ('P9101', 'C0001', 'Later', 'Change', 'later@example.com')",
    )
    .await
    .unwrap();
    eventually("the later contact reaches the right side", WAIT, || async {
        text(
            &dv,
            "SELECT lastname FROM contacts WHERE msdyn_contactpersonid = 'P9101'",
        )
        .await
        .is_some()
    })
    .await;
    assert_eq!(
        text(
            &dv,
            "SELECT lastname FROM contacts WHERE msdyn_contactpersonid = 'P9100'"
        )
        .await,
        None,
        "a row that existed before a run without initial sync was copied"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_during_initial_sync_survive_and_a_killed_copy_resumes() {
    let mut env = TestEnv::new("initcrash").await;
    let fno = env.fno().await;
    let dv = env.dv().await;
    // Enough rows on each side only that the copy takes a while.
    fno.batch_execute(
        "INSERT INTO customers_v3 (customeraccount, organizationname, customergroupid, salescurrencycode)
           SELECT 'L' || lpad(i::text, 6, '0'), 'Left ' || i, 'G01', 'EUR' FROM generate_series(1, 15000) i;",
    )
    .await
    .unwrap();
    dv.batch_execute(
        "INSERT INTO accounts (accountnumber, name, msdyn_customergroupid, transactioncurrencycode)
           SELECT 'R' || lpad(i::text, 6, '0'), 'Right ' || i, 'G02', 'USD' FROM generate_series(1, 15000) i;",
    )
    .await
    .unwrap();
    env.start_all();
    env.wait_for_slots(2).await;
    env.ctl(&["run", "customer_groups", "--initial-sync", "false"]);
    env.ctl(&["run", "currencies", "--initial-sync", "false"]);
    env.ctl(&["run", "customers", "--timeout-secs", "0"]);

    // While it copies: kill the pause buffer (which runs the copy), change
    // rows on both sides, before and after where the copy is, restart it.
    eventually("the copy has started", WAIT, || async {
        let d = details(&env, "customers");
        d["progress"]["phase"] == "copying" && d["progress"]["rows_done"].as_i64().unwrap_or(0) > 0
    })
    .await;
    let pause_buffer = 3;
    env.service(pause_buffer).kill9();
    fno.batch_execute(
        "UPDATE customers_v3 SET organizationname = 'Left changed early' WHERE customeraccount = 'L000001';
         UPDATE customers_v3 SET organizationname = 'Left changed late' WHERE customeraccount = 'L015000';
         INSERT INTO customers_v3 (customeraccount, organizationname, customergroupid, salescurrencycode)
           VALUES ('N000001', 'New while copying', 'G03', 'GBP');",
    )
    .await
    .unwrap();
    dv.batch_execute(
        "UPDATE accounts SET name = 'Right changed late' WHERE accountnumber = 'R015000';
         UPDATE accounts SET name = 'Demo changed' WHERE accountnumber = 'C0150';",
    )
    .await
    .unwrap();
    env.service(pause_buffer).restart();
    eventually("customers running after the copy resumed", WAIT, || async {
        env.states().get("customers").map(String::as_str) == Some("Running")
    })
    .await;
    let d = details(&env, "customers");
    let p = &d["progress"];
    assert_eq!(p["phase"], "done", "{d}");
    assert!(
        p["segments"].as_array().unwrap().len() >= 2,
        "the copy did not continue from a checkpoint with new snapshots: {d}"
    );
    assert_eq!(p["failed"], 0, "{d}");
    let secs =
        (p["finished_at"].as_i64().unwrap() - p["started_at"].as_i64().unwrap()) as f64 / 1e6;
    eprintln!(
        "initial sync: {} rows read, {} created, in {secs:.1} s including a kill -9 and restart",
        p["rows_total"], p["created"]
    );

    for (db, sql, want) in [
        (
            &dv,
            "SELECT name FROM accounts WHERE accountnumber = 'L000001'",
            "Left changed early",
        ),
        (
            &dv,
            "SELECT name FROM accounts WHERE accountnumber = 'L015000'",
            "Left changed late",
        ),
        (
            &dv,
            "SELECT name FROM accounts WHERE accountnumber = 'N000001'",
            "New while copying",
        ),
        (
            &fno,
            "SELECT organizationname FROM customers_v3 WHERE customeraccount = 'R015000'",
            "Right changed late",
        ),
        (
            &fno,
            "SELECT organizationname FROM customers_v3 WHERE customeraccount = 'C0150'",
            "Demo changed",
        ),
    ] {
        eventually(&format!("{sql} = {want}"), WAIT, || async {
            text(db, sql).await.as_deref() == Some(want)
        })
        .await;
    }
    support::all_drained(&env).await;
    let (code, out, _) = env.run(&["ctl", "verify", "customers"]);
    assert_eq!(code, 0, "{out}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapping_that_does_not_fit_the_tables_is_not_run_and_every_problem_is_named() {
    let mut env = TestEnv::new("initschema").await;
    let fno = env.fno().await;
    fno.batch_execute(
        "ALTER TABLE customers_v3 DROP COLUMN primaryemail;
         ALTER TABLE customers_v3 ALTER COLUMN onhold DROP DEFAULT;
         ALTER TABLE customers_v3 ALTER COLUMN onhold TYPE integer USING onhold::int;",
    )
    .await
    .unwrap();
    // Contacts cascade with their customer on the fno side only (issue
    // 16.7): the applier's deletes there would remove contacts that the
    // other side keeps.
    let dv = env.dv().await;
    dv.batch_execute("ALTER TABLE contacts DROP CONSTRAINT contacts_parentcustomernumber_fkey")
        .await
        .unwrap();
    env.start_all();
    env.wait_for_slots(2).await;
    // The run is rejected with every problem; the map stays as it was.
    let (code, out, err) = env.run(&["ctl", "run", "customers", "--timeout-secs", "60"]);
    assert_ne!(code, 0, "the run should be rejected:\n{out}\n{err}");
    let said = format!("{out}{err}");
    for want in [
        "map `customers` does not fit its tables",
        "field `primaryemail`: column primaryemail does not exist in public.customers_v3",
        "fno onhold (integer) cannot be converted to dataverse creditonhold (boolean)",
        "side `fno`: ON DELETE CASCADE of constraint `contacts_customeraccount_fkey` on public.contacts (map `contacts`)",
        "`dataverse` has no foreign key from public.contacts to public.accounts",
    ] {
        assert!(said.contains(want), "`{want}` not in: {said}");
    }
    assert_eq!(env.states()["customers"], "Not running");
    // The same problems from the CLI, at any time.
    let (code, out, _) = env.run(&["ctl", "check-schema", "customers"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("primaryemail")
            && out.contains("onhold")
            && out.contains("contacts_customeraccount_fkey"),
        "{out}"
    );

    // Fixed, the map runs.
    fno.batch_execute(
        "ALTER TABLE customers_v3 ADD COLUMN primaryemail text;
         ALTER TABLE customers_v3 ALTER COLUMN onhold TYPE boolean USING onhold <> 0;",
    )
    .await
    .unwrap();
    // A plain foreign key on the other side is enough: its own deletes
    // cannot leave contacts behind.
    dv.batch_execute(
        "ALTER TABLE contacts ADD FOREIGN KEY (parentcustomernumber) REFERENCES accounts (accountnumber)",
    )
    .await
    .unwrap();
    assert!(env
        .ctl(&["check-schema", "customers"])
        .contains("fits both tables"));
    env.ctl(&["run", "customers", "--timeout-secs", "60"]);
    assert_eq!(env.states()["customers"], "Running");
    env.cleanup().await;
}

/// Issue 16.4: a rerun while changes of the side that is not the conflict
/// master are still on their way (held up in the router here, so they are
/// committed before the copy's snapshot but not yet on the map topic): the
/// copy must neither bring the deleted rows back nor overwrite the edits
/// with the master's values. Each change is carried by live sync after the
/// copy instead, and the copy leaves its record alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_does_not_undo_changes_still_on_their_way() {
    let mut env = TestEnv::new("initflight").await;
    let fno = env.fno().await;
    let dv = env.dv().await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    fno.batch_execute(
        "INSERT INTO customers_v3 (customeraccount, organizationname, customergroupid, salescurrencycode)
           SELECT 'W' || lpad(i::text, 4, '0'), 'Before ' || i, 'G01', 'EUR' FROM generate_series(1, 100) i;",
    )
    .await
    .unwrap();
    let on_dv = "SELECT count(*)::text FROM accounts WHERE accountnumber LIKE 'W%'";
    eventually("the new rows reached the other side", WAIT, || async {
        text(&dv, on_dv).await.as_deref() == Some("100")
    })
    .await;
    support::all_drained(&env).await;

    // The router stops: what the fno side changes now waits in its capture topic.
    let router = 2;
    env.service(router).stop();
    fno.batch_execute(
        "DELETE FROM customers_v3 WHERE customeraccount BETWEEN 'W0001' AND 'W0050';
         UPDATE customers_v3 SET organizationname = 'Edited on its way'
           WHERE customeraccount BETWEEN 'W0051' AND 'W0100';",
    )
    .await
    .unwrap();
    env.ctl(&["rerun-initial-sync", "customers", "--timeout-secs", "0"]);
    // It waits for the changes on their way (the router is stopped), its
    // snapshots recorded.
    eventually("the rerun read its snapshots and waits", WAIT, || async {
        let d = details(&env, "customers");
        d["run"] == 2
            && d["progress"]["phase"] == "waiting"
            && d["progress"]["segments"]
                .as_array()
                .is_some_and(|s| !s.is_empty())
    })
    .await;
    env.service(router).restart();
    eventually("customers running after the rerun", WAIT, || async {
        env.states().get("customers").map(String::as_str) == Some("Running")
    })
    .await;
    let d = details(&env, "customers");
    assert_eq!(d["progress"]["phase"], "done", "{d}");
    assert_eq!(d["progress"]["created"], 0, "the copy re-created rows: {d}");
    assert_eq!(d["progress"]["updated"], 0, "the copy overwrote edits: {d}");

    for (db, sql) in [
        (&fno, "SELECT count(*) || ' ' || count(*) FILTER (WHERE organizationname = 'Edited on its way') FROM customers_v3 WHERE customeraccount LIKE 'W%'"),
        (&dv, "SELECT count(*) || ' ' || count(*) FILTER (WHERE name = 'Edited on its way') FROM accounts WHERE accountnumber LIKE 'W%'"),
    ] {
        eventually(&format!("50 rows left, all edited: {sql}"), WAIT, || async {
            text(db, sql).await.as_deref() == Some("50 50")
        })
        .await;
    }
    support::all_drained(&env).await;
    let (code, out, _) = env.run(&["ctl", "verify", "customers"]);
    assert_eq!(code, 0, "{out}");
    env.cleanup().await;
}

/// Issue 16.8: skipping an initial write whose chunk is still being
/// written. The copy is creating two rows on the other side; one of them
/// waits for an open transaction that holds its key. The map is skipped
/// (Running) and the first row, already inserted by the waiting chunk, is
/// deleted on its own side. Live sync must not act before the chunk has
/// ended, or the delete reaches the other side first (where the row is not
/// yet committed) and the chunk's create brings it back afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_copy_ends_its_chunk_before_live_sync_goes_on() {
    let mut env = TestEnv::new("initskip").await;
    let fno = env.fno().await;
    let dv = env.dv().await;
    fno.batch_execute(
        "INSERT INTO customers_v3 (customeraccount, organizationname, customergroupid, salescurrencycode)
           VALUES ('Q0001', 'Deleted live', 'G01', 'EUR'), ('Q0002', 'Copied', 'G01', 'EUR');",
    )
    .await
    .unwrap();
    env.start_all();
    // (An open transaction would hold up the slots' creation.)
    env.wait_for_slots(2).await;
    let blocker = env.dv().await;
    blocker
        .batch_execute(
            "BEGIN; INSERT INTO accounts (accountnumber, name, msdyn_customergroupid, transactioncurrencycode)
               VALUES ('Q0002', 'Held', 'G01', 'USD');",
        )
        .await
        .unwrap();
    env.ctl(&["run", "customer_groups", "--initial-sync", "false"]);
    env.ctl(&["run", "currencies", "--initial-sync", "false"]);
    env.ctl(&["run", "customers", "--timeout-secs", "0"]);
    eventually("the copy's chunk waits for the held key", WAIT, || async {
        text(
            &dv,
            "SELECT (count(*) > 0)::text FROM pg_stat_activity
              WHERE application_name = 'dualwrite-initial-sync' AND wait_event_type = 'Lock'",
        )
        .await
        .as_deref()
            == Some("true")
    })
    .await;
    env.ctl(&["skip-initial-sync", "customers"]);
    eventually("customers running", WAIT, || async {
        env.states().get("customers").map(String::as_str) == Some("Running")
    })
    .await;
    fno.batch_execute("DELETE FROM customers_v3 WHERE customeraccount = 'Q0001'")
        .await
        .unwrap();
    // Either the delete went all the way through the other side's applier
    // (what happened before the fix), or the gate waits for the copy.
    let p = env.prefix.clone();
    eventually("the delete applied, or live sync waiting", WAIT, || async {
        let lag =
            |g: &str, t: &str| support::group_lag(&env, &format!("{p}.{g}"), &format!("{p}.{t}"));
        let cfg =
            dualwrite_model::Config::parse(&std::fs::read_to_string(&env.config).unwrap()).unwrap();
        let routed: i64 =
            dualwrite_runtime::kafka::watermarks(&cfg.kafka, &format!("{p}.map.customers"))
                .unwrap()
                .iter()
                .map(|(_, _, hi)| hi)
                .sum();
        let through = lag("router", "capture.fno") == 0
            && routed > 0
            && lag("pause-buffer.customers", "map.customers") == 0
            && lag("apply.dataverse", "apply.dataverse") == 0;
        through
            || env
                .logs()
                .contains("waits for the initial write's last chunk")
    })
    .await;
    blocker.batch_execute("ROLLBACK").await.unwrap();

    for (db, sql) in [
        (&fno, "SELECT coalesce(string_agg(customeraccount, ',' ORDER BY 1), '') FROM customers_v3 WHERE customeraccount LIKE 'Q%'"),
        (&dv, "SELECT coalesce(string_agg(accountnumber, ',' ORDER BY 1), '') FROM accounts WHERE accountnumber LIKE 'Q%'"),
    ] {
        eventually(&format!("only Q0002 left: {sql}"), WAIT, || async {
            text(db, sql).await.as_deref() == Some("Q0002")
        })
        .await;
    }
    support::all_drained(&env).await;
    let (code, out, _) = env.run(&["ctl", "verify", "customers"]);
    assert_eq!(code, 0, "{out}");
    env.cleanup().await;
}

/// Columns of many types on both sides, for the copy's values.
const TYPED: &str = "CREATE TABLE typed (
    id     text PRIMARY KEY,
    flag   boolean,
    at     timestamptz,
    tags   integer[],
    amount numeric(10, 2),
    code   varchar(5),
    doc    jsonb,
    bits   bit(3));
  ALTER TABLE typed REPLICA IDENTITY FULL;";

/// The copy reads each column as its type's text and writes it through
/// the target column's type, in creates and updates: booleans,
/// timestamps, arrays, JSON and bit strings arrive as they were (an array
/// was refused and a JSON object became a JSON string before), and a
/// value too long for its column is refused (a failed row), not cut.
/// Then live sync carries the same types both ways (see `live_typed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_and_live_sync_carry_each_type_and_cut_no_value() {
    let fields: Vec<String> = ["id", "flag", "at", "tags", "amount", "code", "doc", "bits"]
        .iter()
        .map(|c| format!("  {{ left = \"{c}\", right = \"{c}\" }},"))
        .collect();
    let map = format!(
        "\n[[map]]\nname = \"typed\"\nleft = {{ entity = \"typed\", key = [\"id\"] }}\n\
         right = {{ entity = \"typed\", key = [\"id\"] }}\nfield = [\n{}\n]\n",
        fields.join("\n")
    );
    let mut env = TestEnv::with_config("inittypes", &map).await;
    let fno = env.fno().await;
    let dv = env.dv().await;
    fno.batch_execute(&format!(
        "{TYPED}
         INSERT INTO typed VALUES
           ('T1', true, '2026-12-04 10:00:00.25+00', '{{1,2,NULL}}', 12.5, 'a,b''c', '{{\"a\": [1, \"x\"]}}', B'101'),
           ('T2', false, NULL, '{{}}', NULL, NULL, 'null', NULL),
           ('T4', true, '2026-01-01 00:00:00+00', '{{3}}', 1, 'new', '{{\"b\": [2]}}', B'111');"
    ))
    .await
    .unwrap();
    dv.batch_execute(&format!(
        "{}
         INSERT INTO typed VALUES
           ('T3', NULL, '1999-12-31 23:59:59+00', NULL, -0.01, 'abcdef', '[]', B'010'),
           ('T4', false, '2025-01-01 00:00:00+00', '{{4}}', 2, 'old', '{{\"b\": 1}}', B'000');",
        TYPED.replace("varchar(5)", "varchar(10)")
    ))
    .await
    .unwrap();
    env.start_all();
    env.wait_for_slots(2).await;
    env.ctl(&[
        "run",
        "typed",
        "--conflict-master",
        "fno",
        "--timeout-secs",
        "60",
    ]);
    let row = "SELECT (flag, at, tags, amount, code, doc, bits)::text FROM typed WHERE id = ";
    // Created on the right (T1, T2) and updated there to the master's (T4).
    for id in ["'T1'", "'T2'", "'T4'"] {
        let on_left = text(&fno, &format!("{row}{id}")).await;
        assert!(on_left.is_some());
        assert_eq!(text(&dv, &format!("{row}{id}")).await, on_left, "row {id}");
    }
    // `abcdef` does not fit the left's varchar(5): refused, not cut.
    assert_eq!(text(&fno, &format!("{row}'T3'")).await, None);
    let (created, updated, _, failed) = counts(&details(&env, "typed"));
    assert_eq!((created, updated, failed), (2, 1, 1));
    live_typed(&fno, &dv).await;
    env.cleanup().await;
}

/// Live changes of typed rows both ways: a create on the left, updates on
/// the right of rows the copy wrote (their expected values, JSON among
/// them, must match the left's rows for the update to be made). A JSON
/// object stays an object, a JSON string a string, a JSON null a JSON
/// null (a live write turned every JSON value into a JSON string before,
/// and the update after it then met a row unlike the one expected).
async fn live_typed(fno: &tokio_postgres::Client, dv: &tokio_postgres::Client) {
    fno.batch_execute(
        "INSERT INTO typed VALUES ('T5', false, '2026-12-04 13:00:00+00', '{5,NULL}', 0.5, 'x',
           '{\"c\": {\"d\": [true, null, 1.50]}}', B'001')",
    )
    .await
    .unwrap();
    dv.batch_execute(
        "UPDATE typed SET doc = '{\"e\": 1.50}', tags = '{7}' WHERE id = 'T1';
         UPDATE typed SET doc = '\"just text\"', flag = NULL WHERE id = 'T2'",
    )
    .await
    .unwrap();
    let row = "SELECT (flag, at AT TIME ZONE 'UTC', tags, amount, code, doc, jsonb_typeof(doc), bits)::text FROM typed WHERE id = ";
    let want = [
        ("'T1'", "(t,\"2026-12-04 10:00:00.25\",{7},12.50,\"a,b'c\",\"{\"\"e\"\": 1.50}\",object,101)"),
        ("'T2'", "(,,{},,,\"\"\"just text\"\"\",string,)"),
        ("'T5'", "(f,\"2026-12-04 13:00:00\",\"{5,NULL}\",0.50,x,\"{\"\"c\"\": {\"\"d\"\": [true, null, 1.50]}}\",object,001)"),
    ];
    for (id, value) in want {
        let sql = format!("{row}{id}");
        eventually(
            &format!("row {id} the same on both sides"),
            WAIT,
            || async {
                let (l, r) = (text(fno, &sql).await, text(dv, &sql).await);
                l.as_deref() == Some(value) && r.as_deref() == Some(value)
            },
        )
        .await;
    }
}
