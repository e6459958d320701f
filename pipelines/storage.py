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

import collections
import functools
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

log = logging.getLogger(__name__)


# Throttling (SlowDown, 503) and transient network errors are retried with exponential backoff; the
# standard AWS_MAX_ATTEMPTS / AWS_RETRY_MODE variables override our defaults.
def _max_attempts() -> int:
    return int(os.environ.get("AWS_MAX_ATTEMPTS", 10))


class StorageError(OSError):
    """A location cannot be reached or read; the message names the URI, never a credential. An OSError, as
    the errors of local files are, so that readers catch one kind of I/O error."""


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


READ_BUFFER = 8 * 2**20  # bytes per GET when an object is streamed
READ_AHEAD = 3  # GETs of a stream under way at once, ahead of the reader


def open_stream(uri: str):
    """A sequential reader of ``uri`` (``read(n)``, a context manager). On S3, one ranged GET per
    READ_BUFFER bytes, fetched ahead of the reader (``ReadAhead``). A missing object is FileNotFoundError, a
    forbidden one PermissionError (S3 answers 403 for a missing key too, when the reader may not list the
    bucket), other failures StorageError: all OSErrors, raised here or by a ``read``."""
    loc = parse(uri)
    if not loc.is_s3:
        return pafs.LocalFileSystem().open_input_stream(loc.key, buffer_size=READ_BUFFER)
    return ReadAhead(loc, uri)


class ReadAhead:
    """An S3 object as a sequential stream of ranged GETs of READ_BUFFER bytes, READ_AHEAD of them under way
    ahead of the reader: a task waits on storage's latency about once per object, not once per chunk, and
    an object is fetched over several connections at once (S3's bandwidth is per connection, and AWS
    advises ranged GETs in parallel). The first READ_AHEAD GETs go out together, before the object's size
    is known (the first tells it: no HEAD; one past a small object's end comes back empty, so an object
    costs at most READ_AHEAD - 1 GETs more than ceil(size / READ_BUFFER)). Each GET that breaks off is
    resumed from the byte it reached (``_read_range``).

    Written here because pyarrow's S3 stream fetches only when the reader asks (its ``buffer_size``: one GET
    at a time, the reader waiting on each) and boto3's transfer manager downloads whole files, not streams."""

    def __init__(self, loc: Location, uri: str, chunk: int = READ_BUFFER):
        self._loc, self._uri, self._chunk = loc, uri, chunk
        self._pool = ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="read-ahead")
        starts = range(0, READ_AHEAD * chunk, chunk)
        self._pending = collections.deque(self._pool.submit(_read_range, loc, uri, s, s + chunk) for s in starts)
        self._next, self._failed = READ_AHEAD * chunk, None
        try:
            first, self._etag, self._size = self._pending.popleft().result()  # errors (404, 403) raise here
        except BaseException:
            self.close()
            raise
        self._current, self._pos = memoryview(first), 0
        self._fetch_next()

    def _fetch_next(self) -> None:
        if self._next < self._size:
            end = min(self._next + self._chunk, self._size)
            self._pending.append(self._pool.submit(_read_range, self._loc, self._uri, self._next, end, self._etag))
            self._next = end

    def _take_next(self) -> bool:
        """The next chunk as the current one; False at the end. An error is raised now and by every later read."""
        if self._failed is None and not self._pending:
            return False
        try:
            if self._failed is not None:
                raise self._failed
            data, etag, _ = self._pending.popleft().result()
            if data and etag != self._etag:  # the one GET sent without If-Match: the object changed since
                raise _Replaced(f"{self._uri} was replaced while it was read")
        except BaseException as e:
            self._failed = e
            raise
        self._current, self._pos = memoryview(data), 0
        self._fetch_next()
        return True

    def read(self, size: int = -1) -> bytes:
        parts = []
        while size != 0:
            if self._pos == len(self._current):
                if not self._take_next():
                    break
                continue
            end = len(self._current) if size < 0 else min(len(self._current), self._pos + size)
            parts.append(self._current[self._pos : end])
            size -= 0 if size < 0 else end - self._pos
            self._pos = end
        return b"".join(parts)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # at most the GETs under way

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    # max_pool_connections: streams fetch ahead and ``sizes`` sends HEADs at once, from several threads.
    config = Config(retries=retries, connect_timeout=10, read_timeout=60, max_pool_connections=32)
    return boto3.session.Session().client("s3", region_name=_region(), config=config)


