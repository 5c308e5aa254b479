"""Archive a run folder to S3 under a stable layout, and verify every object.

Layout: ``<prefix>/<model>/<dataset-name>/<run_id>/<path in the run folder>`` (model and
run_id from manifest.json; dataset-name = the last component of the dataset source,
sanitised). Every file of the run folder is copied (manifest, certificates, reports; hidden
files such as temporaries are skipped) with one PutObject carrying Content-MD5 (so S3 itself
rejects a corrupted body) and the file's sha256 as user metadata.

Verification, per object, after upload: its size equals the file's, and its ETag equals the
file's MD5 (true for single-part uploads without SSE-KMS); when the ETag is not a plain MD5
(multipart, KMS) the object is downloaded again and its sha256 compared. Repeating an archive
is safe: an object already there with the same size, MD5 ETag and sha256 metadata is left as
it is (``unchanged``), anything else is overwritten, and everything is verified again.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pipeline.io import faults, storage
from pipeline.io.sources import dataset_name
from scalecert.errors import InvalidOption, RunFailed

MAX_SINGLE_PUT = 5 * 1024 ** 3


class ArchiveError(RunFailed):
    """An object could not be uploaded or does not verify."""


@dataclass(frozen=True)
class ArchiveResult:
    uri: str  # s3://bucket/<prefix>/<model>/<dataset>/<run_id>
    uploaded: tuple[str, ...]  # relative paths written by this call
    unchanged: tuple[str, ...]  # relative paths already archived with the same content
    verified: int  # objects verified (all of them)


def archive_uri(prefix: str, manifest: dict[str, Any]) -> str:
    """The stable archive location of a run."""
    if not storage.is_s3(prefix):
        raise InvalidOption(f"--archive {prefix!r}: expected s3://bucket/prefix")
    model = dataset_name(str(manifest["config"]["model"]))
    dataset = dataset_name(manifest["dataset"]["source"])
    return storage.join(storage.normalise(prefix), model, dataset, manifest["run_id"])


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = storage.normalise(uri)[len("s3://"):].partition("/")
    return bucket, key


def _matches(head: dict[str, Any] | None, size: int, md5: str, sha256: str) -> bool:
    if head is None or head.get("ContentLength") != size:
        return False
    etag = str(head.get("ETag", "")).strip('"')
    return etag == md5 and head.get("Metadata", {}).get("sha256") == sha256


def _head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _verify(client: Any, bucket: str, key: str, size: int, md5: str, sha256: str) -> None:
    head = _head(client, bucket, key)
    where = f"s3://{bucket}/{key}"
    if head is None:
        raise ArchiveError(f"{where}: not found after upload")
    if head["ContentLength"] != size:
        raise ArchiveError(f"{where}: {head['ContentLength']} bytes, the file has {size}")
    etag = str(head.get("ETag", "")).strip('"')
    if len(etag) == 32 and "-" not in etag:
        if etag != md5:
            raise ArchiveError(f"{where}: ETag {etag} is not the file's MD5 {md5}")
        return
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    if hashlib.sha256(body).hexdigest() != sha256:
        raise ArchiveError(f"{where}: downloaded content's sha256 differs from the file's")


def archive_run(run: str, prefix: str, s3: storage.S3Options | None = None) -> ArchiveResult:
    """Copy every file of the run folder ``run`` (local or s3://) to its archive location and
    verify each object; safe to repeat."""
    manifest = json.loads(storage.read_bytes(storage.join(run, "manifest.json"), s3))
    uri = archive_uri(prefix, manifest)
    bucket, base = _bucket_key(uri)
    client = (s3 or storage.S3Options()).client()
    names = [n for n in storage.list_files(run, s3)
             if not any(part.startswith(".") for part in n.split("/"))]
    uploaded, unchanged = [], []
    for name in names:
        data = storage.read_bytes(storage.join(run, name), s3)
        if len(data) > MAX_SINGLE_PUT:
            raise ArchiveError(f"{storage.join(run, name)}: {len(data)} bytes is over the "
                               "5 GiB single-upload limit")
        md5 = hashlib.md5(data).hexdigest()
        sha256 = hashlib.sha256(data).hexdigest()
        key = f"{base}/{name}"
        with faults.at(f"{uri}/{name}"):  # boto3's errors, once its retries are used up
            if _matches(_head(client, bucket, key), len(data), md5, sha256):
                unchanged.append(name)
            else:
                client.put_object(Bucket=bucket, Key=key, Body=data, Metadata={"sha256": sha256},
                                  ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode())
                uploaded.append(name)
            _verify(client, bucket, key, len(data), md5, sha256)
    return ArchiveResult(uri, tuple(uploaded), tuple(unchanged), len(names))
