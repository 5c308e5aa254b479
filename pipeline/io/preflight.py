"""Checks of a job's locations before any work: before Ray starts or an image is read.

A scheduled audit should fail in its first second with one line naming the location and the
cause (a missing bucket, denied access, an endpoint that does not answer, a read-only folder),
not an hour later in a worker's traceback. :func:`check_locations` writes and deletes a probe
object in the output folder and reads each input; :func:`space_warning` compares a local
output's free space with what the run will write.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable

import pyarrow.fs as pafs

from pipeline.io import faults, storage
from scalecert.errors import EnvironmentFault, MissingInput

PROBE_PREFIX = ".scalecert-probe-"  # the object a preflight writes and deletes

# What a part file takes, generously: each column chunk's header and statistics, each row
# (about 20 bytes measured on CIFAR-10 runs, zstd), each stored prediction of a full map,
# and whole file-system blocks.
COLUMN_BYTES = 150
ROW_BYTES = 64
MAP_ENTRY_BYTES = 4
BLOCK_BYTES = 4096


def check_writable(folder: str, s3: storage.S3Options | None) -> None:
    """Files can be written in ``folder`` (created if missing, as a run would): a small object
    is written there and deleted, and local folders made for it are removed again, so a
    refused run leaves nothing. An :class:`~scalecert.errors.EnvironmentFault` names the
    folder and the cause."""
    probe = storage.join(folder, f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
    created = [] if storage.is_s3(folder) else _missing_folders(storage.normalise(folder))
    try:
        storage.write_bytes_atomic(probe, b"scalecert preflight: safe to delete\n", s3)
        storage.delete(probe, s3)
    except EnvironmentFault as exc:
        raise EnvironmentFault(folder, f"cannot write: {exc.problem}") from exc
    finally:
        for made in created:  # deepest first
            if os.path.isdir(made):
                os.rmdir(made)


def check_readable(location: str, s3: storage.S3Options | None, flag: str) -> None:
    """``location`` (a file or a folder, local or S3) can be reached and read: a file's first
    byte is read, a folder's top level listed. A missing one is refused naming ``flag``; an
    environment failure is an :class:`~scalecert.errors.EnvironmentFault`."""
    fs, path = storage.resolve(location, s3)
    with faults.at(location):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise MissingInput(f"{flag} {location}: no such file or folder")
        if info.type == pafs.FileType.Directory:
            fs.get_file_info(pafs.FileSelector(path, recursive=False))
        else:
            with fs.open_input_stream(path) as stream:
                stream.read(1)


def check_locations(out: str | None, reads: Iterable[tuple[str, str | None]],
                    s3: storage.S3Options | None) -> None:
    """Before a job's work: its output folder ``out`` takes a file (a probe written and
    deleted), and each ``(flag, location)`` of ``reads`` that is given can be read."""
    if out is not None:
        check_writable(out, s3)
    for flag, location in reads:
        if location is not None:
            check_readable(location, s3, flag)


def shard_bytes(rows: int, columns: int, map_entries_per_row: int = 0, overhead: int = 0) -> int:
    """About how many bytes a part file of ``rows`` rows and ``columns`` columns takes on disk
    (``overhead``: the file's own, its schema and metadata)."""
    size = (overhead + columns * COLUMN_BYTES
            + rows * (ROW_BYTES + MAP_ENTRY_BYTES * map_entries_per_row))
    return -(-size // BLOCK_BYTES) * BLOCK_BYTES


def space_warning(out: str, needed: int) -> str | None:
    """A warning when ``out`` is local and its file system has less free space than
    ``needed`` bytes; None otherwise (S3, or room enough)."""
    if storage.is_s3(out):
        return None
    folder = storage.normalise(out)
    missing = _missing_folders(folder)  # the run creates them: ask the file system they go on
    free = shutil.disk_usage(os.path.dirname(missing[-1]) if missing else folder).free
    if free >= needed:
        return None
    return (f"warning: {out}: {_size(free)} free, and the run will write about {_size(needed)}; "
            "it will stop when the disk is full (rerunning the same command resumes)")


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _missing_folders(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing
