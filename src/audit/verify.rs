//! Offline verification of an exported audit log with nothing but the export
//! and the vault's public key: recomputes every entry hash and chain link
//! from the entries' fields, and checks every checkpoint's signature and
//! that the recomputed head at its sequence number equals the signed one.
//!
//! What each kind of tampering looks like:
//! - a field edited → the entry's recomputed hash differs from the one
//!   recorded with it; if the recorded hashes were recomputed too, the next
//!   signed checkpoint's head differs;
//! - a row deleted, inserted or two rows swapped → a sequence gap, repeat or
//!   disorder, or a broken link;
//! - the tail cut off → a signed checkpoint covers a sequence number the log
//!   no longer reaches (only if a checkpoint after the cut survives: an
//!   auditor should keep the last checkpoint they saw, see SECURITY.md);
//! - a signature replaced, or the wrong public key → the signature fails.

use std::io::BufRead;

use super::chain::{Entry, GENESIS, Hash, link};
use super::export::{Line, hash_from_hex};
use super::signer::verify_checkpoint;
use crate::domain::audit::{AuditRecord, Checkpoint};

/// The first problem found: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The first sequence number that cannot be trusted, where known.
    pub seq: Option<u64>,
    /// The export line (1-based), where the input was a file.
    pub line: Option<usize>,
    pub what: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub entries: u64,
    pub checkpoints: u64,
    /// The highest sequence number a valid checkpoint covers.
    pub covered_to: Option<u64>,
    pub problem: Option<Problem>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }

    /// One human-readable summary line.
    pub fn summary(&self) -> String {
        match &self.problem {
            None => {
                let covered = self.covered_to.unwrap_or(0);
                let tail = self.entries.saturating_sub(covered);
                let mut s = format!(
                    "VERIFIED: {} entries (seq 1..{}), {} signed checkpoints",
                    self.entries, self.entries, self.checkpoints
                );
                match self.covered_to {
                    Some(c) => s.push_str(&format!(", the last covering seq {c}")),
                    None => s.push_str(
                        "; WARNING: no signed checkpoint, so only internal consistency is proven",
                    ),
                }
                if tail > 0 && self.covered_to.is_some() {
                    s.push_str(&format!(
                        "; {tail} newer entries are chained but not yet covered by a checkpoint"
                    ));
                }
                s
            }
            Some(p) => {
                let at = match (p.seq, p.line) {
                    (Some(s), Some(l)) => format!(" at seq {s} (line {l})"),
                    (Some(s), None) => format!(" at seq {s}"),
                    (None, Some(l)) => format!(" at line {l}"),
                    (None, None) => String::new(),
                };
                format!("FAILED{at}: {}", p.what)
            }
        }
    }
}

/// Streaming verifier state.
struct Verifier<'a> {
    public: &'a [u8; 32],
    /// heads[n] = chain head after entry n (heads[0] = genesis).
    heads: Vec<Hash>,
    checkpoints: Vec<(Checkpoint, Option<usize>)>,
}

impl<'a> Verifier<'a> {
    fn new(public: &'a [u8; 32]) -> Self {
        Self {
            public,
            heads: vec![GENESIS],
            checkpoints: Vec::new(),
        }
    }

    fn last_seq(&self) -> u64 {
        (self.heads.len() - 1) as u64
    }

    fn entry(&mut self, r: &AuditRecord, line: Option<usize>) -> Result<(), Problem> {
        let expected = self.last_seq() + 1;
        let fail = |seq, what: String| Problem {
            seq: Some(seq),
            line,
            what,
        };
        if r.seq != expected {
            let what = if r.seq > expected {
                format!(
                    "sequence gap: expected seq {expected}, found {} (entries removed)",
                    r.seq
                )
            } else {
                format!(
                    "sequence out of order: seq {} after seq {} (entries inserted, repeated or reordered)",
                    r.seq,
                    expected - 1
                )
            };
            return Err(fail(expected, what));
        }
        let eh = Entry::of_record(r).hash();
        if r.entry_hash.is_some_and(|h| h != eh) {
            return Err(fail(
                r.seq,
                "entry contents do not match the hash recorded with it (a field was altered)"
                    .into(),
            ));
        }
        let prev = self.heads[self.heads.len() - 1];
        let head = link(&prev, &eh);
        if r.chain_hash.is_some_and(|h| h != head) {
            return Err(fail(
                r.seq,
                "chain link broken (an entry before this one was altered, inserted or removed)"
                    .into(),
            ));
        }
        self.heads.push(head);
        Ok(())
    }

