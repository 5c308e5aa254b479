"""The driver's worker pool: Ray reservations and torch threads per worker (no Ray needed)."""

from __future__ import annotations

import pytest

from pipeline.config import RunConfig
from pipeline.driver import worker_layout


def run_config(**options) -> RunConfig:
    return RunConfig(data="data", model="cifar_resnet20", out="out", patches=("5",), **options)


@pytest.mark.parametrize("cores", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("workers", [1, 2, 3, 4, 8])
def test_cpu_workers_split_the_cores_without_oversubscription(cores, workers) -> None:
    layout = worker_layout(run_config(workers=workers, device="cpu"), {"CPU": float(cores)},
                           shards=100)
    assert layout.workers == workers and layout.device == "cpu" and layout.gpus == 0
    assert layout.workers * layout.cpus <= cores  # every worker can be placed
    assert layout.threads >= 1 and layout.threads <= max(1, layout.cpus)
    if workers <= cores:
        assert workers * layout.threads <= cores  # no oversubscription
        assert workers * layout.threads > cores - workers  # and no idle core a worker could use
    else:
        assert layout.threads == 1


def test_one_cpu_worker_uses_every_core_and_four_share_two() -> None:
    one = worker_layout(run_config(device="cpu"), {"CPU": 2.0}, shards=10)
    assert (one.workers, one.cpus, one.threads) == (1, 2.0, 2)
    four = worker_layout(run_config(workers=4, device="cpu"), {"CPU": 2.0}, shards=10)
    assert (four.workers, four.cpus, four.threads) == (4, 0.5, 1)


def test_workers_never_outnumber_the_shards() -> None:
    layout = worker_layout(run_config(workers=4, device="cpu"), {"CPU": 8.0}, shards=2)
    assert (layout.workers, layout.threads) == (2, 4)


def test_gpu_workers_one_per_gpu() -> None:
    layout = worker_layout(run_config(), {"CPU": 32.0, "GPU": 8.0}, shards=100)
    assert (layout.workers, layout.gpus, layout.device, layout.threads) == (8, 1.0, "cuda", 4)
    with pytest.raises(ValueError, match="no GPUs"):
        worker_layout(run_config(device="cuda"), {"CPU": 4.0}, shards=1)
