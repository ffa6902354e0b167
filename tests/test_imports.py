"""The import map of docs/DEVELOPING.md, held: each package imports only the packages below it, and no
module imports itself back through others.

Every ``import`` and ``from ... import`` in the source counts, inside functions too (read from the
files, so a lazy import cannot hide an upward one).
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
from typing import Dict, Set

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("anyflow", "weights_convert")

# Each package and what it may import (besides itself and the package root, anyflow's __init__ and lazy).
ALLOWED: Dict[str, Set[str]] = {
    "anyflow.model": set(),
    "anyflow.runtime": {"anyflow.model"},
    "weights_convert": {"anyflow.model", "anyflow.runtime"},
    "anyflow.pretrained": {"anyflow.model", "anyflow.runtime", "weights_convert"},
    "anyflow.sampling": {"anyflow.model"},
    "anyflow.text": {"anyflow.model", "anyflow.runtime", "weights_convert"},
    "anyflow.vae": {"anyflow.runtime", "weights_convert"},
    "anyflow.pipeline": {"anyflow.model", "anyflow.runtime", "anyflow.pretrained", "anyflow.sampling", "anyflow.text",
                         "anyflow.vae", "weights_convert"},
    "anyflow.training": {"anyflow.model", "anyflow.runtime", "anyflow.pretrained", "anyflow.sampling",
                         "weights_convert"},
    "anyflow.app": {"anyflow.model", "anyflow.runtime", "anyflow.pretrained", "anyflow.pipeline", "weights_convert"},
    "anyflow.cli": {"anyflow.model", "anyflow.runtime", "anyflow.pretrained", "anyflow.sampling", "anyflow.text",
                    "anyflow.vae", "anyflow.pipeline", "anyflow.training", "anyflow.app", "weights_convert"},
}
PACKAGE_ROOT = {"anyflow", "anyflow.lazy", "anyflow.__main__"}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> Set[str]:
    """The project modules ``path`` imports, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # "from . import x" may name a module
    return {m for m in found if m.split(".")[0] in PACKAGES}


def graph() -> Dict[str, Set[str]]:
    """Module -> the project modules it imports (names that are not modules are dropped)."""
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def package_of(module: str) -> str:
    if module in PACKAGE_ROOT:
        return "root"
    return next((p for p in sorted(ALLOWED, key=len, reverse=True) if module == p or module.startswith(p + ".")),
                module)


def test_every_module_belongs_to_a_package_of_the_map():
    unknown = {m for m in graph() if package_of(m) not in ALLOWED and package_of(m) != "root"}
    assert not unknown, f"modules outside the import map (add their package to ALLOWED and docs/DEVELOPING.md): {unknown}"


def test_each_package_imports_only_what_the_map_allows():
    wrong = {}
    for module, imported in graph().items():
        mine = package_of(module)
        if mine == "root":
            continue
        for target in imported:
            theirs = package_of(target)
            if theirs not in ("root", mine) and theirs not in ALLOWED[mine]:
                wrong.setdefault(module, []).append(target)
    assert not wrong, f"imports the map does not allow: {wrong}"


def test_the_package_root_imports_nothing_but_its_helpers():
    imported = {m for module, targets in graph().items() if module in ("anyflow", "anyflow.lazy") for m in targets}
    assert imported <= {"anyflow.lazy"}, imported


def test_the_map_runs_one_way():
    """No package reaches itself through the ones it may import."""
    def reach(package, seen):
        for below in ALLOWED[package]:
            assert below != start, f"{start} reaches itself through {package}"
            if below not in seen:
                seen.add(below)
                reach(below, seen)

    for start in ALLOWED:
        reach(start, set())


def test_no_module_imports_itself_back():
    modules = graph()
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in modules[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    assert not cycles, f"modules that import each other: {cycles}"


def test_loading_a_model_does_not_import_the_compiler():
    """torch._dynamo costs seconds of import; only compiling (or an offload hook's install) may bring it in."""
    code = ("import sys; from anyflow import AnyFlowTransformer3DModel, AnyFlowFARTransformer3DModel, VideoPipeline; "
            "from anyflow.cli.demo import TINY_CHECKPOINT; AnyFlowTransformer3DModel.from_pretrained(TINY_CHECKPOINT); "
            "print('torch._dynamo' in sys.modules)")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "False"
