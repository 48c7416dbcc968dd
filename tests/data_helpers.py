"""Shared helpers for the data tests: the LeRobot-written fixture and small datasets written by our writer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LEROBOT_FIXTURE = FIXTURES / "lerobot_v30_tiny"


def _load_fixture_module():
    # The fixture script imports LeRobot only inside main(), so its pattern functions load without it.
    spec = importlib.util.spec_from_file_location("make_lerobot_fixture", FIXTURES / "make_lerobot_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


fixture = _load_fixture_module()


def write_synthetic(root: Path, lengths=(12, 9, 7), cameras: dict[str, tuple[int, int]] | None = None,
                    tasks=("push the puck to the goal", "open the drawer"), fps: int = 10,
                    actions: bool = True) -> Path:
    """A dataset with our writer, same content rules as the LeRobot fixture (episode e uses tasks[e % len]).
    actions=False: an action-free dataset (no action, no observation.state)."""
    from fastwam.data.lerobot_writer import LeRobotWriter

    cameras = cameras or fixture.CAMERAS
    feats = {k: {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"]}
             for k, (h, w) in cameras.items()}
    if actions:
        feats["observation.state"] = {"dtype": "float32", "shape": [4], "names": ["x", "y", "z", "gripper"]}
        feats["action"] = {"dtype": "float32", "shape": [4], "names": ["dx", "dy", "dz", "grip"]}
    with LeRobotWriter(root, fps, feats, robot_type="synthetic") as w:
        for ep, n in enumerate(lengths):
            data = {k: np.stack([fixture.frame_pattern(ep, t, h, wd, c) for t in range(n)])
                    for c, (k, (h, wd)) in enumerate(cameras.items())}
            if actions:
                data["observation.state"] = np.stack([fixture.state_value(ep, t) for t in range(n)])
                data["action"] = np.stack([fixture.action_value(ep, t) for t in range(n)])
            w.add_episode(tasks[ep % len(tasks)], data)
    return root


def edit_info(root: Path, fn) -> None:
    path = root / "meta/info.json"
    info = json.loads(path.read_text())
    fn(info)
    path.write_text(json.dumps(info, indent=4))


def band_row(img: np.ndarray) -> int:
    """Where the fixture pattern's bright band starts (identifies the frame index)."""
    rows = img[:, :, 0].astype(float).mean(1) > 185
    return int(np.argmax(rows))
