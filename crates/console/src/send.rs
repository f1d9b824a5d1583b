//! A command from a console form: built, checked as the controller would
//! check it (refused at once with its reason), sent to `<prefix>.control`
//! with an id like any other, and its acknowledgements awaited.

use std::sync::Arc;
use std::time::Duration;

use dualwrite_ctl::CommandResult;
use dualwrite_model::config::Config;
use dualwrite_model::lifecycle::{Action, ControlCommand, ResumePolicy};
use dualwrite_runtime::side::Inspect;

use crate::pages::Notice;
use crate::snapshot::Snapshot;

/// How long a command's acknowledgements are awaited before the page
/// answers (a long initial sync goes on; the table shows it).
const WAIT: Duration = Duration::from_secs(20);

/// A form's fields, in order (a name may repeat).
pub struct Form(Vec<(String, String)>);

impl Form {
    pub fn parse(body: &[u8]) -> Form {
        Form(form_urlencoded::parse(body).into_owned().collect())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// The command a form asks for, sent by `sender`. A run names the maps
/// ticked, in the dialog's order (`include_related` when more than the map
/// itself).
pub fn command_of(form: &Form, sender: String) -> Result<ControlCommand, String> {
    let map = form.get("map").ok_or("the form names no map")?;
    let name = form.get("action").ok_or("the form names no action")?;
    let action = Action::ALL
        .into_iter()
        .find(|a| a.to_string() == name)
        .ok_or_else(|| format!("unknown action `{name}`"))?;
    let mut cmd = ControlCommand::new(action, map);
    // The form's own id: sent twice (a double click, a form posted again)
    // it is one command, which the controller applies once.
    let id = form
        .get("id")
        .filter(|i| !i.is_empty() && i.len() <= 100 && i.chars().all(|c| c.is_ascii_alphanumeric()))
        .map_or_else(
            || dualwrite_runtime::now_micros().to_string(),
            str::to_owned,
        );
    cmd.id = format!("console-{id}");
    cmd.sent_by = Some(sender);
    if action != Action::Run {
        return Ok(cmd);
    }
    let include = form.all("include");
    let order: Vec<String> = form
        .all("order")
        .into_iter()
        .filter(|m| include.contains(m))
        .map(str::to_owned)
        .collect();
    if order.len() > 1 {
        cmd.include_related = true;
        cmd.order = Some(order);
    }
    cmd.conflict_master = form.get("conflict_master").map(str::to_owned);
    cmd.initial_sync = Some(form.get("initial_sync").is_some());
    if let Some(p) = form.get("resume_policy") {
        let policy =
            ResumePolicy::from_name(p).ok_or_else(|| format!("unknown resume policy `{p}`"))?;
        cmd.resume_policy = Some(policy);
    }
    Ok(cmd)
}

/// Checks and sends `cmd`; what became of it, for the page.
pub async fn send(config: &Arc<Config>, snap: &Snapshot, cmd: ControlCommand) -> Notice {
    let what = format!("{} {}", cmd.action, cmd.map);
    let refused = |why: String| Notice {
        ok: false,
        text: format!("{what}: refused: {why}"),
    };
    if let Err(why) = dualwrite_ctl::check_command(config, Some(&snap.statuses), &cmd) {
        return refused(why);
    }
    tracing::info!(id = %cmd.id, action = %cmd.action, map = %cmd.map, "console: sending a command");
    let cfg = config.clone();
    let sent = tokio::task::spawn_blocking(move || {
        dualwrite_ctl::send_command(&cfg, &cmd, WAIT, &mut std::io::sink())
    })
    .await;
    let result = match sent {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return refused(format!("not sent: {e}")),
        Err(e) => return refused(format!("not sent: {e}")),
    };
    let (ok, text) = match result {
        CommandResult::Completed => (true, "completed".to_owned()),
        CommandResult::Rejected(why) => (false, format!("rejected by the controller: {why}")),
        CommandResult::Failed(why) => (false, format!("failed: {why}")),
        CommandResult::Pending => (
            true,
            "accepted, still under way (the table follows it)".to_owned(),
        ),
        CommandResult::Unanswered => (
            false,
            format!(
                "sent, but no pause buffer answered within {} s",
                WAIT.as_secs()
            ),
        ),
    };
    Notice {
        ok,
        text: format!("{what}: {text}"),
    }
}

/// Retries the error records at `at` (`partition:offset`): their records
/// go back to the topics they came from, the rows of changes too large to
/// capture are touched. What was done, as `ctl retry-errors` says it.
pub async fn retry<I: Inspect>(config: &Arc<Config>, at: Vec<&str>) -> Result<String, String> {
    if at.is_empty() {
        return Err("no record selected".into());
    }
    let filter = dualwrite_ctl::ErrorFilter {
        map: None,
        class: None,
        at: at.into_iter().map(str::to_owned).collect(),
    };
    let cfg = config.clone();
    let (touches, mut out) = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        dualwrite_ctl::retry_errors(&cfg, &filter, &mut out).map(|t| (t, out))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    dualwrite_ctl::touch::retry::<I>(config, &touches, &mut out)
        .await
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_form_names_the_ticked_maps_in_the_dialogs_order() {
        let body = b"map=contacts&action=Run&order=currencies&include=currencies&order=customer_groups\
&order=customers&include=customers&order=contacts&include=contacts&conflict_master=fno&initial_sync=on";
        let cmd = command_of(&Form::parse(body), "console: ana".into()).unwrap();
        assert_eq!(cmd.sent_by.as_deref(), Some("console: ana"));
        let again = command_of(
            &Form::parse(b"map=contacts&action=Pause&id=f00d"),
            String::new(),
        );
        assert_eq!(again.unwrap().id, "console-f00d");
        assert_eq!(cmd.action, Action::Run);
        assert!(cmd.include_related);
        assert_eq!(
            cmd.order.as_deref().unwrap(),
            ["currencies", "customers", "contacts"]
        );
        assert_eq!(cmd.conflict_master.as_deref(), Some("fno"));
        assert_eq!(cmd.initial_sync, Some(true));
        let alone = command_of(
            &Form::parse(b"map=contacts&action=Run&order=contacts&include=contacts"),
            String::new(),
        )
        .unwrap();
        assert!(!alone.include_related && alone.order.is_none());
        assert_eq!(alone.initial_sync, Some(false));
        let pause = command_of(&Form::parse(b"map=contacts&action=Pause"), String::new()).unwrap();
        assert_eq!((pause.action, pause.initial_sync), (Action::Pause, None));
        assert!(command_of(&Form::parse(b"map=contacts&action=Explode"), String::new()).is_err());
    }
}
