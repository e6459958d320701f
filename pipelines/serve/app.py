"""Online classification: a Ray Serve application (FastAPI ingress) serving a registered version.

Routes:
- ``POST /v1/classify?top_k=5``: the body is the image (jpg, png, webp) or a multipart form with a field
  ``image``; answers the top-k class indices, names and probabilities, and the model and version.
- ``POST /v1/classify/batch``: a multipart form with several ``image`` fields, answered in order, each with
  its own result or its own error.
- ``GET /v1/models``: what is served and what the replica follows; ``GET /healthz``; ``POST
  /v1/admin/reload``: check the alias now.

Each replica decodes and preprocesses on a thread pool (Pillow releases the GIL) with the evaluation
preprocessing that training used (pipelines/preprocess.py), groups the requests that arrive while the model
is busy into its next batch (pipelines/serve/batching.py says why not ``@serve.batch``), and runs every torch
op on one thread of its own (``torch.inference_mode``, bf16 autocast on a GPU). A watcher thread follows the
registry: when the alias moves, the new version is read and checked beside the served one, built and warmed
up on the model thread between its batches (a pause of one batch or so; ``compile: true`` pauses serving for
the compilation), then swapped in with one reference assignment, so no request fails or sees a half-loaded
model; a batch in flight finishes on the model it started with. Serve's ``reconfigure`` is not used for
this: it takes the replica out of routing while it runs, and a load takes seconds.

Hostile input is a 4xx with a JSON body, never a 5xx: the body size is limited while it streams (Serve's
proxy has no limit), the pixel count is checked before decoding, and decoding errors are the client's.
"""

import asyncio
import hmac
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import get_type_hints

import numpy as np
import ray
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import UnidentifiedImageError
from ray import serve
from ray.serve import metrics
from starlette.requests import ClientDisconnect
from starlette.requests import Request as StarletteRequest

from pipelines.preprocess import ImageTooLargeError, eval_transform, normalize, open_image
from pipelines.registry.store import ModelVersion, Registry
from pipelines.serve.batching import Batcher

log = logging.getLogger("ray.serve.crossvit")  # under Serve's logger: into the replica's log files

FORMATS = ("JPEG", "MPO", "PNG", "WEBP")  # MPO: what Pillow calls the JPEGs of many cameras and phones


@dataclass
class ServeSettings:
    """The application's arguments (``args`` of infra/serve.yaml, or ``python -m jobs.serve``'s flags).
    ``registry`` and ``model`` default to $CROSSVIT_REGISTRY and $CROSSVIT_MODEL."""

    registry: str = ""
    model: str = ""
    alias: str = "production"
    version: int | None = None  # serve this version and follow no alias
    poll_interval_s: float = 10.0  # how often each replica checks the alias
    max_batch_size: int = 16  # the most images per model call
    batch_wait_timeout_s: float = 0.005  # the most a batch waits for requests still being decoded
    max_body_bytes: int = 25 * 2**20
    max_pixels: int = 64_000_000  # checked from the header, before decoding
    max_batch_images: int = 16  # images in one /v1/classify/batch request
    decode_threads: int = 0  # 0: the replica's CPUs
    compile: bool = False  # torch.compile, warmed up before the replica reports healthy
    auth_token_env: str = "CROSSVIT_SERVE_TOKEN"  # bearer token from this variable, if set
    auth_token_file: str = ""  # or from this file (a mounted Kubernetes secret)
    request_log_level: str = "INFO"  # the per-request line (version, latency, outcome)

    def __post_init__(self) -> None:
        self.registry = self.registry or os.environ.get("CROSSVIT_REGISTRY", "")
        self.model = self.model or os.environ.get("CROSSVIT_MODEL", "")
        if not self.registry or not self.model:
            raise ValueError("the registry and the model to serve: args registry/model, or CROSSVIT_REGISTRY/MODEL")
        # `serve run ... key=value` passes strings: convert them by the field's type.
        for name, kind in get_type_hints(ServeSettings).items():
            value = getattr(self, name)
            if isinstance(value, str) and kind in (int, float, int | None, bool):
                if kind is bool:
                    setattr(self, name, value.lower() in ("1", "true", "yes", "on"))
                elif value.lower() in ("", "none", "null"):
                    setattr(self, name, None)
                else:
                    setattr(self, name, float(value) if kind is float else int(value))
        self.request_log_level = str(self.request_log_level).upper()
        if self.request_log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"request_log_level {self.request_log_level!r}: DEBUG, INFO, WARNING or ERROR")
        if self.max_batch_size < 1 or self.max_batch_images < 1 or self.max_body_bytes < 1:
            raise ValueError("max_batch_size, max_batch_images and max_body_bytes must be positive")


