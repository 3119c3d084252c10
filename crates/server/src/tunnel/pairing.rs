//! Pairing codes: `SECRET-CAPIN`, where SECRET is 100 random bits and CAPIN the first 80 bits of the platform
//! CA's SHA-256 fingerprint, both in RFC 4648 base32 without padding. The agent uses CAPIN to authenticate the
//! server before it sends SECRET, so a code is never revealed to an impostor. The store keeps SHA-256(SECRET).

use sha2::Digest;

const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// RFC 4648 base32, no padding.
pub fn base32(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

/// A fresh code for the CA with fingerprint `ca_fp`, and the hash the store keeps.
pub fn new_code(ca_fp: &[u8; 32]) -> (String, String) {
    let secret = base32(&rand::random::<[u8; 13]>()[..])[..20].to_owned();
    let code = format!("{secret}-{}", base32(&ca_fp[..10]));
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
    fn base32_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI"),
        ];
        for (input, want) in cases {
            assert_eq!(base32(input.as_bytes()), want);
        }
    }

    #[test]
    fn codes_carry_the_ca_pin_and_are_stored_hashed() {
        let fp = [7u8; 32];
        let (code, hash) = new_code(&fp);
        let (secret, pin) = code.split_once('-').unwrap();
        assert_eq!(secret.len(), 20);
        assert_eq!(pin, base32(&fp[..10]));
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
