"""Meta-World, wrapped once for demonstration generation and closed-loop evaluation alike.

`MetaWorldEnv(task, seed)` gives observations shaped like a real robot's: camera images (uint8, upright) and the
robot's own state (end-effector xyz + gripper opening, the first 4 of the 39 observation numbers; never object or
goal positions), plus the task's instruction. Seeding goes through `gym.make(..., seed=...)` (Meta-World ignores
`reset(seed=...)`); each seed fixes a sequence of object/goal layouts, so successive `reset()`s of one env are
reproducible, and evaluation should use seeds the demonstrations did not.

Cameras (chosen by eye at 64x64, see the README):
- "scene": a free camera framing the workspace from the front-right at 35 degrees down (lookat (0, 0.7, 0.1),
  distance 0.8, azimuth 210). The stock corner cameras show the puck/goal as 1-2 px dots and render upside down;
  a frontal view is blocked by the door/drawer/window bodies.
- "wrist": the stock `behindGripper` camera (moves with the hand) pulled in from 0.5 m to 0.4 m behind the gripper,
  so it is not inside the robot's pedestal at the start position of the button/window tasks.
- any stock camera name (topview, corner, corner2..4, behindGripper, gripperPOV); corner views are flipped upright.
Goal markers (the `goal` site, visual only, no physics) are drawn 1.5x larger so a 64x64 image shows them.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before mujoco is imported

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

MT10 = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
        "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3")

INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "put the ring on the peg",
    "basketball-v3": "dunk the ball into the basket",
    "bin-picking-v3": "move the cube from one bin to the other",
    "box-close-v3": "put the lid on the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top behind the wall",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug out of the coffee machine",
    "coffee-push-v3": "push the mug into the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "take the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "faucet-close-v3": "turn the faucet handle to close it",
    "faucet-open-v3": "turn the faucet handle to open it",
    "hammer-v3": "hammer the nail into the wall",
    "hand-insert-v3": "put the gripper into the hole",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-v3": "pull the handle up",
    "handle-pull-side-v3": "pull the handle up from the side",
    "lever-pull-v3": "pull the lever up",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "pick-out-of-hole-v3": "pick the peg out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "plate-slide-back-side-v3": "slide the plate back into the cabinet from the side",
    "plate-slide-back-v3": "slide the plate back into the cabinet",
    "plate-slide-side-v3": "slide the plate into the cabinet from the side",
    "plate-slide-v3": "slide the plate into the cabinet",
    "push-back-v3": "push the puck back to the goal",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck to the goal behind the wall",
    "reach-v3": "reach the goal with the gripper",
    "reach-wall-v3": "reach the goal behind the wall with the gripper",
    "shelf-place-v3": "place the puck on the shelf",
    "soccer-v3": "kick the ball into the goal",
    "stick-pull-v3": "use the stick to pull the container",
    "stick-push-v3": "use the stick to push the container",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-close-v3": "close the window",
    "window-open-v3": "open the window",
}

TASK_SETS: dict[str, tuple[str, ...]] = {
    "mt10": MT10,
    "mt50": tuple(sorted(INSTRUCTIONS)),
}

DEFAULT_CAMERAS = ("scene", "wrist")
STOCK_CAMERAS = ("topview", "corner", "corner2", "corner3", "corner4", "behindGripper", "gripperPOV")
_FLIPPED = {"corner", "corner2", "corner3", "corner4"}  # stock cameras that render upside down
SCENE_CAMERA = {"lookat": (0.0, 0.7, 0.1), "distance": 0.8, "azimuth": 210.0, "elevation": -35.0}
WRIST_OFFSET_SCALE = 0.8  # behindGripper sits 0.5 m behind the gripper; 0.4 m keeps it out of the pedestal
GOAL_MARKER_SCALE = 1.5
MAX_PATH_LENGTH = 500  # Meta-World raises past this many steps

# Test-time visual distribution shifts (evaluation only: demonstrations are always rendered unshifted). Each changes
# what the cameras see, never the physics, so the same actions do the same thing; they are mild on purpose (the
# task stays visible to a person at 64x64) so that a policy's success degrades rather than collapses.
VISUAL_SHIFTS = ("none", "camera", "lighting", "colour")
SHIFTED_SCENE_CAMERA = {"lookat": (0.03, 0.68, 0.1), "distance": 0.86, "azimuth": 222.0, "elevation": -42.0}
_ROBOT_BODY_PREFIXES = ("right_", "hand", "leftclaw", "rightclaw", "leftpad", "rightpad", "pedestal", "torso",
                        "head", "screen", "controller_box", "mocap")


def canonical_task(name: str) -> str:
    """'push' or 'push-v3' -> 'push-v3'; unknown names raise with the list of known ones."""
    task = name.strip()
    if task not in INSTRUCTIONS and f"{task}-v3" in INSTRUCTIONS:
        task = f"{task}-v3"
    if task not in INSTRUCTIONS:
        raise ValueError(f"unknown Meta-World task {name!r}; known: {', '.join(sorted(INSTRUCTIONS))}")
    return task


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """A task-set name ('mt10', 'mt50'), a comma-separated list, or a list; duplicates removed, order kept."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        for task in TASK_SETS.get(item.lower(), (item,)):
            task = canonical_task(task)
            if task not in out:
                out.append(task)
    if not out:
        raise ValueError(f"no tasks in {spec!r}")
    return out


