"""The policy directory: every policy file loaded as one set, hot-reloaded, last good kept.

The directory's ``*.yaml`` and ``*.yml`` files (hidden files skipped: editors' temporaries)
are read through :func:`proxy.config.loader.load_file` with the policy kinds (TrafficPolicy,
AuthorizationPolicy, ExportPolicy, FailoverPolicy). A reload is all or nothing: if any file is
rejected (``file:line:col: field: reason``), or the files contradict each other (two
documents of one kind and name, two FailoverPolicies for one service), the whole new set is
refused and the last good set stays in force. Until a first set was accepted there is none,
and the control plane pushes nothing (a missing policy set is not an empty one).

Changes are found by polling the files' (name, mtime, size, inode) every ``poll_interval``
seconds. Metrics: ``snapbright_config_reload_total{result="ok"|"rejected"}`` and
``snapbright_config_last_reload_success_timestamp_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from federation.export.model import ExportPolicy
from health.failover.model import FailoverPolicy
from proxy.config.loader import load_file
from proxy.config.model import Document
from proxy.policy.model import AuthorizationPolicy, TrafficPolicy

_log = logging.getLogger(__name__)

POLICY_KINDS: Mapping[str, type[Document]] = {
    kind.KIND: kind for kind in (TrafficPolicy, AuthorizationPolicy, ExportPolicy, FailoverPolicy)
}
"""The kinds a policy directory may hold."""

_D = TypeVar("_D", bound=Document)
_SUFFIXES = (".yaml", ".yml")

Stamp = tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True, slots=True)
class PolicySet:
    """One accepted set of policies, by kind, and the files it came from."""

    traffic: tuple[TrafficPolicy, ...] = ()
    authorization: tuple[AuthorizationPolicy, ...] = ()
    export: tuple[ExportPolicy, ...] = ()
    failover: tuple[FailoverPolicy, ...] = ()
    files: tuple[str, ...] = ()

    def peers_of(self, service: str) -> frozenset[str]:
        """The peers a local service is exported to, over every ExportPolicy (none: none)."""
        return frozenset(peer for policy in self.export for peer in policy.peers_of(service))

    @property
    def documents(self) -> tuple[Document, ...]:
        """Every document of the set."""
        return (*self.traffic, *self.authorization, *self.export, *self.failover)


@dataclass(frozen=True, slots=True)
class LoadState:
    """How the last reload went, for ``snapbright status`` and ``check``."""

    ok: bool
    errors: tuple[str, ...] = ()
    attempted_at: float | None = None
    last_success_at: float | None = None
    files: tuple[str, ...] = ()


@dataclass(slots=True)
class _Metrics:
    reloads: Counter
    last_success: Gauge
    registry: CollectorRegistry = field(repr=False)


class PolicyDirectory:
    """The policies in force, from a directory (or none: an empty set, ready at once)."""

    def __init__(
        self,
        directory: Path | None,
        registry: CollectorRegistry,
        *,
        poll_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._directory = directory
        self._poll_interval = poll_interval
        self._clock = clock
        self._current: PolicySet | None = None if directory is not None else PolicySet()
        self._state = LoadState(ok=directory is None)
        self._stamp: Stamp | None = None
        self._changed = asyncio.Event()
        self._generation = 0
        self._metrics = _Metrics(
            Counter(
                "snapbright_config_reload_total",
                "Policy directory reloads, by result (ok or rejected).",
                ["result"],
                registry=registry,
            ),
            Gauge(
                "snapbright_config_last_reload_success_timestamp_seconds",
                "When the policy set was last loaded successfully (Unix seconds).",
                registry=registry,
            ),
            registry,
        )

    @property
    def ready(self) -> bool:
        """True once a set was accepted."""
        return self._current is not None

    def current(self) -> PolicySet | None:
        """The set in force (the last good one), None before any was accepted."""
        return self._current

    @property
    def state(self) -> LoadState:
        """How the last reload went."""
        return self._state

    def reload(self) -> LoadState:
        """Read the whole directory now; accept it whole or keep the last good set."""
        if self._directory is None:
            return self._state
        now = self._clock()
        self._stamp = _stamp(self._directory)
        files = [self._directory / name for name, *_ in self._stamp]
        policies, errors = _load(files)
        if not self._directory.is_dir():
            errors = [f"{self._directory}: not a directory"]
        if errors or policies is None:
            self._metrics.reloads.labels("rejected").inc()
            for error in errors:
                _log.warning("policies: %s", error)
            self._state = LoadState(
                False, tuple(errors), now, self._state.last_success_at, self._state.files
            )
            return self._state
        self._current = policies
        self._generation += 1
        self._changed.set()
        self._metrics.reloads.labels("ok").inc()
        self._metrics.last_success.set(now)
        self._state = LoadState(True, (), now, now, policies.files)
        _log.info("policies: loaded %d document(s)", len(policies.documents))
        return self._state

    async def watch(self) -> AsyncIterator[PolicySet]:
        """Each newly accepted set (the current one first, if any), polling for changes."""
        seen = -1
        while True:
            if self._current is not None and self._generation != seen:
                seen = self._generation
                yield self._current
                continue
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), self._poll_interval)
            except TimeoutError:
                if self._directory is not None and _stamp(self._directory) != self._stamp:
                    self.reload()


def _stamp(directory: Path) -> Stamp:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return ()
    stamp = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.endswith(_SUFFIXES):
            continue
        try:
            st = entry.stat()
        except OSError:
            continue
        stamp.append((entry.name, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stamp)


def _load(files: Iterable[Path]) -> tuple[PolicySet | None, list[str]]:
    errors: list[str] = []
    by_kind: dict[str, list[tuple[str, Document]]] = {kind: [] for kind in POLICY_KINDS}
    names: dict[tuple[str, str, str], str] = {}
    sources: list[str] = []
    for path in files:
        result = load_file(path, POLICY_KINDS)
        sources.append(result.source)
        if not result.ok:
            errors.extend(str(d) for d in result.diagnostics)
            continue
        for document in result.documents:
            key = (document.kind, document.metadata.namespace, document.metadata.name)
            if key in names:
                errors.append(
                    f"{result.source}:1:1: metadata.name: {document.kind} "
                    f"{key[1]}/{key[2]} is also defined in {names[key]}"
                )
                continue
            names[key] = result.source
            by_kind[document.kind].append((result.source, document))
    failover_services: dict[str, str] = {}
    for source, document in by_kind[FailoverPolicy.KIND]:
        assert isinstance(document, FailoverPolicy)
        service = document.spec.service
        if service in failover_services:
            errors.append(
                f"{source}:1:1: spec.service: service {service!r} already has a FailoverPolicy "
                f"in {failover_services[service]}"
            )
        failover_services[service] = source
    if errors:
        return None, errors
    documents = [d for kind in by_kind.values() for _, d in kind]
    return (
        PolicySet(
            traffic=_of(documents, TrafficPolicy),
            authorization=_of(documents, AuthorizationPolicy),
            export=_of(documents, ExportPolicy),
            failover=_of(documents, FailoverPolicy),
            files=tuple(sources),
        ),
        [],
    )


def _of(documents: Iterable[Document], kind: type[_D]) -> tuple[_D, ...]:
    return tuple(d for d in documents if isinstance(d, kind))
