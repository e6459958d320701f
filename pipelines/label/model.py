"""The two steps of labeling that touch pixels: ``Decode`` (Ray Data CPU tasks: the evaluation transform) and
``Labeler`` (the model's actor: a registered version, loaded once, labels batches).

On a GPU the actor keeps the GPU busy: it takes GPU_BATCHES_IN_FLIGHT batches at once (a threaded actor,
each thread on a CUDA stream of its own), so that one batch's copy to the device, from pinned host memory
and without blocking, and the host's work on its rows overlap the model running on another; the model runs
in bf16 autocast with channels_last inputs (what benchmarks/model.py found fastest); the results come back
in one copy per batch. With ``pass_jpegs`` the decode tasks leave JPEGs encoded (checking only their
declared size) and the actor decodes and preprocesses them on the GPU with the evaluation path of
``pipelines.device`` (nvJPEG), so that a GPU node is not bound by its CPUs; other formats are decoded on
the CPUs as before.

The actor also counts its rows as Ray metrics (ROWS, ERRORS), for Prometheus and Grafana
(infra/k8s/monitoring/).
"""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.util import metrics

from pipelines.data.reader import UNDECODABLE
from pipelines.preprocess import MAX_PIXELS, eval_transform, normalize, open_image
from pipelines.registry.store import Registry

ACTOR_MEMORY = 2 * 2**30  # bytes Ray reserves for each model actor (crossvit_tiny_240 on CPU: 0.9 GiB)
GPU_BATCHES_IN_FLIGHT = 2  # batches a GPU actor works on at once (see the module's docstring)
JPEG = b"\xff\xd8"
# The labeling's Ray metrics, counted by the model's actor: every row passes through exactly one actor call
# (decode tasks that Ray Data retries would count theirs twice, and the driver sees no rows), so the sum over
# every node's metrics agent is the cluster's count. An actor reports every 10 s and as it exits; one that is
# killed (a lost node) takes its last 10 s with it. Exported as ray_<name>_total (tests/test_monitoring.py).
ROWS = "crossvit_label_rows"
ERRORS = "crossvit_label_errors"


def _undecodable(e: Exception) -> str:
    return f"cannot decode image: {type(e).__name__}: {e}"


class Decode:
    """map_batches over raw rows: the evaluation transform at the model's input size -> pixels (uint8 NHWC;
    zeros where the row has an error or is passed on encoded) beside path, label, problem and error, and with
    ``pass_jpegs`` the JPEGs' bytes (``encoded``) for the actor to decode on its GPU."""

    def __init__(self, size: int, max_pixels: int, pass_jpegs: bool = False):
        self.size, self.max_pixels, self.pass_jpegs = size, max_pixels, pass_jpegs

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        paths = batch.column("path").to_pylist()
        problems, errors = batch.column("problem").to_pylist(), batch.column("error").to_pylist()
        pixels = np.zeros((len(paths), self.size, self.size, 3), np.uint8)
        encoded = np.full(len(paths), b"", dtype=object)
        for i, data in enumerate(batch.column("image").to_pylist()):
            if problems[i] is not None:
                continue
            try:
                if self.pass_jpegs and data[:2] == JPEG:
                    open_image(data, self.max_pixels)  # its header: a decompression bomb stops here too
                    encoded[i] = data
                else:
                    pixels[i] = eval_transform(data, self.size, self.max_pixels)
            except Exception as e:  # Pillow raises many types for damaged data
                problems[i], errors[i] = UNDECODABLE, _undecodable(e)
        labels = [-1 if v is None else v for v in batch.column("label").to_pylist()]
        return {
            "path": np.asarray(paths, dtype=object),
            "pixels": pixels,
            "encoded": encoded,
            "label": np.asarray(labels, dtype=np.int64),
            # "": none (numpy has no null string)
            "problem": np.asarray([p or "" for p in problems], dtype=object),
            "error": np.asarray([e or "" for e in errors], dtype=object),
        }


class RowCounts:
    """An actor's labeled rows (ROWS) and failed ones by problem (ERRORS), per model and version."""

    def __init__(self, model: str, version: int):
        self.tags = {"model": model, "version": str(version)}
        self.rows = metrics.Counter(ROWS, description="Rows labeled, errors included", tag_keys=("model", "version"))
        self.errors = metrics.Counter(
            ERRORS, description="Rows with an error, by problem", tag_keys=("model", "version", "problem")
        )

    def count(self, problems: list[str | None]) -> None:
        """One batch's rows: its problems, None for a row labeled."""
        if problems:  # Ray's counters take positive increments only
            self.rows.inc(len(problems), self.tags)
        for problem in sorted({p for p in problems if p is not None}):
            self.errors.inc(problems.count(problem), {**self.tags, "problem": problem})


