"""Where a proxy's configuration comes from: the seam between a config and its transport.

A sidecar or gateway reads its configuration through a :class:`ConfigSource`: the current
value, and a stream of later values. Today the implementation is a file (re-read when it
changes or on SIGHUP); the control plane's discovery stream is the other implementation. A
bad update never replaces a good value: the source keeps the last good configuration, counts
the failure, and says why.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

T_co = TypeVar("T_co", covariant=True)
T = TypeVar("T")


class ConfigSource(Protocol[T_co]):
    """A configuration that may change while the process runs."""

    def current(self) -> T_co:
        """The configuration in force now (the last good one)."""
        ...

    def updates(self) -> AsyncIterator[T_co]:
        """Every later good configuration, in order, until the source is closed."""
        ...


class ConfigRejected(Exception):
    """A configuration update was invalid; ``reason`` says why (``file:line:col: …``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """One reload attempt: ``ok`` and, when not, the reason the new file was refused."""

    ok: bool
    reason: str = ""


class FileConfigSource(Generic[T]):
    """A config file, parsed by ``parse`` (which raises :class:`ConfigRejected`).

    The file is re-read when its (mtime, size, inode) changes, or that of a file
    ``also_watch`` names (e.g. the certificates the configuration points at), checked every
    ``poll_interval`` seconds, and on SIGHUP when :meth:`watch_sighup` was called. The
    constructor parses once and raises if the first file is bad: a process never starts on a
    configuration it cannot read.
    """

    def __init__(
        self,
        path: Path,
        parse: Callable[[Path], T],
        *,
        poll_interval: float = 1.0,
        on_reload: Callable[[ReloadResult], None] | None = None,
        also_watch: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self._path = path
        self._parse = parse
        self._poll_interval = poll_interval
        self._on_reload = on_reload
        self._also_watch = also_watch
        self._value = parse(path)
        self._stamp = self._stat()
        self._changed = asyncio.Event()
        self._version = 0
        self._closed = False

    def current(self) -> T:
        """The last good configuration."""
        return self._value

    def reload(self) -> ReloadResult:
        """Re-read the file now; keep the last good value if the new one is refused."""
        self._stamp = self._stat()
        try:
            value = self._parse(self._path)
        except ConfigRejected as exc:
            result = ReloadResult(ok=False, reason=exc.reason)
        except OSError as exc:
            result = ReloadResult(ok=False, reason=f"{self._path}: {exc.strerror or exc}")
        else:
            self._value = value
            self._version += 1
            self._changed.set()
            result = ReloadResult(ok=True)
        if self._on_reload is not None:
            self._on_reload(result)
        return result

    def watch_sighup(self) -> None:
        """Reload on SIGHUP (the loop must be running in the main thread)."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)

    def close(self) -> None:
        """End every :meth:`updates` iterator."""
        self._closed = True
        self._changed.set()

    async def updates(self) -> AsyncIterator[T]:
        """Yield each new good configuration; poll the file for changes meanwhile.

        One consumer per source: the process wiring fans a value out to its parts.
        """
        seen = self._version
        while not self._closed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=self._poll_interval)
            except TimeoutError:
                if self._stat() != self._stamp:
                    self.reload()
            if self._version != seen and not self._closed:
                seen = self._version
                self._changed.clear()
                yield self._value
            elif self._changed.is_set():
                self._changed.clear()

    def _stat(self) -> tuple[tuple[int, int, int] | None, ...]:
        paths = [str(self._path)]
        if self._also_watch is not None:
            paths.extend(self._also_watch())
        return tuple(_stat(path) for path in paths)


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
