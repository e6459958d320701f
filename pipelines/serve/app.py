"""Online classification: a Ray Serve application (FastAPI ingress) serving a registered version.

Routes (OpenAPI at ``/docs`` and ``/openapi.json``):
- ``POST /v1/classify?top_k=5``: the body is the image (jpg, png, webp) or a multipart form with a field
  ``image``; answers the top-k class indices, names and probabilities, and the model and version.
- ``POST /v1/classify/batch``: a multipart form with several ``image`` fields, answered in order, each with
  its own result or its own error.
- ``GET /v1/models``: what is served (name, version, classes, preprocessing, metrics); ``GET /healthz``.
- The Open Inference Protocol (KServe v2 REST, pipelines/serve/oip.py): ``GET /v2``,
  ``/v2/health/{live,ready}``, ``/v2/models/{name}[/versions/{v}]``, ``.../ready``, ``POST .../infer``.
- Administration, off unless an admin token is configured (pipelines/serve/auth.py): ``GET
  /v1/admin/status[?window=600]`` (the registry, the alias, refused versions and why, the settings, the
  canary, and the live evidence per version from every replica) and ``POST /v1/admin/reload`` (the replica
  that takes it checks the aliases now; 504 if that does not end in time).

A canary (``canary`` settings; pipelines/serve/rollout.py) is a second alias followed beside production: its
version answers a share of the inference requests, or runs them in production's shadow; each replica
reports what its requests showed to the application's ``Rollout`` deployment (pipelines/serve/evidence.py).

Each replica decodes and preprocesses on a thread pool (Pillow releases the GIL) with the evaluation
preprocessing that training used (pipelines/serve/images.py), or, with ``decode_on_device``, hands a batch's
JPEGs to nvJPEG on its GPU; groups the requests that arrive while the model is busy into its next batch
(pipelines/serve/batching.py says why not ``@serve.batch``), and runs every torch op on one thread of its
own (``torch.inference_mode``, bf16 autocast on a GPU). A watcher thread follows the registry
(pipelines/serve/model.py): a new version is loaded beside the served one and swapped in whole, so no
request fails or sees a half-loaded model. Serve's ``reconfigure`` is not used for this: it takes the
replica out of routing while it runs, and a load takes seconds.

Hostile input is a 4xx with a JSON body, never a 5xx: the body size is limited while it streams, the format
and pixel count are checked before decoding, and decoding errors are the client's. Memory: Ray reads the body
of every request a replica admits (running or queued) before this code sees it, so what bounds bodies is
max_ongoing_requests + max_queued_requests and the ingress's body limit (infra/serve.yaml gives the figures);
decoding holds one image per decode thread.
"""

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from importlib.metadata import version as package_version

import numpy as np
import ray
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle
from starlette.requests import ClientDisconnect
from starlette.requests import Request as StarletteRequest

from pipelines.preprocess import eval_transform_array
from pipelines.registry.store import Registry
from pipelines.serve import images, oip, rollout
from pipelines.serve.auth import Token, TokenError
from pipelines.serve.batching import Batcher
from pipelines.serve.errors import ClientError
from pipelines.serve.evidence import REPORT_S, Board, Tally
from pipelines.serve.model import Loaded, Served, load_version, why
from pipelines.serve.rollout import Pick
from pipelines.serve.settings import ServeSettings, nest

log = logging.getLogger("ray.serve.crossvit")  # under Serve's logger: into the replica's log files

RELOAD_TIMEOUT_S = 300.0  # the most an admin reload waits for its check (a large version, slow storage)
BOARD_TIMEOUT_S = 10.0  # the most the admin status waits for the evidence board
INLINE_JSON_BYTES = 64 * 1024  # an OIP request's JSON up to this size is parsed on the event loop
# The request bodies the routes read themselves (FastAPI cannot infer them), for the OpenAPI document.
_FILE = {"type": "string", "format": "binary"}
_FORM = {"multipart/form-data": {"schema": {"type": "object", "properties": {"image": _FILE}}}}
ONE_IMAGE = {"requestBody": {"content": {"image/jpeg": {"schema": _FILE}, "image/png": {"schema": _FILE},
                                         "image/webp": {"schema": _FILE}, **_FORM}}}  # fmt: skip
