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
use std::fmt::Write as _;

use crate::audit::verify::Verdict;
use crate::domain::audit::{AuditAction, AuditRecord, Checkpoint};

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

// ---------------------------------------------------------------- build

/// Whitespace-separated `name=value` fields of a vault-written detail.
fn field<'d>(detail: &'d str, name: &str) -> Option<&'d str> {
    detail.split_whitespace().find_map(|tok| {
        let (k, v) = tok.split_once('=')?;
        (k == name).then(|| v.trim_end_matches([';', ',']))
    })
}

fn field_num<T: std::str::FromStr>(detail: &str, name: &str) -> Option<T> {
    field(detail, name)?.parse().ok()
}

/// The ids in `dek_ids=[1,2]`.
fn id_list(detail: &str) -> Vec<u32> {
    field(detail, "dek_ids")
        .map(|v| {
            v.trim_start_matches('[')
                .trim_end_matches(']')
                .split(',')
                .filter_map(|s| s.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The number after `moved=X of`.
fn moved_of(detail: &str) -> Option<(u64, u64)> {
    let mut it = detail.split_whitespace();
    while let Some(tok) = it.next() {
        if let Some(x) = tok.strip_prefix("moved=") {
            let x = x.parse().ok()?;
            if it.next() != Some("of") {
                return None;
            }
            let y = it.next()?.parse().ok()?;
            return Some((x, y));
        }
    }
    None
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

struct Builder {
    checkpoints: Vec<Covering>,
    keys: BTreeMap<u32, KeyReport>,
    tenant_events: BTreeMap<String, Vec<Event>>,
    kek_events: Vec<Event>,
    attempts: Vec<Event>,
    access: BTreeMap<(Option<String>, String), (u64, u64)>,
    flags: Vec<Flag>,
    /// Tenants with a re-encryption job started and not yet finished, in
    /// start order, to attribute a `reencrypt_fail` that names no tenant.
    open_jobs: Vec<String>,
}

impl Builder {
    fn covering(&self, seq: u64) -> Option<Covering> {
        let i = self.checkpoints.partition_point(|c| c.seq < seq);
        self.checkpoints.get(i).copied()
    }

    fn event(&self, r: &AuditRecord) -> Event {
        Event {
            seq: r.seq,
            time_ms: r.time_ms,
            action: r.action.clone(),
            actor: r.actor.clone(),
            tenant: r.tenant.clone(),
            approvers: r.approvers.clone(),
            reason: r.reason.clone(),
            outcome: r.outcome.clone(),
            detail: r.detail.clone(),
            key_id: r.key_id,
            key_version: r.key_version,
            covered_by: self.covering(r.seq),
            note: String::new(),
        }
    }

    /// The key `id`, made on first mention.
    fn key(&mut self, id: u32, version: Option<u32>, tenant: Option<&str>) -> &mut KeyReport {
        let k = self.keys.entry(id).or_insert_with(|| KeyReport {
            id,
            version,
            tenant: tenant.unwrap_or_default().to_owned(),
            state: KeyState::Unknown,
            created_ms: None,
            retired_ms: None,
            destroyed_ms: None,
            active_ms: None,
            timeline: Vec::new(),
            flags: Vec::new(),
        });
        if k.version.is_none() {
            k.version = version;
        }
        if k.tenant.is_empty()
            && let Some(t) = tenant
        {
            t.clone_into(&mut k.tenant);
        }
        k
    }

    fn push_key_event(&mut self, id: u32, kind: KeyEventKind, state: KeyState, ev: &Event) {
        let k = self.key(id, ev.key_version, ev.tenant.as_deref());
        let state_after = if kind == KeyEventKind::Attempt {
            k.state
        } else {
            state
        };
        k.state = state_after;
        k.timeline.push(KeyEvent {
            kind,
            state_after,
            event: ev.clone(),
        });
    }

    fn tenant_event(&mut self, ev: Event) {
        match ev.tenant.clone() {
            Some(t) => self.tenant_events.entry(t).or_default().push(ev),
            None => self.kek_events.push(ev),
        }
    }

    /// Decrypt-only keys of `tenant` now: what a re-encryption job moves
    /// tokens away from.
    fn retired_keys_of(&self, tenant: &str) -> Vec<u32> {
        self.keys
            .values()
            .filter(|s| s.tenant == tenant && s.state == KeyState::DecryptOnly)
            .map(|s| s.id)
            .collect()
    }

    fn alive_keys(&self) -> Vec<u32> {
        self.keys
            .values()
            .filter(|s| matches!(s.state, KeyState::Active | KeyState::DecryptOnly))
            .map(|s| s.id)
            .collect()
    }

    fn destroy(&mut self, id: u32, kind: KeyEventKind, ev: &Event) {
        let k = self.key(id, None, ev.tenant.as_deref());
        if k.destroyed_ms.is_none() {
            k.destroyed_ms = Some(ev.time_ms);
        }
        self.push_key_event(id, kind, KeyState::Destroyed, ev);
    }

    fn dual_control_flag(&mut self, id: u32, ev: &Event) {
        let approvers: Vec<&str> = ev
            .approvers
            .as_deref()
            .unwrap_or("")
            .split([',', ' '])
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        let independent = approvers.iter().any(|a| *a != ev.actor);
        if independent {
            return;
        }
        let detail = if approvers.is_empty() {
            format!(
                "{} by {} with no approver (seq {})",
                ev.action, ev.actor, ev.seq
            )
        } else {
            format!(
                "{} by {} approved only by the actor themself (seq {})",
                ev.action, ev.actor, ev.seq
            )
        };
        let k = self.key(id, None, ev.tenant.as_deref());
        if !k.flags.contains(&FlagKind::DestroyedWithoutDualControl) {
            k.flags.push(FlagKind::DestroyedWithoutDualControl);
        }
        let (tenant, version) = (k.tenant.clone(), k.version);
        self.flags.push(Flag {
            kind: FlagKind::DestroyedWithoutDualControl,
            tenant,
            key_id: id,
            key_version: version,
            detail,
            seq: Some(ev.seq),
        });
    }

    fn record(&mut self, r: &AuditRecord) {
        let Some(action) = AuditAction::parse(&r.action) else {
            let mut ev = self.event(r);
            ev.note = "unrecognised action".into();
            self.kek_events.push(ev);
            return;
        };
        if !action.is_key_event() {
            // Counted only: purposes and tokens are not the report's business.
            let c = self
                .access
                .entry((r.tenant.clone(), r.action.clone()))
                .or_default();
            if r.outcome == "success" {
                c.0 += 1;
            } else {
                c.1 += 1;
            }
            return;
        }
        let mut ev = self.event(r);
        if !ev.succeeded() {
            ev.note = format!("{} {}", action.as_str(), ev.outcome);
            if let Some(id) = ev.key_id {
                let _ = write!(ev.note, " ({})", key_name(id, ev.key_version));
            }
            self.attempts.push(ev.clone());
            match ev.key_id {
                Some(id) if self.keys.contains_key(&id) => {
                    self.push_key_event(id, KeyEventKind::Attempt, KeyState::Unknown, &ev);
                }
                _ => match action {
                    AuditAction::KekInit
                    | AuditAction::KekRotate
                    | AuditAction::KekRotateRequest
                    | AuditAction::AuditKeyCreate
                    | AuditAction::Seal
                    | AuditAction::Unseal
                    | AuditAction::UnsealShare => self.kek_events.push(ev),
                    _ => self.tenant_event(ev),
                },
            }
            return;
        }
        let detail = ev.detail.clone().unwrap_or_default();
        match action {
            AuditAction::DekCreate | AuditAction::DekRotate => {
                let Some(id) = ev.key_id else {
                    ev.note = "names no data key".into();
                    self.tenant_event(ev);
                    return;
                };
                if action == AuditAction::DekRotate
                    && let Some(old) = field_num::<u32>(&detail, "dek_id")
                {
                    let mut old_ev = ev.clone();
                    old_ev.note = format!("replaced by key {id}");
                    if let Some(v) = ev.key_version {
                        old_ev.note.push_str(&format!(" (v{v})"));
                    }
                    if let Some(n) = detail
                        .split_once(" after ")
                        .and_then(|(_, rest)| rest.split_whitespace().next())
                        .and_then(|n| n.parse::<u64>().ok())
                    {
                        let _ = write!(
                            old_ev.note,
                            " after {}",
                            plural(n, "encryption", "encryptions")
                        );
                    }
                    let old_version = field_num::<u32>(&detail, "version");
                    old_ev.key_id = Some(old);
                    old_ev.key_version = old_version;
                    let k = self.key(old, old_version, ev.tenant.as_deref());
                    if k.retired_ms.is_none() {
                        k.retired_ms = Some(ev.time_ms);
                    }
                    self.push_key_event(old, KeyEventKind::Retired, KeyState::DecryptOnly, &old_ev);
                    ev.note = format!("new active key; key {old} became decrypt-only");
                } else if action == AuditAction::DekRotate {
                    ev.note = "new active key".into();
                } else {
                    ev.note = "first key of the tenant".into();
                }
                let k = self.key(id, ev.key_version, ev.tenant.as_deref());
                if k.created_ms.is_none() {
                    k.created_ms = Some(ev.time_ms);
                }
                let kind = if action == AuditAction::DekCreate {
                    KeyEventKind::Created
                } else {
                    KeyEventKind::Activated
                };
                self.push_key_event(id, kind, KeyState::Active, &ev);
            }
            AuditAction::KekRotate => {
                let alive = self.alive_keys();
                let from = field(&detail, "from").unwrap_or("?");
                let to = field(&detail, "to").unwrap_or("?");
                ev.note = format!("all live data keys re-wrapped from {from} to {to}");
                if let Some(n) = field_num::<u64>(&detail, "rewrapped_deks") {
                    let _ = write!(
                        ev.note,
                        "; vault re-wrapped {}, the log accounts for {}",
                        plural(n, "key", "keys"),
                        alive.len()
                    );
                }
                for id in alive {
                    let mut kev = ev.clone();
                    kev.note = format!("wrapped under {to} (was {from})");
                    let state = self.keys.get(&id).map_or(KeyState::Unknown, |s| s.state);
                    kev.tenant = self.keys.get(&id).map(|s| s.tenant.clone());
                    kev.key_id = Some(id);
                    kev.key_version = self.keys.get(&id).and_then(|s| s.version);
                    self.push_key_event(id, KeyEventKind::Rewrapped, state, &kev);
                }
                self.kek_events.push(ev);
            }
            AuditAction::ReencryptStart
            | AuditAction::ReencryptComplete
            | AuditAction::ReencryptFail => {
                let job = field(&detail, "job").map(str::to_owned);
                let (kind, note) = match action {
                    AuditAction::ReencryptStart => (
                        KeyEventKind::ReencryptStart,
                        match field_num::<u64>(&detail, "tokens_to_move") {
                            Some(n) => format!(
                                "re-encryption started: {} to move off decrypt-only keys",
                                plural(n, "token", "tokens")
                            ),
                            None => "re-encryption started".into(),
                        },
                    ),
                    AuditAction::ReencryptComplete => {
                        let mut s = String::from("re-encryption");
                        if let Some(j) = &job {
                            let _ = write!(s, " job {j}");
                        }
                        s.push_str(" complete");
                        if let Some((x, y)) = moved_of(&detail) {
                            let _ = write!(s, ": moved {x} of {y} tokens");
                        }
                        if let Some(p) = field_num::<u64>(&detail, "passes") {
                            let _ = write!(s, " in {}", plural(p, "pass", "passes"));
                        }
                        (KeyEventKind::ReencryptComplete, s)
                    }
                    _ => {
                        let mut s = String::from("re-encryption");
                        if let Some(j) = &job {
                            let _ = write!(s, " job {j}");
                        }
                        s.push_str(" failed");
                        if let Some((_, e)) = detail.split_once("error=") {
                            let _ = write!(s, ": {e}");
                        }
                        (KeyEventKind::ReencryptFail, s)
                    }
                };
                ev.note = note;
                if ev.tenant.is_none() && action != AuditAction::ReencryptStart {
                    // The vault does not name the tenant of a failed job;
                    // the one job still running is the one that failed.
                    let mut open = self.open_jobs.clone();
                    open.dedup();
                    if let [only] = open.as_slice() {
                        ev.tenant = Some(only.clone());
                        ev.note
                            .push_str(" (tenant inferred: its only re-encryption job in progress)");
                    }
                }
                if let Some(t) = ev.tenant.clone() {
                    if action == AuditAction::ReencryptStart {
                        self.open_jobs.push(t.clone());
                    } else if let Some(i) = self.open_jobs.iter().position(|o| *o == t) {
                        self.open_jobs.remove(i);
                    }
                    for id in self.retired_keys_of(&t) {
                        let state = KeyState::DecryptOnly;
                        self.push_key_event(id, kind, state, &ev);
                    }
                }
                if action == AuditAction::ReencryptFail {
                    self.attempts.push(ev.clone());
                }
                self.tenant_event(ev);
            }
            AuditAction::DekDestroy => {
                let Some(id) = ev.key_id else {
                    ev.note = "names no data key".into();
                    self.tenant_event(ev);
                    return;
                };
                ev.note = match ev.approvers.as_deref().filter(|a| !a.trim().is_empty()) {
                    Some(a) => format!("destroyed; approved by {a}"),
                    None => "destroyed".into(),
                };
                self.destroy(id, KeyEventKind::Destroyed, &ev);
                self.dual_control_flag(id, &ev);
            }
            AuditAction::ShredRequest => {
                ev.note = match field(&detail, "request_id") {
                    Some(id) => format!(
                        "crypto-shred requested (request {id}); awaiting a second administrator"
                    ),
                    None => "crypto-shred requested".into(),
                };
                self.tenant_event(ev);
            }
            AuditAction::TenantShred => {
                let ids = id_list(&detail);
                let list: Vec<String> = ids.iter().map(u32::to_string).collect();
                ev.note = format!(
                    "tenant crypto-shredded: {} destroyed [{}]",
                    plural(ids.len() as u64, "key", "keys"),
                    list.join(", ")
                );
                for id in &ids {
                    let mut kev = ev.clone();
                    kev.key_id = Some(*id);
                    kev.key_version = self.keys.get(id).and_then(|s| s.version);
                    kev.note = match field(&detail, "request_id") {
                        Some(r) => format!("destroyed with the tenant (request {r})"),
                        None => "destroyed with the tenant".into(),
                    };
                    self.destroy(*id, KeyEventKind::Shredded, &kev);
                    self.dual_control_flag(*id, &kev);
                }
                self.tenant_event(ev);
            }
            AuditAction::KekInit
            | AuditAction::KekRotateRequest
            | AuditAction::AuditKeyCreate
            | AuditAction::Seal
            | AuditAction::Unseal
            | AuditAction::UnsealShare => {
                ev.note = match action {
                    AuditAction::KekInit => "KEK pinned to the database".into(),
                    AuditAction::KekRotateRequest => {
                        "KEK rotation requested; a second administrator must approve".into()
                    }
                    AuditAction::AuditKeyCreate => "checkpoint signing key created".into(),
                    AuditAction::Seal => "vault sealed: keys dropped from memory".into(),
                    AuditAction::Unseal => "vault unsealed".into(),
                    _ => "unseal share submitted".into(),
                };
                self.kek_events.push(ev);
            }
            // Data access was handled above.
            AuditAction::Tokenize
            | AuditAction::Detokenize
            | AuditAction::GetMetadata
            | AuditAction::DeleteToken
            | AuditAction::AuditRead => {}
        }
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

// ---------------------------------------------------------------- HTML

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = r#"
:root{--ink:#1d2433;--muted:#5b6577;--line:#d9dee7;--bg:#f5f7fa;--card:#fff;
--ok:#1e7b3a;--okbg:#e3f4e8;--bad:#b42318;--badbg:#fdeceb;--warn:#9a5b00;--warnbg:#fff4db;
--grey:#6b7280;--greybg:#eef0f3;--blue:#1f5fae;--bluebg:#e7f0fb}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1280px;margin:0 auto;padding:20px 20px 48px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:19px;margin:32px 0 10px;padding-bottom:6px;border-bottom:2px solid var(--line)}
h3{font-size:15px;margin:0}
.meta{color:var(--muted);margin:0 0 16px}
.meta b{color:var(--ink);font-weight:600}
.banner{border-radius:8px;padding:12px 16px;margin:12px 0;font-size:15px;border:1px solid}
.banner .tag{font-weight:800;letter-spacing:.06em;margin-right:10px}
.banner.ok{background:var(--okbg);border-color:#9fd3ad;color:var(--ok)}
.banner.bad{background:var(--badbg);border-color:#f0a8a2;color:var(--bad)}
.banner.none{background:var(--greybg);border-color:var(--line);color:var(--grey)}
.flags{background:var(--badbg);border:1px solid #f0a8a2;border-radius:8px;padding:10px 16px;margin:12px 0}
.flags.clear{background:var(--okbg);border-color:#9fd3ad;color:var(--ok)}
.flags h2{border:0;margin:0 0 6px;padding:0;font-size:16px;color:var(--bad)}
.flags ul{margin:0;padding-left:20px}
.flags li{margin:3px 0}
.flag{display:inline-block;background:var(--bad);color:#fff;font-weight:700;font-size:12px;border-radius:4px;padding:1px 7px;margin:0 4px 0 0;white-space:nowrap}
.pill{display:inline-block;border-radius:999px;padding:0 9px;font-size:12px;font-weight:700;white-space:nowrap;border:1px solid transparent}
.s-active{background:var(--okbg);color:var(--ok);border-color:#9fd3ad}
.s-decrypt-only{background:var(--warnbg);color:var(--warn);border-color:#f1cf87}
.s-destroyed{background:var(--greybg);color:var(--grey);border-color:#c9ced6}
.s-unknown{background:#fff;color:var(--muted);border-color:var(--line)}
.o-success{color:var(--ok);font-weight:600}
.o-fail{color:var(--bad);font-weight:700}
nav.toc{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px 16px;margin:12px 0}
nav.toc a{color:var(--blue);text-decoration:none;margin-right:14px}
table{border-collapse:collapse;width:100%;background:var(--card);font-size:13px}
th,td{border:1px solid var(--line);padding:4px 6px;text-align:left;vertical-align:top}
th{background:#eef1f6;font-weight:600;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.time,td.seq{white-space:nowrap;font-variant-numeric:tabular-nums}
td.detail{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:11.5px;color:var(--muted);min-width:150px;max-width:230px;overflow-wrap:anywhere}
td.cov{min-width:130px;max-width:170px;font-variant-numeric:tabular-nums}
td.who{min-width:110px}
td.note{min-width:150px}
.cp{color:var(--muted);font-size:12px}
.cp.none{color:var(--warn);font-weight:600}
.tenant{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:4px 14px 14px;margin:22px 0}
.tenant>h2{margin-top:14px}
.key{border:1px solid var(--line);border-left:6px solid var(--grey);border-radius:8px;margin:14px 0;padding:8px 8px;background:#fcfdfe}
.key.k-active{border-left-color:var(--ok)}
.key.k-decrypt-only{border-left-color:#e0a526}
.key.k-flagged{border-color:#f0a8a2;border-left-color:var(--bad);background:#fffafa}
.keyhead{display:flex;flex-wrap:wrap;gap:8px;align-items:center;margin-bottom:8px}
.keyhead .facts{color:var(--muted);font-size:12.5px}
.lanes{margin:6px 0 14px}
.lane{display:grid;grid-template-columns:110px 1fr;align-items:center;gap:8px;margin:3px 0;font-size:12px}
.track{position:relative;height:14px;background:var(--greybg);border-radius:3px;overflow:hidden}
.seg{position:absolute;top:0;bottom:0}
.seg.active{background:#3aa35b}
.seg.overdue{background:var(--bad)}
.seg.decrypt{background:#f0b941}
.legend{font-size:12px;color:var(--muted);margin:4px 0 0 118px}
.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 4px 0 10px;vertical-align:-1px}
tr.attempt td{background:#fff7f6}
.empty{color:var(--muted);font-style:italic}
footer{color:var(--muted);font-size:12px;margin-top:32px}
"#;

fn state_pill(s: KeyState) -> String {
    format!(r#"<span class="pill s-{0}">{0}</span>"#, s.as_str())
}

fn outcome_html(o: &str) -> String {
    let class = if o == "success" {
        "o-success"
    } else {
        "o-fail"
    };
    format!(r#"<span class="{class}">{}</span>"#, esc(o))
}

fn cp_html(c: Option<Covering>) -> String {
    let class = if c.is_some() { "cp" } else { "cp none" };
    format!(r#"<span class="{class}">{}</span>"#, esc(&covering_text(c)))
}

fn who_html(e: &Event) -> String {
    let mut s = esc(&e.actor);
    if let Some(a) = e.approvers.as_deref().filter(|a| !a.trim().is_empty()) {
        let _ = write!(s, "<br><span class=\"cp\">approved by</span> {}", esc(a));
    }
    s
}

const EVENT_HEAD: &str = "<tr><th>Time (UTC)</th><th>Event</th><th>What it means</th><th>Actor / approvers</th><th>Reason</th><th>Outcome</th><th>Detail</th><th>Audit seq · covered by</th></tr>";

fn event_row(out: &mut String, e: &Event, label: &str, row_class: &str) {
    let _ = write!(
        out,
        "<tr class=\"{row_class}\"><td class=\"time\">{}</td><td>{}</td><td class=\"note\">{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"detail\">{}</td><td class=\"cov\"><b>#{}</b><br>{}</td></tr>",
        esc(&utc(e.time_ms)),
        label,
        esc(&e.note),
        who_html(e),
        esc(opt(&e.reason)),
        outcome_html(&e.outcome),
        esc(opt(&e.detail)),
        e.seq,
        cp_html(e.covered_by),
    );
}

fn events_table(out: &mut String, events: &[Event]) {
    if events.is_empty() {
        out.push_str("<p class=\"empty\">None.</p>");
        return;
    }
    out.push_str("<table>");
    out.push_str(EVENT_HEAD);
    for e in events {
        let class = if e.succeeded() { "" } else { "attempt" };
        event_row(out, e, &format!("<code>{}</code>", esc(&e.action)), class);
    }
    out.push_str("</table>");
}

fn pct(x: i64, lo: i64, span: i64) -> f64 {
    ((x - lo) as f64 / span as f64 * 100.0).clamp(0.0, 100.0)
}

/// One bar per key: green while active (red past its crypto-period),
/// amber while decrypt-only, nothing once destroyed.
fn lanes_html(out: &mut String, t: &TenantReport, r: &Report) {
    let lo = t
        .keys
        .iter()
        .filter_map(|k| k.created_ms.or(k.retired_ms).or(k.destroyed_ms))
        .min();
    let Some(lo) = lo else { return };
    let hi = r.generated_ms.max(lo + 1);
    let span = hi - lo;
    out.push_str("<div class=\"lanes\">");
    for k in &t.keys {
        let start = k.created_ms.unwrap_or(lo);
        let retired = k.retired_ms;
        let end_active = [k.retired_ms, k.destroyed_ms]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(hi);
        let _ = write!(
            out,
            "<div class=\"lane\"><span>{}</span><div class=\"track\">",
            esc(&key_name(k.id, k.version))
        );
        let seg = |out: &mut String, class: &str, a: i64, b: i64| {
            let (pa, pb) = (pct(a, lo, span), pct(b, lo, span));
            if pb > pa || b > a {
                let _ = write!(
                    out,
                    "<div class=\"seg {class}\" style=\"left:{pa:.2}%;width:{:.2}%\"></div>",
                    (pb - pa).max(0.4)
                );
            }
        };
        if k.created_ms.is_some() {
            let due = start.saturating_add(r.crypto_period_ms);
            if end_active > due {
                seg(out, "active", start, due);
                seg(out, "overdue", due, end_active);
            } else {
                seg(out, "active", start, end_active);
            }
        }
        if let Some(ret) = retired {
            seg(out, "decrypt", ret, k.destroyed_ms.unwrap_or(hi));
        }
        out.push_str("</div></div>");
    }
    let _ = write!(
        out,
        "<div class=\"legend\">{} → {}<i style=\"background:#3aa35b\"></i>active<i style=\"background:#b42318\"></i>active past crypto-period<i style=\"background:#f0b941\"></i>decrypt-only</div>",
        esc(&utc(lo)),
        esc(&utc(hi))
    );
    out.push_str("</div>");
}

fn key_html(out: &mut String, k: &KeyReport) {
    let mut class = format!("key k-{}", k.state.as_str());
    if !k.flags.is_empty() {
        class.push_str(" k-flagged");
    }
    let _ = write!(
        out,
        "<section class=\"{class}\"><div class=\"keyhead\"><h3>Data key {} · version {}</h3>{}",
        k.id,
        k.version.map_or("?".into(), |v| v.to_string()),
        state_pill(k.state)
    );
    for f in &k.flags {
        let _ = write!(out, "<span class=\"flag\">⚠ {}</span>", esc(f.text()));
    }
    let mut facts = Vec::new();
    facts.push(match k.created_ms {
        Some(c) => format!("created {}", utc(c)),
        None => "creation not in this log".into(),
    });
    if let Some(t) = k.retired_ms {
        facts.push(format!("decrypt-only since {}", utc(t)));
    }
    if let Some(t) = k.destroyed_ms {
        facts.push(format!("destroyed {}", utc(t)));
    }
    if let Some(a) = k.active_ms {
        facts.push(format!("active for {}", duration(a)));
    }
    let _ = write!(
        out,
        "<span class=\"facts\">{}</span></div>",
        esc(&facts.join(" · "))
    );
    out.push_str("<table>");
    out.push_str(
        "<tr><th>Time (UTC)</th><th>Event</th><th>State after</th><th>What it means</th><th>Actor / approvers</th><th>Reason</th><th>Outcome</th><th>Detail</th><th>Audit seq · covered by</th></tr>",
    );
    for ke in &k.timeline {
        let e = &ke.event;
        let class = if ke.kind == KeyEventKind::Attempt {
            "attempt"
        } else {
            ""
        };
        let state = if ke.kind == KeyEventKind::Attempt {
            format!(
                "{} <span class=\"cp\">(unchanged)</span>",
                state_pill(ke.state_after)
            )
        } else {
            state_pill(ke.state_after)
        };
        let _ = write!(
            out,
            "<tr class=\"{class}\"><td class=\"time\">{}</td><td><b>{}</b><br><code class=\"cp\">{}</code></td><td>{}</td><td class=\"note\">{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"detail\">{}</td><td class=\"cov\"><b>#{}</b><br>{}</td></tr>",
            esc(&utc(e.time_ms)),
            esc(ke.kind.label()),
            esc(&e.action),
            state,
            esc(&e.note),
            who_html(e),
            esc(opt(&e.reason)),
            outcome_html(&e.outcome),
            esc(opt(&e.detail)),
            e.seq,
            cp_html(e.covered_by),
        );
    }
    out.push_str("</table></section>");
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

/// One self-contained page: inline CSS, no scripts, no external resources.
pub fn render_html(r: &Report) -> String {
    let mut out = String::with_capacity(64 * 1024);
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    out.push_str("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">");
    let _ = write!(
        out,
        "<title>Key-lifecycle report — {}</title><style>{CSS}</style></head><body><main>",
        esc(&utc(r.generated_ms))
    );
    out.push_str("<h1>Key-lifecycle report</h1>");
    let range = match (r.first_seq, r.last_seq) {
        (Some(a), Some(b)) => format!("seq {a}–{b}"),
        _ => "empty".into(),
    };
    let _ = write!(
        out,
        "<p class=\"meta\">Generated <b>{}</b> · {} audit entries ({}) · {} signed checkpoints{} · data-key crypto-period <b>{}</b></p>",
        esc(&utc(r.generated_ms)),
        r.entries,
        esc(&range),
        r.checkpoints,
        match r.last_checkpoint {
            Some(c) => format!(
                ", the last at #{} ({}), {} newer entries not yet covered",
                c.seq,
                esc(&utc(c.time_ms)),
                r.uncovered
            ),
            None => String::from(", none: no entry is covered"),
        },
        esc(&duration(r.crypto_period_ms)),
    );

    // Verification banner.
    match &r.banner {
        Banner::Verified(s) => {
            let _ = write!(
                out,
                "<div class=\"banner ok\"><span class=\"tag\">✔ VERIFIED</span>{}</div>",
                esc(s.strip_prefix("VERIFIED: ").unwrap_or(s))
            );
        }
        Banner::Failed(s) => {
            let _ = write!(
                out,
                "<div class=\"banner bad\"><span class=\"tag\">✘ FAILED</span>{}. Entries from the failure on cannot be trusted.</div>",
                esc(s.strip_prefix("FAILED").unwrap_or(s).trim_start_matches([' ', ':']))
            );
        }
        Banner::NotVerified => out.push_str(
            "<div class=\"banner none\"><span class=\"tag\">not verified</span>This report was built without verifying the log's hash chain and checkpoint signatures.</div>",
        ),
    }

    // Flags.
    if r.flags.is_empty() {
        out.push_str("<div class=\"flags clear\"><b>No flags:</b> every key was retired within its crypto-period and every destruction had dual control.</div>");
    } else {
        let _ = write!(
            out,
            "<div class=\"flags\"><h2>⚠ {} </h2><ul>",
            esc(&plural(r.flags.len() as u64, "flag", "flags"))
        );
        for f in &r.flags {
            let _ = write!(
                out,
                "<li><span class=\"flag\">{}</span>{}</li>",
                esc(f.kind.text()),
                esc(&flag_line(f))
            );
        }
        out.push_str("</ul></div>");
    }

    // Contents.
    out.push_str("<nav class=\"toc\"><b>Contents:</b> <a href=\"#kek\">KEK &amp; vault</a>");
    for (i, t) in r.tenants.iter().enumerate() {
        let _ = write!(
            out,
            "<a href=\"#t{i}\">Tenant {}</a>",
            esc(tenant_label(&t.tenant))
        );
    }
    out.push_str(
        "<a href=\"#attempts\">Refused / failed</a><a href=\"#access\">Data access</a></nav>",
    );

    out.push_str("<h2 id=\"kek\">KEK and vault-wide events</h2>");
    events_table(&mut out, &r.kek_events);

    for (i, t) in r.tenants.iter().enumerate() {
        let _ = write!(
            out,
            "<section class=\"tenant\" id=\"t{i}\"><h2>Tenant {}</h2>",
            esc(tenant_label(&t.tenant))
        );
        if t.keys.is_empty() {
            out.push_str("<p class=\"empty\">No data keys in this log.</p>");
        } else {
            out.push_str("<table><tr><th>Key</th><th>Version</th><th>State</th><th>Created</th><th>Decrypt-only since</th><th>Destroyed</th><th>Active for</th><th>Flags</th></tr>");
            for k in &t.keys {
                let flags: String = k
                    .flags
                    .iter()
                    .map(|f| format!("<span class=\"flag\">{}</span>", esc(f.text())))
                    .collect();
                let _ = write!(
                    out,
                    "<tr><td>#{}</td><td>{}</td><td>{}</td><td class=\"time\">{}</td><td class=\"time\">{}</td><td class=\"time\">{}</td><td class=\"time\">{}</td><td>{}</td></tr>",
                    k.id,
                    k.version.map_or("?".into(), |v| format!("v{v}")),
                    state_pill(k.state),
                    esc(&k.created_ms.map_or("—".into(), utc)),
                    esc(&k.retired_ms.map_or("—".into(), utc)),
                    esc(&k.destroyed_ms.map_or("—".into(), utc)),
                    esc(&k.active_ms.map_or("—".into(), duration)),
                    if flags.is_empty() {
                        "—".into()
                    } else {
                        flags
                    },
                );
            }
            out.push_str("</table>");
            lanes_html(&mut out, t, r);
            for k in &t.keys {
                key_html(&mut out, k);
            }
        }
        out.push_str("<h3 style=\"margin:16px 0 8px\">Tenant-level events (re-encryption jobs, shred requests and shreds)</h3>");
        events_table(&mut out, &t.events);
        out.push_str("</section>");
    }

    out.push_str("<h2 id=\"attempts\">Refused or failed key-lifecycle attempts</h2>");
    events_table(&mut out, &r.attempts);

    out.push_str("<h2 id=\"access\">Data access (counts only)</h2>");
    if r.data_access.is_empty() {
        out.push_str("<p class=\"empty\">None.</p>");
    } else {
        out.push_str("<table style=\"width:auto\"><tr><th>Tenant</th><th>Action</th><th>Succeeded</th><th>Refused / failed</th></tr>");
        for a in &r.data_access {
            let _ = write!(
                out,
                "<tr><td>{}</td><td><code>{}</code></td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                esc(a.tenant.as_deref().unwrap_or("(none)")),
                esc(&a.action),
                a.succeeded,
                a.refused
            );
        }
        out.push_str("</table>");
    }
    out.push_str("<footer>Times are UTC. “Covered by” names the first signed checkpoint at or after the entry: the entry is provably part of the chain that checkpoint signs. Data-access purposes and tokens are deliberately left out.</footer>");
    out.push_str("</main></body></html>\n");
    out
}

fn tenant_label(t: &str) -> &str {
    if t.is_empty() { "(unknown)" } else { t }
}

// ---------------------------------------------------------------- Markdown

/// Escapes text for a Markdown table cell or heading: pipes, backticks,
/// backslashes, angle brackets (no raw HTML) and brackets (no links);
/// newlines become spaces.
pub fn md(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '|' | '`' | '\\' | '<' | '>' | '[' | ']' | '*' | '_' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' | '\t' => out.push(' '),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

fn md_events(out: &mut String, events: &[Event]) {
    if events.is_empty() {
        out.push_str("None.\n\n");
        return;
    }
    out.push_str("| Time (UTC) | Action | What it means | Actor | Approvers | Reason | Outcome | Detail | Seq | Covered by |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for e in events {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            utc(e.time_ms),
            md(&e.action),
            md(&e.note),
            md(&e.actor),
            md(opt(&e.approvers)),
            md(opt(&e.reason)),
            md(&e.outcome),
            md(opt(&e.detail)),
            e.seq,
            md(&covering_text(e.covered_by)),
        );
    }
    out.push('\n');
}

pub fn render_markdown(r: &Report) -> String {
    let mut out = String::with_capacity(32 * 1024);
    out.push_str("# Key-lifecycle report\n\n");
    let _ = writeln!(
        out,
        "Generated {} · {} audit entries · {} signed checkpoints · data-key crypto-period {}\n",
        utc(r.generated_ms),
        r.entries,
        r.checkpoints,
        duration(r.crypto_period_ms)
    );
    match &r.banner {
        Banner::Verified(s) => {
            let _ = writeln!(
                out,
                "> **VERIFIED** — {}\n",
                md(s.strip_prefix("VERIFIED: ").unwrap_or(s))
            );
        }
        Banner::Failed(s) => {
            let _ = writeln!(out, "> **FAILED** — {}\n", md(s));
        }
        Banner::NotVerified => {
            out.push_str("> **not verified** — the hash chain and checkpoint signatures were not checked\n\n");
        }
    }
    out.push_str("## Flags\n\n");
    if r.flags.is_empty() {
        out.push_str("None.\n\n");
    } else {
        for f in &r.flags {
            let _ = writeln!(out, "- **{}**: {}", f.kind.text(), md(&flag_line(f)));
        }
        out.push('\n');
    }
    out.push_str("## KEK and vault-wide events\n\n");
    md_events(&mut out, &r.kek_events);
    for t in &r.tenants {
        let _ = writeln!(out, "## Tenant {}\n", md(tenant_label(&t.tenant)));
        if !t.keys.is_empty() {
            out.push_str("| Key | Version | State | Created | Decrypt-only since | Destroyed | Active for | Flags |\n");
            out.push_str("|---|---|---|---|---|---|---|---|\n");
            for k in &t.keys {
                let flags: Vec<&str> = k.flags.iter().map(|f| f.text()).collect();
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    k.id,
                    k.version.map_or("?".into(), |v| format!("v{v}")),
                    k.state.as_str(),
                    k.created_ms.map_or("—".into(), utc),
                    k.retired_ms.map_or("—".into(), utc),
                    k.destroyed_ms.map_or("—".into(), utc),
                    k.active_ms.map_or("—".into(), duration),
                    if flags.is_empty() {
                        "—".into()
                    } else {
                        format!("**{}**", flags.join(", "))
                    },
                );
            }
            out.push('\n');
        }
        for k in &t.keys {
            let _ = writeln!(
                out,
                "### {} — {}{}\n",
                key_name(k.id, k.version),
                k.state.as_str(),
                k.flags
                    .iter()
                    .map(|f| format!(" — **⚠ {}**", f.text()))
                    .collect::<String>()
            );
            out.push_str("| Time (UTC) | Event | State after | What it means | Actor | Approvers | Reason | Outcome | Seq | Covered by |\n");
            out.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
            for ke in &k.timeline {
                let e = &ke.event;
                let _ = writeln!(
                    out,
                    "| {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} |",
                    utc(e.time_ms),
                    md(ke.kind.label()),
                    md(&e.action),
                    ke.state_after.as_str(),
                    md(&e.note),
                    md(&e.actor),
                    md(opt(&e.approvers)),
                    md(opt(&e.reason)),
                    md(&e.outcome),
                    e.seq,
                    md(&covering_text(e.covered_by)),
                );
            }
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "#### Tenant-level events for {}\n",
            md(tenant_label(&t.tenant))
        );
        md_events(&mut out, &t.events);
    }
    out.push_str("## Refused or failed key-lifecycle attempts\n\n");
    md_events(&mut out, &r.attempts);
    out.push_str("## Data access (counts only)\n\n");
    if r.data_access.is_empty() {
        out.push_str("None.\n");
    } else {
        out.push_str("| Tenant | Action | Succeeded | Refused / failed |\n|---|---|---|---|\n");
        for a in &r.data_access {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                md(a.tenant.as_deref().unwrap_or("(none)")),
                md(&a.action),
                a.succeeded,
                a.refused
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::audit::verify::Problem;
    use crate::domain::token::Token;

    /// 2026-01-01 00:00:00Z.
    const T0: i64 = 1_767_225_600_000;
    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;

    fn rec(seq: u64, time_ms: i64, actor: &str, action: AuditAction) -> AuditRecord {
        AuditRecord {
            seq,
            time_ms,
            actor: actor.into(),
            tenant: None,
            action: action.as_str().into(),
            token: None,
            outcome: "success".into(),
            peer: None,
            purpose: None,
            detail: None,
            key_id: None,
            key_version: None,
            reason: None,
            approvers: None,
            entry_hash: None,
            chain_hash: None,
        }
    }

    fn keyed(mut r: AuditRecord, tenant: &str, id: u32, version: u32) -> AuditRecord {
        r.tenant = Some(tenant.into());
        r.key_id = Some(id);
        r.key_version = Some(version);
        r
    }

    fn with(mut r: AuditRecord, detail: &str, reason: &str) -> AuditRecord {
        r.detail = Some(detail.into());
        r.reason = Some(reason.into());
        r
    }

    fn access(seq: u64, time_ms: i64, tenant: &str, action: AuditAction) -> AuditRecord {
        let mut r = rec(seq, time_ms, "app-checkout", action);
        r.tenant = Some(tenant.into());
        r.token = Some(Token::generate(1).unwrap());
        r.purpose = Some("SECRET-PURPOSE-refund-4711".into());
        r
    }

    /// acme: key 1 (v1) created at T0+1h, rotated at T0+100d to key 3
    /// (v2), destroyed by a single admin; globex: key 2 (v1) created at
    /// T0+50d, shredded at T0+102d with dual control. KEK rotated at
    /// T0+101d, when keys 2 and 3 were alive.
    fn scenario() -> (Vec<AuditRecord>, Vec<Checkpoint>) {
        use AuditAction as A;
        let mut v = vec![
            with(rec(1, T0, "system", A::KekInit), "kek=local:aaaa", ""),
            with(
                rec(2, T0 + 1000, "system", A::AuditKeyCreate),
                "key=ed25519:ff kek=local:aaaa",
                "",
            ),
            with(
                keyed(rec(3, T0 + HOUR, "system", A::DekCreate), "acme", 1, 1),
                "kek=local:aaaa",
                "first use of tenant",
            ),
            access(4, T0 + 2 * HOUR, "acme", A::Tokenize),
            access(5, T0 + 3 * HOUR, "acme", A::Detokenize),
            with(
                keyed(
                    rec(6, T0 + 50 * DAY, "system", A::DekCreate),
                    "globex",
                    2,
                    1,
                ),
                "kek=local:aaaa",
                "first use of tenant",
            ),
            with(
                keyed(
                    rec(7, T0 + 100 * DAY, "admin-alice", A::DekRotate),
                    "acme",
                    3,
                    2,
                ),
                "retired dek_id=1 version=1 after 12 encryptions; kek=local:aaaa",
                "<script>alert(1)</script>",
            ),
            with(
                rec(8, T0 + 100 * DAY + HOUR, "admin-alice", A::ReencryptStart),
                "tokens_to_move=12",
                "move off v1",
            ),
            with(
                rec(9, T0 + 100 * DAY + 2 * HOUR, "system", A::ReencryptComplete),
                "job=1 moved=12 of 12 passes=1",
                "",
            ),
            with(
                keyed(
                    rec(10, T0 + 100 * DAY + 3 * HOUR, "admin-alice", A::DekDestroy),
                    "acme",
                    1,
                    1,
                ),
                "",
                "v1 no longer referenced",
            ),
            with(
                rec(11, T0 + 101 * DAY, "admin-alice", A::KekRotate),
                "from=local:aaaa to=local:bbbb rewrapped_deks=2",
                "annual KEK rotation",
            ),
            with(
                rec(12, T0 + 102 * DAY, "admin-bob", A::ShredRequest),
                "request_id=77",
                "contract ended",
            ),
            with(
                rec(13, T0 + 102 * DAY + HOUR, "admin-bob", A::TenantShred),
                "request_id=77 destroyed dek_ids=[2]",
                "contract ended",
            ),
            with(
                rec(14, T0 + 103 * DAY, "mallory", A::DekDestroy),
                "permission denied: role app cannot manage keys",
                "cleanup",
            ),
            access(15, T0 + 104 * DAY, "acme", A::Tokenize),
        ];
        for r in &mut v[7..9] {
            r.tenant = Some("acme".into());
        }
        v[8].reason = None;
        v[9].detail = None;
        v[11].tenant = Some("globex".into());
        v[12].tenant = Some("globex".into());
        v[12].approvers = Some("admin-carol".into());
        v[13].key_id = Some(3);
        v[13].outcome = "denied".into();
        let cp = |seq, time_ms| Checkpoint {
            seq,
            chain_hash: [0; 32],
            time_ms,
            signature: vec![],
            key_id: "ed25519:ff".into(),
        };
        (
            v,
            vec![
                cp(10, T0 + 101 * DAY - HOUR),
                cp(2, T0 + 2000),
                cp(13, T0 + 103 * DAY - HOUR),
            ],
        )
    }

    fn report(verdict: Option<&Verdict>) -> Report {
        let (entries, checkpoints) = scenario();
        build(&ReportInput {
            entries: &entries,
            checkpoints: &checkpoints,
            verdict,
            crypto_period_ms: 90 * DAY,
            generated_ms: T0 + 120 * DAY,
        })
    }

    fn kinds(k: &KeyReport) -> Vec<(KeyEventKind, KeyState, u64)> {
        k.timeline
            .iter()
            .map(|e| (e.kind, e.state_after, e.event.seq))
            .collect()
    }

    #[test]
    fn every_key_event_lands_on_the_right_key() {
        use KeyEventKind as K;
        use KeyState as S;
        let r = report(None);
        assert_eq!(
            r.tenants
                .iter()
                .map(|t| t.tenant.as_str())
                .collect::<Vec<_>>(),
            ["acme", "globex"]
        );
        let acme = r.tenant("acme").unwrap();
        assert_eq!(
            acme.keys
                .iter()
                .map(|k| (k.id, k.version))
                .collect::<Vec<_>>(),
            [(1, Some(1)), (3, Some(2))]
        );
        let k1 = r.key(1).unwrap();
        assert_eq!(
            kinds(k1),
            [
                (K::Created, S::Active, 3),
                (K::Retired, S::DecryptOnly, 7),
                (K::ReencryptStart, S::DecryptOnly, 8),
                (K::ReencryptComplete, S::DecryptOnly, 9),
                (K::Destroyed, S::Destroyed, 10),
            ]
        );
        assert_eq!(k1.state, S::Destroyed);
        assert_eq!(k1.created_ms, Some(T0 + HOUR));
        assert_eq!(k1.retired_ms, Some(T0 + 100 * DAY));
        assert_eq!(k1.destroyed_ms, Some(T0 + 100 * DAY + 3 * HOUR));
        assert_eq!(k1.active_ms, Some(100 * DAY - HOUR));
        assert!(k1.timeline[1].event.note.contains("replaced by key 3"));
        assert!(k1.timeline[1].event.note.contains("12 encryptions"));
        assert!(k1.timeline[3].event.note.contains("moved 12 of 12"));

        let k3 = r.key(3).unwrap();
        assert_eq!(
            kinds(k3),
            [
                (K::Activated, S::Active, 7),
                (K::Rewrapped, S::Active, 11),
                (K::Attempt, S::Active, 14),
            ]
        );
        assert_eq!(k3.active_ms, Some(20 * DAY));
        assert_eq!(k3.tenant, "acme");

        let k2 = r.key(2).unwrap();
        assert_eq!(k2.tenant, "globex");
        assert_eq!(
            kinds(k2),
            [
                (K::Created, S::Active, 6),
                (K::Rewrapped, S::Active, 11),
                (K::Shredded, S::Destroyed, 13),
            ]
        );
        // Key 1 was already destroyed when the KEK rotated: not re-wrapped.
        assert!(!k1.timeline.iter().any(|e| e.kind == K::Rewrapped));

        let globex = r.tenant("globex").unwrap();
        assert_eq!(
            globex.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [12, 13]
        );
        assert_eq!(
            acme.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [8, 9]
        );
        assert_eq!(
            r.kek_events
                .iter()
                .map(|e| e.action.as_str())
                .collect::<Vec<_>>(),
            ["kek_init", "audit_key_create", "kek_rotate"]
        );
        assert!(r.kek_events[2].note.contains("log accounts for 2"));
        // The denied destroy is an attempt, and changed nothing.
        assert_eq!(
            r.attempts
                .iter()
                .map(|e| (e.seq, e.outcome.as_str()))
                .collect::<Vec<_>>(),
            [(14, "denied")]
        );
        // Data access is counted, never itemised.
        assert_eq!(
            r.data_access,
            [
                AccessCount {
                    tenant: Some("acme".into()),
                    action: "detokenize".into(),
                    succeeded: 1,
                    refused: 0
                },
                AccessCount {
                    tenant: Some("acme".into()),
                    action: "tokenize".into(),
                    succeeded: 2,
                    refused: 0
                },
            ]
        );
        assert_eq!(r.entries, 15);
        assert_eq!(r.uncovered, 2);
    }

    #[test]
    fn crypto_period_flag_fires_for_the_old_key_only() {
        let r = report(None);
        let k1 = r.key(1).unwrap();
        assert!(k1.flags.contains(&FlagKind::OutlivedCryptoPeriod));
        assert!(
            !r.key(3)
                .unwrap()
                .flags
                .contains(&FlagKind::OutlivedCryptoPeriod)
        );
        assert!(
            !r.key(2)
                .unwrap()
                .flags
                .contains(&FlagKind::OutlivedCryptoPeriod)
        );
        let period: Vec<_> = r
            .flags
            .iter()
            .filter(|f| f.kind == FlagKind::OutlivedCryptoPeriod)
            .collect();
        assert_eq!(period.len(), 1);
        assert_eq!((period[0].tenant.as_str(), period[0].key_id), ("acme", 1));

        // Still active and past its period: aged up to generated_ms.
        let (entries, cps) = scenario();
        let r = build(&ReportInput {
            entries: &entries,
            checkpoints: &cps,
            verdict: None,
            crypto_period_ms: 10 * DAY,
            generated_ms: T0 + 120 * DAY,
        });
        assert!(
            r.key(3)
                .unwrap()
                .flags
                .contains(&FlagKind::OutlivedCryptoPeriod)
        );
        let r = build(&ReportInput {
            entries: &entries,
            checkpoints: &cps,
            verdict: None,
            crypto_period_ms: 10 * DAY,
            generated_ms: T0 + 105 * DAY,
        });
        assert!(
            !r.key(3)
                .unwrap()
                .flags
                .contains(&FlagKind::OutlivedCryptoPeriod)
        );
    }

    #[test]
    fn dual_control_flag_fires_for_a_lone_dek_destroy() {
        let r = report(None);
        assert!(
            r.key(1)
                .unwrap()
                .flags
                .contains(&FlagKind::DestroyedWithoutDualControl)
        );
        // The shred had a second administrator.
        assert!(
            !r.key(2)
                .unwrap()
                .flags
                .contains(&FlagKind::DestroyedWithoutDualControl)
        );
        let dc: Vec<_> = r
            .flags
            .iter()
            .filter(|f| f.kind == FlagKind::DestroyedWithoutDualControl)
            .collect();
        assert_eq!(dc.len(), 1);
        assert_eq!((dc[0].key_id, dc[0].seq), (1, Some(10)));

        // A shred without approvers, or approved by its own actor, is flagged.
        for approvers in [None, Some("admin-bob")] {
            let (mut entries, cps) = scenario();
            entries[12].approvers = approvers.map(str::to_owned);
            let r = build(&ReportInput {
                entries: &entries,
                checkpoints: &cps,
                verdict: None,
                crypto_period_ms: 90 * DAY,
                generated_ms: T0 + 120 * DAY,
            });
            assert!(
                r.key(2)
                    .unwrap()
                    .flags
                    .contains(&FlagKind::DestroyedWithoutDualControl)
            );
        }
    }

    #[test]
    fn each_event_maps_to_its_covering_checkpoint() {
        let r = report(None);
        let k1 = r.key(1).unwrap();
        let cov: Vec<_> = k1
            .timeline
            .iter()
            .map(|e| e.event.covered_by.map(|c| c.seq))
            .collect();
        assert_eq!(cov, [Some(10); 5]);
        assert_eq!(r.kek_events[0].covered_by.map(|c| c.seq), Some(2));
        assert_eq!(r.kek_events[1].covered_by.map(|c| c.seq), Some(2));
        assert_eq!(r.kek_events[2].covered_by.map(|c| c.seq), Some(13));
        assert_eq!(r.attempts[0].covered_by, None);
        assert_eq!(
            covering_text(r.kek_events[0].covered_by),
            "checkpoint #2 (2026-01-01 00:00:02Z)"
        );
        assert_eq!(covering_text(None), "not yet covered by a checkpoint");
        let md = render_markdown(&r);
        assert!(md.contains("not yet covered by a checkpoint"));
        assert!(md.contains("checkpoint #13 (2026-04-13 23:00:00Z)"));
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(utc(T0), "2026-01-01 00:00:00Z");
        assert_eq!(utc(1_795_574_574_000), "2026-11-25 02:42:54Z");
        assert_eq!(duration(100 * DAY - HOUR), "99d 23h");
        assert_eq!(duration(90 * 60_000), "1h 30m");
    }

    #[test]
    fn html_escapes_everything_from_the_log() {
        let (mut entries, cps) = scenario();
        entries[0].actor = "\"><img src=x onerror=alert(2)>".into();
        entries[12].approvers = Some("admin-carol<b>".into());
        entries[6].tenant = Some("acme".into());
        let r = build(&ReportInput {
            entries: &entries,
            checkpoints: &cps,
            verdict: None,
            crypto_period_ms: 90 * DAY,
            generated_ms: T0 + 120 * DAY,
        });
        let html = render_html(&r);
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!html.contains("<script"));
        assert!(!html.contains("<img"));
        assert!(html.contains("&quot;&gt;&lt;img src=x onerror=alert(2)&gt;"));
        assert!(html.contains("admin-carol&lt;b&gt;"));
        assert!(!html.contains("SECRET-PURPOSE"));
        for a in &entries {
            if let Some(t) = a.token {
                assert!(!html.contains(&t.to_string()));
            }
        }
        for needle in [
            "outlived its crypto-period",
            "destroyed without dual control",
            "decrypt-only",
            "not yet covered by a checkpoint",
            "not verified",
            "Tenant acme",
            "Tenant globex",
        ] {
            assert!(html.contains(needle), "missing {needle}");
        }
        assert!(!html.contains("http://") && !html.contains("https://"));
    }

    #[test]
    fn banner_follows_the_verdict() {
        let ok = Verdict {
            first_seq: 1,
            entries: 15,
            checkpoints: 3,
            covered_to: Some(13),
            problem: None,
        };
        let html = render_html(&report(Some(&ok)));
        assert!(html.contains("banner ok"));
        assert!(html.contains("VERIFIED</span>15 entries (seq 1..15)"));
        let bad = Verdict {
            first_seq: 1,
            entries: 6,
            checkpoints: 0,
            covered_to: None,
            problem: Some(Problem {
                seq: Some(7),
                line: Some(8),
                what: "entry hash <mismatch>".into(),
            }),
        };
        let r = report(Some(&bad));
        assert!(matches!(r.banner, Banner::Failed(_)));
        let html = render_html(&r);
        assert!(html.contains("banner bad"));
        assert!(html.contains("FAILED</span>at seq 7 (line 8): entry hash &lt;mismatch&gt;"));
        assert!(render_markdown(&r).contains("**FAILED**"));
    }

    #[test]
    fn markdown_has_the_tables_and_escapes_cells() {
        let (mut entries, cps) = scenario();
        entries[6].reason = Some("a|b `rm -rf` <script>".into());
        let r = build(&ReportInput {
            entries: &entries,
            checkpoints: &cps,
            verdict: None,
            crypto_period_ms: 90 * DAY,
            generated_ms: T0 + 120 * DAY,
        });
        let md = render_markdown(&r);
        assert!(md.contains("## Tenant acme"));
        assert!(md.contains("## Tenant globex"));
        assert!(md.contains("| Key | Version | State | Created |"));
        assert!(md.contains("| Time (UTC) | Event | State after |"));
        assert!(md.contains("| Tenant | Action | Succeeded | Refused / failed |"));
        assert!(md.contains("## Refused or failed key-lifecycle attempts"));
        assert!(md.contains("a\\|b \\`rm -rf\\` \\<script\\>"));
        assert!(!md.contains("a|b"));
        assert!(!md.contains("SECRET-PURPOSE"));
        assert!(md.contains("**outlived its crypto-period**"));
        assert!(md.contains("**destroyed without dual control**"));
        // Every table row has as many cells as its header.
        for block in md.split("\n\n") {
            let rows: Vec<&str> = block.lines().filter(|l| l.starts_with('|')).collect();
            if let Some(head) = rows.first() {
                let cells = |l: &str| l.replace("\\|", "").matches('|').count();
                for row in &rows {
                    assert_eq!(cells(row), cells(head), "{row}");
                }
            }
        }
    }

    #[test]
    fn reencrypt_fail_without_tenant_goes_to_the_running_job() {
        let (mut entries, cps) = scenario();
        entries[8].action = "reencrypt_fail".into();
        entries[8].tenant = None;
        entries[8].detail = Some("job=1 error=storage unavailable".into());
        let r = build(&ReportInput {
            entries: &entries,
            checkpoints: &cps,
            verdict: None,
            crypto_period_ms: 90 * DAY,
            generated_ms: T0 + 120 * DAY,
        });
        let acme = r.tenant("acme").unwrap();
        assert_eq!(acme.events[1].action, "reencrypt_fail");
        assert!(acme.events[1].note.contains("failed: storage unavailable"));
        assert!(
            r.key(1)
                .unwrap()
                .timeline
                .iter()
                .any(|e| e.kind == KeyEventKind::ReencryptFail)
        );
        assert!(r.attempts.iter().any(|e| e.seq == 9));
    }
}
