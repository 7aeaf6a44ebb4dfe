//! A TokenService client over mutual TLS, shared by the CLI, the load
//! generator and the tests.

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::token_service_client::TokenServiceClient;

/// PEM material a client presents and trusts.
#[derive(Clone)]
pub struct ClientPki {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: zeroize::Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for ClientPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientPki(<redacted>)")
    }
}

/// Opens a channel to `url` (e.g. `https://127.0.0.1:7443`). The server
/// certificate must chain to `ca_pem` and name the URL's host, or
/// `localhost` when the host is a loopback address.
pub async fn channel(url: &str, pki: &ClientPki) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .identity(Identity::from_pem(&pki.cert_pem, &*pki.key_pem));
    let endpoint = Endpoint::from_shared(url.to_owned())?;
    if is_loopback_host(endpoint.uri().host()) {
        tls = tls.domain_name("localhost");
    }
    endpoint.tls_config(tls)?.tcp_nodelay(true).connect().await
}

pub async fn connect(
    url: &str,
    pki: &ClientPki,
) -> Result<TokenServiceClient<Channel>, tonic::transport::Error> {
    Ok(TokenServiceClient::new(channel(url, pki).await?))
}

impl ClientPki {
    /// Reads the files of a development data directory for client `name`.
    pub fn from_dev_dir(root: &std::path::Path, name: &str) -> std::io::Result<Self> {
        let l = crate::devpki::DevLayout::new(root);
        Ok(Self {
            ca_pem: std::fs::read(l.ca())?,
            cert_pem: std::fs::read(l.client_cert(name))?,
            key_pem: zeroize::Zeroizing::new(std::fs::read(l.client_key(name))?),
        })
    }
}

/// Whether a URL's host is a loopback IP address (exactly: not a name or
/// another address that merely contains "127.0.0.1").
fn is_loopback_host(host: Option<&str>) -> bool {
    host.map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .and_then(|h| h.parse::<std::net::IpAddr>().ok())
        .is_some_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_of(url: &str) -> bool {
        Endpoint::from_shared(url.to_owned()).is_ok_and(|e| is_loopback_host(e.uri().host()))
    }

    #[test]
    fn only_loopback_addresses_are_checked_against_localhost() {
        assert!(host_of("https://127.0.0.1:7443"));
        assert!(host_of("https://127.0.0.2:7443"));
        assert!(host_of("https://[::1]:7443"));
        assert!(!host_of("https://10.127.0.0.15:7443"));
        assert!(!host_of("https://127.0.0.1.example.net:7443"));
        assert!(!host_of("https://vault.internal:7443"));
    }
}
