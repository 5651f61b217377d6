"""The ClientHello parser: total on any bytes, exact on hellos however they are split."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sni.core import (
    MAX_BUFFER_BYTES,
    ClientHello,
    NeedMore,
    Rejection,
    parse_client_hello,
)
from tests.gateway.hello import (
    alpn_extension,
    client_hello,
    extension,
    real_hello,
    records,
    sni_extension,
    versions_extension,
)

_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_NAME = st.lists(_LABEL, min_size=1, max_size=6).map(".".join)


@st.composite
def _hellos(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid ClientHello message with a random name and random other extensions."""
    name = draw(_NAME)
    others = draw(
        st.lists(
            st.tuples(st.integers(100, 65535), st.binary(max_size=300)),
            max_size=6,
            unique_by=lambda pair: pair[0],
        )
    )
    extensions = [extension(t, body) for t, body in others]
    position = draw(st.integers(0, len(extensions)))
    extensions.insert(position, sni_extension([(0, name.encode())]))
    if draw(st.booleans()):
        extensions.append(alpn_extension([b"h2", b"http/1.1"]))
    message = client_hello(
        extensions,
        session_id=draw(st.binary(max_size=32)),
        ciphers=draw(st.lists(st.integers(0, 65535), min_size=1, max_size=40)),
    )
    return name, message


def _feed(stream: bytes, reads: list[int]) -> ClientHello | Rejection | NeedMore:
    """Parse as a server would: after each read, honouring NeedMore.more."""
    bounds = [0, *sorted({r for r in reads if 0 < r < len(stream)}), len(stream)]
    wanted = 0
    verdict: ClientHello | Rejection | NeedMore = NeedMore(1)
    for end in bounds[1:]:
        if end < wanted:
            continue
        verdict = parse_client_hello(stream[:end])
        if not isinstance(verdict, NeedMore):
            return verdict
        wanted = end + verdict.more
    return verdict


@settings(max_examples=400)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    verdict = parse_client_hello(data)
    assert isinstance(verdict, NeedMore | ClientHello | Rejection)
    assert not isinstance(parse_client_hello(data, eof=True), NeedMore)


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_bytes_after_a_handshake_record_header_never_raise(tail: bytes) -> None:
    verdict = parse_client_hello(b"\x16\x03\x01" + tail)
    assert isinstance(verdict, NeedMore | ClientHello | Rejection)


@settings(max_examples=300)
@given(_hellos(), st.lists(st.integers(1, 2000), max_size=8), st.data())
def test_a_hello_split_into_records_and_reads_parses_to_its_name(
    hello: tuple[str, bytes], cuts: list[int], data: st.DataObject
) -> None:
    name, message = hello
    stream = records(message, cuts)
    reads = data.draw(st.lists(st.integers(1, len(stream)), max_size=12))
    verdict = _feed(stream + b"\x17\x03\x03\x00\x01X", reads)
    assert isinstance(verdict, ClientHello)
    assert verdict.server_name == name
    assert verdict.length == len(stream)


@settings(max_examples=150)
@given(_hellos(), st.integers(1, 10_000))
def test_every_strict_prefix_of_a_hello_asks_for_more(hello: tuple[str, bytes], cut: int) -> None:
    stream = records(hello[1], [cut])
    prefix = stream[: cut % len(stream)]
    verdict = parse_client_hello(prefix)
    assert isinstance(verdict, NeedMore)
    assert verdict.more >= 1
    eof = parse_client_hello(prefix, eof=True)
    assert isinstance(eof, Rejection)
    assert eof.reason == "truncated"


def test_uppercase_names_are_lowercased() -> None:
    verdict = parse_client_hello(records(client_hello([sni_extension([(0, b"Pay.Default.X")])])))
    assert isinstance(verdict, ClientHello)
    assert verdict.server_name == "pay.default.x"


def test_alpn_and_tls13_offer_are_reported() -> None:
    message = client_hello(
        [
            sni_extension([(0, b"a.b")]),
            alpn_extension([b"h2", b"http/1.1"]),
            versions_extension([0x0304, 0x0303]),
        ]
    )
    verdict = parse_client_hello(records(message))
    assert verdict == ClientHello("a.b", ("h2", "http/1.1"), 0x0303, True, len(message) + 5)


@pytest.mark.parametrize(
    ("name", "alpn"),
    [
        ("payments.default.ap-southeast.acme", ()),
        ("controlplane.snapbright.us-west.mesh.example", ("h2",)),
        ("x.y", ("h2", "http/1.1")),
    ],
)
def test_hellos_from_pythons_ssl_module_parse(name: str, alpn: tuple[str, ...]) -> None:
    stream = real_hello(name, alpn)
    verdict = parse_client_hello(stream)
    assert isinstance(verdict, ClientHello)
    assert (verdict.server_name, verdict.alpn, verdict.tls13) == (name, alpn, True)
    assert verdict.length == len(stream)