    fn finish(self, entries: u64) -> Verdict {
        let mut covered_to = None;
        let mut problems = Vec::new();
        let mut cps = self.checkpoints;
        cps.sort_by_key(|(c, _)| c.seq);
        let mut prev_cp = 0;
        for (c, line) in &cps {
            if !verify_checkpoint(self.public, c.seq, &c.chain_hash, c.time_ms, &c.signature) {
                problems.push(Problem {
                    seq: Some(c.seq),
                    line: *line,
                    what: format!(
                        "checkpoint at seq {} has an invalid signature (signature replaced, checkpoint forged, or wrong public key)",
                        c.seq
                    ),
                });
                continue;
            }
            let Some(head) = usize::try_from(c.seq).ok().and_then(|i| self.heads.get(i)) else {
                problems.push(Problem {
                    seq: Some(entries + 1),
                    line: *line,
                    what: format!(
                        "log truncated: a signed checkpoint covers seq {}, but the log ends at seq {entries}",
                        c.seq
                    ),
                });
                continue;
            };
            if *head != c.chain_hash {
                problems.push(Problem {
                    seq: Some(prev_cp + 1),
                    line: *line,
                    what: format!(
                        "chain head at seq {} differs from the signed checkpoint: entries between seq {} and {} were altered",
                        c.seq,
                        prev_cp + 1,
                        c.seq
                    ),
                });
                continue;
            }
            prev_cp = c.seq;
            covered_to = Some(c.seq);
        }
        problems.sort_by_key(|p| p.seq.unwrap_or(u64::MAX));
        Verdict {
            entries,
            checkpoints: cps.len() as u64,
            covered_to,
            problem: problems.into_iter().next(),
        }
    }
}

/// Verifies an export read line by line.
pub fn verify_export(input: impl BufRead, public: &[u8; 32]) -> Verdict {
    let mut v = Verifier::new(public);
    let mut entries = 0u64;
    let fail = |line: usize, seq: Option<u64>, what: String, entries: u64| Verdict {
        entries,
        checkpoints: 0,
        covered_to: None,
        problem: Some(Problem {
            seq,
            line: Some(line),
            what,
        }),
    };
    for (i, text) in input.lines().enumerate() {
        let n = i + 1;
        let text = match text {
            Ok(t) => t,
            Err(e) => return fail(n, None, format!("cannot read: {e}"), entries),
        };
        if text.trim().is_empty() {
            continue;
        }
        let line: Line = match serde_json::from_str(&text) {
            Ok(l) => l,
            Err(e) => return fail(n, None, format!("not an export line: {e}"), entries),
        };
        match line {
            Line::Header(h) => {
                if h.format != super::export::FORMAT || h.version != super::export::VERSION {
                    return fail(n, None, "unknown export format or version".into(), entries);
                }
            }
            Line::Entry(e) => {
                let rec = match e.record() {
                    Ok(r) => r,
                    Err(what) => return fail(n, Some(e.seq), what, entries),
                };
                if rec.entry_hash.is_none() || rec.chain_hash.is_none() {
                    return fail(
                        n,
                        Some(e.seq),
                        "entry lacks its recorded hashes".into(),
                        entries,
                    );
                }
                if let Err(p) = v.entry(&rec, Some(n)) {
                    return Verdict {
                        entries,
                        checkpoints: 0,
                        covered_to: None,
                        problem: Some(p),
                    };
                }
                entries += 1;
            }
            Line::Checkpoint(c) => match c.checkpoint() {
                Ok(cp) => v.checkpoints.push((cp, Some(n))),
                Err(what) => return fail(n, Some(c.seq), what.to_string(), entries),
            },
        }
    }
    v.finish(entries)
}

/// Verifies records and checkpoints read straight from a database.
pub fn verify_records(
    entries: &[AuditRecord],
    checkpoints: &[Checkpoint],
    public: &[u8; 32],
) -> Verdict {
    let mut v = Verifier::new(public);
    for (i, r) in entries.iter().enumerate() {
        if let Err(p) = v.entry(r, None) {
            return Verdict {
                entries: i as u64,
                checkpoints: 0,
                covered_to: None,
                problem: Some(p),
            };
        }
    }
    v.checkpoints = checkpoints.iter().cloned().map(|c| (c, None)).collect();
    v.finish(entries.len() as u64)
}

/// Recomputes the chain over records as stored (for tests and migration).
pub fn chain_of(entries: &[AuditRecord]) -> Vec<(Hash, Hash)> {
    let mut prev = GENESIS;
    entries
        .iter()
        .map(|r| {
            let eh = Entry::of_record(r).hash();
            prev = link(&prev, &eh);
            (eh, prev)
        })
        .collect()
}

/// Parses a stored hash column.
pub fn parse_hash(s: &str) -> Option<Hash> {
    hash_from_hex(s)
}
