"""The storage check before a step: every URI of a config answered in seconds, and storage errors in one line.

A storage mistake (no credentials, an endpoint where nothing listens, a missing bucket, a refused key, the
wrong region, a file where a folder belongs) would otherwise surface minutes into a step as a botocore or
pyarrow traceback, after a minute of retries for an endpoint that can never answer. :func:`check_config`
asks one or two cheap questions per ``option(uri=True)`` field of a validated config (a HEAD, a listing of
at most one key; each bucket once) through :func:`rxray.storage.s3_check_client`, which tries only a few
times, and raises :class:`ConfigError` naming the field, the URI and the cause. :func:`check_plan` does the
same for the steps of a pipeline before any of them runs. :func:`storage_error_cause` turns a storage
exception that still escapes a step into the same kind of one-line cause (the CLI's safety net).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Iterator
from urllib.parse import urlparse

from rxray import storage
from rxray.errors import ConfigError

FOLDER, FILE, EITHER, OUTPUT, REACHABLE = "folder", "file", "file or folder", "output", "reachable"
# What each URI field must be; a name means the same in every config (the pipeline's own `run`, an output, is
# checked by check_plan). Inputs must exist as the kind their step reads; an output needs a bucket that answers
# (its folders are made as it is written) and no file where its folder goes.
FIELD_KINDS = {
    "source": FOLDER, "data": FOLDER, "run": FOLDER, "features": FOLDER, "probe": FOLDER, "scores": FOLDER,
    "finetuned": FOLDER,
    "moa": FILE, "dataset_embeddings": FILE, "labels": FILE, "weights": FILE, "metadata": FILE, "truth": FILE, "base": FILE, "space": FILE,
    "pipeline": FILE,
    "model": EITHER, "encoder": EITHER, "embeddings": EITHER,  # a run folder, or one checkpoint or CSV in it
    "out": OUTPUT, "workdir": OUTPUT,
}
# Steps that create their output's bucket when it is missing (storage.ensure_bucket), as the pipeline does its run's.
CREATES_ITS_BUCKET = frozenset({"synth", "ingest"})
NO_CREDENTIALS = "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
_MISSING = "missing"
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "301"}
_TOKEN_CODES = {"ExpiredToken", "InvalidToken", "TokenRefreshRequired"}
# pyarrow's S3 client (Ray Data, Ray Train) says "AWS Error ACCESS_DENIED during HeadObject operation: ...".
_ARROW_ERROR = re.compile(r"AWS Error (?P<code>[A-Z_]+)(?: \(HTTP status (?P<status>\d+)\))? during (?P<op>\w+)")
_ARROW_CODES = {"ACCESS_DENIED": "AccessDenied", "INVALID_ACCESS_KEY_ID": "InvalidAccessKeyId",
                "SIGNATURE_DOES_NOT_MATCH": "SignatureDoesNotMatch", "NO_SUCH_BUCKET": "NoSuchBucket",
                "EXPIRED_TOKEN": "ExpiredToken"}


def uri_fields(cfg: Any) -> Iterator[tuple[str, str, str]]:
    """(field, URI, kind) for every storage location a validated config names, in declaration order."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.metadata.get("uri") and value and field.name in FIELD_KINDS:
            yield field.name, value, FIELD_KINDS[field.name]


def check_config(cfg: Any) -> None:
    """ConfigError for the first URI of a step's config that cannot serve as its FIELD_KINDS kind says.

    An input must exist as a folder or a file; an output needs a bucket that answers (or a step that creates
    it) and no file where its folder goes; any of them fails on a store that refuses or cannot be reached.
    """
    section = getattr(cfg, "section", type(cfg).__name__)
    check = StorageCheck()
    for name, uri, kind in uri_fields(cfg):
        check.field(f"{section}.{name}", uri, kind, creates_bucket=section in CREATES_ITS_BUCKET)


def check_reachable(cfg: Any) -> None:
    """ConfigError for the first URI of a config whose store cannot be reached at all (a missing bucket passes).

    For the moment before anything reads storage: credentials, the endpoint, access and the region only.
    """
    section = getattr(cfg, "section", type(cfg).__name__)
    check = StorageCheck()
    for name, uri, _ in uri_fields(cfg):
        check.field(f"{section}.{name}", uri, REACHABLE)


