"""`snapbright demo-app`: its options, and the process a mesh runs."""

from __future__ import annotations

import asyncio
import json
import re
import sys

import pytest
from typer.testing import CliRunner

from snapbright.cli.app import app


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--latency", "slow"], "--latency: Value error, invalid duration"),
        (["--error-rate", "2"], "--error-rate: Value error, must be between 0% and 100%"),
        (["--upstream", "pay"], "--upstream 'pay': write NAME=URL"),
        (["--upstream", "pay=127.0.0.1:1"], "write NAME=URL"),
        (["--rate", "0"], "rate must be above 0"),
    ],
)
def test_demo_app_refuses_bad_options_and_says_why(args: list[str], reason: str) -> None:
    base = ["demo-app", "--port", "0", "--name", "pay", "--cluster", "us-west"]
    result = CliRunner().invoke(app, [*base, *args])
    assert result.exit_code == 1
    assert reason in result.stderr


@pytest.mark.e2e
async def test_demo_app_serves_http_and_grpc_until_terminated() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "snapbright", "demo-app", "--port", "0", "--grpc-port", "0",
        "--service", "pay", "--cluster", "us-west", "--replica", "3", "--latency", "5ms",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=15)).decode()
        match = re.match(r"demo-app pay@us-west replica 3: http on 127.0.0.1:(\d+), grpc on", line)
        assert match is not None, line
        reader, writer = await asyncio.open_connection("127.0.0.1", int(match[1]))
        writer.write(b"GET /hello HTTP/1.1\r\nHost: pay\r\nConnection: close\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        answer = json.loads(body)
        assert (answer["service"], answer["replica"], answer["path"]) == ("pay", "3", "/hello")
    finally:
        process.terminate()  # SIGTERM, as `snapbright up` stops its processes
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
