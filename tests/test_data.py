"""Images -> shards in S3 (real boto3/pyarrow HTTP against a loopback endpoint) -> Ray Data, and bad data."""

import io
import json
import logging
import os
import shutil
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from braceexpand import braceexpand
from PIL import Image

from pipelines import preprocess, storage
from pipelines.data import prepare as shards
from pipelines.data import reader
from pipelines.data.adopt import adopt
from pipelines.data.augment import AugmentConfig
from pipelines.data.bad_samples import BadDataError, bad_sample_counter
from pipelines.data.dataset import DataSet, DatasetError, load_manifest
from pipelines.data.ingest import read_split
from pipelines.data.prepare import prepare
from pipelines.data.reader import position, sample_id
from pipelines.device import decode_on_device, to_model_input
from pipelines.progress import Progress
from pipelines.train import launch
from pipelines.train.config import TrainConfig
from pipelines.train.launch import fit


def _raw_rows(uri: str, split: str) -> list[dict]:
    """Every sample of a split as (key, label, json) straight from the tars, without Ray."""
    manifest = load_manifest(uri)
    rows = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(storage.join(uri, shard["name"])))) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                rows.append({"key": key, "label": int(members[f"{key}.cls"]), "meta": json.loads(data)})
    return rows


def _labels(ds) -> list[int]:
    return [int(y) for batch in ds.iter_torch_batches(batch_size=32) for y in batch["label"]]


# ---------------------------------------------------------------------------------------------- storage


def test_uris_name_s3_objects_or_local_paths(tmp_path):
    assert storage.parse("s3://bucket/a/b.tar") == storage.Location("s3", "bucket", "a/b.tar")
    assert storage.parse(tmp_path / "x").key == str(tmp_path / "x")
    assert storage.join("s3://b/p/", "/train", "shard.tar") == "s3://b/p/train/shard.tar"
    with pytest.raises(ValueError, match="unsupported URI"):
        storage.parse("gs://bucket/x")
    with pytest.raises(ValueError, match="names no bucket"):
        storage.parse("s3:///key")


def test_s3_round_trip_through_boto3_and_pyarrow(s3_endpoint):
    storage.ensure_bucket("s3://roundtrip")
    storage.write_bytes("s3://roundtrip/a/b.json", b'{"x": 1}', metadata={"sha256": "abc"})
    assert storage.read_bytes("s3://roundtrip/a/b.json") == b'{"x": 1}'
    assert storage.head("s3://roundtrip/a/b.json") == {"size": 8, "metadata": {"sha256": "abc"}}
    assert storage.list_files("s3://roundtrip/a") == ["s3://roundtrip/a/b.json"]
    fs, path = storage.filesystem("s3://roundtrip/a/b.json")
    with fs.open_input_stream(path) as f:  # pyarrow found the endpoint from AWS_ENDPOINT_URL
        assert f.read() == b'{"x": 1}'
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("s3://roundtrip/missing")


def test_unreachable_storage_is_a_clear_error_without_credentials(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-to-be-printed")
    storage.s3_client.cache_clear()
    try:
        with pytest.raises(storage.StorageError, match="cannot read s3://bucket/x") as err:
            storage.read_bytes("s3://bucket/x")
        assert "not-to-be-printed" not in str(err.value)
    finally:
        storage.s3_client.cache_clear()


# ---------------------------------------------------------------------------------------------- prepare


@pytest.fixture
def prepared(sample_shards):
    """The sample data set as shards in the loopback S3 bucket (small shards, so there are several)."""
    return sample_shards, load_manifest(sample_shards)


def test_prepare_writes_every_image_once_with_its_label(prepared, sample_images):
    uri, manifest = prepared
    assert [c["name"] for c in manifest["classes"]] == ["red circle", "green square", "blue triangle", "yellow cross"]
    assert manifest["splits"]["train"]["samples"] == 4 * 24 and manifest["splits"]["val"]["samples"] == 4 * 6
    assert len(manifest["splits"]["train"]["shards"]) > 2
    rows = _raw_rows(uri, "train")
    sources = sorted(str(p.relative_to(sample_images)) for p in (sample_images / "train").rglob("*.JPEG"))
    assert sorted(r["meta"]["path"] for r in rows) == sources  # each image exactly once
    wnids = [c["wnid"] for c in manifest["classes"]]
    assert all(wnids[r["label"]] == r["meta"]["wnid"] == Path(r["meta"]["path"]).parent.name for r in rows)
    # JPEG bytes pass through untouched, and checksums in the manifest are those of the objects.
    first = manifest["splits"]["train"]["shards"][0]
    data = storage.read_bytes(storage.join(uri, first["name"]))
    assert __import__("hashlib").sha256(data).hexdigest() == first["sha256"] and len(data) == first["bytes"]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        jpg = tar.extractfile(names[1]).read()
        meta = json.loads(tar.extractfile(names[2]).read())
    assert names[0].endswith(".cls") and names[1].endswith(".jpg") and names[2].endswith(".json")
    assert jpg == (sample_images / meta["path"]).read_bytes()


def test_rerun_is_a_no_op_and_other_data_at_the_same_place_is_refused(prepared, sample_images, tmp_path):
    uri, manifest = prepared
    assert prepare(str(sample_images), uri, shard_size_mb=0.05, workers=2)["fingerprint"] == manifest["fingerprint"]
    with pytest.raises(DatasetError, match="already holds a different data set"):
        prepare(str(sample_images), uri, shard_size_mb=1, workers=1)  # other parameters: other shards


@pytest.mark.slow  # prepare writes shards in worker processes
def test_the_fingerprint_follows_content_not_file_dates(sample_images, tmp_path, monkeypatch):
    """A copy of the image tree (new modification times) is the same data set: a rerun against it does
    nothing and keeps the fingerprint, hashing each copied file once and then never again; a rerun of an
    untouched tree reads no source file at all; an image whose bytes change makes it another data set."""
    hashed = []
    real_hash = shards.file_sha256
    monkeypatch.setattr(shards, "file_sha256", lambda p: hashed.append(p) or real_hash(p))
    dest = str(tmp_path / "shards")
    first = prepare(str(sample_images), dest, shard_size_mb=0.05, workers=1)
    images = sorted(sample_images.rglob("*.JPEG"))
    assert prepare(str(sample_images), dest, shard_size_mb=0.05, workers=1) == first and hashed == []
    copy = tmp_path / "copy"
    shutil.copytree(sample_images, copy, copy_function=shutil.copy)  # copy: new modification times
    os.utime(copy / images[0].relative_to(sample_images), ns=(1, 1))
    assert prepare(str(copy), dest, shard_size_mb=0.05, workers=1)["fingerprint"] == first["fingerprint"]
    assert len(hashed) == len(images)  # each copied file read once ...
    hashed.clear()
    assert prepare(str(copy), dest, shard_size_mb=0.05, workers=1)["fingerprint"] == first["fingerprint"]
    assert hashed == []  # ... and the records now know the copy's dates
    changed = copy / images[5].relative_to(sample_images)
    data = bytearray(changed.read_bytes())
    data[-3] ^= 0xFF  # same size, other content
    changed.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="different data set"):
        prepare(str(copy), dest, shard_size_mb=0.05, workers=1)


