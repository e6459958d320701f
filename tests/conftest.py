"""Shared test fixtures: tiny model configurations, the loopback S3 endpoint, the session's Ray cluster."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossvit import CrossViTConfig

# `ray start --head` (Ray 2.60) turns on token authentication, and Ray reads the client's mode when it is
# first imported: set it before anything imports ray.
os.environ["RAY_AUTH_MODE"] = "token"

# Two branches (patch 12 on 48 px, patch 16 on 48 px), two multi-scale blocks: every code path of the
# published models, at a size that trains on a laptop CPU in seconds.
TINY = CrossViTConfig(
    img_size=48,
    img_scale=(1.0, 1.0),
    patch_size=(12, 16),
    embed_dim=(32, 64),
    depth=((1, 2, 0), (1, 2, 0)),
    num_heads=(2, 2),
    mlp_ratio=(2.0, 2.0, 1.0),
    num_classes=10,
)


@pytest.fixture
def tiny_cfg() -> CrossViTConfig:
    return TINY


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible endpoint (moto server) on loopback for the whole session; AWS_* variables point at it."""
    from pipelines.local_s3 import local_s3

    with local_s3() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One Ray cluster per test session, started the way a cluster user does (``ray start --head``) after
    the S3 variables are set, so that its workers and submitted jobs inherit them. Ray 2.60's ``ray start``
    turns on token authentication; clients (this process, ``ray job submit``) then need RAY_AUTH_MODE=token
    and find the token in ~/.ray/auth_token."""
    import ray

    from pipelines.local_s3 import _free_port

    port, dashboard_port = _free_port(), _free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # Submitted jobs run `python ...` from the PATH the head node was started with: this environment's.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [
            ray_cli,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=4",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    try:
        ray.init(address=f"127.0.0.1:{port}", logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard_port}"}
    finally:
        ray.shutdown()
        subprocess.run([ray_cli, "stop", "--force"], check=False, capture_output=True)


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory):
    """The built-in sample data set, small: 4 classes, 24 train and 6 val images each, 64 x 48 px."""
    from pipelines.sample_data import SampleSpec, write_sample_dataset

    return write_sample_dataset(tmp_path_factory.mktemp("sample") / "images", SampleSpec(4, 24, 6, 64, 48, seed=3))
