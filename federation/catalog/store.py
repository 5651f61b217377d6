"""The embedded registry: the catalog of a control plane without Consul, kept in SQLite.

The database lives in the control plane's state directory (``catalog.sqlite3``), in WAL mode
with ``synchronous=FULL``: a method returns only after its transaction is on disk, so an
acknowledged registration survives a kill -9 of the process.

Workloads register an endpoint with a TTL and heartbeat within it; :meth:`Registry.expire`
drops what was not renewed. Deadlines are wall-clock seconds (they must mean the same after a
restart), passed in as ``now``; a reopened registry gives every registration one fresh TTL,
so a control-plane outage does not expire the workloads that could not reach it.

Methods are synchronous and run on the event loop's thread (each is one short transaction);
readers follow changes with ``async for catalog in registry.watch()``.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from federation.catalog import core
from federation.catalog.feed import CatalogFeed
from federation.catalog.model import (
    AdmissionPolicy,
    Catalog,
    CatalogEntryError,
    Reason,
    Registration,
    Rejection,
    Service,
    ServiceKey,
    admit_endpoint,
    admit_service,
    admit_workload,
)

FILE_NAME = "catalog.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS version (id INTEGER PRIMARY KEY CHECK (id = 1), idx INTEGER NOT NULL);
INSERT OR IGNORE INTO version (id, idx) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS services (
    namespace TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (namespace, name));
CREATE TABLE IF NOT EXISTS registrations (
    id TEXT PRIMARY KEY, body TEXT NOT NULL, ttl REAL NOT NULL, deadline REAL NOT NULL);
"""


