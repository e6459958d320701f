"""Promotion: a training run's best checkpoint becomes a registered version, and an alias moves to it if it
passes the gate.

The gate compares validation top-1: the candidate must reach ``min_top1`` and must not be below the
version the alias names now (unless forced). By default it compares the numbers the runs recorded; with
``eval_data`` both models are evaluated afresh on the same split of one prepared data set (Ray Data, in
this job), so that the comparison is fair even when the runs were evaluated on different data. Nothing is
written when the gate refuses.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from crossvit.weights import load_model, saved_config
from pipelines import storage
from pipelines.cluster import connect
from pipelines.data.dataset import DataSet
from pipelines.data.ingest import read_split
from pipelines.registry.store import ModelVersion, Registry, RegistryError, version_meta
from pipelines.train.evaluate import evaluate


class GateRefusedError(RegistryError):
    """The candidate did not pass the promotion gate."""


@dataclass(frozen=True)
class Candidate:
    """A run's checkpoint chosen for promotion."""

    run: str
    checkpoint: str
    metrics: dict
    record: dict  # the checkpoint's config.json: the run's config, classes, data fingerprint

    @property
    def top1(self) -> float:
        return self.metrics["val_top1"]


def best_checkpoint(run_uri: str) -> Candidate:
    """The run's checkpoint with the best validation top-1 among those that were evaluated (their own
    metrics.json; not the newest folder)."""
    scored = []
    for uri in storage.list_files(run_uri, suffix="/metrics.json"):
        folder = uri.rsplit("/", 1)[0]
        if not folder.rsplit("/", 1)[-1].startswith("checkpoint_"):
            continue
        metrics = json.loads(storage.read_bytes(uri))
        top1 = metrics.get("val_top1")
        if top1 is not None and not math.isnan(top1):
            scored.append((top1, metrics.get("epoch", -1), folder, metrics))
    if not scored:
        raise RegistryError(f"{run_uri} holds no evaluated checkpoint (checkpoint_*/metrics.json with val_top1)")
    top1, _, folder, metrics = max(scored, key=lambda s: (s[0], s[1]))  # ties: the later epoch
    record = json.loads(storage.read_bytes(storage.join(folder, "config.json")))
    return Candidate(run_uri, folder, metrics, record)


def fresh_top1(model: torch.nn.Module, classes: list[dict], data: DataSet, split: str, image_size: int) -> float:
    """Top-1 of ``model`` on ``split`` of ``data``, every sample once (Ray Data decodes; this process
    runs the model)."""
    if [c["wnid"] for c in classes] != [c["wnid"] for c in data.classes]:
        raise RegistryError(f"the model's classes are not those of {data.uri}: evaluating on it means nothing")
    ds = read_split(data, split, image_size=image_size, train=False)
    result = evaluate(model, ds.iter_torch_batches(batch_size=64), len(classes), torch.device("cpu"))
    return result["val_top1"]


def promote(
    run: str,
    registry: str,
    model: str,
    *,
    alias: str = "production",
    min_top1: float | None = None,
    force: bool = False,
    eval_data: str | None = None,
    eval_split: str = "val",
    why: str = "",
) -> tuple[ModelVersion, dict]:
    """Register the run's best checkpoint and move ``alias`` to it, if it passes the gate; returns the new
    version and alias record. GateRefusedError (nothing written) or AliasMovedError (the version stays
    registered, the alias is not moved) otherwise."""
    reg = Registry(registry)
    candidate = best_checkpoint(run)
    expected = reg.read_alias(model, alias)
    current = reg.get(model, expected[0]["version"]) if expected[0] and expected[0]["version"] is not None else None
    with tempfile.TemporaryDirectory() as d:
        weights = Path(d, "weights.safetensors")
        weights.write_bytes(storage.read_bytes(storage.join(candidate.checkpoint, "weights.safetensors")))
        config = saved_config(weights)  # the trained network, as its weights' header records it

        evaluation = None
        candidate_top1, current_top1 = candidate.top1, current.top1 if current else None
        if eval_data:
            connect()
            data = DataSet.load(eval_data)
            fresh = load_model(weights).eval()
            candidate_top1 = fresh_top1(fresh, candidate.record["classes"], data, eval_split, config.img_size)
            problem = None
            if current:
                try:
                    served = reg.load(current)
                except Exception as e:  # damaged or gone: it must not block its own replacement under --force
                    if not force:
                        raise RegistryError(
                            f"{model}:{alias} (version {current.number}) does not load, so it cannot be evaluated "
                            f"for the gate ({type(e).__name__}: {e}); --force to replace it"
                        ) from None
                    current_top1, problem = None, f"{type(e).__name__}: {e}"
                else:
                    current_top1 = fresh_top1(served, current.classes, data, eval_split, current.image_size)
            evaluation = {"data": eval_data, "split": eval_split, "candidate_top1": candidate_top1,
                          "current_top1": current_top1, "data_fingerprint": data.fingerprint}  # fmt: skip
            if problem:
                evaluation["current_error"] = problem

        if not force:
            if min_top1 is not None and candidate_top1 < min_top1:
                raise GateRefusedError(
                    f"refused: candidate top-1 {candidate_top1:.2f} is below --min-top1 {min_top1:.2f}"
                )
            if current_top1 is not None and candidate_top1 < current_top1:
                raise GateRefusedError(
                    f"refused: candidate top-1 {candidate_top1:.2f} is below {model}:{alias} (version "
                    f"{current.number}) at {current_top1:.2f}{' on the same data' if evaluation else ''}; "
                    "--force to promote anyway"
                )
        meta = version_meta(candidate.checkpoint, run, candidate.record, candidate.metrics, config.to_dict())
        version = reg.register(model, weights, meta)
    why = why or f"promoted from {run} (top-1 {candidate_top1:.2f}{', forced' if force else ''})"
    record = reg.move_alias(model, alias, version.number, expected=expected, why=why, evaluation=evaluation)
    return version, record
