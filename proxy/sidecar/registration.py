"""The sidecar's registration of its workload with the control plane's admin API.

``POST /api/v1/registrations`` at start (the address callers dial is the inbound listener),
``PUT …/{id}/heartbeat`` every third of the TTL the control plane granted (registering again
if it forgot us), ``DELETE …/{id}`` at shutdown. A control plane that is away is retried
with the next heartbeat; the data plane never waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout

__all__ = ["Registration"]

_log = logging.getLogger(__name__)
_TIMEOUT = ClientTimeout(total=5.0)


class Registration:
    """Keeps one workload registered while the sidecar runs."""

    def __init__(self, admin_url: str, body: dict[str, Any], *, retry_s: float = 5.0) -> None:
        self._url = admin_url.rstrip("/")
        self._body = body
        self._retry_s = retry_s
        self.id: str | None = None
        self.ttl_s = retry_s * 3
        self._task: asyncio.Task[None] | None = None

    async def _register(self, session: ClientSession) -> bool:
        async with session.post(f"{self._url}/api/v1/registrations", json=self._body) as reply:
            if reply.status != 200:
                _log.warning("registration refused (%d): %s", reply.status, await reply.text())
                return False
            answer = await reply.json()
        self.id = str(answer["id"])
        self.ttl_s = float(answer.get("ttlSeconds", self.ttl_s))
        return True

    async def _heartbeat(self, session: ClientSession) -> bool:
        url = f"{self._url}/api/v1/registrations/{self.id}/heartbeat"
        async with session.put(url) as reply:
            return reply.status == 200

    async def _keep(self) -> None:
        async with ClientSession(timeout=_TIMEOUT) as session:
            while True:
                try:
                    if self.id is None or not await self._heartbeat(session):
                        await self._register(session)
                except (ClientError, TimeoutError) as error:
                    _log.warning("control plane unreachable for registration: %s", error)
                await asyncio.sleep(self.ttl_s / 3 if self.id is not None else self._retry_s)

    def start(self) -> None:
        """Register now and keep the registration alive in the background."""
        self._task = asyncio.get_running_loop().create_task(self._keep())

    async def stop(self) -> None:
        """Stop heartbeating and deregister (best effort)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.id is None:
            return
        with contextlib.suppress(ClientError, TimeoutError):
            async with (
                ClientSession(timeout=_TIMEOUT) as session,
                session.delete(f"{self._url}/api/v1/registrations/{self.id}") as reply,
            ):
                _log.info("deregistered %s: %d", self.id, reply.status)
