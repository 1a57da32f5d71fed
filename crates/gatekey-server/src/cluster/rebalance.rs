//! Evening out agents across replicas (`rebalance_batch`, off by default).
//!
//! After a replica was down, the others hold its agents and it holds none,
//! and nothing moves them back by itself. With `rebalance_batch` set, a
//! replica holding more than its share (the agents all replicas report in
//! their heartbeats, divided among them, plus 5 %) closes the links of up to
//! that many idle agents per heartbeat ("going away"); they reconnect
//! through the load balancer and land wherever it sends them. A link with a
//! session or stream open is never closed, nor one that arrived within the
//! last few heartbeats (it may have just been handed over by another). If
//! fewer than a quarter of the agents handed over stay away (they dial this
//! replica directly), handing over pauses, longer each time.

use std::time::{Duration, Instant};

/// Heartbeats to wait after handing agents over before judging where they
/// went (they reconnect within a second or two); also the age a link must
/// have to be handed over.
pub const SETTLE_BEATS: u32 = 3;
/// Heartbeats of the first pause when handing over is futile; each pause
/// in a row doubles it, up to eight times.
pub const PAUSE_BEATS: u32 = 120;

/// Agents a heartbeat may report; more is taken for garbage.
const MAX_REPORTED: u64 = 10_000_000;

/// How many agents to hand over, holding `own` while the other replicas
/// hold `peers`: none unless `own` exceeds the fair share by more than 5 %
/// (at least one agent), then down to the share, at most `batch`.
pub fn excess(own: u64, peers: &[u64], batch: u64) -> u64 {
    if peers.is_empty() || batch == 0 || peers.iter().any(|&p| p > MAX_REPORTED) {
        return 0;
    }
    let replicas = peers.len() as u64 + 1;
    let total = peers.iter().fold(own, |t, &p| t.saturating_add(p));
    let share = total.div_ceil(replicas);
    let slack = (share / 20).max(1);
    if own <= share.saturating_add(slack) {
        return 0;
    }
    (own - share).min(batch)
}

/// What to do at one heartbeat.
#[derive(Debug, PartialEq)]
pub enum Step {
    Nothing,
    /// Close this many idle links, then report them with
    /// [`Balancer::handed`].
    Hand(u64),
    /// Most agents handed over came back: paused for this long.
    Paused(Duration),
}

/// One replica's handing over, from heartbeat to heartbeat.
#[derive(Default)]
pub struct Balancer {
    /// When agents were last handed over, and which (node ids).
    last: Option<(Instant, Vec<String>)>,
    paused_until: Option<Instant>,
    /// Pauses in a row.
    pauses: u32,
}

impl Balancer {
    /// `here` says whether an agent's link is on this replica now.
    pub fn step(
        &mut self,
        now: Instant,
        beat: Duration,
        own: u64,
        peers: &[u64],
        batch: u64,
        here: impl Fn(&str) -> bool,
    ) -> Step {
        if let Some(until) = self.paused_until {
            if now < until {
                return Step::Nothing;
            }
            self.paused_until = None;
        }
        if let Some((at, handed)) = &self.last {
            if now.duration_since(*at) < beat * SETTLE_BEATS {
                return Step::Nothing;
            }
            // Fewer than a quarter of them stayed away: they come back here
            // whatever the balancer does (or there is none).
            let away = handed.iter().filter(|id| !here(id)).count();
            let futile = away * 4 < handed.len();
            self.last = None;
            if futile {
                let pause = beat * PAUSE_BEATS * (1 << self.pauses.min(3));
                self.pauses += 1;
                self.paused_until = Some(now + pause);
                return Step::Paused(pause);
            }
            self.pauses = 0;
        }
        match excess(own, peers, batch) {
            0 => Step::Nothing,
            k => Step::Hand(k),
        }
    }

    /// The agents (node ids) really handed over after [`Step::Hand`].
    pub fn handed(&mut self, now: Instant, ids: Vec<String>) {
        self.last = (!ids.is_empty()).then_some((now, ids));
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
        // A count no replica can hold is ignored, and nothing overflows.
        assert_eq!(excess(100, &[u64::MAX], 10), 0);
        assert_eq!(excess(u64::MAX, &[MAX_REPORTED], 10), 10);
    }

    fn ids(r: std::ops::Range<u32>) -> Vec<String> {
        r.map(|i| format!("n{i}")).collect()
    }

    #[test]
    fn hands_over_then_waits_then_pauses_when_they_come_back() {
        let beat = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut b = Balancer::default();
        let nowhere = |_: &str| false;
        let everywhere = |_: &str| true;
        assert_eq!(b.step(t0, beat, 20, &[0], 8, nowhere), Step::Hand(8));
        b.handed(t0, ids(0..8));
        // Until they had time to reconnect: nothing.
        assert_eq!(b.step(t0 + beat, beat, 12, &[8], 8, nowhere), Step::Nothing);
        // Half stayed away (through a balancer): go on.
        let half = |id: &str| ["n0", "n1", "n2", "n3"].contains(&id);
        let t1 = t0 + beat * 3;
        assert_eq!(b.step(t1, beat, 16, &[4], 8, half), Step::Hand(6));
        b.handed(t1, ids(8..14));
        // All came back (they dial this replica): pause, whatever else
        // arrived or left meanwhile.
        let t2 = t1 + beat * 3;
        let first = beat * PAUSE_BEATS;
        assert_eq!(
            b.step(t2, beat, 10, &[10], 8, everywhere),
            Step::Paused(first)
        );
        assert_eq!(
            b.step(t2 + beat, beat, 16, &[4], 8, everywhere),
            Step::Nothing
        );
        // After the pause, once more; coming back again pauses twice as long.
        let t3 = t2 + first;
        assert_eq!(b.step(t3, beat, 16, &[4], 8, everywhere), Step::Hand(6));
        b.handed(t3, ids(0..1));
        let t4 = t3 + beat * 3;
        assert_eq!(
            b.step(t4, beat, 16, &[4], 8, everywhere),
            Step::Paused(first * 2)
        );
        // Nothing handed (no idle link): nothing to judge.
        let t5 = t4 + first * 2;
        assert_eq!(b.step(t5, beat, 16, &[4], 8, everywhere), Step::Hand(6));
        b.handed(t5, vec![]);
        assert_eq!(
            b.step(t5 + beat, beat, 16, &[4], 8, everywhere),
            Step::Hand(6)
        );
    }
}
