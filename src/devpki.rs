//! Development PKI and data directory: a CA, a server certificate, one client
//! certificate per example caller, a KEK file and a config, generated once
//! and reused. For local development and tests only; production certificates
//! come from the operator's own CA.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use crate::crypto::kek::LocalKek;
use crate::fsutil::{write_private, write_public};

/// A certificate and its private key, PEM-encoded.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issued(<certificate and redacted key>)")
    }
}

/// A throwaway certificate authority.
pub struct DevCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DevCa(<redacted>)")
    }
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "tokenvault development");
    d.push(DnType::CommonName, cn);
    d
}

impl DevCa {
    pub fn generate(name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, 365);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Result<Issued, rcgen::Error> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.distinguished_name = dn("localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params, 90);
        self.issue(params)
    }

    /// A client certificate naming `identity` as its URI SAN.
    pub fn client(&self, identity: &str) -> Result<Issued, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(identity.try_into()?)];
        params.distinguished_name = dn(identity);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params, 90);
        self.issue(params)
    }

    /// A client certificate naming `identity`, valid only between the two
    /// times (for tests of expired and not-yet-valid certificates).
    pub fn client_valid_between(
        &self,
        identity: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = vec![SanType::URI(identity.try_into()?)];
        params.distinguished_name = dn(identity);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        self.issue(params)
    }

    /// A client certificate with only a subject CN (no SAN).
    pub fn client_cn(&self, cn: &str) -> Result<Issued, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params, 90);
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Result<Issued, rcgen::Error> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }
}

/// An example caller of the development setup.
#[derive(Debug, Clone, Copy)]
pub struct DevClient {
    /// File stem under `pki/clients/` and the name `vault client --as` takes.
    pub name: &'static str,
    pub identity: &'static str,
    pub tenant: &'static str,
    pub roles: &'static [&'static str],
}

pub const DEV_CLIENTS: &[DevClient] = &[
    DevClient {
        name: "acme-checkout",
        identity: "spiffe://tokenvault.dev/acme/checkout",
        tenant: "acme",
        roles: &["tokenize"],
    },
    DevClient {
        name: "acme-payments",
        identity: "spiffe://tokenvault.dev/acme/payments",
        tenant: "acme",
        roles: &["detokenize"],
    },
    DevClient {
        name: "globex-checkout",
        identity: "spiffe://tokenvault.dev/globex/checkout",
        tenant: "globex",
        roles: &["tokenize"],
    },
    DevClient {
        name: "globex-payments",
        identity: "spiffe://tokenvault.dev/globex/payments",
        tenant: "globex",
        roles: &["detokenize"],
    },
    DevClient {
        name: "auditor",
        identity: "spiffe://tokenvault.dev/auditor",
        tenant: "*",
        roles: &["audit"],
    },
    DevClient {
        name: "admin",
        identity: "spiffe://tokenvault.dev/admin",
        tenant: "*",
        roles: &["admin"],
    },
    // A second administrator, for dual control (crypto-shredding approval).
    DevClient {
        name: "admin-2",
        identity: "spiffe://tokenvault.dev/admin-2",
        tenant: "*",
        roles: &["admin"],
    },
    // Key custodians: each may submit one share of a split KEK.
    DevClient {
        name: "custodian-1",
        identity: "spiffe://tokenvault.dev/custodian-1",
        tenant: "*",
        roles: &["custodian"],
    },
    DevClient {
        name: "custodian-2",
        identity: "spiffe://tokenvault.dev/custodian-2",
        tenant: "*",
        roles: &["custodian"],
    },
    DevClient {
        name: "custodian-3",
        identity: "spiffe://tokenvault.dev/custodian-3",
        tenant: "*",
        roles: &["custodian"],
    },
];

/// Paths inside a development data directory.
#[derive(Debug, Clone)]
pub struct DevLayout {
    pub root: PathBuf,
}

impl DevLayout {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("vault.toml")
    }
    pub fn ca(&self) -> PathBuf {
        self.root.join("pki/ca.pem")
    }
    pub fn client_cert(&self, name: &str) -> PathBuf {
        self.root.join(format!("pki/clients/{name}.pem"))
    }
    pub fn client_key(&self, name: &str) -> PathBuf {
        self.root.join(format!("pki/clients/{name}.key"))
    }
    pub fn kek(&self) -> PathBuf {
        self.root.join("kek.b64")
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("vault.db")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("certificate generation: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("KEK generation: {0}")]
    Kek(String),
}

fn io(what: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |e| DevError::Io(what.display().to_string(), e)
}

/// Creates whatever part of the development data directory is missing and
/// returns its layout. Existing files are never replaced.
pub fn ensure_dev_dir(root: &Path, listen: SocketAddr) -> Result<DevLayout, DevError> {
    let l = DevLayout::new(root);
    let clients_dir = root.join("pki/clients");
    std::fs::create_dir_all(&clients_dir).map_err(io(&clients_dir))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).map_err(io(root))?;
    }
    if !l.ca().exists() {
        write_pki(&l)?;
    }
    // A KEK is made only for a new vault. Once a database exists, its data
    // keys are wrapped by the KEK it pinned: a fresh random one could never
    // open them, so a missing key file is left for the start to report.
    if !l.kek().exists() && !l.db().exists() {
        LocalKek::generate_file(&l.kek()).map_err(|e| DevError::Kek(e.to_string()))?;
    }
    if !l.config().exists() {
        let cfg = dev_config(listen);
        write_public(&l.config(), cfg.as_bytes()).map_err(io(&l.config()))?;
    }
    Ok(l)
}

