"""The code's shape, read from the source with `ast` (nothing is imported): short functions in the chain and the
views' modules, short chain files, and no import circle anywhere in our packages, benchmarks included."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("t2mv", "wonder3d_perflow", "triposr", "benchmarks")
MAX_FUNCTION_LINES = 100
MAX_CHAIN_FILE_LINES = 500
# Over the limit today in modules being rewritten by others (issue 16); the lead is told. Any other long function
# there fails, and so does one of these once it is split but still listed here: remove it then.
KNOWN_LONG = {"view_refine.py": {"refine_mesh"}, "view_texture.py": {"texture_from_views"}}


def short_function_files() -> list[Path]:
    """The chain package and the modules where the views meet the mesh."""
    files = sorted((REPO / "t2mv" / "chain").glob("*.py"))
    files += sorted((REPO / "t2mv").glob("view_*.py")) + [REPO / "t2mv" / "views_to_mesh.py"]
    return [f for f in files if f.is_file()]


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(qualified name, lines) of every function or method longer than `limit` lines (def line to last line)."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef) and child.end_lineno - child.lineno + 1 > limit:
                    found.append((name, child.end_lineno - child.lineno + 1))
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST) -> list[tuple[int, str | None, list[str]]]:
    """(level, module, names) of every import statement, module level or inside functions, except those under
    ``if TYPE_CHECKING:`` (never executed)."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.extend((0, alias.name, []) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.append((child.level, child.module, [alias.name for alias in child.names]))
            visit(child)

    visit(tree)
    return found


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """{module: modules of ours it imports}. ``from package import name`` points at the submodule when `name` is
    one, else at the package; a parent package imported implicitly by Python is not an edge (it is not a circle
    for a package to import its own submodules)."""
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for level, module, names in _imports(ast.parse(path.read_text())):
            if level:
                base = package.split(".")[: len(package.split(".")) - (level - 1)]
                target = ".".join(base + ([module] if module else []))
            else:
                target = module or ""
            for imported in names or [""]:
                candidate = f"{target}.{imported}" if imported else target
                while candidate and candidate not in files:  # import a.b.c: the deepest module of ours
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    graph[name].add(candidate)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def our_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


# ------------------------------------------------------------------------------------------------ the tools
def test_the_import_graph_finds_a_circle_through_a_lazy_import(tmp_path):
    """The checker itself: a function-level import closing a loop is a circle; TYPE_CHECKING imports are not."""
    (tmp_path / "pkg").mkdir()
    files = {
        "pkg": tmp_path / "pkg" / "__init__.py",
        "pkg.a": tmp_path / "pkg" / "a.py",
        "pkg.b": tmp_path / "pkg" / "b.py",
        "pkg.c": tmp_path / "pkg" / "c.py",
    }
    files["pkg"].write_text("from . import a\n")
    files["pkg.a"].write_text("from .b import thing\n")
    files["pkg.b"].write_text("def thing():\n    from . import a\n    return a\n")
    files["pkg.c"].write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    graph = import_graph(files)
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.c"] == set()
    assert circles(graph) == [["pkg.a", "pkg.b"]]
    files["pkg.b"].write_text("def thing():\n    return 1\n")
    assert circles(import_graph(files)) == []


def test_the_function_measure_counts_methods_and_nested_functions():
    body = "\n".join(f"    x{i} = {i}" for i in range(101))
    source = f"class A:\n    def long(self):\n{body.replace('    ', '        ')}\n\ndef short():\n    return 1\n"
    assert long_functions(source) == [("A.long", 102)]


# ------------------------------------------------------------------------------------------------ the code
def test_no_import_circle_in_our_packages_and_benchmarks():
    found = circles(import_graph(our_modules()))
    assert not found, "import circles: " + "; ".join(" ↔ ".join(c) for c in found)


@pytest.mark.parametrize("path", short_function_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_function_over_100_lines(path):
    found = {name for name, _ in long_functions(path.read_text())}
    known = KNOWN_LONG.get(path.name, set())
    assert found <= known, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {sorted(found - known)}"
    assert found == known, f"{path.name}: {sorted(known - found)} are short now: remove them from KNOWN_LONG"


def test_no_chain_file_over_500_lines():
    lengths = {p.name: len(p.read_text().splitlines()) for p in (REPO / "t2mv" / "chain").glob("*.py")}
    assert lengths and max(lengths.values()) <= MAX_CHAIN_FILE_LINES, lengths
    assert not (REPO / "t2mv" / "chain.py").exists()  # the package replaced the one long module
