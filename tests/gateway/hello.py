"""ClientHello bytes for tests: built field by field, or captured from Python's ssl module."""

from __future__ import annotations

import contextlib
import itertools
import ssl
from collections.abc import Sequence


def _vec(length_size: int, body: bytes) -> bytes:
    return len(body).to_bytes(length_size, "big") + body


def extension(ext_type: int, body: bytes) -> bytes:
    """One extension: type, then its length-prefixed body."""
    return ext_type.to_bytes(2, "big") + _vec(2, body)


def sni_extension(names: Sequence[tuple[int, bytes]]) -> bytes:
    """A server_name extension with the given (name_type, name) entries."""
    entries = b"".join(bytes([name_type]) + _vec(2, name) for name_type, name in names)
    return extension(0, _vec(2, entries))


def alpn_extension(protocols: Sequence[bytes]) -> bytes:
    """An ALPN extension offering the given protocols."""
    return extension(16, _vec(2, b"".join(_vec(1, p) for p in protocols)))


def versions_extension(versions: Sequence[int]) -> bytes:
    """A supported_versions extension (client form)."""
    return extension(43, _vec(1, b"".join(v.to_bytes(2, "big") for v in versions)))


def client_hello(
    extensions: Sequence[bytes] | None = (),
    *,
    legacy_version: int = 0x0303,
    session_id: bytes = b"",
    ciphers: Sequence[int] = (0x1301, 0xC02F),
) -> bytes:
    """A ClientHello handshake message (4-byte header included); None means no extensions."""
    body = (
        legacy_version.to_bytes(2, "big")
        + bytes(range(32))
        + _vec(1, session_id)
        + _vec(2, b"".join(c.to_bytes(2, "big") for c in ciphers))
        + _vec(1, b"\x00")
    )
    if extensions is not None:
        body += _vec(2, b"".join(extensions))
    return b"\x01" + _vec(3, body)


def hello_for(name: str) -> bytes:
    """A minimal ClientHello for ``name`` in one record."""
    return records(client_hello([sni_extension([(0, name.encode())])]))


def records(message: bytes, cuts: Sequence[int] = (), version: int = 0x0301) -> bytes:
    """The handshake message fragmented into TLS records at the given offsets."""
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(message)}), len(message)]
    out = b""
    for start, end in itertools.pairwise(bounds):
        out += b"\x16" + version.to_bytes(2, "big") + _vec(2, message[start:end])
    return out


def real_hello(server_hostname: str, alpn: Sequence[str] = ()) -> bytes:
    """The first flight Python's ssl module sends for ``server_hostname``."""
    context = ssl.create_default_context()
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()
