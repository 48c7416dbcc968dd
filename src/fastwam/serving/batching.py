"""Micro-batching for `fastwam serve`: one queue shared by every connection, one worker, one policy thread.

Valid observations go into a shared queue; the worker takes up to `max_batch` of them (waiting at most
`batch_timeout_ms` for company when the queue is short) and runs `policy.infer_batch` on the process-wide policy
thread, so the event loop keeps answering pings, health checks and other clients while the model runs, and the
policy is never called concurrently (reset included). While a batch runs, new requests pile up and form the next
batch, so under load batches grow on their own and the timeout only costs latency when the server is nearly idle.

If `infer_batch` raises, every request of that batch is retried alone so only the culprit gets the error; a request
whose client left (or a server that stops) is skipped or its result dropped.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from fastwam.serving.protocol import Policy, realtime_kwargs

__all__ = ["Done", "MicroBatcher", "ShuttingDown", "policy_thread"]

logger = logging.getLogger(__name__)

_POLICY_THREAD: concurrent.futures.ThreadPoolExecutor | None = None
_POLICY_THREAD_LOCK = threading.Lock()


def policy_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The process-wide single thread that loads and runs policies; load a policy with `policy_thread().submit(...)`.

    Why one thread for loading and inference: torch's CPU ops use OpenMP, whose thread team belongs to the calling OS
    thread. A policy loaded (or warmed up) on the main thread and then run on another starts a second team; with more
    OpenMP threads than cores libgomp stops spin-waiting and every small op pays a futex wake-up. Measured on the
    2-core VM: `small_cpu` fast inference 39 ms on the loading thread vs 81 ms on a fresh one. Keeping all torch work
    on one thread avoids it (and keeps the policy single-threaded, which the server needs anyway).
    """
    global _POLICY_THREAD
    with _POLICY_THREAD_LOCK:
        if _POLICY_THREAD is None:
            _POLICY_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastwam-policy")
        return _POLICY_THREAD


class ShuttingDown(Exception):
    """The server stopped while the request was queued or in flight."""


@dataclasses.dataclass
class _Pending:
    observation: dict
    mode: str | None
    return_video: bool
    future: asyncio.Future
    received_at: float  # perf_counter() when the message arrived
    realtime: tuple | None = None  # (prev_chunk, inference_delay) of a real-time-chunking request


@dataclasses.dataclass
class Done:
    result: dict
    infer_ms: float
    queue_ms: float
    batch_size: int


class MicroBatcher:
    """The queue and its worker. Create it anywhere; `start()` and everything after run inside the serving loop.

    `open_connections()` says how many clients could still join a batch (the worker stops waiting once all of them
    are queued); `on_batch(size)` is called after each successful `infer_batch`.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        max_batch: int,
        batch_timeout_s: float,
        open_connections: Callable[[], int],
        on_batch: Callable[[int], None],
    ) -> None:
        self._policy = policy
        self._max_batch = max_batch
        self._timeout_s = batch_timeout_s
        self._open_connections = open_connections
        self._on_batch = on_batch
        self._pending: collections.deque[_Pending] = collections.deque()
        # One thread: the policy is never re-entered, and reset() is ordered with inference. It is the process-wide
        # policy thread (see `policy_thread`), shared with whoever loaded the policy, so it is never shut down here.
        self._executor = policy_thread()
        self._wakeup: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def start(self) -> asyncio.Task:
        """The worker task (cancel it to stop); call inside the serving loop."""
        self._wakeup = asyncio.Event()
        return asyncio.create_task(self._worker(), name="fastwam-batcher")

    def nudge(self) -> None:
        """A connection closed: one fewer possible batch-mate, so a waiting batch may go now."""
        if self._wakeup is not None:
            self._wakeup.set()

    async def submit(self, observation: dict, mode: str | None, return_video: bool, received_at: float,
                     realtime: tuple | None = None) -> Done:
        """Queue one validated observation and wait for its result (raises what its lone `infer_batch` raised).
        `realtime`: (prev_chunk, inference_delay) for real-time chunking; requests with and without batch together."""
        assert self._wakeup is not None, "MicroBatcher.start() was not called"
        future: asyncio.Future[Done] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(observation, mode, return_video, future, received_at, realtime))
        self._wakeup.set()
        return await future

    async def reset(self) -> None:
        """`policy.reset()` on the policy thread, ordered with inference."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._policy.reset)

    def fail_pending(self) -> None:
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(ShuttingDown())

    async def _worker(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._timeout_s > 0 and self._could_grow():
                # Give requests that are on their way a moment to join; stops early once the batch is full or every
                # connected client is already waiting (then nobody else can join, e.g. a lone client pays nothing).
                deadline = loop.time() + self._timeout_s
                while self._could_grow():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
            batch = self._take_batch()
            if batch:
                await self._run_batch(batch)

    def _could_grow(self) -> bool:
        # Between batches every live queued request belongs to a distinct waiting connection, so open connections
        # beyond the queue length are the only possible joiners.
        return len(self._pending) < min(self._max_batch, self._open_connections())

    def _take_batch(self) -> list[_Pending]:
        """Up to max_batch live requests sharing the first one's mode and return_video (one infer_batch call has
        one of each)."""
        batch: list[_Pending] = []
        later: list[_Pending] = []
        while self._pending and len(batch) < self._max_batch:
            item = self._pending.popleft()
            if item.future.done():  # its handler is gone (server stopping); nobody is waiting for it
                continue
            if batch and (item.mode, item.return_video) != (batch[0].mode, batch[0].return_video):
                later.append(item)
                continue
            batch.append(item)
        self._pending.extendleft(reversed(later))  # keep arrival order for the next round
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        mode, return_video = batch[0].mode, batch[0].return_video
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(
                self._executor, self._infer_batch, [item.observation for item in batch], mode, return_video,
                [item.realtime for item in batch],
            )
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(ShuttingDown())
            raise
        except Exception as exc:
            if len(batch) > 1:
                # One bad observation must not fail its batch-mates: retry each alone so only the culprit errors.
                logger.info("batch of %d failed (%s: %s); retrying one by one", len(batch), type(exc).__name__, exc)
                for item in batch:
                    if not item.future.done():
                        await self._run_batch([item])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        infer_ms = (time.perf_counter() - started) * 1000.0
        self._on_batch(len(batch))
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():  # a cancelled handler (shutdown) leaves a done future; just drop the result
                item.future.set_result(Done(result, infer_ms, (started - item.received_at) * 1000.0, len(batch)))

    def _infer_batch(self, observations: list[dict], mode: str | None, return_video: bool,
                     realtime: list | None = None) -> list[dict]:
        """Runs on the policy thread."""
        # return_video / the real-time fields only when asked, so policies without those keywords work unchanged.
        extra: dict = ({"return_video": True} if return_video else {}) | realtime_kwargs(realtime)
        results = self._policy.infer_batch(observations, mode=mode, **extra)
        if not isinstance(results, (list, tuple)) or len(results) != len(observations):
            raise RuntimeError(
                f"policy.infer_batch returned {type(results).__name__} of length "
                f"{len(results) if hasattr(results, '__len__') else '?'} for {len(observations)} observations"
            )
        for result in results:
            if not isinstance(result, dict) or "actions" not in result:
                raise RuntimeError(f"policy.infer_batch must return dicts with 'actions', got {type(result).__name__}")
        return list(results)
