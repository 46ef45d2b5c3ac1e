"""The house rules of ARCHITECTURE.md, checked: pure cores import no I/O and no shell, each part
imports only what the table allows, the composition root is imported by nobody below it, and the
import graph has no circles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "meshllm"
PURE = ["planner", "sim", "wire", "control"]
IO_MODULES = {"asyncio", "aiohttp", "zeroconf", "onnxruntime", "uvloop", "socket", "subprocess",
              "threading", "random", "requests", "urllib"}
SHELLS = {"meshllm.net", "meshllm.serve", "meshllm.node", "meshllm.cli", "meshllm.commands",
          "meshllm.bench", "meshllm.runtime"}
FORBIDDEN_CALLS = {("time", "time"), ("time", "monotonic"), ("time", "sleep"), ("time", "perf_counter")}


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every absolute import in a file (inside functions and ``if TYPE_CHECKING:`` too)."""
    return [(mod, line) for mod, _, line in _imported_names(path)]


def _imported_names(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, name imported from it or None, line) for every absolute import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.module, a.name, node.lineno) for a in node.names]
    return out


def _calls(path: Path) -> list[tuple[str, str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)):
            out.append((node.func.value.id, node.func.attr, node.lineno))
    return out


def _files(pkg: str) -> list[Path]:
    return sorted((PKG / pkg).rglob("*.py"))


@pytest.mark.parametrize("pkg", PURE)
def test_pure_cores_import_no_io_and_no_shell(pkg: str) -> None:
    bad = []
    for f in _files(pkg):
        for mod, line in _imports(f):
            top = mod.split(".")[0]
            if top in IO_MODULES or any(mod == s or mod.startswith(s + ".") for s in SHELLS):
                bad.append(f"{f.relative_to(PKG.parent)}:{line} imports {mod}")
    assert not bad, "pure core imports I/O or a shell:\n" + "\n".join(bad)


@pytest.mark.parametrize("pkg", PURE)
def test_pure_cores_read_no_clock_and_no_global_random(pkg: str) -> None:
    bad = []
    for f in _files(pkg):
        for obj, attr, line in _calls(f):
            if (obj, attr) in FORBIDDEN_CALLS:
                bad.append(f"{f.relative_to(PKG.parent)}:{line} calls {obj}.{attr}()")
        text = f.read_text()
        for needle in ("np.random.seed(", "np.random.rand(", "np.random.randn(", "np.random.randint(",
                       "np.random.choice(", "np.random.shuffle(", "np.random.normal(", "np.random.uniform("):
            if needle in text:
                bad.append(f"{f.relative_to(PKG.parent)} uses global numpy randomness {needle}")
    assert not bad, "\n".join(bad)


SERVING_CORES = ["serve/request.py", "serve/spec.py", "serve/stagecore.py", "serve/entrycore.py", "serve/router.py",
                 "serve/routes.py"]
# what the serving cores may take from the shells' packages: each other, their config and the pure
# sampling rules of the runtime (the token an index draws, when generation ends)
SERVING_CORE_MAY = {"meshllm.serve.config", "meshllm.serve.spec", "meshllm.serve.request", "meshllm.serve.router", "meshllm.serve.routes",
                    "meshllm.serve.stagecore", "meshllm.runtime.sampling", "meshllm.runtime.generate"}


@pytest.mark.parametrize("path", SERVING_CORES)
def test_serving_cores_are_sans_io(path: str) -> None:
    """The serving state machines and their scheduler: no I/O, no event loop, no clock (time comes
    in as ``now``), no shell but the pure parts listed."""
    f = PKG / path
    bad = [f"{path}:{line} imports {mod}" for mod, line in _imports(f)
           if mod.split(".")[0] in IO_MODULES | {"time"}
           or (any(mod == s or mod.startswith(s + ".") for s in SHELLS) and mod not in SERVING_CORE_MAY)]
    bad += [f"{path}:{line} calls {obj}.{attr}()" for obj, attr, line in _calls(f) if (obj, attr) in FORBIDDEN_CALLS]
    assert not bad, "serving core does I/O or reads the clock:\n" + "\n".join(bad)


def test_runtime_has_no_event_loop() -> None:
    bad = [f"{f.relative_to(PKG.parent)}:{line} imports {mod}"
           for f in _files("runtime") for mod, line in _imports(f)
           if mod.split(".")[0] in {"asyncio", "aiohttp", "uvloop"}]
    assert not bad, "\n".join(bad)


