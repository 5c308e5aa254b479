"""pipeline.io.storage: one API over local folders and S3 (a local moto server)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs
import pytest

from pipeline.io import storage
from pipeline.io.storage import S3Options

if TYPE_CHECKING:
    from conftest import S3Server

FILES = {
    "b/deep/x.bin": b"\x00\x01\x02",
    "a.txt": b"alpha",
    "b/c.txt": b"",
    "b/deep/y z.txt": b"space in name",
}


def _round_trip(root: str, s3: S3Options | None = None) -> None:
    for key, data in FILES.items():
        storage.write_bytes_atomic(storage.join(root, key), data, s3)
    for key, data in FILES.items():
        assert storage.read_bytes(storage.join(root, key), s3) == data
        assert storage.exists(storage.join(root, key), s3)
    assert storage.list_files(root, s3) == sorted(FILES)
    in_b = storage.list_files(storage.join(root, "b"), s3)
    assert in_b == ["c.txt", "deep/x.bin", "deep/y z.txt"]
    assert storage.exists(storage.join(root, "b"), s3)  # a folder / non-empty prefix
    assert not storage.exists(storage.join(root, "nope.txt"), s3)
    storage.write_text_atomic(storage.join(root, "a.txt"), "überschrieben", s3)
    assert storage.read_text(storage.join(root, "a.txt"), s3) == "überschrieben"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        storage.read_bytes(storage.join(root, "nope.txt"), s3)
    with pytest.raises(FileNotFoundError, match="missing-folder"):
        storage.list_files(storage.join(root, "missing-folder"), s3)
    with pytest.raises(NotADirectoryError, match="a.txt"):
        storage.list_files(storage.join(root, "a.txt"), s3)


def test_local_round_trip(tmp_path: Path) -> None:
    _round_trip(str(tmp_path / "store"))


def test_s3_round_trip(s3_env: str) -> None:
    _round_trip(f"s3://{s3_env}/some/prefix")
    # The whole bucket lists too, and nothing but the files was created (no folder markers,
    # no temporary keys).
    keys = storage.list_files(f"s3://{s3_env}")
    assert keys == sorted(f"some/prefix/{k}" for k in FILES)


def test_s3_small_write_is_one_put(s3_env: str, s3_server: S3Server) -> None:
    key = f"{s3_env}/run/certificates/part-00007.parquet"
    storage.write_bytes_atomic(f"s3://{key}", b"x" * 1000)
    requests: list[str] = []
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:  # the server logs each request as it completes
        requests = [line for line in _log_lines(s3_server.log) if f"/{key}" in line]
        if requests:
            break
        time.sleep(0.05)
    assert len(requests) == 1 and f'"PUT /{key} HTTP' in requests[0], requests


def _log_lines(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    return [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in text.splitlines()]


def test_s3_explicit_endpoint_beats_environment(
    s3_env: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    options = S3Options(endpoint=s3_server.endpoint)
    storage.write_bytes_atomic(f"s3://{s3_env}/k", b"v", options)
    assert storage.read_bytes(f"s3://{s3_env}/k", options) == b"v"


def test_local_write_is_atomic_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "new" / "nested" / "manifest.json"
    storage.write_text_atomic(str(target), '{"a": 1}')
    storage.write_text_atomic(str(target), '{"a": 2}')  # replaces
    assert target.read_text() == '{"a": 2}'
    assert os.listdir(target.parent) == ["manifest.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # like an ordinary file, not 0600


def test_local_write_failure_removes_temp_and_keeps_old(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        storage.write_bytes_atomic(str(target), "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_read_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        storage.read_bytes(str(tmp_path))


def test_resolve_local_and_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("rel/dir")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "rel" / "dir")
    fs, path = storage.resolve("s3://bucket/a/b/", S3Options("http://127.0.0.1:9000"))
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bucket/a/b"
    assert storage.normalise("S3://bucket/a/") == "s3://bucket/a"
    assert storage.normalise("rel") == str(tmp_path / "rel")


@pytest.mark.parametrize(
    "location",
    ["gs://bucket/x", "file:///tmp/x", "http://host/x", "s3://", "s3:///key", "s3://b//k"],
)
def test_bad_locations_are_named(location: str) -> None:
    with pytest.raises(ValueError, match=re.escape(location)):
        storage.resolve(location)


def test_bad_endpoint_is_named() -> None:
    for endpoint in ["127.0.0.1:9000", "ftp://host", "http://host/path"]:
        with pytest.raises(ValueError, match="endpoint"):
            S3Options(endpoint)


def test_join_and_is_s3() -> None:
    assert storage.join("s3://b/run/", "/certificates", "part-0.parquet") == (
        "s3://b/run/certificates/part-0.parquet"
    )
    assert storage.join("/data/run", "a/b.jpg") == "/data/run/a/b.jpg"
    assert storage.join("/data/run", "/etc/passwd") == "/data/run/etc/passwd"
    assert storage.join("/data/run") == "/data/run"
    assert storage.is_s3("s3://b/k") and storage.is_s3("S3://b")
    assert not storage.is_s3("/s3/b") and not storage.is_s3("s3b://x")
