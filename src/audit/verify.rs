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
    /// The first sequence number checked (1, or the anchor's next).
    pub first_seq: u64,
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
                // Entries after the last covered sequence number (the export
                // may start past seq 1, from an anchor).
                let last = (self.first_seq + self.entries).saturating_sub(1);
                let tail = last.saturating_sub(self.covered_to.unwrap_or(0));
                let mut s = format!(
                    "VERIFIED: {} entries (seq {}..{}), {} signed checkpoints",
                    self.entries,
                    self.first_seq,
                    (self.first_seq + self.entries).saturating_sub(1),
                    self.checkpoints
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

/// What the verifier trusts besides the public key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Start after this trusted point (seq, chain head) instead of the
    /// genesis: for exports that begin after seq 1.
    pub anchor: Option<(u64, Hash)>,
    /// Checkpoints the auditor saw earlier (seq, head): the log must reach
    /// each and have that head there. This catches a rewritten or truncated
    /// log that was re-signed or had its later checkpoints removed.
    pub expect: Vec<(u64, Hash)>,
    /// Accept a log no signed checkpoint covers (integrity then rests on
    /// internal consistency alone). Implies `allow_unsigned_tail`.
    pub allow_unsigned: bool,
    /// Accept entries after the last signed checkpoint (or pin) on internal
    /// consistency alone, as a live database's newest entries are. An
    /// export ends on a checkpoint, so by default a tail nothing signed
    /// fails: whoever strips the last checkpoint could have rewritten it.
    pub allow_unsigned_tail: bool,
}

/// Parses `SEQ:HEXHEAD`, as printed by `vault audit checkpoint`.
pub fn parse_point(s: &str) -> Result<(u64, Hash), String> {
    let (seq, head) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not SEQ:HEAD"))?;
    // Audit sequence numbers are SQLite integers: at most i64::MAX, which
    // also keeps every sum the verifier makes from them in range.
    let seq = seq
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|n| i64::try_from(*n).is_ok())
        .ok_or_else(|| format!("{s:?}: bad sequence number"))?;
    let head =
        hash_from_hex(head.trim()).ok_or_else(|| format!("{s:?}: head is not 64 hex digits"))?;
    Ok((seq, head))
}

/// Streaming verifier state.
struct Verifier<'a> {
    public: &'a [u8; 32],
    opts: &'a Options,
    /// The sequence number `heads[0]` belongs to (0 = genesis).
    base: u64,
    /// heads[i] = chain head after entry base + i.
    heads: Vec<Hash>,
    checkpoints: Vec<(Checkpoint, Option<usize>)>,
}

impl<'a> Verifier<'a> {
    fn new(public: &'a [u8; 32], opts: &'a Options) -> Self {
        let (base, head) = opts.anchor.unwrap_or((0, GENESIS));
        Self {
            public,
            opts,
            base,
            heads: vec![head],
            checkpoints: Vec::new(),
        }
    }

    fn last_seq(&self) -> u64 {
        self.base.saturating_add((self.heads.len() - 1) as u64)
    }

