"""The layout's promises, checked statically (no imports run): no module over 400 lines, LanceDB imported only by
the store package, no import cycle between batchrank's modules (lazy imports inside functions count too), and the
job names listed once, in ``pipelines/registry.py``.

    .venv/bin/python -m pytest tests/test_architecture.py -q     # also prints any cycle it finds
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pipelines"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """batchrank modules that ``name`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import pipelines.x.y` where y is a name: the module is pipelines.x
                t = t.rpartition(".")[0]
            if t and t != name and t != "pipelines":
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


def test_lancedb_is_imported_only_by_the_store_package():
    offenders = []
    for path in PKG.rglob("*.py"):
        if "store" in path.relative_to(PKG).parts[:1]:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "lancedb" or n.startswith("lancedb.") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"LanceDB is reached only through pipelines/store/: {offenders}"


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (lazy imports included): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_job_names_live_in_the_registry_only():
    from pipelines.registry import JOBS

    pattern = re.compile(r"""["'](?:%s)["']\s*:""" % "|".join(re.escape(n) for n in JOBS))  # a {name: ...} table
    tables = [str(p.relative_to(ROOT)) for p in PKG.rglob("*.py")
              if p.name != "registry.py" and len(pattern.findall(p.read_text(encoding="utf-8"))) >= 3]
    assert not tables, f"job tables outside pipelines/registry.py: {tables}"
    for job in JOBS.values():
        assert (ROOT / "jobs" / f"{job.entry}.py").is_file()
        text = (ROOT / "jobs" / f"{job.entry}.py").read_text(encoding="utf-8")
        assert f'job_main("{job.name}")' in text and "typer" not in text and "pipelines.cli" not in text


def test_every_job_name_used_in_the_project_is_registered():
    """``run_job("…")`` / ``job_main("…")`` anywhere (the demo, benchmarks, jobs/) names a job of the registry: a
    renamed job fails here, not in the README's first command."""
    from pipelines.registry import JOBS

    call = re.compile(r"""\b(?:run_job|job_main)\(\s*["']([^"']+)["']""")
    used = {(str(p.relative_to(ROOT)), name) for folder in ("examples", "benchmarks", "jobs", "pipelines", "tests")
            for p in (ROOT / folder).rglob("*.py") if p != Path(__file__).resolve()
            for name in call.findall(p.read_text(encoding="utf-8"))}
    assert used, "the pattern finds the calls"
    unknown = sorted((path, name) for path, name in used if name not in JOBS)
    assert not unknown, f"not in pipelines/registry.py: {unknown}"
