//! UDP socket setup (see [`qmesh_certs::transport::bind_udp`]).

pub use qmesh_certs::transport::{bind_udp, SOCKET_BUFFER};
