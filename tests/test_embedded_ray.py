"""An embedded local run (no --address) starts Ray quietly: no advice to change Ray settings
that do not concern a local run, such as Ray 2.60's token-authentication opt-out warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import copy_class_subset

from pipeline.compute.cluster import _quiet_embedded_token_auth

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_embedded_certify_run_prints_no_token_auth_warning(
    tmp_path, cifar10_test_dir, resnet20_checkpoint
) -> None:
    data = copy_class_subset(cifar10_test_dir, tmp_path / "data", per_class=1)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "certify", "--quiet", "--data", str(data),
         "--model", "cifar_resnet20", "--checkpoint", str(resnet20_checkpoint),
         "--patch", "5", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    log = completed.stdout + completed.stderr
    assert completed.returncode == 0, log
    assert "10 images in 1 shards" in completed.stdout, log
    assert "Token authentication" not in completed.stderr, completed.stderr
    assert "RAY_AUTH_MODE" not in completed.stderr, completed.stderr
    rows = pq.read_table(out / "certificates" / "part-00000.parquet").to_pylist()
    assert len(rows) == 10 and all(r["status"] == "ok" for r in rows), rows


def test_a_users_own_auth_mode_is_kept(monkeypatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    _quiet_embedded_token_auth()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
