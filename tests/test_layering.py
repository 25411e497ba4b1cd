"""The layering the images and the launcher rely on, read from the source.

Floors, each importing only from floors below it: `common` (what stages share) <- the services (each stage's
package, the gateway) <- the launcher (`make up`, placement, compose rendering) and `deploy/` <- the developer
tools. Nothing the product runs (common, services, launcher, deploy) imports the tools, which are in no image and
no deployment; and no two modules anywhere import each other, directly or round a longer circle (function-level
imports count: they run too, and a lazy import must not hide a circle)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVICES = sorted(p for p in (REPO / "services").iterdir() if p.is_dir())
# Package roots (what `make venv` puts on the path) -> their floor.
ROOTS = {REPO / "common": "common", **{s: "services" for s in SERVICES}, REPO / "launcher": "launcher",
         REPO / "tools": "tools"}
FLOORS = ("common", "services", "launcher", "tools")


def _imports(path: Path) -> set[str]:
    """Every absolute module name a file imports, at any depth; `from a import b` gives `a` and `a.b`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _package_modules() -> dict[str, tuple[Path, str]]:
    """module name -> (file, floor) for every module of every package under the roots (tests excluded)."""
    modules = {}
    for root, floor in ROOTS.items():
        for init in root.glob("*/__init__.py"):
            for path in init.parent.rglob("*.py"):
                if "tests" in path.relative_to(root).parts:
                    continue
                parts = path.relative_to(root).with_suffix("").parts
                name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
                modules[name] = (path, floor)
    return modules


MODULES = _package_modules()
FLOOR_OF_PACKAGE = {name.split(".")[0]: floor for name, (_, floor) in MODULES.items()}


def _resolve(name: str) -> str | None:
    """The module of ours `name` loads: itself, or the longest prefix that is one (`pkg.mod.Class` -> pkg.mod)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _relative_imports(path: Path, module: str) -> set[str]:
    """`from .x import y` inside package modules, made absolute."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = module.split(".")
            base = base[: len(base) - node.level + (1 if is_package else 0)]
            target = ".".join([*base, *([node.module] if node.module else [])])
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _edges() -> dict[str, set[str]]:
    edges = {}
    for name, (path, _) in MODULES.items():
        targets = {_resolve(m) for m in _imports(path) | _relative_imports(path, name)}
        edges[name] = {t for t in targets if t and t != name}
    return edges


def _shipped_sources() -> list[Path]:
    """Everything the product runs: common, the services (with their Triton model.py files), the launcher,
    deploy's entrypoints and renderer."""
    roots = [REPO / "common", *SERVICES, REPO / "launcher", REPO / "deploy"]
    return [p for root in roots for p in root.rglob("*.py") if "tests" not in p.relative_to(REPO).parts]


def test_nothing_the_product_runs_imports_the_tools():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in _imports(p) if m.split(".")[0] == "cosyvoice_tools")
                 for p in _shipped_sources()}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert any("launcher" in str(p) for p in _shipped_sources())     # the launcher is among what was read


def test_each_floor_imports_only_from_floors_below():
    upward = {}
    for name, (path, floor) in MODULES.items():
        above = sorted(m for m in _imports(path) if FLOORS.index(FLOOR_OF_PACKAGE.get(m.split(".")[0], "common"))
                       > FLOORS.index(floor))
        if above:
            upward[name] = above
    assert upward == {}


def test_no_import_cycle_anywhere():
    edges = _edges()
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def strongconnect(node: str) -> None:    # Tarjan: a component of more than one module is a circle
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            strongconnect(node)
    assert cycles == []
    # the graph was really read: every floor has modules, and they import each other
    assert {floor for _, floor in MODULES.values()} == set(FLOORS) and sum(map(len, edges.values())) > 100
