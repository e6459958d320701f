"""Image folders become WebDataset shards in object storage (``python -m jobs.prepare_data``).

Layouts read: ImageNet (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``), ImageNet's flat validation folder
with ``LOC_val_solution.csv``, or any class-per-folder tree (one split, "train").

Each sample is three tar members in a row: ``<key>.cls`` (the integer label), ``<key>.jpg`` (the original
bytes; PNG and WebP are kept as ``.png`` / ``.webp``, any other format Pillow reads is converted to PNG,
losslessly) and ``<key>.json`` (wnid and the original relative path). Shards are byte-reproducible, so a
rerun recognises finished shards by checksum and only writes what is missing. Files that are not readable
images are reported, listed in the manifest, and never written into a shard.

The data set's fingerprint is a hash of what the shards hold: every sample's path in the tree, label and
content (sha256), never file dates, so a copy of the image tree (new modification times) is the same data
set and a changed image is another one. A rerun must not read a whole ImageNet again to tell: each finished
shard's record (``<dest>/_progress/``) keeps its files' size, modification time and sha256, and a file whose
size and time are unchanged is taken at its recorded hash; only files whose size or time changed (a copy,
an edit) are read and hashed again, and their records are updated, so the next rerun reads nothing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import random
import re
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image
from webdataset import TarWriter

from pipelines import storage
from pipelines.data.dataset import DatasetError, existing_manifest
from pipelines.progress import Progress

log = logging.getLogger(__name__)

FORMAT = "crossvit-ray/webdataset-v1"
FINGERPRINT_METHOD = "sha256 over (path, label, content sha256) of every sample"
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # written as they are; the rest become PNG
WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class Item:
    relpath: str  # relative to the source root
    wnid: str
    label: int
    size: int
    mtime_ns: int


@dataclass
class ShardPlan:
    split: str
    index: int
    items: list[Item]

    @property
    def name(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.tar"

    def fingerprint(self, hashes: list[str]) -> str:
        """The shard's content: its files' paths, labels and content hashes (in the plan's order)."""
        rows = [(i.relpath, i.label, h) for i, h in zip(self.items, hashes)]
        return hashlib.sha256(json.dumps([FORMAT, rows]).encode()).hexdigest()

    def legacy_fingerprint(self) -> str:
        """What destinations written before content fingerprints recorded: paths, sizes, dates and labels."""
        rows = [(i.relpath, i.size, i.mtime_ns, i.label) for i in self.items]
        return hashlib.sha256(json.dumps([FORMAT, rows]).encode()).hexdigest()


@dataclass
class ShardResult:
    name: str
    fingerprint: str
    samples: int
    bytes: int
    sha256: str
    skipped: list[dict] = field(default_factory=list)
    files: list[list] = field(default_factory=list)  # [relpath, size, mtime_ns, sha256] per planned file


def file_sha256(path: Path) -> str:
    """The content hash of a source file; "unreadable" for one that cannot be read (as write_shard records)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def dataset_fingerprint(results: list[ShardResult]) -> str:
    return hashlib.sha256("".join(r.fingerprint for r in results).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------
# Reading the source
# --------------------------------------------------------------------------------------------------------


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _class_folders(root: Path) -> list[Path]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"{root} holds no class folders")
    empty = [p.name for p in folders if not _files(p)]
    if empty:
        raise DatasetError(f"empty class folder(s) in {root}: {', '.join(empty)}")
    return folders


def _item(root: Path, path: Path, wnid: str, label: int) -> Item:
    st = path.stat()
    return Item(str(path.relative_to(root)), wnid, label, st.st_size, st.st_mtime_ns)


def _val_solution(root: Path) -> dict[str, str] | None:
    """ImageNet's LOC_val_solution.csv: image id -> wnid (the first word of PredictionString)."""
    for candidate in (root / "LOC_val_solution.csv", root / "val" / "LOC_val_solution.csv"):
        if candidate.is_file():
            with candidate.open() as f:
                return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    return None


def scan_source(source: str | Path) -> tuple[list[str], dict[str, list[Item]], list[dict]]:
    """Classes (sorted wnids), the items of each split, and files skipped while scanning."""
    root = Path(source)
    if not root.is_dir():
        raise DatasetError(f"source {source} does not exist or is not a folder")
    split_dirs = {s: root / s for s in ("train", "val") if (root / s).is_dir()}
    if not split_dirs:
        split_dirs = {"train": root}  # any class-per-folder tree
    first = next(iter(split_dirs.values()))
    classes = [p.name for p in _class_folders(first)]
    index = {w: i for i, w in enumerate(classes)}
    splits: dict[str, list[Item]] = {}
    skipped: list[dict] = []
    for split, folder in split_dirs.items():
        subdirs = [p for p in folder.iterdir() if p.is_dir()]
        items = []
        if subdirs:
            for cls_dir in _class_folders(folder):
                if cls_dir.name not in index:
                    raise DatasetError(f"{split} class {cls_dir.name!r} does not exist in {first.name}")
                items += [_item(root, p, cls_dir.name, index[cls_dir.name]) for p in _files(cls_dir)]
        else:
            solution = _val_solution(root)
            if solution is None:
                raise DatasetError(f"{folder} is flat but there is no LOC_val_solution.csv to label it")
            for p in _files(folder):
                if p.name == "LOC_val_solution.csv":
                    continue
                wnid = solution.get(p.name.split(".")[0])
                if wnid is None or wnid not in index:
                    skipped.append({"path": str(p.relative_to(root)), "reason": "no label in LOC_val_solution.csv"})
                    continue
                items.append(_item(root, p, wnid, index[wnid]))
        splits[split] = items
    return classes, splits, skipped


def class_names(root: Path, classes: list[str]) -> list[str]:
    """Human-readable names: LOC_synset_mapping.txt if present; ImageNet-1k's (from timm, which has the wnids
    and names, so a tree of another 1000 wnids keeps its folder names) when the class folders are exactly
    ImageNet-1k's wnids; else the folder names."""
    mapping = root / "LOC_synset_mapping.txt"
    if mapping.is_file():
        pairs = dict(line.split(" ", 1) for line in mapping.read_text().splitlines() if " " in line)
        return [pairs.get(w, w).strip() for w in classes]
    return imagenet_names(classes) or list(classes)


def imagenet_names(wnids: list[str]) -> list[str] | None:
    """ImageNet-1k's names for its 1000 wnids (timm's ImageNetInfo holds both), or None for any other set."""
    if len(wnids) != 1000 or not all(WNID.match(w) for w in wnids):
        return None
    from timm.data import ImageNetInfo  # its class tables are read from files: only when they can apply

    info = ImageNetInfo("imagenet-1k")
    if set(wnids) != set(info.label_names()):
        return None
    return [info.label_name_to_description(w) for w in wnids]


def plan_shards(splits: dict[str, list[Item]], shard_size_mb: float, seed: int) -> list[ShardPlan]:
    """Shuffle each split once (so every shard mixes classes) and pack it into shards of about shard_size_mb."""
    limit = shard_size_mb * 2**20
    plans = []
    for split, items in splits.items():
        items = list(items)
        random.Random(f"{seed}-{split}").shuffle(items)
        current: list[Item] = []
        size = 0
        for item in items:
            if current and size + item.size > limit:
                plans.append(ShardPlan(split, sum(p.split == split for p in plans), current))
                current, size = [], 0
            current.append(item)
            size += item.size
        if current:
            plans.append(ShardPlan(split, sum(p.split == split for p in plans), current))
    return plans


# --------------------------------------------------------------------------------------------------------
# Writing shards (in worker processes)
# --------------------------------------------------------------------------------------------------------


def encode_image(data: bytes) -> tuple[bytes, str]:
    """Check that ``data`` is a complete, decodable image; return the bytes to store and their extension.

    JPEGs are decoded at 1/8 scale (DCT scaling), which reads every byte of the entropy-coded data but skips
    most of the work, so truncated or corrupt files are caught at a fraction of a full decode.
    """
    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
        if fmt == "JPEG":
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
        if fmt in KEPT_FORMATS:
            return data, KEPT_FORMATS[fmt]
        out = io.BytesIO()
        img.convert("RGBA" if "A" in img.getbands() else "RGB").save(out, format="PNG")
        return out.getvalue(), "png"


_progress = None  # a shared counter of images done, set in each worker


def _init_worker(counter) -> None:
    global _progress
    _progress = counter
    storage.s3_client.cache_clear()  # a boto3 client must not be shared across a fork
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def write_shard(plan: ShardPlan, source: str, dest: str) -> ShardResult:
    """Write one shard to a local temporary file, then move or upload it to ``dest``."""
    root = Path(source)
    skipped, hashes = [], []
    samples = 0
    with tempfile.TemporaryDirectory(prefix="shard-") as tmp:
        path = Path(tmp) / "shard.tar"
        # webdataset's writer, with a fixed owner, mode and date: the same input gives the same bytes.
        with TarWriter(str(path), user="", group="", mode=0o644, mtime=0, encoder=False) as tar:
            for item in plan.items:
                try:
                    raw = (root / item.relpath).read_bytes()
                except OSError:
                    raw = None
                # The content fingerprint, from this one read of the file.
                hashes.append(hashlib.sha256(raw).hexdigest() if raw is not None else "unreadable")
                try:
                    if raw is None:
                        raise OSError(f"cannot read {item.relpath}")
                    data, ext = encode_image(raw)
                except Exception as e:  # any unreadable file: report, skip, carry on
                    log.warning("skipping %s: %s", item.relpath, e)
                    skipped.append({"path": item.relpath, "reason": f"{type(e).__name__}: {e}"})
                else:
                    key = f"{plan.split}-{plan.index:06d}-{samples:06d}"
                    meta = json.dumps({"wnid": item.wnid, "path": item.relpath, "label": item.label}).encode()
                    tar.write({"__key__": key, "cls": str(item.label).encode(), ext: data, "json": meta})
                    samples += 1
                if _progress is not None:
                    with _progress.get_lock():
                        _progress.value += 1
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        size = path.stat().st_size
        storage.upload_file(path, storage.join(dest, plan.name), metadata={"sha256": digest})
    files = [[i.relpath, i.size, i.mtime_ns, h] for i, h in zip(plan.items, hashes)]
    return ShardResult(plan.name, plan.fingerprint(hashes), samples, size, digest, skipped, files)


# --------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------


def _progress_record(dest: str, name: str) -> str:
    return storage.join(dest, "_progress", name.replace("/", "-") + ".json")


def _load_records(dest: str, plans: list[ShardPlan], workers: int) -> dict[str, dict]:
    """The progress records of earlier runs (one small object per finished shard), read in parallel."""

    def load(plan: ShardPlan) -> tuple[str, dict | None]:
        try:
            return plan.name, json.loads(storage.read_bytes(_progress_record(dest, plan.name)))
        except FileNotFoundError:
            return plan.name, None

    with ThreadPoolExecutor(max(4, min(32, 4 * workers))) as pool:
        return {name: r for name, r in pool.map(load, plans) if r is not None}


def _verify(record: dict, plan: ShardPlan, root: Path, dest: str) -> ShardResult:
    """The earlier run's result for this shard if the source still has the same content; DatasetError if not.

    Files whose size and modification time match the record are taken at their recorded hash; the others
    (a copied tree, an edited file) are read and hashed, and the record is updated with their new dates."""
    different = DatasetError(
        f"{dest} already holds a different data set ({plan.name} was written from other files, content or "
        "parameters); choose another --dest or delete it"
    )
    files = record.get("files")
    if files is None:  # written before content fingerprints: check the old way once, then hash
        if record["fingerprint"] != plan.legacy_fingerprint():
            raise different
        hashes = [file_sha256(root / i.relpath) for i in plan.items]
        stale = True
    else:
        if [f[0] for f in files] != [i.relpath for i in plan.items]:
            raise different
        hashes, stale = [], False
        for item, (_, size, mtime_ns, digest) in zip(plan.items, files):
            if (item.size, item.mtime_ns) == (size, mtime_ns):
                hashes.append(digest)
            else:
                hashes.append(file_sha256(root / item.relpath))
                stale = True
    fingerprint = plan.fingerprint(hashes)
    if files is not None and fingerprint != record["fingerprint"]:
        raise different
    result = ShardResult(
        **{
            **record,
            "fingerprint": fingerprint,
            "files": [[i.relpath, i.size, i.mtime_ns, h] for i, h in zip(plan.items, hashes)],
        }
    )
    if stale:
        storage.write_bytes(_progress_record(dest, plan.name), json.dumps(asdict(result)).encode())
    return result


def _in_place(dest: str, result: ShardResult) -> bool:
    """The shard object is there with the recorded size and checksum."""
    shard_uri = storage.join(dest, result.name)
    info = storage.head(shard_uri)
    if info is None or info["size"] != result.bytes:
        return False
    checksum = info["metadata"].get("sha256") or hashlib.sha256(storage.read_bytes(shard_uri)).hexdigest()
    return checksum == result.sha256


def _start_method() -> str:
    """fork where there is one (fast start-up, no re-import of the caller's main module), except in a process
    that is a Ray driver: a forked child inherits the driver's sockets to Ray, and its object finalizers write
    to them when it exits. That breaks the driver quietly: actors it creates afterwards never get their
    tasks delivered, so its next actor pool (batch labeling after a prepare, in one process) waits forever."""
    import ray

    if "fork" not in mp.get_all_start_methods():
        return "spawn"
    return "forkserver" if ray.is_initialized() else "fork"


def prepare(source: str, dest: str, shard_size_mb: float = 256, workers: int | None = None, seed: int = 0) -> dict:
    """Write the shards and the manifest; resumable, and a no-op when everything is already there."""
    workers = workers or os.cpu_count() or 1
    classes, splits, skipped = scan_source(source)
    plans = plan_shards(splits, shard_size_mb, seed)
    storage.ensure_bucket(dest)
    manifest_uri = storage.join(dest, "manifest.json")
    existing = existing_manifest(dest)
    records = _load_records(dest, plans, workers)
    recorded = [p for p in plans if p.name in records]
    with ThreadPoolExecutor(max(4, workers)) as pool:  # a copied tree is hashed again: in parallel
        results = pool.map(lambda p: _verify(records[p.name], p, Path(source), dest), recorded)
        verified = {p.name: r for p, r in zip(recorded, results)}
    if existing is not None:
        complete = len(verified) == len(plans)
        if complete and existing.get("fingerprint") == dataset_fingerprint([verified[p.name] for p in plans]):
            log.info("%s is complete already (same content as its manifest)", dest)
            return existing
        if not (complete and existing.get("fingerprint_method") != FINGERPRINT_METHOD):
            raise DatasetError(f"{dest} already holds a different data set; choose another --dest or delete it")
        log.info("%s: rewriting a manifest made before content fingerprints", dest)
    done = {name: r for name, r in verified.items() if _in_place(dest, r)}
    todo = [p for p in plans if p.name not in done]
    total = sum(len(p.items) for p in todo)
    log.info(
        "%d shards planned, %d already in place, writing %d (%d images) with %d workers",
        len(plans),
        len(done),
        len(todo),
        total,
        workers,
    )
    if todo:
        ctx = mp.get_context(_start_method())
        counter = ctx.Value("q", 0)
        with (
            ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(counter,)) as pool,
            Progress(total, "writing shards") as progress,
        ):
            pending = {pool.submit(write_shard, p, str(source), dest) for p in todo}
            while pending:
                finished, pending = wait(pending, timeout=0.5)
                errors = [f.exception() for f in finished if f.exception() is not None]
                for f in finished - {f for f in finished if f.exception() is not None}:
                    # Record every finished shard, even when another failed: a rerun then skips it.
                    result = f.result()
                    done[result.name] = result
                    storage.write_bytes(_progress_record(dest, result.name), json.dumps(asdict(result)).encode())
                progress.update_to(counter.value)
                if errors:
                    for f in pending:
                        f.cancel()
                    raise errors[0]

    results = [done[p.name] for p in plans]
    skipped += [s for r in results for s in r.skipped]
    names = class_names(Path(source), classes)
    manifest = {
        "format": FORMAT,
        "fingerprint": dataset_fingerprint(results),
        "fingerprint_method": FINGERPRINT_METHOD,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "params": {
            "shard_size_mb": shard_size_mb,
            "seed": seed,
            "source_name": Path(source).name,
            "formats": "JPEG, PNG and WebP stored as they are; other formats converted to PNG",
        },
        "classes": [{"index": i, "wnid": w, "name": n} for i, (w, n) in enumerate(zip(classes, names))],
        "splits": {
            split: {
                "samples": sum(r.samples for r in results if r.name.startswith(f"{split}/")),
                "shards": [
                    {"name": r.name, "samples": r.samples, "bytes": r.bytes, "sha256": r.sha256}
                    for r in results
                    if r.name.startswith(f"{split}/")
                ],
            }
            for split in splits
        },
        "skipped": skipped,
    }
    storage.write_bytes(manifest_uri, json.dumps(manifest, indent=1).encode())
    for s in skipped:
        log.warning("skipped %s (%s)", s["path"], s["reason"])
    return manifest
