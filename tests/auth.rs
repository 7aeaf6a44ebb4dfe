//! Proves who may connect and what the transport offers: mTLS is mandatory and pinned to the configured CA, unmapped identities are denied and audited, CN fallback works, health and reflection are served as configured, and TLS 1.2 and 1.3 both work.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tempfile::TempDir;
use tokenvault::client::{ClientPki, channel, connect};
use tokenvault::config::Config;
use tokenvault::crypto::kek::LocalKek;
use tokenvault::devpki::{DevCa, Issued};
use tokenvault::proto::{
    DeleteTokenRequest, DetokenizeRequest, GetTokenMetadataRequest, TokenizeRequest,
};
use tokenvault::server::{StartError, load_kek, open_vault, serve};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

fn tok_req(pan: &str) -> TokenizeRequest {
    TokenizeRequest {
        pan: pan.into(),
        expiry: None,
    }
}

fn detok_req(token: &str) -> DetokenizeRequest {
    DetokenizeRequest {
        token: token.into(),
        purpose: "charge".into(),
    }
}

/// Connects with `tls` and makes one Tokenize call; returns the first
/// failure, whether it came at connect time or from the call.
async fn connect_and_call(url: &str, tls: ClientTlsConfig) -> Result<(), String> {
    let ch = Endpoint::from_shared(url.to_owned())
        .unwrap()
        .tls_config(tls)
        .map_err(|e| format!("tls config: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut c = tokenvault::proto::token_service_client::TokenServiceClient::new(ch);
    c.tokenize(tok_req("4111111111111111"))
        .await
        .map(|_| ())
        .map_err(|s| format!("call: {s:?}"))
}

/// The vault still serves a properly authenticated caller.
async fn still_serving(v: &TestVault) {
    let mut c = v.client(ACME_CHECKOUT).await;
    c.tokenize(tok_req("4111111111111111")).await.unwrap();
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let v = TestVault::start().await;
    let ca = std::fs::read(v.layout.ca()).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    let r = connect_and_call(&v.url(), tls).await;
    assert!(r.is_err(), "a client without a certificate was served");
    // Control: the same construction plus a valid certificate is served, so
    // the refusal above is about the missing certificate.
    let pki = v.pki(ACME_CHECKOUT);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &pki.cert_pem,
            &*pki.key_pem,
        ))
        .domain_name("localhost");
    connect_and_call(&v.url(), tls).await.unwrap();
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let v = TestVault::start().await;
    // The rogue CA even shares the trusted CA's subject name, so the
    // chain builder finds a name match and must reject on the signature.
    let rogue = DevCa::generate("tokenvault development CA").unwrap();
    // Same identity string as a real, mapped caller; only the issuer differs.
    let issued = rogue.client(identity(ACME_CHECKOUT)).unwrap();
    let pki = pki_of(std::fs::read(v.layout.ca()).unwrap(), &issued);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &pki.cert_pem,
            &*pki.key_pem,
        ))
        .domain_name("localhost");
    let r = connect_and_call(&v.url(), tls).await;
    assert!(r.is_err(), "a certificate from a foreign CA was served");
    // Nothing about the refused caller reached the audit log.
    let rows = v.audit_rows();
    assert!(rows.iter().all(|r| r.actor == "system"), "{rows:#?}");
    still_serving(&v).await;
}

fn pki_of(ca_pem: Vec<u8>, issued: &Issued) -> ClientPki {
    ClientPki {
        ca_pem,
        cert_pem: issued.cert_pem.clone().into_bytes(),
        key_pem: zeroize::Zeroizing::new(issued.key_pem.as_bytes().to_vec()),
    }
}

/// A vault on its own CA and config, for identities the dev setup lacks.
struct CustomVault {
    dir: TempDir,
    ca: DevCa,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), StartError>>>,
}

const CUSTOM_CHECKOUT: &str = "spiffe://custom.test/acme/checkout";
const CUSTOM_STRANGER: &str = "spiffe://custom.test/acme/stranger";
const CN_ONLY_WORKER: &str = "payments-worker";

