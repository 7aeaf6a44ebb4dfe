//! The audit log as a product: signed checkpoints of the chain head
//! (periodically, and at shutdown), and the auditor's reads — filtered
//! listing, the latest checkpoint, export, the public key. Only the `audit`
//! role reads the log; an auditor scoped to one tenant lists that tenant's
//! records only, and may not export the whole log. Every read is itself
//! audited with its real outcome (PCI DSS 10.2.1.3), durably, before
//! anything is returned.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use super::access::{Action, Caller, TenantId, TenantScope};
use super::audit::{AuditAction, AuditRecord, Checkpoint, Outcome};
use super::data::contains_card_like_digits;
use super::error::VaultError;
use super::keys::shown_id;
use super::store::{AuditFilter, StoreError};
use super::vault::{Vault, now_ms, storage};
use crate::audit::signer::{key_id, public_key_pem};

/// Most records one list or export page returns.
pub const MAX_PAGE: usize = 1000;
/// Longest actor or outcome a filter may name: identities are URIs, outcomes
/// short codes.
const FILTER_TEXT_MAX: usize = 512;

/// One page of the audit log an auditor asks for, as the transport decoded
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    pub filter: AuditFilter,
    /// Records after this sequence number.
    pub after: u64,
    pub limit: usize,
}

/// A filter's free text (actor, outcome) is caller input that ends up in
/// the read's own audit record: bounded, printable, no card number.
fn check_filter_text(what: &str, s: &Option<String>) -> Result<(), VaultError> {
    let Some(s) = s else { return Ok(()) };
    if s.chars().count() > FILTER_TEXT_MAX
        || s.chars().any(super::data::unprintable)
        || contains_card_like_digits(s)
    {
        return Err(VaultError::InvalidArgument(format!(
            "filter {what} must be at most {FILTER_TEXT_MAX} printable characters and hold no card number"
        )));
    }
    Ok(())
}

/// Checks a filter and confines it to what `scope` may see: a tenant-scoped
/// auditor lists its own tenant's records (none without a tenant: system
/// and KEK events concern every tenant), and asking for another tenant is
/// refused whether or not that tenant exists.
fn scoped_filter(mut filter: AuditFilter, scope: &TenantScope) -> Result<AuditFilter, VaultError> {
    match scope {
        TenantScope::One(own) => match &filter.tenant {
            Some(t) if t != own.as_str() => {
                return Err(VaultError::PermissionDenied(
                    "caller's grant does not reach this tenant".into(),
                ));
            }
            _ => filter.tenant = Some(own.as_str().to_owned()),
        },
        TenantScope::All => {
            if let Some(t) = &filter.tenant {
                TenantId::parse(t).map_err(|e| VaultError::InvalidArgument(e.to_string()))?;
            }
        }
    }
    check_filter_text("actor", &filter.actor)?;
    check_filter_text("outcome", &filter.outcome)?;
    Ok(filter)
}

/// The filter as its read's audit record describes it: checked fields only.
fn describe(q: &AuditQuery) -> String {
    let f = &q.filter;
    // Every number here is caller input: one that could be a card number
    // is withheld, and times are written as UTC dates, which cannot hold
    // a card-length run of digits.
    let mut d = format!("list after={} limit={}", shown_id(q.after), q.limit);
    let fields = [
        ("tenant", f.tenant.as_deref()),
        ("actor", f.actor.as_deref()),
        ("outcome", f.outcome.as_deref()),
    ];
    for (k, v) in fields {
        if let Some(v) = v {
            // Quoted, so filter text cannot pass for further fields.
            d.push_str(&format!(" {k}={v:?}"));
        }
    }
    if let Some(k) = f.key_events {
        d.push_str(if k { " kind=key" } else { " kind=data" });
    }
    if let Some(t) = f.from_ms {
        d.push_str(&format!(" from={}", shown_time(t)));
    }
    if let Some(t) = f.to_ms {
        d.push_str(&format!(" to={}", shown_time(t)));
    }
    d
}

