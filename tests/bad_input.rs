//! Bad input, end to end: corrupt and foreign records on every topic, very
//! large rows, schema drift on a side. Each gets a clear, recorded error
//! (the errors topic, with context) and the pipeline keeps running.
//! (Malformed commands: tests/lifecycle.rs; invalid configuration:
//! tests/cli.rs; values the target rejects: tests/sync.rs; decoders under
//! random input: the property tests of crates/model.)

mod support;

use std::time::Duration;

use dualwrite_model::avro;
use dualwrite_model::record::ErrorRecord;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use support::{eventually, text, TestEnv, PAUSE_BUFFER};

const WAIT: Duration = Duration::from_secs(90);

fn producer(env: &TestEnv) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &env.stack.bootstrap)
        .set("message.max.bytes", "10000000")
        .create()
        .unwrap()
}

async fn send(p: &FutureProducer, topic: &str, key: &str, payload: Option<&[u8]>) {
    let mut r = FutureRecord::to(topic).key(key);
    if let Some(b) = payload {
        r = r.payload(b);
    }
    p.send(r, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// The kinds of bad record, each with a key naming it.
fn bad_records() -> Vec<(&'static str, Option<Vec<u8>>)> {
    // A valid record of another kind, and one cut short.
    let foreign = avro::encode(&ErrorRecord::new("someone", "x", "not a change", 0)).unwrap();
    let truncated = foreign[..foreign.len() / 2].to_vec();
    let mut flipped = foreign.clone();
    flipped[4] ^= 0xFF; // the schema fingerprint
    vec![
        ("empty", None),
        ("random", Some(b"\x13\x37 random bytes \xff\xfe".to_vec())),
        ("wrong-schema", Some(foreign)),
        ("truncated", Some(truncated)),
        ("bad-fingerprint", Some(flipped)),
        (
            "json",
            Some(br#"{"side":"fno","entity":"public.customers_v3"}"#.to_vec()),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_foreign_records_on_every_topic_are_recorded_and_the_rest_flows() {
    let mut env = TestEnv::new("badtopics").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let fno = env.fno().await;
    let dv = env.dv().await;
    let p = producer(&env);
    let topics = [
        (format!("{}.capture.fno", env.prefix), "router"),
        (format!("{}.map.customers", env.prefix), "pause-buffer"),
        (format!("{}.apply.dataverse", env.prefix), "apply"),
    ];
    for (topic, _) in &topics {
        for (key, payload) in bad_records() {
            send(&p, topic, key, payload.as_deref()).await;
        }
    }
    // Garbage on the status and events topics, then a restart of the pause
    // buffer, which reads both back.
    for t in ["status", "events"] {
        for (key, payload) in bad_records() {
            let key = if t == "status" { "customers" } else { key };
            send(&p, &format!("{}.{t}", env.prefix), key, payload.as_deref()).await;
        }
    }
    env.service(PAUSE_BUFFER).kill9();
    env.service(PAUSE_BUFFER).restart();

    // Good changes still flow, both ways, and the maps keep their state.
    fno.batch_execute(
        "INSERT INTO customers_v3 (customeraccount, organizationname) VALUES ('C9500', 'After the garbage')",
    )
    .await
    .unwrap();
    dv.batch_execute(
        "UPDATE accounts SET name = 'Right after the garbage' WHERE accountnumber = 'C0002'",
    )
    .await
    .unwrap();
    eventually("good changes flow past the garbage", WAIT, || async {
        text(
            &dv,
            "SELECT name FROM accounts WHERE accountnumber = 'C9500'",
        )
        .await
        .as_deref()
            == Some("After the garbage")
            && text(
                &fno,
                "SELECT organizationname FROM customers_v3 WHERE customeraccount = 'C0002'",
            )
            .await
            .as_deref()
                == Some("Right after the garbage")
    })
    .await;
    assert!(
        env.states().values().all(|s| s == "Running"),
        "{:?}",
        env.states()
    );
    // Operators' reads survive the garbage too.
    env.ctl(&["pause", "contacts", "--timeout-secs", "60"]);
    env.ctl(&["run", "contacts", "--timeout-secs", "60"]);

    // One error record per bad record on the data topics, with its context.
    let want = bad_records().len() * topics.len();
    let errors = env
        .tail_until("errors", "an error record per bad record", WAIT, |r| {
            r.len() >= want
        })
        .await;
    for (topic, service) in &topics {
        for (key, payload) in bad_records() {
            let e = errors
                .iter()
                .map(|e| &e["value"])
                .find(|e| e["topic"] == topic.as_str() && e["key"] == key)
                .unwrap_or_else(|| panic!("no error record for `{key}` on {topic}: {errors:?}"));
            assert_eq!(e["service"], *service, "{e}");
            assert_eq!(e["error_class"], "malformed_record", "{e}");
            assert!(
                e["offset"].is_i64() && !e["message"].as_str().unwrap().is_empty(),
                "{e}"
            );
            assert_eq!(e["payload"].is_array(), payload.is_some(), "{e}");
        }
    }
    // Nothing else failed. (A record read again after the pause buffer's
    // kill -9 may be recorded twice: delivery is at least once.)
    let keys: Vec<&str> = bad_records().iter().map(|(k, _)| *k).collect();
    for e in &errors {
        let v = &e["value"];
        assert!(
            topics.iter().any(|(t, _)| v["topic"] == t.as_str())
                && keys.iter().any(|k| v["key"] == *k),
            "an unexpected error record: {v}"
        );
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn very_large_rows_sync_or_are_recorded_and_the_rest_flows() {
    let mut env = TestEnv::new("largerows").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let fno = env.fno().await;
    let dv = env.dv().await;
    // 300 KB: within Kafka's default record size, synced whole.
    fno.batch_execute(
        "INSERT INTO customers_v3 (customeraccount, organizationname) VALUES ('C9600', repeat('x', 300000))",
    )
    .await
    .unwrap();
    eventually("a 300 KB row syncs", WAIT, || async {
        text(
            &dv,
            "SELECT length(name)::text FROM accounts WHERE accountnumber = 'C9600'",
        )
        .await
        .as_deref()
            == Some("300000")
    })
    .await;
    // 3 MB: larger than a Kafka record may be by default. Recorded with its
    // key, and the changes after it flow.
    fno.batch_execute(
        "INSERT INTO customers_v3 (customeraccount, organizationname) VALUES ('C9601', repeat('y', 3000000));
         INSERT INTO customers_v3 (customeraccount, organizationname) VALUES ('C9602', 'After the large row');",
    )
    .await
    .unwrap();
    eventually("the change after the large row flows", WAIT, || async {
        text(
            &dv,
            "SELECT name FROM accounts WHERE accountnumber = 'C9602'",
        )
        .await
        .as_deref()
            == Some("After the large row")
    })
    .await;
    let errors = env
        .tail_until("errors", "the large row is recorded", WAIT, |r| {
            r.iter()
                .any(|e| e["value"]["error_class"] == "record_too_large")
        })
        .await;
    let e = errors
        .iter()
        .map(|e| &e["value"])
        .find(|e| e["error_class"] == "record_too_large")
        .unwrap();
    assert_eq!(e["service"], "capture", "{e}");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("C9601") && msg.contains("max_record_bytes"),
        "{msg}"
    );
    assert!(text(
        &dv,
        "SELECT name FROM accounts WHERE accountnumber = 'C9601'"
    )
    .await
    .is_none());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_drift_on_a_side_is_recorded_and_other_records_flow() {
    let mut env = TestEnv::new("drift").await;
    env.start_all();
    env.wait_for_slots(2).await;
    env.run_all_maps();
    let fno = env.fno().await;
    let dv = env.dv().await;
    // An unmapped column added: records keep flowing.
    fno.batch_execute(
        "ALTER TABLE customers_v3 ADD COLUMN loyalty_tier text DEFAULT 'gold';
         UPDATE customers_v3 SET organizationname = 'Drift 1' WHERE customeraccount = 'C0001';",
    )
    .await
    .unwrap();
    eventually("a change after an added column", WAIT, || async {
        text(
            &dv,
            "SELECT name FROM accounts WHERE accountnumber = 'C0001'",
        )
        .await
        .as_deref()
            == Some("Drift 1")
    })
    .await;
    // A mapped column dropped: the map's changes from that side are
    // recorded with the reason; other maps keep flowing.
    fno.batch_execute(
        "ALTER TABLE customers_v3 DROP COLUMN primaryemail;
         UPDATE customers_v3 SET organizationname = 'Drift 2' WHERE customeraccount = 'C0001';
         UPDATE contacts SET lastname = 'Still flowing' WHERE contactpersonid = 'P0001';",
    )
    .await
    .unwrap();
    eventually("another map keeps flowing", WAIT, || async {
        text(
            &dv,
            "SELECT lastname FROM contacts WHERE msdyn_contactpersonid = 'P0001'",
        )
        .await
        .as_deref()
            == Some("Still flowing")
    })
    .await;
    let errors = env
        .tail_until("errors", "the drift is recorded", WAIT, |r| !r.is_empty())
        .await;
    let e = &errors[0]["value"];
    assert_eq!(e["map"], "customers", "{e}");
    assert_eq!(e["error_class"], "mapping", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("primaryemail"),
        "{e}"
    );
    env.cleanup().await;
}