def _s3_errors():
    from botocore.exceptions import BotoCoreError, ClientError  # with boto3: only where S3 is used

    return (BotoCoreError, ClientError)


def _code(err: Exception) -> str:
    """The S3 error code of a boto3 error ("" for others)."""
    return getattr(err, "response", {}).get("Error", {}).get("Code", "")


def _not_found(err: Exception) -> bool:
    return _code(err) in ("404", "NoSuchKey", "NotFound")


def _denied(err: Exception) -> bool:
    return _code(err) in ("403", "AccessDenied", "Forbidden")


def _client_error(err: Exception, uri: str, doing: str = "read") -> Exception:
    """A boto3 error as what it means for the caller: missing, forbidden, or storage that failed."""
    if _not_found(err):
        return FileNotFoundError(f"{uri} does not exist")
    if _denied(err):
        return PermissionError(f"access denied to {uri}")
    return StorageError(f"cannot {doing} {uri}: {err}")


STREAM_PIECE = 256 * 2**10  # bytes read from a response at a time: what a broken connection costs to re-read


class _Replaced(StorageError):
    """The object was replaced between two GETs of one read."""


def _read_range(loc: Location, uri: str, start: int = 0, end: int | None = None, etag: str | None = None):
    """Bytes [start, end) of an object (``end`` None: to its end; a range past the end: what there is, maybe
    nothing) -> (bytes, ETag, the object's size).

    botocore retries a request (503 SlowDown, a connection refused, with backoff), but not a response body
    that breaks off: that is resumed here with a ranged GET from the byte reached, of the same object
    (If-Match its ETag: one replaced meanwhile is _Replaced), as long as each GET brings some bytes."""
    import urllib3  # with boto3
    from botocore.exceptions import FlexibleChecksumError  # with boto3

    client, parts, size, stalled = s3_client(), [], None, 0
    while stalled < _max_attempts():
        at = start + sum(map(len, parts))
        known = [x for x in (end, size) if x is not None]
        if known and at >= min(known):
            break  # the body broke off after its last byte
        request = {"Bucket": loc.bucket, "Key": loc.key}
        if at > 0 or end is not None:
            request["Range"] = f"bytes={at}-{'' if end is None else end - 1}"
        if etag:
            request["IfMatch"] = etag
        try:
            response = client.get_object(**request)
        except _s3_errors() as e:
            if _precondition_failed(e):
                raise _Replaced(f"{uri} was replaced while it was read") from None
            if _code(e) == "InvalidRange":
                return b"", etag or "", size if size is not None else at  # nothing from ``at`` on
            raise _client_error(e, uri) from None
        etag = etag or response["ETag"]
        total = response.get("ContentRange", "").rpartition("/")[2]
        size = int(total) if total.isdigit() else response["ContentLength"]
        before = len(parts)
        try:
            while piece := response["Body"].read(STREAM_PIECE):
                parts.append(piece)
        except FlexibleChecksumError:  # every byte came, but not the bytes stored: all again
            log.warning("%s: the bytes read do not match the object's checksum; reading them again", uri)
            parts, stalled = [], stalled + 1
            continue
        except (*_s3_errors(), urllib3.exceptions.HTTPError, OSError) as e:
            stalled = 0 if len(parts) > before else stalled + 1
            log.info("%s: the connection broke at byte %d (%s); resuming", uri, start + sum(map(len, parts)), e)
            continue
        break
    data = b"".join(parts)
    if size is None or len(data) != (size if end is None else min(end, size)) - start:
        raise StorageError(f"cannot read {uri}: the connection broke off {_max_attempts()} times in a row")
    return data, etag, size


