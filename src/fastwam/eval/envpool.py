"""Meta-World environments stepped in parallel worker processes, driven in lock-step by one batched policy.

The main process owns the policy; each worker process owns a few environment *slots*. One round of evaluation is:
the main process sends every worker one message with a command per slot (run these K actions, or start this
episode), every worker executes its slots and answers with their new observations, and the main process then makes
ONE batched policy call over all slots. Commands and replies are plain picklable values, so the same `_Worker` also
runs in-process (`workers=0`) for debugging and for tests that must not spawn.

Reproducibility: an episode is named by `EpisodeSpec(task, seed, env_seed, episode)` and is the `episode`-th reset
(0-based) of `MetaWorldEnv(task, env_seed)`. Meta-World picks each reset's object/goal layout from the env's seeded
RNG, which stepping does not consume (checked: the layout sequence is identical with and without steps in between),
so a worker reaches the i-th layout by resetting a fresh or reused env of the same (task, env_seed) up to i times.
Which slot or worker runs an episode therefore never changes what happens in it.

Spawn-safety: this module imports only numpy at top level; mujoco / metaworld are imported inside the worker
(by `fastwam.envs.metaworld`), after MUJOCO_GL is set.
"""

from __future__ import annotations

import inspect
import multiprocessing as mp
import os
import signal
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EpisodeSpec:
    task: str
    seed: int  # the evaluation seed the user asked for
    env_seed: int  # the MetaWorldEnv seed it maps to (offset away from the demonstration seeds)
    episode: int  # this episode is the env's `episode`-th reset (0-based): one of the seed's 50 layouts
    record: bool = False  # keep every rendered frame (for a video)


@dataclass(frozen=True)
class EnvSettings:
    image_size: tuple[int, int]
    cameras: tuple[str, ...]
    max_steps: int
    idle_envs: int = 3  # idle envs each worker keeps for reuse (building one costs ~1.5 s: Meta-World's MT1 setup)
    shift: str = "none"  # test-time visual shift of the rendered images (envs.metaworld.VISUAL_SHIFTS)


@dataclass
class _Slot:
    env: Any = None
    key: tuple[str, int] | None = None
    resets: int = 0  # resets done on `env` so far (its next reset is layout number `resets`)
    spec: EpisodeSpec | None = None
    steps: int = 0
    success: bool = False
    # the episode's highest shaped reward (Meta-World's 0-10 progress signal: reaching, grasping, placing), which
    # separates "got nowhere" from "grasped but missed the goal" where success alone reads 0 for both
    max_reward: float = 0.0
    frames: list[np.ndarray] = field(default_factory=list)


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def compose_frame(images: dict[str, np.ndarray], cameras: Sequence[str]) -> np.ndarray:
    """Cameras side by side (layout order), as the policy's `side_by_side` layout shows them."""
    return np.concatenate([images[c] for c in cameras], axis=1)


