"""Fixtures for the real data and weights in ``../shared`` (skipped when it is absent)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``<repo>/../shared``: test data and reference weights, never part of the repository."""
    path = REPO_ROOT.parent / "shared"
    if not path.is_dir():
        pytest.skip("../shared not found: real data and weights live there (see README)")
    return path


@pytest.fixture(scope="session")
def cifar10_test_dir(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 10,000 CIFAR-10 test JPEGs, extracted once per session: ``test/<class>/NNNN.jpg``."""
    archive = shared_dir / "data" / "cifar10" / "test.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not found (see ../shared/data/README.md)")
    target = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(target, filter="data")
    test_dir = target / "test"
    assert test_dir.is_dir(), f"{archive} has no test/ folder"
    return test_dir


def _checkpoint(shared_dir: Path, name: str) -> Path:
    path = shared_dir / "models" / name
    if not path.is_file():
        pytest.skip(f"{path} not found (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def resnet20_checkpoint(shared_dir: Path) -> Path:
    """The akamaster CIFAR-10 ResNet-20 checkpoint (91.78% on the original test set)."""
    return _checkpoint(shared_dir, "cifar10-resnet20-akamaster.th")


@pytest.fixture(scope="session")
def resnet56_checkpoint(shared_dir: Path) -> Path:
    """The akamaster CIFAR-10 ResNet-56 checkpoint (93.62% on the original test set)."""
    return _checkpoint(shared_dir, "cifar10-resnet56-akamaster.th")


# --- S3: a local moto server (loopback only) for storage and source tests --------------------

S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Server:
    """A running ``moto.server``: its endpoint URL and the env a client needs to reach it."""

    endpoint: str
    env: dict[str, str]
    log: Path  # the server's request log, one line per HTTP request


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """``python -m moto.server`` on 127.0.0.1 for the session; changes no global state."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    env = {**os.environ, **S3_TEST_ENV}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
        deadline = time.monotonic() + 30.0
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"moto server exited with code {process.returncode} before it was ready; "
                    f"log:\n{log_path.read_text(errors='replace')}"
                )
            try:
                with opener.open(f"{endpoint}/moto-api/", timeout=2.0):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"moto server on {endpoint} not ready after 30 s; "
                        f"log:\n{log_path.read_text(errors='replace')}"
                    )
                time.sleep(0.1)
        yield S3Server(endpoint=endpoint, env=dict(S3_TEST_ENV), log=log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point AWS clients at the moto server (env via monkeypatch) and create a fresh bucket;
    returns its name."""
    boto3 = pytest.importorskip("boto3")
    for name, value in {**s3_server.env, "AWS_ENDPOINT_URL": s3_server.endpoint}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name in ("NO_PROXY", "no_proxy"):  # a developer's HTTP proxy must not see loopback
        monkeypatch.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1"])))
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    return bucket
