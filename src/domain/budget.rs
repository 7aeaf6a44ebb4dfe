//! Per-caller detokenize budgets: how fast one identity may turn tokens back
//! into card numbers, so that a stolen payment-worker certificate cannot
//! empty the vault at full speed (REQUIREMENTS 4, ASVS 2.4.1).
//!
//! Each identity has its own budget (a generic cell rate limiter: a
//! sustained rate and a burst). A call that names no token the caller may
//! read — malformed, unknown, or another tenant's — costs `miss_cost` calls,
//! so guessing or replaying tokens spends a budget many times faster than
//! charging cards does. Running out is an alert: at most one warning per
//! identity per [`ALERT_EVERY`], for the log pipeline to raise; the audit
//! log keeps every refused call.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// At most one alert per identity this often, whatever the call rate.
pub const ALERT_EVERY: Duration = Duration::from_secs(10);

/// The configured budgets.
#[derive(Debug, Clone)]
pub struct DetokenizeLimits {
    /// For an identity not listed in `per_identity`.
    pub default: Quota,
    /// Budgets set for one identity.
    pub per_identity: HashMap<String, Quota>,
    /// What a call that finds no token costs, in calls.
    pub miss_cost: NonZeroU32,
}

/// The defaults: 1000 calls a second, bursts of 2000, a miss costs 10.
/// Enough for a busy payment worker; an identity that charges more has its
/// own budget configured.
impl Default for DetokenizeLimits {
    fn default() -> Self {
        Self {
            default: Quota::per_second(nonzero(1000)).allow_burst(nonzero(2000)),
            per_identity: HashMap::new(),
            miss_cost: nonzero(10),
        }
    }
}

const fn nonzero(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => NonZeroU32::MIN,
    }
}

/// Why an alert is raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alert {
    /// The identity asked faster than its budget allows.
    RateExceeded,
    /// Calls for tokens that do not exist (for this caller) spent the
    /// budget: a pattern of guessing or enumerating tokens.
    Misses,
}

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, Plain<C>>;
type Keyed<C> = RateLimiter<String, DashMapStateStore<String>, C, Plain<C>>;
type Plain<C> = NoOpMiddleware<<C as Clock>::Instant>;

/// The live budgets, one per identity. Lock-free for configured identities
/// (the map is fixed at start); others share a keyed limiter, which only
/// identities holding the detokenize role ever reach.
pub struct Budgets<C: Clock = DefaultClock> {
    configured: HashMap<String, Direct<C>>,
    others: Keyed<C>,
    alerts: Keyed<C>,
    miss_cost: NonZeroU32,
    clock: C,
}

impl<C: Clock> std::fmt::Debug for Budgets<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budgets")
            .field("configured", &self.configured.len())
            .field("miss_cost", &self.miss_cost)
            .finish_non_exhaustive()
    }
}

impl Budgets<DefaultClock> {
    pub fn new(limits: &DetokenizeLimits) -> Self {
        Self::with_clock(limits, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Budgets<C> {
    pub fn with_clock(limits: &DetokenizeLimits, clock: C) -> Self {
        let configured = limits
            .per_identity
            .iter()
            .map(|(id, q)| {
                (
                    id.clone(),
                    RateLimiter::direct_with_clock(*q, clock.clone()),
                )
            })
            .collect();
        let alert_quota =
            Quota::with_period(ALERT_EVERY).unwrap_or(Quota::per_hour(NonZeroU32::MIN));
        Self {
            configured,
            others: RateLimiter::new(limits.default, DashMapStateStore::default(), clock.clone()),
            alerts: RateLimiter::new(alert_quota, DashMapStateStore::default(), clock.clone()),
            miss_cost: limits.miss_cost,
            clock,
        }
    }

    /// Takes one call from `identity`'s budget. When it is spent: how long
    /// until the next call would be admitted.
    pub fn admit(&self, identity: &str) -> Result<(), Duration> {
        let res = match self.configured.get(identity) {
            Some(l) => l.check(),
            None => self.others.check_key(&identity.to_owned()),
        };
        res.map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Charges a call that found no token with the rest of a miss's cost,
    /// as far as the budget goes. True if that spent the budget.
    pub fn charge_miss(&self, identity: &str) -> bool {
        (1..self.miss_cost.get()).any(|_| self.admit(identity).is_err())
    }

    /// Whether to raise an alert for `identity` now: at most one per
    /// [`ALERT_EVERY`].
    pub fn should_alert(&self, identity: &str) -> bool {
        self.alerts.check_key(&identity.to_owned()).is_ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn limits(rate: u32, burst: u32, miss_cost: u32) -> DetokenizeLimits {
        DetokenizeLimits {
            default: Quota::per_second(nz(rate)).allow_burst(nz(burst)),
            per_identity: HashMap::new(),
            miss_cost: nz(miss_cost),
        }
    }

    fn admitted(b: &Budgets<FakeRelativeClock>, id: &str, calls: usize) -> usize {
        (0..calls).filter(|_| b.admit(id).is_ok()).count()
    }

    #[test]
    fn a_burst_is_admitted_then_the_sustained_rate() {
        let clock = FakeRelativeClock::default();
        let b = Budgets::with_clock(&limits(10, 5, 10), clock.clone());
        assert_eq!(admitted(&b, "w", 20), 5);
        let wait = b.admit("w").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        clock.advance(Duration::from_millis(100));
        assert_eq!(admitted(&b, "w", 5), 1, "one call per 100 ms at 10/s");
        clock.advance(Duration::from_secs(60));
        assert_eq!(
            admitted(&b, "w", 20),
            5,
            "an idle budget refills to its burst only"
        );
    }

    #[test]
    fn each_identity_has_its_own_budget() {
        let clock = FakeRelativeClock::default();
        let b = Budgets::with_clock(&limits(1, 3, 10), clock);
        assert_eq!(admitted(&b, "a", 10), 3);
        assert_eq!(
            admitted(&b, "b", 10),
            3,
            "a's spent budget does not touch b's"
        );
    }

    #[test]
    fn a_configured_identity_uses_its_own_quota() {
        let clock = FakeRelativeClock::default();
        let mut l = limits(1, 2, 10);
        l.per_identity
            .insert("big".into(), Quota::per_second(nz(1)).allow_burst(nz(50)));
        let b = Budgets::with_clock(&l, clock);
        assert_eq!(admitted(&b, "big", 100), 50);
        assert_eq!(admitted(&b, "small", 100), 2);
    }

    #[test]
    fn a_miss_costs_miss_cost_calls() {
        let clock = FakeRelativeClock::default();
        let b = Budgets::with_clock(&limits(1, 25, 10), clock);
        b.admit("w").unwrap();
        assert!(!b.charge_miss("w"), "10 of 25 spent, budget left");
        b.admit("w").unwrap();
        assert!(!b.charge_miss("w"), "20 of 25 spent");
        b.admit("w").unwrap();
        assert!(b.charge_miss("w"), "the third miss spends the rest");
        assert!(b.admit("w").is_err());
    }

    #[test]
    fn alerts_are_throttled_per_identity() {
        let clock = FakeRelativeClock::default();
        let b = Budgets::with_clock(&limits(1, 1, 1), clock.clone());
        assert!(b.should_alert("a"));
        assert!(!b.should_alert("a"));
        assert!(b.should_alert("b"));
        clock.advance(ALERT_EVERY);
        assert!(b.should_alert("a"));
    }
}
