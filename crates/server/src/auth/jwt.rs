//! HS256 JSON Web Tokens for operator sessions.
//!
//! Only HS256 is accepted (`none`, HS512 and every asymmetric algorithm are refused by `Validation::new`), the
//! `exp`, `iat`, `sub`, `iss` and `aud` claims are required, and the leeway is a few seconds. The token lifetime is
//! absolute: activity never extends `exp`; the session's idle timeout is enforced separately.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub const ISSUER: &str = "proxyfleet";
pub const AUDIENCE: &str = "proxyfleet-api";
/// Absolute token lifetime, in seconds (24 h).
pub const TOKEN_LIFETIME_SECS: i64 = 24 * 3600;
/// Allowed clock skew when checking `exp`, in seconds.
pub const LEEWAY_SECS: u64 = 5;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// Operator id.
    pub sub: String,
    pub iss: String,
    pub aud: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
    /// Session key; never shown in any listing.
    pub jti: String,
}

#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("invalid token")]
    Invalid(#[source] jsonwebtoken::errors::Error),
    #[error("could not sign token")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

impl JwtKeys {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iat", "sub", "iss", "aud"]);
        JwtKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, JwtError> {
        encode(&Header::new(Algorithm::HS256), claims, &self.encoding).map_err(JwtError::Sign)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, JwtError> {
        decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|d| d.claims)
            .map_err(JwtError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn claims(exp_offset: i64) -> Claims {
        let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock) / 1000;
        Claims {
            sub: "op".into(),
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            iat: now,
            exp: now + exp_offset,
            jti: "j".into(),
        }
    }

    #[test]
    fn round_trip_and_rejections() {
        let keys = JwtKeys::new(&[7u8; 32]);
        let good = keys.sign(&claims(60)).unwrap();
        assert_eq!(keys.verify(&good).unwrap().sub, "op");

        // Expired beyond leeway.
        assert!(keys.verify(&keys.sign(&claims(-30)).unwrap()).is_err());
        // Other key.
        assert!(JwtKeys::new(&[8u8; 32]).verify(&good).is_err());
        // HS512 with the same secret.
        let hs512 = encode(
            &Header::new(Algorithm::HS512),
            &claims(60),
            &EncodingKey::from_secret(&[7u8; 32]),
        )
        .unwrap();
        assert!(keys.verify(&hs512).is_err());
        // alg none, no signature.
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = good.split('.').nth(1).unwrap();
        let none = format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            payload
        );
        assert!(keys.verify(&none).is_err());
        // Wrong audience.
        let mut c = claims(60);
        c.aud = "other".into();
        assert!(keys.verify(&keys.sign(&c).unwrap()).is_err());
    }
}
