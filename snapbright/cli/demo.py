"""`snapbright demo-app`: one replica of a demo service (HTTP and gRPC echo, and a caller).

`snapbright up` starts one per service replica, next to its sidecar; it runs on its own too.
Errors print one line saying why and exit 1.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer
import uvloop
from pydantic import TypeAdapter, ValidationError

from proxy.config.model import Duration, Share
from snapbright.cli.lifecycle import fail, until_stopped
from snapbright.demo.core import Knobs
from snapbright.demo.server import DemoApp, DemoSettings, Upstream

_DURATION: TypeAdapter[float] = TypeAdapter(Duration)
_SHARE: TypeAdapter[float] = TypeAdapter(Share)


def demo_app(
    port: Annotated[int, typer.Option(help="HTTP port on --host.", min=0, max=65535)],
    name: Annotated[
        str, typer.Option("--name", "--service", help="The service it is a replica of, e.g. pay.")
    ],
    cluster: Annotated[str, typer.Option(help="The cluster it runs in, e.g. us-west.")],
    replica: Annotated[str, typer.Option(help="Which replica of the service.")] = "0",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    grpc_port: Annotated[
        int | None, typer.Option(help="Also serve the gRPC echo on this port.", min=0, max=65535)
    ] = None,
    latency: Annotated[str, typer.Option(help="Added to every request, e.g. 20ms.")] = "0ms",
    jitter: Annotated[str, typer.Option(help="± this around --latency, e.g. 5ms.")] = "0ms",
    error_rate: Annotated[
        str, typer.Option(help="Share of requests answered 503, e.g. 0.1 or 10%.")
    ] = "0",
    upstream: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=URL: call service NAME through URL (its sidecar), repeatable.",
            show_default=False,
        ),
    ] = None,
    rate: Annotated[float, typer.Option(help="Calls per second to each upstream.")] = 2.0,
    report_every: Annotated[
        str, typer.Option(help="How often to print the caller's latency, e.g. 5s.")
    ] = "5s",
) -> None:
    """Run a demo replica: an HTTP/1.1 and gRPC echo with latency and error knobs.

    It answers with JSON naming its service, cluster and replica, the path, and the caller
    identity its sidecar passed on. Change its knobs while it runs with
    `curl -X POST 127.0.0.1:PORT/_demo/knobs -d '{"latency": "200ms", "errorRate": "20%"}'`.
    """
    try:
        knobs = Knobs(
            latency=_parse(_DURATION, "--latency", latency),
            jitter=_parse(_DURATION, "--jitter", jitter),
            error_rate=_parse(_SHARE, "--error-rate", _share(error_rate)),
        )
        settings = DemoSettings(
            name=name,
            cluster=cluster,
            replica=replica,
            host=host,
            port=port,
            grpc_port=grpc_port,
            knobs=knobs,
            upstreams=tuple(_upstream(text) for text in upstream or ()),
            rate=rate,
            report_every=_parse(_DURATION, "--report-every", report_every),
        )
    except ValueError as error:
        fail(str(error))

    async def _run() -> None:
        app = await DemoApp(settings).start()
        grpc = "" if app.grpc_port is None else f", grpc on {host}:{app.grpc_port}"
        typer.echo(f"demo-app {name}@{cluster} replica {replica}: http on {host}:{app.port}{grpc}")
        try:
            await until_stopped()
        finally:
            await app.close()

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_run())
    except KeyboardInterrupt:
        pass
    except OSError as error:
        fail(f"demo-app: {error}")


def _share(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _parse(adapter: TypeAdapter[float], option: str, value: Any) -> float:
    try:
        return adapter.validate_python(value)
    except ValidationError as error:
        raise ValueError(f"{option}: {error.errors()[0]['msg']}") from None


def _upstream(text: str) -> Upstream:
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith(("http://", "https://")):
        raise ValueError(f"--upstream {text!r}: write NAME=URL, e.g. pay=http://127.0.0.1:15001/")
    return Upstream(name, url)
