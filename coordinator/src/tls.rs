//! The coordinator's QUIC server configuration, shared by the server
//! (at start) and a reload (a new certificate).

use std::sync::Arc;

use quinn::VarInt;

use crate::config::Config;

/// The QUIC server configuration for `identity`: TLS with the auth mode's
/// client certificate check, and before the hello one bidirectional
/// stream (the session stream), no unidirectional ones and a small
/// connection window (`hello` opens them up once the client has joined).
pub(crate) fn server_config(
    config: &Config,
    identity: &qmesh_certs::Identity,
) -> Result<quinn::ServerConfig, qmesh_certs::CertError> {
    let mut server = qmesh_certs::server_config_with(identity, config.auth.client_auth())?;
    let mut transport = config.tuning.transport();
    transport.receive_window(VarInt::from_u32(config.pre_auth_window));
    transport.max_concurrent_bidi_streams(VarInt::from_u32(1));
    transport.max_concurrent_uni_streams(VarInt::from_u32(0));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// What an operator wants to know about a certificate: `info`, the
/// status page and the expiry metric show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertSummary {
    /// The DNS names and IP addresses it is valid for.
    pub names: Vec<String>,
    /// Its issuer's distinguished name.
    pub issuer: String,
    /// Its serial number, hex.
    pub serial: String,
    /// Its SHA-256 fingerprint (`sha256:…`).
    pub fingerprint: String,
    /// Valid from (Unix seconds).
    pub not_before: u64,
    /// Valid until (Unix seconds).
    pub not_after: u64,
}

impl CertSummary {
    /// The summary of `identity`'s end-entity certificate, `None` when it
    /// cannot be parsed.
    pub fn of(identity: &qmesh_certs::Identity) -> Option<CertSummary> {
        use x509_parser::extensions::GeneralName;
        let leaf = identity.chain.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => names.push((*d).to_owned()),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => names.push(
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string(),
                        ),
                        16 => names.push(
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string(),
                        ),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        let secs = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
        Some(CertSummary {
            names,
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string().replace(':', ""),
            fingerprint: identity.fingerprint().to_string(),
            not_before: secs(cert.validity().not_before),
            not_after: secs(cert.validity().not_after),
        })
    }

    /// `not_after` as an RFC 3339 UTC time.
    pub fn not_after_text(&self) -> String {
        i64::try_from(self.not_after)
            .ok()
            .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| self.not_after.to_string())
    }
}
