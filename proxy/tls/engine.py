"""Mesh mTLS on OpenSSL memory BIOs under asyncio/uvloop raw TCP transports.

Why not the stdlib ``ssl`` module: it links the system OpenSSL (3.0 here), whose full mTLS
handshake costs ~870 µs of CPU in a minimal uvloop server; the OpenSSL that ships inside
``cryptography`` (reached through pyOpenSSL) does the same handshake in ~510 µs. So the
sidecar's mTLS runs here: pyOpenSSL builds the contexts and connections, and the per-record
path (``BIO_write``/``SSL_read``/``SSL_write``/``BIO_read``) calls the cffi bindings directly,
which costs less per request than uvloop's native SSL transport.

Contexts keep the rules of proxy/tls/context.py: TLS 1.3 only; no resumption at all (no
ticket encryption, ``OP_NO_TICKET``, and no session cache, so the stateful tickets OpenSSL
still sends name nothing: every connection runs a full handshake with a fresh certificate
check — the bindings offer no ``SSL_CTX_set_num_tickets``); the peer's certificate is
required on both sides; no hostname check (identity is the URI SAN, checked after the
handshake by :class:`proxy.tls.peer.PeerCheck` on :meth:`TlsTransport.peer_chain`); a server
context trusts every federated root, a client context only the target domain's roots;
certificate and key are loaded from memory.

One `TlsTransport` per connection is both the raw TCP transport's protocol and the transport
the application protocol sees (write, flow control, close with close_notify, abort, extra
info). Servers take `server_factory` as their protocol factory: the handshake runs in
``data_received`` with a ``call_later`` timeout (no task per connection), then a hook decides
which application protocol gets the connection, or refuses it. Clients `connect`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar, cast

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL, crypto

from proxy.identity.bundle import TrustBundle, TrustBundleSet
from proxy.identity.svid import X509Svid
from proxy.tls.errors import TlsError

__all__ = ["TlsAcceptor", "TlsContext", "TlsError", "TlsTransport", "connect", "server_factory"]

_lib: Final[Any] = Binding.lib
_ffi: Final[Any] = Binding.ffi

_SSL_read: Final = _lib.SSL_read
_SSL_write: Final = _lib.SSL_write
_BIO_read: Final = _lib.BIO_read
_BIO_write: Final = _lib.BIO_write
_SSL_get_error: Final = _lib.SSL_get_error
_BIO_pending: Final = _lib.BIO_get_mem_data  # with NULL: how many bytes the memory BIO holds
_NULL: Final = _ffi.NULL
_WANT_READ: Final[int] = _lib.SSL_ERROR_WANT_READ
_ZERO_RETURN: Final[int] = _lib.SSL_ERROR_ZERO_RETURN
_SYSCALL: Final[int] = _lib.SSL_ERROR_SYSCALL

# Scratch for SSL_read and BIO_read: what leaves it is copied into bytes at once (app
# protocols keep what they get, and uvloop's write(memoryview) does not copy).
_SCRATCH: Final = 256 * 1024
_RECORD: Final = 16 * 1024  # a TLS record's largest plaintext

_HANDSHAKE: Final = 0
_OPEN: Final = 1
_CLOSING: Final = 2
_CLOSED: Final = 3

# X509_V_ERR_* codes that have their own rejection labels.
_VERIFY_LABELS: Final = {10: "expired", 9: "not-yet-valid", 26: "invalid-purpose"}
_PLAINTEXT: Final = frozenset(
    ("HTTP_REQUEST", "WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "HTTPS_PROXY_REQUEST")
)

_P = TypeVar("_P", bound=asyncio.BaseProtocol)


class TlsContext:
    """An OpenSSL context for mesh mTLS: one SVID, the roots it trusts, ALPN. Immutable.

    Any change of SVID or trust builds a new one (a store can add a root, never drop one).
    """

    __slots__ = ("_alpn_select", "_anchors", "_keep", "bundles", "native", "server_side")

    def __init__(
        self,
        native: SSL.Context,
        server_side: bool,
        bundles: TrustBundleSet,
        anchors: dict[int, bytes],
        keep: tuple[object, ...],
        alpn_select: object = None,
    ) -> None:
        self.native = native
        self.server_side = server_side
        self.bundles = bundles
        """The trust the context was built from (a client's: the one server domain)."""
        self._anchors = anchors
        self._keep = keep
        self._alpn_select = alpn_select

    @classmethod
    def server(cls, svid: X509Svid, bundles: TrustBundleSet, alpn: Sequence[str]) -> TlsContext:
        """A server context presenting ``svid`` and accepting clients of every bundle's roots.

        The handshake proves only "some federated root": check every accepted connection's
        :meth:`TlsTransport.peer_chain` with `PeerCheck` (purpose ``CLIENT``).
        ``alpn`` lists the protocols offered; a client offering none of them gets no ALPN.
        """
        native = _base(SSL.TLS_SERVER_METHOD, svid)
        anchors, keep = _trust(native, bundles.all_roots())
        select = _alpn_selector(alpn)
        _lib.SSL_CTX_set_alpn_select_cb(native._context, select, _ffi.NULL)
        return cls(native, True, bundles, anchors, keep, select)

    @classmethod
    def client(cls, svid: X509Svid, bundle: TrustBundle, alpn: Sequence[str]) -> TlsContext:
        """A client context presenting ``svid`` and trusting only ``bundle``'s roots."""
        native = _base(SSL.TLS_CLIENT_METHOD, svid)
        anchors, keep = _trust(native, bundle.roots)
        if alpn:
            native.set_alpn_protos([name.encode("ascii") for name in alpn])
        return cls(native, False, TrustBundleSet([bundle]), anchors, keep)


class TlsAcceptor:
    """A listener's protocol factory: each call makes the TLS side of a new connection.

    It also knows the connections still in their handshake (until it ends, however it ends),
    so that a closing listener can drop them: `abort_handshakes`. Made by `server_factory`.
    """

    __slots__ = ("context", "handshaking", "on_failure", "on_handshake", "timeout")

    def __init__(
        self,
        context: Callable[[], TlsContext],
        on_handshake: Callable[[TlsTransport], asyncio.BaseProtocol | None],
        on_failure: Callable[[str], None],
        timeout: float,
    ) -> None:
        self.context = context
        self.on_handshake = on_handshake
        self.on_failure = on_failure
        self.timeout = timeout
        self.handshaking: set[TlsTransport] = set()

    def __call__(self) -> TlsTransport:
        return TlsTransport(self.context(), self)

    def abort_handshakes(self) -> None:
        """Drop every connection still in its handshake."""
        for transport in list(self.handshaking):
            transport.abort()


class _Dial:
    """One client connection's handshake: what to verify, what to build, whom to tell."""

    __slots__ = ("factory", "sni", "verify", "waiter")

    def __init__(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        sni: str | None,
        verify: Callable[[TlsTransport], None] | None,
        waiter: asyncio.Future[tuple[TlsTransport, asyncio.BaseProtocol]],
    ) -> None:
        self.factory = factory
        self.sni = sni
        self.verify = verify
        self.waiter = waiter


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buf: Any = _ffi.new("char[]", _SCRATCH)
        self.view: Any = _ffi.buffer(self.buf)


_scratch: Final = _Scratch()


class TlsTransport(asyncio.Transport, asyncio.Protocol):
    """One TLS connection: the raw TCP transport's protocol, and the application's transport.

    The application protocol gets it once the handshake is done (never before), and sees
    decrypted bytes in ``data_received`` (always fresh ``bytes``), ``eof_received`` on the
    peer's close_notify or TCP end, and ``connection_lost`` once (with the error that broke
    the connection, if any). ``close`` sends close_notify, then closes the socket once its
    buffer is written; ``abort`` drops the connection at once. Write buffer limits and sizes
    are the raw transport's; its pause_writing/resume_writing reach the application.
    """

    __slots__ = (
        "_app",
        "_conn",
        "_context",
        "_eof",
        "_eof_pending",
        "_error",
        "_in",
        "_loop",
        "_out",
        "_raw",
        "_read_paused",
        "_role",
        "_ssl",
        "_state",
        "_timer",
        "_unread",
    )

    def __init__(self, context: TlsContext, role: TlsAcceptor | _Dial) -> None:
        super().__init__()
        self._context = context
        self._role = role
        self._state = _HANDSHAKE
        self._raw: asyncio.Transport | None = None
        self._app: asyncio.BaseProtocol | None = None
        self._conn: SSL.Connection | None = None
        self._ssl: Any = None
        self._in: Any = None
        self._out: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._error: TlsError | None = None
        self._read_paused = False
        self._unread = False
        self._eof_pending = False
        self._eof = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- what the application and the hooks see -----------------------------------------------

    @property
    def context(self) -> TlsContext:
        """The context this connection was made with."""
        return self._context

    @property
    def alpn(self) -> str | None:
        """The protocol ALPN selected, if any."""
        conn = self._conn
        if conn is None:
            return None
        selected = conn.get_alpn_proto_negotiated()
        return selected.decode("ascii", "replace") if selected else None

    def peer_chain(self) -> tuple[bytes, ...]:
        """The chain OpenSSL verified, DER, leaf first and trust anchor last (or empty)."""
        ssl = self._ssl
        if ssl is None or self._state != _OPEN:
            return ()
        stack = _lib.SSL_get0_verified_chain(ssl)
        if stack == _ffi.NULL:
            return ()
        anchors = self._context._anchors
        chain = []
        for index in range(_lib.sk_X509_num(stack)):
            cert = _lib.sk_X509_value(stack, index)
            der = anchors.get(int(_ffi.cast("uintptr_t", cert)))
            chain.append(der if der is not None else _der(cert))
        return tuple(chain)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state != _OPEN:
            if self._state == _HANDSHAKE:
                raise RuntimeError("write before the TLS handshake completed")
            return  # closing: dropped, as asyncio's transports drop it
        if type(data) is not bytes:
            data = bytes(data)
        size = len(data)
        if not size:
            return
        # A memory BIO never blocks and partial writes are off (`_base`): one call writes it
        # all, in records of at most 16 KiB.
        ssl = self._ssl
        written = _SSL_write(ssl, data, size)
        if written != size:
            if written > 0:
                raise AssertionError("SSL_write wrote part of the data")
            self._fatal(_failure(ssl, _SSL_get_error(ssl, written)))
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS cannot half-close; close() sends close_notify")

    def pause_reading(self) -> None:
        if self._read_paused:
            return
        self._read_paused = True
        raw = self._raw
        if raw is not None and self._state <= _OPEN and not raw.is_closing():
            raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._read_paused:
            return
        self._read_paused = False
        raw = self._raw
        if raw is None or self._state > _OPEN:
            return
        if not raw.is_closing():
            raw.resume_reading()
        if self._unread and self._loop is not None:
            # Records read while paused wait in OpenSSL: deliver them on the next turn, as
            # asyncio's own SSL transport does (not from inside the caller's stack).
            self._unread = False
            self._loop.call_soon(self._read_unread)

    def is_reading(self) -> bool:
        return not self._read_paused and self._state <= _OPEN

    def close(self) -> None:
        state = self._state
        if state >= _CLOSING:
            return
        self._state = _CLOSING
        self._handshake_over()
        if state == _OPEN and self._error is None:
            _lib.SSL_shutdown(self._ssl)
            _lib.ERR_clear_error()
            self._flush()
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        if self._state < _CLOSING:
            self._state = _CLOSING
        self._handshake_over()
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        raw = self._raw
        return self._state >= _CLOSING or (raw is not None and raw.is_closing())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "tls_alpn":
            return self.alpn
        raw = self._raw
        return default if raw is None else raw.get_extra_info(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return 0 if self._raw is None else self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0) if self._raw is None else self._raw.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._app is not None, "no application protocol before the handshake"
        return self._app

    # -- the raw transport's protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        raw = cast(asyncio.Transport, transport)
        self._raw = raw
        if self._state != _HANDSHAKE:
            # Aborted before the TCP connection was made (a client's timeout).
            raw.abort()
            return
        loop = self._loop = asyncio.get_running_loop()
        conn = self._conn = SSL.Connection(self._context.native, None)
        self._ssl = conn._ssl
        self._in = conn._into_ssl
        self._out = conn._from_ssl
        role = self._role
        if isinstance(role, TlsAcceptor):
            conn.set_accept_state()
            self._timer = loop.call_later(role.timeout, self._timed_out)
            role.handshaking.add(self)
            return
        conn.set_connect_state()
        if role.sni:
            conn.set_tlsext_host_name(role.sni.encode("ascii"))
        self._handshake()

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == _OPEN:
            _BIO_write(self._in, data, len(data))
            if self._read_paused:
                # Reading pauses late (a read already made): the records wait in OpenSSL.
                self._unread = True
            else:
                self._read()
        elif state == _HANDSHAKE:
            _lib.BIO_write(self._in, data, len(data))
            self._handshake()

    def eof_received(self) -> bool | None:
        state = self._state
        if state == _HANDSHAKE:
            self._handshake_failed(TlsError("handshake-failed", "the peer ended the stream"))
            return None
        if state != _OPEN:
            return None
        if self._unread:
            self._eof_pending = True
            return True
        self._deliver_eof()
        return True

    def pause_writing(self) -> None:
        app = self._app
        if app is not None:
            app.pause_writing()

    def resume_writing(self) -> None:
        app = self._app
        if app is not None:
            app.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        state = self._state
        self._state = _CLOSED
        self._handshake_over()
        self._conn = self._ssl = self._in = self._out = None
        if state == _HANDSHAKE:
            self._report_failure(TlsError("handshake-failed", "the connection was lost"))
            return
        app = self._app
        if app is not None:
            app.connection_lost(exc if exc is not None else self._error)

    # -- the machinery --------------------------------------------------------------------------

    def _handshake(self) -> None:
        ssl = self._ssl
        done = _lib.SSL_do_handshake(ssl)
        if done == 1:
            self._flush()
            self._established()
            return
        code = _lib.SSL_get_error(ssl, done)
        if code == _WANT_READ:
            self._flush()
            return
        error = _failure(ssl, code)
        self._flush()  # the alert that says why, where OpenSSL wrote one
        self._handshake_failed(error)

    def _established(self) -> None:
        self._handshake_over()
        self._state = _OPEN
        role = self._role
        app: asyncio.BaseProtocol | None
        if isinstance(role, TlsAcceptor):
            try:
                app = role.on_handshake(self)
            except Exception as exc:  # a bug in the hook: refuse, and say so
                assert self._loop is not None
                self._loop.call_exception_handler(
                    {"message": "TLS on_handshake hook failed", "exception": exc}
                )
                app = None
            if app is None:
                self.abort()
                return
        else:
            waiter = role.waiter
            if waiter.done():  # the caller gave up
                self.abort()
                return
            try:
                if role.verify is not None:
                    role.verify(self)
                app = role.factory()
            except Exception as exc:
                waiter.set_exception(exc)
                self.abort()
                return
        self._app = app
        app.connection_made(self)
        if isinstance(role, _Dial) and not role.waiter.done():
            role.waiter.set_result((self, app))
        # Application data may have come in the same read as the handshake's last flight.
        self._read()

    def _read(self) -> None:
        ssl = self._ssl
        source = self._in
        scratch = _scratch
        buf = scratch.buf
        while self._state == _OPEN:
            if self._read_paused:
                self._unread = True
                break
            # Coalesce the records of this read into one delivery. With a record's room left,
            # SSL_read takes a whole record (no read-ahead), so an empty BIO means that
            # nothing waits: no failing SSL_read just to learn it.
            got = 0
            code = _WANT_READ
            while _SCRATCH - got >= _RECORD:
                size = _SSL_read(ssl, buf + got if got else buf, _SCRATCH - got)
                if size <= 0:
                    code = _SSL_get_error(ssl, size)
                    break
                got += size
                if not _BIO_pending(source, _NULL):
                    break
            else:
                code = 0  # the scratch filled up: more may wait
            error = None
            if code not in (0, _WANT_READ, _ZERO_RETURN):
                error = _failure(ssl, code)
            if got:
                app: Any = self._app
                app.data_received(scratch.view[:got])
            if code == 0:
                continue  # the scratch filled up: more may wait
            if code == _WANT_READ:
                break
            if self._state != _OPEN:
                return
            if code == _ZERO_RETURN:
                self._deliver_eof()  # the peer's close_notify
                return
            assert error is not None
            self._fatal(error)
            return
        # What reading may have queued (the answer to a peer's KeyUpdate) leaves with the next
        # write: no flush per read.

    def _read_unread(self) -> None:
        if self._state != _OPEN or self._read_paused:
            if self._state == _OPEN:
                self._unread = True
            return
        self._read()
        if self._eof_pending and not self._unread and self._state == _OPEN:
            self._eof_pending = False
            self._deliver_eof()

    def _deliver_eof(self) -> None:
        # Once: the peer's close_notify is usually followed by its TCP end.
        if self._eof:
            return
        self._eof = True
        app: Any = self._app
        if not app.eof_received():
            self.close()

    def _flush(self) -> None:
        out = self._out
        raw = self._raw
        if raw is None or raw.is_closing():
            return  # the socket is going (its connection_lost is on its way): nothing to send
        scratch = _scratch
        while True:
            size = _BIO_read(out, scratch.buf, _SCRATCH)
            if size <= 0:
                return
            raw.write(scratch.view[:size])
            if size < _SCRATCH:
                return

    def _fatal(self, error: TlsError) -> None:
        """A record-layer failure mid-stream: drop the connection, the app sees why."""
        if self._state >= _CLOSING:
            return
        self._error = error
        if self._out is not None:
            self._flush()  # the alert
        self.abort()

    def _handshake_failed(self, error: TlsError) -> None:
        if self._state != _HANDSHAKE:
            return
        self._state = _CLOSING
        self._handshake_over()
        self._report_failure(error)
        if self._raw is not None:
            self._raw.abort()

    def _report_failure(self, error: TlsError) -> None:
        role = self._role
        if isinstance(role, TlsAcceptor):
            role.on_failure(error.reason)
        elif not role.waiter.done():
            role.waiter.set_exception(error)

    def _timed_out(self) -> None:
        self._handshake_failed(TlsError("handshake-timeout", "the peer did not finish in time"))

    def _handshake_over(self) -> None:
        """The handshake is done, failed, timed out, or its connection is going: once or more."""
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        role = self._role
        if isinstance(role, TlsAcceptor):
            role.handshaking.discard(self)


def server_factory(
    context: Callable[[], TlsContext],
    on_handshake: Callable[[TlsTransport], asyncio.BaseProtocol | None],
    on_failure: Callable[[str], None],
    timeout: float,
) -> TlsAcceptor:
    """A protocol factory for ``loop.create_server`` that terminates TLS on each connection.

    ``context`` is read once per new connection (rotation swaps what it returns). After the
    handshake ``on_handshake(transport)`` returns the application protocol, which then gets
    ``connection_made(transport)``, or ``None`` to refuse (the connection is aborted; the
    hook counts its own reason). A failed or timed-out handshake calls ``on_failure(label)``.
    """
    if timeout <= 0:
        raise ValueError("the handshake timeout must be positive")
    return TlsAcceptor(context, on_handshake, on_failure, timeout)


async def connect(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], _P],
    host: str,
    port: int,
    context: TlsContext,
    sni: str | None,
    timeout: float,  # noqa: ASYNC109 - one bound for connect and handshake, as pools want
    *,
    verify: Callable[[TlsTransport], None] | None = None,
) -> tuple[TlsTransport, _P]:
    """Open a TLS connection; the protocol ``factory`` makes gets it after the handshake.

    ``timeout`` bounds the TCP connect and the handshake together (``TimeoutError``).
    ``verify(transport)`` runs after the handshake, before the protocol is made; what it
    raises is raised here. A failed handshake raises `TlsError`.
    """
    if context.server_side:
        raise ValueError("connect needs a client context")
    waiter: asyncio.Future[tuple[TlsTransport, asyncio.BaseProtocol]] = loop.create_future()
    tls = TlsTransport(context, _Dial(factory, sni, verify, waiter))
    try:
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: tls, host, port)
            transport, protocol = await waiter
    except BaseException:
        tls.abort()
        raise
    return transport, protocol  # type: ignore[return-value]


