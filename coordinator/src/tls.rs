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
