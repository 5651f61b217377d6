"""The one loader for every Snapbright file: YAML in, validated documents or diagnostics out.

A file is read with ``yaml.safe_load`` semantics (standard tags only, nothing constructed but
plain values) but stricter, because people write these files by hand:

- duplicate mapping keys are errors (PyYAML silently keeps the last);
- a file larger than :data:`MAX_FILE_BYTES` is refused before it is parsed;
- aliases may add at most :data:`MAX_ALIAS_EXPANSION` nodes ("billion laughs"), nesting is at
  most :data:`MAX_DEPTH` deep, and an alias may not refer to itself;
- a file may hold several documents (``---``); each is validated into the model of its
  ``kind``, taken from a registry the caller passes in (this layer knows no kinds).

The file is accepted or rejected whole: :class:`LoadResult` holds every document, or none and
every :class:`~proxy.config.diagnostics.Diagnostic`. Positions come from PyYAML's composer
(every node carries its start mark), so a pydantic error location maps back to the exact node:
the value for a wrong value, the key for an unknown or duplicate field, the parent mapping for a
missing one. Mapping keys are taken as their text, and timestamps and binary scalars keep their
text, since documents are validated as JSON values.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from yaml.composer import ComposerError
from yaml.error import Mark, MarkedYAMLError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from proxy.config.diagnostics import Code, Diagnostic
from proxy.config.model import API_VERSION, Document, FieldError
from proxy.config.source import ConfigRejected

MAX_FILE_BYTES = 1024 * 1024
"""Files above 1 MiB are refused unread: no hand-written policy comes near it."""
MAX_ALIAS_EXPANSION = 10_000
"""Nodes that aliases may add to a document beyond the nodes written in it."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and sequences (PyYAML's composer recurses per level)."""

Registry = Mapping[str, type[Document]]
"""Document kinds the caller accepts: ``kind`` -> the :class:`Document` subclass for it."""

Loc = tuple[str | int, ...]

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_TYPE_ERRORS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
    "set_type": "a list",
    "frozen_set_type": "a list",
}


@dataclass(frozen=True, slots=True)
class LoadResult:
    """A whole file's outcome: all its documents, or none and every diagnostic."""

    source: str
    documents: tuple[Document, ...]
    diagnostics: tuple[Diagnostic, ...]

    @property
    def ok(self) -> bool:
        """True when the file is accepted (no diagnostics)."""
        return not self.diagnostics

    def raise_for_errors(self) -> tuple[Document, ...]:
        """The documents, or :class:`ConfigRejected` listing every diagnostic, one a line."""
        if self.diagnostics:
            raise ConfigRejected("\n".join(str(d) for d in self.diagnostics))
        return self.documents


def load_file(path: str | Path, registry: Registry) -> LoadResult:
    """Read, parse and validate the file at ``path``; never raises for bad content."""
    source = str(path)
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return _rejected(
            source, Diagnostic(Code.UNREADABLE, source, 1, 1, "", f"cannot read: {reason}")
        )
    return load_bytes(data, registry, source=source)


def load_bytes(data: bytes | str, registry: Registry, *, source: str = "<string>") -> LoadResult:
    """Parse and validate a file's content; ``source`` names it in diagnostics."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > MAX_FILE_BYTES:
        message = f"file is {len(raw)} bytes, more than the {MAX_FILE_BYTES}-byte (1 MiB) cap"
        return _rejected(source, Diagnostic(Code.TOO_LARGE, source, 1, 1, "", message))
    text = _decode(raw, source)
    if isinstance(text, Diagnostic):
        return _rejected(source, text)
    return _Load(source, registry).run(text)


def _rejected(source: str, diagnostic: Diagnostic) -> LoadResult:
    return LoadResult(source, (), (diagnostic,))


def _decode(raw: bytes, source: str) -> str | Diagnostic:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        return Diagnostic(Code.UNREADABLE, source, line, column, "", "file is not valid UTF-8")


class _Composer(yaml.SafeLoader):
    """PyYAML's safe composer with a nesting cap (it recurses once per level)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise _TooDeep(None, None, _too_deep_message(), event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _TooDeep(ComposerError):
    pass


def _too_deep_message() -> str:
    return f"nested deeper than {MAX_DEPTH} levels"


class _Abort(Exception):
    """Stops walking one document (alias bomb, nesting); the diagnostic is already recorded."""


@dataclass(slots=True)
class _Position:
    key: Mark | None
    value: Mark


