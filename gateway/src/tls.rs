//! TLS for both channels, with rustls and an explicitly installed provider.
//!
//! - Peer channel: mutual TLS. The server requires a client certificate from
//!   the federation CA and reads the party id from its Common Name; the
//!   client verifies that the server's certificate names the peer it meant
//!   to reach. Any other CA, or another party id, is refused.
//! - Analyst channel: server-authenticated TLS; analysts log in with a
//!   password on top.

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Installs ring as the process's rustls provider (once; later calls are no-ops).
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A party's TLS material, parsed.
#[derive(Clone, Debug)]
pub struct TlsMaterial {
    pub ca: Vec<CertificateDer<'static>>,
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
}

pub fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{what}: not a PEM certificate: {e}"))?;
    if certs.is_empty() {
        bail!("{what}: no certificate found in the PEM text");
    }
    Ok(certs)
}

impl TlsMaterial {
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let ca = parse_certs(ca_pem, "CA certificate")?;
        let cert_chain = parse_certs(cert_pem, "party certificate")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| anyhow!("party key: not a PEM private key: {e}"))?;
        Ok(TlsMaterial {
            ca,
            cert_chain,
            key: Arc::new(key),
        })
    }

    pub fn from_files(
        ca: &std::path::Path,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<Self> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        Self::from_pem(&read(ca)?, &read(cert)?, &read(key)?)
    }

    fn roots(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).context("adding the federation CA")?;
        }
        Ok(roots)
    }

    /// Server side of the peer channel: client certificates required.
    pub fn peer_server_config(&self) -> Result<Arc<ServerConfig>> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider())
                .build()
                .context("building the client-certificate verifier")?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.cert_chain.clone(), self.key.clone_key())
            .context("loading the party certificate and key")?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// Client side of the peer channel: presents our certificate.
    pub fn peer_client_config(&self) -> Result<Arc<ClientConfig>> {
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.cert_chain.clone(), self.key.clone_key())
            .context("loading the party certificate and key")?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The PostgreSQL channel: server authentication only, no ALPN.
    pub fn pg_server_config(&self) -> Result<Arc<ServerConfig>> {
        let mut cfg = (*self.analyst_server_config()?).clone();
        cfg.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The analyst channel: server authentication only.
    pub fn analyst_server_config(&self) -> Result<Arc<ServerConfig>> {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.cert_chain.clone(), self.key.clone_key())
            .context("loading the party certificate and key")?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// A client config trusting `ca_pem` only (for analysts).
pub fn analyst_client_config(ca_pem: &str) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for c in parse_certs(ca_pem, "CA certificate")? {
        roots.add(c).context("adding the CA certificate")?;
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The party id a verified certificate names (its Common Name), which must
/// also be one of its DNS names.
pub fn party_of(cert: &CertificateDer<'_>) -> Result<String> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| anyhow!("unreadable certificate: {e}"))?;
    let cn = x
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .ok_or_else(|| anyhow!("certificate has no Common Name"))?
        .to_string();
    let in_san =
        x.subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value.general_names.iter().any(
                    |n| matches!(n, x509_parser::extensions::GeneralName::DNSName(d) if *d == cn),
                )
            })
            .unwrap_or(false);
    if !in_san {
        bail!("certificate for `{cn}` does not list it as a DNS name");
    }
    Ok(cn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_party_id_is_read_from_the_certificate() {
        let fed =
            crate::certs::make_federation("test CA", &["hospital_a".into(), "bank-b".into()], &[])
                .unwrap();
        for (p, cert, key) in &fed.parties {
            let m = TlsMaterial::from_pem(&fed.ca_cert, cert, key).unwrap();
            assert_eq!(&party_of(&m.cert_chain[0]).unwrap(), p);
            m.peer_server_config().unwrap();
            m.peer_client_config().unwrap();
        }
        // The CA itself has no DNS name: not a party.
        let ca = parse_certs(&fed.ca_cert, "ca").unwrap();
        assert!(party_of(&ca[0]).is_err());
        assert!(parse_certs("not a pem", "x")
            .unwrap_err()
            .to_string()
            .contains("no certificate"));
        assert!(crate::certs::make_federation("x", &["Bad Name".into()], &[]).is_err());
    }
}
