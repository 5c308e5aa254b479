"""Which failures are the environment's: a full disk, a denied or read-only folder, a missing
bucket, an S3 endpoint that does not answer, refused credentials, retries used up.

:func:`environment_cause` names such a failure in one phrase, and :func:`at` turns it into
an :class:`~scalecert.errors.EnvironmentFault` naming the location; anything else (a bug, a
missing file, a corrupt one) passes through untouched, with its traceback. Ray wraps a task's
exception in its own error; :func:`environment_fault` finds the fault under it.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager

from scalecert.errors import EnvironmentFault

_ERRNO_CAUSES = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EIO: "input/output error",
    errno.ESTALE: "stale file handle (network file system)",
    errno.ENOTCONN: "transport endpoint is not connected",
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.ETIMEDOUT: "timed out",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
}

# pyarrow's S3 errors name the AWS SDK's error type ("AWS Error NO_SUCH_BUCKET during ...")
_AWS_CAUSES = {
    "NO_SUCH_BUCKET": "no such bucket",
    "ACCESS_DENIED": "access denied",
    "INVALID_ACCESS_KEY_ID": "credentials refused: unknown access key",
    "SIGNATURE_DOES_NOT_MATCH": "credentials refused: the secret key does not match",
    "EXPIRED_TOKEN": "credentials refused: the session token has expired",
    "MISSING_AUTHENTICATION_TOKEN": "credentials refused: none were sent",
    "NETWORK_CONNECTION": "S3 endpoint unreachable",
    "REQUEST_TIMEOUT": "S3 endpoint timed out",
    "SLOW_DOWN": "S3 kept throttling (SlowDown) after every retry",
    "THROTTLING": "S3 kept throttling after every retry",
    "SERVICE_UNAVAILABLE": "S3 unavailable (503) after every retry",
    "INTERNAL_FAILURE": "S3 internal error after every retry",
}
_AWS_ERROR = re.compile(r"AWS Error ([A-Z_]+)")
_HTTP_5XX = re.compile(r"HTTP (?:response code|status)[: ]*5\d\d", re.IGNORECASE)
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\]")

# boto3 (the archive's client): error codes of a ClientError, and exception class names
_BOTO_CODES = {
    "NoSuchBucket": "no such bucket",
    "AccessDenied": "access denied",
    "403": "access denied",
    "Forbidden": "access denied",
    "InvalidAccessKeyId": "credentials refused: unknown access key",
    "SignatureDoesNotMatch": "credentials refused: the secret key does not match",
    "ExpiredToken": "credentials refused: the session token has expired",
    "SlowDown": "S3 kept throttling (SlowDown) after every retry",
    "ServiceUnavailable": "S3 unavailable (503) after every retry",
    "503": "S3 unavailable (503) after every retry",
    "InternalError": "S3 internal error after every retry",
    "500": "S3 internal error after every retry",
}
_BOTO_CLASSES = {
    "EndpointConnectionError": "S3 endpoint unreachable",
    "ConnectTimeoutError": "S3 endpoint unreachable (connect timed out)",
    "ReadTimeoutError": "S3 endpoint timed out",
    "ConnectionClosedError": "S3 endpoint closed the connection after every retry",
    "NoCredentialsError": "no AWS credentials found",
    "PartialCredentialsError": "incomplete AWS credentials",
}


def _own_cause(exc: BaseException) -> str | None:
    """The environment cause of ``exc`` itself (not of what it wraps)."""
    if isinstance(exc, EnvironmentFault):
        return exc.problem
    name = type(exc).__name__
    if name in _BOTO_CLASSES:
        return _BOTO_CLASSES[name]
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        code = str(response.get("Error", {}).get("Code", ""))
        return _BOTO_CODES.get(code)
    if not isinstance(exc, OSError):
        return None
    text = str(exc)
    match = _AWS_ERROR.search(text)
    if match:
        cause = _AWS_CAUSES.get(match.group(1))
        if cause is None and _HTTP_5XX.search(text):
            return "S3 server error (5xx) after every retry"
        return cause
    number = exc.errno
    if number is None:  # pyarrow's local errors carry the errno in their text only
        found = _ERRNO_TEXT.search(text)
        number = int(found.group(1)) if found else None
    return _ERRNO_CAUSES.get(number) if number is not None else None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: ``__cause__``, ``__context__``, Ray's ``cause`` (a task's
    error) and ``worker_failures`` (Ray Train's, one per failed worker)."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        failures = getattr(current, "worker_failures", None)
        inner_ones = [getattr(current, "cause", None), current.__cause__, current.__context__,
                      *(failures.values() if isinstance(failures, dict) else ())]
        pending += [inner for inner in inner_ones if isinstance(inner, BaseException)]


def environment_cause(exc: BaseException) -> str | None:
    """What in the environment failed, in one phrase, or None when ``exc`` is not an
    environment failure (a bug, a missing or corrupt file)."""
    for current in _chain(exc):
        cause = _own_cause(current)
        if cause is not None:
            return cause
    return None


def environment_fault(exc: BaseException) -> EnvironmentFault | None:
    """The :class:`EnvironmentFault` in ``exc``'s chain, or None; a fresh one, since Ray hands
    the driver the worker's fault as a ``RayTaskError`` that is an instance of both (with
    Ray's text as its message)."""
    for current in _chain(exc):
        if isinstance(current, EnvironmentFault):
            return EnvironmentFault(current.location, current.problem, current.detail)
    return None


@contextmanager
def at(location: str) -> Iterator[None]:
    """Turn an environment failure inside the block into an
    :class:`~scalecert.errors.EnvironmentFault` naming ``location``; every other exception
    passes through as it is."""
    try:
        yield
    except EnvironmentFault:
        raise
    except Exception as exc:
        cause = environment_cause(exc)
        if cause is None:
            raise
        raise EnvironmentFault(location, cause) from exc
