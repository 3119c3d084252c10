//! The OpenVPN door's keys, generated once into `DATA_DIR/openvpn/` (keys mode 0600): a CA of its own (so that
//! nothing a customer's profile trusts can vouch for a device, and the reverse), the server certificate, and the
//! tls-crypt key. Also the customer profile (`.ovpn`) built from them.

use std::path::{Path, PathBuf};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::pki::{read, write, PkiError};

/// Common name of the server certificate; profiles check it with `verify-x509-name`.
pub const SERVER_NAME: &str = "proxyfleet-openvpn";
/// Bytes of a tls-crypt key ("OpenVPN Static key V1": 2048 bits).
const TLS_CRYPT_BYTES: usize = 256;

/// The door's key material, as OpenVPN and profiles use it.
pub struct Keys {
    pub dir: PathBuf,
    pub ca_pem: String,
    pub tls_crypt: String,
}

impl Keys {
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn tls_crypt_path(&self) -> PathBuf {
        self.dir.join("tls-crypt.key")
    }

    /// Load the keys from `dir`, generating whatever is missing (a new CA also means a new server certificate).
    pub fn load_or_create(dir: &Path) -> Result<Keys, PkiError> {
        let io = |source| PkiError::File {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        let (ca_pem_path, ca_key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        let (srv_pem_path, srv_key_path) = (dir.join("server.pem"), dir.join("server.key"));
        let (ca_pem, ca_key, fresh_ca) = match (read(&ca_pem_path)?, read(&ca_key_path)?) {
            (Some(c), Some(k)) => (c, KeyPair::from_pem(&k)?, false),
            _ => {
                let key = KeyPair::generate()?;
                let cert = ca_params().self_signed(&key)?;
                for p in [&ca_pem_path, &ca_key_path] {
                    let _ = std::fs::remove_file(p);
                }
                write(&ca_key_path, &key.serialize_pem(), 0o600)?;
                write(&ca_pem_path, &cert.pem(), 0o644)?;
                tracing::info!("generated the OpenVPN CA");
                (cert.pem(), key, true)
            }
        };
        let have_server = read(&srv_pem_path)?.is_some() && read(&srv_key_path)?.is_some();
        if fresh_ca || !have_server {
            let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, SERVER_NAME);
            p.distinguished_name = dn;
            // What `remote-cert-tls server` checks.
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyAgreement,
            ];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
            p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365 * 10);
            let cert = p.signed_by(&key, &issuer)?;
            for p in [&srv_pem_path, &srv_key_path] {
                let _ = std::fs::remove_file(p);
            }
            write(&srv_key_path, &key.serialize_pem(), 0o600)?;
            write(&srv_pem_path, &cert.pem(), 0o644)?;
        }
        let tc_path = dir.join("tls-crypt.key");
        let tls_crypt = match read(&tc_path)? {
            Some(k) if parse_static_key(&k).is_some() => k,
            _ => {
                let _ = std::fs::remove_file(&tc_path);
                let k = static_key(&rand::random::<[u8; TLS_CRYPT_BYTES]>());
                write(&tc_path, &k, 0o600)?;
                k
            }
        };
        Ok(Keys {
            dir: dir.to_owned(),
            ca_pem,
            tls_crypt,
        })
    }
}

fn ca_params() -> CertificateParams {
    crate::pki::self_signed_ca(
        "proxyfleet OpenVPN CA",
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign],
    )
}

const BEGIN: &str = "-----BEGIN OpenVPN Static key V1-----";
const END: &str = "-----END OpenVPN Static key V1-----";

/// OpenVPN's "Static key V1" layout: lowercase hex, 16 bytes per line, between the markers.
pub fn static_key(bytes: &[u8]) -> String {
    let mut s = String::from("#\n# proxyfleet tls-crypt key\n#\n");
    s.push_str(BEGIN);
    s.push('\n');
    for line in bytes.chunks(16) {
        s.push_str(&crate::pki::hex(line));
        s.push('\n');
    }
    s.push_str(END);
    s.push('\n');
    s
}

/// The key bytes of a "Static key V1" text, if it is one of [`TLS_CRYPT_BYTES`] bytes.
pub fn parse_static_key(text: &str) -> Option<Vec<u8>> {
    let body = text.split_once(BEGIN)?.1.split_once(END)?.0;
    let hex: String = body.split_whitespace().collect();
    if hex.len() != TLS_CRYPT_BYTES * 2 {
        return None;
    }
    crate::pki::unhex(&hex)
}

