#!/usr/bin/env python3
"""A hostile qmesh peer on another QUIC stack (aioquic).

Usage: aioquic_peer.py HOST PORT CA_FILE ATTACK [HELLO_HEX]

With ATTACK_FROM=127.0.0.2 in the environment, every connection is made
from that IPv4 address (aioquic itself always binds `::`), so the peer is
another host than honest clients on 127.0.0.1.

Attacks (each prints one line `ATTACK: RESULT` and exits 0 when the
coordinator answered as qmesh documents, 1 otherwise):

- no-cert: a handshake without a client certificate; the coordinator must
  end it with a TLS alert (a CRYPTO_ERROR close, 0x100 + alert).
- garbage: with a client certificate, garbage on the first stream; the
  coordinator must close the connection with qmesh code 2 (Malformed).
- huge-prefix: a 4 GiB length prefix, then silence; qmesh code 3
  (FrameTooLarge), without waiting for the body.
- many-streams: after a valid hello (HELLO_HEX, from the test), 1,000
  unidirectional streams opened at once, each with one byte; the
  coordinator must stop them or hold them within its stream limits, and
  the session must stay up (a ping on the session stream still answered
  is not checked here: the connection staying open for 3 s is).
- partial-frames: after a valid hello (HELLO_HEX), 1,000 unidirectional
  streams opened at once, each with a 16 KiB length prefix and only 8 KiB
  of the frame; the coordinator must stop the streams past the session's
  header budget (256 KiB) and, past 32 such strikes, close the session
  with qmesh code 2 (Malformed); a session still up after 5 s also
  passes. The test runs eight of these at once and records the
  coordinator's memory.
- silent: 200 connections that complete the handshake and say nothing
  (fewer than the quarter of `max_pending` where the per-source cap
  starts, so none is refused for it); the coordinator must close every one
  at its hello timeout; none may stay.
"""

import asyncio
import datetime
import os
import socket
import ssl
import sys
import tempfile

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ALPN = "qmesh/1"


def bind_from(ipv4):
    """Make aioquic's sockets (dual-stack, bound to `::`) send from `ipv4`."""
    plain = socket.socket.bind

    def bind(self, address):
        if self.family == socket.AF_INET6 and address[0] == "::":
            address = (f"::ffff:{ipv4}",) + tuple(address[1:])
        return plain(self, address)

    socket.socket.bind = bind


