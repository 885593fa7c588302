"""The package layout: no import cycle inside ``src/clipib`` (DESIGN.md §6)."""

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parent.parent / "src" / "clipib"


def _modules() -> Dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("clipib",) + path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """Modules of the package that ``name`` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules and n != name}
    # importing ``a.b.c`` first runs the ``__init__`` of packages ``a.b`` the importer is not inside
    for target in list(found):
        parts = target.split(".")
        for i in range(2, len(parts)):
            parent = ".".join(parts[:i])
            if parent in modules and parent != name and not name.startswith(parent + "."):
                found.add(parent)
    return found


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    found, seen, stack, on = [], set(), [], set()

    def visit(u: str) -> None:
        seen.add(u)
        stack.append(u)
        on.add(u)
        for v in sorted(edges[u]):
            if v not in seen:
                visit(v)
            elif v in on:
                found.append(stack[stack.index(v):] + [v])
        stack.pop()
        on.discard(u)

    for m in sorted(edges):
        if m not in seen:
            visit(m)
    return found


def test_cross_package_imports_count_the_package_init(tmp_path):
    modules = {"clipib.p": Path("p/__init__.py"), "clipib.p.a": Path("p/a.py"), "clipib.q.b": Path("q/b.py")}
    probe = tmp_path / "probe.py"
    probe.write_text("from clipib.p.a import x\n")
    assert "clipib.p" in _imports("clipib.q.b", probe, modules)
    assert "clipib.p" not in _imports("clipib.p.c", probe, modules)  # inside p: no edge


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    modules = _modules()
    edges = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycles = [" -> ".join(c) for c in _cycles(edges)]
    assert not cycles, "import cycles: " + "; ".join(cycles)

