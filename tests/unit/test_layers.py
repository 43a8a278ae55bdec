"""The package's imports run down the layers the README draws, and no modules import each other.

Every ``import omni_ray...`` / ``from omni_ray... import`` in every module counts, module level or
inside a function (a lazy import is still a dependency; it only hides a cycle until run time).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "omni_ray"


def readme_layers() -> list[list[str]]:
    block = re.search(r"```layers\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no ```layers block"
    return [line.split() for line in block.group(1).splitlines() if line.strip()]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The omni_ray modules ``path`` imports (``from omni_ray import storage`` is omni_ray.storage)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "omni_ray"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "omni_ray":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in known else node.module)
    return out


def layer_of(module: str, rank: dict[str, int]) -> int | None:
    """The layer of ``omni_ray.<top>...``; the package root itself sits above every layer."""
    parts = module.split(".")
    return -1 if len(parts) == 1 else rank.get(parts[1])


def test_every_module_is_in_a_layer_and_imports_only_downwards():
    layers = readme_layers()
    rank = {name: i for i, names in enumerate(layers) for name in names}
    known = modules()
    unplaced = sorted({m.split(".")[1] for m in known if "." in m} - set(rank))
    assert not unplaced, f"add these to README.md's layers block: {unplaced}"
    upward = []
    for module, path in sorted(known.items()):
        mine = layer_of(module, rank)
        for target in sorted(imports(path, known)):
            theirs = layer_of(target, rank)
            if mine != -1 and (theirs == -1 or theirs < mine):
                upward.append(f"{module} imports {target}")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_modules_import_each_other():
    known = modules()
    graph = {m: {t for t in imports(p, known) if t in known and t != m and t != "omni_ray"}
             for m, p in known.items() if m != "omni_ray"}
    assert cycles(graph) == []


def test_the_checks_see_an_upward_import_and_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    rank = {name: i for i, names in enumerate(readme_layers()) for name in names}
    assert layer_of("omni_ray.train.loop", rank) > layer_of("omni_ray.observe.watch", rank)