def test_a_real_hello_fed_one_byte_at_a_time_parses() -> None:
    stream = real_hello("payments.default.east.acme")
    verdict = _feed(stream, list(range(1, len(stream))))
    assert isinstance(verdict, ClientHello)
    assert verdict.server_name == "payments.default.east.acme"


def _one(extensions: list[bytes] | None) -> bytes:
    return records(client_hello(extensions))


_OVERSIZED = b"\x16\x03\x01\x40\x00\x01\x00\x40\x01"  # handshake.length 16385
_REJECTIONS: list[tuple[str, bytes, str, str]] = [
    ("plain HTTP", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "plain-http", ""),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n", "plain-http", ""),
    ("SSLv2 hello", b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10", "sslv2-hello", ""),
    ("noise", b"\x00\x01\x02\x03", "not-tls", ""),
    ("bad record version", b"\x16\x07\x01\x00\x10", "not-tls", ""),
    ("no extensions", _one(None), "no-sni", ""),
    ("no server_name extension", _one([alpn_extension([b"h2"])]), "no-sni", ""),
    (
        "two host names",
        _one([sni_extension([(0, b"a.b"), (0, b"c.d")])]),
        "multiple-names",
        "",
    ),
    ("a non-host_name type", _one([sni_extension([(1, b"a.b")])]), "non-host-name-type", ""),
    (
        "host_name and another type",
        _one([sni_extension([(0, b"a.b"), (7, b"x")])]),
        "non-host-name-type",
        "",
    ),
    ("underscore", _one([sni_extension([(0, b"a_b.c")])]), "bad-name", ""),
    ("trailing dot", _one([sni_extension([(0, b"a.b.")])]), "bad-name", "trailing dot"),
    ("empty label", _one([sni_extension([(0, b"a..b")])]), "bad-name", "empty label"),
    ("label too long", _one([sni_extension([(0, b"a" * 64)])]), "bad-name", "63"),
    ("name too long", _one([sni_extension([(0, b"a." * 127)])]), "bad-name", "253"),
    ("hyphen edge", _one([sni_extension([(0, b"-a.b")])]), "bad-name", "'-'"),
    ("non-ascii", _one([sni_extension([(0, "é.b".encode())])]), "bad-name", ""),
    ("empty name", _one([sni_extension([(0, b"")])]), "bad-name", "empty"),
    ("oversized handshake", _OVERSIZED, "oversized", "handshake.length"),
    ("oversized record", b"\x16\x03\x01\x40\x01", "oversized", "record.length"),
    ("empty record", b"\x16\x03\x01\x00\x00", "malformed", "record.length"),
    (
        "not a ClientHello",
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",
        "malformed",
        "handshake.msg_type",
    ),
    (
        "alert record inside the hello",
        b"\x16\x03\x01\x00\x02\x01\x00\x15\x03\x01\x00\x02\x02\x28",
        "malformed",
        "record.content_type",
    ),
    (
        "sni list overruns",
        _one([extension(0, b"\x00\x09\x00\x00\x03a.b")]),
        "malformed",
        "server_name.list",
    ),
    (
        "extension overruns",
        records(client_hello([])[:-2] + b"\x00\x05\x00\x00\x00\x09"),
        "malformed",
        "",
    ),
    (
        "sni sent twice",
        _one([sni_extension([(0, b"a.b")]), sni_extension([(0, b"c.d")])]),
        "malformed",
        "sent twice",
    ),
    ("empty cipher suites", records(client_hello([], ciphers=[])), "malformed", "cipher_suites"),
    (
        "session id over 32 bytes",
        records(client_hello([], session_id=b"s" * 33)),
        "malformed",
        "legacy_session_id",
    ),
]


@pytest.mark.parametrize(
    ("stream", "reason", "detail"),
    [pytest.param(s, r, d, id=case) for case, s, r, d in _REJECTIONS],
)
def test_rejections_name_their_reason(stream: bytes, reason: str, detail: str) -> None:
    verdict = parse_client_hello(stream)
    assert isinstance(verdict, Rejection), verdict
    assert verdict.reason == reason, verdict
    assert detail in verdict.detail


def test_a_hello_over_too_many_records_is_oversized() -> None:
    message = client_hello([sni_extension([(0, b"a.b")])])
    verdict = parse_client_hello(records(message, range(1, len(message))))
    assert isinstance(verdict, Rejection)
    assert verdict.reason == "oversized"


def test_the_largest_allowed_hello_parses_within_the_buffer_cap() -> None:
    padding = extension(21, b"\x00" * (16384 - 4 - 200))
    message = client_hello([sni_extension([(0, b"a.b")]), padding])
    message += b""
    assert len(message) <= 16384
    stream = records(message, [4000, 8000, 12000])
    assert len(stream) <= MAX_BUFFER_BYTES
    verdict = parse_client_hello(stream)
    assert isinstance(verdict, ClientHello)


def test_a_truncated_hello_at_eof_is_rejected_as_truncated() -> None:
    stream = real_hello("a.b")
    verdict = parse_client_hello(stream[:50], eof=True)
    assert verdict == Rejection(
        "truncated", "the client closed before the ClientHello was complete"
    )
