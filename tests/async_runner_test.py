"""AsyncChunkRunner: the robot-side loop of asynchronous execution, with a policy whose replies the test releases."""

import concurrent.futures
import threading

import numpy as np
import pytest

from fastwam.serving.realtime import AsyncChunkRunner

H, A = 8, 2  # chunk length, action size


class ScriptedPolicy:
    """Chunk n holds actions n * 100 + index (so every executed action names its chunk and index); records each
    request's observation and real-time fields. Requests run through `submit`, whose futures the test completes."""

    def __init__(self):
        self.requests = []
        self.futures = []
        self.resets = 0
        self.auto = True  # complete every request at once (else the test calls `release`)
        self.release_first = 0  # with auto off: complete this many requests at once all the same

    def infer(self, obs, **kwargs):
        n = len(self.requests)
        self.requests.append((obs, kwargs))
        return {"actions": np.stack([np.full(A, n * 100 + i, dtype=np.float32) for i in range(H)])}

    def reset(self):
        self.resets += 1

    def submit(self, fn, *args, **kwargs):
        future = concurrent.futures.Future()
        self.futures.append((future, fn, args, kwargs))
        if self.auto or fn == self.reset or self.release_first > 0:
            self.release_first -= fn != self.reset
            self.release()
        return future

    def release(self):
        future, fn, args, kwargs = self.futures.pop(0)
        future.set_result(fn(*args, **kwargs))


def _run(runner, ticks, on_tick=None):
    out = []
    for t in range(ticks):
        if on_tick:
            on_tick(t)
        out.append(int(runner.act({"tick": runner.stats.ticks})[0]))
    return out


def test_sync_waits_at_every_segment_like_plain_evaluation():
    policy = ScriptedPolicy()
    runner = AsyncChunkRunner(policy, replan=4, chunking="sync", submit=policy.submit)
    assert _run(runner, 12) == [0, 1, 2, 3, 100, 101, 102, 103, 200, 201, 202, 203]
    assert [obs["tick"] for obs, _ in policy.requests] == [0, 4, 8]
    assert all(kwargs == {} for _, kwargs in policy.requests)
    assert runner.stats.delays == [] and runner.stats.stalls == 0


def test_rtc_requests_early_with_the_executing_actions_and_switches_at_the_delay():
    policy = ScriptedPolicy()
    runner = AsyncChunkRunner(policy, replan=4, chunking="rtc", inference_delay=2, submit=policy.submit)
    # Request d = 2 ticks before each segment of 4 ends, with the old chunk from that tick on; the reply is in at
    # once, but the robot keeps the old chunk for the 2 planned ticks, then runs 4 actions of the new one from its
    # index 2 (the evaluation's --async schedule).
    assert _run(runner, 10) == [0, 1, 2, 3, 102, 103, 104, 105, 202, 203]
    assert [obs["tick"] for obs, _ in policy.requests] == [0, 2, 6]
    _, kwargs = policy.requests[1]
    assert kwargs["inference_delay"] == 2
    np.testing.assert_array_equal(kwargs["prev_chunk"][:, 0], [2, 3, 4, 5, 6, 7])  # chunk 0 from index 2 on
    np.testing.assert_array_equal(policy.requests[2][1]["prev_chunk"][:, 0], [104, 105, 106, 107])


def test_naive_requests_plain_chunks_and_switches_all_the_same():
    policy = ScriptedPolicy()
    runner = AsyncChunkRunner(policy, replan=4, chunking="naive", inference_delay=2, submit=policy.submit)
    assert _run(runner, 8) == [0, 1, 2, 3, 102, 103, 104, 105]
    assert all(kwargs == {} for _, kwargs in policy.requests)


def test_a_late_reply_is_taken_at_the_tick_reached_and_the_next_request_plans_for_it():
    policy = ScriptedPolicy()
    runner = AsyncChunkRunner(policy, replan=4, chunking="rtc", initial_delay=1, submit=policy.submit)
    _run(runner, 1)  # the first chunk (waited for)
    policy.auto = False
    # Request at tick 3 (planned delay 1); its reply comes in only before tick 6: 3 ticks, used at its index 3.
    actions = _run(runner, 6, on_tick=lambda t: policy.release() if t == 5 else None)
    assert actions == [1, 2, 3, 4, 5, 103]
    assert runner.stats.delays == [3]
    assert runner.planned_delay == 3  # the largest recent delay: the next request goes out 3 ticks before the seam
    assert policy.requests[1][1]["inference_delay"] == 1
    policy.auto = True
    _run(runner, 2)  # chunk 1's segment is its indices 3..6: the request goes out at index 4 (tick 7)
    assert policy.requests[-1][0]["tick"] == 7 and policy.requests[-1][1]["inference_delay"] == 3


def test_a_reply_later_than_the_chunk_stalls_the_robot_and_is_counted():
    policy = ScriptedPolicy()
    runner = AsyncChunkRunner(policy, replan=4, chunking="rtc", inference_delay=2, submit=policy.submit)
    assert _run(runner, 2) == [0, 1]
    policy.auto = False
    threading.Timer(0.2, policy.release).start()  # long after the robot ran out of chunk 0
    # Requested at tick 2; the robot runs chunk 0 to its end, waits at tick 8, then takes chunk 1 at index 8 - 2.
    assert _run(runner, 7) == [2, 3, 4, 5, 6, 7, 106]
    assert runner.stats.stalls == 1 and runner.stats.stall_s > 0
    assert runner.stats.delays == [6]


def test_a_reply_later_than_its_whole_chunk_is_dropped_and_the_robot_waits_for_a_fresh_one():
    policy = ScriptedPolicy()
    runner = AsyncChunkRunner(policy, replan=4, chunking="rtc", inference_delay=4, submit=policy.submit)
    policy.release_first = 1  # only the episode's first request is answered at once

    def late():
        policy.auto = True
        policy.release()

    policy.auto = False
    threading.Timer(0.2, late).start()
    assert _run(runner, 1) == [0]  # d = replan: the next request goes out at once, from the same tick
    # Chunk 1 was planned for ticks 0..7 and comes at tick 8: dropped; chunk 2, from tick 8's observation, is waited
    # for and runs from its start.
    assert _run(runner, 8) == [1, 2, 3, 4, 5, 6, 7, 200]
    assert runner.stats.expired == 1 and runner.stats.stalls == 1
    assert [obs["tick"] for obs, _ in policy.requests[:3]] == [0, 0, 8]


def test_a_failed_inference_raises_in_the_robot_loop():
    class Broken(ScriptedPolicy):
        def infer(self, obs, **kwargs):
            if self.requests:
                raise ConnectionError("server went away")
            return super().infer(obs, **kwargs)

    policy = Broken()
    runner = AsyncChunkRunner(policy, replan=4, chunking="rtc", inference_delay=2, submit=policy.submit)
    with pytest.raises(ConnectionError, match="server went away"):
        _run(runner, 5)


def test_reset_drops_the_chunk_and_resets_the_policy():
    policy = ScriptedPolicy()
    runner = AsyncChunkRunner(policy, replan=4, chunking="rtc", inference_delay=2, submit=policy.submit)
    _run(runner, 3)
    runner.reset()
    assert policy.resets == 1
    assert _run(runner, 2) == [200, 201]  # a fresh first chunk, waited for (chunk 1 was in flight and dropped)


@pytest.mark.parametrize("kwargs, message", [
    (dict(replan=0), "replan must be a positive integer"),
    (dict(replan=4, chunking="smooth"), "chunking must be sync, naive or rtc"),
    (dict(replan=4, inference_delay=5), r"inference_delay must be in 0..replan \(4\)"),
])
def test_bad_settings_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AsyncChunkRunner(ScriptedPolicy(), **kwargs)


def test_a_chunk_shorter_than_replan_is_refused():
    class Short(ScriptedPolicy):
        def infer(self, obs, **kwargs):
            return {"actions": np.zeros((2, A), np.float32)}

    policy = Short()
    with pytest.raises(ValueError, match=r"shape \[2, 2\].*H >= replan \(4\)"):
        AsyncChunkRunner(policy, replan=4, submit=policy.submit).act({})


def test_rtc_with_no_delay_sends_plain_requests_and_waits():
    policy = ScriptedPolicy()
    runner = AsyncChunkRunner(policy, replan=8, chunking="rtc", inference_delay=0, submit=policy.submit)
    assert _run(runner, 10) == [0, 1, 2, 3, 4, 5, 6, 7, 100, 101]  # a segment of 8 is the whole chunk: no overlap
    assert all(kwargs == {} for _, kwargs in policy.requests)
