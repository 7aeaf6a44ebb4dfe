//! The data plane: tokenize, detokenize, read metadata, delete. Each one
//! authorizes the caller first (deny by default), does its work through the
//! key ring and the store, and leaves an audit record, committed before the
//! caller is answered, whatever the outcome.

use std::sync::Arc;

use tracing::{error, warn};
use zeroize::Zeroizing;

use super::access::{Action, Caller, TenantId};
use super::audit::{AuditAction, Outcome};
use super::budget::Alert;
use super::error::VaultError;
use super::pan::{CardBrand, Pan, luhn_valid};
use super::store::{StoreError, TokenRecord};
use super::token::Token;
use super::vault::{Vault, now_ms, storage};
use crate::crypto::envelope::{self, RecordContext};

const PURPOSE_MAX_CHARS: usize = 256;

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
    pub(crate) fn of(rec: &TokenRecord) -> Self {
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

impl Vault {
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
        let now = now_ms();
        let token =
            Token::generate(u64::try_from(now).unwrap_or(0)).map_err(|_| VaultError::Internal)?;
        // A key retired between taking its use and the commit is refused
        // by the store (PCI DSS 3.7.5): encrypt again under the new one.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let dek = self.active_use(tenant).await?;
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
            match self.store.insert_token(rec, audit).await {
                Ok(()) => return Ok((token, meta)),
                Err(StoreError::KeyRetired) if attempt < 3 => {
                    // The rotation that retired the key holds the lifecycle
                    // lock until its new key is in memory: once we get the
                    // lock, the active key is the new one.
                    drop(self.lifecycle.lock().await);
                }
                // 128 random bits make a collision practically impossible;
                // if one happens the caller retries rather than getting
                // someone's token.
                Err(StoreError::Conflict) => {
                    return Err(VaultError::Unavailable("token collision; retry".into()));
                }
                Err(e) => return Err(storage(e)),
            }
        }
    }

    /// Returns the card number behind `token`, after durably auditing the
    /// access with its purpose.
    pub async fn detokenize(
        &self,
        caller: &Caller,
        token: &str,
        purpose: &str,
    ) -> Result<Detokenized, VaultError> {
        let res = self.detokenize_inner(caller, token, purpose).await;
        if res.is_err() {
            // Only failures need the token and purpose again, for the record.
            let parsed = Token::parse(token).ok();
            let purpose = check_purpose(purpose).ok();
            self.audit_failure(&res, caller, AuditAction::Detokenize, parsed, None, purpose)
                .await?;
        }
        res
    }

    async fn detokenize_inner(
        &self,
        caller: &Caller,
        token: &str,
        purpose: &str,
    ) -> Result<Detokenized, VaultError> {
        caller.authorize(Action::Detokenize)?;
        self.admit_detokenize(caller)?;
        let token = parse_token(token).inspect_err(|_| self.detokenize_missed(caller))?;
        let purpose = check_purpose(purpose)?;
        // Sealed is answered before any lookup, so it never tells whether
        // a token exists.
        let ring = self.ring()?;
        let rec = self.find(caller, &token).await.inspect_err(|e| {
            if *e == VaultError::NotFound {
                self.detokenize_missed(caller);
            }
        })?;
        let dek = ring.get(rec.dek_id).ok_or_else(|| {
            if ring.was_destroyed(rec.dek_id) {
                return VaultError::FailedPrecondition(
                    "the data key for this token is destroyed".into(),
                );
            }
            // Not a key this vault ever destroyed: the row was altered.
            error!(token = %token, dek = rec.dek_id, "token row names a data key the vault never held");
            VaultError::DataLoss
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
            // An identity that may detokenize reads metadata on its
            // detokenize budget, misses included: else it could screen
            // guessed or stolen tokens here for free and spend its budget
            // only on hits.
            let budgeted = caller.may(Action::Detokenize);
            let missed = || {
                if budgeted {
                    self.detokenize_missed(caller);
                }
            };
            if budgeted {
                self.admit_detokenize(caller)?;
            }
            // Sealed means no data call is served, metadata included.
            self.ring()?;
            let token = parse_token(token).inspect_err(|_| missed())?;
            let rec = self.find(caller, &token).await.inspect_err(|e| {
                if *e == VaultError::NotFound {
                    missed();
                }
            })?;
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
        // Sealed means no data call is served, deletion included.
        self.ring()?;
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

    /// Takes one call from the caller's detokenize budget (after the role
    /// check, so only identities that may detokenize have budgets).
    fn admit_detokenize(&self, caller: &Caller) -> Result<(), VaultError> {
        let Err(wait) = self.budgets.admit(&caller.identity) else {
            return Ok(());
        };
        if self
            .budgets
            .should_alert(&caller.identity, Alert::RateExceeded)
        {
            warn!(
                alert = "detokenize_rate_exceeded",
                caller = %caller.identity,
                peer = caller.peer.as_deref().unwrap_or("-"),
                "caller exceeded its detokenize budget; refusing its calls until the budget refills"
            );
        }
        // Whole milliseconds, rounded up, so a caller that waits that long
        // is admitted.
        let ms = wait.as_micros().div_ceil(1000).max(1);
        Err(VaultError::ResourceExhausted(format!(
            "detokenize rate limit for this caller reached; retry in {ms} ms"
        )))
    }

    /// Charges a detokenize that named no token the caller may read: a
    /// malformed, unknown or other tenant's token.
    fn detokenize_missed(&self, caller: &Caller) {
        if self.budgets.charge_miss(&caller.identity)
            && self.budgets.should_alert(&caller.identity, Alert::Misses)
        {
            warn!(
                alert = "detokenize_misses",
                caller = %caller.identity,
                peer = caller.peer.as_deref().unwrap_or("-"),
                "calls for tokens that do not exist spent this caller's detokenize budget: possible token enumeration"
            );
        }
    }

    /// Fetches a token's record if it exists and belongs to a tenant the
    /// caller reaches. Another tenant's token is reported exactly like a
    /// missing one.
    async fn find(&self, caller: &Caller, token: &Token) -> Result<Arc<TokenRecord>, VaultError> {
        let rec = self
            .store
            .get_token(token)
            .await
            .map_err(storage)?
            .ok_or(VaultError::NotFound)?;
        // Scope first: another tenant's caller learns nothing of this row,
        // damaged or not.
        if !caller.reaches_name(&rec.tenant) {
            return Err(VaultError::NotFound);
        }
        if TenantId::parse(&rec.tenant).is_err() {
            error!(token = %token, "token row holds a tenant name that is not valid");
            return Err(VaultError::DataLoss);
        }
        Ok(rec)
    }
}

fn parse_token(s: &str) -> Result<Token, VaultError> {
    Token::parse(s).map_err(|e| VaultError::InvalidArgument(e.to_string()))
}

/// Characters free text in an audit record may not hold: control
/// characters, and the invisible ones that can make a record read
/// differently from what it stores (bidirectional embeddings, overrides
/// and isolates, zero-width space, word joiners, byte-order mark). The
/// joiners and direction marks that right-to-left and Indic text and emoji
/// need (U+200C to U+200F) are allowed.
pub(crate) fn unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
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
    if p.chars().any(unprintable) {
        return Err(VaultError::InvalidArgument(
            "purpose must not contain control or invisible formatting characters".into(),
        ));
    }
    if contains_card_like_digits(p) {
        return Err(VaultError::InvalidArgument(
            "purpose must not contain a card number".into(),
        ));
    }
    Ok(p)
}

/// What may stand between the digit groups of a card number: white space
/// or punctuation, except `:`, so that a time of day ("2024-06-01
/// 01:00-03:00") does not join a date into a card-length run. Beyond
/// ASCII: any Unicode white space (no-break, thin, ideographic spaces),
/// the General Punctuation block (dashes, bullets, zero-width joiners),
/// Latin-1 punctuation, the minus sign, and CJK, small and full-width
/// punctuation (their colons excepted): what text copied from documents
/// and web pages puts between digit groups.
fn is_group_separator(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_whitespace() || (c.is_ascii_punctuation() && c != ':');
    }
    c.is_whitespace()
        || matches!(c,
            '\u{00A1}'..='\u{00BF}'
            | '\u{2000}'..='\u{206F}'
            | '\u{2212}'
            | '\u{3000}'..='\u{3003}'
            | '\u{30FB}'
            | '\u{FE50}'..='\u{FE54}'
            | '\u{FE56}'..='\u{FE6B}'
            | '\u{FF01}'..='\u{FF0F}'
            | '\u{FF1B}'..='\u{FF20}'
            | '\u{FF3B}'..='\u{FF40}'
            | '\u{FF5B}'..='\u{FF65}')
}