/// A caller-supplied time for an audit record: `2026-12-06T20:28:21.123Z`
/// (its digit groups are parted by letters and `:`, so it cannot read as
/// a card number), or, beyond the calendar, the raw number as [`shown_id`]
/// shows it.
fn shown_time(ms: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => format!("{}ms", shown_id(ms)),
    }
}

/// When to sign a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// After this many new entries…
    pub every_entries: u64,
    /// …or this long after the last checkpoint, whichever first.
    pub every: Duration,
}

/// The public half of the checkpoint signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub key_id: String,
    pub raw: [u8; 32],
    pub pem: String,
}

impl Vault {
    /// Signs a checkpoint of the current chain head, unless the head is
    /// already checkpointed. Needs the signing key, so not while sealed.
    pub async fn checkpoint_now(&self) -> Result<Option<Checkpoint>, VaultError> {
        let Some(signer) = self.signer() else {
            return Err(VaultError::Sealed);
        };
        let (seq, head) = self.store.audit_head().await.map_err(storage)?;
        if seq == 0 {
            return Ok(None);
        }
        let latest = self.store.latest_checkpoint().await.map_err(storage)?;
        if latest.is_some_and(|c| c.seq >= seq) {
            return Ok(None);
        }
        let time_ms = now_ms();
        let signature = signer
            .sign_checkpoint(seq, &head, time_ms)
            .map_err(|_| VaultError::Internal)?;
        let cp = Checkpoint {
            seq,
            chain_hash: head,
            time_ms,
            signature,
            key_id: signer.key_id(),
        };
        match self.store.insert_checkpoint(&cp).await {
            Ok(()) => {
                debug!(seq, "audit checkpoint signed");
                Ok(Some(cp))
            }
            // Another checkpointer got there first.
            Err(StoreError::Conflict) => Ok(None),
            Err(e) => Err(storage(e)),
        }
    }

