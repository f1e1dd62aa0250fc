"""The package's structure: no import circle among its modules, every import down the layers of
docs/ARCHITECTURE.md, and only the commands that train import the trainer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the softtriple modules it imports (at the top or inside functions); ``from P
    import name`` counts as importing P.name when that is a module, else P."""
    modules = {_module(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                    + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the path that closes it (depth-first search)."""
    found, state = [], dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                found.append([*stack[stack.index(nxt):], nxt])
            elif state[nxt] == 0:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node)
    return found


def test_no_import_circle_in_the_package():
    graph = import_graph()
    assert "softtriple.training.trainer" in graph and graph["softtriple.cli"]
    assert cycles(graph) == []


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph folded to the package's subpackages and top-level modules
    (softtriple.training.trainer -> softtriple.training)."""
    def unit(module: str) -> str:
        return ".".join(module.split(".")[:2])

    folded: dict[str, set[str]] = {}
    for module, edges in graph.items():
        folded.setdefault(unit(module), set()).update(
            unit(e) for e in edges if unit(e) != unit(module))
    return folded


def test_no_import_circle_between_subpackages_and_top_level_modules():
    graph = package_graph(import_graph())
    assert cycles(graph) == []


# docs/ARCHITECTURE.md's layers, bottom first: a unit (subpackage or top-level module) imports
# only units of lower layers, never one of its own layer or above (imports inside functions too)
LAYERS = [
    {"softtriple", "atomic", "faults", "machine", "names"},
    {"distributed"},
    {"data"},
    {"models", "evaluation"},
    {"losses"},
    {"experiment"},
    {"training", "inference"},
    {"analysis", "export", "search"},
    {"serve", "compare", "demo"},
    {"cli"},
    {"__main__"},
]


def layer_breaks(graph: dict[str, set[str]], layers: list[set[str]]) -> list[str]:
    """Every import that goes up or sideways across ``layers`` (and every unit in no layer)."""
    level = {unit: i for i, units in enumerate(layers) for unit in units}
    breaks = [f"{unit} is in no layer" for unit in sorted(graph) if unit not in level]
    for unit, edges in sorted(graph.items()):
        for target in sorted(edges):
            if unit in level and target in level and level[target] >= level[unit]:
                breaks.append(f"{unit} (layer {level[unit]}) imports {target} "
                              f"(layer {level[target]})")
    return breaks


def test_every_import_goes_down_the_layers():
    short = {unit.removeprefix("softtriple.") or "softtriple": {
        e.removeprefix("softtriple.") or "softtriple" for e in edges}
        for unit, edges in package_graph(import_graph()).items()}
    assert layer_breaks(short, LAYERS) == []


def test_the_layer_check_finds_an_upward_and_a_sideways_import():
    graph = {"losses": {"evaluation"}, "evaluation": {"losses"}, "models": {"data"}, "data": set(),
             "stray": set()}
    assert layer_breaks(graph, [{"data"}, {"models", "evaluation"}, {"losses"}]) == [
        "stray is in no layer", "evaluation (layer 1) imports losses (layer 2)"]
    assert layer_breaks({"a": {"b"}, "b": set()}, [{"a", "b"}]) == [
        "a (layer 0) imports b (layer 0)"]


def test_only_the_commands_that_train_import_the_trainer_package():
    graph = package_graph(import_graph())
    importers = {unit for unit, edges in graph.items() if "softtriple.training" in edges}
    assert importers <= {"softtriple.cli", "softtriple.demo", "softtriple.compare"}


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_report_search_and_inference_do_not_import_the_trainer():
    code = ("import sys, softtriple.analysis.report, softtriple.search, softtriple.inference, "
            "softtriple.cli; print('softtriple.training.trainer' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_the_command_line_offers_the_registries_names_without_importing_torch():
    from softtriple import names
    from softtriple.data.builtin import BUILTINS
    from softtriple.data.formats import FORMATS
    from softtriple.export import FORMATS as EXPORT_FORMATS
    assert names.BUILTIN_DATASETS == tuple(sorted(BUILTINS))
    assert names.DATA_FORMATS == tuple(sorted(FORMATS))
    assert names.EXPORT_FORMATS == tuple(EXPORT_FORMATS)
    check = ("import sys; from softtriple.cli import build_parser; build_parser().format_help(); "
             "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "False"  # --help answers at once


def test_make_demo_installs_only_what_the_demo_uses(tmp_path):
    """`make demo` names no browser and no test extras; `make test` installs the extras."""
    import shutil

    if shutil.which("make") is None:
        import pytest
        pytest.skip("make is not installed")
    repo = SRC.parent
    for name in ("Makefile", "pyproject.toml"):  # a fresh checkout: no .venv, no stamps
        shutil.copy(repo / name, tmp_path / name)
    demo = subprocess.run(["make", "-n", "demo"], cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout
    assert "softtriple demo" in demo and "pip install --quiet -e ." in demo
    assert "chromium" not in demo and "[dev" not in demo and "npm" not in demo
    test = subprocess.run(["make", "-n", "test"], cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout
    assert "[dev," in test and "pytest" in test
