"""The model registry, on any storage URI (an S3 prefix or a local path):

    <registry>/<model>/versions/<n>/weights.safetensors   the bare model (safetensors)
    <registry>/<model>/versions/<n>/model.json            what the version is (see ``register``)
    <registry>/<model>/aliases/<alias>.json               the version an alias names, and its history

Writes are compare-and-swap (``storage.create_exclusive`` / ``storage.replace_if``):
- a version number is claimed by creating its model.json only if there is none (a claim, status
  "uploading"), before anything is uploaded into it; the weights follow, and the model.json is then
  rewritten complete (status "ready", with the weights' sha256). Two promotions at once get two numbers.
- an alias moves (or is cleared: it then names no version, as a canary does once judged) only if it is still
  what the writer read (S3: its ETag; locally: its sha256 under a lock file). The loser gets
  ``AliasMovedError`` and is never retried blindly: the gate compared the candidate with a version that is
  no longer current.
Nothing points at a version before it is complete, and a reader skips versions that are not ready.

Every claim and alias record carries a ``write_id`` of its own (a random uuid). A conditional write can be
refused by its own success: when the response to an S3 PUT is lost (a connection reset), boto3 sends the PUT
again, and the retry meets the first attempt's write (412: the number is taken, the ETag has changed). So
on a refusal the registry reads the object back, and if it holds the write_id it just wrote, the write is
done: the claimed number is kept (not bumped, which would leave an orphan "uploading" version), and the
alias move is reported done (not "moved meanwhile").

Loading checks the weights against the sha256 recorded in model.json; only safetensors and JSON are read.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import crossvit
from crossvit.transforms import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATION, eval_crop_pct, eval_resize_size
from pipelines import storage

if TYPE_CHECKING:
    import torch

FORMAT = 1
READY = "ready"


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message says why in one line."""


class AliasMovedError(RegistryError):
    """Another promotion moved the alias since this one read it."""


class ChecksumError(RegistryError):
    """A version's weights are not the bytes that were registered."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_write_id() -> str:
    """A fresh id for one record written, to recognise it when it is read back (see the module docstring)."""
    return uuid.uuid4().hex


def wrote(uri: str, write_id: str) -> bool:
    """Whether the object at ``uri`` is the record with ``write_id``: a conditional write that was refused
    was in fact this process's own, whose response was lost and whose retry met it."""
    found = storage.read_tagged(uri)
    if found is None:
        return False
    try:
        record = json.loads(found[0])
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and record.get("write_id") == write_id


def who() -> str:
    """user@host of this process, for the records (never a credential)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class ModelVersion:
    """A registered version: its number, its folder's URI and its model.json."""

    model: str
    number: int
    uri: str
    meta: dict

    @property
    def weights_uri(self) -> str:
        return storage.join(self.uri, "weights.safetensors")

    @property
    def classes(self) -> list[dict]:
        return self.meta["classes"]

    @property
    def image_size(self) -> int:
        return self.meta["preprocessing"]["input_size"]

    @property
    def top1(self) -> float | None:
        return self.meta.get("metrics", {}).get("val_top1")

    def describe(self) -> dict:
        """What a client sees of it (Serve's /v1/models): no storage URIs (``source`` has them)."""
        return {
            "model": self.model,
            "version": self.number,
            "classes": [c["name"] for c in self.classes],
            "input_size": self.image_size,
            "preprocessing": self.meta["preprocessing"],
            "metrics": self.meta.get("metrics", {}),
            "data_fingerprint": self.meta.get("data_fingerprint"),
            "created": self.meta.get("created"),
        }

    def source(self) -> dict:
        """The run and checkpoint it came from (storage URIs: for operators, not clients)."""
        return {k: self.meta.get("source", {}).get(k) for k in ("run", "checkpoint")}


