"""RoboTwin 2.0 policy adapter: RoboTwin's evaluation script drives the simulator, `fastwam serve` does the inference.

RoboTwin loads `policy/<name>/deploy_policy.py` and calls, with the options of `deploy_policy.yml` (+ CLI overrides)
as `usr_args`:
    model = get_model(usr_args)                  once
    reset_model(model)                           before each episode
    eval(TASK_ENV, model, observation)           repeatedly, with a fresh observation, until TASK_ENV.eval_success
                                                 or TASK_ENV.take_action_cnt reaches TASK_ENV.step_lim
Each `eval` call here requests one action chunk for the current observation and executes its first `replan_steps`
(24; docs/reference.md, "RoboTwin 2.0") actions with `TASK_ENV.take_action(action, action_type="qpos")` — 14 joints
included — stopping early on success or at the step limit.

Observation mapping: RoboTwin's `observation["observation"][cam]["rgb"]` for head_camera, left_camera, right_camera go
to the server's camera keys in that order (by default the first three uint8 image keys of the server's
`observation_spec`, i.e. the training preset's camera order: top, left wrist, right wrist), each resized (bilinear) to
the shape the spec declares; `observation["joint_action"]["vector"]` is the 14-d state; the instruction comes from
`TASK_ENV.get_instruction()` (RoboTwin picks seen / unseen instructions per `instruction_type`).

`python -m fastwam.eval.robotwin install <RoboTwin>/policy/FastWAM` writes the files RoboTwin expects.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

ROBOTWIN_CAMERAS = ("head_camera", "left_camera", "right_camera")
STATE_KEY, PROMPT_KEY = "observation/state", "prompt"
DEFAULT_REPLAN = 24


def _image_keys(spec: dict) -> list[str]:
    return [k for k, v in spec.items() if v.get("dtype") == "uint8" and len(v.get("shape", [])) == 3]


def _resize(img: np.ndarray, shape: tuple[int, int] | None) -> np.ndarray:
    img = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    if shape is None or img.shape[:2] == tuple(shape):
        return img
    from PIL import Image

    h, w = shape
    return np.asarray(Image.fromarray(img).resize((w, h), resample=Image.BILINEAR))


class FastWAMRoboTwinPolicy:
    """The `model` object RoboTwin passes back to `eval` / `reset_model`: a websocket client plus the mapping."""

    def __init__(
        self,
        client: Any,
        replan_steps: int = DEFAULT_REPLAN,
        camera_keys: list[str] | None = None,
        mode: str = "",
        action_type: str = "qpos",
    ):
        if replan_steps < 1:
            raise ValueError(f"replan_steps must be positive, got {replan_steps}")
        self.client = client
        self.replan_steps = int(replan_steps)
        self.mode = mode
        self.action_type = action_type
        spec = dict((getattr(client, "metadata", None) or {}).get("observation_spec", {}))
        keys = list(camera_keys) if camera_keys else _image_keys(spec)[: len(ROBOTWIN_CAMERAS)]
        if len(keys) != len(ROBOTWIN_CAMERAS):
            raise ValueError(f"need one server camera key per RoboTwin camera {ROBOTWIN_CAMERAS}; got {keys} "
                             f"(server image keys: {_image_keys(spec)}); pass camera_keys explicitly")
        self.camera_keys = keys
        self.sizes: dict[str, tuple[int, int] | None] = {}
        for key in keys:
            shape = spec.get(key, {}).get("shape")
            fixed = shape is not None and len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape[:2])
            self.sizes[key] = (shape[0], shape[1]) if fixed else None
        self.episodes = 0
        self.inferences = 0

    def request(self, observation: dict, instruction: str) -> dict:
        cams = observation["observation"]
        req: dict[str, Any] = {key: _resize(cams[cam]["rgb"], self.sizes[key])
                               for cam, key in zip(ROBOTWIN_CAMERAS, self.camera_keys)}
        req[STATE_KEY] = np.asarray(observation["joint_action"]["vector"], dtype=np.float32)
        req[PROMPT_KEY] = instruction
        if self.mode:
            req["mode"] = self.mode
        return req

    def act(self, task_env: Any, observation: dict) -> int:
        """One chunk: infer, execute up to `replan_steps` actions. Returns the number executed."""
        reply = self.client.infer(self.request(observation, task_env.get_instruction()))
        self.inferences += 1
        chunk = np.asarray(reply["actions"], dtype=np.float64)
        if chunk.ndim != 2:
            raise ValueError(f"expected an action chunk [H, D] from the server, got shape {chunk.shape}")
        done = 0
        for action in chunk[: self.replan_steps]:
            task_env.take_action(action, action_type=self.action_type)
            done += 1
            if getattr(task_env, "eval_success", False):
                break
            limit = getattr(task_env, "step_lim", None)
            if limit is not None and getattr(task_env, "take_action_cnt", 0) >= limit:
                break
        return done

    def reset(self) -> None:
        self.episodes += 1
        if hasattr(self.client, "reset"):
            self.client.reset()


# ---------------------------------------------------------------------------------------------------------------------
# The functions RoboTwin's eval script calls


def encode_obs(observation: dict) -> dict:
    return observation  # the mapping needs the server's spec, so it lives in FastWAMRoboTwinPolicy.request


def get_model(usr_args: dict) -> FastWAMRoboTwinPolicy:
    """usr_args: host (127.0.0.1), port (8000), replan_steps (24), camera_keys (comma-separated server keys for head,
    left, right), mode (fast / joint / idm), action_type (qpos). A `client` entry is used as is (tests)."""
    client = usr_args.get("client")
    if client is None:
        from fastwam.serving.client import WebsocketClient

        client = WebsocketClient(str(usr_args.get("host") or "127.0.0.1"), int(usr_args.get("port") or 8000))
    keys = usr_args.get("camera_keys")
    if isinstance(keys, str):
        keys = [k.strip() for k in keys.split(",") if k.strip()]
    return FastWAMRoboTwinPolicy(
        client,
        replan_steps=int(usr_args.get("replan_steps") or DEFAULT_REPLAN),
        camera_keys=keys or None,
        mode=str(usr_args.get("mode") or ""),
        action_type=str(usr_args.get("action_type") or "qpos"),
    )


def eval(TASK_ENV: Any, model: FastWAMRoboTwinPolicy, observation: dict) -> None:  # noqa: A001 - RoboTwin's name
    model.act(TASK_ENV, encode_obs(observation))


def reset_model(model: FastWAMRoboTwinPolicy) -> None:
    model.reset()


# ---------------------------------------------------------------------------------------------------------------------
# Installing the adapter into a RoboTwin checkout

DEPLOY_POLICY_PY = '''"""Fast-WAM for RoboTwin 2.0: inference runs in `fastwam serve`; see fastwam/eval/robotwin.py."""
from fastwam.eval.robotwin import encode_obs, eval, get_model, reset_model  # noqa: F401
'''

DEPLOY_POLICY_YML = """# Fast-WAM (served by `fastwam serve --checkpoint ...` on host:port)
policy_name: FastWAM
host: 127.0.0.1
port: 8000
replan_steps: 24
camera_keys: null   # e.g. observation/cam_high,observation/cam_left_wrist,observation/cam_right_wrist
mode: null          # fast | joint | idm (null = the server's default)
action_type: qpos
instruction_type: unseen
task_name: null
task_config: null
ckpt_setting: null
seed: null
"""

EVAL_SH = """#!/bin/bash
# usage: bash eval.sh <task_name> <task_config: demo_clean | demo_randomized> <seed> <gpu_id>
policy_name=FastWAM
task_name=${1}
task_config=${2}
seed=${3}
gpu_id=${4}
export CUDA_VISIBLE_DEVICES=${gpu_id}
cd ../..
python script/eval_policy.py --config policy/$policy_name/deploy_policy.yml \\
    --overrides \\
    --task_name ${task_name} \\
    --task_config ${task_config} \\
    --ckpt_setting fastwam_served \\
    --seed ${seed} \\
    --policy_name ${policy_name}
"""


def install(target: str | Path) -> list[Path]:
    """Write __init__.py, deploy_policy.py, deploy_policy.yml and eval.sh into `target` (<RoboTwin>/policy/FastWAM)."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    files = {
        # RoboTwin imports the policy directory as a package (`import <policy_name>`), hence the __init__.
        "__init__.py": "from .deploy_policy import *  # noqa: F401,F403\n",
        "deploy_policy.py": DEPLOY_POLICY_PY,
        "deploy_policy.yml": DEPLOY_POLICY_YML,
        "eval.sh": EVAL_SH,
    }
    written = []
    for name, text in files.items():
        path = target / name
        path.write_text(text)
        written.append(path)
    (target / "eval.sh").chmod(0o755)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "install":
        print("usage: python -m fastwam.eval.robotwin install <RoboTwin>/policy/FastWAM", file=sys.stderr)
        sys.exit(2)
    for p in install(sys.argv[2]):
        print(p)