def _apply_visual_shift(mujoco: Any, model: Any, shift: str) -> None:
    """Change the model's appearance for a test-time shift ("camera" is applied to the scene camera's pose)."""
    if shift == "lighting":  # dimmer, warm light: a different time of day / lamp
        model.vis.headlight.diffuse[:] = (0.22, 0.17, 0.1)
        model.vis.headlight.ambient[:] = (0.2, 0.17, 0.13)
        model.light_diffuse[:] = np.asarray((0.35, 0.26, 0.12))[None, :]
    elif shift == "colour":  # a different table, floor and wall, and objects in other colours
        tint = {"table_wood": (0.55, 0.7, 1.0), "table_col": (0.55, 0.7, 1.0), "basic_floor": (1.0, 0.7, 0.5),
                "wall_metal": (0.6, 1.0, 0.6)}
        for name, rgb in tint.items():
            i = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_MATERIAL, name)
            if i >= 0:
                model.mat_rgba[i, :3] = rgb
        tinted = {mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_MATERIAL, name) for name in tint}
        rotated: set[int] = set()
        for g in range(model.ngeom):  # task objects (not the robot): rotate their colour channels R,G,B -> B,R,G
            body = mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_BODY, model.geom_bodyid[g]) or ""
            if body in ("world", "tablelink") or body.startswith(_ROBOT_BODY_PREFIXES):
                continue
            model.geom_rgba[g, :3] = model.geom_rgba[g, [2, 0, 1]]
            mat = int(model.geom_matid[g])
            if mat >= 0 and mat not in tinted and mat not in rotated:  # a material colours the geom instead
                model.mat_rgba[mat, :3] = model.mat_rgba[mat, [2, 0, 1]]
                rotated.add(mat)


