//! The lifecycle controller: takes operator commands from the control
//! topic, checks them against each map's state (the reference's table),
//! and records the new states on the compacted status topic, with
//! acknowledgements on the events topic. The status topic is the source of
//! truth: on start the controller reads it back, so every map comes back in
//! its state after any restart.
//!
//! A command is applied once: its id is remembered (from the events topic
//! and each map's last command) and a repeated id changes nothing.

use std::collections::{BTreeMap, HashSet};

use dualwrite_model::config::{Config, MapConfig};
use dualwrite_model::lifecycle::{
    dependencies, Action, ControlCommand, ControlEvent, CopyPhase, InitialSync, MapState,
    MapStatus, Outcome, PartitionOffset,
};
use dualwrite_model::plan::{plan, Plan};

/// Records to write for a decision: new statuses and events, in order.
#[derive(Debug, Default)]
pub struct Effects {
    pub statuses: Vec<MapStatus>,
    pub events: Vec<ControlEvent>,
    /// Events to send once nothing of their map is in flight: its gate
    /// holds it by its new status and the appliers wrote everything it
    /// released before (a pause's COMPLETED).
    pub quiet: Vec<ControlEvent>,
}

pub fn event(
    command_id: Option<&str>,
    outcome: Outcome,
    map: Option<&str>,
    state: Option<MapState>,
    message: impl Into<String>,
    at: i64,
) -> ControlEvent {
    ControlEvent {
        command_id: command_id.map(str::to_owned),
        outcome,
        map: map.map(str::to_owned),
        state: state.map(|s| s.label().to_owned()),
        maps: Vec::new(),
        message: message.into(),
        at,
        sent_by: None,
    }
}

/// A COMPLETED acknowledgement of a command for one map.
fn completed(
    command_id: Option<&str>,
    map: &str,
    state: MapState,
    message: &str,
    at: i64,
) -> ControlEvent {
    event(
        command_id,
        Outcome::Completed,
        Some(map),
        Some(state),
        message,
        at,
    )
}

/// The run id of a map's next initial write.
fn next_run(s: &MapStatus) -> i64 {
    s.initial.as_ref().map_or(0, |i| i.run) + 1
}

/// The controller's view: every map's status and the command ids applied.
pub struct Controller {
    pub statuses: BTreeMap<String, MapStatus>,
    pub seen: HashSet<String>,
}

/// What deciding a command needs from outside the controller, by map: the
/// maps to check against their tables (those it would run) and those whose
/// topic's end offsets it takes (where a run starts live sync or a resume
/// begins; a rerun keeps the generation's start).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needs {
    pub schema: Vec<String>,
    pub ends: Vec<String>,
}

fn needs_of(plan: &Plan, cmd: &ControlCommand) -> Needs {
    let mut needs = Needs::default();
    for (m, to) in &plan.steps {
        if *to == MapState::Initializing {
            needs.schema.push(m.clone());
        }
        if matches!(to, MapState::Initializing | MapState::Resuming)
            && cmd.action != Action::RerunInitialSync
        {
            needs.ends.push(m.clone());
        }
    }
    needs
}

/// A map's change of state by a command, with what it takes.
struct Step<'a> {
    cmd: &'a ControlCommand,
    cfg: &'a MapConfig,
    to: MapState,
    /// The map topic's end offsets, when the step needs them.
    ends: Option<Vec<PartitionOffset>>,
    now: i64,
}

/// Checks the maps a command runs against their tables and takes the end
/// offsets it needs, before anything changes: the end offsets by map, or
/// the event refusing (a map does not fit) or failing the command.
fn inputs<F, S>(
    needs: &Needs,
    id: Option<&str>,
    now: i64,
    mut end_offsets: F,
    mut schema: S,
) -> Result<BTreeMap<String, Vec<PartitionOffset>>, Box<ControlEvent>>
where
    F: FnMut(&str) -> Result<Vec<PartitionOffset>, String>,
    S: FnMut(&str) -> Result<Vec<String>, String>,
{
    // A map runs only if its mapping fits both tables.
    for m in &needs.schema {
        let (outcome, message) = match schema(m) {
            Ok(problems) if problems.is_empty() => continue,
            Ok(problems) => (
                Outcome::Rejected,
                format!("map `{m}` does not fit its tables: {}; nothing changed", problems.join("; ")),
            ),
            Err(e) => (
                Outcome::Failed,
                format!("cannot check map `{m}` against its tables: {e}; nothing changed, send the command again"),
            ),
        };
        return Err(Box::new(event(id, outcome, Some(m), None, message, now)));
    }
    // (A rerun keeps the generation's start: the records after the
    // gate's position are filtered by the new snapshot instead.)
    let mut ends = BTreeMap::new();
    for m in &needs.ends {
        match end_offsets(m) {
            Ok(o) => {
                ends.insert(m.clone(), o);
            }
            Err(e) => {
                let message = format!("cannot read the end offsets of map `{m}`'s topic: {e}; nothing changed, send the command again");
                return Err(Box::new(event(
                    id,
                    Outcome::Failed,
                    Some(m),
                    None,
                    message,
                    now,
                )));
            }
        }
    }
    Ok(ends)
}

