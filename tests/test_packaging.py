"""The package as a newcomer installs it: every import declared, nothing in the base install
unused, the source tree laid out as the installed package, and a CLI that rejects bad input with
a clear message (exit code 2) before doing any work.  The install itself (a new venv, its own
pip, ``pip install .``, the demo from the clone's root) is proved by scripts/check_install.sh,
which CI runs before this suite."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest

import cylon_store as cs
from cylon_store.cli import main as cli_main
from cylon_store.config import redact_url

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"cylon_store": "cylon_store", "cylon_store.kernel": "kernel",
                "cylon_store.adapters": "adapters", "cylon_store.bench": "bench"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _imports(folder: Path) -> set[str]:
    """Top-level names of every absolute import in the .py files under ``folder``."""
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    local = {p.stem for p in folder.rglob("*.py")} | {p.name for p in folder.rglob("*") if p.is_dir()}
    return {n for n in names if n not in sys.stdlib_module_names and n not in local
            and n != "cylon_store"}


def _requirement_names(reqs: list[str]) -> set[str]:
    """Distribution names a requirement list declares, ``pkg[extra]`` extras of other packages
    included (``redis[hiredis]`` declares hiredis)."""
    names = set()
    for req in reqs:
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", req)
        name = m.group(1).lower().replace("_", "-")
        if name == "cylon-store":
            continue
        names.add(name)
        if m.group(2) and name != "dask":  # dask's extras name its own feature sets
            names.update(e.strip().lower() for e in m.group(2).split(","))
    return names


@functools.lru_cache(maxsize=None)
def _packages_distributions() -> dict:
    """importlib.metadata.packages_distributions(), read once (it scans every installed
    distribution: seconds per call with [all] installed)."""
    return importlib.metadata.packages_distributions()


def _distribution_of(module: str) -> str:
    """The installed distribution providing ``module``; for one not installed here (an extra the
    test command does not install, e.g. [bench]'s polars), the module's own name."""
    dists = _packages_distributions().get(module)
    return (dists[0] if dists else module).lower().replace("_", "-")


def test_every_import_is_declared():
    project = PYPROJECT["project"]
    declared = _requirement_names(project["dependencies"])
    for reqs in project["optional-dependencies"].values():
        declared |= _requirement_names(reqs)
    declared |= {"distributed"}  # dask[distributed]
    for folder in ("cylon_store", "kernel", "adapters", "bench", "tests"):
        for module in sorted(_imports(ROOT / folder)):
            if folder == "tests" and module in {"servers", "conftest", "moto_server", "datagen",
                                                "kernel_helpers", "test_comm", "conformance"}:
                continue
            dist = _distribution_of(module)
            assert dist in declared, f"{folder}/ imports {module!r} (from {dist}), which pyproject.toml does not declare"


def test_base_dependencies_are_all_used():
    used = set()
    for folder in ("cylon_store", "kernel", "adapters"):
        used |= {_distribution_of(m) for m in _imports(ROOT / folder)
                 if _packages_distributions().get(m)}
    base = _requirement_names(PYPROJECT["project"]["dependencies"])
    assert base <= used, f"base dependencies never imported by the package: {sorted(base - used)}"


def test_source_tree_is_the_installed_package():
    """pyproject maps kernel/, adapters/, bench/ into cylon_store; the source folder links them
    in, so ``import cylon_store.kernel`` works from the clone's root as from site-packages."""
    tool = PYPROJECT["tool"]["setuptools"]
    assert tool["package-dir"] == PACKAGE_DIRS
    assert set(tool["packages"]) == set(PACKAGE_DIRS) | {"cylon_store.transports", "cylon_store.serverless",
                                                    "cylon_store.testing"}
    for package, folder in PACKAGE_DIRS.items():
        if package == "cylon_store":
            continue
        link = ROOT / "cylon_store" / package.split(".")[1]
        assert link.is_symlink() and os.readlink(link) == f"../{folder}", link
        assert link.resolve() == (ROOT / folder).resolve()
    import cylon_store.adapters.memory as memory
    import cylon_store.bench
    import cylon_store.kernel
    for module in (cylon_store.kernel, memory, cylon_store.bench):
        assert Path(module.__file__).resolve().is_relative_to(ROOT) or "site-packages" in module.__file__


@pytest.mark.parametrize("argv, message", [
    (["demo", "--ranks", "0"], "argument --ranks: must be 1 to 256, got 0"),
    (["demo", "--ranks", "four"], "argument --ranks: not a whole number: 'four'"),
    (["demo", "--rows", "-5"], "argument --rows: must be 1 to 1,000,000,000, got -5"),
    (["demo", "--timeout", "0"], "argument --timeout: must be a positive"),
    (["demo", "--timeout", "nan"], "argument --timeout: must be a positive"),
    (["demo", "--store", "bogus://x"], "unknown store scheme 'bogus'"),
    (["demo", "--store", "/tmp/x"], "not a store URL: '/tmp/x'"),
    (["demo", "--launcher", "slurm"], "invalid choice: 'slurm'"),
    (["clean", "nourl"], "not a store URL"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_cli_demo_names_its_store(tmp_path, capsys):
    url = f"file://{tmp_path}"
    assert cli_main(["demo", "--store", url, "--ranks", "3", "--rows", "1001", "--launcher", "threads"]) == 0
    out = capsys.readouterr().out
    assert f"store {url}, 3 rank(s), launcher threads" in out and "embedded" not in out
    assert "every row reached its rank" in out
    assert cli_main(["demo", "--ranks", "1", "--rows", "1"]) == 0
    assert "the embedded default store memory://" in capsys.readouterr().out


def test_cli_errors_are_one_line_and_redact_secrets(capsys):
    assert cli_main(["demo", "--store", "memory://?bogus=1", "--rows", "10"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cylon-store: error:") and "bogus" in err and "Traceback" not in err
    cli_main(["demo", "--store", "file:///nonexistent-dir-x?segment_size=-1&token=hunter2", "--rows", "10"])
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err


def test_redact_url():
    assert redact_url("redis://default:s3cret@127.0.0.1:6399/0") == "redis://default:***@127.0.0.1:6399/0"
    assert redact_url("redis://s3cret@host/0") == "redis://***@host/0"
    assert redact_url("flight://h:1?token=abc&compression=zstd") == "flight://h:1?token=***&compression=zstd"
    assert redact_url("s3://b/p?aws_secret_access_key=x&region=eu") == "s3://b/p?aws_secret_access_key=***&region=eu"
    assert redact_url("memory://") == "memory://"


def test_cli_clean_dry_run(tmp_path, capsys):
    with cs.open_store(f"file://{tmp_path}") as store:
        assert cs.launch(lambda comm: comm.rank, 2, store=store.url, launcher="threads", job="j1") == [0, 1]
    assert cli_main(["clean", f"file://{tmp_path}", "--job", "j1", "--dry-run"]) == 0
    assert "would delete" in capsys.readouterr().out


def _module_graph() -> dict[str, set[str]]:
    """Every module of the package -> the package modules it imports (top level and inside
    functions alike: a lazy import still ties the two modules together)."""
    mods: dict[str, tuple[Path, bool]] = {}
    for folder, package in PACKAGE_DIRS.items():
        base = ROOT / package
        for path in base.rglob("*.py"):
            rel = path.relative_to(base)
            if package == "cylon_store" and rel.parts[0] in ("kernel", "adapters", "bench"):
                continue
            parts = [folder, *rel.parts[:-1]] + ([] if path.name == "__init__.py" else [path.stem])
            mods[".".join(parts)] = (path, path.name == "__init__.py")
    graph: dict[str, set[str]] = {}
    for name, (path, is_init) in mods.items():
        here = name if is_init else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base_parts = here.split(".")[:len(here.split(".")) - (node.level - 1)] if node.level else []
                module = ".".join(base_parts + ([node.module] if node.module else []))
                subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods]
                targets = subs or [module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in mods and t != name)
        graph[name] = deps
    return graph


def test_no_import_cycles():
    graph = _module_graph()
    assert "cylon_store.store_comm" in graph and "cylon_store.kernel.sort" in graph
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [node, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
