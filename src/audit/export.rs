//! The export format: JSON Lines. A header, then every entry in sequence
//! order, each followed by the checkpoints that cover exactly it; a
//! checkpoint is signed over `(seq, chain head, time)`. The format carries
//! the stored hashes, but a verifier recomputes everything from the fields.
//!
//! ```text
//! {"type":"header","format":"tokenvault-audit-export","version":1,...}
//! {"type":"entry","seq":1,"time_ms":...,"actor":"...","action":"kek_init",...,"entry_hash":"…","chain_hash":"…"}
//! {"type":"checkpoint","seq":1,"chain_hash":"…","time_ms":...,"signature":"…","key_id":"ed25519:…"}
//! ```

use serde::{Deserialize, Serialize};

use crate::domain::audit::{AuditRecord, Checkpoint};
use crate::domain::token::Token;

pub const FORMAT: &str = "tokenvault-audit-export";
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    Header(Header),
    Entry(Box<EntryLine>),
    Checkpoint(CheckpointLine),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub exported_ms: i64,
    /// The signing key the vault uses now (informational: a verifier takes
    /// the public key from its own trusted copy, never from the export).
    pub public_key_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryLine {
    pub seq: u64,
    pub time_ms: i64,
    pub actor: String,
    pub tenant: Option<String>,
    pub action: String,
    pub token: Option<String>,
    pub outcome: String,
    pub peer: Option<String>,
    pub purpose: Option<String>,
    pub detail: Option<String>,
    pub key_id: Option<u32>,
    pub key_version: Option<u32>,
    pub reason: Option<String>,
    pub approvers: Option<String>,
    pub entry_hash: String,
    pub chain_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointLine {
    pub seq: u64,
    pub chain_hash: String,
    pub time_ms: i64,
    pub signature: String,
    pub key_id: String,
}

fn hx(h: Option<[u8; 32]>) -> String {
    h.map(hex::encode).unwrap_or_default()
}

pub fn hash_from_hex(s: &str) -> Option<[u8; 32]> {
    let v = hex::decode(s).ok()?;
    v.try_into().ok()
}

impl EntryLine {
    pub fn of(r: &AuditRecord) -> Self {
        Self {
            seq: r.seq,
            time_ms: r.time_ms,
            actor: r.actor.clone(),
            tenant: r.tenant.clone(),
            action: r.action.clone(),
            token: r.token.map(|t| t.to_string()),
            outcome: r.outcome.clone(),
            peer: r.peer.clone(),
            purpose: r.purpose.clone(),
            detail: r.detail.clone(),
            key_id: r.key_id,
            key_version: r.key_version,
            reason: r.reason.clone(),
            approvers: r.approvers.clone(),
            entry_hash: hx(r.entry_hash),
            chain_hash: hx(r.chain_hash),
        }
    }

    /// Back to a record. A token that does not parse is an error: the
    /// chain covers its raw bytes.
    pub fn record(&self) -> Result<AuditRecord, String> {
        let token = match &self.token {
            None => None,
            Some(t) => Some(Token::parse(t).map_err(|_| "malformed token".to_string())?),
        };
        Ok(AuditRecord {
            seq: self.seq,
            time_ms: self.time_ms,
            actor: self.actor.clone(),
            tenant: self.tenant.clone(),
            action: self.action.clone(),
            token,
            outcome: self.outcome.clone(),
            peer: self.peer.clone(),
            purpose: self.purpose.clone(),
            detail: self.detail.clone(),
            key_id: self.key_id,
            key_version: self.key_version,
            reason: self.reason.clone(),
            approvers: self.approvers.clone(),
            entry_hash: hash_from_hex(&self.entry_hash),
            chain_hash: hash_from_hex(&self.chain_hash),
        })
    }
}

impl CheckpointLine {
    pub fn of(c: &Checkpoint) -> Self {
        Self {
            seq: c.seq,
            chain_hash: hex::encode(c.chain_hash),
            time_ms: c.time_ms,
            signature: hex::encode(&c.signature),
            key_id: c.key_id.clone(),
        }
    }

    pub fn checkpoint(&self) -> Result<Checkpoint, String> {
        Ok(Checkpoint {
            seq: self.seq,
            chain_hash: hash_from_hex(&self.chain_hash).ok_or("malformed chain hash")?,
            time_ms: self.time_ms,
            signature: hex::decode(&self.signature).map_err(|_| "malformed signature")?,
            key_id: self.key_id.clone(),
        })
    }
}

pub fn header(exported_ms: i64, public_key_id: Option<String>) -> Line {
    Line::Header(Header {
        format: FORMAT.into(),
        version: VERSION,
        exported_ms,
        public_key_id,
    })
}

/// Writes one line (JSON + newline).
pub fn write_line(out: &mut impl std::io::Write, line: &Line) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, line)?;
    out.write_all(b"\n")
}

/// Interleaves entries (in seq order) with the checkpoints covering them;
/// checkpoints beyond the last entry come last.
pub fn interleave(entries: &[AuditRecord], checkpoints: &[Checkpoint]) -> Vec<Line> {
    let mut cps: Vec<&Checkpoint> = checkpoints.iter().collect();
    cps.sort_by_key(|c| c.seq);
    let mut out = Vec::with_capacity(entries.len() + cps.len());
    let mut i = 0;
    for e in entries {
        out.push(Line::Entry(Box::new(EntryLine::of(e))));
        while i < cps.len() && cps[i].seq <= e.seq {
            out.push(Line::Checkpoint(CheckpointLine::of(cps[i])));
            i += 1;
        }
    }
    out.extend(
        cps[i..]
            .iter()
            .map(|c| Line::Checkpoint(CheckpointLine::of(c))),
    );
    out
}
