"""Consul writes through py-consul: mirror write-back and leader election among replicas.

py-consul (``import consul``) builds the requests and parses the answers of the catalog,
health, KV and session endpoints; the transport under it is ours (:class:`_Transport`, on
the control plane's aiohttp session) so that timeouts, connection limits and error mapping
are the same as the watcher's. py-consul's errors become ours at this boundary:
:class:`ConsulUnavailable` (retry with backoff) and :class:`ConsulRejected` (a request Consul
will never accept; do not retry it blindly).

- :class:`LeaderElection`: a session (TTL, ``behavior=release``, lock-delay) and
  ``PUT /v1/kv/<key>?acquire=<session>``. The leader watches the key with a blocking query
  and renews its session; the moment the key names another session or none, a renewal
  returns 404, or Consul cannot be reached, it steps down. Followers block on the key and try
  to acquire when it is free; Consul's lock-delay keeps a new leader out for a moment after
  an old one's session is invalidated.
- :class:`MirrorWriter`: mirrored services (``pay@ap-southeast``) are registered in Consul as
  instances of ``pay`` tagged ``snapbright-mirror`` with meta ``snapbright-mirror-of``, so
  Consul-aware clients see them too (the watcher skips them: they are not local endpoints).
  Only the leader writes; the writer checks before every write.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import consul
import consul.base

from federation.catalog.core import Backoff
from federation.catalog.model import AdmissionPolicy, Endpoint, Reason
from federation.catalog.watch import MIRROR_META

MIRROR_TAG = "snapbright-mirror"
PEER_META = "snapbright-peer"
SERVICE_META = "snapbright-service"


class ConsulUnavailable(Exception):
    """Consul could not be reached or failed (5xx, 429, timeout): retry with backoff."""


class ConsulRejected(Exception):
    """Consul refused a request (4xx): retrying the same request will not help."""


def _wait_seconds(params: Any) -> float:
    for key, value in params or ():
        if key == "wait":
            text = str(value)
            if text.endswith("ms"):
                return float(text[:-2]) / 1000
            if text.endswith("s"):
                return float(text[:-1])
    return 0.0


class _Transport(consul.base.HTTPClient):  # type: ignore[misc]
    """py-consul's HTTP seam on our aiohttp session (its own aio client warns on aiohttp 3.14)."""

    def __init__(
        self, session: aiohttp.ClientSession, host: str, port: int, scheme: str, timeout: float
    ) -> None:
        super().__init__(host, port, scheme)
        self._session = session
        self._timeout = timeout

    async def _request(
        self,
        callback: Callable[[consul.base.Response], Any],
        method: str,
        path: str,
        params: Any,
        data: str | bytes | None,
        headers: Mapping[str, str] | None,
    ) -> Any:
        wait = _wait_seconds(params)
        timeout = aiohttp.ClientTimeout(total=self._timeout + wait + wait / 16)
        try:
            async with self._session.request(
                method, self.uri(path, params), data=data, headers=headers, timeout=timeout
            ) as response:
                body = await response.text(encoding="utf-8")
                answer = consul.base.Response(response.status, response.headers, body)
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ConsulUnavailable(f"{method} {path}: {error or type(error).__name__}") from error
        if answer.code == 429 or answer.code >= 500:
            raise ConsulUnavailable(f"{method} {path}: {answer.code} {body[:200]}")
        try:
            return callback(answer)
        except consul.NotFound:
            raise
        except consul.ConsulException as error:
            raise ConsulRejected(f"{method} {path}: {error}") from error

    def get(
        self, callback: Any, path: str, params: Any = None, headers: Any = None, **_: Any
    ) -> Any:
        return self._request(callback, "GET", path, params, None, headers)

    def put(
        self,
        callback: Any,
        path: str,
        params: Any = None,
        data: Any = "",
        headers: Any = None,
        **_: Any,
    ) -> Any:
        return self._request(callback, "PUT", path, params, data, headers)

    def delete(
        self,
        callback: Any,
        path: str,
        params: Any = None,
        data: Any = "",
        headers: Any = None,
        **_: Any,
    ) -> Any:
        return self._request(callback, "DELETE", path, params, data, headers)

    def post(
        self,
        callback: Any,
        path: str,
        params: Any = None,
        data: Any = "",
        headers: Any = None,
        **_: Any,
    ) -> Any:
        return self._request(callback, "POST", path, params, data, headers)

    def close(self) -> None:
        """The session belongs to the caller."""


class _PyConsul(consul.base.Consul):  # type: ignore[misc]
    def __init__(self, transport: _Transport, token: str | None) -> None:
        self._transport = transport
        super().__init__(host=transport.host, port=transport.port, scheme=transport.scheme)
        if token:
            self.token = token

    def http_connect(self, *_: Any, **__: Any) -> _Transport:
        return self._transport


@dataclass(frozen=True, slots=True)
class LockHolder:
    """Who holds the leader key: the session and the value it wrote (a replica's name)."""

    session: str | None
    value: str


