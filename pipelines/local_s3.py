"""An S3-compatible endpoint on loopback (moto's server mode), for the demo and the tests.

Real boto3 and pyarrow HTTP traffic, real multipart uploads, nothing leaves the machine. The endpoint and a
pair of throwaway keys are put into the standard AWS environment variables, so that every process started
afterwards (Ray workers included) finds them the way it would find a real S3 or MinIO.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pipelines import storage

# The local server accepts any keys; these are placeholders, not credentials.
LOCAL_ENV = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_REGION": "us-east-1"}


_handed_out: set[int] = set()


SERVE_REPLICA_PORTS = 30000  # Serve's replicas listen from here (direct ingress: HTTP 30000-31000, gRPC 40000-)


def _port_range() -> range:
    """Where free_port draws from: above the ports services listen on by default (Ray's workers take
    10002-19999), below the ports Serve's replicas pick for themselves (a port handed out here and bound a
    moment later could be one a replica took meanwhile), and below the ephemeral range, from which the kernel
    picks the local port of every outgoing connection (Linux: 32768-60999 by default, read from /proc;
    macOS: from 49152). Empty where a machine's ephemeral range starts lower."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return range(20000, min(low, SERVE_REPLICA_PORTS))


def free_port() -> int:
    """A TCP port free on loopback now, for a server that binds it a moment later (the S3 endpoint, Serve's
    HTTP proxy and HAProxy, a test cluster's nodes).

    Not the kernel's choice (bind to port 0): that comes from the ephemeral range, and the kernel hands the
    same port to the next outgoing connection of any process; once, one of Ray's took Serve's port before
    HAProxy bound it ("Address already in use", the demo failed). Nor a port this process already handed
    out: several are drawn before the first is bound. (Where no range is left below the ephemeral one, the
    kernel's choice after all.)"""
    ports = _port_range()
    rng = random.SystemRandom()
    for _ in range(200 if len(ports) > 1000 else 0):
        port = rng.choice(ports)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_s3(port: int | None = None) -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1, export AWS_ENDPOINT_URL and keys, yield the endpoint URL."""
    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {k: os.environ.get(k) for k in [*LOCAL_ENV, "AWS_ENDPOINT_URL"]}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the local S3 endpoint (moto server) did not start") from None
                time.sleep(0.2)
        os.environ.update(LOCAL_ENV, AWS_ENDPOINT_URL=endpoint)
        storage.s3_client.cache_clear()  # a client made before would still point elsewhere
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
