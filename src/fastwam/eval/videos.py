"""Evaluation videos: a rollout's frames, with the policy's imagined future beside them, written as H.264 mp4.

`compose_video` lays out one frame per real step (the live rollout, and for joint / IDM policies what really happened
at the planned frames above what the policy imagined for them); `write_video` encodes it. Used by
`fastwam eval metaworld` (`fastwam.eval.metaworld`) for the first `--videos` episodes of each task.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

VIDEO_FPS = 40  # control runs at 80 Hz; half speed is easier to watch
VIDEO_MIN_HEIGHT = 192  # tiny renders are upscaled (nearest) so a video is watchable


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def compose_video(real: np.ndarray, imagined: list[tuple[int, np.ndarray]], stride: int) -> np.ndarray:
    """One video frame per real step. `real`: [T+1, h, w, 3] (cameras side by side), `imagined`: (t0, [F, h', w', 3])
    for each re-plan of the episode, frame j of a plan made at step t0 predicting step t0 + j*stride.

    Without imagined frames: the rollout alone. With them, each frame shows the live step t on the left (2x), and on
    the right for the latest plan (t0 <= t) two rows: on top what really happened at t0, t0+stride, ... (grey once
    the episode has ended), below what the policy imagined for those same steps. The re-plan interval is often
    shorter than `stride`, so showing only the imagined frame "for now" would never show a future frame.
    """
    n, h, w, _ = real.shape
    frames = real
    if imagined:
        white = lambda hh, ww: np.full((hh, ww, 3), 255, np.uint8)  # noqa: E731
        grey = np.full((h, w, 3), 128, np.uint8)
        out = []
        for t in range(n):
            t0, vid = max((c for c in imagined if c[0] <= t), key=lambda c: c[0], default=imagined[0])
            top, bottom = [], []
            for j in range(len(vid)):
                when = t0 + j * max(1, stride)
                top += [real[when] if when < n else grey, white(h, 2)]
                bottom += [_resize(vid[j], h, w), white(h, 2)]
            grid = np.concatenate([np.concatenate(top[:-1], 1), white(2, len(vid) * (w + 2) - 2),
                                   np.concatenate(bottom[:-1], 1)], axis=0)
            live = real[t].repeat(2, axis=0).repeat(2, axis=1)
            live = np.pad(live, ((0, grid.shape[0] - live.shape[0]), (0, 0), (0, 0)), constant_values=255)
            out.append(np.concatenate([live, white(grid.shape[0], 6), grid], axis=1))
        frames = np.stack(out)
    scale = max(1, math.ceil(VIDEO_MIN_HEIGHT / frames.shape[1]))
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    ph, pw = frames.shape[1] % 2, frames.shape[2] % 2  # H.264 with yuv420p needs even sides
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)))
    return frames


def write_video(path: Path, frames: np.ndarray, fps: int = VIDEO_FPS) -> Path:
    """frames uint8 [T, H, W, 3] -> PATH.mp4 (H.264, yuv420p: plays everywhere), written with PyAV (a dependency
    already, for the datasets; imageio's mp4 writer would need imageio-ffmpeg). Odd sizes are padded by one pixel
    (yuv420p needs even ones). Falls back to a gif if this PyAV build cannot encode H.264."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    mp4 = path.with_suffix(".mp4")
    frames = np.asarray(frames, dtype=np.uint8)
    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    try:
        with av.open(str(mp4), "w") as container:
            stream = container.add_stream("libx264", rate=fps, options={"crf": "18"})
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            for f in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            container.mux(stream.encode())
        return mp4
    except Exception as exc:  # noqa: BLE001 - no H.264 encoder in this PyAV build: a gif needs only pillow
        import imageio.v2 as imageio

        warnings.warn(f"mp4 writing failed ({exc}); writing a gif instead", stacklevel=2)
        mp4.unlink(missing_ok=True)
        imageio.mimsave(path.with_suffix(".gif"), list(frames), duration=1000 / fps, loop=0)
        return path.with_suffix(".gif")
