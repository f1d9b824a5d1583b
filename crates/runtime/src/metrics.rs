//! Prometheus metrics of every service: one registry, all names and label
//! keys here. One prefix (`dualwrite_`), base units, `_total` for counters,
//! bounded labels only (map, side, direction, outcome, service, class,
//! action, state, client): never record keys or error text.

use std::sync::OnceLock;

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Label keys.
pub mod label {
    pub const MAP: &str = "map";
    pub const SIDE: &str = "side";
    /// `<source side>_to_<target side>`.
    pub const DIRECTION: &str = "direction";
    pub const OUTCOME: &str = "outcome";
    pub const SERVICE: &str = "service";
    pub const CLASS: &str = "class";
    pub const ACTION: &str = "action";
    pub const STATE: &str = "state";
    pub const CLIENT: &str = "client";
    pub const REASON: &str = "reason";
    pub const VERSION: &str = "version";
    pub const PHASE: &str = "phase";
}

/// Metric names.
pub mod name {
    pub const BUILD_INFO: &str = "dualwrite_build_info";
    pub const READY: &str = "dualwrite_ready";
    pub const MAP_STATE: &str = "dualwrite_map_state";
    pub const CAPTURED: &str = "dualwrite_records_captured_total";
    pub const ROUTED: &str = "dualwrite_records_routed_total";
    pub const SKIPPED: &str = "dualwrite_records_skipped_total";
    pub const FORWARDED: &str = "dualwrite_records_forwarded_total";
    pub const APPLIED: &str = "dualwrite_records_applied_total";
    pub const ERRORS: &str = "dualwrite_error_records_total";
    pub const LATENCY: &str = "dualwrite_sync_latency_seconds";
    pub const LAG_RECORDS: &str = "dualwrite_map_lag_records";
    pub const LAG_SECONDS: &str = "dualwrite_map_lag_seconds";
    pub const BACKLOG: &str = "dualwrite_map_backlog_records";
    pub const CATCHUP_ETA: &str = "dualwrite_map_catchup_eta_seconds";
    pub const PAUSED_SECONDS: &str = "dualwrite_map_paused_seconds";
    pub const RETENTION_SECONDS: &str = "dualwrite_map_topic_retention_seconds";
    pub const RETRIES: &str = "dualwrite_retries_total";
    pub const AUTO_PAUSES: &str = "dualwrite_auto_pauses_total";
    pub const COMMANDS: &str = "dualwrite_control_commands_total";
    pub const KAFKA_QUEUE: &str = "dualwrite_kafka_queue_messages";
    pub const KAFKA_RTT: &str = "dualwrite_kafka_broker_rtt_seconds";
    pub const INITIAL_SYNC_ROWS: &str = "dualwrite_initial_sync_rows";
    pub const INITIAL_SYNC_ROWS_DONE: &str = "dualwrite_initial_sync_rows_done";
    pub const INITIAL_SYNC_RECORDS: &str = "dualwrite_initial_sync_records_total";
    pub const DECISIONS: &str = "dualwrite_resolver_writes_total";
    pub const RESOLVER_RECORDS: &str = "dualwrite_resolver_records";
    pub const RESOLVER_IN_MEMORY: &str = "dualwrite_resolver_records_in_memory";
    pub const DRIFT_RECORDS: &str = "dualwrite_drift_records";
    pub const DRIFT_CHECKED: &str = "dualwrite_drift_rows_checked_total";
    pub const BUSY: &str = "dualwrite_busy_seconds_total";
}

