"""The compiled hot path: the modules mypyc compiles, and whether this process runs them.

The request path (HTTP forwarding, the TLS record engine, balancing, stats, resilience,
authorization, the mesh router, the gateway's passthrough) is plain, strictly typed Python
that ``scripts/native.py`` compiles with mypyc into C extensions beside the sources; Python
then imports the extension before the ``.py``. That takes a fifth off the CPU each proxied
request costs (bench/dataplane.py).

A compiled module must never run in place of a source that changed after it was built: the
build writes the digest of every source it compiled to ``native.json``, and `activate` (run
when the ``proxy`` package is imported, before any of these modules) compares them. On any
difference, or with ``SNAPBRIGHT_PURE=1``, every listed module is imported from its source
instead: all or none, since compiled modules call into each other's native classes.

No weak reference may point at an instance of a compiled class. A WeakSet of compiled TLS
transports crashed the interpreter on its next walk (gdb: a freed weakref object under
``_weakrefset.__iter__``); as far as we can tell, mypyc 2.4 gives classes with a Python base
a weakref slot but its dealloc does not clear their weak references. The modules listed here
do not import weakref (tests/proxy/test_native.py); code elsewhere must not weakly hold their
objects either.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

COMPILED = (
    "proxy.http.core",
    "proxy.http.upstream",
    "proxy.http.server",
    "proxy.stats.core",
    "proxy.balance.core",
    "proxy.resilience.core",
    "proxy.authz.core",
    "proxy.sidecar.router",
    "proxy.sidecar.metrics",
    "proxy.sidecar.inbound",
    "proxy.tls.engine",
    "proxy.tls.peer",
    "gateway.forward",
)
# mypyc's shared runtime library for these modules: proxy/hotpath__mypyc.<abi>.so
GROUP = "proxy.hotpath"
ROOT = Path(__file__).resolve().parent.parent
MANIFEST = Path(__file__).with_name("native.json")

_UNCHECKED = "pure: not checked"
# What this process runs: "compiled", or "pure: <why>". Set by `activate`.
state = _UNCHECKED


def source_of(module: str, root: Path = ROOT) -> Path:
    """The ``.py`` file of a listed module."""
    return root.joinpath(*module.split(".")).with_suffix(".py")


def extensions(modules: Sequence[str] = COMPILED, root: Path = ROOT) -> list[Path]:
    """Every file a build leaves beside the sources: one per module, and the shared library."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]  # e.g. .cpython-311-x86_64-linux-gnu.so
    package, _, name = GROUP.rpartition(".")
    shared = root.joinpath(*package.split("."), f"{name}__mypyc{suffix}")
    return [*(source_of(module, root).with_suffix(suffix) for module in modules), shared]


def digest(path: Path) -> str:
    """The SHA-256 of a source file, as the manifest records it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stale(manifest: Path, modules: Sequence[str], root: Path = ROOT) -> str | None:
    """Why the compiled modules must not run (``None`` when they match their sources)."""
    try:
        built = json.loads(manifest.read_text())["sources"]
    except FileNotFoundError:
        return "not built (make native)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{manifest.name} unreadable: {error}"
    if not isinstance(built, dict):
        return f"{manifest.name} unreadable: sources is not a mapping"
    for module in modules:
        if built.get(module) != digest(source_of(module, root)):
            return f"{module} changed since it was compiled (make native)"
    # E.g. a wheel that carried the manifest but not the extensions.
    for path in extensions(modules, root):
        if not path.exists():
            return f"{path.name} is missing (make native)"
    return None


class _FromSource:
    """A meta path finder that imports the listed modules from their ``.py`` files."""

    def __init__(self, modules: Sequence[str], root: Path) -> None:
        self._modules = frozenset(modules)
        self._root = root

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in self._modules:
            return None
        return importlib.util.spec_from_file_location(fullname, source_of(fullname, self._root))


def activate() -> str:
    """Decide once per process whether the compiled modules run; returns `state`."""
    global state
    if state != _UNCHECKED:
        return state
    why = "SNAPBRIGHT_PURE=1" if os.environ.get("SNAPBRIGHT_PURE") == "1" else None
    if why is None:
        why = stale(MANIFEST, COMPILED)
    if why is None:
        state = "compiled"
    else:
        sys.meta_path.insert(0, _FromSource(COMPILED, ROOT))
        state = f"pure: {why}"
    return state


def running() -> dict[str, str]:
    """Each listed module that is imported, and the file it was loaded from."""
    return {
        name: str(getattr(sys.modules[name], "__file__", "?"))
        for name in COMPILED
        if name in sys.modules
    }
