//! End-to-end, randomized: both sides edit the same records at once
//! (inserts, updates, deletes) while services are killed with `kill -9` and
//! restarted; afterwards both sides are equal and no applied change echoed
//! back. Set DUALWRITE_TEST_SEED to replay a run.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{
    all_drained, eventually, TestEnv, APPLY_DV, APPLY_FNO, CAPTURE_DV, CAPTURE_FNO, PAUSE_BUFFER,
    ROUTER,
};

const OPS_PER_SIDE: usize = 300;

struct Side {
    tag: &'static str,
    table: &'static str,
    key: &'static str,
    name: &'static str,
    phone: &'static str,
}

const LEFT: Side = Side {
    tag: "L",
    table: "customers_v3",
    key: "customeraccount",
    name: "organizationname",
    phone: "primaryphone",
};
const RIGHT: Side = Side {
    tag: "R",
    table: "accounts",
    key: "accountnumber",
    name: "name",
    phone: "telephone1",
};

/// Random edits on one side; returns how many deletes removed a row.
async fn edit(
    client: tokio_postgres::Client,
    side: &'static Side,
    seed: u64,
    done: Arc<AtomicUsize>,
) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut deletes = 0;
    for i in 0..OPS_PER_SIDE {
        let key = if rng.random_bool(0.8) {
            format!("C{:04}", rng.random_range(1..=30))
        } else {
            format!("N{:03}", rng.random_range(1..=15))
        };
        let (t, k, n, p, tag) = (side.table, side.key, side.name, side.phone, side.tag);
        let sql = match rng.random_range(0..10) {
            0..=3 => format!("UPDATE {t} SET {n} = '{tag}-{i}' WHERE {k} = '{key}'"),
            4..=6 => format!("UPDATE {t} SET {p} = '{tag}p-{i}' WHERE {k} = '{key}'"),
            7 => format!("DELETE FROM {t} WHERE {k} = '{key}'"),
            _ => format!(
                "INSERT INTO {t} ({k}, {n}) VALUES ('{key}', '{tag}-{i}') ON CONFLICT DO NOTHING"
            ),
        };
        let rows = client
            .execute(sql.as_str(), &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        if sql.starts_with("DELETE") {
            deletes += rows as usize;
        }
        done.fetch_add(1, Ordering::SeqCst);
    }
    deletes
}

type Row = (String, Option<String>, Option<String>, Option<String>, bool);

async fn rows(client: &tokio_postgres::Client, sql: &str) -> BTreeMap<String, Row> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)),
            )
        })
        .collect()
}

/// Checks that every captured change of `entity` on a side is one of that
/// side's own edits, never an applied change of the other side coming back.
fn assert_no_echo(env: &TestEnv, side: &str, entity: &str, own: &Side, own_deletes: usize) {
    let mut deletes = 0;
    // A capturer killed mid-batch sends that batch again: count each source position once.
    let mut seen = std::collections::HashSet::new();
    // Every edit of this side writes a value the record never held before
    // (`L-<i>`, `Lp-<i>`: one per statement); an applied change of the other
    // side coming back would bring none. (The old row of an update carries
    // only the key, so the changed columns cannot be told from it.)
    let mut written = std::collections::HashSet::new();
    let mine = |x: &String| {
        x.starts_with(&format!("{}-", own.tag)) || x.starts_with(&format!("{}p-", own.tag))
    };
    for r in env.tail(&format!("capture:{side}")) {
        let v = &r["value"];
        if v["entity"] != entity || !seen.insert((v["commit_lsn"].as_i64(), v["seq"].as_i64())) {
            continue;
        }
        let field = |image: &str, name: &str| -> Option<String> {
            v[image].as_array()?.iter().find(|f| f["name"] == name)?["value"]
                .as_str()
                .map(str::to_owned)
        };
        match v["op"].as_str().unwrap() {
            "DELETE" => deletes += 1,
            "APPLIED" => {}
            op => {
                let key = field("after", own.key).unwrap_or_default();
                let mut fresh = false;
                let values = [own.name, own.phone].map(|c| field("after", c));
                for x in values.into_iter().flatten().filter(mine) {
                    fresh |= written.insert((key.clone(), x));
                }
                assert!(
                    fresh,
                    "{side}: an {op} not made on this side (no value it wrote) was captured: {v}"
                );
            }
        }
    }
    assert_eq!(
        deletes, own_deletes,
        "{side}: captured deletes differ from the deletes made on this side"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_concurrent_edits_on_both_sides_with_restarts_converge_without_echo() {
    let seed: u64 = std::env::var("DUALWRITE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("DUALWRITE_TEST_SEED={seed}");
    let mut env = TestEnv::new("random").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();

    let done = Arc::new(AtomicUsize::new(0));
    let left = tokio::spawn(edit(env.fno().await, &LEFT, seed, done.clone()));
    let right = tokio::spawn(edit(
        env.dv().await,
        &RIGHT,
        seed ^ 0x9E37_79B9,
        done.clone(),
    ));
    // kill -9 and restart services while both sides edit.
    let mut rng = StdRng::seed_from_u64(seed);
    for (at, victims) in [
        (100, vec![ROUTER, APPLY_DV]),
        (250, vec![PAUSE_BUFFER, CAPTURE_FNO]),
        (400, vec![APPLY_FNO, CAPTURE_DV]),
    ] {
        let at = at + rng.random_range(0..50);
        eventually("editing progress", Duration::from_secs(120), || {
            let n = done.load(Ordering::SeqCst);
            async move { n >= at || n >= 2 * OPS_PER_SIDE }
        })
        .await;
        for v in victims {
            env.service(v).kill9();
            env.service(v).restart();
        }
    }
    let left_deletes = left.await.unwrap();
    let right_deletes = right.await.unwrap();

    all_drained(&env).await;
    let fno = env.fno().await;
    let dv = env.dv().await;
    let l = rows(&fno, "SELECT customeraccount, organizationname, primaryphone, customergroupid, salescurrencycode, onhold FROM customers_v3").await;
    let r = rows(&dv, "SELECT accountnumber, name, telephone1, msdyn_customergroupid, transactioncurrencycode, creditonhold FROM accounts").await;
    let diff: Vec<(&String, Option<&Row>, Option<&Row>)> = l
        .keys()
        .chain(r.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|k| l.get(*k) != r.get(*k))
        .map(|k| (k, l.get(k), r.get(k)))
        .collect();
    assert!(
        diff.is_empty(),
        "seed {seed}: the sides differ on {} records: {diff:#?}\n{}",
        diff.len(),
        env.logs()
    );

    // The operators' checker agrees, for every map.
    let (code, out, err) = env.run(&["ctl", "verify"]);
    assert_eq!(
        code, 0,
        "seed {seed}: ctl verify found differences:\n{out}\n{err}"
    );
    assert!(
        out.contains("map customers:") && out.contains("— equal"),
        "{out}"
    );

    assert_no_echo(&env, "fno", "public.customers_v3", &LEFT, left_deletes);
    assert_no_echo(&env, "dataverse", "public.accounts", &RIGHT, right_deletes);
    assert!(
        env.tail("errors").is_empty(),
        "seed {seed}: unexpected errors"
    );
    env.cleanup().await;
}
