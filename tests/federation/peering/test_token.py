"""Peering tokens: round trip, expiry, strict decoding, and the one-time secret."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.peering.model import (
    GatewayAddress,
    IssuedToken,
    PeeringToken,
    PeeringValueError,
    TokenError,
    issue_token,
    reclaim,
    redeem,
)
from federation.peering.token import MAX_TOKEN_CHARS, decode_token, encode_token
from proxy.identity.model import TrustDomain

NOW = 1_800_000_000.0
SECRET = bytes(range(32))
BUNDLE = '{"keys": [], "spiffe_sequence": 3}'


def make_token(
    secret: bytes = SECRET, ttl: float = 600.0, now: float = NOW
) -> tuple[PeeringToken, IssuedToken]:
    return issue_token(
        cluster="ap-southeast",
        mesh="acme",
        trust_domain=TrustDomain("ap-southeast.acme"),
        gateways=[GatewayAddress("10.0.0.7", 8443), GatewayAddress("gw.ap.example", 443)],
        trust_bundle_json=BUNDLE,
        secret=secret,
        now=now,
        ttl_seconds=ttl,
    )


def forge(document: dict[str, Any]) -> str:
    """A token text with a correct check around any payload (a deliberate forgery)."""
    payload = base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()
    return forge_payload(payload)


def forge_json(body: str) -> str:
    """A token text with a correct check around any JSON text."""
    return forge_payload(base64.urlsafe_b64encode(body.encode()).rstrip(b"=").decode())


def forge_payload(payload: str) -> str:
    check = hashlib.sha256(payload.encode()).digest()[:9]
    return f"sbpt1.{payload}.{base64.urlsafe_b64encode(check).rstrip(b'=').decode()}"


def payload_of(text: str) -> dict[str, Any]:
    payload = text.split(".")[1]
    document: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * 4))
    return document


LABELS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


@given(
    cluster=LABELS,
    mesh=st.lists(LABELS, min_size=1, max_size=3).map(".".join),
    ports=st.lists(st.integers(1, 65535), min_size=1, max_size=4, unique=True),
    secret=st.binary(min_size=32, max_size=32),
    bundle=st.text(min_size=1, max_size=200),
    ttl=st.floats(min_value=0.001, max_value=1e7),
)
def test_any_token_survives_encoding_and_decoding(
    cluster: str, mesh: str, ports: list[int], secret: bytes, bundle: str, ttl: float
) -> None:
    token, _ = issue_token(
        cluster=cluster,
        mesh=mesh,
        trust_domain=TrustDomain(f"{cluster}.{mesh}"),
        gateways=[GatewayAddress("::1", port) for port in ports],
        trust_bundle_json=bundle,
        secret=secret,
        now=NOW,
        ttl_seconds=ttl,
    )
    text = encode_token(token)
    assert text.startswith("sbpt1.")
    assert text.isascii()
    assert " " not in text
    assert "\n" not in text
    assert decode_token(text, now=NOW) == token


def test_a_token_pasted_with_surrounding_whitespace_still_decodes() -> None:
    token, _ = make_token()
    assert decode_token(f"\n  {encode_token(token)}\n", now=NOW) == token


def test_a_token_decodes_until_its_expiry_and_not_at_or_after_it() -> None:
    token, _ = make_token(ttl=600)
    text = encode_token(token)
    assert decode_token(text, now=NOW + 599.9) == token
    for now in (NOW + 600, NOW + 10_000):
        with pytest.raises(TokenError, match="expired"):
            decode_token(text, now=now)


@given(data=st.data())
def test_changing_any_one_character_of_a_token_is_refused(data: st.DataObject) -> None:
    text = encode_token(make_token()[0])
    index = data.draw(st.integers(0, len(text) - 1))
    replacement = data.draw(st.characters(codec="ascii").filter(lambda c: c != text[index]))
    damaged = text[:index] + replacement + text[index + 1 :]
    with pytest.raises(TokenError):
        decode_token(damaged, now=NOW)


@given(text=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: "sbpt1." + b.hex()))
def test_garbage_is_refused_with_a_token_error_and_nothing_else(text: str) -> None:
    with pytest.raises(TokenError):
        decode_token(text, now=NOW)


GOOD: dict[str, Any] = payload_of(encode_token(make_token()[0]))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not a Snapbright peering token"),
        ("hello", "not a Snapbright peering token"),
        ("sbpt2.abc.def", "version 'sbpt2' is not supported"),
        ("sbpt1.abc", "three dot-separated parts"),
        ("sbpt1.a.b.c", "three dot-separated parts"),
        ("sbpt1.ab+c.def", "outside base64url"),
        ("sbpt1.abc.de f", "outside base64url"),
        ("sbpt1.abc.AAAAAAAAAAAA", "damaged"),
        ("sbpt1." + "A" * MAX_TOKEN_CHARS, f"longer than {MAX_TOKEN_CHARS}"),
        (forge_payload("_w"), "not a JSON document"),
        (forge_payload("AB"), "not canonical"),
        (forge({**GOOD, "mesh": 1}), "'mesh' must be a string"),
        (forge([1, 2]), "must be a JSON object"),  # type: ignore[arg-type]
        (forge({k: v for k, v in GOOD.items() if k != "secret"}), "lacks secret"),
        (forge({**GOOD, "admin": True}), "unknown members admin"),
        (forge({**GOOD, "gateways": "10.0.0.7:8443"}), "list of host:port"),
        (forge({**GOOD, "gateways": []}), "at least one gateway"),
        (forge({**GOOD, "gateways": ["10.0.0.7"]}), "must be host:port"),
        (forge({**GOOD, "gateways": ["10.0.0.7:0"]}), "not in 1..65535"),
        (forge({**GOOD, "gateways": ["a b:80"]}), "neither an IP address nor a host name"),
        (forge({**GOOD, "gateways": ["[10.0.0.1]:80"]}), "brackets hold an IPv6"),
        (forge({**GOOD, "cluster": "Ap_Southeast"}), "not a DNS label"),
        (forge({**GOOD, "trustDomain": "spiffe://x"}), "token is invalid"),
        (forge({**GOOD, "expiresAt": "soon"}), "number of seconds"),
        (forge({**GOOD, "expiresAt": True}), "number of seconds"),
        (forge({**GOOD, "expiresAt": 1e400}), "holds Infinity"),
        (forge_json(json.dumps(GOOD)[:-1] + ', "expiresAt": 1e400}'), "twice"),
        (forge_json(json.dumps({**GOOD, "expiresAt": 0}).replace(": 0}", ": 1e400}")), "finite"),
        (forge({**GOOD, "id": "0123456789abcdef"}), "does not belong to its secret"),
        (forge({**GOOD, "trustBundle": ""}), "must carry the accepting cluster's trust bundle"),
    ],
)
def test_malformed_tokens_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(TokenError, match=reason):
        decode_token(text, now=NOW)


def test_a_duplicate_member_is_refused_even_when_both_values_agree() -> None:
    body = json.dumps(GOOD)[:-1] + f', "mesh": "{GOOD["mesh"]}"}}'
    with pytest.raises(TokenError, match="member 'mesh' twice"):
        decode_token(forge_json(body), now=NOW)


def test_nan_is_refused() -> None:
    with pytest.raises(TokenError, match="NaN"):
        decode_token(forge_json(json.dumps(GOOD)[:-1] + ', "x": NaN}'), now=NOW)


def test_a_secret_of_the_wrong_length_is_refused_at_issue_time() -> None:
    with pytest.raises(TokenError, match="exactly 32 bytes"):
        make_token(secret=b"short")


def test_the_accepting_side_keeps_only_a_hash_of_the_secret() -> None:
    token, issued = make_token()
    assert issued.secret_sha256 == hashlib.sha256(SECRET).digest()
    assert SECRET.hex() not in repr(issued)
    assert SECRET.hex() not in repr(token)
    assert issued.token_id == token.token_id
    assert issued.expires_at == token.expires_at


def test_a_secret_redeems_once_and_is_then_marked_used() -> None:
    _, issued = make_token()
    used = redeem([issued], SECRET, peer="us-west", now=NOW + 1)
    assert (used.used_at, used.used_by) == (NOW + 1, "us-west")
    with pytest.raises(TokenError, match="already used by us-west"):
        redeem([used], SECRET, peer="eu-central", now=NOW + 2)


@pytest.mark.parametrize(
    ("secret", "now", "reason"),
    [
        (bytes(32), NOW + 1, "matches no token"),
        (SECRET[:31], NOW + 1, "matches no token"),
        (SECRET, NOW + 600, "expired"),
    ],
)
def test_a_wrong_or_late_secret_is_refused(secret: bytes, now: float, reason: str) -> None:
    _, issued = make_token()
    with pytest.raises(TokenError, match=reason):
        redeem([issued], secret, peer="us-west", now=now)


def test_the_cluster_that_redeemed_a_token_may_present_it_again_while_it_is_valid() -> None:
    _, issued = make_token()
    used = redeem([issued], SECRET, peer="us-west", now=NOW + 1)
    reclaim(used, SECRET, peer="us-west", now=NOW + 2)  # no error: the establish may go on


@pytest.mark.parametrize(
    ("used_by", "secret", "peer", "now", "reason"),
    [
        ("us-west", bytes(32), "us-west", NOW + 2, "does not belong to token"),
        ("us-west", SECRET, "eu-central", NOW + 2, "already used by us-west"),
        ("us-west", SECRET, "us-west", NOW + 600, "expired"),
        (None, SECRET, "us-west", NOW + 2, "never used"),
    ],
    ids=["wrong-secret", "other-cluster", "expired", "unused"],
)
def test_a_token_is_reclaimed_only_by_its_cluster_with_its_secret_before_expiry(
    used_by: str | None, secret: bytes, peer: str, now: float, reason: str
) -> None:
    _, issued = make_token()
    if used_by is not None:
        issued = redeem([issued], SECRET, peer=used_by, now=NOW + 1)
    with pytest.raises(TokenError, match=reason):
        reclaim(issued, secret, peer=peer, now=now)


def test_redeeming_finds_the_right_token_among_several() -> None:
    _, first = make_token(secret=b"\x01" * 32)
    _, second = make_token(secret=b"\x02" * 32)
    assert redeem([first, second], b"\x02" * 32, peer="us-west", now=NOW).token_id == (
        second.token_id
    )


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("10.0.0.7:8443", "10.0.0.7", 8443),
        ("gw.example.com:443", "gw.example.com", 443),
        ("[2001:db8::1]:8443", "2001:db8::1", 8443),
    ],
)
def test_gateway_addresses_parse_and_print_back(text: str, host: str, port: int) -> None:
    address = GatewayAddress.parse(text)
    assert (address.host, address.port) == (host, port)
    assert str(address) == text


@pytest.mark.parametrize("text", ["2001:db8::1:80", ":80", "host:", "host:99999", "host:+80"])
def test_bad_gateway_addresses_are_refused(text: str) -> None:
    with pytest.raises(PeeringValueError):
        GatewayAddress.parse(text)