def check_plan(plan: Any) -> Any:
    """The plan, once every URI of its selected steps can serve (else ConfigError for the first that cannot).

    An input that a selected step writes (its output or a path under it) does not exist yet and is not
    required; every step output is under the run URI, whose bucket is checked once (the pipeline creates it).
    """
    from rxray.steps import SOURCE, get_step

    steps = plan.to_run()
    written = [step.out for step in steps]
    writes_source = any(get_step(step.step).output == SOURCE for step in steps)
    check = StorageCheck()
    check.field("pipeline.run", plan.layout.run, OUTPUT, creates_bucket=True)
    check.field("pipeline.source", plan.layout.source, OUTPUT if writes_source else FOLDER, creates_bucket=True)
    for step in steps:
        runs = sum(other.step == step.step for other in plan.steps)  # finetune[name] when there are several
        label = f"{step.step}[{step.key.split('/', 1)[1]}]" if runs > 1 and "/" in step.key else step.step
        for name, uri, kind in uri_fields(step.config):
            if kind == OUTPUT or uri in (plan.layout.run, plan.layout.source) or _written(uri, written):
                continue
            check.field(f"{label}.{name}", uri, kind)
    return plan


def _written(uri: str, outputs: list[str]) -> bool:
    """True when ``uri`` is one of ``outputs`` or a path under one."""
    return any(uri == out or uri.startswith(out.rstrip("/") + "/") for out in outputs)


