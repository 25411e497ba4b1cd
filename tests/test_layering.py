"""The layering the images rely on, read from the source: services and common never import the tools (the tools
are not in any image), and the gateway's modules import each other without a cycle (no lazy import to dodge one)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [REPO / "common", *sorted((REPO / "services").iterdir())]


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports count: they run in the image too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _shipped_sources() -> list[Path]:
    return [p for root in SHIPPED for p in root.rglob("*.py") if "tests" not in p.relative_to(REPO).parts]


def test_shipped_code_never_imports_the_tools():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in _imports(p) if m.split(".")[0] == "cosyvoice_tools")
                 for p in _shipped_sources()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_gateway_modules_form_no_cycle():
    package = REPO / "services/gateway/cosyvoice_gateway"
    modules = {f"cosyvoice_gateway.{p.stem}": p for p in package.glob("*.py") if p.stem != "__init__"}
    edges = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    return trail + [nxt]
                if nxt not in trail:
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(modules)) if c]
    assert cycles == []
    assert len(modules) > 10 and any(edges.values())      # the graph was really read
