"""Helpers shared by several test modules."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from pipeline.certify.worker import CertifyWorker
from scalecert.certify import ALERT
from scalecert.precision import margins
from scalecert.sin import keep_count, keep_positions, prune, selection_order, sin_scores


def randomize_batchnorm(model: nn.Module, seed: int, spread: float = 0.2) -> nn.Module:
    """Random BN affine parameters and running statistics, in place (fresh BNs are near-identity,
    which would hide key mix-ups and leave many ReLUs dead or all alive)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(spread * torch.randn(c, generator=generator))
                module.running_mean.copy_(spread * torch.randn(c, generator=generator))
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
    return model


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers the tests start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def copy_class_subset(source: Path, target: Path, per_class: int) -> Path:
    """The first ``per_class`` files of every class folder of ``source``, copied to ``target``."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / folder.name).mkdir(parents=True)
        for path in sorted(folder.iterdir())[:per_class]:
            shutil.copy(path, target / folder.name / path.name)
    return target


def short_temp_dir(prefix: str) -> Path:
    """A new directory directly under /tmp, for a Ray temp dir: Ray's socket paths below it
    must fit in 107 bytes, which pytest's ``tmp_path`` leaves too little room for."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@contextlib.contextmanager
def local_ray(prefix: str) -> Iterator[None]:
    """An embedded local Ray (2 CPUs, no dashboard) in its own short temp dir, shut down and
    removed on exit: the driver joins it and leaves it up, so several runs share one start."""
    import ray

    temp_dir = short_temp_dir(prefix)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False, _temp_dir=str(temp_dir))
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def processes_naming(text: str) -> dict[int, str]:
    """Running processes (zombies excluded) whose command line contains ``text``: pid -> it."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in args and state != "Z":
            found[int(entry.name)] = args
    return found


def process_tree(roots: set[int]) -> set[int]:
    """``roots`` and every running process descended from them."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree, grew = set(roots), True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (not a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


_OTHER_RAY = """
import sys
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR",
         log_to_driver=False, _temp_dir=sys.argv[1])
double = ray.remote(lambda x: 2 * x)
print("ready", flush=True)
for line in sys.stdin:
    print(ray.get(double.remote(int(line))), flush=True)
ray.shutdown()
"""


