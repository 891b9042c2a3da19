"""The code's shape (docs/architecture.md): no import loop (function-local imports included), no module
importing another's private names, no module importing from a layer above its own, and the serving package
installed as `llmprune_serve`, not as a top-level `serve`."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"llmprune": "llmprune", "serve": "llmprune_serve"}  # folder -> installed name
LAYERS = (  # docs/architecture.md: a module imports only from its own layer or the ones before it here
    ("errors", "version", "argparsing", "pattern", "scheme", "settings", "stop"),
    ("data", "models", "report"),
    ("methods",),
    ("engine", "eval", "export", "hub", "structured", "depth", "experts", "costmodel", "speed", "body"),
    ("run", "cli", "__main__", ""),
)


def _layer(module: str) -> int:
    if module.startswith("llmprune_serve"):
        return len(LAYERS)
    first = module.removeprefix("llmprune").removeprefix(".").split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if first in names)


def _modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(modules: dict[str, Path]) -> dict[str, set[tuple[str, str]]]:
    """Per module, every (module, name) it imports from the project, at any depth of the file."""
    found: dict[str, set[tuple[str, str]]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in modules:
                        found[name].add((f"{node.module}.{alias.name}", ""))
                    elif node.module in modules:
                        found[name].add((node.module, alias.name))
            elif isinstance(node, ast.Import):
                found[name].update((alias.name, "") for alias in node.names if alias.name in modules)
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: relative import"
    return found


def test_no_import_loop_and_no_private_names():
    modules = _modules()
    imports = _imports(modules)
    private = sorted(f"{m} imports {t}.{n}" for m, pairs in imports.items() for t, n in pairs if n.startswith("_")
                     and n != "__version__" and t != m)  # fmt: skip
    assert private == []
    graph = {m: {t for t, _ in pairs if t != m} for m, pairs in imports.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "import loop: " + " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    upward = sorted(f"{m} imports {t}" for m in graph for t in graph[m] if _layer(t) > _layer(m))
    assert upward == []


def test_the_wheel_installs_serve_as_llmprune_serve(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("llmprune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"llmprune", "llmprune_serve", wheel.name.split("-py")[0] + ".dist-info"}
    assert "llmprune_serve/cli.py" in names and "llmprune_serve/engines/vllm_engine.py" in names
    assert "llmprune_serve/jobs/dashboard.html" in names  # package data: the service's page
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    entries = zipfile.ZipFile(wheel).read(entry).decode()
    assert "serve = llmprune_serve.cli:main" in entries and "service = llmprune_serve.jobs.cli:main" in entries
