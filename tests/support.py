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
from pathlib import Path

import torch
from torch import nn


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