def read_bytes(uri: str) -> bytes:
    """An object whole. FileNotFoundError if there is none, PermissionError if we may not read it."""
    loc = parse(uri)
    if not loc.is_s3:
        return Path(loc.key).read_bytes()
    return _read_whole(loc, uri)[0]


def _read_whole(loc: Location, uri: str) -> tuple[bytes, str]:
    for _ in range(3):  # an object replaced while it is read is read again, whole
        try:
            data, etag, _ = _read_range(loc, uri)
            return data, etag
        except _Replaced:
            continue
    raise StorageError(f"cannot read {uri}: it was replaced 3 times while it was read")


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
        raise StorageError(f"access denied to {uri}" if _denied(e) else f"cannot reach {uri}: {e}") from None
    return {"size": r["ContentLength"], "metadata": r.get("Metadata", {})}


def exists(uri: str) -> bool:
    return head(uri) is not None


def sizes(uris: list[str]) -> dict[str, int | None]:
    """The size of each object (None where there is none), in few requests: objects of one S3 folder by
    one LIST per 1000 (from their common prefix, up to the last of them), others by concurrent HEADs."""
    locs = [parse(u) for u in uris]
    folders = {(loc.bucket, loc.key.rpartition("/")[0]) for loc in locs if loc.is_s3}
    if len(uris) > 1 and len(folders) == 1 and all(loc.is_s3 for loc in locs):
        bucket = locs[0].bucket
        keys = [loc.key for loc in locs]
        prefix, last, found = os.path.commonprefix(keys), max(keys), {}  # noqa: RUF071 (a key prefix, not a path)
        try:
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                found.update((o["Key"], o["Size"]) for o in page.get("Contents", []))
                if page.get("Contents") and page["Contents"][-1]["Key"] >= last:
                    break  # keys come in order: the rest of the prefix is none of ours
        except _s3_errors() as e:
            raise StorageError(f"cannot list s3://{bucket}/{prefix}: {e}") from None
        return {u: found.get(loc.key) for u, loc in zip(uris, locs)}
    with ThreadPoolExecutor(min(32, max(1, len(uris)))) as pool:
        heads = list(pool.map(head, uris))
    return {u: h["size"] if h else None for u, h in zip(uris, heads)}


def check_buckets(uris: list[str]) -> None:
    """One clear StorageError, before any work starts, for a bucket that does not exist, cannot be reached
    or may not be read; a single object that is missing or forbidden is left to the caller. (A reader
    without s3:ListBucket gets 403 for the bucket but may read its objects: then its first few decide.)"""
    first: dict[str, list[str]] = {}
    for uri in uris:
        loc = parse(uri)
        if loc.is_s3 and len(first.setdefault(loc.bucket, [])) < 3:
            first[loc.bucket].append(uri)
    for bucket, some in first.items():
        try:
            s3_client().head_bucket(Bucket=bucket)
            continue
        except _s3_errors() as e:
            if _not_found(e) or "NoSuchBucket" in str(e):
                raise StorageError(f"bucket {bucket} does not exist (endpoint {_endpoint() or 'AWS'})") from None
            if not _denied(e):
                raise StorageError(f"cannot reach bucket {bucket}: {e}") from None
        # 403 for the bucket: its first objects decide (all denied: the bucket is; one: that object's problem)
        with ThreadPoolExecutor(len(some)) as pool:
            denied = list(pool.map(_head_denied, some))
        if all(denied):
            raise StorageError(f"access denied to bucket {bucket} (and to {some[0]}): check the credentials")


def _head_denied(uri: str) -> bool:
    loc = parse(uri)
    try:
        s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
    except _s3_errors() as e:
        return _denied(e)
    return False


def list_files(uri: str, suffix: str = "") -> list[str]:
    """URIs of the files below a prefix (recursively), sorted."""
    return sorted(u for page in list_pages(uri, suffix) for u in page)


