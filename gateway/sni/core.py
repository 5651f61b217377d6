"""A TLS ClientHello parser for SNI routing: bytes in, a verdict out, no I/O.

The gateway never terminates the mesh's mTLS; it reads the first bytes a client sends, finds
the server name in the ClientHello and forwards those same bytes to the chosen upstream.
:func:`parse_client_hello` takes every byte received so far and answers one of:

- :class:`NeedMore`: the hello is not complete yet; ``more`` says how many more bytes are
  needed at least before another parse can make progress;
- :class:`ClientHello`: the parsed hello (server name, ALPN, legacy version, TLS 1.3 offer);
- :class:`Rejection`: the connection must be closed; ``reason`` is a small fixed vocabulary
  (fit for a metric label) and ``detail`` names the field at fault.

The handshake message may be fragmented over several TLS records (RFC 8446 section 5.1), and
the records over any number of reads. The whole hello is capped at :data:`MAX_HELLO_BYTES`
of handshake data in at most :data:`MAX_RECORDS` records, so a client can never make the
gateway buffer more than :data:`MAX_BUFFER_BYTES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MAX_HELLO_BYTES = 16384
"""Largest ClientHello handshake message accepted (header included): one full TLS record."""

MAX_RECORDS = 32
"""Most TLS records a fragmented ClientHello may span."""

RECORD_HEADER = 5
MAX_RECORD_PAYLOAD = 16384  # RFC 8446 section 5.1: 2^14
MAX_BUFFER_BYTES = MAX_HELLO_BYTES + MAX_RECORDS * RECORD_HEADER
"""The most bytes a client can make the gateway hold before a verdict."""

MAX_NAME_LENGTH = 253

_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_NAME_TYPE_HOST_NAME = 0
_TLS13 = 0x0304
_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-")

RejectReason = Literal[
    "not-tls",
    "plain-http",
    "sslv2-hello",
    "no-sni",
    "multiple-names",
    "non-host-name-type",
    "bad-name",
    "oversized",
    "truncated",
    "malformed",
]


@dataclass(frozen=True, slots=True)
class NeedMore:
    """The hello is incomplete: read at least ``more`` further bytes, then parse again."""

    more: int


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the gateway needs from a ClientHello.

    ``server_name`` is the validated, lowercased SNI host name; ``tls13`` is true when the
    client offers TLS 1.3 in ``supported_versions``; ``length`` is how many bytes of the input
    the records carrying the hello took (anything after them is the client's next flight).
    """

    server_name: str
    alpn: tuple[str, ...]
    legacy_version: int
    tls13: bool
    length: int


@dataclass(frozen=True, slots=True)
class Rejection:
    """Close the connection: ``reason`` is for counting, ``detail`` is for people."""

    reason: RejectReason
    detail: str


Verdict = NeedMore | ClientHello | Rejection


class _Malformed(Exception):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_client_hello(data: bytes | bytearray | memoryview, *, eof: bool = False) -> Verdict:
    """Judge the bytes a client has sent so far; ``eof`` says the client will send no more.

    Never raises on any input: every byte string maps to a verdict.
    """
    buf = bytes(data)
    verdict = _classify_start(buf)
    if verdict is None:
        verdict = _reassemble(buf)
    if isinstance(verdict, NeedMore) and eof:
        return Rejection("truncated", "the client closed before the ClientHello was complete")
    return verdict


def _classify_start(buf: bytes) -> Verdict | None:
    """Tell TLS from plain HTTP, SSLv2 and noise by the first bytes; None means TLS so far."""
    if not buf:
        return NeedMore(1)
    lead = buf[0]
    if lead == _CONTENT_HANDSHAKE:
        if len(buf) >= 2 and buf[1] != 3:
            return Rejection("not-tls", f"record version major {buf[1]} is not 3")
        return None
    if 0x41 <= lead <= 0x5A:  # 'A'..'Z': an HTTP method such as GET, POST, PRI, CONNECT
        return Rejection("plain-http", "the client spoke plaintext, not TLS")
    if lead & 0x80:
        # SSLv2-compatible hello: 2-byte length with the high bit set, then msg_type 1.
        if len(buf) < 3:
            return NeedMore(3 - len(buf))
        if buf[2] == _HANDSHAKE_CLIENT_HELLO:
            return Rejection("sslv2-hello", "an SSLv2-format ClientHello carries no SNI")
    return Rejection("not-tls", f"first byte 0x{lead:02x} is not a TLS handshake record")


