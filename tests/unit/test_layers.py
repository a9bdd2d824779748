"""The gateway's dependencies point one way (docs/architecture.md, "Dependencies point down"): every module
imports only from its own package or from layers below it, type-only imports included."""

from __future__ import annotations

import ast
from pathlib import Path

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"

# Lowest first. A package counts as one layer; modules of one layer may not import each other across it.
LAYERS: list[set[str]] = [
    {"gateway", "gateway.config", "gateway.metrics", "gateway.logs", "gateway.gctune"},
    {"gateway.api", "gateway.engines"},
    {"gateway.policy"},
    {"gateway.placement"},
    {"gateway.streams"},
    {"gateway.state"},
    {"gateway.auth", "gateway.resume", "gateway.pump"},
    {"gateway.control"},
    {"gateway.routing"},
    {"gateway.services"},
    {"gateway.lifecycle"},
    {"gateway.relay"},
    {"gateway.handlers", "gateway.web"},
    {"gateway.app"},
    {"gateway.workers"},
    {"gateway.cli"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def unit(module: str) -> str:
    """The layer entry a module belongs to: its package (gateway.streams.stream -> gateway.streams) or itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def imports(path: Path, module: str) -> set[str]:
    """Every gateway module ``path`` imports, at any level (inside functions and TYPE_CHECKING blocks too)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gateway")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("gateway"):
                out.add(name)
    return out


def test_every_gateway_module_has_a_layer() -> None:
    for path in GATEWAY.rglob("*.py"):
        module = ".".join(path.relative_to(GATEWAY.parent).with_suffix("").parts).removesuffix(".__init__")
        assert unit(module) in RANK, f"{module}: add it to LAYERS"


def test_imports_point_down() -> None:
    upward = []
    for path in sorted(GATEWAY.rglob("*.py")):
        module = ".".join(path.relative_to(GATEWAY.parent).with_suffix("").parts).removesuffix(".__init__")
        mine = unit(module)
        for name in imports(path, module):
            theirs = unit(name)
            if theirs != mine and theirs != "gateway" and RANK[theirs] >= RANK[mine]:
                upward.append(f"{module} imports {name}")
    assert upward == []
