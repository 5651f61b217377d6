"""Translation between the peering stream's protobuf messages and the values of ``model.py``.

This is the edge: whatever a peer sends is validated here, once, into frozen values, and a
message that breaks a rule (no body, a name that is not a DNS label, a malformed removal key,
trust domain or gateway address, too many gateway addresses) raises :class:`WireError` whole.
The session core never sees protobufs.
"""

from __future__ import annotations

from federation.api.v1 import peering_pb2 as pb
from federation.peering.model import (
    MAX_GATEWAYS,
    Ack,
    Close,
    ExportedService,
    GatewayAddress,
    HealthSource,
    HealthSummaries,
    Heartbeat,
    Open,
    PeeringMessage,
    PeeringValueError,
    ServiceHealth,
    ServiceKey,
    ServicesDelta,
    ServicesSnapshot,
    TrustBundleUpdate,
)
from proxy.identity.model import SpiffeIdError, TrustDomain

MAX_CLOSE_REASON = 1024


class WireError(PeeringValueError):
    """A peering message from the wire was refused; ``reason`` says why."""


def to_proto(message: PeeringMessage) -> pb.PeeringMessage:
    """The protobuf form of ``message``, ready to send."""
    match message:
        case Open():
            return pb.PeeringMessage(
                open=pb.Open(
                    cluster=message.cluster,
                    mesh=message.mesh,
                    trust_domain=message.trust_domain.name,
                    establish_secret=message.establish_secret,
                    services_version_seen=message.services_version_seen,
                    bundle_sequence_seen=message.bundle_sequence_seen,
                    gateways=[str(gateway) for gateway in message.gateways],
                )
            )
        case ServicesSnapshot():
            return pb.PeeringMessage(
                services_snapshot=pb.ServicesSnapshot(
                    version=message.version,
                    services=[_service_to_proto(s) for s in message.services],
                )
            )
        case ServicesDelta():
            return pb.PeeringMessage(
                services_delta=pb.ServicesDelta(
                    from_version=message.from_version,
                    version=message.version,
                    upserted=[_service_to_proto(s) for s in message.upserted],
                    removed=[str(key) for key in message.removed],
                )
            )
        case TrustBundleUpdate():
            return pb.PeeringMessage(
                trust_bundle=pb.TrustBundleUpdate(
                    trust_domain=message.trust_domain.name,
                    sequence=message.sequence,
                    spiffe_bundle_json=message.spiffe_bundle_json,
                    intermediates_der=list(message.intermediates_der),
                )
            )
        case HealthSummaries():
            return pb.PeeringMessage(
                health=pb.HealthSummaries(
                    at_unix_ms=message.at_unix_ms,
                    services=[_health_to_proto(h) for h in message.services],
                )
            )
        case Heartbeat():
            return pb.PeeringMessage(
                heartbeat=pb.Heartbeat(
                    sequence=message.sequence,
                    sent_unix_ms=message.sent_unix_ms,
                    echo_sequence=message.echo_sequence,
                    echo_sent_unix_ms=message.echo_sent_unix_ms,
                )
            )
        case Ack():
            return pb.PeeringMessage(
                ack=pb.Ack(
                    services_version=message.services_version,
                    bundle_sequence=message.bundle_sequence,
                )
            )
        case Close():
            return pb.PeeringMessage(close=pb.Close(reason=message.reason))


def from_proto(message: pb.PeeringMessage) -> PeeringMessage:
    """The value a received message stands for; raise :class:`WireError` if it is invalid."""
    try:
        return _from_proto(message)
    except WireError:
        raise
    except (PeeringValueError, SpiffeIdError) as error:
        raise WireError(f"{message.WhichOneof('body')}: {error}") from None