class _Worker:
    """Executes slot commands. Lives in a worker process (or in-process when workers=0)."""

    def __init__(self, settings: EnvSettings):
        from fastwam.envs import metaworld as mw

        self.mw = mw
        self.settings = settings
        self.slots: dict[int, _Slot] = {}
        self.idle: list[tuple[tuple[str, int], int, Any]] = []  # (key, resets, env), oldest first
        self.counts = {"envs_built": 0, "skipped_resets": 0}  # overheads, reported back with every reply
        # Rendering is ~95 % of a step's cost (9 ms of 9.2 ms at 2 x 64 px), and the policy only needs the image at
        # the end of each executed chunk. Skip the other renders when the env lets us.
        self.step_render_flag = _accepts(mw.MetaWorldEnv.step, "render")
        self.reset_render_flag = _accepts(mw.MetaWorldEnv.reset, "render")

    # -- env management ------------------------------------------------------------------------------------------------
    def _new_env(self, task: str, env_seed: int) -> Any:
        s = self.settings
        shift = {"shift": s.shift} if s.shift != "none" else {}  # (test doubles of the env take no shift)
        return self.mw.MetaWorldEnv(task, env_seed, image_size=s.image_size, cameras=s.cameras, max_steps=s.max_steps,
                                    **shift)

    def _acquire(self, slot: _Slot, spec: EpisodeSpec) -> None:
        """Give `slot` an env of (task, env_seed) positioned just before layout `spec.episode`."""
        key = (spec.task, spec.env_seed)
        # Candidates that have not gone past the wanted layout: the slot's own env, then idle ones of the same key.
        best, best_resets, where = None, -1, None
        if slot.env is not None and slot.key == key and slot.resets <= spec.episode:
            best, best_resets, where = slot.env, slot.resets, "own"
        for i, (k, r, env) in enumerate(self.idle):
            if k == key and best_resets < r <= spec.episode:
                best, best_resets, where = env, r, i
        if where not in (None, "own"):
            self.idle = [e for e in self.idle if e[2] is not best]  # take it out before parking can evict it
        if where != "own" and slot.env is not None:
            self._park(slot.key, slot.resets, slot.env)
        if where is None:
            best, best_resets = self._new_env(*key), 0
            self.counts["envs_built"] += 1
        slot.env, slot.key, slot.resets = best, key, best_resets
        while slot.resets < spec.episode:  # fast-forward through the layouts before this one
            slot.env.reset(**({"render": False} if self.reset_render_flag else {}))
            slot.resets += 1
            self.counts["skipped_resets"] += 1

    def _park(self, key: tuple[str, int] | None, resets: int, env: Any) -> None:
        self.idle.append((key, resets, env))  # type: ignore[arg-type]
        while len(self.idle) > self.settings.idle_envs:
            _, _, old = self.idle.pop(0)
            old.close()

    # -- commands ------------------------------------------------------------------------------------------------
    def _begin(self, slot_id: int, spec: EpisodeSpec) -> dict:
        slot = self.slots.setdefault(slot_id, _Slot())
        self._acquire(slot, spec)
        obs = slot.env.reset()
        slot.resets += 1
        slot.spec, slot.steps, slot.success, slot.max_reward = spec, 0, False, 0.0
        slot.frames = [compose_frame(obs["images"], self.settings.cameras)] if spec.record else []
        return obs

    def _act(self, slot_id: int, actions: np.ndarray | None, expert_steps: int,
             obs_after: int | None = None) -> tuple[dict | None, dict | None, int]:
        """Run a chunk; returns (obs if the episode goes on, the ended-episode record if it ended, steps taken).

        obs_after: return the observation made after this many of the chunk's actions instead of after all of them
        (an observation that lags the robot by the rest of the chunk: the latency axis of the evaluation); 0 = the
        observation from before the chunk's first action (inference that takes a whole segment, run back to back).
        """
        slot = self.slots[slot_id]
        if slot.spec is None:
            raise RuntimeError(f"slot {slot_id} has no running episode")
        n = expert_steps if actions is None else len(actions)
        at = n if obs_after is None else obs_after
        if not 0 <= at <= n:
            raise ValueError(f"obs_after must be in 0..{n}, got {obs_after}")
        obs, kept, ended, taken = None, None, None, 0
        if at == 0:
            kept = slot.env.observe()
        for j in range(n):
            action = slot.env.expert_action() if actions is None else actions[j]
            render = slot.spec.record or j == at - 1
            kw = {"render": render} if self.step_render_flag else {}
            obs, reward, success, done = slot.env.step(action, **kw)
            slot.max_reward = max(slot.max_reward, float(reward))
            if j == at - 1:
                kept = obs
            slot.steps += 1
            taken += 1
            if slot.spec.record:
                slot.frames.append(compose_frame(obs["images"], self.settings.cameras))
            if success:
                slot.success = True
            if success or done:  # success ends the episode at once (the paper's protocol and Meta-World's)
                ended = {"spec": slot.spec, "success": slot.success, "length": slot.steps,
                         "max_reward": slot.max_reward, "frames": np.stack(slot.frames) if slot.frames else None}
                slot.spec, slot.frames = None, []
                return None, ended, taken
        return kept, None, taken

    def handle(self, commands: list[dict]) -> list[dict]:
        """Each command: {"slot", optional "begin": spec} or {"slot", "actions" | "expert_steps", optional "next"}."""
        replies = []
        before = dict(self.counts)
        for cmd in commands:
            sid = cmd["slot"]
            reply: dict[str, Any] = {"slot": sid, "obs": None, "ended": None, "started": None, "steps": 0}
            if "begin" in cmd:
                reply["obs"] = self._begin(sid, cmd["begin"])
                reply["started"] = cmd["begin"]
            else:
                obs, ended, taken = self._act(sid, cmd.get("actions"), int(cmd.get("expert_steps", 0)),
                                              cmd.get("obs_after"))
                reply.update(obs=obs, ended=ended, steps=taken)
                if ended is not None and cmd.get("next") is not None:
                    reply["obs"] = self._begin(sid, cmd["next"])
                    reply["started"] = cmd["next"]
            replies.append(reply)
        if replies:  # the round's overheads ride on its first reply
            replies[0]["overhead"] = {k: v - before[k] for k, v in self.counts.items()}
        return replies

    def close(self) -> None:
        # Close explicitly: EGL contexts freed by the garbage collector at interpreter exit print errors.
        envs = [s.env for s in self.slots.values() if s.env is not None] + [e for _, _, e in self.idle]
        self.slots.clear()
        self.idle.clear()
        for env in envs:
            try:
                env.close()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass


