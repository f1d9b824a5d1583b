//! Who may send commands. Reading needs nothing; commands need the
//! operator token (`DUALWRITE_CONSOLE_TOKEN`, or a file), given once on the
//! sign-in page. A sign-in opens a session: a random id in an `HttpOnly`,
//! `SameSite=Strict` cookie, and a random form token that every command
//! form carries (a page of another site can neither read it nor send the
//! cookie along). The operator gives a name at sign-in, recorded on every
//! command as `console: <name>`. Sessions live in memory for 12 hours.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::header::COOKIE;
use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::pages::{Notice, Viewer};
use crate::random;

const COOKIE_NAME: &str = "dw_console";
const LIFETIME: Duration = Duration::from_secs(12 * 3600);

struct Session {
    csrf: String,
    name: String,
    /// A command's outcome, shown once by the next page (post, redirect, get).
    flash: Option<Notice>,
    since: Instant,
}

/// The operator token and the open sessions.
pub struct Auth {
    /// SHA-256 of the token: compared as digests, so the comparison's time
    /// tells nothing of the token.
    token: Option<[u8; 32]>,
    sessions: Mutex<HashMap<String, Session>>,
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl Auth {
    /// `token`: the operator token; `None`: the console is read-only.
    pub fn new(token: Option<&str>) -> Auth {
        Auth {
            token: token.filter(|t| !t.is_empty()).map(digest),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn session_id(headers: &HeaderMap) -> Option<String> {
        headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == COOKIE_NAME)
            .map(|(_, v)| v.to_owned())
    }

    /// Who sent `headers`.
    pub fn viewer(&self, headers: &HeaderMap) -> Viewer {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, s| s.since.elapsed() < LIFETIME);
        match Self::session_id(headers).and_then(|id| sessions.get(&id)) {
            Some(s) => Viewer::Operator {
                csrf: s.csrf.clone(),
                name: s.name.clone(),
            },
            None => Viewer::Reader {
                can_sign_in: self.token.is_some(),
            },
        }
    }

    /// Opens a session for the right token, for the operator `name`: the
    /// `Set-Cookie` value.
    pub fn sign_in(&self, token: &str, name: &str) -> Option<String> {
        if self.token? != digest(token) {
            return None;
        }
        let id = random::id();
        let session = Session {
            csrf: random::id(),
            name: name.trim().chars().take(100).collect(),
            flash: None,
            since: Instant::now(),
        };
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.insert(id.clone(), session);
        Some(format!(
            "{COOKIE_NAME}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
            LIFETIME.as_secs()
        ))
    }

    /// Keeps `notice` for the session's next page.
    pub fn set_flash(&self, headers: &HeaderMap, notice: Notice) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = Self::session_id(headers).and_then(|id| sessions.get_mut(&id)) {
            s.flash = Some(notice);
        }
    }

    /// The notice kept for this page, if any (once).
    pub fn take_flash(&self, headers: &HeaderMap) -> Option<Notice> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        Self::session_id(headers)
            .and_then(|id| sessions.get_mut(&id))
            .and_then(|s| s.flash.take())
    }

    /// Whether a command form may be acted on: a session, and its form
    /// token. Who sends it, as commands record it.
    pub fn may_command(
        &self,
        headers: &HeaderMap,
        csrf: Option<&str>,
    ) -> Result<String, &'static str> {
        match self.viewer(headers) {
            Viewer::Operator {
                csrf: expected,
                name,
            } if csrf == Some(expected.as_str()) => Ok(format!("console: {name}")),
            Viewer::Operator { .. } => Err("the form is stale or from elsewhere: reload the page"),
            Viewer::Reader { .. } => Err("sign in with the operator token to send commands"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_cookie(set_cookie: &str) -> HeaderMap {
        let pair = set_cookie.split(';').next().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            HeaderValue::from_str(&format!("other=1; {pair}")).unwrap(),
        );
        h
    }

    #[test]
    fn commands_need_the_token_and_the_session_form_token() {
        let auth = Auth::new(Some("s3cret"));
        assert!(auth.sign_in("wrong", "ana").is_none());
        let cookie = auth.sign_in("s3cret", "ana").unwrap();
        let h = with_cookie(&cookie);
        let Viewer::Operator { csrf, .. } = auth.viewer(&h) else {
            panic!("signed in")
        };
        assert_eq!(auth.may_command(&h, Some(&csrf)).unwrap(), "console: ana");
        assert!(auth.may_command(&h, Some("forged")).is_err());
        assert!(auth.may_command(&h, None).is_err());
        assert!(auth.may_command(&HeaderMap::new(), Some(&csrf)).is_err());
    }

    #[test]
    fn without_a_token_nobody_signs_in() {
        let auth = Auth::new(None);
        assert!(auth.sign_in("", "ana").is_none());
        assert!(matches!(
            auth.viewer(&HeaderMap::new()),
            Viewer::Reader { can_sign_in: false }
        ));
    }
}