def _from_proto(message: pb.PeeringMessage) -> PeeringMessage:
    body = message.WhichOneof("body")
    if body == "open":
        o = message.open
        if len(o.gateways) > MAX_GATEWAYS:
            # Refused before parsing any: a peer cannot make us parse without bound.
            raise WireError(
                f"open: at most {MAX_GATEWAYS} gateway addresses, not {len(o.gateways)}"
            )
        return Open(
            cluster=o.cluster,
            mesh=o.mesh,
            trust_domain=TrustDomain(o.trust_domain),
            establish_secret=o.establish_secret,
            services_version_seen=o.services_version_seen,
            bundle_sequence_seen=o.bundle_sequence_seen,
            gateways=tuple(GatewayAddress.parse(gateway) for gateway in o.gateways),
        )
    if body == "services_snapshot":
        s = message.services_snapshot
        return ServicesSnapshot(s.version, tuple(_service_of(x) for x in s.services))
    if body == "services_delta":
        d = message.services_delta
        return ServicesDelta(
            from_version=d.from_version,
            version=d.version,
            upserted=tuple(_service_of(x) for x in d.upserted),
            removed=tuple(ServiceKey.parse(key) for key in d.removed),
        )
    if body == "trust_bundle":
        b = message.trust_bundle
        return TrustBundleUpdate(
            TrustDomain(b.trust_domain),
            b.sequence,
            b.spiffe_bundle_json,
            tuple(b.intermediates_der),
        )
    if body == "health":
        h = message.health
        return HealthSummaries(h.at_unix_ms, tuple(_health_of(x) for x in h.services))
    if body == "heartbeat":
        hb = message.heartbeat
        return Heartbeat(hb.sequence, hb.sent_unix_ms, hb.echo_sequence, hb.echo_sent_unix_ms)
    if body == "ack":
        return Ack(message.ack.services_version, message.ack.bundle_sequence)
    if body == "close":
        # A peer's reason ends up in our logs: bound it and keep it printable.
        reason = message.close.reason[:MAX_CLOSE_REASON]
        return Close("".join(c if c.isprintable() else "?" for c in reason))
    raise WireError("peering message has no body")


def _service_to_proto(service: ExportedService) -> pb.ExportedService:
    return pb.ExportedService(
        name=service.key.name,
        namespace=service.key.namespace,
        sni=service.sni,
        healthy_endpoints=service.healthy_endpoints,
    )


def _service_of(message: pb.ExportedService) -> ExportedService:
    return ExportedService(
        ServiceKey(message.namespace, message.name), message.sni, message.healthy_endpoints
    )


_SOURCE_TO_PROTO = {
    HealthSource.TRAFFIC: pb.HEALTH_SOURCE_TRAFFIC,
    HealthSource.PROBES: pb.HEALTH_SOURCE_PROBES,
}
_SOURCE_OF = {value: source for source, value in _SOURCE_TO_PROTO.items()}


def _health_to_proto(health: ServiceHealth) -> pb.ServiceHealth:
    return pb.ServiceHealth(
        name=health.key.name,
        namespace=health.key.namespace,
        latency_p50_seconds=health.latency_p50_seconds,
        latency_p95_seconds=health.latency_p95_seconds,
        latency_p99_seconds=health.latency_p99_seconds,
        success_rate=health.success_rate,
        request_rate=health.request_rate,
        headroom_rps=health.headroom_rps,
        healthy_endpoints=health.healthy_endpoints,
        source=_SOURCE_TO_PROTO[health.source],
        probe_samples=health.probe_samples,
    )


def _health_of(message: pb.ServiceHealth) -> ServiceHealth:
    return ServiceHealth(
        key=ServiceKey(message.namespace, message.name),
        latency_p50_seconds=message.latency_p50_seconds,
        latency_p95_seconds=message.latency_p95_seconds,
        latency_p99_seconds=message.latency_p99_seconds,
        success_rate=message.success_rate,
        request_rate=message.request_rate,
        headroom_rps=message.headroom_rps if message.HasField("headroom_rps") else None,
        healthy_endpoints=message.healthy_endpoints,
        # An unknown (newer) source is not evidence we can read: count it as traffic, whose
        # request rate then says how much evidence there is.
        source=_SOURCE_OF.get(message.source, HealthSource.TRAFFIC),
        probe_samples=message.probe_samples,
    )
