"""One place that turns a location string into a filesystem: local paths and ``s3://bucket/key``.

Everything in the pipeline that reads or writes (dataset listing, image bytes, manifests,
Parquet shards) goes through :func:`resolve`, so S3-compatible stores (MinIO, moto, Ceph) work
everywhere once an endpoint is given. Filesystems are built per call (cheap: no I/O), so there
is no module-level cache to go stale across processes or credential changes.

Failures of the environment (a full disk, a denied folder, a missing bucket, an endpoint that
does not answer) leave every function here as an :class:`~scalecert.errors.EnvironmentFault`
naming the location (:mod:`pipeline.io.faults`); S3 requests are retried with backoff first
(:class:`S3Options`).
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from pipeline.io import faults
from scalecert.errors import InvalidOption, MissingInput

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_S3_PREFIX = "s3://"
DEFAULT_REGION = "us-east-1"
DEFAULT_S3_ATTEMPTS = 6  # tries per S3 request: backoff up to about 30 s before giving up


def s3_attempts() -> int:
    """Tries per S3 request (the first and the retries), from ``AWS_MAX_ATTEMPTS`` as the AWS
    SDKs read it, else :data:`DEFAULT_S3_ATTEMPTS`."""
    text = os.environ.get("AWS_MAX_ATTEMPTS", "").strip()
    if not text:
        return DEFAULT_S3_ATTEMPTS
    if not text.isdigit() or not 1 <= int(text) <= 20:
        raise InvalidOption(f"AWS_MAX_ATTEMPTS={text!r}: expected a whole number from 1 to 20 "
                            "(tries per S3 request)")
    return int(text)


@dataclass(frozen=True)
class S3Options:
    """How to reach S3.

    ``endpoint`` is a URL such as ``http://127.0.0.1:9000`` for an S3-compatible store; when
    None, the environment's ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` is used if set (as
    boto3 does; pyarrow itself reads neither), else AWS proper. The region comes from
    ``AWS_DEFAULT_REGION`` / ``AWS_REGION`` (default us-east-1); credentials the usual AWS way
    (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, profiles,
    instance roles), read by pyarrow.

    Every request (pyarrow's and boto3's) is tried up to ``AWS_MAX_ATTEMPTS`` times (default
    :data:`DEFAULT_S3_ATTEMPTS`) with the AWS SDKs' standard retry: exponential backoff with
    jitter, each wait at most 20 s, on throttling (503 SlowDown), other 5xx replies, timeouts
    and dropped or refused connections. Errors that retrying cannot mend (no such bucket,
    access denied) fail at once.
    """

    endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.endpoint is not None:
            _parse_endpoint(self.endpoint)  # fail at construction, not at first use

    def resolved_endpoint(self) -> str | None:
        """The endpoint URL in force: ``endpoint``, else ``AWS_ENDPOINT_URL_S3`` or
        ``AWS_ENDPOINT_URL``, else None (AWS proper)."""
        return (self.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or None)

    @staticmethod
    def region() -> str:
        return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or DEFAULT_REGION

    def filesystem(self) -> pafs.S3FileSystem:
        """A pyarrow S3 filesystem for these options and the current environment (all data
        I/O)."""
        endpoint = self.resolved_endpoint()
        # allow_delayed_open: without it pyarrow starts a multipart upload (3 requests) for every
        # output stream, however small; with it, small writes are one PutObject. Reads still
        # check existence on open.
        retry = pafs.AwsStandardS3RetryStrategy(max_attempts=s3_attempts())
        if endpoint is None:
            return pafs.S3FileSystem(region=self.region(), allow_delayed_open=True,
                                     retry_strategy=retry)
        scheme, host = _parse_endpoint(endpoint)
        return pafs.S3FileSystem(
            endpoint_override=host, scheme=scheme, region=self.region(), allow_delayed_open=True,
            retry_strategy=retry,
        )

    def client(self) -> Any:
        """A boto3 S3 client for the same endpoint and region (the archive needs PutObject with
        Content-MD5 and HeadObject, which pyarrow does not expose)."""
        import boto3
        from botocore.config import Config

        retries = {"max_attempts": s3_attempts(), "mode": "standard"}
        return boto3.client("s3", endpoint_url=self.resolved_endpoint(), region_name=self.region(),
                            config=Config(retries=retries))


def _parse_endpoint(endpoint: str) -> tuple[str, str]:
    """``http://host:port`` -> ``("http", "host:port")``; anything else is a ValueError."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise InvalidOption(
            f"S3 endpoint {endpoint!r} is not a URL of the form http(s)://host[:port] "
            "(no path, no query)"
        )
    if parts.query or parts.fragment:
        raise InvalidOption(f"S3 endpoint {endpoint!r} must not have a query or fragment")
    return parts.scheme, parts.netloc


def is_s3(location: str) -> bool:
    """True for ``s3://...`` locations (scheme matched case-insensitively)."""
    return location[: len(_S3_PREFIX)].lower() == _S3_PREFIX


def _check_scheme(location: str) -> None:
    match = _SCHEME.match(location)
    if match and not is_s3(location):
        raise InvalidOption(
            f"location {location!r}: unsupported scheme {match.group(1)!r} "
            "(use a local path or s3://bucket/prefix)"
        )


def _s3_path(location: str) -> str:
    """``s3://bucket/a/b/`` -> ``bucket/a/b``."""
    path = location[len(_S3_PREFIX) :].rstrip("/")
    if not path.split("/", 1)[0]:
        raise InvalidOption(f"location {location!r}: no bucket name after s3://")
    if "//" in path:
        raise InvalidOption(f"location {location!r}: empty path segment ('//')")
    return path