impl Controller {
    /// Builds the view from the status topic's records (latest per map wins)
    /// and the command ids of past events.
    pub fn new(
        config: &Config,
        records: Vec<MapStatus>,
        seen_ids: impl IntoIterator<Item = String>,
        now: i64,
    ) -> Controller {
        let mut statuses: BTreeMap<String, MapStatus> = config
            .maps
            .iter()
            .map(|m| (m.name.clone(), MapStatus::initial(&m.name, now)))
            .collect();
        let mut seen: HashSet<String> = seen_ids.into_iter().collect();
        for r in records {
            if let Some(id) = &r.last_command_id {
                seen.insert(id.clone());
            }
            if let Some(slot) = statuses.get_mut(&r.map) {
                *slot = r;
            } else {
                tracing::warn!(map = %r.map, "status of a map that is no longer configured: ignored");
            }
        }
        Controller { statuses, seen }
    }

    /// What [`Controller::command`] will ask of `cmd` (nothing for a
    /// repeated id or a command it rejects), so that the caller can gather
    /// it beforehand.
    pub fn needs(&self, config: &Config, cmd: &ControlCommand) -> Needs {
        if self.seen.contains(&cmd.id) {
            return Needs::default();
        }
        plan(config, &self.statuses, cmd)
            .map(|p| needs_of(&p, cmd))
            .unwrap_or_default()
    }

    /// Applies a command. `end_offsets(map)` gives the map topic's current
    /// end offsets (taken where a run starts live sync or a resume begins);
    /// `schema(map)` checks a map to be run against both databases' tables
    /// (the problems found: the command is rejected with them). Every
    /// event answering it names who sent it (as the command says).
    pub fn command<F, S>(
        &self,
        config: &Config,
        cmd: &ControlCommand,
        now: i64,
        end_offsets: F,
        schema: S,
    ) -> Effects
    where
        F: FnMut(&str) -> Result<Vec<PartitionOffset>, String>,
        S: FnMut(&str) -> Result<Vec<String>, String>,
    {
        let mut fx = self.answer(config, cmd, now, end_offsets, schema);
        for e in fx.events.iter_mut().chain(fx.quiet.iter_mut()) {
            e.sent_by.clone_from(&cmd.sent_by);
        }
        fx
    }

    /// [`Controller::command`], before the sender is named on its events.
    fn answer(
        &self,
        config: &Config,
        cmd: &ControlCommand,
        now: i64,
        end_offsets: impl FnMut(&str) -> Result<Vec<PartitionOffset>, String>,
        schema: impl FnMut(&str) -> Result<Vec<String>, String>,
    ) -> Effects {
        let id = Some(cmd.id.as_str());
        let mut fx = Effects::default();
        if self.seen.contains(&cmd.id) {
            let dup = "duplicate command id: this command was already applied; nothing changed";
            fx.events.push(event(
                id,
                Outcome::Completed,
                Some(&cmd.map),
                None,
                dup,
                now,
            ));
            return fx;
        }
        let plan = match plan(config, &self.statuses, cmd) {
            Ok(p) => p,
            Err(reason) => {
                fx.events.push(event(
                    id,
                    Outcome::Rejected,
                    Some(&cmd.map),
                    None,
                    reason,
                    now,
                ));
                return fx;
            }
        };
        let mut ends = match inputs(&needs_of(&plan, cmd), id, now, end_offsets, schema) {
            Ok(ends) => ends,
            Err(refused) => {
                fx.events.push(*refused);
                return fx;
            }
        };
        let notes = if plan.notes.is_empty() {
            "accepted".to_owned()
        } else {
            plan.notes.join("; ")
        };
        let mut accepted = event(id, Outcome::Accepted, Some(&cmd.map), None, notes, now);
        accepted.maps = plan.steps.iter().map(|(m, _)| m.clone()).collect();
        fx.events.push(accepted);
        for (m, to) in &plan.steps {
            let cfg = config.map(m).expect("planned maps exist");
            let step = Step {
                cmd,
                cfg,
                to: *to,
                ends: ends.remove(m),
                now,
            };
            self.step(&mut fx, step);
        }
        fx
    }

