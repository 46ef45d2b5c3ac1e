"""The house rules of ARCHITECTURE.md, checked: pure cores import no I/O and no shell."""

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
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
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
    "serve": {"errors", "model", "runtime", "planner", "sim", "wire", "control", "net", "serve", "obs"},
    "obs": {"errors", "obs"},
    "planning_service.py": {"errors", "model", "planner", "wire", "control"},
    # the HTTP client the commands and the benchmarks share: it talks to a node, it builds none
    "client.py": {"errors"},
    # views reads a Node (imported for its type only) and the plan types
    "views.py": {"errors", "planner", "net", "node"},
    # the dashboard: a shell over a node (its type only) and its serving layer; node.py mounts it
    "web": {"errors", "planner", "net", "serve", "node", "web"},
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