def _base(method: int, svid: X509Svid) -> SSL.Context:
    context = SSL.Context(method)
    # pyOpenSSL turns partial writes on; over a memory BIO they only split an SSL_write.
    _lib.SSL_CTX_clear_mode(context._context, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.set_options(SSL.OP_NO_TICKET)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    # cryptography objects, as pyOpenSSL 26 wants them (the types-pyOpenSSL stubs predate it).
    context.use_certificate(cast(Any, svid.leaf))
    for intermediate in svid.chain[1:]:
        context.add_extra_chain_cert(cast(Any, intermediate))
    context.use_privatekey(cast(Any, svid.key))
    context.check_privatekey()
    return context


def _trust(
    context: SSL.Context, roots: Sequence[Any]
) -> tuple[dict[int, bytes], tuple[object, ...]]:
    """Trust ``roots``; their X509 pointers in the store, mapped to their DER.

    OpenSSL's verified chain ends at the store's own X509 object, so the anchor's DER is a
    dict lookup by pointer (`TlsTransport.peer_chain` falls back to encoding it).
    No roots (a revoked domain) leaves the store empty: every peer then fails the handshake.
    """
    store = context.get_cert_store()
    assert store is not None
    anchors: dict[int, bytes] = {}
    keep = []
    for root in roots:
        cert = crypto.X509.from_cryptography(root)
        store.add_cert(cert)
        keep.append(cert)
        pointer = cast(Any, cert)._x509
        anchors[int(_ffi.cast("uintptr_t", pointer))] = _der(pointer)
    return anchors, tuple(keep)


def _der(cert: Any) -> bytes:
    bio = _lib.BIO_new(_lib.BIO_s_mem())
    try:
        if _lib.i2d_X509_bio(bio, cert) != 1:
            _lib.ERR_clear_error()
            raise TlsError("handshake-failed", "cannot encode a certificate")
        data = _ffi.new("char **")
        size = _lib.BIO_get_mem_data(bio, data)
        return bytes(_ffi.buffer(data[0], size))
    finally:
        _lib.BIO_free(bio)


def _alpn_selector(offer: Sequence[str]) -> Any:
    """An ALPN select callback choosing the client's first protocol that is in ``offer``."""
    wanted = frozenset(name.encode("ascii") for name in offer)
    ok: int = _lib.SSL_TLSEXT_ERR_OK
    noack: int = _lib.SSL_TLSEXT_ERR_NOACK

    def select(ssl: Any, out: Any, outlen: Any, offered: Any, size: int, arg: Any) -> int:
        data = _ffi.buffer(offered, size)[:]
        index = 0
        while index < size:
            length = data[index]
            name = data[index + 1 : index + 1 + length]
            if len(name) == length and name in wanted:
                out[0] = offered + index + 1
                outlen[0] = length
                return ok
            index += 1 + length
        return noack

    return _ffi.callback(
        "int (*)(SSL *, unsigned char **, unsigned char *, const unsigned char *, "
        "unsigned int, void *)",
        select,
        error=_lib.SSL_TLSEXT_ERR_ALERT_FATAL,
    )


def _failure(ssl: Any, code: int) -> TlsError:
    """Why the last call on ``ssl`` failed; empties OpenSSL's error queue."""
    reasons = []
    while True:
        error = _lib.ERR_get_error()
        if not error:
            break
        text = _lib.ERR_reason_error_string(error)
        if text != _ffi.NULL:
            reasons.append(_ffi.string(text).decode("ascii", "replace"))
    verify = _lib.SSL_get_verify_result(ssl) if ssl is not None else 0
    if verify != _lib.X509_V_OK:
        detail = _ffi.string(_lib.X509_verify_cert_error_string(verify)).decode()
        return TlsError(_VERIFY_LABELS.get(verify, "untrusted-chain"), detail, verify)
    if not reasons:
        if code == _SYSCALL:
            return TlsError("handshake-failed", "unexpected end of the stream")
        return TlsError("handshake-failed", f"SSL error {code}")
    keys = [reason.upper().replace(" ", "_") for reason in reasons]
    detail = "; ".join(reasons)
    for key in keys:
        if key in _PLAINTEXT:
            return TlsError("plaintext", detail)
        if "CERTIFICATE_VERIFY_FAILED" in key or "UNKNOWN_CA" in key:
            return TlsError("untrusted-chain", detail)
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in key or "CERTIFICATE_REQUIRED" in key:
            return TlsError("no-certificate", detail)
    return TlsError("handshake-failed", detail)