/// Zeros of the Unicode decimal digit sets whose values are known here
/// (each set is ten code points, zero to nine): Arabic-Indic, Extended
/// Arabic-Indic, Devanagari, Bengali, Thai, Myanmar, full-width, and the
/// mathematical digits.
const DIGIT_ZEROS: &[u32] = &[
    0x0660, 0x06F0, 0x0966, 0x09E6, 0x0E50, 0x1040, 0xFF10, 0x1D7CE, 0x1D7D8, 0x1D7E2, 0x1D7EC,
    0x1D7F6,
];

/// Marks a digit whose value is not known (any other numeric character):
/// a run holding one is card-like at any card length, Luhn unchecked.
const UNKNOWN_DIGIT: u8 = b'?';

/// `c` as an ASCII digit, [`UNKNOWN_DIGIT`] for another numeric
/// character, or `None` if it is no digit.
fn digit(c: char) -> Option<u8> {
    if c.is_ascii_digit() {
        return u8::try_from(c).ok();
    }
    if c.is_ascii() || !c.is_numeric() {
        return None;
    }
    let cp = u32::from(c);
    let known = DIGIT_ZEROS
        .iter()
        .find(|&&zero| (zero..zero + 10).contains(&cp))
        .and_then(|&zero| u8::try_from(cp - zero).ok());
    Some(known.map_or(UNKNOWN_DIGIT, |d| b'0' + d))
}

