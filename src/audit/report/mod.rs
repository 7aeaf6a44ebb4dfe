//! The key-lifecycle report: an auditor's view of an audit log (usually a
//! verified export) organised around the keys rather than the sequence of
//! entries.
//!
//! [`build`] turns entries and checkpoints into a [`Report`] model:
//! vault-wide KEK events; per tenant, per data key (id, version), a timeline
//! of created / activated → rotated to decrypt-only → re-wrapped → re-encrypted
//! away from → destroyed, each with its time, actor, approvers, reason,
//! outcome, audit sequence number and the signed checkpoint that covers it;
//! flags (a key that outlived its crypto-period, a key destroyed without
//! dual control); refused or failed key-lifecycle attempts; and counts of
//! data-access events per tenant and action. [`render_html`] and
//! [`render_markdown`] print it.
//!
//! Everything from the log is caller-influenced (actor, reason, detail,
//! even tenant names in a doctored export), so the HTML escapes all of it
//! and the page carries no scripts and loads nothing. Purposes and tokens of
//! data-access events are never read: the report is about keys.

use std::collections::BTreeMap;

use crate::audit::verify::Verdict;
use crate::domain::audit::{AuditRecord, Checkpoint};

mod builder;
mod html;
mod markdown;
#[cfg(test)]
mod tests;

pub use html::{esc, render_html};
pub use markdown::{md, render_markdown};

use builder::Builder;

/// What [`build`] reads.
pub struct ReportInput<'a> {
    pub entries: &'a [AuditRecord],
    pub checkpoints: &'a [Checkpoint],
    /// The verification verdict of the export this came from, shown as a banner.
    pub verdict: Option<&'a Verdict>,
    /// Data-key crypto-period, for flagging keys that outlived it.
    pub crypto_period_ms: i64,
    /// "Now": keys still active are aged up to this time.
    pub generated_ms: i64,
}

/// The verification banner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Banner {
    Verified(String),
    Failed(String),
    NotVerified,
}

/// A data key's state as the log tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Referenced by the log (e.g. retired or destroyed) but its creation is
    /// not in it.
    Unknown,
    Active,
    DecryptOnly,
    Destroyed,
}

impl KeyState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Active => "active",
            Self::DecryptOnly => "decrypt-only",
            Self::Destroyed => "destroyed",
        }
    }
}

/// The signed checkpoint that covers an entry: the first with `seq` ≥ the
/// entry's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Covering {
    pub seq: u64,
    pub time_ms: i64,
}

/// One audit entry as the report shows it (never its purpose or token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub time_ms: i64,
    pub action: String,
    pub actor: String,
    pub tenant: Option<String>,
    pub approvers: Option<String>,
    pub reason: Option<String>,
    pub outcome: String,
    pub detail: Option<String>,
    pub key_id: Option<u32>,
    pub key_version: Option<u32>,
    pub covered_by: Option<Covering>,
    /// The report's reading of the entry ("rotated → decrypt-only", counts…).
    pub note: String,
}

impl Event {
    pub fn succeeded(&self) -> bool {
        self.outcome == "success"
    }
}

/// What an event did to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyEventKind {
    /// `dek_create`: the tenant's first key, active at once.
    Created,
    /// `dek_rotate` naming this key as the new one: created and active.
    Activated,
    /// `dek_rotate` naming this key as the one retired: decrypt-only.
    Retired,
    /// `kek_rotate` while this key was alive.
    Rewrapped,
    ReencryptStart,
    ReencryptComplete,
    ReencryptFail,
    /// `dek_destroy`.
    Destroyed,
    /// `tenant_shred` listing this key.
    Shredded,
    /// A refused or failed attempt on this key: no state change.
    Attempt,
}

