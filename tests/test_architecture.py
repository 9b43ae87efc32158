"""The package's shape, checked from its source: no import cycle, core/ free of Ray and of the
runtime, method names tested only where methods are defined, small files, and no pointer to
anything outside the repository."""

import ast
import subprocess
from pathlib import Path

import pytest

from lte_ray.core.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lte_ray"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
OUTSIDE = ("../" + "shared", "shared/" + "DESIGN")  # the workplace's design notes, beside the repository


def imports_of(name: str, tree: ast.AST, known: set[str]) -> set[str]:
    """Every module `name` imports, anywhere in it: at the top, inside functions and under
    TYPE_CHECKING alike. `from a import b` counts as importing `a.b` when that is a module."""
    package = name if MODULES.get(name, Path()).name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from ..core import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return found


def import_graph() -> dict[str, set[str]]:
    known = set(MODULES)
    graph = {}
    for name, path in MODULES.items():
        deps = imports_of(name, ast.parse(path.read_text()), known)
        graph[name] = {d for d in deps if d in known and d != name}
    return graph


def external_imports(name: str) -> set[str]:
    return imports_of(name, ast.parse(MODULES[name].read_text()), set(MODULES))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    lazy = "def f():\n    from lte_ray import data\nif TYPE_CHECKING:\n    from lte_ray.config import Config\n"
    assert {"lte_ray.data", "lte_ray.config"} <= imports_of("lte_ray.models", ast.parse(lazy), set(MODULES))


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) >= 30 and graph["lte_ray.cli"]  # the graph really holds the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# docs/design.md's table, top to bottom: a module imports only from its own row or rows above.
LAYERS = [
    ["lte_ray", "lte_ray.errors", "lte_ray.redact", "lte_ray.checkpoint", "lte_ray.core"],
    ["lte_ray.config", "lte_ray.config_ray", "lte_ray.config_text"],
    ["lte_ray.core.protocol"],
    ["lte_ray.datasets", "lte_ray.tokens", "lte_ray.corpora", "lte_ray.data", "lte_ray.augment", "lte_ray.batches",
     "lte_ray.models"],
    ["lte_ray.core.lora", "lte_ray.core.merge", "lte_ray.core.quant", "lte_ray.core.optim", "lte_ray.core.task",
     "lte_ray.core.precision", "lte_ray.core.upload", "lte_ray.core.robust", "lte_ray.core.fira"],
    ["lte_ray.core.head", "lte_ray.core.master"],
    ["lte_ray.core.history", "lte_ray.core.reference", "lte_ray.core.baselines"],
    ["lte_ray.core.methods"],
    ["lte_ray.core.simulate"],
    ["lte_ray.resolve"],
    ["lte_ray.runtime*"],
    ["lte_ray.run", "lte_ray.outputs", "lte_ray.tracking", "lte_ray.tracking_writer", "lte_ray.tracking_backlog",
     "lte_ray.progress"],
    ["lte_ray.cli", "lte_ray.tune", "lte_ray.bench*"],
]


def layer_of(module: str) -> int:
    for i, row in enumerate(LAYERS):
        if any(module == m or (m.endswith("*") and module.startswith(m[:-1])) for m in row):
            return i
    raise AssertionError(f"{module} is in no layer of docs/design.md's table")


def test_modules_import_only_from_their_layer_or_above():
    upward = sorted(f"{m} -> {d}" for m, deps in import_graph().items() for d in deps if layer_of(d) > layer_of(m))
    assert not upward, upward


def test_core_imports_neither_ray_nor_the_runtime():
    graph = import_graph()
    reachable, todo = set(), [m for m in graph if m.startswith("lte_ray.core")]
    while todo:  # everything core/ imports, directly or through other modules
        m = todo.pop()
        if m not in reachable:
            reachable.add(m)
            todo.extend(graph[m])
    assert not sorted(m for m in reachable if m.startswith("lte_ray.runtime"))
    with_ray = sorted(m for m in reachable if any(i == "ray" or i.startswith("ray.") for i in external_imports(m)))
    assert not with_ray, f"these modules, imported by core/, import ray: {with_ray}"


def method_name_tests(source: str) -> list[str]:
    """Comparisons of a value with a method's name: `x == "full"`, `x in ("lora", "lora-merge")`."""
    names = set(METHODS)
    hits = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            consts = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                hits.append(f"line {node.lineno}: {ast.unparse(node)}")
    return hits


def test_the_method_name_finder_finds_them():
    source = 'if cfg.method in ("full", "galore"): pass\nok = setting.key == "lte"\nfine = x == "lte-ray"\n'
    assert method_name_tests(source) == ["line 1: cfg.method in ('full', 'galore')", "line 2: setting.key == 'lte'"]


def test_no_method_name_is_tested_outside_the_methods_module():
    hits = {str(p.relative_to(ROOT)): h for p in MODULES.values()
            if p != PACKAGE / "core" / "methods.py" and (h := method_name_tests(p.read_text()))}
    assert not hits, hits


def test_no_file_under_lte_ray_is_over_300_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in MODULES.values()}
    assert len(sizes) >= 30
    assert not {f: n for f, n in sizes.items() if n > 300}


def test_only_the_config_module_validates_a_config():
    """Actors and trials get the resolved Config object; no other module turns a dict into a Config."""
    users = sorted(str(p.relative_to(ROOT)) for p in MODULES.values() if "model_validate(" in p.read_text())
    assert users == ["lte_ray/config.py"]


def test_design_doc_is_in_the_repository_and_nothing_points_outside_it():
    design = ROOT / "docs" / "design.md"
    assert design.exists() and len(design.read_text().splitlines()) > 50
    assert "(docs/design.md)" in (ROOT / "README.md").read_text()
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = []
    for name in files:
        path = ROOT / name
        if path.suffix in (".png", ".json") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if any(pointer in text for pointer in OUTSIDE):
            outside.append(name)
    assert len(files) > 40 and not outside, outside


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_says_what_it_is(name):
    m = METHODS[name]
    assert m.name == name and m.summary and m.trains
