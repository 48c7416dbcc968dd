"""Keep a robot moving while the next chunk is computed: asynchronous execution with real-time chunking.

A robot loop calls `AsyncChunkRunner.act(observation)` once per control tick and applies the action it returns. The
runner executes the current chunk, and `replan - d` ticks into it sends the next request from a background thread
(d = the ticks an inference has been taking); the robot keeps executing the old chunk meanwhile, and when the reply
is in, the runner switches to it at the index of the tick it has reached (d, when the estimate held) and runs
`replan` actions of it, as `fastwam eval metaworld --async` does. With `chunking="rtc"` the request carries
the actions that will run meanwhile (`prev_chunk`, `inference_delay`), so the reply's first d actions are exactly
those and the rest continues them (`model/rtc.py`); `naive` requests a plain chunk and switches to it all the same;
`sync` is the robot that waits (the call blocks until the reply is in, every `replan` ticks).

The clock is the tick count, not wall time: the runner only assumes `act` is called once per control period, and
measures each inference's delay in ticks (observation tick -> the first tick its reply was in). With `inference_delay`
left to None it plans with the largest delay of the last few requests, so a slower machine or network is absorbed on
the next request. If a reply is late enough that the current chunk runs out, `act` waits for it (a stall, counted);
a reply later than its whole chunk is dropped and the robot waits for one from its current observation.

`policy` is anything with `infer(obs, *, prev_chunk=..., inference_delay=...) -> {"actions": [H, A], ...}`: an
in-process `FastWAMPolicy` or a `WebsocketClient` to `fastwam serve` (every call goes through the one background
thread, so a websocket is never used from two threads). The same loop, simulated in lock-step with a fixed delay, is
`fastwam eval metaworld --async` and the LIBERO client's `--async`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, Literal

import numpy as np

Chunking = Literal["sync", "naive", "rtc"]


@dataclasses.dataclass
class _Request:
    future: concurrent.futures.Future
    tick: int  # the tick of the observation it was made from
    delay: int  # the ticks of the old chunk it planned to run meanwhile (pinned with rtc)
    measured: bool  # made while a chunk was running (its delay is a measurement of the inference's)
    ready: int | None = None  # the first tick at which its reply was in


@dataclasses.dataclass
class RunnerStats:
    ticks: int = 0
    requests: int = 0
    stalls: int = 0  # ticks at which the robot had no action and `act` waited for a reply
    stall_s: float = 0.0  # wall time spent waiting in those ticks
    expired: int = 0  # replies that came after their whole chunk's time (dropped; the robot waited for a new one)
    delays: list[int] = dataclasses.field(default_factory=list)  # measured ticks per request (observation -> switch)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["delay_counts"] = dict(sorted(collections.Counter(self.delays).items()))
        del d["delays"]
        return d


class AsyncChunkRunner:
    def __init__(
        self,
        policy: Any,
        replan: int,
        chunking: Chunking = "rtc",
        inference_delay: int | None = None,
        *,
        initial_delay: int = 1,
        delay_window: int = 5,
        submit: Callable[..., concurrent.futures.Future] | None = None,
        infer_kwargs: dict | None = None,
    ):
        """`replan`: actions of each chunk executed before the next one takes over (as in evaluation's --replan).
        `inference_delay`: plan every request with this delay in ticks (None: the largest measured over the last
        `delay_window` requests, `initial_delay` before the first is measured). `submit(fn, *args)`: how calls are
        run in the background (default: one worker thread; tests pass a controllable one). `infer_kwargs`: extra
        keyword arguments of every `policy.infer` call (e.g. `steps=1` for an in-process policy)."""
        if chunking not in ("sync", "naive", "rtc"):
            raise ValueError(f"chunking must be sync, naive or rtc, got {chunking!r}")
        if isinstance(replan, bool) or not isinstance(replan, int) or replan < 1:
            raise ValueError(f"replan must be a positive integer, got {replan!r}")
        if inference_delay is not None and not 0 <= inference_delay <= replan:
            raise ValueError(f"inference_delay must be in 0..replan ({replan}), got {inference_delay}")
        if not 0 <= initial_delay <= replan:
            raise ValueError(f"initial_delay must be in 0..replan ({replan}), got {initial_delay}")
        self.policy = policy
        self.replan = replan
        self.chunking = chunking
        self.fixed_delay = inference_delay
        self.initial_delay = initial_delay
        self.infer_kwargs = dict(infer_kwargs or {})
        self._pool = None
        if submit is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastwam-infer")
            submit = self._pool.submit
        self._submit = submit
        self._recent = collections.deque(maxlen=max(1, delay_window))
        self.stats = RunnerStats()
        self._clear()

    def _clear(self) -> None:
        self._chunk: np.ndarray | None = None
        self._index = 0  # the next action of the chunk to execute
        self._start = 0  # the index it began executing at: its segment is start .. start + replan - 1
        self._pending: _Request | None = None
        self._tick = 0

    # -----------------------------------------------------------------------------------------------------------------

    @property
    def planned_delay(self) -> int:
        """The delay the next request plans with (ticks of the old chunk that run while it is computed)."""
        if self.chunking == "sync":
            return 0
        if self.fixed_delay is not None:
            return self.fixed_delay
        return min(self.replan, max(self._recent) if self._recent else self.initial_delay)

    def act(self, observation: dict) -> np.ndarray:
        """The action for this control tick ([A]); `observation` is the robot's at this tick."""
        pending = self._pending
        if pending is not None and pending.ready is None and pending.future.done():
            pending.ready = self._tick
        if pending is not None and pending.ready is not None and self._tick - pending.tick >= pending.delay:
            self._switch()  # with rtc the first `delay` actions are the old chunk's anyway: no earlier switch
        if self._chunk is not None and self._index >= len(self._chunk):  # ran out before the reply came
            if self._pending is not None:
                self._wait(stall=True)
            else:
                self._chunk = None
        if self._chunk is None:  # the episode's first chunk, or a reply that came too late: the robot waits
            self._request(observation, delay=0)
            self._wait()
        if self._pending is None and self._index >= self._request_index():
            d = self.planned_delay
            self._request(observation, delay=d)
            if d == 0:  # sync (or a zero delay): the robot waits for the reply, as in plain evaluation
                self._wait()
        action = np.array(self._chunk[self._index])
        self._index += 1
        self._tick += 1
        self.stats.ticks += 1
        return action

    def _request_index(self) -> int:
        """The index at which the next request goes out: d ticks before the current segment ends (as in evaluation's
        --async; a segment that a late reply shortened ends with the chunk)."""
        return min(self._start + self.replan, len(self._chunk)) - self.planned_delay

    def reset(self, reset_policy: bool = True) -> None:
        """Episode boundary: drop the chunk (an in-flight reply is waited for and discarded)."""
        if self._pending is not None:
            concurrent.futures.wait([self._pending.future])
        self._clear()
        if reset_policy and hasattr(self.policy, "reset"):
            self._submit(self.policy.reset).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> AsyncChunkRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -----------------------------------------------------------------------------------------------------------------

    def _request(self, observation: dict, delay: int) -> None:
        kwargs = dict(self.infer_kwargs)
        running = self._chunk is not None
        if self.chunking == "rtc" and running:
            prev = self._chunk[self._index:]
            delay = min(delay, len(prev))
            if delay > 0:  # with nothing executing meanwhile the reply is plain sampling anyway
                kwargs.update(prev_chunk=prev, inference_delay=delay)
        future = self._submit(self.policy.infer, observation, **kwargs)
        self._pending = _Request(future, self._tick, delay, measured=running and self.chunking != "sync")
        self.stats.requests += 1

    def _wait(self, stall: bool = False) -> None:
        """Block until the pending reply is in, then switch to it (the robot has nothing else to do)."""
        clock = time.perf_counter()
        concurrent.futures.wait([self._pending.future])
        if stall:
            self.stats.stalls += 1
            self.stats.stall_s += time.perf_counter() - clock
        if self._pending.ready is None:
            self._pending.ready = self._tick
        self._switch()

    def _switch(self) -> None:
        """Continue with the pending reply's chunk, at the index of the tick the robot has reached."""
        request, self._pending = self._pending, None
        reply = request.future.result()  # a failed inference raises here, in the robot loop
        chunk = np.asarray(reply["actions"] if isinstance(reply, dict) else reply)
        if chunk.ndim != 2 or len(chunk) < self.replan:
            raise ValueError(f"the policy returned actions of shape {list(chunk.shape)}; expected [H, A] with "
                             f"H >= replan ({self.replan})")
        if request.measured:
            self.stats.delays.append(request.ready - request.tick)
            self._recent.append(request.ready - request.tick)
        elapsed = self._tick - request.tick
        if elapsed >= len(chunk):  # planned for ticks that have all passed: nothing in it is for now
            self.stats.expired += 1
            self._chunk = None
            return
        self._chunk, self._index, self._start = chunk, elapsed, elapsed
