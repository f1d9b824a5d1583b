//! What an operator command does, decided from the configuration and the
//! maps' states before anything is written: the lifecycle controller
//! applies it, and `ctl` checks a command with it before sending (so an
//! unknown map or an action the state does not allow is refused at once,
//! with the reason the controller would give).

use std::collections::BTreeMap;

use crate::config::Config;
use crate::lifecycle::{
    command_order, dependencies, dependents, next_state, Action, ControlCommand, MapState,
    MapStatus,
};

/// What a command does, decided before anything is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The maps acted on, in order.
    pub steps: Vec<(String, MapState)>,
    /// Related maps, warnings and maps left as they are, for the operator.
    pub notes: Vec<String>,
}

/// Checks `cmd` against the configuration alone (the map, its options,
/// the order of related maps, their alternate keys): the maps it acts on,
/// in order, or why it is rejected whatever the maps' states.
pub fn check(config: &Config, cmd: &ControlCommand) -> Result<Vec<String>, String> {
    if config.map(&cmd.map).is_none() {
        let known: Vec<&str> = config.maps.iter().map(|m| m.name.as_str()).collect();
        return Err(format!(
            "unknown map `{}` (configured: {})",
            cmd.map,
            known.join(", ")
        ));
    }
    if let Some(m) = &cmd.conflict_master {
        if config.side_id(m).is_none() {
            return Err(format!(
                "conflict master `{m}` is not a side: use `{}` or `{}`",
                config.sides.left.name, config.sides.right.name
            ));
        }
    }
    if cmd.action != Action::Run
        && (cmd.initial_sync.is_some()
            || cmd.resume_policy.is_some()
            || (cmd.conflict_master.is_some() && cmd.action != Action::RerunInitialSync))
    {
        return Err(format!(
            "initial_sync, conflict_master and resume_policy are options of Run (conflict_master also of RerunInitialSync), not of {}",
            cmd.action
        ));
    }
    if cmd.action == Action::Stop && cmd.include_related {
        return Err("Stop acts on one map: include_related is not available".into());
    }
    let mut order = command_order(config, &cmd.map, cmd.include_related, cmd.order.as_deref())?;
    // A related pause also pauses the maps that depend on the paused ones
    // (first), so no child record flows while its parent queues.
    if cmd.action == Action::Pause && cmd.include_related {
        let mut children: Vec<String> = Vec::new();
        for m in &order {
            for d in dependents(config, m) {
                if !order.contains(&d) && !children.contains(&d) {
                    children.push(d);
                }
            }
        }
        children.extend(order);
        order = children;
    }
    if cmd.action == Action::Run {
        for m in &order {
            let problems = config.map(m).map(|c| c.key_problems()).unwrap_or_default();
            if !problems.is_empty() {
                let list: Vec<String> = problems
                    .into_iter()
                    .map(|(f, msg)| format!("{f}: {msg}"))
                    .collect();
                return Err(format!(
                    "map `{m}` cannot run: its alternate key is not mapped: {}",
                    list.join("; ")
                ));
            }
        }
    }
    Ok(order)
}

/// Decides what `cmd` does given the current states (a map without a
/// status is Not running), or why it is rejected.
pub fn plan(
    config: &Config,
    states: &BTreeMap<String, MapStatus>,
    cmd: &ControlCommand,
) -> Result<Plan, String> {
    let order = check(config, cmd)?;
    let state_of = |m: &str| states.get(m).map_or(MapState::NotRunning, |s| s.state);
    let mut steps = Vec::new();
    let mut notes = Vec::new();
    for m in &order {
        let target = m == &cmd.map;
        match next_state(state_of(m), cmd.action) {
            Ok(to) => steps.push((m.clone(), to)),
            Err(reason) if target => return Err(format!("map `{m}`: {reason}")),
            Err(_) => notes.push(format!(
                "related map `{m}` is {}: left as it is",
                state_of(m)
            )),
        }
    }
    if cmd.action == Action::Run {
        let deps = dependencies(config, &cmd.map);
        if !deps.is_empty() {
            notes.push(format!("related maps: {}", deps.join(", ")));
        }
        if !cmd.include_related {
            let idle: Vec<&String> = deps.iter().filter(|d| !state_of(d).flows()).collect();
            if !idle.is_empty() {
                notes.push(format!(
                    "warning: `{}` depends on maps that are not running: {} (run them too, or run with include_related)",
                    cmd.map,
                    idle.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }
    Ok(Plan { steps, notes })
}