class OtherRay:
    """Somebody else's Ray on this machine: an embedded ``ray.init(address="local")`` with its
    own temp dir, in a subprocess that answers ``ask(n)`` with ``2 * n`` computed by a Ray task.
    Started before a test's own cluster to show that ending that cluster leaves it alone."""

    def __init__(self) -> None:
        self.temp_dir = short_temp_dir("ro")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.setdefault("RAY_AUTH_MODE", "token")
        self.process = subprocess.Popen(
            [sys.executable, "-c", _OTHER_RAY, str(self.temp_dir)], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.process.stdout.readline() == "ready\n", "the other Ray did not start"

    def ask(self, n: int) -> int:
        self.process.stdin.write(f"{n}\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def close(self) -> None:
        """Its own ``ray.shutdown()``; then its temp dir goes."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in processes_naming(f"{self.temp_dir}/"):  # only if its shutdown failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# -- test doubles of the shard workers, passed through the driver's worker= -----------------------

class DiesOnFirstTry(CertifyWorker):
    """The certify worker, except that the first try of one shard kills the worker's process
    once its rows are computed and before they are written, as a worker lost mid-shard is.
    ``marker``: a file that records that try, so the restarted worker (a new process)
    certifies the shard for real. Made by :func:`dies_on_first_try`."""

    def __init__(self, settings, shard: int, marker: str) -> None:
        super().__init__(settings)
        self.dying_shard, self.marker = shard, marker

    def _write(self, shard, blocks) -> None:
        if shard == self.dying_shard and _first_try(self.marker):
            os._exit(17)  # the process dies: Ray sees a lost worker, not an exception
        super()._write(shard, blocks)


def _first_try(marker: str) -> bool:
    """True the first time any process asks about ``marker`` (a file it then creates)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def dies_on_first_try(shard: int, marker: Path):
    """``run_certification``'s ``worker=`` for :class:`DiesOnFirstTry`. Ray's workers cannot
    import this module (tests/ is not on their path), so it goes to them by value."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return lambda plan: (DiesOnFirstTry, (shard, str(marker)))


# -- patches for the soundness tests ------------------------------------------------------------

def patch_masks(image_side: int, patch_px: int) -> torch.Tensor:
    """``P x 1 x H x W`` bool: one square of ``patch_px`` at every position, row-major."""
    count = image_side - patch_px + 1
    masks = torch.zeros(count * count, 1, image_side, image_side, dtype=torch.bool)
    for index in range(count * count):
        top, left = divmod(index, count)
        masks[index, :, top:top + patch_px, left:left + patch_px] = True
    return masks


def random_patches(image: torch.Tensor, patch_px: int, seed: int) -> torch.Tensor:
    """``image`` with a uniform-noise patch at every position (``patch_masks``' order)."""
    masks = patch_masks(image.shape[-1], patch_px)
    noise = torch.rand(len(masks), *image.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(masks, noise, image.expand(len(masks), -1, -1, -1))


def crafted_patches(logits_of, image: torch.Tensor, label: int, patch_px: int,
                    steps: int = 6, seed: int = 7) -> torch.Tensor:
    """``image`` with, at every position, a patch found by signed-gradient ascent on the loss of
    ``logits_of`` (a differentiable model) for ``label``, from uniform noise."""
    masks = patch_masks(image.shape[-1], patch_px)
    base = image.expand(len(masks), -1, -1, -1)
    pixels = torch.rand(len(masks), *image.shape, generator=torch.Generator().manual_seed(seed))
    targets = torch.full((len(masks),), label)
    for _ in range(steps):
        pixels.requires_grad_(True)
        loss = nn.functional.cross_entropy(logits_of(torch.where(masks, pixels, base)), targets)
        (gradient,) = torch.autograd.grad(loss, pixels)
        pixels = (pixels.detach() + 0.25 * gradient.sign()).clamp(0, 1)
    return torch.where(masks, pixels, base).detach()


def pruned_logits(predictor, images: torch.Tensor) -> torch.Tensor:
    """M's logits written out from the definitions (stem, SIN top-k of the whole map, head),
    differentiable in ``images`` through the kept features."""
    features = predictor.stem(images)
    order = selection_order(sin_scores(features.detach()))
    keep = keep_positions(order, torch.zeros_like(order, dtype=torch.bool),
                          keep_count(predictor.top_k, features.shape[2:]))
    return predictor.head(prune(features, keep))


def at_risk_and_sample(logits: torch.Tensor, label: int, sample: int = 48,
                       near_tie: float = 0.01) -> torch.Tensor:
    """Indices of patched images a detection rule could get wrong (M(x') is not the label, or
    leads by less than ``near_tie``: detect outputs M(x') or ALERT), then the first ``sample``
    of the others, where the test checks the claim that they are safe."""
    risky = margins(logits, torch.full((len(logits),), label)) < near_tie
    return torch.cat([risky.nonzero()[:, 0], (~risky).nonzero()[:sample, 0]])


def assert_scalecert_detection_is_sound(certifier, image: torch.Tensor, label: int,
                                        patch_px: int, seed: int) -> None:
    """The detection theorem for one certified image and a ScaleCert certifier: patched at
    every position with random and with crafted patches, ``detect`` gives the label or ALERT
    (run where M(x') is at risk, and on a sample of the others); the crafted patches must fool
    M somewhere, or the check would prove nothing."""
    predictor = certifier.predictor
    fooled = 0
    for name, patched in (
            ("random", random_patches(image, patch_px, seed=seed)),
            ("crafted", crafted_patches(lambda x: pruned_logits(predictor, x), image, label,
                                        patch_px))):
        with torch.no_grad():
            logits = pruned_logits(predictor, patched)
        checked = at_risk_and_sample(logits, label)
        output = certifier.detect(patched[checked]).output
        wrong = (output != label) & (output != ALERT)
        assert not bool(wrong.any()), f"{name}: positions {checked[wrong][:5].tolist()}"
        fooled += int((logits.argmax(dim=1) != label).sum())
    assert fooled > 0, "no patch fooled M: the alerts were never needed"


def invoke_report(*args: str) -> tuple[int, str]:
    """``scalecert report ARGS`` in this process: (exit code, stdout and stderr, then the
    exception of a crash, if any)."""
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["report", *args])
    crash = result.exception if not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.output + (repr(crash) if crash else "")
