//! End-to-end: the operator console in a real browser. Headless Chromium
//! (Debian's `chromium`, through `playwright-core`; both installed by
//! `scripts/browser.sh`) drives `dualwrite console` against the whole
//! pipeline (`tests/console/console.mjs`, in three phases):
//! - run: a reader sees the maps but no commands; the operator signs in, a
//!   run in an order against the dependencies is refused with the reason,
//!   and the run dialog runs `contacts` with its related maps in a dragged
//!   order and another conflict master; the table follows the maps to
//!   Running without a reload; the initial sync details list the row the
//!   left side rejected (searchable); the mapping page shows the field
//!   pairs and the schema check;
//! - rerun (the row fixed): Rerun initial sync writes it; Pause customers;
//! - resume (changes queued meanwhile): the backlog shows, Resume with the
//!   catch-up policy brings the map back to Running and the changes over.
//!
//! Screenshots go to `docs/console/`.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{eventually, text, TestEnv};

const TOKEN: &str = "console-test-token";

/// The console's address, from its log.
async fn console_url(env: &mut TestEnv, i: usize) -> String {
    let log = env.service(i).log.clone();
    let mut url = None;
    eventually("the console announced", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        url = text
            .split("console: http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(|a| format!("http://{}", a.trim_end_matches('/')));
        let found = url.is_some();
        async move { found }
    })
    .await;
    url.unwrap()
}

fn browser_test(phase: &str, url: &str) -> (bool, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shots = root.join("docs/console");
    std::fs::create_dir_all(&shots).unwrap();
    let out = Command::new("node")
        .arg(root.join("tests/console/console.mjs"))
        .args([phase, url, TOKEN, shots.to_str().unwrap()])
        .output()
        .expect("node is installed by scripts/browser.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn phase(env: &TestEnv, name: &str, url: &str) {
    let (ok, out) = browser_test(name, url);
    assert!(ok, "the browser test failed:\n{out}\n{}", env.logs_tail(80));
}

async fn count(env: &TestEnv, sql: &str) -> i64 {
    text(&env.fno().await, sql).await.unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_drives_the_maps_through_their_lifecycle_in_a_browser() {
    let mut env = TestEnv::new("console").await;
    // A row the left side will reject in the initial sync.
    env.fno()
        .await
        .batch_execute("ALTER TABLE customers_v3 ADD CONSTRAINT no_rejects CHECK (organizationname <> 'REJECT ME')")
        .await
        .unwrap();
    env.dv()
        .await
        .batch_execute(
            "INSERT INTO accounts (accountnumber, name, msdyn_customergroupid, transactioncurrencycode)
               VALUES ('C9300', 'REJECT ME', 'G01', 'USD')",
        )
        .await
        .unwrap();
    env.start_all();
    env.wait_for_slots(2).await;
    // The console's child process reads the token from its environment.
    std::env::set_var(dualwrite_console::TOKEN_ENV, TOKEN);
    let console = env.spawn(&["console", "--listen", "127.0.0.1:0"]);
    let url = console_url(&mut env, console).await;

    phase(&env, "run", &url);
    env.fno()
        .await
        .batch_execute("ALTER TABLE customers_v3 DROP CONSTRAINT no_rejects")
        .await
        .unwrap();
    phase(&env, "rerun", &url);
    let fixed = "SELECT count(*)::text FROM customers_v3 WHERE customeraccount = 'C9300'";
    assert_eq!(count(&env, fixed).await, 1, "the rerun wrote the fixed row");
    env.dv()
        .await
        .batch_execute(
            "INSERT INTO accounts (accountnumber, name, msdyn_customergroupid, transactioncurrencycode)
               SELECT 'C95' || lpad(i::text, 2, '0'), 'Queued ' || i, 'G01', 'USD' FROM generate_series(1, 40) i",
        )
        .await
        .unwrap();
    phase(&env, "resume", &url);
    let queued = "SELECT count(*)::text FROM customers_v3 WHERE customeraccount LIKE 'C95%'";
    eventually(
        "the queued changes reached the left side",
        Duration::from_secs(60),
        || async { count(&env, queued).await == 40 },
    )
    .await;

    // The commands the pages sent, in order: the dialog's run (the dragged
    // order, the chosen master), the rerun, the pause, the resume. The
    // refused run never reached the topic.
    let sent = env.tail("control");
    let cmds: Vec<&serde_json::Value> = sent.iter().map(|r| &r["value"]).collect();
    let actions: Vec<(&str, &str)> = cmds
        .iter()
        .map(|c| (c["action"].as_str().unwrap(), c["map"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("RUN", "contacts"),
            ("RERUN_INITIAL_SYNC", "customers"),
            ("PAUSE", "customers"),
            ("RUN", "customers")
        ],
        "{cmds:?}"
    );
    assert_eq!(
        cmds[0]["order"],
        serde_json::json!(["currencies", "customer_groups", "customers", "contacts"])
    );
    assert_eq!(cmds[0]["conflict_master"], "fno");
    assert_eq!(cmds[3]["resume_policy"], "CATCH_UP");
    assert!(cmds
        .iter()
        .all(|c| c["id"].as_str().unwrap().starts_with("console-")));
    let states = env.states();
    assert!(
        states.values().all(|s| s == "Running"),
        "states: {states:?}"
    );
    env.cleanup().await;
}
