//! End-to-end: per-field transforms (value map, conversion, default,
//! constant) on a map of its own, through the initial write, live sync
//! both ways, `ctl verify`, and the errors topic for a value that does not
//! transform, against the real broker and PostgreSQL.

mod support;

use std::time::Duration;

use support::{eventually, text, TestEnv};

const WAIT: Duration = Duration::from_secs(90);

/// A projects map: an fno status code ↔ a Dataverse integer option value,
/// a boolean ↔ an integer flag, a default for NULL notes (left to right)
/// and a constant source marker written on the right.
const MAP: &str = r#"
[[map]]
name = "projects"
left = { entity = "projects", key = ["projectid"] }
right = { entity = "msdyn_projects", key = ["msdyn_projectid"] }
field = [
  { left = "projectid", right = "msdyn_projectid" },
  { left = "status", right = "statecode", value_map = { Active = 0, Closed = 1, "On hold" = 2 } },
  { left = "billable", right = "msdyn_billable", convert = { left = "boolean", right = "integer" } },
  { left = "note", right = "msdyn_note", default = { right = "(none)" }, direction = "left_to_right" },
  { right = "msdyn_source", constant = "fno" },
]
"#;

const DV_ROW: &str = "SELECT concat_ws('|', statecode::text, msdyn_billable::text, coalesce(msdyn_note, 'NULL'), msdyn_source) FROM msdyn_projects WHERE msdyn_projectid = ";
const FNO_ROW: &str =
    "SELECT concat_ws('|', status, billable::text, coalesce(note, 'NULL')) FROM projects WHERE projectid = ";

async fn dv_row(c: &tokio_postgres::Client, id: &str) -> Option<String> {
    text(c, &format!("{DV_ROW}'{id}'")).await
}

async fn fno_row(c: &tokio_postgres::Client, id: &str) -> Option<String> {
    text(c, &format!("{FNO_ROW}'{id}'")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_maps_and_conversions_sync_both_ways() {
    let mut env = TestEnv::with_config("transforms", MAP).await;
    let fno = env.fno().await;
    let dv = env.dv().await;
    fno.batch_execute(
        "CREATE TABLE projects (projectid text PRIMARY KEY, status text, billable boolean, note text);
         ALTER TABLE projects REPLICA IDENTITY FULL;
         -- P1 on both sides, equal once mapped; P2 on the left only.
         INSERT INTO projects VALUES ('P1', 'Active', true, NULL), ('P2', 'On hold', false, 'left note');",
    )
    .await
    .unwrap();
    dv.batch_execute(
        "CREATE TABLE msdyn_projects (msdyn_projectid text PRIMARY KEY, statecode integer, msdyn_billable integer,
                                      msdyn_note text, msdyn_source text);
         ALTER TABLE msdyn_projects REPLICA IDENTITY FULL;
         -- P3 on the right only.
         INSERT INTO msdyn_projects VALUES ('P1', 0, 1, '(none)', 'fno'), ('P3', 1, 0, 'right note', NULL);",
    )
    .await
    .unwrap();
    env.start_all();
    env.wait_for_slots(2).await;
    env.ctl(&["run", "projects", "--timeout-secs", "60"]);

    // The initial write compares and writes transformed values: P1's codes
    // map to each other (unchanged), P2 and P3 are created mapped.
    let d: serde_json::Value =
        serde_json::from_str(&env.ctl(&["initial-sync", "projects", "--json"])).unwrap();
    let p = &d["progress"];
    assert_eq!(
        (
            p["created"].as_i64(),
            p["updated"].as_i64(),
            p["unchanged"].as_i64(),
            p["failed"].as_i64()
        ),
        (Some(2), Some(0), Some(1), Some(0)),
        "{d}"
    );
    assert_eq!(
        dv_row(&dv, "P2").await.as_deref(),
        Some("2|0|left note|fno")
    );
    assert_eq!(
        fno_row(&fno, "P3").await.as_deref(),
        Some("Closed|false|NULL")
    );

    // Live, left to right: the code, the boolean, the default and the constant.
    fno.batch_execute("INSERT INTO projects VALUES ('P4', 'Closed', false, NULL)")
        .await
        .unwrap();
    eventually(
        "a left insert arrives mapped on the right",
        WAIT,
        || async { dv_row(&dv, "P4").await.as_deref() == Some("1|0|(none)|fno") },
    )
    .await;

    // Right to left: the option value maps back to its code, 1 to true.
    dv.batch_execute(
        "UPDATE msdyn_projects SET statecode = 2, msdyn_billable = 1 WHERE msdyn_projectid = 'P4'",
    )
    .await
    .unwrap();
    eventually(
        "a right update arrives mapped on the left",
        WAIT,
        || async { fno_row(&fno, "P4").await.as_deref() == Some("On hold|true|NULL") },
    )
    .await;

    // `ctl verify` compares after the transforms: everything agrees.
    let (code, out, err) = env.run(&["ctl", "verify", "projects"]);
    assert_eq!(code, 0, "{out}\n{err}");

    // A value the map has no entry for, and a value that does not convert,
    // go to the errors topic naming map, field and value; later changes flow.
    fno.batch_execute("INSERT INTO projects VALUES ('P5', 'Pending', true, NULL)")
        .await
        .unwrap();
    dv.batch_execute("UPDATE msdyn_projects SET msdyn_billable = 7 WHERE msdyn_projectid = 'P1'")
        .await
        .unwrap();
    fno.batch_execute("INSERT INTO projects VALUES ('P6', 'Active', true, 'after')")
        .await
        .unwrap();
    dv.batch_execute("UPDATE msdyn_projects SET statecode = 0 WHERE msdyn_projectid = 'P3'")
        .await
        .unwrap();
    eventually("changes after the failing ones flow", WAIT, || async {
        dv_row(&dv, "P6").await.as_deref() == Some("0|1|after|fno")
            && fno_row(&fno, "P3").await.as_deref() == Some("Active|false|NULL")
    })
    .await;
    let errors = env
        .tail_until(
            "errors",
            "both transform failures are recorded",
            WAIT,
            |r| r.len() >= 2,
        )
        .await;
    let messages: Vec<&str> = errors
        .iter()
        .filter(|e| e["value"]["error_class"] == "mapping" && e["value"]["map"] == "projects")
        .filter_map(|e| e["value"]["message"].as_str())
        .collect();
    assert!(
        messages.iter().any(|m| m.contains(
            "map `projects`: field `status` → `statecode` on public.projects: value `Pending` has no entry in value_map"
        )),
        "{errors:#?}"
    );
    assert!(
        messages.iter().any(|m| m.contains(
            "map `projects`: field `msdyn_billable` → `billable` on public.msdyn_projects: value `7` cannot be converted to a boolean"
        )),
        "{errors:#?}"
    );
    assert_eq!(messages.len(), 2, "{errors:#?}");
    assert_eq!(dv_row(&dv, "P5").await, None);
    assert_eq!(
        fno_row(&fno, "P1").await.as_deref(),
        Some("Active|true|NULL")
    );
    assert_eq!(
        env.states().get("projects").map(String::as_str),
        Some("Running")
    );
    env.cleanup().await;
}
