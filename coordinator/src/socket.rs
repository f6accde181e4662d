//! UDP socket setup.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::debug;

/// Bind a UDP socket for QUIC with `buffer` bytes of kernel send and receive
/// buffer. Large buffers keep a burst of handshakes, or a fast stream, from
/// being dropped by the kernel before quinn reads it; the kernel may grant
/// less than asked (`net.core.rmem_max`), which is logged at debug.
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // `[::]` also accepts IPv4 where the OS allows it.
        let _ = socket.set_only_v6(false);
    }
    if buffer > 0 {
        let _ = socket.set_recv_buffer_size(buffer);
        let _ = socket.set_send_buffer_size(buffer);
    }
    socket.bind(&addr.into())?;
    debug!(
        recv_buffer = socket.recv_buffer_size().unwrap_or(0),
        send_buffer = socket.send_buffer_size().unwrap_or(0),
        "udp socket bound"
    );
    Ok(socket.into())
}
