"""A deterministic stand-in for `FastWAMPolicy` for the server tests (imported by tests/server_test.py).

Actions are a cheap, exact function of the observation (state, both image means, prompt length, mode), so a reply
that came back over the wire can be compared bit-for-bit with `policy.infer` in process, and a mix-up between
clients (or batch slots) shows up as a wrong answer.
"""

from __future__ import annotations

import threading

import numpy as np

from fastwam.serving.testing import MODES, libero_observation_spec

REJECTED_PROMPT = "please raise a ValueError"


class FakePolicy:
    def __init__(
        self,
        *,
        image_size: int = 16,
        state_dim: int = 8,
        action_shape: tuple[int, int] = (4, 7),
        gate: threading.Event | None = None,
    ) -> None:
        """`gate`: if given, the first `infer_batch` call sets `entered` and then blocks until the gate is set, so a
        test can line requests up behind it and observe a batch > 1 without relying on timing."""
        self.action_shape = action_shape
        self.metadata = {
            "observation_spec": libero_observation_spec(image_size, state_dim),
            "action_shape": list(action_shape),
            "mode": "fast",
            "modes": list(MODES),
            "checkpoint": "FakePolicy (tests)",
        }
        self.gate = gate
        self.entered = threading.Event()
        self.batch_sizes: list[int] = []
        self.resets = 0
        self.threads: set[int] = set()  # OS threads that ran infer_batch / reset
        self._lock = threading.Lock()

    def expected_actions(self, obs: dict, mode: str | None = None) -> np.ndarray:
        horizon, dim = self.action_shape
        state = np.asarray(obs["observation/state"], dtype=np.float32).astype(np.float64)
        base = (
            float(np.mean(obs["observation/image"])) / 255.0
            + 2.0 * float(np.mean(obs["observation/wrist_image"])) / 255.0
            + 0.01 * len(obs["prompt"])
            + 10.0 * MODES.index(mode or "fast")
        )
        steps = np.arange(1, horizon + 1, dtype=np.float64)[:, None]
        return (0.1 * steps * np.resize(state, dim)[None, :] + base).astype(np.float32)

    def infer_batch(self, observations: list[dict], mode: str | None = None, return_video: bool = False) -> list[dict]:
        with self._lock:
            self.threads.add(threading.get_ident())
            self.batch_sizes.append(len(observations))
            first = len(self.batch_sizes) == 1
        if first and self.gate is not None:
            self.entered.set()
            if not self.gate.wait(timeout=30):
                raise RuntimeError("FakePolicy gate was never opened")
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        for obs in observations:
            if obs["prompt"] == REJECTED_PROMPT:
                raise ValueError(f"prompt {REJECTED_PROMPT!r} is rejected by FakePolicy")
        results = [{"actions": self.expected_actions(obs, mode), "mode": mode or "fast"} for obs in observations]
        if return_video:  # "imagined frames": the observation's image repeated, [F, H, W, 3] uint8
            for obs, result in zip(observations, results, strict=True):
                result["imagined"] = np.repeat(obs["observation/image"][None], 2, axis=0)
        return results

    def infer(self, observation: dict, mode: str | None = None, return_video: bool = False) -> dict:
        return self.infer_batch([observation], mode=mode, return_video=return_video)[0]

    def reset(self) -> None:
        with self._lock:
            self.threads.add(threading.get_ident())
            self.resets += 1


def make_observation(seed: int, image_size: int = 16, state_dim: int = 8, prompt: str | None = None) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8),
        "observation/state": rng.standard_normal(state_dim).astype(np.float32),
        "prompt": prompt if prompt is not None else f"task number {seed}",
    }
