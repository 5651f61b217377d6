"""A raw HTTP/1.1 client for the tests: sends bytes as given, reads responses strictly."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass


@dataclass
class Answer:
    """One response as the client read it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunked: bool

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        assert len(values) <= 1, f"header {name!r} repeated"
        return values[0] if values else None

    def names(self) -> set[bytes]:
        return {n.lower() for n, _ in self.headers}


class Client:
    """One connection to the sidecar."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def send(self, data: bytes, *, per_byte: bool = False) -> None:
        if not per_byte:
            self.writer.write(data)
            await self.writer.drain()
            return
        for index in range(len(data)):
            if self.writer.is_closing():
                return
            self.writer.write(data[index : index + 1])
            try:
                await self.writer.drain()
            except ConnectionError:
                return
            # Give the loop a turn so each byte leaves as its own segment.
            await asyncio.sleep(0)

    async def read(self, *, head: bool = False, within: float = 5.0) -> Answer:
        return await asyncio.wait_for(self._read(head), within)

    async def _read(self, head_request: bool) -> Answer:
        while True:
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw[:-4].split(b"\r\n")
            version, code = lines[0].split(b" ")[:2]
            assert version == b"HTTP/1.1", lines[0]
            status = int(code)
            headers = []
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers.append((name, value.strip()))
            if 100 <= status < 200 and status != 101:
                continue
            break
        values = {n.lower(): v for n, v in headers}
        chunked = False
        if head_request or status in (204, 304, 101):
            body = b""
        elif b"transfer-encoding" in values:
            assert values[b"transfer-encoding"] == b"chunked"
            assert b"content-length" not in values
            chunked = True
            parts = bytearray()
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
                if size == 0:
                    assert await self.reader.readexactly(2) == b"\r\n"
                    break
                parts += await self.reader.readexactly(size)
                assert await self.reader.readexactly(2) == b"\r\n"
            body = bytes(parts)
        elif b"content-length" in values:
            body = await self.reader.readexactly(int(values[b"content-length"]))
        else:
            body = await self.reader.read()
        return Answer(status, headers, body, chunked)

    async def closed(self, within: float = 5.0) -> bool:
        """Whether the sidecar closes the connection (EOF or reset) with nothing more sent."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), within)
        except ConnectionError:
            return True
        return rest == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
