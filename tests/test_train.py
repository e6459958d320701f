"""Ray Train: the recipe's pieces, and real 2-worker DDP runs on sample data from the loopback S3 endpoint."""

import dataclasses
import io
import itertools
import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch
from helpers import RAY_CLI, checkpointed
from PIL import Image

import crossvit
from pipelines import storage
from pipelines.checkpoint import load_init, save_checkpoint
from pipelines.data.augment import DEIT_RAND_AUGMENT
from pipelines.data.dataset import load_manifest
from pipelines.data.prepare import prepare
from pipelines.train.config import ConfigChangedError, TrainConfig, parse_overrides, scaling
from pipelines.train.launch import check_resume, fit
from pipelines.train.metrics import curves_figure, load_history, plot_curves
from pipelines.train.optim import lr_at, param_groups
from pipelines.train.state import training_state

REPO = Path(__file__).resolve().parent.parent


def _checkpoints(run_uri: str) -> list[str]:
    """The run's checkpoint folders, oldest first (Ray Train names them by time)."""
    files = storage.list_files(run_uri, suffix="weights.safetensors")
    return sorted(f.rsplit("/", 1)[0] for f in files)


# ------------------------------------------------------------------------------------------------------
# The recipe's pieces
# ------------------------------------------------------------------------------------------------------


def test_no_weight_decay_on_norms_biases_tokens_and_position_embeddings():
    model = crossvit.create_model("crossvit_9_240")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed_0", "cls_token_1", "norm.0.weight", "head.0.bias"} <= skipped
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_the_curves_are_a_real_plot():
    """Loss, top-1/top-5 and the learning rate against the epoch, each with axes, ticks, a grid and a legend;
    epochs without an evaluation leave gaps, not zeros."""
    history = [
        {"epoch": e, "lr": 1e-3 * (e + 1), "train_loss": 2 - 0.3 * e, "val_loss": 2.1 - 0.3 * e if e % 2 else None,
         "val_top1": 20.0 + 10 * e if e % 2 else None, "val_top5": 50.0 + 10 * e if e % 2 else None}
        for e in range(4)
    ]  # fmt: skip
    fig = curves_figure(history)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "validation accuracy", "learning rate"]
    for ax in fig.axes:
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel() and ax.get_legend() is not None
        assert ax.xaxis.get_gridlines()[0].get_visible() and len(ax.get_yticks()) >= 3
    assert [len(line.get_xdata()) for line in fig.axes[0].lines] == [4, 2]  # train every epoch, val every other
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["top-1", "top-5"]
    png = Image.open(io.BytesIO(plot_curves(history)))
    assert png.format == "PNG" and png.size == (1200, 360)


