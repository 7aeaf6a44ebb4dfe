//! The builder behind [`super::build`]: reads the log entry by entry.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::*;
use crate::domain::audit::{AuditAction, AuditRecord};

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

pub(super) struct Builder {
    pub(super) checkpoints: Vec<Covering>,
    pub(super) keys: BTreeMap<u32, KeyReport>,
    pub(super) tenant_events: BTreeMap<String, Vec<Event>>,
    pub(super) kek_events: Vec<Event>,
    pub(super) attempts: Vec<Event>,
    pub(super) access: BTreeMap<(Option<String>, String), (u64, u64)>,
    pub(super) flags: Vec<Flag>,
    /// Tenants with a re-encryption job started and not yet finished, in
    /// start order, to attribute a `reencrypt_fail` that names no tenant.
    pub(super) open_jobs: Vec<String>,
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

    pub(super) fn record(&mut self, r: &AuditRecord) {
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
            AuditAction::Restore => {
                let ids = id_list(&detail);
                let list: Vec<String> = ids.iter().map(u32::to_string).collect();
                ev.note = format!(
                    "database restored from a backup ({}); {} retired [{}]",
                    field(&detail, "backup").unwrap_or("?"),
                    plural(ids.len() as u64, "active key", "active keys"),
                    list.join(", ")
                );
                for id in &ids {
                    let mut kev = ev.clone();
                    kev.key_id = Some(*id);
                    kev.key_version = self.keys.get(id).and_then(|s| s.version);
                    kev.tenant = self.keys.get(id).map(|s| s.tenant.clone());
                    kev.note = "retired: the database was restored from a backup".into();
                    let k = self.key(*id, kev.key_version, kev.tenant.as_deref());
                    if k.retired_ms.is_none() {
                        k.retired_ms = Some(ev.time_ms);
                    }
                    self.push_key_event(*id, KeyEventKind::Retired, KeyState::DecryptOnly, &kev);
                }
                self.kek_events.push(ev);
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
            // Data access and reads were handled above.
            AuditAction::Tokenize
            | AuditAction::Detokenize
            | AuditAction::GetMetadata
            | AuditAction::DeleteToken
            | AuditAction::AuditRead
            | AuditAction::KeyRead => {}
        }
    }
}
