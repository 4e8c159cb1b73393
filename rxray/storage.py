"""Storage by URI: local paths, s3://bucket/prefix and gs://bucket/prefix.

The S3 endpoint comes from the standard ``AWS_ENDPOINT_URL`` setting (a local S3
server in tests, the real service otherwise); credentials follow the usual AWS
chain (environment, profile, instance profile). Local writes are atomic
(write to a temporary name, then rename) so a killed step never leaves a
half-written file under its final name.
"""

from __future__ import annotations

import os
import posixpath
import random
import re
import time
import uuid
from functools import lru_cache
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3", "gs", "gcs")
# The retry policy for object storage, one for both S3 clients (s3fs/botocore for files the steps read and
# write themselves, pyarrow's AWS SDK for Ray Data's reads and writes and Ray Train's checkpoints): S3 answers
# 503 SlowDown under load, and 500s and dropped connections happen. Each request is tried up to this many times
# with capped exponential backoff and jitter (AWS "standard" mode: 5xx, throttling and connection errors only;
# a 4xx such as a missing key fails at once). Ten attempts ride out a few seconds of throttling.
S3_MAX_ATTEMPTS = 10
# pyarrow's S3 client still hands some retryable answers to the caller: a 500/503 to a HeadObject (no body, so
# "AWS Error UNKNOWN (HTTP status 503)") and, when several threads share the client, 500/503 to GetObject
# (apache/arrow#37260; Ray Data retries the same messages, DataContext.retried_io_errors). Measured: 8 threads
# reading 1,200 objects through a proxy that failed a tenth of the requests, with max_attempts=10: 55 reads failed.
TRANSIENT_ARROW_ERROR = re.compile(r"AWS Error (INTERNAL_FAILURE|NETWORK_CONNECTION|SLOW_DOWN|SERVICE_UNAVAILABLE"
                                   r"|UNKNOWN \(HTTP status 5\d\d\))")
RETRY_BACKOFF_S, RETRY_MAX_BACKOFF_S = 0.05, 5.0
# The storage check before a step (rxray/storage_check.py) must answer in seconds: an endpoint where nothing
# listens is refused again on every attempt, and S3_MAX_ATTEMPTS of backoff made that a 65-71 s wait before a
# traceback. Three attempts still ride out one 503 or reset; an endpoint that takes 5 s to accept a connection
# is not one a step can work with.
CHECK_MAX_ATTEMPTS, CHECK_CONNECT_TIMEOUT_S, CHECK_READ_TIMEOUT_S = 3, 5.0, 20.0
Result = TypeVar("Result")


class StorageError(RuntimeError):
    """A URI that cannot be used (unknown scheme, missing optional backend)."""


def is_transient(error: BaseException) -> bool:
    """True for an object-store error worth trying again: a 5xx, throttling or a dropped connection."""
    return isinstance(error, OSError) and not isinstance(error, FileNotFoundError) \
        and TRANSIENT_ARROW_ERROR.search(str(error)) is not None


def with_retries(action: Callable[[], Result]) -> Result:
    """``action()``, run again after a capped exponential backoff with jitter while it fails transiently."""
    for attempt in range(1, S3_MAX_ATTEMPTS):
        try:
            return action()
        except OSError as error:
            if not is_transient(error):
                raise
        time.sleep(random.uniform(0, min(RETRY_MAX_BACKOFF_S, RETRY_BACKOFF_S * 2 ** attempt)))
    return action()


def scheme_of(uri: str) -> str:
    """'s3', 'gs' or 'file' for a URI or local path."""
    parsed = urlparse(str(uri))
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or len(scheme) == 1:  # len 1: a Windows drive letter
        return "file"
    if scheme == "gcs":
        return "gs"
    if scheme not in REMOTE_SCHEMES:
        raise StorageError(f"unsupported storage scheme {scheme!r} in {uri!r} (use a local path, s3:// or gs://)")
    return scheme


def is_remote(uri: str) -> bool:
    """True for object-storage URIs."""
    return scheme_of(uri) != "file"


def strip_scheme(uri: str) -> str:
    """The path part of a URI as filesystems expect it ('bucket/key' or an absolute local path)."""
    uri = str(uri)
    scheme = scheme_of(uri)
    if scheme == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return os.path.abspath(os.path.expanduser(path))
    return uri.split("://", 1)[1].rstrip("/")