class Registry:
    """One registry root; every method reads or writes storage directly (no cache), so several processes
    and machines can share it."""

    def __init__(self, root: str):
        loc = storage.parse(root)  # a local root as an absolute path: the same folder from any working dir
        self.root = str(root).rstrip("/") if loc.is_s3 else loc.key

    def _model(self, model: str) -> str:
        if not model or "/" in model or model.startswith("."):
            raise RegistryError(f"model name {model!r}: a plain name, without '/'")
        return storage.join(self.root, model)

    def _version_uri(self, model: str, number: int) -> str:
        return storage.join(self._model(model), "versions", str(number))

    def _alias_uri(self, model: str, alias: str) -> str:
        if not alias or "/" in alias:
            raise RegistryError(f"alias {alias!r}: a plain name, without '/'")
        return storage.join(self._model(model), "aliases", f"{alias}.json")

    # -- versions ---------------------------------------------------------------------------------------
    def version_numbers(self, model: str) -> list[int]:
        """Every claimed version number, ready or not, ascending."""
        prefix = storage.join(self._model(model), "versions")
        numbers = set()
        for uri in storage.list_files(prefix, suffix="/model.json"):
            part = uri[len(prefix) :].strip("/").split("/")[0]
            if part.isdigit():
                numbers.add(int(part))
        return sorted(numbers)

    def models(self) -> list[str]:
        return sorted(
            {uri[len(self.root) :].strip("/").split("/")[0] for uri in storage.list_files(self.root, ".json")}
        )

    def get(self, model: str, number: int) -> ModelVersion:
        """A complete version; RegistryError if it does not exist or is still being (or was never) uploaded."""
        uri = self._version_uri(model, number)
        try:
            meta = json.loads(storage.read_bytes(storage.join(uri, "model.json")))
        except FileNotFoundError:
            raise RegistryError(f"{model} has no version {number} in {self.root}") from None
        except json.JSONDecodeError:
            meta = {}  # damaged by hand or by a store that is not atomic: not a usable version
        if meta.get("status") != READY:
            raise RegistryError(
                f"{model} version {number} is not complete (claimed {meta.get('claimed')} by {meta.get('by')}): "
                "an upload in progress, or one that was interrupted"
            )
        return ModelVersion(model, number, uri, meta)

    def versions(self, model: str) -> list[ModelVersion]:
        """The complete versions, ascending."""
        out = []
        for n in self.version_numbers(model):
            try:
                out.append(self.get(model, n))
            except RegistryError:
                continue
        return out

    def register(self, model: str, weights: Path, meta: dict) -> ModelVersion:
        """Add ``weights`` (a local safetensors file) as the next version, with ``meta`` in its model.json;
        the version is complete when this returns. Nothing points at it yet."""
        data = Path(weights).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        number = (self.version_numbers(model) or [0])[-1] + 1
        for _ in range(1000):  # claim the number: the first to create its model.json has it
            claim = {"format": FORMAT, "status": "uploading", "claimed": now(), "by": who(), "write_id": new_write_id()}
            claim_uri = storage.join(self._version_uri(model, number), "model.json")
            try:
                storage.create_exclusive(claim_uri, json.dumps(claim).encode())
                break
            except storage.PreconditionFailed:
                if wrote(claim_uri, claim["write_id"]):  # our own claim, met by boto3's retry: the number is ours
                    break
                number += 1
        else:
            raise RegistryError(f"could not claim a version number of {model} (tried up to {number})")
        uri = self._version_uri(model, number)
        storage.upload_file(weights, storage.join(uri, "weights.safetensors"))
        full = {
            **meta,  # first: the registry's own fields below are never the caller's (a copied model.json)
            "format": FORMAT,
            "model": model,
            "version": number,
            "status": READY,
            "weights": {"file": "weights.safetensors", "sha256": digest, "bytes": len(data)},
            "created": now(),
            "created_by": who(),
        }
        storage.write_bytes(storage.join(uri, "model.json"), json.dumps(full, indent=1).encode())
        return ModelVersion(model, number, uri, full)

    def read_weights(self, version: ModelVersion) -> bytes:
        """The version's safetensors file, after checking its sha256."""
        data = storage.read_bytes(version.weights_uri)
        expected = version.meta["weights"]["sha256"]
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ChecksumError(
                f"{version.weights_uri}: sha256 {actual[:16]}... is not the registered {expected[:16]}...; "
                "the file was changed or damaged after registration"
            )
        return data

    def load(
        self, version: ModelVersion, device: str | torch.device = "cpu", data: bytes | None = None
    ) -> crossvit.CrossViT:
        """The version's model in eval mode on ``device``, from ``data`` (read_weights' bytes) if given."""
        # torch here, not at the top: listing versions and moving aliases (jobs.promote --list, --rollback)
        # load no model, and start in a fraction of a second without it.
        import safetensors.torch

        from crossvit.weights import load_weights

        data = self.read_weights(version) if data is None else data
        model = crossvit.CrossViT(crossvit.CrossViTConfig.from_dict(version.meta["config"]))
        load_weights(model, safetensors.torch.load(data))
        return model.eval().to(device)

    def table(self, model: str) -> str:
        """Versions (with the aliases naming them) and their metrics, as a text table."""
        aliases: dict[int, list[str]] = {}
        for uri in storage.list_files(storage.join(self._model(model), "aliases"), suffix=".json"):
            record = json.loads(storage.read_bytes(uri))
            if record["version"] is not None:  # a cleared alias names none
                aliases.setdefault(record["version"], []).append(record["alias"])
        rows = [("version", "aliases", "top-1", "top-5", "epoch", "created", "run")]
        for v in self.versions(model):
            m = v.meta.get("metrics", {})
            rows.append((
                str(v.number), ",".join(sorted(aliases.get(v.number, []))) or "-",
                f"{m['val_top1']:.2f}" if m.get("val_top1") is not None else "-",
                f"{m['val_top5']:.2f}" if m.get("val_top5") is not None else "-",
                str(m.get("epoch", "-")), v.meta.get("created", "-"), v.meta["source"]["run"],
            ))  # fmt: skip
        if len(rows) == 1:
            return f"{model}: no version in {self.root}"
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    # -- aliases ----------------------------------------------------------------------------------------
    def read_alias(self, model: str, alias: str) -> tuple[dict | None, str | None]:
        """The alias's record and the tag to move it with (None, None if it does not exist)."""
        found = storage.read_tagged(self._alias_uri(model, alias))
        if found is None:
            return None, None
        return json.loads(found[0]), found[1]

    def resolve(self, model: str, alias: str | None = None, version: int | None = None) -> ModelVersion:
        """The version a client asked for: a number, or the one an alias names."""
        if version is not None:
            return self.get(model, version)
        record, _ = self.read_alias(model, alias or "production")
        if record is None:
            raise RegistryError(f"{model} has no alias {alias!r} in {self.root}: promote a run first")
        if record["version"] is None:
            raise RegistryError(f"{model}:{alias} names no version (cleared {record['updated']}): promote a run first")
        return self.get(model, record["version"])

    def move_alias(
        self, model: str, alias: str, number: int, *, expected: tuple[dict | None, str | None], why: str, **extra
    ) -> dict:
        """Point ``alias`` at version ``number`` if it is still ``expected`` (from ``read_alias``);
        AliasMovedError if someone moved it in between. ``extra`` (e.g. fresh evaluations) goes into the
        history entry. Returns the new record."""
        self.get(model, number)  # complete, or an error: an alias never names a half-written version
        record, tag = expected
        lineage = [*(record["lineage"] if record else []), number]  # the versions promoted, in order
        new = _next_record(model, alias, record, number, record and record["version"], lineage, why, **extra)
        return self._swap(model, alias, new, tag, number)

    def rollback(self, model: str, alias: str, *, why: str = "rollback") -> dict:
        """Point ``alias`` back at the version before its current one (its lineage), compare-and-swap."""
        record, tag = self.read_alias(model, alias)
        if record is None or record["version"] is None or len(record["lineage"]) < 2:
            raise RegistryError(f"{model}:{alias} has no earlier version to roll back to")
        lineage = record["lineage"][:-1]  # a rollback steps back along it
        target = lineage[-1]
        self.get(model, target)
        previous = lineage[-2] if len(lineage) > 1 else None
        return self._swap(model, alias, _next_record(model, alias, record, target, previous, lineage, why), tag, target)

    def clear_alias(
        self, model: str, alias: str, *, expected: tuple[dict | None, str | None], why: str, **extra
    ) -> dict:
        """Make ``alias`` name no version if it is still ``expected`` (from ``read_alias``), AliasMovedError
        if someone moved or cleared it in between: a canary once it is judged. The record stays, with the entry
        (``extra``: the evidence) in its history and the lineage as it was; moving it again continues both."""
        record, tag = expected
        if record is None or record["version"] is None:
            raise RegistryError(f"{model}:{alias} names no version: there is nothing to clear")
        new = _next_record(model, alias, record, None, record["version"], record["lineage"], why, **extra)
        return self._swap(model, alias, new, tag, None)

    def _swap(self, model: str, alias: str, new: dict, tag: str | None, number: int | None) -> dict:
        """Write the alias record ``new`` if the alias still has ``tag``; AliasMovedError if it has not."""
        new = {**new, "write_id": new_write_id()}  # a rollback copies the old record: never its write_id
        uri = self._alias_uri(model, alias)
        try:
            storage.replace_if(uri, json.dumps(new, indent=1).encode(), tag)
        except storage.LockHeld as e:
            raise RegistryError(str(e)) from None
        except storage.PreconditionFailed:
            if wrote(uri, new["write_id"]):  # our own move, met by boto3's retry: done, not "moved meanwhile"
                return new
            now_at, _ = self.read_alias(model, alias)
            now_names = f"version {now_at['version']}" if now_at and now_at["version"] is not None else "no version"
            if number is None:
                raise AliasMovedError(
                    f"{model}:{alias} was moved or cleared by another writer since it was read (now {now_names}); "
                    "not cleared"
                ) from None
            raise AliasMovedError(
                f"{model}:{alias} was moved by another promotion while this one ran (now {now_names}); not moved to "
                f"version {number}, which stays registered: run the promotion again to compare with the new current "
                "version"
            ) from None
        return new


