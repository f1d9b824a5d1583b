//! End-to-end: every service serves /metrics, /healthz and /readyz; the
//! counters and gauges move with the records; the metrics and the alert
//! rules pass promtool.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::resolver_cache;
use support::{eventually, http_get, sample, TestEnv, APPLY_DV, PAUSE_BUFFER};

const WAIT: Duration = Duration::from_secs(60);

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by scripts/stack.sh");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_the_records_and_pass_promtool() {
    let mut env = TestEnv::new("metrics").await;
    env.start_all_with(&["--metrics-addr", "127.0.0.1:0"]);
    let mut addrs = Vec::new();
    for i in 0..6 {
        addrs.push(env.metrics_addr(i).await);
    }
    env.wait_for_slots(2).await;
    env.run_all_maps();
    for a in &addrs {
        eventually("ready", WAIT, || {
            let (code, _) = http_get(a, "/readyz");
            async move { code == 200 }
        })
        .await;
        assert_eq!(http_get(a, "/healthz").0, 200);
    }
    let apply = addrs[APPLY_DV].clone();
    let pause_buffer = addrs[PAUSE_BUFFER].clone();
    let written = r#"dualwrite_records_applied_total{direction="fno_to_dataverse",map="customers",outcome="written"}"#;
    let latency =
        r#"dualwrite_sync_latency_seconds_count{direction="fno_to_dataverse",map="customers"}"#;
    let before = http_get(&apply, "/metrics").1;
    let (w0, l0) = (sample(&before, written), sample(&before, latency));

    const N: f64 = 50.0;
    let fno = env.fno().await;
    fno.batch_execute(
        "INSERT INTO customers_v3 (customeraccount, organizationname)
         SELECT 'M' || lpad(i::text, 3, '0'), 'metrics ' || i FROM generate_series(1, 50) i",
    )
    .await
    .unwrap();
    eventually("applied counter moves by N", WAIT, || {
        let text = http_get(&apply, "/metrics").1;
        async move { sample(&text, written) - w0 == N && sample(&text, latency) - l0 == N }
    })
    .await;
    // Where the loops spent their time: the applier wrote, the gate
    // folded, and waited for records while the map flowed.
    let write = r#"dualwrite_busy_seconds_total{phase="write",service="apply-dataverse"}"#;
    let fold = r#"dualwrite_busy_seconds_total{phase="fold",service="pause-buffer"}"#;
    let wait = r#"dualwrite_busy_seconds_total{phase="wait",service="pause-buffer"}"#;
    eventually("busy seconds of writing, folding and waiting", WAIT, || {
        let (a, p) = (
            http_get(&apply, "/metrics").1,
            http_get(&pause_buffer, "/metrics").1,
        );
        async move { sample(&a, write) > 0.0 && sample(&p, fold) > 0.0 && sample(&p, wait) > 0.0 }
    })
    .await;

    // Paused: the lag gauge shows the queued changes, then drops on resume.
    env.ctl(&["pause", "customers"]);
    fno.batch_execute(
        "UPDATE customers_v3 SET primaryphone = 'queued' WHERE customeraccount LIKE 'M%'",
    )
    .await
    .unwrap();
    let lag = r#"dualwrite_map_lag_records{map="customers"}"#;
    eventually(
        "lag and backlog gauges show the queued changes",
        WAIT,
        || {
            let text = http_get(&pause_buffer, "/metrics").1;
            async move {
                sample(&text, lag) == N
                    && sample(&text, r#"dualwrite_map_backlog_records{map="customers"}"#) == N
                    && sample(
                        &text,
                        r#"dualwrite_map_state{map="customers",state="Paused"}"#,
                    ) == 1.0
            }
        },
    )
    .await;
    env.ctl(&["run", "customers"]);
    eventually("lag back to zero", WAIT, || {
        let text = http_get(&pause_buffer, "/metrics").1;
        async move {
            sample(&text, lag) == 0.0
                && sample(
                    &text,
                    r#"dualwrite_map_state{map="customers",state="Running"}"#,
                ) == 1.0
        }
    })
    .await;
    // The resolver holds the N records' states, at most its cache of
    // them in memory once saved: the rest are in its spill file.
    eventually("resolver states spilled beyond the cache", WAIT, || {
        let text = http_get(&pause_buffer, "/metrics").1;
        async move {
            let memory = sample(
                &text,
                r#"dualwrite_resolver_records_in_memory{map="customers"}"#,
            );
            sample(&text, r#"dualwrite_resolver_records{map="customers"}"#) == N
                && memory <= resolver_cache() as f64
        }
    })
    .await;
    let text = http_get(&pause_buffer, "/metrics").1;
    assert!(
        sample(
            &text,
            r#"dualwrite_control_commands_total{action="pause",outcome="accepted"}"#
        ) >= 1.0,
        "{text}"
    );

    // Every service's output passes promtool's lint, and so do the alert rules.
    for a in &addrs {
        let (ok, out) = promtool(&["check", "metrics"], Some(&http_get(a, "/metrics").1));
        assert!(ok, "promtool check metrics ({a}): {out}");
    }
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
    let (ok, out) = promtool(&["check", "rules", rules], None);
    assert!(ok, "{out}");
    // The alerts fire on what they watch (promtool's rule unit tests).
    let tests = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/alerts_test.yml"
    );
    let (ok, out) = promtool(&["test", "rules", tests], None);
    assert!(ok, "{out}");
    let (ok, out) = promtool(
        &[
            "check",
            "config",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/deploy/prometheus/prometheus.yml"
            ),
        ],
        None,
    );
    assert!(ok, "{out}");

    // A real Prometheus scrapes every service.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = env.dir.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let targets: Vec<String> = addrs.iter().map(|a| format!("'{a}'")).collect();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: dualwrite\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let mut prometheus = ChildGuard(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is installed by scripts/stack.sh"),
    );
    let api = format!("127.0.0.1:{port}");
    eventually("Prometheus scraped every service", WAIT, || {
        let ok = std::net::TcpStream::connect(&api).is_ok() && {
            let body = http_get(
                &api,
                "/api/v1/query?query=sum(up%7Bjob%3D%22dualwrite%22%7D)",
            )
            .1;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            v["data"]["result"][0]["value"][1] == "6"
        };
        async move { ok }
    })
    .await;
    let body = http_get(&api, "/api/v1/query?query=count(dualwrite_build_info)").1;
    assert!(body.contains("\"6\""), "{body}");
    prometheus.0.kill().ok();
    env.cleanup().await;
}

