"""Compile the data plane's hot path with mypyc (see proxy/native.py).

    python scripts/native.py            build if a source changed since the last build
    python scripts/native.py --require  the same, but a failed build is an error (CI)
    python scripts/native.py --clean    remove the compiled modules: pure Python again

A failed build without --require leaves no compiled module behind and says so: the sidecar
then runs the same code as pure Python, slower.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

# Loaded by path, not `import proxy.native`: the package's __init__ would already decide.
_spec = importlib.util.spec_from_file_location(
    "_snapbright_native", Path(__file__).resolve().parent.parent / "proxy" / "native.py"
)
assert _spec is not None
assert _spec.loader is not None
native = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(native)


def clean() -> None:
    for path in native.extensions():
        path.unlink(missing_ok=True)
    native.MANIFEST.unlink(missing_ok=True)


def _compile() -> None:
    """Run by `build` in a child process: mypyc through setuptools, extensions in place."""
    from mypyc.build import mypycify
    from setuptools import setup

    paths = [str(native.source_of(module).relative_to(native.ROOT)) for module in native.COMPILED]
    setup(
        name="snapbright-hot-path",
        # The shared library goes inside the package, where an editable install finds it
        # from any working directory.
        ext_modules=mypycify(paths, opt_level="3", group_name=native.GROUP),  # type: ignore[arg-type]
        script_args=["build_ext", "--inplace"],
    )


def build() -> str | None:
    """Compile every listed module; the reason when it failed."""
    digests = {module: native.digest(native.source_of(module)) for module in native.COMPILED}
    clean()
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, __file__, "--compile"],
        cwd=native.ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    made = native.extensions()
    missing = [str(path.relative_to(native.ROOT)) for path in made if not path.exists()]
    if done.returncode != 0 or missing:
        clean()
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        what = f"exited with {done.returncode}" if done.returncode else f"did not make {missing}"
        return f"mypyc {what}:\n{tail}"
    # Written last, from the digests taken before compiling: a source edited during the
    # build leaves the manifest stale, and the next import falls back to pure Python.
    tmp = native.MANIFEST.with_suffix(".tmp")
    tmp.write_text(json.dumps({"sources": digests}, indent=1, sort_keys=True) + "\n")
    tmp.replace(native.MANIFEST)
    took = time.monotonic() - started
    print(f"native: compiled {len(digests)} hot-path modules with mypyc in {took:.0f}s")
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description="Compile the data plane's hot path (mypyc).")
    parser.add_argument("--require", action="store_true", help="a failed build is an error")
    parser.add_argument("--clean", action="store_true", help="remove the compiled modules")
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile:
        _compile()
        return 0
    if args.clean:
        clean()
        print("native: removed the compiled modules; the data plane runs pure Python")
        return 0
    if native.stale(native.MANIFEST, native.COMPILED) is None:
        print("native: the compiled hot path is up to date")
        return 0
    failure = build()
    if failure is None:
        return 0
    print(f"native: build failed, the data plane runs pure Python (slower)\n{failure}")
    return 1 if args.require else 0


if __name__ == "__main__":
    sys.exit(main())
