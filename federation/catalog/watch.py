"""Consul as a catalog source: our own aiohttp watcher of Consul blocking queries.

The hot path of discovery is a set of long polls, written here rather than through py-consul
so that every failure mode is ours to handle:

- ``GET /v1/catalog/services?index=N&wait=W`` follows which services exist, and one
  ``GET /v1/health/service/<name>?index=N&wait=W`` per service follows its instances;
- ``X-Consul-Index`` is stepped by :func:`federation.catalog.core.step_index`: an index that
  goes backwards resets to 0 and re-fetches, one of 0 or less continues from 1, and a wake-up
  with no change emits nothing (the feed drops a catalog whose entries did not change);
- 429, 5xx, a missing index, ``X-Consul-KnownLeader: false``, invalid or truncated JSON, a
  refused connection and a hang (a client timeout a little above ``wait + wait/16``) are all
  retried with jittered exponential backoff; the rng and the sleep are injectable.

The catalog stays at its last good value during an outage: nothing is published unless it
comes from successful reads, and a new watcher is not ready (publishes nothing) until it has
read the service list and every service in it once. Entries are admitted through
:func:`federation.catalog.model.admit_endpoint`: hostile ones are dropped and counted, the rest
of the snapshot stands. Instances that Snapbright itself wrote back as mirrors (meta
``snapbright-mirror-of``) are not local endpoints and are skipped.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from federation.catalog.core import Backoff, IndexEvent, blocking_timeout, step_index
from federation.catalog.feed import CatalogFeed
from federation.catalog.model import (
    AdmissionPolicy,
    Catalog,
    Endpoint,
    Reason,
    Rejection,
    Service,
    Workload,
    admit_endpoint,
    admit_service,
    admit_workload,
)

MIRROR_META = "snapbright-mirror-of"
WORKLOAD_META = "snapbright-workload"
PROTOCOL_META = "snapbright-protocol"
SERVICE_ACCOUNT_META = "snapbright-service-account"

_SEVERITY = {"passing": 0, "warning": 1, "critical": 2, "maintenance": 2}
_HEALTH_NAMES = ("passing", "warning", "critical")


class _Retry(Exception):
    """A read that failed in a way worth retrying; ``kind`` labels the failure counter."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class WatchSettings:
    """How the watcher polls: the blocking ``wait``, the hang margin, the backoff, and the
    largest response body it reads (a bigger one is a failure, not an allocation)."""

    wait: float = 30.0
    margin: float = 2.0
    backoff: Backoff = field(default_factory=Backoff)
    max_body: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        blocking_timeout(self.wait, self.margin)  # validates both
        if self.max_body < 1:
            raise ValueError("max_body must be positive")


