"""How CLI commands end: a one-line error with exit status 1, or a clean stop on a signal."""

from __future__ import annotations

import asyncio
import signal
from typing import NoReturn

import typer


def fail(message: str) -> NoReturn:
    """Print ``message`` on stderr and exit with status 1."""
    typer.echo(message, err=True)
    raise typer.Exit(code=1)


async def until_stopped() -> None:
    """Wait for SIGTERM or SIGINT (how `snapbright up` stops its processes, and Ctrl-C)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