class _Document:
    """One composed document turned into JSON values, with the position of every path."""

    def __init__(self, load: _Load, root: Node) -> None:
        self._load = load
        self._constructor = load.composer
        self.root = root
        self.positions: dict[Loc, _Position] = {}
        self.diagnosed: list[Loc] = []
        self.failed = False
        self._seen: set[int] = set()
        self._active: set[int] = set()
        self._expansion = 0

    def value(self) -> Any:
        """The document as JSON values (``None`` if walking it had to stop)."""
        try:
            return self._walk(self.root, (), None, 1)
        except _Abort:
            self.failed = True
            return None

    def _report(self, code: Code, mark: Mark, loc: Loc, message: str) -> None:
        self._load.report(code, mark, loc, message)

    def _walk(self, node: Node, loc: Loc, key: Mark | None, depth: int) -> Any:
        self.positions.setdefault(loc, _Position(key, node.start_mark))
        if depth > MAX_DEPTH:
            self._report(Code.TOO_DEEP, node.start_mark, loc, _too_deep_message())
            raise _Abort
        identity = id(node)
        if identity in self._active:
            self._report(Code.ALIAS_BOMB, node.start_mark, loc, "an alias refers to itself")
            raise _Abort
        if identity in self._seen and not isinstance(node, ScalarNode):
            self._expansion += 1
        self._seen.add(identity)
        if self._expansion > MAX_ALIAS_EXPANSION:
            message = f"aliases expand to more than {MAX_ALIAS_EXPANSION} extra nodes"
            self._report(Code.ALIAS_BOMB, node.start_mark, loc, message)
            raise _Abort
        if isinstance(node, ScalarNode):
            return self._scalar(node, loc)
        self._active.add(identity)
        try:
            if isinstance(node, SequenceNode):
                if node.tag != _SEQ_TAG:
                    return self._unsupported_tag(node, loc)
                return [
                    self._walk(item, (*loc, index), None, depth + 1)
                    for index, item in enumerate(node.value)
                ]
            if isinstance(node, MappingNode):
                if node.tag != _MAP_TAG:
                    return self._unsupported_tag(node, loc)
                return self._mapping(node, loc, depth)
        finally:
            self._active.discard(identity)
        raise AssertionError(f"unexpected YAML node {type(node).__name__}")

    def _unsupported_tag(self, node: Node, loc: Loc) -> None:
        message = f"tag {node.tag!r} is not supported in config files"
        self._report(Code.UNSUPPORTED_YAML, node.start_mark, loc, message)
        self.diagnosed.append(loc)

    def _scalar(self, node: ScalarNode, loc: Loc) -> Any:
        try:
            value = self._constructor.construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError, AttributeError, OverflowError) as exc:
            # PyYAML's scalar constructors raise bare ValueError & co. for text their tag
            # cannot hold (``!!int abc``, the date ``2024-13-45``).
            reason = exc.problem if isinstance(exc, MarkedYAMLError) and exc.problem else None
            message = reason or f"{node.value!r} is not a valid {node.tag.rsplit(':', 1)[-1]}"
            self._report(Code.UNSUPPORTED_YAML, node.start_mark, loc, message)
            self.diagnosed.append(loc)
            return None
        if value is None or isinstance(value, str | int | float | bool):
            return value
        # Timestamps and binary: documents are JSON values, so keep what was written.
        return node.value

    def _mapping(self, node: MappingNode, loc: Loc, depth: int) -> dict[str, Any]:
        explicit: dict[str, Any] = {}
        merges: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            if not isinstance(key_node, ScalarNode):
                message = "mapping keys must be plain scalars, not mappings or lists"
                self._report(Code.UNSUPPORTED_YAML, key_node.start_mark, loc, message)
                self.diagnosed.append(loc)
                continue
            name = key_node.value
            child = (*loc, name)
            if name in explicit:
                first = self.positions[child].key or self.positions[child].value
                message = f"duplicate key {name!r} (first at line {first.line + 1})"
                self._report(Code.DUPLICATE_KEY, key_node.start_mark, child, message)
                continue
            explicit[name] = self._walk(value_node, child, key_node.start_mark, depth + 1)
        # Merged keys come after explicit ones, so an explicit key keeps its own position.
        merged: dict[str, Any] = {}
        for merge in merges:
            for source in self._merge_sources(merge, loc):
                walked = self._walk(source, loc, None, depth + 1)
                for name, item in walked.items() if isinstance(walked, dict) else ():
                    merged.setdefault(name, item)
        return {**merged, **explicit}

    def _merge_sources(self, node: Node, loc: Loc) -> Iterator[MappingNode]:
        sources = node.value if isinstance(node, SequenceNode) else [node]
        for source in sources:
            if isinstance(source, MappingNode):
                yield source
            else:
                message = "a merge key ('<<') takes a mapping or a list of mappings"
                self._report(Code.UNSUPPORTED_YAML, source.start_mark, loc, message)
                self.diagnosed.append(loc)


