"""The file config source: last good value stays in force, updates stream in order."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from proxy.config.source import ConfigRejected, FileConfigSource, ReloadResult


def _parse(path: Path) -> int:
    text = path.read_text()
    if not text.strip().isdigit():
        raise ConfigRejected(f"{path}:1:1: value: not a number")
    return int(text)


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    # Move the mtime forward explicitly: two writes within one clock tick look unchanged.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_first_bad_file_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_text("nope")
    with pytest.raises(ConfigRejected, match="not a number"):
        FileConfigSource(path, _parse)


def test_bad_reload_keeps_last_good_and_reports_reason(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_text("1")
    results: list[ReloadResult] = []
    source = FileConfigSource(path, _parse, on_reload=results.append)
    _write(path, "garbage")
    assert source.reload() == ReloadResult(ok=False, reason=f"{path}:1:1: value: not a number")
    assert source.current() == 1
    _write(path, "2")
    assert source.reload().ok
    assert source.current() == 2
    assert [r.ok for r in results] == [False, True]


def test_missing_file_on_reload_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_text("7")
    source = FileConfigSource(path, _parse)
    path.unlink()
    result = source.reload()
    assert not result.ok
    assert "No such file" in result.reason
    assert source.current() == 7


async def test_updates_yield_changed_files_and_skip_bad_ones(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_text("1")
    source = FileConfigSource(path, _parse, poll_interval=0.01)
    seen: list[int] = []

    async def consume() -> None:
        async for value in source.updates():
            seen.append(value)
            if value == 3:
                return

    task = asyncio.create_task(consume())
    _write(path, "bad")
    source.reload()
    _write(path, "3")
    await asyncio.wait_for(task, timeout=5)
    assert seen == [3]
    assert source.current() == 3


async def test_poll_notices_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_text("1")
    source = FileConfigSource(path, _parse, poll_interval=0.01)
    updates = source.updates()
    _write(path, "5")
    assert await asyncio.wait_for(anext(updates), timeout=5) == 5
    source.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(updates), timeout=5)
