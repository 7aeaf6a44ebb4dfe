//! Caller identity: the verified client certificate's URI SAN, else its DNS
//! SAN, else (with no SAN at all) its subject CN, mapped by configuration to
//! a tenant and roles.
//! rustls has already verified the chain against the configured CA before a
//! request gets here; this only reads who the certificate names.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::domain::{Caller, Grant};

/// Parsed identities kept per certificate, so the X.509 parse is paid once
/// per client certificate rather than once per request.
const CACHE_LIMIT: usize = 4096;

pub struct Authenticator {
    grants: HashMap<String, Grant>,
    cache: Mutex<HashMap<Vec<u8>, Option<String>>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("identities", &self.grants.len())
            .finish()
    }
}

impl Authenticator {
    pub fn new(grants: HashMap<String, Grant>) -> Self {
        Self {
            grants,
            cache: Mutex::default(),
        }
    }

    /// The caller of `req`. UNAUTHENTICATED if there is no verified client
    /// certificate or it names no identity; a named identity with no grant
    /// is returned with `grant: None` so the core can deny and audit it.
    pub fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let peer = req.remote_addr().map(peer_string);
        let certs = req
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let identity = self
            .identity_of(leaf.as_ref())
            .ok_or_else(|| Status::unauthenticated("client certificate names no identity"))?;
        Ok(Caller {
            grant: self.grants.get(&identity).cloned(),
            identity,
            peer,
        })
    }

    fn identity_of(&self, der: &[u8]) -> Option<String> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(id) = cache.get(der) {
            return id.clone();
        }
        let id = identity_from_der(der);
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(der.to_vec(), id.clone());
        id
    }
}

/// `ip:port` (`[ip]:port` for IPv6), written into a string allocated once
/// at its largest size: `to_string` grows it several times, on every call.
fn peer_string(addr: std::net::SocketAddr) -> String {
    use std::fmt::Write;
    // "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255%4294967295]:65535"
    let mut s = String::with_capacity(64);
    let _ = write!(s, "{addr}");
    s
}

/// The identity a certificate names: its URI SAN, else its DNS SAN, else
/// (only for a certificate with no SAN extension at all) its subject CN.
///
/// Fails closed on anything ambiguous, so that no certificate can claim an
/// identity by a route its issuer did not mean: a SAN extension that does
/// not parse, more than one URI SAN (or, with none, more than one DNS SAN),
/// or a SAN holding only other kinds of name (IP, email, …) names no
/// identity, nor does a subject with more than one CN; and the subject CN
/// is never consulted when a SAN is present.
pub fn identity_from_der(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    match cert.subject_alternative_name() {
        Err(_) => None,
        Ok(Some(san)) => {
            let names = &san.value.general_names;
            let uris: Vec<&str> = names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect();
            let dns: Vec<&str> = names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(*d),
                    _ => None,
                })
                .collect();
            match (uris.as_slice(), dns.as_slice()) {
                ([uri], _) => Some((*uri).to_owned()),
                ([], [name]) => Some((*name).to_owned()),
                _ => None,
            }
        }
        // A subject may hold several CNs (`CN=worker, CN=admin`, or a
        // multi-valued RDN): like several SANs, they name no one.
        Ok(None) => {
            let mut cns = cert.subject().iter_common_name();
            match (cns.next(), cns.next()) {
                (Some(cn), None) => cn.as_str().ok().map(str::to_owned),
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn cert(cn: Option<&str>, sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn peer_strings_match_display() {
        for a in [
            "127.0.0.1:50051",
            "[::1]:443",
            "[2001:db8::7%3]:9",
            "0.0.0.0:0",
        ] {
            let addr: std::net::SocketAddr = a.parse().unwrap();
            assert_eq!(peer_string(addr), addr.to_string());
        }
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn dns(s: &str) -> SanType {
        SanType::DnsName(s.try_into().unwrap())
    }

    #[test]
    fn the_uri_san_then_the_dns_san_then_the_cn_names_the_caller() {
        let c = cert(
            Some("ignored"),
            vec![dns("a.example"), uri("spiffe://t/acme/x")],
        );
        assert_eq!(identity_from_der(&c).as_deref(), Some("spiffe://t/acme/x"));
        let c = cert(Some("ignored"), vec![dns("worker.example")]);
        assert_eq!(identity_from_der(&c).as_deref(), Some("worker.example"));
        let c = cert(Some("payments-worker"), vec![]);
        assert_eq!(identity_from_der(&c).as_deref(), Some("payments-worker"));
    }

    #[test]
    fn the_cn_is_never_used_when_a_san_is_present() {
        // A CA that copies the request's subject: an IP SAN and a CN that
        // reads like a privileged identity.
        let ip = SanType::IpAddress(std::net::IpAddr::from([10, 0, 0, 7]));
        let c = cert(Some("spiffe://t/admin"), vec![ip]);
        assert_eq!(identity_from_der(&c), None);
    }

    #[test]
    fn ambiguous_names_name_no_one() {
        let c = cert(None, vec![uri("spiffe://t/a"), uri("spiffe://t/admin")]);
        assert_eq!(identity_from_der(&c), None);
        let c = cert(None, vec![dns("a.example"), dns("admin.example")]);
        assert_eq!(identity_from_der(&c), None);
        assert_eq!(identity_from_der(b"not a certificate"), None);
    }

    /// A SAN-less certificate whose subject holds two CNs (one written
    /// through its raw OID, 2.5.4.3, since rcgen keeps one value per
    /// attribute type) names no one, whichever comes first.
    #[test]
    fn a_subject_with_two_common_names_names_no_one() {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "acme-worker");
        params
            .distinguished_name
            .push(DnType::CustomDnType(vec![2, 5, 4, 3]), "admin-global");
        let key = KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let (_, parsed) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(parsed.subject().iter_common_name().count(), 2);
        assert_eq!(identity_from_der(&der), None);
    }
}
