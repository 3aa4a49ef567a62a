"""The rooms of pipeline/ import only downward, and no module of the product imports itself back
(docs/architecture.md). Read from the source with ast: nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# base < io < models < detect < ops < run < engine (docs/architecture.md)
RANK = {"base": 0, "io": 1, "models": 2, "detect": 3, "ops": 4, "run": 5, "engine": 6}
PACKAGES = ("pipeline", "daemon", "cli", "lora")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            out[".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = f
    return out


def _imports(path: Path) -> list[tuple[str, int]]:
    """Project modules imported anywhere in ``path`` (top level, functions, TYPE_CHECKING blocks)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(n, node.lineno) for n in names if n.split(".")[0] in PACKAGES]
    return found


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "pipeline":
        return None
    return "base" if len(parts) == 1 or parts[1] in ("errors", "settings") else parts[1]


def test_every_pipeline_module_lives_in_a_room():
    for module in _modules():
        room = _room(module)
        assert room is None or room in RANK, f"{module}: not in a room ({', '.join(RANK)})"


def test_rooms_import_only_downward():
    upward = []
    for module, path in _modules().items():
        room = _room(module)
        for target, line in _imports(path):
            top = target.split(".")[0]
            if room is None:
                # the packages above pipeline: lora may use pipeline only; daemon not the CLI
                if (module.startswith("lora") and top in ("daemon", "cli")) or \
                        (module.startswith("daemon") and top == "cli"):
                    upward.append(f"{path.relative_to(ROOT)}:{line} {module} -> {target}")
                continue
            if top != "pipeline" or RANK[_room(target)] > RANK[room]:
                upward.append(f"{path.relative_to(ROOT)}:{line} {module} ({room}) -> {target}")
    assert upward == []


def test_no_import_cycles_between_modules():
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for target, _ in _imports(path):
            # `from pipeline.x import y` may name a module or a name in it: the longest module prefix
            parts = target.split(".")
            dep = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in mods), None)
            if dep and dep != module and not module.startswith(dep + "."):  # a parent package: implicit
                graph[module].add(dep)
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []
