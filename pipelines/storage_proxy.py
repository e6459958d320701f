"""Object storage as it behaves in production, on loopback: an HTTP proxy in front of an S3-compatible
endpoint (moto's server, pipelines/local_s3.py) that adds a first-byte latency and a per-connection
bandwidth limit, counts requests by S3 operation and bytes, and injects faults on demand (503 SlowDown for a
share of requests, a connection reset after N bytes of a body, a fixed status for chosen keys).

For the tests and the benchmarks: point ``AWS_ENDPOINT_URL`` at ``proxy.url`` and every boto3 and pyarrow
client (Ray's workers included) goes through it. Written here because the maintained tool for this job,
Toxiproxy, is a Go server that is not installable from the package index (only its clients are), and it
knows TCP, not S3 operations.

Threads, not asyncio: one thread per connection, as many as the clients open, which for tests is a handful.
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import http.client
import os
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pipelines import storage

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Profile:
    """How the store answers: the wait before a response's first byte, and each connection's bandwidth."""

    name: str
    first_byte_s: float = 0.0
    bytes_per_s: float | None = None  # None: as fast as loopback goes


LOOPBACK = Profile("loopback")
# An assumption of ours from published measurements of S3 Standard (not measured here): a GET's first byte
# after about 30 ms, about 90 MB/s on one connection.
S3 = Profile("s3", first_byte_s=0.030, bytes_per_s=90e6)
PROFILES = {p.name: p for p in (LOOPBACK, S3)}


@dataclass
class Faults:
    """What to break, switched per test. Patterns are shell-style (fnmatch) patterns of ``bucket/key``:
    ``"data/*"`` is a whole bucket, ``"*/cat.jpg"`` one file name anywhere."""

    slow_down: float = 0.0  # share of requests answered 503 SlowDown
    reset_after: int | None = None  # a GET body's connection breaks off after this many bytes ...
    reset_times: int = 1  # ... this many times per object (-1: every GET that long) ...
    # ... with an early end (FIN), by default: the client reads every byte sent, then finds the body short. A
    # TCP reset (RST) makes the client's kernel drop what it received and the client has not read yet, so
    # where its read breaks depends on timing; clients must cope with both.
    rst: bool = False
    status: dict[str, int] = field(default_factory=dict)  # pattern -> status answered instead (403, 404, 500)
    # pattern -> how many times a write is done upstream but its response is lost (the connection reset): the
    # client's retry then meets its own write.
    lose_response: dict[str, int] = field(default_factory=dict)


def _matches(key: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(key, pattern)


def operation(method: str, path: str, query: dict, headers) -> str:
    """The S3 operation of a request, by its REST shape: GET, ranged GET, HEAD, LIST, PUT, part, ..."""
    bucket_only = path.strip("/").count("/") == 0
    if method == "GET":
        if bucket_only or "list-type" in query:
            return "LIST"
        return "ranged GET" if "range" in headers else "GET"
    if method == "PUT":
        return "part" if "partNumber" in query else "PUT"
    if method == "POST":
        return "multipart start" if "uploads" in query else "multipart complete" if "uploadId" in query else "POST"
    return method  # HEAD, DELETE


class StorageProxy:
    """``with StorageProxy(upstream, S3) as proxy:`` -> ``proxy.url``. What it saw: ``proxy.counts`` by
    operation and fault injected ("503 injected", "body cut", "response lost", ...), ``proxy.gets_by_key``,
    ``proxy.bytes_sent`` (response bodies) and ``proxy.bytes_received`` (request bodies),
    ``proxy.max_in_flight`` (requests answered at once, at most). ``proxy.profile`` and ``proxy.faults`` may
    change at any time; ``proxy.reset()``: the profile it started with, no faults, counts at zero."""

    def __init__(self, upstream: str, profile: Profile = LOOPBACK, host: str = "127.0.0.1", port: int = 0):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.profile, self.faults = profile, Faults()
        self.default_profile = profile
        self.counts: collections.Counter[str] = collections.Counter()
        self.gets_by_key: collections.Counter[str] = collections.Counter()  # bucket/key -> GETs
        self.bytes_sent = self.bytes_received = self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._rng = random.Random(0)
        self._resets: collections.Counter[str] = collections.Counter()  # bodies cut per object, for reset_times
        ThreadingHTTPServer.request_queue_size = 128  # connections waiting to be accepted (5 by default)
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="storage-proxy", daemon=True)

    def __enter__(self) -> StorageProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.gets_by_key.clear()
            self.bytes_sent = self.bytes_received = self.max_in_flight = 0

    def reset(self) -> None:
        """The proxy as it started: its profile, no faults, counts at zero (between tests)."""
        with self._lock:
            self.profile, self.faults = self.default_profile, Faults()
            self._rng.seed(0)
            self._resets.clear()
        self.reset_counts()

    def gets(self, suffix: str = "") -> int:
        """GETs of object bytes, whole or ranged (of the keys that end in ``suffix``)."""
        return sum(n for key, n in self.gets_by_key.items() if key.endswith(suffix))

    def _begin(self, op: str, key: str) -> None:
        with self._lock:
            self.counts[op] += 1
            if op in ("GET", "ranged GET"):
                self.gets_by_key[key] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _end(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _decide(self, method: str, key: str) -> tuple[int | None, int | None, bool]:
        """For a request for ``key``: a status to answer instead, the bytes after which to reset the body,
        and whether to lose the response of a write done upstream."""
        with self._lock:
            f = self.faults
            for pattern, status in f.status.items():
                if _matches(key, pattern):
                    self.counts[f"{status} injected"] += 1
                    return status, None, False
            if f.slow_down and self._rng.random() < f.slow_down:
                self.counts["503 injected"] += 1
                return 503, None, False
            if method in ("PUT", "POST"):
                for pattern, times in f.lose_response.items():
                    if times > 0 and _matches(key, pattern):
                        f.lose_response[pattern] -= 1
                        self.counts["response lost"] += 1
                        return None, None, True
            if method == "GET" and f.reset_after is not None:
                return None, f.reset_after, False  # cut if the body is that long and cuts are left (``_cut``)
            return None, None, False

    def _cut(self, key: str) -> bool:
        """Whether to cut this body of ``key`` now: each object's cuts are counted as they happen."""
        with self._lock:
            if self.faults.reset_times >= 0 and self._resets[key] >= self.faults.reset_times:
                return False
            self._resets[key] += 1
            self.counts["body cut"] += 1
            return True

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: the counts say what happened
                pass

            def _forward(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
                headers = {k.lower(): v for k, v in self.headers.items()}
                op = operation(self.command, url.path, query, headers)
                proxy._begin(op, urllib.parse.unquote(url.path.lstrip("/")))
                try:
                    self._answer(url, headers)
                finally:
                    proxy._end()

            def _answer(self, url: urllib.parse.SplitResult, headers: dict[str, str]) -> None:
                body = self._body(headers)
                with proxy._lock:
                    proxy.bytes_received += len(body or b"")
                profile = proxy.profile
                status, reset_after, lose = proxy._decide(self.command, urllib.parse.unquote(url.path.lstrip("/")))
                if profile.first_byte_s:
                    time.sleep(profile.first_byte_s)
                if status is not None:
                    self._error(status)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    # Expect: 100-continue was answered here; a chunked body goes on whole, with its length.
                    dropped = ("expect", "transfer-encoding", "content-length")
                    forwarded = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                    upstream.request(self.command, self.path, body=body, headers=forwarded)
                    response = upstream.getresponse()
                    if lose:  # done upstream; the client never hears of it
                        response.read()
                        self._reset()
                        return
                    self.send_response_only(response.status, response.reason)
                    for name, value in response.getheaders():
                        if name.lower() not in ("transfer-encoding", "connection"):
                            self.send_header(name, value)
                    if response.getheader("content-length") is None:  # a chunked body: its end is the close
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    self.end_headers()
                    if self.command != "HEAD":
                        key = urllib.parse.unquote(url.path.lstrip("/"))
                        self._stream(response, profile.bytes_per_s, reset_after, key)
                finally:
                    upstream.close()

            def _body(self, headers: dict[str, str]) -> bytes | None:
                """The request's body: by its Content-Length, or de-chunked (the AWS SDK under pyarrow sends
                uploads with Transfer-Encoding: chunked)."""
                if "chunked" not in headers.get("transfer-encoding", "").lower():
                    length = int(headers.get("content-length", 0) or 0)
                    return self.rfile.read(length) if length else None
                parts = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()  # the CRLF after the chunk
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers, up to a blank line
                    pass
                return b"".join(parts)

            def _reset(self) -> None:
                """Drop the connection as a network does: SO_LINGER 0 makes close() send a RST, not a clean end."""
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _stream(self, response, rate: float | None, reset_after: int | None, key: str) -> None:
                """The body at ``rate`` bytes/s; with ``reset_after``, the connection ends after that many bytes."""
                sent, start = 0, time.monotonic()
                while chunk := response.read(CHUNK):
                    if reset_after is not None and sent + len(chunk) > reset_after and proxy._cut(key):
                        self.wfile.write(chunk[: max(reset_after - sent, 0)])
                        if proxy.faults.rst:
                            self._reset()
                            return
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_WR)  # FIN before the promised length
                        self.close_connection = True
                        return
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    with proxy._lock:
                        proxy.bytes_sent += len(chunk)
                    if rate:  # the bytes so far may not have arrived sooner than the bandwidth allows
                        ahead = sent / rate - (time.monotonic() - start)
                        if ahead > 0:
                            time.sleep(ahead)

            def _error(self, status: int) -> None:
                code = {503: "SlowDown", 403: "AccessDenied", 404: "NoSuchKey"}.get(status, "InternalError")
                body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected by the storage proxy</Message></Error>'.encode()  # noqa: E501
                self.send_response_only(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        return Handler


@contextlib.contextmanager
def proxied_local_s3(profile: Profile = LOOPBACK) -> Iterator[StorageProxy]:
    """moto's server on loopback behind a StorageProxy; ``AWS_ENDPOINT_URL`` names the proxy, for this
    process and every process it starts afterwards (a Ray cluster's workers, jobs)."""
    from pipelines.local_s3 import local_s3

    with local_s3() as upstream, StorageProxy(upstream, profile) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url  # local_s3 restores the variables when it ends
        storage.s3_client.cache_clear()
        yield proxy