/// What a profile needs besides the keys.
pub struct ProfileTarget<'a> {
    pub host: &'a str,
    pub port: u16,
    /// `udp` or `tcp`.
    pub proto: &'a str,
}

/// A customer's `.ovpn`. With `password`, the credentials are inline (OpenVPN 2.6 `<auth-user-pass>`); without,
/// only the username is, and the client asks for the password.
pub fn profile(
    keys: &Keys,
    target: &ProfileTarget<'_>,
    username: &str,
    password: Option<&str>,
) -> String {
    let proto = if target.proto == "tcp" {
        "tcp-client"
    } else {
        "udp"
    };
    let mut s = format!(
        "# proxyfleet connection {username}\n\
         client\n\
         dev tun\n\
         proto {proto}\n\
         remote {host} {port}\n\
         nobind\n\
         persist-tun\n\
         resolv-retry infinite\n\
         remote-cert-tls server\n\
         verify-x509-name {SERVER_NAME} name\n\
         data-ciphers AES-256-GCM:AES-128-GCM:CHACHA20-POLY1305\n\
         auth-retry nointeract\n\
         verb 3\n",
        host = target.host,
        port = target.port,
    );
    if proto == "udp" {
        s.push_str("explicit-exit-notify 1\n");
    }
    s.push_str("<ca>\n");
    s.push_str(keys.ca_pem.trim_end());
    s.push_str("\n</ca>\n<tls-crypt>\n");
    s.push_str(keys.tls_crypt.trim_end());
    s.push_str("\n</tls-crypt>\n<auth-user-pass>\n");
    s.push_str(username);
    s.push('\n');
    if let Some(p) = password {
        s.push_str(p);
        s.push('\n');
    }
    s.push_str("</auth-user-pass>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_made_once_private_and_well_formed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("openvpn");
        let k = Keys::load_or_create(&d).unwrap();
        let again = Keys::load_or_create(&d).unwrap();
        assert_eq!(k.ca_pem, again.ca_pem);
        assert_eq!(k.tls_crypt, again.tls_crypt);
        use std::os::unix::fs::PermissionsExt;
        for f in ["ca.key", "server.key", "tls-crypt.key"] {
            let mode = std::fs::metadata(d.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let bytes = parse_static_key(&k.tls_crypt).expect("a static key");
        assert_eq!(bytes.len(), TLS_CRYPT_BYTES);
        let lines: Vec<&str> = k
            .tls_crypt
            .lines()
            .filter(|l| l.len() == 32 && l.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect();
        assert_eq!(lines.len(), 16, "16 lines of 16 bytes");
        assert!(lines.iter().all(|l| *l == l.to_lowercase()));
        assert_eq!(static_key(&bytes), k.tls_crypt, "round trip");
        assert!(parse_static_key(
            "-----BEGIN OpenVPN Static key V1-----\nabcd\n-----END OpenVPN Static key V1-----"
        )
        .is_none());
    }

    #[test]
    fn profile_carries_what_the_client_needs() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keys::load_or_create(dir.path()).unwrap();
        let t = ProfileTarget {
            host: "vpn.example.com",
            port: 1194,
            proto: "udp",
        };
        let with = profile(&k, &t, "pfabcdefghij", Some("Secret123"));
        for needle in [
            "remote vpn.example.com 1194",
            "remote-cert-tls server",
            "verify-x509-name proxyfleet-openvpn name",
            "data-ciphers AES-256-GCM",
            "auth-retry nointeract",
            // Reconnects keep the tun and its routes: traffic waits (or fails) instead of leaving unprotected.
            "persist-tun",
            "<ca>\n-----BEGIN CERTIFICATE-----",
            "<tls-crypt>",
            "<auth-user-pass>\npfabcdefghij\nSecret123\n</auth-user-pass>",
        ] {
            assert!(with.contains(needle), "{needle} missing:\n{with}");
        }
        assert!(
            !with.contains("<cert>") && !with.contains("<key>"),
            "no client certificate"
        );
        let without = profile(&k, &t, "pfabcdefghij", None);
        assert!(without.contains("<auth-user-pass>\npfabcdefghij\n</auth-user-pass>"));
        assert!(!without.contains("Secret123"));
    }
}
