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
///
/// A party's certificate names that party (its peers verify it by that
/// name), the loopback names (reachable from its own host only), and the
/// host names given for it in `extra_hosts` as `PARTY=NAME`. Two parties'
/// certificates never share a name that is not loopback, so one party
/// cannot pose as another party's analyst door under its host name. An
/// entry without `PARTY=` is refused: it would go into every certificate.
pub fn make_federation(
    ca_name: &str,
    parties: &[String],
    extra_hosts: &[String],
) -> Result<Federation> {
    let mut own_hosts: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for h in extra_hosts {
        let Some((party, name)) = h.split_once('=') else {
            bail!(
                "--host {h}: say whose host name it is, as PARTY=NAME (e.g. --host hospital_a=gw.hospital-a.example); \
                 a name in every party's certificate would let any party pose as another's gateway"
            );
        };
        if !parties.iter().any(|p| p == party) {
            bail!("--host {h}: {party} is not one of the parties");
        }
        // Names compare without case and trailing dot; no wildcards (one
        // would cover other parties' names).
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let name = name.as_str();
        if name.is_empty() || name.contains('*') {
            bail!("--host {h}: give one host name or IP, without wildcards");
        }
        let taken = own_hosts
            .iter()
            .any(|(p, names)| *p != party && names.iter().any(|n| n == name));
        if taken || parties.iter().any(|p| p == name) {
            bail!("--host {h}: {name} already names another party");
        }
        own_hosts.entry(party).or_default().push(name.to_string());
    }
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
        sans.extend(own_hosts.get(p.as_str()).cloned().unwrap_or_default());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dns_names(pem: &str) -> Vec<String> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = p.parse_x509().unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_host_name_goes_into_its_own_partys_certificate_only() {
        let parties = ["a".to_string(), "b".to_string()];
        let f = make_federation("t", &parties, &["a=gw-a.example".into()]).unwrap();
        let a = dns_names(&f.parties[0].1);
        let b = dns_names(&f.parties[1].1);
        assert!(
            a.contains(&"a".to_string()) && a.contains(&"gw-a.example".to_string()),
            "{a:?}"
        );
        assert!(
            !b.contains(&"gw-a.example".to_string()) && !b.contains(&"a".to_string()),
            "{b:?}"
        );
        // A name for every party, another party's id, or an unknown party.
        for bad in ["gw.example", "a=b", "c=gw-c.example"] {
            assert!(
                make_federation("t", &parties, &[bad.to_string()]).is_err(),
                "{bad}"
            );
        }
    }
}