/// Every metric of the process.
pub struct Metrics {
    pub registry: Registry,
    pub build_info: IntGaugeVec,
    pub ready: IntGaugeVec,
    pub map_state: IntGaugeVec,
    pub captured: IntCounterVec,
    pub routed: IntCounterVec,
    pub skipped: IntCounterVec,
    pub forwarded: IntCounterVec,
    pub applied: IntCounterVec,
    pub errors: IntCounterVec,
    pub latency: HistogramVec,
    pub lag_records: IntGaugeVec,
    pub lag_seconds: GaugeVec,
    pub backlog: IntGaugeVec,
    pub catchup_eta: GaugeVec,
    pub paused_seconds: GaugeVec,
    pub retention_seconds: GaugeVec,
    pub retries: IntCounterVec,
    pub auto_pauses: IntCounterVec,
    pub commands: IntCounterVec,
    pub kafka_queue: IntGaugeVec,
    pub kafka_rtt: GaugeVec,
    pub initial_sync_rows: IntGaugeVec,
    pub initial_sync_rows_done: IntGaugeVec,
    pub initial_sync_records: IntCounterVec,
    pub decisions: IntCounterVec,
    pub resolver_records: IntGaugeVec,
    pub resolver_in_memory: IntGaugeVec,
    pub drift_records: IntGaugeVec,
    pub drift_checked: IntCounterVec,
    pub busy: CounterVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn seconds(r: &Registry, name: &str, help: &str, labels: &[&str]) -> CounterVec {
    let m = CounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn int_gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let m = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

impl Metrics {
    fn new() -> Metrics {
        use label::*;
        use name::*;
        let r = Registry::new();
        let latency = HistogramVec::new(
            HistogramOpts::new(
                LATENCY,
                "Source commit to target commit, per applied change.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
            &[MAP, DIRECTION],
        )
        .expect("valid metric definition");
        r.register(Box::new(latency.clone()))
            .expect("metric registered once");
        let m = Metrics {
            build_info: int_gauge(&r, BUILD_INFO, "Build information; always 1.", &[VERSION]),
            ready: int_gauge(&r, READY, "1 when the service is ready (connected, state loaded), else 0.", &[SERVICE]),
            map_state: int_gauge(&r, MAP_STATE, "1 for the state each map is in, 0 for the others.", &[MAP, STATE]),
            captured: counter(&r, CAPTURED, "Committed changes published by a capturer.", &[SIDE]),
            routed: counter(&r, ROUTED, "Mapped changes written to a map's topic.", &[MAP, DIRECTION]),
            skipped: counter(&r, SKIPPED, "Records not passed on, and why.", &[SERVICE, REASON]),
            forwarded: counter(&r, FORWARDED, "Records the pause buffer released to an applier.", &[MAP]),
            applied: counter(
                &r,
                APPLIED,
                "Writes handled by an applier: written, stale (a redelivery), superseded (the side changed since the decision: its newer write is resolved in its turn), rejected, waiting_for_parent.",
                &[MAP, DIRECTION, OUTCOME],
            ),
            errors: counter(&r, ERRORS, "Records written to the errors topic.", &[SERVICE, CLASS]),
            latency,
            lag_records: int_gauge(&r, LAG_RECORDS, "Records on a map's topic not yet released by the pause buffer.", &[MAP]),
            lag_seconds: gauge(&r, LAG_SECONDS, "Age of the last change released for a map, when records are waiting; 0 when none are.", &[MAP]),
            backlog: int_gauge(&r, BACKLOG, "Queued records of a paused map, or left to replay while it resumes.", &[MAP]),
            catchup_eta: gauge(&r, CATCHUP_ETA, "Estimated seconds until a resuming map is Running.", &[MAP]),
            paused_seconds: gauge(&r, PAUSED_SECONDS, "How long a map has been paused (0 when it is not).", &[MAP]),
            retention_seconds: gauge(&r, RETENTION_SECONDS, "Retention of a map's topic as the broker has it (+Inf: kept forever; pause_buffer.map_topic_retention_ms until it could be read).", &[MAP]),
            retries: counter(&r, RETRIES, "Retries after transient failures.", &[SERVICE]),
            auto_pauses: counter(&r, AUTO_PAUSES, "Maps paused automatically on errors.", &[MAP]),
            commands: counter(&r, COMMANDS, "Control commands by action and outcome.", &[ACTION, OUTCOME]),
            kafka_queue: int_gauge(&r, KAFKA_QUEUE, "Messages in a Kafka client's local queues (librdkafka msg_cnt).", &[CLIENT]),
            kafka_rtt: gauge(&r, KAFKA_RTT, "Average broker round-trip time seen by a Kafka client.", &[CLIENT]),
            initial_sync_rows: int_gauge(&r, INITIAL_SYNC_ROWS, "Rows the current initial write of a map reads on both sides (counted at its snapshots).", &[MAP]),
            initial_sync_rows_done: int_gauge(&r, INITIAL_SYNC_ROWS_DONE, "Rows the current initial write of a map has read so far.", &[MAP]),
            initial_sync_records: counter(&r, INITIAL_SYNC_RECORDS, "Records handled by initial writes: created, updated, unchanged, failed.", &[MAP, OUTCOME]),
            decisions: counter(&r, DECISIONS, "Writes the resolver sent to a side's applier.", &[MAP, SIDE]),
            resolver_records: int_gauge(&r, RESOLVER_RECORDS, "Records whose state the resolver of a map holds (in memory or in its spill file).", &[MAP]),
            resolver_in_memory: int_gauge(&r, RESOLVER_IN_MEMORY, "Records whose state the resolver of a map holds in memory (about pause_buffer.resolver_cache_records at most, plus those changed since the last save).", &[MAP]),
            drift_records: int_gauge(&r, DRIFT_RECORDS, "Records of a running map found different on the two sides by the drift detector's last complete pass (confirmed, settled).", &[MAP]),
            drift_checked: counter(&r, DRIFT_CHECKED, "Rows the drift detector compared, per side.", &[MAP, SIDE]),
            busy: seconds(&r, BUSY, "Wall-clock seconds a service's main loop spent in each phase of its work (pause buffer: read, fold, deliver, save, save-ack; applier: read, write, finish; read is the rest of a batch after its first record); the rest of the time it waited for records, which the pause buffer counts as wait while a map flows (in a catch-up the backlog is on the broker: time spent fetching it).", &[SERVICE, PHASE]),
            registry: r,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!("cannot encode metrics: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

/// Adds the time since `started` to the `phase` of `service`'s busy time.
pub fn busy(service: &str, phase: &str, started: std::time::Instant) {
    metrics()
        .busy
        .with_label_values(&[service, phase])
        .inc_by(started.elapsed().as_secs_f64());
}

/// The `direction` label value.
pub fn direction(source: &str, target: &str) -> String {
    format!("{source}_to_{target}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let m = metrics();
        m.applied
            .with_label_values(&["customers", "fno_to_dataverse", "written"])
            .inc();
        let text = m.render();
        assert!(text.contains("dualwrite_records_applied_total{direction=\"fno_to_dataverse\",map=\"customers\",outcome=\"written\"} 1"), "{text}");
        assert!(text.contains("dualwrite_build_info{version=\""));
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let parts: Vec<&str> = line.split(' ').collect();
            let (n, kind) = (parts[2], parts[3]);
            assert!(n.starts_with("dualwrite_"), "{line}");
            assert_eq!(kind == "counter", n.ends_with("_total"), "{line}");
        }
    }
}
