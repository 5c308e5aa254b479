"""`ray start --head` on 127.0.0.1 plus `ray job submit` of a certify run, through the
documented script deploy/local_cluster_job.sh; the script ends exactly its own cluster."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import OtherRay, copy_class_subset, free_port, processes_naming, short_temp_dir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "local_cluster_job.sh"


def test_certify_job_on_a_local_ray_cluster(tmp_path, cifar10_test_dir, resnet20_checkpoint) -> None:
    import ray

    assert not ray.is_initialized()
    data = copy_class_subset(cifar10_test_dir, tmp_path / "data", per_class=2)
    out = tmp_path / "run"
    temp_dir = short_temp_dir("rc")
    env = {**os.environ, "RAY_PORT": str(free_port()), "RAY_DASHBOARD_PORT": str(free_port()),
           "RAY_NUM_CPUS": "2", "RAY_TEMP_DIR": str(temp_dir),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    other = OtherRay()  # somebody else's Ray, up before this test's cluster starts
    try:
        completed = subprocess.run(
            [str(SCRIPT), "--data", str(data), "--model", "cifar_resnet20", "--checkpoint",
             str(resnet20_checkpoint), "--patch", "2.4%", "--out", str(out), "--shard-size", "8"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        log = completed.stdout + completed.stderr
        assert completed.returncode == 0, log
        assert "SUCCEEDED" in log and "20 images in 3 shards" in log
        # The script ended its cluster on exit: nothing that names its temp dir runs any more ...
        assert (temp_dir / "session_latest" / "logs").is_dir()  # the cluster did use it
        assert processes_naming(f"{temp_dir}/") == {}
        # ... and the other Ray instance is still alive and computing.
        assert other.process.poll() is None and processes_naming(f"{other.temp_dir}/")
        assert other.ask(21) == 42
    finally:
        subprocess.run([str(SCRIPT), "--end", str(temp_dir)], env=env, capture_output=True,
                       timeout=120)  # a no-op unless the run above was cut short
        shutil.rmtree(temp_dir, ignore_errors=True)
        other.close()
    rows = [row for part in sorted((out / "certificates").glob("*.parquet"))
            for row in pq.read_table(part).to_pylist()]
    assert len(rows) == 20 and {r["shard"] for r in rows} == {0, 1, 2}
