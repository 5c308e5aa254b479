"""Wait until a running Ray cluster has the nodes / GPUs / CPUs a run needs, then exit 0.

    python deploy/wait_for_cluster.py [--address auto] [--nodes N] [--gpus G] [--cpus C]
                                      [--timeout 900]

Why: `scalecert certify` sizes its worker pool from the resources the cluster has when the
driver starts (one worker per GPU present). On a cluster whose GPU workers are still starting
(a fresh KubeRay RayJob cluster, `ray up` with autoscaling), run this first so the pool is
sized to the GPUs you asked for. Exits 1 with a message when the timeout passes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="auto", help="Ray address (default: auto)")
    parser.add_argument("--nodes", type=int, default=0, help="alive nodes needed")
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs needed in the cluster")
    parser.add_argument("--cpus", type=float, default=0.0, help="CPUs needed in the cluster")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds (default 900)")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    try:
        deadline = time.monotonic() + args.timeout
        while True:
            nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
            resources = ray.cluster_resources()
            have = (nodes, resources.get("GPU", 0.0), resources.get("CPU", 0.0))
            if nodes >= args.nodes and have[1] >= args.gpus and have[2] >= args.cpus:
                print(f"cluster ready: {nodes} nodes, {have[1]:g} GPUs, {have[2]:g} CPUs")
                return 0
            if time.monotonic() > deadline:
                print(f"timed out after {args.timeout:g} s: {nodes} nodes, {have[1]:g} GPUs, "
                      f"{have[2]:g} CPUs; needed {args.nodes} nodes, {args.gpus:g} GPUs, "
                      f"{args.cpus:g} CPUs", file=sys.stderr)
                return 1
            time.sleep(1.0)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
