"""The latest-value broadcast every catalog source publishes through.

A source publishes whole :class:`~federation.catalog.model.Catalog` values; the feed keeps the
last one, drops a value whose entries did not change, and lets any number of readers
``async for catalog in feed.watch()``. A reader that falls behind skips straight to the newest
value (updates coalesce), so a slow consumer never holds a source back. Nothing is yielded
before the source is ready, i.e. before its first complete read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from federation.catalog.model import Catalog


class CatalogSource(Protocol):
    """What the discovery server and mirroring read: a catalog that changes over time."""

    @property
    def ready(self) -> bool:
        """True once the source has completed its first full read."""
        ...

    def current(self) -> Catalog | None:
        """The last good catalog, None before the source is ready."""
        ...

    def watch(self) -> AsyncIterator[Catalog]:
        """The current catalog once ready, then every later one (coalesced)."""
        ...


class CatalogFeed:
    """Holds the last published catalog and wakes the readers of :meth:`watch`."""

    def __init__(self) -> None:
        self._current: Catalog | None = None
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def ready(self) -> bool:
        """True once a first catalog was published."""
        return self._current is not None

    @property
    def index(self) -> int:
        """The index of the current catalog, 0 before the first."""
        return 0 if self._current is None else self._current.index

    def current(self) -> Catalog | None:
        """The last published catalog."""
        return self._current

    def publish(self, catalog: Catalog) -> bool:
        """Make ``catalog`` current unless it holds the same entries; True when it did.

        The index must grow: a reader relies on it to tell versions apart.
        """
        previous = self._current
        if previous is not None:
            if previous.same_content(catalog):
                return False
            if catalog.index <= previous.index:
                raise ValueError(f"catalog index {catalog.index} is not above {previous.index}")
        self._current = catalog
        self._wake()
        return True

    def close(self) -> None:
        """End every :meth:`watch` iteration."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        # Readers wait on the event of their generation; a fresh one serves the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    async def watch(self) -> AsyncIterator[Catalog]:
        """The current catalog once there is one, then each newer catalog until closed."""
        seen = -1
        while not self._closed:
            current = self._current
            if current is not None and current.index > seen:
                seen = current.index
                yield current
                continue
            await self._changed.wait()
