"""`ray start --head` on 127.0.0.1 plus `ray job submit` of a certify run, through the
documented script deploy/local_cluster_job.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import copy_class_subset, free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_certify_job_on_a_local_ray_cluster(tmp_path, cifar10_test_dir, resnet20_checkpoint) -> None:
    import ray

    assert not ray.is_initialized()
    data = copy_class_subset(cifar10_test_dir, tmp_path / "data", per_class=2)
    out = tmp_path / "run"
    env = {**os.environ, "RAY_PORT": str(free_port()), "RAY_DASHBOARD_PORT": str(free_port()),
           "RAY_NUM_CPUS": "2", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    completed = subprocess.run(
        [str(REPO / "deploy" / "local_cluster_job.sh"), "--data", str(data), "--model",
         "cifar_resnet20", "--checkpoint", str(resnet20_checkpoint), "--patch", "2.4%",
         "--out", str(out), "--shard-size", "8"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    log = completed.stdout + completed.stderr
    assert completed.returncode == 0, log
    assert "SUCCEEDED" in log and "20 images in 3 shards" in log
    rows = [row for part in sorted((out / "certificates").glob("*.parquet"))
            for row in pq.read_table(part).to_pylist()]
    assert len(rows) == 20 and {r["shard"] for r in rows} == {0, 1, 2}
