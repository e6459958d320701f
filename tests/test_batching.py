"""The replica's dynamic batcher (pipelines/serve/batching.py), on its own: no Ray, no model."""

import asyncio
import time

import pytest

from pipelines.serve.batching import Batcher


class Recorder:
    """A batch function that records each call's items and takes ``seconds``, or until ``gate`` opens when
    one is given (raises for "boom")."""

    def __init__(self, seconds: float = 0.0, gate: asyncio.Event | None = None):
        self.calls: list[list] = []
        self.seconds, self.gate = seconds, gate

    async def __call__(self, items: list) -> list:
        self.calls.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.seconds)
        if "boom" in items:
            raise ValueError("boom")
        return [f"r{i}" for i in items]


async def ready(item):
    return item


async def slow(item, seconds: float):
    await asyncio.sleep(seconds)
    return item


def test_requests_that_arrive_while_the_model_runs_become_one_batch():
    """Ten requests arrive one by one while the first batch runs (each past wait_s): the next call takes all
    ten, not ten calls of one (what ``@serve.batch`` does under load, which this class replaces)."""

    async def main():
        gate = asyncio.Event()
        run = Recorder(gate=gate)
        batcher = Batcher(run, max_size=16, wait_s=0.001)
        first = asyncio.create_task(batcher.submit(ready(0)))
        rest = []
        for i in range(1, 11):
            await asyncio.sleep(0.005)
            rest.append(asyncio.create_task(batcher.submit(ready(i))))
        await asyncio.sleep(0.01)
        gate.set()  # the first call ends
        assert await first == "r0" and await asyncio.gather(*rest) == [f"r{i}" for i in range(1, 11)]
        return run.calls

    assert asyncio.run(main()) == [[0], list(range(1, 11))]


def test_max_size_splits_a_long_queue_in_order():
    async def main():
        run = Recorder(seconds=0.1)
        batcher = Batcher(run, max_size=4, wait_s=0.0)
        tasks = [asyncio.create_task(batcher.submit(ready(i))) for i in range(10)]
        assert await asyncio.gather(*tasks) == [f"r{i}" for i in range(10)]
        return run.calls

    assert asyncio.run(main()) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_lone_request_does_not_wait_but_one_still_decoding_is_waited_for():
    """wait_s is 1 s: a request alone goes at once; a request whose decoding is under way when the batch
    forms is waited for (up to wait_s) and joins it."""

    async def main():
        run = Recorder()
        batcher = Batcher(run, max_size=16, wait_s=1.0)
        start = time.perf_counter()
        assert await batcher.submit(ready("alone")) == "ralone"
        alone = time.perf_counter() - start
        both = await asyncio.gather(batcher.submit(ready("a")), batcher.submit(slow("b", 0.1)))
        return alone, both, run.calls

    alone, both, calls = asyncio.run(main())
    assert alone < 0.5, f"a lone request waited {alone:.2f} s"
    assert both == ["ra", "rb"] and calls == [["alone"], ["a", "b"]]


def test_a_batch_waits_for_a_slow_decode_no_longer_than_wait_s():
    async def main():
        run = Recorder()
        batcher = Batcher(run, max_size=16, wait_s=0.05)
        start = time.perf_counter()
        fast = asyncio.create_task(batcher.submit(ready("a")))
        slow_one = asyncio.create_task(batcher.submit(slow("b", 1.0)))
        assert await fast == "ra"
        waited = time.perf_counter() - start
        assert await slow_one == "rb"
        return waited, run.calls

    waited, calls = asyncio.run(main())
    assert 0.04 < waited < 0.8 and calls == [["a"], ["b"]]


def test_a_failed_decode_is_not_waited_for_and_a_failing_batch_fails_its_requests_only():
    """wait_s is 5 s: a batch waiting for a request still decoding goes as soon as that decode fails; an
    exception in the batch function fails that batch's requests, and the next batch is served."""

    async def main():
        run = Recorder(seconds=0.05)
        batcher = Batcher(run, max_size=16, wait_s=5.0)

        async def not_an_image():
            await asyncio.sleep(0.05)
            raise ValueError("not an image")

        start = time.perf_counter()
        waiting = asyncio.create_task(batcher.submit(ready("x")))
        failing = asyncio.create_task(batcher.submit(not_an_image()))
        assert await waiting == "rx"
        took = time.perf_counter() - start
        with pytest.raises(ValueError, match="not an image"):
            await failing
        doomed = await asyncio.gather(batcher.submit(ready("boom")), batcher.submit(ready("y")), return_exceptions=True)
        return took, doomed, await batcher.submit(ready("z")), run.calls

    took, doomed, after, calls = asyncio.run(main())
    assert took < 1.0, f"the batch waited {took:.2f} s for a decode that had failed"
    assert all(isinstance(o, ValueError) for o in doomed) and after == "rz"
    assert calls == [["x"], ["boom", "y"], ["z"]]


def test_a_request_cancelled_while_queued_is_left_out_of_its_batch():
    async def main():
        gate = asyncio.Event()
        run = Recorder(gate=gate)
        batcher = Batcher(run, max_size=16, wait_s=0.0)
        first = asyncio.create_task(batcher.submit(ready(0)))
        await asyncio.sleep(0.01)  # the first call waits for the gate
        gone = asyncio.create_task(batcher.submit(ready("gone")))
        kept = asyncio.create_task(batcher.submit(ready("kept")))
        await asyncio.sleep(0.01)
        gone.cancel()  # its client went away
        await asyncio.sleep(0)
        gate.set()
        assert await first == "r0" and await kept == "rkept"
        return run.calls

    assert asyncio.run(main()) == [[0], ["kept"]]


def test_a_batching_loop_that_ends_fails_what_it_holds_and_the_next_request_starts_another():
    """The loop itself is interrupted (not an error of one batch): its requests fail at once instead of
    waiting forever, ``failure`` says so (the replica's health check reports it), and serving goes on; once a
    new loop runs, ``failure`` is cleared (else the health check would kill a replica that works again)."""

    async def main():
        async def run(items: list) -> list:
            if "stop" in items:
                raise asyncio.CancelledError  # as if the loop's task were cancelled mid-batch
            return [f"r{i}" for i in items]

        batcher = Batcher(run, max_size=16, wait_s=0.0)
        with pytest.raises(RuntimeError, match="interrupted"):
            await asyncio.wait_for(batcher.submit(ready("stop")), 5)
        await asyncio.sleep(0)  # the loop's end is noticed
        failure = batcher.failure
        return failure, await asyncio.wait_for(batcher.submit(ready("next")), 5), batcher.failure

    failure, after, now = asyncio.run(main())
    assert failure == "RuntimeError: cancelled" and after == "rnext" and now is None


def test_a_request_still_preparing_when_the_loop_ends_is_answered_by_the_next_loop():
    """The loop ends while another request is still decoding: that request's item goes to a new loop, not
    into the ended loop's queue, where it would wait forever."""

    async def main():
        gate = asyncio.Event()

        async def run(items: list) -> list:
            if "stop" in items:
                raise asyncio.CancelledError  # the loop ends
            return [f"r{i}" for i in items]

        async def late():
            await gate.wait()
            return "late"

        batcher = Batcher(run, max_size=16, wait_s=0.0)
        pending = asyncio.create_task(batcher.submit(late()))
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="interrupted"):
            await asyncio.wait_for(batcher.submit(ready("stop")), 5)
        await asyncio.sleep(0)  # the loop's end is noticed
        gate.set()
        return await asyncio.wait_for(pending, 5)

    assert asyncio.run(main()) == "rlate"
