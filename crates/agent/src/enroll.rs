//! `proxyfleet-agent enroll`: trade a pairing code for a device certificate. The key pair is made here and the
//! private key never leaves the device; only a CSR is sent.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::StreamExt;
use proxyfleet_proto::codec::frame;
use proxyfleet_proto::enroll::{EnrollRequest, EnrollResponse, MAX_ENROLL_FRAME};
use proxyfleet_proto::{FrameCodec, PROTOCOL_VERSION};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::FramedRead;

use crate::state::{AgentState, StateDir};
use crate::tls;

/// Each network step of enrollment must finish within this.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// Split `SECRET-PIN` and decode the CA pin.
pub fn parse_code(code: &str) -> anyhow::Result<(String, Vec<u8>)> {
    let code = code.trim().to_ascii_uppercase();
    let (secret, pin) = code.rsplit_once('-').ok_or_else(|| {
        anyhow::anyhow!("pairing code must look like XXXXXXXXXXXXXXXXXXXX-YYYYYYYYYYYYYYYY")
    })?;
    let pin = proxyfleet_proto::base32::decode(pin)
        .ok_or_else(|| anyhow::anyhow!("pairing code is damaged (bad CA pin)"))?;
    if secret.len() < 16 || pin.len() < 8 {
        bail!("pairing code is too short; copy it whole from the dashboard");
    }
    Ok((secret.to_owned(), pin))
}

/// Enroll with the server at `server` (`HOST:PORT` of its tunnel listener) and save the identity in `state_dir`.
/// Returns the device id.
pub async fn enroll(server: &str, code: &str, state_dir: &Path) -> anyhow::Result<String> {
    let (secret, pin) = parse_code(code)?;
    let dir = StateDir::new(state_dir);
    dir.create()?;
    let key = rcgen::KeyPair::generate().context("generating the device key")?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)
        .context("making the certificate signing request")?;

    let conn = crate::conn::connect(server, || tls::enroll_tls(pin.clone()))
        .await
        .context("could not connect to the server (is the address its tunnel port, and the pairing code copied whole?)")?;
    let (recv, mut send) = conn.open_bi().await?;
    let req = EnrollRequest {
        protocol_version: PROTOCOL_VERSION,
        code: secret,
        csr_der: csr.der().to_vec(),
    };
    send.write_all(&frame(&req)).await?;
    send.flush().await?;
    let mut reader = FramedRead::new(recv, FrameCodec::<EnrollResponse>::new(MAX_ENROLL_FRAME));
    let resp = tokio::time::timeout(STEP_TIMEOUT, reader.next())
        .await
        .context("timed out waiting for the server's answer")?
        .context("the server closed the connection without answering")??;
    conn.close().await;
    match resp {
        EnrollResponse::Refused { message } => bail!("enrollment refused: {message}"),
        EnrollResponse::Enrolled {
            device_id,
            cert_der,
            ca_der,
        } => {
            dir.write_private(&dir.key(), key.serialize_pem().as_bytes())?;
            dir.write_private(&dir.cert(), &cert_der)?;
            dir.write_private(&dir.ca(), &ca_der)?;
            let state = AgentState {
                server: server.to_owned(),
                device_id: device_id.clone(),
            };
            dir.write_private(&dir.state(), &serde_json::to_vec_pretty(&state)?)?;
            Ok(device_id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_parse_and_damage_is_reported() {
        let (secret, pin) = parse_code(" abcdefghijklmnopqrst-GAYTEMZUGU3DOOBZ\n").unwrap();
        assert_eq!(secret, "ABCDEFGHIJKLMNOPQRST");
        assert_eq!(pin, b"0123456789");
        assert!(
            parse_code("abcdefghijklmnopqrst-MZXW6YTBOI").is_err(),
            "pin too short"
        );
        assert!(
            parse_code("abcdefghijklmnopqrst-GAYTEMZUGU3DOOB1").is_err(),
            "not base32"
        );
        assert!(parse_code("no-dash-but-bad!").is_err());
        assert!(parse_code("nodash").is_err());
        assert!(parse_code("SHORT-MZXW6YTBOI").is_err());
    }
}
