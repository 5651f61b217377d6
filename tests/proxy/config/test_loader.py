"""The config loader: safe YAML, every error with file:line:col and a stable code, whole-file."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Self

import pytest
from pydantic import Field, model_validator

from proxy.config.diagnostics import Code, Diagnostic
from proxy.config.loader import MAX_FILE_BYTES, LoadResult, load_bytes, load_file
from proxy.config.model import Document, Duration, FieldError, Frozen, Name
from proxy.config.source import ConfigRejected


class _Upstream(Frozen):
    name: Name
    weight: int = Field(default=1, ge=0)


class _Spec(Frozen):
    service: Name
    attempts: int = Field(default=2, ge=0, le=10)
    timeout: Duration = 1.0
    upstreams: tuple[_Upstream, ...] = ()
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _upstreams_unique(self) -> Self:
        names = [upstream.name for upstream in self.upstreams]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise FieldError(("upstreams", index, "name"), f"upstream {name!r} is listed twice")
        return self


class _Sample(Document):
    KIND: ClassVar[str] = "Sample"
    kind: Literal["Sample"]
    spec: _Spec


REGISTRY = {"Sample": _Sample}
HEAD = "apiVersion: snapbright.io/v1alpha1\nkind: Sample\nmetadata:\n  name: demo\n"
VALID = HEAD + "spec: {service: pay}\n"


def _load(text: str | bytes) -> LoadResult:
    return load_bytes(text, REGISTRY, source="f.yaml")


def _only(text: str | bytes) -> Diagnostic:
    result = _load(text)
    assert len(result.diagnostics) == 1, result.diagnostics
    return result.diagnostics[0]


def _where(d: Diagnostic) -> tuple[str, int, int, str]:
    return (d.code.value, d.line, d.column, d.path)


def test_valid_document_loads_into_its_kind() -> None:
    result = _load(HEAD + "spec:\n  service: pay\n  timeout: 250ms\n  upstreams: [{name: db}]\n")
    assert result.ok
    (document,) = result.documents
    assert isinstance(document, _Sample)
    assert document.spec.timeout == pytest.approx(0.25)
    assert document.spec.upstreams == (_Upstream(name="db"),)


# Each field-level mistake, at the line:col where a person would fix it (both 1-based).
FIELD_ERRORS = [
    # A wrong value points at the value.
    pytest.param(
        "spec:\n  service: pay\n  attempts: 11\n", ("SB0201", 7, 13, "spec.attempts"), id="range"
    ),
    pytest.param(
        "spec:\n  service: pay\n  attempts: two\n", ("SB0204", 7, 13, "spec.attempts"), id="type"
    ),
    pytest.param("spec:\n  service: Pay_1\n", ("SB0201", 6, 12, "spec.service"), id="pattern"),
    pytest.param(
        "spec:\n  service: pay\n  timeout: -1s\n",
        ("SB0201", 7, 12, "spec.timeout"),
        id="negative-duration",
    ),
    pytest.param(
        "spec:\n  service: pay\n  labels: {a: 1}\n",
        ("SB0204", 7, 15, "spec.labels.a"),
        id="label-type",
    ),
    pytest.param(
        "spec:\n  service: pay\n  upstreams:\n    - name: db\n      weight: -1\n",
        ("SB0201", 9, 15, "spec.upstreams[0].weight"),
        id="in-list",
    ),
    # An unknown field points at its key.
    pytest.param(
        "spec:\n  service: pay\n  atempts: 3\n", ("SB0203", 7, 3, "spec.atempts"), id="unknown"
    ),
    # A missing field points at the mapping that should hold it.
    pytest.param("spec:\n  attempts: 3\n", ("SB0202", 6, 3, "spec.service"), id="missing"),
    pytest.param("spec: {}\n", ("SB0202", 5, 7, "spec.service"), id="missing-in-flow"),
    # A duplicate key points at the second occurrence.
    pytest.param(
        "spec:\n  service: pay\n  service: pay\n", ("SB0002", 7, 3, "spec.service"), id="duplicate"
    ),
    # A whole-model check that names its field points at that field.
    pytest.param(
        "spec:\n  service: pay\n  upstreams:\n  - name: db\n  - name: db\n",
        ("SB0201", 9, 11, "spec.upstreams[1].name"),
        id="field-error",
    ),
]


@pytest.mark.parametrize(("body", "expected"), FIELD_ERRORS)
def test_field_error_is_reported_at_its_position(
    body: str, expected: tuple[str, int, int, str]
) -> None:
    assert _where(_only(HEAD + body)) == expected


# Problems with the file or the document itself, before any field is looked at.
FILE_ERRORS = [
    pytest.param("a: [1\n", ("SB0001", 2, 1, ""), id="syntax"),
    pytest.param("a:\n\tb: 1\n", ("SB0001", 2, 1, ""), id="tab-indent"),
    pytest.param("", ("SB0104", 1, 1, ""), id="empty"),
    pytest.param("---\n---\n", ("SB0104", 1, 1, ""), id="only-empty-documents"),
    pytest.param("- 1\n", ("SB0103", 1, 1, ""), id="not-a-mapping"),
    pytest.param(
        HEAD.replace("Sample", "Nope") + "spec: {}\n", ("SB0101", 2, 7, "kind"), id="unknown-kind"
    ),
    pytest.param(
        HEAD.replace("kind: Sample\n", "") + "spec: {}\n",
        ("SB0101", 1, 1, "kind"),
        id="missing-kind",
    ),
    pytest.param(
        HEAD.replace("v1alpha1", "v2") + "spec: {service: a}\n",
        ("SB0102", 1, 13, "apiVersion"),
        id="wrong-api-version",
    ),
    pytest.param(
        VALID + "x: !!python/object/apply:os.system [true]\n",
        ("SB0005", 6, 4, "x"),
        id="unsafe-tag",
    ),
    pytest.param(VALID + "x: !!set {a}\n", ("SB0005", 6, 4, "x"), id="set-tag"),
    pytest.param(VALID + "x: !!int abc\n", ("SB0005", 6, 4, "x"), id="bad-int"),
    pytest.param(VALID + "x: 2024-13-45\n", ("SB0005", 6, 4, "x"), id="bad-date"),
    pytest.param(VALID + "? [a]\n: 1\n", ("SB0005", 6, 3, ""), id="complex-key"),
    pytest.param("a: 1\nb: \x07\n", ("SB0007", 2, 4, ""), id="control-character"),
    pytest.param(b"a: 1\nb: \xff\n", ("SB0007", 2, 4, ""), id="not-utf8"),
    pytest.param("a: &a [*a]\n", ("SB0004", 1, 4, "a[0]"), id="recursive-alias"),
    pytest.param("a: &a {<<: *a}\n", ("SB0004", 1, 4, "a"), id="recursive-merge"),
    pytest.param("a: " + "[" * 100 + "]" * 100 + "\n", ("SB0006", 1, 67, ""), id="too-deep"),
]


@pytest.mark.parametrize(("text", "expected"), FILE_ERRORS)
def test_file_error_is_reported_at_its_position(
    text: str | bytes, expected: tuple[str, int, int, str]
) -> None:
    assert _where(_only(text)) == expected


def _billion_laughs(levels: int) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_before_it_expands() -> None:
    diagnostic = _only(_billion_laughs(9))
    assert diagnostic.code is Code.ALIAS_BOMB
    assert "more than 10000" in diagnostic.message


def test_modest_aliases_and_merge_keys_load_with_explicit_keys_winning() -> None:
    text = (
        "x-defaults: &defaults {service: pay, attempts: 3}\n"
        + HEAD
        + "spec:\n  <<: *defaults\n  attempts: 5\n"
    )
    # The anchor sits in an extra top-level key, which the document rejects: the merge itself
    # worked, so the only complaint is that key.
    assert _where(_only(text)) == ("SB0203", 1, 1, "x-defaults")
    merged = HEAD + "spec:\n  <<: {service: pay, attempts: 3}\n  attempts: 5\n"
    (document,) = _load(merged).documents
    assert isinstance(document, _Sample)
    assert (document.spec.service, document.spec.attempts) == ("pay", 5)


def test_dates_keep_their_text_and_yes_is_a_boolean() -> None:
    # A date keeps its text (documents are JSON values); `yes` is a boolean, not a string.
    (document,) = _load(
        VALID.replace("{service: pay}", "{service: pay, labels: {day: 2024-01-31}}")
    ).documents
    assert isinstance(document, _Sample)
    assert document.spec.labels == {"day": "2024-01-31"}
    diagnostic = _only(VALID.replace("{service: pay}", "{service: pay, labels: {on: yes}}"))
    assert (diagnostic.path, diagnostic.message) == ("spec.labels.on", "must be a string, got true")


def test_file_over_the_size_cap_is_refused_unparsed(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    diagnostic = load_file(path, REGISTRY).diagnostics[0]
    assert _where(diagnostic) == ("SB0003", 1, 1, "")
    assert diagnostic.file == str(path)


def test_file_at_the_size_cap_is_read() -> None:
    body = HEAD + "spec: {service: pay}\n"
    padding = "#" * 99 + "\n"
    text = body + padding * ((MAX_FILE_BYTES - len(body)) // len(padding))
    assert len(text) <= MAX_FILE_BYTES
    assert _load(text).ok


def test_unreadable_file_is_a_diagnostic_not_an_exception(tmp_path: Path) -> None:
    diagnostic = load_file(tmp_path / "absent.yaml", REGISTRY).diagnostics[0]
    assert diagnostic.code is Code.UNREADABLE
    assert "cannot read" in diagnostic.message


def test_one_bad_document_rejects_the_whole_file_and_every_error_is_reported() -> None:
    good = HEAD + "spec: {service: pay}\n"
    bad_type = HEAD.replace("demo", "two") + "spec: {service: pay, attempts: x}\n"
    bad_field = HEAD.replace("demo", "three") + "spec: {service: pay, extra: 1}\n"
    result = _load("---\n".join([good, bad_type, bad_field]))
    assert result.documents == ()
    assert [_where(d) for d in result.diagnostics] == [
        ("SB0204", 11, 32, "spec.attempts"),
        ("SB0203", 17, 22, "spec.extra"),
    ]


def test_several_documents_load_in_order() -> None:
    first = HEAD + "spec: {service: pay}\n"
    second = HEAD.replace("demo", "other") + "spec: {service: cart}\n"
    result = _load(first + "---\n" + second)
    assert [d.metadata.name for d in result.documents] == ["demo", "other"]


def test_the_same_document_twice_in_a_file_is_rejected() -> None:
    text = HEAD + "spec: {service: pay}\n---\n" + HEAD + "spec: {service: cart}\n"
    assert _where(_only(text)) == ("SB0105", 10, 9, "metadata.name")


def test_diagnostic_text_names_file_line_column_field_and_reason() -> None:
    text = str(_only(HEAD + "spec:\n  service: pay\n  attempts: 11\n"))
    assert text == "f.yaml:7:13: spec.attempts: must be less than or equal to 10"


def test_raise_for_errors_carries_every_diagnostic() -> None:
    result = _load(HEAD + "spec:\n  attempts: x\n")
    with pytest.raises(ConfigRejected) as caught:
        result.raise_for_errors()
    assert caught.value.reason.splitlines() == [str(d) for d in result.diagnostics]
    assert len(result.diagnostics) == 2


def test_codes_are_unique_and_stable_in_shape() -> None:
    values = [code.value for code in Code]
    assert len(values) == len(set(values))
    assert all(len(value) == 6 and value.startswith("SB") for value in values)


SUGGESTIONS = [
    ("spec:\n  service: pay\n  atempts: 3\n", "unknown field (did you mean 'attempts'?)"),
    ("spec:\n  service: pay\n  upstreams: [{name: db, wieght: 1}]\n", "(did you mean 'weight'?)"),
    ("metadata2: {}\nspec: {service: pay}\n", "(did you mean 'metadata'?)"),
    ("spec:\n  service: pay\n  colour: blue\n", "unknown field"),
]


@pytest.mark.parametrize(("body", "message"), SUGGESTIONS)
def test_unknown_field_suggests_the_closest_known_one(body: str, message: str) -> None:
    assert _only(HEAD + body).message.endswith(message)
