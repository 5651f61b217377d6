"""TLS contexts for mesh mTLS on the stdlib ``ssl`` module, and the peer check after it.

The sidecar's data plane does not use these any more: it runs on proxy/tls/engine.py (the
OpenSSL inside ``cryptography``, whose handshakes cost about half the CPU of the system
OpenSSL the ``ssl`` module links), with :class:`proxy.tls.peer.PeerCheck` in place of
:func:`verify_peer`. These stay for the users that are not on the hot path (the gateway's
probe endpoint, the health prober) and as the reference the engine's rules follow.

Design:

- TLS 1.3 only. Session tickets are off (``OP_NO_TICKET`` and
  ``num_tickets = 0``): a peer whose certificate was revoked must not come back by resuming a
  session, so every connection runs a full handshake with a fresh certificate check.
- Python 3.11's ``ssl`` shows only the peer's leaf (``getpeercert(binary_form=True)``), not
  the chain OpenSSL verified, and OpenSSL cannot say "this leaf must chain to the roots of the
  domain its URI SAN names". So that rule, the mesh's key rule, is proved in our code after
  the handshake, by :func:`verify_peer`:

  (a) a **client** context holds only the bundle of the server's trust domain (a client knows
      whom it dials), so OpenSSL already refuses any other domain; :func:`verify_peer` then
      checks the SPIFFE rules and the server's exact ID or trust domain;
  (b) a **server** context loads every federated root so that OpenSSL can complete the
      handshake with a client of any peer domain; :func:`verify_peer` then re-verifies the
      leaf against ONLY the roots of the trust domain its URI SAN claims, with the
      intermediates that domain publishes (see :mod:`proxy.identity.svid`). Our CA signs
      SVIDs directly under the root by default; when it uses an intermediate, the
      intermediate travels beside the bundle as chain-building material, never as an anchor.

  The caller must close the connection when :func:`verify_peer` raises.
- ``check_hostname`` is off (SVIDs carry no DNS names; identity is the URI SAN), and
  ``verify_mode`` is always ``CERT_REQUIRED``, on both sides.
- Contexts are immutable once built: an ``SSLContext`` can add a root but never remove one,
  so any change of trust (a new SVID, a changed bundle) builds a fresh context.
  :class:`ContextCache` keeps the hot path from rebuilding them, keyed by
  (role, SVID serial, bundle version).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.identity.bundle import TrustBundle, TrustBundleSet
from proxy.identity.model import SpiffeId, TrustDomain
from proxy.identity.svid import Purpose, Rejection, SvidError, X509Svid, validate_svid


def server_context(svid: X509Svid, bundles: TrustBundleSet) -> ssl.SSLContext:
    """A server context presenting ``svid`` and accepting clients of every bundle's roots.

    The handshake proves only "some federated root"; call :func:`verify_peer` with
    ``Purpose.CLIENT`` on every accepted connection before reading from it.
    """
    context = _base(ssl.PROTOCOL_TLS_SERVER, svid)
    # No tickets at all: with OP_NO_TICKET alone, TLS 1.3 OpenSSL still resumes statefully.
    context.num_tickets = 0
    _trust(context, bundles.all_roots())
    return context


def client_context(svid: X509Svid, bundle_of_server_domain: TrustBundle) -> ssl.SSLContext:
    """A client context presenting ``svid`` and trusting only the server domain's roots."""
    context = _base(ssl.PROTOCOL_TLS_CLIENT, svid)
    _trust(context, bundle_of_server_domain.roots)
    return context


def verify_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket,
    bundles: TrustBundleSet,
    now: datetime,
    purpose: Purpose,
    expect: SpiffeId | TrustDomain | None = None,
) -> SpiffeId:
    """The peer's SPIFFE ID after the handshake, or :class:`SvidError` (then close).

    ``ssl_object`` is what asyncio's ``transport.get_extra_info('ssl_object')`` returns.
    ``purpose`` is the peer's role: ``CLIENT`` on a server, ``SERVER`` on a client.
    ``expect`` pins the peer to one ID or one trust domain.
    """
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise SvidError(Rejection.MALFORMED, "the peer presented no certificate")
    try:
        leaf = x509.load_der_x509_certificate(der)
    except ValueError as error:
        raise SvidError(Rejection.MALFORMED, str(error)) from None
    spiffe_id = validate_svid(leaf, (), bundles, now, purpose)
    if isinstance(expect, SpiffeId) and spiffe_id != expect:
        raise SvidError(Rejection.UNEXPECTED_ID, f"got {spiffe_id}, want {expect}")
    if isinstance(expect, TrustDomain) and spiffe_id.trust_domain != expect:
        raise SvidError(Rejection.UNEXPECTED_ID, f"got {spiffe_id}, want trust domain {expect}")
    return spiffe_id


class ContextCache:
    """Reuses contexts while the SVID and the trust they were built from are unchanged."""

    def __init__(self, max_entries: int = 64) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._contexts: OrderedDict[tuple[str, int, str], ssl.SSLContext] = OrderedDict()

    def server(self, svid: X509Svid, bundles: TrustBundleSet) -> ssl.SSLContext:
        """:func:`server_context`, built once per (SVID serial, bundle set version)."""
        key = ("server", svid.serial, bundles.version)
        context = self._get(key)
        if context is None:
            context = self._put(key, server_context(svid, bundles))
        return context

    def client(self, svid: X509Svid, bundle_of_server_domain: TrustBundle) -> ssl.SSLContext:
        """:func:`client_context`, built once per (SVID serial, server bundle digest)."""
        key = ("client", svid.serial, bundle_of_server_domain.digest())
        context = self._get(key)
        if context is None:
            context = self._put(key, client_context(svid, bundle_of_server_domain))
        return context

    def __len__(self) -> int:
        return len(self._contexts)

    def _get(self, key: tuple[str, int, str]) -> ssl.SSLContext | None:
        context = self._contexts.get(key)
        if context is not None:
            self._contexts.move_to_end(key)
        return context

    def _put(self, key: tuple[str, int, str], context: ssl.SSLContext) -> ssl.SSLContext:
        self._contexts[key] = context
        while len(self._contexts) > self._max:
            self._contexts.popitem(last=False)
        return context


def _base(protocol: ssl._SSLMethod, svid: X509Svid) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.options |= ssl.OP_NO_TICKET
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    with _private_pem(svid.chain_pem() + svid.key_pem()) as path:
        context.load_cert_chain(path)
    return context


def _trust(context: ssl.SSLContext, roots: tuple[x509.Certificate, ...]) -> None:
    # No roots (a revoked domain) leaves the store empty: every peer then fails the handshake.
    if roots:
        pem = b"".join(root.public_bytes(serialization.Encoding.PEM) for root in roots)
        context.load_verify_locations(cadata=pem.decode())


@contextlib.contextmanager
def _private_pem(data: bytes) -> Iterator[str]:
    """A path that ``load_cert_chain`` can read ``data`` from, private to this process.

    Python 3.11 loads certificates and keys only from files. On Linux the key goes to an
    anonymous memory file and never touches a disk; elsewhere to a 0600 file in a 0700
    temporary directory, removed at once.
    """
    if sys.platform == "linux" and hasattr(os, "memfd_create"):
        fd = os.memfd_create("snapbright-svid", os.MFD_CLOEXEC)
        try:
            with os.fdopen(fd, "wb", closefd=False) as memory_file:
                memory_file.write(data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="snapbright-") as directory:
        path = Path(directory) / "svid.pem"
        path.touch(mode=0o600)
        path.write_bytes(data)
        yield str(path)