IMAGE_FORM = {"requestBody": {"content": _FORM}}


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


app = FastAPI(
    title="CrossViT classifier",
    version=package_version("crossvit-ray"),
    description="Image classification with a registered CrossViT version: /v1 (this project's JSON) and /v2 "
    "(the Open Inference Protocol, KServe v2 REST, with the binary tensor data extension).",
    redoc_url=None,
)


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own validation (a top_k that is no integer) answers in our JSON error form."""
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return error(422, problems)


def _request_id(request: Request) -> str:
    """Serve's id of this request: its middleware puts it in the request's X-Request-ID header (the client's
    own, if it sent one) and in the response's; no need for Serve's private request context."""
    return request.headers.get("x-request-id", "-")


@serve.deployment(name="Classifier")
@serve.ingress(app)
class Classifier:
    def __init__(self, settings: dict, board: DeploymentHandle | None = None):
        self.settings = s = ServeSettings(**settings)
        self.log_level = logging.getLevelName(s.request_log_level)  # the per-request line's level
        self.token = Token("classification", s.auth_token_env, s.auth_token_file)
        self.admin_token = Token("admin", s.admin_token_env, s.admin_token_file)
        if self.admin_token.same_as(self.token):
            raise TokenError("the admin token is the classification token: every client could administer")
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
        shapes = [1, s.max_batch_size]

        def load(version):
            return load_version(self.registry, version, self.device, self.model_thread, shapes, s.compile)

        self.served = Served(self.registry, s.model, s.alias, s.version, s.canary.alias, s.poll_interval_s, load)
        self.batcher = Batcher(self._infer, s.max_batch_size, s.batch_wait_timeout_s)
        self._shadows: set[asyncio.Task] = set()  # shadow runs under way (a reference each, until they end)
        self._last_token_error = ""
        self.requests = metrics.Counter(
            "crossvit_requests",
            description="Requests by route, outcome and the version that answered",
            tag_keys=("route", "outcome", "version"),
        )
        self.images = metrics.Counter(
            "crossvit_images_classified", description="Images classified, by version", tag_keys=("version",)
        )
        self.batch_sizes = metrics.Histogram(
            "crossvit_batch_images", description="Images per model call", boundaries=[1, 2, 4, 8, 16, 32, 64]
        )
        ms = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
        self.queue_ms = metrics.Histogram(
            "crossvit_queue_ms", description="From an image's decoding to its model call (ms)", boundaries=ms
        )
        self.compute_ms = metrics.Histogram(
            "crossvit_compute_ms", description="One model call, on-device decoding included (ms)", boundaries=ms
        )
        self.request_ms = metrics.Histogram(
            "crossvit_request_ms", description="An inference request answered, by version and role (ms)",
            boundaries=ms, tag_keys=("version", "role"),
        )  # fmt: skip
        self.confidence = metrics.Histogram(
            "crossvit_top1_confidence", description="The top-1 probability of each image, by version and role",
            boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99], tag_keys=("version", "role"),
        )  # fmt: skip
        self.shadow_runs = metrics.Counter(
            "crossvit_shadow_runs", description="Canary runs in production's shadow, by version and whether the "
            "top-1 agreed (true, false), the run failed (error) or was skipped (skipped: the model was behind)",
            tag_keys=("version", "agreed"),
        )  # fmt: skip
        # The live evidence: what this replica's requests show, reported every REPORT_S to the board.
        self.tally, self.board = Tally(), board
        self.counted = 0  # the requests this replica counted as evidence since it started (the status shows it)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._reporter: asyncio.Task | None = None
        self._unsent: list[tuple[int, list]] = []  # numbered reports the board has not acknowledged
        self._reports = 0
        with contextlib.suppress(RuntimeError):  # Serve runs the constructor on the replica's event loop
            self._start_reporter()

    # -- the model --------------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Serve's health check: a live registry watcher (when following an alias) and a live batcher. An
        unreadable registry is not a reason to restart a replica (it serves what it holds): readiness and
        the status say so instead."""
        with contextlib.suppress(RuntimeError):  # a replica without requests reports its state too
            self._start_reporter()
        if not self.served.alive:
            raise RuntimeError("the registry watcher died")
        if self.batcher.failure:
            raise RuntimeError(f"the batcher failed: {self.batcher.failure}")

    def _forward(self, loaded: Loaded, payloads: list) -> list:
        """On the model thread: decoded images (uint8 HWC arrays) and JPEGs for the device (encoded bytes) ->
        per image, its probabilities or the ClientError that answers it."""
        out: list = [None] * len(payloads)
        tensors = {i: torch.from_numpy(p) for i, p in enumerate(payloads) if isinstance(p, np.ndarray)}
        on_device = [i for i, p in enumerate(payloads) if not isinstance(p, np.ndarray)]  # encoded JPEGs
        if on_device:
            jpegs = [payloads[i] for i in on_device]
            decoded = images.decode_batch_on_device(jpegs, loaded.size, loaded.device, self.settings.max_pixels)
            for i, img in zip(on_device, decoded):
                if isinstance(img, ClientError):
                    out[i] = img
                else:
                    tensors[i] = img
        if tensors:
            order = sorted(tensors)
            probs = loaded.forward(torch.stack([tensors[i].to(loaded.device) for i in order])).numpy()
            for i, p in zip(order, probs):
                out[i] = p
        return out

    async def _infer(self, items: list[tuple[object, Loaded, float]]) -> list:
        """The batcher's function: (probabilities or ClientError, images in the model call) per request,
        one model call per version in the batch (a swap between requests may mix two)."""
        out: list = [None] * len(items)
        loop = asyncio.get_running_loop()
        for loaded in {id(v): v for _, v, _ in items}.values():
            index = [i for i, (_, v, _) in enumerate(items) if v is loaded]
            start = time.perf_counter()
            for i in index:
                self.queue_ms.observe(1000 * (start - items[i][2]))
            results = await loop.run_in_executor(self.model_thread, self._forward, loaded, [items[i][0] for i in index])
            self.compute_ms.observe(1000 * (time.perf_counter() - start))
            for i, result in zip(index, results):
                out[i] = (result, len(index))
            classified = sum(not isinstance(r, ClientError) for r in results)
            if classified:  # Ray's counters take positive increments only
                self.images.inc(classified, tags={"version": str(loaded.version.number)})
                self.batch_sizes.observe(classified)
        return out

    def _prepare(self, loaded: Loaded, data: bytes | np.ndarray) -> np.ndarray | bytes:
        """On a decode thread: an image (encoded bytes, or decoded uint8 HWC pixels) -> ``loaded``'s input."""
        s = self.settings
        if isinstance(data, np.ndarray):
            return eval_transform_array(data, loaded.size)
        if s.decode_on_device and images.for_device(data, s.max_pixels):
            return data  # checked on the CPU, decoded with the batch on the device
        return images.decode(data, loaded.size, s.max_pixels)

    async def _run(self, loaded: Loaded, prepared: Awaitable) -> tuple[object, int]:
        """A prepared input through ``loaded`` in the next batch: (probabilities or ClientError, batch size)."""

        async def ready() -> tuple[object, Loaded, float]:
            return await prepared, loaded, time.perf_counter()

        return await self.batcher.submit(ready())

    async def _probabilities(self, pick: Pick, data: bytes | np.ndarray) -> tuple[np.ndarray, int]:
        """One image through the version ``pick`` names: its probabilities and the number of images in the
        model call that answered it; the image's top-1 is evidence, and ``pick.shadow`` runs it too."""
        loaded, loop = pick.loaded, asyncio.get_running_loop()
        prepared = loop.run_in_executor(self.decode_pool, self._prepare, loaded, data)
        result, batch = await self._run(loaded, prepared)
        if isinstance(result, ClientError):
            raise result
        top1 = float(result.max())
        self.confidence.observe(top1, tags={"version": str(loaded.version.number), "role": pick.role})
        if not pick.forced:
            self.tally.confidence(loaded.version.number, pick.role, top1)
        if pick.shadow is not None:
            self._start_shadow(pick.shadow, data, prepared if pick.shadow.size == loaded.size else None, result)
        return result, batch

    def _start_shadow(self, canary: Loaded, data: bytes | np.ndarray, prepared: asyncio.Future | None,
                      answer: np.ndarray) -> None:  # fmt: skip
        """Run an answered image on the canary too, after the answer and without delaying it; compared, never
        returned. ``prepared``: production's input, when the canary takes the same. While as many shadow
        runs as one batch are under way the model is behind: the image is not shadowed (counted as skipped)."""
        version = canary.version.number
        if len(self._shadows) >= self.settings.max_batch_size:
            self.shadow_runs.inc(tags={"version": str(version), "agreed": "skipped"})
            return

        async def shadow() -> None:
            start, loop = time.perf_counter(), asyncio.get_running_loop()
            try:
                payload = prepared or loop.run_in_executor(self.decode_pool, self._prepare, canary, data)
                probs, _ = await self._run(canary, payload)
                if isinstance(probs, Exception):
                    raise probs
            except Exception as e:  # the canary's failure: evidence against it, never the client's
                log.warning("version %d failed in production's shadow: %s", version, e)
                self.tally.shadow(version, 0.0)
                self.shadow_runs.inc(tags={"version": str(version), "agreed": "error"})
                return
            agreed = int(probs.argmax()) == int(answer.argmax())
            ms = 1000 * (time.perf_counter() - start)
            self.tally.shadow(version, ms, float(probs.max()), float(answer.max()), agreed)
            self.shadow_runs.inc(tags={"version": str(version), "agreed": str(agreed).lower()})

        task = asyncio.get_running_loop().create_task(shadow())
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    # -- the evidence ---------------------------------------------------------------------------------------
    def _state(self) -> dict:
        """What this replica serves, for the board (the judge rolls back a canary that replicas refuse)."""
        state = {"production": self.served.production.current.version.number, "requests": self.counted}
        if self.served.canary is not None:
            canary = self.served.canary.status()
            state.update(canary=canary.serving, canary_refused=canary.refused, canary_error=canary.load_error)
        return state

    def _start_reporter(self) -> None:
        """The reporter runs on the replica's event loop, where Serve's handles work (with Serve's
        throughput-optimized mode they need a running loop); started again by a request if it ended."""
        if self.board is not None and (self._reporter is None or self._reporter.done()):
            self._reporter = asyncio.get_running_loop().create_task(self._report())

    async def _report(self) -> None:
        """Every REPORT_S, this replica's figures (a numbered report) and state to the board. Reports the board
        has not acknowledged are sent again with their numbers (it adds each number once), the last hour's at
        most; an error is logged when it changes."""
        last_error = None
        while True:
            await asyncio.sleep(REPORT_S)
            if taken := self.tally.take():
                self._reports += 1
                self._unsent = [*self._unsent[-int(3600 / REPORT_S) :], (self._reports, taken)]
            try:
                call = self.board.report.remote(self.replica_id, self._unsent, self._state())
                acknowledged = await asyncio.wait_for(call, 10 * REPORT_S)
                self._unsent = [(n, stats) for n, stats in self._unsent if n > acknowledged]
                last_error = None
            except Exception as e:
                if why(e) != last_error:
                    log.warning("the evidence board did not take this replica's report: %s", why(e))
                    last_error = why(e)

    async def _evidence(self, window_s: float | None) -> dict | None:
        """Every replica's evidence, from the board; what went wrong instead if it does not answer."""
        if self.board is None:
            return None
        try:
            return await asyncio.wait_for(self.board.evidence.remote(window_s), BOARD_TIMEOUT_S)
        except Exception as e:
            return {"error": f"the evidence board did not answer: {why(e)}"}

    def _canary_status(self) -> dict | None:
        """This replica's canary: the version it serves for it, or why none."""
        c, follower = self.settings.canary, self.served.canary
        if follower is None:
            return None
        state = follower.status()
        why_not = None
        if state.serving is None:
            why_not = state.load_error or state.registry_error or f"the alias {c.alias} names no version"
        return {"alias": c.alias, "mode": c.mode, "percent": c.percent, "auto": c.auto, "version": state.serving,
                "alias_version": state.alias_version, "refused_version": state.refused,
                "load_error": state.load_error, "registry_error": state.registry_error, "why_not": why_not}  # fmt: skip

    # -- request handling ---------------------------------------------------------------------------------
    def _authorize(self, request: Request, token: Token, admin: bool = False) -> None:
        if not token.configured:
            if admin:
                raise ClientError(
                    403, f"administration is off: configure an admin token ({token.env} or admin_token_file)"
                )
            return
        try:
            allowed = token.check(request.headers.get("authorization", ""))
        except TokenError as e:  # a rotated secret left empty: nobody is admitted until it holds a token
            if str(e) != self._last_token_error:  # once per new problem, not once per request
                log.error("%s", e)
                self._last_token_error = str(e)
            raise ClientError(503, f"the {token.what} token is not usable; the operators are told why") from None
        if not allowed:
            raise ClientError(401, f"a bearer token is required (Authorization: Bearer <{token.what} token>)")

    async def _body(self, request: Request) -> bytearray:
        """The body, refused with 413 as soon as it passes the limit (Content-Length or not); gathered in one
        buffer (no list of chunks and a joined copy beside it)."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ClientError(413, f"body of {int(declared):,} bytes is over the {limit:,} allowed")
        body = bytearray()
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise ClientError(413, f"body is over the {limit:,} bytes allowed")
            body += chunk
        return body

    async def _images(self, request: Request, many: bool) -> list[bytes | bytearray]:
        """The image bytes of a request: the raw body, or the ``image`` fields of a multipart form."""
        body = await self._body(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            if many:
                raise ClientError(400, "send the images as a multipart form with one 'image' field each")
            return [body]

        async def replay() -> dict:  # the form parser reads the body we already hold
            return {"type": "http.request", "body": bytes(body), "more_body": False}

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

    async def _classify(self, pick: Pick, data: bytes, top_k: int) -> dict:
        loaded = pick.loaded
        probs, batch = await self._probabilities(pick, data)
        top = np.argsort(-probs)[:top_k]
        return {
            "model": loaded.version.model,
            "version": loaded.version.number,
            "labels": [int(i) for i in top],
            "names": [loaded.names[i] for i in top],
            "probs": [float(probs[i]) for i in top],
            "batch": batch,  # images in the model call that answered this one (dynamic batching)
        }

    @staticmethod
    def _top_k(top_k: int | None, loaded: Loaded) -> int:
        classes = len(loaded.names)
        if top_k is None:
            return min(5, classes)
        if not 1 <= top_k <= classes:
            raise ClientError(400, f"top_k must be within 1..{classes}")
        return top_k

    def _pick(self, request: Request, inference: bool) -> Pick:
        """Who answers: production, or the canary for its share of the inference requests (and a version
        forced by the X-Model-Version header or an OIP route's version)."""
        c, canary = self.settings.canary, self.served.canary
        forced = request.path_params.get("version") or request.headers.get(rollout.FORCE_HEADER)
        try:
            return rollout.choose(self.served.production.current, canary.current if canary else None, c.mode,
                                  c.percent, _request_id(request), forced, split=inference)  # fmt: skip
        except rollout.NotServed as e:
            raise ClientError(404, str(e)) from None

    async def _handle(
        self, route: str, request: Request, work, token: Token | None = None, inference: bool = False
    ) -> Response:
        """Run a route's work after its authorization (the classification token unless another is named):
        ``work(pick)`` returns the answer (a dict for JSON, or a Response) from the version picked at the
        start (``_pick``), which is the version the log line, the counters and the evidence name. A
        ClientError is its 4xx, anything else a JSON 500 (counted and logged; the replica stays up); a
        request cancelled by its client is counted and logged as such."""
        start, pick = time.perf_counter(), Pick(self.served.production.current)
        self._start_reporter()
        picked = False  # a request refused before it was routed (a token, a forced version) is no evidence
        try:
            self._authorize(request, token or self.token, admin=token is self.admin_token)
            pick = self._pick(request, inference)
            picked = True
            answer = await work(pick)
            response = answer if isinstance(answer, Response) else JSONResponse(_finite(answer))
            outcome = "ok"
        except ClientError as e:
            headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
            kind = "client_error" if e.status < 500 else "unavailable"  # 503: a token file emptied; 504: reload
            response, outcome = error(e.status, str(e), **headers), f"{kind}_{e.status}"
        except ClientDisconnect:
            response, outcome = error(400, "the client went away before the body arrived"), "client_gone"
        except asyncio.CancelledError:  # the client went away while it waited: nobody reads an answer
            self._record(route, "cancelled", 499, pick, request, start, inference and picked)
            raise
        except Exception as e:
            log.exception("%s failed", route)
            response, outcome = error(500, f"internal error: {type(e).__name__}"), "server_error"
        self._record(route, outcome, response.status_code, pick, request, start, inference and picked)
        return response

    def _record(
        self, route: str, outcome: str, status: int, pick: Pick, request: Request, start: float, evidence: bool
    ) -> None:
        """The request's counters, its evidence (an inference request that was routed) and its log line (499:
        nginx's code for a client that closed the request)."""
        ms, version = 1000 * (time.perf_counter() - start), str(pick.loaded.version.number)
        self.requests.inc(tags={"route": route, "outcome": outcome, "version": version})
        if evidence and outcome != "cancelled":
            if outcome == "ok":
                self.request_ms.observe(ms, tags={"version": version, "role": pick.role})
            if not pick.forced:
                kind = "ok" if outcome == "ok" else "error" if outcome == "server_error" else "client_error"
                self.tally.request(pick.loaded.version.number, pick.role, kind, ms)
                self.counted += kind != "client_error"  # as the evidence counts requests
        log.log(self.log_level, "%s %s %d version=%s request_id=%s role=%s %.1f ms", route, outcome, status, version,
                _request_id(request), "forced" if pick.forced else pick.role, ms)  # fmt: skip

    # -- /v1 -------------------------------------------------------------------------------------------------
    @app.post("/v1/classify", summary="Classify one image", openapi_extra=ONE_IMAGE)
    async def classify(self, request: Request, top_k: int | None = Query(None)) -> JSONResponse:
        async def work(pick: Pick) -> dict:
            k = self._top_k(top_k, pick.loaded)
            (data,) = await self._images(request, many=False)
            return await self._classify(pick, data, k)

        return await self._handle("classify", request, work, inference=True)

    @app.post("/v1/classify/batch", summary="Classify the 'image' fields of a form", openapi_extra=IMAGE_FORM)
    async def classify_batch(self, request: Request, top_k: int | None = Query(None)) -> JSONResponse:
        async def one(pick: Pick, data: bytes, k: int) -> dict:
            try:
                return await self._classify(pick, data, k)
            except ClientError as e:
                return {"error": str(e), "status": e.status}

        async def work(pick: Pick) -> dict:
            k = self._top_k(top_k, pick.loaded)
            found = await self._images(request, many=True)
            return {"results": list(await asyncio.gather(*(one(pick, d, k) for d in found)))}

        return await self._handle("classify_batch", request, work, inference=True)

    @app.get("/v1/models", summary="What is served: the model, its version, classes and preprocessing")
    async def models(self, request: Request) -> JSONResponse:
        async def work(pick: Pick) -> dict:
            return pick.loaded.version.describe()

        return await self._handle("models", request, work)

    @app.get("/healthz", summary="Liveness, and whether the registry could be read at the last check")
    async def healthz(self) -> dict:
        state = self.served.production.status()
        return {
            "status": "ok" if state.registry_error is None else "degraded",
            "registry": "readable" if state.registry_error is None else "unreadable",
            "model": self.settings.model,
            "version": self.served.production.current.version.number,
        }

    # -- administration --------------------------------------------------------------------------------------
    @app.get("/v1/admin/status", include_in_schema=False)
    async def admin_status(self, request: Request, window: float | None = Query(None, gt=0)) -> JSONResponse:
        async def work(pick: Pick) -> dict:
            s, loaded, state = self.settings, self.served.production.current, self.served.production.status()
            return {
                **loaded.version.describe(),
                "source": loaded.version.source(),  # storage URIs: operators only
                "registry": s.registry,
                "alias": None if s.version is not None else s.alias,
                "alias_version": state.alias_version,
                "refused_version": state.refused,
                "load_error": state.load_error,  # why the alias's version is not served, if it is not
                "registry_error": state.registry_error,  # why the last check could not read the registry
                "last_check": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.last_check)),
                "settings": {k: v for k, v in asdict(s).items() if "token" not in k},
                "canary": self._canary_status(),  # this replica's
                "rollout": await self._evidence(window),  # every replica's, over the window (seconds)
            }

        return await self._handle("admin_status", request, work, token=self.admin_token)

    @app.post("/v1/admin/reload", include_in_schema=False)
    async def reload(self, request: Request) -> JSONResponse:
        async def work(pick: Pick) -> dict:
            if self.settings.version is not None:  # settings refuse a canary beside a pinned version
                raise ClientError(409, "this application serves a pinned version and follows no alias")
            loop = asyncio.get_running_loop()
            if not await loop.run_in_executor(None, self.served.check_now, RELOAD_TIMEOUT_S):
                raise ClientError(504, f"the alias check did not end within {RELOAD_TIMEOUT_S:g} s; it goes on")
            state, canary = self.served.production.status(), self.served.canary
            return {"version": self.served.production.current.version.number, "load_error": state.load_error,
                    "registry_error": state.registry_error, "canary": canary and canary.status().serving}  # fmt: skip

        return await self._handle("reload", request, work, token=self.admin_token)

    # -- /v2: the Open Inference Protocol -----------------------------------------------------------------
    @app.get("/v2", summary="OIP server metadata")
    async def server_metadata(self) -> dict:
        return {
            "name": "crossvit-ray",
            "version": package_version("crossvit-ray"),
            "extensions": ["binary_tensor_data"],
        }

    @app.get("/v2/health/live", summary="OIP liveness")
    async def live(self) -> dict:
        return {"live": True}

    @app.get("/v2/health/ready", summary="OIP readiness: a version is loaded and the registry could be read")
    async def ready(self) -> JSONResponse:
        problem = self.served.production.status().registry_error
        return JSONResponse({"ready": problem is None}, status_code=200 if problem is None else 503)

    def _served(self, name: str) -> None:
        """The model an OIP route names is this application's (its version was chosen by ``_pick``)."""
        if name != self.settings.model:
            raise ClientError(404, f"no model {name!r} here: this application serves {self.settings.model!r}")

    @app.get("/v2/models/{name}", summary="OIP model metadata")
    @app.get("/v2/models/{name}/versions/{version}", summary="OIP model metadata of a version")
    async def model_metadata(self, request: Request, name: str, version: str | None = None) -> JSONResponse:
        async def work(pick: Pick) -> dict:
            self._served(name)
            canary = self.served.canary and self.served.canary.current
            served = [self.served.production.current, *([canary] if canary else [])]
            return {
                "name": name,
                "versions": sorted({str(v.version.number) for v in served}),
                "platform": "pytorch",
                "inputs": [{"name": oip.INPUT, "datatype": "BYTES", "shape": [-1]}],  # or UINT8 [-1, -1, -1, 3]
                "outputs": [
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(pick.loaded.names)]},
                    {"name": "classes", "datatype": "BYTES", "shape": [-1, -1]},
                ],
            }

        return await self._handle("v2_metadata", request, work)

    @app.get("/v2/models/{name}/ready", summary="OIP model readiness")
    @app.get("/v2/models/{name}/versions/{version}/ready", summary="OIP model readiness of a version")
    async def model_ready(self, request: Request, name: str, version: str | None = None) -> JSONResponse:
        async def work(pick: Pick) -> dict:
            self._served(name)
            return {"name": name, "ready": True}

        return await self._handle("v2_ready", request, work)

    @app.post(
        "/v2/models/{name}/infer",
        summary="OIP inference (JSON, or the binary tensor data extension)",
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": {"type": "object"}},
                                                   "application/octet-stream": {"schema": _FILE}}}},
    )  # fmt: skip
    @app.post("/v2/models/{name}/versions/{version}/infer", summary="OIP inference on a version")
    async def infer(self, request: Request, name: str, version: str | None = None) -> Response:
        async def work(pick: Pick) -> Response:
            s, loaded = self.settings, pick.loaded
            self._served(name)
            body = await self._body(request)
            length = request.headers.get(oip.HEADER)
            parse = functools.partial(oip.parse_request, body, length, s.max_batch_images)
            json_bytes = int(length) if length and length.isdigit() else len(body)
            if json_bytes > INLINE_JSON_BYTES:  # a large JSON (pixels as numbers): parsed off the event loop
                parsed = await asyncio.get_running_loop().run_in_executor(self.decode_pool, parse)
            else:  # the binary extension's small header: a hop to a thread would cost more than parsing
                parsed = parse()
            k = self._top_k(parsed.top_k, loaded)
            elements = parsed.images if parsed.images is not None else list(parsed.pixels)
            answers = await asyncio.gather(*(self._probabilities(pick, e) for e in elements), return_exceptions=True)
            for i, answer in enumerate(answers):
                if isinstance(answer, ClientError):
                    raise ClientError(answer.status, f"image {i}: {answer}")
                if isinstance(answer, BaseException):
                    raise answer
            probs = np.stack([p for p, _ in answers])
            classes = [[loaded.names[j] for j in np.argsort(-p)[:k]] for p in probs]
            content, headers = oip.encode_response(name, loaded.version.number, parsed, probs, classes)
            return Response(content, headers=headers)

        return await self._handle("v2_infer", request, work, inference=True)


def application(settings: dict, options: dict | None = None) -> serve.Application:
    """The application: the Classifier (the ingress, with ``options`` from the config file's deployment) and
    its evidence board (``Rollout``); ``settings`` are ServeSettings (dotted keys such as canary.alias too)."""
    args = ServeSettings(**nest(settings)).to_dict()
    classifier = Classifier.options(**options) if options else Classifier
    return classifier.bind(args, Board.bind(args))


def build(args: dict) -> serve.Application:
    """The application builder named in infra/serve.yaml (``import_path``): ``args`` are ServeSettings."""
    return application(args or {})
