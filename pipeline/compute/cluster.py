"""Ray: connecting to it, and laying out workers over a cluster's resources.

Shared by the certification driver (actors) and fine-tuning (Ray Train workers), so both
place their workers by the same rules.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from scalecert.errors import InvalidOption


@dataclass(frozen=True)
class WorkerLayout:
    """How many workers, and what each one reserves in Ray and uses in torch."""

    workers: int
    cpus: float  # Ray CPUs per worker (below 1 when CPU workers outnumber the cores)
    gpus: float
    device: str
    threads: int  # torch intra-op threads per worker


def cpu_threads(workers: int, cpus: float) -> int:
    """Torch threads per worker so that workers x threads never exceeds the cores (one thread
    each once workers outnumber them)."""
    return max(1, int(cpus // workers))


def set_torch_threads(threads: int) -> int:
    """Give torch ``threads`` intra-op threads, at most as many as the CPUs this process may run
    on (its affinity: ``taskset``, a cpuset; Ray counts the machine's cores), and return how
    many: more busy OpenMP threads than cores wait on each other, several times slower."""
    import torch

    # sched_getaffinity is Linux only; elsewhere the machine's count is all there is to know
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    usable = max(1, min(threads, allowed or 1))
    torch.set_num_threads(usable)
    return usable


def worker_layout(
    device: str, resources: dict[str, float], workers: int | None, limit: int,
    gpus_per_worker: float | None = None,
) -> WorkerLayout:
    """The worker pool for the cluster's ``resources``: ``workers`` if given, else one per GPU
    (``gpus_per_worker`` each, default 1) or one CPU worker; at most ``limit`` (the shards, or
    no limit for training). CPU workers split the cores between them: each reserves its share
    (a fraction when there are more workers than cores, so that every worker is placed) and
    runs :func:`cpu_threads` torch threads. ``device``: auto, cpu or cuda."""
    gpus = resources.get("GPU", 0.0)
    cpus = max(1.0, resources.get("CPU", 1.0))
    use_gpu = device == "cuda" or (device == "auto" and gpus > 0)
    if use_gpu:
        if gpus <= 0:
            raise InvalidOption("--device cuda: the Ray cluster has no GPUs")
        per_worker = gpus_per_worker or 1.0
        count = max(1, min(workers or max(1, int(gpus // per_worker)), limit))
        share = max(1.0, min(4.0, cpus // count))
        return WorkerLayout(count, share, per_worker, "cuda", int(share))
    count = max(1, min(workers or 1, limit))
    share = cpus / count if count > cpus else float(cpus // count)
    return WorkerLayout(count, share, 0.0, "cpu", cpu_threads(count, cpus))


def cluster_resources(device: str, address: str | None, timeout_s: float = 600.0) -> dict[str, float]:
    """The connected cluster's resources. With ``device == "cuda"`` on an existing cluster,
    wait (up to ``timeout_s``) for GPU nodes to join: an autoscaling cluster may start with
    none."""
    import ray

    resources = ray.cluster_resources()
    if device != "cuda" or address is None or resources.get("GPU", 0) > 0:
        return resources
    print("waiting for GPU workers to join the cluster ...", file=sys.stderr)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and resources.get("GPU", 0) <= 0:
        time.sleep(5.0)
        resources = ray.cluster_resources()
    return resources


def _quiet_embedded_token_auth() -> None:
    """Token auth for an embedded local instance, as Ray 2.60 picks by default, without its
    advice to opt out.

    With ``RAY_AUTH_MODE`` unset, ``ray.init()`` of a new local instance turns token auth on and
    logs "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to
    opt out." (``enable_token_auth_by_default`` in
    ``ray/_private/authentication/authentication_token_setup.py``); an explicit mode is taken
    without a word. So name the mode Ray would choose: the instance's GCS listens on every
    interface, and disabling auth would open it to the network. Ray reads the mode into its
    C++ config when it is imported, so refresh that as Ray itself does after setting the
    variable. A user's own ``RAY_AUTH_MODE`` wins, and nothing changes for cluster runs."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    from ray._raylet import Config

    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")


def ray_node_id() -> str | None:
    """The Ray node this process runs on (hex id), or None outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def init_ray(address: str | None) -> bool:
    """Connect to Ray: embedded local by default. True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        _quiet_embedded_token_auth()
        ray.init(address="local", include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
    else:
        ray.init(address=address, logging_level="WARNING")
    return True