def _next_record(
    model: str, alias: str, record: dict | None, version: int | None, previous: int | None, lineage: list[int],
    why: str, **extra,
) -> dict:  # fmt: skip
    """The alias record that follows ``record`` (None: a new alias) naming ``version``, with its history entry
    (who, when, why, ``extra``). Written by ``_swap``, which adds its write id."""
    entry = {"version": version, "previous": record and record["version"], "when": now(), "who": who(), "why": why,
             **extra}  # fmt: skip
    return {
        **(record or {}),
        "model": model,
        "alias": alias,
        "version": version,
        "previous": previous,
        "lineage": lineage,
        "updated": entry["when"],
        "history": [*(record["history"] if record else []), entry],
    }


def version_meta(checkpoint_uri: str, run_uri: str, run_record: dict, metrics: dict, config: dict) -> dict:
    """model.json's fields (before the registry adds version, weights and times) for a training
    checkpoint: the model's config, classes, evaluation preprocessing, source, metrics and data."""
    size = config["img_size"]
    return {
        "config": config,
        "classes": run_record["classes"],
        "preprocessing": {
            "input_size": size,
            "crop_pct": eval_crop_pct(size),
            "resize_short_side": eval_resize_size(size),
            "interpolation": INTERPOLATION,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "source": {"run": run_uri, "checkpoint": checkpoint_uri, "train_config": run_record.get("cfg")},
        "metrics": metrics,
        "data_fingerprint": run_record.get("data_fingerprint"),
    }
