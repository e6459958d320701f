"""WebDataset corpora made elsewhere, used where they are (``python -m jobs.prepare_data --adopt``).

Many teams hold ImageNet as WebDataset shards written by other tools (``imagenet1k-train-{0000..1023}.tar``;
per sample a .jpg/.jpeg/.png/.webp and a .cls or a label in .json). Adopting them writes our manifest at
``--dest`` and nothing else: each shard is named by its URI, never copied or rewritten. A Ray task per shard
streams it once, counting its samples by WebDataset's key convention, collecting its labels and hashing it
(sha256). A shard that cannot be read to its end is reported, and kept with the samples before the break:
training, evaluation and labeling read its good samples and count the break, as for our own shards.

Classes come from a file (one a line: wnids, or names), else from the label range (0..max, named by
number). ImageNet-1k's wnids get ImageNet-1k's names.

A rerun with the same patterns does nothing when every shard still has the size the manifest recorded
(sizes are checked, not content: a shard rewritten to the same size is not noticed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
import time

import ray
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from pipelines import storage
from pipelines.data.dataset import DatasetError, existing_manifest
from pipelines.data.prepare import FORMAT, WNID, imagenet_names
from pipelines.data.reader import IMAGE_SUFFIXES, CountingReader, ends_between_members, member_type, parse_label

log = logging.getLogger(__name__)

MAX_CLASSES_FROM_LABELS = 100_000  # beyond this, a stray label rather than a class count: ask for a classes file
FINGERPRINT_METHOD = "sha256 over the shards' sha256, in split and shard order"


def shard_uris(pattern: str) -> list[str]:
    """The shards a pattern names: webdataset's URL expansion (braces, several patterns joined by '::'),
    or a folder or prefix whose .tar files are taken in name order. Local paths and S3 URIs alike."""
    if "{" in pattern or "::" in pattern:
        return [u if storage.parse(u).is_s3 else storage.parse(u).key for u in expand_urls(pattern)]
    uris = storage.list_files(pattern, suffix=".tar")
    if not uris and storage.exists(pattern):
        uris = [pattern if storage.parse(pattern).is_s3 else storage.parse(pattern).key]
    return uris


class _HashingReader(CountingReader):
    """A read-only stream that hashes and counts what is read through it."""

    def __init__(self, stream):
        super().__init__(stream)
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def survey_shard(uri: str) -> dict:
    """Stream one shard: its samples, labels (the distinct ones), keys, bytes, sha256, and the error that cut
    it short, if one did (a Ray task per shard, wherever the shard lives). Samples are counted as
    ``reader.read_tar`` makes rows of them, so the manifest's counts are the rows training reads."""
    samples, unlabeled, strays, labels, keys, error = 0, 0, 0, set(), [], None

    def unreadable(why: str) -> dict:  # missing, forbidden, unreachable: reported, and left out of the manifest
        return {"uri": uri, "unreadable": why, "samples": 0, "labels": []}

    try:
        raw = storage.open_stream(uri)
    except OSError as e:
        return unreadable(f"cannot open: {e}")
    with raw:
        stream = _HashingReader(raw)
        key, members = None, {}

        def close_sample() -> None:
            nonlocal samples, unlabeled, strays
            if key is None:
                return
            samples += 1
            if key in seen:  # members that are not adjacent to their key's first: a malformed row
                strays += 1
                return
            seen.add(key)
            keys.append(key)
            try:
                label = parse_label(members)
            except (ValueError, UnicodeDecodeError):
                label = None
            if label is None or not any(s in members for s in IMAGE_SUFFIXES):
                unlabeled += 1
            else:
                labels.add(label)

        seen: set[str] = set()
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    base, suffix = base_plus_ext(member.name) if member.isreg() else (None, None)
                    if base is None:
                        continue
                    if base != key:
                        close_sample()
                        key, members = base, {}
                    suffix = member_type(suffix)
                    # Labels are read; image bytes are only streamed past (and hashed).
                    if suffix not in members:  # the first member of a type counts, as in reader.read_tar
                        members[suffix] = tar.extractfile(member).read() if suffix in ("cls", "json") else b""
            close_sample()
            if ends_between_members(tar, stream):
                error = f"ends after {samples} samples without the end-of-archive blocks: cut between two members?"
        except (tarfile.TarError, EOFError) as e:
            close_sample()
            error = f"truncated or corrupt after {samples} samples: {e}"
        except OSError as e:  # storage failing after its client's retries: the shard is not at fault
            return unreadable(f"cannot read after {stream.bytes} bytes: {e}")
        try:
            stream.drain()  # to the end: the hash covers the whole object
        except OSError as e:
            return unreadable(f"cannot read after {stream.bytes} bytes: {e}")
    return {
        "uri": uri,
        "unreadable": None,
        "samples": samples,
        "unlabeled": unlabeled,
        "strays": strays,
        "labels": sorted(labels),
        "keys": "\n".join(keys),  # one string: a train split's 1.3 M keys are 40 MB, not 1.3 M objects
        "bytes": stream.bytes,
        "sha256": stream.sha256.hexdigest(),
        "error": error,
    }