impl KeyEventKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Created => "created (active)",
            Self::Activated => "created by rotation (active)",
            Self::Retired => "rotated → decrypt-only",
            Self::Rewrapped => "re-wrapped under new KEK",
            Self::ReencryptStart => "re-encryption started",
            Self::ReencryptComplete => "re-encryption complete",
            Self::ReencryptFail => "re-encryption failed",
            Self::Destroyed => "destroyed",
            Self::Shredded => "destroyed by tenant shred",
            Self::Attempt => "refused / failed attempt",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEvent {
    pub kind: KeyEventKind,
    /// The key's state after the event.
    pub state_after: KeyState,
    pub event: Event,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagKind {
    OutlivedCryptoPeriod,
    DestroyedWithoutDualControl,
}

impl FlagKind {
    pub fn text(self) -> &'static str {
        match self {
            Self::OutlivedCryptoPeriod => "outlived its crypto-period",
            Self::DestroyedWithoutDualControl => "destroyed without dual control",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    pub kind: FlagKind,
    pub tenant: String,
    pub key_id: u32,
    pub key_version: Option<u32>,
    /// Specifics: how long, which entry.
    pub detail: String,
    /// The entry that raised it, where one did.
    pub seq: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyReport {
    pub id: u32,
    pub version: Option<u32>,
    pub tenant: String,
    pub state: KeyState,
    pub created_ms: Option<i64>,
    /// When it became decrypt-only.
    pub retired_ms: Option<i64>,
    pub destroyed_ms: Option<i64>,
    /// Creation to rotation, destruction or `generated_ms`; None when the
    /// creation is not in the log.
    pub active_ms: Option<i64>,
    pub timeline: Vec<KeyEvent>,
    pub flags: Vec<FlagKind>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantReport {
    pub tenant: String,
    /// Ordered by version, then id.
    pub keys: Vec<KeyReport>,
    /// Tenant-level lifecycle events: re-encryption jobs, shred requests
    /// and shreds, key events naming no key.
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessCount {
    /// None for events with no tenant.
    pub tenant: Option<String>,
    pub action: String,
    pub succeeded: u64,
    pub refused: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub generated_ms: i64,
    pub crypto_period_ms: i64,
    pub banner: Banner,
    pub entries: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub checkpoints: u64,
    pub last_checkpoint: Option<Covering>,
    /// Entries after the last checkpoint.
    pub uncovered: u64,
    /// Every flag, in the order raised.
    pub flags: Vec<Flag>,
    /// KEK and vault-wide events: kek_init, kek_rotate, audit_key_create,
    /// seal, unseal, unseal_share, and lifecycle events that name no tenant.
    pub kek_events: Vec<Event>,
    /// Ordered by tenant name.
    pub tenants: Vec<TenantReport>,
    /// Key-lifecycle events whose outcome is not success, plus failed
    /// re-encryption jobs.
    pub attempts: Vec<Event>,
    pub data_access: Vec<AccessCount>,
}

impl Report {
    pub fn tenant(&self, name: &str) -> Option<&TenantReport> {
        self.tenants.iter().find(|t| t.tenant == name)
    }

    pub fn key(&self, id: u32) -> Option<&KeyReport> {
        self.tenants
            .iter()
            .flat_map(|t| t.keys.iter())
            .find(|k| k.id == id)
    }
}

/// Builds the report model.
pub fn build(input: &ReportInput<'_>) -> Report {
    let mut checkpoints: Vec<Covering> = input
        .checkpoints
        .iter()
        .map(|c| Covering {
            seq: c.seq,
            time_ms: c.time_ms,
        })
        .collect();
    checkpoints.sort_by_key(|c| (c.seq, c.time_ms));
    let mut b = Builder {
        checkpoints,
        keys: BTreeMap::new(),
        tenant_events: BTreeMap::new(),
        kek_events: Vec::new(),
        attempts: Vec::new(),
        access: BTreeMap::new(),
        flags: Vec::new(),
        open_jobs: Vec::new(),
    };
    let mut entries: Vec<&AuditRecord> = input.entries.iter().collect();
    entries.sort_by_key(|r| r.seq);
    for r in &entries {
        b.record(r);
    }

    // Active periods and the crypto-period flag.
    let mut period_flags = Vec::new();
    for k in b.keys.values_mut() {
        let end = [k.retired_ms, k.destroyed_ms]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(input.generated_ms);
        k.active_ms = k.created_ms.map(|c| end.saturating_sub(c).max(0));
        if let Some(a) = k.active_ms
            && a > input.crypto_period_ms
        {
            k.flags.insert(0, FlagKind::OutlivedCryptoPeriod);
            let until = if k.retired_ms.is_some() {
                "until its rotation"
            } else if k.destroyed_ms.is_some() {
                "until its destruction"
            } else {
                "and still active"
            };
            period_flags.push(Flag {
                kind: FlagKind::OutlivedCryptoPeriod,
                tenant: k.tenant.clone(),
                key_id: k.id,
                key_version: k.version,
                detail: format!(
                    "active for {} {until}; crypto-period {}",
                    duration(a),
                    duration(input.crypto_period_ms)
                ),
                seq: None,
            });
        }
    }
    period_flags.append(&mut b.flags);
    let flags = period_flags;

    // Group per tenant.
    let mut tenants: BTreeMap<String, TenantReport> = BTreeMap::new();
    for key in b.keys.into_values() {
        let t = key.tenant.clone();
        tenants
            .entry(t.clone())
            .or_insert_with(|| TenantReport {
                tenant: t,
                keys: Vec::new(),
                events: Vec::new(),
            })
            .keys
            .push(key);
    }
    for (t, evs) in b.tenant_events {
        tenants
            .entry(t.clone())
            .or_insert_with(|| TenantReport {
                tenant: t,
                keys: Vec::new(),
                events: Vec::new(),
            })
            .events = evs;
    }
    let mut tenants: Vec<TenantReport> = tenants.into_values().collect();
    for t in &mut tenants {
        t.keys
            .sort_by_key(|k| (k.version.unwrap_or(u32::MAX), k.id));
    }

    let banner = match input.verdict {
        None => Banner::NotVerified,
        Some(v) if v.ok() => Banner::Verified(v.summary()),
        Some(v) => Banner::Failed(v.summary()),
    };
    let last_seq = entries.last().map(|r| r.seq);
    let last_checkpoint = b.checkpoints.last().copied();
    let covered_to = last_checkpoint.map_or(0, |c| c.seq);
    Report {
        generated_ms: input.generated_ms,
        crypto_period_ms: input.crypto_period_ms,
        banner,
        entries: entries.len() as u64,
        first_seq: entries.first().map(|r| r.seq),
        last_seq,
        checkpoints: b.checkpoints.len() as u64,
        last_checkpoint,
        uncovered: entries.iter().filter(|r| r.seq > covered_to).count() as u64,
        flags,
        kek_events: b.kek_events,
        tenants,
        attempts: b.attempts,
        data_access: b
            .access
            .into_iter()
            .map(|((tenant, action), (succeeded, refused))| AccessCount {
                tenant,
                action,
                succeeded,
                refused,
            })
            .collect(),
    }
}

// ---------------------------------------------------------------- formatting

/// `2026-11-25 02:42:54Z`.
pub fn utc(ms: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("(invalid time {ms} ms)"),
    }
}

/// `400d 3h`, `5h 2m`, `42s`.
pub fn duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    let (d, h, m) = (s / 86_400, (s % 86_400) / 3600, (s % 3600) / 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {}s", s % 60)
    } else {
        format!("{s}s")
    }
}

fn covering_text(c: Option<Covering>) -> String {
    match c {
        Some(c) => format!("checkpoint #{} ({})", c.seq, utc(c.time_ms)),
        None => "not yet covered by a checkpoint".into(),
    }
}

fn key_name(id: u32, version: Option<u32>) -> String {
    match version {
        Some(v) => format!("key {id} v{v}"),
        None => format!("key {id}"),
    }
}

fn opt(s: &Option<String>) -> &str {
    s.as_deref().filter(|s| !s.is_empty()).unwrap_or("—")
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn flag_line(f: &Flag) -> String {
    let tenant = if f.tenant.is_empty() {
        "(no tenant)"
    } else {
        &f.tenant
    };
    format!(
        "{tenant} / {}: {}",
        key_name(f.key_id, f.key_version),
        f.detail
    )
}

fn tenant_label(t: &str) -> &str {
    if t.is_empty() { "(unknown)" } else { t }
}