def resolve(location: str, s3: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a location: a local path or ``s3://bucket/key``.

    Local paths become absolute (``~`` expanded) on a ``LocalFileSystem``; S3 locations give an
    ``S3FileSystem`` (see :class:`S3Options`) and ``bucket/key`` without trailing slash. Other
    schemes (``gs://``, ``file://``, ``http://``) are a ValueError naming the location.
    """
    if not location:
        raise InvalidOption("location is empty")
    _check_scheme(location)
    if is_s3(location):
        return (s3 or S3Options()).filesystem(), _s3_path(location)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))


def normalise(location: str) -> str:
    """The canonical form of a location: an absolute local path, or ``s3://bucket/key``
    without trailing slash. Validates like :func:`resolve` but builds no filesystem."""
    if not location:
        raise InvalidOption("location is empty")
    _check_scheme(location)
    if is_s3(location):
        return _S3_PREFIX + _s3_path(location)
    return os.path.abspath(os.path.expanduser(location))


def join(location: str, *parts: str) -> str:
    """Append '/'-separated relative parts to a location (local path or S3 URI).

    Slashes at the ends of each part are dropped and empty parts skipped, so
    ``join("s3://b/run/", "/certificates", "part-0.parquet")`` is
    ``s3://b/run/certificates/part-0.parquet``; a part can never make the result absolute.
    """
    _check_scheme(location)
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if not tail:
        return location
    if is_s3(location):
        return f"{location.rstrip('/')}/{tail}"
    return os.path.join(location, tail) if location else tail


def read_bytes(location: str, s3: S3Options | None = None) -> bytes:
    """The whole content of a file; FileNotFoundError naming the location when it is absent."""
    fs, path = resolve(location, s3)
    with faults.at(location):
        try:
            with fs.open_input_stream(path) as stream:
                return stream.read()
        except FileNotFoundError as exc:
            raise MissingInput(f"{location}: no such file") from exc
        except OSError as exc:  # pyarrow reports a folder as a plain OSError
            if faults.environment_cause(exc) is None and \
                    fs.get_file_info(path).type == pafs.FileType.Directory:
                raise IsADirectoryError(f"{location}: is a folder, not a file") from exc
            raise


def read_text(location: str, s3: S3Options | None = None, encoding: str = "utf-8") -> str:
    """:func:`read_bytes` decoded as text."""
    return read_bytes(location, s3).decode(encoding)


def exists(location: str, s3: S3Options | None = None) -> bool:
    """True when the location is a file or a folder (on S3: an object or a non-empty prefix)."""
    fs, path = resolve(location, s3)
    with faults.at(location):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(location: str, s3: S3Options | None = None) -> list[str]:
    """Every file under a folder, recursively: paths relative to it, '/'-separated, sorted.

    Folders themselves (and S3 "folder marker" objects ending in '/') are not listed. Hidden
    files are included; callers filter. A missing location is a FileNotFoundError and a file a
    NotADirectoryError, both naming the location.
    """
    fs, path = resolve(location, s3)
    with faults.at(location):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise MissingInput(f"{location}: no such folder")
        if info.type != pafs.FileType.Directory:
            raise NotADirectoryError(f"{location}: is a file, expected a folder")
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        except FileNotFoundError as exc:  # removed between the two calls
            raise MissingInput(f"{location}: no such folder") from exc
    prefix = path.rstrip("/") + "/"
    names = []
    for entry in infos:
        if entry.type != pafs.FileType.File:
            continue
        if not entry.path.startswith(prefix):
            raise RuntimeError(f"{location}: listing returned {entry.path!r} outside {prefix!r}")
        names.append(entry.path[len(prefix) :].replace(os.sep, "/"))
    return sorted(names)


def write_bytes_atomic(location: str, data: bytes, s3: S3Options | None = None) -> None:
    """Write a file so that readers see either the old content or all of the new, never a part.

    Local: a hidden temporary file in the same folder (parent folders created), flushed and
    fsynced, then ``os.replace`` onto the final name; the temporary file is removed on failure.
    S3: one PutObject on the final key, no temporary key (an object only becomes visible once
    its upload completes). pyarrow switches to a multipart upload above 5 MB; that too is only
    visible on completion. A missing bucket is reported when the upload is sent.
    """
    fs, path = resolve(location, s3)
    with faults.at(location):
        if is_s3(location):
            with fs.open_output_stream(path) as stream:
                stream.write(data)
        else:
            _write_local_atomic(path, data)


def _write_local_atomic(path: str, data: bytes) -> None:
    """:func:`write_bytes_atomic` on a local path: temporary file, fsync, rename."""
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    # O_EXCL: never clobber; mode 0o666 so the umask applies as for any ordinary file.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise


def write_text_atomic(
    location: str, text: str, s3: S3Options | None = None, encoding: str = "utf-8"
) -> None:
    """:func:`write_bytes_atomic` for text."""
    write_bytes_atomic(location, text.encode(encoding), s3)


def delete(location: str, s3: S3Options | None = None) -> None:
    """Remove a file; a file that is not there is no error. On S3 one DeleteObject (pyarrow's
    would leave a marker object in place of an emptied "folder")."""
    fs, path = resolve(location, s3)
    with faults.at(location):
        if is_s3(location):
            bucket, _, key = path.partition("/")
            (s3 or S3Options()).client().delete_object(Bucket=bucket, Key=key)
            return
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass

