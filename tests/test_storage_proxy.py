"""The storage proxy (pipelines/storage_proxy.py), the session's S3 endpoint: what it counts, the latency and
bandwidth of a profile, and each fault it injects, seen by a real boto3 client."""

import contextlib
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, IncompleteReadError, ResponseStreamingError

from pipelines.storage_proxy import S3, Profile


def client(url: str, attempts: int = 1):
    return boto3.client("s3", endpoint_url=url, config=Config(retries={"max_attempts": attempts, "mode": "standard"}))


@pytest.fixture
def proxy(store):
    s3 = client(store.url)
    with contextlib.suppress(ClientError):  # made by an earlier test
        s3.create_bucket(Bucket="proxied")
    store.reset_counts()
    return store, s3


def test_requests_are_counted_by_operation_and_bytes(proxy):
    p, s3 = proxy
    data = bytes(range(256)) * 4096  # 1 MiB
    s3.put_object(Bucket="proxied", Key="a/one.bin", Body=data)
    assert s3.get_object(Bucket="proxied", Key="a/one.bin")["Body"].read() == data
    assert s3.get_object(Bucket="proxied", Key="a/one.bin", Range="bytes=0-99")["Body"].read() == data[:100]
    s3.head_object(Bucket="proxied", Key="a/one.bin")
    s3.list_objects_v2(Bucket="proxied", Prefix="a/")
    assert dict(p.counts) == {"PUT": 1, "GET": 1, "ranged GET": 1, "HEAD": 1, "LIST": 1}
    assert p.bytes_sent >= len(data) + 100 and p.bytes_received >= len(data)


def test_the_s3_profile_adds_first_byte_latency_and_limits_bandwidth(proxy):
    p, s3 = proxy
    data = b"x" * 4_500_000
    s3.put_object(Bucket="proxied", Key="big.bin", Body=data)
    p.profile = Profile("slow", first_byte_s=0.05, bytes_per_s=30e6)
    start = time.monotonic()
    assert s3.get_object(Bucket="proxied", Key="big.bin")["Body"].read() == data
    took = time.monotonic() - start
    assert took >= 0.05 + len(data) / 30e6 * 0.9, took
    assert S3.first_byte_s == 0.030 and S3.bytes_per_s == 90e6


def test_faults_a_status_for_a_key_slow_down_and_a_reset_mid_body(proxy):
    p, s3 = proxy
    s3.put_object(Bucket="proxied", Key="f/ok.bin", Body=b"y" * 300_000)
    p.faults.status = {"*/secret.bin": 403}
    with pytest.raises(ClientError, match="AccessDenied"):
        s3.get_object(Bucket="proxied", Key="f/secret.bin")
    p.faults.status = {}
    p.faults.slow_down = 1.0
    with pytest.raises(ClientError, match="SlowDown"):
        s3.get_object(Bucket="proxied", Key="f/ok.bin")
    p.faults.slow_down = 0.0
    p.faults.reset_after = 100_000  # the first GET of each object
    with pytest.raises((IncompleteReadError, ResponseStreamingError)):  # the body ends early
        s3.get_object(Bucket="proxied", Key="f/ok.bin")["Body"].read()
    assert s3.get_object(Bucket="proxied", Key="f/ok.bin")["Body"].read() == b"y" * 300_000  # one reset only


def test_a_lost_response_is_a_write_done_that_the_client_never_hears_of(proxy):
    p, _ = proxy
    s3 = client(p.url, attempts=2)
    p.faults.lose_response = {"proxied/lost/*": 1}
    s3.put_object(Bucket="proxied", Key="lost/once.json", Body=b"1")  # the retry meets the first write done
    assert p.counts["PUT"] == 2
    with pytest.raises(ClientError, match="PreconditionFailed"):  # what a conditional write's retry meets
        p.faults.lose_response = {"proxied/lost/*": 1}
        s3.put_object(Bucket="proxied", Key="lost/claim.json", Body=b"1", IfNoneMatch="*")


@pytest.mark.timeout(60)
def test_pyarrows_chunked_uploads_go_through(proxy):
    """The AWS SDK under pyarrow (Ray Data's writes, Ray Train's checkpoints) uploads with Transfer-Encoding:
    chunked: the proxy forwards such a body whole (read by its Content-Length only, the upload hung)."""
    from pipelines import storage

    p, _ = proxy
    data = bytes(range(256)) * 4000
    fs, path = storage.filesystem("s3://proxied/pyarrow/out.bin")
    with fs.open_output_stream(path) as f:
        f.write(data)
    assert storage.read_bytes("s3://proxied/pyarrow/out.bin") == data and p.bytes_received >= len(data)