    /// One map's change of state by a command.
    fn step(&self, fx: &mut Effects, step: Step<'_>) {
        let Step {
            cmd, cfg, to, now, ..
        } = step;
        let id = Some(cmd.id.as_str());
        let mut s = self.statuses[&cfg.name].clone();
        s.last_command_id = Some(cmd.id.clone());
        s.last_action = Some(cmd.action.to_string());
        s.updated_at = now;
        s.reason = None;
        s.state = to;
        // A run (or going live from a failure) adopts the configured mapping.
        if matches!(to, MapState::Initializing | MapState::Running) {
            s.mapping_version = Some(cfg.version.clone());
        }
        match to {
            MapState::Initializing if cmd.action == Action::RerunInitialSync => {
                if cmd.conflict_master.is_some() {
                    s.conflict_master = cmd.conflict_master.clone();
                }
                s.initial_sync = true;
                s.initial = Some(InitialSync::new(next_run(&s), now));
                let what = "initializing: copying pre-existing rows again (rerun)";
                self.push(fx, id, &s, what, now);
            }
            MapState::Initializing => self.initialize(fx, s, step),
            MapState::Running => {
                // SkipInitialSync: live sync of every change since the
                // run; what the copy did so far stays written.
                if let Some(init) = s.initial.as_mut() {
                    init.phase = CopyPhase::Skipped;
                    init.segments.clear();
                    init.finished_at = Some(now);
                }
                s.reason = Some(
                    "initial sync skipped: live sync of every change since the run".to_owned(),
                );
                self.push(fx, id, &s, "running (initial sync skipped)", now);
                fx.events
                    .push(completed(id, &s.map, s.state, "running", now));
            }
            MapState::Resuming => self.resume(fx, s, step),
            MapState::Paused => {
                s.paused_at = Some(now);
                let what = "paused: changes queue until the map is run again";
                self.push(fx, id, &s, what, now);
                let quiet = "paused: nothing of the map is in flight any more";
                fx.quiet.push(completed(id, &s.map, s.state, quiet, now));
            }
            MapState::NotRunning => {
                s.paused_at = None;
                s.resume_targets.clear();
                let what = "stopped: the map writes nothing until it is run again";
                self.push(fx, id, &s, what, now);
                fx.events
                    .push(completed(id, &s.map, s.state, "stopped", now));
            }
            other => unreachable!("no action leads to {other}"),
        }
    }

    /// A run: a new generation from the map topic's end; with the initial
    /// sync off, straight to Running.
    fn initialize(&self, fx: &mut Effects, mut s: MapStatus, step: Step<'_>) {
        let Step {
            cmd,
            cfg,
            now,
            ends,
            ..
        } = step;
        let id = Some(cmd.id.as_str());
        s.generation += 1;
        s.initial_sync = cmd.initial_sync.unwrap_or(cfg.initial_sync);
        s.conflict_master = cmd
            .conflict_master
            .clone()
            .or_else(|| cfg.conflict_master.clone());
        s.start_offsets = ends.unwrap_or_default();
        s.resume_targets.clear();
        s.resume_policy = None;
        s.paused_at = None;
        if s.initial_sync {
            s.initial = Some(InitialSync::new(next_run(&s), now));
            self.push(fx, id, &s, "initializing: copying pre-existing rows", now);
            return;
        }
        self.push(fx, id, &s, "initializing", now);
        s.state = MapState::Running;
        s.reason = Some("initial sync off: live sync from the moment of the run".to_owned());
        self.push(fx, id, &s, "running", now);
        fx.events
            .push(completed(id, &s.map, s.state, "running", now));
    }

    /// A resume: catch up to the map topic's end as it was at the command.
    fn resume(&self, fx: &mut Effects, mut s: MapStatus, step: Step<'_>) {
        let Step { cmd, now, ends, .. } = step;
        let policy = cmd.resume_policy.unwrap_or_default();
        s.resume_targets = ends.unwrap_or_default();
        s.resume_policy = Some(policy);
        if cmd.conflict_master.is_some() {
            s.conflict_master = cmd.conflict_master.clone();
        }
        let what = format!(
            "resuming ({}): catching up on the queued changes",
            policy.as_str()
        );
        self.push(fx, Some(cmd.id.as_str()), &s, what, now);
    }

    /// The gate of `map` caught up to `targets`: Resuming → Running.
    pub fn caught_up(&self, map: &str, targets: &[PartitionOffset], now: i64) -> Effects {
        let mut fx = Effects::default();
        let Some(s) = self.statuses.get(map) else {
            return fx;
        };
        if s.state != MapState::Resuming || s.resume_targets != targets {
            return fx; // a report about an earlier resume
        }
        let mut s = s.clone();
        s.state = MapState::Running;
        s.paused_at = None;
        s.updated_at = now;
        let id = s.last_command_id.clone();
        self.push(&mut fx, id.as_deref(), &s, "caught up: running", now);
        fx.events.push(completed(
            id.as_deref(),
            map,
            s.state,
            "caught up: running",
            now,
        ));
        fx
    }

    /// Pauses a running (or resuming) map on its own, with the reason.
    pub fn auto_pause(&self, map: &str, reason: &str, now: i64) -> Effects {
        let mut fx = Effects::default();
        let Some(s) = self.statuses.get(map) else {
            return fx;
        };
        if !s.state.flows() {
            return fx;
        }
        let mut s = s.clone();
        s.state = MapState::Paused;
        s.paused_at = Some(now);
        s.updated_at = now;
        s.reason = Some(reason.to_owned());
        s.last_action = Some("auto-pause".to_owned());
        self.push(&mut fx, None, &s, reason, now);
        fx
    }

    /// Maps left Initializing by a crash continue their initial write
    /// (from its checkpoint); one without a record of it starts one.
    pub fn recover(&self, now: i64) -> Effects {
        let mut fx = Effects::default();
        for s in self
            .statuses
            .values()
            .filter(|s| s.state == MapState::Initializing && s.initial.is_none())
        {
            let mut s = s.clone();
            s.initial = Some(InitialSync::new(next_run(&s), now));
            s.updated_at = now;
            let id = s.last_command_id.clone();
            self.push(
                &mut fx,
                id.as_deref(),
                &s,
                "initializing: copying pre-existing rows",
                now,
            );
        }
        fx
    }