class StorageCheck:
    """One check run: one S3 client, and what each bucket answered (each is asked once)."""

    def __init__(self) -> None:
        self._client: Any = None
        self._buckets: dict[str, str | None] = {}  # bucket -> None (fine), _MISSING or a problem

    def field(self, name: str, uri: str, kind: str, creates_bucket: bool = False) -> None:
        """Raise ConfigError(name, 'URI: cause') when ``uri`` cannot serve as ``kind`` (FOLDER, FILE, ...)."""
        try:
            problem = self._problem(uri, kind, creates_bucket)
        except Exception as error:  # a storage error becomes the cause; anything else is a bug and is raised
            problem = storage_error_cause(error, for_check=True)
            if problem is None:
                raise
        if problem:
            raise ConfigError(name, f"{uri}: {problem}")

    @property
    def client(self) -> Any:
        """The S3 client of this run, made on first use (credentials are looked up then)."""
        if self._client is None:
            self._client = storage.s3_check_client()
        return self._client

    def _problem(self, uri: str, kind: str, creates_bucket: bool) -> str | None:
        scheme = storage.scheme_of(uri)
        if scheme == "file":
            return None if kind == REACHABLE else _local_problem(storage.strip_scheme(uri), kind)
        if scheme == "s3":
            return self._s3_problem(uri, kind, creates_bucket)
        return None if kind in (REACHABLE, OUTPUT) else _fsspec_problem(uri, kind)

    def _s3_problem(self, uri: str, kind: str, creates_bucket: bool) -> str | None:
        from botocore.exceptions import ClientError

        bucket, _, key = storage.strip_scheme(uri).partition("/")
        try:
            state = self._bucket_state(bucket)
        except ClientError as refused:
            # Some stores grant GetObject without ListBucket: a file that can be read is all a file input needs.
            if kind in (FILE, EITHER) and key and _status(refused) == 403 and self._readable(bucket, key):
                return None
            raise
        if state == _MISSING:
            return None if kind == REACHABLE or (kind == OUTPUT and creates_bucket) else \
                f"bucket {bucket!r} does not exist"
        if state or kind == REACHABLE:
            return state
        if kind == FILE:
            if not key:
                return "names a bucket, expected a file"
            if self._is_object(bucket, key):
                return None
            return "is a folder, expected a file" if self._has_objects_under(bucket, key) else "does not exist"
        if self._has_objects_under(bucket, key):
            return None
        is_file = bool(key) and self._is_object(bucket, key)
        if kind == EITHER:
            return None if is_file else "does not exist"
        if kind == OUTPUT:
            return "is a file, expected a folder" if is_file else None
        return "is a file, expected a folder" if is_file else "does not exist (no objects under it)"

    def _bucket_state(self, bucket: str) -> str | None:
        """None when the bucket answers in this region, _MISSING, or the problem (wrong region); raises a refusal."""
        from botocore.exceptions import ClientError

        if bucket in self._buckets:
            return self._buckets[bucket]
        try:
            answer = self.client.head_bucket(Bucket=bucket)
        except ClientError as error:
            if _status(error) == 404:
                self._buckets[bucket] = _MISSING
                return _MISSING
            if _status(error) == 403:
                # A HEAD answer has no body, so no error code (a wrong key, a wrong secret, a policy): a one-key
                # listing answers the same question with its code, and raises it.
                self.client.list_objects_v2(Bucket=bucket, MaxKeys=1)
            raise
        region = answer.get("BucketRegion")
        # botocore follows a bucket to its region, pyarrow (Ray Data, Ray Train) signs for AWS_REGION only.
        problem = _wrong_region(bucket, region) if region and region != storage.s3_region() else None
        self._buckets[bucket] = problem
        return problem

    def _has_objects_under(self, bucket: str, key: str) -> bool:
        prefix = f"{key}/" if key else ""
        return self.client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0) > 0

    def _is_object(self, bucket: str, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if _status(error) == 404:
                return False
            raise
        return True

    def _readable(self, bucket: str, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            return self._is_object(bucket, key)
        except ClientError:
            return False


def _local_problem(path: str, kind: str) -> str | None:
    """What is wrong with a local path for its kind, or None."""
    if kind == OUTPUT:
        if os.path.isfile(path):
            return "is a file, expected a folder"
        existing = path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            return f"cannot make a folder here: {existing} is a file"
        return None if os.access(existing, os.W_OK | os.X_OK) else f"cannot write in {existing}: permission denied"
    if not os.path.exists(path):
        return "does not exist"
    if kind == FOLDER and not os.path.isdir(path):
        return "is a file, expected a folder"
    if kind == FILE and os.path.isdir(path):
        return "is a folder, expected a file"
    return None if os.access(path, os.R_OK) else "cannot read it: permission denied"


def _fsspec_problem(uri: str, kind: str) -> str | None:
    """What is wrong with an input on another object store (gs://), or None."""
    fs, path = storage.filesystem(uri)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return "does not exist"
    except Exception as error:  # gcsfs's auth and HTTP errors share no base class: the first line is the cause
        return (str(error).strip().splitlines() or [type(error).__name__])[0]
    is_folder = info.get("type") == "directory"
    if kind == FOLDER and not is_folder:
        return "is a file, expected a folder"
    if kind == FILE and is_folder:
        return "is a folder, expected a file"
    return None


# --------------------------------------------------------------------------- causes


def storage_error_cause(error: BaseException, for_check: bool = False) -> str | None:
    """The one-line cause of a storage failure (botocore, s3fs, pyarrow, rxray.storage), or None for another error.

    Walks what the error wraps (its ``__cause__``, the remote error of a Ray task). A missing key is left
    alone unless ``for_check``: in a step's work it is the step's own error, with its own message.
    """
    for exc in _wrapped(error):
        cause = _botocore_cause(exc, for_check) or _arrow_cause(exc)
        if cause:
            return cause
        if isinstance(exc, storage.StorageError):
            return str(exc)
    return None


def _wrapped(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[Any] = [error]
    while todo:
        exc = todo.pop(0)
        if not isinstance(exc, BaseException) or id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        # What it was raised from (s3fs: `from` the botocore error) and Ray's RayTaskError.cause; not __context__,
        # which would pass a bug in an except block off as the storage error it was handling.
        todo += [exc.__cause__, getattr(exc, "cause", None)]


def _botocore_cause(exc: BaseException, for_check: bool) -> str | None:
    from botocore import exceptions as boto

    if isinstance(exc, boto.ClientError):
        info, meta = exc.response.get("Error", {}), exc.response.get("ResponseMetadata", {})
        code, status = str(info.get("Code", "")), meta.get("HTTPStatusCode")
        if not for_check and (status == 404 or code in ("NoSuchKey", "NotFound")):
            return None
        region = (meta.get("HTTPHeaders") or {}).get("x-amz-bucket-region")
        return _refusal(code, status, info.get("BucketName"), info.get("Message"), region)
    if isinstance(exc, boto.NoCredentialsError):
        return NO_CREDENTIALS
    if isinstance(exc, (boto.EndpointConnectionError, boto.ConnectTimeoutError, boto.ProxyConnectionError)):
        return f"cannot connect to the S3 endpoint {_endpoint(exc)}"
    if isinstance(exc, boto.ReadTimeoutError):
        return f"the S3 endpoint {_endpoint(exc)} did not answer in time (read timeout)"
    if isinstance(exc, boto.ConnectionClosedError):
        return f"the S3 endpoint {_endpoint(exc)} closed the connection on every attempt"
    if isinstance(exc, boto.PartialCredentialsError):
        return f"incomplete AWS credentials: {exc}"
    if isinstance(exc, boto.ProfileNotFound):
        return f"{exc} (check AWS_PROFILE)"
    if isinstance(exc, boto.BotoCoreError):
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None


def _arrow_cause(exc: BaseException) -> str | None:
    text = str(exc)
    match = _ARROW_ERROR.search(text)
    if not match:
        return None
    bucket = re.search(r"in bucket '([^']+)'", text)
    code, status = match["code"], int(match["status"]) if match["status"] else None
    if code == "NETWORK_CONNECTION":
        return f"cannot connect to the S3 endpoint {_endpoint(None)}"
    if storage.TRANSIENT_ARROW_ERROR.search(text):
        return f"the S3 endpoint {_endpoint(None)} kept failing ({code}, HTTP {status or '?'}) after every retry"
    if code not in _ARROW_CODES and status != 301:
        return None  # a missing key: the step's own error, with its own message
    if code == "ACCESS_DENIED" and match["op"].startswith("Head"):
        code, status = "403", 403  # a HEAD answer has no body: pyarrow's code is a guess between key, secret, policy
    return _refusal(_ARROW_CODES.get(code, code), status, bucket[1] if bucket else None, None, None)


def _refusal(code: str, status: int | None, bucket: str | None, message: str | None, region: str | None) -> str:
    """The cause of an S3 error answer, by its code (or HTTP status when a HEAD answer has none)."""
    where = f"bucket {bucket!r}" if bucket else "the bucket"
    if code in _REGION_CODES or status == 301:
        return _wrong_region(bucket, region)
    if code == "NoSuchBucket":
        return f"{where} does not exist"
    if code == "AccessDenied":
        return f"access denied to {where} (AccessDenied: these AWS credentials lack the permission)"
    if code == "InvalidAccessKeyId":
        return "the AWS access key id is not known (InvalidAccessKeyId: check AWS_ACCESS_KEY_ID or the profile)"
    if code == "SignatureDoesNotMatch":
        return "the AWS secret key does not match the access key id (SignatureDoesNotMatch: check " \
               "AWS_SECRET_ACCESS_KEY or the profile)"
    if code in _TOKEN_CODES:
        return f"the AWS session token has expired or is not valid ({code}: renew the credentials)"
    if status == 403:
        return f"access to {where} refused (HTTP 403: a wrong key or secret, or a missing permission)"
    if status and status >= 500:
        return f"the S3 endpoint {_endpoint(None)} kept failing ({code or status}: {message or 'no message'})"
    return f"S3 refused the request ({code or status}: {message or 'no message'})"


def _wrong_region(bucket: str | None, region: str | None) -> str:
    where = f"bucket {bucket!r}" if bucket else "the bucket"
    if region:
        return f"{where} is in region {region}, not {storage.s3_region()} (set AWS_REGION={region})"
    return f"{where} is not in region {storage.s3_region()} (set AWS_REGION to the bucket's region)"


def _endpoint(exc: BaseException | None) -> str:
    """The endpoint a request went to, named with the setting it came from."""
    for setting in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(setting):
            return f"{os.environ[setting]} ({setting})"
    url = urlparse(str(getattr(exc, "kwargs", {}).get("endpoint_url", "")))
    return f"{url.scheme}://{url.netloc}" if url.netloc else f"of region {storage.s3_region()}"


def _status(error: Any) -> int | None:
    """The HTTP status of a botocore ClientError."""
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
