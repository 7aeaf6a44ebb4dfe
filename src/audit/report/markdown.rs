//! [`render_markdown`]: the Markdown rendering.

use std::fmt::Write as _;

use super::*;

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
            c if crate::domain::data::unprintable(c) => out.push('\u{fffd}'),
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
