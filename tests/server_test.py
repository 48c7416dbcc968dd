"""fastwam.serving: the websocket policy server, its client, openpi-client compatibility, fuzzing, batching.

Loopback only (127.0.0.1, ephemeral ports); every wait has a timeout and every loop a fixed count.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from fake_policy import REJECTED_PROMPT, FakePolicy, make_observation

from fastwam.serving import msgpack_numpy as mn
from fastwam.serving.client import ServerError, WebsocketClient
from fastwam.serving.fuzz import KINDS, exchange, frame, fuzz_cases, raw_websocket, run_fuzz
from fastwam.serving.protocol import ProtocolError, example_observation, parse_observation_spec, validate_observation
from fastwam.serving.server import PolicyServer, policy_thread
from fastwam.serving.testing import ZeroPolicy

TIMEOUT = 10.0
MAX_MESSAGE_BYTES = 64 * 1024  # small limit so "oversized" frames are cheap to send


@pytest.fixture(scope="module")
def served():
    policy = FakePolicy()
    server = PolicyServer(policy, "127.0.0.1", 0, max_message_bytes=MAX_MESSAGE_BYTES, max_batch=8, batch_timeout_ms=2)
    with server:
        yield server, policy


def _expected(policy: FakePolicy, obs: dict, mode: str | None = None) -> np.ndarray:
    return policy.expected_actions(obs, mode)


def _wait_until(predicate, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _error(port: int, payload: bytes | str) -> str:
    reply, code, _ = exchange(port, payload)
    assert code == 1011, (code, reply)
    assert isinstance(reply, str) and reply.startswith("error:"), reply
    return reply


# --------------------------------------------------------------------------- basics


def test_policy_runs_on_the_process_wide_policy_thread() -> None:
    # torch's OpenMP team belongs to the OS thread: `fastwam serve` loads the policy on `policy_thread()`, so the
    # server must run inference and reset there too (a second thread doubled small-model latency on 2 cores).
    policy = FakePolicy()
    with PolicyServer(policy, "127.0.0.1", 0) as server, WebsocketClient(port=server.port) as client:
        client.infer(make_observation(seed=1))
        client.reset()
        client.infer(make_observation(seed=2))
    assert policy.threads == {policy_thread().submit(threading.get_ident).result()}


def test_healthz_returns_200(served) -> None:
    server, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    conn.request("GET", "/healthz")
    response = conn.getresponse()
    assert response.status == 200
    assert response.read().strip() == b"OK"
    conn.close()


def test_metadata_on_connect(served) -> None:
    server, policy = served
    with WebsocketClient(port=server.port, connect_timeout_s=TIMEOUT) as client:
        meta = client.metadata
    assert meta["observation_spec"] == policy.metadata["observation_spec"]
    assert meta["action_shape"] == [4, 7] and meta["mode"] == "fast" and meta["checkpoint"]
    assert meta["server"]["reset_message"] == {"reset": True}
    assert meta["server"]["max_message_bytes"] == MAX_MESSAGE_BYTES


@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")
def test_openpi_client_gets_same_actions_as_in_process(served) -> None:
    pytest.importorskip("openpi_client", reason="install with `pip install --no-deps openpi-client==0.1.2`")
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    server, policy = served
    client = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    try:
        assert client.get_server_metadata()["observation_spec"] == policy.metadata["observation_spec"]
        for seed in range(3):
            obs = make_observation(seed)
            reply = client.infer(obs)
            in_process = policy.infer(obs)["actions"]
            assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (4, 7)
            np.testing.assert_array_equal(reply["actions"], in_process)
            assert reply["policy_timing"]["infer_ms"] >= 0
            assert reply["server_timing"]["infer_ms"] >= 0 and reply["server_timing"]["batch_size"] == 1
            if seed > 0:
                assert reply["server_timing"]["prev_total_ms"] > 0
        client.reset()  # openpi's reset() is client-side only; must not disturb the connection
        np.testing.assert_array_equal(
            client.infer(make_observation(7))["actions"], policy.infer(make_observation(7))["actions"]
        )
    finally:
        client._ws.close()


@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")
def test_openpi_client_sees_error_text(served) -> None:
    pytest.importorskip("openpi_client", reason="install with `pip install --no-deps openpi-client==0.1.2`")
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    server, _ = served
    client = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
    obs = make_observation(0)
    obs["observation/state"] = np.zeros(5, np.float32)
    with pytest.raises(RuntimeError, match=r"'observation/state' has shape \(5,\)"):
        client.infer(obs)
    client._ws.close()


def test_float64_state_is_cast_and_mode_per_request(served) -> None:
    server, policy = served
    obs = make_observation(3)
    with WebsocketClient(port=server.port) as client:
        as64 = dict(obs, **{"observation/state": obs["observation/state"].astype(np.float64)})
        np.testing.assert_array_equal(client.infer(as64)["actions"], _expected(policy, obs))
        joint = client.infer(obs, mode="joint")
        np.testing.assert_array_equal(joint["actions"], _expected(policy, obs, "joint"))
        assert joint["mode"] == "joint"
        with pytest.raises(ServerError, match="unknown mode 'bogus'"):
            client.infer(obs, mode="bogus")


def test_reset_messages(served) -> None:
    server, policy = served
    before = policy.resets
    with WebsocketClient(port=server.port) as client:
        client.reset()
        np.testing.assert_array_equal(
            client.infer(make_observation(1))["actions"], _expected(policy, make_observation(1))
        )
    assert policy.resets == before + 1
    for message, ack in [
        ({"__ctrl__": "reset"}, "reset"),
        ({"__ctrl__": "episode_start", "__task__": "x"}, "reset"),
        ({"type": "reset"}, "reset"),
        ({"command": "reset"}, "reset"),
        ({"__ctrl__": "episode_end"}, "episode_end"),
    ]:
        reply, code, _ = exchange(server.port, mn.packb(message))
        assert code is None and mn.unpackb(reply) == {"__ack__": ack}, message
    assert policy.resets == before + 5
    assert "unknown control message" in _error(server.port, mn.packb({"__ctrl__": "explode"}))
    text = _error(server.port, mn.packb({"reset": True, **make_observation(0)}))
    assert "must not carry observation keys" in text


def _with(obs: dict, **changes) -> dict:
    out = dict(obs)
    for key, value in changes.items():
        key = key.replace("__", "/")
        if value is _DROP:
            out.pop(key)
        else:
            out[key] = value
    return out


_DROP = object()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"observation__image": _DROP}, "missing observation key(s) ['observation/image']"),
        ({"prompt": _DROP, "observation__state": _DROP}, "missing observation key(s) ['observation/state', 'prompt']"),
        (
            {"observation__image": np.zeros((16, 16, 4), np.uint8)},
            "'observation/image' has shape (16, 16, 4); expected uint8 array of shape (16, 16, 3)",
        ),
        (
            {"observation__wrist_image": np.zeros((16, 16, 3), np.float32)},
            "'observation/wrist_image' has dtype float32; expected uint8",
        ),
        ({"observation__state": np.zeros(8, np.int32)}, "'observation/state' has dtype int32; expected float32"),
        (
            {"observation__state": [0.0] * 8},
            "'observation/state' must be a numpy float32 array of shape (8,), got list",
        ),
        (
            {"observation__state": np.array([0, np.nan, 0, 0, 0, 0, np.inf, 0], np.float32)},
            "'observation/state' contains 2 non-finite value(s) (NaN or inf)",
        ),
        (
            {"observation__state": np.full(8, 1e300)},
            "'observation/state' contains 8 non-finite",
        ),  # float64 -> f32 overflow
        ({"prompt": 42}, "'prompt' must be a string (or a 0-d numpy string array), got int"),
        ({"mode": 3}, "'mode' must be a string, got int"),
    ],
)
def test_error_names_what_was_wrong(served, change: dict, expected: str) -> None:
    server, _ = served
    text = _error(server.port, mn.packb(_with(make_observation(0), **change)))
    assert expected in text, text


def test_malformed_frames(served) -> None:
    server, _ = served
    assert "got a text frame" in _error(server.port, "hello")
    assert "invalid msgpack" in _error(server.port, b"\xc1\x00")
    assert "must be a msgpack map" in _error(server.port, mn.packb([1, 2, 3]))
    assert "request keys must be strings" in _error(server.port, msgpack.packb({b"raw": 1}))
    fake = {b"__ndarray__": True, b"data": b"\0" * 12, b"dtype": "|u1", b"shape": [2**40, 2**40, 3]}
    huge = msgpack.packb({**make_observation(0), "observation/image": fake}, default=mn.pack_array)
    assert "but carries 12 bytes" in _error(server.port, huge)
    _, code, reason = exchange(server.port, b"\0" * (MAX_MESSAGE_BYTES + 1))
    assert code in (1009, None), (code, reason)  # None: the TCP stream dropped before the close frame was read


def test_policy_value_error_only_fails_the_culprit() -> None:
    gate = threading.Event()
    policy = FakePolicy(gate=gate)
    with PolicyServer(policy, "127.0.0.1", 0, max_batch=8, batch_timeout_ms=0) as server:
        results: dict[str, object] = {}

        def ask(name: str, obs: dict) -> None:
            try:
                with WebsocketClient(port=server.port) as client:
                    results[name] = client.infer(obs)
            except ServerError as exc:
                results[name] = exc

        blocker = threading.Thread(target=ask, args=("a", make_observation(0)))
        blocker.start()
        assert policy.entered.wait(TIMEOUT)
        threads = [
            threading.Thread(target=ask, args=("bad", make_observation(1, prompt=REJECTED_PROMPT))),
            threading.Thread(target=ask, args=("good", make_observation(2))),
        ]
        for thread in threads:
            thread.start()
        _wait_until(lambda: server.stats()["pending"] == 2, "two queued requests")
        gate.set()
        for thread in [blocker, *threads]:
            thread.join(TIMEOUT)
        assert isinstance(results["bad"], ServerError) and "rejected by FakePolicy" in str(results["bad"])
        assert "the policy rejected the observation" in str(results["bad"])
        np.testing.assert_array_equal(results["good"]["actions"], _expected(policy, make_observation(2)))
        assert policy.batch_sizes == [1, 2, 1, 1]  # the failed pair is retried one by one


# --------------------------------------------------------------------------- concurrency and batching


def test_four_concurrent_clients_get_their_own_answers() -> None:
    policy = FakePolicy()
    with PolicyServer(policy, "127.0.0.1", 0, max_batch=8, batch_timeout_ms=2) as server:
        errors: list[BaseException] = []
        barrier = threading.Barrier(4, timeout=TIMEOUT)

        def run(index: int) -> None:
            try:
                with WebsocketClient(port=server.port) as client:
                    barrier.wait()
                    for j in range(10):
                        obs = make_observation(100 * index + j)
                        np.testing.assert_array_equal(client.infer(obs)["actions"], _expected(policy, obs))
            except BaseException as exc:  # surfaced below; a thread's assert would otherwise vanish
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT * 3)
        assert not errors, errors
        stats = server.stats()
        assert stats["replies"] == 40 and sum(policy.batch_sizes) == 40


def test_requests_arriving_together_are_batched() -> None:
    """The first request holds the policy; three more queue up behind it and must run as one batch of 3."""
    gate = threading.Event()
    policy = FakePolicy(gate=gate)
    with PolicyServer(policy, "127.0.0.1", 0, max_batch=8, batch_timeout_ms=0) as server:
        clients = [WebsocketClient(port=server.port) for _ in range(4)]
        observations = [make_observation(10 + i) for i in range(4)]
        replies: list[dict | None] = [None] * 4

        def ask(i: int) -> None:
            replies[i] = clients[i].infer(observations[i])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        threads[0].start()
        assert policy.entered.wait(TIMEOUT), "first request never reached the policy"
        for thread in threads[1:]:
            thread.start()
        _wait_until(lambda: server.stats()["pending"] == 3, "three queued requests")
        # The event loop is not blocked by the running policy: health checks still answer.
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
        gate.set()
        for thread in threads:
            thread.join(TIMEOUT)
        for client in clients:
            client.close()
    assert policy.batch_sizes == [1, 3]
    for obs, reply in zip(observations, replies, strict=True):
        assert reply is not None
        np.testing.assert_array_equal(reply["actions"], _expected(policy, obs))
    assert [r["server_timing"]["batch_size"] for r in replies] == [1, 3, 3, 3]
    assert server.stats()["batch_sizes"] == {1: 1, 3: 1}


def test_client_leaving_mid_request_does_not_break_its_batch() -> None:
    gate = threading.Event()
    policy = FakePolicy(gate=gate)
    with PolicyServer(policy, "127.0.0.1", 0, max_batch=8, batch_timeout_ms=0) as server:
        first = WebsocketClient(port=server.port)
        holder = threading.Thread(target=first.infer, args=(make_observation(0),))
        holder.start()
        assert policy.entered.wait(TIMEOUT)
        # A client that sends a request and drops the TCP stream without a close handshake.
        sock = raw_websocket(server.port, b"k" * 16)
        sock.sendall(frame(mn.packb(make_observation(1))))
        sock.close()
        stayer = WebsocketClient(port=server.port)
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(stayer.infer(make_observation(2))))
        thread.start()
        _wait_until(lambda: server.stats()["pending"] == 2, "two queued requests")
        gate.set()
        holder.join(TIMEOUT)
        thread.join(TIMEOUT)
        np.testing.assert_array_equal(result["actions"], _expected(policy, make_observation(2)))
        np.testing.assert_array_equal(
            stayer.infer(make_observation(3))["actions"], _expected(policy, make_observation(3))
        )
        first.close()
        stayer.close()
    assert policy.batch_sizes[:2] == [1, 2]


# --------------------------------------------------------------------------- fuzz


def test_fuzz_leaves_server_serving() -> None:
    """Every kind of hostile message (see `fastwam.serving.fuzz`; images beyond max_shape and over-long prompts
    included) gets its correct answer, with a reason in every error text, while a bystander stays connected and keeps
    getting exactly its own actions. `fastwam bench serve --fuzz 10000` runs the same cases at scale."""
    policy = _bounded_policy()
    with PolicyServer(policy, "127.0.0.1", 0, max_message_bytes=MAX_MESSAGE_BYTES) as server:
        rng = np.random.default_rng(1234)
        cases = fuzz_cases(rng, KINDS * 18, server.metadata, MAX_MESSAGE_BYTES)
        report = run_fuzz(server.port, cases, rng, expected=policy.expected_actions, metadata=server.metadata)
        assert report["violations"] == [] and report["wrong_answers"] == 0, report
        assert report["kinds"]["error"] == 13 * 18 and report["kinds"]["ok"] == 18
        assert report["bystander_checks"] >= len(cases) // 48
        # And a brand-new client is served correctly afterwards.
        with WebsocketClient(port=server.port) as client:
            obs = make_observation(5)
            np.testing.assert_array_equal(client.infer(obs)["actions"], _expected(policy, obs))
        _wait_until(lambda: server.stats()["connections_open"] == 0, "fuzz connections to close")
        assert server.stats()["pending"] == 0


# --------------------------------------------------------------------------- helpers, CLI, bench


def test_example_observation_matches_spec(served) -> None:
    server, policy = served
    with WebsocketClient(port=server.port) as client:
        obs = example_observation(client.metadata, seed=3)
        assert obs["observation/image"].dtype == np.uint8 and obs["observation/image"].shape == (16, 16, 3)
        assert not obs["observation/state"].any() and isinstance(obs["prompt"], str)
        np.testing.assert_array_equal(client.infer(obs)["actions"], _expected(policy, obs))


def test_client_connect_failure_is_clear() -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ServerError, match="could not connect"):
        WebsocketClient(port=port, connect_timeout_s=0.2)


def test_bad_policy_metadata_fails_at_startup() -> None:
    policy = FakePolicy()
    policy.metadata = {"observation_spec": {"x": {"shape": "nope", "dtype": "uint8"}}}
    with pytest.raises(ValueError, match=r"observation_spec\['x'\] shape"):
        PolicyServer(policy, "127.0.0.1", 0)


def test_cli_help_exits_cleanly() -> None:
    from fastwam.bench import serve as bench_serve
    from fastwam.serving import serve_cli

    for cli in (serve_cli.main, bench_serve.cli):
        with pytest.raises(SystemExit) as info:
            cli(["--help"], prog="fastwam test")
        assert info.value.code == 0


def test_bench_serve_fake_json(capsys) -> None:
    from fastwam.bench import serve as bench_serve

    assert (
        bench_serve.cli(["--fake", "--clients", "1,2", "--requests", "5", "--image-size", "32", "--json"], prog="x")
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert [row["clients"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["requests"] == 5 * row["clients"] and row["errors"] == 0
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"] and row["throughput_rps"] > 0
    assert report["in_process"]["infer_p50_ms"] >= 0 and report["machine"]["cpu_count"] >= 1


def test_bench_serve_hostile_options_print_json(capsys) -> None:
    from fastwam.bench import serve as bench_serve

    argv = ["--fake", "--image-size", "16", "--requests", "3", "--warmup", "1", "--in-process-iters", "2", "--json"]
    assert bench_serve.cli([*argv, "--bystander", "--unique-prompts", "30", "--fuzz", str(KINDS)], prog="x") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["results"] == []  # the hostile scenarios replace the client sweep
    bystander = report["bystander"]
    for phase in ("alone", "normal_neighbour", "largest_neighbour"):
        assert bystander[phase]["bystander"]["n"] == 3 and bystander[phase]["bystander"]["p50_ms"] > 0
    assert bystander["largest_neighbour"]["neighbour_error"] is None and bystander["ratio"]["p99_ms_vs_alone"] > 0
    prompts = report["unique_prompts"]
    assert prompts["prompts"] == 30 and prompts["rss_mb"][-1][0] == 30 and prompts["rss_growth_mb"] < 50
    assert report["fuzz"]["messages"] == KINDS and report["fuzz"]["wrong_answers"] == 0


def test_stop_while_policy_is_busy_fails_requests_cleanly() -> None:
    gate = threading.Event()
    policy = FakePolicy(gate=gate)
    server = PolicyServer(policy, "127.0.0.1", 0, batch_timeout_ms=0).start()
    outcome: list[BaseException] = []
    client = WebsocketClient(port=server.port)

    def ask() -> None:
        try:
            client.infer(make_observation(0))
        except ServerError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    try:
        assert policy.entered.wait(TIMEOUT)
        started = time.monotonic()
        server.stop(timeout_s=TIMEOUT)
        assert time.monotonic() - started < TIMEOUT
        thread.join(TIMEOUT)
        assert outcome and "shutting down" in str(outcome[0])
    finally:
        gate.set()  # let the policy thread finish
        client.close()


def test_return_video_is_passed_only_when_asked(served) -> None:
    server, policy = served
    obs = make_observation(4)
    with WebsocketClient(port=server.port) as client:
        plain = client.infer(obs)
        assert "imagined" not in plain
        client._ws.send(mn.packb({**obs, "mode": "joint", "return_video": True}))
        reply = mn.unpackb(client._ws.recv(timeout=TIMEOUT))
    np.testing.assert_array_equal(reply["actions"], _expected(policy, obs, "joint"))
    assert reply["imagined"].shape == (2, 16, 16, 3) and reply["imagined"].dtype == np.uint8
    assert "'return_video' must be true or false" in _error(server.port, mn.packb({**obs, "return_video": 1}))

    zero = ZeroPolicy(image_size=16)  # its infer_batch has no return_video keyword
    with PolicyServer(zero, "127.0.0.1", 0) as other:
        text = _error(other.port, mn.packb({**example_observation(zero.metadata), "return_video": True}))
        assert "cannot return imagined video" in text


def test_free_dimensions_and_preferred_shape() -> None:
    metadata = {
        "observation_spec": {
            "observation/image": {"shape": [-1, -1, 3], "dtype": "uint8", "preferred_shape": [24, 32, 3]},
            "observation/state": {"shape": [None], "dtype": "float32"},
        }
    }
    specs = parse_observation_spec(metadata)
    obs = example_observation(metadata)
    assert obs["observation/image"].shape == (24, 32, 3) and obs["observation/state"].shape == (64,)
    validate_observation({**obs, "observation/image": np.zeros((5, 7, 3), np.uint8)}, specs)
    with pytest.raises(ProtocolError, match=r"has shape \(5, 7, 4\); expected uint8 array of shape \(\*, \*, 3\)"):
        validate_observation({**obs, "observation/image": np.zeros((5, 7, 4), np.uint8)}, specs)


# --------------------------------------------------------------------------- bounds, reasons, start-up


def _bounded_policy() -> FakePolicy:
    """FakePolicy with a free-size image bounded by max_shape and a length-bounded prompt (as FastWAMPolicy)."""
    policy = FakePolicy()
    spec = policy.metadata["observation_spec"]
    spec["observation/image"] = {"shape": [-1, -1, 3], "dtype": "uint8", "preferred_shape": [16, 16, 3],
                                 "max_shape": [32, 48, 3]}
    spec["prompt"] = {"shape": [], "dtype": "str", "max_length": 40}
    return policy


def test_limits_are_advertised_and_enforced_before_the_policy_runs() -> None:
    policy = _bounded_policy()
    with PolicyServer(policy, "127.0.0.1", 0) as server:
        with WebsocketClient(port=server.port) as client:
            spec = client.metadata["observation_spec"]
            assert spec["observation/image"]["max_shape"] == [32, 48, 3] and spec["prompt"]["max_length"] == 40
            largest = {**make_observation(0), "observation/image": np.full((32, 48, 3), 7, np.uint8)}
            np.testing.assert_array_equal(client.infer(largest)["actions"], _expected(policy, largest))
        calls = len(policy.batch_sizes)
        # The 598 KiB attack (2 x 100,000 x 3, legal under an unbounded [-1, -1, 3]) and a too-tall image.
        for shape in [(2, 100_000, 3), (33, 2, 3)]:
            big = {**make_observation(0), "observation/image": np.zeros(shape, np.uint8)}
            text = _error(server.port, mn.packb(big))
            assert f"has shape {shape}; this server accepts at most (32, 48, 3)" in text, text
            assert "resize before sending" in text
        text = _error(server.port, mn.packb(make_observation(0, prompt="p" * 41)))
        assert "'prompt' is 41 characters long; this server accepts at most 40" in text
        assert len(policy.batch_sizes) == calls  # refused by the event loop: the policy never saw them


def test_prompt_as_0d_numpy_string_array(served) -> None:
    server, policy = served
    obs = make_observation(6, prompt="open the drawer")
    with WebsocketClient(port=server.port) as client:
        reply = client.infer({**obs, "prompt": np.asarray("open the drawer")})  # what openpi's own server accepts
    np.testing.assert_array_equal(reply["actions"], _expected(policy, obs))
    assert "'prompt' must be a string" in _error(server.port, mn.packb({**obs, "prompt": np.asarray(["a", "b"])}))


class _Broken(FakePolicy):
    def infer_batch(self, observations, mode=None, return_video=False):
        raise AssertionError()  # no message at all


def test_every_error_carries_its_reason_and_no_traceback() -> None:
    with PolicyServer(_Broken(), "127.0.0.1", 0) as server:
        text = _error(server.port, mn.packb(make_observation(0)))
    assert text.startswith("error: internal server error (AssertionError: ") and "Traceback" not in text, text
    assert "File \"" not in text and ": )" not in text, text  # no source paths, no empty reason


def test_msgpack_errors_say_what_was_wrong(served) -> None:
    server, _ = served
    assert "invalid msgpack (FormatError: a byte that starts no msgpack value" in _error(server.port, b"\xc1\x00")
    assert "(StackError: containers nested deeper" in _error(server.port, b"\x91" * 5000 + b"\x00")


def test_serve_binds_its_port_before_loading_anything(monkeypatch) -> None:
    """A taken port fails at once: before the checkpoint loads, let alone `--compile` runs."""
    from fastwam.serving import serve_cli

    def must_not_load(args):
        raise AssertionError("the policy was loaded although the port is taken")

    monkeypatch.setattr(serve_cli, "_load_policy", must_not_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(serve_cli.PortUnavailable, match=f"cannot listen on 127.0.0.1:{port}.*pick another --port"):
            serve_cli.main(["--checkpoint", "/nonexistent", "--host", "127.0.0.1", "--port", str(port), "--compile"])


def test_server_serves_on_a_prebound_socket() -> None:
    from fastwam.serving.serve_cli import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    with pytest.raises(ServerError, match="could not connect"):  # bound, not listening: refused, not hanging
        WebsocketClient(port=port, connect_timeout_s=0)
    policy = FakePolicy()
    with PolicyServer(policy, "ignored", 1, sock=sock) as server, WebsocketClient(port=port) as client:
        assert server.port == port
        obs = make_observation(8)
        np.testing.assert_array_equal(client.infer(obs)["actions"], _expected(policy, obs))


def test_threads_option_sets_torch_threads_on_the_policy_thread() -> None:
    torch = pytest.importorskip("torch")
    from fastwam.serving.serve_cli import default_threads, set_threads

    assert default_threads(cuda=True) is None
    assert 1 <= default_threads(cuda=False) <= max(1, (torch.get_num_threads() or 1), len(os.sched_getaffinity(0)))
    previous = policy_thread().submit(torch.get_num_threads).result()
    try:
        assert set_threads(1) == 1
        assert policy_thread().submit(torch.get_num_threads).result() == 1
    finally:
        policy_thread().submit(torch.set_num_threads, previous).result()


def test_example_client_fails_fast_with_one_line_on_a_wrong_port() -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    example = Path(__file__).resolve().parents[1] / "examples" / "client_example.py"
    proc = subprocess.run([sys.executable, str(example), "--port", str(port)], capture_output=True, text=True,
                          timeout=120)  # a hang guard only; without --wait the client makes one attempt
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"could not connect to ws://127.0.0.1:{port} (no retries asked for)" in lines[0]
    assert "Connection refused" in lines[0] and "is `fastwam serve` running" in lines[0]
