"""The discovery protocol's generated code is importable and speaks over a real gRPC channel."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio

from proxy.api.v1 import discovery_pb2 as pb
from proxy.api.v1 import discovery_pb2_grpc as pb_grpc


class _EchoDiscovery(pb_grpc.DiscoveryServicer):
    """Answers every ack with a snapshot one version later, so the stream shape is exercised."""

    async def Subscribe(
        self,
        request_iterator: AsyncIterator[pb.SubscribeRequest],
        context: grpc.aio.ServicerContext[pb.SubscribeRequest, pb.Snapshot],
    ) -> AsyncIterator[pb.Snapshot]:
        version = 0
        async for request in request_iterator:
            if request.WhichOneof("kind") == "hello":
                version = 1
            elif request.WhichOneof("kind") == "ack":
                version = int(request.ack.version) + 1
            else:
                return
            yield pb.Snapshot(
                version=str(version),
                upstreams=[
                    pb.Upstream(
                        service="pay",
                        namespace="default",
                        targets=[
                            pb.Target(name="pay", cluster="us-west", weight=9000),
                            pb.Target(name="pay@ap-southeast", cluster="ap-southeast", weight=1000),
                        ],
                    )
                ],
            )

    async def ReportStats(
        self,
        request_iterator: AsyncIterator[pb.StatsReport],
        context: grpc.aio.ServicerContext[pb.StatsReport, pb.StatsAck],
    ) -> pb.StatsAck:
        async for _ in request_iterator:
            pass
        return pb.StatsAck()


async def test_subscribe_stream_carries_versioned_snapshots_and_acks() -> None:
    server = grpc.aio.server()
    pb_grpc.add_DiscoveryServicer_to_server(_EchoDiscovery(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.DiscoveryStub(channel)
            call = stub.Subscribe()
            identity = pb.ProxyIdentity(role=pb.ProxyIdentity.ROLE_SIDECAR, cluster="us-west")
            await call.write(pb.SubscribeRequest(hello=pb.Hello(identity=identity)))
            first = await call.read()
            assert isinstance(first, pb.Snapshot)
            assert first.version == "1"
            assert sum(t.weight for t in first.upstreams[0].targets) == 10000
            await call.write(pb.SubscribeRequest(ack=pb.Ack(version=first.version)))
            second = await call.read()
            assert isinstance(second, pb.Snapshot)
            assert second.version == "2"
            await call.write(pb.SubscribeRequest(nack=pb.Nack(version="2", reason="bad policy")))
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
    finally:
        await server.stop(grace=None)
