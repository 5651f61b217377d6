"""What is wrong with a config file, where, and under which stable code.

Every error the loader reports is a :class:`Diagnostic`: a stable code (listed once, in
:class:`Code`), the file, a 1-based line and column, the dotted path of the field
(``spec.retries.attempts``, ``spec.rules[0].from[1].id``) and a reason. Its text form is
``file:line:col: path: reason``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Code(StrEnum):
    """Every diagnostic code, stable across releases: tools and docs may rely on them.

    SB00xx: the file is not acceptable YAML. SB01xx: a document is not a known document.
    SB02xx: a field of a known document is wrong.
    """

    YAML_SYNTAX = "SB0001"
    """The YAML does not parse (scanner, parser or composer error)."""
    DUPLICATE_KEY = "SB0002"
    """A mapping holds the same key twice (PyYAML would silently keep the last)."""
    TOO_LARGE = "SB0003"
    """The file is larger than the size cap (1 MiB)."""
    ALIAS_BOMB = "SB0004"
    """Aliases expand past the cap ("billion laughs"), or an alias refers to itself."""
    UNSUPPORTED_YAML = "SB0005"
    """A YAML feature config files do not take: tags other than the standard ones, complex
    keys, a scalar its tag cannot hold (``!!int abc``, ``2024-13-45``)."""
    TOO_DEEP = "SB0006"
    """Mappings and sequences are nested deeper than the cap."""
    UNREADABLE = "SB0007"
    """The file cannot be read, or is not UTF-8."""
    UNKNOWN_KIND = "SB0101"
    """``kind`` is missing or names no known document kind."""
    WRONG_API_VERSION = "SB0102"
    """``apiVersion`` is missing or not one this release reads."""
    NOT_A_DOCUMENT = "SB0103"
    """A YAML document is not a mapping (``apiVersion``, ``kind``, ``metadata``, ``spec``)."""
    NO_DOCUMENTS = "SB0104"
    """The file holds no document at all."""
    DUPLICATE_DOCUMENT = "SB0105"
    """Two documents in one file share kind, namespace and name."""
    INVALID_VALUE = "SB0201"
    """A field's value is out of range or inconsistent with another field."""
    MISSING_FIELD = "SB0202"
    """A required field is absent."""
    UNKNOWN_FIELD = "SB0203"
    """A field the document kind does not have (often a typo)."""
    WRONG_TYPE = "SB0204"
    """A field holds the wrong type of value (a string for a number, a list for a mapping)."""


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One error in one file, at a 1-based line and column, about a field path."""

    code: Code
    file: str
    line: int
    column: int
    path: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"

    def to_json(self) -> dict[str, str | int]:
        """A JSON-ready mapping (used by ``snapbright policy validate -o json``)."""
        return {
            "severity": self.severity,
            "code": self.code.value,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "message": self.message,
        }
