//! The platform PKI: a CA generated on first run, the tunnel's server certificate, and device client
//! certificates signed from the device's own CSR (its private key never leaves the device).
//!
//! Files in the data directory: `ca.pem`, `ca.key`, `tunnel.pem`, `tunnel.key`; keys are mode 0600.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::Digest;

use proxyfleet_proto::enroll::TUNNEL_SERVER_NAME;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("PKI file {path}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate signing request is invalid")]
    BadCsr(#[source] rcgen::Error),
}

pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    pub ca_der: CertificateDer<'static>,
    pub server_chain: Vec<CertificateDer<'static>>,
    server_key_der: Vec<u8>,
}

/// Validity of device certificates, in days. Revocation is by the registry, not by expiry.
const DEVICE_CERT_DAYS: i64 = 3650;

pub(crate) fn read(path: &Path) -> Result<Option<String>, PkiError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PkiError::File {
            path: path.display().to_string(),
            source,
        }),
    }
}

pub(crate) fn write(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| PkiError::File {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

fn ca_params() -> CertificateParams {
    self_signed_ca(
        "proxyfleet platform CA",
        vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ],
    )
}

/// Parameters of a CA valid for 30 years (from yesterday, against clock skew) that signs end certificates only.
pub(crate) fn self_signed_ca(name: &str, key_usages: Vec<KeyUsagePurpose>) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = key_usages;
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365 * 30);
    p
}

impl Pki {
    /// Load the PKI from `dir`, creating whatever is missing.
    pub fn load_or_create(dir: &Path) -> Result<Pki, PkiError> {
        let (ca_pem_path, ca_key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        let (ca_pem, ca_key) = match (read(&ca_pem_path)?, read(&ca_key_path)?) {
            (Some(cert), Some(key)) => (cert, KeyPair::from_pem(&key)?),
            _ => {
                let key = KeyPair::generate()?;
                let cert = ca_params().self_signed(&key)?;
                write(&ca_key_path, &key.serialize_pem(), 0o600)?;
                write(&ca_pem_path, &cert.pem(), 0o644)?;
                tracing::info!("generated the platform CA");
                (cert.pem(), key)
            }
        };
        let ca_der = pem_to_der(&ca_pem)?;
        // Issue under the stored CA's own subject and key identifier, whatever version of this code made it.
        let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key)?;
        let (srv_pem_path, srv_key_path) = (dir.join("tunnel.pem"), dir.join("tunnel.key"));
        let (srv_pem, srv_key) = match (read(&srv_pem_path)?, read(&srv_key_path)?) {
            (Some(c), Some(k)) => (c, k),
            _ => {
                let key = KeyPair::generate()?;
                let mut p = CertificateParams::new(vec![TUNNEL_SERVER_NAME.to_owned()])?;
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
                p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365 * 10);
                let cert = p.signed_by(&key, &issuer)?;
                let _ = std::fs::remove_file(&srv_pem_path);
                let _ = std::fs::remove_file(&srv_key_path);
                write(&srv_key_path, &key.serialize_pem(), 0o600)?;
                write(&srv_pem_path, &cert.pem(), 0o644)?;
                (cert.pem(), key.serialize_pem())
            }
        };
        let server_key_der = KeyPair::from_pem(&srv_key)?.serialize_der();
        Ok(Pki {
            issuer,
            server_chain: vec![pem_to_der(&srv_pem)?, ca_der.clone()],
            ca_der,
            server_key_der,
        })
    }

    pub fn server_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone()))
    }

    /// A 32-byte secret for `purpose`, derived from the server's private key: the same across restarts (the key
    /// is kept in the data directory) and useless to anyone who does not have the key.
    pub fn derived_secret(&self, purpose: &str) -> [u8; 32] {
        use hmac::Mac;
        // HMAC takes any key length, so this cannot fail.
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.server_key_der)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(b"proxyfleet derived secret\0");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Sign a device's CSR. The certificate's subject is the device id; only its public key comes from the CSR.
    pub fn issue_device_cert(
        &self,
        csr_der: &[u8],
        device_id: &str,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let der = rustls::pki_types::CertificateSigningRequestDer::from(csr_der.to_vec());
        let mut csr = CertificateSigningRequestParams::from_der(&der).map_err(PkiError::BadCsr)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, device_id);
        p.distinguished_name = dn;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(DEVICE_CERT_DAYS);
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        csr.params = p;
        Ok(csr.signed_by(&self.issuer)?.der().clone())
    }

    /// SHA-256 of the CA certificate; its first bytes travel inside pairing codes so agents can pin it.
    pub fn ca_fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.ca_der)
    }
}

/// SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(der).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string (either case), or `None` if it is not one.
pub fn unhex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

fn pem_to_der(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::File {
        path: "certificate PEM".into(),
        source: std::io::Error::other(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_persists_and_signs_device_csrs() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path()).unwrap();
        let again = Pki::load_or_create(dir.path()).unwrap();
        assert_eq!(
            pki.ca_fingerprint(),
            again.ca_fingerprint(),
            "the CA is generated once"
        );
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "tunnel.key"] {
            let mode = std::fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        let device_key = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(vec![])
            .unwrap()
            .serialize_request(&device_key)
            .unwrap();
        let cert = again.issue_device_cert(csr.der(), "dev-1").unwrap();
        assert!(!cert.is_empty());
        assert!(pki.issue_device_cert(b"not a csr", "dev-2").is_err());
    }
}
