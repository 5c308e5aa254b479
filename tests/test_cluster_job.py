"""A real two-node Ray cluster on 127.0.0.1 (a head plus a second `ray start --address` node, two
raylets), a certify job submitted with `ray job submit` that shards across both nodes, then
`scalecert report` on its output. Driven through deploy/local_cluster_job.sh (RAY_EXTRA_NODES=1),
the same tool users get, in its default mode: the script ends its cluster when the job is done,
exactly its own processes (workers included), and somebody else's Ray on the machine keeps
running. (`--end` on a kept cluster runs the same code; tests/test_deploy.py pins it on real
processes.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import (
    OtherRay,
    copy_class_subset,
    free_port,
    pid_alive,
    process_tree,
    processes_naming,
    short_temp_dir,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "local_cluster_job.sh"


class ClusterWatch:
    """Every process of the cluster under ``temp_dir`` seen while it runs: those naming one of
    its session dirs and everything they started (renamed workers, ``ray::ShardWorker``, no
    longer name it), sampled every 0.2 s from a thread."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir, self.seen, self.named = temp_dir, set(), {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            named = processes_naming(f"{self.temp_dir}/session_")
            self.named.update(named)
            self.seen |= process_tree(set(named))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def test_certify_job_shards_across_two_ray_nodes_and_ends_only_its_cluster(
    tmp_path, cifar10_test_dir, resnet20_checkpoint
) -> None:
    import ray


    assert not ray.is_initialized()
    data = copy_class_subset(cifar10_test_dir, tmp_path / "data", per_class=2)
    out = tmp_path / "run"
    temp_dir = short_temp_dir("rc")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_PORT": str(free_port()), "RAY_DASHBOARD_PORT": str(free_port()),
           "RAY_NUM_CPUS": "1", "RAY_EXTRA_NODES": "1", "RAY_EXTRA_NODE_CPUS": "1",
           "RAY_TEMP_DIR": str(temp_dir), "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_KEEP_CLUSTER", None)
    other = OtherRay()  # somebody else's Ray, up before this test's cluster starts
    watch = ClusterWatch(temp_dir)
    try:
        # 1 CPU per node and 2 workers of 1 CPU each: one worker actor on each node.
        completed = subprocess.run(
            [str(SCRIPT), "--data", str(data), "--model", "cifar_resnet20", "--checkpoint",
             str(resnet20_checkpoint), "--patch", "2.4%", "--out", str(out), "--shard-size", "5",
             "--workers", "2"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        watch.stop()
        log = completed.stdout + completed.stderr
        assert completed.returncode == 0, log
        assert "cluster ready: 2 nodes" in log, log  # both raylets alive before the submit
        assert "SUCCEEDED" in log and "20 images in 4 shards" in log, log
        # the script ended its cluster on exit: nothing of it runs any more, renamed workers
        # included; the other Ray instance is still alive and computing
        assert (temp_dir / "session_latest" / "logs").is_dir()  # the cluster did use it
        assert sum(args.split()[0].endswith("/raylet") for args in watch.named.values()) == 2
        assert watch.seen - set(watch.named), "no renamed process (ray::...) was seen"
        assert processes_naming(f"{temp_dir}/") == {}
        assert not [pid for pid in watch.seen if pid_alive(pid)]
        assert other.process.poll() is None and processes_naming(f"{other.temp_dir}/")
        assert other.ask(21) == 42
    finally:
        watch.stop()
        subprocess.run([str(SCRIPT), "--end", str(temp_dir)], env=env, capture_output=True,
                       timeout=120)  # a no-op unless the run above was cut short
        shutil.rmtree(temp_dir, ignore_errors=True)
        other.close()

    parts = sorted((out / "certificates").glob("*.parquet"))
    rows = [row for part in parts for row in pq.read_table(part).to_pylist()]
    assert len(rows) == 20 and {r["shard"] for r in rows} == {0, 1, 2, 3}
    assert len({r["image_id"] for r in rows}) == 20  # one row per image (one patch, one method)
    assert all(r["status"] == "ok" for r in rows), {r["status"] for r in rows}
    writers = [json.loads(pq.read_schema(part).metadata[b"scalecert"])["written_by"]
               for part in parts]
    assert len({w["ray_node_id"] for w in writers}) == 2, writers  # both nodes certified

    reduced = subprocess.run([str(bin_dir / "scalecert"), "report", str(out)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert reduced.returncode == 0, reduced.stdout + reduced.stderr
    groups = json.loads((out / "report.json").read_text())["groups"]
    assert [(g["method"], g["patch_px"], g["ok_images"]) for g in groups] == [("scalecert", 5, 20)]
