"""Reading a server-sent event stream in tests: one event (or comment) at a time."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass(frozen=True)
class Event:
    """One block of the stream: an event with its name, id and JSON data, or a comment."""

    name: str
    data: Any
    event_id: str | None = None
    comment: str | None = None


def parse(block: bytes) -> Event:
    """One block (the text between blank lines)."""
    name, event_id, data, comment = "message", None, [], None
    for line in block.decode().split("\n"):
        if line.startswith(":"):
            comment = line[1:].strip()
        elif line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("id: "):
            event_id = line[len("id: ") :]
        elif line.startswith("data: "):
            data.append(line[len("data: ") :])
        elif line.startswith("retry: "):
            name = "retry"
    if not data:
        return Event("comment" if comment is not None else name, None, event_id, comment)
    return Event(name, json.loads("\n".join(data)), event_id, comment)


async def next_event(response: aiohttp.ClientResponse, within: float = 5.0) -> Event:
    """The next block of ``response``'s stream."""
    block = await asyncio.wait_for(response.content.readuntil(b"\n\n"), within)
    if not block.endswith(b"\n\n"):
        raise EOFError("the stream ended")
    return parse(block[:-2])


async def until(
    response: aiohttp.ClientResponse, name: str, within: float = 5.0, **match: Any
) -> Event:
    """Skip to the next ``name`` event whose data has the ``match`` values."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        event = await next_event(response, max(0.01, deadline - loop.time()))
        if event.name == name and all(event.data.get(k) == v for k, v in match.items()):
            return event