def list_pages(uri: str, suffix: str = "", page_size: int = 1000) -> Iterator[list[str]]:
    """The files below a prefix (recursively) a page at a time, as S3 lists them (1,000 keys per LIST, in key
    order), so that a corpus of millions is never one list in memory. Local folders: by name, folder by folder."""
    loc = parse(uri)
    if not loc.is_s3:
        root = Path(loc.key)
        page: list[str] = []
        for folder, dirs, files in os.walk(root) if root.is_dir() else []:
            dirs.sort()
            page += [path for name in sorted(files) if (path := os.path.join(folder, name)).endswith(suffix)]
            if len(page) >= page_size:
                yield page
                page = []
        if page:
            yield page
        return
    prefix = loc.key.rstrip("/") + "/" if loc.key else ""
    try:
        paging = {"PageSize": page_size}
        for listed in (
            s3_client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=loc.bucket, Prefix=prefix, PaginationConfig=paging)
        ):
            found = [f"s3://{loc.bucket}/{o['Key']}" for o in listed.get("Contents", []) if o["Key"].endswith(suffix)]
            if found:
                yield found
    except _s3_errors() as e:
        raise StorageError(f"cannot list {uri}: {e}") from None


def normalise(uri: str, base: str) -> str:
    """One spelling per object: ``s3://b/k`` as S3 names it (a leading ``/`` of the key dropped), a local path
    absolute and normalised (``./a.jpg``, ``x/../a.jpg`` and ``a.jpg`` are one file; relative to ``base``).
    Without touching the file system (no symlinks resolved), so that millions of names cost no requests."""
    uri = uri.strip()
    if uri.startswith("s3://"):
        loc = parse(uri)
        return f"s3://{loc.bucket}/{loc.key}"
    path = os.path.expanduser(uri.removeprefix("file://"))
    return os.path.normpath(os.path.join(base, path))


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
    status = getattr(err, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return _code(err) in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412


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
        return _read_whole(loc, uri)
    except FileNotFoundError:
        return None


def _process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it runs, as another user; anything else: do not guess
        return False
    return False


def _recover_stale_lock(lock: Path) -> bool:
    """Delete ``lock`` if the writer it names ("pid N on HOST since ...") ran on this machine and is gone
    (killed while writing); True if it did. Another host's lock, a live pid's, or one not yet written (it is
    empty for a moment after its creation) is left alone."""
    try:
        held = lock.read_text(errors="replace")
    except FileNotFoundError:
        return False
    words = held.split()
    if len(words) < 4 or words[0] != "pid" or not words[1].isdigit() or words[2] != "on":
        return False
    pid, host = int(words[1]), words[3]
    if pid <= 0 or host != socket.gethostname() or not _process_gone(pid):
        return False
    # Two writers can find the same stale lock at once. Had each simply deleted it, the slower one could
    # delete the lock the faster one had just created anew, and both would write. So the lock is first moved
    # aside under a name of our own (rename is atomic: one of them gets the file, the other FileNotFoundError),
    # and deleted only if it is still the stale content read above; if it is a new writer's lock (created
    # between our read and our rename), it is linked back (link never replaces a file) and left alone.
    aside = Path(f"{lock}.{os.urandom(8).hex()}.stale")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return False
    try:
        if aside.read_text(errors="replace") != held:
            try:
                os.link(aside, lock)
            except FileExistsError:  # a third writer locked in that instant: two holders, a race not solved
                log.warning("%s: a lock was replaced while it was held", lock)
            return False
    finally:
        aside.unlink(missing_ok=True)
    log.warning(
        "%s: removed a lock left by pid %d on this host, which no longer runs (killed while writing)", lock, pid
    )
    return True


def replace_if(uri: str, data: bytes, tag: str | None, *, lock_wait_s: float = 5.0) -> None:
    """Write ``uri`` only if it still has ``tag`` (None: only if it does not exist); PreconditionFailed if
    someone else wrote it in between. Local paths: a lock file created exclusively serialises writers, and
    the tag is checked under it; a lock whose writer is gone from this host is recovered at once, and one
    held past ``lock_wait_s`` otherwise (another host's writer, killed) is named in the error."""
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
            if _recover_stale_lock(lock):
                continue
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