def test_imagenet_names_only_for_imagenets_own_wnids(tmp_path):
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo("imagenet-1k").label_names()
    names = shards.class_names(tmp_path, wnids)
    assert names[0].startswith("tench") and names[1].startswith("goldfish") and len(set(names)) > 990
    others = [f"n{90000000 + i:08d}" for i in range(1000)]  # 1000 wnid-like folders that are not ImageNet-1k
    assert shards.class_names(tmp_path, others) == others


_REAL_WRITE_SHARD = shards.write_shard


def _crash_on_third_train_shard(plan, source, dest):
    """Stands in for write_shard in the worker processes: the run dies while writing train shard 2."""
    if plan.index == 2 and plan.split == "train":
        raise RuntimeError("simulated crash")
    return _REAL_WRITE_SHARD(plan, source, dest)


def test_a_prepare_in_a_ray_driver_leaves_the_driver_working(ray_cluster, prepared, sample_images, tmp_path):
    """prepare's worker processes must not be forks of a Ray driver: a fork inherits the driver's sockets
    to Ray and writes to them when it exits, after which the driver's new actors never get their tasks
    (a labeling job after a prepare, in one process, waited forever)."""

    class Identity:
        def __call__(self, batch):
            return batch

    counter = bad_sample_counter()  # the driver holds handles and references when it forks, as a job does
    assert len(list(read_split(prepared[0], "val", image_size=32, train=False, counter=counter).iter_batches())) > 0
    prepare(str(sample_images), f"s3://ingest-test/fork-{tmp_path.name}", shard_size_mb=0.05, workers=2)
    done: list[int] = []
    ds = ray.data.range(8, override_num_blocks=2).map_batches(Identity, concurrency=1, num_cpus=0.5)
    thread = threading.Thread(target=lambda: done.append(ds.count()), daemon=True)
    thread.start()
    thread.join(60)
    assert done == [8], "the driver's new actors never answered after prepare"


