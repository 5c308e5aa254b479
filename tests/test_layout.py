"""The package structure: imports run one way, and the report needs no torch.

Layers, bottom up (docs/DESIGN-NOTES.md, "Layout and import direction"): ``pipeline.io``
(storage, listing, decoding, the certificate schema) and ``pipeline.report`` import neither
torch, Ray nor the certification library, so reports run anywhere pyarrow does;
``pipeline.compute`` (torch batches, models from storage, Ray layout) sits on io;
``pipeline.run`` (a run's options and the shared plan, pool and shard worker of the sharded
jobs) and ``pipeline.train`` on compute; the jobs ``pipeline.certify`` and ``pipeline.attack``
on run, ``pipeline.analyze`` on attack (it takes the attack's options); ``pipeline.demo`` on
those; the CLI on top. The library ``scalecert`` never imports ``pipeline``, and the shared
run never imports a job.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_report import ok_row, write_run

REPO = Path(__file__).resolve().parents[1]

# package -> the first-party packages it may import (besides itself)
ALLOWED = {
    "scalecert": {"scalecert"},
    "pipeline": set(),  # the package's __init__ (a docstring)
    "pipeline.io": {"scalecert.errors"},
    # the library's certification settings (torch-free): every job's defaults and CertConfig
    "pipeline.options": {"scalecert.errors", "scalecert.config"},
    # the method registry (names, guarantees) is torch-free: the report reads guarantees there
    "pipeline.report": {"pipeline.io", "scalecert.errors", "scalecert.methods.registry"},
    "pipeline.compute": {"pipeline.io", "scalecert"},
    "pipeline.run": {"pipeline.io", "pipeline.options", "pipeline.compute", "scalecert"},
    "pipeline.certify": {"pipeline.io", "pipeline.compute", "pipeline.run", "scalecert"},
    "pipeline.attack": {"pipeline.io", "pipeline.options", "pipeline.compute", "pipeline.run",
                        "scalecert"},
    "pipeline.analyze": {"pipeline.io", "pipeline.options", "pipeline.compute", "pipeline.run",
                         "pipeline.attack", "scalecert"},
    "pipeline.train": {"pipeline.io", "pipeline.options", "pipeline.compute", "scalecert"},
    "pipeline.demo": {"pipeline.io", "pipeline.compute", "pipeline.run", "pipeline.train",
                      "scalecert"},
    "pipeline.cli": {"pipeline", "scalecert"},
    "pipeline.progress": set(),
}
NO_TORCH = ("pipeline.io", "pipeline.options", "pipeline.report")
HEAVY = ("torch", "ray", "scalecert.certify", "scalecert.models", "scalecert.training")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def owner(module: str) -> str:
    """The layer a module belongs to (the longest key of ALLOWED that prefixes it)."""
    keys = [key for key in ALLOWED if module == key or module.startswith(key + ".")]
    assert keys, f"{module} belongs to no layer: add it to ALLOWED and to DESIGN-NOTES"
    return max(keys, key=len)


def first_party(name: str) -> bool:
    return name.split(".")[0] in ("scalecert", "pipeline")


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


SOURCES = sorted(p for folder in ("scalecert", "pipeline") for p in (REPO / folder).rglob("*.py"))


def test_every_module_belongs_to_a_layer() -> None:
    assert SOURCES
    for path in SOURCES:
        owner(module_name(path))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_run_one_way(path: Path) -> None:
    module = module_name(path)
    layer = owner(module)
    for name in imported(path):
        if not first_party(name) or under(name, layer):
            continue
        if name in ("pipeline", "scalecert") and layer != "scalecert":
            continue  # the package roots themselves (`from pipeline.io import storage` parses so)
        allowed = ALLOWED[layer]
        assert any(under(name, a) for a in allowed), (
            f"{module} imports {name}: layer {layer} may import only {sorted(allowed)}")
    if layer in NO_TORCH:
        heavy = [name for name in imported(path) if any(under(name, h) for h in HEAVY)]
        assert not heavy, f"{module} imports {heavy}: {layer} must not need torch or Ray"


def test_a_planted_upward_import_is_caught(tmp_path: Path) -> None:
    """The check above can fail: an io module importing the run layer is reported."""
    planted = tmp_path / "planted.py"
    planted.write_text("from pipeline.run.driver import make_plan\nimport torch\n")
    names = imported(planted)
    assert "pipeline.run.driver" in names and "torch" in names
    assert not any(under("pipeline.run.driver", a) for a in ALLOWED["pipeline.io"])


BLOCK_TORCH = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'ray'):
            raise ImportError(f'{name} is blocked for this test')
sys.meta_path.insert(0, Blocked())
from pipeline.cli import main
try:
    main(sys.argv[1:])
finally:
    assert 'torch' not in sys.modules
"""


def test_report_runs_with_torch_unimportable(tmp_path: Path) -> None:
    rows = [ok_row(f"cat/{i:04d}.jpg", 3, 3, certified=i % 2 == 0) for i in range(6)]
    run = write_run(tmp_path / "run", [rows])
    blocked = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "report", str(run),
                              "--thumbnails", "0"], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
    assert blocked.returncode == 0, blocked.stdout + blocked.stderr
    report = json.loads((run / "report.json").read_text())
    assert report["groups"][0]["certified_accuracy"]["successes"] == 3
    # and the blocker really blocks: the certify command cannot run without torch
    certify = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "models"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert certify.returncode != 0 and "blocked for this test" in certify.stderr