/// True if `s` holds a card-number-like sequence: digit groups joined by
/// separators ([`is_group_separator`]: `4111.1111…`, `…/…`, `…_…` as well
/// as spaces and hyphens), any consecutive span of which has 12–19 digits
/// in all and passes Luhn ("refund 2 4111 1111 1111 1111" is caught by its
/// last four groups, not hidden by the stray 2), or a single group of 20
/// or more digits. Digits of other scripts count as digits ([`digit`]). A
/// letter or any other character ends a run.
pub(crate) fn contains_card_like_digits(s: &str) -> bool {
    // Digits of the current run, and where each group in it ends. The
    // buffer is sized for the whole input up front: growing it would move
    // the digits and free the old block unwiped.
    let mut digits: Zeroizing<Vec<u8>> = Zeroizing::new(Vec::with_capacity(s.len()));
    let mut ends: Vec<usize> = Vec::new();
    let mut in_group = false;
    // A trailing letter closes the last run.
    for c in s.chars().chain(std::iter::once('x')) {
        if let Some(d) = digit(c) {
            digits.push(d);
            in_group = true;
            continue;
        }
        if is_group_separator(c) && !digits.is_empty() {
            if in_group {
                ends.push(digits.len());
                in_group = false;
            }
            continue;
        }
        if in_group {
            ends.push(digits.len());
            in_group = false;
        }
        if run_has_card(&digits, &ends) {
            return true;
        }
        digits.clear();
        ends.clear();
    }
    false
}