impl CustomVault {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let ca = DevCa::generate("custom test CA").unwrap();
        let server = ca.server().unwrap();
        std::fs::write(root.join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(root.join("server.pem"), &server.cert_pem).unwrap();
        tokenvault::fsutil::write_private(&root.join("server.key"), server.key_pem.as_bytes())
            .unwrap();
        LocalKek::generate_file(&root.join("kek.b64")).unwrap();
        let toml = format!(
            r#"listen = "127.0.0.1:0"

[tls]
cert = "server.pem"
key = "server.key"
client_ca = "ca.pem"

[kek]
file = "kek.b64"

[storage]
path = "vault.db"

[[clients]]
identity = "{CUSTOM_CHECKOUT}"
tenant = "acme"
roles = ["tokenize"]

[[clients]]
identity = "{CN_ONLY_WORKER}"
tenant = "acme"
roles = ["detokenize"]
"#
        );
        std::fs::write(root.join("vault.toml"), toml).unwrap();

        let env: HashMap<String, String> = HashMap::new();
        let cfg = Config::load(&root.join("vault.toml"), &env).unwrap();
        let kek = load_kek(&cfg, &env).unwrap();
        let vault = open_vault(&cfg, kek).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(listener, &cfg, vault, async move {
                let _ = rx.await;
            })
            .await
        });
        Self {
            dir,
            ca,
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    async fn client_for(&self, issued: &Issued) -> Client {
        let pki = pki_of(self.ca.cert_pem().into_bytes(), issued);
        connect(&self.url(), &pki).await.unwrap()
    }

    fn audit_rows(&self) -> Vec<AuditRow> {
        audit_rows(&self.dir.path().join("vault.db"))
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// A certificate from the right CA, for a mapped identity, is refused
/// outside its validity period: expired, or not yet valid.
#[tokio::test]
async fn expired_or_not_yet_valid_client_certificates_are_refused() {
    use time::{Duration as Days, OffsetDateTime};
    let v = CustomVault::start().await;
    let now = OffsetDateTime::now_utc();
    let tls_for = |issued: &Issued| {
        let pki = pki_of(v.ca.cert_pem().into_bytes(), issued);
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &pki.cert_pem,
                &*pki.key_pem,
            ))
            .domain_name("localhost")
    };
    for (what, from, to) in [
        ("expired", now - Days::days(10), now - Days::days(1)),
        ("not yet valid", now + Days::days(1), now + Days::days(10)),
    ] {
        let issued =
            v.ca.client_valid_between(CUSTOM_CHECKOUT, from, to)
                .unwrap();
        let r = connect_and_call(&v.url(), tls_for(&issued)).await;
        assert!(r.is_err(), "a certificate that is {what} was served");
    }
    // Control: the same identity, valid now, is served.
    let issued =
        v.ca.client_valid_between(CUSTOM_CHECKOUT, now - Days::days(1), now + Days::days(1))
            .unwrap();
    connect_and_call(&v.url(), tls_for(&issued)).await.unwrap();
    v.stop().await;
}

