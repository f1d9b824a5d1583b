//! What the console shows, read again every second from the same topics
//! `ctl maps` reads (the status topic, the map topics' ends and the pause
//! buffer's positions) and the errors topic (read on from where the last
//! read ended), and published to the pages when it changed. The statuses
//! are read once per read, so the rows and the actions offered agree.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dualwrite_ctl::MapRow;
use dualwrite_model::avro;
use dualwrite_model::config::Config;
use dualwrite_model::lifecycle::{MapState, MapStatus};
use dualwrite_model::record::ErrorRecord;
use dualwrite_model::topics::Topics;
use dualwrite_runtime::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
use dualwrite_runtime::kafka::rdkafka::message::Message;
use dualwrite_runtime::kafka::rdkafka::{Offset, TopicPartitionList};
use dualwrite_runtime::kafka::{self, client_config, DwContext};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the topics are read.
const EVERY: Duration = Duration::from_secs(1);
/// Error records kept for the errors page (the newest).
const KEEP_ERRORS: usize = 1000;

/// An error record and where it is on the errors topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Located {
    /// `partition:offset`, as `ctl retry-errors --at` takes it.
    pub at: String,
    pub error: ErrorRecord,
}

/// The maps as last read.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    /// Whether the maps were read at least once (until then the pages say
    /// they are being read, rather than showing no maps).
    pub read: bool,
    pub rows: Vec<MapRow>,
    pub statuses: BTreeMap<String, MapStatus>,
    /// Error records per map (all time, as the errors topic keeps them).
    pub error_counts: BTreeMap<String, u64>,
    /// The newest error records, oldest first.
    pub errors: VecDeque<Located>,
    /// Seconds a resuming map still needs to catch up, at the rate of the
    /// last reads.
    pub eta_secs: BTreeMap<String, u64>,
    /// Why the last read failed (the rest is then the read before).
    pub error: Option<String>,
}

/// Reads the maps until shutdown; the receiver sees each change.
pub fn watch_maps(
    config: Arc<Config>,
    shutdown: CancellationToken,
) -> watch::Receiver<Arc<Snapshot>> {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let reader = Arc::new(Mutex::new(Reader::default()));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (cfg, r, last) = (config.clone(), reader.clone(), tx.borrow().clone());
            let read = tokio::task::spawn_blocking(move || {
                let mut r = r.lock().unwrap_or_else(|e| e.into_inner());
                r.read(&cfg, &last)
            })
            .await;
            let next = read.unwrap_or_else(|e| Snapshot {
                error: Some(e.to_string()),
                ..(*tx.borrow().clone()).clone()
            });
            if next != **tx.borrow() {
                tx.send_replace(Arc::new(next));
            }
        }
    });
    rx
}

/// What a read keeps for the next.
#[derive(Default)]
struct Reader {
    errors: Option<BaseConsumer<DwContext>>,
    /// Each resuming map's backlog at the last read, and when.
    backlogs: BTreeMap<String, (i64, Instant)>,
}

impl Reader {
    fn read(&mut self, config: &Config, last: &Snapshot) -> Snapshot {
        let mut next = last.clone();
        match self.read_into(config, &mut next) {
            Ok(()) => next.error = None,
            Err(e) => next.error = Some(e),
        }
        next
    }

    fn read_into(&mut self, config: &Config, s: &mut Snapshot) -> Result<(), String> {
        let statuses = dualwrite_ctl::read_statuses(config).map_err(|e| e.to_string())?;
        s.rows = dualwrite_ctl::map_rows_of(config, &statuses).map_err(|e| e.to_string())?;
        s.statuses = statuses;
        s.read = true;
        self.etas(s);
        self.new_errors(config, s)
    }

    /// Catch-up estimates from how fast each resuming map's backlog fell.
    fn etas(&mut self, s: &mut Snapshot) {
        let now = Instant::now();
        let mut backlogs = BTreeMap::new();
        s.eta_secs.clear();
        for row in &s.rows {
            let resuming = s
                .statuses
                .get(&row.map)
                .is_some_and(|st| st.state == MapState::Resuming);
            if !resuming {
                continue;
            }
            if let Some((before, at)) = self.backlogs.get(&row.map) {
                let fell = (before - row.backlog) as f64;
                let secs = now.duration_since(*at).as_secs_f64();
                if fell > 0.0 && secs > 0.0 {
                    let eta = row.backlog as f64 / (fell / secs);
                    s.eta_secs.insert(row.map.clone(), eta.ceil() as u64);
                }
            }
            backlogs.insert(row.map.clone(), (row.backlog, now));
        }
        self.backlogs = backlogs;
    }

    /// Reads the error records written since the last read.
    fn new_errors(&mut self, config: &Config, s: &mut Snapshot) -> Result<(), String> {
        if self.errors.is_none() {
            self.errors = Some(errors_consumer(config).map_err(|e| e.to_string())?);
        }
        let Some(c) = &self.errors else {
            return Ok(());
        };
        for _ in 0..100_000 {
            let m = match c.poll(Duration::ZERO) {
                None => break,
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(m)) => m,
            };
            let Some(Ok(error)) = m.payload().map(avro::decode::<ErrorRecord>) else {
                continue;
            };
            let map = error.map.clone().unwrap_or_default();
            *s.error_counts.entry(map).or_default() += 1;
            let at = format!("{}:{}", m.partition(), m.offset());
            s.errors.push_back(Located { at, error });
            if s.errors.len() > KEEP_ERRORS {
                s.errors.pop_front();
            }
        }
        Ok(())
    }
}

/// A consumer of the whole errors topic, from its beginning.
fn errors_consumer(config: &Config) -> Result<BaseConsumer<DwContext>, String> {
    let topic = Topics::new(&config.kafka.topic_prefix).errors();
    let marks = kafka::watermarks(&config.kafka, &topic).map_err(|e| e.to_string())?;
    let consumer: BaseConsumer<DwContext> = client_config(&config.kafka, "dualwrite-console")
        .set("group.id", "dualwrite-console")
        .set("enable.auto.commit", "false")
        .create_with_context(DwContext)
        .map_err(|e| e.to_string())?;
    let mut tpl = TopicPartitionList::new();
    for (p, _, _) in marks {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    Ok(consumer)
}