    fn head_at(&self, seq: u64) -> Option<&Hash> {
        let i = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        self.heads.get(i)
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

    fn finish(mut self, entries: u64) -> Verdict {
        let mut covered_to = None;
        let mut problems = Vec::new();
        let mut cps = std::mem::take(&mut self.checkpoints);
        cps.sort_by_key(|(c, _)| c.seq);
        let last = self.base.saturating_add(entries);
        let mut prev_cp = self.base;
        // The highest sequence number a pinned checkpoint vouches for.
        let mut pinned_to = None;
        for (seq, head) in &self.opts.expect {
            match self.head_at(*seq) {
                _ if *seq > last => problems.push(Problem {
                    seq: Some(last + 1),
                    line: None,
                    what: format!(
                        "log truncated: it ends at seq {last}, before the pinned checkpoint at seq {seq}"
                    ),
                }),
                Some(h) if h == head => pinned_to = pinned_to.max(Some(*seq)),
                Some(_) => problems.push(Problem {
                    seq: Some(*seq),
                    line: None,
                    what: format!(
                        "the chain head at seq {seq} differs from the pinned checkpoint: the log was rewritten"
                    ),
                }),
                None => problems.push(Problem {
                    seq: Some(*seq),
                    line: None,
                    what: format!("the pinned checkpoint at seq {seq} is before the anchor"),
                }),
            }
        }
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
            if c.seq <= self.base {
                continue; // before the anchor: nothing here to compare with
            }
            let Some(head) = self.head_at(c.seq) else {
                problems.push(Problem {
                    seq: Some(last + 1),
                    line: *line,
                    what: format!(
                        "log truncated: a signed checkpoint covers seq {}, but the log ends at seq {last}",
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
        // An empty log is no exception: deleting every line must not
        // verify.
        if covered_to.is_none()
            && self.opts.expect.is_empty()
            && !self.opts.allow_unsigned
            && problems.is_empty()
        {
            problems.push(Problem {
                seq: None,
                line: None,
                what: "no signed checkpoint covers this log, so its integrity cannot be established (pass --allow-unsigned to accept internal consistency alone)".into(),
            });
        }
        let trusted_to = covered_to.max(pinned_to).unwrap_or(self.base);
        if trusted_to < last
            && (covered_to.is_some() || pinned_to.is_some())
            && !self.opts.allow_unsigned
            && !self.opts.allow_unsigned_tail
            && problems.is_empty()
        {
            problems.push(Problem {
                seq: Some(trusted_to + 1),
                line: None,
                what: format!(
                    "entries after seq {trusted_to} are not covered by a signed checkpoint: they may have been altered or added, with the checkpoint after them removed (an export ends on a checkpoint; pass --allow-unsigned-tail to accept them on internal consistency alone)"
                ),
            });
        }
        problems.sort_by_key(|p| p.seq.unwrap_or(u64::MAX));
        Verdict {
            first_seq: self.base + 1,
            entries,
            checkpoints: cps.len() as u64,
            covered_to,
            problem: problems.into_iter().next(),
        }
    }
}

/// Verifies an export read line by line, from the genesis, requiring a
/// signed checkpoint.
pub fn verify_export(input: impl BufRead, public: &[u8; 32]) -> Verdict {
    verify_export_with(input, public, &Options::default())
}

/// Verifies an export with `opts` (anchor, pinned checkpoints).
pub fn verify_export_with(input: impl BufRead, public: &[u8; 32], opts: &Options) -> Verdict {
    let mut v = Verifier::new(public, opts);
    let mut entries = 0u64;
    let fail = |line: usize, seq: Option<u64>, what: String, entries: u64| Verdict {
        first_seq: 1,
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
                        first_seq: 1,
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
    verify_records_with(entries, checkpoints, public, &Options::default())
}

pub fn verify_records_with(
    entries: &[AuditRecord],
    checkpoints: &[Checkpoint],
    public: &[u8; 32],
    opts: &Options,
) -> Verdict {
    let mut v = Verifier::new(public, opts);
    for (i, r) in entries.iter().enumerate() {
        if let Err(p) = v.entry(r, None) {
            return Verdict {
                first_seq: 1,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::signer::AuditSigner;
    use crate::domain::audit::{AuditAction, AuditEvent};

    /// A chained log of `n` records (seq 1..=n), as the writer stores it.
    fn log(n: u64, actor: &str) -> Vec<AuditRecord> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let e = AuditEvent::new(1_000 + seq as i64, actor, AuditAction::Detokenize);
                let eh = Entry::of_event(seq, &e).hash();
                prev = link(&prev, &eh);
                AuditRecord {
                    seq,
                    time_ms: e.time_ms,
                    actor: e.actor,
                    tenant: None,
                    action: e.action.as_str().into(),
                    token: None,
                    outcome: "success".into(),
                    peer: None,
                    purpose: None,
                    detail: None,
                    key_id: None,
                    key_version: None,
                    reason: None,
                    approvers: None,
                    entry_hash: Some(eh),
                    chain_hash: Some(prev),
                }
            })
            .collect()
    }

    /// `recs` with every entry hash and chain link recomputed, as a forger
    /// with the algorithm but not the signing key would.
    fn log_from(recs: &[AuditRecord]) -> Vec<AuditRecord> {
        recs.iter()
            .zip(chain_of(recs))
            .map(|(r, (eh, ch))| AuditRecord {
                entry_hash: Some(eh),
                chain_hash: Some(ch),
                ..r.clone()
            })
            .collect()
    }

    fn sign(s: &AuditSigner, r: &AuditRecord) -> Checkpoint {
        let head = r.chain_hash.unwrap();
        Checkpoint {
            seq: r.seq,
            chain_hash: head,
            time_ms: 5,
            signature: s.sign_checkpoint(r.seq, &head, 5).unwrap(),
            key_id: s.key_id(),
        }
    }

    #[test]
    fn signed_log_verifies_and_unsigned_needs_consent() {
        let s = AuditSigner::generate().unwrap();
        let recs = log(10, "a");
        let cp = sign(&s, &recs[9]);
        let v = verify_records(&recs, &[cp], s.public());
        assert!(v.ok(), "{}", v.summary());
        assert_eq!(v.covered_to, Some(10));

        let v = verify_records(&recs, &[], s.public());
        assert!(!v.ok());
        assert!(
            v.summary().contains("no signed checkpoint"),
            "{}",
            v.summary()
        );
        let lenient = Options {
            allow_unsigned: true,
            ..Options::default()
        };
        assert!(verify_records_with(&recs, &[], s.public(), &lenient).ok());
    }

    /// Deleting every line of a log must not verify.
    #[test]
    fn an_empty_log_does_not_verify() {
        let s = AuditSigner::generate().unwrap();
        let v = verify_records(&[], &[], s.public());
        assert!(!v.ok(), "{}", v.summary());
        assert!(
            v.summary().contains("no signed checkpoint"),
            "{}",
            v.summary()
        );
        let header = r#"{"type":"header","format":"tokenvault-audit-export","version":1,"exported_ms":0,"public_key_id":null}"#;
        for text in ["", header] {
            let v = verify_export(text.as_bytes(), s.public());
            assert!(!v.ok(), "{text:?}: {}", v.summary());
        }
        let recs = log(4, "a");
        let anchored = Options {
            anchor: Some((4, recs[3].chain_hash.unwrap())),
            ..Options::default()
        };
        assert!(!verify_records_with(&[], &[], s.public(), &anchored).ok());
    }

    /// Entries after the last checkpoint could have been rewritten by
    /// whoever removed the checkpoint after them: by default they fail;
    /// with consent (a live database's newest entries) they are reported.
    #[test]
    fn an_unsigned_tail_fails_unless_allowed() {
        let s = AuditSigner::generate().unwrap();
        let mut recs = log(10, "a");
        let cp = sign(&s, &recs[7]);
        // The tail rewritten and rehashed, as a forger without the signing
        // key would: its own hashes are consistent.
        recs[9].actor = "mallory".into();
        let forged_tail = log_from(&recs);
        let v = verify_records(&forged_tail, std::slice::from_ref(&cp), s.public());
        assert!(!v.ok(), "{}", v.summary());
        assert_eq!(v.problem.as_ref().unwrap().seq, Some(9));
        assert!(
            v.summary().contains("not covered by a signed checkpoint"),
            "{}",
            v.summary()
        );
        let lenient = Options {
            allow_unsigned_tail: true,
            ..Options::default()
        };
        let v = verify_records_with(&forged_tail, &[cp], s.public(), &lenient);
        assert!(v.ok(), "{}", v.summary());
        assert!(v.summary().contains("2 newer entries"), "{}", v.summary());
        // A pin at the end covers the tail as a checkpoint would.
        let pinned = Options {
            expect: vec![(10, forged_tail[9].chain_hash.unwrap())],
            ..Options::default()
        };
        assert!(verify_records_with(&forged_tail, &[], s.public(), &pinned).ok());
    }

    #[test]
    fn pinned_checkpoint_catches_a_resigned_rewrite_and_a_cut_tail() {
        let s = AuditSigner::generate().unwrap();
        let honest = log(10, "a");
        let pin = (8, honest[7].chain_hash.unwrap());
        // A KEK holder rewrites every entry and re-signs: verifies on its own…
        let forged = log(10, "mallory");
        let forged_cp = sign(&s, &forged[9]);
        assert!(verify_records(&forged, std::slice::from_ref(&forged_cp), s.public()).ok());
        // …but not against the checkpoint the auditor kept.
        let opts = Options {
            expect: vec![pin],
            ..Options::default()
        };
        let v = verify_records_with(&forged, &[forged_cp], s.public(), &opts);
        assert!(!v.ok());
        assert!(v.summary().contains("rewritten"), "{}", v.summary());
        // Tail and its checkpoints cut: the pin is past the end.
        let cut = &honest[..5];
        let v = verify_records_with(cut, &[sign(&s, &honest[3])], s.public(), &opts);
        assert!(v.summary().contains("log truncated"), "{}", v.summary());
        assert_eq!(v.problem.unwrap().seq, Some(6));
    }

    #[test]
    fn partial_export_verifies_from_an_anchor() {
        let s = AuditSigner::generate().unwrap();
        let recs = log(10, "a");
        let tail = &recs[4..];
        let cp = sign(&s, &recs[9]);
        // Without an anchor the gap at seq 1 is reported…
        assert!(!verify_records(tail, std::slice::from_ref(&cp), s.public()).ok());
        // …with the head at seq 4 as anchor it verifies.
        let opts = Options {
            anchor: Some((4, recs[3].chain_hash.unwrap())),
            ..Options::default()
        };
        let v = verify_records_with(tail, &[cp], s.public(), &opts);
        assert!(v.ok(), "{}", v.summary());
        assert!(!v.summary().contains("not yet covered"), "{}", v.summary());
        // A checkpoint short of the end: the unsigned tail is reported,
        // counted from the anchor's numbering.
        let early = sign(&s, &recs[6]);
        assert!(!verify_records_with(tail, std::slice::from_ref(&early), s.public(), &opts).ok());
        let opts = Options {
            allow_unsigned_tail: true,
            ..opts
        };
        let v = verify_records_with(tail, &[early], s.public(), &opts);
        assert!(v.ok(), "{}", v.summary());
        assert!(
            v.summary()
                .contains("3 newer entries are chained but not yet covered"),
            "{}",
            v.summary()
        );
        // A wrong anchor breaks the first link.
        let bad = Options {
            anchor: Some((4, [9u8; 32])),
            ..Options::default()
        };
        assert!(!verify_records_with(tail, &[], s.public(), &bad).ok());
    }

    #[test]
    fn points_parse_strictly() {
        let h = hex::encode([1u8; 32]);
        assert_eq!(parse_point(&format!("12:{h}")).unwrap(), (12, [1u8; 32]));
        assert!(parse_point("12").is_err());
        assert!(parse_point(&format!("18446744073709551615:{h}")).is_err());
        assert!(parse_point("x:00").is_err());
        assert!(parse_point(&format!("12:{}", &h[..10])).is_err());
    }
}
