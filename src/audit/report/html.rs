//! [`render_html`]: the self-contained HTML page.

use std::fmt::Write as _;

use super::*;

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
            '\n' | '\t' => out.push(c),
            // Control characters, and bidirectional overrides or zero-width
            // characters that would make a record read differently from
            // what it holds.
            c if crate::domain::data::unprintable(c) => out.push('\u{fffd}'),
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

/// Where `x` falls between `lo` and `lo + span`, in percent. Times come
/// from the export, which is untrusted input: computed in i128, so no
/// crafted time can overflow.
fn pct(x: i64, lo: i64, span: i64) -> f64 {
    let off = i128::from(x) - i128::from(lo);
    (off as f64 / span.max(1) as f64 * 100.0).clamp(0.0, 100.0)
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
    let hi = r.generated_ms.max(lo.saturating_add(1));
    let span = hi.saturating_sub(lo);
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