def test_progress_is_a_bar_in_a_terminal_and_a_line_every_few_seconds_in_a_log():
    """A log (ray job submit's, CI's, a file) gets whole lines, never tqdm's carriage-return frames."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    log = io.StringIO()
    with Progress(100, "writing shards", file=log, every_s=0) as progress:
        for _ in range(4):
            progress.update(25)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 5  # a line per update (every_s=0), one at the end
    assert lines[1].startswith("  writing shards: 50/100 img (") and lines[-1].startswith("  writing shards: 100/100")
    quiet = io.StringIO()
    with Progress(100, "writing shards", file=quiet) as progress:
        progress.update_to(100)
    assert quiet.getvalue().count("\n") == 1  # within the first 10 s: the closing line only
    terminal = Terminal()
    with Progress(100, "writing shards", file=terminal) as progress:
        progress.update_to(100)
    assert "\r" in terminal.getvalue() and "100/100" in terminal.getvalue() and "100%|" in terminal.getvalue()


@pytest.mark.slow  # prepare writes shards in worker processes
def test_an_interrupted_prepare_resumes_and_writes_only_what_is_missing(sample_images, tmp_path, monkeypatch, caplog):
    dest = str(tmp_path / "shards")  # a local destination works like S3
    monkeypatch.setattr(shards, "write_shard", _crash_on_third_train_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(str(sample_images), dest, shard_size_mb=0.05, workers=1)
    assert not (tmp_path / "shards" / "manifest.json").exists()
    finished_before = len(list((tmp_path / "shards" / "_progress").glob("*.json")))
    monkeypatch.setattr(shards, "write_shard", _REAL_WRITE_SHARD)
    with caplog.at_level(logging.INFO, logger="pipelines.data.prepare"):
        manifest = prepare(str(sample_images), dest, shard_size_mb=0.05, workers=1)
    planned = sum(len(s["shards"]) for s in manifest["splits"].values())
    written_before = next(r for r in caplog.messages if "already in place" in r)
    assert 2 <= finished_before < planned
    assert f"{planned} shards planned, {finished_before} already in place" in written_before
    assert manifest["splits"]["train"]["samples"] == 96


@pytest.mark.slow  # prepare writes shards in worker processes
def test_bad_files_are_reported_and_never_written(tmp_path, sample_images):
    src = tmp_path / "src"
    for p in (sample_images / "train").rglob("*.JPEG"):
        target = src / p.relative_to(sample_images / "train")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
    good = next((src / "s0000").iterdir()).read_bytes()
    (src / "s0000" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (src / "s0001" / "notes.txt").write_text("not an image")
    (src / "s0001" / "fake.JPEG").write_bytes(b"\x00" * 100)
    Image.new("RGB", (20, 10), "blue").save(src / "s0002" / "bitmap.bmp")  # another format: converted to PNG
    manifest = prepare(str(src), str(tmp_path / "out"), workers=1)
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"s0000/truncated.JPEG", "s0001/notes.txt", "s0001/fake.JPEG"}
    assert manifest["splits"]["train"]["samples"] == 4 * 24 + 1  # class-per-folder layout: one "train" split
    rows = _raw_rows(str(tmp_path / "out"), "train")
    assert not {r["meta"]["path"] for r in rows} & set(skipped)
    with tarfile.open(tmp_path / "out" / "train" / "shard-000000.tar") as tar:
        assert sum(n.endswith(".png") for n in tar.getnames()) == 1


def test_source_problems_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        prepare(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "dog" / "a.png")
    with pytest.raises(DatasetError, match=r"empty class folder.*cat"):
        prepare(str(tmp_path / "src"), str(tmp_path / "out"))


@pytest.mark.slow  # prepare writes shards in worker processes
def test_imagenet_validation_layout_is_labelled_from_the_solution_file(tmp_path, sample_images):
    root = tmp_path / "imagenet"
    for p in (sample_images / "train").rglob("*.JPEG"):
        (root / "train" / p.parent.name).mkdir(parents=True, exist_ok=True)
        (root / "train" / p.parent.name / p.name).write_bytes(p.read_bytes())
    (root / "val").mkdir()
    lines = ["ImageId,PredictionString"]
    for i, p in enumerate(sorted((sample_images / "val").rglob("*.JPEG"))):
        (root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(p.read_bytes())
        lines.append(f"ILSVRC2012_val_{i:08d},{p.parent.name} 1 2 3 4")
    (root / "val" / "ILSVRC2012_val_99999999.JPEG").write_bytes(p.read_bytes())  # not in the solution file
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    manifest = prepare(str(root), str(tmp_path / "out"), workers=1)
    assert manifest["splits"]["val"]["samples"] == 24
    assert [s["reason"] for s in manifest["skipped"]] == ["no label in LOC_val_solution.csv"]
    rows = _raw_rows(str(tmp_path / "out"), "val")
    truth = {
        f"val/ILSVRC2012_val_{i:08d}.JPEG": p.parent.name
        for i, p in enumerate(sorted((sample_images / "val").rglob("*.JPEG")))
    }
    assert all(truth[r["meta"]["path"]] == r["meta"]["wnid"] for r in rows)


# ---------------------------------------------------------------------------------------------- ingest


def test_ray_data_streams_every_sample_with_its_label_from_s3(ray_cluster, prepared):
    uri, _ = prepared
    counter = bad_sample_counter()
    ds = read_split(uri, "val", image_size=32, train=False, counter=counter)
    batches = list(ds.iter_torch_batches(batch_size=32))
    images = torch.cat([b["image"] for b in batches])
    assert images.shape == (24, 32, 32, 3) and images.dtype == torch.uint8
    assert Counter(int(y) for b in batches for y in b["label"]) == {0: 6, 1: 6, 2: 6, 3: 6}
    assert ray.get(counter.counts.remote()) == {"seen": 24, "bad": 0, "examples": []}


def _epoch(ds, counter, epoch: int, **iter_args) -> list[dict]:
    """One epoch of ``ds`` as its batches, with the epoch announced as the training loop does."""
    ray.get(counter.set_epoch.remote(epoch))
    return list(ds.iter_batches(batch_format="numpy", **iter_args))


def _image_multiset(batches: list[dict]) -> Counter:
    return Counter(image.tobytes() for b in batches for image in b["image"])


def test_each_samples_augmentation_is_a_function_of_seed_epoch_and_key(ray_cluster, prepared):
    """Through Ray: two executions of the same epoch give the same set of augmented images (in whatever
    order the tasks deliver them); another epoch or another seed gives others, and the images are really
    augmented (not the evaluation crop)."""
    uri, _ = prepared
    aug = AugmentConfig(scale=(0.2, 1.0), auto_augment="rand-m9-n1-mstd0.5-inc1")
    counter = bad_sample_counter()
    ds = read_split(uri, "train", image_size=24, train=True, seed=7, augment=aug, counter=counter)
    first = _image_multiset(_epoch(ds, counter, 3, batch_size=32))
    again = _image_multiset(_epoch(ds, counter, 3, batch_size=7))
    assert sum(first.values()) == 96 and first == again
    assert _image_multiset(_epoch(ds, counter, 4)).keys().isdisjoint(first)
    other_counter = bad_sample_counter()
    other_seed = read_split(uri, "train", image_size=24, train=True, seed=8, augment=aug, counter=other_counter)
    assert _image_multiset(_epoch(other_seed, other_counter, 3)).keys().isdisjoint(first)
    plain = read_split(uri, "train", image_size=24, train=False)
    assert _image_multiset(list(plain.iter_batches(batch_format="numpy"))).keys().isdisjoint(first)


def test_a_sample_is_augmented_alike_whichever_block_and_position_it_is_decoded_in(ray_cluster, prepared):
    """The decode function on its own: the same samples decoded as one block, as two blocks, and in reverse
    order give each sample the same pixels (a generator per batch would give each the draws of its place)."""
    from pipelines.data.ingest import DecodeBatch

    uri, manifest = prepared
    name = manifest["splits"]["train"]["shards"][0]["name"]
    (block,) = reader.read_tar(io.BytesIO(storage.read_bytes(storage.join(uri, name))), name)
    block = block.slice(0, 12)
    block = block.append_column("epoch", pa.array([5] * block.num_rows, pa.int64()))
    block = block.append_column("last", pa.array([True] * block.num_rows))
    counter = bad_sample_counter()
    decode = DecodeBatch(
        24, True, AugmentConfig(scale=(0.2, 1.0), auto_augment="rand-m9-n1-mstd0.5-inc1"), 4, counter, 3, False
    )

    def by_key(*blocks) -> dict[str, bytes]:
        out = {}
        for b in blocks:
            keys = b.column("key").to_pylist()
            out.update(zip(keys, (img.tobytes() for img in decode(b)["image"])))
        return out

    whole = by_key(block)
    assert len(set(whole.values())) == 12  # distinct draws per sample
    assert by_key(block.slice(0, 5), block.slice(5)) == whole
    assert by_key(block.take(list(reversed(range(12))))) == whole


def test_the_rand_augment_is_timms_as_deit_builds_it():
    """DeiT passes rand-m9-mstd0.5-inc1, bicubic and colour jitter 0.3 to timm's create_transform: ours is
    the same RandAugment (2 operations of the "increasing" set, each with p 0.5 at magnitude N(9, 0.5) of
    10, bicubic, the data set mean as fill) and, like timm's with RandAugment on, no colour jitter."""
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment
    from torchvision.transforms import ColorJitter

    from pipelines.data.augment import rand_augment

    deit = create_transform(
        240, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", color_jitter=0.3,
        re_prob=0.25, re_mode="pixel",
    )  # fmt: skip
    theirs = next(t for t in deit.transforms if isinstance(t, RandAugment))
    ours = rand_augment(AugmentConfig().auto_augment, 240, AugmentConfig().interpolation)

    def described(ra):
        return ra.num_layers, [
            (op.name, op.prob, op.magnitude, op.magnitude_std, op.kwargs, op.hparams) for op in ra.ops
        ]

    assert described(ours) == described(theirs)
    assert not any(isinstance(t, ColorJitter) for t in deit.transforms) and AugmentConfig().color_jitter == 0
    assert (AugmentConfig().scale, AugmentConfig().hflip, AugmentConfig().random_erasing) == ((0.08, 1.0), 0.5, 0.25)