class Labeler:
    """The model's actor: loads the version once, labels batches of decoded rows (see the module's docstring).
    Reports every batch's rows and failures to ``counter`` (a ``BadSampleCounter``), and stops the job with
    its verdict once too many inputs fail (``--max-error-fraction``)."""

    def __init__(
        self,
        registry: str,
        model: str,
        version: int,
        top_k: int,
        embeddings: bool,
        use_gpu: bool,
        threads: int,
        compile: bool = False,
        counter=None,
        device: str | None = None,
        max_pixels: int = MAX_PIXELS,
    ):
        self.device = torch.device(device or ("cuda" if use_gpu else "cpu"))
        self.cuda = self.device.type == "cuda"
        # The CPUs this actor reserved (those it may run on at most): the decode tasks beside it keep theirs.
        torch.set_num_threads(max(1, min(threads, len(os.sched_getaffinity(0)))))
        reg = Registry(registry)
        self.version = reg.get(model, version)
        self.model = reg.load(self.version, self.device)
        if self.cuda:  # channels_last: fastest on GPUs (benchmarks/model.py); on CPUs the layout raw runs
            self.model = self.model.to(memory_format=torch.channels_last)
        # torch.compile compiles a module's forward only: the function the actor calls is compiled itself.
        self.features = torch.compile(self.model.forward_features) if compile else self.model.forward_features
        self.max_pixels = max_pixels
        self.names = [c["name"] for c in self.version.classes]
        self.top_k, self.embeddings, self.counter = min(top_k, len(self.names)), embeddings, counter
        self.dim = sum(norm.normalized_shape[0] for norm in self.model.norm)  # forward_features' width
        self.local = threading.local()
        self.counts = RowCounts(self.version.model, self.version.number)

    def _stream(self):
        """This thread's CUDA stream (a GPU actor runs GPU_BATCHES_IN_FLIGHT threads), or a no-op on CPUs."""
        if not self.cuda:
            return contextlib.nullcontext()
        if not hasattr(self.local, "stream"):
            self.local.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self.local.stream)

    def _inputs(self, batch: dict[str, np.ndarray], ok: np.ndarray, problems: list, errors: list) -> torch.Tensor:
        """uint8 NHWC on the device for the rows in ``ok`` (in order). JPEGs passed on encoded are decoded and
        transformed here; one that fails is marked undecodable and left out of ``ok``."""
        size = batch["pixels"].shape[1]
        encoded = [i for i in np.flatnonzero(ok) if batch["encoded"][i]]
        on_device = {}
        if encoded:
            from pipelines.device import decode_all  # torchvision: only where an actor decodes JPEGs
            from pipelines.preprocess import eval_transform_tensor

            paths = [batch["path"][i] for i in encoded]
            for i, img in zip(encoded, decode_all([batch["encoded"][i] for i in encoded], paths, self.device)):
                if img is not None:
                    on_device[i] = eval_transform_tensor(img, size).permute(1, 2, 0)
        host = [i for i in np.flatnonzero(ok) if i not in on_device]
        pixels = batch["pixels"][host]  # a copy: rows that failed on the device are decoded into it below
        for row, i in enumerate(host):
            if batch["encoded"][i]:  # a JPEG the device could not decode (CMYK, arithmetic coding): Pillow
                try:
                    pixels[row] = eval_transform(batch["encoded"][i], size, self.max_pixels)
                except Exception as e:  # Pillow raises many types for damaged data
                    problems[i], errors[i], ok[i] = UNDECODABLE, _undecodable(e), False
        keep = [r for r, i in enumerate(host) if ok[i]]
        host = [host[r] for r in keep]
        rows = np.flatnonzero(ok)
        pixels = torch.from_numpy(np.ascontiguousarray(pixels[keep]))
        if self.cuda:
            pixels = pixels.pin_memory()  # copied from pinned memory, the transfer does not block the host
        pixels = pixels.to(self.device, non_blocking=self.cuda)
        if not on_device:
            return pixels
        by_row = {**dict(zip(host, pixels)), **on_device}
        return torch.stack([by_row[i] for i in rows])

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        problems = [str(p) or None for p in batch["problem"]]
        errors = [str(e) or None for e in batch["error"]]
        ok = np.array([p is None for p in problems])
        n, k = len(errors), self.top_k
        probs = np.zeros((n, k), np.float32)
        labels = np.zeros((n, k), np.int64)
        features = np.zeros((n, self.dim), np.float16)
        with self._stream(), torch.inference_mode():
            x = self._inputs(batch, ok, problems, errors) if ok.any() else None
            if x is not None and len(x):
                with torch.autocast("cuda", torch.bfloat16, enabled=self.cuda):
                    f = self.features(normalize(x, channels_last=self.cuda))
                    p = self.model.forward_head(f).float().softmax(dim=-1)
                top = p.topk(k, dim=-1)
                # One copy back per batch: top-k values, indices and (if asked) the features together.
                out = torch.cat([top.values, top.indices.float()] + ([f.float()] if self.embeddings else []), dim=1)
                out = out.to("cpu", non_blocking=self.cuda)
                if self.cuda:
                    torch.cuda.current_stream(self.device).synchronize()  # this thread's stream only
                out = out.numpy()
                probs[ok], labels[ok] = out[:, :k], out[:, k : 2 * k].astype(np.int64)
                if self.embeddings:
                    features[ok] = out[:, 2 * k :].astype(np.float16)
        bad = pa.array(~ok)
        if self.counter is not None:
            failed = [str(p) for p, good in zip(batch["path"], ok) if not good]
            verdict = ray.get(self.counter.report.remote(0, str(batch["path"][0]), n, failed[:5], len(failed)))
            if verdict:
                from pipelines.data.bad_samples import BadDataError

                raise BadDataError(verdict)

        def rows(values: np.ndarray, kind: pa.DataType) -> pa.Array:  # one fixed-size list per row, null if bad
            return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), kind), values.shape[1], mask=bad)

        names = np.asarray(self.names, dtype=object)[labels]
        columns = {
            "path": pa.array(list(batch["path"]), pa.string()),
            "labels": rows(labels, pa.int64()),
            "names": rows(names, pa.string()),
            "probs": rows(probs, pa.float32()),
            "model": pa.array([self.version.model] * n, pa.string()),
            "version": pa.array([self.version.number] * n, pa.int64()),
            "problem": pa.array(problems, pa.string()),
            "error": pa.array(errors, pa.string()),
            "label": pa.array([int(v) if v >= 0 else None for v in batch["label"]], pa.int64()),
        }
        if self.embeddings:
            columns["embedding"] = rows(features, pa.float16())
        self.counts.count(problems)
        return pa.table(columns)
