"""Failures of the environment: checked before the work where they can be, one line and exit 5
when they happen, nothing half-written kept, and a rerun that resumes to the rows of a clean
run. With real parts: a tmpfs that fills up, moto on 127.0.0.1 (a missing bucket, a bucket
policy that denies, a closed port), and a loopback proxy that answers 503 and drops
connections (tests/flaky_proxy.py)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import S3_TEST_ENV
from flaky_proxy import DROP, PASS, SLOW_DOWN, FlakyProxy
from support import copy_class_subset, free_port, local_ray

from pipeline.certify.driver import run_certification
from pipeline.cli import EXIT_ENVIRONMENT, main
from pipeline.io import faults, preflight, storage
from pipeline.io.certificates import read_table
from pipeline.run.config import RunConfig
from scalecert.errors import EnvironmentFault

pytestmark = pytest.mark.slow

# Tries per S3 request in these tests: fewer than the default keeps a run that must stop
# quick, and surviving the proxy's faults with fewer tries is the stricter check.
ATTEMPTS = "4"


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    """AWS settings for moto in this process's environment, then one local Ray for the module
    (its workers inherit them)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**S3_TEST_ENV, "AWS_MAX_ATTEMPTS": ATTEMPTS}.items():
            patch.setenv(name, value)
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        for name in ("NO_PROXY", "no_proxy"):
            patch.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1"])))
        with local_ray("faults"):
            yield


@pytest.fixture(scope="module")
def images(cifar10_test_dir, tmp_path_factory) -> Path:
    return copy_class_subset(cifar10_test_dir, tmp_path_factory.mktemp("faults") / "data", 4)


def certify(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["certify", "--quiet", *args])
    crash = result.exception if not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.output + (repr(crash) if crash else "")


def run_args(data: str, checkpoint: Path, out: str, *extra: str) -> list[str]:
    return ["--data", data, "--model", "cifar_resnet20", "--checkpoint", str(checkpoint),
            "--patch", "2.4%", "--method", "masking", "--shard-size", "8", "--workers", "1",
            "--out", out, *extra]


def rows_of(out: str, endpoint: str | None = None) -> list[dict]:
    s3 = storage.S3Options(endpoint=endpoint)
    folder = storage.join(out, "certificates")
    rows = [row for name in storage.list_files(folder, s3)
            for row in read_table(storage.join(folder, name), s3).to_pylist()]
    keep = ("image_id", "label", "prediction", "certified", "clean_output", "status")
    return sorted(({k: row[k] for k in keep} for row in rows), key=lambda r: r["image_id"])


@pytest.fixture(scope="module")
def clean_rows(s3_ray, images, resnet20_checkpoint, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("clean") / "run"
    code, output = certify(*run_args(str(images), resnet20_checkpoint, str(out)))
    assert code == 0, output
    return rows_of(str(out))


# -- what is an environment failure --------------------------------------------------------

@pytest.mark.parametrize("error, problem", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    (OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on "
             "device"), "no space left on device"),
    (OSError("When uploading object with key 'a' in bucket 'b': AWS Error NO_SUCH_BUCKET "
             "during PutObject operation: The specified bucket does not exist"),
     "no such bucket"),
    (OSError("When getting information for key 'x' in bucket 'b': AWS Error ACCESS_DENIED "
             "during HeadObject operation: No response body."), "access denied"),
    (OSError("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could "
             "not connect to server"), "S3 endpoint unreachable"),
    (OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request "
             "rate."), "S3 kept throttling (SlowDown) after every retry"),
])
def test_environment_failures_are_named(error, problem) -> None:
    assert faults.environment_cause(error) == problem
    wrapped = RuntimeError("a task failed")
    wrapped.__cause__ = error
    assert faults.environment_cause(wrapped) == problem


