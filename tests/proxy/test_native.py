"""The compiled hot path (proxy/native.py): it runs only when it matches its sources."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import native

_WHERE = (
    "import proxy.native as n, proxy.http.server as s, proxy.sidecar.router as r; "
    "print(n.state); print(s.__file__); print(r.__file__)"
)


def _fresh(env: dict[str, str]) -> list[str]:
    """``state`` and two module files, as a new interpreter sees them."""
    done = subprocess.run(
        [sys.executable, "-c", _WHERE],
        env={**os.environ, **env},
        cwd=native.ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()


@pytest.mark.skipif(
    os.environ.get("SNAPBRIGHT_REQUIRE_NATIVE") != "1",
    reason="SNAPBRIGHT_REQUIRE_NATIVE=1 is set by `make test`, after the build",
)
def test_the_suite_runs_the_compiled_modules() -> None:
    # The tests exercise what a deployment runs; a stale or missing build fails here,
    # instead of quietly testing (and benchmarking) the pure-Python fallback.
    assert native.state == "compiled"
    for module in native.COMPILED:
        importlib.import_module(module)
    loaded = native.running()
    assert set(loaded) == set(native.COMPILED)
    assert all(not path.endswith(".py") for path in loaded.values()), loaded


def test_pure_python_can_be_forced_and_is_used_for_every_module() -> None:
    state, server, router = _fresh({"SNAPBRIGHT_PURE": "1"})
    assert state == "pure: SNAPBRIGHT_PURE=1"
    assert server.endswith("proxy/http/server.py")
    assert router.endswith("proxy/sidecar/router.py")


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    source = tmp_path / "pkg" / "mod.py"
    source.parent.mkdir()
    source.write_text("X = 1\n")
    manifest = tmp_path / "native.json"
    manifest.write_text(json.dumps({"sources": {"pkg.mod": native.digest(source)}}))
    for extension in native.extensions(["pkg.mod"], tmp_path):
        extension.parent.mkdir(parents=True, exist_ok=True)
        extension.write_bytes(b"")
    return source, manifest


def test_a_manifest_that_matches_its_sources_lets_the_compiled_modules_run(
    tmp_path: Path,
) -> None:
    _, manifest = _tree(tmp_path)
    assert native.stale(manifest, ["pkg.mod"], tmp_path) is None


def test_a_source_edited_after_the_build_is_stale(tmp_path: Path) -> None:
    source, manifest = _tree(tmp_path)
    source.write_text("X = 2\n")
    assert native.stale(manifest, ["pkg.mod"], tmp_path) == (
        "pkg.mod changed since it was compiled (make native)"
    )


def test_a_manifest_without_its_extensions_means_pure_python(tmp_path: Path) -> None:
    # As a wheel would be that carried native.json but not the compiled files.
    _, manifest = _tree(tmp_path)
    module, shared = native.extensions(["pkg.mod"], tmp_path)
    shared.unlink()
    why = native.stale(manifest, ["pkg.mod"], tmp_path)
    assert why == f"{shared.name} is missing (make native)"
    module.unlink()
    why = native.stale(manifest, ["pkg.mod"], tmp_path)
    assert why == f"{module.name} is missing (make native)"


def test_a_module_the_build_did_not_compile_is_stale(tmp_path: Path) -> None:
    other = tmp_path / "pkg" / "other.py"
    _, manifest = _tree(tmp_path)
    other.write_text("Y = 1\n")
    assert native.stale(manifest, ["pkg.mod", "pkg.other"], tmp_path) == (
        "pkg.other changed since it was compiled (make native)"
    )


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (None, "not built (make native)"),
        ("{", "native.json unreadable: Expecting property name"),
        ('{"sources": []}', "native.json unreadable: sources is not a mapping"),
        ("{}", "native.json unreadable: 'sources'"),
    ],
)
def test_a_missing_or_broken_manifest_means_pure_python(
    tmp_path: Path, text: str | None, why: str
) -> None:
    _, manifest = _tree(tmp_path)
    if text is None:
        manifest.unlink()
    else:
        manifest.write_text(text)
    reason = native.stale(manifest, ["pkg.mod"], tmp_path)
    assert reason is not None
    assert reason.startswith(why)


def test_no_compiled_module_keeps_weak_references() -> None:
    # mypyc 2.4 never clears a weakref to a compiled object when the object dies: a WeakSet
    # of TLS transports crashed the interpreter on its next walk (proxy/native.py).
    for module in native.COMPILED:
        text = native.source_of(module).read_text()
        assert "weakref" not in text, f"{module} uses weakref; compiled objects must not"
