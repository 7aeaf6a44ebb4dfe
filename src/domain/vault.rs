//! Vault operations: tokenize, detokenize, read metadata, delete. Each one
//! authorizes the caller first (deny by default), does its work through the
//! key ring and the store, and leaves an audit record, committed before the
//! caller is answered, whatever the outcome.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{error, warn};
use zeroize::Zeroizing;

use super::access::{Action, Caller, TenantId};
use super::audit::{AuditAction, AuditEvent, Outcome};
use super::error::VaultError;
use super::pan::{CardBrand, Pan, luhn_valid};
use super::store::{KekCheck, Store, StoreError, TokenRecord};
use super::token::Token;
use crate::crypto::CryptoError;
use crate::crypto::envelope::{self, RecordContext};
use crate::crypto::kek::{Kek, KeyBytes};
use crate::crypto::keyring::{DataKey, KeyRing, Use};

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct VaultSettings {
    /// Encryptions reserved per durable counter write.
    pub counter_block: u64,
}

impl Default for VaultSettings {
    fn default() -> Self {
        Self {
            counter_block: 65_536,
        }
    }
}

/// A card's expiry date, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub month: u8,
    pub year: u16,
}

impl Expiry {
    pub fn new(month: u32, year: u32) -> Result<Self, VaultError> {
        let month = u8::try_from(month)
            .ok()
            .filter(|m| (1..=12).contains(m))
            .ok_or_else(|| VaultError::InvalidArgument("expiry month must be 1 to 12".into()))?;
        let year = u16::try_from(year)
            .ok()
            .filter(|y| (2000..=2099).contains(y))
            .ok_or_else(|| {
                VaultError::InvalidArgument("expiry year must be four digits, 2000 to 2099".into())
            })?;
        Ok(Self { month, year })
    }
}

/// What may be shown about a token (PCI DSS 3.4.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardMetadata {
    pub brand: CardBrand,
    pub bin: String,
    pub last4: String,
    pub pan_len: u8,
    pub expiry: Option<Expiry>,
    pub created_ms: i64,
}

impl CardMetadata {
    fn of(rec: &TokenRecord) -> Self {
        Self {
            brand: rec.brand,
            bin: rec.bin.clone(),
            last4: rec.last4.clone(),
            pan_len: rec.pan_len,
            expiry: match (rec.exp_month, rec.exp_year) {
                (Some(month), Some(year)) => Some(Expiry { month, year }),
                _ => None,
            },
            created_ms: rec.created_ms,
        }
    }
}

/// The card number and expiry returned by detokenize.
pub struct Detokenized {
    pub pan: Pan,
    pub expiry: Option<Expiry>,
}

impl std::fmt::Debug for Detokenized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detokenized")
            .field("pan", &self.pan)
            .field("expiry", &self.expiry)
            .finish()
    }
}

const PURPOSE_MAX_CHARS: usize = 256;
const KEK_CHECK_AAD: &[u8] = b"tokenvault/kek-check/v1";
const SYSTEM_ACTOR: &str = "system";

pub struct Vault {
    store: Arc<dyn Store>,
    keys: KeyRing,
    settings: VaultSettings,
    /// Serialises DEK creation so two first tokenizations of a tenant do not
    /// both create one.
    create_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("keys", &self.keys).finish()
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn storage(e: StoreError) -> VaultError {
    error!(error = %e, "storage operation failed");
    VaultError::Unavailable("storage unavailable; retry later".into())
}

/// Errors of opening: shown to the operator at start, never to callers.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "the configured KEK ({configured}) is not the one this database is pinned to ({pinned}); refusing to start"
    )]
    KekMismatch { pinned: String, configured: String },
    #[error("the configured KEK fails the database's key check value; refusing to start")]
    KekCheckFailed,
    #[error("data key {id} cannot be unwrapped ({reason}); refusing to start")]
    DekUnwrap { id: u32, reason: CryptoError },
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
}

