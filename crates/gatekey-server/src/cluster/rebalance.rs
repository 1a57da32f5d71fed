//! Evening out agents across replicas (`rebalance_batch`, off by default).
//!
//! After a replica was down, the others hold its agents and it holds none,
//! and nothing moves them back by itself. With `rebalance_batch` set, a
//! replica holding more than its share (the agents all replicas report in
//! their heartbeats, divided among them, plus 5 %) closes the links of up to
//! that many idle agents per heartbeat ("going away"); they reconnect
//! through the load balancer and land wherever it sends them. A link with a
//! stream open (exec, console, diagnostics) is never closed. If most of the
//! agents handed over come back (they dial this replica directly), handing
//! over pauses.

use std::time::{Duration, Instant};

/// Heartbeats to wait after handing agents over before judging where they
/// went (they reconnect within a second or two).
pub const SETTLE_BEATS: u32 = 3;
/// Heartbeats to pause when handing over is futile.
pub const PAUSE_BEATS: u32 = 120;

/// How many agents to hand over, holding `own` while the other replicas
/// hold `peers`: none unless `own` exceeds the fair share by more than 5 %
/// (at least one agent), then down to the share, at most `batch`.
pub fn excess(own: u64, peers: &[u64], batch: u64) -> u64 {
    if peers.is_empty() || batch == 0 {
        return 0;
    }
    let replicas = peers.len() as u64 + 1;
    let total = own + peers.iter().sum::<u64>();
    let share = total.div_ceil(replicas);
    let slack = (share / 20).max(1);
    if own <= share + slack {
        return 0;
    }
    (own - share).min(batch)
}

/// What to do at one heartbeat.
#[derive(Debug, PartialEq)]
pub enum Step {
    Nothing,
    /// Close this many idle links.
    Hand(u64),
    /// Most agents handed over came back: paused for this long.
    Paused(Duration),
}

/// One replica's handing over, from heartbeat to heartbeat.
#[derive(Default)]
pub struct Balancer {
    /// When agents were last handed over, how many this replica held just
    /// before, and how many it handed.
    last: Option<(Instant, u64, u64)>,
    paused_until: Option<Instant>,
}

impl Balancer {
    pub fn step(
        &mut self,
        now: Instant,
        beat: Duration,
        own: u64,
        peers: &[u64],
        batch: u64,
    ) -> Step {
        if let Some(until) = self.paused_until {
            if now < until {
                return Step::Nothing;
            }
            self.paused_until = None;
        }
        if let Some((at, before, handed)) = self.last {
            if now.duration_since(at) < beat * SETTLE_BEATS {
                return Step::Nothing;
            }
            self.last = None;
            // Fewer than a quarter of them stayed away: they come back here
            // whatever the balancer does (or there is none).
            let gone = before.saturating_sub(own);
            if handed >= 4 && gone < handed / 4 {
                let pause = beat * PAUSE_BEATS;
                self.paused_until = Some(now + pause);
                return Step::Paused(pause);
            }
        }
        match excess(own, peers, batch) {
            0 => Step::Nothing,
            k => {
                self.last = Some((now, own, k));
                Step::Hand(k)
            }
        }
    }

    /// How many were really handed over after [`Step::Hand`] (fewer when
    /// not enough links were idle).
    pub fn handed(&mut self, n: u64) {
        match &mut self.last {
            Some(_) if n == 0 => self.last = None,
            Some((_, _, handed)) => *handed = n,
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_replica_above_its_share_hands_over() {
        // Alone, or without counts from the others: nothing.
        assert_eq!(excess(100, &[], 10), 0);
        assert_eq!(excess(100, &[0], 0), 0);
        // Even enough (share 34, slack 1).
        assert_eq!(excess(35, &[34, 31], 10), 0);
        // Above: down to the share, at most the batch.
        assert_eq!(excess(40, &[30, 30], 10), 6);
        assert_eq!(excess(1000, &[0, 0], 10), 10);
        assert_eq!(excess(12, &[0], 100), 6);
        // One agent more than the share is within the slack.
        assert_eq!(excess(2, &[1], 10), 0);
        assert_eq!(excess(3, &[0], 10), 0);
        assert_eq!(excess(4, &[0], 10), 2);
    }

    #[test]
    fn hands_over_then_waits_then_pauses_when_they_come_back() {
        let beat = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut b = Balancer::default();
        assert_eq!(b.step(t0, beat, 20, &[0], 8), Step::Hand(8));
        // Until they had time to reconnect: nothing.
        assert_eq!(b.step(t0 + beat, beat, 12, &[8], 8), Step::Nothing);
        // Half stayed away (through a balancer): go on.
        assert_eq!(b.step(t0 + beat * 3, beat, 16, &[4], 8), Step::Hand(6));
        // All came back (they dial this replica): pause.
        let t1 = t0 + beat * 6;
        assert_eq!(
            b.step(t1, beat, 16, &[4], 8),
            Step::Paused(beat * PAUSE_BEATS)
        );
        assert_eq!(b.step(t1 + beat, beat, 16, &[4], 8), Step::Nothing);
        // After the pause, once more.
        let t2 = t1 + beat * PAUSE_BEATS;
        assert_eq!(b.step(t2, beat, 16, &[4], 8), Step::Hand(6));
    }
}
