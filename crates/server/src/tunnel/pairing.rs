//! Pairing codes: `SECRET-CAPIN`, where SECRET is 100 random bits and CAPIN the first 80 bits of the platform
//! CA's SHA-256 fingerprint, both in RFC 4648 base32 without padding. The agent uses CAPIN to authenticate the
//! server before it sends SECRET, so a code is never revealed to an impostor. The store keeps SHA-256(SECRET).

use sha2::Digest;

use proxyfleet_proto::base32;

/// A fresh code for the CA with fingerprint `ca_fp`, and the hash the store keeps.
pub fn new_code(ca_fp: &[u8; 32]) -> (String, String) {
    let secret = base32::encode(&rand::random::<[u8; 13]>()[..])[..20].to_owned();
    let code = format!("{secret}-{}", base32::encode(&ca_fp[..10]));
    (code, secret_hash(&secret))
}

/// SHA-256 of the secret part, hex.
pub fn secret_hash(secret: &str) -> String {
    crate::pki::hex(&sha2::Sha256::digest(
        secret.trim().to_ascii_uppercase().as_bytes(),
    ))
}

/// The code as an SVG QR code, for the dashboard.
pub fn qr_svg(code: &str) -> String {
    match qrcode::QrCode::new(code.as_bytes()) {
        Ok(qr) => qr
            .render::<qrcode::render::svg::Color<'_>>()
            .min_dimensions(200, 200)
            .quiet_zone(true)
            .build(),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_carry_the_ca_pin_and_are_stored_hashed() {
        let fp = [7u8; 32];
        let (code, hash) = new_code(&fp);
        let (secret, pin) = code.split_once('-').unwrap();
        assert_eq!(secret.len(), 20);
        assert_eq!(pin, base32::encode(&fp[..10]));
        assert_eq!(hash, secret_hash(secret));
        assert_eq!(
            hash,
            secret_hash(&secret.to_lowercase()),
            "codes are case-insensitive"
        );
        assert!(!hash.contains(secret));
        assert!(qr_svg(&code).starts_with("<?xml"));
    }
}