    /// At start: a map that runs (Initializing, Running, Paused, Resuming)
    /// with another mapping version than the configured one had its mapping
    /// edited while it ran. It turns Failed, so that nothing is applied
    /// with a mapping the operator did not run: its changes are held until
    /// it is stopped and run again (or run again), which adopts the new
    /// version. A status without a version (written by an older release)
    /// adopts the configured one. Takes the statuses of `fx` (e.g. from
    /// [`Controller::recover`]) as the latest, and adds to it.
    pub fn check_versions(&self, config: &Config, now: i64, fx: &mut Effects) {
        for m in &config.maps {
            let latest = fx
                .statuses
                .iter()
                .rev()
                .find(|s| s.map == m.name)
                .or_else(|| self.statuses.get(&m.name));
            let Some(s) = latest else { continue };
            if matches!(s.state, MapState::NotRunning | MapState::Failed) {
                continue;
            }
            let mut s = s.clone();
            match s.mapping_version.clone() {
                None => {
                    s.mapping_version = Some(m.version.clone());
                    fx.statuses.push(s);
                }
                Some(v) if v != m.version => {
                    let reason = format!(
                        "mapping edited while the map was {} (version {v} → {}): its changes are held; stop the map, then run it to adopt {}",
                        s.state, m.version, m.version
                    );
                    tracing::warn!(map = %m.name, running = %v, configured = %m.version, "{reason}");
                    s.state = MapState::Failed;
                    s.reason = Some(reason.clone());
                    s.last_action = Some("mapping-version-check".to_owned());
                    s.updated_at = now;
                    fx.statuses.push(s.clone());
                    fx.events.push(event(
                        None,
                        Outcome::Failed,
                        Some(&m.name),
                        Some(s.state),
                        reason,
                        now,
                    ));
                }
                Some(_) => {}
            }
        }
    }

    /// The next initial write to do: the first Initializing map (in
    /// configuration order) none of whose related maps is still
    /// initializing, so parents are copied before their children.
    pub fn next_initial_sync(&self, config: &Config) -> Option<(String, InitialSync)> {
        let initializing = |m: &str| {
            self.statuses
                .get(m)
                .is_some_and(|s| s.state == MapState::Initializing)
        };
        config.maps.iter().find_map(|m| {
            let s = self.statuses.get(&m.name)?;
            let init = s.initial.as_ref()?;
            let ready = s.state == MapState::Initializing
                && init.phase.is_under_way()
                && !dependencies(config, &m.name)
                    .iter()
                    .any(|d| initializing(d));
            ready.then(|| (m.name.clone(), init.clone()))
        })
    }

    /// Progress of the initial write `run` of `map` (a status update only).
    pub fn initial_progress(&self, map: &str, progress: &InitialSync, now: i64) -> Effects {
        let mut fx = Effects::default();
        let Some(s) = self.current_run(map, progress.run) else {
            return fx;
        };
        let mut s = s.clone();
        s.initial = Some(progress.clone());
        s.updated_at = now;
        fx.statuses.push(s);
        fx
    }

    /// The initial write `run` of `map` ended: Running (with the counts),
    /// or Failed with the reason when it could not go on.
    pub fn initial_finished(
        &self,
        map: &str,
        result: Result<InitialSync, (InitialSync, String)>,
        now: i64,
    ) -> Effects {
        let mut fx = Effects::default();
        let run = match &result {
            Ok(p) | Err((p, _)) => p.run,
        };
        let Some(s) = self.current_run(map, run) else {
            return fx;
        };
        let mut s = s.clone();
        let id = s.last_command_id.clone();
        s.updated_at = now;
        match result {
            Ok(mut p) => {
                p.phase = CopyPhase::Done;
                p.finished_at = Some(now);
                let summary = format!(
                    "initial sync run {} done: {} created, {} updated, {} unchanged, {} failed",
                    p.run, p.created, p.updated, p.unchanged, p.failed
                );
                let message = if p.failed > 0 {
                    format!(
                        "{summary}; see `dualwrite ctl initial-sync {map}`, fix the data and rerun"
                    )
                } else {
                    summary
                };
                s.initial = Some(p);
                s.state = MapState::Running;
                s.reason = Some(message.clone());
                self.push(&mut fx, id.as_deref(), &s, message.clone(), now);
                fx.events
                    .push(completed(id.as_deref(), map, s.state, &message, now));
            }
            Err((mut p, reason)) => {
                p.phase = CopyPhase::Failed;
                p.finished_at = Some(now);
                let message = format!("initial sync run {} failed: {reason}", p.run);
                s.initial = Some(p);
                s.state = MapState::Failed;
                s.reason = Some(message.clone());
                self.push(&mut fx, id.as_deref(), &s, message.clone(), now);
                fx.events.push(event(
                    id.as_deref(),
                    Outcome::Failed,
                    Some(map),
                    Some(s.state),
                    message,
                    now,
                ));
            }
        }
        fx
    }