class MetaWorldEnv:
    """One Meta-World task with camera observations.

    reset() -> obs; step(action) -> (obs, reward, success, done) (both take render=False to skip the images),
    where obs = {"images": {camera: uint8 HxWx3}, "state": float32[4], "task": instruction}; success is Meta-World's
    success flag at this step; done is True once `max_steps` steps have been taken (success does not end the
    episode: the caller decides).
    """

    def __init__(self, task: str, seed: int, image_size: tuple[int, int] | int = (64, 64),
                 cameras: Sequence[str] = DEFAULT_CAMERAS, max_steps: int = 300, shift: str = "none"):
        import gymnasium as gym
        import metaworld  # noqa: F401  (registers the Meta-World/* environments)
        import mujoco

        self.task = canonical_task(task)
        self.instruction = INSTRUCTIONS[self.task]
        self.seed = int(seed)
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.cameras = tuple(cameras)
        for cam in self.cameras:
            if cam not in DEFAULT_CAMERAS and cam not in STOCK_CAMERAS:
                raise ValueError(f"unknown camera {cam!r}; choose from {DEFAULT_CAMERAS + STOCK_CAMERAS}")
        if not 1 <= max_steps <= MAX_PATH_LENGTH:
            raise ValueError(f"max_steps must be in 1..{MAX_PATH_LENGTH}")
        if shift not in VISUAL_SHIFTS:
            raise ValueError(f"unknown visual shift {shift!r}; choose from {', '.join(VISUAL_SHIFTS)}")
        self.shift = shift
        self.max_steps = max_steps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._env = gym.make("Meta-World/MT1", env_name=self.task, seed=self.seed, disable_env_checker=True)
        self._mw = self._env.unwrapped
        model = self._mw.model
        self._mujoco = mujoco
        # Visual-only tweaks, applied before the renderer is built (offsamples sizes its framebuffer).
        model.vis.quality.offsamples = 0
        goal = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "goal")
        if goal >= 0:
            model.site_size[goal] *= GOAL_MARKER_SCALE
        wrist = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, "behindGripper")
        if "wrist" in self.cameras and wrist >= 0:
            model.cam_pos0[wrist] *= WRIST_OFFSET_SCALE  # track-mode cameras use cam_pos0 (world offset)
        _apply_visual_shift(mujoco, model, shift)
        h, w = self.image_size
        self._renderer = mujoco.Renderer(model, h, w)
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._cams: dict[str, Any] = {}
        for cam in self.cameras:
            if cam == "scene":
                pose = SHIFTED_SCENE_CAMERA if shift == "camera" else SCENE_CAMERA
                c = mujoco.MjvCamera()
                c.type = mujoco.mjtCamera.mjCAMERA_FREE
                c.lookat[:] = pose["lookat"]
                c.distance, c.azimuth, c.elevation = (pose[k] for k in ("distance", "azimuth", "elevation"))
                self._cams[cam] = c
            elif cam == "wrist":
                self._cams[cam] = "behindGripper"
            else:
                self._cams[cam] = cam
        self._raw_obs: np.ndarray | None = None
        self._policy = None
        self.steps = 0

    # -- observations -------------------------------------------------------------------------------------------------
    def render(self) -> dict[str, np.ndarray]:
        out = {}
        for name, cam in self._cams.items():
            self._renderer.update_scene(self._mw.data, camera=cam)
            img = self._renderer.render()
            out[name] = np.ascontiguousarray(img[::-1, ::-1]) if name in _FLIPPED else img.copy()
        return out

    def _obs(self, render: bool = True) -> dict[str, Any]:
        assert self._raw_obs is not None
        images = self.render() if render else {}
        return {"images": images, "state": self._raw_obs[:4].astype(np.float32), "task": self.instruction}

    def observe(self) -> dict[str, Any]:
        """The observation of the current state, rendered now (without stepping)."""
        if self._raw_obs is None:
            raise RuntimeError("call reset() before observe()")
        return self._obs(render=True)

    def reset(self, render: bool = True) -> dict[str, Any]:
        """Next layout of this seed's sequence. render=False skips the images (obs["images"] == {})."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw, _ = self._env.reset()
        # The env's reset leaves derived quantities (camera poses) from before the layout change: recompute.
        self._mujoco.mj_forward(self._mw.model, self._mw.data)
        self._raw_obs = np.asarray(raw, dtype=np.float64)
        self.steps = 0
        return self._obs(render)

    def step(self, action: np.ndarray, render: bool = True) -> tuple[dict[str, Any], float, bool, bool]:
        if self._raw_obs is None:
            raise RuntimeError("call reset() before step()")
        if self.steps >= self.max_steps:
            raise RuntimeError(f"episode is over ({self.max_steps} steps); call reset()")
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(4), -1.0, 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw, reward, _terminated, truncated, info = self._env.step(a)
        self._raw_obs = np.asarray(raw, dtype=np.float64)
        self.steps += 1
        done = self.steps >= self.max_steps or bool(truncated)
        return self._obs(render), float(reward), bool(info.get("success", 0.0) > 0), done

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current state (it reads the privileged 39-dim observation)."""
        if self._raw_obs is None:
            raise RuntimeError("call reset() first")
        if self._policy is None:
            from metaworld.policies import ENV_POLICY_MAP

            self._policy = ENV_POLICY_MAP[self.task]()
        with warnings.catch_warnings():  # the experts warn that their gains exceed the action box; we clip
            warnings.simplefilter("ignore")
            action = self._policy.get_action(self._raw_obs)
        return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._env.close()

    def __enter__(self) -> MetaWorldEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
