//! Caller identity: the verified client certificate's URI SAN, else its DNS
//! SAN, else its subject CN, mapped by configuration to a tenant and roles.
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
        let peer = req.remote_addr().map(|a| a.to_string());
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

/// The identity a certificate names: first URI SAN, else first DNS SAN, else
/// subject common name.
pub fn identity_from_der(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        let names = &san.value.general_names;
        let uri = names.iter().find_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        });
        let dns = names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        });
        if let Some(id) = uri.or(dns) {
            return Some(id.to_owned());
        }
    }
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}
