"""The loader never crashes: any bytes, any mangled file, give documents or positioned errors."""

from __future__ import annotations

from typing import ClassVar, Literal

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field

from proxy.config.loader import LoadResult, load_bytes
from proxy.config.model import Document, Duration, Frozen, Name, Share


class _Split(Frozen):
    subset: Name
    weight: Share


class _Spec(Frozen):
    service: Name
    attempts: int = Field(default=2, ge=0, le=10)
    timeout: Duration = 1.0
    splits: tuple[_Split, ...] = ()
    labels: dict[str, str] = Field(default_factory=dict)


class _Sample(Document):
    KIND: ClassVar[str] = "Sample"
    kind: Literal["Sample"]
    spec: _Spec


REGISTRY = {"Sample": _Sample}

VALID = b"""\
# A realistic file: comments, flow and block style, anchors, several documents.
apiVersion: snapbright.io/v1alpha1
kind: Sample
metadata:
  name: payments
  labels: {team: pay, tier: "1"}
spec:
  service: payments
  attempts: 3
  timeout: 250ms
  splits:
    - {subset: v1, weight: 90%}
    - subset: v2
      weight: 10%
---
apiVersion: snapbright.io/v1alpha1
kind: Sample
metadata: {name: checkout, labels: &labels {owner: 'shop'}}
spec:
  service: checkout
  labels: *labels
  splits: [{subset: stable, weight: 1}]
"""


def _check(result: LoadResult) -> None:
    assert result.ok or result.documents == ()
    for diagnostic in result.diagnostics:
        assert diagnostic.line >= 1
        assert diagnostic.column >= 1
        assert diagnostic.file == "fuzz.yaml"
        assert diagnostic.message
        assert str(diagnostic).startswith(f"fuzz.yaml:{diagnostic.line}:{diagnostic.column}: ")


def test_the_seed_file_is_valid() -> None:
    result = load_bytes(VALID, REGISTRY, source="fuzz.yaml")
    assert result.ok
    assert len(result.documents) == 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_crash_the_loader(data: bytes) -> None:
    _check(load_bytes(data, REGISTRY, source="fuzz.yaml"))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"#%@`?,\n\t 0.%<")), max_size=200))
def test_yaml_shaped_noise_never_crashes_the_loader(text: str) -> None:
    _check(load_bytes(text, REGISTRY, source="fuzz.yaml"))


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID)
    lines = VALID.splitlines(keepends=True)
    mutation = draw(
        st.sampled_from(["flip", "delete-line", "duplicate-line", "truncate", "splice"])
    )
    if mutation == "flip":
        for _ in range(draw(st.integers(1, 4))):
            index = draw(st.integers(0, len(data) - 1))
            data[index] = draw(st.integers(0, 255))
        return bytes(data)
    if mutation == "truncate":
        return bytes(data[: draw(st.integers(0, len(data)))])
    index = draw(st.integers(0, len(lines) - 1))
    if mutation == "delete-line":
        del lines[index]
    elif mutation == "duplicate-line":
        lines.insert(index, lines[index])
    else:
        lines.insert(index, draw(st.sampled_from(lines)))
    return b"".join(lines)


@settings(max_examples=400, deadline=None)
@given(_mutated())
def test_mutated_valid_files_never_crash_and_every_error_has_a_position(data: bytes) -> None:
    _check(load_bytes(data, REGISTRY, source="fuzz.yaml"))