def test_the_rule_checker_can_fail(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("import asyncio\nimport time\nt = time.time()\n")
    assert ("asyncio", 1) in _imports(f)
    assert ("time", "time", 3) in _calls(f)


# Which meshllm packages each part may import (ARCHITECTURE.md's table). Keys are packages or
# top-level modules under meshllm/; values are the first component after ``meshllm.``.
MAY_IMPORT: dict[str, set[str]] = {
    "model": {"errors", "model"},
    "runtime": {"errors", "model", "runtime"},
    "planner": {"errors", "model", "planner"},
    "sim": {"errors", "model", "planner", "sim"},
    "wire": {"errors", "wire"},
    "control": {"errors", "model", "planner", "wire", "control"},
    "net": {"errors", "wire", "net"},
    "serve": {"errors", "model", "runtime", "planner", "sim", "wire", "control", "net", "serve", "obs", "ports"},
    "obs": {"errors", "obs", "ports"},
    # pure typing: the ports' types, imported for type checking only
    "ports.py": {"control", "model", "net", "planner", "wire"},
    "control_driver.py": {"errors", "control", "net", "obs", "ports", "wire"},
    "plan_loader.py": {"errors", "control", "net", "planner", "runtime", "serve"},
    "planning_service.py": {"errors", "model", "planner", "wire", "control", "runtime", "obs"},
    # views read a node through its ports, never the Node class
    "views.py": {"errors", "planner", "net", "ports"},
    # the HTTP client the commands and the benchmarks share: it talks to a node, it builds none
    "client.py": {"errors"},
    # the dashboard: a node's ports and its serving layer; node.py mounts it
    "web": {"errors", "planner", "net", "serve", "ports", "views", "web"},
}


def _internal(path: Path) -> list[tuple[str, int]]:
    return [(mod.split(".")[1], line) for mod, line in _imports(path)
            if mod.startswith("meshllm.") and mod.count(".") >= 1]


@pytest.mark.parametrize("part", sorted(MAY_IMPORT))
def test_each_part_imports_only_what_the_architecture_allows(part: str) -> None:
    files = [PKG / part] if part.endswith(".py") else _files(part)
    assert files and all(f.exists() for f in files), f"no such part: {part}"
    bad = [f"{f.relative_to(PKG.parent)}:{line} imports meshllm.{top}"
           for f in files for top, line in _internal(f) if top not in MAY_IMPORT[part]]
    assert not bad, f"{part} may import only {sorted(MAY_IMPORT[part])}:\n" + "\n".join(bad)


# --- the import graph -------------------------------------------------------------------------------

def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the meshllm modules it imports (type-checking and function-local imports too: a
    circle through them is still a circle in the design). ``from meshllm.pkg import mod`` is an
    edge to ``meshllm.pkg.mod``; edges to a module's own parent packages are left out (importing a
    submodule runs its package's ``__init__`` anyway)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps: set[str] = set()
        for target, name, _ in _imported_names(path):
            if target != "meshllm" and not target.startswith("meshllm."):
                continue
            full = f"{target}.{name}" if name else target
            dep = full if full in mods else resolve(target)
            if dep is not None and dep != mod and not mod.startswith(dep + "."):
                deps.add(dep)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


# Circles allowed to remain: none. A new one fails the test.
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def test_the_import_graph_has_no_new_circles() -> None:
    found = set(cycles(import_graph()))
    new = found - KNOWN_CYCLES
    assert not new, "import circles (ARCHITECTURE.md: imports point one way):\n" + "\n".join(
        " <-> ".join(c) for c in sorted(new))
    gone = KNOWN_CYCLES - found
    assert not gone, "these circles are gone: remove them from KNOWN_CYCLES:\n" + "\n".join(
        " <-> ".join(c) for c in sorted(gone))


def test_the_views_the_dashboard_and_the_metrics_read_ports_not_the_node() -> None:
    graph = import_graph()
    for mod in ("meshllm.views", "meshllm.web.dashboard", "meshllm.obs.metrics"):
        assert "meshllm.ports" in graph[mod] and "meshllm.node" not in graph[mod], mod
    # the composition root: imported only by what runs a node (the CLI, its commands, benchmarks)
    users = sorted(m for m, deps in graph.items() if "meshllm.node" in deps
                   and not m.startswith(("meshllm.cli", "meshllm.commands", "meshllm.bench")))
    assert not users, f"only the CLI, its commands and benchmarks may import meshllm.node: {users}"


def test_the_cycle_finder_can_fail() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [("a", "b", "c")]
    assert cycles({"a": {"b"}, "b": set()}) == []
    # the old circle, put back by hand into the real graph, is found
    graph = import_graph()
    graph["meshllm.views"] = graph["meshllm.views"] | {"meshllm.node"}
    assert any({"meshllm.node", "meshllm.views"} <= set(c) for c in cycles(graph))
