"""What the WAN emulator accepts as links, forwards and changes, and how it says no."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from snapbright.wan.core import LinkShape
from snapbright.wan.model import (
    Forward,
    LinkSettings,
    LinkUpdate,
    WanConfig,
    format_bandwidth,
    parse_bandwidth,
)


def _config(data: dict[str, Any]) -> WanConfig:
    # As `snapbright wan serve` reads its file: JSON, where lists stand for tuples.
    return WanConfig.model_validate_json(json.dumps(data))


def _link(data: dict[str, Any]) -> LinkSettings:
    return LinkSettings.model_validate_json(json.dumps(data))


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("100Mbps", 100_000_000),
        ("100mbit", 100_000_000),
        ("1.5Gbps", 1_500_000_000),
        ("512kbit", 512_000),
        ("512kbps", 512_000),
        ("2gbit", 2_000_000_000),
        (64000, 64000),
        ("unlimited", None),
        ("none", None),
    ],
)
def test_bandwidth_reads_topology_and_tc_spellings(text: str | int, bits: int | None) -> None:
    assert parse_bandwidth(text) == bits


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("100mbps", "invalid bandwidth"),  # tc's mbps is megaBYTES: ambiguous, refused
        ("100", "invalid bandwidth|above 0"),
        ("fast", "invalid bandwidth"),
        ("0Mbps", "above 0"),
        (0, "above 0"),
        (True, "must be a bandwidth"),
        (1.5, "must be a bandwidth"),
    ],
)
def test_bandwidth_refuses_what_it_cannot_read_unambiguously(text: Any, reason: str) -> None:
    if text == "100":  # a bare number is bits per second, which is valid
        assert parse_bandwidth(text) == 100
        return
    with pytest.raises(ValueError, match=reason):
        parse_bandwidth(text)


@pytest.mark.parametrize(
    ("bits", "text"),
    [(None, "unlimited"), (100_000_000, "100Mbps"), (1_500_000_000, "1.5Gbps"), (512, "512bit")],
)
def test_bandwidth_is_shown_in_topology_units(bits: int | None, text: str) -> None:
    assert format_bandwidth(bits) == text


def test_a_link_is_written_like_a_topology_link_and_becomes_a_shape() -> None:
    link = _link(
        {
            "between": ["us-west", "ap-southeast"],
            "latency": "80ms",
            "jitter": "2ms",
            "loss": "1%",
            "bandwidth": "100Mbps",
        }
    )
    assert link.shape() == LinkShape(latency=0.08, jitter=0.002, loss=0.01, bandwidth=1e8)


def test_a_config_shapes_both_directions_of_a_link_and_plain_pairs_of_forwards() -> None:
    config = _config(
        {
            "adminPort": 0,
            "links": [{"between": ["a", "b"], "latency": "10ms"}],
            "forwards": [
                {"link": ["a", "b"], "targetHost": "127.0.0.1", "targetPort": 9000},
                {"link": ["c", "a"], "targetHost": "127.0.0.1", "targetPort": 9001},
            ],
        }
    )
    shapes = config.shapes()
    assert shapes[("a", "b")] == shapes[("b", "a")] == LinkShape(latency=0.01)
    assert shapes[("c", "a")] == shapes[("a", "c")] == LinkShape()


def test_a_one_way_link_shapes_one_direction() -> None:
    config = WanConfig(
        links=(_link({"between": ["a", "b"], "latency": "10ms", "oneWay": True}),),
        forwards=(Forward(link=("a", "b"), target_host="127.0.0.1", target_port=9000),),
    )
    assert config.shapes()[("a", "b")].latency == 0.01
    assert config.shapes()[("b", "a")].latency == 0.0


def test_a_config_round_trips_through_json() -> None:
    config = _config(
        {
            "adminPort": 0,
            "links": [{"between": ["a", "b"], "latency": "80ms", "bandwidth": "100mbit"}],
            "forwards": [{"link": ["a", "b"], "targetHost": "127.0.0.1", "targetPort": 9000}],
        }
    )
    again = WanConfig.model_validate_json(config.model_dump_json(by_alias=True))
    assert again == config


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"adminHost": "0.0.0.0"}, "not a loopback address"),
        ({"adminHost": "10.0.0.1"}, "not a loopback address"),
        ({"links": [{"between": ["a", "a"]}]}, "no link to itself"),
        (
            {"links": [{"between": ["a", "b"], "latency": "5ms", "jitter": "6ms"}]},
            "must not exceed",
        ),
        ({"links": [{"between": ["a", "b"], "loss": "100%"}]}, "loss must be in"),
        (
            {"links": [{"between": ["a", "b"]}, {"between": ["b", "a"]}]},
            "linked twice",
        ),
        ({"links": [{"between": ["A", "b"]}]}, "should match pattern"),
        (
            {
                "forwards": [
                    {
                        "link": ["a", "b"],
                        "listenHost": "0.0.0.0",
                        "targetHost": "x",
                        "targetPort": 1,
                    }
                ]
            },
            "not a loopback address",
        ),
        ({"forwards": [{"link": ["a", "b"], "targetHost": "x", "targetPort": 0}]}, "greater than"),
        ({"forwards": [{"link": ["a", "a"], "targetHost": "x", "targetPort": 1}]}, "between two"),
        ({"seeds": 1}, "Extra inputs"),
    ],
)
def test_a_config_is_refused_with_a_reason(data: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        _config(data)


def test_an_update_changes_only_what_it_names() -> None:
    shape = LinkShape(latency=0.08, jitter=0.002, loss=0.01, bandwidth=1e8)
    changed = LinkUpdate.model_validate({"latency": "120ms", "partition": True}).apply(shape)
    assert changed == LinkShape(
        latency=0.12, jitter=0.002, loss=0.01, bandwidth=1e8, partition=True
    )


def test_an_update_to_unlimited_removes_the_bandwidth_cap() -> None:
    shape = LinkShape(bandwidth=1e8)
    assert LinkUpdate.model_validate({"bandwidth": "unlimited"}).apply(shape).bandwidth is None
    assert LinkUpdate.model_validate({}).apply(shape).bandwidth == 1e8
    assert LinkUpdate.model_validate({"bandwidth": "10mbit"}).apply(shape).bandwidth == 1e7


def test_an_update_that_makes_an_impossible_link_is_refused() -> None:
    update = LinkUpdate.model_validate({"jitter": "50ms"})
    with pytest.raises(ValueError, match="must not exceed latency"):
        update.apply(LinkShape(latency=0.02))


@pytest.mark.parametrize(
    "data",
    [{"latency": 120}, {"latency": "fast"}, {"loss": "2"}, {"partition": "yes"}, {"delay": "1ms"}],
)
def test_an_update_with_a_bad_value_is_refused(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        LinkUpdate.model_validate(data)