class ConsulClient:
    """The Consul calls the control plane makes, typed, with errors mapped to ours."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or parts.hostname is None:
            raise ValueError(f"Consul address must be http(s)://host:port, not {base_url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 8500)
        transport = _Transport(session, parts.hostname, port, parts.scheme, timeout)
        self._api = _PyConsul(transport, token)

    async def register_service(
        self,
        service_id: str,
        name: str,
        address: str,
        port: int,
        *,
        tags: Collection[str] = (),
        meta: Mapping[str, str] | None = None,
    ) -> None:
        """``PUT /v1/agent/service/register``."""
        await self._api.agent.service.register(
            name,
            service_id=service_id,
            address=address,
            port=port,
            tags=list(tags),
            meta=dict(meta or {}),
        )

    async def deregister_service(self, service_id: str) -> bool:
        """``PUT /v1/agent/service/deregister/<id>``; False when it was not registered."""
        # py-consul answers False for Consul's 404 ("Unknown service ID").
        removed: bool = await self._api.agent.service.deregister(service_id)
        return removed

    async def services(self) -> dict[str, list[str]]:
        """``GET /v1/catalog/services``: service names and their tags."""
        _, listing = await self._api.catalog.services()
        return dict(listing)

    async def health_service(self, name: str) -> list[dict[str, Any]]:
        """``GET /v1/health/service/<name>``: every instance, with its checks."""
        _, entries = await self._api.health.service(name)
        return list(entries)

    async def session_create(self, name: str, ttl: int, lock_delay: int) -> str:
        """``PUT /v1/session/create`` with ``behavior=release``; returns the session id."""
        session_id: str = await self._api.session.create(
            name=name, ttl=ttl, lock_delay=lock_delay, behavior="release"
        )
        return session_id

    async def session_renew(self, session_id: str) -> bool:
        """``PUT /v1/session/renew/<id>``; False when the session is gone."""
        try:
            await self._api.session.renew(session_id)
        except consul.NotFound:
            return False
        return True

    async def session_destroy(self, session_id: str) -> None:
        """``PUT /v1/session/destroy/<id>``: releases the locks it holds."""
        await self._api.session.destroy(session_id)

    async def kv_acquire(self, key: str, value: str, session_id: str) -> bool:
        """``PUT /v1/kv/<key>?acquire=<session>``; True when the lock is ours."""
        acquired: bool = await self._api.kv.put(key, value, acquire=session_id)
        return acquired

    async def kv_release(self, key: str, session_id: str) -> bool:
        """``PUT /v1/kv/<key>?release=<session>``."""
        released: bool = await self._api.kv.put(key, None, release=session_id)
        return released

    async def kv_holder(
        self, key: str, index: int = 0, wait: float | None = None
    ) -> tuple[int, LockHolder | None]:
        """``GET /v1/kv/<key>`` (blocking when ``index`` > 0): the index and who holds it."""
        wait_text = f"{max(1, round(wait * 1000))}ms" if wait else None
        raw_index, entry = await self._api.kv.get(key, index=index or None, wait=wait_text)
        try:
            new_index = int(raw_index)
        except (TypeError, ValueError):
            raise ConsulUnavailable(f"GET /v1/kv/{key}: bad X-Consul-Index") from None
        if entry is None:
            return new_index, None
        value = entry.get("Value") or b""
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        return new_index, LockHolder(entry.get("Session"), text)


class LeaderElection:
    """One control-plane replica's campaign for the leader key; run :meth:`run` in a task.

    ``renew_every`` is how often the leader renews its session and re-checks the key (well
    under ``ttl``); ``on_change`` is called with True/False on every change of leadership.
    """

    def __init__(
        self,
        client: ConsulClient,
        key: str,
        holder: str,
        *,
        ttl: int = 15,
        lock_delay: int = 15,
        renew_every: float | None = None,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        if not 10 <= ttl <= 86400:
            raise ValueError("Consul session TTLs are between 10 s and 24 h")
        if lock_delay < 0:
            raise ValueError("lock_delay must not be negative")
        self._client = client
        self._key = key
        self._holder = holder
        self._ttl = ttl
        self._lock_delay = lock_delay
        self._renew_every = renew_every if renew_every is not None else ttl / 3
        if not 0 < self._renew_every < ttl:
            raise ValueError("renew_every must be positive and below the TTL")
        self._backoff = backoff or Backoff(base=0.2, cap=10.0)
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._on_change = on_change
        self._leading = False
        self._session: str | None = None

    @property
    def is_leader(self) -> bool:
        """True only while this replica holds the key under a live session."""
        return self._leading

    @property
    def session_id(self) -> str | None:
        """The session this replica campaigns with, if any."""
        return self._session

    async def run(self) -> None:
        """Campaign until cancelled; on cancellation, destroy the session (releasing the key)."""
        failures = 0
        try:
            while True:
                try:
                    await self._campaign()
                    failures = 0
                except (ConsulUnavailable, ConsulRejected):
                    self._set(False)
                    failures += 1
                    await self._sleep(self._backoff.delay(failures, self._rng))
        finally:
            self._set(False)
            session, self._session = self._session, None
            if session is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._client.session_destroy(session))

    async def _campaign(self) -> None:
        """One session's life: wait for the key, hold it, return when the session is lost."""
        session = self._session
        if session is None or not await self._client.session_renew(session):
            self._session = None
            session = await self._client.session_create(
                f"snapbright-leader-{self._holder}", self._ttl, self._lock_delay
            )
            self._session = session
        index = 0
        while True:
            index, holder = await self._client.kv_holder(self._key, index, self._renew_every)
            free = holder is None or holder.session in (None, session)
            if free and await self._client.kv_acquire(self._key, self._holder, session):
                self._set(True)
                await self._hold(session, index)
                self._set(False)
                self._session = None
                return
            if not await self._client.session_renew(session):
                self._session = None
                return

    async def _hold(self, session: str, index: int) -> None:
        """Lead until the key stops naming our session or the session cannot be renewed."""
        while True:
            index, holder = await self._client.kv_holder(self._key, index, self._renew_every)
            if holder is None or holder.session != session:
                return
            if not await self._client.session_renew(session):
                return

    def _set(self, leading: bool) -> None:
        if leading != self._leading:
            self._leading = leading
            if self._on_change is not None:
                self._on_change(leading)


