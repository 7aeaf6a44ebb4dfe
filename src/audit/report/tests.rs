#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::audit::verify::Problem;
use crate::domain::audit::AuditAction;
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

/// A report of `entries` without a verdict, with a crypto-period of
/// `period_ms`, generated at `at_ms`.
fn report_at(entries: &[AuditRecord], cps: &[Checkpoint], period_ms: i64, at_ms: i64) -> Report {
    build(&ReportInput {
        entries,
        checkpoints: cps,
        verdict: None,
        crypto_period_ms: period_ms,
        generated_ms: at_ms,
    })
}

/// As `report`, for other entries.
fn report_of(entries: &[AuditRecord], cps: &[Checkpoint]) -> Report {
    report_at(entries, cps, 90 * DAY, T0 + 120 * DAY)
}

fn flagged(r: &Report, key: u32, kind: FlagKind) -> bool {
    r.key(key).unwrap().flags.contains(&kind)
}

fn flags_of(r: &Report, kind: FlagKind) -> Vec<&Flag> {
    r.flags.iter().filter(|f| f.kind == kind).collect()
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
    assert!(flagged(&r, 1, FlagKind::OutlivedCryptoPeriod));
    assert!(!flagged(&r, 3, FlagKind::OutlivedCryptoPeriod));
    assert!(!flagged(&r, 2, FlagKind::OutlivedCryptoPeriod));
    let period = flags_of(&r, FlagKind::OutlivedCryptoPeriod);
    assert_eq!(period.len(), 1);
    assert_eq!((period[0].tenant.as_str(), period[0].key_id), ("acme", 1));

    // Still active and past its period: aged up to generated_ms.
    let (entries, cps) = scenario();
    let r = report_at(&entries, &cps, 10 * DAY, T0 + 120 * DAY);
    assert!(flagged(&r, 3, FlagKind::OutlivedCryptoPeriod));
    let r = report_at(&entries, &cps, 10 * DAY, T0 + 105 * DAY);
    assert!(!flagged(&r, 3, FlagKind::OutlivedCryptoPeriod));
}

#[test]
fn dual_control_flag_fires_for_a_lone_dek_destroy() {
    let r = report(None);
    assert!(flagged(&r, 1, FlagKind::DestroyedWithoutDualControl));
    // The shred had a second administrator.
    assert!(!flagged(&r, 2, FlagKind::DestroyedWithoutDualControl));
    let dc = flags_of(&r, FlagKind::DestroyedWithoutDualControl);
    assert_eq!(dc.len(), 1);
    assert_eq!((dc[0].key_id, dc[0].seq), (1, Some(10)));

    // A shred without approvers, or approved by its own actor, is flagged.
    for approvers in [None, Some("admin-bob")] {
        let (mut entries, cps) = scenario();
        entries[12].approvers = approvers.map(str::to_owned);
        let r = report_of(&entries, &cps);
        assert!(flagged(&r, 2, FlagKind::DestroyedWithoutDualControl));
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
fn reports_show_no_bidirectional_override_or_zero_width_character() {
    let tricky = "admin\u{202E}evil\u{2066}x\u{200B}y";
    let shown = esc(tricky);
    assert!(
        !shown.contains(['\u{202E}', '\u{2066}', '\u{200B}']),
        "{shown:?}"
    );
    assert!(shown.contains("admin\u{fffd}evil"), "{shown:?}");
}

#[test]
fn html_escapes_everything_from_the_log() {
    let (mut entries, cps) = scenario();
    entries[0].actor = "\"><img src=x onerror=alert(2)>".into();
    entries[12].approvers = Some("admin-carol<b>".into());
    entries[6].tenant = Some("acme".into());
    let r = report_of(&entries, &cps);
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
    let r = report_of(&entries, &cps);
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
    let r = report_of(&entries, &cps);
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

/// Times in an export are untrusted: the most extreme ones still render
/// (no overflow, in debug or release), with every bar inside its track.
#[test]
fn extreme_times_in_an_export_render_without_overflow() {
    use AuditAction as A;
    let entries = vec![
        keyed(rec(1, i64::MIN, "admin", A::DekCreate), "acme", 1, 1),
        keyed(rec(2, i64::MAX, "admin", A::DekRotate), "acme", 1, 1),
    ];
    let r = report_of(&entries, &[]);
    let html = render_html(&r);
    assert!(html.contains("acme"), "{html}");
    assert!(!html.contains("NaN") && !html.contains("inf"), "{html}");
}
