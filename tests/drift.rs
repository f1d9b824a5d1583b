//! The drift detector and `ctl repair`: a difference written behind the
//! pipeline's back (under the applier's replication origin, so no capturer
//! sees it) is found within the detector's interval, raises the metric and
//! a DRIFT event, and `ctl repair` makes both sides hold the conflict
//! master's values again, through the pipeline.

mod support;

use std::time::Duration;

use dualwrite_model::config::SideId;

use support::*;

const WAIT: Duration = Duration::from_secs(90);

/// Runs `sql` on `side` under one of its appliers' replication origins
/// (one no instance uses now), so no capturer sees it.
async fn behind_the_pipeline(env: &TestEnv, side: SideId, sql: &str) {
    let cfg =
        dualwrite_model::Config::parse(&std::fs::read_to_string(&env.config).unwrap()).unwrap();
    let origin = cfg.origin_names(side)[5].clone();
    let sneaky = match side {
        SideId::Left => env.fno().await,
        SideId::Right => env.dv().await,
    };
    sneaky
        .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
        .await
        .unwrap();
    sneaky.batch_execute(sql).await.unwrap();
}

async fn name_of(c: &tokio_postgres::Client, sql: &str) -> Option<String> {
    text(c, sql).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_behind_the_pipeline_is_detected_and_repaired() {
    let mut env = TestEnv::with_config(
        "drift",
        "\n[pause_buffer.drift]\ninterval_secs = 2\nconfirm_secs = 2\nchunk_rows = 50\n",
    )
    .await;
    env.start_all_with(&["--metrics-addr", "127.0.0.1:0"]);
    let pb = env.metrics_addr(PAUSE_BUFFER).await;
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let (fno, dv) = (env.fno().await, env.dv().await);
    let metric = r#"dualwrite_drift_records{map="customers"}"#;

    // A change through the pipeline: no drift, ever.
    fno.batch_execute(
        "UPDATE customers_v3 SET organizationname = 'synced' WHERE customeraccount = 'C0007'",
    )
    .await
    .unwrap();
    eventually("the change syncs", WAIT, || async {
        name_of(
            &dv,
            "SELECT name FROM accounts WHERE accountnumber = 'C0007'",
        )
        .await
        .as_deref()
            == Some("synced")
    })
    .await;

    // The drift: on the left (not the master), not captured.
    behind_the_pipeline(
        &env,
        SideId::Left,
        "UPDATE customers_v3 SET organizationname = 'drifted' WHERE customeraccount = 'C0005'",
    )
    .await;
    let master = name_of(
        &dv,
        "SELECT name FROM accounts WHERE accountnumber = 'C0005'",
    )
    .await;
    assert_ne!(master.as_deref(), Some("drifted"));

    // Found within the detector's interval (plus its confirmation).
    eventually("the drift metric counts the record", WAIT, || {
        let text = http_get(&pb, "/metrics").1;
        async move { sample(&text, metric) == 1.0 }
    })
    .await;
    let events = env.tail("events");
    let drift = events
        .iter()
        .find(|e| e["value"]["outcome"] == "DRIFT" && e["value"]["map"] == "customers")
        .unwrap_or_else(|| panic!("no DRIFT event: {events:?}"));
    let message = drift["value"]["message"].as_str().unwrap();
    assert!(message.contains(r#"["C0005"]"#), "{message}");
    assert!(
        !message.contains("drifted"),
        "the event must not carry values: {message}"
    );
    // Only the drifted record, not the one that synced.
    assert!(!message.contains("C0007"), "{message}");

    // Repaired through the pipeline: the master's values on both sides.
    let out = env.ctl(&["repair", "customers"]);
    assert!(
        out.contains("1 record(s) repaired of 1 sent, to dataverse's values"),
        "{out}"
    );
    assert_eq!(
        name_of(
            &fno,
            "SELECT organizationname FROM customers_v3 WHERE customeraccount = 'C0005'"
        )
        .await,
        master
    );
    assert!(env.ctl(&["verify", "customers"]).contains("equal"));
    eventually("the drift metric goes back to 0", WAIT, || {
        let text = http_get(&pb, "/metrics").1;
        async move { sample(&text, metric) == 0.0 }
    })
    .await;
    // A repair of records that agree changes nothing.
    let out = env.ctl(&["repair", "customers", "--key", r#"["C0005"]"#]);
    assert!(
        out.contains("0 record(s) repaired of 0 sent, to dataverse's values (the conflict master it runs with); 1 already equal"),
        "{out}"
    );
    env.cleanup().await;
}

const TYPED: &str =
    "CREATE TABLE typed (id text PRIMARY KEY, at timestamp, tags integer[], note text);
    ALTER TABLE typed REPLICA IDENTITY FULL;";

/// A map's rows are compared and repaired in the text live sync carries
/// (each type's own output), not in a JSON rendering of them (a timestamp
/// with a `T`, an array in brackets, which an array column does not read):
/// `ctl verify` shows the values as they are, and a repair writes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_columns_compare_and_repair_as_live_sync_writes_them() {
    // `note`'s default makes the drift check compare rows, not hashes
    // (`ctl verify` always does).
    let map = "\n[[map]]\nname = \"typed\"\n\
         left = { entity = \"typed\", key = [\"id\"] }\nright = { entity = \"typed\", key = [\"id\"] }\n\
         field = [\n  { left = \"id\", right = \"id\" },\n  { left = \"at\", right = \"at\" },\n\
           { left = \"tags\", right = \"tags\" },\n\
           { left = \"note\", right = \"note\", default = { right = \"(none)\" } },\n]\n";
    let mut env = TestEnv::with_config("drifttyped", map).await;
    let (fno, dv) = (env.fno().await, env.dv().await);
    fno.batch_execute(&format!(
        "{TYPED} INSERT INTO typed VALUES ('T1', '2026-12-04 10:00:00.25', '{{1,2,NULL}}', 'a')"
    ))
    .await
    .unwrap();
    dv.batch_execute(TYPED).await.unwrap();
    env.start_all();
    env.wait_for_slots(2).await;
    // The map runs with the left as its conflict master (the configured
    // one is the right): a repair writes the left's values.
    env.ctl(&[
        "run",
        "typed",
        "--conflict-master",
        "fno",
        "--timeout-secs",
        "60",
    ]);
    let maps: Vec<serde_json::Value> = serde_json::from_str(&env.ctl(&["maps", "--json"])).unwrap();
    let row = maps.iter().find(|r| r["map"] == "typed").unwrap();
    assert_eq!(
        (&row["conflict_master"], &row["master_configured"]),
        (&serde_json::json!("fno"), &serde_json::json!(false))
    );
    let table = env.ctl(&["maps"]);
    assert!(table.contains("fno*"), "{table}");
    fno.batch_execute("INSERT INTO typed VALUES ('T2', '2026-01-01 00:00:00', '{3}', NULL)")
        .await
        .unwrap();
    let row = "SELECT concat_ws('|', at, tags, note) FROM typed WHERE id = 'T2'";
    eventually("T2 synced", WAIT, || async {
        text(&dv, row).await.as_deref() == Some("2026-01-01 00:00:00|{3}|(none)")
    })
    .await;
    let verify = env.ctl(&["verify", "typed"]);
    assert!(verify.contains("equal"), "{verify}");

    // Drift on the right (not the run's master), behind the pipeline.
    behind_the_pipeline(
        &env,
        SideId::Right,
        "UPDATE typed SET tags = '{9}' WHERE id = 'T1'",
    )
    .await;
    let (code, verify, _) = env.run(&["ctl", "verify", "typed"]);
    assert_eq!(code, 1, "{verify}");
    assert!(
        verify.contains(r#"differs:    ["T1"] tags = Some("{1,2,NULL}") / tags = Some("{9}")"#),
        "{verify}"
    );
    // To the master the run chose, not the configured one.
    let out = env.ctl(&["repair", "typed"]);
    assert!(
        out.contains("1 record(s) repaired of 1 sent, to fno's values"),
        "{out}"
    );
    let row = "SELECT concat_ws('|', at, tags, note) FROM typed WHERE id = 'T1'";
    assert_eq!(
        text(&dv, row).await.as_deref(),
        Some("2026-12-04 10:00:00.25|{1,2,NULL}|a")
    );
    let verify = env.ctl(&["verify", "typed"]);
    assert!(verify.contains("equal"), "{verify}");
    env.cleanup().await;
}
