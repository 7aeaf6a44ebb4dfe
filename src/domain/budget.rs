//! Per-caller detokenize budgets: how fast one identity may turn tokens back
//! into card numbers, so that a stolen payment-worker certificate cannot
//! empty the vault at full speed (REQUIREMENTS 4, ASVS 2.4.1).
//!
//! Each identity has its own budget (a generic cell rate limiter: a
//! sustained rate and a burst). A call that names no token the caller may
//! read — malformed, unknown, or another tenant's — costs `miss_cost` calls,
//! so guessing or replaying tokens spends a budget many times faster than
//! charging cards does. Metadata reads by an identity that may detokenize
//! draw on the same budget, so it cannot screen a token list for free
//! through `GetTokenMetadata` and spend its budget only on hits. Running
//! out is an alert: at most one warning per identity and [`Alert`] kind per
//! [`ALERT_EVERY`], for the log pipeline to raise (so a caller refused for
//! its rate still raises the enumeration alert); the audit log keeps every
//! refused call.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alert {
    /// The identity asked faster than its budget allows.
    RateExceeded,
    /// Calls for tokens that do not exist (for this caller) spent the
    /// budget: a pattern of guessing or enumerating tokens.
    Misses,
}

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, Plain<C>>;
type Keyed<C> = RateLimiter<AlertKey, DashMapStateStore<AlertKey>, C, Plain<C>>;
type AlertKey = (String, Alert);
type Plain<C> = NoOpMiddleware<<C as Clock>::Instant>;

/// One identity's budget. The rate limiter cannot go below empty, so what
/// a miss costs beyond what is left is kept as debt: calls that free up go
/// to the debt first, and the caller is refused until it is paid.
struct Budget<C: Clock> {
    calls: Direct<C>,
    debt: AtomicU64,
    interval: Duration,
}

impl<C: Clock + Clone> Budget<C> {
    fn new(quota: Quota, clock: &C) -> Self {
        Self {
            calls: RateLimiter::direct_with_clock(quota, clock.clone()),
            debt: AtomicU64::new(0),
            interval: quota.replenish_interval(),
        }
    }
}

/// The live budgets, one per identity: fixed at start for the configured
/// identities (no lock on the call path), made on first use with the
/// default quota for any other; only identities holding the detokenize
/// role ever reach them.
pub struct Budgets<C: Clock = DefaultClock> {
    configured: HashMap<String, Budget<C>>,
    others: Mutex<HashMap<String, Arc<Budget<C>>>>,
    default: Quota,
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
            .map(|(id, q)| (id.clone(), Budget::new(*q, &clock)))
            .collect();
        let alert_quota =
            Quota::with_period(ALERT_EVERY).unwrap_or(Quota::per_hour(NonZeroU32::MIN));
        Self {
            configured,
            others: Mutex::default(),
            default: limits.default,
            alerts: RateLimiter::new(alert_quota, DashMapStateStore::default(), clock.clone()),
            miss_cost: limits.miss_cost,
            clock,
        }
    }

    fn with_budget<R>(&self, identity: &str, f: impl FnOnce(&Budget<C>) -> R) -> R {
        if let Some(b) = self.configured.get(identity) {
            return f(b);
        }
        let b = self
            .others
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(identity.to_owned())
            .or_insert_with(|| Arc::new(Budget::new(self.default, &self.clock)))
            .clone();
        f(&b)
    }

    /// Takes one call from `identity`'s budget, after paying any debt. When
    /// it cannot: at least how long until it could.
    pub fn admit(&self, identity: &str) -> Result<(), Duration> {
        self.with_budget(identity, |b| {
            loop {
                let debt = b.debt.load(Ordering::Acquire);
                if debt == 0 {
                    break;
                }
                match b.calls.check() {
                    Ok(()) => {
                        let _ = b
                            .debt
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                                d.checked_sub(1)
                            });
                    }
                    Err(not_until) => {
                        let wait = not_until.wait_time_from(self.clock.now());
                        let more = u32::try_from(debt).unwrap_or(u32::MAX);
                        return Err(wait.saturating_add(b.interval.saturating_mul(more)));
                    }
                }
            }
            b.calls
                .check()
                .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
        })
    }

    /// Charges a call that found no token with the rest of a miss's cost:
    /// from the budget as far as it goes, the remainder as debt. True if
    /// the budget is now spent.
    pub fn charge_miss(&self, identity: &str) -> bool {
        self.with_budget(identity, |b| {
            let rest = u64::from(self.miss_cost.get() - 1);
            let paid = (0..rest).take_while(|_| b.calls.check().is_ok()).count();
            let unpaid = rest.saturating_sub(u64::try_from(paid).unwrap_or(u64::MAX));
            if unpaid == 0 {
                return false;
            }
            let _ = b
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                    Some(d.saturating_add(unpaid))
                });
            true
        })
    }

    /// Whether to raise an alert of this kind for `identity` now: at most
    /// one of each kind per [`ALERT_EVERY`], so one kind never hides the
    /// other.
    pub fn should_alert(&self, identity: &str, why: Alert) -> bool {
        self.alerts.check_key(&(identity.to_owned(), why)).is_ok()
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

    /// A drained budget cannot make misses cheap: what a miss costs beyond
    /// what is left becomes debt, paid before the next call is admitted.
    #[test]
    fn a_miss_on_a_drained_budget_is_paid_before_the_next_call() {
        let clock = FakeRelativeClock::default();
        let b = Budgets::with_clock(&limits(10, 5, 10), clock.clone());
        assert_eq!(admitted(&b, "w", 5), 5);
        clock.advance(Duration::from_millis(100));
        b.admit("w").unwrap();
        assert!(b.charge_miss("w"), "nothing left: all nine are debt");
        let wait = b.admit("w").unwrap_err();
        assert_eq!(
            wait,
            Duration::from_millis(1000),
            "ten calls' worth: next cell + 9 of debt"
        );
        for _ in 0..9 {
            clock.advance(Duration::from_millis(100));
            assert!(b.admit("w").is_err(), "a freed call went to the debt");
        }
        clock.advance(Duration::from_millis(100));
        b.admit("w").unwrap();
    }

    #[test]
    fn alerts_are_throttled_per_identity() {
        let clock = FakeRelativeClock::default();
        let b = Budgets::with_clock(&limits(1, 1, 1), clock.clone());
        assert!(b.should_alert("a", Alert::RateExceeded));
        assert!(!b.should_alert("a", Alert::RateExceeded));
        assert!(b.should_alert("b", Alert::RateExceeded));
        clock.advance(ALERT_EVERY);
        assert!(b.should_alert("a", Alert::RateExceeded));
    }

    /// A caller refused for its rate still raises the enumeration alert:
    /// each kind has its own throttle.
    #[test]
    fn a_rate_alert_does_not_silence_a_misses_alert() {
        let clock = FakeRelativeClock::default();
        let b = Budgets::with_clock(&limits(1, 1, 1), clock);
        assert!(b.should_alert("a", Alert::RateExceeded));
        assert!(b.should_alert("a", Alert::Misses));
        assert!(!b.should_alert("a", Alert::Misses));
        assert!(!b.should_alert("a", Alert::RateExceeded));
    }
}