def test_colour_jitter_when_set_is_drawn_from_the_samples_own_generator():
    """Colour jitter is off in the recipe (timm's, with RandAugment on) but can be set: then it changes the
    image, and the same sample seed gives the same jitter (torchvision's ColorJitter draws from torch's
    generator, seeded from the sample's)."""
    from pipelines.data.augment import sample_rng, train_transform

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    plain, jitter = AugmentConfig(auto_augment=""), AugmentConfig(auto_augment="", color_jitter=0.4)

    def augmented(aug: AugmentConfig, key: str) -> np.ndarray:
        return train_transform(buf.getvalue(), 32, aug, sample_rng(0, 0, key))

    assert np.array_equal(augmented(jitter, "a"), augmented(jitter, "a"))
    assert not np.array_equal(augmented(jitter, "a"), augmented(plain, "a"))


def test_posterize_at_the_top_magnitude_gives_black_not_an_error():
    """timm's PosterizeIncreasing keeps 0 bits at magnitude 10, which the magnitude noise reaches; Pillow 13
    raises for that, and the sample would be skipped as bad. It is black, as with the Pillow DeiT used."""
    from pipelines.data.augment import rand_augment

    op = next(op for op in rand_augment("rand-m9-mstd0.5-inc1", 24, "bicubic").ops if op.name == "PosterizeIncreasing")
    top = type(op)(op.name, prob=1.0, magnitude=10, hparams={**op.hparams, "magnitude_std": 0})
    top.aug_fn = op.aug_fn
    out = np.asarray(top(Image.new("RGB", (24, 24), (200, 120, 40))))
    assert out.max() == 0


def test_shard_order_follows_seed_and_epoch(ray_cluster, prepared):
    """With the order of the output fixed to the order of the read tasks (preserve_order), the labels come
    out in shard order: the same for the same (seed, epoch), another for another epoch; evaluation reads the
    shards in the manifest's order every time."""
    uri, _ = prepared

    def labels(train: bool, seed: int, epoch: int) -> list[int]:
        counter = bad_sample_counter()
        ds = read_split(uri, "train", image_size=16, train=train, seed=seed, counter=counter)
        ds.context.execution_options.preserve_order = True
        return [int(y) for b in _epoch(ds, counter, epoch) for y in b["label"]]

    first = labels(True, 7, 0)
    assert sorted(first) == sorted([0, 1, 2, 3] * 24)
    assert labels(True, 7, 0) == first  # reproducible
    assert labels(True, 7, 1) != first  # reshuffled every epoch
    assert labels(False, 7, 0) == labels(False, 7, 1)  # evaluation: no reshuffling


