"""The package's shape (docs/architecture.md): every module on the map, no import cycle, small parts."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
while not (ROOT / "gateway").is_dir():  # tests/ or tests/unit/
    ROOT = ROOT.parent
PACKAGE = ROOT / "gateway"
MAX_MODULE_LINES = 320  # "~300": a module that grows past it has two jobs
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gateway"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name.startswith("gateway"))
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in stack:
                found.append([*stack[stack.index(target) :], target])
            elif target not in done:
                visit(target, [*stack, target])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return found


def test_the_architecture_page_names_every_top_level_module() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    top = [p for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")]
    missing = [p.name for p in top if f"`{p.name}`" not in page]
    packages = [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    missing += [f"{name}/" for name in packages if f"`{name}/`" not in page]
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_no_import_cycle() -> None:
    graph = {name: _imports(path) for name, path in _modules().items()}
    assert _cycles(graph) == []


def test_the_cycle_check_can_fail() -> None:
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]


def test_no_module_or_function_outgrows_one_job() -> None:
    too_long = []
    for name, path in _modules().items():
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long
