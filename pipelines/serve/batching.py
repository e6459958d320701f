"""Dynamic batching for a replica: requests that arrive while the model is busy become the next batch.

Why not ``@serve.batch``: since Ray 2.47 it forms the next batch while the previous one still runs (batch
formation is decoupled from ``max_concurrent_batches``), so under load it cuts the queue into batches of
whatever arrived within ``batch_wait_timeout_s``, and those small batches then wait behind each other.
Measured on 2 cores with crossvit_tiny_240 and 32 clients: a median of 2 images per model call, 18 requests/s,
1.7 s of the 1.8 s latency spent queued (benchmarks/RESULTS.md). Here a batch is formed only when the model is
free, so it takes everything that queued meanwhile (up to ``max_size``), as Triton's dynamic batcher does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any


class Batcher:
    """``await batcher.submit(prepare)`` awaits ``prepare`` (the request's decoding) for an item and returns
    ``run([.., item, ..])``'s result for that item.

    ``run`` gets a list of up to ``max_size`` items and returns one result per item, in order; calls never
    overlap. A batch waits for more items only while other requests are still preparing theirs, and at most
    ``wait_s`` after its first item arrived: a lone request goes at once, and when the model was busy for
    longer than ``wait_s``, whatever queued goes at once. An exception in ``run`` fails that batch's requests
    only; a request cancelled while queued (its client went away) is dropped from its batch. Should the
    batching loop itself end with an error, the queued requests fail with it and ``failure`` says why until
    the next request starts a new loop (the replica's health check reports it meanwhile).
    """

    def __init__(self, run: Callable[[list], Awaitable[list]], max_size: int, wait_s: float):
        if max_size < 1 or wait_s < 0:
            raise ValueError("max_size must be at least 1 and wait_s not negative")
        self.run, self.max_size, self.wait_s = run, max_size, wait_s
        self._queue: asyncio.Queue | None = None
        self._arrival: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._preparing = 0  # requests whose items are on their way
        self.failure: str | None = None

    async def submit(self, prepare: Awaitable) -> Any:
        loop = asyncio.get_running_loop()
        self._running(loop)
        self._preparing += 1
        try:
            item = await prepare
        finally:
            self._preparing -= 1
            self._arrival.set()  # an item, or one fewer to wait for
        # Again: the loop may have ended while this request prepared, and its queue with it. No await from
        # here to put_nowait, so the loop this finds is the one that gets the item.
        self._running(loop)
        future = loop.create_future()
        self._queue.put_nowait((loop.time(), item, future))
        return await future

    def _running(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the batching loop if none runs: on the loop that serves requests (Serve may run user code on
        a loop of its own), and again after one ended."""
        if self._worker is None:
            self._queue, self._arrival = asyncio.Queue(), asyncio.Event()
            self._worker = loop.create_task(self._serve())
            self._worker.add_done_callback(self._ended)
            self.failure = None  # a new loop runs: the replica is healthy again

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        arrived, item, future = await self._queue.get()
        batch = [(item, future)]
        deadline = arrived + self.wait_s
        while len(batch) < self.max_size:
            if not self._queue.empty():
                _, item, future = self._queue.get_nowait()
                batch.append((item, future))
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or not self._preparing:
                break
            # Wait on an event, not on queue.get(): a get cancelled by the timeout could lose an item.
            self._arrival.clear()
            with contextlib.suppress(asyncio.TimeoutError):  # not TimeoutError before Python 3.11
                await asyncio.wait_for(self._arrival.wait(), remaining)
        return [(i, f) for i, f in batch if not f.done()]  # done: cancelled by its request

    async def _serve(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            try:
                results = await self.run([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
            except BaseException as e:  # this batch's requests fail; the next batch runs
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e if isinstance(e, Exception) else RuntimeError(f"interrupted: {e!r}"))
                if not isinstance(e, Exception):  # cancelled: the loop ends (see _ended)
                    raise
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    def _ended(self, worker: asyncio.Task) -> None:
        error = RuntimeError("cancelled") if worker.cancelled() else worker.exception()
        error = error or RuntimeError("the batching loop ended")
        self.failure = f"{type(error).__name__}: {error}"
        self._worker = None
        while not self._queue.empty():
            _, _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError(f"the batcher failed: {self.failure}"))