/// Kills the child process when dropped.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_makes_the_applier_unready_not_dead() {
    // The right side's database on a port where nothing listens.
    let mut env = TestEnv::new("unready").await;
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = std::fs::read_to_string(&env.config).unwrap();
    let port = support::stack()
        .pg_url
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let mut parts: Vec<&str> = text
        .splitn(2, &format!("port = {port}, dbname = \"{}\"", env.dv_db))
        .collect();
    assert_eq!(parts.len(), 2, "the dataverse connection is in the config");
    let replaced = format!("port = {dead_port}, dbname = \"{}\"", env.dv_db);
    parts.insert(1, &replaced);
    std::fs::write(&env.config, parts.concat()).unwrap();

    let i = env.spawn(&[
        "apply",
        "--side",
        "dataverse",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let addr = env.metrics_addr(i).await;
    // It keeps retrying: alive, not ready (naming the database), counting retries.
    eventually(
        "retries counted while the database is unreachable",
        WAIT,
        || {
            let text = http_get(&addr, "/metrics").1;
            async move { sample(&text, r#"dualwrite_retries_total{service="apply"}"#) >= 3.0 }
        },
    )
    .await;
    let (code, body) = http_get(&addr, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("apply.dataverse:database"), "{body}");
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    assert!(
        env.service(i).is_running(),
        "the applier exited instead of waiting for its database"
    );
    let text = http_get(&addr, "/metrics").1;
    assert_eq!(
        sample(&text, r#"dualwrite_ready{service="apply.dataverse"}"#),
        0.0,
        "{text}"
    );
    env.cleanup().await;
}