def _worker_main(conn: Any, settings: EnvSettings) -> None:
    """Worker process entry point (module level, so spawn can find it)."""
    # Ctrl-C goes to the whole process group; let the main process decide and shut us down cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("MUJOCO_GL", "egl")
    worker = None
    try:
        worker = _Worker(settings)
        conn.send(("ready", {"step_render_flag": worker.step_render_flag}))
        while True:
            msg = conn.recv()
            if msg is None:
                break
            try:
                conn.send(("ok", worker.handle(msg)))
            except Exception:  # noqa: BLE001 - the traceback goes back to the main process
                conn.send(("error", traceback.format_exc()))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass
    except Exception:  # noqa: BLE001 - failure while starting
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
    finally:
        if worker is not None:
            worker.close()


class EnvPoolError(RuntimeError):
    """A worker failed; the message carries its traceback."""


class EnvPool:
    """`num_slots` environment slots spread round-robin over `workers` processes (0 = in this process)."""

    def __init__(self, num_slots: int, workers: int, settings: EnvSettings, start_timeout_s: float = 300.0):
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        self.num_slots = num_slots
        self.workers = max(0, min(workers, num_slots))
        self.settings = settings
        self._local: _Worker | None = None
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        if self.workers == 0:
            self._local = _Worker(settings)
            self.step_render_flag = self._local.step_render_flag
            return
        ctx = mp.get_context("spawn")  # fork after torch/EGL initialisation is unsafe; spawn is portable
        try:
            for _ in range(self.workers):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(child, settings), daemon=True)
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
            flags = [self._recv(i, start_timeout_s) for i in range(self.workers)]
            self.step_render_flag = all(f["step_render_flag"] for f in flags)
        except BaseException:
            self.close()
            raise

    def worker_of(self, slot: int) -> int:
        return slot % self.workers if self.workers else 0

    def _recv(self, i: int, timeout_s: float | None = None) -> Any:
        conn = self._conns[i]
        if timeout_s is not None and not conn.poll(timeout_s):
            raise EnvPoolError(f"env worker {i} did not answer within {timeout_s:.0f} s")
        try:
            status, payload = conn.recv()
        except EOFError:
            self._procs[i].join(timeout=5)  # reap it so the exit code is known
            code = self._procs[i].exitcode
            raise EnvPoolError(f"env worker {i} died (exit code {code}); see its stderr above") from None
        if status == "error":
            raise EnvPoolError(f"env worker {i} failed:\n{payload}")
        return payload

    def submit(self, commands: list[dict]) -> Any:
        """Send one round of slot commands to the workers and return at once (a ticket for `collect`).

        Tickets must be collected in the order they were submitted (each worker answers its messages in order).
        In-process (workers=0) the commands run here, before this returns.
        """
        if self._local is not None:
            return ("done", self._local.handle(commands))
        per_worker: dict[int, list[dict]] = {}
        for cmd in commands:
            per_worker.setdefault(self.worker_of(cmd["slot"]), []).append(cmd)
        for w, cmds in per_worker.items():
            self._conns[w].send(cmds)
        return ("sent", list(per_worker), [c["slot"] for c in commands])

    def collect(self, ticket: Any) -> list[dict]:
        """Wait for a submitted round; replies come back in command order."""
        if ticket[0] == "done":
            return ticket[1]
        _, workers, order = ticket
        by_slot: dict[int, dict] = {}
        for w in workers:
            for reply in self._recv(w):
                by_slot[reply["slot"]] = reply
        return [by_slot[sid] for sid in order]

    def run(self, commands: list[dict]) -> list[dict]:
        """Execute one round of slot commands (all workers in parallel) and wait for it."""
        return self.collect(self.submit(commands))

    def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():  # a worker stuck in rendering: stop it (only our own child processes)
                proc.terminate()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