/// Whether any span of whole groups of a run is card-like (see above).
fn run_has_card(digits: &[u8], ends: &[usize]) -> bool {
    let starts = std::iter::once(0).chain(ends.iter().copied());
    for (i, start) in starts.enumerate().take(ends.len()) {
        if ends[i] - start >= 20 {
            return true;
        }
        for end in &ends[i..] {
            let n = end - start;
            if n > 19 {
                break;
            }
            let span = &digits[start..*end];
            if n >= 12 && (span.contains(&UNKNOWN_DIGIT) || luhn_valid(span)) {
                return true;
            }
        }
    }
    false
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
        // A stray number next to the card does not hide it (found by the
        // purpose_check fuzz target).
        // The glued test card is built at run time: no literal card number
        // in src/.
        let glued = format!("order 12 4{}", "1".repeat(15));
        for hidden in [
            "refund qty 2 4111 1111 1111 1111",
            "card 4111-1111-1111-1111-7 declined",
            glued.as_str(),
            "6--888888888888",
        ] {
            assert!(check_purpose(hidden).is_err(), "{hidden}");
        }
        assert!(check_purpose("orders 12 and 34, ticket 5678").is_ok());
        assert!(check_purpose("order 123456789012345678901").is_err());
    }

    /// `body` completed with the digit that makes it pass Luhn: a stand-in
    /// card number made at run time, so no card-number literal is in src/.
    fn luhn_completed(body: &str) -> String {
        (0..=9)
            .map(|d| format!("{body}{d}"))
            .find(|c| luhn_valid(c.as_bytes()))
            .unwrap()
    }

    /// The digits of `card` in groups of four joined by `sep`.
    fn grouped(card: &str, sep: &str) -> String {
        card.as_bytes()
            .chunks(4)
            .map(|g| std::str::from_utf8(g).unwrap())
            .collect::<Vec<_>>()
            .join(sep)
    }

    #[test]
    fn card_numbers_are_found_whatever_punctuation_separates_their_groups() {
        for card in [
            luhn_completed(&format!("4{}", "1".repeat(14))),
            luhn_completed(&format!("5{}", "5".repeat(14))),
            luhn_completed(&format!("37{}", "8".repeat(12))),
        ] {
            assert!(contains_card_like_digits(&card), "{card}");
            for sep in [
                " ", "-", ".", "/", "_", ",", ";", "|", "\\", "+", "*", "#", "~", "'", "\"", "(",
                ")", "\t", " - ", "..", " / ",
            ] {
                let text = format!("refund {} now", grouped(&card, sep));
                assert!(contains_card_like_digits(&text), "{text:?}");
                assert!(check_purpose(&text.replace('\t', " ")).is_err(), "{text:?}");
            }
        }
        // Letters still end a run, so ordinary numbered text passes.
        assert!(!contains_card_like_digits("orders 12 and 34, ticket 5678"));
        assert!(!contains_card_like_digits("v1.2.3 build 4567"));
        // A colon ends a run: dates with times of day are not card numbers.
        for h in 0..24 {
            for m in [0, 15, 30, 45] {
                let text = format!("maintenance 2024-06-01 {h:02}:{m:02}-{h:02}:59 UTC");
                assert!(check_purpose(&text).is_ok(), "{text:?}");
            }
        }
    }

    /// Text copied from documents and web pages: Unicode spaces, dashes
    /// and joiners between the groups, or the digits of other scripts,
    /// must not hide a card number.
    #[test]
    fn card_numbers_are_found_in_unicode_spacing_and_digits() {
        let card = luhn_completed(&format!("4{}", "1".repeat(14)));
        for sep in [
            "\u{00A0}", "\u{2009}", "\u{202F}", "\u{3000}", "\u{2013}", "\u{2014}", "\u{2212}",
            "\u{2022}", "\u{00B7}", "\u{200D}", "\u{FF0D}", "\u{FF0E}", "\u{FE63}",
        ] {
            let text = format!("refund {} now", grouped(&card, sep));
            assert!(contains_card_like_digits(&text), "{text:?}");
        }
        // The same digits in other scripts, whose values are known: Luhn
        // decides, as for ASCII.
        for zero in [0xFF10_u32, 0x0660, 0x06F0, 0x0966, 0x1D7CE] {
            let shift = |s: &str| -> String {
                s.chars()
                    .map(|c| match c.to_digit(10) {
                        Some(d) => char::from_u32(zero + d).unwrap(),
                        None => c,
                    })
                    .collect()
            };
            let text = format!("refund {}", shift(&grouped(&card, " ")));
            assert!(contains_card_like_digits(&text), "{text:?}");
            let not_luhn = format!("order {}", shift("4111111111111112"));
            assert!(!contains_card_like_digits(&not_luhn), "{not_luhn:?}");
        }
        // Digits of a script whose values are not known here (Tamil):
        // any card-length run is taken for a card number.
        let tamil: String = (0..16)
            .map(|i| char::from_u32(0x0BE6 + (i % 10)).unwrap())
            .collect();
        assert!(contains_card_like_digits(&format!("ref {tamil}")));
        assert!(!contains_card_like_digits("ref \u{0BE7}\u{0BE8} ok"));
        // A full-width colon ends a run, like the ASCII one.
        assert!(!contains_card_like_digits(
            "window 2024-06-01 01\u{FF1A}00-03\u{FF1A}00"
        ));
    }

    #[test]
    fn invisible_formatting_characters_are_refused_in_free_text() {
        for c in ['\u{202E}', '\u{2066}', '\u{200B}', '\u{FEFF}', '\u{0007}'] {
            let text = format!("refund{c} order 42");
            assert!(check_purpose(&text).is_err(), "{text:?}");
        }
        assert!(check_purpose("refund order 42 — café").is_ok());
        // Joiners and direction marks that scripts and emoji need.
        assert!(check_purpose("refund order 42 \u{200C}\u{200D}\u{200E}\u{200F}").is_ok());
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