class Watcher(QuicConnectionProtocol):
    """Records how the connection ended."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ended = asyncio.get_event_loop().create_future()

    def quic_event_received(self, event):
        if isinstance(event, ConnectionTerminated) and not self.ended.done():
            self.ended.set_result((event.error_code, event.frame_type, event.reason_phrase))
        super().quic_event_received(event)


def self_signed(directory):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("mallory")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = f"{directory}/mallory.pem"
    key_path = f"{directory}/mallory-key.pem"
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def configuration(ca, cert=None):
    cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
    cfg.load_verify_locations(ca)
    cfg.verify_mode = ssl.CERT_REQUIRED
    cfg.server_name = "localhost"
    cfg.idle_timeout = 30.0
    if cert:
        cfg.load_cert_chain(cert[0], cert[1])
    return cfg


async def ended(client, seconds):
    try:
        return await asyncio.wait_for(asyncio.shield(client.ended), seconds)
    except asyncio.TimeoutError:
        return None


async def one_stream(host, port, ca, cert, payload):
    async with connect(
        host, port, configuration=configuration(ca, cert), create_protocol=Watcher,
        wait_connected=True,
    ) as client:
        stream = client._quic.get_next_available_stream_id()
        client._quic.send_stream_data(stream, payload, end_stream=False)
        client.transmit()
        return await ended(client, 10)


async def no_cert(host, port, ca, _cert):
    try:
        async with connect(
            host, port, configuration=configuration(ca), create_protocol=Watcher,
            wait_connected=True,
        ) as client:
            end = await ended(client, 10)
    except ConnectionError as e:
        return True, f"refused in the handshake ({e})"
    if end and 0x100 <= end[0] <= 0x1FF:
        return True, f"closed with TLS alert {end[0] - 0x100} ({end[2]})"
    return False, f"the connection ended {end}"


async def garbage(host, port, ca, cert):
    end = await one_stream(host, port, ca, cert, b"\x00\x00\x00\x05\xff\xff\xff\xff\xff")
    return (end is not None and end[0] == 2), f"ended {end}"


async def huge_prefix(host, port, ca, cert):
    end = await one_stream(host, port, ca, cert, b"\xff\xff\xff\xff")
    return (end is not None and end[0] == 3), f"ended {end}"


async def many_streams(host, port, ca, cert, hello):
    async with connect(
        host, port, configuration=configuration(ca, cert), create_protocol=Watcher,
        wait_connected=True,
    ) as client:
        quic = client._quic
        # Through aioquic's stream objects, kept alive: a writer that is
        # garbage-collected closes its stream, and a finished session stream
        # means leaving.
        reader, writer = await client.create_stream()
        writer.write(hello)
        await asyncio.sleep(0.5)
        opened = 0
        for _ in range(1000):
            try:
                stream = quic.get_next_available_stream_id(is_unidirectional=True)
                quic.send_stream_data(stream, b"\x00", end_stream=False)
                opened += 1
            except Exception:
                break
        client.transmit()
        end = await ended(client, 3)
        del reader, writer
        if end is not None:
            return False, f"the session was closed: {end}"
        return True, f"{opened} streams queued, the session is still up"


async def partial_frames(host, port, ca, cert, hello):
    async with connect(
        host, port, configuration=configuration(ca, cert), create_protocol=Watcher,
        wait_connected=True,
    ) as client:
        quic = client._quic
        reader, writer = await client.create_stream()
        writer.write(hello)
        await asyncio.sleep(0.5)
        partial = (16 * 1024).to_bytes(4, "big") + bytes(8 * 1024)
        opened = 0
        for _ in range(1000):
            try:
                stream = quic.get_next_available_stream_id(is_unidirectional=True)
                quic.send_stream_data(stream, partial, end_stream=False)
                opened += 1
            except Exception:
                break
        client.transmit()
        end = await ended(client, 5)
        del reader, writer
        if end is None:
            return True, f"{opened} streams with a partial frame; the session is still up"
        return end[0] == 2, f"{opened} streams with a partial frame; the session was closed: {end}"


async def silent(host, port, ca, cert):
    clients = []
    refused = 0
    for _ in range(200):
        try:
            ctx = connect(
                host, port, configuration=configuration(ca, cert), create_protocol=Watcher,
                wait_connected=True,
            )
            client = await asyncio.wait_for(ctx.__aenter__(), 10)
            clients.append((ctx, client))
        except (ConnectionError, asyncio.TimeoutError):
            refused += 1
    held = len(clients)
    # Every held one must be closed by the coordinator's hello timeout.
    still = 0
    for _, client in clients:
        if await ended(client, 30) is None:
            still += 1
    for ctx, _ in clients:
        try:
            await ctx.__aexit__(None, None, None)
        except Exception:
            pass
    ok = still == 0 and held > 0
    return ok, f"{held} completed, {refused} refused, {still} not closed by the coordinator"


async def main():
    host, port, ca, attack = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    hello = bytes.fromhex(sys.argv[5]) if len(sys.argv) > 5 else b""
    if os.environ.get("ATTACK_FROM"):
        bind_from(os.environ["ATTACK_FROM"])
    with tempfile.TemporaryDirectory() as d:
        cert = self_signed(d)
        if attack == "many-streams":
            ok, what = await many_streams(host, port, ca, cert, hello)
        elif attack == "partial-frames":
            ok, what = await partial_frames(host, port, ca, cert, hello)
        else:
            fn = {
                "no-cert": no_cert,
                "garbage": garbage,
                "huge-prefix": huge_prefix,
                "silent": silent,
            }[attack]
            ok, what = await fn(host, port, ca, cert)
    print(f"{attack}: {what}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    asyncio.run(main())