class RegistrationRejected(Exception):
    """A registration was refused; ``rejection`` names the rule (e.g. an admin port)."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(f"{rejection.reason}: {rejection.subject}: {rejection.detail}")
        self.rejection = rejection


class Registry:
    """Services and workload registrations, persisted, published as :class:`Catalog` values."""

    def __init__(self, db: sqlite3.Connection, policy: AdmissionPolicy, now: float) -> None:
        self._db = db
        self._policy = policy
        self._feed = CatalogFeed()
        self._services: dict[ServiceKey, Service] = {}
        self._registrations: dict[str, Registration] = {}
        self._ttls: dict[str, float] = {}
        self._deadlines: dict[str, float] = {}
        self.rejections: Counter[Reason] = Counter()
        self._load(now)

    @classmethod
    def open(cls, state_dir: Path, policy: AdmissionPolicy, now: float) -> Registry:
        """Open (or create) the registry in ``state_dir``; ``now`` is wall-clock seconds."""
        state_dir.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(state_dir / FILE_NAME, isolation_level=None)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise RuntimeError(f"SQLite refused WAL mode ({mode}) for {state_dir}")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            return cls(db, policy, now)
        except BaseException:
            db.close()
            raise

    def close(self) -> None:
        """Close the database and end every :meth:`watch`."""
        self._feed.close()
        self._db.close()

    # -- reading ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The embedded registry is its own source of truth: ready once opened."""
        return self._feed.ready

    def current(self) -> Catalog | None:
        """The catalog as of the last acknowledged change."""
        return self._feed.current()

    def watch(self) -> AsyncIterator[Catalog]:
        """The current catalog, then each later one (coalesced)."""
        return self._feed.watch()

    def registration(self, registration_id: str) -> Registration | None:
        """A registration by id, if present."""
        return self._registrations.get(registration_id)

    # -- writing ---------------------------------------------------------------------------

    def put_service(self, service: Service) -> int:
        """Add or replace a service; returns the catalog index that includes it."""
        if self._services.get(service.key) == service:
            return self._feed.index
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO services (namespace, name, body) VALUES (?, ?, ?)",
                (service.namespace, service.name, json.dumps(_service_json(service))),
            )
            index = self._bump(db)
        self._services[service.key] = service
        return self._publish(index)

    def remove_service(self, name: str, namespace: str = "default") -> bool:
        """Remove a service entry (its registrations stay); True when there was one."""
        key = ServiceKey(namespace, name)
        if key not in self._services:
            return False
        with self._transaction() as db:
            db.execute("DELETE FROM services WHERE namespace = ? AND name = ?", (namespace, name))
            index = self._bump(db)
        del self._services[key]
        self._publish(index)
        return True

    def register(self, registration: Registration, ttl: float, now: float) -> int:
        """Register (or replace) an endpoint for ``ttl`` seconds from ``now``.

        Raises :class:`RegistrationRejected` when the admission policy refuses its address.
        Returns the catalog index that includes it, once it is durable.
        """
        refused = self._policy.check_target(
            registration.endpoint.address, registration.endpoint.port
        )
        if refused is not None:
            self.rejections[refused.reason] += 1
            raise RegistrationRejected(refused)
        until = core.deadline(now, ttl)
        changed = self._registrations.get(registration.id) != registration
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO registrations (id, body, ttl, deadline)"
                " VALUES (?, ?, ?, ?)",
                (registration.id, json.dumps(_registration_json(registration)), ttl, until),
            )
            index = self._bump(db) if changed else self._feed.index
        self._registrations[registration.id] = registration
        self._ttls[registration.id] = ttl
        self._deadlines[registration.id] = until
        return self._publish(index) if changed else index

    def heartbeat(self, registration_id: str, now: float) -> bool:
        """Renew a registration for its TTL; False when it is unknown (expired: register)."""
        ttl = self._ttls.get(registration_id)
        if ttl is None:
            return False
        until = core.deadline(now, ttl)
        with self._transaction() as db:
            db.execute(
                "UPDATE registrations SET deadline = ? WHERE id = ?", (until, registration_id)
            )
        self._deadlines[registration_id] = until
        return True

    def deregister(self, registration_id: str) -> bool:
        """Remove a registration; True when there was one."""
        return bool(self._remove((registration_id,)))

    def expire(self, now: float) -> tuple[str, ...]:
        """Remove the registrations not renewed by ``now``; returns their ids."""
        return self._remove(core.expired(self._deadlines, now))

    async def run_expiry(
        self, interval: float = 1.0, clock: Callable[[], float] = time.time
    ) -> None:
        """Expire stale registrations every ``interval`` seconds, until cancelled."""
        while True:
            self.expire(clock())
            await asyncio.sleep(interval)

    # -- internals -------------------------------------------------------------------------

    def _remove(self, ids: tuple[str, ...]) -> tuple[str, ...]:
        present = tuple(i for i in ids if i in self._registrations)
        if not present:
            return ()
        with self._transaction() as db:
            db.executemany("DELETE FROM registrations WHERE id = ?", [(i,) for i in present])
            index = self._bump(db)
        for registration_id in present:
            del self._registrations[registration_id]
            del self._ttls[registration_id]
            del self._deadlines[registration_id]
        self._publish(index)
        return present

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _bump(self, db: sqlite3.Connection) -> int:
        db.execute("UPDATE version SET idx = idx + 1 WHERE id = 1")
        index: int = db.execute("SELECT idx FROM version WHERE id = 1").fetchone()[0]
        return index

    def _publish(self, index: int) -> int:
        implied = {
            r.endpoint.key: Service(r.endpoint.service, r.endpoint.namespace)
            for r in self._registrations.values()
        }
        catalog = Catalog.of(
            index,
            services=(implied | self._services).values(),
            endpoints=(r.endpoint for r in self._registrations.values()),
            workloads=(r.workload for r in self._registrations.values()),
        )
        self._feed.publish(catalog)
        return index

    def _load(self, now: float) -> None:
        """Read every row back through admission: a tampered file cannot inject an entry."""
        for (body,) in self._db.execute("SELECT body FROM services"):
            service = admit_service(json.loads(body))
            if isinstance(service, Rejection):
                self.rejections[service.reason] += 1
                continue
            self._services[service.key] = service
        rows = self._db.execute("SELECT id, body, ttl, deadline FROM registrations").fetchall()
        for registration_id, body, ttl, until in rows:
            registration = _registration_from_json(registration_id, body, self._policy)
            if isinstance(registration, Rejection):
                self.rejections[registration.reason] += 1
                continue
            self._registrations[registration_id] = registration
            self._ttls[registration_id] = ttl
            self._deadlines[registration_id] = max(until, core.deadline(now, ttl))
        (index,) = self._db.execute("SELECT idx FROM version WHERE id = 1").fetchone()
        self._publish(index)


def _service_json(service: Service) -> dict[str, object]:
    return {
        "name": service.name,
        "namespace": service.namespace,
        "protocol": service.protocol.value,
        "tags": list(service.tags),
        "meta": dict(service.meta),
    }


def _registration_json(registration: Registration) -> dict[str, object]:
    endpoint = registration.endpoint
    return {
        "workload": {
            "name": registration.workload.name,
            "namespace": registration.workload.namespace,
            "service_account": registration.workload.service_account,
        },
        "endpoint": {
            "service": endpoint.service,
            "namespace": endpoint.namespace,
            "address": endpoint.address,
            "port": endpoint.port,
            "zone": endpoint.zone,
            "health": endpoint.health.value,
            "workload": endpoint.workload,
            "tags": list(endpoint.tags),
            "meta": dict(endpoint.meta),
        },
    }


def _registration_from_json(
    registration_id: str, body: str, policy: AdmissionPolicy
) -> Registration | Rejection:
    raw = json.loads(body)
    workload = admit_workload(_mapping(raw.get("workload")))
    endpoint = admit_endpoint(_mapping(raw.get("endpoint")), policy)
    if isinstance(workload, Rejection):
        return workload
    if isinstance(endpoint, Rejection):
        return endpoint
    try:
        return Registration(registration_id, workload, endpoint)
    except CatalogEntryError as error:
        return error.rejection


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, dict) else {}
