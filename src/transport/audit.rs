//! `vault.v1.AuditService` over the domain's audit-log reads.

use std::pin::Pin;
use std::sync::Arc;

use prost_types::Timestamp;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::auth::Authenticator;
use super::status::{fail, to_status};
use super::timestamp as ts;
use crate::audit::export::{self, Line};
use crate::domain::audit::{AuditRecord, Checkpoint};
use crate::domain::auditing::AuditQuery;
use crate::domain::store::AuditFilter;
use crate::domain::{Vault, VaultError};
use crate::proto;
use crate::proto::audit_service_server::AuditService;

pub struct AuditServiceImpl {
    vault: Arc<Vault>,
    auth: Arc<Authenticator>,
}

impl AuditServiceImpl {
    pub fn new(vault: Arc<Vault>, auth: Arc<Authenticator>) -> Self {
        Self { vault, auth }
    }
}

fn ms(t: &Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos / 1_000_000))
}

fn event(r: AuditRecord) -> proto::AuditEvent {
    proto::AuditEvent {
        seq: r.seq,
        time: ts(r.time_ms),
        actor: r.actor,
        tenant: r.tenant.unwrap_or_default(),
        action: r.action,
        token: r.token.map(|t| t.to_string()).unwrap_or_default(),
        outcome: r.outcome,
        peer: r.peer.unwrap_or_default(),
        purpose: r.purpose.unwrap_or_default(),
        detail: r.detail.unwrap_or_default(),
        key_id: r.key_id,
        key_version: r.key_version,
        reason: r.reason.unwrap_or_default(),
        approvers: r.approvers.unwrap_or_default(),
        entry_hash: r.entry_hash.map(hex::encode).unwrap_or_default(),
        chain_hash: r.chain_hash.map(hex::encode).unwrap_or_default(),
    }
}

fn checkpoint(c: Checkpoint) -> proto::Checkpoint {
    proto::Checkpoint {
        seq: c.seq,
        chain_hash: hex::encode(c.chain_hash),
        time: ts(c.time_ms),
        signature: hex::encode(&c.signature),
        key_id: c.key_id,
    }
}

