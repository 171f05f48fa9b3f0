"""The package's shape (docs/ARCHITECTURE.md), checked: imports run one way, no cycles (imports
inside functions included), no module reaches into another's private names, modules stay small,
and nothing cites a file outside the repository."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "attnopt"
LINT = Path(sys.executable).with_name("lint-imports")

# Modules allowed past ~600 lines, each with its reason.
LONG_MODULES: dict[str, str] = {}
MAX_LINES = 620


def _modules() -> list[tuple[str, Path]]:
    out = []
    for p in sorted(PKG.rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out.append((name, p))
    return out


def _lint(cwd: Path, env_path: Path) -> subprocess.CompletedProcess:
    if not LINT.exists():
        pytest.skip("lint-imports is not installed in this environment")
    import os
    env = {**os.environ, "PYTHONPATH": str(env_path)}
    return subprocess.run([str(LINT), str(cwd / "pyproject.toml"), "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    r = _lint(ROOT, ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_a_planted_upward_import_breaks_the_contract(tmp_path):
    """The contract has teeth: the IR importing the pipeline (a layer far above it) fails."""
    shutil.copytree(PKG, tmp_path / "attnopt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    vocab = tmp_path / "attnopt" / "ir" / "vocab.py"
    vocab.write_text(vocab.read_text() + "\n\ndef _upward():\n    from attnopt.pipeline import result  # noqa\n")
    r = _lint(tmp_path, tmp_path)
    assert r.returncode != 0 and "attnopt.ir is not allowed to import attnopt.pipeline" in r.stdout, r.stdout[-2000:]


def test_no_import_cycles():
    grimp = pytest.importorskip("grimp")
    import networkx as nx

    g = grimp.build_graph("attnopt")
    G = nx.DiGraph()
    for m in g.modules:
        for t in g.find_modules_directly_imported_by(m):
            if t.startswith("attnopt"):
                G.add_edge(m, t)
    cycles = [" -> ".join(c) for c in nx.simple_cycles(G, length_bound=8)]
    assert not cycles, "\n".join(cycles[:20])


def test_no_module_imports_another_modules_private_names():
    bad = []
    for name, p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attnopt") \
                    and node.module != name:
                bad += [f"{p.relative_to(ROOT)}:{node.lineno}: from {node.module} import {a.name}"
                        for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "\n".join(bad)


def test_modules_stay_small():
    long = {name: n for name, p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES and name not in LONG_MODULES}
    assert not long, f"modules over {MAX_LINES} lines without a stated reason: {long}"


def test_nothing_cites_files_outside_the_repository():
    texts = [(p, p.read_text()) for _, p in _modules()] + [(ROOT / "README.md", (ROOT / "README.md").read_text())]
    outside = re.compile(r"\.\./shared|shared/(DESIGN|FACTS)|(?<!docs/)\b(DESIGN|FACTS)\.md")
    bad = [str(p.relative_to(ROOT)) for p, t in texts if outside.search(t)]
    assert not bad, bad