    /// The status of `map` while its initial write `run` is the current one.
    fn current_run(&self, map: &str, run: i64) -> Option<&MapStatus> {
        self.statuses.get(map).filter(|s| {
            s.state == MapState::Initializing && s.initial.as_ref().is_some_and(|i| i.run == run)
        })
    }

    fn push(
        &self,
        fx: &mut Effects,
        id: Option<&str>,
        s: &MapStatus,
        message: impl Into<String>,
        now: i64,
    ) {
        fx.statuses.push(s.clone());
        fx.events.push(event(
            id,
            Outcome::StateChanged,
            Some(&s.map),
            Some(s.state),
            message,
            now,
        ));
    }

    /// Takes written effects into the view.
    pub fn commit(&mut self, fx: &Effects, command_id: Option<&str>) {
        for s in &fx.statuses {
            self.statuses.insert(s.map.clone(), s.clone());
        }
        if let Some(id) = command_id {
            self.seen.insert(id.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualwrite_model::lifecycle::ResumePolicy;

    fn config() -> Config {
        Config::parse(dualwrite_model::config::DEMO_CONFIG).unwrap()
    }

    fn cmd(id: &str, action: Action, map: &str) -> ControlCommand {
        ControlCommand {
            id: id.into(),
            action,
            map: map.into(),
            include_related: false,
            // Most tests go live at once; the initial write has its own tests.
            initial_sync: (action == Action::Run).then_some(false),
            conflict_master: None,
            order: None,
            resume_policy: None,
            sent_by: Some("ctl: test".into()),
        }
    }

    fn ends(_: &str) -> Result<Vec<PartitionOffset>, String> {
        Ok(vec![PartitionOffset {
            partition: 0,
            offset: 10,
        }])
    }

    fn fits(_: &str) -> Result<Vec<String>, String> {
        Ok(Vec::new())
    }

    fn apply(c: &mut Controller, cfg: &Config, command: &ControlCommand) -> Effects {
        let fx = c.command(cfg, command, 1, ends, fits);
        c.commit(&fx, Some(&command.id));
        fx
    }

    fn outcomes(fx: &Effects) -> Vec<Outcome> {
        fx.events.iter().map(|e| e.outcome).collect()
    }

    #[test]
    fn a_command_needs_the_schema_of_maps_it_runs_and_the_ends_where_it_goes_live() {
        let cfg = config();
        let mut c = Controller::new(&cfg, vec![], vec![], 0);
        let needs = |c: &Controller, cmd: &ControlCommand| {
            let n = c.needs(&cfg, cmd);
            (n.schema, n.ends)
        };
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut run = cmd("1", Action::Run, "customers");
        run.include_related = true;
        let deps = owned(&["customer_groups", "currencies", "customers"]);
        assert_eq!(needs(&c, &run), (deps.clone(), deps));
        // Rejected (a pause of a map that is not running): nothing.
        let pause = cmd("2", Action::Pause, "customers");
        assert_eq!(needs(&c, &pause), (vec![], vec![]));
        apply(&mut c, &cfg, &run);
        // Done already (a repeated id), or a pause: nothing.
        assert_eq!(needs(&c, &run), (vec![], vec![]));
        assert_eq!(needs(&c, &pause), (vec![], vec![]));
        apply(&mut c, &cfg, &pause);
        // A resume takes the ends, and runs no schema check.
        let resume = cmd("3", Action::Run, "customers");
        assert_eq!(needs(&c, &resume), (vec![], owned(&["customers"])));
        // A rerun checks the schema and keeps the generation's start.
        let mut c = Controller::new(&cfg, vec![], vec![], 0);
        apply(&mut c, &cfg, &cmd("4", Action::Run, "currencies"));
        let rerun = cmd("5", Action::RerunInitialSync, "currencies");
        assert_eq!(needs(&c, &rerun), (owned(&["currencies"]), vec![]));
    }

    #[test]
    fn run_pause_resume_stop() {
        let cfg = config();
        let mut c = Controller::new(&cfg, vec![], vec![], 0);
        let fx = apply(&mut c, &cfg, &cmd("1", Action::Run, "currencies"));
        assert_eq!(
            outcomes(&fx),
            [
                Outcome::Accepted,
                Outcome::StateChanged,
                Outcome::StateChanged,
                Outcome::Completed
            ]
        );
        // Every event answering the command names its sender.
        assert!(fx
            .events
            .iter()
            .all(|e| e.sent_by.as_deref() == Some("ctl: test")));
        let s = &c.statuses["currencies"];
        assert_eq!((s.state, s.generation), (MapState::Running, 1));
        assert_eq!(s.start_offsets, ends("").unwrap());

        let fx = apply(&mut c, &cfg, &cmd("2", Action::Pause, "currencies"));
        assert_eq!(c.statuses["currencies"].state, MapState::Paused);
        // The pause completes only once nothing of the map is in flight.
        assert_eq!(outcomes(&fx), [Outcome::Accepted, Outcome::StateChanged]);
        let quiet: Vec<Outcome> = fx.quiet.iter().map(|e| e.outcome).collect();
        assert_eq!(quiet, [Outcome::Completed]);
        let mut resume = cmd("3", Action::Run, "currencies");
        resume.resume_policy = Some(ResumePolicy::Discard);
        let fx = apply(&mut c, &cfg, &resume);
        assert_eq!(outcomes(&fx), [Outcome::Accepted, Outcome::StateChanged]);
        let s = &c.statuses["currencies"];
        assert_eq!(
            (s.state, s.resume_policy),
            (MapState::Resuming, Some(ResumePolicy::Discard))
        );
        // A stale report changes nothing; the right one completes the command.
        assert!(c.caught_up("currencies", &[], 2).statuses.is_empty());
        let fx = c.caught_up("currencies", &ends("").unwrap(), 2);
        assert_eq!(fx.events.last().unwrap().command_id.as_deref(), Some("3"));
        c.commit(&fx, None);
        assert_eq!(c.statuses["currencies"].state, MapState::Running);
        apply(&mut c, &cfg, &cmd("4", Action::Stop, "currencies"));
        assert_eq!(c.statuses["currencies"].state, MapState::NotRunning);
    }

    #[test]
    fn unavailable_actions_and_duplicates_change_nothing() {
        let cfg = config();
        let mut c = Controller::new(&cfg, vec![], vec![], 0);
        let fx = apply(&mut c, &cfg, &cmd("p", Action::Pause, "customers"));
        assert_eq!(outcomes(&fx), [Outcome::Rejected]);
        assert!(fx.events[0]
            .message
            .contains("Pause is not available while the map is Not running (available: Run)"));
        assert!(fx.statuses.is_empty());
        apply(&mut c, &cfg, &cmd("r", Action::Run, "currencies"));
        let fx = apply(&mut c, &cfg, &cmd("r", Action::Run, "currencies"));
        assert_eq!(outcomes(&fx), [Outcome::Completed]);
        assert!(fx.statuses.is_empty() && fx.events[0].message.contains("duplicate"));
        let fx = apply(&mut c, &cfg, &cmd("u", Action::Run, "nope"));
        assert!(fx.events[0].message.contains("unknown map `nope`"));
    }

    #[test]
    fn related_maps_run_in_dependency_order_with_warnings_otherwise() {
        let cfg = config();
        let mut c = Controller::new(&cfg, vec![], vec![], 0);
        let fx = apply(&mut c, &cfg, &cmd("a", Action::Run, "customers"));
        assert!(fx.events[0].message.contains("warning: `customers` depends on maps that are not running: customer_groups, currencies"), "{}", fx.events[0].message);
        apply(&mut c, &cfg, &cmd("b", Action::Stop, "customers"));
        let mut all = cmd("c", Action::Run, "contacts");
        all.include_related = true;
        let fx = apply(&mut c, &cfg, &all);
        assert_eq!(
            fx.events[0].maps,
            ["customer_groups", "currencies", "customers", "contacts"]
        );
        assert!(c.statuses.values().all(|s| s.state == MapState::Running));
        let mut pause = cmd("d", Action::Pause, "customers");
        pause.include_related = true;
        let fx = apply(&mut c, &cfg, &pause);
        // The maps that depend on a paused one are paused too, first.
        assert_eq!(
            fx.events[0].maps,
            ["contacts", "customer_groups", "currencies", "customers"]
        );
        assert!(c.statuses.values().all(|s| s.state == MapState::Paused));
        // Without include_related, only the map itself.
        apply(&mut c, &cfg, &cmd("e", Action::Run, "contacts"));
        apply(&mut c, &cfg, &cmd("f", Action::Pause, "contacts"));
        assert_eq!(c.statuses["customers"].state, MapState::Paused);
    }

    #[test]
    fn auto_pause_pauses_only_flowing_maps() {
        let cfg = config();
        let mut c = Controller::new(&cfg, vec![], vec![], 0);
        assert!(c
            .auto_pause("currencies", "too many errors", 1)
            .statuses
            .is_empty());
        apply(&mut c, &cfg, &cmd("r", Action::Run, "currencies"));
        let fx = c.auto_pause("currencies", "auto-paused: 3 errors within 60 s", 2);
        c.commit(&fx, None);
        let s = &c.statuses["currencies"];
        assert_eq!(s.state, MapState::Paused);
        assert_eq!(
            s.reason.as_deref(),
            Some("auto-paused: 3 errors within 60 s")
        );
        // An operator resumes it as any paused map.
        let fx = apply(&mut c, &cfg, &cmd("resume", Action::Run, "currencies"));
        assert_eq!(fx.statuses[0].state, MapState::Resuming);
    }

    #[test]
    fn initial_sync_runs_parents_first_and_ends_running_or_failed() {
        let cfg = config();
        let mut c = Controller::new(&cfg, vec![], vec![], 0);
        let mut all = cmd("a", Action::Run, "customers");
        all.include_related = true;
        all.initial_sync = None; // the maps' default: on
        let fx = apply(&mut c, &cfg, &all);
        assert_eq!(
            outcomes(&fx),
            [
                Outcome::Accepted,
                Outcome::StateChanged,
                Outcome::StateChanged,
                Outcome::StateChanged
            ],
            "no map completes before its copy"
        );
        assert!(["customer_groups", "currencies", "customers"]
            .iter()
            .all(|m| c.statuses[*m].state == MapState::Initializing));
        // Parents first: customers waits while its related maps initialize.
        let (first, p) = c.next_initial_sync(&cfg).unwrap();
        assert_eq!((first.as_str(), p.run), ("customer_groups", 1));
        let mut done = p.clone();
        done.created = 3;
        let fx = c.initial_finished("customer_groups", Ok(done), 2);
        c.commit(&fx, None);
        assert_eq!(fx.events.last().unwrap().outcome, Outcome::Completed);
        assert_eq!(fx.events.last().unwrap().command_id.as_deref(), Some("a"));
        assert_eq!(c.statuses["customer_groups"].state, MapState::Running);
        let (next, p) = c.next_initial_sync(&cfg).unwrap();
        assert_eq!(next, "currencies");
        let fx = c.initial_finished("currencies", Err((p, "table missing".into())), 3);
        c.commit(&fx, None);
        let s = &c.statuses["currencies"];
        assert_eq!(s.state, MapState::Failed);
        assert!(s.reason.as_deref().unwrap().contains("table missing"));
        assert_eq!(c.next_initial_sync(&cfg).unwrap().0, "customers");

        // A stale report (another run) changes nothing.
        let mut stale = c.statuses["customers"].initial.clone().unwrap();
        stale.run = 9;
        assert!(c
            .initial_progress("customers", &stale, 4)
            .statuses
            .is_empty());
        let mut now = c.statuses["customers"].initial.clone().unwrap();
        now.rows_done = 10;
        let fx = c.initial_progress("customers", &now, 4);
        assert!(fx.events.is_empty() && fx.statuses.len() == 1);
        c.commit(&fx, None);

        // Skip: straight to live sync, without the snapshot filter.
        let fx = apply(
            &mut c,
            &cfg,
            &cmd("s", Action::SkipInitialSync, "customers"),
        );
        assert_eq!(fx.events.last().unwrap().outcome, Outcome::Completed);
        let s = &c.statuses["customers"];
        assert_eq!(s.state, MapState::Running);
        assert_eq!(s.initial.as_ref().unwrap().phase, CopyPhase::Skipped);
        assert!(c.next_initial_sync(&cfg).is_none());

        // Rerun: Initializing again with the next run id, same generation and start.
        let before = c.statuses["customers"].clone();
        let mut rerun = cmd("r", Action::RerunInitialSync, "customers");
        rerun.conflict_master = Some("fno".into());
        apply(&mut c, &cfg, &rerun);
        let s = &c.statuses["customers"];
        assert_eq!(s.state, MapState::Initializing);
        assert_eq!(s.initial.as_ref().unwrap().run, 2);
        assert_eq!(
            (s.generation, &s.start_offsets),
            (before.generation, &before.start_offsets)
        );
        assert_eq!(s.conflict_master.as_deref(), Some("fno"));
        // Rerun is not available while Initializing; Skip is not while Running.
        let fx = apply(
            &mut c,
            &cfg,
            &cmd("r2", Action::RerunInitialSync, "customers"),
        );
        assert_eq!(outcomes(&fx), [Outcome::Rejected]);
        let fx = apply(
            &mut c,
            &cfg,
            &cmd("s2", Action::SkipInitialSync, "customer_groups"),
        );
        assert_eq!(outcomes(&fx), [Outcome::Rejected]);
    }

    #[test]
    fn initial_sync_off_goes_live_at_once_and_restarts_keep_copies() {
        let cfg = config();
        let mut c = Controller::new(&cfg, vec![], vec![], 0);
        apply(&mut c, &cfg, &cmd("off", Action::Run, "currencies"));
        assert_eq!(c.statuses["currencies"].state, MapState::Running);
        assert!(c.statuses["currencies"].initial.is_none());
        let mut on = cmd("on", Action::Run, "customer_groups");
        on.initial_sync = Some(true);
        apply(&mut c, &cfg, &on);
        // After a restart the copy is still due, from where it was.
        let c2 = Controller::new(&cfg, c.statuses.values().cloned().collect(), vec![], 5);
        assert!(c2.recover(5).statuses.is_empty());
        assert_eq!(c2.next_initial_sync(&cfg).unwrap().0, "customer_groups");
    }

    #[test]
    fn a_map_that_does_not_fit_its_tables_is_not_run() {
        let cfg = config();
        let c = Controller::new(&cfg, vec![], vec![], 0);
        let mut run = cmd("x", Action::Run, "customers");
        run.include_related = true;
        let fx = c.command(&cfg, &run, 1, ends, |m| {
            Ok(if m == "currencies" {
                vec!["column symbol does not exist".to_owned()]
            } else {
                vec![]
            })
        });
        assert_eq!(outcomes(&fx), [Outcome::Rejected]);
        assert!(fx.events[0]
            .message
            .contains("map `currencies` does not fit its tables: column symbol does not exist"));
        assert!(fx.statuses.is_empty());
        let fx = c.command(
            &cfg,
            &run,
            1,
            ends,
            |_| Err("side `fno` unreachable".into()),
        );
        assert_eq!(outcomes(&fx), [Outcome::Failed]);
        assert!(fx.statuses.is_empty());
    }

    #[test]
    fn restart_restores_states_and_applied_ids() {
        let cfg = config();
        let mut c = Controller::new(&cfg, vec![], vec![], 0);
        apply(&mut c, &cfg, &cmd("x", Action::Run, "currencies"));
        apply(&mut c, &cfg, &cmd("y", Action::Pause, "currencies"));
        let written: Vec<MapStatus> = c.statuses.values().cloned().collect();
        let c2 = Controller::new(&cfg, written, vec!["x".to_owned()], 5);
        assert_eq!(c2.statuses["currencies"].state, MapState::Paused);
        assert!(c2.seen.contains("x") && c2.seen.contains("y"));
    }

    #[test]
    fn a_mapping_edited_while_running_holds_the_map_until_it_is_run_again() {
        let cfg = config();
        let mut c = Controller::new(&cfg, vec![], vec![], 0);
        apply(&mut c, &cfg, &cmd("a", Action::Run, "currencies"));
        apply(&mut c, &cfg, &cmd("b", Action::Run, "customer_groups"));
        apply(&mut c, &cfg, &cmd("c", Action::Pause, "customer_groups"));
        let v1 = cfg.map("currencies").unwrap().version.clone();
        assert_eq!(
            c.statuses["currencies"].mapping_version.as_deref(),
            Some(v1.as_str())
        );

        // Restart with the same file: nothing changes.
        let written: Vec<MapStatus> = c.statuses.values().cloned().collect();
        let same = Controller::new(&cfg, written.clone(), vec![], 5);
        let mut fx = same.recover(5);
        same.check_versions(&cfg, 5, &mut fx);
        assert!(fx.statuses.is_empty() && fx.events.is_empty());

        // Restart with both maps' mappings edited: both fail, with the versions in the reason.
        let edited = Config::parse(
            &dualwrite_model::config::DEMO_CONFIG
                .replace("{ left = \"symbol\", right = \"currencysymbol\" },", "")
                .replace(
                    "{ left = \"paymenttermid\", right = \"msdyn_paymentterm\" },",
                    "",
                ),
        )
        .unwrap();
        let v2 = edited.map("currencies").unwrap().version.clone();
        assert_ne!(v1, v2);
        assert_eq!(
            edited.map("customers").unwrap().version,
            cfg.map("customers").unwrap().version
        );
        let mut c2 = Controller::new(&edited, written, vec![], 6);
        let mut fx = c2.recover(6);
        c2.check_versions(&edited, 6, &mut fx);
        assert_eq!(fx.statuses.len(), 2);
        assert_eq!(outcomes(&fx), [Outcome::Failed, Outcome::Failed]);
        c2.commit(&fx, None);
        let st = &c2.statuses["currencies"];
        assert_eq!(st.state, MapState::Failed);
        assert!(!st.state.flows());
        let reason = st.reason.as_deref().unwrap();
        assert!(reason.contains(&format!("version {v1} → {v2}")), "{reason}");
        assert!(reason.contains("stop the map, then run it"), "{reason}");
        assert_eq!(st.mapping_version.as_deref(), Some(v1.as_str()));
        assert_eq!(c2.statuses["customer_groups"].state, MapState::Failed);

        // Stop, then run: the new version is adopted.
        let fx = c2.command(
            &edited,
            &cmd("d", Action::Stop, "currencies"),
            7,
            ends,
            fits,
        );
        c2.commit(&fx, Some("d"));
        assert_eq!(c2.statuses["currencies"].state, MapState::NotRunning);
        let fx = c2.command(&edited, &cmd("e", Action::Run, "currencies"), 8, ends, fits);
        c2.commit(&fx, Some("e"));
        let st = &c2.statuses["currencies"];
        assert_eq!(st.state, MapState::Running);
        assert_eq!(st.mapping_version.as_deref(), Some(v2.as_str()));
        // A later restart with the edited file leaves it running.
        let mut fx = Effects::default();
        c2.check_versions(&edited, 9, &mut fx);
        assert!(
            fx.statuses.iter().all(|s| s.map != "currencies"),
            "{:?}",
            fx.statuses
        );
    }

    #[test]
    fn a_status_without_a_version_adopts_the_configured_one() {
        let cfg = config();
        let mut c = Controller::new(&cfg, vec![], vec![], 0);
        apply(&mut c, &cfg, &cmd("a", Action::Run, "currencies"));
        let mut old = c.statuses["currencies"].clone();
        old.mapping_version = None;
        let c2 = Controller::new(&cfg, vec![old], vec![], 1);
        let mut fx = Effects::default();
        c2.check_versions(&cfg, 1, &mut fx);
        assert_eq!(fx.statuses.len(), 1);
        assert_eq!(fx.statuses[0].state, MapState::Running);
        assert_eq!(
            fx.statuses[0].mapping_version.as_deref(),
            Some(cfg.map("currencies").unwrap().version.as_str())
        );
    }
}