def test_learning_rate_warms_up_then_follows_a_cosine_per_iteration():
    cfg = TrainConfig(epochs=10, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    lrs = [lr_at(s / 100, cfg, peak=1e-3) for s in range(1000)]  # per iteration, 100 per epoch
    assert lrs[0] == pytest.approx(1e-6) and lrs[200] == pytest.approx(1e-3)
    assert all(a <= b for a, b in itertools.pairwise(lrs[:201]))
    assert all(a >= b for a, b in itertools.pairwise(lrs[200:])) and lrs[-1] == pytest.approx(1e-5, rel=1e-2)


def test_worker_counts_are_fixed_or_an_elastic_range():
    assert scaling(4) == 4 and scaling("4") == 4 and scaling("2-8") == (2, 8)
    for bad in ("8-2", "0", "two", "1-x"):
        with pytest.raises(ValueError, match="num_workers must be N or MIN-MAX"):
            TrainConfig(num_workers=bad)


def test_config_loads_from_yaml_with_flags_and_key_value_overrides(tmp_path):
    overrides = parse_overrides(
        ["lr=1e-3", "augment.scale=[0.5, 1.0]", "augment.mixup=0.2", "compile=true", "resources-per-worker={CPU: 4}"]
    )
    cfg = TrainConfig.from_yaml("jobs/configs/sample.yaml", data="s3://x/y", epochs=2, name=None, **overrides)
    assert cfg.data == "s3://x/y" and cfg.epochs == 2 and cfg.model_overrides["embed_dim"] == [32, 64]
    assert cfg.lr == 1e-3 and cfg.compile is True and cfg.resources_per_worker == {"CPU": 4}
    # A nested override changes its field and keeps the recipe's others.
    assert (cfg.augment.scale, cfg.augment.mixup, cfg.augment.auto_augment) == ((0.5, 1.0), 0.2, "")
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="unknown augment keys"):
        TrainConfig.from_yaml("jobs/configs/sample.yaml", **parse_overrides(["augment.sclae=[0.5, 1.0]"]))
    with pytest.raises(SystemExit, match="not KEY=VALUE"):
        parse_overrides(["lr"])
    # Every nested field takes dotted keys and keeps its other entries; a whole value replaces; a dotted key
    # under a plain field is an error, not a silently different config.
    shape = TrainConfig.from_yaml("jobs/configs/sample.yaml", **parse_overrides(["model_overrides.img_size=96"]))
    assert shape.model_overrides["img_size"] == 96 and shape.model_overrides["embed_dim"] == [32, 64]
    assert (
        TrainConfig.from_yaml("jobs/configs/sample.yaml", **parse_overrides(["model_overrides={}"])).model_overrides
        == {}
    )
    with pytest.raises(ValueError, match="lr has no entries to set"):
        TrainConfig.from_yaml("jobs/configs/sample.yaml", **parse_overrides(["lr.x=1"]))


