//! Replay protection: a sliding window per (sender node, module), as `IPsec`'s
//! anti-replay window (RFC 4303 §3.4.3), keyed by the sender's epoch.

/// Width of the window: counters up to this far behind the highest seen are
/// still accepted once each (heartbeats on several LANs may reorder).
pub const WINDOW: u64 = 128;

/// Replay state for one (sender, module).
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    epoch: u64,
    highest: u64,
    /// Bit i set = counter `highest - i` was seen.
    seen: u128,
    started: bool,
}

impl ReplayWindow {
    /// Checks `(epoch, counter)` and records it when fresh. Returns false for
    /// a replay: an older epoch, a counter already seen, or one too old.
    pub fn check_and_record(&mut self, epoch: u64, counter: u64) -> bool {
        if !self.started || epoch > self.epoch {
            // A new incarnation of the sender (it restarted): start afresh.
            *self = Self {
                epoch,
                highest: counter,
                seen: 1,
                started: true,
            };
            return true;
        }
        if epoch < self.epoch {
            return false;
        }
        if counter > self.highest {
            let shift = counter - self.highest;
            self.seen = if shift >= WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.highest = counter;
            return true;
        }
        let behind = self.highest - counter;
        if behind >= WINDOW {
            return false;
        }
        let bit = 1u128 << behind;
        if self.seen & bit != 0 {
            return false;
        }
        self.seen |= bit;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_and_old_counters_are_replays() {
        let mut w = ReplayWindow::default();
        assert!(w.check_and_record(1, 10));
        assert!(!w.check_and_record(1, 10));
        assert!(w.check_and_record(1, 12));
        assert!(w.check_and_record(1, 11), "reordered but fresh");
        assert!(!w.check_and_record(1, 11));
        assert!(w.check_and_record(1, 500));
        assert!(
            !w.check_and_record(1, 500 - WINDOW),
            "older than the window"
        );
        assert!(w.check_and_record(1, 500 - WINDOW + 1));
    }

    #[test]
    fn epochs_order_incarnations() {
        let mut w = ReplayWindow::default();
        assert!(w.check_and_record(5, 100));
        assert!(w.check_and_record(6, 0), "restarted sender");
        assert!(!w.check_and_record(5, 101), "previous incarnation");
        assert!(w.check_and_record(6, 1));
    }
}