def test_the_eval_transform_is_resize_then_centre_crop_on_cpus_and_on_the_device():
    from torchvision import transforms as T

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)).filter(
        __import__("PIL.ImageFilter").ImageFilter.GaussianBlur(3)
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    ours = preprocess.eval_transform(buf.getvalue(), 240)
    ref = np.asarray(T.Compose([T.Resize(274, T.InterpolationMode.BICUBIC), T.CenterCrop(240)])(img))
    assert ours.shape == ref.shape == (240, 240, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).mean() < 1.0
    # The device path's version (images decoded by nvJPEG are tensors) gives the same pixels.
    on_device = preprocess.eval_transform_tensor(torch.from_numpy(np.asarray(img)).permute(2, 0, 1), 240)
    assert np.abs(on_device.permute(1, 2, 0).numpy().astype(int) - ours.astype(int)).mean() < 1.0


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpeg(colour: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def bad_shards(tmp_path):
    """Hand-made shards: good samples, a corrupt image, a missing label, an out-of-range label, a truncated tar,
    and the conventions other tools write (.jpeg/.png members, the label in json)."""
    root = tmp_path / "bad"
    (root / "train").mkdir(parents=True)
    good = [(f"g{i:03d}.{ext}", data) for i in range(20) for ext, data in (("cls", b"1"), ("jpg", _jpeg()))]
    _write_tar(
        root / "train" / "shard-000000.tar",
        [
            *good,
            ("corrupt.cls", b"0"),
            ("corrupt.jpg", b"\xff\xd8 this is no jpeg"),
            ("nolabel.jpg", _jpeg()),
            ("outofrange.cls", b"7"),
            ("outofrange.jpg", _jpeg()),
        ],
    )
    other = [("o001.jpeg", _jpeg("blue")), ("o001.json", b'{"label": 0}'), ("o002.cls", b"0"), ("o002.png", _png())]
    _write_tar(root / "train" / "shard-000001.tar", other)
    full = io.BytesIO()
    _write_tar(
        root / "train" / "shard-000002.tar",
        [(f"t{i:03d}.{e}", d) for i in range(10) for e, d in (("cls", b"0"), ("jpg", _jpeg()))],
    )
    data = (root / "train" / "shard-000002.tar").read_bytes()
    (root / "train" / "shard-000002.tar").write_bytes(data[: len(data) // 2])  # truncated mid-stream
    del full
    manifest = {
        "classes": [{"index": 0, "wnid": "a", "name": "a"}, {"index": 1, "wnid": "b", "name": "b"}],
        "splits": {
            "train": {
                "shards": [{"name": f"train/shard-00000{i}.tar", "samples": n} for i, n in enumerate((23, 2, 10))]
            }
        },
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), "green").save(buf, format="PNG")
    return buf.getvalue()


def test_bad_samples_are_skipped_counted_and_logged(ray_cluster, bad_shards):
    counter = bad_sample_counter(max_fraction=0.5, min_samples=1)
    ds = read_split(str(bad_shards), "train", image_size=16, train=False, counter=counter)
    labels = _labels(ds)
    # 20 good samples of class 1; of class 0 two in other tools' conventions and the complete samples that
    # precede the break in the truncated shard.
    rows = _rows_of(bad_shards / "train" / "shard-000002.tar", expected=10)
    before_break = sum(r["error"] is None for r in rows)
    assert 0 < before_break < 10
    assert labels.count(1) == 20 and labels.count(0) == 2 + before_break
    counts = ray.get(counter.counts.remote())
    bad = counts["examples"]
    # Ids name the shard (its URI) and the sample (sample_id): keys of shards made elsewhere may repeat across
    # shards. A sample the broken tar did not deliver is known by its position.
    shard = str(bad_shards / "train" / "shard-000000.tar")
    assert {sample_id(shard, k) for k in ("corrupt", "nolabel", "outofrange")} <= set(bad)
    assert sample_id(str(bad_shards / "train" / "shard-000002.tar"), position(9)) in bad
    assert counts["bad"] == 3 + 10 - before_break and counts["seen"] == len(labels) + counts["bad"]


def test_a_retried_decode_task_counts_its_samples_once(ray_cluster, bad_shards, tmp_path):
    """The process of a read-and-decode task dies right after the task reported its block (the first time
    only): Ray runs the task again, it reports the same block again, and the counts stay exact."""
    from pipelines.data.ingest import DecodeBatch
    from pipelines.data.reader import ShardDatasource

    marker = tmp_path / "crashed"

    class CrashOnce(DecodeBatch):  # defined here, so Ray ships it by value to the workers
        def __call__(self, batch):
            out = super().__call__(batch)
            if batch.column("shard")[0].as_py().endswith("train/shard-000000.tar") and not marker.exists():
                marker.write_text("once")
                os._exit(1)  # the worker process vanishes, as on an OOM kill or a lost node
            return out

    counter = bad_sample_counter(max_fraction=0.9, min_samples=1)
    shards_ = {storage.filesystem(s.uri)[1]: s for s in DataSet.load(str(bad_shards)).shards("train")}
    source = ShardDatasource(shards_, counter=counter, seed=0, shuffle=False)
    decode = CrashOnce(16, False, AugmentConfig(), 2, counter, 0, False)
    ds = ray.data.read_datasource(source, override_num_blocks=3).map_batches(
        decode, batch_size=None, batch_format="pyarrow"
    )
    labels = [int(y) for b in ds.iter_batches(batch_format="numpy") for y in b["label"]]
    assert marker.exists(), "no task crashed"
    counts = ray.get(counter.counts.remote())
    before_break = sum(r["error"] is None for r in _rows_of(bad_shards / "train" / "shard-000002.tar", 10))
    assert len(labels) == 20 + 2 + before_break  # every good sample once
    assert counts["seen"] == 23 + 2 + 10 and counts["bad"] == 3 + 10 - before_break


def test_too_many_bad_samples_stop_the_job(ray_cluster, bad_shards):
    counter = bad_sample_counter(max_fraction=0.01, min_samples=1)
    ds = read_split(str(bad_shards), "train", image_size=16, train=False, counter=counter)
    with pytest.raises(Exception, match=r"samples were bad \(.*% > 1.0% allowed\); first keys") as err:
        _labels(ds)
    assert BadDataError.__name__ in str(err.value)


def test_the_bad_sample_limit_holds_whatever_blocks_ray_merges(ray_cluster, tmp_path):
    """A shard of 640 samples (ten blocks of 64) whose last 40 cannot be decoded, 6 % against a limit of 5 %:
    Ray merges a task's blocks before the decode sees them, so the task's final block may arrive inside a
    larger one. The task that passes the limit raises all the same."""
    root = tmp_path / "many"
    (root / "train").mkdir(parents=True)
    image = _jpeg()
    members = [m for i in range(640) for m in ((f"s{i:04d}.cls", b"0"), (f"s{i:04d}.jpg", image if i < 600 else b"x"))]
    _write_tar(root / "train" / "shard-000000.tar", members)
    shard = {"name": "train/shard-000000.tar", "samples": 640}
    classes = [{"index": 0, "wnid": "a", "name": "a"}]
    (root / "manifest.json").write_text(json.dumps({"classes": classes, "splits": {"train": {"shards": [shard]}}}))
    counter = bad_sample_counter(max_fraction=0.05, min_samples=1)
    ds = read_split(str(root), "train", image_size=16, train=False, counter=counter)
    with pytest.raises(Exception, match="40 of 640 samples were bad"):
        _labels(ds)


def test_the_training_loop_asks_for_the_bad_sample_verdict_after_every_pass(ray_cluster):
    """Whether or not a decode task raised, a pass over a data set whose counter passed its limit ends in
    BadDataError, recorded as the run's stop reason."""
    from pipelines.train.loop import _watched

    counter = bad_sample_counter(max_fraction=0.01, min_samples=1)
    ray.get(counter.report.remote(0, "block", 100, ["s#1", "s#2"]))  # the report passes the limit; nobody raised
    ray.get(counter.report.remote(0, "later", 10_000, []))  # good samples after it do not undo the verdict
    with pytest.raises(BadDataError, match="2 of 100 samples were bad"):
        list(_watched(iter([1, 2]), 60, "batch", counter, counter))
    assert "2 of 100 samples were bad" in ray.get(counter.stopped.remote())


def test_ingest_through_broken_connections_and_throttling_reads_the_same(ray_cluster, prepared, store):
    """Every shard's body breaks off once mid-way and 30 % of the requests get 503 SlowDown, in Ray's
    read tasks: the same samples, and no bad one."""
    uri, _ = prepared

    def read() -> tuple[list[int], dict]:
        counter = bad_sample_counter(max_fraction=0.5, min_samples=1)
        labels = sorted(_labels(read_split(uri, "train", image_size=16, train=False, counter=counter)))
        return labels, ray.get(counter.counts.remote())

    clean = read()
    store.faults.reset_after, store.faults.slow_down = 20_000, 0.3
    assert read() == clean and clean[1]["bad"] == 0
    assert store.counts["body cut"] >= len(DataSet.load(uri).shards("train")) and store.counts["503 injected"] > 0


def _rows_of(path: Path, expected: int | None = None) -> list[dict]:
    with path.open("rb") as f:
        return [r for b in reader.read_tar(f, f"train/{path.name}", expected) for r in b.to_pylist()]


def test_a_truncated_tar_keeps_the_samples_before_the_break_and_counts_the_rest(bad_shards, tmp_path):
    path = bad_shards / "train" / "shard-000002.tar"
    rows = _rows_of(path, expected=10)
    good = [r for r in rows if r["error"] is None]
    assert len(rows) == 10 and 0 < len(good) < 10
    assert all(r["error"] for r in rows[len(good) :])
    # A cut inside a member's data is seen by tarfile itself, even without a manifest.
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: data.index(b"JFIF") + 100])
    assert _rows_of(cut)[-1]["error"].startswith("truncated or corrupt tar")


NORMALISED_WHITE = torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])