class _Load:
    """One run of the loader over one file's text."""

    def __init__(self, source: str, registry: Registry) -> None:
        self.source = source
        self.registry = registry
        self.diagnostics: list[Diagnostic] = []
        self.composer = _Composer("")

    def report(self, code: Code, mark: Mark | None, loc: Loc, message: str) -> None:
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        self.diagnostics.append(
            Diagnostic(code, self.source, line, column, _format_loc(loc), message)
        )

    def run(self, text: str) -> LoadResult:
        documents: list[Document] = []
        seen_names: dict[tuple[str, str, str], int] = {}
        count = 0
        for root in self._compose(text):
            count += 1
            if _is_null(root):
                continue  # an empty document between two `---` (as kubectl reads it)
            walked = _Document(self, root)
            document = self._validate(walked)
            if document is None:
                continue
            identity = (document.kind, document.metadata.namespace, document.metadata.name)
            if identity in seen_names:
                mark = _mark(walked, ("metadata", "name"))
                message = (
                    f"{document.kind} {document.metadata.namespace}/{document.metadata.name} "
                    f"is defined twice in this file (first in document {seen_names[identity]})"
                )
                self.report(Code.DUPLICATE_DOCUMENT, mark, ("metadata", "name"), message)
            else:
                seen_names[identity] = count
            documents.append(document)
        if not self.diagnostics and not documents:
            self.report(Code.NO_DOCUMENTS, None, (), "the file holds no document")
        if self.diagnostics:
            ordered = sorted(self.diagnostics, key=lambda d: (d.line, d.column))
            return LoadResult(self.source, (), tuple(ordered))
        return LoadResult(self.source, tuple(documents), ())

    def _compose(self, text: str) -> Iterator[Node]:
        try:
            self.composer = _Composer(text)
            while self.composer.check_node():
                node = self.composer.get_node()
                if node is not None:
                    yield node
        except _TooDeep as exc:
            self.report(Code.TOO_DEEP, exc.problem_mark, (), exc.problem or _too_deep_message())
        except MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = exc.problem or exc.context or "invalid YAML"
            if exc.context and exc.problem:
                problem = f"{problem} ({exc.context})"
            self.report(Code.YAML_SYNTAX, mark, (), problem)
        except yaml.reader.ReaderError as exc:
            self._report_reader_error(text, exc)
        except yaml.YAMLError as exc:
            self.report(Code.YAML_SYNTAX, None, (), str(exc) or "invalid YAML")
        finally:
            self.composer.dispose()

    def _report_reader_error(self, text: str, exc: yaml.reader.ReaderError) -> None:
        position = exc.position if isinstance(exc.position, int) else 0
        position = max(0, min(position, len(text)))
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        character = exc.character
        code_point = ord(character) if isinstance(character, str) else character
        shown = f"U+{code_point:04X}" if isinstance(code_point, int) else "a character"
        message = f"{shown} is not allowed in YAML (control characters are not printable)"
        self.diagnostics.append(Diagnostic(Code.UNREADABLE, self.source, line, column, "", message))

    def _validate(self, walked: _Document) -> Document | None:
        data = walked.value()
        if walked.failed:
            return None
        root = walked.root
        if not isinstance(data, dict):
            message = "a document must be a mapping with apiVersion, kind, metadata and spec"
            self.report(Code.NOT_A_DOCUMENT, root.start_mark, (), message)
            return None
        model = self._model_for(data, walked)
        if model is None:
            return None
        try:
            return model.model_validate_json(json.dumps(data))
        except ValidationError as exc:
            self._report_validation(exc, walked, model)
            return None

    def _model_for(self, data: dict[str, Any], walked: _Document) -> type[Document] | None:
        known = ", ".join(sorted(self.registry)) or "none"
        version = data.get("apiVersion")
        if version != API_VERSION:
            got = "missing" if version is None else f"{version!r} is not supported"
            self.report(
                Code.WRONG_API_VERSION,
                _mark(walked, ("apiVersion",)),
                ("apiVersion",),
                f"{got}: expected {API_VERSION}",
            )
            walked.diagnosed.append(("apiVersion",))
        kind = data.get("kind")
        model = self.registry.get(kind) if isinstance(kind, str) else None
        if model is None:
            got = "missing" if kind is None else f"unknown kind {kind!r}"
            message = f"{got}: expected one of {known}"
            self.report(Code.UNKNOWN_KIND, _mark(walked, ("kind",)), ("kind",), message)
        return model

    def _report_validation(
        self, exc: ValidationError, walked: _Document, model: type[Document]
    ) -> None:
        reported: set[tuple[Loc, str]] = set()
        errors = exc.errors(include_url=False)
        failed = [tuple(error["loc"]) for error in errors]
        for error in errors:
            loc = tuple(error["loc"])
            if error["type"] == "too_short" and any(f[: len(loc)] == loc != f for f in failed):
                continue  # pydantic counts an item that failed as missing: report the item only
            code, loc, message = _explain(error)
            known = _known_prefix(loc, walked.positions)
            if any(known[: len(done)] == done for done in walked.diagnosed):
                continue  # already reported as a YAML-level problem at or above this field
            position = walked.positions[known]
            if code is Code.MISSING_FIELD and len(known) == len(loc) - 1:
                path, mark = loc, position.value
            elif code is Code.UNKNOWN_FIELD:
                path, mark = known, position.key or position.value
                message += _suggestion(model, loc)
            else:
                path, mark = known, position.value
            if (path, message) in reported:
                continue  # one mistake seen through several union branches
            reported.add((path, message))
            self.report(code, mark, path, message)