fn non_empty(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

/// Decodes a ListEvents request into the page it asks for.
fn query(r: proto::ListEventsRequest, limit: usize) -> Result<AuditQuery, VaultError> {
    let after = if r.page_token.is_empty() {
        0
    } else {
        r.page_token
            .parse::<u64>()
            .map_err(|_| VaultError::InvalidArgument("page_token is malformed".into()))?
    };
    let kind = proto::EventKind::try_from(r.kind)
        .map_err(|_| VaultError::InvalidArgument("unknown event kind".into()))?;
    let filter = AuditFilter {
        key_events: match kind {
            proto::EventKind::Unspecified => None,
            proto::EventKind::KeyLifecycle => Some(true),
            proto::EventKind::DataAccess => Some(false),
        },
        from_ms: r.from.as_ref().map(ms),
        to_ms: r.to.as_ref().map(ms),
        tenant: non_empty(r.tenant),
        actor: non_empty(r.actor),
        outcome: non_empty(r.outcome),
    };
    Ok(AuditQuery {
        filter,
        after,
        limit,
    })
}

const EXPORT_PAGE: usize = 500;

/// The most a ListEvents page may hold, encoded: well under the service's
/// 1 MiB response limit, however long the purposes and reasons of its rows.
const PAGE_BYTES: usize = 768 * 1024;

/// Keeps the leading events that fit in `PAGE_BYTES` (at least one), and
/// says whether any were cut; the caller's next page starts after the last
/// one kept.
fn fit_page(mut events: Vec<proto::AuditEvent>) -> (Vec<proto::AuditEvent>, bool) {
    use prost::Message;
    let mut total = 0;
    let keep = events
        .iter()
        .position(|e| {
            total += e.encoded_len() + 8;
            total > PAGE_BYTES
        })
        .map_or(events.len(), |i| i.max(1));
    let cut = keep < events.len();
    events.truncate(keep);
    (events, cut)
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<proto::ExportLine, Status>> + Send>>;

#[tonic::async_trait]
impl AuditService for AuditServiceImpl {
    async fn list_events(
        &self,
        request: Request<proto::ListEventsRequest>,
    ) -> Result<Response<proto::ListEventsResponse>, Status> {
        let caller = self.auth.caller(&request)?;
        let r = request.into_inner();
        let size = if r.page_size == 0 {
            100
        } else {
            usize::try_from(r.page_size).unwrap_or(usize::MAX)
        };
        let size = size.min(crate::domain::auditing::MAX_PAGE);
        // Decoded only once the core has authorized the caller.
        let rows = self
            .vault
            .list_audit(&caller, || query(r, size))
            .await
            .map_err(|e| fail("ListEvents", &caller, e))?;
        let full = rows.len() == size;
        let (events, cut) = fit_page(rows.into_iter().map(event).collect());
        let next = if full || cut {
            events.last().map(|e| e.seq.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(proto::ListEventsResponse {
            events,
            next_page_token: next,
        }))
    }

    async fn get_latest_checkpoint(
        &self,
        request: Request<proto::GetLatestCheckpointRequest>,
    ) -> Result<Response<proto::GetLatestCheckpointResponse>, Status> {
        let caller = self.auth.caller(&request)?;
        let c = self
            .vault
            .latest_checkpoint(&caller)
            .await
            .map_err(|e| fail("GetLatestCheckpoint", &caller, e))?;
        Ok(Response::new(proto::GetLatestCheckpointResponse {
            checkpoint: c.map(checkpoint),
        }))
    }

    type ExportLogStream = ExportStream;

    async fn export_log(
        &self,
        request: Request<proto::ExportLogRequest>,
    ) -> Result<Response<Self::ExportLogStream>, Status> {
        let caller = self.auth.caller(&request)?;
        let mut after = request.into_inner().after_seq;
        // The export ends at its own record: rows committed while it streams
        // belong to the next one (and are covered by a later checkpoint).
        let end = self
            .vault
            .begin_export(&caller, after)
            .await
            .map_err(|e| fail("ExportLog", &caller, e))?;
        let key_id = self.vault.signer().map(|s| s.key_id());
        let vault = self.vault.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let send = |line: &Line| {
                let json =
                    serde_json::to_string(line).map_err(|_| Status::internal("internal error"));
                json.map(|json| proto::ExportLine { json })
            };
            if tx
                .send(send(&export::header(
                    crate::domain::vault::now_ms(),
                    key_id,
                )))
                .await
                .is_err()
            {
                return;
            }
            loop {
                let (mut entries, mut cps) =
                    match vault.export_page(&caller, after, EXPORT_PAGE).await {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = tx.send(Err(to_status(&e))).await;
                            return;
                        }
                    };
                let done = entries.len() < EXPORT_PAGE || entries.iter().any(|e| e.seq >= end);
                entries.retain(|e| e.seq <= end);
                cps.retain(|c| c.seq <= end);
                if let Some(last) = entries.last() {
                    after = last.seq;
                }
                for line in export::interleave(&entries, &cps) {
                    if tx.send(send(&line)).await.is_err() {
                        return;
                    }
                }
                if done {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_public_key(
        &self,
        request: Request<proto::GetPublicKeyRequest>,
    ) -> Result<Response<proto::GetPublicKeyResponse>, Status> {
        let caller = self.auth.caller(&request)?;
        let k = self
            .vault
            .audit_public_key(&caller)
            .await
            .map_err(|e| fail("GetPublicKey", &caller, e))?;
        Ok(Response::new(proto::GetPublicKeyResponse {
            key_id: k.key_id,
            pem: k.pem,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, purpose_len: usize) -> proto::AuditEvent {
        proto::AuditEvent {
            seq,
            purpose: "é".repeat(purpose_len),
            ..Default::default()
        }
    }

    #[test]
    fn a_page_of_long_rows_is_cut_to_fit_and_says_so() {
        // 1000 rows of 256 two-byte characters each: ~0.5 MiB, fits.
        let (kept, cut) = fit_page((1..=1000).map(|s| ev(s, 256)).collect());
        assert_eq!((kept.len(), cut), (1000, false));
        // 1000 rows of 1000 two-byte characters: ~2 MiB, cut.
        let (kept, cut) = fit_page((1..=1000).map(|s| ev(s, 1000)).collect());
        assert!(cut && kept.len() < 1000 && !kept.is_empty());
        let bytes: usize = kept.iter().map(prost::Message::encoded_len).sum();
        assert!(bytes <= PAGE_BYTES, "{bytes}");
        assert_eq!(kept.last().map(|e| e.seq), Some(kept.len() as u64));
        // One row larger than a page is still sent alone.
        let (kept, cut) = fit_page(vec![ev(1, 500_000), ev(2, 1)]);
        assert_eq!((kept.len(), cut), (1, true));
    }
}