def test_model_input_is_normalised_on_the_device():
    images = torch.full((4, 8, 8, 3), 255, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    x, y = to_model_input(images, labels, num_classes=5, train=False)
    assert x.shape == (4, 3, 8, 8) and torch.equal(y, labels)
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x[0, :, 0, 0], NORMALISED_WHITE)


def test_random_erasing_fills_one_rectangle_per_image_with_noise_and_keeps_the_layout():
    images = torch.full((16, 32, 32, 3), 255, dtype=torch.uint8)
    x, y = to_model_input(images, torch.arange(16) % 4, num_classes=4, train=True, random_erasing=1.0)
    assert x.is_contiguous(memory_format=torch.channels_last)  # erasing used to give back NCHW
    assert y.tolist() == (torch.arange(16) % 4).tolist()  # no mixing asked for: labels untouched
    noise = []
    for img in x:
        erased = ~torch.isclose(img, NORMALISED_WHITE.view(3, 1, 1), atol=1e-5).all(dim=0)
        rows, cols = erased.any(dim=1).nonzero().flatten(), erased.any(dim=0).nonzero().flatten()
        assert len(rows) and len(cols), "an image was not erased with p=1"
        box = img[:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert erased[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # one filled rectangle
        assert erased.sum() == box.shape[1] * box.shape[2]  # and nothing outside it
        noise.append(box.flatten())
    noise = torch.cat(noise)
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1  # timm's per-pixel N(0, 1) in normalised space


def test_mixup_and_cutmix_mix_the_pixels_as_the_soft_targets_say():
    """Each class is a flat grey level; after Mixup or CutMix every image's mean is the target-weighted mean
    of the class levels (CutMix's weight is the pasted box's area), and some images are really mixed."""
    levels = torch.tensor([0, 80, 160, 240], dtype=torch.uint8)
    labels = torch.arange(32) % 4
    images = levels[labels].view(32, 1, 1, 1).expand(32, 16, 16, 3).contiguous()
    class_means = ((levels.float() / 255).view(4, 1) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225]
    )  # (class, channel) in normalised space
    mixed_any = False
    for seed in range(4):  # Mixup or CutMix is chosen per batch
        torch.manual_seed(seed)
        x, y = to_model_input(images, labels, num_classes=4, train=True, mixup_alpha=0.8, cutmix_alpha=1.0)
        assert y.shape == (32, 4) and torch.allclose(y.sum(1), torch.ones(32))
        torch.testing.assert_close(x.mean(dim=(2, 3)), y @ class_means, atol=1e-4, rtol=1e-4)
        mixed_any |= bool((y.max(dim=1).values < 0.99).any())
    assert mixed_any


def test_images_can_be_shipped_encoded_and_decoded_on_the_device(ray_cluster, prepared):
    """The GPU-decode path, run here on the CPU device: same shapes, labels and eval geometry as the CPU path."""
    uri, _ = prepared
    ds = read_split(uri, "val", image_size=32, train=False, decode_on_device=True)
    images, labels = [], []
    for batch in ds.iter_batches(batch_size=16, batch_format="pyarrow"):
        assert batch.column_names == ["key", "encoded", "label", "epoch"]
        x, y = decode_on_device(batch, size=32, train=False, device="cpu")
        images.append(x)
        labels += y.tolist()
    assert torch.cat(images).shape == (24, 32, 32, 3) and Counter(labels) == {0: 6, 1: 6, 2: 6, 3: 6}
    train_ds = read_split(uri, "train", image_size=32, train=True, decode_on_device=True)
    train = next(iter(train_ds.iter_batches(batch_size=8, batch_format="pyarrow")))
    x, y = decode_on_device(train, size=32, train=True, device="cpu", seed=1)
    assert x.shape == (8, 32, 32, 3) and x.dtype == torch.uint8 and y.shape == (8,)
    again, _ = decode_on_device(train, size=32, train=True, device="cpu", seed=1)
    assert torch.equal(x, again)  # each sample's draws come from (seed, epoch, key), as on the CPU path


def test_a_jpeg_that_fails_on_the_device_is_reported_by_its_key(ray_cluster):
    counter = bad_sample_counter(max_fraction=1.0, min_samples=1)
    batch = {
        "key": ["train/shard-000003.tar#good", "train/shard-000003.tar#broken"],
        "encoded": [_jpeg(), b"\xff\xd8\xff\xe0 not a real jpeg"],
        "label": [1, 0],
        "epoch": [2, 2],
    }
    x, y = decode_on_device(batch, size=16, train=False, device="cpu", counter=counter)
    assert x.shape == (1, 16, 16, 3) and y.tolist() == [1]
    counts = ray.get(counter.counts.remote())
    assert counts["examples"] == ["train/shard-000003.tar#broken"] and counts["bad"] == 1


def test_malformed_labels_become_counted_errors_and_folders_are_part_of_the_key(tmp_path):
    path = tmp_path / "odd.tar"
    _write_tar(
        path,
        [
            ("huge.cls", b"99999999999999999999"),
            ("huge.jpg", _jpeg()),
            ("list.json", b"[1, 2]"),
            ("list.jpg", _jpeg()),
            ("flag.json", b'{"label": true}'),
            ("flag.jpg", _jpeg()),
            ("text.json", b'{"label": "3"}'),
            ("text.jpg", _jpeg()),
            ("a/001.cls", b"0"),
            ("a/001.jpg", _jpeg()),
            ("b/001.cls", b"1"),
            ("b/001.jpg", _jpeg()),
        ],
    )
    rows = {r["key"]: r for r in _rows_of(path)}
    assert all(rows[k]["error"].startswith("unreadable label") for k in ("huge", "list", "flag", "text"))
    assert rows["a/001"]["label"] == 0 and rows["b/001"]["label"] == 1  # two samples, not one merged


def test_a_members_type_is_its_last_extension_as_webdataset_reads_it(tmp_path):
    """``a.b.jpg`` is sample ``a``'s image (webdataset's field ``b.jpg``, decoded as a jpg), and ``c.x.cls``
    sample ``c``'s label; taken as the type ``b.jpg``, the image was lost ("no image member")."""
    path = tmp_path / "dotted.tar"
    _write_tar(path, [("a.b.jpg", _jpeg()), ("a.cls", b"1"), ("c.x.jpg", _jpeg()), ("c.x.cls", b"0")])
    rows = {r["key"]: r for r in _rows_of(path)}
    assert set(rows) == {"a", "c"} and all(r["error"] is None and r["image"] for r in rows.values())
    assert rows["a"]["label"] == 1 and rows["c"]["label"] == 0


def test_members_of_a_key_that_come_back_later_are_a_row_of_their_own(tmp_path):
    """A foreign tar with ``a``'s label after ``b``: webdataset would make two samples named ``a`` (two rows
    with one id). The first stands; the stray members are one malformed row known by key and position."""
    path = tmp_path / "scattered.tar"
    _write_tar(path, [("a.jpg", _jpeg()), ("b.jpg", _jpeg()), ("b.cls", b"1"), ("a.cls", b"0"), ("c.jpg", _jpeg()),
                      ("c.cls", b"2")])  # fmt: skip
    rows = _rows_of(path)
    assert [r["key"] for r in rows] == ["a", "b", "a@2", "c"]
    assert rows[2]["problem"] == reader.MALFORMED and "not adjacent" in rows[2]["error"]
    assert rows[0]["problem"] == reader.MALFORMED  # a's first members lack the label that came later
    assert rows[1]["error"] is None and rows[3]["error"] is None


def test_a_tar_cut_between_two_members_is_reported_without_a_manifest_count(tmp_path):
    """Python's tarfile takes a tar that stops right after a member for a clean end; only the missing
    end-of-archive blocks tell. Without a manifest count, that is a truncated row; with one, the samples it
    lacks are counted as missing (and a whole tar is not reported)."""
    path = tmp_path / "whole.tar"
    _write_tar(path, [("a.jpg", _jpeg()), ("a.cls", b"0"), ("b.jpg", _jpeg()), ("b.cls", b"1")])
    data = path.read_bytes()
    assert [r["key"] for r in _rows_of(path)] == ["a", "b"]  # ends with its end-of-archive blocks
    member = 512 + len(_jpeg()) + (-len(_jpeg()) % 512) + 1024  # a.jpg, padded, and a.cls
    path.write_bytes(data[:member])  # cut exactly after sample a
    rows = _rows_of(path)
    assert [r["key"] for r in rows] == ["a", "@1"]
    assert rows[1]["problem"] == reader.TRUNCATED and "end-of-archive" in rows[1]["error"]
    rows = _rows_of(path, expected=2)
    assert [(r["key"], r["problem"]) for r in rows] == [("a", None), ("@1", reader.MISSING)]


@pytest.mark.slow  # prepare writes shards in worker processes
def test_tiny_images_are_kept(tmp_path):
    (tmp_path / "src" / "dot").mkdir(parents=True)
    Image.new("RGB", (4, 4), "red").save(tmp_path / "src" / "dot" / "tiny.jpg", format="JPEG")
    manifest = prepare(str(tmp_path / "src"), str(tmp_path / "out"), workers=1)
    assert manifest["splits"]["train"]["samples"] == 1 and manifest["skipped"] == []


# ---------------------------------------------------------------------------------------------- adopt


@pytest.fixture(scope="module")
def foreign_corpus(s3_endpoint, sample_images, tmp_path_factory) -> dict:
    """Shards written by webdataset's ShardWriter the way other tools write ImageNet: keys like
    s0001_00012, the image as .jpeg and the label in .json, shards named imagenet1k-train-0000.tar, ... in
    another bucket; the last training shard cut off in the middle, as an interrupted upload leaves it."""
    import webdataset as wds

    local = tmp_path_factory.mktemp("foreign")
    for split, count in (("train", 25), ("validation", 100)):
        with wds.ShardWriter(str(local / f"imagenet1k-{split}-%04d.tar"), maxcount=count) as sink:
            for label, folder in enumerate(sorted((sample_images / split.replace("idation", "")).iterdir())):
                for path in sorted(folder.iterdir()):
                    sink.write({"__key__": path.stem, "jpeg": path.read_bytes(), "json": {"label": label}})
    train = sorted(local.glob("imagenet1k-train-*.tar"))
    cut = train[-1].read_bytes()
    train[-1].write_bytes(cut[: len(cut) // 2])
    storage.ensure_bucket("s3://corpora")
    for path in sorted(local.glob("*.tar")):
        storage.upload_file(path, f"s3://corpora/imagenet1k/{path.name}")
    (local / "classes.txt").write_text("red circle\ngreen square\nblue triangle\nyellow cross\n")
    return {
        "train": f"s3://corpora/imagenet1k/imagenet1k-train-{{0000..{len(train) - 1:04d}}}.tar",
        "val": "s3://corpora/imagenet1k/imagenet1k-validation-0000.tar",
        "classes": str(local / "classes.txt"),
        "broken": f"s3://corpora/imagenet1k/{train[-1].name}",
        "shards": len(train),
    }


@pytest.fixture(scope="module")
def adopted(ray_cluster, foreign_corpus) -> tuple[str, dict]:
    dest = "s3://datasets/adopted"
    storage.ensure_bucket(dest)
    splits = {"train": foreign_corpus["train"], "val": foreign_corpus["val"]}
    return dest, adopt(splits, dest, foreign_corpus["classes"])


def test_a_corpus_made_elsewhere_is_adopted_where_it_is(adopted, foreign_corpus):
    dest, manifest = adopted
    train = manifest["splits"]["train"]
    assert [s["uri"] for s in train["shards"]] == [
        f"s3://corpora/imagenet1k/imagenet1k-train-{i:04d}.tar" for i in range(foreign_corpus["shards"])
    ]  # the brace pattern, expanded; nothing copied
    assert not storage.list_files(dest, suffix=".tar")
    whole = train["shards"][:-1]
    assert all(s["samples"] == 25 for s in whole) and 0 < train["samples"] - 25 * len(whole) < 25
    broken = train["shards"][-1]
    assert broken["samples"] is None and "truncated" in broken["error"]
    assert [p["path"] for p in manifest["skipped"]] == [foreign_corpus["broken"]]  # reported, not fatal
    assert manifest["splits"]["val"]["samples"] == 24
    assert [c["name"] for c in manifest["classes"]] == ["red circle", "green square", "blue triangle", "yellow cross"]
    data = storage.read_bytes(whole[0]["uri"])
    assert __import__("hashlib").sha256(data).hexdigest() == whole[0]["sha256"] and len(data) == whole[0]["bytes"]


def test_adopting_again_reads_nothing_while_the_shards_are_unchanged(adopted, foreign_corpus, monkeypatch):
    from pipelines.data import adopt as adopt_module

    dest, manifest = adopted
    monkeypatch.setattr(adopt_module, "survey_shard", lambda uri: pytest.fail(f"read {uri} again"))
    splits = {"train": foreign_corpus["train"], "val": foreign_corpus["val"]}
    assert adopt_module.adopt(splits, dest, foreign_corpus["classes"]) == manifest


def test_an_adopted_corpus_reads_like_our_own_and_counts_its_broken_shard(adopted, foreign_corpus):
    dest, manifest = adopted
    counter = bad_sample_counter(max_fraction=0.5, min_samples=1)
    ds = read_split(dest, "train", image_size=16, train=False, counter=counter)
    labels = _labels(ds)
    assert len(labels) == manifest["splits"]["train"]["samples"] - 1  # the sample the break cut
    counts = ray.get(counter.counts.remote())
    assert counts["bad"] == 1 and counts["examples"][0].startswith(sample_id(foreign_corpus["broken"], "@"))


def test_training_runs_on_an_adopted_corpus(adopted, tmp_path):
    """An epoch of training on the adopted shards where they lie, their break counted as one bad sample
    (within the run's limit), every validation image evaluated."""
    dest, _ = adopted
    cfg = TrainConfig.from_yaml("jobs/configs/sample.yaml", data=dest, storage=str(tmp_path), name="adopted",
                                epochs=1, batch_size=16, num_workers=1, max_bad_fraction=0.05)  # fmt: skip
    result = fit(cfg)
    assert result.error is None and result.metrics["val_samples"] == 24


def test_samples_in_both_train_and_val_are_reported(foreign_corpus, ray_cluster, tmp_path):
    """A val shard that repeats two training keys (a sample trained on and evaluated on): the adopt names them
    in the manifest and the log; the rest adopts as before."""
    first = next(iter(braceexpand(foreign_corpus["train"])))
    with storage.open_stream(first) as f:
        repeated = [r["key"] for b in reader.read_tar(f, first) for r in b.to_pylist()][:2]
    path = tmp_path / "val.tar"
    _write_tar(path, [m for k in [*repeated, "fresh"] for m in ((f"{k}.jpg", _jpeg()), (f"{k}.cls", b"0"))])
    storage.upload_file(path, "s3://corpora/overlap/val-0000.tar")
    manifest = adopt({"train": foreign_corpus["train"], "val": "s3://corpora/overlap/val-0000.tar"},
                     "s3://datasets/adopted-overlap")  # fmt: skip
    assert manifest["train_val_overlap"] == {"samples": 2, "examples": repeated}
    assert manifest["splits"]["val"]["samples"] == 3


def test_a_shard_that_cannot_be_opened_is_reported_and_left_out(adopted, foreign_corpus, sample_images, tmp_path):
    """A brace range wider than what exists (or a shard one may not read): the adopt reports it and adopts
    the rest. A changed classes file is read again; a prepared data set is never overwritten by an adopt."""
    last = foreign_corpus["shards"]
    wider = foreign_corpus["train"].replace(f"{last - 1:04d}}}", f"{last:04d}}}")
    manifest = adopt({"train": wider, "val": foreign_corpus["val"]}, "s3://datasets/adopted-wider")
    missing = f"s3://corpora/imagenet1k/imagenet1k-train-{last:04d}.tar"
    assert missing not in [s["uri"] for s in manifest["splits"]["train"]["shards"]]
    assert [p["path"] for p in manifest["skipped"] if "cannot open" in p["reason"]] == [missing]
    assert [c["name"] for c in manifest["classes"]] == ["0", "1", "2", "3"]  # from the label range

    dest, _ = adopted
    classes = Path(foreign_corpus["classes"])
    original = classes.read_text()
    splits = {"train": foreign_corpus["train"], "val": foreign_corpus["val"]}
    try:
        classes.write_text("a\nb\nc\nd\n")  # the same file, corrected
        assert [c["name"] for c in adopt(splits, dest, str(classes))["classes"]] == ["a", "b", "c", "d"]
    finally:
        classes.write_text(original)
        adopt(splits, dest, str(classes))  # as the other tests of this module expect it

    ours = tmp_path / "ours"
    prepare(str(sample_images), str(ours))
    with pytest.raises(DatasetError, match="holds a data set made by prepare_data"):
        adopt(splits, str(ours))


def test_fit_reads_the_data_set_once_and_hands_the_object_down(prepared, ray_cluster, tmp_path, monkeypatch):
    """fit loads the manifest once and gives every split the DataSet object (stopped before training)."""
    uri, _ = prepared
    reads, handed = [], []
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda u: (reads.append(u), real_read(u))[1])

    class Enough(Exception):
        pass

    def read_split(data, split, **_):
        handed.append((split, data))
        raise Enough

    monkeypatch.setattr(launch, "read_split", read_split)
    cfg = TrainConfig.from_yaml("jobs/configs/sample.yaml", data=uri, storage=str(tmp_path), name="once")
    with pytest.raises(Enough):
        fit(cfg)
    assert [u for u in reads if u.endswith("manifest.json")] == [storage.join(uri, "manifest.json")]
    assert handed and all(isinstance(data, DataSet) for _, data in handed)


def test_a_data_set_is_read_once_and_handed_down(prepared, ray_cluster, monkeypatch):
    uri, _ = prepared
    data = DataSet.load(uri)
    real_read = storage.read_bytes
    monkeypatch.setattr(
        storage, "read_bytes", lambda u: pytest.fail(f"read {u} again") if u.endswith("manifest.json") else real_read(u)
    )
    assert len(_labels(read_split(data, "val", image_size=16, train=False))) == 24
