//! Raw peers: QUIC connections to a coordinator that speak (or break) the
//! protocol with hand-made frames, for tests of what a buggy or hostile
//! peer sends (as h2's `mock` does). TLS is still verified both ways.

use std::net::SocketAddr;

use qmesh_proto::codec::{encode_frame, read_frame};
use qmesh_proto::codes::{ConnCode, RejectCode, StreamCode};
use qmesh_proto::msg::{ClientSession, Greeting, Hello, HelloAnswer, Reject, Welcome};
use qmesh_proto::PROTOCOL_VERSION;
use quinn::{
    ApplicationClose, Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt,
};
use serde::Serialize;

use crate::target::Target;
use crate::{warnings, within, within_ok, STEP};

/// The bytes of one frame holding `msg`.
pub fn frame<M: Serialize>(msg: &M) -> Vec<u8> {
    encode_frame(msg).expect("encode frame")
}

/// A hello of this protocol version for `name`, taking no direct channels.
pub fn hello(name: &str) -> Greeting {
    Greeting::Hello(Hello {
        version: PROTOCOL_VERSION,
        name: name.into(),
        direct: None,
    })
}

/// A hello followed by the (empty) interface list that the protocol sends
/// with it.
pub fn hello_frames(hello: &Greeting) -> Vec<u8> {
    let mut bytes = frame(hello);
    bytes.extend(frame(&ClientSession::Interfaces { list: vec![] }));
    bytes
}

/// A stop code as quinn reports it.
pub fn stream_code(code: StreamCode) -> Option<VarInt> {
    Some(VarInt::from_u32(code.code()))
}

/// A client endpoint on a port of its own on 127.0.0.1, and that port.
pub fn endpoint() -> (Endpoint, u16) {
    let endpoint =
        Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("client endpoint");
    let port = endpoint.local_addr().expect("local address").port();
    (endpoint, port)
}

/// Connect without a client certificate, from an endpoint of its own;
/// returns that endpoint's port and how the connection ended, which must
/// be a refusal in (or right after) the handshake.
pub async fn without_certificate(target: &Target) -> (u16, ConnectionError) {
    let (endpoint, port) = endpoint();
    let (config, _report) = qmesh_certs::client_config(&target.trust).expect("client config");
    let connecting = endpoint
        .connect_with(config, target.addr, "localhost")
        .expect("start handshake");
    let closed = within(STEP, "refusal in the handshake", async {
        match connecting.await {
            Err(e) => e,
            Ok(c) => {
                // The client may finish its side of the handshake before
                // the coordinator has checked it.
                let _ = c.open_bi().await;
                c.closed().await
            }
        }
    })
    .await;
    (port, closed)
}

/// A QUIC connection to a coordinator that has said nothing yet.
#[derive(Debug)]
pub struct Raw {
    _endpoint: Endpoint,
    /// The connection.
    pub conn: Connection,
    /// The address the coordinator sees this peer at (it logs it).
    pub local: SocketAddr,
}

impl Raw {
    /// Connect from an endpoint of its own, presenting the target's client
    /// certificate (TLS verified against the target's trust), without
    /// saying hello.
    pub async fn connect(target: &Target) -> Raw {
        within_ok(
            STEP,
            "raw handshake",
            Raw::try_connect_from(target, [127, 0, 0, 1].into()),
        )
        .await
    }

    /// Connect as [`Raw::connect`] does, from a port of its own on `ip` (any
    /// 127.0.0.0/8 address works on Linux loopback); the handshake's
    /// error when the coordinator refuses it.
    pub async fn try_connect_from(
        target: &Target,
        ip: std::net::IpAddr,
    ) -> Result<Raw, ConnectionError> {
        let (config, _report) =
            qmesh_certs::client_config_with_identity(&target.trust, &target.identity)
                .expect("client config");
        let endpoint = Endpoint::client(SocketAddr::new(ip, 0)).expect("client endpoint");
        let local = endpoint.local_addr().expect("local address");
        let connecting = endpoint
            .connect_with(config, target.addr, "localhost")
            .expect("start handshake");
        let conn = connecting.await?;
        Ok(Raw {
            _endpoint: endpoint,
            conn,
            local,
        })
    }