@pytest.mark.parametrize("error", [
    FileNotFoundError(errno.ENOENT, "No such file"), ValueError("bad value"),
    OSError("AWS Error NO_SUCH_KEY during GetObject"), OSError("Parquet magic bytes not found"),
])
def test_other_failures_are_not_the_environment(error) -> None:
    assert faults.environment_cause(error) is None
    with pytest.raises(type(error)):
        with faults.at("/somewhere"):
            raise error


def test_a_fault_survives_pickling_as_ray_sends_it() -> None:
    import pickle

    fault = EnvironmentFault("s3://b/run/x", "access denied")
    again = pickle.loads(pickle.dumps(fault))
    assert (again.location, again.problem, str(again)) == ("s3://b/run/x", "access denied",
                                                           "s3://b/run/x: access denied")


def test_a_fault_in_a_training_worker_ends_finetune_as_a_fault() -> None:
    """Ray Train hands the trainer its workers' errors inside one TrainingFailedError; a
    fault among them is the run's message (exit 5), not "training failed"."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    from pipeline.train.trainer import _fit_or_explain

    class FailingTrainer:
        def fit(self) -> None:
            raise WorkerGroupError("worker 1 failed", {
                1: EnvironmentFault("s3://b/run/ray-train/checkpoint_1/state.pt",
                                    "no such bucket")})

    with pytest.raises(EnvironmentFault) as caught:
        _fit_or_explain(FailingTrainer())
    assert str(caught.value) == (
        "s3://b/run/ray-train/checkpoint_1/state.pt: no such bucket; training stopped; rerun "
        "the same command to resume from its last checkpointed epoch")


# -- a full disk -----------------------------------------------------------------------------

def test_a_write_that_fills_the_disk_leaves_nothing(tmp_path, monkeypatch) -> None:
    """The storage level, on any machine: the file system refuses the bytes (as a full disk
    does, from the write or the fsync) and the file is neither there nor half there."""
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "certificates" / "part-00000.parquet"
    with pytest.raises(EnvironmentFault) as caught:
        storage.write_bytes_atomic(str(target), b"x" * 1000)
    assert str(caught.value) == f"{target}: no space left on device"
    assert list(target.parent.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 40 KB tmpfs (the manifest and two shards fit), where the machine allows mounting one (root, no seccomp in the way)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or made.returncode}); "
                    "test_a_write_that_fills_the_disk_leaves_nothing covers the storage level")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_run_and_a_rerun_resumes(
    s3_ray, small_disk, images, resnet20_checkpoint, clean_rows
) -> None:
    out = small_disk / "run"
    args = run_args(str(images), resnet20_checkpoint, str(out))
    code, output = certify(*args)
    assert code == EXIT_ENVIRONMENT, output
    kept = sorted(p.name for p in (out / "certificates").iterdir())
    last = output.strip().splitlines()[-1]
    assert last == (f"Error: {out}/certificates/part-{len(kept):05d}.parquet: no space left on "
                    f"device; the run stopped with {len(kept)} of 5 shards written and kept in "
                    f"{out}; rerun the same command to resume"), output
    assert 0 < len(kept) < 5 and kept == [f"part-{i:05d}.parquet" for i in range(len(kept))]
    for name in kept:  # whole files only: each one reads
        assert pq.read_table(out / "certificates" / name).num_rows == 8

    # the same command on the same full disk: stopped again, nothing lost or added
    code, output = certify(*args)
    assert code == EXIT_ENVIRONMENT and "no space left on device" in output, output
    assert sorted(p.name for p in (out / "certificates").iterdir()) == kept

    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    code, output = certify(*args)
    assert code == 0, output
    assert f"({len(kept)} already done)" in output
    assert rows_of(str(out)) == clean_rows


def test_little_free_space_is_warned_about_before_the_run(small_disk, tmp_path) -> None:
    (small_disk / "filler").write_bytes(b"\0" * 30_000)
    warning = preflight.space_warning(str(small_disk / "run"), 20_000)
    assert warning is not None and warning.startswith(f"warning: {small_disk / 'run'}: ")
    assert "rerunning the same command resumes" in warning
    assert preflight.space_warning(str(small_disk / "run"), 1_000) is None
    assert preflight.space_warning("s3://bucket/run", 10**15) is None


# -- S3: refused before any work ---------------------------------------------------------

@pytest.fixture
def denied_bucket(s3_server, s3_env) -> str:
    """A bucket whose policy denies every request, with an image in it."""
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    bucket = f"denied-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="data/cat/0.jpg", Body=b"not read")
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Deny", "Principal": "*", "Action": "s3:*",
            "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
    return bucket


def test_s3_failures_are_one_line_before_any_work(
    s3_server, s3_env, denied_bucket, images, resnet20_checkpoint, monkeypatch
) -> None:
    endpoint = s3_server.endpoint
    missing = f"nosuch-{uuid.uuid4().hex[:12]}"
    cases = {
        f"s3://{missing}/run": f"Error: s3://{missing}/run: cannot write: no such bucket",
        f"s3://{denied_bucket}/run": f"Error: s3://{denied_bucket}/run: cannot write: access "
                                     "denied",
    }
    for out, expected in cases.items():
        code, output = certify(*run_args(str(images), resnet20_checkpoint, out,
                                         "--s3-endpoint", endpoint))
        assert (code, output.strip()) == (EXIT_ENVIRONMENT, expected), output
    # the input, in a bucket that denies: named with the reason, nothing written
    out = f"s3://{s3_env}/run"
    code, output = certify(*run_args(f"s3://{denied_bucket}/data", resnet20_checkpoint, out,
                                     "--s3-endpoint", endpoint))
    assert (code, output.strip()) == (
        EXIT_ENVIRONMENT, f"Error: s3://{denied_bucket}/data: access denied"), output
    assert not storage.exists(out, storage.S3Options(endpoint))  # the probe is gone too
    # an endpoint on a closed port: unreachable, after the retries
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    closed = f"http://127.0.0.1:{free_port()}"
    code, output = certify(*run_args(str(images), resnet20_checkpoint, out,
                                     "--s3-endpoint", closed))
    assert (code, output.strip()) == (
        EXIT_ENVIRONMENT, f"Error: {out}: cannot write: S3 endpoint unreachable"), output


def test_a_run_refused_for_a_missing_bucket_runs_once_it_exists(
    s3_ray, s3_server, images, resnet20_checkpoint, clean_rows
) -> None:
    bucket = f"later-{uuid.uuid4().hex[:12]}"
    args = run_args(str(images), resnet20_checkpoint, f"s3://{bucket}/run",
                    "--s3-endpoint", s3_server.endpoint)
    code, output = certify(*args)
    assert (code, output.strip()) == (
        EXIT_ENVIRONMENT, f"Error: s3://{bucket}/run: cannot write: no such bucket"), output
    boto3.client("s3", endpoint_url=s3_server.endpoint,
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    code, output = certify(*args)
    assert code == 0 and "(0 already done)" in output, output
    assert rows_of(f"s3://{bucket}/run", s3_server.endpoint) == clean_rows


def test_the_other_jobs_refuse_before_any_work(s3_server, s3_env, images,
                                              resnet20_checkpoint) -> None:
    missing = f"nosuch-{uuid.uuid4().hex[:12]}"
    common = ["--data", str(images), "--model", "cifar_resnet20", "--checkpoint",
              str(resnet20_checkpoint), "--patch", "5", "--out", f"s3://{missing}/out",
              "--s3-endpoint", s3_server.endpoint]
    for job in (["attack", "--quiet"], ["finetune", "--quiet", "--epochs", "1"], ["analyze"]):
        result = CliRunner().invoke(main, [*job, *common])
        assert (result.exit_code, result.output.strip()) == (
            EXIT_ENVIRONMENT, f"Error: s3://{missing}/out: cannot write: no such bucket"), job


def test_report_and_archive_refuse_before_any_work(s3_server, s3_env, denied_bucket,
                                                    tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text("{}")
    result = CliRunner().invoke(main, ["report", str(run), "--out-dir",
                                       f"s3://{denied_bucket}/reports",
                                       "--s3-endpoint", s3_server.endpoint])
    assert (result.exit_code, result.output.strip()) == (
        EXIT_ENVIRONMENT, f"Error: s3://{denied_bucket}/reports: cannot write: access denied")
    missing = f"nosuch-{uuid.uuid4().hex[:12]}"
    result = CliRunner().invoke(main, ["report", str(run), "--archive", f"s3://{missing}/a",
                                       "--s3-endpoint", s3_server.endpoint])
    assert (result.exit_code, result.output.strip()) == (
        EXIT_ENVIRONMENT, f"Error: s3://{missing}/a: cannot write: no such bucket")


# -- S3: transient faults survived, lasting ones stop the run ------------------------------

def bucket_with_images(endpoint: str, folder: Path, name: str) -> str:
    """A new bucket holding the images of ``folder`` under data/."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket = f"{name}-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    for path in sorted(folder.rglob("*.jpg")):
        client.put_object(Bucket=bucket, Key=f"data/{path.relative_to(folder)}",
                          Body=path.read_bytes())
    return bucket


