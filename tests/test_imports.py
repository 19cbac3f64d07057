"""The dependency direction of docs/architecture.md, enforced on every import statement in kvtier/.

Every import counts: module level, inside functions (lazy imports) and under
``TYPE_CHECKING``. A module may import its own package's modules and any
module of a lower layer, never a higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "kvtier"

# Lowest first. A module belongs to the longest prefix listed here.
LAYERS: dict[str, int] = {
    # 0: foundations with no kvtier dependency beyond errors
    "kvtier.errors": 0,
    "kvtier.layout": 0,
    "kvtier.keys": 0,
    "kvtier.fingerprint": 0,
    "kvtier.models": 0,
    "kvtier.storage.urls": 0,
    "kvtier.storage.breaker": 0,
    "kvtier.threads": 0,
    "kvtier.deadline": 0,
    # 1: codecs: payload tensor <-> bytes; know nothing of chunks, tiers or engines
    "kvtier.codec": 1,
    # 1: chunk authentication and encryption keys (know layouts, not chunks or tiers)
    "kvtier.security": 1,
    # 2: the one configuration
    "kvtier.config": 2,
    # 3: the chunk format and the eviction policies
    "kvtier.chunk": 3,
    "kvtier.eviction": 3,
    # 4: tiers and their metrics
    "kvtier.storage": 4,
    "kvtier.metrics": 4,
    # 5: the engine, the public API of the core
    "kvtier.engine": 5,
    # 6: what sits on the core: engine adapters, maintenance, the package's re-exports
    "kvtier.adapters": 6,
    "kvtier.maintenance": 6,
    "kvtier.admin": 6,
    "kvtier": 6,
    # 7: entry points
    "kvtier.demo": 7,
    "kvtier.serve": 7,
    "kvtier.cli": 7,
    "kvtier.router": 7,
}

# Third-party packages only some modules may import (prefixes of module names).
CONFINED: dict[str, tuple[str, ...]] = {
    "vllm": ("kvtier.adapters.vllm",),
    "transformers": ("kvtier.adapters.hf", "kvtier.models", "kvtier.fingerprint"),
    "redis": ("kvtier.storage.redis", "kvtier.storage.urls"),
    "numba": ("kvtier.codec._numba_kernels", "kvtier.codec.kernels"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _package(module: str) -> str:
    """The package a module belongs to for the same-package exemption (``kvtier.codec.int8`` -> ``kvtier.codec``)."""
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return best


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "<relative>"))
    return found


MODULES = sorted(ROOT.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    for path in MODULES:
        _layer(_module_name(path))  # raises ValueError (max of nothing) for a module outside every layer


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_point_down(path: Path) -> None:
    module = _module_name(path)
    bad = []
    for line, target in _imports(path):
        if target == "<relative>":
            bad.append(f"{line}: relative import (kvtier uses absolute imports)")
        elif target.split(".")[0] in ("bench", "tests", "conftest"):
            bad.append(f"{line}: imports {target}: nothing in kvtier imports bench or tests")
        elif target.startswith("kvtier"):
            if _package(target) != _package(module) and _layer(target) > _layer(module):
                bad.append(f"{line}: {module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})")
        else:
            allowed = CONFINED.get(target.split(".")[0])
            if allowed is not None and not any(module == a or module.startswith(a + ".") for a in allowed):
                bad.append(f"{line}: imports {target}, which only {', '.join(allowed)} may import")
    assert bad == [], "\n".join(bad)


def test_the_rules_the_architecture_names() -> None:
    """The three rules of docs/architecture.md, stated directly (the layer table implies them)."""
    assert _layer("kvtier.adapters") > max(_layer(m) for m in ("kvtier.engine", "kvtier.storage", "kvtier.chunk"))
    assert _layer("kvtier.codec") < _layer("kvtier.storage")
    assert _layer("kvtier.codec") < _layer("kvtier.chunk")
