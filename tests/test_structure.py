"""The package's import structure: no circles between modules, and layers depend downward
only (docs/architecture.md). Imports inside functions count too: a lazy import hides a
circle from Python, not from the design."""

from __future__ import annotations

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "exgra_jax")

# What each part may import from the package (besides itself and the top-level helpers).
ALLOWED = {
    "alignment": set(),
    "models": set(),
    "data": {"models"},
    "inference": {"models", "data"},
    "convert": {"models", "data"},
    "eval": {"models", "data", "inference", "convert"},
    "serve": {"models", "data", "inference", "convert", "eval"},
    "train": {"models", "data", "inference", "convert", "eval", "alignment"},
}
TOP_LEVEL = {"paths", "workdir", "parallel", "checkpoint", "config_paths", "runtime"}


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PKG))[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def imports_of(path: str) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    me = module_name(path)
    package = me if path.endswith("__init__.py") else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m == "exgra_jax" or m.startswith("exgra_jax.")}


def graph() -> dict[str, set[str]]:
    files = [os.path.join(d, f) for d, _, fs in os.walk(PKG) for f in fs if f.endswith(".py")]
    modules = {module_name(f): f for f in files}
    edges = {}
    for name, path in modules.items():
        # "from exgra_jax.x import y" names module x.y when it exists, else module x.
        edges[name] = {m for m in imports_of(path) if m in modules and m != name}
        edges[name] = {m for m in edges[name]
                       if not any(o.startswith(m + ".") for o in edges[name])
                       or not modules[m].endswith("__init__.py")}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt.endswith("__init__") or edges.get(nxt) is None:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_layers_depend_downward_only(part):
    bad = []
    for name, deps in graph().items():
        if not name.startswith(f"exgra_jax.{part}"):
            continue
        for dep in deps:
            layer = dep.split(".")[1] if dep.count(".") else dep
            if layer in (part, *TOP_LEVEL, "exgra_jax") or layer in ALLOWED[part]:
                continue
            bad.append(f"{name} imports {dep}")
    assert not bad, bad