def test_503s_and_dropped_connections_are_survived(
    s3_ray, s3_server, images, resnet20_checkpoint, clean_rows
) -> None:
    bucket = bucket_with_images(s3_server.endpoint, images, "flaky")
    slow_and_dropped = lambda n: SLOW_DOWN if n % 9 == 4 else DROP if n % 13 == 6 else PASS
    with FlakyProxy(s3_server.endpoint, slow_and_dropped) as proxy:
        out = f"s3://{bucket}/run"
        code, output = certify(*run_args(f"s3://{bucket}/data", resnet20_checkpoint, out,
                                         "--s3-endpoint", proxy.endpoint))
        assert code == 0, output
    assert proxy.replies[SLOW_DOWN] >= 5 and proxy.replies[DROP] >= 3, proxy.replies
    assert rows_of(out, s3_server.endpoint) == clean_rows


def test_an_endpoint_gone_mid_run_stops_it_and_a_rerun_resumes(
    s3_ray, s3_server, images, resnet20_checkpoint, clean_rows
) -> None:
    bucket = bucket_with_images(s3_server.endpoint, images, "gone")
    out = f"s3://{bucket}/run"
    outage = {"on": False}
    with FlakyProxy(s3_server.endpoint, lambda n: DROP if outage["on"] else PASS) as proxy:
        run = RunConfig.from_sources(None, {
            "data": f"s3://{bucket}/data", "model": "cifar_resnet20",
            "checkpoint": str(resnet20_checkpoint), "patches": ("2.4%",),
            "methods": ("masking",), "shard_size": 8, "workers": 1, "out": out,
            "s3_endpoint": proxy.endpoint})

        def first_shard_done(summary) -> None:  # then the endpoint stops answering
            outage["on"] = True

        with pytest.raises(EnvironmentFault) as caught:
            run_certification(run, progress=first_shard_done)
    fault = caught.value
    assert fault.location.startswith(f"s3://{bucket}/"), fault
    assert fault.problem == "S3 endpoint unreachable", fault
    kept = [name for name in storage.list_files(
        f"{out}/certificates", storage.S3Options(s3_server.endpoint))]
    assert fault.detail == (f"the run stopped with {len(kept)} of 5 shards written and kept in "
                            f"{out}; rerun the same command to resume")
    assert 1 <= len(kept) < 5
    code, output = certify(*run_args(f"s3://{bucket}/data", resnet20_checkpoint, out,
                                     "--s3-endpoint", s3_server.endpoint))
    assert code == 0 and f"({len(kept)} already done)" in output, output
    assert rows_of(out, s3_server.endpoint) == clean_rows
