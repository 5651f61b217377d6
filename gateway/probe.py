"""The probe endpoint: peers measure this gateway's liveness and RTT over mTLS.

A peer dials the gateway with SNI ``probe.snapbright.<cluster>.<mesh>``. That name routes,
like any other, to an upstream: a small TLS server inside this process, on loopback, that
terminates mTLS with the gateway's own SVID (:func:`proxy.tls.context.server_context`),
accepts a client only if :func:`~proxy.tls.context.verify_peer` proves its SVID chains to its
own trust domain's roots, and answers ``GET /`` with ``200``, on the same connection as long
as the client keeps it (the prober times one request on an established connection: that is
the RTT a pooled request pays). A probe that only completes the handshake
(``exchange="handshake"`` in :mod:`health.probe.prober`) is served too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config.model import ProbeIdentity
from gateway.route.model import Upstream
from proxy.identity.bundle import BundleError, TrustBundleSet, parse_bundle
from proxy.identity.model import SpiffeIdError, TrustDomain
from proxy.identity.svid import Purpose, SvidError, X509Svid, spiffe_id_of
from proxy.tls.context import server_context, verify_peer

_REQUEST_LIMIT = 4096
_REQUEST_TIMEOUT = 5.0
_IDLE_TIMEOUT = 60.0  # between requests on a kept connection (probes come every second or so)
_HANDSHAKE_TIMEOUT = 5.0
_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n"
_RESPONSE_KEPT = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"


class ProbeIdentityError(ValueError):
    """The probe's SVID or bundles cannot be loaded; the message names the file."""


def load_probe_identity(identity: ProbeIdentity) -> tuple[X509Svid, TrustBundleSet]:
    """Read the gateway's SVID (chain and EC key) and the peers' trust bundles."""
    chain_pem = _read(identity.certificate)
    try:
        chain = tuple(x509.load_pem_x509_certificates(chain_pem))
    except ValueError as error:
        raise ProbeIdentityError(f"{identity.certificate}: {error}") from None
    try:
        key = serialization.load_pem_private_key(_read(identity.key), password=None)
    except (ValueError, TypeError) as error:
        raise ProbeIdentityError(f"{identity.key}: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProbeIdentityError(f"{identity.key}: an SVID key must be an EC key")
    try:
        svid = X509Svid(spiffe_id_of(chain[0]), chain, key)
    except SvidError as error:
        raise ProbeIdentityError(f"{identity.certificate}: {error}") from None
    bundles = TrustBundleSet()
    for entry in identity.bundles:
        try:
            bundle = parse_bundle(TrustDomain.parse(entry.trust_domain), _read(entry.path))
        except (BundleError, SpiffeIdError) as error:
            raise ProbeIdentityError(f"{entry.path}: {error}") from None
        bundles = bundles.with_bundle(bundle)
    return svid, bundles


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ProbeIdentityError(f"{path}: {error.strerror or error}") from None


class ProbeServer:
    """The in-process mTLS responder that the probe name routes to.

    SVIDs rotate: :meth:`rotate` puts a new SVID and bundles in force for the next
    handshakes without closing the listener. Every connection here came through the
    gateway's SNI routing, so each handshake carries SNI and the context is switched in the
    SNI callback.
    """

    def __init__(self, svid: X509Svid, bundles: TrustBundleSet) -> None:
        self._front = server_context(svid, bundles)
        self._front.sni_callback = self._use_current
        self._current = self._front
        self._bundles = bundles
        self._server: asyncio.Server | None = None
        self.refused = 0

    def rotate(self, svid: X509Svid, bundles: TrustBundleSet) -> None:
        """Present ``svid`` and accept clients of ``bundles`` from the next handshake on."""
        self._current = server_context(svid, bundles)
        self._bundles = bundles

    def _use_current(
        self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object
    ) -> None:
        if self._current is not self._front:
            ssl_object.context = self._current

    async def start(self) -> Upstream:
        """Listen on a free loopback port; return it as the probe route's upstream."""
        self._server = await asyncio.start_server(
            self._serve,
            "127.0.0.1",
            0,
            ssl=self._front,
            ssl_handshake_timeout=_HANDSHAKE_TIMEOUT,
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        return Upstream(host, port)

    async def close(self) -> None:
        """Stop listening and wait for the server to close."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            try:
                verify_peer(ssl_object, self._bundles, datetime.now(UTC), Purpose.CLIENT)
            except SvidError:
                self.refused += 1
                return
            timeout = _REQUEST_TIMEOUT
            while True:
                async with asyncio.timeout(timeout):
                    head = await reader.readuntil(b"\r\n\r\n")
                if len(head) > _REQUEST_LIMIT:
                    return
                keep = b"connection: close" not in head.lower()
                writer.write(_RESPONSE_KEPT if keep else _RESPONSE)
                await writer.drain()
                if not keep:
                    return
                timeout = _IDLE_TIMEOUT
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            return  # a handshake-only probe, or a request too large or too slow
        except (OSError, ssl.SSLError):
            return
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