def _format_wait(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


class ConsulWatcher:
    """Follows a Consul agent's catalog and publishes it as :class:`Catalog` values.

    Call :meth:`run` in a task; read with :meth:`watch`, :attr:`ready` and :meth:`current`.
    Each listed service holds one long poll open, so give it a session whose connector allows
    that many connections (``aiohttp.TCPConnector(limit=0)``, or a limit above the service
    count): aiohttp's default of 100 would queue the polls of the 101st service onwards.
    """

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        policy: AdmissionPolicy,
        *,
        settings: WatchSettings | None = None,
        token: str | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._session = session
        self._policy = policy
        self._settings = settings or WatchSettings()
        self._headers = {"X-Consul-Token": token} if token else {}
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._feed = CatalogFeed()
        self._listed: dict[str, Service] | None = None
        self._instances: dict[str, tuple[Endpoint, ...]] = {}
        self._workloads: dict[str, tuple[Workload, ...]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._mirror_only: set[str] = set()
        self.rejections: Counter[Reason] = Counter()
        self.failures: Counter[str] = Counter()
        self.index_events: Counter[IndexEvent] = Counter()

    # -- the CatalogSource surface -------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once the service list and every listed service were read once."""
        return self._feed.ready

    def current(self) -> Catalog | None:
        """The last good catalog, None until ready."""
        return self._feed.current()

    def watch(self) -> AsyncIterator[Catalog]:
        """The catalog once ready, then every change (coalesced)."""
        return self._feed.watch()

    # -- running ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow Consul until cancelled; never raises for Consul's failures."""
        try:
            await self._follow("/v1/catalog/services", self._apply_services)
        finally:
            tasks = list(self._tasks.values())
            self._tasks.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._feed.close()

    async def _follow(self, path: str, apply: Callable[[Any], None]) -> None:
        """One blocking-query loop: read, step the index, apply, back off on failure."""
        index = 0
        failures = 0
        while True:
            try:
                reported, body = await self._read(path, index)
                step = step_index(index, reported)
                if step.use_body:
                    apply(body)
            except _Retry as failure:
                failures += 1
                self.failures[failure.kind] += 1
                await self._sleep(self._settings.backoff.delay(failures, self._rng))
                continue
            failures = 0
            self.index_events[step.event] += 1
            index = step.next_index

    async def _read(self, path: str, index: int) -> tuple[int, Any]:
        query = {}
        if index > 0:
            query = {"index": str(index), "wait": _format_wait(self._settings.wait)}
        timeout = aiohttp.ClientTimeout(
            total=blocking_timeout(self._settings.wait, self._settings.margin)
        )
        try:
            async with self._session.get(
                self._base_url + path, params=query, headers=self._headers, timeout=timeout
            ) as response:
                if response.status != 200:
                    raise _Retry(f"http-{response.status}")
                if response.headers.get("X-Consul-KnownLeader", "true") == "false":
                    raise _Retry("no-leader")
                try:
                    reported = int(response.headers["X-Consul-Index"])
                except (KeyError, ValueError):
                    raise _Retry("bad-index") from None
                payload = bytearray()
                async for chunk in response.content.iter_any():
                    payload += chunk
                    if len(payload) > self._settings.max_body:
                        raise _Retry("too-large")
        except TimeoutError:
            raise _Retry("timeout") from None
        except aiohttp.ClientError:
            raise _Retry("unreachable") from None
        try:
            return reported, json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            # RecursionError: a hostile body of deeply nested brackets.
            raise _Retry("invalid-json") from None

    # -- applying reads ----------------------------------------------------------------------

    def _apply_services(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise _Retry("bad-shape")
        listed: dict[str, Service] = {}
        for name in body:
            service = admit_service({"name": name})
            if isinstance(service, Rejection):
                # A hostile name is never put in a URL, let alone routed to.
                self.rejections[service.reason] += 1
                continue
            listed[name] = service
        self._listed = listed
        for name in set(self._tasks) - set(listed):
            self._tasks.pop(name).cancel()
            self._instances.pop(name, None)
            self._workloads.pop(name, None)
            self._mirror_only.discard(name)
        for name in set(listed) - set(self._tasks):
            self._tasks[name] = asyncio.create_task(
                self._follow(
                    f"/v1/health/service/{quote(name, safe='')}",
                    functools.partial(self._apply_instances, name),
                ),
                name=f"consul-watch-{name}",
            )
        self._publish()

    def _apply_instances(self, name: str, body: Any) -> None:
        if not isinstance(body, list):
            raise _Retry("bad-shape")
        endpoints: list[Endpoint] = []
        workloads: list[Workload] = []
        mirrors = 0
        for entry in body:
            raw = _endpoint_fields(name, entry)
            if raw is None:
                mirrors += 1
                continue
            admitted = admit_endpoint(raw, self._policy)
            workload = _workload_of(admitted) if isinstance(admitted, Endpoint) else None
            if isinstance(workload, Rejection):
                admitted = workload  # an identity we cannot trust: drop the endpoint too
            if isinstance(admitted, Rejection):
                self.rejections[admitted.reason] += 1
                continue
            endpoints.append(admitted)
            if isinstance(workload, Workload):
                workloads.append(workload)
        self._instances[name] = tuple(endpoints)
        self._workloads[name] = tuple(workloads)
        if mirrors and not endpoints:
            # Only our own write-back lives under this name: not a local service.
            self._mirror_only.add(name)
        else:
            self._mirror_only.discard(name)
        self._publish()

    def _publish(self) -> None:
        listed = self._listed
        if listed is None:
            return
        if not self._feed.ready and not all(name in self._instances for name in listed):
            return  # still syncing: a partial first catalog would read as missing services
        services: list[Service] = []
        endpoints: list[Endpoint] = []
        workloads: list[Workload] = []
        for name, service in listed.items():
            instances = self._instances.get(name)
            if instances is None or name in self._mirror_only:
                continue
            protocols = {v for e in instances for k, v in e.meta if k == PROTOCOL_META}
            if len(protocols) == 1:
                chosen = admit_service({"name": name, "protocol": protocols.pop()})
                service = chosen if isinstance(chosen, Service) else service
            services.append(service)
            endpoints.extend(instances)
            workloads.extend(self._workloads.get(name, ()))
        self._feed.publish(Catalog.of(self._feed.index + 1, services, endpoints, workloads))


def _workload_of(endpoint: Endpoint) -> Workload | Rejection | None:
    """The workload an instance declares (meta ``snapbright-workload`` and
    ``snapbright-service-account``), which its SPIFFE ID will be issued for."""
    account = dict(endpoint.meta).get(SERVICE_ACCOUNT_META)
    if not endpoint.workload or account is None:
        return None
    return admit_workload(
        {"name": endpoint.workload, "namespace": endpoint.namespace, "service_account": account}
    )


def _endpoint_fields(name: str, entry: Any) -> dict[str, object] | None:
    """The raw fields of one ``/v1/health/service`` entry; None for our own mirrors.

    Only the shape is translated here; every value is judged by ``admit_endpoint``.
    """
    if not isinstance(entry, dict):
        return {"service": None}
    service = entry.get("Service")
    node = entry.get("Node")
    checks = entry.get("Checks")
    if not isinstance(service, dict) or not isinstance(node, dict) or not isinstance(checks, list):
        return {"service": None}
    meta = service.get("Meta") or {}
    if isinstance(meta, dict) and MIRROR_META in meta:
        return None
    severity = 0
    for check in checks:
        status = check.get("Status") if isinstance(check, dict) else None
        severity = max(severity, _SEVERITY.get(str(status), 2))
    locality = service.get("Locality")
    zone = locality.get("Zone", "") if isinstance(locality, dict) else ""
    workload = meta.get(WORKLOAD_META, "") if isinstance(meta, dict) else ""
    return {
        "service": service.get("Service", name),
        "namespace": service.get("Namespace") or "default",
        "address": service.get("Address") or node.get("Address"),
        "port": service.get("Port"),
        "zone": zone,
        "health": _HEALTH_NAMES[severity],
        "workload": workload,
        "tags": service.get("Tags") or [],
        "meta": meta,
    }