def _finite(value):
    """JSON has no NaN (a metric of an epoch that was not evaluated, a diverged model): null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


class ClientError(Exception):
    """A request the client must change: its status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Loaded:
    """A version ready to answer: its model on the device, its description and class names."""

    def __init__(self, version: ModelVersion, model: torch.nn.Module, device: torch.device):
        self.version, self.model, self.device = version, model, device
        self.names = [c["name"] for c in version.classes]
        self.size = version.image_size

    def forward(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S, 3) -> class probabilities (B, classes), float32."""
        x = normalize(torch.from_numpy(images).to(self.device), channels_last=self.device.type == "cuda")
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.model(x).float().softmax(dim=-1).cpu().numpy()


# No interactive docs: they would be routes outside the bearer-token check.
app = FastAPI(title="CrossViT classifier", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own validation (a top_k that is no integer) answers in our JSON error form."""
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return error(422, problems)


@serve.deployment(name="Classifier")
@serve.ingress(app)
class Classifier:
    def __init__(self, settings: dict):
        self.settings = s = ServeSettings(**settings)
        self.log_level = logging.getLevelName(s.request_log_level)  # the per-request line's level
        # Ray sets OMP_NUM_THREADS to the actor's num_cpus; torch's intra-op threads follow it, and so does
        # the decode pool, so the replica uses the cores it was given and no more.
        cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        self.decode_pool = ThreadPoolExecutor(s.decode_threads or cpus, thread_name_prefix="decode")
        # Every torch op runs on this one thread, loads and warm-ups included: each thread that runs a
        # parallel op gets an OpenMP team of its own, and with more team threads than cores OpenMP stops
        # spinning between ops; two such threads made crossvit_tiny_240's forward 53 ms instead of 30 on 2
        # cores (benchmarks/RESULTS.md).
        self.model_thread = ThreadPoolExecutor(
            1, thread_name_prefix="model", initializer=torch.set_num_threads, initargs=(cpus,)
        )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.registry = Registry(s.registry)
        self.token = self._token()
        self.last_error: str | None = None
        self.refused: int | None = None  # a version that failed to load: not tried again until the alias moves
        self.current: Loaded = self._first_load()
        self.last_check = time.time()
        self.started = self.checks = 0  # alias checks begun / the last one finished (see reload)
        self.batcher = Batcher(self._infer, s.max_batch_size, s.batch_wait_timeout_s)
        self.requests = metrics.Counter(
            "crossvit_requests", description="Requests by route and outcome", tag_keys=("route", "outcome")
        )
        self.images = metrics.Counter(
            "crossvit_images_classified", description="Images classified, by version", tag_keys=("version",)
        )
        self.batch_sizes = metrics.Histogram(
            "crossvit_batch_images", description="Images per model call", boundaries=[1, 2, 4, 8, 16, 32, 64]
        )
        self._check_now = threading.Event()
        self._checked = threading.Condition()
        self.watcher = threading.Thread(target=self._follow, name="registry-watcher", daemon=True)
        if s.version is None:
            self.watcher.start()

    # -- the model and the registry ---------------------------------------------------------------------
    def _token(self) -> str | None:
        s = self.settings
        if s.auth_token_file:  # read once at start: a rotated secret takes effect as replicas restart
            return Path(s.auth_token_file).read_text().strip() or None
        return os.environ.get(s.auth_token_env) or None

    def _first_load(self) -> Loaded:
        """The version to start with: the one asked for, or the alias's. If the alias names a version that
        does not load (a damaged upload), a new replica (autoscaling, a replacement) starts with the newest
        earlier version of the alias's lineage that does, as the running replicas keep serving it, and says
        why in /v1/models."""
        s = self.settings
        if s.version is not None:
            return self._load(self.registry.get(s.model, s.version))
        record, _ = self.registry.read_alias(s.model, s.alias)
        if record is None:
            self.registry.resolve(s.model, s.alias)  # the registry's error: no such alias
        for number in reversed(record["lineage"]):
            try:
                return self._load(self.registry.get(s.model, number))
            except Exception as e:
                if number == record["version"]:
                    self.last_error, self.refused = f"{type(e).__name__}: {e}", number
                log.error("%s version %d does not load: %s", s.model, number, e)
        raise RuntimeError(f"no version of {s.model}:{s.alias}'s lineage {record['lineage']} loads: {self.last_error}")

    def _load(self, version: ModelVersion) -> Loaded:
        """Read and check a version's weights on the caller's thread; build it and warm it up on the model
        thread, one step at a time, so that the served version's batches run in between."""
        data = self.registry.read_weights(version)
        model = self.model_thread.submit(self.registry.load, version, self.device, data).result()
        if self.settings.compile:
            model = torch.compile(model)  # compiles at the first call: the warm-ups below
        loaded = Loaded(version, model, self.device)
        for n in sorted({1, self.settings.max_batch_size}):  # both shapes, allocated before serving
            self.model_thread.submit(loaded.forward, np.zeros((n, loaded.size, loaded.size, 3), np.uint8)).result()
        return loaded

    def _follow(self) -> None:
        """Poll the alias; load a new version beside the served one and swap it in when it is ready."""
        s = self.settings
        while True:
            forced = self._check_now.wait(s.poll_interval_s)
            self._check_now.clear()
            with self._checked:
                self.started += 1
                mine = self.started
            try:
                record, _ = self.registry.read_alias(s.model, s.alias)
                number = record["version"] if record else self.current.version.number
                if number != self.current.version.number and (number != self.refused or forced):
                    log.warning("%s:%s moved to version %d: loading", s.model, s.alias, number)
                    self.current = self._load(self.registry.get(s.model, number))  # one assignment: old or new
                    log.warning("now serving %s version %d", s.model, number)
                if number != self.refused:
                    self.last_error, self.refused = None, None
            except Exception as e:  # a version that fails to load or its checksum: refused, the old one serves
                self.last_error, self.refused = f"{type(e).__name__}: {e}", number
                log.error("not switching: %s (still serving version %d)", self.last_error, self.current.version.number)
            with self._checked:
                self.last_check, self.checks = time.time(), mine
                self._checked.notify_all()

    def check_health(self) -> None:
        """Serve's health check: a live watcher when following an alias, and a live batcher."""
        if self.settings.version is None and not self.watcher.is_alive():
            raise RuntimeError("the registry watcher died")
        if self.batcher.failure:
            raise RuntimeError(f"the batcher failed: {self.batcher.failure}")

    async def _infer(self, items: list[tuple[np.ndarray, Loaded]]) -> list[tuple[np.ndarray, int]]:
        """(probabilities, images in the model call) per request: one call per version in the batch (a swap
        between requests may mix two)."""
        out: list = [None] * len(items)
        for loaded in {id(v): v for _, v in items}.values():
            index = [i for i, (_, v) in enumerate(items) if v is loaded]
            images = np.stack([items[i][0] for i in index])
            probs = await asyncio.get_running_loop().run_in_executor(self.model_thread, loaded.forward, images)
            for i, p in zip(index, probs):
                out[i] = (p, len(index))
            self.images.inc(len(index), tags={"version": str(loaded.version.number)})
            self.batch_sizes.observe(len(index))
        return out

    # -- request handling ---------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.encode(), self.token.encode()):
            raise ClientError(401, "a bearer token is required (Authorization: Bearer <token>)")

    async def _body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the limit (Content-Length or not)."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ClientError(413, f"body of {int(declared):,} bytes is over the {limit:,} allowed")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ClientError(413, f"body is over the {limit:,} bytes allowed")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _images(self, request: Request, many: bool) -> list[bytes]:
        """The image bytes of a request: the raw body, or the ``image`` fields of a multipart form."""
        body = await self._body(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            if many:
                raise ClientError(400, "send the images as a multipart form with one 'image' field each")
            return [body]

        async def replay() -> dict:  # the form parser reads the body we already hold
            return {"type": "http.request", "body": body, "more_body": False}

        limit = self.settings.max_batch_images if many else 1
        try:
            form = await StarletteRequest(request.scope, replay).form(max_files=limit, max_fields=limit)
        except Exception as e:  # starlette raises several types for malformed forms
            raise ClientError(400, f"malformed multipart form: {e}") from None
        try:
            files = form.getlist("image")
            if not files:
                raise ClientError(400, "the form has no 'image' field")
            return [await f.read() if hasattr(f, "read") else str(f).encode() for f in files]
        finally:
            await form.close()  # the parts' spooled temporary files

    def _preprocess(self, data: bytes, size: int) -> np.ndarray:
        if not data:
            raise ClientError(400, "empty body: send an image")
        try:
            with open_image(data, self.settings.max_pixels) as probe:
                if probe.format not in FORMATS:
                    raise ClientError(415, f"{probe.format} images are not accepted: send jpg, png or webp")
            return eval_transform(data, size, self.settings.max_pixels)
        except ImageTooLargeError as e:
            raise ClientError(413, f"image too large: {e}") from None
        except UnidentifiedImageError:
            raise ClientError(400, "the body is not an image (jpg, png or webp)") from None
        except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for damaged data
            raise ClientError(400, f"the image cannot be decoded: {e}") from None

    async def _classify(self, data: bytes, top_k: int) -> dict:
        loaded = self.current
        decoding = asyncio.get_running_loop().run_in_executor(self.decode_pool, self._preprocess, data, loaded.size)

        async def prepare() -> tuple[np.ndarray, Loaded]:
            return await decoding, loaded

        probs, batch = await self.batcher.submit(prepare())
        top = np.argsort(-probs)[:top_k]
        return {
            "model": loaded.version.model,
            "version": loaded.version.number,
            "labels": [int(i) for i in top],
            "names": [loaded.names[i] for i in top],
            "probs": [float(probs[i]) for i in top],
            "batch": batch,  # images in the model call that answered this one (dynamic batching)
        }

    def _top_k(self, top_k: int | None) -> int:
        classes = len(self.current.names)
        if top_k is None:
            return min(5, classes)
        if not 1 <= top_k <= classes:
            raise ClientError(400, f"top_k must be within 1..{classes}")
        return top_k

    async def _handle(self, route: str, request: Request, work) -> JSONResponse:
        """Run a route's work: its answer as JSON, a ClientError as its 4xx, anything else as a JSON 500
        (counted and logged; the replica stays up)."""
        start = time.perf_counter()
        try:
            self._authorize(request)
            response = JSONResponse(_finite(await work()))
            outcome = "ok"
        except ClientError as e:
            headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
            response, outcome = error(e.status, str(e), **headers), f"client_error_{e.status}"
        except ClientDisconnect:
            response, outcome = error(400, "the client went away before the body arrived"), "client_gone"
        except Exception as e:
            log.exception("%s failed", route)
            response, outcome = error(500, f"internal error: {type(e).__name__}"), "server_error"
        self.requests.inc(tags={"route": route, "outcome": outcome})
        log.log(
            self.log_level,
            "%s %s %d version=%d %.1f ms",
            route, outcome, response.status_code, self.current.version.number, 1000 * (time.perf_counter() - start),
        )  # fmt: skip
        return response

    @app.post("/v1/classify")
    async def classify(self, request: Request, top_k: int | None = Query(None)) -> JSONResponse:
        async def work() -> dict:
            k = self._top_k(top_k)
            (data,) = await self._images(request, many=False)
            return await self._classify(data, k)

        return await self._handle("classify", request, work)

    @app.post("/v1/classify/batch")
    async def classify_batch(self, request: Request, top_k: int | None = Query(None)) -> JSONResponse:
        async def one(data: bytes, k: int) -> dict:
            try:
                return await self._classify(data, k)
            except ClientError as e:
                return {"error": str(e), "status": e.status}

        async def work() -> dict:
            k = self._top_k(top_k)
            images = await self._images(request, many=True)
            return {"results": list(await asyncio.gather(*(one(d, k) for d in images)))}

        return await self._handle("classify_batch", request, work)

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        async def work() -> dict:
            s = self.settings
            return {
                **self.current.version.describe(),
                "alias": None if s.version is not None else s.alias,
                "registry_error": self.last_error,  # why the alias's version is not served, if it is not
                "last_check": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_check)),
                "settings": {k: v for k, v in asdict(s).items() if "token" not in k},
            }

        return await self._handle("models", request, work)

    @app.post("/v1/admin/reload")
    async def reload(self, request: Request) -> JSONResponse:
        async def work() -> dict:
            if self.settings.version is not None:
                raise ClientError(409, "this application serves a pinned version and follows no alias")
            with self._checked:
                wanted = self.started + 1  # a check that begins after this request, not one under way
            self._check_now.set()

            def wait() -> None:
                with self._checked:
                    self._checked.wait_for(lambda: self.checks >= wanted, timeout=300)

            await asyncio.get_running_loop().run_in_executor(None, wait)
            return {"version": self.current.version.number, "registry_error": self.last_error}

        return await self._handle("reload", request, work)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.settings.model, "version": self.current.version.number}


def build(args: dict) -> serve.Application:
    """The application builder named in infra/serve.yaml (``import_path``): ``args`` are ServeSettings."""
    settings = ServeSettings(**(args or {}))
    return Classifier.bind(asdict(settings))
