"""Regenerate the committed JSON Schemas of every document kind, or (``--check``) prove them fresh.

One file per kind, ``deploy/schemas/<kind>.json``, generated from the pydantic models through
``snapbright.policy.kinds.schema_text``. Editors validate files against them, e.g. with a
yaml-language-server modeline at the top of a policy file::

    # yaml-language-server: $schema=../schemas/TrafficPolicy.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from snapbright.policy.kinds import KINDS, schema_text

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "deploy" / "schemas"


def _expected() -> dict[Path, str]:
    return {SCHEMAS / f"{kind}.json": schema_text(kind) for kind in sorted(KINDS)}


def main(argv: list[str] | None = None) -> int:
    """Write the schemas; with ``--check``, write nothing and fail on any difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if a schema is stale")
    args = parser.parse_args(argv)
    expected = _expected()
    stale = sorted(set(SCHEMAS.glob("*.json")) - set(expected))
    if args.check:
        wrong = [p for p, text in expected.items() if not p.is_file() or p.read_text() != text]
        for path in [*wrong, *stale]:
            print(f"stale: {path.relative_to(ROOT)}", file=sys.stderr)
        if wrong or stale:
            print("run: .venv/bin/python scripts/schemas.py", file=sys.stderr)
            return 1
        return 0
    SCHEMAS.mkdir(parents=True, exist_ok=True)
    for path, text in expected.items():
        path.write_text(text)
    for path in stale:
        path.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
