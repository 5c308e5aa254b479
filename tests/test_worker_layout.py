"""The worker pool of certify and finetune: Ray reservations and torch threads per worker (no
Ray needed)."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.compute.cluster import set_torch_threads, worker_layout


def layout_for(resources: dict[str, float], shards: int, device: str = "auto",
               workers: int | None = None):
    return worker_layout(device, resources, workers, limit=shards)


@pytest.mark.parametrize("cores", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8])
def test_cpu_workers_split_the_cores_without_oversubscription(cores, workers) -> None:
    layout = layout_for({"CPU": float(cores)}, shards=100, device="cpu", workers=workers)
    assert layout.workers == workers and layout.device == "cpu" and layout.gpus == 0
    assert layout.workers * layout.cpus <= cores  # every worker can be placed
    assert layout.threads >= 1 and layout.threads <= max(1, layout.cpus)
    if workers <= cores:
        assert workers * layout.threads <= cores  # no oversubscription
        assert workers * layout.threads > cores - workers  # and no idle core a worker could use
    else:
        assert layout.threads == 1


def test_one_cpu_worker_uses_every_core_and_four_share_two() -> None:
    one = layout_for({"CPU": 2.0}, shards=10, device="cpu")
    assert (one.workers, one.cpus, one.threads) == (1, 2.0, 2)
    four = layout_for({"CPU": 2.0}, shards=10, device="cpu", workers=4)
    assert (four.workers, four.cpus, four.threads) == (4, 0.5, 1)


def test_workers_never_outnumber_the_shards() -> None:
    layout = layout_for({"CPU": 8.0}, shards=2, device="cpu", workers=4)
    assert (layout.workers, layout.threads) == (2, 4)


def test_gpu_workers_one_per_gpu() -> None:
    layout = layout_for({"CPU": 32.0, "GPU": 8.0}, shards=100)
    assert (layout.workers, layout.gpus, layout.device, layout.threads) == (8, 1.0, "cuda", 4)
    with pytest.raises(ValueError, match="no GPUs"):
        layout_for({"CPU": 4.0}, shards=1, device="cuda")


def test_torch_threads_never_exceed_the_cpus_the_process_may_run_on() -> None:
    """Ray counts the machine's cores; a worker pinned to fewer (taskset, a cpuset) runs at most
    one torch thread per CPU it may use."""
    before_affinity, before_threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        os.sched_setaffinity(0, {min(before_affinity)})
        assert set_torch_threads(8) == 1 and torch.get_num_threads() == 1
        os.sched_setaffinity(0, before_affinity)
        assert set_torch_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_torch_threads(64) == len(before_affinity) == torch.get_num_threads()
        assert set_torch_threads(0) == 1  # at least one
    finally:
        os.sched_setaffinity(0, before_affinity)
        torch.set_num_threads(before_threads)


def test_torch_threads_without_an_affinity_call_stop_at_the_machines_cores(monkeypatch) -> None:
    """Where ``os.sched_getaffinity`` does not exist (macOS), the machine's count is the cap."""
    before = torch.get_num_threads()
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    try:
        assert set_torch_threads(64) == 3 == torch.get_num_threads()
        assert set_torch_threads(2) == 2
    finally:
        torch.set_num_threads(before)