impl Vault {
    /// Opens the vault over `store` with `kek`. On a new database the KEK is
    /// pinned; on an existing one a different or wrong KEK is refused before
    /// any key is used, so the vault never serves garbage.
    pub async fn open(
        store: Arc<dyn Store>,
        kek: Arc<dyn Kek>,
        settings: VaultSettings,
    ) -> Result<Self, OpenError> {
        match store.kek_check().await? {
            None => {
                let probe = KeyBytes::generate()?;
                let check = KekCheck {
                    kek_id: kek.id().to_owned(),
                    check_blob: kek.wrap(&probe, KEK_CHECK_AAD)?,
                };
                let audit = system_event(AuditAction::KekInit, None, kek.id());
                store.pin_kek(&check, audit).await?;
            }
            Some(pinned) => {
                if pinned.kek_id != kek.id() {
                    return Err(OpenError::KekMismatch {
                        pinned: pinned.kek_id,
                        configured: kek.id().to_owned(),
                    });
                }
                kek.unwrap(&pinned.check_blob, KEK_CHECK_AAD)
                    .map_err(|_| OpenError::KekCheckFailed)?;
            }
        }
        let keys = KeyRing::new(kek);
        for w in store.load_deks().await? {
            keys.load(&w)
                .map_err(|reason| OpenError::DekUnwrap { id: w.id, reason })?;
        }
        Ok(Self {
            store,
            keys,
            settings,
            create_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    /// Stores a card number and returns its new token and metadata.
    pub async fn tokenize(
        &self,
        caller: &Caller,
        pan: &str,
        expiry: Option<(u32, u32)>,
    ) -> Result<(Token, CardMetadata), VaultError> {
        let res = self.tokenize_inner(caller, pan, expiry).await;
        self.audit_failure(&res, caller, AuditAction::Tokenize, None, None, None)
            .await?;
        res
    }

    async fn tokenize_inner(
        &self,
        caller: &Caller,
        pan: &str,
        expiry: Option<(u32, u32)>,
    ) -> Result<(Token, CardMetadata), VaultError> {
        caller.authorize(Action::Tokenize)?;
        let tenant = caller.home_tenant().ok_or_else(|| {
            VaultError::PermissionDenied("tokenize needs an identity bound to one tenant".into())
        })?;
        let pan = Pan::parse(pan).map_err(|e| VaultError::InvalidArgument(e.to_string()))?;
        let expiry = expiry.map(|(m, y)| Expiry::new(m, y)).transpose()?;
        let dek = self.active_dek(tenant).await?;
        self.take_use(&dek).await?;
        let now = now_ms();
        let token =
            Token::generate(u64::try_from(now).unwrap_or(0)).map_err(|_| VaultError::Internal)?;
        let ciphertext = envelope::seal(
            dek.cipher(),
            &RecordContext {
                tenant: tenant.as_str(),
                token: &token,
                dek_id: dek.id,
            },
            pan.digits().as_bytes(),
        )
        .map_err(|e| {
            error!(error = %e, "encryption failed");
            VaultError::Internal
        })?;
        let rec = TokenRecord {
            token,
            tenant: tenant.as_str().to_owned(),
            dek_id: dek.id,
            ciphertext,
            brand: pan.brand(),
            bin: pan.bin().to_owned(),
            last4: pan.last4().to_owned(),
            pan_len: u8::try_from(pan.len()).unwrap_or(u8::MAX),
            exp_month: expiry.map(|e| e.month),
            exp_year: expiry.map(|e| e.year),
            created_ms: now,
        };
        let meta = CardMetadata::of(&rec);
        let audit = self.event(
            caller,
            AuditAction::Tokenize,
            Some(tenant.as_str()),
            Some(token),
            Outcome::SUCCESS,
            None,
        );
        self.store
            .insert_token(rec, audit)
            .await
            .map_err(|e| match e {
                // 128 random bits make a collision practically impossible; if one
                // happens the caller retries rather than getting someone's token.
                StoreError::Conflict => VaultError::Unavailable("token collision; retry".into()),
                e => storage(e),
            })?;
        Ok((token, meta))
    }

    /// Returns the card number behind `token`, after durably auditing the
    /// access with its purpose.
    pub async fn detokenize(
        &self,
        caller: &Caller,
        token: &str,
        purpose: &str,
    ) -> Result<Detokenized, VaultError> {
        let parsed = Token::parse(token).ok();
        let res = self.detokenize_inner(caller, token, purpose).await;
        let purpose = check_purpose(purpose).ok();
        self.audit_failure(&res, caller, AuditAction::Detokenize, parsed, None, purpose)
            .await?;
        res
    }

    async fn detokenize_inner(
        &self,
        caller: &Caller,
        token: &str,
        purpose: &str,
    ) -> Result<Detokenized, VaultError> {
        caller.authorize(Action::Detokenize)?;
        let token = parse_token(token)?;
        let purpose = check_purpose(purpose)?;
        let rec = self.find(caller, &token).await?;
        let dek = self.keys.get(rec.dek_id).ok_or_else(|| {
            VaultError::FailedPrecondition("the data key for this token is destroyed".into())
        })?;
        let plain = envelope::open(
            dek.cipher(),
            &RecordContext {
                tenant: &rec.tenant,
                token: &token,
                dek_id: rec.dek_id,
            },
            &rec.ciphertext,
        )
        .map_err(|e| {
            error!(token = %token, dek = rec.dek_id, error = %e, "stored ciphertext failed to open");
            VaultError::DataLoss
        })?;
        let digits = Zeroizing::new(String::from_utf8_lossy(&plain).into_owned());
        let pan = Pan::parse(&digits).map_err(|_| {
            error!(token = %token, "decrypted record is not a card number");
            VaultError::DataLoss
        })?;
        let meta = CardMetadata::of(&rec);
        let audit = self.event(
            caller,
            AuditAction::Detokenize,
            Some(&rec.tenant),
            Some(token),
            Outcome::SUCCESS,
            Some(purpose),
        );
        self.store.append_audit(audit).await.map_err(storage)?;
        Ok(Detokenized {
            pan,
            expiry: meta.expiry,
        })
    }

    /// Returns a token's metadata, never its card number.
    pub async fn metadata(&self, caller: &Caller, token: &str) -> Result<CardMetadata, VaultError> {
        let parsed = Token::parse(token).ok();
        let res = async {
            caller.authorize(Action::GetMetadata)?;
            let token = parse_token(token)?;
            let rec = self.find(caller, &token).await?;
            let audit = self.event(
                caller,
                AuditAction::GetMetadata,
                Some(&rec.tenant),
                Some(token),
                Outcome::SUCCESS,
                None,
            );
            self.store.append_audit(audit).await.map_err(storage)?;
            Ok(CardMetadata::of(&rec))
        }
        .await;
        self.audit_failure(&res, caller, AuditAction::GetMetadata, parsed, None, None)
            .await?;
        res
    }

    /// Deletes a token and its ciphertext.
    pub async fn delete(&self, caller: &Caller, token: &str) -> Result<(), VaultError> {
        let parsed = Token::parse(token).ok();
        let mut audited = false;
        let res = self.delete_inner(caller, token, &mut audited).await;
        if !audited {
            self.audit_failure(&res, caller, AuditAction::DeleteToken, parsed, None, None)
                .await?;
        }
        res
    }

    async fn delete_inner(
        &self,
        caller: &Caller,
        token: &str,
        audited: &mut bool,
    ) -> Result<(), VaultError> {
        caller.authorize(Action::DeleteToken)?;
        let token = parse_token(token)?;
        let rec = self.find(caller, &token).await?;
        let audit = self.event(
            caller,
            AuditAction::DeleteToken,
            Some(&rec.tenant),
            Some(token),
            Outcome::SUCCESS,
            None,
        );
        let deleted = self
            .store
            .delete_token(&token, &rec.tenant, audit)
            .await
            .map_err(storage)?;
        // The store committed the audit record either way: as the success, or
        // rewritten to not_found when a concurrent delete got there first.
        *audited = true;
        if deleted {
            Ok(())
        } else {
            Err(VaultError::NotFound)
        }
    }

    /// Fetches a token's record if it exists and belongs to a tenant the
    /// caller reaches. Another tenant's token is reported exactly like a
    /// missing one.
    async fn find(&self, caller: &Caller, token: &Token) -> Result<TokenRecord, VaultError> {
        let rec = self
            .store
            .get_token(token)
            .await
            .map_err(storage)?
            .ok_or(VaultError::NotFound)?;
        let tenant = TenantId::parse(&rec.tenant).map_err(|_| VaultError::Internal)?;
        if !caller.reaches(&tenant) {
            return Err(VaultError::NotFound);
        }
        Ok(rec)
    }

    /// The tenant's active DEK, creating (and durably storing, wrapped) the
    /// first one on first use.
    async fn active_dek(&self, tenant: &TenantId) -> Result<Arc<DataKey>, VaultError> {
        if let Some(dk) = self.keys.active_for(tenant.as_str()) {
            return Ok(dk);
        }
        let _guard = self.create_lock.lock().await;
        if let Some(dk) = self.keys.active_for(tenant.as_str()) {
            return Ok(dk);
        }
        let (id, version) = self.keys.next_ids(tenant.as_str());
        let now = now_ms();
        let (dk, wrapped) = self
            .keys
            .generate(tenant.as_str(), id, version, now)
            .map_err(|e| {
                error!(error = %e, "data key generation failed");
                VaultError::Internal
            })?;
        let detail = format!(
            "dek_id={id} version={version} kek={} reason=first-use",
            self.keys.kek().id()
        );
        let mut audit = system_event(AuditAction::DekCreate, Some(tenant.as_str()), &detail);
        audit.time_ms = now;
        self.store
            .insert_dek(&wrapped, audit)
            .await
            .map_err(storage)?;
        Ok(self.keys.install(dk))
    }

    /// Takes one encryption from the DEK's counter, durably reserving a new
    /// block first when the current one is spent.
    async fn take_use(&self, dk: &DataKey) -> Result<(), VaultError> {
        loop {
            match dk.take_use() {
                Use::Granted => return Ok(()),
                Use::Exhausted => {
                    warn!(dek = dk.id, "data key reached its encryption limit");
                    return Err(VaultError::ResourceExhausted(
                        "the tenant's data key has reached its encryption limit; rotate it".into(),
                    ));
                }
                Use::NeedReservation => {
                    let _guard = dk.reserve_lock.lock().await;
                    if dk.used() < dk.reserved() {
                        continue;
                    }
                    let next = dk.next_reservation(self.settings.counter_block.max(1));
                    if next <= dk.reserved() {
                        continue; // at the hard limit: take_use reports it
                    }
                    self.store
                        .reserve_dek_uses(dk.id, next)
                        .await
                        .map_err(storage)?;
                    dk.set_reserved(next);
                }
            }
        }
    }

    fn event(
        &self,
        caller: &Caller,
        action: AuditAction,
        tenant: Option<&str>,
        token: Option<Token>,
        outcome: Outcome,
        purpose: Option<&str>,
    ) -> AuditEvent {
        AuditEvent {
            time_ms: now_ms(),
            actor: caller.identity.clone(),
            tenant: tenant
                .map(str::to_owned)
                .or_else(|| caller.home_tenant().map(|t| t.as_str().to_owned())),
            action,
            token,
            outcome,
            peer: caller.peer.clone(),
            purpose: purpose.map(str::to_owned),
            detail: None,
        }
    }

    /// Audits a failed operation. Successes were audited inside the
    /// operation, in the same commit as their effect. If even this audit
    /// cannot be written the caller gets UNAVAILABLE, not the original error:
    /// nothing is answered that is not on the record.
    async fn audit_failure<T>(
        &self,
        res: &Result<T, VaultError>,
        caller: &Caller,
        action: AuditAction,
        token: Option<Token>,
        tenant: Option<&str>,
        purpose: Option<&str>,
    ) -> Result<(), VaultError> {
        let Err(e) = res else { return Ok(()) };
        let mut ev = self.event(
            caller,
            action,
            tenant,
            token,
            Outcome::failed(e.code()),
            purpose,
        );
        if ev.outcome == Outcome::DENIED {
            ev.detail = Some(e.to_string());
        } else if ev.outcome.as_str() != e.code() {
            ev.detail = Some(e.code().to_owned());
        } else {
            ev.detail = Some(e.to_string());
        }
        self.store.append_audit(ev).await.map_err(storage)?;
        Ok(())
    }
}

fn system_event(action: AuditAction, tenant: Option<&str>, detail: &str) -> AuditEvent {
    AuditEvent {
        time_ms: now_ms(),
        actor: SYSTEM_ACTOR.into(),
        tenant: tenant.map(str::to_owned),
        action,
        token: None,
        outcome: Outcome::SUCCESS,
        peer: None,
        purpose: None,
        detail: Some(detail.to_owned()),
    }
}

fn parse_token(s: &str) -> Result<Token, VaultError> {
    Token::parse(s).map_err(|e| VaultError::InvalidArgument(e.to_string()))
}

/// A purpose is free text from the caller that lands in the audit log, so it
/// is bounded and screened: a card number pasted into it would otherwise be
/// stored in clear.
pub fn check_purpose(purpose: &str) -> Result<&str, VaultError> {
    let p = purpose.trim();
    if p.is_empty() {
        return Err(VaultError::InvalidArgument(
            "purpose is required for detokenize".into(),
        ));
    }
    if p.chars().count() > PURPOSE_MAX_CHARS {
        return Err(VaultError::InvalidArgument(format!(
            "purpose must be at most {PURPOSE_MAX_CHARS} characters"
        )));
    }
    if p.chars().any(char::is_control) {
        return Err(VaultError::InvalidArgument(
            "purpose must not contain control characters".into(),
        ));
    }
    if contains_card_like_digits(p) {
        return Err(VaultError::InvalidArgument(
            "purpose must not contain a card number".into(),
        ));
    }
    Ok(p)
}

/// True if `s` holds a run of 12–19 digits (spaces and hyphens allowed
/// between them) that passes Luhn, or any run of 20 or more digits.
fn contains_card_like_digits(s: &str) -> bool {
    let mut run: Zeroizing<Vec<u8>> = Zeroizing::new(Vec::new());
    let check = |run: &[u8]| (12..=19).contains(&run.len()) && luhn_valid(run) || run.len() >= 20;
    for b in s.bytes() {
        match b {
            b'0'..=b'9' => run.push(b),
            b' ' | b'-' if !run.is_empty() => {}
            _ => {
                if check(&run) {
                    return true;
                }
                run.clear();
            }
        }
    }
    check(&run)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn purpose_rules() {
        assert!(check_purpose("charge order 1234").is_ok());
        assert!(check_purpose("   ").is_err());
        assert!(check_purpose(&"x".repeat(257)).is_err());
        assert!(check_purpose("a\nb").is_err());
        let e = check_purpose("refund 4111 1111 1111 1111").unwrap_err();
        assert!(!e.to_string().contains("4111"));
        assert!(check_purpose("refund 4111-1111-1111-1111 now").is_err());
        // A long order number that fails Luhn is fine.
        assert!(check_purpose("order 4111111111111112").is_ok());
        assert!(check_purpose("order 123456789012345678901").is_err());
    }

    #[test]
    fn expiry_rules() {
        assert!(Expiry::new(12, 2030).is_ok());
        assert!(Expiry::new(0, 2030).is_err());
        assert!(Expiry::new(13, 2030).is_err());
        assert!(Expiry::new(1, 30).is_err());
        assert!(Expiry::new(1, 2100).is_err());
    }
}