#[tokio::test]
async fn unmapped_identity_is_denied_everything_and_audited() {
    let v = CustomVault::start().await;
    let mut checkout = v.client_for(&v.ca.client(CUSTOM_CHECKOUT).unwrap()).await;
    let token = checkout
        .tokenize(tok_req("4111111111111111"))
        .await
        .unwrap()
        .into_inner()
        .token;

    let mut stranger = v.client_for(&v.ca.client(CUSTOM_STRANGER).unwrap()).await;
    let s = stranger
        .tokenize(tok_req("5555555555554444"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "Tokenize {s:?}");
    let s = stranger.detokenize(detok_req(&token)).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "Detokenize {s:?}");
    let s = stranger
        .get_token_metadata(GetTokenMetadataRequest {
            token: token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "GetTokenMetadata {s:?}");
    let s = stranger
        .delete_token(DeleteTokenRequest {
            token: token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "DeleteToken {s:?}");

    let rows = v.audit_rows();
    let denied: Vec<_> = rows.iter().filter(|r| r.actor == CUSTOM_STRANGER).collect();
    let actions: Vec<&str> = denied.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(
        actions,
        ["tokenize", "detokenize", "get_metadata", "delete_token"],
        "{rows:#?}"
    );
    for r in &denied {
        assert_eq!(r.outcome, "denied", "{r:?}");
        assert!(
            r.peer
                .as_deref()
                .unwrap_or_default()
                .starts_with("127.0.0.1"),
            "{r:?}"
        );
    }

    // The denied delete did not delete.
    let mut worker = v.client_for(&v.ca.client_cn(CN_ONLY_WORKER).unwrap()).await;
    let d = worker.detokenize(detok_req(&token)).await.unwrap();
    assert_eq!(d.into_inner().pan, "4111111111111111");
    drop((checkout, stranger, worker));
    v.stop().await;
}

/// Authorization comes before the request is decoded: a stranger's
/// malformed request is refused as a stranger's (PERMISSION_DENIED, on the
/// record), not answered INVALID_ARGUMENT, which would tell an unauthorized
/// caller how its request was read.
#[tokio::test]
async fn a_strangers_malformed_request_is_denied_and_audited_before_it_is_decoded() {
    use tokenvault::proto::audit_service_client::AuditServiceClient;
    use tokenvault::proto::key_service_client::KeyServiceClient;
    use tokenvault::proto::{ListEventsRequest, RotateKekRequest};
    let v = CustomVault::start().await;
    let pki = pki_of(
        v.ca.cert_pem().into_bytes(),
        &v.ca.client(CUSTOM_STRANGER).unwrap(),
    );
    let ch = channel(&v.url(), &pki).await.unwrap();
    let mut audit = AuditServiceClient::new(ch.clone());
    let s = audit
        .list_events(ListEventsRequest {
            page_token: "not-a-number".into(),
            kind: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "ListEvents {s:?}");
    let mut keys = KeyServiceClient::new(ch);
    let s = keys
        .request_kek_rotation(RotateKekRequest {
            reason: String::new(),
            target: None,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "RequestKekRotation {s:?}");
    // A mapped caller without the role: the same.
    let checkout = pki_of(
        v.ca.cert_pem().into_bytes(),
        &v.ca.client(CUSTOM_CHECKOUT).unwrap(),
    );
    let mut keys = KeyServiceClient::new(channel(&v.url(), &checkout).await.unwrap());
    let s = keys
        .request_kek_rotation(RotateKekRequest {
            reason: "x".into(),
            target: None,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "RequestKekRotation {s:?}");

    let rows = v.audit_rows();
    let got: Vec<(&str, &str, &str)> = rows
        .iter()
        .filter(|r| r.actor != "system")
        .map(|r| (r.actor.as_str(), r.action.as_str(), r.outcome.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (CUSTOM_STRANGER, "audit_read", "denied"),
            (CUSTOM_STRANGER, "kek_rotate_request", "denied"),
            (CUSTOM_CHECKOUT, "kek_rotate_request", "denied"),
        ],
        "{rows:#?}"
    );
    drop((audit, keys));
    v.stop().await;
}

#[tokio::test]
async fn identity_named_only_by_subject_cn_is_honoured() {
    let v = CustomVault::start().await;
    let mut checkout = v.client_for(&v.ca.client(CUSTOM_CHECKOUT).unwrap()).await;
    let token = checkout
        .tokenize(tok_req("378282246310005"))
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut worker = v.client_for(&v.ca.client_cn(CN_ONLY_WORKER).unwrap()).await;
    let d = worker.detokenize(detok_req(&token)).await.unwrap();
    assert_eq!(d.into_inner().pan, "378282246310005");
    // Its grant is detokenize only: the CN identity got exactly that grant.
    let s = worker
        .tokenize(tok_req("4111111111111111"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);

    let rows = v.audit_rows();
    let r = rows
        .iter()
        .find(|r| r.action == "detokenize")
        .unwrap_or_else(|| panic!("{rows:#?}"));
    assert_eq!(r.actor, CN_ONLY_WORKER);
    assert_eq!(r.outcome, "success");
    drop((checkout, worker));
    v.stop().await;
}

#[tokio::test]
async fn health_reports_serving_over_mtls() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let v = TestVault::start().await;
    let ch = channel(&v.url(), &v.pki(AUDITOR)).await.unwrap();
    let mut h = HealthClient::new(ch);
    for service in ["vault.v1.TokenService", ""] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("{service:?}: {s:?}"))
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    let s = h
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    // Health reads with the vault's message limit, not tonic's 4 MiB.
    let s = h
        .check(HealthCheckRequest {
            service: "x".repeat(64 * 1024),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
}

async fn list_services(url: &str, pki: &ClientPki) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let ch = channel(url, pki).await.unwrap();
    let mut c = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = c
        .server_reflection_info(tokio_stream::once(req))
        .await?
        .into_inner();
    let msg = stream
        .message()
        .await?
        .ok_or_else(|| tonic::Status::internal("empty reflection stream"))?;
    match msg.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            Ok(l.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test]
async fn reflection_is_served_when_enabled_and_unimplemented_when_disabled() {
    let v = TestVault::start().await;
    let names = list_services(&v.url(), &v.pki(ADMIN)).await.unwrap();
    assert!(
        names.iter().any(|n| n == "vault.v1.TokenService"),
        "{names:?}"
    );
    let dir = v.stop().await;

    let v = TestVault::try_start_in(dir, &[("VAULT_REFLECTION", "false")])
        .await
        .map_err(|(_, e)| e)
        .unwrap();
    let s = list_services(&v.url(), &v.pki(ADMIN)).await.unwrap_err();
    assert_eq!(s.code(), Code::Unimplemented, "{s:?}");
    still_serving(&v).await;
}

mod tls_versions {
    //! rustls, on both ends, implements only TLS 1.2 and 1.3: SSL 3.0, TLS 1.0
    //! and TLS 1.1 are impossible by construction, so only the two versions
    //! that exist are exercised here.

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsConnector;
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    fn config(
        v: &TestVault,
        client: Option<&str>,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> rustls::ClientConfig {
        let l = &v.layout;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(l.ca()).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots);
        let mut cfg = match client {
            Some(name) => {
                let chain = CertificateDer::pem_file_iter(l.client_cert(name))
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_file(l.client_key(name)).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        cfg
    }

    /// Completes a TLS handshake, then proves the server accepted the session
    /// by exchanging HTTP/2 prefaces: with TLS 1.3 the server checks the
    /// client certificate only after the client thinks the handshake is done,
    /// so a finished handshake alone proves nothing.
    async fn handshake(
        addr: SocketAddr,
        cfg: rustls::ClientConfig,
    ) -> Result<(rustls::ProtocolVersion, Option<Vec<u8>>), String> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (_, conn) = tls.get_ref();
        let version = conn.protocol_version().unwrap();
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        // Client connection preface, then an empty SETTINGS frame.
        let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        tls.write_all(&preface)
            .await
            .map_err(|e| format!("write: {e}"))?;
        tls.flush().await.map_err(|e| format!("flush: {e}"))?;
        let mut frame = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut frame))
            .await
            .map_err(|_| "no answer from server".to_string())?
            .map_err(|e| format!("read: {e}"))?;
        // The server's preface is a SETTINGS frame (type 4) on stream 0.
        if frame[3] != 4 || frame[5..9] != [0, 0, 0, 0] {
            return Err(format!("unexpected first frame header {frame:?}"));
        }
        Ok((version, alpn))
    }

    /// An authenticated connection that never speaks HTTP/2 (or holds
    /// streams it never reads) is closed at `limits.max_connection_age_ms`
    /// plus the grace, and its slot goes to the next caller.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_silent_authenticated_connection_is_closed_at_its_age() {
        let dir = tempfile::tempdir().unwrap();
        append_config(
            dir.path(),
            "[limits]\nmax_connections = 1\nmax_connection_age_ms = 300\nconnection_grace_ms = 200\n",
        );
        let v = TestVault::start_in(dir).await;
        let cfg = config(&v, Some(ACME_CHECKOUT), &rustls::version::TLS13);
        let tcp = tokio::net::TcpStream::connect(v.addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut silent = TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap();
        // Nothing is sent. The bound only guards the suite against a hang.
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match silent.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the silent connection was never closed");
        // Its slot was freed: the one allowed connection serves a caller.
        let mut c = v.client(ACME_CHECKOUT).await;
        common::calls::call(c.tokenize(TokenizeRequest {
            pan: "4111111111111111".into(),
            expiry: None,
        }))
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn tls12_with_client_certificate_is_accepted() {
        let v = TestVault::start().await;
        let (version, alpn) = handshake(
            v.addr,
            config(&v, Some(ACME_CHECKOUT), &rustls::version::TLS12),
        )
        .await
        .unwrap();
        assert_eq!(version, rustls::ProtocolVersion::TLSv1_2);
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    }

    #[tokio::test]
    async fn tls13_with_client_certificate_is_accepted() {
        let v = TestVault::start().await;
        let (version, alpn) = handshake(
            v.addr,
            config(&v, Some(ACME_CHECKOUT), &rustls::version::TLS13),
        )
        .await
        .unwrap();
        assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    }

    #[tokio::test]
    async fn tls12_and_tls13_without_client_certificate_are_refused() {
        let v = TestVault::start().await;
        for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let r = handshake(v.addr, config(&v, None, version)).await;
            assert!(
                r.is_err(),
                "{:?} without a client cert: {r:?}",
                version.version
            );
        }
    }
}