def absolute(uri: str) -> str:
    """The URI with a relative local path made absolute (object-storage URIs and file:// URIs unchanged)."""
    uri = str(uri)
    if is_remote(uri) or uri.startswith("file://"):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (never os.path.join on object keys)."""
    uri = str(uri)
    base = uri.rstrip("/") if is_remote(uri) else uri
    for part in parts:
        part = str(part).strip("/")
        if part:
            base = posixpath.join(base, part) if is_remote(uri) else os.path.join(base, part)
    return base


def s3_endpoint() -> str | None:
    """The S3 endpoint override from AWS_ENDPOINT_URL(_S3), or None for the real service."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str:
    """The region both S3 clients sign for: AWS_REGION, AWS_DEFAULT_REGION, else us-east-1."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


@lru_cache(maxsize=16)
def _fsspec_filesystem(scheme: str, endpoint: str | None) -> fsspec.AbstractFileSystem:
    if scheme == "file":
        return fsspec.filesystem("file", auto_mkdir=True)
    if scheme == "s3":
        try:
            import s3fs  # noqa: F401
        except ImportError as exc:  # pragma: no cover - s3fs is a hard dependency
            raise StorageError("s3:// needs the s3fs package") from exc
        client_kwargs: dict[str, Any] = {"region_name": s3_region()}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        return fsspec.filesystem("s3", client_kwargs=client_kwargs, use_listings_cache=False,
                                 config_kwargs={"retries": {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}})
    try:
        import gcsfs  # noqa: F401
    except ImportError as exc:
        raise StorageError("gs:// needs the optional gcsfs package: pip install gcsfs") from exc
    return fsspec.filesystem("gcs")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a URI and the path within it."""
    scheme = scheme_of(uri)
    return _fsspec_filesystem(scheme, s3_endpoint() if scheme == "s3" else None), strip_scheme(uri)


def s3_check_client() -> Any:
    """A botocore S3 client for the storage check: the steps' endpoint, region and credentials, few short tries."""
    import botocore.session
    from botocore.config import Config

    config = Config(connect_timeout=CHECK_CONNECT_TIMEOUT_S, read_timeout=CHECK_READ_TIMEOUT_S,
                    retries={"max_attempts": CHECK_MAX_ATTEMPTS, "mode": "standard"})
    return botocore.session.get_session().create_client("s3", region_name=s3_region(), endpoint_url=s3_endpoint(),
                                                        config=config)


def _arrow_s3_kwargs() -> dict[str, Any]:
    kwargs: dict[str, Any] = {"region": s3_region(),
                              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or endpoint
        kwargs["scheme"] = parsed.scheme or "https"
    return kwargs


def pyarrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path for a URI, as Ray Data's readers and writers take them."""
    scheme = scheme_of(uri)
    path = strip_scheme(uri)
    if scheme == "file":
        return pafs.LocalFileSystem(), path
    if scheme == "s3":
        return pafs.S3FileSystem(**_arrow_s3_kwargs()), path
    fs, path = filesystem(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def exists(uri: str) -> bool:
    """True if a file or directory exists at the URI."""
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    """The whole content of one file."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return handle.read()


def read_text(uri: str) -> str:
    """The content of one UTF-8 text file."""
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write one file atomically (object stores are atomic per PUT; local files rename into place)."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
        return
    with fs.open(path, "wb") as handle:
        handle.write(data)


def write_text(uri: str, text: str) -> None:
    """Write one UTF-8 text file atomically."""
    write_bytes(uri, text.encode("utf-8"))


def open_file(uri: str, mode: str = "rb"):
    """An open file object for streaming reads or writes (use as a context manager)."""
    fs, path = filesystem(uri)
    if "w" in mode and not is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return fs.open(path, mode)


def list_dir(uri: str) -> list[str]:
    """Full URIs of the entries directly under a directory URI (sorted); [] if it does not exist."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    entries = sorted(fs.ls(path, detail=False))
    if not is_remote(uri):
        return entries
    prefix = uri.split("://", 1)[0] + "://"
    return [prefix + entry.rstrip("/") for entry in entries]


def makedirs(uri: str) -> None:
    """Create a directory (a no-op on object stores, where prefixes need no creation)."""
    if not is_remote(uri):
        os.makedirs(strip_scheme(uri), exist_ok=True)


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file (or a whole prefix with recursive=True); missing paths are ignored."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def ensure_bucket(uri: str) -> None:
    """Create the bucket of an s3:// URI if it is missing (for local S3 servers and tests)."""
    if scheme_of(uri) != "s3":
        return
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    if not fs.exists(bucket):
        # pyarrow, not s3fs: s3fs sends a LocationConstraint of us-east-1, which S3 rejects.
        arrow_fs = pafs.S3FileSystem(**{**_arrow_s3_kwargs(), "allow_bucket_creation": True})
        arrow_fs.create_dir(bucket)
        fs.invalidate_cache()
