//! Enrollment: one request and one response on a stream of a connection made with the enrollment ALPN.
//!
//! The agent proves it holds a pairing code and sends a certificate signing request (its private key never
//! leaves the device); the server answers with the signed client certificate and the CA certificate to pin.

use bytes::{BufMut, BytesMut};

use crate::wire::{put_bytes, put_string, Decode, DecodeError, Encode, Reader, MAX_STRING};

/// ALPN of enrollment connections.
pub const ALPN_ENROLL: &[u8] = b"proxyfleet-enroll/1";
/// ALPN of tunnel connections.
pub const ALPN_TUNNEL: &[u8] = b"proxyfleet-tunnel/1";
/// Name the tunnel's server certificate carries and agents verify, whatever address they dial.
pub const TUNNEL_SERVER_NAME: &str = "tunnel.proxyfleet.invalid";
/// Largest certificate or CSR, DER bytes.
pub const MAX_DER: usize = 8 * 1024;
/// Largest enrollment frame body.
pub const MAX_ENROLL_FRAME: usize = 3 * MAX_DER;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollRequest {
    pub protocol_version: u16,
    /// The secret part of the pairing code.
    pub code: String,
    /// PKCS#10 certificate signing request, DER.
    pub csr_der: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollResponse {
    Enrolled {
        device_id: String,
        /// The device's client certificate, DER.
        cert_der: Vec<u8>,
        /// The platform CA certificate to pin, DER.
        ca_der: Vec<u8>,
    },
    /// Shown to the person enrolling, as is.
    Refused { message: String },
}

impl Encode for EnrollRequest {
    fn encode(&self, out: &mut BytesMut) {
        out.put_u16(self.protocol_version);
        put_string(out, &self.code, 128);
        put_bytes(out, &self.csr_der);
    }
}

impl Decode for EnrollRequest {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(EnrollRequest {
            protocol_version: r.u16()?,
            code: r.string("pairing code", 128)?,
            csr_der: r.bytes("csr", MAX_DER)?,
        })
    }
}

impl Encode for EnrollResponse {
    fn encode(&self, out: &mut BytesMut) {
        match self {
            EnrollResponse::Enrolled {
                device_id,
                cert_der,
                ca_der,
            } => {
                out.put_u8(1);
                put_string(out, device_id, 128);
                put_bytes(out, cert_der);
                put_bytes(out, ca_der);
            }
            EnrollResponse::Refused { message } => {
                out.put_u8(2);
                put_string(out, message, MAX_STRING);
            }
        }
    }
}

impl Decode for EnrollResponse {
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            1 => EnrollResponse::Enrolled {
                device_id: r.string("device id", 128)?,
                cert_der: r.bytes("certificate", MAX_DER)?,
                ca_der: r.bytes("ca certificate", MAX_DER)?,
            },
            2 => EnrollResponse::Refused {
                message: r.string("refusal message", MAX_STRING)?,
            },
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "enroll response",
                    tag,
                })
            }
        })
    }
}
