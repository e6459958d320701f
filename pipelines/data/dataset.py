"""A prepared data set as an object: its manifest read once per job and handed down.

A data set is a folder or prefix (local or S3) holding ``manifest.json``: the classes, the splits with
their shards (name, sample count, bytes, sha256) and a fingerprint of the content. Shards written by
``python -m jobs.prepare_data`` live beside the manifest (``<data>/train/shard-000000.tar``); shards of a
corpus adopted with ``--adopt`` live wherever they were, and the manifest names them by URI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

from pipelines import storage


class DatasetError(ValueError):
    """The source or the destination is not usable as it is; the message says why and what to do."""


@dataclass(frozen=True)
class Shard:
    name: str  # as the manifest writes it: "train/shard-000000.tar", or an adopted shard's URI
    uri: str  # where it is
    samples: int | None  # None when the manifest does not say (the truncation check is then off)
    bytes: int | None = None  # its size, where the manifest says


@dataclass(frozen=True)
class DataSet:
    uri: str
    manifest: dict

    @classmethod
    def load(cls, uri: str) -> DataSet:
        try:
            manifest = json.loads(storage.read_bytes(storage.join(uri, "manifest.json")))
        except FileNotFoundError:
            raise DatasetError(
                f"{uri} has no manifest.json: run python -m jobs.prepare_data first (or --adopt for shards "
                "made elsewhere)"
            ) from None
        return cls(str(uri), manifest)

    @property
    def classes(self) -> list[dict]:
        """[{index, wnid, name}] in label order."""
        return self.manifest["classes"]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def splits(self) -> list[str]:
        return sorted(self.manifest["splits"])

    def samples(self, split: str) -> int:
        return self._split(split)["samples"]

    def shards(self, split: str) -> list[Shard]:
        self._split(split)  # a clear error for a split the data set does not have
        return self._shards[split]

    @cached_property
    def _shards(self) -> dict[str, list[Shard]]:
        return {
            split: [
                Shard(s["name"], s.get("uri") or storage.join(self.uri, s["name"]), s.get("samples"), s.get("bytes"))
                for s in info["shards"]
            ]
            for split, info in self.manifest["splits"].items()
        }

    def _split(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise DatasetError(f"{self.uri} has no split {split!r}; it has {self.splits}")
        return self.manifest["splits"][split]


def load_manifest(uri: str) -> dict:
    """The manifest of the data set at ``uri`` (a DatasetError if there is none)."""
    return DataSet.load(uri).manifest


def existing_manifest(uri: str) -> dict | None:
    """The manifest at ``uri`` if there is one (prepare and adopt compare with it before writing)."""
    try:
        return json.loads(storage.read_bytes(storage.join(uri, "manifest.json")))
    except FileNotFoundError:
        return None