def _reassemble(buf: bytes) -> Verdict:
    """Collect the handshake message from its records, then parse it once it is whole."""
    fragments: list[bytes] = []
    gathered = 0
    needed = -1  # handshake message length with its 4-byte header, once known
    pos = 0
    records = 0
    while True:
        if len(buf) - pos < RECORD_HEADER:
            return NeedMore(RECORD_HEADER - (len(buf) - pos))
        content_type, major, minor = buf[pos], buf[pos + 1], buf[pos + 2]
        length = int.from_bytes(buf[pos + 3 : pos + 5], "big")
        if content_type != _CONTENT_HANDSHAKE:
            return Rejection(
                "malformed", f"record.content_type {content_type} inside the ClientHello"
            )
        if major != 3 or minor > 4:
            return Rejection("not-tls", f"record.version {major}.{minor} is not TLS")
        if length == 0:
            return Rejection("malformed", "record.length is 0 (empty handshake fragment)")
        if length > MAX_RECORD_PAYLOAD:
            return Rejection("oversized", f"record.length {length} exceeds {MAX_RECORD_PAYLOAD}")
        records += 1
        if records > MAX_RECORDS:
            return Rejection("oversized", f"the ClientHello spans more than {MAX_RECORDS} records")
        body_start = pos + RECORD_HEADER
        available = len(buf) - body_start
        if needed >= 0 and gathered + length > needed:
            return Rejection("malformed", "record.length runs past the ClientHello")
        if available < length:
            # Ask only for what this record still lacks: the next parse can then make progress.
            fragment = buf[body_start:]
            if needed < 0 and gathered + len(fragment) >= 4:
                header_verdict = _check_handshake_header(b"".join([*fragments, fragment]))
                if isinstance(header_verdict, Rejection):
                    return header_verdict
            return NeedMore(length - available)
        fragments.append(buf[body_start : body_start + length])
        gathered += length
        pos = body_start + length
        if needed < 0 and gathered >= 4:
            header_verdict = _check_handshake_header(b"".join(fragments))
            if isinstance(header_verdict, Rejection):
                return header_verdict
            needed = header_verdict
            if gathered > needed:
                return Rejection("malformed", "record carries bytes after the ClientHello")
        if needed >= 0 and gathered == needed:
            return _parse_body(b"".join(fragments)[4:], pos)


def _check_handshake_header(handshake: bytes) -> int | Rejection:
    """Check msg_type and length; return the whole message length (header included)."""
    if handshake[0] != _HANDSHAKE_CLIENT_HELLO:
        return Rejection("malformed", f"handshake.msg_type {handshake[0]} is not ClientHello")
    total = 4 + int.from_bytes(handshake[1:4], "big")
    if total > MAX_HELLO_BYTES:
        return Rejection("oversized", f"handshake.length {total - 4} exceeds the ClientHello cap")
    if total == 4:
        return Rejection("malformed", "handshake.length is 0")
    return total