@dataclass(frozen=True, slots=True)
class MirrorEntry:
    """One gateway address of a mirrored service, as it is written back into Consul."""

    service: str
    peer: str
    address: str
    port: int

    def __post_init__(self) -> None:
        Endpoint(self.service, self.address, self.port, zone=self.peer)  # validates all four

    @property
    def target(self) -> str:
        """``pay@ap-southeast``."""
        return f"{self.service}@{self.peer}"

    @property
    def consul_id(self) -> str:
        """A stable service ID per service, peer and gateway address."""
        digest = hashlib.sha256(f"{self.address}:{self.port}".encode()).hexdigest()[:12]
        return f"snapbright-mirror-{self.service}-{self.peer}-{digest}"

    @property
    def meta(self) -> dict[str, str]:
        """The Snapbright metadata Consul-aware clients (and our watcher) recognise it by."""
        return {MIRROR_META: self.target, PEER_META: self.peer, SERVICE_META: self.service}


class MirrorWriter:
    """Makes the mirrors registered in Consul equal a desired set; writes only as leader."""

    def __init__(
        self, client: ConsulClient, is_leader: Callable[[], bool], policy: AdmissionPolicy
    ) -> None:
        self._client = client
        self._is_leader = is_leader
        self._policy = policy
        self.rejections: Counter[Reason] = Counter()

    async def sync(self, desired: Collection[MirrorEntry]) -> bool:
        """Register what is missing, deregister what is no longer desired.

        An entry the admission policy refuses is counted in :attr:`rejections` and not
        written (and removed if an earlier leader wrote it).

        Returns False, having written nothing more, as soon as this replica is not the
        leader. Raises :class:`ConsulUnavailable` when Consul fails mid-way (call again).
        """
        if not self._is_leader():
            return False
        present = await self._present()
        wanted: dict[str, MirrorEntry] = {}
        for entry in desired:
            # Consul-aware clients will dial what we write: never one of our admin ports.
            refused = self._policy.check_target(entry.address, entry.port)
            if refused is not None:
                self.rejections[refused.reason] += 1
                continue
            wanted[entry.consul_id] = entry
        for service_id, entry in wanted.items():
            if present.get(service_id) == entry:
                continue
            if not self._is_leader():
                return False
            await self._client.register_service(
                service_id,
                entry.service,
                entry.address,
                entry.port,
                tags=[MIRROR_TAG],
                meta=entry.meta,
            )
        for service_id in present.keys() - wanted.keys():
            if not self._is_leader():
                return False
            await self._client.deregister_service(service_id)
        return True

    async def _present(self) -> dict[str, MirrorEntry]:
        """The mirrors Consul holds now, whoever wrote them (an earlier leader included)."""
        present: dict[str, MirrorEntry] = {}
        for name, tags in (await self._client.services()).items():
            if MIRROR_TAG not in tags:
                continue
            for entry in await self._client.health_service(name):
                service = entry.get("Service") or {}
                meta = service.get("Meta") or {}
                if MIRROR_META not in meta:
                    continue
                try:
                    mirror = MirrorEntry(
                        meta.get(SERVICE_META, ""),
                        meta.get(PEER_META, ""),
                        service.get("Address", ""),
                        service.get("Port", 0),
                    )
                except ValueError:
                    mirror = None
                if mirror is not None and mirror.consul_id == service.get("ID"):
                    present[mirror.consul_id] = mirror
                else:
                    # Ours by its meta but not in our shape: replace it.
                    present[str(service.get("ID"))] = _UNMATCHABLE
        return present


_UNMATCHABLE = MirrorEntry("invalid", "invalid", "192.0.2.1", 1)
