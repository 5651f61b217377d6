"""The emulator on 127.0.0.1: real sockets through shaped links, bounded real-time waits."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from tests.snapbright.wan.conftest import StartWan, round_trip, set_link

SLACK = 0.06


async def test_a_round_trip_costs_twice_the_one_way_latency(
    start_wan: StartWan, echo_port: int
) -> None:
    wan = await start_wan(echo_port, latency="80ms")
    reader, writer = await asyncio.open_connection("127.0.0.1", wan.listen_ports[0])
    await round_trip(reader, writer)  # the handshake is paid here
    rtt = await round_trip(reader, writer)
    writer.close()
    assert 0.160 <= rtt < 0.160 + SLACK


async def test_a_new_connection_pays_a_round_trip_for_its_handshake(
    start_wan: StartWan, echo_port: int
) -> None:
    wan = await start_wan(echo_port, latency="40ms")
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", wan.listen_ports[0])
    await round_trip(reader, writer)
    first = time.monotonic() - started
    writer.close()
    # SYN, SYN-ACK, then the request and its echo: two round trips.
    assert 0.160 <= first < 0.160 + SLACK


async def test_latency_does_not_cap_throughput(start_wan: StartWan, sink_port: int) -> None:
    wan = await start_wan(sink_port, latency="100ms")
    payload = os.urandom(8 * 1024 * 1024)
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", wan.listen_ports[0])
    writer.write(payload)
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), timeout=10)
    elapsed = time.monotonic() - started
    writer.close()
    assert int(answer) == len(payload)
    # 128 chunks of 64 KiB sent one latency apart would take 12.8 s; a delay line takes the
    # handshake and one round trip, plus the copying.
    assert 0.4 <= elapsed < 2.0


async def test_bytes_arrive_whole_and_in_order_through_jitter(
    start_wan: StartWan, echo_port: int
) -> None:
    wan = await start_wan(echo_port, latency="20ms", jitter="15ms")
    reader, writer = await asyncio.open_connection("127.0.0.1", wan.listen_ports[0])
    payload = os.urandom(1024 * 1024)
    for offset in range(0, len(payload), 4096):
        writer.write(payload[offset : offset + 4096])
        await asyncio.sleep(0)  # many small chunks, each with its own jittered delay
    echoed = await asyncio.wait_for(reader.readexactly(len(payload)), timeout=10)
    writer.close()
    assert echoed == payload


async def test_a_latency_change_applies_to_chunks_sent_after_it(
    start_wan: StartWan, echo_port: int
) -> None:
    wan = await start_wan(echo_port, latency="10ms")
    reader, writer = await asyncio.open_connection("127.0.0.1", wan.listen_ports[0])
    await round_trip(reader, writer)
    before = await round_trip(reader, writer)
    status, _ = await set_link(wan, {"latency": "60ms"})
    after = await round_trip(reader, writer)
    writer.close()
    assert status == 200
    assert 0.020 <= before < 0.020 + SLACK
    assert 0.120 <= after < 0.120 + SLACK


async def test_a_one_way_change_leaves_the_way_back_alone(
    start_wan: StartWan, echo_port: int
) -> None:
    wan = await start_wan(echo_port, latency="10ms")
    reader, writer = await asyncio.open_connection("127.0.0.1", wan.listen_ports[0])
    await round_trip(reader, writer)
    status, answer = await set_link(wan, {"latency": "60ms", "oneWay": True})
    rtt = await round_trip(reader, writer)
    writer.close()
    assert status == 200
    assert [(link["from"], link["to"]) for link in answer["links"]] == [("a", "b")]
    assert 0.070 <= rtt < 0.070 + SLACK


async def test_a_partition_stalls_a_connection_and_healing_delivers_what_it_held(
    start_wan: StartWan, echo_port: int
) -> None:
    wan = await start_wan(echo_port, latency="5ms")
    reader, writer = await asyncio.open_connection("127.0.0.1", wan.listen_ports[0])
    await round_trip(reader, writer)
    await set_link(wan, {"partition": True})
    writer.write(b"held")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(4), timeout=0.3)
    await set_link(wan, {"partition": False})
    assert await asyncio.wait_for(reader.readexactly(4), timeout=1) == b"held"
    writer.close()


async def test_a_new_connection_across_a_partition_is_blackholed_until_it_heals(
    start_wan: StartWan, echo_port: int
) -> None:
    wan = await start_wan(echo_port, latency="5ms")
    await set_link(wan, {"partition": True})
    reader, writer = await asyncio.open_connection("127.0.0.1", wan.listen_ports[0])
    writer.write(b"hello")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(5), timeout=0.3)
    await set_link(wan, {"partition": False})
    assert await asyncio.wait_for(reader.readexactly(5), timeout=1) == b"hello"
    writer.close()


async def test_a_partition_with_reset_resets_connections_old_and_new(
    start_wan: StartWan, echo_port: int
) -> None:
    wan = await start_wan(echo_port)
    reader, writer = await asyncio.open_connection("127.0.0.1", wan.listen_ports[0])
    await round_trip(reader, writer)
    await set_link(wan, {"partition": True, "reset": True})
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(1), timeout=1)
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", wan.listen_ports[0])
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(1), timeout=1)
    writer.close()


async def test_bandwidth_caps_throughput(start_wan: StartWan, sink_port: int) -> None:
    wan = await start_wan(sink_port, bandwidth="8mbit")  # 1 MB/s
    payload = os.urandom(512 * 1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", wan.listen_ports[0])
    started = time.monotonic()
    writer.write(payload)
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), timeout=10)
    elapsed = time.monotonic() - started
    writer.close()
    assert int(answer) == len(payload)
    expected = len(payload) / 1_000_000
    assert 0.8 * expected <= elapsed < 1.6 * expected


async def test_a_target_that_refuses_resets_the_client(
    start_wan: StartWan, unused_port: int
) -> None:
    wan = await start_wan(unused_port)
    reader, writer = await asyncio.open_connection("127.0.0.1", wan.listen_ports[0])
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(1), timeout=1)
    writer.close()


async def test_links_count_connections_and_bytes(start_wan: StartWan, echo_port: int) -> None:
    wan = await start_wan(echo_port)
    reader, writer = await asyncio.open_connection("127.0.0.1", wan.listen_ports[0])
    await round_trip(reader, writer, b"x" * 1000)
    links = {(s.source, s.destination): s for s in wan.links()}
    writer.close()
    assert links[("a", "b")].connections == 1
    assert links[("a", "b")].delivered_bytes == 1000
    assert links[("b", "a")].delivered_bytes == 1000


async def test_a_lost_segment_costs_a_retransmission_timeout(
    start_wan: StartWan, echo_port: int
) -> None:
    wan = await start_wan(echo_port, latency="5ms", loss="30%")
    reader, writer = await asyncio.open_connection("127.0.0.1", wan.listen_ports[0])
    await round_trip(reader, writer)
    rtts = [await round_trip(reader, writer) for _ in range(8)]
    writer.close()
    retransmits = sum(status.retransmits for status in wan.links())
    slow = [rtt for rtt in rtts if rtt >= 0.010 + 0.200]
    assert retransmits >= 1
    assert len(slow) >= 1
    # Nothing is lost for good: every round trip either took its 10 ms or paid an RTO.
    assert all(rtt < 0.010 + SLACK or rtt >= 0.210 for rtt in rtts)
