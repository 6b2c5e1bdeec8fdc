//! Console sessions and the login rate limit: pure, time passed in.
//!
//! A session is a random 256-bit token in an `HttpOnly`, `SameSite=Strict`
//! cookie (`Secure` on HTTPS), known only to the node that issued it, with a
//! CSRF token that every state-changing request made with the cookie must
//! repeat in the `X-CSRF-Token` header. Sessions end `session_ttl` after the
//! login, at logout, or when the user is removed.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

/// Most sessions kept; the oldest goes first beyond that.
pub(crate) const MAX_SESSIONS: usize = 4096;
/// Failed logins allowed per client address (and per user name) in
/// [`LOGIN_WINDOW`]; more are refused (429) until the window ends.
pub(crate) const MAX_LOGIN_FAILURES: u32 = 5;
/// The rate limit's window.
pub(crate) const LOGIN_WINDOW: Duration = Duration::from_mins(1);
/// Most clients and names tracked by the rate limit.
const MAX_TRACKED: usize = 8192;

/// One logged-in browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Session {
    /// User name.
    pub(crate) user: String,
    /// Token to repeat in `X-CSRF-Token`.
    pub(crate) csrf: String,
    /// End of validity.
    pub(crate) expires: Instant,
}

/// Sessions of this node.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    by_token: HashMap<String, Session>,
}

impl Sessions {
    /// Records a new session.
    pub(crate) fn insert(&mut self, now: Instant, token: String, session: Session) {
        self.by_token.retain(|_, s| s.expires > now);
        if self.by_token.len() >= MAX_SESSIONS
            && let Some(oldest) = self
                .by_token
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(t, _)| t.clone())
        {
            self.by_token.remove(&oldest);
        }
        self.by_token.insert(token, session);
    }

    /// The live session of `token`.
    pub(crate) fn get(&mut self, now: Instant, token: &str) -> Option<Session> {
        match self.by_token.get(token) {
            Some(s) if s.expires > now => Some(s.clone()),
            Some(_) => {
                self.by_token.remove(token);
                None
            }
            None => None,
        }
    }

    /// Ends a session.
    pub(crate) fn remove(&mut self, token: &str) {
        self.by_token.remove(token);
    }
}

/// Failed logins per client address and per user name.
#[derive(Debug, Default)]
pub(crate) struct LoginLimiter {
    by_addr: HashMap<IpAddr, (Instant, u32)>,
    by_user: HashMap<String, (Instant, u32)>,
}

impl LoginLimiter {
    /// `Err(seconds to wait)` when this client or this name failed too
    /// often in the current window.
    pub(crate) fn check(&mut self, now: Instant, addr: IpAddr, user: &str) -> Result<(), u64> {
        let wait = |e: Option<&(Instant, u32)>| {
            e.and_then(|(start, n)| {
                let end = *start + LOGIN_WINDOW;
                (*n >= MAX_LOGIN_FAILURES && end > now)
                    .then(|| end.saturating_duration_since(now).as_secs().max(1))
            })
        };
        match wait(self.by_addr.get(&addr)).max(wait(self.by_user.get(user))) {
            Some(secs) => Err(secs),
            None => Ok(()),
        }
    }

    /// Counts a failed login.
    pub(crate) fn failed(&mut self, now: Instant, addr: IpAddr, user: &str) {
        fn bump<K: std::hash::Hash + Eq>(m: &mut HashMap<K, (Instant, u32)>, now: Instant, k: K) {
            if m.len() >= MAX_TRACKED {
                m.retain(|_, (start, _)| *start + LOGIN_WINDOW > now);
            }
            if m.len() >= MAX_TRACKED {
                return;
            }
            let e = m.entry(k).or_insert((now, 0));
            if e.0 + LOGIN_WINDOW <= now {
                *e = (now, 0);
            }
            e.1 += 1;
        }
        bump(&mut self.by_addr, now, addr);
        bump(&mut self.by_user, now, user.to_owned());
    }

    /// A successful login clears that client's count.
    pub(crate) fn succeeded(&mut self, addr: IpAddr) {
        self.by_addr.remove(&addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_end() {
        let t0 = Instant::now();
        let mut s = Sessions::default();
        let sess = Session {
            user: "alice".into(),
            csrf: "c".into(),
            expires: t0 + Duration::from_secs(10),
        };
        s.insert(t0, "tok".into(), sess.clone());
        assert_eq!(s.get(t0, "tok"), Some(sess));
        assert_eq!(s.get(t0, "other"), None);
        assert_eq!(s.get(t0 + Duration::from_secs(10), "tok"), None);
        s.insert(
            t0,
            "tok2".into(),
            Session {
                user: "bob".into(),
                csrf: "d".into(),
                expires: t0 + Duration::from_secs(10),
            },
        );
        s.remove("tok2");
        assert_eq!(s.get(t0, "tok2"), None);
    }

    #[test]
    fn logins_are_rate_limited_per_client_and_name() {
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mut l = LoginLimiter::default();
        for _ in 0..MAX_LOGIN_FAILURES {
            assert!(l.check(t0, a, "alice").is_ok());
            l.failed(t0, a, "alice");
        }
        assert!(l.check(t0, a, "bob").is_err(), "same client");
        assert!(l.check(t0, b, "alice").is_err(), "same name");
        assert!(l.check(t0, b, "bob").is_ok());
        let later = t0 + LOGIN_WINDOW;
        assert!(l.check(later, a, "alice").is_ok(), "window over");
    }
}