def _problems(surveyed: dict) -> list[str]:
    """What is wrong with a surveyed shard, in words."""
    said = [surveyed["error"]] if surveyed["error"] else []
    if surveyed["unlabeled"]:
        said.append(f"{surveyed['unlabeled']} samples without an image or a label")
    if surveyed["strays"]:
        said.append(f"{surveyed['strays']} samples whose members are not adjacent to their key's first")
    return said


def overlap(train_keys: list[str], val_keys: list[str]) -> list[str]:
    """Keys in both splits (a sample that is trained on and evaluated on), in val's order. The smaller split's
    keys become the set; the larger's are only streamed past it."""
    small, large = sorted((train_keys, val_keys), key=len)
    wanted = set(small)
    both = {k for k in large if k in wanted}
    return [k for k in val_keys if k in both]


def _classes(labels: set[int], classes_file: str | None) -> list[dict]:
    if classes_file is None:
        if not labels:
            raise DatasetError("no labelled sample in these shards, and no --classes file to name the classes")
        if min(labels) < 0:
            raise DatasetError(f"negative labels ({min(labels)}) in these shards")
        if max(labels) >= MAX_CLASSES_FROM_LABELS:
            raise DatasetError(
                f"labels go up to {max(labels)}: name the classes with --classes (one per line) if that is meant"
            )
        return [{"index": i, "wnid": str(i), "name": str(i)} for i in range(max(labels) + 1)]
    lines = [line.strip() for line in storage.read_bytes(classes_file).decode().splitlines() if line.strip()]
    if labels and max(labels) >= len(lines):
        raise DatasetError(f"labels go up to {max(labels)}, but {classes_file} names {len(lines)} classes")
    if all(WNID.match(line.split()[0]) for line in lines):
        wnids = [line.split()[0] for line in lines]
        given = [line.split(maxsplit=1)[1] if " " in line else None for line in lines]
        known = imagenet_names(wnids) or wnids
        names = [g or k for g, k in zip(given, known)]
        return [{"index": i, "wnid": w, "name": n} for i, (w, n) in enumerate(zip(wnids, names))]
    return [{"index": i, "wnid": name, "name": name} for i, name in enumerate(lines)]


