//! `council certs`: a federation CA and one certificate and key per party.
//!
//! A party's certificate names the party id as its Common Name (the identity
//! gateways read) and as a DNS name (what a connecting peer verifies), plus
//! `localhost`, 127.0.0.1 and ::1 and any extra host names for analysts.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The files `certs` writes, relative to the output folder.
pub fn ca_cert_file() -> &'static str {
    "ca.pem"
}
pub fn party_cert_file(party: &str) -> String {
    format!("{party}.pem")
}
pub fn party_key_file(party: &str) -> String {
    format!("{party}.key")
}

/// PEM texts of a fresh federation.
pub struct Federation {
    pub ca_cert: String,
    pub ca_key: String,
    /// (party, cert PEM, key PEM)
    pub parties: Vec<(String, String, String)>,
}

pub fn check_party_id(p: &str) -> Result<()> {
    if p.is_empty()
        || p.len() > 63
        || !p
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        || !p.chars().next().is_some_and(|c| c.is_ascii_lowercase())
    {
        bail!("party id `{p}` is not valid: use 1-63 lower-case letters, digits, `_` or `-`, starting with a letter");
    }
    Ok(())
}

/// Makes a CA named `ca_name` and certificates for `parties`.
pub fn make_federation(
    ca_name: &str,
    parties: &[String],
    extra_hosts: &[String],
) -> Result<Federation> {
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    ca_params
        .distinguished_name
        .push(DnType::OrganizationName, "Council federation");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("signing the CA certificate")?;
    let ca_cert_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let mut out = Vec::new();
    for p in parties {
        check_party_id(p)?;
        let key = KeyPair::generate().context("generating a party key")?;
        let mut sans = vec![
            p.clone(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        sans.extend(extra_hosts.iter().cloned());
        let mut params =
            CertificateParams::new(sans).with_context(|| format!("certificate names for {p}"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, p.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Council federation");
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &issuer)
            .with_context(|| format!("signing the certificate of {p}"))?;
        out.push((p.clone(), cert.pem(), key.serialize_pem()));
    }
    Ok(Federation {
        ca_cert: ca_cert_pem,
        ca_key: ca_key_pem,
        parties: out,
    })
}

/// Writes a federation to `dir`: ca.pem, ca.key, PARTY.pem, PARTY.key.
pub fn write_federation(f: &Federation, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_file(&dir.join(ca_cert_file()), &f.ca_cert, false)?;
    write_file(&dir.join("ca.key"), &f.ca_key, true)?;
    for (p, cert, key) in &f.parties {
        write_file(&dir.join(party_cert_file(p)), cert, false)?;
        write_file(&dir.join(party_key_file(p)), key, true)?;
    }
    Ok(())
}

fn write_file(path: &Path, text: &str, secret: bool) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    let _ = secret;
    Ok(())
}