fn write_pki(l: &DevLayout) -> Result<(), DevError> {
    let ca = DevCa::generate("tokenvault development CA")?;
    let pki = l.root.join("pki");
    remove_unfinished_pki(&pki)?;
    let put_pub = |name: &str, s: &str| {
        let p = pki.join(name);
        write_public(&p, s.as_bytes()).map_err(io(&p))
    };
    let put_key = |name: &str, s: &str| {
        let p = pki.join(name);
        write_private(&p, s.as_bytes()).map_err(io(&p))
    };
    let server = ca.server()?;
    put_pub("server.pem", &server.cert_pem)?;
    put_key("server.key", &server.key_pem)?;
    for c in DEV_CLIENTS {
        let issued = ca.client(c.identity)?;
        put_pub(&format!("clients/{}.pem", c.name), &issued.cert_pem)?;
        put_key(&format!("clients/{}.key", c.name), &issued.key_pem)?;
    }
    // The CA certificate last: its presence marks the PKI complete.
    put_pub("ca.pem", &ca.cert_pem())
}

/// Files a run interrupted before `ca.pem` left behind. They chain to a CA
/// whose key was never kept (it lives only in memory while the PKI is
/// made), so they are useless; and since secret files are never
/// overwritten, they would refuse every retry.
fn remove_unfinished_pki(pki: &Path) -> Result<(), DevError> {
    let mut names = vec!["server.pem".to_owned(), "server.key".to_owned()];
    for c in DEV_CLIENTS {
        names.push(format!("clients/{}.pem", c.name));
        names.push(format!("clients/{}.key", c.name));
    }
    for name in names {
        let p = pki.join(name);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&p)(e)),
            _ => {}
        }
    }
    Ok(())
}

fn dev_config(listen: SocketAddr) -> String {
    let mut s = format!(
        "# Development configuration generated by `vault dev`. Not for production.\n\
         listen = \"{listen}\"\n\n\
         [tls]\ncert = \"pki/server.pem\"\nkey = \"pki/server.key\"\nclient_ca = \"pki/ca.pem\"\n\n\
         [kek]\nfile = \"kek.b64\"\n\n\
         [storage]\npath = \"vault.db\"\n\n\
         [server]\nreflection = true\n"
    );
    for c in DEV_CLIENTS {
        let roles: Vec<String> = c.roles.iter().map(|r| format!("\"{r}\"")).collect();
        s.push_str(&format!(
            "\n# {}\n[[clients]]\nidentity = \"{}\"\ntenant = \"{}\"\nroles = [{}]\n",
            c.name,
            c.identity,
            c.tenant,
            roles.join(", ")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::config::Config;
    use std::collections::HashMap;

    #[test]
    fn dev_dir_is_complete_valid_and_reused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("data");
        let l = ensure_dev_dir(&root, "127.0.0.1:7443".parse().unwrap()).unwrap();
        let cfg = Config::load(&l.config(), &HashMap::new()).unwrap();
        assert_eq!(cfg.grants().unwrap().len(), DEV_CLIENTS.len());
        let ca_before = std::fs::read(l.ca()).unwrap();
        ensure_dev_dir(&root, "127.0.0.1:7443".parse().unwrap()).unwrap();
        assert_eq!(
            std::fs::read(l.ca()).unwrap(),
            ca_before,
            "reused, not regenerated"
        );
        use std::os::unix::fs::PermissionsExt;
        for p in [l.kek(), l.client_key("admin"), root.join("pki/server.key")] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
    }

    /// `vault dev` interrupted while writing the PKI (before `ca.pem`, the
    /// completion mark) must not fail forever on the files it did write.
    #[test]
    fn an_interrupted_pki_is_made_again() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("data");
        let listen = "127.0.0.1:7443".parse().unwrap();
        let l = ensure_dev_dir(&root, listen).unwrap();
        let server = root.join("pki/server.pem");
        let old_server = std::fs::read(&server).unwrap();
        std::fs::remove_file(l.ca()).unwrap();
        std::fs::remove_file(l.client_key("auditor")).unwrap();
        ensure_dev_dir(&root, listen).unwrap();
        assert!(l.ca().is_file() && l.client_key("auditor").is_file());
        assert_ne!(
            std::fs::read(&server).unwrap(),
            old_server,
            "the server certificate must be issued by the new CA"
        );
    }

    #[test]
    fn no_new_kek_is_made_for_an_existing_database() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("data");
        let listen = "127.0.0.1:7443".parse().unwrap();
        let l = ensure_dev_dir(&root, listen).unwrap();
        std::fs::write(l.db(), b"").unwrap();
        std::fs::remove_file(l.kek()).unwrap();
        ensure_dev_dir(&root, listen).unwrap();
        assert!(
            !l.kek().exists(),
            "a fresh KEK was made for an existing vault"
        );
    }

    #[test]
    fn client_certificate_names_its_identity() {
        let ca = DevCa::generate("t").unwrap();
        let c = ca.client("spiffe://t/acme/checkout").unwrap();
        let der = rustls_pemfile_der(&c.cert_pem);
        assert_eq!(
            crate::transport::auth::identity_from_der(&der).as_deref(),
            Some("spiffe://t/acme/checkout")
        );
        let cn = ca.client_cn("payments-worker").unwrap();
        assert_eq!(
            crate::transport::auth::identity_from_der(&rustls_pemfile_der(&cn.cert_pem)).as_deref(),
            Some("payments-worker")
        );
    }

    fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }
}
