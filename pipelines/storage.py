"""Every location is a URI: ``s3://bucket/prefix`` or a local path.

Two doors onto the same storage:
- ``filesystem(uri)``: a pyarrow filesystem and path, for Ray Data and Ray Train;
- ``s3_client()``: a boto3 client, for uploads (multipart), manifests and the registry.

Endpoint, region and credentials come from the standard AWS configuration (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles), so the same code talks to AWS S3,
MinIO or any S3-compatible store. boto3 reads AWS_ENDPOINT_URL itself; pyarrow does not, so we pass it as
``endpoint_override``. Credentials are never logged or written anywhere by this module.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs


# Throttling (SlowDown, 503) and transient network errors are retried with exponential backoff; the
# standard AWS_MAX_ATTEMPTS / AWS_RETRY_MODE variables override our defaults.
def _max_attempts() -> int:
    return int(os.environ.get("AWS_MAX_ATTEMPTS", 10))


class StorageError(RuntimeError):
    """A location cannot be reached or read; the message names the URI, never a credential."""


@dataclass(frozen=True)
class Location:
    scheme: str  # "s3" or "file"
    bucket: str  # empty for local paths
    key: str  # the object key (s3) or the absolute path (local)

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"


def parse(uri: str | os.PathLike) -> Location:
    uri = str(uri)
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")  # not urlparse: keys may hold '#' or '?'
        if not bucket:
            raise ValueError(f"{uri!r} names no bucket")
        return Location("s3", bucket, key.lstrip("/"))
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI {uri!r}: use s3://bucket/prefix or a local path")
    return Location("file", "", str(Path(uri.removeprefix("file://")).expanduser().resolve()))


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem on the configured endpoint, with retries; credentials from the AWS chain."""
    kwargs: dict = dict(region=_region(), retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=_max_attempts()))
    endpoint = _endpoint()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it (``bucket/key`` for S3)."""
    loc = parse(uri)
    if loc.is_s3:
        return s3_filesystem(), f"{loc.bucket}/{loc.key}".rstrip("/")
    return pafs.LocalFileSystem(), loc.key


@functools.cache
def s3_client():
    """A boto3 S3 client (cached per process): adaptive retries with backoff on throttling."""
    import boto3  # heavy, and not needed for local paths or by pyarrow's S3 (Ray Data, Ray Train)
    from botocore.config import Config  # with boto3

    # botocore says at INFO where it found credentials and the endpoint, for every client of every process.
    if logging.getLogger("botocore").level == logging.NOTSET:  # a level the user set is theirs
        logging.getLogger("botocore").setLevel(logging.WARNING)
    retries = {"max_attempts": _max_attempts(), "mode": os.environ.get("AWS_RETRY_MODE", "adaptive")}
    config = Config(retries=retries, connect_timeout=10, read_timeout=60)
    return boto3.session.Session().client("s3", region_name=_region(), config=config)


def _s3_errors():
    from botocore.exceptions import BotoCoreError, ClientError  # with boto3: only where S3 is used

    return (BotoCoreError, ClientError)


def _not_found(err: Exception) -> bool:
    code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound")


def read_bytes(uri: str) -> bytes:
    loc = parse(uri)
    if not loc.is_s3:
        return Path(loc.key).read_bytes()
    try:
        return s3_client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
    except _s3_errors() as e:
        if _not_found(e):
            raise FileNotFoundError(uri) from None
        raise StorageError(f"cannot read {uri}: {e}") from None


def write_bytes(uri: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
    """Write an object whole: readers see the old or the new content, never a part."""
    loc = parse(uri)
    if not loc.is_s3:
        path = Path(loc.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix=".tmp-") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(f.name, 0o666 & ~umask)  # as an ordinary open() would create it, not mkstemp's 0600
        os.replace(f.name, path)
        return
    try:
        s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data, Metadata=metadata or {})
    except _s3_errors() as e:
        raise StorageError(f"cannot write {uri}: {e}") from None


def upload_file(local_path: str | Path, uri: str, metadata: dict[str, str] | None = None) -> None:
    """Copy a local file to ``uri``: boto3's managed transfer (multipart, parallel parts, retries) for S3."""
    loc = parse(uri)
    if not loc.is_s3:
        dest = Path(loc.key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{dest.name}")
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, dest)
        return
    from boto3.s3.transfer import TransferConfig  # heavy: only for uploads to S3

    config = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20, max_concurrency=4)
    try:
        s3_client().upload_file(
            str(local_path), loc.bucket, loc.key, ExtraArgs={"Metadata": metadata or {}}, Config=config
        )
    except _s3_errors() as e:
        raise StorageError(f"cannot upload to {uri}: {e}") from None


def head(uri: str) -> dict | None:
    """Size and user metadata of an object, or None if there is none."""
    loc = parse(uri)
    if not loc.is_s3:
        path = Path(loc.key)
        return {"size": path.stat().st_size, "metadata": {}} if path.is_file() else None
    try:
        r = s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
    except _s3_errors() as e:
        if _not_found(e):
            return None
        raise StorageError(f"cannot reach {uri}: {e}") from None
    return {"size": r["ContentLength"], "metadata": r.get("Metadata", {})}


def exists(uri: str) -> bool:
    return head(uri) is not None


