//! TLS for the agent: during enrollment the server is authenticated by the CA pin inside the pairing code; after
//! it, by the CA certificate saved at enrollment. The QUIC client configuration is built here.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;

/// *ring*'s suites, with the one this device seals fastest first: AES-128-GCM where the CPU has AES instructions
/// (10 rounds per block instead of AES-256's 14, at the level TLS 1.3 mandates), ChaCha20-Poly1305 where it has not
/// (a Raspberry Pi's Cortex-A72, many cheap phones). The server honours the client's order, so every tunnel byte is
/// sealed and opened with it.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    prefer_suite(&mut p, preferred_suite());
    Arc::new(p)
}

/// The suite this device offers first (see [`provider`]).
pub fn preferred_suite() -> rustls::CipherSuite {
    fastest_suite(aes_in_hardware())
}

fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

fn fastest_suite(aes_in_hardware: bool) -> rustls::CipherSuite {
    if aes_in_hardware {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    } else {
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
    }
}

/// Move `first` to the front; the others keep their order.
fn prefer_suite(p: &mut CryptoProvider, first: rustls::CipherSuite) {
    p.cipher_suites.sort_by_key(|s| s.suite() != first);
}

/// Accepts a server whose chain contains a CA whose SHA-256 starts with `pin`, and whose certificate that CA
/// signed for the tunnel name.
#[derive(Debug)]
pub struct PinnedCa {
    pub pin: Vec<u8>,
    pub provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha2::Sha256::digest(c.as_ref()).starts_with(&self.pin))
            .ok_or_else(|| {
                rustls::Error::General("the server's CA does not match the pairing code (a mistyped code, or another server)".into())
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A QUIC client configuration: TLS 1.3, the given ALPN, keep-alives so NAT mappings stay open.
pub fn quic_client(
    tls: rustls::ClientConfig,
    keep_alive: Duration,
) -> anyhow::Result<quinn::ClientConfig> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(keep_alive));
    transport.max_idle_timeout(Some(proxyfleet_proto::TUNNEL_IDLE_TIMEOUT.try_into()?));
    // Flows are streams the server opens; allow many at once (the default 100 would cap a busy proxy device).
    transport.max_concurrent_bidi_streams(4096u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

pub fn enroll_tls(pin: Vec<u8>) -> anyhow::Result<rustls::ClientConfig> {
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { pin, provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![proxyfleet_proto::enroll::ALPN_ENROLL.to_vec()];
    Ok(tls)
}

pub fn tunnel_tls(
    ca: CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![proxyfleet_proto::enroll::ALPN_TUNNEL.to_vec()];
    Ok(tls)
}

/// Resolve `HOST:PORT` and open a client endpoint of the matching address family.
pub async fn endpoint_for(server: &str) -> anyhow::Result<(quinn::Endpoint, std::net::SocketAddr)> {
    let addr = tokio::net::lookup_host(server)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{server} did not resolve"))?;
    let bind: std::net::SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let socket = std::net::UdpSocket::bind(bind)?;
    proxyfleet_proto::net::enlarge_udp_buffers(&socket);
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok((endpoint, addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite as C;

    fn order(aes: bool) -> Vec<C> {
        let mut p = rustls::crypto::ring::default_provider();
        prefer_suite(&mut p, fastest_suite(aes));
        p.cipher_suites.iter().map(|s| s.suite()).collect()
    }

    #[test]
    fn the_fastest_suite_for_the_cpu_comes_first_and_none_is_dropped() {
        let all = rustls::crypto::ring::default_provider().cipher_suites.len();
        let with_aes = order(true);
        assert_eq!(with_aes[0], C::TLS13_AES_128_GCM_SHA256);
        assert_eq!(
            with_aes[1],
            C::TLS13_AES_256_GCM_SHA384,
            "the rest keep ring's order"
        );
        let without = order(false);
        assert_eq!(without[0], C::TLS13_CHACHA20_POLY1305_SHA256);
        assert_eq!(with_aes.len(), all);
        assert_eq!(without.len(), all);
    }
}
