//! The initial-sync scheduler: one initial write at a time, the next due
//! as the controller orders them (related maps first), stopped when its
//! map leaves Initializing.

use std::collections::BTreeMap;
use std::sync::Arc;

use dualwrite_initial_sync::{self as initial_sync, Copier};
use dualwrite_model::config::Config;
use dualwrite_model::lifecycle::MapState;
use dualwrite_runtime::kafka::Producer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::controller::Controller;
use crate::links::MapLinks;

/// The initial write under way.
pub struct Copying {
    pub map: String,
    run: i64,
    cancel: CancellationToken,
}

/// What an initial write is started with.
pub struct CopyStarter {
    pub copier: Copier,
    pub producer: Producer,
    pub reports: mpsc::Sender<initial_sync::Report>,
}

/// Whether the copy is still wanted: its map is Initializing in the same
/// run, with the copy under way.
fn wanted(ctl: &Controller, c: &Copying) -> bool {
    ctl.statuses.get(&c.map).is_some_and(|s| {
        s.state == MapState::Initializing
            && s.initial
                .as_ref()
                .is_some_and(|i| i.run == c.run && i.phase.is_under_way())
    })
}

/// Stops the initial write under way if its map left Initializing (skipped,
/// or another run began), and starts the next one due, if any.
pub fn schedule_copy(
    ctl: &Controller,
    config: &Arc<Config>,
    links: &BTreeMap<String, MapLinks>,
    copy: &mut Option<Copying>,
    starter: &CopyStarter,
    shutdown: &CancellationToken,
) {
    if let Some(c) = copy.as_ref() {
        if wanted(ctl, c) {
            return;
        }
        tracing::info!(map = %c.map, run = c.run, "initial sync no longer wanted: stopped");
        c.cancel.cancel();
        *copy = None;
    }
    let Some((map, progress)) = ctl.next_initial_sync(config) else {
        return;
    };
    let Some(link) = links.get(&map) else {
        return;
    };
    let cancel = shutdown.child_token();
    let run = progress.run;
    let job = initial_sync::Job {
        config: config.clone(),
        map: map.clone(),
        progress,
        conflict_master: ctl
            .statuses
            .get(&map)
            .and_then(|s| s.conflict_master.clone()),
        producer: starter.producer.clone(),
        held: link.held.clone(),
    };
    let span = tracing::info_span!("initial_sync", map = %map, run);
    // The map's gate releases nothing until the copy has returned.
    let copies = link.copies.clone();
    copies.send_modify(|n| *n += 1);
    let copying = starter
        .copier
        .run(job, starter.reports.clone(), cancel.clone());
    tokio::spawn(
        async move {
            copying.await;
            copies.send_modify(|n| *n -= 1);
        }
        .instrument(span),
    );
    *copy = Some(Copying { map, run, cancel });
}