    /// Signs checkpoints by `policy` until the task is dropped.
    pub async fn run_checkpointer(self: Arc<Self>, policy: CheckpointPolicy) {
        let tick = policy
            .every
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(tick).await;
            if self.is_sealed() {
                continue;
            }
            let due = async {
                let (seq, _) = self.store.audit_head().await?;
                let last = self.store.latest_checkpoint().await?;
                let (last_seq, last_ms) = last.map_or((0, 0), |c| (c.seq, c.time_ms));
                let elapsed = u64::try_from(now_ms().saturating_sub(last_ms)).unwrap_or(0);
                Ok::<bool, StoreError>(
                    seq > last_seq
                        && (seq - last_seq >= policy.every_entries
                            || elapsed
                                >= u64::try_from(policy.every.as_millis()).unwrap_or(u64::MAX)),
                )
            }
            .await;
            match due {
                Ok(true) => {
                    if let Err(e) = self.checkpoint_now().await {
                        warn!(error = %e, "audit checkpoint failed");
                    }
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "audit checkpoint check failed"),
            }
        }
    }

    /// Serves a read of key state (`read`, described by `what`) and records
    /// it with its outcome before answering; a read `allowed` refused is
    /// recorded as denied and never runs.
    pub(crate) async fn audited_key_read<A, T>(
        &self,
        caller: &Caller,
        allowed: Result<A, VaultError>,
        what: String,
        read: impl Future<Output = Result<T, VaultError>>,
    ) -> Result<T, VaultError> {
        let mut ev = self.key_event(caller, AuditAction::KeyRead, "");
        if let Err(e) = allowed {
            self.audit_error(&e, ev).await?;
            return Err(e);
        }
        let res = read.await;
        match &res {
            Ok(_) => ev.detail = Some(what),
            Err(e) => {
                ev.outcome = Outcome::failed(e.code());
                ev.detail = Some(format!("{what}: {}", e.audit_detail()));
            }
        }
        self.store.append_audit(ev).await.map_err(storage)?;
        res
    }

    /// Serves an auditor's read of the log (`read`, described by `what`)
    /// and records it with its real outcome before answering; a read
    /// `allowed` refused is recorded as denied and never runs. If the record
    /// cannot be written, the caller gets that error, not the data.
    async fn audited_log_read<T>(
        &self,
        caller: &Caller,
        allowed: Result<(), VaultError>,
        what: &str,
        read: impl Future<Output = Result<T, VaultError>>,
    ) -> Result<T, VaultError> {
        let mut ev = self.key_event(caller, AuditAction::AuditRead, "");
        if let Err(e) = allowed {
            self.audit_error(&e, ev).await?;
            return Err(e);
        }
        let res = read.await;
        match &res {
            Ok(_) => ev.detail = Some(what.to_owned()),
            Err(e) => {
                ev.outcome = Outcome::failed(e.code());
                ev.detail = Some(format!("{what}: {}", e.audit_detail()));
            }
        }
        self.store.append_audit(ev).await.map_err(storage)?;
        res
    }

    /// One page of audit records, as `query` decodes it: only once the
    /// caller is known to be an auditor, so a stranger's malformed request
    /// is refused as a stranger's. A tenant-scoped auditor sees its own
    /// tenant's records only.
    pub async fn list_audit(
        &self,
        caller: &Caller,
        query: impl FnOnce() -> Result<AuditQuery, VaultError>,
    ) -> Result<Vec<AuditRecord>, VaultError> {
        let checked = caller.authorize(Action::ReadAudit).and_then(|grant| {
            let q = query()?;
            Ok(AuditQuery {
                filter: scoped_filter(q.filter, &grant.scope)?,
                limit: q.limit.clamp(1, MAX_PAGE),
                ..q
            })
        });
        let q = match checked {
            Ok(q) => q,
            Err(e) => {
                // Denied, or invalid: on the record either way.
                let ev = self.key_event(caller, AuditAction::AuditRead, "");
                self.audit_error(&e, ev).await?;
                return Err(e);
            }
        };
        let read = async {
            self.store
                .query_audit(&q.filter, q.after, q.limit)
                .await
                .map_err(storage)
        };
        self.audited_log_read(caller, Ok(()), &describe(&q), read)
            .await
    }

    pub async fn latest_checkpoint(
        &self,
        caller: &Caller,
    ) -> Result<Option<Checkpoint>, VaultError> {
        let allowed = caller.authorize(Action::ReadAudit).map(|_| ());
        let read = async { self.store.latest_checkpoint().await.map_err(storage) };
        self.audited_log_read(caller, allowed, "latest checkpoint", read)
            .await
    }

    pub async fn audit_public_key(&self, caller: &Caller) -> Result<PublicKey, VaultError> {
        let allowed = caller.authorize(Action::ReadAudit).map(|_| ());
        self.audited_log_read(caller, allowed, "public key", self.public_key_now())
            .await
    }

    async fn public_key_now(&self) -> Result<PublicKey, VaultError> {
        let stored = self
            .store
            .signing_key()
            .await
            .map_err(storage)?
            .ok_or_else(|| {
                VaultError::FailedPrecondition("no audit signing key yet: unseal the vault".into())
            })?;
        let raw: [u8; 32] = stored
            .public
            .as_slice()
            .try_into()
            .map_err(|_| VaultError::Internal)?;
        Ok(PublicKey {
            key_id: key_id(&raw),
            pem: public_key_pem(&raw),
            raw,
        })
    }

    /// Starts an export of the whole log, which reveals every tenant, so
    /// only an auditor of every tenant may. Unlike the other reads it is
    /// recorded before it runs: the export must hold its own record, under a
    /// checkpoint of the head signed now, to be covered to its end. A failed
    /// checkpoint, or a failed page later, is recorded as well.
    /// Returns the sequence number the export ends at, so that it has a
    /// fixed end however busy the vault is meanwhile: its own record, or,
    /// unsealed, the checkpoint signed after it (which covers it), so that
    /// the export ends signed.
    pub async fn begin_export(&self, caller: &Caller, after: u64) -> Result<u64, VaultError> {
        let mut ev = self.key_event(caller, AuditAction::AuditRead, "");
        if let Err(e) = caller.authorize_all(Action::ReadAudit) {
            self.audit_error(&e, ev).await?;
            return Err(e);
        }
        ev.detail = Some(format!("export after={}", shown_id(after)));
        let own = self.store.append_audit(ev).await.map_err(storage)?;
        let signed = match self.checkpoint_now().await {
            Ok(Some(cp)) => Ok(Some(cp.seq)),
            // Nothing new to sign: the latest checkpoint already covers the
            // head (another checkpointer got there first).
            Ok(None) => self
                .store
                .latest_checkpoint()
                .await
                .map(|c| c.map(|c| c.seq))
                .map_err(storage),
            Err(VaultError::Sealed) => Ok(None),
            Err(e) => Err(e),
        };
        match signed {
            Ok(cp) => Ok(cp.map_or(own, |c| c.max(own))),
            Err(e) => {
                self.export_failed(caller, after, &e).await?;
                Err(e)
            }
        }
    }

    /// One page of an export (see [`crate::domain::Store::export_page`]).
    pub async fn export_page(
        &self,
        caller: &Caller,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Vec<Checkpoint>), VaultError> {
        caller.authorize_all(Action::ReadAudit)?;
        let res = self
            .store
            .export_page(after, limit.clamp(1, MAX_PAGE))
            .await
            .map_err(storage);
        if let Err(e) = &res {
            self.export_failed(caller, after, e).await?;
        }
        res
    }

    /// Records that an export begun (and recorded) did not complete.
    async fn export_failed(
        &self,
        caller: &Caller,
        after: u64,
        e: &VaultError,
    ) -> Result<(), VaultError> {
        let mut ev = self.key_event(caller, AuditAction::AuditRead, "");
        ev.outcome = Outcome::failed(e.code());
        ev.detail = Some(format!(
            "export after={}: {}",
            shown_id(after),
            e.audit_detail()
        ));
        self.store.append_audit(ev).await.map_err(storage)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::kek::{KeyBytes, LocalKek};
    use crate::domain::access::{Grant, Role, RoleSet};
    use crate::domain::vault::VaultSettings;
    use crate::storage::sqlite::{SqliteOptions, SqliteStore};

    #[test]
    fn filter_text_in_a_read_record_is_quoted() {
        let q = AuditQuery {
            filter: AuditFilter {
                actor: Some("x tenant=globex kind=key".into()),
                ..AuditFilter::default()
            },
            after: 0,
            limit: 10,
        };
        let d = describe(&q);
        assert!(d.ends_with(r#" actor="x tenant=globex kind=key""#), "{d}");
    }

    /// Numbers and times in a read's filter are caller input: one that
    /// could be a card number never reaches the read's own record.
    #[test]
    fn numbers_in_a_read_record_never_hold_a_card_number() {
        // Test cards, built at run time: no literal card number in src/.
        let card16: u64 = format!("4{}", "1".repeat(15)).parse().unwrap();
        let card13: i64 = format!("4{}", "2".repeat(12)).parse().unwrap();
        assert!(contains_card_like_digits(&card16.to_string()));
        assert!(contains_card_like_digits(&card13.to_string()));
        let q = AuditQuery {
            filter: AuditFilter {
                from_ms: Some(i64::try_from(card16).unwrap()),
                to_ms: Some(card13),
                ..AuditFilter::default()
            },
            after: card16,
            limit: 10,
        };
        let d = describe(&q);
        assert!(!contains_card_like_digits(&d), "{d}");
        assert!(d.starts_with("list after=(withheld) "), "{d}");
        assert!(d.contains(" from=(withheld)ms"), "{d}");
        // A 13-digit millisecond time is a date in 2103.
        assert!(d.contains(" to=2103-"), "{d}");
    }

    async fn vault() -> (tempfile::TempDir, Arc<Vault>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("v.db"), SqliteOptions::default()).unwrap();
        let kek = Arc::new(LocalKek::from_key(&KeyBytes::generate().unwrap()));
        let v = Vault::open(Arc::new(store), kek, VaultSettings::default())
            .await
            .unwrap();
        (dir, v)
    }

    fn auditor(scope: TenantScope) -> Caller {
        Caller {
            identity: "spiffe://test/auditor".into(),
            peer: None,
            grant: Some(Grant {
                scope,
                roles: RoleSet::new([Role::Audit]),
            }),
        }
    }

    fn page(filter: AuditFilter) -> impl FnOnce() -> Result<AuditQuery, VaultError> {
        move || {
            Ok(AuditQuery {
                filter,
                after: 0,
                limit: MAX_PAGE,
            })
        }
    }

    async fn last_record(v: &Vault) -> AuditRecord {
        let all = v.store().audit_after(0, 10_000).await.unwrap();
        all.last().cloned().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_is_recorded_after_it_runs_with_its_real_outcome() {
        let (_dir, v) = vault().await;
        let a = auditor(TenantScope::All);
        let before = v.store().audit_head().await.unwrap().0;
        let rows = v
            .list_audit(&a, page(AuditFilter::default()))
            .await
            .unwrap();
        // The list did not contain its own record: it was written after.
        assert_eq!(rows.last().map(|r| r.seq), Some(before));
        let rec = last_record(&v).await;
        assert_eq!(
            (rec.action.as_str(), rec.outcome.as_str()),
            ("audit_read", "success")
        );
        assert!(
            rec.detail.as_deref().unwrap().starts_with("list"),
            "{rec:?}"
        );

        // A refused filter is on the record as what it was, without the
        // refused text.
        let card = format!("4{}", "1".repeat(15));
        for filter in [
            AuditFilter {
                tenant: Some(format!("tenant {card}")),
                ..AuditFilter::default()
            },
            AuditFilter {
                actor: Some(format!("actor {card}")),
                ..AuditFilter::default()
            },
            AuditFilter {
                outcome: Some(card.clone()),
                ..AuditFilter::default()
            },
        ] {
            let e = v.list_audit(&a, page(filter)).await.unwrap_err();
            assert!(matches!(e, VaultError::InvalidArgument(_)), "{e:?}");
            assert!(!e.to_string().contains("1111"), "{e}");
            let rec = last_record(&v).await;
            assert_eq!(rec.outcome, "invalid_argument", "{rec:?}");
            assert!(!format!("{rec:?}").contains("1111"), "{rec:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_whose_record_cannot_be_written_returns_no_data() {
        let (_dir, v) = vault().await;
        let a = auditor(TenantScope::All);
        v.store().close().await.unwrap();
        // Reads still work; only the record of the read cannot be written.
        assert!(v.store().audit_after(0, 10).await.is_ok());
        let list = v.list_audit(&a, page(AuditFilter::default())).await;
        assert!(matches!(list, Err(VaultError::Unavailable(_))), "{list:?}");
        let cp = v.latest_checkpoint(&a).await;
        assert!(matches!(cp, Err(VaultError::Unavailable(_))), "{cp:?}");
        let pk = v.audit_public_key(&a).await;
        assert!(matches!(pk, Err(VaultError::Unavailable(_))), "{pk:?}");
    }

    #[test]
    fn a_scoped_auditor_is_confined_to_its_tenant() {
        let acme = TenantScope::One(TenantId::parse("acme").unwrap());
        let f = scoped_filter(AuditFilter::default(), &acme).unwrap();
        assert_eq!(f.tenant.as_deref(), Some("acme"));
        let own = AuditFilter {
            tenant: Some("acme".into()),
            ..AuditFilter::default()
        };
        assert_eq!(
            scoped_filter(own, &acme).unwrap().tenant.as_deref(),
            Some("acme")
        );
        for other in ["globex", "nobody", "Not A Tenant"] {
            let f = AuditFilter {
                tenant: Some(other.into()),
                ..AuditFilter::default()
            };
            assert!(matches!(
                scoped_filter(f, &acme),
                Err(VaultError::PermissionDenied(_))
            ));
        }
        let all = scoped_filter(AuditFilter::default(), &TenantScope::All).unwrap();
        assert_eq!(all.tenant, None);
    }
}
