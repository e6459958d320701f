"""Shared test fixtures: tiny model configurations that run in milliseconds on 2 CPU cores."""

import pytest
import torch

from crossvit import CrossViTConfig

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
    """One local Ray cluster per test session, started after the S3 variables so its workers inherit them."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory):
    """The built-in sample data set, small: 4 classes, 24 train and 6 val images each, 64 x 48 px."""
    from pipelines.sample_data import SampleSpec, write_sample_dataset

    return write_sample_dataset(tmp_path_factory.mktemp("sample") / "images", SampleSpec(4, 24, 6, 64, 48, seed=3))