    /// Say a valid hello as `name` on this connection and read the welcome;
    /// returns the session stream with it.
    pub async fn say_hello(self, name: &str) -> (Raw, SendStream, RecvStream) {
        let (send, mut recv) = self.send_bi(&hello_frames(&hello(name))).await;
        let reply = self.reply(&mut recv).await;
        assert!(
            matches!(reply, Some(HelloAnswer::Welcome(Welcome { observed, .. })) if observed == self.local),
            "expected a welcome for {name}, got {reply:?}"
        );
        (self, send, recv)
    }

    /// Connect, say a valid hello as `name` and read the welcome; returns
    /// the session stream with it.
    pub async fn join(target: &Target, name: &str) -> (Raw, SendStream, RecvStream) {
        Raw::connect(target).await.say_hello(name).await
    }

    /// Open a bidirectional stream (the first one is the session stream).
    pub async fn open_bi(&self) -> (SendStream, RecvStream) {
        within_ok(STEP, "open bi stream", self.conn.open_bi()).await
    }

    /// Open a bidirectional stream and write `bytes` on it, leaving it
    /// open. Hold the send half to keep it open: quinn finishes a stream
    /// whose send half is dropped.
    pub async fn send_bi(&self, bytes: &[u8]) -> (SendStream, RecvStream) {
        let (mut send, recv) = self.open_bi().await;
        within_ok(STEP, "write", send.write_all(bytes)).await;
        (send, recv)
    }

    /// As [`Raw::send_bi`], then finish the stream.
    pub async fn send_bi_finished(&self, bytes: &[u8]) -> (SendStream, RecvStream) {
        let (mut send, recv) = self.send_bi(bytes).await;
        send.finish().expect("finish");
        (send, recv)
    }

    /// The coordinator's answer to a hello on the session stream `recv`.
    pub async fn reply(&self, recv: &mut RecvStream) -> Option<HelloAnswer> {
        within_ok(STEP, "reply", read_frame::<HelloAnswer, _>(recv)).await
    }

    /// Wait for the coordinator to close this connection.
    pub async fn closed(&self) -> ApplicationClose {
        match within(STEP, "raw connection closed", self.conn.closed()).await {
            ConnectionError::ApplicationClosed(c) => c,
            other => panic!("expected the coordinator to close the connection, got: {other}"),
        }
    }

    /// The code the coordinator closed this connection with, when it is
    /// one of ours.
    pub async fn close_code(&self) -> Option<ConnCode> {
        ConnCode::from_code(self.closed().await.error_code.into_inner())
    }

    /// Wait for the coordinator to close this connection; check the code.
    pub async fn closed_with(&self, code: ConnCode) -> ApplicationClose {
        let close = self.closed().await;
        assert_eq!(
            close.error_code,
            VarInt::from_u32(code.code()),
            "expected the coordinator to close with {code}, got: {close}"
        );
        close
    }

    /// Closed with `code`, and the coordinator said so at `warn` naming
    /// this peer's address ([`warnings::install`] must have run).
    pub async fn closed_for_violation(&self, code: ConnCode) {
        self.closed_with(code).await;
        let peer = self.local.to_string();
        let code_text = code.to_string();
        assert!(
            warnings::logged(&[&peer, &code_text]),
            "no warning names {peer} and \"{code_text}\""
        );
    }

    /// Read the coordinator's reject on `recv`, then its close; check both
    /// carry `code`. Returns the reject's message and the close.
    pub async fn rejected_with(
        &self,
        mut recv: RecvStream,
        code: RejectCode,
    ) -> (String, ApplicationClose) {
        let reply = self.reply(&mut recv).await;
        let message = match reply {
            Some(HelloAnswer::Reject(Reject { code: c, message })) if c == code => message,
            other => panic!("expected a {code:?} reject, got {other:?}"),
        };
        let close = self.closed_with(code.conn_code()).await;
        (message, close)
    }
}