def list_files(uri: str, suffix: str = "") -> list[str]:
    """URIs of the files below a prefix (recursively), sorted."""
    loc = parse(uri)
    if not loc.is_s3:
        root = Path(loc.key)
        return sorted(str(p) for p in root.rglob(f"*{suffix}") if p.is_file()) if root.exists() else []
    prefix = loc.key.rstrip("/") + "/" if loc.key else ""
    out = []
    try:
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
            out += [f"s3://{loc.bucket}/{o['Key']}" for o in page.get("Contents", []) if o["Key"].endswith(suffix)]
    except _s3_errors() as e:
        raise StorageError(f"cannot list {uri}: {e}") from None
    return sorted(out)


def ensure_bucket(uri: str) -> None:
    """Create the bucket of an S3 URI if it does not exist (local: the folder)."""
    loc = parse(uri)
    if not loc.is_s3:
        Path(loc.key).mkdir(parents=True, exist_ok=True)
        return
    client = s3_client()
    try:
        client.head_bucket(Bucket=loc.bucket)
    except _s3_errors() as e:
        if not _not_found(e) and "404" not in str(e):
            raise StorageError(f"cannot reach bucket {loc.bucket}: {e}") from None
        try:
            client.create_bucket(Bucket=loc.bucket)
        except _s3_errors() as e:
            raise StorageError(f"cannot create bucket {loc.bucket}: {e}") from None


# Compare-and-swap, for the registry: a version number is claimed by creating its marker only if it does not
# exist, and an alias moves only if nobody moved it since it was read. On S3 these are conditional writes
# (If-None-Match: *, If-Match: <etag>), which AWS S3, MinIO and recent S3-compatible stores honour; boto3's
# managed transfer does not pass them, so these are single put_object calls (small JSON). On a local path,
# O_CREAT|O_EXCL is the atomic primitive: rename alone would let two writers both "win".


class PreconditionFailed(RuntimeError):
    """A conditional write lost: the object exists already, or changed since it was read."""


class LockHeld(PreconditionFailed):
    """A local path's lock file exists: another writer is at work, or a killed one left it (named)."""


def _precondition_failed(err: Exception) -> bool:
    code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
    status = getattr(err, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412


def create_exclusive(uri: str, data: bytes) -> None:
    """Write ``uri`` only if nothing is there; PreconditionFailed if something is."""
    loc = parse(uri)
    if not loc.is_s3:
        # Written whole under another name, then linked into place: link() fails if the name exists, so the
        # create is exclusive, and no reader ever sees a partly written file.
        path = Path(loc.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-") as f:
            f.write(data)
            f.flush()
            os.chmod(f.name, 0o644)
            try:
                os.link(f.name, path)
            except FileExistsError:
                raise PreconditionFailed(f"{uri} exists already") from None
        return
    try:
        s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data, IfNoneMatch="*")
    except _s3_errors() as e:
        if _precondition_failed(e):
            raise PreconditionFailed(f"{uri} exists already") from None
        raise StorageError(f"cannot write {uri}: {e}") from None


def read_tagged(uri: str) -> tuple[bytes, str] | None:
    """An object's content and a tag that changes whenever it is replaced (the S3 ETag; a local file's
    sha256), or None if there is none."""
    loc = parse(uri)
    if not loc.is_s3:
        try:
            data = Path(loc.key).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()
    try:
        r = s3_client().get_object(Bucket=loc.bucket, Key=loc.key)
        return r["Body"].read(), r["ETag"]
    except _s3_errors() as e:
        if _not_found(e):
            return None
        raise StorageError(f"cannot read {uri}: {e}") from None


def replace_if(uri: str, data: bytes, tag: str | None, *, lock_wait_s: float = 5.0) -> None:
    """Write ``uri`` only if it still has ``tag`` (None: only if it does not exist); PreconditionFailed if
    someone else wrote it in between. Local paths: a lock file created exclusively serialises writers, and
    the tag is checked under it; a lock held past ``lock_wait_s`` (left by a killed writer) is named in the error."""
    if tag is None:
        return create_exclusive(uri, data)
    loc = parse(uri)
    if loc.is_s3:
        try:
            s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data, IfMatch=tag)
        except _s3_errors() as e:
            if _precondition_failed(e) or _not_found(e):
                raise PreconditionFailed(f"{uri} changed since it was read") from None
            raise StorageError(f"cannot write {uri}: {e}") from None
        return
    lock = Path(loc.key + ".lock")
    # A live writer holds the lock for milliseconds (read, compare, write): wait that out, so that a
    # concurrent writer gets the honest answer (PreconditionFailed) rather than a busy signal.
    deadline = time.monotonic() + lock_wait_s
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            if time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            held = lock.read_text(errors="replace").strip() if lock.exists() else "?"
            raise LockHeld(
                f"{uri} is being changed by another writer: {lock} exists ({held}) since over {lock_wait_s:g} s; "
                "if that writer no longer runs, it was killed while writing: delete the lock file"
            ) from None
    try:
        with os.fdopen(fd, "w") as f:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}")
        current = read_tagged(uri)
        if current is None or current[1] != tag:
            raise PreconditionFailed(f"{uri} changed since it was read")
        write_bytes(uri, data)
    finally:
        lock.unlink(missing_ok=True)