def adopt(splits: dict[str, str], dest: str, classes_file: str | None = None) -> dict:
    """Write ``<dest>/manifest.json`` for the shards that ``splits`` ({"train": pattern, "val": pattern})
    name; returns the manifest. Needs a Ray cluster (``pipelines.cluster.connect``)."""
    uris = {split: shard_uris(pattern) for split, pattern in splits.items()}
    for split, found in uris.items():
        if not found:
            raise DatasetError(f"{split} pattern {splits[split]!r} names no shard")
    storage.check_buckets([u for found in uris.values() for u in found])  # one error, before any shard is read
    storage.ensure_bucket(dest)
    manifest_uri = storage.join(dest, "manifest.json")
    existing = existing_manifest(dest)
    if existing is not None and not existing.get("adopted"):
        raise DatasetError(f"{dest} holds a data set made by prepare_data; adopt into another folder")
    classes_sha256 = hashlib.sha256(storage.read_bytes(classes_file)).hexdigest() if classes_file else None
    params = {"patterns": splits, "classes_file": classes_file, "classes_sha256": classes_sha256}
    if existing is not None and _unchanged(existing, params, uris):
        log.info("%s already adopts these shards, all of the recorded sizes: nothing to do", dest)
        return existing
    survey = ray.remote(num_cpus=1, max_retries=3)(survey_shard)
    start = time.monotonic()
    pending = {split: [survey.remote(u) for u in found] for split, found in uris.items()}  # all splits at once
    surveyed = {split: ray.get(refs) for split, refs in pending.items()}
    unreadable = [
        {"path": r["uri"], "reason": r["unreadable"]} for rs in surveyed.values() for r in rs if r["unreadable"]
    ]
    surveyed = {split: [r for r in rs if not r["unreadable"]] for split, rs in surveyed.items()}
    for split, rs in surveyed.items():
        if not rs:
            raise DatasetError(f"no {split} shard could be read: {unreadable[0]['path']}: {unreadable[0]['reason']}")
    total = sum(r["samples"] for rs in surveyed.values() for r in rs)
    log.info("%d shards, %d samples read in %.0f s", sum(map(len, uris.values())), total, time.monotonic() - start)
    labels = {label for rs in surveyed.values() for r in rs for label in r["labels"]}
    problems = unreadable + [
        {"path": r["uri"], "reason": "; ".join(_problems(r))} for rs in surveyed.values() for r in rs if _problems(r)
    ]
    both = []
    if "train" in surveyed and "val" in surveyed:
        keys = {split: [k for r in surveyed[split] for k in r["keys"].split("\n") if k] for split in ("train", "val")}
        both = overlap(keys["train"], keys["val"])
        if both:
            log.warning("%d sample key(s) are in both train and val (trained on and evaluated on), e.g. %s",
                        len(both), ", ".join(both[:5]))  # fmt: skip
    for p in problems:
        log.warning("shard %s: %s", p["path"], p["reason"])
    digests = "".join(r["sha256"] for split in sorted(surveyed) for r in surveyed[split])
    manifest = {
        "format": FORMAT,
        "adopted": True,
        "fingerprint": hashlib.sha256(digests.encode()).hexdigest(),
        "fingerprint_method": FINGERPRINT_METHOD,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "params": params,
        "classes": _classes(labels, classes_file),
        "splits": {
            split: {
                "samples": sum(r["samples"] for r in rs),
                "shards": [
                    {
                        "name": r["uri"],
                        "uri": r["uri"],
                        "samples": r["samples"] if r["error"] is None else None,  # unknown past a break
                        "bytes": r["bytes"],
                        "sha256": r["sha256"],
                        **({"error": r["error"]} if r["error"] else {}),
                    }
                    for r in rs
                ],
            }
            for split, rs in surveyed.items()
        },
        "skipped": problems,
        "train_val_overlap": {"samples": len(both), "examples": both[:20]},
    }
    storage.write_bytes(manifest_uri, json.dumps(manifest, indent=1).encode())
    return manifest


def _unchanged(manifest: dict, params: dict, uris: dict[str, list[str]]) -> bool:
    """The same patterns and classes file (by content), naming the same shards (an unreadable one was left
    out, so it is surveyed again) of the recorded sizes."""
    if manifest.get("params") != params:
        return False
    for split, found in uris.items():
        recorded = manifest["splits"].get(split, {}).get("shards", [])
        if [s["uri"] for s in recorded] != found:
            return False
        sizes = storage.sizes(found)  # one LIST per 1000 shards of a folder, not a HEAD each
        if any(sizes[s["uri"]] != s["bytes"] for s in recorded):
            return False
    return True
