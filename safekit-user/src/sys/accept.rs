//! The pause of an accept loop after `accept` fails (out of file
//! descriptors, out of memory, ...): the loop never stops for it, and never
//! spins either. The first pause is short, each next one twice as long up
//! to a second, and a successful accept resets it. Failures are logged on
//! the 1st, 2nd, 4th, 8th... (a loop at its limit fails many times).

use std::time::Duration;

/// First pause after a failed `accept`.
const MIN: Duration = Duration::from_millis(10);
/// Longest pause.
const MAX: Duration = Duration::from_secs(1);

/// The state of one accept loop.
#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    pause: Duration,
    failures: u64,
}

impl AcceptBackoff {
    /// For the listener `what` (in log lines).
    #[must_use]
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            pause: MIN,
            failures: 0,
        }
    }

    /// An accept succeeded.
    pub fn ok(&mut self) {
        self.pause = MIN;
    }

    /// An accept failed with `e`: logs (rate-limited) and waits before the
    /// next one.
    pub async fn failed(&mut self, e: &std::io::Error) {
        self.failures += 1;
        if self.failures.is_power_of_two() {
            tracing::warn!(
                listener = self.what,
                error = %e,
                failures = self.failures,
                pause = ?self.pause,
                "accept failed, retrying"
            );
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(MAX);
    }

    /// Failures so far.
    #[must_use]
    pub fn failures(&self) -> u64 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pauses_double_up_to_a_second_and_reset_on_success() {
        let mut b = AcceptBackoff::new("test");
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let t = tokio::time::Instant::now();
        for _ in 0..10 {
            b.failed(&e).await;
        }
        // 10+20+40+...+640 ms, then 1 s thrice.
        assert_eq!(t.elapsed(), Duration::from_millis(1270 + 3000));
        b.ok();
        let t = tokio::time::Instant::now();
        b.failed(&e).await;
        assert_eq!(t.elapsed(), MIN);
        assert_eq!(b.failures(), 11);
    }
}