class _Reader:
    """A cursor over the ClientHello body; overruns name the field being read."""

    __slots__ = ("_buf", "_end", "pos")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self._buf = buf
        self.pos = pos
        self._end = len(buf) if end is None else end

    def remaining(self) -> int:
        return self._end - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n > self._end - self.pos:
            raise _Malformed("malformed", f"{field}: truncated (needs {n} bytes)")
        chunk = self._buf[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def vector(self, length_size: int, field: str) -> _Reader:
        """A sub-reader over a length-prefixed vector, checked to fit inside this one."""
        n = self.uint(length_size, f"{field}.length")
        if n > self._end - self.pos:
            raise _Malformed("malformed", f"{field}: truncated (length {n} overruns)")
        sub = _Reader(self._buf, self.pos, self.pos + n)
        self.pos += n
        return sub


def _parse_body(body: bytes, consumed: int) -> Verdict:
    try:
        return _parse_fields(_Reader(body), consumed)
    except _Malformed as error:
        return Rejection(error.reason, error.detail)


def _parse_fields(reader: _Reader, consumed: int) -> Verdict:
    legacy_version = reader.uint(2, "legacy_version")
    reader.take(32, "random")
    session_id = reader.vector(1, "legacy_session_id")
    if session_id.remaining() > 32:
        raise _Malformed("malformed", "legacy_session_id: longer than 32 bytes")
    ciphers = reader.vector(2, "cipher_suites")
    if ciphers.remaining() == 0 or ciphers.remaining() % 2:
        raise _Malformed("malformed", "cipher_suites: empty or odd length")
    if reader.vector(1, "legacy_compression_methods").remaining() == 0:
        raise _Malformed("malformed", "legacy_compression_methods: empty")
    if reader.remaining() == 0:
        # Extensions are optional before TLS 1.2 (RFC 5246 7.4.1.2), and then so is SNI.
        return Rejection("no-sni", "the ClientHello has no extensions")
    extensions = reader.vector(2, "extensions")
    if reader.remaining():
        raise _Malformed("malformed", "extensions: bytes after the extensions block")
    seen: set[int] = set()
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    tls13 = False
    while extensions.remaining():
        ext_type = extensions.uint(2, "extension.type")
        ext = extensions.vector(2, f"extension[{ext_type}]")
        if ext_type in seen:
            raise _Malformed("malformed", f"extension[{ext_type}]: sent twice")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            server_name = _parse_server_name(ext)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(ext)
        elif ext_type == _EXT_SUPPORTED_VERSIONS:
            tls13 = _offers_tls13(ext)
    if server_name is None:
        return Rejection("no-sni", "the ClientHello has no server_name extension")
    return ClientHello(server_name, alpn, legacy_version, tls13, consumed)


def _parse_server_name(ext: _Reader) -> str:
    names = ext.vector(2, "server_name.list")
    if ext.remaining():
        raise _Malformed("malformed", "server_name: bytes after the name list")
    if names.remaining() == 0:
        raise _Malformed("malformed", "server_name.list: empty")
    host_names: list[bytes] = []
    other_types: list[int] = []
    while names.remaining():
        name_type = names.uint(1, "server_name.name_type")
        name = names.vector(2, "server_name.host_name")
        value = name.take(name.remaining(), "server_name.host_name")
        if name_type == _NAME_TYPE_HOST_NAME:
            host_names.append(value)
        else:
            other_types.append(name_type)
    if other_types:
        raise _Malformed("non-host-name-type", f"server_name.name_type {other_types[0]}")
    if len(host_names) > 1:
        raise _Malformed("multiple-names", f"server_name.list holds {len(host_names)} host names")
    return _validate_name(host_names[0])


def _validate_name(raw: bytes) -> str:
    """A DNS host name, lowercased: labels of a-z, 0-9 and '-', no trailing dot (RFC 6066)."""
    if not raw:
        raise _Malformed("bad-name", "server_name.host_name: empty")
    if len(raw) > MAX_NAME_LENGTH:
        raise _Malformed("bad-name", f"server_name.host_name: longer than {MAX_NAME_LENGTH}")
    lowered = raw.lower()
    if lowered.endswith(b"."):
        raise _Malformed("bad-name", "server_name.host_name: trailing dot")
    for label in lowered.split(b"."):
        if not label:
            raise _Malformed("bad-name", "server_name.host_name: empty label")
        if len(label) > 63:
            raise _Malformed("bad-name", "server_name.host_name: label longer than 63")
        if not _NAME_CHARS.issuperset(label):
            raise _Malformed("bad-name", "server_name.host_name: character outside a-z 0-9 -")
        if label[0] == 0x2D or label[-1] == 0x2D:
            raise _Malformed("bad-name", "server_name.host_name: label starts or ends with '-'")
    return lowered.decode("ascii")


def _parse_alpn(ext: _Reader) -> tuple[str, ...]:
    protocols = ext.vector(2, "alpn.protocol_name_list")
    if ext.remaining():
        raise _Malformed("malformed", "alpn: bytes after the protocol list")
    names: list[str] = []
    while protocols.remaining():
        name = protocols.vector(1, "alpn.protocol_name")
        if name.remaining() == 0:
            raise _Malformed("malformed", "alpn.protocol_name: empty")
        names.append(name.take(name.remaining(), "alpn.protocol_name").decode("latin-1"))
    if not names:
        raise _Malformed("malformed", "alpn.protocol_name_list: empty")
    return tuple(names)


def _offers_tls13(ext: _Reader) -> bool:
    versions = ext.vector(1, "supported_versions")
    if versions.remaining() % 2:
        raise _Malformed("malformed", "supported_versions: odd length")
    offered = False
    while versions.remaining():
        if versions.uint(2, "supported_versions") == _TLS13:
            offered = True
    return offered