def _explain(error: ErrorDetails) -> tuple[Code, Loc, str]:
    kind = error["type"]
    loc: Loc = tuple(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        return Code.INVALID_VALUE, (*loc, *cause.loc), cause.message
    if kind == "missing":
        if loc and isinstance(loc[-1], int):
            return Code.MISSING_FIELD, loc, f"item {loc[-1]} is missing: the list is too short"
        return Code.MISSING_FIELD, loc, "required field is missing"
    if kind == "extra_forbidden":
        return Code.UNKNOWN_FIELD, loc, "unknown field"
    if kind in _TYPE_ERRORS:
        return Code.WRONG_TYPE, loc, f"must be {_TYPE_ERRORS[kind]}, got {_describe(error)}"
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if message.startswith("Input should be "):
        message = "must be " + message.removeprefix("Input should be ")
    return Code.INVALID_VALUE, loc, message[:1].lower() + message[1:]


def _suggestion(model: type[BaseModel], loc: Loc) -> str:
    """`` (did you mean 'x'?)`` for an unknown field close to a known one, else nothing."""
    names = _field_names(model, loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    if not close:
        lowered = {name.lower(): name for name in names}
        close = [lowered[key] for key in (str(loc[-1]).lower().replace("_", ""),) if key in lowered]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_names(model: type[BaseModel], loc: Loc) -> list[str]:
    """The keys the model accepts at ``loc`` (empty when ``loc`` is not a model)."""
    current: Any = model
    for part in loc:
        current = next(
            (step for a in _alternatives(current) if (step := _step(a, part)) is not None), None
        )
        if current is None:
            return []
    for candidate in _alternatives(current):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return [field.alias or name for name, field in candidate.model_fields.items()]
    return []


def _alternatives(annotation: Any) -> list[Any]:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _alternatives(get_args(annotation)[0])
    if origin in (Union, UnionType):
        return [alt for arg in get_args(annotation) for alt in _alternatives(arg)]
    return [annotation]


def _step(annotation: Any, part: str | int) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        fields = annotation.model_fields.items()
        return next((f.annotation for n, f in fields if (f.alias or n) == part), None)
    args = get_args(annotation)
    if get_origin(annotation) is tuple and isinstance(part, int) and args:
        return args[0] if len(args) == 2 and args[1] is Ellipsis else args[min(part, len(args) - 1)]
    if get_origin(annotation) is dict and isinstance(part, str) and len(args) == 2:
        return args[1]
    return None


def _describe(error: ErrorDetails) -> str:
    value = error.get("input")
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _known_prefix(loc: Loc, positions: Mapping[Loc, _Position]) -> Loc:
    for end in range(len(loc), 0, -1):
        if loc[:end] in positions:
            return loc[:end]
    return ()


def _mark(walked: _Document, loc: Loc) -> Mark:
    position = walked.positions.get(loc) or walked.positions[()]
    return position.value


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _format_loc(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