def test_augmentation_values_are_checked_when_the_config_is_read():
    """Numbers as YAML 1.1 gives them (5e-1 is a string there) are converted; a wrong value is an error now,
    not a failure inside every decode task that would look like bad data."""
    cfg = TrainConfig(augment={"hflip": "5e-1", "scale": ["8e-2", 1], "random_erasing": "1e-1"})
    assert (cfg.augment.hflip, cfg.augment.scale, cfg.augment.random_erasing) == (0.5, (0.08, 1.0), 0.1)
    for bad, message in [
        ({"hflip": "half"}, "augment.hflip must be a number"),
        ({"scale": [1.0, 0.5]}, "augment.scale must be two increasing positive numbers"),
        ({"auto_augment": "rand-m9-x1"}, "is no timm RandAugment spec"),
        ({"interpolation": "nearest"}, "bicubic or bilinear"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(augment=bad)


def test_configs_of_the_first_version_are_migrated():
    """A config saved before the augmentation was nested (version 1, in checkpoints and run folders of
    earlier runs) reads as the same run in today's form."""
    old = {"model": "crossvit_9_240", "crop_scale": [0.35, 1.0], "rand_augment": True, "random_erasing": 0.0,
           "mixup": 0.2, "cutmix": 0.0, "lr": 0.05}  # fmt: skip
    cfg = TrainConfig.from_dict(old)
    assert cfg.version == 2 and cfg.lr == 0.05
    assert cfg.augment.scale == (0.35, 1.0) and cfg.augment.auto_augment == "rand-m9-mstd0.5-inc1"
    assert (cfg.augment.random_erasing, cfg.augment.mixup, cfg.augment.cutmix) == (0.0, 0.2, 0.0)
    assert TrainConfig.from_dict({**old, "rand_augment": False}).augment.auto_augment == ""
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # and today's round-trips
    # The earliest version-1 runs had cpus_per_worker; a config newer than the code is refused.
    assert TrainConfig.from_dict({**old, "cpus_per_worker": 3}).resources_per_worker == {"CPU": 3}
    with pytest.raises(ValueError, match="config version 3 is newer than this code"):
        TrainConfig.from_dict({**cfg.to_dict(), "version": 3})


def test_the_papers_recipes_are_configured_as_published():
    for name in ("crossvit_small_240", "crossvit_15_dagger_240"):
        cfg = TrainConfig.from_yaml(f"jobs/configs/{name}.yaml")
        assert cfg.model == name and cfg.epochs == 300 and cfg.lr == 5e-4 and cfg.weight_decay == 0.05
        assert (cfg.warmup_lr, cfg.min_lr, cfg.label_smoothing, cfg.drop_path) == (1e-6, 1e-5, 0.1, 0.1)
        aug = cfg.augment
        assert (aug.mixup, aug.cutmix, aug.random_erasing, aug.auto_augment) == (0.8, 1.0, 0.25, "rand-m9-mstd0.5-inc1")
        assert (aug.scale, aug.interpolation, aug.color_jitter) == ((0.08, 1.0), "bicubic", 0.0)


def test_fine_tuning_weights_of_another_class_count_and_resolution_are_adapted(s3_endpoint, tiny_cfg):
    """--init: the classifier of another class count is replaced, position embeddings of another resolution
    are resampled, everything else is loaded as it is; from a file or a checkpoint folder in S3."""

    source = crossvit.CrossViT(dataclasses.replace(tiny_cfg, img_size=96, num_classes=10))
    storage.ensure_bucket("s3://init-test")
    with __import__("tempfile").TemporaryDirectory() as d:
        crossvit.save_weights(source, f"{d}/w.safetensors")
        storage.upload_file(f"{d}/w.safetensors", "s3://init-test/ckpt/weights.safetensors")
    for uri in ("s3://init-test/ckpt/weights.safetensors", "s3://init-test/ckpt"):
        target = crossvit.CrossViT(dataclasses.replace(tiny_cfg, num_classes=4))
        fresh_head = target.head[0].weight.clone()
        load_init(target, uri)
        assert torch.equal(target.blocks[0].fusion[0].attn.wq.weight, source.blocks[0].fusion[0].attn.wq.weight)
        assert torch.equal(target.head[0].weight, fresh_head)  # 4 classes: a new classifier
        assert target.pos_embed_0.shape == (1, 1 + 16, 32) != source.pos_embed_0.shape  # resampled to 48 px
    # A PyTorch state dict under another name (Hugging Face's pytorch_model.bin) is a file, not a folder.
    with __import__("tempfile").TemporaryDirectory() as d:
        torch.save(source.state_dict(), f"{d}/pytorch_model.bin")
        storage.upload_file(f"{d}/pytorch_model.bin", "s3://init-test/hub/pytorch_model.bin")
    target = crossvit.CrossViT(dataclasses.replace(tiny_cfg, num_classes=4))
    load_init(target, "s3://init-test/hub/pytorch_model.bin")
    assert torch.equal(target.blocks[0].fusion[0].attn.wq.weight, source.blocks[0].fusion[0].attn.wq.weight)
    with pytest.raises(FileNotFoundError):
        load_init(target, "s3://init-test/nothing-here")


def _tiny_run_config(**fields) -> TrainConfig:
    return TrainConfig.from_yaml(REPO / "jobs/configs/sample.yaml", **fields)


def test_the_train_job_on_a_finished_run_ends_cleanly(monkeypatch, capsys):
    """`python -m jobs.train` where fit has nothing to do (returns None, having said so): the job ends with
    exit status 0 and no metrics (a submitted job again after its run finished; fit's side is tested below)."""
    from jobs import train as job

    monkeypatch.setattr(job, "fit", lambda cfg, **_: print("run x already finished its 1 epochs: nothing to do"))
    job.main(["--config", "jobs/configs/sample.yaml", "--data", "s3://x/y", "--name", "x", "--epochs", "1"])
    out = capsys.readouterr().out
    assert "nothing to do" in out and "final metrics" not in out


def test_the_seed_gives_every_rank_and_run_the_same_initial_weights():
    cfg = _tiny_run_config(seed=3)
    a = training_state(cfg, 4, torch.device("cpu"), 1e-3)[0]
    b = training_state(cfg, 4, torch.device("cpu"), 1e-3)[0]
    c = training_state(_tiny_run_config(seed=4), 4, torch.device("cpu"), 1e-3)[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.head[0].weight, c.head[0].weight)


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # meta tensors hold no values
def test_a_checkpoint_is_restored_onto_the_device_of_the_placed_model(tmp_path):
    """Resuming on a GPU: the optimizer state must end up where the parameters are. "meta" stands in for
    the GPU here (a second device type on a machine without one): the model is placed there as
    prepare_model places it on CUDA, and every AdamW state tensor must follow."""
    cfg = _tiny_run_config()
    model, optimizer, *_ = training_state(cfg, 4, torch.device("cpu"), 1e-3)
    x = torch.randn(2, 3, 48, 48)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    optimizer.step()  # AdamW now has state (exp_avg, exp_avg_sq, step)
    save_checkpoint(tmp_path, model, optimizer, {"cfg": {}}, {"epoch": 2, "step": 7})
    (tmp_path / "metrics.json").write_text(json.dumps({"epoch": 2, "step": 7}))

    _, optimizer, start, step, saved = training_state(
        cfg, 4, torch.device("meta"), 1e-3, place=lambda m: m.to("meta"), checkpoint_dir=tmp_path
    )
    assert (start, step, saved["epoch"]) == (3, 7, 2)
    states = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(states) == 3 * len(params) and {p.device.type for p in params} == {"meta"}
    assert {t.device.type for t in states if t.ndim} == {"meta"}  # step counters may stay on the CPU


def _sum_in_a_process_group(rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    from pipelines.train.loop import _sum_over_workers

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    loss_sum, seen, count = [(torch.tensor(2.0), 8, 1), (torch.tensor(10.0), 32, 4)][rank]
    out.put((rank, _sum_over_workers(loss_sum, seen, count)))
    dist.destroy_process_group()


@pytest.mark.slow  # two processes in a gloo group
def test_the_training_loss_is_averaged_over_every_rank():
    """Rank 0 saw one batch with loss 2, rank 1 four batches summing to 10: the epoch's loss is 12 / 5, not
    rank 0's 2 (two real processes in a gloo group, as Ray Train's workers are)."""
    import torch.multiprocessing as mp

    from pipelines.local_s3 import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_sum_in_a_process_group, args=(r, 2, port, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    assert results[0] == results[1] == (12.0, 40, 5)


# ------------------------------------------------------------------------------------------------------
# Real training runs
# ------------------------------------------------------------------------------------------------------


VAL_IMAGES = 39  # odd: an even split over 2 workers would drop one (Ray's default for every dataset)


@pytest.fixture(scope="module")
def learnable_data(ray_cluster, tmp_path_factory) -> str:
    """4 classes of the sample data set, 60 training and about 10 validation images each (39 in all), in S3."""
    from pipelines.data.sample import SampleSpec, write_sample_dataset

    images = write_sample_dataset(tmp_path_factory.mktemp("learnable"), SampleSpec(4, 60, 10, 64, 48, seed=5))
    next((images / "val").rglob("*.JPEG")).unlink()
    data = "s3://train-test/data"
    prepare(str(images), data, shard_size_mb=0.05, workers=2)
    return data


@pytest.fixture(scope="module")
def trained(learnable_data):
    """A 2-worker DDP run of the sample recipe, 5 epochs."""
    cfg = TrainConfig.from_yaml(
        "jobs/configs/sample.yaml", data=learnable_data, storage="s3://train-test/runs", name="ddp", epochs=5,
        batch_size=8,
    )  # fmt: skip
    return cfg, fit(cfg)


def test_ddp_training_learns_evaluates_exactly_and_checkpoints_to_s3(trained):
    cfg, result = trained
    run = f"{cfg.storage}/{cfg.name}"
    assert result.error is None and result.metrics["epoch"] == cfg.epochs - 1
    # Every validation image once over both workers, in batches of 8 that do not divide the 19 or 20 each gets.
    assert result.metrics["val_samples"] == VAL_IMAGES
    # Chance is 25 %; the run reaches about 60 % (from 59 to 75 % seen, with data orders that differ).
    assert result.metrics["val_top1"] >= 45, result.metrics
    history = load_history(run)
    assert [m["epoch"] for m in history] == list(range(cfg.epochs))
    assert all(m["workers"] == 2 and not m["resumed"] for m in history)
    assert set(history[0]) >= {"lr", "train_loss", "val_loss", "val_top1", "val_top5", "images_per_s", "epoch_s"}
    assert storage.read_bytes(f"{run}/metrics.csv").startswith(b"epoch,lr,train_loss")
    assert storage.read_bytes(f"{run}/curves.png")[:4] == b"\x89PNG"
    # The best keep_checkpoints (2) by validation top-1, plus the latest; each one complete.
    checkpoints = _checkpoints(run)
    assert 2 <= len(checkpoints) <= 3 and str(result.checkpoint.path) in checkpoints[-1]
    latest = checkpoints[-1]
    saved = json.loads(storage.read_bytes(f"{latest}/config.json"))
    assert saved["cfg"]["name"] == "ddp" and [c["name"] for c in saved["classes"]][:2] == ["red circle", "green square"]
    with __import__("tempfile").NamedTemporaryFile() as f:
        f.write(storage.read_bytes(f"{latest}/state.pt"))
        f.flush()
        state = torch.load(f.name, weights_only=True)  # nothing from storage is unpickled
    assert state["epoch"] == cfg.epochs - 1 and state["step"] == history[-1]["step"] and "optimizer" in state


def test_a_run_started_again_resumes_and_a_finished_run_does_nothing(trained, capsys):
    """A changed recipe is refused before anything runs; a longer schedule is not a change; asked for
    explicitly, a changed recipe resumes the run from its latest checkpoint (every epoch once) and becomes its
    saved configuration; a finished run started again does nothing. (Resuming an unchanged recipe, the same
    command again: test_a_submitted_job_stopped_mid_run_resumes_when_started_again, and every kill test.)"""
    cfg, _ = trained
    run = f"{cfg.storage}/{cfg.name}"
    longer = TrainConfig(**{**cfg.__dict__, "epochs": cfg.epochs + 1})
    other_recipe = TrainConfig(**{**longer.__dict__, "lr": 0.1, "batch_size": 16, "data": "s3://train-test/other"})
    with pytest.raises(ConfigChangedError, match=r"data: 's3://train-test/data' -> 's3://train-test/other'") as err:
        fit(other_recipe)
    assert "batch_size: 8 -> 16" in str(err.value) and "lr: 0.05 -> 0.1" in str(err.value)
    assert "epochs" not in str(err.value)  # a longer schedule is what resuming is for
    assert len(load_history(run)) == cfg.epochs  # nothing ran
    check_resume(longer)  # fit's own check, before it starts anything: a longer schedule alone passes
    changed = TrainConfig(**{**longer.__dict__, "lr": 0.01})
    resumed = fit(changed, allow_changes=True)
    assert resumed.error is None and resumed.metrics["epoch"] == cfg.epochs
    history = load_history(run)
    assert [m["epoch"] for m in history] == list(range(cfg.epochs + 1))  # every epoch once, across the restart
    assert history[-1]["resumed"] and history[-1]["step"] > history[-2]["step"]
    assert json.loads(storage.read_bytes(f"{run}/config.json"))["cfg"]["lr"] == 0.01
    capsys.readouterr()
    assert fit(changed) is None  # finished: nothing to do, and it says so
    assert f"already finished its {cfg.epochs + 1} epochs: nothing to do" in capsys.readouterr().out


def test_fine_tuning_ranks_only_evaluated_checkpoints_in_a_relative_folder(trained, tmp_path, monkeypatch):
    """One run for three things. Fine-tuning: initialised from the trained run's latest checkpoint folder, at
    learning rate 0, it scores what that checkpoint scored (from scratch it would be near chance). Ranking:
    eval_every 2, so epochs 0 and 2 are not evaluated; every evaluation scores the same, so a checkpoint
    ranked on an earlier epoch's score (a tie, and later wins) would push the evaluated epoch 1 out; only
    evaluated checkpoints may compete: the best two kept are epochs 1 and 3. Storage is a relative path:
    checkpoints, metrics.json and curves.png all land in the driver's folder."""
    cfg, _ = trained
    init = _checkpoints(f"{cfg.storage}/{cfg.name}")[-1]
    before = json.loads(storage.read_bytes(f"{init}/metrics.json"))["val_top1"]
    monkeypatch.chdir(tmp_path)
    tuned = _tiny_run_config(
        data=cfg.data, storage="relative-runs", name="ranked", init=init, epochs=4, eval_every=2, keep_checkpoints=2,
        batch_size=16, lr=0, warmup_lr=0, min_lr=0,
    )  # fmt: skip
    fit(tuned)
    run = tmp_path / "relative-runs" / "ranked"
    history = load_history(str(run))
    assert [m["epoch"] for m in history] == [0, 1, 2, 3] and (run / "curves.png").is_file()
    assert before >= 45 and abs(history[1]["val_top1"] - before) <= 3, (before, history[1])
    assert [m["val_top1"] is None for m in history] == [True, False, True, False]
    assert not any(m["resumed"] for m in history)  # one attempt: nothing failed on the way
    assert history[1]["val_top1"] == history[3]["val_top1"]
    kept = sorted(json.loads((p / "metrics.json").read_text())["epoch"] for p in run.glob("checkpoint_*/"))
    assert kept == [1, 3]


def _corrupt_one_image(data: str) -> None:
    """Replace the bytes of the first JPEG in the first training shard by garbage of the same length."""
    import tarfile

    shard = Path(data) / load_manifest(data)["splits"]["train"]["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        hit = False
        for m, payload in members:
            if m.name.endswith(".jpg") and not hit:
                payload, hit = b"\xff\xd8" + b"\0" * (len(payload) - 2), True
            tar.addfile(m, io.BytesIO(payload))


def test_the_bad_sample_limit_is_a_training_setting(ray_cluster, sample_images, tmp_path):
    data = str(tmp_path / "data")
    prepare(str(sample_images), data, shard_size_mb=0.05, workers=2)
    _corrupt_one_image(data)
    cfg = _tiny_run_config(data=data, storage=str(tmp_path / "runs"), name="strict", epochs=1, batch_size=8,
                           max_bad_fraction=0.0, max_failures=0)  # fmt: skip
    with pytest.raises(Exception, match=r"1 of \d+ samples were bad \(.*% > 0.0% allowed\)"):
        fit(cfg)


def test_a_run_folder_of_the_first_config_version_still_resumes(tmp_path):
    """A run written before the augmentation was nested: its checkpoint's config.json is version 1. The
    same run started again compares equal (after migration); a changed recipe is still refused, by name."""
    from pipelines.train.launch import check_resume

    checkpoint = tmp_path / "runs" / "old" / "checkpoint_2026-11-20_10-00-00.000000"
    checkpoint.mkdir(parents=True)
    crossvit.save_weights(crossvit.create_model("crossvit_tiny_240", num_classes=4), checkpoint / "weights.safetensors")
    cfg = _tiny_run_config(data=str(tmp_path / "data"), storage=str(tmp_path / "runs"), name="old")
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("version", "augment")}
    old.update(crop_scale=[0.35, 1.0], rand_augment=False, random_erasing=0.0, mixup=0.0, cutmix=0.0)
    (checkpoint / "config.json").write_text(json.dumps({"cfg": old, "classes": [], "train_samples": 1}))
    check_resume(cfg)  # no error: the same run
    changed = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, mixup=0.8))
    with pytest.raises(ConfigChangedError, match=r"augment.mixup: 0.0 -> 0.8"):
        check_resume(changed)


def test_images_decoded_on_the_training_device_and_trackers_that_receive_every_epoch(learnable_data, tmp_path):
    """One run for two settings. decode_on_device: the ingest ships JPEGs and each worker decodes and augments
    its batches on its own device (nvJPEG on GPUs; here the CPU device): the run trains and evaluates every
    image. Trackers: TensorBoard event files beside the checkpoints in S3, and an MLflow run."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracking = f"file://{tmp_path}/mlruns"
    cfg = TrainConfig.from_yaml(
        "jobs/configs/sample.yaml", data=learnable_data, storage="s3://train-test/runs", name="tracked", epochs=2,
        batch_size=16, tensorboard=True, mlflow_tracking_uri=tracking, decode_on_device=True,
        **{"augment.auto_augment": DEIT_RAND_AUGMENT},
    )  # fmt: skip
    result = fit(cfg)
    assert result.error is None and result.metrics["val_samples"] == VAL_IMAGES and result.metrics["epoch"] == 1
    assert result.metrics["decoded_on"] == "cpu"  # the training device's type: not Ray Data's CPU tasks
    events = storage.list_files(f"{cfg.storage}/tracked/tensorboard")
    assert len(events) == 1
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / events[0].rsplit("/", 1)[1]).write_bytes(storage.read_bytes(events[0]))
    board = EventAccumulator(str(tmp_path / "tb"))
    board.Reload()
    assert [e.step for e in board.Scalars("val_top1")] == [0, 1]
    client = MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0, 1]
    assert run.data.params["cfg.model"] == cfg.model


# ------------------------------------------------------------------------------------------------------
# As a cluster user runs it: `ray job submit`, `ray job stop`, start again
# ------------------------------------------------------------------------------------------------------


def _ray_job(ray_cluster, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real CLI against the session's head (token authentication on, as `ray start` left it)."""
    cmd = [RAY_CLI, "job", *args[:1], "--address", ray_cluster["dashboard"], *args[1:]]
    for _ in range(90):  # a head node just started, or busy, may not have its job agent yet: "try again later"
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if "No available agent to submit job" not in out.stdout + out.stderr:
            return out
        time.sleep(2)
    return out


def test_a_submitted_job_stopped_mid_run_resumes_when_started_again(ray_cluster, sample_shards, capsys):
    """``ray job submit --working-dir . -- python -m jobs.train ...``; ``ray job stop`` after the first
    checkpoint; the same command again resumes from the latest checkpoint and finishes the run. The second
    start runs jobs.train's main in this process (this test session's driver, not the stopped job's): a
    second submission repeated what the first one and the README's steps show of `ray job submit`, for 35 s.
    (Its log line "resuming ... after epoch" is not checked here; the records' "resumed" is.)"""
    data = sample_shards
    storage.ensure_bucket("s3://job-test")
    run = "s3://job-test/runs/submitted"
    train = ["python", "-m", "jobs.train", "--config", "jobs/configs/sample.yaml", "--data", data]
    train += ["--storage", "s3://job-test/runs", "--name", "submitted", "--epochs", "4", "batch_size=8"]
    first = f"train-{uuid.uuid4().hex[:8]}"
    out = _ray_job(ray_cluster, "submit", "--no-wait", "--submission-id", first, "--working-dir", ".", "--", *train)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    deadline = time.monotonic() + 240
    while not checkpointed(run):
        assert time.monotonic() < deadline, _ray_job(ray_cluster, "logs", first).stdout[-3000:]
        time.sleep(0.2)
    stop = _ray_job(ray_cluster, "stop", first)
    assert stop.returncode == 0 and "was stopped" in _ray_job(ray_cluster, "status", first).stdout
    stopped_at = len(load_history(run))
    assert stopped_at < 4

    from jobs.train import main

    capsys.readouterr()
    main(train[3:])  # the arguments after `python -m jobs.train`
    assert "final metrics" in capsys.readouterr().out
    history = load_history(run)
    assert [m["epoch"] for m in history] == [0, 1, 2, 3]
    assert any(m["resumed"] for m in history[1:])  # the start after the stop came from its checkpoint
    # (Started once more, it ends at once: fit's answer and the job's are tested in-process above.)
